//! A TCP proxy that delays every byte it forwards by a fixed one-way time, both ways: what
//! `bench-serving` puts between a router and its workers to see cross-node latency on one
//! machine (the kernel's `netem` queueing discipline is not available on these machines).
//! Each direction of a connection is a reader thread stamping what it read and a writer
//! thread sending it on once its time has come, so the delay adds latency without limiting
//! bandwidth; at most [`IN_FLIGHT`] chunks wait per direction. Threads, not tasks: tokio's
//! timers tick in milliseconds, and the delays measured are hundreds of microseconds (a
//! thread's sleep still wakes some 50–100 µs late: the real delay is a little longer).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks read but not yet forwarded, per direction.
const IN_FLIGHT: usize = 1024;

/// A running proxy; dropping it closes its listener (connections open run until they close).
pub struct Proxy {
    stop: Arc<AtomicBool>,
    accepting: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The listener closes with its thread: the port is free again once this returns.
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

/// Listens on `listen`, forwarding each connection to `upstream` with `delay` each way.
pub fn start(listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> std::io::Result<Proxy> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let accepting = std::thread::Builder::new().name("delay-proxy".into()).spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((client, _)) => {
                    if let Err(error) = connect(client, upstream, delay) {
                        tracing::warn!(%error, %upstream, "delay proxy: connection not forwarded");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(error) => tracing::warn!(%error, "delay proxy: accept failed"),
            }
        }
    })?;
    Ok(Proxy { stop, accepting: Some(accepting) })
}

fn connect(client: TcpStream, upstream: SocketAddr, delay: Duration) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect(upstream)?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    pipe(client.try_clone()?, server.try_clone()?, delay)?;
    pipe(server, client, delay)
}

/// Forwards what `from` sends to `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    std::thread::Builder::new().name("delay-read".into()).spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return, // the writer sees the channel close
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    })?;
    std::thread::Builder::new().name("delay-write".into()).spawn(move || {
        // Normally the reader's end closes the channel: pass the end on. A failed write ends
        // both ways, so that the other direction's reader stops too.
        let mut end = Shutdown::Write;
        for (read, bytes) in rx {
            let due = read + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                end = Shutdown::Both;
                break;
            }
        }
        let _ = to.shutdown(end);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bytes_arrive_whole_and_in_order_one_delay_later_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).unwrap();
            }
        });
        let delay = Duration::from_millis(20);
        let listen = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let _proxy = start(listen, upstream, delay).unwrap();
        let mut c = TcpStream::connect(listen).unwrap();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        let writer = {
            let mut c = c.try_clone().unwrap();
            let sent = sent.clone();
            std::thread::spawn(move || c.write_all(&sent).unwrap())
        };
        let mut back = vec![0u8; sent.len()];
        c.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back, sent);
        // There and back: two delays at least.
        assert!(t.elapsed() >= 2 * delay, "{:?}", t.elapsed());
    }
}
