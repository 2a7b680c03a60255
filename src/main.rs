//! `kubemoe`: one binary for every role. Each subcommand parses its flags and calls into the
//! crates, where the work lives.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kubemoe_model::checkpoint::{OwnedTensor, TensorMap};
use kubemoe_model::generate::{generate, Request};
use kubemoe_model::synth::{self, StorageDtype};
use kubemoe_model::{source, Experts, SamplingParams};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod local;
mod plan;

#[derive(Parser)]
#[command(name = "kubemoe", version, about = "Serve DeepSeek-family MoE models with expert parallelism")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random model in the Hugging Face layout (config.json, sharded safetensors, tokenizer.json).
    GenModel {
        /// One of: tiny, small, v2-lite-shape, v3-shape.
        #[arg(long)]
        preset: String,
        /// Storage dtype: f32, bf16 or fp8 (e4m3 with 128×128 weight_scale_inv blocks).
        #[arg(long, default_value = "f32")]
        dtype: StorageDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Target shard size in MiB.
        #[arg(long, default_value_t = 64)]
        shard_mib: usize,
        /// Make the gates favour low-numbered experts (0: no skew; 3: strongly), to produce
        /// skewed expert load on purpose. Needs a noaux_tc preset (tiny, small, v3-shape).
        #[arg(long, default_value_t = 0.0)]
        skew: f32,
    },
    /// Generate with the single-process engine; prints {"output_ids":[...]}.
    Run {
        /// A model directory, or builtin:<preset>.
        #[arg(long)]
        model: String,
        /// Comma-separated prompt token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        input_ids: Vec<u32>,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// 0 means greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// 0 means no top-k filter.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write the input's full-sequence logits (f32 tensor `logits` [T, vocab]; with an MTP
        /// module also `mtp_logits` [T-1, vocab]) to this safetensors file.
        #[arg(long)]
        logits_out: Option<PathBuf>,
    },
    /// Host a shard of the routed experts (rank `rank` of `world-size` workers).
    Worker {
        /// A model directory, or builtin:<preset>.
        #[arg(long, env = "KUBEMOE_MODEL")]
        model: String,
        #[arg(long, env = "KUBEMOE_RANK")]
        rank: usize,
        #[arg(long, env = "KUBEMOE_WORLD_SIZE")]
        world_size: usize,
        /// The placement to start from (the placement ConfigMap's placement.json); default:
        /// experts in order, spare slots holding replicas.
        #[arg(long, env = "KUBEMOE_PLACEMENT")]
        placement: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// gRPC port; 0 picks a free one (printed on the first line).
        #[arg(long, default_value_t = 50061)]
        port: u16,
    },
    /// Serve the inference API, dispatching routed experts to the workers.
    Router {
        #[arg(long, env = "KUBEMOE_MODEL")]
        model: String,
        /// Worker gRPC URLs in rank order, comma-separated.
        #[arg(long, env = "KUBEMOE_WORKERS", value_delimiter = ',', required = true)]
        workers: Vec<String>,
        /// The placement to start from, as for `kubemoe worker`.
        #[arg(long, env = "KUBEMOE_PLACEMENT")]
        placement: Option<PathBuf>,
        /// Sliding window of the expert load counts the rebalancer reads (30s, 5m, …).
        #[arg(long, default_value = "5m")]
        load_window: String,
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// Port of /metrics (Prometheus); 0 picks a free one; none without the flag.
        #[arg(long)]
        http_port: Option<u16>,
        #[command(flatten)]
        limits: RouterLimits,
    },
    /// Local mode: a router and N workers as child processes on loopback, until Ctrl-C.
    Up {
        /// A ModelDeployment manifest: its model, worker count, router port and limits
        /// (default: examples/tiny.yaml, built in).
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// Overrides the manifest's model (a directory or builtin:<preset>).
        #[arg(long)]
        model: Option<String>,
        /// Overrides the manifest's workers.replicas.
        #[arg(long)]
        workers: Option<usize>,
        /// Overrides the manifest's router.grpcPort.
        #[arg(long)]
        grpc_port: Option<u16>,
        /// Overrides the manifest's router.httpPort (/metrics); 0 picks a free one.
        #[arg(long)]
        http_port: Option<u16>,
        #[command(flatten)]
        limits: RouterLimits,
    },
    /// Call a router: streams the completion to the terminal.
    Generate {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        endpoint: String,
        /// Text prompt (needs the model's tokenizer).
        #[arg(long, conflicts_with_all = ["input_ids", "chat"])]
        prompt: Option<String>,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        input_ids: Option<Vec<u32>>,
        /// One user chat message, through the model's chat template.
        #[arg(long)]
        chat: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 0)]
        top_k: u32,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Measure distributed serving: bytes moved, transport against raw TCP, decode against one process.
    BenchServing {
        #[arg(long, default_value = "builtin:small")]
        model: String,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        steps: usize,
    },
    /// Measure the engine's hot paths against the GEMM rate of this machine.
    Bench {
        #[arg(long, default_value = "builtin:small")]
        model: String,
        #[arg(long, default_value_t = 1024)]
        gemm_size: usize,
        #[arg(long, default_value_t = 32)]
        tokens_per_expert: usize,
        #[arg(long, default_value_t = 64)]
        prompt_len: usize,
        #[arg(long, default_value_t = 16)]
        decode_steps: usize,
    },
    /// Run the Kubernetes operator (the default), or render the objects it would apply.
    Operator(OperatorArgs),
    /// Print the CustomResourceDefinitions (ModelDeployment) as YAML.
    Crd,
    /// Plan an expert placement from measured loads; prints
    /// {"phy_to_log": [...], "balance": {"before": x, "after": y}, "moved": n}.
    Plan(plan::PlanArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct OperatorArgs {
    #[command(subcommand)]
    command: Option<OperatorCommand>,
    #[command(flatten)]
    run: OperatorRunArgs,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Run the controller (what `kubemoe operator` alone does).
    Run(OperatorRunArgs),
    /// Print the objects the operator would apply for a manifest, as a multi-document YAML stream.
    Render {
        /// A manifest with one or more ModelDeployments (and ConfigMaps holding config.json).
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// The model's config.json, for pvc:// and hostPath:// models.
        #[arg(long)]
        model_config: Option<PathBuf>,
        /// Image of router and worker pods when the spec names none.
        #[arg(long, default_value = kubemoe_operator::DEFAULT_IMAGE)]
        image: String,
    },
}

#[derive(clap::Args)]
struct OperatorRunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBEMOE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Image of router and worker pods when the spec names none.
    #[arg(long, env = "KUBEMOE_IMAGE", default_value = kubemoe_operator::DEFAULT_IMAGE)]
    image: String,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "kubemoe-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// The router's capacity settings.
#[derive(clap::Args, Clone)]
struct RouterLimits {
    /// Requests in progress at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    max_concurrent: usize,
    /// Sequences in one step.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// New tokens in one step (prompt tokens of joining sequences plus one per decoding one).
    #[arg(long, default_value_t = 4096)]
    max_batch_tokens: usize,
    /// KV cache budget in MiB; a request reserves its prompt plus max_tokens.
    #[arg(long, default_value_t = 1024)]
    kv_budget_mib: usize,
    /// Prompt plus new tokens per request (capped by the model's max_position_embeddings).
    #[arg(long, default_value_t = 8192)]
    max_context: usize,
    /// Deadline of every call to a worker, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    worker_deadline_ms: u64,
}

impl RouterLimits {
    fn args(&self) -> Vec<String> {
        [
            ("--max-concurrent", self.max_concurrent as u64),
            ("--max-running", self.max_running as u64),
            ("--max-batch-tokens", self.max_batch_tokens as u64),
            ("--kv-budget-mib", self.kv_budget_mib as u64),
            ("--max-context", self.max_context as u64),
            ("--worker-deadline-ms", self.worker_deadline_ms),
        ]
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect()
    }

    fn options(&self, model: String, workers: Vec<String>) -> Result<kubemoe_router::Options> {
        let (config, _) = source::open_tensors(&model, &|_| false)?;
        // Cache bytes per token: every layer's c_kv and k_pe in f32.
        let per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4;
        Ok(kubemoe_router::Options {
            model,
            workers,
            limits: kubemoe_router::scheduler::Limits {
                max_batch_tokens: self.max_batch_tokens,
                max_running: self.max_running,
                kv_budget_tokens: (self.kv_budget_mib << 20) / per_token.max(1),
            },
            max_concurrent: self.max_concurrent,
            max_context: self.max_context,
            worker_deadline: Duration::from_millis(self.worker_deadline_ms),
            startup_timeout: Duration::from_secs(120),
            placement: None,
            load_window: Duration::from_secs(300),
        })
    }
}

/// A token cancelled on Ctrl-C or SIGTERM: the one shutdown signal of a server process.
fn shutdown_on_signal() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    Ok(token)
}

