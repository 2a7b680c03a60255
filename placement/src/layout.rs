//! The expert layout a deployment asks for with a given model: how many physical expert slots
//! each worker holds, and the rules a schema cannot judge because they need the model's
//! `config.json`. Pure functions; the operator turns an [`Invalid`] into `Ready=False` with its
//! reason and message, `kubemoe up` into an error naming the manifest.

use crate::config::ModelConfig;
use crate::plan::PlacementPlan;

/// A spec that cannot be served as written. `message` says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason for the condition and the event.
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Invalid { reason, message: message.into() }
    }
}

/// The expert layout a valid spec asks for. Every worker holds `slots_per_worker` physical
/// expert slots of every MoE layer; `logical + redundant == workers * slots_per_worker`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub logical: u32,
    pub redundant: u32,
    pub workers: u32,
    pub slots_per_worker: u32,
    /// Distinct workers every logical expert is on (`experts.minReplicas`): the initial plan
    /// and every rebalance keep it, so that `min_replicas − 1` workers may die without an
    /// expert losing its last live copy.
    pub min_replicas: u32,
    pub moe_layers: Vec<u32>,
}

impl Layout {
    pub fn physical(&self) -> u32 {
        self.logical + self.redundant
    }

    /// Whether `plan` is a placement of this layout (a rebalance of load changes epochs, never
    /// the layout).
    pub fn fits(&self, plan: &PlacementPlan) -> bool {
        plan.workers == self.workers
            && plan.slots_per_worker == self.slots_per_worker
            && self.same_model(plan)
    }

    /// Whether `plan` places this layout's model (its routed experts and MoE layers), on however
    /// many workers and slots: such a plan can be migrated to this layout live
    /// ([`crate::rebalance::reshape`]), with no pod restarted.
    pub fn same_model(&self, plan: &PlacementPlan) -> bool {
        plan.logical_experts == self.logical
            && plan.layers.iter().map(|l| l.layer).eq(self.moe_layers.iter().copied())
    }

    /// The placement before any load is known ([`PlacementPlan::initial`]). Expert `e`'s copies
    /// sit `logical` slots apart, never fewer than `slots_per_worker` (redundant slots are at
    /// most `logical × (workers − 1)`), so each is on a worker of its own, and every expert has
    /// at least `physical / logical ≥ min_replicas` of them.
    pub fn initial_plan(&self) -> PlacementPlan {
        PlacementPlan::initial(self.workers, self.slots_per_worker, self.logical, &self.moe_layers)
    }
}

/// What a deployment says about its experts (`workers.replicas` and `experts.redundant` of a
/// `ModelDeployment`), as written: the schema bounds them, an offline render does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutSpec {
    pub workers: i32,
    pub redundant: i32,
    pub min_replicas: i32,
}

/// Most decoder layers a model may have: DeepSeek-V3 has 61; a plan holds one entry list per
/// MoE layer, so this bounds what a hostile config.json can make a planner allocate.
pub const MAX_LAYERS: u32 = 1024;

