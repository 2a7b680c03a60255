//! `kubemoe plan`: the placement planner on files, and reading placement files.
//!
//! The output keeps one interface (other tools rely on it):
//! `{"phy_to_log": [[logical expert of each slot] per layer], "balance": {"before": x, "after": y}, "moved": n}`
//! where slot `p` lives on worker `p / slots-per-worker` and balance is mean / max tokens per
//! worker over all layers (1.0 is perfect). Without `--current`, "before" and "moved" compare
//! with the initial placement (slot `p` holds expert `p mod E`).

use anyhow::{bail, Context, Result};
use kubemoe_placement::planner::{self, Problem};
use kubemoe_placement::PlacementPlan;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Per-layer expert loads: a JSON array (one per MoE layer) of arrays (tokens per logical expert).
    #[arg(long)]
    load: PathBuf,
    #[arg(long)]
    workers: usize,
    /// Nodes the workers span (the hierarchical mode packs expert groups onto nodes).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Expert groups (config.json n_group).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    #[arg(long)]
    slots_per_worker: usize,
    /// Distinct workers every expert must be on (a ModelDeployment's experts.minReplicas).
    #[arg(long, default_value_t = 1)]
    min_replicas: usize,
    /// The placement in force: a placement.json (the ConfigMap's), a plan's output, or a bare
    /// array of per-layer slot arrays. With it the planner moves as few experts as it can.
    #[arg(long)]
    current: Option<PathBuf>,
    /// Most slots that may change with --current (default: no limit).
    #[arg(long)]
    max_moves: Option<usize>,
}

/// Reads a placement file (the placement ConfigMap's `placement.json`).
pub fn read_placement(path: &Path) -> Result<PlacementPlan> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading placement {}", path.display()))?;
    let plan: PlacementPlan = serde_json::from_str(&text).with_context(|| {
        format!("{} is not a placement.json (epoch, workers, slotsPerWorker, …)", path.display())
    })?;
    plan.validate().with_context(|| format!("placement {}", path.display()))?;
    Ok(plan)
}

/// The plan's JSON line, keys in the documented order.
pub fn run(args: &PlanArgs) -> Result<String> {
    let loads: Vec<Vec<f64>> = read_json(&args.load)
        .and_then(|v| serde_json::from_value(v).context("expected an array of arrays of numbers"))
        .with_context(|| format!("--load {}", args.load.display()))?;
    let problem = Problem {
        workers: args.workers,
        nodes: args.nodes,
        groups: args.groups,
        slots_per_worker: args.slots_per_worker,
        min_replicas: args.min_replicas,
    };
    let experts = loads.first().map_or(0, Vec::len);
    let (current, next) = match &args.current {
        Some(path) => {
            let current = current_slots(path)?;
            let moves = args.max_moves.unwrap_or(usize::MAX);
            let next = planner::incremental(&loads, &current, &problem, moves).with_context(|| {
                format!("planning from --load {} and --current {}", args.load.display(), path.display())
            })?;
            (current, next)
        }
        None => {
            if args.max_moves.is_some() {
                bail!("--max-moves bounds the moves from --current; give --current too");
            }
            // The planner checks the sizes first: the initial placement is only built for a plan.
            let next = planner::eplb(&loads, &problem)
                .with_context(|| format!("planning from --load {}", args.load.display()))?;
            let initial = (0..problem.slots()).map(|p| (p % experts.max(1)) as u32).collect();
            (vec![initial; loads.len()], next)
        }
    };
    let s = args.slots_per_worker;
    Ok(format!(
        r#"{{"phy_to_log":{},"balance":{{"before":{},"after":{}}},"moved":{}}}"#,
        serde_json::to_string(&next)?,
        json!(planner::balance(&loads, &current, s).overall),
        json!(planner::balance(&loads, &next, s).overall),
        planner::moved(&current, &next)
    ))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The per-layer slots of any of the three `--current` formats.
fn current_slots(path: &Path) -> Result<Vec<Vec<u32>>> {
    let what = || format!("--current {}", path.display());
    let value = read_json(path).with_context(what)?;
    let slots = match value {
        Value::Object(ref o) if o.contains_key("phy_to_log") => o["phy_to_log"].clone(),
        Value::Object(_) => {
            let plan: PlacementPlan = serde_json::from_value(value).with_context(what)?;
            return Ok(plan.phy_to_log());
        }
        other => other,
    };
    serde_json::from_value(slots)
        .with_context(|| format!("{}: expected arrays of expert ids per layer", what()))
}
