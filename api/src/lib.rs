//! The contracts shared across kubemoe processes: the `ModelDeployment` custom resource, the
//! protobuf services (compiled from `proto/` into `OUT_DIR`) and the static expert placement.
//! Nothing here does I/O except [`incoming`], the servers' listener setup.

pub mod deployment;
pub mod placement;
pub mod planner;

pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};

/// What went wrong with a placement or a placement problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A placement or planning problem that cannot be used as given; the message says what to change.
    #[error("invalid placement: {0}")]
    InvalidPlacement(String),
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

/// An error and its sources, `: `-separated: the one line a `tonic::Status` or a condition
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

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kubemoe_descriptor.bin"));

/// A server's accepted connections, with Nagle's algorithm off so that replies leave as soon
/// as they are written.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The largest HTTP/2 frame (2^24 - 1, the protocol's limit).
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// A lazily connecting channel to a kubemoe server (worker or router) that reconnects after
/// the server restarts. `url` is
/// `http://host:port` or plain `host:port`.
pub fn channel(url: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    Ok(tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Large frames: a dispatch is megabytes, and 16 KiB frames cost a syscall each.
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .connect_lazy())
}

/// `grpc.health.v1` statuses every kubemoe server keeps: `liveness` (what pods' liveness probes
/// ask) SERVING while the process runs; `""` (readiness probes) and the server's own service
/// SERVING while it takes requests.
pub mod health {
    use tonic_health::server::HealthReporter;
    use tonic_health::ServingStatus;

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
}
