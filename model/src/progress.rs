//! How far loading has got: bytes of stored tensors read, of those the process set out to load
//! (`open_tensors` adds what its filter accepts; every tensor loaded adds its stored bytes).
//! DeepSeek-V3's experts take minutes to read; [`reported`] says how far it got while it runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes loaded and to load, for the whole process.
pub struct Progress {
    loaded: AtomicU64,
    total: AtomicU64,
}

static LOAD: Progress = Progress { loaded: AtomicU64::new(0), total: AtomicU64::new(0) };

/// The process's loading progress.
pub fn load() -> &'static Progress {
    &LOAD
}

/// (bytes loaded, bytes to load) of the process: what servers report while they load.
pub fn loaded() -> (u64, u64) {
    LOAD.get()
}

impl Progress {
    /// `bytes` more will be loaded.
    pub fn expect(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` were loaded.
    pub fn advance(&self, bytes: u64) {
        self.loaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (bytes loaded, bytes to load).
    pub fn get(&self) -> (u64, u64) {
        (self.loaded.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}

/// Runs `f` (a load) and reports [`load`]'s progress while it runs: a log line every 5 s, and
/// on a terminal a bar on stderr redrawn every 250 ms.
pub fn reported<T>(role: &str, f: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    /// Stops the reporter when `f` returns or unwinds (a scope joins its threads first, so a
    /// panicking load would otherwise wait for the reporter forever).
    struct Stop<'a>(&'a AtomicBool, std::thread::Thread);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            self.1.unpark();
        }
    }
    std::thread::scope(|s| {
        let reporter = s.spawn(|| {
            let start = Instant::now();
            let mut logged = start;
            while !done.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_millis(250));
                let (loaded, total) = load().get();
                let percent = loaded as f64 * 100.0 / total.max(1) as f64;
                if terminal && !done.load(Ordering::Relaxed) {
                    let bar = "#".repeat((percent / 5.0) as usize);
                    eprint!("\r{role}: loading weights [{bar:<20}] {} of {} MiB", loaded >> 20, total >> 20);
                }
                if logged.elapsed() >= Duration::from_secs(5) {
                    logged = Instant::now();
                    tracing::info!(
                        role,
                        loaded_mib = loaded >> 20,
                        total_mib = total >> 20,
                        percent = format!("{percent:.0}"),
                        seconds = start.elapsed().as_secs(),
                        "loading weights"
                    );
                }
            }
            if terminal {
                eprint!("\r{:70}\r", "");
            }
        });
        let _stop = Stop(&done, reporter.thread().clone());
        f()
    })
}
