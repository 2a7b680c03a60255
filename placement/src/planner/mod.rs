//! Expert placement planning: choosing which logical expert each physical slot holds
//! so that every worker of every MoE layer gets about the same number of tokens.
//!
//! A layer's placement is `phy_to_log`, one logical expert id per physical slot; slot `p` lives
//! on worker `p / slots_per_worker`. Invariants of every placement this module returns: each
//! layer has exactly `P = workers × slots_per_worker` slots (so every worker has exactly
//! `slots_per_worker`), every id is below the layer's expert count `E`, and every logical expert
//! has at least one slot. A replicated expert's load is split evenly among its slots.
//!
//! Two modes:
//! - [`eplb`] (full): DeepSeek's Expert Parallelism Load Balancer, `rebalance_experts` of
//!   `eplb.py` in <https://github.com/deepseek-ai/EPLB>, step for step. It computes in `f32`
//!   like the reference's `weight.float()`, so that ties and rounding break the same way.
//!   [`eplb_aligned`] is the same plan relabelled onto the current workers with fewest moves.
//! - [`incremental`]: starts from the current placement and moves as few slots as it finds (never
//!   more than a budget) until the overall balance reaches the best this module finds for the
//!   same loads: EPLB's plan refined by a local search, never less balanced than EPLB's. EPLB
//!   packs greedily (and hierarchically), which often leaves much balance on the table; stopping
//!   at EPLB's balance would leave a deployment there for good even when its imbalance is above
//!   the operator's threshold. Each moved slot costs a weight transfer, so it stops once within
//!   0.5% of that target: a placement already that balanced (its own output included) does not
//!   move at all.
//!
//! Everything here is pure and deterministic: the same inputs give the same output (threads only
//! split independent layers and their results are put back in layer order).

//!
//! Parts: [`eplb`] (DeepSeek's algorithm), `matching` (relabelling a plan onto the current
//! workers: the Hungarian algorithm on slot overlap), `search` (the local search that refines a
//! layer's plan), and [`incremental`] (spending a move budget over all layers).

mod eplb;
mod incremental;
mod matching;
mod search;
mod spread;
#[cfg(test)]
mod tests;

pub use eplb::{eplb, eplb_aligned};
pub use incremental::incremental;
pub(crate) use spread::spread;

use crate::{Error, Result};

/// Shape of a placement problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Workers (GPUs) holding expert slots; a multiple of `nodes`.
    pub workers: usize,
    /// Servers; the workers of one node share its fast intra-node network.
    pub nodes: usize,
    /// Expert groups of the model's group-limited routing (DeepSeek-V3: 8).
    pub groups: usize,
    /// Expert slots on every worker.
    pub slots_per_worker: usize,
    /// Distinct workers every logical expert must be on (`experts.minReplicas`; 1: anywhere).
    pub min_replicas: usize,
}

impl Problem {
    /// Physical slots of a layer, `P = workers × slots_per_worker`.
    pub fn slots(&self) -> usize {
        self.workers.saturating_mul(self.slots_per_worker)
    }
}

/// How evenly a placement spreads the loads over workers: mean worker load / max worker load.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    pub per_layer: Vec<f64>,
    /// (sum over layers of the mean) / (sum over layers of the max): a step waits for each
    /// layer's most loaded worker, so this is the fraction of the step time doing useful work.
    pub overall: f64,
}

/// Balance of `phy_to_log` under `loads`. Meant for placements the planners accept; ids without
/// a load count as no load, and a `slots_per_worker` of 0 is read as 1.
pub fn balance(loads: &[Vec<f64>], phy_to_log: &[Vec<u32>], slots_per_worker: usize) -> Balance {
    let s = slots_per_worker.max(1);
    let (mut sum_mean, mut sum_max) = (0.0, 0.0);
    let per_layer = loads
        .iter()
        .zip(phy_to_log)
        .map(|(load, layer)| {
            let wl = worker_loads(load, layer, s);
            let mean = wl.iter().sum::<f64>() / wl.len().max(1) as f64;
            let max = max_of(&wl);
            sum_mean += mean;
            sum_max += max;
            ratio(mean, max)
        })
        .collect();
    Balance { per_layer, overall: ratio(sum_mean, sum_max) }
}

/// Slots whose logical expert differs between `from` and `to`, over all layers. A slot present
/// in only one of them counts as moved: it has to be filled or emptied.
pub fn moved(from: &[Vec<u32>], to: &[Vec<u32>]) -> usize {
    let empty: &[u32] = &[];
    (0..from.len().max(to.len()))
        .map(|l| {
            let a = from.get(l).map_or(empty, Vec::as_slice);
            let b = to.get(l).map_or(empty, Vec::as_slice);
            (0..a.len().max(b.len())).filter(|&p| a.get(p) != b.get(p)).count()
        })
        .sum()
}

pub(crate) fn invalid(msg: String) -> Error {
    Error::InvalidPlacement(msg)
}

/// Most (layer, slot) entries a planner takes: 2^26 (256 MiB of ids), thousands of times
/// DeepSeek-V3's 58 MoE layers × a few hundred slots.
pub const MAX_PLAN_ENTRIES: usize = 1 << 26;

