//! The router: the inference API and the dense half of the model. It tokenizes, validates,
//! schedules requests into a continuously batched step loop, runs attention (with the MLA
//! latent cache), dense MLPs, shared experts and the gate itself, and dispatches each MoE
//! layer's routed experts to the workers that hold them.
//!
//! Logs: a span per request (`request{id, model}`, the id from the client's `x-request-id` or
//! made here), per step (`step{requests, tokens}`) and per MoE layer's dispatch (the worker
//! ranks it went to); each dispatch names its requests in its metadata
//! (`kubemoe_api::trace`), so a worker's logs carry them too.

pub mod bench;
pub mod bench_api;
pub mod bench_prefill;
pub mod bench_spec;
pub mod client;
pub mod delay;
pub mod dispatch;
pub mod drafting;
pub mod engine;
pub mod load;
pub mod metrics;
pub mod openai;
pub mod prefix;
pub mod reasoning;
pub mod remote;
pub mod scheduler;
pub mod service;
pub mod stats;
pub mod text;

/// What went wrong in the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the model")]
    Model(#[from] kubemoe_model::Error),
    #[error("tokenizer: {0}")]
    Text(String),
    #[error("workers: {0}")]
    Workers(String),
    /// Worker URLs a commit brought that do not fit its plan.
    #[error("worker URLs: {0}")]
    WorkerUrls(String),
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("starting the batch loop")]
    Thread(#[from] std::io::Error),
    #[error("connecting to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Credential(#[from] kubemoe_api::Error),
    #[error("the router answered {}: {}", .0.code(), .0.message())]
    Call(tonic::Status),
    #[error("writing the output")]
    Output(#[source] std::io::Error),
    /// A plan inconsistent with the model or the workers.
    #[error("placement")]
    Placement(#[from] kubemoe_placement::Error),
    /// A placement switch out of order.
    #[error("migration out of order: {0}")]
    Epoch(String),
    /// Settings that cannot work together; the message says what to change.
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = kubemoe_placement::error_chain(&e);
        match e {
            Error::Placement(_) | Error::WorkerUrls(_) => tonic::Status::invalid_argument(message),
            Error::Epoch(_) => tonic::Status::failed_precondition(message),
            Error::Workers(_) => tonic::Status::unavailable(message),
            _ => tonic::Status::internal(message),
        }
    }
}

/// How a router runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// A model directory or `builtin:<preset>`.
    pub model: String,
    /// What the dense half's matrices are held in (`--dtype`).
    pub precision: kubemoe_model::Precision,
    /// The model name of the OpenAI API (default: `model`).
    pub served_model_name: Option<String>,
    /// Worker gRPC URLs in rank order, or one with `{rank}` in it ([`remote::Members`]).
    pub workers: Vec<String>,
    /// New tokens in one step.
    pub max_batch_tokens: usize,
    /// Sequences in one step.
    pub max_running: usize,
    /// KV cache memory the running sequences may reserve; at least one request of
    /// `max_context`.
    pub kv_budget_bytes: usize,
    /// Memory of the prefix cache ([`prefix`]; 0: none).
    pub prefix_cache_bytes: usize,
    /// Micro-batches per step (1 or 2: [`engine::forward`]).
    pub micro_batches: usize,
    /// Draft tokens per decode step from DeepSeek-V3's MTP module (`--speculative mtp:K`,
    /// [`engine`]; 0: no speculation, at most [`kubemoe_api::speculative::MAX_DRAFT_TOKENS`]).
    pub speculative_tokens: usize,
    pub max_concurrent: usize,
    /// Prompt plus new tokens per request; at most the model's `max_position_embeddings`.
    pub max_context: usize,
    /// Deadline of every worker call.
    pub worker_deadline: std::time::Duration,
    /// The placement to start from (default: the minimal initial placement).
    pub placement: Option<kubemoe_placement::PlacementPlan>,
    /// Sliding window of the expert load counts.
    pub load_window: std::time::Duration,
    /// API keys the public API requires ([`kubemoe_api::auth`]); none: open.
    pub api_keys_file: Option<std::path::PathBuf>,
    /// The deployment's internal token: what this router presents to its workers and requires
    /// of `Balancer` callers. None: sent nowhere, required of nobody.
    pub internal_token_file: Option<std::path::PathBuf>,
    /// How long an HTTP connection may take to send a request head, idle ones included
    /// ([`kubemoe_api::http`]), and a request its body.
    pub http_header_timeout: std::time::Duration,
    /// Serve over TLS with the certificate of this directory, and call the workers over TLS
    /// checking theirs against its `ca.crt` ([`kubemoe_api::tls`]).
    pub tls_dir: Option<std::path::PathBuf>,
    /// The name the workers' certificate must hold (default: the host of each worker URL).
    pub tls_server_name: Option<String>,
    /// How old a public gRPC connection may grow before it is asked to go (GOAWAY), idle or
    /// not.
    pub grpc_max_connection_age: std::time::Duration,
}

