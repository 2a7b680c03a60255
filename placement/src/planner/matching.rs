//! Relabelling a plan onto the current workers so that as few slots as possible change: the
//! Hungarian algorithm (Kuhn 1955, Munkres 1957) on the overlap of workers' expert multisets.

use std::cmp::Ordering;

/// `plan` relabelled onto `current`'s workers: nodes matched to nodes, then workers to workers
/// within them, each by the Hungarian algorithm on overlap (the slots a pair has in common, as
/// multisets); within a matched pair, common experts keep their slots and the rest fill the others
/// in order. Moves = P − total overlap, the fewest over all such relabellings.
pub(super) fn align_layer(plan: &[u32], current: &[u32], s: usize, nodes: usize) -> Vec<u32> {
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
