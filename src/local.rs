//! Local mode: the router and N workers as child processes of `kubemoe up` on loopback, each
//! started from this same binary with the flags a pod would give it, from the same
//! ModelDeployment manifest a cluster would get.
//!
//! The machine's cores are split among the workers (each gets `cores / workers` compute
//! threads, at least one), as each pod would have its own; the router keeps all of them, as
//! it computes while the workers wait and the other way round.
//!
//! Children announce their address on their first stdout line (`... listening on ADDR`); the
//! parent waits for that, prints where to call the router, relays every later line of theirs
//! (stdout and logs) on its stderr prefixed with the child's name, and on Ctrl-C or SIGTERM
//! stops them all (they turn NOT_SERVING and drain) before exiting. Meanwhile it supervises
//! them as kubelet does a pod's containers ([`Supervised`]): one that exits is started again
//! on its ports, from the placement file, which holds the plan of record. A child stops by
//! itself once `up` is gone (`PARENT_ENV`), even when `up` was killed outright.
//!
//! The expert layout and the rebalance loop are the operator's (`kubemoe_operator::spec`,
//! `kubemoe_placement::rebalance`): the manifest's `experts.redundant` and `balancing` mean the
//! same here as on a cluster, and each rebalance is printed where the operator records an event.
//! Edits of the manifest's `workers.replicas`, `experts` and `balancing` (but its `window`, a
//! router flag) apply live,
//! as `kubectl apply` would on a cluster: a resize starts the workers it adds (holding nothing),
//! migrates the experts (`rebalance::reshape`), then stops the workers it removes, and the router
//! is told the new workers' URLs with the plan, so no process restarts.