/// Where a router serves.
pub struct Listeners {
    /// The public gRPC API (`kubemoe.inference.v1.Inference`).
    pub grpc: tokio::net::TcpListener,
    /// The OpenAI API, `/health` and `/metrics`.
    pub http: Option<tokio::net::TcpListener>,
    /// `kubemoe.expert.v1.Balancer`, for the rebalance loop.
    pub internal: Option<tokio::net::TcpListener>,
    /// `grpc.health.v1` alone, in plaintext, for kubelet's probes.
    pub health: Option<tokio::net::TcpListener>,
}

/// Loads the dense half of the model, connects the workers, and serves until `shutdown` fires.
/// With `tls_dir` every listener but `health` speaks TLS.
pub async fn run(
    opts: Options,
    listeners: Listeners,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    use kubemoe_api::auth::{Bearer, Guard, Keys};
    use kubemoe_model::{source, Experts};
    // Bad keys files fail the start before minutes of loading.
    let load = |path: &Option<std::path::PathBuf>, flag| {
        path.as_deref().map(|p| Keys::load(p, flag).map(std::sync::Arc::new)).transpose()
    };
    let keys = load(&opts.api_keys_file, "--api-keys-file")?;
    let token = load(&opts.internal_token_file, "--internal-token-file")?;
    let tls = opts.tls_dir.as_deref().map(kubemoe_api::tls::Tls::load).transpose()?;
    let server_tls = |alpn| tls.as_ref().map(|t| t.server(alpn)).transpose();
    let client_tls = tls.as_ref().map(|t| t.client(opts.tls_server_name.as_deref())).transpose()?;
    // Every port answers while the model loads: health (alive, not ready), and how far loading
    // got. `stop` ends them early if loading fails.
    let stop = shutdown.child_token();
    let progress = kubemoe_model::progress::loaded;
    let http_app = kubemoe_api::loading::Pending::new(openai::loading(progress, keys.clone()));
    if let Some(http) = listeners.http {
        let (app, timeout) = (http_app.router(), opts.http_header_timeout);
        let tls = server_tls(kubemoe_api::tls::ALPN_HTTP)?;
        tokio::spawn(kubemoe_api::http::serve(http, tls, app, timeout, stop.clone()));
    }
    let balancer = kubemoe_api::loading::grpc(progress);
    if let Some(internal) = listeners.internal {
        if token.is_none() {
            tracing::warn!("no --internal-token-file: anyone who reaches the internal port can read the load and commit placements");
        }
        let (balancer, guard, stop) = (balancer.clone(), Guard(token.clone()), stop.clone());
        let tls = server_tls(kubemoe_api::tls::ALPN_GRPC)?;
        tokio::spawn(async move {
            let served = service::serve_internal(balancer, guard, tls, internal, stop).await;
            if let Err(e) = served {
                tracing::error!(error = %kubemoe_placement::error_chain(&e), "the internal gRPC server stopped");
            }
        });
    }
    let inference = kubemoe_api::loading::grpc(progress);
    // What readiness waits for (`None`: serving): the weights (a placeholder: the services are
    // not set until they load), then every worker.
    let (ready, waiting) = tokio::sync::watch::channel(Some("the model's weights to load".to_string()));
    let public = service::Public {
        guard: Guard(keys.clone()),
        max_connection_age: opts.grpc_max_connection_age,
        tls: server_tls(kubemoe_api::tls::ALPN_GRPC)?,
        listener: listeners.grpc,
        health: listeners.health,
    };
    let mut server = tokio::spawn(service::serve(inference.clone(), waiting.clone(), public, stop.clone()));
    // Every return from here stops the servers: a failed load, a failed start.
    let _stop = stop.clone().drop_guard();

    // Loading and what can fail after it.
    let starting = async {
        let model_spec = opts.model.clone();
        let (precision, speculative) = (opts.precision, opts.speculative_tokens);
        let load = move || {
            if speculative == 0 {
                return source::open_as(&model_spec, Experts::None, precision);
            }
            // Speculation runs the MTP module here, its routed experts too (they are in no
            // worker's placement): the layers from `num_hidden_layers` on.
            let first_mtp = source::open_tensors(&model_spec, &|_| false)?.0.num_hidden_layers;
            source::open_as(&model_spec, Experts::Only(&|layer, _| layer >= first_mtp), precision)
        };
        let model = tokio::task::spawn_blocking(move || kubemoe_model::progress::reported("router", load))
            .await
            .map_err(|e| Error::Workers(format!("model loading task: {e}")))??;
        if opts.speculative_tokens > 0 && model.mtp.is_empty() {
            return Err(Error::Config(format!(
                "--speculative mtp:{}: {} has no MTP module (its config's num_nextn_predict_layers is 0 \
                 or the checkpoint lacks the module's weights): serve it without --speculative",
                opts.speculative_tokens, opts.model
            )));
        }
        let held = kubemoe_model::memory::Held::of(model.matrices());
        kubemoe_model::memory::log_loaded("router", &held, kubemoe_kernels::device::DeviceSpec::Cpu);
        let config = model.config.clone();
        let max_context = opts.max_context.min(config.max_position_embeddings);
        let limits = scheduler::Limits {
            max_batch_tokens: opts.max_batch_tokens,
            max_running: opts.max_running,
            kv_budget_tokens: opts.kv_budget_bytes / config.kv_bytes_per_token().max(1),
            micro_batches: opts.micro_batches,
            speculative_tokens: opts.speculative_tokens,
        };
        // One request of the whole context must fit an empty cache: admission then never waits
        // for room that cannot come, and the context check refuses every request that would.
        let largest = limits.reservation(max_context, config.num_hidden_layers);
        if limits.kv_budget_tokens < largest {
            let need = (largest * config.kv_bytes_per_token()).div_ceil(1 << 20);
            return Err(Error::Config(format!(
                "--kv-budget-mib {} holds {} tokens of this model's KV cache ({} bytes each), fewer \
                 than the {largest} one request of --max-context {max_context} reserves (with its \
                 drafts and MTP cache when speculating): raise --kv-budget-mib to at least \
                 {need} or lower --max-context",
                opts.kv_budget_bytes >> 20,
                limits.kv_budget_tokens,
                config.kv_bytes_per_token()
            )));
        }
        let experts = std::sync::Arc::new(remote::RemoteExperts::new(
            &config,
            &opts.workers,
            client_tls,
            Bearer(token.clone()),
            opts.placement,
            opts.worker_deadline,
            opts.load_window,
            tokio::runtime::Handle::current(),
        )?);
        let text = text::TextCodec::load(&opts.model, config.vocab_size)?.map(std::sync::Arc::new);
        let stats = std::sync::Arc::new(stats::Stats::default());
        let (engine, thread) = engine::spawn(
            std::sync::Arc::new(model),
            experts.clone(),
            limits,
            opts.prefix_cache_bytes,
            opts.max_concurrent,
            stats.clone(),
            stop.clone(),
        )?;
        let served_name = opts.served_model_name.unwrap_or_else(|| opts.model.clone());
        let admission = service::Admission {
            model_name: opts.model.clone(),
            vocab_size: config.vocab_size,
            text,
            max_context,
        };
        let service = std::sync::Arc::new(service::InferenceService {
            admission,
            config,
            engine,
            experts: experts.clone(),
            max_concurrent: opts.max_concurrent,
            active: Default::default(),
            received: Default::default(),
            stats: stats.clone(),
            waiting: waiting.clone(),
        });
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let metrics =
            metrics::Sources { experts: experts.clone(), stats, model_name: served_name.clone(), held };
        let api = openai::Api {
            service: service.clone(),
            served_name,
            shutdown: stop.clone(),
            started,
            keys,
            body_timeout: opts.http_header_timeout,
        };
        // What is awaited is known before the services are set (a request never sees the
        // placeholder below), and readiness follows them (a probe never sees SERVING before).
        let checked = experts.check_workers(&opts.model).await;
        if let Err(why) = &checked {
            tracing::warn!(waiting_for = why.as_str(), "not serving until every worker answers as it should");
            ready.send_replace(Some(why.clone()));
        }
        http_app.set(metrics::routes(metrics).merge(openai::routes(std::sync::Arc::new(api))));
        balancer.set(kubemoe_api::expert::balancer_server::BalancerServer::new(service::BalancerService {
            experts: experts.clone(),
        }));
        inference.set(kubemoe_api::inference::inference_server::InferenceServer::from_arc(service));
        if checked.is_ok() {
            ready.send_replace(None);
        }
        Ok((experts, thread))
    };
    let (experts, thread) = tokio::select! {
        started = starting => started?,
        // Stopped while loading (the server drains and ends) or failed: the load is abandoned.
        served = &mut server => {
            return served.map_err(|e| Error::Workers(format!("public gRPC server task: {e}")))?;
        }
    };
    // Workers that are up already are ready now; otherwise serve, not ready, until they are
    // (clients and probes get an answer meanwhile, saying what is awaited).
    if ready.borrow().is_some() {
        tokio::spawn(await_workers(experts, opts.model, ready, stop.clone()));
    }
    let served = server.await.map_err(|e| Error::Workers(format!("public gRPC server task: {e}")))?;
    stop.cancel();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    served
}

/// Asks the workers every [`remote::PROBE_EVERY`] until each answers as it should (or
/// `shutdown`), publishing what is awaited on `ready` (`None`: serving), and logging each new
/// reason once: a mismatch (a wrong rank, model or placement) shows as soon as it is seen.
async fn await_workers(
    experts: std::sync::Arc<remote::RemoteExperts>,
    model: String,
    ready: tokio::sync::watch::Sender<Option<String>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(remote::PROBE_EVERY) => {}
        }
        let checked = experts.check_workers(&model).await;
        if let Err(why) = &checked {
            // A loading worker's reason changes with every probe (its bytes): logged once.
            let reason = |why: &str| why.split(kubemoe_api::loading::LOADING).next().map(str::to_string);
            if ready.borrow().as_deref().and_then(reason) != reason(why) {
                tracing::warn!(waiting_for = why.as_str(), "not serving yet");
            }
        } else {
            tracing::info!("every worker answers: serving");
        }
        let done = checked.is_ok();
        ready.send_replace(checked.err());
        if done {
            return;
        }
    }
}
