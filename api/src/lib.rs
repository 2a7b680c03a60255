//! The wire contracts between kubemoe processes: the protobuf services (compiled from `proto/`
//! into `OUT_DIR`), the byte layouts their `bytes` fields carry ([`route`]), the message-size
//! limit, the conversion of placements to and from the wire, the gRPC client the rebalance
//! loop reaches servers with ([`cluster`]), the framed data path of dispatch and combine
//! ([`data`]), and what every server shares: credentials
//! ([`auth`]), TLS ([`tls`]) and accepted connections ([`conn`]), the codec ([`codec`]), the
//! HTTP server ([`http`]), serving while weights load ([`loading`]). No Kubernetes here:
//! routers and workers link this.

pub mod auth;
pub mod cluster;
pub mod codec;
pub mod conn;
pub mod data;
pub mod http;
pub mod loading;
pub mod metrics;
pub mod route;
pub mod speculative;
pub mod tls;
pub mod trace;

pub use kubemoe_placement::error_chain;
use kubemoe_placement::{LayerPlacement, PlacementPlan};

/// What went wrong with a credential.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A keys file (or key) that cannot be used; `reason` says what to change.
    #[error("{flag} {}: {reason}", path.display())]
    Keys { flag: &'static str, path: std::path::PathBuf, reason: String },
    /// TLS files (`--tls-dir`, or a Secret's `ca.crt`) that cannot be used.
    #[error("TLS {}: {reason}", path.display())]
    Tls { path: std::path::PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `kubemoe.inference.v1`: the public API of a router.
pub mod inference {
    tonic::include_proto!("kubemoe.inference.v1");
}

/// `kubemoe.expert.v1`: what a worker offers its routers.
pub mod expert {
    tonic::include_proto!("kubemoe.expert.v1");
}

/// Largest gRPC message any kubemoe server or client takes or sends: a prefill dispatch carries
/// every token's activations (8k tokens × 7168 f32 = 224 MiB on V3), a V3 plan a few hundred KiB.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

impl From<&PlacementPlan> for expert::Plan {
    fn from(p: &PlacementPlan) -> Self {
        expert::Plan {
            epoch: p.epoch,
            workers: p.workers,
            slots_per_worker: p.slots_per_worker,
            logical_experts: p.logical_experts,
            layers: p
                .layers
                .iter()
                .map(|l| expert::LayerSlots { layer: l.layer, slots: l.slots.clone() })
                .collect(),
        }
    }
}

impl TryFrom<expert::Plan> for PlacementPlan {
    type Error = kubemoe_placement::Error;

    /// A plan off the wire, validated: a caller cannot make a server route by a broken one.
    fn try_from(p: expert::Plan) -> Result<Self, Self::Error> {
        let plan = PlacementPlan {
            epoch: p.epoch,
            workers: p.workers,
            slots_per_worker: p.slots_per_worker,
            logical_experts: p.logical_experts,
            layers: p.layers.into_iter().map(|l| LayerPlacement { layer: l.layer, slots: l.slots }).collect(),
        };
        plan.validate()?;
        Ok(plan)
    }
}

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kubemoe_descriptor.bin"));

/// gRPC server reflection of the kubemoe services a server serves (and reflection itself), in
/// both versions clients speak: `v1` (grpcurl, current grpcio) and `v1alpha` (Python's
/// grpcio-reflection client, older grpcurl, Postman). Every server adds both, naming what it
/// serves so that no client is shown a service it cannot call there.
pub mod reflection {
    use tonic_reflection::server::{v1, v1alpha, Builder, Error};

    fn builder(services: &[&str]) -> Builder<'static> {
        let reflection = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
        services.iter().chain(&reflection).fold(
            Builder::configure().register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    }

    pub fn v1(services: &[&str]) -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
        builder(services).build_v1()
    }

    pub fn v1alpha(
        services: &[&str],
    ) -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error> {
        builder(services).build_v1alpha()
    }
}

/// The largest HTTP/2 frame (2^24 - 1, the protocol's limit).
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// A lazily connecting channel to a kubemoe server (worker or router) that reconnects after
/// the server restarts, over TLS when `tls` is given. `url` is `http://host:port` or plain
/// `host:port` (with TLS too: the scheme names no transport here).
pub fn channel(
    url: &str,
    tls: Option<&tls::Client>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Large frames: a dispatch is megabytes, and 16 KiB frames cost a syscall each.
        .max_frame_size(Some(MAX_FRAME_BYTES));
    Ok(match tls {
        Some(client) => endpoint.connect_with_connector_lazy(client.clone()),
        None => endpoint.connect_lazy(),
    })
}

/// `grpc.health.v1` statuses every kubemoe server keeps: `liveness` (what pods' liveness probes
/// ask) SERVING while the process runs; `""` (readiness probes) and the server's own service
/// SERVING while it takes requests.
pub mod health {
    use tonic_health::server::HealthReporter;
    use tonic_health::ServingStatus;

    /// Alive but not taking requests yet (a router waiting for its workers).
    pub async fn starting(reporter: &HealthReporter, service: &str) {
        reporter.set_service_status("liveness", ServingStatus::Serving).await;
        for name in ["", service] {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
    }

    pub async fn serving(reporter: &HealthReporter, service: &str) {
        for name in ["liveness", "", service] {
            reporter.set_service_status(name, ServingStatus::Serving).await;
        }
    }

    /// Shutting down: no longer ready, still alive while draining.
    pub async fn draining(reporter: &HealthReporter, service: &str) {
        for name in ["", service] {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
    }

    /// Returns once the server at `addr` (`host:port` or a URL, in plaintext: a health port or
    /// a server without TLS) is ready, its health `""` SERVING; asks every 50 ms meanwhile
    /// (a server still loading, or not yet listening).
    pub async fn until_serving(addr: &str) -> Result<(), tonic::transport::Error> {
        use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
        let mut health = HealthClient::new(crate::channel(addr, None)?);
        loop {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            if health
                .check(request)
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Serves `health` alone, in plaintext, on `listener` (`--health-port`) until `shutdown`:
    /// kubelet's gRPC probes speak no TLS, and a port that answers only health questions
    /// gives away nothing without it.
    pub async fn serve(
        listener: tokio::net::TcpListener,
        health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(crate::conn::incoming(listener, None), shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the health server stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cross_the_wire_unchanged_and_broken_ones_are_refused() {
        let plan = PlacementPlan::initial(3, 6, 16, &[1, 2]);
        assert_eq!(PlacementPlan::try_from(expert::Plan::from(&plan)).unwrap(), plan);
        let mut broken = expert::Plan::from(&plan);
        broken.layers[0].slots[0] = 99;
        assert!(PlacementPlan::try_from(broken).unwrap_err().to_string().contains("99"));
    }
}
