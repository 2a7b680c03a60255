//! The expert placement: which logical expert each physical slot of every MoE layer holds, at an
//! epoch. It is what the `<name>-placement` ConfigMap stores (as JSON), what pods start from
//! (`--placement`), and what a live migration moves between (protobuf `kubemoe.expert.v1.Plan`,
//! converted in `kubemoe-api`).
//!
//! Physical slot `p` of a layer lives on worker `p / slotsPerWorker`. Invariants of a
//! [`PlacementPlan::validate`]d plan: every layer has `workers × slotsPerWorker` slots, every
//! slot holds an expert below `logicalExperts`, and every logical expert has at least one slot.
//! A replicated expert's tokens are split among the workers holding it (the router picks the
//! least loaded per token), so the placement never changes what a token computes.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Key of the placement in the ConfigMap's data.
pub const KEY: &str = "placement.json";

/// The largest epoch a plan may carry: 2^53 − 1, the largest integer every JSON reader holds
/// exactly. Epochs count placements, so use never reaches it; a forged plan near `u64::MAX`
/// would make the next epoch wrap.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

/// The most workers a plan may name: routers keep a connection per rank, so a forged plan must
/// not make them open millions (wide expert parallelism spans hundreds of ranks).
pub const MAX_WORKERS: u32 = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPlan {
    pub epoch: u64,
    pub workers: u32,
    pub slots_per_worker: u32,
    pub logical_experts: u32,
    pub layers: Vec<LayerPlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlacement {
    /// Decoder layer index (as in `model.layers.<i>`).
    pub layer: u32,
    /// Logical expert id held by each physical slot.
    pub slots: Vec<u32>,
}

impl PlacementPlan {
    /// The placement before any load is known: logical experts in order (so an expert group,
    /// which is a contiguous id range, stays on as few workers as possible), then the spare
    /// slots as replicas of experts 0, 1, … which land on the last workers, away from their
    /// originals on the first ones.
    pub fn initial(workers: u32, slots_per_worker: u32, logical_experts: u32, moe_layers: &[u32]) -> Self {
        let slots: Vec<u32> = (0..workers * slots_per_worker).map(|p| p % logical_experts.max(1)).collect();
        PlacementPlan {
            epoch: 0,
            workers,
            slots_per_worker,
            logical_experts,
            layers: moe_layers.iter().map(|&layer| LayerPlacement { layer, slots: slots.clone() }).collect(),
        }
    }

    /// The initial placement with the fewest slots per worker that hold every expert (spare
    /// slots, when `workers` does not divide the experts, hold replicas): what processes
    /// started without a placement file serve.
    pub fn minimal(logical_experts: u32, moe_layers: &[u32], workers: u32) -> Self {
        Self::initial(workers, logical_experts.div_ceil(workers.max(1)), logical_experts, moe_layers)
    }

    /// Checks the invariants, and that the plan fits a model with `logical_experts` routed
    /// experts in `moe_layers`. How many workers serve is the plan's to say: a live resize
    /// commits a plan over more or fewer workers than the one before.
    pub fn validate_for(&self, logical_experts: u32, moe_layers: &[u32]) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidPlacement(m));
        if self.logical_experts != logical_experts {
            return bad(format!(
                "the placement is for {} logical experts, the model has {logical_experts}",
                self.logical_experts
            ));
        }
        let layers: Vec<u32> = self.layers.iter().map(|l| l.layer).collect();
        if layers != moe_layers {
            return bad(format!(
                "the placement covers layers {layers:?}, the model's MoE layers are {moe_layers:?}"
            ));
        }
        self.validate()
    }

    /// Checks the invariants in the module documentation.
    pub fn validate(&self) -> Result<()> {
        if self.epoch > MAX_EPOCH {
            return Err(Error::InvalidPlacement(format!(
                "epoch {} is past the largest epoch {MAX_EPOCH}: epochs count placements from 1",
                self.epoch
            )));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(Error::InvalidPlacement(format!(
                "the placement names {} workers; a placement needs 1 to {MAX_WORKERS}",
                self.workers
            )));
        }
        let slots = self.workers as u64 * self.slots_per_worker as u64;
        if slots < self.logical_experts as u64 || slots > u32::MAX as u64 {
            return Err(Error::InvalidPlacement(format!(
                "{} workers × {} slots per worker must hold all {} experts (and number under 2^32)",
                self.workers, self.slots_per_worker, self.logical_experts
            )));
        }
        for l in &self.layers {
            if l.slots.len() as u64 != slots {
                return Err(Error::InvalidPlacement(format!(
                    "layer {} has {} slots, workers × slotsPerWorker = {slots}",
                    l.layer,
                    l.slots.len()
                )));
            }
            let mut seen = vec![false; self.logical_experts as usize];
            for &e in &l.slots {
                *seen.get_mut(e as usize).ok_or_else(|| {
                    Error::InvalidPlacement(format!(
                        "layer {} places expert {e}, past the {} logical experts",
                        l.layer, self.logical_experts
                    ))
                })? = true;
            }
            if let Some(e) = seen.iter().position(|s| !s) {
                return Err(Error::InvalidPlacement(format!("layer {} gives expert {e} no slot", l.layer)));
            }
        }
        Ok(())
    }

    /// The distinct experts worker `rank` holds, per layer.
    pub fn held(&self, rank: u32) -> Vec<(u32, Vec<u32>)> {
        let s = self.slots_per_worker as usize;
        let range = rank as usize * s..(rank as usize + 1) * s;
        self.layers
            .iter()
            .map(|l| {
                let mut experts = l.slots.get(range.clone()).unwrap_or_default().to_vec();
                experts.sort_unstable();
                experts.dedup();
                (l.layer, experts)
            })
            .collect()
    }

    /// Per layer (in plan order), per logical expert: the distinct workers holding it, ascending.
    pub fn holders(&self) -> Vec<Vec<Vec<u32>>> {
        self.layers
            .iter()
            .map(|l| {
                let mut holders = vec![Vec::new(); self.logical_experts as usize];
                for (p, &e) in l.slots.iter().enumerate() {
                    let w = (p / self.slots_per_worker.max(1) as usize) as u32;
                    if let Some(h) = holders.get_mut(e as usize).filter(|h| h.last() != Some(&w)) {
                        h.push(w);
                    }
                }
                holders
            })
            .collect()
    }

    /// Physical-to-logical maps of every layer, in plan order (the planner's view).
    pub fn phy_to_log(&self) -> Vec<Vec<u32>> {
        self.layers.iter().map(|l| l.slots.clone()).collect()
    }

    /// The same layout with new slot contents at `epoch`.
    pub fn with_slots(&self, epoch: u64, phy_to_log: Vec<Vec<u32>>) -> Self {
        let layers = self
            .layers
            .iter()
            .zip(phy_to_log)
            .map(|(l, slots)| LayerPlacement { layer: l.layer, slots })
            .collect();
        PlacementPlan { epoch, layers, ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_past_the_largest_are_refused_never_wrapped() {
        let mut plan = PlacementPlan::initial(2, 4, 8, &[1]);
        plan.epoch = MAX_EPOCH;
        assert!(plan.validate().is_ok());
        for epoch in [MAX_EPOCH + 1, u64::MAX] {
            plan.epoch = epoch;
            assert!(plan.validate().unwrap_err().to_string().contains("largest epoch"));
        }
    }

    #[test]
    fn initial_plan_covers_every_expert_and_fills_every_slot() {
        let plan = PlacementPlan::initial(3, 6, 16, &[1, 2]);
        plan.validate_for(16, &[1, 2]).unwrap();
        assert_eq!(plan.layers.len(), 2);
        // The replicas of experts 0 and 1 are on the last worker, the originals on the first.
        assert_eq!(&plan.layers[0].slots[16..], &[0, 1]);
        assert_eq!(plan.held(2)[0], (1, vec![0, 1, 12, 13, 14, 15]));
        assert_eq!(plan.holders()[0][0], vec![0, 2]);
        assert_eq!(plan.holders()[0][7], vec![1]);
        let json = serde_json::to_string(&plan).unwrap();
        assert!(
            json.starts_with(r#"{"epoch":0,"workers":3,"slotsPerWorker":6,"logicalExperts":16"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<PlacementPlan>(&json).unwrap(), plan);
        assert_eq!(PlacementPlan::minimal(16, &[1, 2], 3), plan);
    }

    #[test]
    fn broken_plans_say_what_is_wrong() {
        let plan = PlacementPlan::initial(2, 8, 16, &[1]);
        let msg = |p: &PlacementPlan| p.validate_for(16, &[1]).unwrap_err().to_string();
        let mut lost = plan.clone();
        lost.layers[0].slots[3] = 4;
        assert!(msg(&lost).contains("expert 3 no slot"), "{}", msg(&lost));
        let mut past = plan.clone();
        past.layers[0].slots[3] = 16;
        assert!(msg(&past).contains("expert 16"));
        let mut short = plan.clone();
        short.layers[0].slots.pop();
        assert!(msg(&short).contains("15 slots"));
        let mut wide = plan.clone();
        wide.workers = MAX_WORKERS + 1;
        assert!(msg(&wide).contains("1 to 4096"), "{}", msg(&wide));
        assert!(plan.validate_for(16, &[1, 2]).unwrap_err().to_string().contains("MoE layers"));
        assert!(plan.validate_for(32, &[1]).unwrap_err().to_string().contains("32"));
    }
}
