//! Logs of every kubemoe process: `tracing` events on stderr, as text or one JSON object per
//! line, filtered by `RUST_LOG` (default `info`). Spans carry the ids that let one request be
//! followed across processes (`request{id=…}` in the router, `dispatch{requests=…}` in workers).

use tracing_subscriber::EnvFilter;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

static FORMAT: std::sync::OnceLock<Format> = std::sync::OnceLock::new();

/// The format this process logs in, which `up` gives its children.
pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Text)
}

/// Installs the process's subscriber.
pub fn init(format: Format) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colours);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
}
