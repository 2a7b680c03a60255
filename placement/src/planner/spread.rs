//! Spreading copies over workers: every logical expert on at least `m` distinct workers
//! (`experts.minReplicas`), so that any `m − 1` workers may stop with every expert still served
//! by a live copy (routers route around dead workers). The planners balance load alone; their
//! output is repaired here, one change at a time, each the change that keeps the layer's max
//! worker load lowest (then the one with fewer changed slots, then the lowest slots).
//!
//! A change gives a deficient expert `e` a slot `b` on a worker that holds none of it: the slot
//! re-assigned, or swapped with a duplicate copy of `e` (slot counts, hence replica loads,
//! stay), or, when every such slot holds the last copy its expert has on its worker, that copy
//! moved on to a slot `c` of a third worker whose expert has one to spare. No expert ends below
//! `min(its workers before, m)`, so Σₑ min(workers of e, m) grows by one per change and the
//! repair ends after at most `E·m` changes. A layer it cannot repair is refused.

use super::{invalid, max_of, worker_loads, Problem};
use crate::Result;

/// `layer` (one MoE layer's slots of a checked problem `p`, loads per logical expert `load`)
/// repaired so that every expert is on at least `p.min_replicas` distinct workers.
pub(crate) fn spread(mut layer: Vec<u32>, load: &[f64], p: &Problem) -> Result<Vec<u32>> {
    let (s, m) = (p.slots_per_worker, p.min_replicas);
    if m <= 1 {
        // Every planner places every expert somewhere.
        return Ok(layer);
    }
    while let Some(change) = next_change(&layer, load, s, m)? {
        for (slot, expert) in change {
            layer[slot] = expert;
        }
    }
    Ok(layer)
}

/// The best change towards the spread (slot, new expert), or `None` when there is none to make.
fn next_change(layer: &[u32], load: &[f64], s: usize, m: usize) -> Result<Option<Vec<(usize, u32)>>> {
    let workers = layer.len() / s;
    // on[x][w]: copies of expert x on worker w.
    let mut on = vec![vec![0u32; workers]; load.len()];
    for (q, &x) in layer.iter().enumerate() {
        on[x as usize][q / s] += 1;
    }
    let distinct: Vec<usize> = on.iter().map(|w| w.iter().filter(|&&c| c > 0).count()).collect();
    let Some(e) = (0..load.len()).find(|&x| distinct[x] < m) else { return Ok(None) };
    // Whether expert `x`, losing its copy on worker `lose` and gaining one on `gain`, keeps
    // min(its distinct workers, m) and at least one copy.
    let keeps = |x: usize, lose: usize, gain: Option<usize>| {
        let after = distinct[x] - usize::from(on[x][lose] == 1)
            + gain.map_or(0, |g| usize::from(on[x][g] == 0 && g != lose));
        after >= distinct[x].min(m) && after > 0
    };
    let duplicate = (0..layer.len()).find(|&q| layer[q] as usize == e && on[e][q / s] >= 2);
    let targets: Vec<usize> = (0..layer.len()).filter(|&b| on[e][b / s] == 0).collect();
    let mut changes: Vec<Vec<(usize, u32)>> = Vec::new();
    for &b in &targets {
        let y = layer[b] as usize;
        if keeps(y, b / s, None) {
            changes.push(vec![(b, e as u32)]);
        }
        if let Some(a) = duplicate.filter(|a| keeps(y, b / s, Some(a / s))) {
            changes.push(vec![(b, e as u32), (a, y as u32)]);
        }
    }
    if changes.is_empty() {
        for &b in &targets {
            let y = layer[b] as usize;
            for c in (0..layer.len()).filter(|&c| c / s != b / s && on[y][c / s] == 0) {
                let z = layer[c] as usize;
                if z != e && keeps(z, c / s, None) {
                    changes.push(vec![(b, e as u32), (c, y as u32)]);
                }
            }
        }
    }
    let cost = |change: &Vec<(usize, u32)>| {
        let mut next = layer.to_vec();
        change.iter().for_each(|&(q, x)| next[q] = x);
        (max_of(&worker_loads(load, &next, s)), change.len())
    };
    let best = changes
        .into_iter()
        .map(|c| (cost(&c), c))
        .min_by(|(a, ca), (b, cb)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then_with(|| ca.cmp(cb)));
    match best {
        Some((_, change)) => Ok(Some(change)),
        None => Err(invalid(format!(
            "cannot put expert {e} on {m} distinct workers: no slot it could take leaves the other \
             experts spread"
        ))),
    }
}