/// Checks the spec against the model and returns the layout, or what to change.
pub fn layout(spec: &LayoutSpec, model: &ModelConfig) -> Result<Layout, Invalid> {
    // Sizes come from a config.json: bound the plan before anything is allocated (found by
    // fuzzing: `num_hidden_layers: 74444442` took gigabytes before any check).
    if model.num_hidden_layers > MAX_LAYERS {
        return Err(Invalid::new(
            "ModelTooLarge",
            format!(
                "num_hidden_layers ({}) is more than {MAX_LAYERS}; is config.json right?",
                model.num_hidden_layers
            ),
        ));
    }
    let entries = u64::from(model.num_hidden_layers)
        .saturating_mul(u64::from(model.n_routed_experts).saturating_add(spec.redundant.max(0) as u64));
    if entries > crate::planner::MAX_PLAN_ENTRIES as u64 {
        return Err(Invalid::new(
            "ModelTooLarge",
            format!(
                "num_hidden_layers ({}) × (n_routed_experts ({}) + experts.redundant ({})) exceeds the {} \
                 placement entries a plan may hold; is config.json right?",
                model.num_hidden_layers,
                model.n_routed_experts,
                spec.redundant,
                crate::planner::MAX_PLAN_ENTRIES
            ),
        ));
    }
    let moe_layers = model.moe_layers();
    if moe_layers.is_empty() {
        return Err(Invalid::new(
            "NoExperts",
            format!(
                "the model has no MoE layers (n_routed_experts = {}, first_k_dense_replace = {}, \
                 num_hidden_layers = {}); kubemoe serves Mixture-of-Experts models only",
                model.n_routed_experts, model.first_k_dense_replace, model.num_hidden_layers
            ),
        ));
    }
    let logical = model.n_routed_experts;
    // The schema bounds both to small positive ranges; render (no schema) can see anything.
    let redundant = u32::try_from(spec.redundant)
        .map_err(|_| Invalid::new("InvalidExperts", "experts.redundant must be 0 or more"))?;
    let workers = u32::try_from(spec.workers)
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| Invalid::new("InvalidWorkers", "workers.replicas must be 1 or more"))?;
    let physical = logical + redundant;
    if !physical.is_multiple_of(workers) {
        let next_redundant = redundant + (workers - physical % workers);
        let (below, above) = nearest_divisors(physical, workers);
        let mut choices = vec![format!("set experts.redundant to {next_redundant}")];
        choices.extend(below.map(|w| format!("set workers.replicas to {w}")));
        choices.extend(above.map(|w| format!("set workers.replicas to {w}")));
        return Err(Invalid::new(
            "ExpertsNotDivisible",
            format!(
                "n_routed_experts ({logical}) + experts.redundant ({redundant}) = {physical} expert slots \
                 cannot be split evenly over workers.replicas ({workers}); {}",
                choices.join(", or ")
            ),
        ));
    }
    let spare = u64::from(logical) * u64::from(workers - 1);
    if u64::from(redundant) > spare {
        return Err(Invalid::new(
            "TooManyRedundantExperts",
            format!(
                "experts.redundant ({redundant}) exceeds the replicas that can live on other workers \
                 than their original (n_routed_experts × (workers.replicas − 1) = {spare}); lower experts.redundant"
            ),
        ));
    }
    let min_replicas = u32::try_from(spec.min_replicas)
        .ok()
        .filter(|m| *m > 0)
        .ok_or_else(|| Invalid::new("InvalidExperts", "experts.minReplicas must be 1 or more"))?;
    if min_replicas > workers {
        return Err(Invalid::new(
            "TooFewWorkers",
            format!(
                "experts.minReplicas ({min_replicas}) asks for each expert on that many distinct workers, \
                 but workers.replicas is {workers}: raise workers.replicas or lower experts.minReplicas"
            ),
        ));
    }
    let need = u64::from(logical) * u64::from(min_replicas);
    if need > u64::from(physical) {
        return Err(Invalid::new(
            "TooFewExpertSlots",
            format!(
                "experts.minReplicas ({min_replicas}) copies of n_routed_experts ({logical}) need {need} expert \
                 slots per MoE layer, the layout has {physical}: set experts.redundant to at least {} \
                 (and a multiple that divides over the workers), or lower experts.minReplicas",
                need - u64::from(logical)
            ),
        ));
    }
    Ok(Layout { logical, redundant, workers, slots_per_worker: physical / workers, min_replicas, moe_layers })
}

