#![allow(clippy::unwrap_used)]
//! Reconciles many ModelDeployments through kube-rs's mock service and the in-memory
//! apiserver of the tests, three passes each: create (every child applied), ready (the
//! workloads report ready: status only), unchanged (reads only). Prints time per reconcile,
//! requests and bytes written per reconcile, and the resident memory grown per deployment.
//!
//!   cargo run --release -p kubemoe-operator --example reconcile_bench [-- <count>]
//!
//! The in-memory apiserver runs in the same process, so its work (JSON parsing, storing) is
//! inside the times and the memory: they bound the operator's own cost from above.

#[path = "../tests/support/mod.rs"]
mod support;

use kubemoe_operator::controller::{self, Context};
use kubemoe_operator::deployment::ModelDeployment;
use kubemoe_operator::http::Metrics;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Presets and worker counts cycled over the deployments: small and large layouts.
const SHAPES: [(&str, u32, u32); 4] = [
    ("builtin:tiny", 2, 0),
    ("builtin:small", 8, 0),
    ("builtin:v2-lite-shape", 4, 4),
    ("builtin:v3-shape", 32, 32),
];

fn path(i: usize) -> String {
    format!("/apis/kubemoe.io/v1alpha1/namespaces/bench-{}/modeldeployments/md-{i}", i % 10)
}

/// Resident set size of this process in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn pass(name: &str, count: usize, api: &support::FakeApi, context: &Arc<Context>) {
    api.take_requests();
    let mut times = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let md: ModelDeployment = api.object(&path(i));
        let t = Instant::now();
        controller::reconcile(Arc::new(md), context.clone()).await.unwrap();
        times.push(t.elapsed());
    }
    let total = started.elapsed();
    let requests = api.take_requests();
    let writes: Vec<_> = requests.iter().filter(|r| r.is_write()).collect();
    times.sort();
    let mean = total / u32::try_from(count).unwrap();
    let quantile = |q: f64| times[((count as f64 * q) as usize).min(count - 1)];
    println!(
        "| {name} | {count} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.0} |",
        total.as_secs_f64() * 1e3,
        micros(mean),
        micros(quantile(0.5)),
        micros(quantile(0.99)),
        requests.len() as f64 / count as f64,
        writes.len() as f64 / count as f64,
        writes.iter().map(|r| r.bytes).sum::<usize>() as f64 / count as f64,
    );
}

fn micros(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args().nth(1).map_or(500, |n| n.parse().expect("count must be a number"));
    let (client, api) = support::client();
    let context = Context::new(
        client,
        "ghcr.io/kubemoe/kubemoe:bench".into(),
        "kubemoe-system".into(),
        Arc::new(Metrics::default()),
    );
    for i in 0..count {
        let (source, workers, redundant) = SHAPES[i % SHAPES.len()];
        api.insert(
            &path(i),
            json!({
                "apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": format!("md-{i}"), "namespace": format!("bench-{}", i % 10)},
                "spec": {"model": {"source": source}, "workers": {"replicas": workers},
                         "experts": {"redundant": redundant}},
            }),
        );
    }
    let rss_before = rss_kib();
    println!("| pass | reconciles | total ms | mean µs | p50 µs | p99 µs | requests/reconcile | writes/reconcile | bytes written/reconcile |");
    println!("|---|---|---|---|---|---|---|---|---|");
    pass("create", count, &api, &context).await;
    for i in 0..count {
        api.mark_ready(&format!("bench-{}", i % 10), &format!("md-{i}"));
    }
    pass("ready", count, &api, &context).await;
    pass("unchanged", count, &api, &context).await;
    let grown = rss_kib().saturating_sub(rss_before);
    println!(
        "\nresident memory grown over the run: {grown} KiB ({:.1} KiB per ModelDeployment, apiserver store included)",
        grown as f64 / count as f64
    );
}