use anyhow::{bail, Context, Result};
use kubemoe_operator::spec::{self, ModelSource};
use kubemoe_operator::ModelDeployment;
use kubemoe_placement::{Layout, ModelConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `kubemoe up` may override in the manifest.
#[derive(clap::Args)]
pub struct Overrides {
    /// Overrides the manifest's model (a directory or builtin:<preset>; without a manifest,
    /// the default is the built-in trained model kubemoe-tiny-chat).
    #[arg(long)]
    pub model: Option<String>,
    /// Overrides the manifest's workers.replicas.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Overrides the manifest's model.dtype (auto, bf16, fp8, f32).
    #[arg(long)]
    pub dtype: Option<kubemoe_model::Precision>,
    /// Where the workers' experts live and run: cpu (default) or cuda:N, every worker on GPU
    /// N (needs a build with `--features cuda`); the router stays on the CPU.
    #[arg(long)]
    pub device: Option<kubemoe_kernels::device::DeviceSpec>,
    /// Overrides the manifest's router.grpcPort.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Overrides the manifest's router.httpPort (OpenAI API, /metrics); 0 picks a free one.
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Overrides the manifest's model.servedName (default: the ModelDeployment's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// API keys for the router's public APIs, one per line (what the manifest's
    /// auth.apiKeysSecret holds in a cluster).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
}

/// `kubemoe up`: the workers, then the router, as child processes, both starting from the
/// layout's initial placement, and the rebalance loop (load judged when `balancing.enabled`,
/// manifest edits resized live); serves until interrupted. `router_args` are the router's
/// limits as flags.
pub fn up(file: Option<&Path>, overrides: Overrides, mut router_args: Vec<String>) -> Result<()> {
    let origin = file.map_or("examples/tiny.yaml (built in)".into(), |f| f.display().to_string());
    let mut md = deployment(file)?;
    if let Some(w) = overrides.workers {
        md.spec.workers.replicas = i32::try_from(w).context("--workers is too large")?;
    }
    let model = match (overrides.model, file) {
        (Some(model), _) => model,
        (None, Some(_)) => model_path(&md.spec.model.source, &origin)?,
        // No manifest: the built-in trained model, with examples/tiny.yaml's settings.
        (None, None) => crate::embedded::unpack()?.display().to_string(),
    };
    let layout = layout(&md, &model, &origin)?;
    let policy = spec::policy(&md.spec).with_context(|| format!("{origin}: balancing"))?;
    // A Secret cannot be read here: its keys come as a file.
    let api_keys = match (overrides.api_keys_file, &md.spec.auth.api_keys_secret) {
        (Some(file), _) => {
            Some(std::path::absolute(&file).with_context(|| format!("--api-keys-file {}", file.display()))?)
        }
        (None, Some(secret)) => bail!(
            "{origin}: auth.apiKeysSecret names the Secret `{secret}`, which `up` cannot read: \
             give its keys with --api-keys-file (one key per line)"
        ),
        (None, None) => None,
    };
    if let Some(tls) = &md.spec.tls {
        bail!(
            "{origin}: tls names the Secret `{}`, which `up` cannot read: `up` serves on loopback \
             in plaintext (its internal calls carry a token it makes); remove tls here, or run \
             `kubemoe router`/`worker` with --tls-dir",
            tls.secret_name
        );
    }
    let grpc_port = overrides.grpc_port.unwrap_or(md.spec.router.grpc_port as u16);
    let http_port = overrides.http_port.unwrap_or(md.spec.router.http_port as u16);

    let plan = layout.initial_plan();
    let dir = std::env::temp_dir().join(format!("kubemoe-up-{}", std::process::id()));
    // One there was left by an `up` that had this pid and was killed outright: stale.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let placement = dir.join(kubemoe_placement::KEY);
    std::fs::write(&placement, serde_json::to_string(&plan)?)
        .with_context(|| format!("writing {}", placement.display()))?;
    // The internal credential of this deployment: made here, readable by this user only.
    let (token, credential) = internal_token(&dir)?;
    let token_args = ["--internal-token-file".to_string(), token.display().to_string()];
    let placement_args = ["--placement".to_string(), placement.display().to_string()];
    let dtype = overrides.dtype.map_or(md.spec.model.dtype.as_str(), |d| d.as_str());
    // `auto` is the processes' default.
    let dtype_args: Vec<String> = if dtype == "auto" { vec![] } else { vec!["--dtype".into(), dtype.into()] };
    // The workers' default is the CPU.
    let gpu = overrides.device.filter(|d| *d != kubemoe_kernels::device::DeviceSpec::Cpu);
    if let Some(d) = gpu.filter(|_| !cfg!(feature = "cuda")) {
        anyhow::bail!(
            "--device {d}: this kubemoe was built without CUDA; build it with `cargo build --release \
             --features cuda`, or leave --device out"
        );
    }
    let device_args: Vec<String> = gpu.map(|d| vec!["--device".into(), d.to_string()]).unwrap_or_default();
    let worker_args = [&placement_args[..], &token_args, &dtype_args, &device_args].concat();
    let (mut children, urls) = start_workers(&model, layout.workers as usize, &worker_args)?;
    let mut args: Vec<String> =
        ["router", "--model", &model, "--host", "127.0.0.1"].iter().map(|s| s.to_string()).collect();
    args.extend(["--port".into(), grpc_port.to_string(), "--workers".into(), urls.join(",")]);
    args.extend(["--http-port".into(), http_port.to_string()]);
    args.extend(placement_args);
    args.extend(token_args);
    args.extend(dtype_args);
    args.extend(["--internal-port".into(), "0".into()]);
    args.extend(["--load-window".into(), md.spec.balancing.window.clone()]);
    let served_name =
        overrides.served_model_name.unwrap_or_else(|| kubemoe_operator::desired::served_name(&md));
    args.extend(["--served-model-name".into(), served_name]);
    if let Some(file) = &api_keys {
        args.extend(["--api-keys-file".into(), file.display().to_string()]);
    }
    // The manifest's limits, where the command line did not set them.
    let router = &md.spec.router;
    let manifest = [
        ("--max-concurrent", Some(router.max_concurrent_requests)),
        ("--max-batch-tokens", Some(router.max_batch_tokens)),
        ("--max-context", md.spec.model.max_context_length),
        ("--kv-budget-mib", Some(router.kv_cache_mib)),
        ("--prefix-cache-mib", Some(router.prefix_cache_mib)),
    ];
    for (flag, value) in manifest {
        if let Some(value) = value.filter(|_| !router_args.iter().any(|a| a == flag)) {
            router_args.extend([flag.to_string(), value.max(1).to_string()]);
        }
    }
    if let Some(value) =
        router.speculative.as_ref().filter(|_| !router_args.iter().any(|a| a == "--speculative"))
    {
        router_args.extend(["--speculative".to_string(), value.clone()]);
    }
    args.extend(router_args);
    let (router, addrs) = start("router", args, cores(), &["--port", "--http-port", "--internal-port"])?;
    children.push(router);
    let children = Supervised::new(children);
    let (addr, http, internal) = (&addrs[0], &addrs[1], &addrs[2]);
    println!("kubemoe up: workers at {} ({} expert slots each)", urls.join(","), layout.slots_per_worker);
    if let Some(file) = &api_keys {
        println!("kubemoe up: API keys from {}: send `Authorization: Bearer <key>`", file.display());
    }
    println!(
        "kubemoe up: {model} on {} workers; gRPC at {addr} (health, reflection, kubemoe.inference.v1); HTTP at {http} (OpenAI API at http://{http}/v1, /health, /metrics)",
        layout.workers
    );
    println!(
        "kubemoe up: internal calls (workers, kubemoe.expert.v1.Balancer at {internal}) need the token in {}",
        token.display()
    );
    if file.is_some() && overrides.workers.is_some() {
        println!(
            "kubemoe up: --workers overrides the manifest: edits of its workers.replicas are not applied"
        );
    }
    let mut local = Local {
        manifest: file
            .filter(|_| overrides.workers.is_none())
            .map(|f| (f.to_path_buf(), modified(f), md.spec)),
        model,
        layout,
        urls,
        worker_args,
        router: format!("http://{internal}"),
        credential,
        children: &children,
    };
    let record = kubemoe_placement::rebalance::Printed::new(plan, placement.clone(), |line| {
        println!("kubemoe up: {line}")
    });
    crate::runtime()?.block_on(async {
        let stop = crate::shutdown_on_signal()?;
        // The router answers at once; `try` once it serves (weights loaded, workers answering).
        tokio::select! {
            () = stop.cancelled() => {}
            ready = kubemoe_api::health::until_serving(addr) => {
                ready.context("the router's address")?;
                println!("try: kubemoe generate --endpoint http://{addr} --chat 'Tell me a story about the fox.' --max-tokens 96    (Ctrl-C stops everything)");
                local.run(&record, policy, stop).await;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    children.stop_restarts();
    eprintln!("kubemoe up: stopping");
    drop(children);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// How often `up` looks at its manifest and, while a resize is due, polls.
const TICK: Duration = Duration::from_secs(1);

/// What `up`'s loop keeps: the layout in force or wanted, the workers it runs, and how to
/// reach them and the router.
struct Local<'a> {
    /// The manifest file, when its edits are applied live: its path, when it was last changed,
    /// and the spec applied (what applies live, [`with_live_fields`], from its last read).
    manifest:
        Option<(PathBuf, Option<std::time::SystemTime>, kubemoe_operator::deployment::ModelDeploymentSpec)>,
    model: String,
    /// The layout the manifest asks for: the plan of record is migrated to it.
    layout: Layout,
    /// URLs of the running workers, in rank order (during a resize, those of both plans).
    urls: Vec<String>,
    worker_args: Vec<String>,
    router: String,
    credential: kubemoe_api::auth::Bearer,
    children: &'a Supervised,
}

impl Local<'_> {
    /// Until `stop`: applies manifest edits and runs the rebalance loop (`policy.interval`
    /// apart, or every [`TICK`] while the plan of record is not of the layout wanted and the
    /// last attempt did not fail: a failing resize reloads experts each time), as the
    /// operator's controller and rebalancer do for a cluster.
    async fn run<F: Fn(String) + Sync>(
        &mut self,
        record: &kubemoe_placement::rebalance::Printed<F>,
        mut policy: kubemoe_placement::rebalance::Policy,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use kubemoe_placement::rebalance::{self, Polled, Record};
        let (mut unsettled, mut failed, mut last) = (false, false, Instant::now());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
            if let Err(e) = self.reread(&mut policy) {
                println!("kubemoe up: {e:#}");
            }
            let stored = record.stored().await.ok().flatten();
            let resizing = stored.as_ref().is_some_and(|p| !self.layout.fits(p));
            let wait = if resizing && !failed { Duration::ZERO } else { policy.interval };
            if !(resizing || policy.enabled) || last.elapsed() < wait {
                continue;
            }
            last = Instant::now();
            let placed = stored.map_or(0, |p| p.workers as usize);
            let polled = async {
                // New workers answer at once; they take part once they have loaded.
                for url in self.start_added(placed)? {
                    kubemoe_api::health::until_serving(&url).await?;
                }
                let servers = kubemoe_api::cluster::Cluster::new(
                    &self.urls,
                    std::slice::from_ref(&self.router),
                    &self.credential,
                    None,
                )?;
                Ok::<_, anyhow::Error>(
                    rebalance::poll(record, &servers, &self.layout, &policy, unsettled).await?,
                )
            };
            let polled = tokio::select! {
                () = stop.cancelled() => return,
                polled = polled => polled,
            };
            match polled {
                Ok(polled) => {
                    unsettled = matches!(polled, Polled::Failed { settled: false, .. });
                    failed = matches!(polled, Polled::Failed { .. });
                }
                Err(e) => {
                    failed = true;
                    eprintln!("kubemoe up: rebalancer poll failed: {e:#}");
                }
            }
            // After a poll that did not fail, the record is what the router routes by: the
            // workers past it may go (not after a failed one, whose record may be ahead).
            if !failed {
                if let Some(plan) = record.stored().await.ok().flatten() {
                    self.stop_removed(plan.workers as usize);
                }
            }
        }
    }

    /// Takes a changed `workers.replicas` or `experts` of the manifest as the layout wanted,
    /// and `balancing` but its `window` (a router flag) as the policy; says that other changes
    /// need a restart.
    fn reread(&mut self, policy: &mut kubemoe_placement::rebalance::Policy) -> Result<()> {
        let Some((file, seen, spec)) = &mut self.manifest else { return Ok(()) };
        let now = modified(file);
        if now == *seen {
            return Ok(());
        }
        *seen = now;
        let origin = file.display().to_string();
        let md = deployment(Some(file))?;
        let applied = with_live_fields(spec, &md.spec);
        if applied != md.spec {
            println!(
                "kubemoe up: {origin} changed; workers.replicas, experts and balancing (but its window) \
                 apply live, restart `up` for the rest"
            );
        }
        let layout = layout(&md, &self.model, &origin)?;
        *policy = spec::policy(&md.spec).with_context(|| format!("{origin}: balancing"))?;
        if (layout.workers, layout.slots_per_worker) != (self.layout.workers, self.layout.slots_per_worker) {
            println!(
                "kubemoe up: {origin}: resizing to {} workers of {} expert slots each, live",
                layout.workers, layout.slots_per_worker
            );
        }
        self.layout = layout;
        *spec = applied;
        Ok(())
    }

    /// Starts the workers the layout wanted or the plan of record (`placed` workers) has and
    /// `up` does not run (a new one from the plan of record, which gives it nothing until the
    /// resize's epoch); returns their URLs.
    fn start_added(&mut self, placed: usize) -> Result<Vec<String>> {
        let wanted = placed.max(self.layout.workers as usize);
        let mut added = Vec::new();
        while self.urls.len() < wanted {
            let rank = self.urls.len();
            let (child, url) = start_worker(&self.model, rank, wanted, &self.worker_args)?;
            println!("kubemoe up: worker {rank} at {url}");
            self.children.add(child);
            self.urls.push(url.clone());
            added.push(url);
        }
        Ok(added)
    }

    /// Once the plan of record names `workers` workers, stops those past it; the router is
    /// restarted, if it ever is, with the workers in force.
    fn stop_removed(&mut self, workers: usize) {
        if self.layout.workers as usize != workers {
            return;
        }
        while self.urls.len() > workers {
            let rank = self.urls.len() - 1;
            self.children.remove(&worker_name(rank));
            self.urls.pop();
            println!("kubemoe up: worker {rank} stopped: the placement in force no longer uses it");
        }
        self.children.set_arg("router", "--workers", &self.urls.join(","));
    }
}

/// `spec` with what `up` applies live taken from `edited`: `workers.replicas`, `experts` and
/// `balancing` but its `window` (the router's `--load-window`).
fn with_live_fields(
    spec: &kubemoe_operator::deployment::ModelDeploymentSpec,
    edited: &kubemoe_operator::deployment::ModelDeploymentSpec,
) -> kubemoe_operator::deployment::ModelDeploymentSpec {
    let mut applied = spec.clone();
    applied.workers.replicas = edited.workers.replicas;
    applied.experts = edited.experts.clone();
    applied.balancing = kubemoe_operator::deployment::BalancingSpec {
        window: spec.balancing.window.clone(),
        ..edited.balancing.clone()
    };
    applied
}

/// When `file` was last changed (`None`: unreadable).
fn modified(file: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

/// Writes `text` to a new file at `path` that only this user may read.
/// A new internal token for a deployment's processes in `dir`, readable by this user only: its
/// file (their `--internal-token-file`) and the credential that presents it.
pub fn internal_token(dir: &Path) -> Result<(std::path::PathBuf, kubemoe_api::auth::Bearer)> {
    let token = dir.join("internal-token");
    write_private(&token, &kubemoe_api::auth::generate_token().context("reading /dev/urandom")?)?;
    let keys = kubemoe_api::auth::Keys::load(&token, "--internal-token-file")?;
    Ok((token, kubemoe_api::auth::Bearer(Some(std::sync::Arc::new(keys)))))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// The ModelDeployment in `file`, or the built-in `examples/tiny.yaml`.
fn deployment(file: Option<&Path>) -> Result<ModelDeployment> {
    let (text, origin) = match file {
        Some(f) => (
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            f.display().to_string(),
        ),
        None => (include_str!("../examples/tiny.yaml").to_string(), "examples/tiny.yaml (built in)".into()),
    };
    let value: serde_json::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{origin} is not a ModelDeployment"))?;
    let violations = kubemoe_operator::schema::violations(&value);
    if !violations.is_empty() {
        bail!("{origin}: the API server would refuse this ModelDeployment: {}", violations.join("; "));
    }
    let md: ModelDeployment =
        serde_json::from_value(value).with_context(|| format!("{origin} is not a ModelDeployment"))?;
    spec::check_name(md.metadata.name.as_deref().unwrap_or_default())
        .map_err(|invalid| anyhow::anyhow!("{origin}: {}", invalid.message))?;
    Ok(md)
}

/// The local path or `builtin:` name of a ModelDeployment's `model.source`.
fn model_path(source: &str, origin: &str) -> Result<String> {
    match ModelSource::parse(source).map_err(|i| anyhow::anyhow!("{origin}: {}", i.message))? {
        ModelSource::Builtin { preset } => Ok(format!("builtin:{preset}")),
        ModelSource::HostPath { path } => Ok(path),
        ModelSource::Pvc { .. } => bail!(
            "{origin}: model.source {source}: local mode reads builtin:<preset> or hostPath:///dir; \
             pass --model <dir> for a copy of the volume"
        ),
    }
}

/// Worker processes a benchmark started: they stop, and their token goes, when this drops.
pub struct BenchWorkers {
    pub urls: Vec<String>,
    pub credential: kubemoe_api::auth::Bearer,
    _children: Vec<Managed>,
    dir: PathBuf,
}

impl Drop for BenchWorkers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `workers` local worker processes serving `model`, each with an internal token as a
/// deployment's are, and waits until every one has loaded.
pub fn bench_workers(model: &str, workers: usize) -> Result<BenchWorkers> {
    let dir = std::env::temp_dir().join(format!("kubemoe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (token, credential) = internal_token(&dir)?;
    let world = [
        "--world-size".to_string(),
        workers.to_string(),
        "--internal-token-file".to_string(),
        token.display().to_string(),
    ];
    let (children, urls) = start_workers(model, workers, &world)?;
    let started = BenchWorkers { urls, credential, _children: children, dir };
    // Workers answer at once; the benchmark starts once every one has loaded.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        for url in &started.urls {
            let ready = kubemoe_api::health::until_serving(url);
            tokio::time::timeout(Duration::from_secs(600), ready)
                .await
                .with_context(|| format!("worker {url} not ready after 10 minutes"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(started)
}

/// The expert layout the manifest asks for with the model at `model` (a directory or builtin:).
fn layout(md: &ModelDeployment, model: &str, origin: &str) -> Result<Layout> {
    let config = match model.strip_prefix("builtin:") {
        Some(preset) => ModelConfig::preset(preset).with_context(|| format!("no preset {preset}"))??,
        None => {
            let path = PathBuf::from(model).join("config.json");
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            ModelConfig::from_json(&text, &path.display().to_string())?
        }
    };
    spec::layout(&md.spec, &config)
        .map_err(|invalid| anyhow::anyhow!("{origin}: {} ({})", invalid.message, invalid.reason))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `workers` worker processes on loopback (each given `extra` flags); returns them and
/// their URLs in rank order.
pub fn start_workers(model: &str, workers: usize, extra: &[String]) -> Result<(Vec<Managed>, Vec<String>)> {
    anyhow::ensure!(workers > 0, "--workers must be at least 1");
    (0..workers)
        .map(|rank| start_worker(model, rank, workers, extra))
        .collect::<Result<Vec<_>>>()
        .map(|started| started.into_iter().unzip())
}

/// Starts worker `rank` of `workers` on loopback with `extra` flags; returns it and its URL.
fn start_worker(model: &str, rank: usize, workers: usize, extra: &[String]) -> Result<(Managed, String)> {
    let args: Vec<String> =
        ["worker", "--model", model, "--host", "127.0.0.1", "--port", "0", "--data-port", "0"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--rank".into(), rank.to_string()])
            .chain(extra.iter().cloned())
            .collect();
    // Both ports are kept across restarts (the data port is printed after the gRPC one), as a
    // restarted pod keeps its ports: routers reconnect where they were.
    let ports = &["--port", "--data-port"];
    let (child, addrs) = start(&worker_name(rank), args, (cores() / workers).max(1), ports)?;
    Ok((child, format!("http://{}", addrs[0])))
}

fn worker_name(rank: usize) -> String {
    format!("worker {rank}")
}

/// The environment variable naming the `kubemoe up` process a child serves: a child whose parent
/// is no longer that process stops (`up` killed outright has no chance to stop it).
pub const PARENT_ENV: &str = "KUBEMOE_PARENT_PID";

/// A child process that is stopped when dropped. `args` pin the ports it listens on, so that it
/// can be started again where the others reach it.
pub struct Managed {
    /// Unique among the children `up` ever started: a worker removed and added again has the
    /// same name, and a restart of the old one must not take the new one's place.
    id: u64,
    name: String,
    args: Vec<String>,
    threads: usize,
    /// How many `listening on` lines it prints, the flags of those ports in order.
    port_flags: &'static [&'static str],
    child: Child,
    restarts: Restarts,
}

impl Drop for Managed {
    fn drop(&mut self) {
        // One that exited was reaped: its pid may belong to another process by now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("{} did not stop in 5 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kubemoe <args>` with `threads` compute threads and waits for one `listening on ADDR`
/// line per flag of `port_flags`; returns the addresses in order, with the ports the child got
/// written into its `args` for a restart.
fn start(
    name: &str,
    mut args: Vec<String>,
    threads: usize,
    port_flags: &'static [&'static str],
) -> Result<(Managed, Vec<String>)> {
    let exe = std::env::current_exe().context("locating the kubemoe binary")?;
    let mut child = Command::new(exe)
        .args(&args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("KUBEMOE_LOG_FORMAT", crate::logging::format().as_str())
        .env(PARENT_ENV, std::process::id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    // Its logs, prefixed, from the start: they say why a child that never listens failed.
    relay(name, BufReader::new(stderr).lines());
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::with_capacity(port_flags.len());
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let restarts = Restarts { started: Instant::now(), due: None, backoff: Duration::ZERO };
    let mut managed =
        Managed { id, name: name.into(), args: Vec::new(), threads, port_flags, child, restarts };
    while addrs.len() < port_flags.len() {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    addrs.push(addr.trim().to_string());
                }
            }
            _ => bail!("{name} exited before it listened (see its errors above)"),
        }
    }
    for (flag, addr) in port_flags.iter().zip(&addrs) {
        set_flag(&mut args, flag, addr.rsplit(':').next().unwrap_or_default());
    }
    managed.args = args;
    // Keep draining the child's stdout too (so it never blocks on a full pipe), where what it
    // says later (the router's metrics address) reaches the user.
    relay(name, lines);
    Ok((managed, addrs))
}

/// Sets `flag`'s value in `args` (appends the flag when it is not there).
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) if i + 1 < args.len() => args[i + 1] = value.to_string(),
        _ => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// Copies every line of `lines` to stderr as `[name] line`, on a thread of its own.
fn relay(name: &str, lines: impl Iterator<Item = std::io::Result<String>> + Send + 'static) {
    let prefix = name.to_string();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("[{prefix}] {l}")));
}

/// Children that are started again when they exit, as kubelet restarts a pod's container: on
/// the same ports, with the same flags, so with the placement file `up` keeps at the plan of
/// record. The first restart is immediate; a child that keeps exiting within [`STABLE`] of its
/// start waits 1 s, 2 s, … up to [`MAX_BACKOFF`] before each further one, and one that ran
/// longer starts again at once. Dropping this stops the supervision, then the children.
pub struct Supervised {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    children: Arc<Mutex<Vec<Managed>>>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a child must have run for its next exit to be restarted at once.
const STABLE: Duration = Duration::from_secs(10);

/// One child's restarts.
#[derive(Clone, Copy)]
struct Restarts {
    started: Instant,
    /// When it is to be started again, once it exited.
    due: Option<Instant>,
    /// The delay before the next restart of a child that exits young.
    backoff: Duration,
}

impl Supervised {
    pub fn new(children: Vec<Managed>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let children = Arc::new(Mutex::new(children));
        let (s, c) = (stop.clone(), children.clone());
        let thread = std::thread::spawn(move || supervise(&s, &c));
        Supervised { stop, thread: Some(thread), children }
    }

    /// Starts no child again from now on: `up` is stopping, and its children with it (a
    /// Ctrl-C reaches them too).
    fn stop_restarts(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Supervises one more child.
    fn add(&self, child: Managed) {
        lock(&self.children).push(child);
    }

    /// Stops the child named `name` (and its supervision).
    fn remove(&self, name: &str) {
        let gone: Vec<Managed> = {
            let mut children = lock(&self.children);
            let (gone, kept) = std::mem::take(&mut *children).into_iter().partition(|c| c.name == name);
            *children = kept;
            gone
        };
        drop(gone);
    }

    /// Sets `flag`'s value in the arguments `name` is started again with.
    fn set_arg(&self, name: &str, flag: &str, value: &str) {
        if let Some(c) = lock(&self.children).iter_mut().find(|c| c.name == name) {
            set_flag(&mut c.args, flag, value);
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        lock(&self.children).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every writer replaces whole children: the data is consistent after a panic elsewhere.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long to wait before starting again a child that exited after running `lived`, and the
/// backoff after that: at once after a stable run or a first quick exit, then doubling.
fn restart_delay(lived: Duration, backoff: Duration) -> (Duration, Duration) {
    let delay = if lived >= STABLE { Duration::ZERO } else { backoff };
    (delay, (delay * 2).clamp(Duration::from_secs(1), MAX_BACKOFF))
}

fn supervise(stop: &AtomicBool, children: &Mutex<Vec<Managed>>) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let due: Vec<u64> = {
            let mut list = lock(children);
            for c in list.iter_mut().filter(|c| c.restarts.due.is_none()) {
                if let Ok(Some(status)) = c.child.try_wait() {
                    if stop.load(Ordering::Relaxed) {
                        break; // stopping: an exit is expected
                    }
                    let r = &mut c.restarts;
                    let delay;
                    (delay, r.backoff) = restart_delay(r.started.elapsed(), r.backoff);
                    r.due = Some(Instant::now() + delay);
                    println!(
                        "kubemoe up: {} exited ({status}); starting it again on its ports in {delay:?}",
                        c.name
                    );
                }
            }
            list.iter()
                .filter(|c| c.restarts.due.is_some_and(|due| Instant::now() >= due))
                .map(|c| c.id)
                .collect()
        };
        for id in due {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Some((name, args, threads, port_flags, mut r)) = lock(children)
                .iter()
                .find(|c| c.id == id)
                .map(|c| (c.name.clone(), c.args.clone(), c.threads, c.port_flags, c.restarts))
            else {
                continue;
            };
            // Started without the lock: a worker loads its experts meanwhile. One removed
            // meanwhile (a resize let it go) is not put back.
            let started = start(&name, args, threads, port_flags);
            let mut list = lock(children);
            let Some(slot) = list.iter_mut().find(|c| c.id == id) else { continue };
            match started {
                Ok((mut managed, addrs)) => {
                    println!("kubemoe up: {name} is back at {}", addrs.join(", "));
                    managed.restarts = Restarts { started: Instant::now(), due: None, backoff: r.backoff };
                    *slot = managed;
                }
                Err(e) => {
                    // As a child that exited at once.
                    let delay;
                    (delay, r.backoff) = restart_delay(Duration::ZERO, r.backoff);
                    slot.restarts = Restarts { due: Some(Instant::now() + delay), ..r };
                    eprintln!("kubemoe up: {e:#}; trying again in {delay:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_keeps_exiting_young_waits_longer_each_time_and_a_stable_one_not_at_all() {
        let young = Duration::from_secs(1);
        let mut backoff = Duration::ZERO;
        let mut delays = Vec::new();
        for _ in 0..7 {
            let delay;
            (delay, backoff) = restart_delay(young, backoff);
            delays.push(delay.as_secs());
        }
        assert_eq!(delays, [0, 1, 2, 4, 8, 10, 10]);
        // A run past STABLE: at once, and the next quick exit starts the doubling afresh.
        assert_eq!(restart_delay(STABLE, backoff), (Duration::ZERO, Duration::from_secs(1)));
    }
}
