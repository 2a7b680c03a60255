//! The static placement every process can compute alone: the routed experts of each MoE
//! layer split into `world_size` contiguous blocks, block `r` on worker rank `r`.
//!
//! Invariant: every expert has exactly one worker, and block sizes differ by at most one.

/// The worker rank of `expert` among `n_experts` split over `world_size` workers.
pub fn contiguous_owner(expert: usize, n_experts: usize, world_size: usize) -> usize {
    expert * world_size / n_experts.max(1)
}

/// The experts worker `rank` holds.
pub fn contiguous_experts(rank: usize, n_experts: usize, world_size: usize) -> Vec<usize> {
    (0..n_experts).filter(|e| contiguous_owner(*e, n_experts, world_size) == rank).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_expert_once_and_balance() {
        for (e, w) in [(16, 1), (16, 2), (16, 4), (64, 3), (256, 32), (5, 4)] {
            let blocks: Vec<Vec<usize>> = (0..w).map(|r| contiguous_experts(r, e, w)).collect();
            let all: Vec<usize> = blocks.concat();
            assert_eq!(all, (0..e).collect::<Vec<_>>());
            let (min, max) =
                (blocks.iter().map(Vec::len).min().unwrap(), blocks.iter().map(Vec::len).max().unwrap());
            assert!(max - min <= 1, "{e} over {w}: {min}..{max}");
        }
    }
}
