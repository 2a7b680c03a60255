//! DeepSeek's Expert Parallelism Load Balancer, `rebalance_experts` of `eplb.py` in
//! <https://github.com/deepseek-ai/EPLB>, step for step, in `f32` like the reference.

use super::matching::align_layer;
use super::{check_current, check_problem, spread, Problem};
use crate::Result;
use std::cmp::Ordering;

/// Full mode: DeepSeek's EPLB, bit-for-bit on the published vector.
///
/// Hierarchical (groups packed onto nodes, replicas made and packed within each node) when
/// `groups % nodes == 0` and the experts split evenly into groups; otherwise global, as
/// `eplb.py` does, with one group and one node.
pub fn eplb(loads: &[Vec<f64>], p: &Problem) -> Result<Vec<Vec<u32>>> {
    check_problem(loads, p)?;
    // EPLB's packing may put two replicas of an expert on one worker: spread them.
    loads.iter().map(|load| spread(eplb_layer(load, p), load, p)).collect()
}

/// [`eplb`]'s plan with its workers relabelled onto `current`'s (and slots reordered within each
/// worker) so that as few slots as possible change; worker loads, hence balance, are EPLB's.
/// Relabelling keeps nodes whole when EPLB planned per node, so its groups stay on one node.
pub fn eplb_aligned(loads: &[Vec<f64>], current: &[Vec<u32>], p: &Problem) -> Result<Vec<Vec<u32>>> {
    let experts = check_problem(loads, p)?;
    check_current(current, loads.len(), experts, p)?;
    let nodes = policy(experts, p).1;
    loads
        .iter()
        .zip(current)
        .map(|(load, cur)| {
            let planned = spread(eplb_layer(load, p), load, p)?;
            Ok(align_layer(&planned, cur, p.slots_per_worker, nodes))
        })
        .collect()
}

/// `(groups, nodes)` that EPLB plans with: `eplb.py` goes global (one group, one node) unless
/// groups split evenly over nodes; groups that do not split the experts evenly go global too.
pub(super) fn policy(experts: usize, p: &Problem) -> (usize, usize) {
    if p.groups.is_multiple_of(p.nodes) && experts.is_multiple_of(p.groups) {
        (p.groups, p.nodes)
    } else {
        (1, 1)
    }
}

/// `rebalance_experts_hierarchical` of `eplb.py` for one layer (of a checked problem).
pub(super) fn eplb_layer(load: &[f64], p: &Problem) -> Vec<u32> {
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
