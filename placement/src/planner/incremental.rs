//! The incremental planner: per layer, the paths a move budget can take it along, and the greedy
//! that spends the budget over all layers.

use super::eplb::eplb_layer;
use super::matching::align_layer;
use super::search::{Point, Search, Step, NOISE};
use super::{check_current, check_problem, max_of, par_map, spread, worker_loads, Problem};
use crate::Result;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

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
    // The moves that put experts back on `min_replicas` workers come on top of the budget.
    plans
        .iter()
        .zip(at)
        .zip(loads)
        .map(|(((_, _, plan), k), load)| spread(plan.placement(k), load, p))
        .collect()
}

/// How far above the best sum of layer maxima found [`incremental`] may stop (a fraction of it):
/// closer gains are too small to be worth a weight transfer.
pub(super) const CLOSE_ENOUGH: f64 = 0.005;

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
