//! Local mode (DESIGN §6): the router and N workers as child processes of `kubemoe up` on
//! loopback, each started from this same binary with the flags a pod would give it, from the
//! same ModelDeployment manifest a cluster would get.
//!
//! The machine's cores are split among the workers (each gets `cores / workers` compute
//! threads, at least one), as each pod would have its own; the router keeps all of them, as
//! it computes while the workers wait and the other way round.
//!
//! Children announce their address on their first stdout line (`... listening on ADDR`); the
//! parent waits for that, prints where to call the router, and on Ctrl-C or SIGTERM stops
//! them all (they turn NOT_SERVING and drain) before exiting.
//!
//! The expert layout and the rebalancer are the operator's: the manifest's
//! `experts.redundant` and `balancing` mean the same here as on a cluster, and each rebalance
//! is printed as the operator would record it in an event.

use anyhow::{bail, Context, Result};
use kubemoe_operator::layout::Layout;
use kubemoe_operator::rebalance::{decide, Cluster, Decision, Policy};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The ModelDeployment in `file`, or the built-in `examples/tiny.yaml`.
pub fn deployment(file: Option<&std::path::Path>) -> Result<kubemoe_api::ModelDeployment> {
    let (text, origin) = match file {
        Some(f) => (
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            f.display().to_string(),
        ),
        None => (include_str!("../examples/tiny.yaml").to_string(), "examples/tiny.yaml (built in)".into()),
    };
    serde_yaml::from_str(&text).with_context(|| format!("{origin} is not a ModelDeployment"))
}

/// The local path or `builtin:` name of a ModelDeployment's `model.source`.
pub fn model_path(source: &str) -> Result<String> {
    if source.starts_with("builtin:") {
        return Ok(source.into());
    }
    if let Some(path) = source.strip_prefix("hostPath://") {
        return Ok(path.into());
    }
    bail!("model.source {source}: local mode reads builtin:<preset> or hostPath:///dir; pass --model <dir> for a copy of the volume")
}

/// The expert layout `spec` asks for with the model at `model` (a directory or builtin:), and
/// the expert groups the planner keeps together (`n_group` when hierarchical, else 1).
pub fn layout(md: &kubemoe_api::ModelDeployment, model: &str, origin: &str) -> Result<(Layout, u32)> {
    use kubemoe_operator::model::ModelConfig;
    let config = match model.strip_prefix("builtin:") {
        Some(preset) => ModelConfig::preset(preset).with_context(|| format!("no preset {preset}"))??,
        None => {
            let path = std::path::Path::new(model).join("config.json");
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            ModelConfig::from_json(&text, &path.display().to_string())?
        }
    };
    let layout = kubemoe_operator::layout::layout(&md.spec, &config)
        .map_err(|invalid| anyhow::anyhow!("{origin}: {} ({})", invalid.message, invalid.reason))?;
    // The planner packs expert groups only for hierarchical placement, as the operator does.
    let groups = match md.spec.experts.placement {
        kubemoe_api::deployment::PlacementPolicy::Hierarchical => config.n_group,
        kubemoe_api::deployment::PlacementPolicy::Global => 1,
    };
    Ok((layout, groups))
}

/// Polls the router every `policy.interval` and migrates live when the load is skewed, until
/// `stop`; prints each rebalance.
pub async fn rebalance(cluster: Cluster, policy: Policy, stop: tokio_util::sync::CancellationToken) {
    let mut last: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(policy.interval) => {}
        }
        let step = async {
            let (loads, plan) = cluster.load().await?;
            let (policy, current, since) = (policy.clone(), plan.clone(), last.map(|t| t.elapsed()));
            let decision = tokio::task::spawn_blocking(move || decide(&policy, &current, &loads, since))
                .await
                .map_err(kubemoe_operator::Error::Planner)??;
            let Decision::Rebalance(p) = decision else { return Ok(()) };
            println!(
                "kubemoe up: rebalancing to epoch {}: imbalance {:.3} -> {:.3}, moving {} experts",
                p.plan.epoch, p.imbalance_before, p.imbalance_after, p.moved
            );
            if let Err(e) = cluster.migrate(&p.plan, plan.epoch).await {
                // The cooldown holds after a failure too, so a failing step is not retried (and
                // experts reloaded) every interval. Converge on one plan: the one the routers
                // agree on, or the new one when only some of them committed it.
                last = Some(std::time::Instant::now());
                let settled = match cluster.load().await {
                    Ok((_, routed)) => cluster.finish(&routed).await,
                    Err(_) => cluster.finish(&p.plan).await,
                };
                if let Err(s) = settled {
                    eprintln!(
                        "kubemoe up: settling after a failed migration: {}",
                        kubemoe_api::error_chain(&s)
                    );
                }
                return Err(e);
            }
            last = Some(std::time::Instant::now());
            println!("kubemoe up: placement epoch {} in force", p.plan.epoch);
            Ok::<_, kubemoe_operator::rebalance::Error>(())
        };
        if let Err(e) = step.await {
            eprintln!("kubemoe up: rebalancing: {}", kubemoe_api::error_chain(&e));
        }
    }
}

/// A child process that is stopped when dropped.
pub struct Managed {
    name: String,
    child: Child,
}

impl Drop for Managed {
    fn drop(&mut self) {
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

/// Starts `kubemoe <args>` with `threads` compute threads and waits for its
/// `listening on ADDR` line.
pub fn start(name: &str, args: &[String], threads: usize) -> Result<(Managed, String)> {
    let exe = std::env::current_exe().context("locating the kubemoe binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let managed = Managed { name: name.into(), child };
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    break addr.trim().to_string();
                }
            }
            _ => bail!("{name} exited before it listened (see its errors above)"),
        }
    };
    // Keep draining the child's stdout (so it never blocks on a full pipe) onto stderr, where
    // what it says later (the router's metrics address) reaches the user.
    let prefix = name.to_string();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("[{prefix}] {l}")));
    Ok((managed, addr))
}
