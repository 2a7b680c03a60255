//! The contracts shared across kubemoe processes: the `ModelDeployment` custom resource, the
//! protobuf services (compiled from `proto/` into `OUT_DIR`) and the static expert placement.
//! Nothing here does I/O except [`incoming`], the servers' listener setup.

pub mod deployment;
pub mod placement;

pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};

/// `kubemoe.inference.v1`: the public API of a router.
pub mod inference {
    tonic::include_proto!("kubemoe.inference.v1");
}

/// `kubemoe.expert.v1`: what a worker offers its routers.
pub mod expert {
    tonic::include_proto!("kubemoe.expert.v1");
}

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kubemoe_descriptor.bin"));

/// A server's accepted connections, with Nagle's algorithm off so that replies leave as soon
/// as they are written.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
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
