//! Expert placement planning (DESIGN §4): choosing which logical expert each physical slot holds
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

use std::cmp::Ordering;
use std::collections::BinaryHeap;

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

/// Full mode: DeepSeek's EPLB, bit-for-bit on the published vector.
///
/// Hierarchical (groups packed onto nodes, replicas made and packed within each node) when
/// `groups % nodes == 0` and the experts split evenly into groups; otherwise global, as
/// `eplb.py` does, with one group and one node.
pub fn eplb(loads: &[Vec<f64>], p: &Problem) -> Result<Vec<Vec<u32>>> {
    check_problem(loads, p)?;
    Ok(loads.iter().map(|load| eplb_layer(load, p)).collect())
}

/// [`eplb`]'s plan with its workers relabelled onto `current`'s (and slots reordered within each
/// worker) so that as few slots as possible change; worker loads, hence balance, are EPLB's.
/// Relabelling keeps nodes whole when EPLB planned per node, so its groups stay on one node.
pub fn eplb_aligned(loads: &[Vec<f64>], current: &[Vec<u32>], p: &Problem) -> Result<Vec<Vec<u32>>> {
    let experts = check_problem(loads, p)?;
    check_current(current, loads.len(), experts, p)?;
    let nodes = policy(experts, p).1;
    Ok(loads
        .iter()
        .zip(current)
        .map(|(load, cur)| align_layer(&eplb_layer(load, p), cur, p.slots_per_worker, nodes))
        .collect())
}

/// Incremental mode: from `current`, a placement that reaches the best overall balance found for
/// `loads` with the fewest moved slots found, moving at most `max_moves` slots over all layers
/// (`usize::MAX` for no bound). No layer ends less balanced than in `current`.
///
/// The target is, per layer, EPLB's plan refined to convergence by a local search (swaps and
/// re-assignments around the most loaded worker), whose max worker load is never above EPLB's
/// and often well below it: EPLB's greedy packing leaves balance on the table. The target sums
/// those maxima; it depends only on `loads`, so running this again on its own unbounded output
/// moves nothing. It stops once the sum of layer maxima is within 0.5% of the target
/// (never above EPLB's sum), so tiny gains do not cost moves.
///
/// Moves are minimised on the way. Per layer it builds two paths of placements with their moves
/// and max worker loads: the local search from `current`, and the refined plan relabelled onto
/// `current`'s workers with fewest moves (as [`eplb_aligned`] does), searched on, then walked back
/// toward `current` one restored slot at a time. A greedy over all layers then spends the budget
/// on the points that cut the most max-worker tokens per moved slot, until the target is reached
/// or nothing fits. Unlike EPLB's hierarchical plan, it does not keep an expert group's replicas
/// on one node.
pub fn incremental(
    loads: &[Vec<f64>],
    current: &[Vec<u32>],
    p: &Problem,
    max_moves: usize,
) -> Result<Vec<Vec<u32>>> {
    let experts = check_problem(loads, p)?;
    check_current(current, loads.len(), experts, p)?;
    if max_moves == 0 {
        return Ok(current.to_vec());
    }
    let s = p.slots_per_worker;
    let plans = par_map(loads.len(), |l| {
        let eplb = eplb_layer(&loads[l], p);
        let eplb_max = max_of(&worker_loads(&loads[l], &eplb, s));
        // Refined from EPLB's own plan, not from one aligned to `current`: the search breaks ties
        // by slot index, and the target must not depend on `current`.
        let mut best = Search::new(&loads[l], &eplb, eplb.clone(), s);
        best.walk(false, &mut Vec::new(), &mut Vec::new(), |s, sc| s.best(sc));
        let best_max = best.max().min(eplb_max);
        (eplb_max, best_max, LayerPlan::new(&loads[l], &current[l], &best.cur, best_max, s))
    });
    let eplb_sum: f64 = plans.iter().map(|(e, _, _)| e).sum();
    let best_sum: f64 = plans.iter().map(|(_, b, _)| b).sum();
    let target = (best_sum * (1.0 + CLOSE_ENOUGH)).min(eplb_sum);
    let at = spend(
        &plans.iter().map(|(_, _, plan)| plan.points.as_slice()).collect::<Vec<_>>(),
        target,
        max_moves,
    );
    Ok(plans.iter().zip(at).map(|((_, _, plan), k)| plan.placement(k)).collect())
}

/// How far above the best sum of layer maxima found [`incremental`] may stop (a fraction of it):
/// closer gains are too small to be worth a weight transfer.
const CLOSE_ENOUGH: f64 = 0.005;

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

fn invalid(msg: String) -> Error {
    Error::InvalidPlacement(msg)
}