/// Checks the problem's shape and loads; returns the number of logical experts per layer.
pub(crate) fn check_problem(loads: &[Vec<f64>], p: &Problem) -> Result<usize> {
    for (name, value) in [
        ("workers", p.workers),
        ("slots_per_worker", p.slots_per_worker),
        ("nodes", p.nodes),
        ("groups", p.groups),
        ("min_replicas", p.min_replicas),
    ] {
        if value == 0 {
            return Err(invalid(format!("{name} is 0: it must be at least 1")));
        }
    }
    if !p.workers.is_multiple_of(p.nodes) {
        return Err(invalid(format!(
            "workers ({}) is not a multiple of nodes ({}): change workers or nodes",
            p.workers, p.nodes
        )));
    }
    let experts = loads.first().map_or(0, Vec::len);
    if let Some((l, layer)) = loads.iter().enumerate().find(|(_, layer)| layer.len() != experts) {
        return Err(invalid(format!(
            "loads of layer {l} have {} experts but layer 0 has {experts}: give every layer the same experts",
            layer.len()
        )));
    }
    if !loads.is_empty() && experts == 0 {
        return Err(invalid("loads have no experts: give each layer at least one expert".into()));
    }
    // Planners allocate per layer and slot: refuse what cannot be held before allocating.
    if loads.len().max(1).saturating_mul(p.slots()) > MAX_PLAN_ENTRIES {
        return Err(invalid(format!(
            "layers × slots ({} × {}) exceed {MAX_PLAN_ENTRIES} placement entries: use fewer workers or \
             slots_per_worker",
            loads.len().max(1),
            p.slots()
        )));
    }
    // Ids are u32 in placements; P bounds every id and slot index.
    if p.slots() > u32::MAX as usize {
        return Err(invalid(format!(
            "slots (workers × slots_per_worker = {}) exceed u32: use fewer",
            p.slots()
        )));
    }
    if p.slots() < experts {
        return Err(invalid(format!(
            "slots (workers × slots_per_worker = {}) are fewer than experts ({experts}): \
             add workers or slots_per_worker",
            p.slots()
        )));
    }
    if p.min_replicas > p.workers || p.slots() < experts.saturating_mul(p.min_replicas) {
        return Err(invalid(format!(
            "min_replicas ({}) copies of {experts} experts on distinct workers need at least that \
             many workers ({}) and min_replicas × experts slots ({}): lower min_replicas or add \
             workers or slots_per_worker",
            p.min_replicas,
            p.workers,
            p.slots()
        )));
    }
    for (l, layer) in loads.iter().enumerate() {
        // EPLB computes in f32, so a load must also be finite there.
        if let Some((e, x)) =
            layer.iter().enumerate().find(|(_, &x)| !(0.0..=f64::from(f32::MAX)).contains(&x))
        {
            return Err(invalid(format!(
                "load of expert {e} in layer {l} is {x}: loads must be finite, non-negative and below f32::MAX"
            )));
        }
    }
    Ok(experts)
}

/// Checks `current` against the problem: layer count, slot count, ids, every expert placed.
pub(crate) fn check_current(current: &[Vec<u32>], layers: usize, experts: usize, p: &Problem) -> Result<()> {
    if current.len() != layers {
        return Err(invalid(format!(
            "current has {} layers but loads have {layers}: give one current placement per layer",
            current.len()
        )));
    }
    let mut count = vec![0usize; experts];
    for (l, layer) in current.iter().enumerate() {
        if layer.len() != p.slots() {
            return Err(invalid(format!(
                "current layer {l} has {} slots but workers × slots_per_worker is {}: \
                 give every layer exactly that many",
                layer.len(),
                p.slots()
            )));
        }
        count.iter_mut().for_each(|c| *c = 0);
        for (slot, &e) in layer.iter().enumerate() {
            match count.get_mut(e as usize) {
                Some(c) => *c += 1,
                None => {
                    return Err(invalid(format!(
                        "current layer {l} slot {slot} holds expert id {e}, but there are {experts} experts: \
                         use ids below {experts}"
                    )))
                }
            }
        }
        if let Some(e) = count.iter().position(|&c| c == 0) {
            return Err(invalid(format!(
                "current layer {l} gives expert {e} no slot: every expert needs at least one slot"
            )));
        }
    }
    Ok(())
}

/// Tokens of each worker: each slot carries its expert's load over the expert's slot count.
/// Every caller sums in this one order, so maxima compare exactly across modes.
pub(crate) fn worker_loads(load: &[f64], layer: &[u32], s: usize) -> Vec<f64> {
    let mut count = vec![0u32; load.len()];
    for &e in layer {
        if let Some(c) = count.get_mut(e as usize) {
            *c += 1;
        }
    }
    let mut wl = vec![0.0; layer.len().div_ceil(s)];
    for (p, &e) in layer.iter().enumerate() {
        if let (Some(&l), Some(&c)) = (load.get(e as usize), count.get(e as usize)) {
            wl[p / s] += l / f64::from(c);
        }
    }
    wl
}

pub(crate) fn max_of(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(0.0, f64::max)
}

pub(crate) fn ratio(mean: f64, max: f64) -> f64 {
    if max > 0.0 {
        mean / max
    } else {
        1.0
    }
}

/// Runs `f` on `0..n` over the machine's cores; results in index order, so threads never change
/// the output. Indices are dealt round-robin because layers differ in cost.
pub(crate) fn par_map<T: Send, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let mut out: Vec<(usize, T)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || (t..n).step_by(threads).map(|i| (i, f(i))).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}
