//! `kubemoe`: one binary for every role. Each subcommand parses its flags and calls into the
//! crates, where the work lives; `local` runs the processes of `up`, `plan` reads the planner's
//! files, `logging` sets up the logs of every process.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kubemoe_kernels::device::DeviceSpec;
use kubemoe_model::generate::{generate_with, Request};
use kubemoe_model::layers::RoutedExperts;
use kubemoe_model::synth::{self, StorageDtype};
use kubemoe_model::{source, Experts, Precision, SamplingParams};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod embedded;
mod local;
mod logging;
mod plan;

#[derive(Parser)]
#[command(name = "kubemoe", version, about = "Serve DeepSeek-family MoE models with expert parallelism")]
struct Cli {
    /// Log lines as text or as one JSON object each (on stderr; the level from RUST_LOG,
    /// default info). `up` passes it to its processes.
    #[arg(long, global = true, env = "KUBEMOE_LOG_FORMAT", default_value = "text")]
    log_format: logging::Format,
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
        /// Replace a key of the preset's config.json (repeatable), e.g. `--set hidden_size=2048`;
        /// the value is JSON (a number, `null`, a string in quotes).
        #[arg(long = "set", value_parser = config_override)]
        set: Vec<(String, serde_json::Value)>,
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
        /// Precision of the weight matrices in memory: auto (the checkpoint's), bf16, fp8
        /// (DeepSeek-V3's layout: `*_proj` weights e4m3 with 128×128 block scales) or f32.
        #[arg(long, env = "KUBEMOE_DTYPE", default_value = "auto")]
        dtype: Precision,
        /// Where the routed experts live and run: cpu, or cuda:N (GPU N, in --dtype's
        /// precision; needs a build with `--features cuda`). The rest of the model runs on the
        /// host, as a router does with GPU workers.
        #[arg(long, env = "KUBEMOE_DEVICE", default_value = "cpu")]
        device: DeviceSpec,
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
    /// Host a shard of the routed experts: those the placement gives rank `rank`.
    Worker {
        /// A model directory, or builtin:<preset>.
        #[arg(long, env = "KUBEMOE_MODEL")]
        model: String,
        /// Precision of the weight matrices in memory: auto (the checkpoint's), bf16, fp8
        /// (DeepSeek-V3's layout: `*_proj` weights e4m3 with 128×128 block scales) or f32.
        #[arg(long, env = "KUBEMOE_DTYPE", default_value = "auto")]
        dtype: Precision,
        /// Where the experts live and run: cpu, or cuda:N (GPU N; needs a build with
        /// `--features cuda`). The weights stay in --dtype's precision on the GPU.
        #[arg(long, env = "KUBEMOE_DEVICE", default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long, env = "KUBEMOE_RANK")]
        rank: usize,
        /// Workers sharing the experts, without --placement (a placement names its workers,
        /// and a live resize changes them; a rank past them holds nothing until an epoch
        /// places experts on it).
        #[arg(long, env = "KUBEMOE_WORLD_SIZE")]
        world_size: Option<usize>,
        /// The placement to start from (the placement ConfigMap's placement.json); default:
        /// experts in order, spare slots holding replicas.
        #[arg(long, env = "KUBEMOE_PLACEMENT")]
        placement: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// gRPC port; 0 picks a free one (printed on the first line).
        #[arg(long, default_value_t = 50061)]
        port: u16,
        /// Port of the HTTP server (Prometheus /metrics, /health); 0 picks a free one (printed
        /// on the second line); none without the flag.
        #[arg(long)]
        http_port: Option<u16>,
        /// Port of the data path: routers send dispatches here in length-prefixed frames over
        /// persistent connections (TLS and the internal token as on the gRPC port), which moves
        /// activations ~1.7× faster than gRPC `Dispatch`; 0 picks a free one (printed after the
        /// others; routers learn it from the worker's Info). Without the flag, routers dispatch
        /// over gRPC.
        #[arg(long)]
        data_port: Option<u16>,
        /// The deployment's internal token (first line; more lines: also accepted, for a
        /// rotation): every kubemoe.expert.v1.Expert call must carry it. Without the flag anyone
        /// who reaches the port can call them.
        #[arg(long, env = "KUBEMOE_INTERNAL_TOKEN_FILE")]
        internal_token_file: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Serve the inference API, dispatching routed experts to the workers.
    Router {
        #[arg(long, env = "KUBEMOE_MODEL")]
        model: String,
        /// Precision of the weight matrices in memory: auto (the checkpoint's), bf16, fp8
        /// (DeepSeek-V3's layout: `*_proj` weights e4m3 with 128×128 block scales) or f32.
        #[arg(long, env = "KUBEMOE_DTYPE", default_value = "auto")]
        dtype: Precision,
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
        /// Port of the HTTP server (OpenAI-compatible API, /health, Prometheus /metrics); 0 picks a
        /// free one; none without the flag.
        #[arg(long)]
        http_port: Option<u16>,
        /// The model name of the OpenAI API (default: --model).
        #[arg(long, env = "KUBEMOE_SERVED_MODEL_NAME")]
        served_model_name: Option<String>,
        /// API keys, one per line: the gRPC inference API and /v1/* then need
        /// `authorization: Bearer <key>` (re-read when the file changes).
        #[arg(long, env = "KUBEMOE_API_KEYS_FILE")]
        api_keys_file: Option<PathBuf>,
        /// Port of kubemoe.expert.v1.Balancer (the rebalancer's Load and Commit), apart from
        /// the public port; 0 picks a free one (printed after the others); none without the flag.
        #[arg(long)]
        internal_port: Option<u16>,
        /// The deployment's internal token: presented to the workers, required of Balancer
        /// callers (as for `kubemoe worker`).
        #[arg(long, env = "KUBEMOE_INTERNAL_TOKEN_FILE")]
        internal_token_file: Option<PathBuf>,
        /// HTTP connections that have not sent a whole request head in this long are closed,
        /// idle keep-alive connections included; a /v1 request's body must then arrive within
        /// the same time (else 408) (30s, 500ms, …).
        #[arg(long, default_value = "30s")]
        http_header_timeout: String,
        /// Public gRPC connections, idle ones included, are asked to go (GOAWAY) at this age;
        /// calls in progress finish, clients reconnect for the next (5m, 1s, …).
        #[arg(long, default_value = "5m")]
        grpc_max_connection_age: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// With --tls-dir: the name the workers' certificate must hold (default: the host of
        /// each worker URL).
        #[arg(long, env = "KUBEMOE_TLS_SERVER_NAME", requires = "tls_dir")]
        tls_server_name: Option<String>,
        #[command(flatten)]
        limits: RouterLimits,
    },
    /// Local mode: a router and N workers as child processes on loopback, until Ctrl-C. Limits
    /// given on the command line win over the manifest's.
    Up {
        /// A ModelDeployment manifest: its model, worker count, router port and limits
        /// (default: examples/tiny.yaml, built in, serving the built-in trained model
        /// kubemoe-tiny-chat instead of its builtin:tiny).
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        overrides: local::Overrides,
        #[command(flatten)]
        limits: RouterLimits,
    },
    /// Call a router: streams the completion to the terminal.
    Generate(GenerateArgs),
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
        /// One-way delays (µs) to decode through as well, each worker behind a proxy that
        /// delays every segment both ways (cross-node latency on one machine; 500 is a 1 ms
        /// round trip); none: no delayed runs.
        #[arg(long, value_delimiter = ',')]
        delay_us: Vec<u64>,
    },
    /// Load a running router (`kubemoe up`): N clients × M streamed greedy completions over the
    /// OpenAI HTTP API, then the same over gRPC; throughput, TTFT and inter-token p50/p99.
    BenchApi {
        /// The router's HTTP address (host:port).
        #[arg(long)]
        http: String,
        /// The router's gRPC address (host:port).
        #[arg(long)]
        grpc: String,
        /// The served model name.
        #[arg(long, default_value = "tiny")]
        model: String,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 4)]
        requests: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        /// The router's API key, when it has keys.
        #[arg(long, env = "KUBEMOE_API_KEY")]
        api_key: Option<String>,
    },
    /// MTP speculative decoding against decoding without it, in the batch loop, on the same
    /// greedy requests: decode tokens/s and speedup per batch size and draft count, the
    /// acceptance rate of each draft position, and whether the tokens are the same; with the
    /// experts in this process, then on --workers local worker processes; prints JSON.
    BenchSpeculative {
        /// A model with an MTP module (default: the built-in kubemoe-tiny-chat).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Draft counts to compare with no speculation.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3",
              value_parser = clap::value_parser!(u8).range(1..=kubemoe_api::speculative::MAX_DRAFT_TOKENS as i64))]
        drafts: Vec<u8>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Worker processes for the distributed runs (0: none).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// A file of prompts, one per line (special tokens such as <｜User｜> written out);
        /// default: stories and questions in kubemoe-tiny-chat's language.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// One-way delays (µs) to add between the router and the workers, each a further
        /// distributed run behind delaying proxies (a cross-node link simulated here).
        #[arg(long, value_delimiter = ',')]
        delay_us: Vec<u64>,
    },
    /// Inter-token gaps of decoding streams while a long prompt is prefilled, whole and in
    /// chunks (one run per --max-batch-tokens), against their median; prints JSON.
    BenchPrefill {
        #[arg(long, default_value = "builtin:small")]
        model: String,
        #[arg(long, default_value_t = 16)]
        streams: usize,
        #[arg(long, default_value_t = 4000)]
        prompt_len: usize,
        /// Step token budgets to compare (the first, larger than the prompt, does not chunk).
        #[arg(long, value_delimiter = ',', default_value = "8192,256,128,64")]
        max_batch_tokens: Vec<usize>,
        /// Measure the prefix cache instead: two prompts sharing this many tokens, one after
        /// the other; the second's time to first token against the first's.
        #[arg(long, conflicts_with_all = ["streams", "prompt_len", "max_batch_tokens"])]
        shared_prefix: Option<usize>,
    },
    /// Measure the engine's hot paths against the GEMM rate of this machine.
    Bench {
        #[arg(long, default_value = "builtin:small")]
        model: String,
        /// Precisions to measure, comma-separated (auto, bf16, fp8, f32): one report each.
        #[arg(long, value_delimiter = ',', default_value = "auto")]
        dtype: Vec<Precision>,
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

/// TLS and the plaintext health port of `worker` and `router`.
#[derive(clap::Args)]
struct TlsArgs {
    /// Serve every port but --health-port over TLS with DIR's tls.crt and tls.key (the layout
    /// of cert-manager's Secrets), re-read when they change; internal calls check the peer's
    /// certificate against DIR's ca.crt.
    #[arg(long, env = "KUBEMOE_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// A plaintext port serving grpc.health.v1 alone, for probes that speak no TLS (kubelet's);
    /// 0 picks a free one (printed last); none without the flag.
    #[arg(long)]
    health_port: Option<u16>,
}

/// Binds `port` when given, printing the address under `role`.
async fn bind_optional(host: &str, port: Option<u16>, role: &str) -> Result<Option<TcpListener>> {
    Ok(match port {
        Some(p) => Some(bind(host, p, role).await?),
        None => None,
    })
}

/// `kubemoe generate`: one request to a router.
#[derive(clap::Args)]
struct GenerateArgs {
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
    /// Also print, after the text, each new token's log-probability and this many most likely
    /// alternatives (0 to 20).
    #[arg(long)]
    logprobs: Option<u32>,
    /// The router's API key, when it has keys.
    #[arg(long, env = "KUBEMOE_API_KEY")]
    api_key: Option<String>,
    /// Speak TLS to the router, trusting the CA certificates in this PEM file.
    #[arg(long, env = "KUBEMOE_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl GenerateArgs {
    fn request(self) -> Result<kubemoe_api::inference::GenerateRequest> {
        use kubemoe_api::inference::{generate_request::Input, ChatMessage, ChatMessages, TokenIds};
        let input = match (self.prompt, self.input_ids, self.chat) {
            (Some(p), _, _) => Input::Prompt(p),
            (_, Some(ids), _) => Input::InputIds(TokenIds { ids }),
            (_, _, Some(c)) => Input::Messages(ChatMessages {
                messages: vec![ChatMessage { role: "user".into(), content: c }],
            }),
            _ => anyhow::bail!("give one of --prompt, --input-ids, --chat"),
        };
        Ok(kubemoe_api::inference::GenerateRequest {
            input: Some(input),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop,
            logprobs: self.logprobs,
        })
    }
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
        /// The operator's namespace: its pods may call workers (NetworkPolicy).
        #[arg(long, default_value = "kubemoe-system")]
        operator_namespace: String,
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

/// The router's capacity settings; those a manifest also sets are options, so that `up` knows
/// which ones the command line gave.
#[derive(clap::Args, Clone)]
struct RouterLimits {
    /// Requests in progress at once; more get RESOURCE_EXHAUSTED [default: 64].
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Sequences in one step.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// New tokens in one step: one per decoding sequence, then chunks of the prompts being
    /// prefilled (a longer prompt is prefilled over several steps, between decode steps of the
    /// others) [default: 4096].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// KV cache budget in MiB; a request reserves its prompt plus max_tokens. It must hold
    /// one request of --max-context [default: 1024].
    #[arg(long)]
    kv_budget_mib: Option<usize>,
    /// Prefix cache in MiB, besides the KV budget: the latent KV rows of prompts already
    /// prefilled, in blocks of 16 tokens, found again by the prompts that begin with them
    /// (least recently used go first); 0 turns it off [default: 256].
    #[arg(long)]
    prefix_cache_mib: Option<usize>,
    /// Micro-batches per step, 1 or 2: with 2, a step's sequences are cut in two halves whose
    /// forward passes take turns on two threads, one's attention and dense layers while the
    /// other's tokens are on the workers (two-micro-batch overlap: it hides the workers' round
    /// trips where the router has cores to spare; each half reads the experts' weights again)
    /// [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    micro_batches: Option<u8>,
    /// Speculative decoding, `mtp:K`: draft K tokens (1 to 4) per decode step with the model's
    /// multi-token-prediction module (DeepSeek-V3's MTP) and verify them in the step; greedy
    /// outputs are unchanged and sampled ones keep their distribution. Needs a checkpoint with
    /// the MTP module's weights [default: off].
    #[arg(long, value_parser = kubemoe_api::speculative::parse)]
    speculative: Option<usize>,
    /// Prompt plus new tokens per request (capped by the model's max_position_embeddings)
    /// [default: 8192].
    #[arg(long)]
    max_context: Option<usize>,
    /// Deadline of every call to a worker, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    worker_deadline_ms: u64,
}

impl RouterLimits {
    /// The flags a router child gets: every setting with a default, the others when given.
    fn args(&self) -> Vec<String> {
        let given = [
            ("--max-concurrent", self.max_concurrent),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-context", self.max_context),
            ("--kv-budget-mib", self.kv_budget_mib),
            ("--prefix-cache-mib", self.prefix_cache_mib),
            ("--micro-batches", self.micro_batches.map(usize::from)),
        ];
        let speculative = self.speculative.map(|k| ["--speculative".to_string(), format!("mtp:{k}")]);
        let always = [
            ("--max-running", Some(self.max_running)),
            ("--worker-deadline-ms", Some(self.worker_deadline_ms as usize)),
        ];
        given
            .into_iter()
            .chain(always)
            .filter_map(|(k, v)| v.map(|v| [k.to_string(), v.to_string()]))
            .chain(speculative)
            .flatten()
            .collect()
    }

    fn options(&self, model: String, workers: Vec<String>) -> kubemoe_router::Options {
        kubemoe_router::Options {
            model,
            precision: Precision::Auto,
            served_model_name: None,
            workers,
            max_batch_tokens: self.max_batch_tokens.unwrap_or(4096),
            max_running: self.max_running,
            kv_budget_bytes: self.kv_budget_mib.unwrap_or(1024) << 20,
            prefix_cache_bytes: self.prefix_cache_mib.unwrap_or(256) << 20,
            micro_batches: self.micro_batches.map_or(1, usize::from),
            speculative_tokens: self.speculative.unwrap_or(0),
            max_concurrent: self.max_concurrent.unwrap_or(64),
            max_context: self.max_context.unwrap_or(kubemoe_placement::DEFAULT_MAX_CONTEXT as usize),
            worker_deadline: Duration::from_millis(self.worker_deadline_ms),
            placement: None,
            load_window: Duration::from_secs(300),
            api_keys_file: None,
            internal_token_file: None,
            http_header_timeout: kubemoe_api::http::HEADER_TIMEOUT,
            tls_dir: None,
            tls_server_name: None,
            grpc_max_connection_age: Duration::from_secs(5 * 60),
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM, or for a child of `kubemoe up` when `up` is gone: the
/// one shutdown signal of a server process.
fn shutdown_on_signal() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let parent = std::env::var(local::PARENT_ENV).ok().and_then(|pid| pid.parse::<u32>().ok());
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            // Nothing said: the pipe to `up` is gone, and printing to it would fail.
            () = orphaned(parent) => {}
        }
        t.cancel();
    });
    Ok(token)
}

/// Completes once this process's parent is no longer `parent` (never when `None`). A child is
/// re-parented when its parent dies, even by SIGKILL, which leaves it no chance to stop us.
async fn orphaned(parent: Option<u32>) {
    let Some(parent) = parent else { return std::future::pending().await };
    while std::os::unix::process::parent_id() == parent {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `key=value` of `gen-model --set`, the value JSON.
fn config_override(arg: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = arg.split_once('=').ok_or_else(|| format!("`{arg}`: give key=value"))?;
    let value = serde_json::from_str(value).map_err(|e| format!("`{arg}`: the value is not JSON: {e}"))?;
    Ok((key.to_string(), value))
}

async fn bind(host: &str, port: u16, role: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
    // The first stdout line tells a parent (kubemoe up, tests) where to connect.
    println!("kubemoe {role} listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// `run`'s model: everything in host memory with `--device cpu`; otherwise the routed
/// experts in a store on that device (all of them, as one worker holds them) and the rest of
/// the model (the MTP module's experts too, which no placement names) on the host. The store
/// loads first: a build without CUDA refuses before reading the model.
fn load_for_run(
    model: &str,
    dtype: Precision,
    device: DeviceSpec,
) -> Result<(kubemoe_model::Model, Option<kubemoe_worker::store::ExpertStore>)> {
    let (m, store) = kubemoe_model::progress::reported("run", || -> Result<_> {
        if device == DeviceSpec::Cpu {
            let m = source::open_as(model, Experts::All, dtype)
                .with_context(|| format!("loading model {model}"))?;
            return Ok((m, None));
        }
        let store = kubemoe_worker::store::ExpertStore::load_on(device, model, dtype, 0, Some(1), None)
            .with_context(|| format!("loading the routed experts of {model} on {device}"))?;
        let first_mtp = store.config.num_hidden_layers;
        let m = source::open_as(model, Experts::Only(&|layer, _| layer >= first_mtp), dtype)
            .with_context(|| format!("loading model {model}"))?;
        Ok((m, Some(store)))
    })?;
    kubemoe_model::memory::log_loaded("run", &kubemoe_model::memory::Held::of(m.matrices()), DeviceSpec::Cpu);
    if let Some(store) = &store {
        kubemoe_model::memory::log_loaded("run experts", &store.held_weights()?, device);
    }
    Ok((m, store))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Runs a server (`worker`, `router`) until it returns. One stopped while it loads returns at
/// once; its load, still running on a blocking thread, is abandoned rather than waited for.
fn serve(server: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let runtime = runtime()?;
    let served = runtime.block_on(server);
    runtime.shutdown_background();
    served
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::GenModel { preset, set, dtype, seed, out, shard_mib, skew } => {
            synth::write_model_dir(&out, &preset, &set, dtype, seed, skew, shard_mib << 20)
                .with_context(|| format!("generating preset {preset} into {}", out.display()))?;
            println!("{}", out.display());
        }
        Command::Run {
            model,
            dtype,
            device,
            input_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            logits_out,
        } => {
            let (m, store) = load_for_run(&model, dtype, device)?;
            let experts: &dyn RoutedExperts = match &store {
                Some(store) => store,
                None => &m,
            };
            if let Some(path) = logits_out {
                m.write_logits_with(&input_ids, &path, experts)?;
            }
            let sampling = SamplingParams { temperature, top_k, top_p, seed };
            let request = Request { prompt: input_ids, max_new_tokens, sampling };
            let output = generate_with(&m, experts, &[request])?.remove(0);
            println!("{}", serde_json::json!({ "output_ids": output }));
        }
        Command::Worker {
            model,
            dtype,
            device,
            rank,
            world_size,
            placement,
            host,
            port,
            http_port,
            data_port,
            internal_token_file,
            tls,
        } => {
            let plan = placement.as_deref().map(plan::read_placement).transpose()?;
            let tls_dir = tls.tls_dir;
            let options = kubemoe_worker::Options {
                model,
                precision: dtype,
                device,
                rank,
                world_size,
                plan,
                internal_token_file,
                tls_dir,
            };
            serve(async {
                let listeners = kubemoe_worker::Listeners {
                    grpc: bind(&host, port, "worker").await?,
                    http: bind_optional(&host, http_port, "worker http").await?,
                    health: bind_optional(&host, tls.health_port, "worker health").await?,
                    data: bind_optional(&host, data_port, "worker data").await?,
                };
                kubemoe_worker::run(options, listeners, shutdown_on_signal()?).await?;
                Ok::<_, anyhow::Error>(())
            })?
        }
        Command::Router {
            model,
            dtype,
            workers,
            placement,
            load_window,
            host,
            port,
            http_port,
            served_model_name,
            api_keys_file,
            internal_port,
            internal_token_file,
            http_header_timeout,
            grpc_max_connection_age,
            tls,
            tls_server_name,
            limits,
        } => {
            let mut options = limits.options(model, workers);
            options.precision = dtype;
            options.served_model_name = served_model_name;
            options.api_keys_file = api_keys_file;
            options.internal_token_file = internal_token_file;
            options.tls_dir = tls.tls_dir;
            options.tls_server_name = tls_server_name;
            options.http_header_timeout =
                kubemoe_placement::parse_duration("--http-header-timeout", &http_header_timeout)?;
            anyhow::ensure!(
                !options.http_header_timeout.is_zero(),
                "--http-header-timeout must be more than 0s"
            );
            options.grpc_max_connection_age =
                kubemoe_placement::parse_duration("--grpc-max-connection-age", &grpc_max_connection_age)?;
            anyhow::ensure!(
                !options.grpc_max_connection_age.is_zero(),
                "--grpc-max-connection-age must be more than 0s"
            );
            options.placement = placement.as_deref().map(plan::read_placement).transpose()?;
            options.load_window = kubemoe_placement::parse_duration("--load-window", &load_window)?;
            serve(async {
                let listeners = kubemoe_router::Listeners {
                    grpc: bind(&host, port, "router").await?,
                    http: bind_optional(&host, http_port, "router http").await?,
                    internal: bind_optional(&host, internal_port, "router internal").await?,
                    health: bind_optional(&host, tls.health_port, "router health").await?,
                };
                kubemoe_router::run(options, listeners, shutdown_on_signal()?).await?;
                Ok::<_, anyhow::Error>(())
            })?
        }
        Command::Up { file, overrides, limits } => local::up(file.as_deref(), overrides, limits.args())?,
        Command::Generate(args) => {
            let (endpoint, api_key) = (args.endpoint.clone(), args.api_key.clone());
            let tls = match &args.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?;
                    Some(kubemoe_api::tls::Client::from_ca_pem(&pem, None)?)
                }
                None => None,
            };
            let request = args.request()?;
            let out = &mut std::io::stdout();
            let stream =
                kubemoe_router::client::stream(&endpoint, tls.as_ref(), request, api_key.as_deref(), out);
            let summary = runtime()?.block_on(stream)?;
            println!();
            eprintln!("{summary}");
        }
        Command::BenchServing { model, workers, batch, steps, delay_us } => {
            let workers = local::bench_workers(&model, workers)?;
            let report = kubemoe_router::bench::run(
                &model,
                &workers.urls,
                &workers.credential,
                batch,
                steps,
                &delay_us,
            );
            println!("{}", serde_json::to_string_pretty(&report?)?);
        }
        Command::BenchSpeculative { model, batch, drafts, max_tokens, workers, prompts, delay_us } => {
            let model = match model {
                Some(model) => model,
                None => embedded::unpack()?.display().to_string(),
            };
            let lines: Vec<String> = match &prompts {
                Some(file) => std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(String::from)
                    .collect(),
                None => kubemoe_router::bench_spec::PROMPTS.map(String::from).to_vec(),
            };
            let config = source::open_tensors(&model, &|_| false)?.0;
            let codec = kubemoe_router::text::TextCodec::load(&model, config.vocab_size)?
                .with_context(|| format!("{model} has no tokenizer.json to encode the prompts with"))?;
            let prompts = lines.iter().map(|l| codec.encode(l)).collect::<Result<Vec<_>, _>>()?;
            let drafts: Vec<usize> = drafts.into_iter().map(usize::from).collect();
            let started = (workers > 0).then(|| local::bench_workers(&model, workers)).transpose()?;
            let (urls, credential) = started
                .as_ref()
                .map_or((&[][..], kubemoe_api::auth::Bearer(None)), |w| (&w.urls[..], w.credential.clone()));
            let report = kubemoe_router::bench_spec::run(
                &model,
                &prompts,
                &batch,
                &drafts,
                max_tokens,
                urls,
                &credential,
                &delay_us,
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::BenchPrefill { model, streams, prompt_len, max_batch_tokens, shared_prefix } => {
            let m = source::open(&model, Experts::All).with_context(|| format!("loading model {model}"))?;
            let m = std::sync::Arc::new(m);
            let report = match shared_prefix {
                Some(n) => serde_json::to_value(kubemoe_router::bench_prefill::shared_prefix(m, n)?)?,
                None => serde_json::to_value(kubemoe_router::bench_prefill::run(
                    m,
                    streams,
                    prompt_len,
                    &max_batch_tokens,
                )?)?,
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::BenchApi { http, grpc, model, clients, requests, max_tokens, api_key } => {
            let run = kubemoe_router::bench_api::run(
                &http,
                &grpc,
                &model,
                clients,
                requests,
                max_tokens,
                api_key.as_deref(),
            );
            let report = runtime()?.block_on(run)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench { model, dtype, gemm_size, tokens_per_expert, prompt_len, decode_steps } => {
            let mut reports = Vec::new();
            for precision in dtype {
                let m = source::open_as(&model, Experts::All, precision)
                    .with_context(|| format!("loading model {model} as {}", precision.as_str()))?;
                let params =
                    kubemoe_model::bench::Params { gemm_size, tokens_per_expert, prompt_len, decode_steps };
                reports.push(kubemoe_model::bench::run(&m, precision, &params)?);
            }
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        Command::Operator(OperatorArgs {
            command: Some(OperatorCommand::Render { file, model_config, image, operator_namespace }),
            ..
        }) => {
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
            };
            let config = model_config.as_deref().map(read).transpose()?;
            let origin = file.display().to_string();
            let params = kubemoe_operator::desired::BuildParams {
                image,
                epoch: 0,
                placed_workers: 0,
                operator_namespace,
                token: kubemoe_api::auth::generate_token,
            };
            print!(
                "{}",
                kubemoe_operator::render::render(&read(&file)?, &origin, config.as_deref(), &params)?
            );
        }
        Command::Operator(OperatorArgs { command: Some(OperatorCommand::Run(args)), .. })
        | Command::Operator(OperatorArgs { command: None, run: args }) => {
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
            let options =
                kubemoe_operator::RunOptions { http_addr: args.http_addr, image: args.image, lease };
            runtime()?.block_on(kubemoe_operator::run(options))?
        }
        Command::Crd => print!("{}", kubemoe_operator::crd_yaml()?),
        Command::Plan(args) => println!("{}", plan::run(&args)?),
    }
    Ok(())
}
