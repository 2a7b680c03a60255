//! The placement ConfigMap's content: which logical expert each physical slot holds, per MoE
//! layer, at an epoch.
//!
//! Physical slot `p` of a layer lives on worker `p / slotsPerWorker` (slot `p % slotsPerWorker`
//! there). The ConfigMap persists the placement so that restarts keep it; the operator writes
//! the load-agnostic initial placement (epoch 0, or the next epoch when the layout changes) and
//! the rebalancer writes later epochs with the same layout.

use crate::layout::Layout;
use serde::{Deserialize, Serialize};

/// Key of the placement in the ConfigMap's data.
pub const KEY: &str = "placement.json";

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
    /// which is a contiguous id range, stays on as few workers as possible), then the redundant
    /// slots as replicas of experts 0, 1, … which land on the last workers, away from their
    /// originals on the first ones.
    pub fn initial(layout: &Layout, epoch: u64) -> Self {
        let slots: Vec<u32> = (0..layout.physical()).map(|p| p % layout.logical).collect();
        PlacementPlan {
            epoch,
            workers: layout.workers,
            slots_per_worker: layout.slots_per_worker,
            logical_experts: layout.logical,
            layers: layout
                .moe_layers
                .iter()
                .map(|&layer| LayerPlacement { layer, slots: slots.clone() })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_plan_covers_every_expert_and_fills_every_slot() {
        let layout =
            Layout { logical: 16, redundant: 2, workers: 3, slots_per_worker: 6, moe_layers: vec![1, 2] };
        let plan = PlacementPlan::initial(&layout, 4);
        assert_eq!(plan.epoch, 4);
        assert_eq!(plan.layers.len(), 2);
        for layer in &plan.layers {
            assert_eq!(layer.slots.len(), 18);
            for expert in 0..16 {
                assert!(layer.slots.contains(&expert));
            }
            // The replicas of experts 0 and 1 are on the last worker, the originals on the first.
            assert_eq!(&layer.slots[16..], &[0, 1]);
        }
        let json = serde_json::to_string(&plan).unwrap();
        assert!(
            json.starts_with(r#"{"epoch":4,"workers":3,"slotsPerWorker":6,"logicalExperts":16"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<PlacementPlan>(&json).unwrap(), plan);
    }
}