/// The divisors of `n` closest to `w` from below and from above (excluding `w`).
fn nearest_divisors(n: u32, w: u32) -> (Option<u32>, Option<u32>) {
    // No divisor of n exceeds n: the search never walks past it (w may be huge).
    let below = (1..w.min(n.saturating_add(1))).rev().find(|d| n.is_multiple_of(*d));
    let above = (w + 1..=n).find(|d| n.is_multiple_of(*d));
    (below, above)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workers: i32, redundant: i32) -> LayoutSpec {
        LayoutSpec { workers, redundant, min_replicas: 1 }
    }

    fn tiny() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap().unwrap()
    }

    #[test]
    fn divisible_layouts_split_slots_evenly() {
        let l = layout(&spec(2, 0), &tiny()).unwrap();
        assert_eq!((l.physical(), l.slots_per_worker, l.moe_layers.clone()), (16, 8, vec![1, 2]));
        let l = layout(&spec(3, 2), &tiny()).unwrap();
        assert_eq!(l.slots_per_worker, 6);
    }

    #[test]
    fn indivisible_experts_say_what_to_change() {
        let err = layout(&spec(3, 0), &tiny()).unwrap_err();
        assert_eq!(err.reason, "ExpertsNotDivisible");
        assert!(err.message.contains("set experts.redundant to 2"), "{}", err.message);
        assert!(err.message.contains("set workers.replicas to 2"), "{}", err.message);
        assert!(err.message.contains("set workers.replicas to 4"), "{}", err.message);
    }

    #[test]
    fn redundant_slots_need_other_workers() {
        let err = layout(&spec(1, 16), &tiny()).unwrap_err();
        assert_eq!(err.reason, "TooManyRedundantExperts");
    }

    #[test]
    fn configs_too_large_to_plan_are_refused_before_allocating() {
        let mut deep = tiny();
        deep.num_hidden_layers = 55_555_114;
        assert_eq!(layout(&spec(1, 0), &deep).unwrap_err().reason, "ModelTooLarge");
        let mut wide = tiny();
        wide.n_routed_experts = 1 << 26;
        assert_eq!(layout(&spec(2, 0), &wide).unwrap_err().reason, "ModelTooLarge");
        // Many workers and experts: no overflow, and no walk over 2^31 candidate divisors.
        wide.n_routed_experts = 1 << 20;
        assert!(layout(&spec(i32::MAX, 0), &wide).is_err());
    }

    #[test]
    fn dense_models_are_refused() {
        let dense = ModelConfig::from_json(
            r#"{"n_routed_experts": 8, "num_hidden_layers": 2, "first_k_dense_replace": 2}"#,
            "t",
        )
        .unwrap();
        assert_eq!(layout(&spec(1, 0), &dense).unwrap_err().reason, "NoExperts");
    }

    #[test]
    fn min_replicas_needs_workers_and_slots_and_the_initial_plan_keeps_it() {
        let two = |workers, redundant| LayoutSpec { workers, redundant, min_replicas: 2 };
        assert_eq!(layout(&two(1, 0), &tiny()).unwrap_err().reason, "TooFewWorkers");
        let err = layout(&two(4, 8), &tiny()).unwrap_err();
        assert_eq!(err.reason, "TooFewExpertSlots");
        assert!(err.message.contains("set experts.redundant to at least 16"), "{}", err.message);
        assert_eq!(
            layout(&LayoutSpec { min_replicas: 0, ..spec(2, 0) }, &tiny()).unwrap_err().reason,
            "InvalidExperts"
        );
        for (workers, redundant, m) in [(2, 16, 2), (4, 16, 2), (4, 32, 3), (8, 48, 4), (3, 32, 3)] {
            let l = layout(&LayoutSpec { workers, redundant, min_replicas: m }, &tiny()).unwrap();
            let plan = l.initial_plan();
            for layer in plan.phy_to_log() {
                for e in 0..16 {
                    let mut on: Vec<usize> = (0..layer.len())
                        .filter(|&p| layer[p] == e)
                        .map(|p| p / l.slots_per_worker as usize)
                        .collect();
                    let copies = on.len();
                    on.dedup();
                    assert!(
                        on.len() == copies && copies >= m as usize,
                        "{workers} {redundant} {m}: {layer:?}"
                    );
                }
            }
        }
    }
}
