//! The contracts shared across kubemoe processes: the protobuf services (compiled from
//! `proto/` into `OUT_DIR`) and the static expert placement.

pub mod placement;

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
