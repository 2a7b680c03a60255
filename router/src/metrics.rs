//! `/metrics` on the router's HTTP port, in the Prometheus text format (0.0.4): the expert
//! load over the sliding window (what the rebalancer reads over gRPC, for dashboards), the
//! placement epoch and the imbalance it leaves, the bytes dispatch moves, the bytes the prefix
//! cache holds, and the serving statistics under vLLM's names ([`crate::stats`]).
//!
//! Rendered at scrape time from the live counters, so it never disagrees with the gRPC
//! `Balancer/Load` answer at the same instant.

use crate::remote::RemoteExperts;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What `/metrics` reads.
pub struct Sources {
    pub experts: Arc<RemoteExperts>,
    pub stats: Arc<crate::stats::Stats>,
    /// The `model_name` label of the vLLM-named series.
    pub model_name: String,
    /// The weights this router holds.
    pub held: kubemoe_model::memory::Held,
}

/// The `/metrics` route.
pub fn routes(sources: Sources) -> axum::Router {
    axum::Router::new().route("/metrics", get(metrics)).with_state(Arc::new(sources))
}

async fn metrics(State(sources): State<Arc<Sources>>) -> impl IntoResponse {
    let mut text = render(&sources.experts);
    let prefix_bytes = sources.stats.prefix_cache_bytes.load(Ordering::Relaxed);
    let _ = writeln!(
        text,
        "# HELP kubemoe_router_prefix_cache_bytes Bytes of latent KV rows the prefix cache holds\n\
         # TYPE kubemoe_router_prefix_cache_bytes gauge\nkubemoe_router_prefix_cache_bytes {prefix_bytes}"
    );
    sources.stats.render(&mut text, &sources.model_name);
    kubemoe_api::loading::gauges(&mut text, kubemoe_model::progress::loaded, &sources.held.0);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// The exposition text.
pub fn render(experts: &RemoteExperts) -> String {
    let (layers, covered, plan) = experts.load();
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP kubemoe_router_{name} {help}\n# TYPE kubemoe_router_{name} {kind}");
    };
    family(&mut out, "expert_tokens", "gauge", "Tokens routed to each logical expert over the load window");
    for (layer, tokens) in &layers {
        for (expert, t) in tokens.iter().enumerate() {
            let _ =
                writeln!(out, "kubemoe_router_expert_tokens{{layer=\"{layer}\",expert=\"{expert}\"}} {t}");
        }
    }
    family(&mut out, "load_window_seconds", "gauge", "Time the expert token counts cover");
    let _ = writeln!(out, "kubemoe_router_load_window_seconds {}", covered.as_secs_f64());
    family(&mut out, "placement_epoch", "gauge", "Epoch of the expert placement this router routes by");
    let _ = writeln!(out, "kubemoe_router_placement_epoch {}", plan.epoch);
    let loads: Vec<Vec<f64>> = layers.iter().map(|(_, t)| t.iter().map(|&x| x as f64).collect()).collect();
    if loads.iter().flatten().sum::<f64>() > 0.0 {
        let balance =
            kubemoe_placement::planner::balance(&loads, &plan.phy_to_log(), plan.slots_per_worker as usize);
        family(
            &mut out,
            "expert_imbalance",
            "gauge",
            "Max over mean tokens per worker over the window (1 is perfect)",
        );
        let _ =
            writeln!(out, "kubemoe_router_expert_imbalance {}", 1.0 / balance.overall.max(f64::MIN_POSITIVE));
    }
    family(
        &mut out,
        "workers_down",
        "gauge",
        "Workers this router routes around (failed a dispatch, not back yet)",
    );
    let _ = writeln!(out, "kubemoe_router_workers_down {}", experts.down().len());
    family(&mut out, "dispatch_bytes_total", "counter", "Bytes moved between this router and the workers");
    let b = &experts.bytes;
    for (kind, v) in [("activations", &b.activations), ("routes", &b.routes), ("received", &b.received)] {
        let _ = writeln!(
            out,
            "kubemoe_router_dispatch_bytes_total{{kind=\"{kind}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out
}
