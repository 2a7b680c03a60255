//! The expert worker (DESIGN §1): hosts routed experts of every MoE layer, runs grouped
//! SwiGLU FFNs on the tokens routers dispatch to it, and returns one weighted partial sum
//! per token. It keeps no per-request state, so it can fail or restart without losing one.

pub mod service;
pub mod store;

pub use store::ExpertStore;

/// What went wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading experts")]
    Model(#[from] kubemoe_model::Error),
    /// A dispatch that does not describe a valid computation.
    #[error("invalid dispatch: {0}")]
    Invalid(String),
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
        match e {
            Error::Invalid(_) | Error::Model(kubemoe_model::Error::ExpertNotLoaded { .. }) => {
                tonic::Status::invalid_argument(message)
            }
            _ => tonic::Status::internal(message),
        }
    }
}

/// Loads rank `rank`'s experts of `model` and serves them on `listener` until `shutdown`.
pub async fn run(
    model: String,
    rank: usize,
    world_size: usize,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let store = tokio::task::spawn_blocking(move || ExpertStore::load(&model, rank, world_size))
        .await
        .map_err(|e| Error::Invalid(format!("expert loading task: {e}")))??;
    service::serve(std::sync::Arc::new(store), listener, shutdown).await
}
