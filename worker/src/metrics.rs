//! The worker's HTTP port once its experts are loaded: `/metrics` in the Prometheus text format
//! and `/health` (200). While they load, [`kubemoe_api::loading::app`] answers (503, with the
//! bytes loaded). What a router already reports (the load per logical expert, summed over
//! workers) is here per worker, with the time dispatches take, so a slow or overloaded rank
//! shows itself.
//!
//! Series: `kubemoe_worker_info{model,rank,world_size}`, `kubemoe_worker_placement_epoch`,
//! `kubemoe_worker_experts_held`, `kubemoe_worker_expert_tokens_total{layer,expert}` (experts
//! held or ever served), `kubemoe_worker_dispatch_duration_seconds` (histogram, from the
//! request's arrival to its answer being ready), `kubemoe_worker_dispatch_refused_total`,
//! `kubemoe_worker_dispatches_total{transport}` (computed ones, by `grpc` or `data`:
//! [`kubemoe_api::data`]), and
//! [`kubemoe_api::loading::gauges`].

use crate::ExpertStore;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kubemoe_api::metrics::{label_value, Histogram};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bucket bounds of the dispatch duration (seconds): a decode step's dispatch takes well under
/// a millisecond on a small model, a large prefill seconds.
const DISPATCH: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What the gRPC service records as it serves.
pub struct Stats {
    pub dispatch_duration: Histogram,
    pub dispatch_refused: AtomicU64,
    /// Dispatches taken over gRPC and over the data path ([`kubemoe_api::data`]).
    pub grpc_dispatches: AtomicU64,
    pub data_dispatches: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            dispatch_duration: Histogram::new(DISPATCH),
            dispatch_refused: AtomicU64::new(0),
            grpc_dispatches: AtomicU64::new(0),
            data_dispatches: AtomicU64::new(0),
        }
    }
}

struct Sources {
    store: Arc<ExpertStore>,
    stats: Arc<Stats>,
}

/// The routes of the worker's HTTP server.
pub fn routes(store: Arc<ExpertStore>, stats: Arc<Stats>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { StatusCode::OK }))
        .with_state(Arc::new(Sources { store, stats }))
}

async fn metrics(State(sources): State<Arc<Sources>>) -> Response {
    match render(&sources.store, &sources.stats) {
        Ok(text) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, kubemoe_placement::error_chain(&e)).into_response(),
    }
}

/// The exposition text.
pub fn render(store: &ExpertStore, stats: &Stats) -> crate::Result<String> {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP kubemoe_worker_{name} {help}\n# TYPE kubemoe_worker_{name} {kind}");
    };
    family(&mut out, "info", "gauge", "The model and rank this worker serves (always 1)");
    let _ = writeln!(
        out,
        "kubemoe_worker_info{{model=\"{}\",rank=\"{}\",world_size=\"{}\"}} 1",
        label_value(&store.model),
        store.rank,
        store.world_size()?
    );
    family(&mut out, "placement_epoch", "gauge", "Epoch of the placement in force on this worker");
    let _ = writeln!(out, "kubemoe_worker_placement_epoch {}", store.epoch()?);
    let held: BTreeSet<(usize, usize)> =
        store.held()?.into_iter().flat_map(|(l, experts)| experts.into_iter().map(move |e| (l, e))).collect();
    family(&mut out, "experts_held", "gauge", "Routed experts (layer, expert) resident on this worker");
    let _ = writeln!(out, "kubemoe_worker_experts_held {}", held.len());
    family(&mut out, "expert_tokens_total", "counter", "Tokens this worker computed per logical expert");
    for (layer, tokens) in store.stats() {
        for (expert, t) in tokens.iter().enumerate().filter(|(e, t)| **t > 0 || held.contains(&(layer, *e))) {
            let _ = writeln!(
                out,
                "kubemoe_worker_expert_tokens_total{{layer=\"{layer}\",expert=\"{expert}\"}} {t}"
            );
        }
    }
    stats.dispatch_duration.render(
        &mut out,
        "kubemoe_worker_dispatch_duration_seconds",
        "Time from a dispatch's arrival to its partial sums being ready",
        "",
    );
    family(
        &mut out,
        "dispatch_refused_total",
        "counter",
        "Dispatches refused as invalid (or for experts not held)",
    );
    let _ = writeln!(
        out,
        "kubemoe_worker_dispatch_refused_total {}",
        stats.dispatch_refused.load(Ordering::Relaxed)
    );
    family(&mut out, "dispatches_total", "counter", "Dispatches computed, by transport");
    for (transport, n) in [("grpc", &stats.grpc_dispatches), ("data", &stats.data_dispatches)] {
        let n = n.load(Ordering::Relaxed);
        let _ = writeln!(out, "kubemoe_worker_dispatches_total{{transport=\"{transport}\"}} {n}");
    }
    kubemoe_api::loading::gauges(&mut out, kubemoe_model::progress::loaded, &store.held_weights()?.0);
    Ok(out)
}