/// Checks the problem's shape and loads; returns the number of logical experts per layer.
fn check_problem(loads: &[Vec<f64>], p: &Problem) -> Result<usize> {
    for (name, value) in [
        ("workers", p.workers),
        ("slots_per_worker", p.slots_per_worker),
        ("nodes", p.nodes),
        ("groups", p.groups),
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
fn check_current(current: &[Vec<u32>], layers: usize, experts: usize, p: &Problem) -> Result<()> {
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

/// `(groups, nodes)` that EPLB plans with: `eplb.py` goes global (one group, one node) unless
/// groups split evenly over nodes; groups that do not split the experts evenly go global too.
fn policy(experts: usize, p: &Problem) -> (usize, usize) {
    if p.groups.is_multiple_of(p.nodes) && experts.is_multiple_of(p.groups) {
        (p.groups, p.nodes)
    } else {
        (1, 1)
    }
}

/// `rebalance_experts_hierarchical` of `eplb.py` for one layer (of a checked problem).
fn eplb_layer(load: &[f64], p: &Problem) -> Vec<u32> {
    let experts = load.len();
    let (groups, nodes) = policy(experts, p);
    let weight: Vec<f32> = load.iter().map(|&x| x as f32).collect();
    let group_size = experts / groups;
    let groups_per_node = groups / nodes;

    // Step 1: pack groups onto nodes. "mlog" renumbers the logical experts so that node n holds
    // the contiguous range n·E/N..(n+1)·E/N.
    let tokens_per_group: Vec<f32> = weight.chunks(group_size).map(|g| g.iter().sum()).collect();
    let (group_pack, group_rank) = balanced_packing(&tokens_per_group, nodes);
    let mut mlog_to_log = vec![0usize; experts];
    for g in 0..groups {
        let first = (group_pack[g] * groups_per_node + group_rank[g]) * group_size;
        for k in 0..group_size {
            mlog_to_log[first + k] = g * group_size + k;
        }
    }

    let (log_per_node, phy_per_node, workers_per_node) =
        (experts / nodes, p.slots() / nodes, p.workers / nodes);
    let mut out = vec![0u32; p.slots()];
    for (node, mlogs) in mlog_to_log.chunks(log_per_node).enumerate() {
        // Step 2: replicate the node's experts into its physical slots.
        let tokens: Vec<f32> = mlogs.iter().map(|&l| weight[l]).collect();
        let (phy_to_mlog, count) = replicate_experts(&tokens, phy_per_node);
        // Step 3: pack the replicas onto the node's workers; rank in pack is the slot.
        let per_replica: Vec<f32> = phy_to_mlog.iter().map(|&m| tokens[m] / count[m] as f32).collect();
        let (pack, rank) = balanced_packing(&per_replica, workers_per_node);
        for (phy, &m) in phy_to_mlog.iter().enumerate() {
            out[node * phy_per_node + pack[phy] * p.slots_per_worker + rank[phy]] = mlogs[m] as u32;
        }
    }
    out
}

/// `balanced_packing` of `eplb.py`: items by weight descending (stable, as the reference's sort
/// gives on the published vector), each into the lightest pack that still has room (the first
/// such pack on ties, as Python's `min`). Returns each item's pack and rank within it.
fn balanced_packing(weight: &[f32], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weight.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Loads are checked finite, so the partial order is total here.
    order.sort_by(|&a, &b| weight[b].partial_cmp(&weight[a]).unwrap_or(Ordering::Equal));
    let (mut pack_weight, mut items) = (vec![0f32; packs], vec![0usize; packs]);
    let (mut pack, mut rank) = (vec![0; n], vec![0; n]);
    for i in order {
        // Capacity (packs × per_pack) equals the item count, so a pack with room always exists.
        let Some(k) = (0..packs)
            .filter(|&k| items[k] < per_pack)
            .min_by(|&a, &b| pack_weight[a].partial_cmp(&pack_weight[b]).unwrap_or(Ordering::Equal))
        else {
            break;
        };
        pack[i] = k;
        rank[i] = items[k];
        pack_weight[k] += weight[i];
        items[k] += 1;
    }
    (pack, rank)
}

/// `replicate_experts` of `eplb.py`: each redundant slot goes to the expert with the largest
/// load per replica (the first on ties, as torch's `max`). Returns each physical slot's expert
/// and each expert's replica count.
fn replicate_experts(weight: &[f32], phy: usize) -> (Vec<usize>, Vec<usize>) {
    let mut phy_to_log: Vec<usize> = (0..weight.len()).collect();
    let mut count = vec![1usize; weight.len()];
    for _ in weight.len()..phy {
        let mut best = (0, f32::NEG_INFINITY);
        for (e, (&w, &c)) in weight.iter().zip(&count).enumerate() {
            let per_replica = w / c as f32;
            if per_replica > best.1 {
                best = (e, per_replica);
            }
        }
        phy_to_log.push(best.0);
        count[best.0] += 1;
    }
    (phy_to_log, count)
}

/// Tokens of each worker: each slot carries its expert's load over the expert's slot count.
/// Every caller sums in this one order, so maxima compare exactly across modes.
fn worker_loads(load: &[f64], layer: &[u32], s: usize) -> Vec<f64> {
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

fn max_of(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(0.0, f64::max)
}

fn ratio(mean: f64, max: f64) -> f64 {
    if max > 0.0 {
        mean / max
    } else {
        1.0
    }
}

/// Runs `f` on `0..n` over the machine's cores; results in index order, so threads never change
/// the output. Indices are dealt round-robin because layers differ in cost.
fn par_map<T: Send, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
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

/// `plan` relabelled onto `current`'s workers: nodes matched to nodes, then workers to workers
/// within them, each by the Hungarian algorithm on overlap (the slots a pair has in common, as
/// multisets); within a matched pair, common experts keep their slots and the rest fill the others
/// in order. Moves = P − total overlap, the fewest over all such relabellings.
fn align_layer(plan: &[u32], current: &[u32], s: usize, nodes: usize) -> Vec<u32> {
    let sorted = |layer: &[u32]| -> Vec<Vec<u32>> {
        layer
            .chunks(s)
            .map(|w| {
                let mut w = w.to_vec();
                w.sort_unstable();
                w
            })
            .collect()
    };
    let (plan_w, cur_w) = (sorted(plan), sorted(current));
    let per_node = plan_w.len() / nodes;
    let mut node_overlap = vec![vec![0i64; nodes]; nodes];
    let mut node_match = vec![vec![Vec::new(); nodes]; nodes];
    for a in 0..nodes {
        for b in 0..nodes {
            let m: Vec<Vec<i64>> = (0..per_node)
                .map(|i| {
                    (0..per_node)
                        .map(|j| overlap(&plan_w[a * per_node + i], &cur_w[b * per_node + j]))
                        .collect()
                })
                .collect();
            let assign = hungarian_max(&m);
            node_overlap[a][b] = assign.iter().enumerate().map(|(i, &j)| m[i][j]).sum();
            node_match[a][b] = assign;
        }
    }
    let mut out = vec![0u32; plan.len()];
    for (a, &b) in hungarian_max(&node_overlap).iter().enumerate() {
        for (i, &j) in node_match[a][b].iter().enumerate() {
            let (from, to) = ((a * per_node + i) * s, (b * per_node + j) * s);
            fill_worker(&plan[from..from + s], &current[to..to + s], &mut out[to..to + s]);
        }
    }
    out
}

/// Size of the multiset intersection of two sorted slices.
fn overlap(a: &[u32], b: &[u32]) -> i64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// One worker's slots: `plan`'s experts, keeping those `current` already has in place.
fn fill_worker(plan: &[u32], current: &[u32], out: &mut [u32]) {
    let mut left: Vec<Option<u32>> = plan.iter().map(|&e| Some(e)).collect();
    let mut free = Vec::new();
    for (k, &e) in current.iter().enumerate() {
        match left.iter_mut().find(|x| **x == Some(e)) {
            Some(x) => {
                *x = None;
                out[k] = e;
            }
            None => free.push(k),
        }
    }
    for (k, e) in free.into_iter().zip(left.into_iter().flatten()) {
        out[k] = e;
    }
}

/// Maximum-weight perfect matching of a square matrix (Hungarian algorithm with potentials,
/// O(n³)); returns the column of each row. Deterministic: ties go to the lowest index.
fn hungarian_max(w: &[Vec<i64>]) -> Vec<usize> {
    let n = w.len();
    let inf = i64::MAX / 4;
    // 1-based with row/column 0 as the sentinel of the augmenting-path search.
    let (mut u, mut v) = (vec![0i64; n + 1], vec![0i64; n + 1]);
    let (mut row_of, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        row_of[0] = i;
        let mut j0 = 0;
        let mut min_v = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = row_of[j0];
            let (mut delta, mut j1) = (inf, 0);
            for j in 1..=n {
                if !used[j] {
                    let cost = -w[i0 - 1][j - 1] - u[i0] - v[j];
                    if cost < min_v[j] {
                        min_v[j] = cost;
                        way[j] = j0;
                    }
                    if min_v[j] < delta {
                        delta = min_v[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[row_of[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_v[j] -= delta;
                }
            }
            j0 = j1;
            if row_of[j0] == 0 {
                break;
            }
        }
        while j0 != 0 {
            let j1 = way[j0];
            row_of[j0] = row_of[j1];
            j0 = j1;
        }
    }
    let mut col_of = vec![0; n];
    for j in 1..=n {
        if row_of[j] > 0 {
            col_of[row_of[j] - 1] = j - 1;
        }
    }
    col_of
}

/// A point a layer can be taken to: its moves from `current` and its max worker load.
#[derive(Clone, Copy, Debug)]
struct Point {
    moves: usize,
    max: f64,
    /// Which path (the local search from `current`, or the one from the aligned target), and how
    /// many of its steps to replay.
    from_target: bool,
    steps: usize,
}

/// One step of a path: the slots it changed and what they now hold.
struct Step {
    changes: Vec<(usize, u32)>,
}

/// Changes of a max below this fraction of the mean worker load are float noise, not worth a move.
const NOISE: f64 = 1e-6;

/// How far below a layer's target max (as a fraction of it) the local search from `current` goes.
const BELOW_TARGET: f64 = 0.02;

/// Everything one layer can become, cheapest first.
struct LayerPlan {
    current: Vec<u32>,
    local: Vec<Step>,
    aligned: Vec<u32>,
    /// From `aligned`: the local search's steps, then the walk back toward `current`.
    from_aligned: Vec<Step>,
    /// Points with strictly increasing moves and strictly decreasing max; the first is `current`.
    points: Vec<Point>,
}

impl LayerPlan {
    /// `target` is the layer's best placement found (EPLB's plan refined), `target_max` its max.
    fn new(load: &[f64], current: &[u32], target: &[u32], target_max: f64, s: usize) -> Self {
        // One node: the refined plan no longer keeps groups on nodes, so relabelling may mix them.
        let aligned = align_layer(target, current, s, 1);
        let mut local = Search::new(load, current, current.to_vec(), s);
        let mut refined = Search::new(load, current, aligned.clone(), s);
        // Points far below the target max only make up for layers that cannot reach theirs;
        // searching on for them costs time and rarely pays.
        let floor = target_max * (1.0 - BELOW_TARGET);
        let mut candidates = vec![
            Point { moves: 0, max: local.max(), from_target: false, steps: 0 },
            Point { moves: refined.moves, max: refined.max(), from_target: true, steps: 0 },
        ];
        let (mut local_steps, mut refined_steps) = (Vec::new(), Vec::new());
        local.walk(
            false,
            &mut local_steps,
            &mut candidates,
            |s, sc| if s.max() > floor { s.best(sc) } else { None },
        );
        // The relabelled target is searched on (ties break differently once relabelled), then
        // walked back while its max stays below the current one: the lower the max, the more of
        // its moves can be undone. This path is what takes most layers to the target with few moves.
        refined.walk(true, &mut refined_steps, &mut candidates, |s, sc| s.best(sc));
        let cap = candidates[0].max;
        refined.walk(true, &mut refined_steps, &mut candidates, |s, sc| s.best_revert(cap, sc));
        // Only a cheaper-and-better-than-all-cheaper point is worth stopping at.
        candidates
            .sort_by(|a, b| a.moves.cmp(&b.moves).then(a.max.partial_cmp(&b.max).unwrap_or(Ordering::Equal)));
        let mut points: Vec<Point> = Vec::new();
        for c in candidates {
            if points.last().is_none_or(|last| c.max < last.max - local.tol) {
                points.push(c);
            }
        }
        LayerPlan {
            current: current.to_vec(),
            local: local_steps,
            aligned,
            from_aligned: refined_steps,
            points,
        }
    }

    fn placement(&self, k: usize) -> Vec<u32> {
        let point = self.points[k];
        let (mut layer, steps) = if point.from_target {
            (self.aligned.clone(), &self.from_aligned)
        } else {
            (self.current.clone(), &self.local)
        };
        for step in &steps[..point.steps] {
            for &(slot, e) in &step.changes {
                layer[slot] = e;
            }
        }
        layer
    }
}

/// Greedy over layers: repeatedly takes the step (a later point of one layer that fits the
/// remaining budget) with the most max-load tokens saved per extra move, until the sum of layer
/// maxima is down to `target` (up to the search's tolerance) or nothing fits. Returns the chosen
/// point of each layer.
fn spend(layers: &[&[Point]], target: f64, budget: usize) -> Vec<usize> {
    #[derive(PartialEq)]
    struct Entry {
        gain_per_move: f64,
        layer: usize,
        k: usize,
    }
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Entry {
        // Best ratio first; the lower layer first on ties, for determinism.
        fn cmp(&self, other: &Self) -> Ordering {
            self.gain_per_move.total_cmp(&other.gain_per_move).then(other.layer.cmp(&self.layer))
        }
    }
    let next = |points: &[Point], at: usize, room: usize, layer: usize| -> Option<Entry> {
        let here = points[at];
        let mut best: Option<Entry> = None;
        for (k, point) in points.iter().enumerate().skip(at + 1) {
            let extra = point.moves - here.moves;
            if extra > room {
                break;
            }
            let gain_per_move = (here.max - point.max) / extra as f64;
            if best.as_ref().is_none_or(|b| gain_per_move > b.gain_per_move) {
                best = Some(Entry { gain_per_move, layer, k });
            }
        }
        best
    };

    // Summed afresh in layer order after every step, exactly as a later call sums the maxima of
    // this call's result: a result that met the target here meets it there, and does not move.
    let sum_at = |at: &[usize]| -> f64 { layers.iter().zip(at).map(|(points, &k)| points[k].max).sum() };
    let mut at = vec![0usize; layers.len()];
    let mut used = 0usize;
    let mut sum_max = sum_at(&at);
    // Within the search's tolerance counts as reached: a layer's lowest point kept may be up to
    // `NOISE` × its mean load (≤ its max) above its lowest found (see `LayerPlan::new`); twice
    // that leaves room for rounding. So with no bound every target is reached, which is what
    // keeps a second call on the result from moving.
    let goal = target * (1.0 + 2.0 * NOISE);
    let mut heap: BinaryHeap<Entry> =
        layers.iter().enumerate().filter_map(|(l, points)| next(points, 0, budget, l)).collect();
    while sum_max > goal {
        let Some(entry) = heap.pop() else { break };
        let (l, points) = (entry.layer, layers[entry.layer]);
        // The budget only shrinks, so a stale entry can only have lost value: re-rank it.
        match next(points, at[l], budget - used, l) {
            Some(fresh) if fresh.k == entry.k => {}
            Some(fresh) => {
                heap.push(fresh);
                continue;
            }
            None => continue,
        }
        let here = points[at[l]];
        // Stop at the cheapest point of this layer that reaches the target, if one does.
        let k =
            (at[l] + 1..=entry.k).find(|&k| sum_max - (here.max - points[k].max) <= goal).unwrap_or(entry.k);
        used += points[k].moves - here.moves;
        at[l] = k;
        sum_max = sum_at(&at);
        if let Some(e) = next(points, k, budget - used, l) {
            heap.push(e);
        }
    }
    at
}

/// The three kinds of local-search step around the most loaded worker `w*`.
#[derive(Clone, Copy)]
enum Action {
    /// Exchange the experts of two slots on different workers (2 moves).
    Swap(usize, usize),
    /// Slot now holds this expert (1 move): drops a replica of its old expert, adds one of this.
    Assign(usize, u32),
}

#[derive(Clone, Copy)]
struct Candidate {
    max: f64,
    moves: i64,
    sos: f64,
    action: Action,
}

impl Candidate {
    /// Lower max (beyond `tol`), then fewer moves, then lower sum of squares.
    fn beats(&self, other: &Candidate, tol: f64) -> bool {
        if (self.max - other.max).abs() > tol {
            self.max < other.max
        } else if self.moves != other.moves {
            self.moves < other.moves
        } else {
            self.sos < other.sos
        }
    }
}

/// Local search on one layer: the state of its placement and loads.
struct Search<'a> {
    load: &'a [f64],
    orig: &'a [u32],
    s: usize,
    cur: Vec<u32>,
    /// Slots of each expert, ascending.
    slots_of: Vec<Vec<usize>>,
    /// Slots differing from `orig`: a slot changed twice counts once, restored counts 0.
    moves: usize,
    /// Smaller changes of a max (tokens) are float noise, not worth a move.
    tol: f64,
    sos_tol: f64,
    // Derived from the above by `refresh` after every step.
    wl: Vec<f64>,
    /// Workers by load, heaviest first (lowest index on ties).
    order: Vec<usize>,
    /// Load of each replica of each expert, now and with one replica more.
    per_replica: Vec<f64>,
    per_replica_more: Vec<f64>,
    /// Experts on the heaviest worker.
    on_top: Vec<bool>,
}

/// Per-worker accumulators for [`Search::eval`], kept zeroed between calls.
struct Scratch {
    delta: Vec<f64>,
    seen: Vec<bool>,
}

impl<'a> Search<'a> {
    fn new(load: &'a [f64], orig: &'a [u32], cur: Vec<u32>, s: usize) -> Self {
        let mut slots_of = vec![Vec::new(); load.len()];
        for (p, &e) in cur.iter().enumerate() {
            slots_of[e as usize].push(p);
        }
        let moves = cur.iter().zip(orig).filter(|(a, b)| a != b).count();
        let mean = load.iter().sum::<f64>() / (cur.len() / s) as f64;
        let tol = NOISE * mean;
        let mut search = Search {
            load,
            orig,
            s,
            cur,
            slots_of,
            moves,
            tol,
            sos_tol: tol * mean,
            wl: Vec::new(),
            order: Vec::new(),
            per_replica: Vec::new(),
            per_replica_more: Vec::new(),
            on_top: vec![false; load.len()],
        };
        search.refresh();
        search
    }

    fn refresh(&mut self) {
        self.wl = worker_loads(self.load, &self.cur, self.s);
        self.order = (0..self.wl.len()).collect();
        let wl = &self.wl;
        self.order.sort_by(|&a, &b| wl[b].partial_cmp(&wl[a]).unwrap_or(Ordering::Equal));
        let replicas = |e: usize| self.slots_of[e].len() as f64;
        self.per_replica = (0..self.load.len()).map(|e| self.load[e] / replicas(e)).collect();
        self.per_replica_more = (0..self.load.len()).map(|e| self.load[e] / (replicas(e) + 1.0)).collect();
        self.on_top.iter_mut().for_each(|x| *x = false);
        let top = self.order[0];
        for &e in &self.cur[top * self.s..(top + 1) * self.s] {
            self.on_top[e as usize] = true;
        }
    }

    fn max(&self) -> f64 {
        max_of(&self.wl)
    }

    /// Takes `pick`'s steps until it has none, recording each with a point on path `from_target`.
    fn walk(
        &mut self,
        from_target: bool,
        steps: &mut Vec<Step>,
        points: &mut Vec<Point>,
        pick: impl Fn(&Self, &mut Scratch) -> Option<Action>,
    ) {
        let mut scratch = Scratch { delta: vec![0.0; self.wl.len()], seen: vec![false; self.wl.len()] };
        // A bound against creeping improvements; real layers converge far earlier.
        for _ in 0..4 * self.cur.len() {
            let Some(action) = pick(self, &mut scratch) else { break };
            let changes = match action {
                Action::Swap(i, j) => vec![(i, self.cur[j]), (j, self.cur[i])],
                Action::Assign(i, e) => vec![(i, e)],
            };
            for &(slot, e) in &changes {
                self.set(slot, e);
            }
            self.refresh();
            steps.push(Step { changes });
            points.push(Point { moves: self.moves, max: self.max(), from_target, steps: steps.len() });
        }
    }

    fn set(&mut self, slot: usize, e: u32) {
        let old = self.cur[slot];
        let was_moved = old != self.orig[slot];
        let now_moved = e != self.orig[slot];
        self.moves = self.moves + usize::from(now_moved) - usize::from(was_moved);
        if let Some(k) = self.slots_of[old as usize].iter().position(|&q| q == slot) {
            self.slots_of[old as usize].remove(k);
        }
        let to = &mut self.slots_of[e as usize];
        let at = to.partition_point(|&q| q < slot);
        to.insert(at, slot);
        self.cur[slot] = e;
    }

    /// Change in moves if `slot` held `e` instead of what it holds.
    fn dmoves(&self, slot: usize, e: u32) -> i64 {
        i64::from(e != self.orig[slot]) - i64::from(self.cur[slot] != self.orig[slot])
    }

    fn holds(&self, worker: usize, e: u32) -> bool {
        self.cur[worker * self.s..(worker + 1) * self.s].contains(&e)
    }

    /// New max and sum of squares of worker loads after adding `deltas` (worker, tokens);
    /// a worker may appear more than once.
    fn eval(&self, deltas: &[(usize, f64)], sos: f64, scratch: &mut Scratch) -> (f64, f64) {
        for &(w, d) in deltas {
            scratch.delta[w] += d;
        }
        let (mut max, mut sos) = (f64::NEG_INFINITY, sos);
        for &(w, _) in deltas {
            if !scratch.seen[w] {
                scratch.seen[w] = true;
                let new = self.wl[w] + scratch.delta[w];
                max = max.max(new);
                sos += new * new - self.wl[w] * self.wl[w];
            }
        }
        let rest = self.order.iter().find(|&&w| !scratch.seen[w]).map_or(0.0, |&w| self.wl[w]);
        for &(w, _) in deltas {
            scratch.delta[w] = 0.0;
            scratch.seen[w] = false;
        }
        (max.max(rest), sos)
    }

    /// Deltas of re-assigning `slot` from its expert (which keeps another replica) to `e`: the
    /// old expert's other replicas get heavier, `e`'s lighter, the slot's worker changes.
    fn reassign_deltas(&self, slot: usize, e: u32, deltas: &mut Vec<(usize, f64)>) {
        let (s, old) = (self.s, self.cur[slot] as usize);
        let inc = self.load[old] / (self.slots_of[old].len() - 1) as f64 - self.per_replica[old];
        let dec = self.per_replica_more[e as usize] - self.per_replica[e as usize];
        deltas.clear();
        deltas.extend(self.slots_of[old].iter().filter(|&&q| q != slot).map(|&q| (q / s, inc)));
        deltas.push((slot / s, self.per_replica_more[e as usize] - self.per_replica[old]));
        deltas.extend(self.slots_of[e as usize].iter().map(|&q| (q / s, dec)));
    }

    /// The best improving step: lowest new max, then fewest moves, then lowest sum of squares.
    /// Improving means the max drops by more than `tol`, or stays and the sum of squares drops.
    /// No step leaves an expert without a slot or puts a second replica of one on a worker.
    fn best(&self, scratch: &mut Scratch) -> Option<Action> {
        let (s, pr, pr_more) = (self.s, &self.per_replica, &self.per_replica_more);
        let ws = self.order[0];
        let top = self.wl[ws];
        let sos0: f64 = self.wl.iter().map(|x| x * x).sum();
        let mut best: Option<Candidate> = None;
        // Whether a step whose max is at least `lb` and that costs `moves` cannot beat the best so
        // far; checked before the costlier full evaluation.
        let skip = |best: &Option<Candidate>, lb: f64, moves: i64| match best {
            None => lb > top,
            Some(b) => lb > b.max + self.tol || (lb > b.max - self.tol && moves > b.moves),
        };
        let consider = |best: &mut Option<Candidate>, (max, sos): (f64, f64), moves: i64, action| {
            let improves = max < top - self.tol || (max <= top && sos < sos0 - self.sos_tol);
            let new = Candidate { max, moves, sos, action };
            if improves && best.as_ref().is_none_or(|b| new.beats(b, self.tol)) {
                *best = Some(new);
            }
        };
        let mut deltas = Vec::new();
        let top_slots = ws * s..(ws + 1) * s;
        for v in (0..self.wl.len()).filter(|&v| v != ws) {
            // Heaviest worker other than w* and v: a swap between the two leaves it as it is.
            let rest = self.order.iter().find(|&&w| w != ws && w != v).map_or(0.0, |&w| self.wl[w]);
            if skip(&best, rest, i64::MIN) {
                continue;
            }
            for j in v * s..(v + 1) * s {
                let b = self.cur[j];
                // (a) swap a heavier slot i of w* with slot j: only w* and v change.
                for i in top_slots.clone() {
                    let a = self.cur[i];
                    let d = pr[a as usize] - pr[b as usize];
                    if d <= self.tol {
                        continue;
                    }
                    let (new_ws, new_v) = (top - d, self.wl[v] + d);
                    let moves = self.dmoves(i, b) + self.dmoves(j, a);
                    if skip(&best, new_ws.max(new_v).max(rest), moves)
                        || self.on_top[b as usize]
                        || self.holds(v, a)
                    {
                        continue;
                    }
                    let sos = sos0 + new_ws * new_ws - top * top + new_v * new_v - self.wl[v] * self.wl[v];
                    consider(&mut best, (new_ws.max(new_v).max(rest), sos), moves, Action::Swap(i, j));
                }
                // (c) slot j drops a spare replica of b for one more replica of an expert a on w*.
                let cb = self.slots_of[b as usize].len();
                if cb > 1 {
                    let inc = self.load[b as usize] / (cb - 1) as f64 - pr[b as usize];
                    let b_max = self.slots_of[b as usize]
                        .iter()
                        .filter(|&&q| q != j)
                        .map(|&q| self.wl[q / s] + inc)
                        .fold(0.0, f64::max);
                    for i in top_slots.clone() {
                        let a = self.cur[i];
                        if a == b || self.cur[ws * s..i].contains(&a) {
                            continue;
                        }
                        let dec = pr[a as usize] - pr_more[a as usize];
                        let moves = self.dmoves(j, a);
                        let lb =
                            (self.wl[v] - pr[b as usize] + pr_more[a as usize]).max(top - dec).max(b_max);
                        if skip(&best, lb, moves) || self.holds(v, a) {
                            continue;
                        }
                        self.reassign_deltas(j, a, &mut deltas);
                        consider(&mut best, self.eval(&deltas, sos0, scratch), moves, Action::Assign(j, a));
                    }
                }
            }
        }
        // (b) a slot i of w* drops its replica of a (whose other replicas get heavier) for one of b.
        for i in top_slots {
            let a = self.cur[i] as usize;
            let ca = self.slots_of[a].len();
            if ca < 2 {
                continue;
            }
            let inc = self.load[a] / (ca - 1) as f64 - pr[a];
            let a_max = self.slots_of[a]
                .iter()
                .filter(|&&q| q != i)
                .map(|&q| self.wl[q / s] + inc)
                .fold(0.0, f64::max);
            for b in 0..self.load.len() as u32 {
                let yb = pr_more[b as usize];
                let moves = self.dmoves(i, b);
                if yb - pr[a] >= -self.tol
                    || skip(&best, (top - pr[a] + yb).max(a_max), moves)
                    || self.on_top[b as usize]
                {
                    continue;
                }
                self.reassign_deltas(i, b, &mut deltas);
                consider(&mut best, self.eval(&deltas, sos0, scratch), moves, Action::Assign(i, b));
            }
        }
        best.map(|b| b.action)
    }

    /// The best step back toward `orig` whose max stays within `cap`: a moved slot gets its
    /// original expert back, alone (if its expert keeps another slot) or by swapping with a slot
    /// holding that expert. Lowest new max first, then most moves saved, then sum of squares.
    fn best_revert(&self, cap: f64, scratch: &mut Scratch) -> Option<Action> {
        let s = self.s;
        let sos0: f64 = self.wl.iter().map(|x| x * x).sum();
        let mut best: Option<Candidate> = None;
        let mut deltas = Vec::new();
        let mut consider = |(max, sos): (f64, f64), moves: i64, action| {
            let new = Candidate { max, moves, sos, action };
            if max <= cap && best.as_ref().is_none_or(|b| new.beats(b, self.tol)) {
                best = Some(new);
            }
        };
        for p in (0..self.cur.len()).filter(|&p| self.cur[p] != self.orig[p]) {
            let (x, c, w) = (self.cur[p], self.orig[p], p / s);
            if self.holds(w, c) {
                continue;
            }
            if self.slots_of[x as usize].len() > 1 {
                self.reassign_deltas(p, c, &mut deltas);
                consider(self.eval(&deltas, sos0, scratch), -1, Action::Assign(p, c));
            }
            let d = self.per_replica[c as usize] - self.per_replica[x as usize];
            for &q in &self.slots_of[c as usize] {
                let v = q / s;
                let moves = self.dmoves(p, c) + self.dmoves(q, x);
                if v == w || moves >= 0 || self.holds(v, x) {
                    continue;
                }
                consider(self.eval(&[(w, d), (v, -d)], sos0, scratch), moves, Action::Swap(p, q));
            }
        }
        best.map(|b| b.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64, for reproducible random problems without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn shuffle<T>(&mut self, xs: &mut [T]) {
            for i in (1..xs.len()).rev() {
                xs.swap(i, self.below(i + 1));
            }
        }
    }

    /// A random shape: hierarchical (groups split over nodes) or global, small enough for a
    /// debug build.
    fn shape(rng: &mut Rng, hierarchical: bool) -> (Problem, usize, usize) {
        let nodes = [1, 2, 4][rng.below(3)];
        let workers = nodes * (1 + rng.below(3));
        let groups = if hierarchical { nodes * (1 + rng.below(2)) } else { [3, 5][rng.below(2)] };
        let experts = groups * (1 + rng.below(64 / groups));
        let slots_per_worker = experts.div_ceil(workers) + rng.below(3);
        let layers = 1 + rng.below(6);
        (Problem { workers, nodes, groups, slots_per_worker }, experts, layers)
    }

    /// Zipf-like skew over a random permutation: a few hot experts, a long cold tail, some zeros.
    fn skewed(rng: &mut Rng, experts: usize, layers: usize) -> Vec<Vec<f64>> {
        (0..layers)
            .map(|_| {
                let mut rank: Vec<usize> = (0..experts).collect();
                rng.shuffle(&mut rank);
                let skew = 0.5 + (rng.below(11) as f64) / 10.0;
                rank.iter()
                    .map(|&r| {
                        (5000.0 / ((r + 1) as f64).powf(skew)).floor() * (rng.below(8) != 0) as u8 as f64
                    })
                    .collect()
            })
            .collect()
    }

    /// Every expert once, the spare slots random, all shuffled.
    fn random_placement(rng: &mut Rng, experts: usize, p: &Problem) -> Vec<u32> {
        let mut layer: Vec<u32> =
            (0..p.slots()).map(|q| if q < experts { q } else { rng.below(experts) } as u32).collect();
        rng.shuffle(&mut layer);
        layer
    }

    fn assert_valid(plan: &[Vec<u32>], experts: usize, p: &Problem) {
        for layer in plan {
            assert_eq!(layer.len(), p.slots());
            let mut count = vec![0; experts];
            for &e in layer {
                count[e as usize] += 1;
            }
            assert!(count.iter().all(|&c| c >= 1), "an expert has no slot: {layer:?}");
        }
    }

    #[test]
    fn eplb_reproduces_the_published_vector() {
        let loads = vec![
            vec![90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0],
            vec![20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0],
        ];
        let p = Problem { workers: 8, nodes: 2, groups: 4, slots_per_worker: 2 };
        let plan = eplb(&loads, &p).unwrap();
        assert_eq!(
            plan,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
            ]
        );
    }

    #[test]
    fn eplb_plans_are_valid_and_keep_groups_on_their_node() {
        let mut rng = Rng(1);
        for case in 0..40 {
            let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
            let loads = skewed(&mut rng, experts, layers);
            let plan = eplb(&loads, &p).unwrap();
            assert_eq!(plan.len(), layers);
            assert_valid(&plan, experts, &p);
            if policy(experts, &p).1 > 1 {
                let (group_size, node_slots) = (experts / p.groups, p.slots() / p.nodes);
                for layer in &plan {
                    let mut node_of_group = vec![None; p.groups];
                    for (q, &e) in layer.iter().enumerate() {
                        let node = node_of_group[e as usize / group_size].get_or_insert(q / node_slots);
                        assert_eq!(*node, q / node_slots, "group of expert {e} spans nodes: {p:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn eplb_aligned_keeps_eplb_balance_and_undoes_a_relabelling() {
        let mut rng = Rng(2);
        for case in 0..30 {
            let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
            let loads = skewed(&mut rng, experts, layers);
            let plan = eplb(&loads, &p).unwrap();
            let current: Vec<Vec<u32>> =
                (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
            let aligned = eplb_aligned(&loads, &current, &p).unwrap();
            assert_valid(&aligned, experts, &p);
            let (b_plan, b_aligned) =
                (balance(&loads, &plan, p.slots_per_worker), balance(&loads, &aligned, p.slots_per_worker));
            for (x, y) in b_plan.per_layer.iter().zip(&b_aligned.per_layer) {
                assert!((x - y).abs() < 1e-9, "{x} vs {y}");
            }
            assert!(moved(&current, &aligned) <= moved(&current, &plan));

            // EPLB's plan with nodes, workers within nodes and slots within workers shuffled.
            let per_node = p.workers / p.nodes;
            let mut nodes: Vec<usize> = (0..p.nodes).collect();
            rng.shuffle(&mut nodes);
            let mut workers: Vec<usize> = Vec::new();
            for &n in &nodes {
                let mut within: Vec<usize> = (n * per_node..(n + 1) * per_node).collect();
                rng.shuffle(&mut within);
                workers.extend(within);
            }
            let relabelled: Vec<Vec<u32>> = plan
                .iter()
                .map(|layer| {
                    workers
                        .iter()
                        .flat_map(|&w| {
                            let mut slots =
                                layer[w * p.slots_per_worker..(w + 1) * p.slots_per_worker].to_vec();
                            rng.shuffle(&mut slots);
                            slots
                        })
                        .collect()
                })
                .collect();
            assert_eq!(eplb_aligned(&loads, &relabelled, &p).unwrap(), relabelled);
        }
    }

    #[test]
    fn incremental_stays_within_budget_and_never_worsens_a_layer() {
        let mut rng = Rng(3);
        for case in 0..16 {
            let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
            let loads = skewed(&mut rng, experts, layers);
            let current: Vec<Vec<u32>> =
                (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
            let before = balance(&loads, &current, p.slots_per_worker);
            for budget in [0, 1, 2, 5, 20, usize::MAX] {
                let plan = incremental(&loads, &current, &p, budget).unwrap();
                assert_valid(&plan, experts, &p);
                assert!(moved(&current, &plan) <= budget, "{} moves over {budget}", moved(&current, &plan));
                if budget == 0 {
                    assert_eq!(plan, current);
                }
                let after = balance(&loads, &plan, p.slots_per_worker);
                for (b, a) in before.per_layer.iter().zip(&after.per_layer) {
                    assert!(a >= &(b - 1e-12), "layer got worse: {b} -> {a}");
                }
                assert_eq!(plan, incremental(&loads, &current, &p, budget).unwrap(), "not deterministic");
            }
        }
    }

    #[test]
    fn incremental_unbounded_beats_eplb_balance() {
        let mut rng = Rng(4);
        let (mut ours_sum, mut theirs_sum, mut better) = (0.0, 0.0, 0);
        let cases = 16;
        for case in 0..cases {
            let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
            let loads = skewed(&mut rng, experts, layers);
            let current: Vec<Vec<u32>> =
                (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
            let plan = incremental(&loads, &current, &p, usize::MAX).unwrap();
            let ours = balance(&loads, &plan, p.slots_per_worker).overall;
            let theirs = balance(&loads, &eplb(&loads, &p).unwrap(), p.slots_per_worker).overall;
            // Never below EPLB's, up to the search's tolerance.
            assert!(ours >= theirs * (1.0 - 2.0 * NOISE), "case {case}: {ours} < {theirs}");
            ours_sum += ours;
            theirs_sum += theirs;
            better += usize::from(ours > theirs * (1.0 + CLOSE_ENOUGH));
        }
        println!(
            "summed balances over {cases} cases, incremental unbounded / eplb: {:.4}; {better} cases \
             better by over {CLOSE_ENOUGH}",
            ours_sum / theirs_sum
        );
        // EPLB's greedy packing leaves balance that the refinement finds on skewed loads with
        // spare slots (small problems are often already optimal): on these seeded cases the mean
        // balances sum 9% higher and 6 cases gain over 0.5%, so the bars below are margins, not coin tosses.
        assert!(ours_sum > 1.02 * theirs_sum, "{ours_sum} vs eplb {theirs_sum}");
        assert!(better * 4 >= cases, "only {better} of {cases} cases better than eplb");
    }

    #[test]
    fn incremental_on_its_own_unbounded_output_moves_nothing() {
        let mut rng = Rng(5);
        for case in 0..16 {
            let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
            let loads = skewed(&mut rng, experts, layers);
            let random: Vec<Vec<u32>> =
                (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
            // From a random placement and from EPLB's plan, which is no longer a fixed point.
            for current in [random, eplb(&loads, &p).unwrap()] {
                let once = incremental(&loads, &current, &p, usize::MAX).unwrap();
                let twice = incremental(&loads, &once, &p, usize::MAX).unwrap();
                assert_eq!(moved(&once, &twice), 0, "case {case}: {p:?}");
            }
        }
    }

    #[test]
    fn balance_of_a_hand_computed_placement() {
        // Layer 0: expert 0 (6 tokens) on both workers, 3 each: worker 0 = 3 + 2, worker 1 = 3 + 4.
        // Layer 1: every worker 1 token.
        let loads = vec![vec![6.0, 2.0, 4.0], vec![1.0, 1.0]];
        let placement = vec![vec![0, 1, 0, 2], vec![0, 1, 1, 0]];
        let b = balance(&loads, &placement, 2);
        assert_eq!(b.per_layer, vec![6.0 / 7.0, 1.0]);
        assert_eq!(b.overall, (6.0 + 1.0) / (7.0 + 1.0));
        assert_eq!(balance(&[vec![0.0, 0.0]], &[vec![0, 1]], 1).overall, 1.0);
    }

    #[test]
    fn moved_counts_changed_slots() {
        let from = vec![vec![0, 1, 2, 0], vec![1, 0, 1, 0]];
        let to = vec![vec![0, 2, 1, 0], vec![1, 0, 1, 0]];
        assert_eq!(moved(&from, &to), 2);
        assert_eq!(moved(&from, &from), 0);
        assert_eq!(moved(&from[..1], &to), 2 + 4);
    }

    #[test]
    fn invalid_inputs_say_what_to_change() {
        let p = Problem { workers: 2, nodes: 1, groups: 1, slots_per_worker: 2 };
        let loads = vec![vec![1.0, 2.0, 3.0]];
        let current = vec![vec![0, 1, 2, 0]];
        let msg = |r: Result<Vec<Vec<u32>>>| match r {
            Err(Error::InvalidPlacement(m)) => m,
            Ok(plan) => panic!("accepted: {plan:?}"),
        };
        for (field, bad) in [
            ("workers is 0", Problem { workers: 0, ..p }),
            ("slots_per_worker is 0", Problem { slots_per_worker: 0, ..p }),
            ("nodes is 0", Problem { nodes: 0, ..p }),
            ("groups is 0", Problem { groups: 0, ..p }),
            ("workers (2) is not a multiple of nodes (4)", Problem { nodes: 4, ..p }),
            ("fewer than experts (3): add workers or slots_per_worker", Problem { workers: 1, ..p }),
        ] {
            assert!(msg(eplb(&loads, &bad)).contains(field), "{field}");
            assert!(msg(incremental(&loads, &current, &bad, 4)).contains(field), "{field}");
        }
        assert!(
            msg(eplb(&[vec![1.0, 2.0], vec![1.0]], &p)).contains("layer 1 have 1 experts but layer 0 has 2")
        );
        assert!(msg(eplb(&[vec![1.0, -2.0]], &p))
            .contains("expert 1 in layer 0 is -2: loads must be finite, non-negative"));
        assert!(msg(eplb(&[vec![f64::NAN, 2.0]], &p)).contains("expert 0 in layer 0 is NaN"));
        for (what, bad) in [
            ("current has 2 layers but loads have 1", vec![vec![0, 1, 2, 0], vec![0, 1, 2, 0]]),
            ("current layer 0 has 3 slots but workers × slots_per_worker is 4", vec![vec![0, 1, 2]]),
            ("slot 3 holds expert id 3, but there are 3 experts: use ids below 3", vec![vec![0, 1, 2, 3]]),
            ("current layer 0 gives expert 2 no slot", vec![vec![0, 1, 1, 0]]),
        ] {
            assert!(msg(incremental(&loads, &bad, &p, 4)).contains(what), "{what}");
            assert!(msg(eplb_aligned(&loads, &bad, &p)).contains(what), "{what}");
        }
    }
}
