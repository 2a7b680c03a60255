//! `/metrics` (Prometheus text format), `/healthz` (the process serves) and `/readyz` (the
//! Kubernetes API answered this replica, as leader or standby).

use crate::{Error, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// One ModelDeployment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabel {
    pub namespace: String,
    pub name: String,
}

/// The operator's metrics. Cloned handles share the values.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by outcome: `ok`, `invalid` (spec refused), `error` (API failure, retried).
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    /// Server-side applies by kind; flat while nothing changes.
    pub applies: Family<KindLabel, Counter>,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
    /// Rebalances by outcome: `rebalanced`, `recovered` (a recovery epoch: experts of workers
    /// down placed on live ones), `failed` (then settled back or forward), `settled` (a
    /// migration an earlier poll or operator left unfinished, converged).
    pub rebalances: Family<ResultLabel, Counter>,
    /// Max over mean tokens per worker at the last poll of each deployment (after a rebalance:
    /// what the new placement gives on the load that triggered it).
    pub imbalance: Family<DeploymentLabel, Gauge<f64, AtomicU64>>,
    /// Workers the routers of each deployment route around, at its last poll.
    pub workers_down: Family<DeploymentLabel, Gauge>,
    /// Set once the Kubernetes API answered.
    pub api_reachable: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let applies = Family::<KindLabel, Counter>::default();
        let leader = Gauge::default();
        let rebalances = Family::<ResultLabel, Counter>::default();
        let imbalance = Family::<DeploymentLabel, Gauge<f64, AtomicU64>>::default();
        let workers_down = Family::<DeploymentLabel, Gauge>::default();
        let mut registry = Registry::with_prefix("kubemoe_operator");
        registry.register("reconciles", "ModelDeployment reconciles by result", reconciles.clone());
        registry.register("reconcile_duration_seconds", "Time of one reconcile", reconcile_seconds.clone());
        registry.register("applies", "Server-side applies of owned objects by kind", applies.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        registry.register("rebalances", "Expert rebalances by result", rebalances.clone());
        registry.register(
            "imbalance",
            "Max over mean tokens per worker of a ModelDeployment at its last load poll",
            imbalance.clone(),
        );
        registry.register(
            "workers_down",
            "Workers the routers of a ModelDeployment route around, at its last load poll",
            workers_down.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            applies,
            leader,
            rebalances,
            imbalance,
            workers_down,
            api_reachable: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Binds `addr` and serves until `shutdown`; returns the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<Result<()>>> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Serve { addr, source })?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    Ok(tokio::spawn(async move {
        kubemoe_api::http::serve(listener, None, app, kubemoe_api::http::HEADER_TIMEOUT, shutdown).await;
        Ok(())
    }))
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.encode())
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.api_reachable.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the Kubernetes API")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_and_health_until_shutdown() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciles.get_or_create(&ResultLabel { result: "ok" }).inc();
        let shutdown = CancellationToken::new();
        // Port 0: the test asks the listener for the port it got.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = serve(addr, metrics.clone(), shutdown.clone()).await.unwrap();

        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(r#"kubemoe_operator_reconciles_total{result="ok"} 1"#), "{text}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.api_reachable.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