async fn bind(host: &str, port: u16, role: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
    // The first stdout line tells a parent (kubemoe up, tests) where to connect.
    println!("kubemoe {role} listening on {}", listener.local_addr()?);
    Ok(listener)
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::GenModel { preset, dtype, seed, out, shard_mib, skew } => {
            synth::write_model_dir(&out, &preset, dtype, seed, skew, shard_mib << 20)
                .with_context(|| format!("generating preset {preset} into {}", out.display()))?;
            println!("{}", out.display());
        }
        Command::Run { model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, logits_out } => {
            let m = source::open(&model, Experts::All).with_context(|| format!("loading model {model}"))?;
            if let Some(path) = logits_out {
                write_logits(&m, &input_ids, &path)?;
            }
            let sampling = SamplingParams { temperature, top_k, top_p, seed };
            let request = Request { prompt: input_ids, max_new_tokens, sampling };
            let output = generate(&m, &[request])?.remove(0);
            println!("{}", serde_json::json!({ "output_ids": output }));
        }
        Command::Worker { model, rank, world_size, placement, host, port } => {
            let plan = placement.as_deref().map(plan::read_placement).transpose()?;
            runtime()?.block_on(async {
                let listener = bind(&host, port, "worker").await?;
                kubemoe_worker::run(model, rank, world_size, plan, listener, shutdown_on_signal()?).await?;
                Ok::<_, anyhow::Error>(())
            })?
        }
        Command::Router { model, workers, placement, load_window, host, port, http_port, limits } => {
            let mut options = limits.options(model, workers)?;
            options.placement = placement.as_deref().map(plan::read_placement).transpose()?;
            options.load_window = kubemoe_api::deployment::parse_duration("--load-window", &load_window)?;
            runtime()?.block_on(async {
                let listener = bind(&host, port, "router").await?;
                let http = match http_port {
                    Some(p) => Some(bind(&host, p, "router metrics").await?),
                    None => None,
                };
                kubemoe_router::run(options, listener, http, shutdown_on_signal()?).await?;
                Ok::<_, anyhow::Error>(())
            })?
        }
        Command::Up { file, model, workers, grpc_port, http_port, mut limits } => {
            let mut md = local::deployment(file.as_deref())?;
            if let Some(w) = workers {
                md.spec.workers.replicas = w as i32;
            }
            let spec = &md.spec;
            let model = model.map_or_else(|| local::model_path(&spec.model.source), Ok)?;
            limits.max_concurrent = spec.router.max_concurrent_requests.max(1) as usize;
            limits.max_batch_tokens = spec.router.max_batch_tokens.max(1) as usize;
            if let Some(max) = spec.model.max_context_length {
                limits.max_context = max.max(1) as usize;
            }
            let origin = file.map_or("examples/tiny.yaml (built in)".into(), |f| f.display().to_string());
            let (layout, groups) = local::layout(&md, &model, &origin)?;
            let ports = (
                grpc_port.unwrap_or(spec.router.grpc_port as u16),
                http_port.unwrap_or(spec.router.http_port as u16),
            );
            up(&md, &layout, groups, &model, ports, &limits)?
        }
        Command::Generate {
            endpoint,
            prompt,
            input_ids,
            chat,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
        } => {
            use kubemoe_api::inference::{generate_request::Input, ChatMessage, ChatMessages, TokenIds};
            let input = match (prompt, input_ids, chat) {
                (Some(p), _, _) => Input::Prompt(p),
                (_, Some(ids), _) => Input::InputIds(TokenIds { ids }),
                (_, _, Some(c)) => Input::Messages(ChatMessages {
                    messages: vec![ChatMessage { role: "user".into(), content: c }],
                }),
                _ => anyhow::bail!("give one of --prompt, --input-ids, --chat"),
            };
            let request = kubemoe_api::inference::GenerateRequest {
                input: Some(input),
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
            };
            runtime()?.block_on(client_generate(endpoint, request))?
        }
        Command::BenchServing { model, workers, batch, steps } => {
            let (_children, urls) = start_workers(&model, workers, &[])?;
            let report = kubemoe_router::bench::run(&model, &urls, batch, steps)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench { model, gemm_size, tokens_per_expert, prompt_len, decode_steps } => {
            let m = source::open(&model, Experts::All).with_context(|| format!("loading model {model}"))?;
            let report =
                kubemoe_model::bench::run(&m, gemm_size, tokens_per_expert, prompt_len, decode_steps)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Operator(OperatorArgs {
            command: Some(OperatorCommand::Render { file, model_config, image }),
            ..
        }) => {
            let manifest =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let config = model_config
                .map(|path| {
                    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
                })
                .transpose()?;
            let origin = file.display().to_string();
            print!("{}", kubemoe_operator::render::render(&manifest, &origin, config.as_deref(), &image)?);
        }
        Command::Operator(OperatorArgs { command: Some(OperatorCommand::Run(args)), .. })
        | Command::Operator(OperatorArgs { command: None, run: args }) => run_operator(args)?,
        Command::Crd => print!("{}", kubemoe_operator::crd_yaml()?),
        Command::Plan(args) => println!("{}", plan::run(&args)?),
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Starts `workers` worker processes on loopback (each given `extra` flags); returns them and
/// their URLs in rank order.
fn start_workers(
    model: &str,
    workers: usize,
    extra: &[String],
) -> Result<(Vec<local::Managed>, Vec<String>)> {
    anyhow::ensure!(workers > 0, "--workers must be at least 1");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for rank in 0..workers {
        let args: Vec<String> = ["worker", "--model", model, "--host", "127.0.0.1", "--port", "0"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--rank".into(), rank.to_string(), "--world-size".into(), workers.to_string()])
            .chain(extra.iter().cloned())
            .collect();
        let (child, addr) = local::start(&format!("worker {rank}"), &args, (cores / workers).max(1))?;
        children.push(child);
        urls.push(format!("http://{addr}"));
    }
    Ok((children, urls))
}

/// `kubemoe up`: the workers, then the router, as child processes, both starting from the
/// layout's initial placement, and the rebalancer when `balancing.enabled`; serves until
/// interrupted.
fn up(
    md: &kubemoe_api::ModelDeployment,
    layout: &kubemoe_operator::layout::Layout,
    groups: u32,
    model: &str,
    (grpc_port, http_port): (u16, u16),
    limits: &RouterLimits,
) -> Result<()> {
    let plan = kubemoe_api::placement::PlacementPlan::initial(
        layout.workers,
        layout.slots_per_worker,
        layout.logical,
        &layout.moe_layers,
    );
    let dir = tempfile_dir()?;
    let placement = dir.join(kubemoe_api::placement::KEY);
    std::fs::write(&placement, serde_json::to_string(&plan)?)
        .with_context(|| format!("writing {}", placement.display()))?;
    let placement_args = ["--placement".to_string(), placement.display().to_string()];
    let workers = layout.workers as usize;
    let (mut children, urls) = start_workers(model, workers, &placement_args)?;
    let mut args: Vec<String> =
        ["router", "--model", model, "--host", "127.0.0.1"].iter().map(|s| s.to_string()).collect();
    args.extend(["--port".into(), grpc_port.to_string(), "--workers".into(), urls.join(",")]);
    args.extend(["--http-port".into(), http_port.to_string()]);
    args.extend(placement_args);
    args.extend(["--load-window".into(), md.spec.balancing.window.clone()]);
    args.extend(limits.args());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (router, addr) = local::start("router", &args, cores)?;
    children.push(router);
    println!("kubemoe up: workers at {} ({} expert slots each)", urls.join(","), layout.slots_per_worker);
    println!(
        "kubemoe up: {model} on {workers} workers; gRPC at {addr} (health, reflection, kubemoe.inference.v1, kubemoe.expert.v1.Balancer)"
    );
    println!("try: kubemoe generate --endpoint http://{addr} --prompt 'Hello'    (Ctrl-C stops everything)");
    runtime()?.block_on(async {
        let stop = shutdown_on_signal()?;
        if md.spec.balancing.enabled {
            let policy = kubemoe_operator::rebalance::Policy::new(&md.spec.balancing, groups as usize, 1)?;
            let cluster = kubemoe_operator::rebalance::Cluster::new(&urls, &[format!("http://{addr}")])?;
            tokio::spawn(local::rebalance(cluster, policy, stop.clone()));
        }
        stop.cancelled().await;
        Ok::<_, anyhow::Error>(())
    })?;
    eprintln!("kubemoe up: stopping");
    drop(children);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// A fresh directory for this process's files.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kubemoe-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Streams one completion from a router to stdout.
async fn client_generate(endpoint: String, request: kubemoe_api::inference::GenerateRequest) -> Result<()> {
    use kubemoe_api::inference::inference_client::InferenceClient;
    use std::io::Write;
    let mut client = InferenceClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut stdout = std::io::stdout();
    let mut ids: Vec<u32> = Vec::new();
    while let Some(m) =
        stream.message().await.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
    {
        ids.extend(&m.token_ids);
        write!(stdout, "{}", m.text)?;
        stdout.flush()?;
        if let Some(u) = m.usage {
            let reason = kubemoe_api::inference::FinishReason::try_from(m.finish_reason)
                .map(|r| r.as_str_name())
                .unwrap_or("?");
            writeln!(stdout)?;
            eprintln!(
                "[{reason}; {} prompt + {} completion tokens; ids {ids:?}]",
                u.prompt_tokens, u.completion_tokens
            );
        }
    }
    Ok(())
}

fn run_operator(args: OperatorRunArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("kubemoe-operator-{}", std::process::id()));
    let lease = kubemoe_operator::leader::LeaseConfig {
        name: args.lease_name,
        namespace: args.lease_namespace,
        identity,
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    let options = kubemoe_operator::RunOptions { http_addr: args.http_addr, image: args.image, lease };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(runtime.block_on(kubemoe_operator::run(options))?)
}

/// Writes `logits` (and `mtp_logits` when the model has an MTP module) for `ids`.
fn write_logits(m: &kubemoe_model::Model, ids: &[u32], path: &std::path::Path) -> Result<()> {
    let hidden = m.hidden_full(ids, None)?;
    let logits = m.lm_head.forward(&m.norm.forward(&hidden)?)?;
    let vocab = m.config.vocab_size;
    let tensor = |values: Vec<f32>| OwnedTensor {
        dtype: safetensors::Dtype::F32,
        shape: vec![values.len() / vocab, vocab],
        data: kubemoe_kernels::dtype::f32_to_le(&values),
    };
    let mut map = TensorMap { label: path.display().to_string(), ..Default::default() };
    map.tensors.insert("logits".into(), tensor(logits));
    if let Some(mtp) = m.mtp_logits(ids, &hidden)? {
        map.tensors.insert("mtp_logits".into(), tensor(mtp));
    }
    map.save(path).with_context(|| format!("writing logits to {}", path.display()))
}
