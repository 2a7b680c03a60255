//! The experts this worker holds and the tokens each has processed.
//!
//! Invariant: `counts[layer][expert]` only grows, and only for experts held here.

use crate::{Error, Result};
use kubemoe_api::placement::contiguous_experts;
use kubemoe_kernels::dtype::{f32_from_le, f32_to_le};
use kubemoe_model::layers::{load_expert, run_experts, Mlp};
use kubemoe_model::{source, Config};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per packed route: u32 row, u32 logical expert, f32 weight.
pub const ROUTE_BYTES: usize = 12;

pub struct ExpertStore {
    pub model: String,
    pub config: Config,
    pub rank: usize,
    pub world_size: usize,
    experts: BTreeMap<(usize, usize), Mlp>,
    counts: BTreeMap<usize, Vec<AtomicU64>>,
}

impl ExpertStore {
    /// Loads rank `rank`'s contiguous share of every MoE layer's experts from `model`
    /// (a directory or `builtin:<preset>`), reading no other expert's bytes.
    pub fn load(model: &str, rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::Invalid(format!("rank {rank} outside world size {world_size}")));
        }
        let (config, _) = source::open_tensors(model, &|_| false)?;
        let mine = contiguous_experts(rank, config.n_routed_experts, world_size);
        let wanted = |name: &str| {
            let parts: Vec<&str> = name.split('.').collect();
            parts.len() > 5
                && parts[4] == "experts"
                && parts[5].parse::<usize>().is_ok_and(|e| mine.contains(&e))
                && parts[2].parse::<usize>().is_ok_and(|l| l < config.num_hidden_layers)
        };
        let (config, src) = source::open_tensors(model, &wanted)?;
        let mut experts = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for layer in config.moe_layers() {
            for &e in &mine {
                experts.insert((layer, e), load_expert(src.as_ref(), &config, layer, e)?);
            }
            counts.insert(layer, (0..config.n_routed_experts).map(|_| AtomicU64::new(0)).collect());
        }
        Ok(Self { model: model.into(), config, rank, world_size, experts, counts })
    }

    /// Runs one dispatch: `activations` [tokens, hidden] f32 and packed `routes`; returns the
    /// [tokens, hidden] f32 partial sums.
    pub fn dispatch(
        &self,
        layer: usize,
        tokens: usize,
        activations: &[u8],
        routes: &[u8],
    ) -> Result<Vec<u8>> {
        let hidden = self.config.hidden_size;
        if activations.len() != tokens * hidden * 4 {
            return Err(Error::Invalid(format!(
                "activations hold {} bytes, {tokens} tokens of hidden size {hidden} need {}",
                activations.len(),
                tokens * hidden * 4
            )));
        }
        if !routes.len().is_multiple_of(ROUTE_BYTES) {
            return Err(Error::Invalid(format!("routes hold {} bytes, not 12-byte records", routes.len())));
        }
        let counts = self
            .counts
            .get(&layer)
            .ok_or_else(|| Error::Invalid(format!("layer {layer} is not an MoE layer of {}", self.model)))?;
        let mut decoded = Vec::with_capacity(routes.len() / ROUTE_BYTES);
        for r in routes.chunks_exact(ROUTE_BYTES) {
            let word = |i: usize| [r[i], r[i + 1], r[i + 2], r[i + 3]];
            let (row, expert) = (u32::from_le_bytes(word(0)) as usize, u32::from_le_bytes(word(4)) as usize);
            if row >= tokens || expert >= counts.len() {
                return Err(Error::Invalid(format!("route of row {row} to expert {expert} is out of range")));
            }
            decoded.push((row, expert, f32::from_le_bytes(word(8))));
        }
        let x = f32_from_le(activations);
        let out =
            run_experts(|e| self.experts.get(&(layer, e)), layer, &self.config, &x, decoded.iter().copied())?;
        for (_, e, _) in &decoded {
            counts[*e].fetch_add(1, Ordering::Relaxed);
        }
        Ok(f32_to_le(&out))
    }

    /// Tokens per logical expert, per MoE layer.
    pub fn stats(&self) -> Vec<(usize, Vec<u64>)> {
        self.counts.iter().map(|(l, c)| (*l, c.iter().map(|a| a.load(Ordering::Relaxed)).collect())).collect()
    }

    /// The experts held, per MoE layer.
    pub fn held(&self) -> Vec<(usize, Vec<usize>)> {
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (l, e) in self.experts.keys() {
            by_layer.entry(*l).or_default().push(*e);
        }
        by_layer.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubemoe_model::layers::FeedForward;
    use kubemoe_model::Experts;

    fn routes(r: &[(u32, u32, f32)]) -> Vec<u8> {
        r.iter().flat_map(|(a, b, w)| [a.to_le_bytes(), b.to_le_bytes(), w.to_le_bytes()].concat()).collect()
    }

    #[test]
    fn partial_sums_equal_the_single_process_experts_and_counts_grow() {
        let store = ExpertStore::load("builtin:tiny", 1, 2).unwrap();
        assert_eq!(store.held(), vec![(1, (8..16).collect()), (2, (8..16).collect())]);
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let h = model.config.hidden_size;
        let x: Vec<f32> = (0..2 * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let r = [(0, 9, 0.5), (0, 12, 0.25), (1, 9, 1.5)];
        let out = f32_from_le(&store.dispatch(1, 2, &f32_to_le(&x), &routes(&r)).unwrap());
        let FeedForward::Moe(moe) = &model.layers[1].mlp else { panic!() };
        let want = run_experts(
            |e| moe.experts[e].as_ref(),
            1,
            &model.config,
            &x,
            r.iter().map(|(a, b, w)| (*a as usize, *b as usize, *w)),
        )
        .unwrap();
        assert_eq!(out, want);
        let stats = store.stats();
        assert_eq!(stats[0].1[9], 2);
        assert_eq!(stats[0].1[12], 1);
    }

    #[test]
    fn bad_dispatches_are_refused() {
        let store = ExpertStore::load("builtin:tiny", 0, 2).unwrap();
        let x = f32_to_le(&[0.0; 64]);
        let err = store.dispatch(1, 1, &x, &routes(&[(0, 9, 1.0)])).unwrap_err();
        assert!(tonic::Status::from(err).message().to_string().contains("expert 9"));
        assert!(store.dispatch(0, 1, &x, &routes(&[(0, 1, 1.0)])).is_err());
        assert!(store.dispatch(1, 2, &x, &[]).is_err());
        assert!(store.dispatch(1, 1, &x, &routes(&[(3, 1, 1.0)])).is_err());
        assert!(ExpertStore::load("builtin:tiny", 2, 2).is_err());
    }
}
