//! Expert placement: which logical expert each physical slot of every MoE layer holds
//! ([`plan`]), the facts of a model's `config.json` that decide it ([`config`]), the layout a
//! deployment asks for ([`layout`]), the planners that rebalance it under measured load
//! ([`planner`]: DeepSeek's EPLB and an incremental mode), and the loop that decides and
//! migrates live ([`rebalance`]), which the operator and `kubemoe up` both run.
//!
//! No Kubernetes and no gRPC here: routers and workers read plans without linking either, and
//! the rebalance loop reaches servers and records its progress through two small traits.

pub mod config;
pub mod layout;
pub mod plan;
pub mod planner;
pub mod rebalance;

pub use config::{ModelConfig, DEFAULT_MAX_CONTEXT};
pub use layout::{Invalid, Layout, LayoutSpec};
pub use plan::{LayerPlacement, PlacementPlan, KEY};

/// What went wrong with a placement, a model config, or a rebalance.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A placement or planning problem that cannot be used as given; the message says what to change.
    #[error("invalid placement: {0}")]
    InvalidPlacement(String),
    #[error("{0}")]
    InvalidDuration(String),
    #[error("cannot parse the model config {origin}")]
    ModelConfig {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Routers(String),
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the planning task failed")]
    Planner(#[source] tokio::task::JoinError),
    /// One call of a migration or load poll to one server failed.
    #[error("{step} on {target}")]
    Call {
        step: &'static str,
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, `: `-separated: the one line a log, a gRPC status or a condition
/// carries (the error itself keeps the chain in `source`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A duration as the CRD writes them (`DURATION_PATTERN`: `90s`, `1m30s`, `500ms`, `1.5h`);
/// `field` names it in the error.
pub fn parse_duration(field: &str, text: &str) -> Result<std::time::Duration> {
    let bad = || {
        Error::InvalidDuration(format!("{field} {text:?} is not a duration like 30s, 1m30s, 500ms or 1.5h"))
    };
    let mut total = 0.0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, seconds) = [("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        total += value * seconds;
        rest = &rest[unit.len()..];
    }
    if text.is_empty() {
        return Err(bad());
    }
    // Past Duration's range (a hostile "1000…0h") is refused, never a panic.
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_as_the_schema_writes_them() {
        let d = |t| parse_duration("balancing.interval", t);
        assert_eq!(d("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("window", &format!("{}h", "9".repeat(400))).is_err());
        assert_eq!(d("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(d("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(d("1.5h").unwrap(), Duration::from_secs(5400));
        for bad in ["", "30", "s", "10x", "1..2s"] {
            let e = d(bad).unwrap_err().to_string();
            assert!(e.contains("balancing.interval") && e.contains("like 30s"), "{e}");
        }
    }
}
