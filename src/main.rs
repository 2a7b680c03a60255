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
        Command::GenModel { preset, dtype, seed, out, shard_mib } => {
            synth::write_model_dir(&out, &preset, dtype, seed, shard_mib << 20)
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
