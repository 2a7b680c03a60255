//! The expert worker: hosts routed experts of every MoE layer, runs grouped
//! SwiGLU FFNs on the tokens routers dispatch to it, and returns one weighted partial sum
//! per token. It keeps no per-request state, so it can fail or restart without losing one.
//! Each dispatch is logged in a `dispatch{layer, tokens, requests}` span (debug level), the
//! request ids coming from the router's metadata (`kubemoe_api::trace`).

pub mod metrics;
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
    /// A plan rejected as inconsistent with the model or the workers.
    #[error("placement")]
    Placement(#[from] kubemoe_placement::Error),
    /// A setting this build cannot serve.
    #[error("{0}")]
    Unsupported(String),
    /// A migration step out of order.
    #[error("migration out of order: {0}")]
    Epoch(String),
    /// A task of the worker's panicked or was cancelled.
    #[error("the {0} task failed: {1}")]
    Task(&'static str, String),
    /// A thread panicked while holding the experts.
    #[error("expert state poisoned by a panic")]
    Poisoned,
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Credential(#[from] kubemoe_api::Error),
    /// A listener's address cannot be read.
    #[error("reading a listener's address")]
    Listener(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = kubemoe_placement::error_chain(&e);
        match e {
            Error::Invalid(_)
            | Error::Unsupported(_)
            | Error::Placement(_)
            | Error::Model(kubemoe_model::Error::ExpertNotLoaded { .. }) => {
                tonic::Status::invalid_argument(message)
            }
            Error::Epoch(_) => tonic::Status::failed_precondition(message),
            _ => tonic::Status::internal(message),
        }
    }
}

/// How a worker runs.
pub struct Options {
    /// A model directory or `builtin:<preset>`.
    pub model: String,
    pub rank: usize,
    /// What the experts' matrices are held in (`--dtype`).
    pub precision: kubemoe_model::Precision,
    /// Where the experts live and run (`--device`): host memory, or a GPU (the `cuda` feature).
    pub device: kubemoe_kernels::device::DeviceSpec,
    /// Workers sharing the experts when there is no `plan` (a plan says it itself).
    pub world_size: Option<usize>,
    /// The placement to start from (default: the initial placement).
    pub plan: Option<kubemoe_placement::PlacementPlan>,
    /// The deployment's internal token ([`kubemoe_api::auth`]): every `Expert` call must carry
    /// it. None: open to anyone who reaches the port.
    pub internal_token_file: Option<std::path::PathBuf>,
    /// Serve over TLS with the certificate of this directory ([`kubemoe_api::tls`]).
    pub tls_dir: Option<std::path::PathBuf>,
}

/// Where a worker serves.
pub struct Listeners {
    /// `kubemoe.expert.v1.Expert`, health and reflection (TLS with `--tls-dir`).
    pub grpc: tokio::net::TcpListener,
    /// `/metrics` and `/health` (TLS with `--tls-dir`).
    pub http: Option<tokio::net::TcpListener>,
    /// `grpc.health.v1` alone, in plaintext, for kubelet's probes.
    pub health: Option<tokio::net::TcpListener>,
    /// The data path ([`kubemoe_api::data`], TLS with `--tls-dir`): routers dispatch here.
    pub data: Option<tokio::net::TcpListener>,
}

/// Loads what the plan places on this rank and serves it until `shutdown`.
pub async fn run(
    opts: Options,
    listeners: Listeners,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    // A bad token file fails the start before minutes of loading.
    let internal = match &opts.internal_token_file {
        Some(path) => {
            Some(std::sync::Arc::new(kubemoe_api::auth::Keys::load(path, "--internal-token-file")?))
        }
        None => {
            tracing::warn!("no --internal-token-file: anyone who reaches the gRPC or data port can dispatch to and re-place this worker's experts");
            None
        }
    };
    let tls = opts.tls_dir.as_deref().map(kubemoe_api::tls::Tls::load).transpose()?;
    let Options { model, precision, device, rank, world_size, plan, .. } = opts;
    // Both ports answer while the experts load (liveness, how far loading got).
    let stats = std::sync::Arc::new(metrics::Stats::default());
    let stop = shutdown.child_token();
    let http_app = kubemoe_api::loading::http(kubemoe_model::progress::loaded);
    if let Some(http) = listeners.http {
        let tls = tls.as_ref().map(|t| t.server(kubemoe_api::tls::ALPN_HTTP)).transpose()?;
        let timeout = kubemoe_api::http::HEADER_TIMEOUT;
        tokio::spawn(kubemoe_api::http::serve(http, tls, http_app.router(), timeout, stop.clone()));
    }
    let mut service = service::ExpertService::loading(
        model.clone(),
        rank,
        world_size.or(plan.as_ref().map(|p| p.workers as usize)),
        plan.as_ref().map_or(0, |p| p.epoch),
        stats.clone(),
    );
    if let Some(data) = listeners.data {
        service = service.with_data_port(data.local_addr()?.port());
        let tls = tls.as_ref().map(|t| t.server(kubemoe_api::tls::ALPN_DATA)).transpose()?;
        let handler = std::sync::Arc::new(service.clone());
        tokio::spawn(kubemoe_api::data::serve(data, tls, internal.clone(), handler, stop.clone()));
    }
    let served = service::Served {
        guard: kubemoe_api::auth::Guard(internal),
        tls: tls.as_ref().map(|t| t.server(kubemoe_api::tls::ALPN_GRPC)).transpose()?,
        listener: listeners.grpc,
        health: listeners.health,
    };
    let (loaded, ready) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(service::serve(service.clone(), served, ready, stop.clone()));
    // Every return from here stops the servers: a failed load, a failed start.
    let _stop = stop.clone().drop_guard();
    let load = move || ExpertStore::load_on(device, &model, precision, rank, world_size, plan);
    let loading = tokio::task::spawn_blocking(move || kubemoe_model::progress::reported("worker", load));
    let store = tokio::select! {
        loaded = loading => match loaded {
            Ok(store) => std::sync::Arc::new(store?),
            Err(e) => return Err(Error::Task("expert loading", e.to_string())),
        },
        // Stopped while loading (the server drains and ends) or failed: the load is abandoned.
        served = &mut server => return served.map_err(|e| Error::Task("gRPC server", e.to_string()))?,
    };
    kubemoe_model::memory::log_loaded("worker", &store.held_weights()?, device);
    http_app.set(metrics::routes(store.clone(), stats));
    service.set(store);
    let _ = loaded.send(true);
    server.await.map_err(|e| Error::Task("gRPC server", e.to_string()))?
}
