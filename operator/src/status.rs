//! The status a ModelDeployment should report, from what the controller observed. Pure:
//! the controller writes the result only when it differs from the current status, so an
//! unchanged world produces no status write.
//!
//! Conditions keep their `lastTransitionTime` while their status stays the same, so recomputing
//! with a later clock changes nothing.
//!
//! Three writers share the status: the controller (everything but what follows), the
//! [`crate::rebalancer`], which owns the `Rebalancing` condition and what `placement` says of
//! load and rebalances, and the [`crate::loading`] poll, which owns `loading` (the controller
//! clears it once every worker is ready). Each computes its part from the current status and
//! carries the others' over unchanged, so none undoes another and an unchanged world still
//! writes nothing.

use crate::deployment::ModelDeployment;
use crate::deployment::{LoadingStatus, ModelDeploymentStatus, Phase, PlacementStatus, ReplicaCounts};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kubemoe_placement::rebalance::{Degraded, Proposal};
use kubemoe_placement::{Invalid, PlacementPlan};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const REBALANCING: &str = "Rebalancing";

/// What the controller saw of the workloads after applying them.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub workers: Option<&'a StatefulSet>,
    pub router: Option<&'a Deployment>,
    /// The plan of record (the placement ConfigMap's).
    pub plan: &'a PlacementPlan,
    /// Workers the routers route by: the plan of record's, except during a resize, where the
    /// record is written before the routers commit, so the rebalancer's last report counts.
    pub routed_workers: u32,
}

/// Status for a spec that cannot be served: `Ready=False` with the reason, nothing else claimed.
pub fn invalid(md: &ModelDeployment, invalid: &Invalid, now: &Time) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let generation = md.metadata.generation;
    let mut conditions = vec![
        condition(previous, READY, false, invalid.reason, &invalid.message, generation, now),
        condition(
            previous,
            PROGRESSING,
            false,
            invalid.reason,
            "waiting for a spec that can be served",
            generation,
            now,
        ),
        condition(previous, DEGRADED, false, invalid.reason, "no workloads for this spec", generation, now),
    ];
    conditions.extend(find(previous, REBALANCING).cloned());
    ModelDeploymentStatus {
        observed_generation: generation,
        phase: Some(Phase::Failed),
        conditions,
        // Keep what is known of earlier placements (children of the last valid spec keep serving).
        placement: previous.and_then(|s| s.placement.clone()),
        ..ModelDeploymentStatus::default()
    }
}

/// Status for a valid spec whose children are applied.
pub fn valid(md: &ModelDeployment, observed: Observed<'_>, now: &Time) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let generation = md.metadata.generation;
    let spec = &md.spec;
    let earlier = previous.and_then(|s| s.placement.as_ref());
    // The rebalancer's finding, kept until its next poll: routers route around workers.
    let routed_around = earlier.is_some_and(|p| !p.workers_down.is_empty());

    let workers = workload_counts(observed.workers.map(sts_counts));
    let routers = workload_counts(observed.router.map(deployment_counts));
    let want_workers = spec.workers.replicas;
    let want_routers = spec.router.replicas;
    let rolled_out =
        observed.workers.is_some_and(sts_rolled_out) && observed.router.is_some_and(deployment_rolled_out);
    let workers_ready = workers.ready >= want_workers;
    let routers_ready = want_routers > 0 && routers.ready >= want_routers;
    let ready = rolled_out && workers_ready && routers_ready;
    let was_ready = previous.is_some_and(|s| {
        s.conditions.iter().any(|c| (c.type_ == READY || c.type_ == DEGRADED) && c.status == "True")
    });
    // Degraded: the rollout is done and the deployment served before, yet pods are missing now;
    // or routers route around workers that stopped answering.
    let degraded = (rolled_out && !ready && was_ready) || routed_around;

    let counts = format!(
        "{}/{want_routers} routers and {}/{want_workers} workers ready",
        routers.ready.min(want_routers),
        workers.ready.min(want_workers)
    );
    let (ready_reason, ready_message) = if ready {
        ("AllReplicasReady", counts.clone())
    } else if want_routers == 0 {
        ("ScaledToZero", "router.replicas is 0: nothing serves requests".to_string())
    } else if !workers_ready {
        ("WorkersNotReady", counts.clone())
    } else if !routers_ready {
        ("RoutersNotReady", counts.clone())
    } else {
        ("RollingOut", format!("workloads are being updated; {counts}"))
    };
    let (progressing_reason, progressing_message) = if !rolled_out {
        ("RollingOut", format!("workloads are being updated; {counts}"))
    } else if ready || degraded {
        ("RolledOut", "workloads match the spec".to_string())
    } else {
        ("WaitingForPods", counts.clone())
    };
    let progressing = !ready && !degraded;
    let degraded_message = if routed_around {
        // The rebalancer's message names the workers and the experts lost.
        find(previous, DEGRADED).filter(|c| c.reason == WORKERS_DOWN).map_or_else(
            || "routers route around workers that stopped answering".into(),
            |c| c.message.clone(),
        )
    } else if degraded {
        counts.clone()
    } else {
        ALL_SERVING.to_string()
    };
    let degraded_reason = if routed_around {
        WORKERS_DOWN
    } else if !degraded {
        "AsExpected"
    } else if !workers_ready {
        "WorkersUnavailable"
    } else {
        "RoutersUnavailable"
    };

    let mut conditions = vec![
        condition(previous, READY, ready, ready_reason, &ready_message, generation, now),
        condition(
            previous,
            PROGRESSING,
            progressing,
            progressing_reason,
            &progressing_message,
            generation,
            now,
        ),
        condition(previous, DEGRADED, degraded, degraded_reason, &degraded_message, generation, now),
    ];
    conditions.extend(find(previous, REBALANCING).cloned());
    let phase = if ready && !routed_around {
        Phase::Ready
    } else if degraded {
        Phase::Degraded
    } else {
        Phase::Progressing
    };
    let plan = observed.plan;
    let same_epoch = earlier.filter(|p| p.epoch == plan.epoch as i64);
    let placement = PlacementStatus {
        epoch: plan.epoch as i64,
        logical_experts: plan.logical_experts as i32,
        physical_experts: (plan.workers * plan.slots_per_worker) as i32,
        workers: Some(observed.routed_workers as i32),
        // The rebalancer's. An imbalance was measured on its epoch's placement, so a new epoch
        // starts without one; the last rebalance stays the last one (and its time is the
        // cooldown's start, also for an epoch the rebalancer wrote and has not reported yet).
        imbalance: same_epoch.and_then(|p| p.imbalance),
        last_rebalance_time: earlier.and_then(|p| p.last_rebalance_time.clone()),
        experts_moved: earlier.and_then(|p| p.experts_moved),
        workers_down: earlier.map(|p| p.workers_down.clone()).unwrap_or_default(),
        highest_epoch: earlier.and_then(|p| p.highest_epoch),
        lost_experts: earlier.and_then(|p| p.lost_experts),
    };
    let names = crate::desired::Names::of(&md.name_any());
    let namespace = md.namespace().unwrap_or_else(|| "default".into());
    ModelDeploymentStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        routers: Some(routers),
        workers: Some(workers),
        router_selector: Some(crate::desired::selector(&md.name_any(), "router")),
        worker_selector: Some(crate::desired::selector(&md.name_any(), "worker")),
        placement: Some(placement),
        endpoint: Some(format!("{}.{namespace}.svc:{}", names.router_service, spec.router.grpc_port)),
        // The loading poll's ([`crate::loading`]), until every worker is ready.
        loading: if workers_ready { None } else { previous.and_then(|s| s.loading.clone()) },
    }
}

/// Status with `loading` as the loading poll found it (`None`: no worker loading), the rest as
/// it was.
pub fn loading(md: &ModelDeployment, loading: Option<LoadingStatus>) -> ModelDeploymentStatus {
    ModelDeploymentStatus { loading, ..md.status.clone().unwrap_or_default() }
}

/// An imbalance as status reports it: two decimals, so that a poll whose measurement moved
/// less than that writes nothing.
pub fn rounded(imbalance: f64) -> f64 {
    (imbalance * 100.0).round() / 100.0
}

/// Status while `md` migrates to `proposal`: `Rebalancing=True`, and its epoch the highest
/// given.
pub fn rebalancing(md: &ModelDeployment, proposal: &Proposal, now: &Time) -> ModelDeploymentStatus {
    let mut status = if proposal.resized_from.is_some() {
        with_rebalancing(md, true, "Resizing", &proposal.to_string(), now)
    } else if proposal.recovering.is_empty() {
        let message = format!(
            "moving {} expert copies to placement epoch {}: imbalance {:.2} -> {:.2}",
            proposal.moved, proposal.plan.epoch, proposal.imbalance_before, proposal.imbalance_after
        );
        with_rebalancing(md, true, "Migrating", &message, now)
    } else {
        with_rebalancing(md, true, "Recovering", &proposal.to_string(), now)
    };
    if let Some(placement) = &mut status.placement {
        let epoch = proposal.plan.epoch as i64;
        placement.highest_epoch = Some(placement.highest_epoch.map_or(epoch, |h| h.max(epoch)));
    }
    status
}

/// The highest placement epoch `status` says was ever proposed.
pub fn highest_epoch(status: Option<&ModelDeploymentStatus>) -> u64 {
    let placement = status.and_then(|s| s.placement.as_ref());
    placement.and_then(|p| p.highest_epoch).map_or(0, |h| h.max(0) as u64)
}

/// The workers the rebalancer last reported the routers route by (`status.placement.workers`).
pub fn routed_workers(status: Option<&ModelDeploymentStatus>) -> Option<u32> {
    let placement = status.and_then(|s| s.placement.as_ref());
    placement.and_then(|p| p.workers).map(|w| w.max(0) as u32)
}

/// `Degraded`'s reason while routers route around workers.
pub const WORKERS_DOWN: &str = "WorkersDown";
const ALL_SERVING: &str = "all pods that served are serving";

/// Status after a poll found the routers routing around `state.down` (none: all back):
/// `placement.workersDown` and `lostExperts`, and `Degraded=True` naming the workers and the
/// experts lost, which the controller keeps while `workersDown` is set ([`valid`]). Once they
/// are back, a `Degraded` of this reason clears (one the controller set from pods stays its).
pub fn degraded(md: &ModelDeployment, state: &Degraded, now: &Time) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let mut next = previous.cloned().unwrap_or_default();
    let down = !state.down.is_empty();
    if let Some(placement) = &mut next.placement {
        placement.workers_down = state.down.iter().map(|&w| w as i32).collect();
        placement.lost_experts = down.then_some(state.lost_experts() as i64);
    }
    let ours = find(previous, DEGRADED).is_some_and(|c| c.reason == WORKERS_DOWN);
    if !down && !ours {
        return next;
    }
    let (reason, message) = if down {
        (WORKERS_DOWN, clip(&state.to_string(), MAX_MESSAGE))
    } else {
        ("AsExpected", ALL_SERVING.to_string())
    };
    let condition = condition(previous, DEGRADED, down, reason, &message, md.metadata.generation, now);
    match next.conditions.iter_mut().find(|c| c.type_ == DEGRADED) {
        Some(existing) => *existing = condition,
        None => next.conditions.push(condition),
    }
    let ready = find(previous, READY).is_some_and(|c| c.status == "True");
    next.phase = Some(if down {
        Phase::Degraded
    } else if ready {
        Phase::Ready
    } else {
        Phase::Progressing
    });
    next
}

/// Longest condition message the API server takes (32 KiB), with room to spare.
const MAX_MESSAGE: usize = 32_000;

/// `text` cut to at most `max` bytes on a character boundary, marked with ` …` when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{} …", &text[..cut])
}

/// Status once every router routes by `proposal` and every worker serves it.
pub fn rebalanced(md: &ModelDeployment, proposal: &Proposal, now: &Time) -> ModelDeploymentStatus {
    let plan = &proposal.plan;
    let message = format!(
        "placement epoch {} in force: imbalance {:.2} -> {:.2}, {} expert copies moved",
        plan.epoch, proposal.imbalance_before, proposal.imbalance_after, proposal.moved
    );
    ModelDeploymentStatus {
        placement: Some(PlacementStatus {
            epoch: plan.epoch as i64,
            logical_experts: plan.logical_experts as i32,
            physical_experts: (plan.workers * plan.slots_per_worker) as i32,
            workers: Some(plan.workers as i32),
            imbalance: Some(rounded(proposal.imbalance_after)),
            last_rebalance_time: Some(now.clone()),
            experts_moved: Some(proposal.moved as i64),
            // The rebalancer's next finding replaces these.
            ..previous_placement(md)
        }),
        ..with_rebalancing(md, false, "Rebalanced", &message, now)
    }
}

fn previous_placement(md: &ModelDeployment) -> PlacementStatus {
    md.status.as_ref().and_then(|s| s.placement.clone()).unwrap_or_default()
}

/// Status after the migration to `epoch` failed with `error` (its whole chain); the placement
/// status is left as it was.
pub fn rebalance_failed(md: &ModelDeployment, epoch: u64, error: &str, now: &Time) -> ModelDeploymentStatus {
    let message = format!("migration to placement epoch {epoch} failed: {error}");
    with_rebalancing(md, false, "MigrationFailed", &message, now)
}

/// Status once routers, workers and the placement ConfigMap agree on `epoch`, over `workers`
/// workers, again after a migration did not finish: a `Rebalancing=True` left by a stopped
/// operator becomes `False`; anything else (a failure already reported) stays as it is.
pub fn settled(md: &ModelDeployment, epoch: u64, workers: u32, now: &Time) -> ModelDeploymentStatus {
    let mut next = if is_rebalancing(md.status.as_ref()) {
        let message = format!(
            "a migration was interrupted (the operator stopped); routers, workers and the placement \
             ConfigMap now agree on epoch {epoch}"
        );
        with_rebalancing(md, false, "Interrupted", &message, now)
    } else {
        md.status.clone().unwrap_or_default()
    };
    if let Some(placement) = &mut next.placement {
        placement.workers = Some(workers as i32);
    }
    next
}

/// Status after a poll measured `imbalance` and kept the placement.
pub fn measured(md: &ModelDeployment, imbalance: f64) -> ModelDeploymentStatus {
    let mut status = md.status.clone().unwrap_or_default();
    if let Some(placement) = &mut status.placement {
        placement.imbalance = Some(rounded(imbalance));
    }
    status
}

/// Whether the status says a migration is under way.
pub fn is_rebalancing(status: Option<&ModelDeploymentStatus>) -> bool {
    find(status, REBALANCING).is_some_and(|c| c.status == "True")
}

/// `md`'s status with the `Rebalancing` condition set (appended after the controller's).
fn with_rebalancing(
    md: &ModelDeployment,
    status: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let rebalancing = condition(previous, REBALANCING, status, reason, message, md.metadata.generation, now);
    let mut next = previous.cloned().unwrap_or_default();
    match next.conditions.iter_mut().find(|c| c.type_ == REBALANCING) {
        Some(existing) => *existing = rebalancing,
        None => next.conditions.push(rebalancing),
    }
    next
}

fn workload_counts(counts: Option<ReplicaCounts>) -> ReplicaCounts {
    counts.unwrap_or_default()
}

fn sts_counts(sts: &StatefulSet) -> ReplicaCounts {
    let status = sts.status.as_ref();
    ReplicaCounts {
        replicas: status.map_or(0, |s| s.replicas),
        ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
    }
}

fn deployment_counts(deployment: &Deployment) -> ReplicaCounts {
    let status = deployment.status.as_ref();
    ReplicaCounts {
        replicas: status.and_then(|s| s.replicas).unwrap_or(0),
        ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
    }
}

/// The StatefulSet controller has seen the latest spec and every pod runs it.
fn sts_rolled_out(sts: &StatefulSet) -> bool {
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    sts.status.as_ref().is_some_and(|s| {
        s.observed_generation >= sts.metadata.generation
            && s.updated_replicas.unwrap_or(0) >= want
            && s.current_revision.is_some()
            && s.current_revision == s.update_revision
    })
}

fn deployment_rolled_out(deployment: &Deployment) -> bool {
    let want = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    deployment.status.as_ref().is_some_and(|s| {
        s.observed_generation >= deployment.metadata.generation
            && s.updated_replicas.unwrap_or(0) >= want
            && s.replicas.unwrap_or(0) == want
    })
}

fn condition(
    previous: Option<&ModelDeploymentStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in `status`, if any.
pub fn find<'a>(status: Option<&'a ModelDeploymentStatus>, type_: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubemoe_placement::ModelConfig;

    fn time(text: &str) -> Time {
        Time(text.parse().unwrap())
    }

    /// A ready deployment of the tiny model on 2 workers, reconciled at epoch 0.
    fn ready() -> (ModelDeployment, kubemoe_placement::Layout) {
        let mut md = ModelDeployment::new(
            "m",
            serde_json::from_value(
                serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}}),
            )
            .unwrap(),
        );
        md.metadata.generation = Some(1);
        let layout = crate::spec::layout(&md.spec, &ModelConfig::preset("tiny").unwrap().unwrap()).unwrap();
        let (workers, router) = workloads();
        let observed = Observed {
            workers: Some(&workers),
            router: Some(&router),
            plan: &layout.initial_plan(),
            routed_workers: 2,
        };
        md.status = Some(valid(&md, observed, &time("2025-01-01T00:00:00Z")));
        (md, layout)
    }

    fn proposal() -> Proposal {
        Proposal {
            plan: PlacementPlan { epoch: 1, ..PlacementPlan::initial(2, 8, 16, &[1, 2]) },
            imbalance_before: 1.8712,
            imbalance_after: 1.0449,
            moved: 6,
            recovering: vec![],
            resized_from: None,
        }
    }

    fn rebalancing_condition(status: &ModelDeploymentStatus) -> (String, String, Time) {
        let c = find(Some(status), REBALANCING).unwrap();
        (c.status.clone(), c.reason.clone(), c.last_transition_time.clone())
    }

    #[test]
    fn a_rebalance_goes_migrating_then_rebalanced_and_records_the_placement() {
        let (mut md, _) = ready();
        let before = md.status.clone().unwrap();
        let t1 = time("2025-01-01T00:05:00Z");
        let migrating = rebalancing(&md, &proposal(), &t1);
        assert_eq!(rebalancing_condition(&migrating), ("True".into(), "Migrating".into(), t1.clone()));
        let message = &find(Some(&migrating), REBALANCING).unwrap().message;
        assert!(
            message.contains("epoch 1") && message.contains("1.87 -> 1.04") && message.contains("6 expert")
        );
        // Only the epoch taken, so that no later plan gets it.
        let expected = PlacementStatus { highest_epoch: Some(1), ..before.placement.clone().unwrap() };
        assert_eq!(migrating.placement, Some(expected), "nothing else recorded before the migration");
        assert_eq!(migrating.conditions[..3], before.conditions[..], "the controller's conditions stay");

        md.status = Some(migrating);
        let t2 = time("2025-01-01T00:05:07Z");
        let done = rebalanced(&md, &proposal(), &t2);
        assert_eq!(rebalancing_condition(&done), ("False".into(), "Rebalanced".into(), t2.clone()));
        let placement = done.placement.clone().unwrap();
        assert_eq!(
            placement,
            PlacementStatus {
                epoch: 1,
                logical_experts: 16,
                physical_experts: 16,
                workers: Some(2),
                imbalance: Some(1.04),
                last_rebalance_time: Some(t2),
                experts_moved: Some(6),
                // Recorded when the migration started.
                highest_epoch: Some(1),
                ..PlacementStatus::default()
            }
        );
        assert_eq!(done.phase, before.phase);
        assert_eq!(done.conditions.len(), 4);
    }

    #[test]
    fn a_failure_keeps_the_placement_and_says_why() {
        let (mut md, _) = ready();
        md.status = Some(rebalancing(&md, &proposal(), &time("2025-01-01T00:05:00Z")));
        let failed = rebalance_failed(
            &md,
            1,
            "commit on http://10.0.0.1:50051: unavailable",
            &time("2025-01-01T00:05:03Z"),
        );
        let c = find(Some(&failed), REBALANCING).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "MigrationFailed"));
        assert!(
            c.message.contains("epoch 1") && c.message.contains("commit on http://10.0.0.1:50051"),
            "{}",
            c.message
        );
        assert_eq!(failed.placement, md.status.as_ref().unwrap().placement);
        md.status = Some(failed.clone());
        // Settling afterwards leaves the reported failure alone.
        assert_eq!(settled(&md, 0, 2, &time("2025-01-01T00:05:04Z")), failed);
    }

    #[test]
    fn settling_clears_only_a_rebalance_a_stopped_operator_left() {
        let (mut md, _) = ready();
        assert_eq!(
            settled(&md, 0, 2, &time("2025-01-01T00:06:00Z")),
            md.status.clone().unwrap(),
            "nothing to clear"
        );
        md.status = Some(rebalancing(&md, &proposal(), &time("2025-01-01T00:05:00Z")));
        let t = time("2025-01-01T00:06:00Z");
        let after = settled(&md, 0, 2, &t);
        assert_eq!(rebalancing_condition(&after), ("False".into(), "Interrupted".into(), t));
        assert!(find(Some(&after), REBALANCING).unwrap().message.contains("epoch 0"));
    }

    #[test]
    fn measuring_writes_only_a_change_visible_at_two_decimals() {
        let (mut md, _) = ready();
        let first = measured(&md, 1.23456);
        assert_eq!(first.placement.as_ref().unwrap().imbalance, Some(1.23));
        md.status = Some(first.clone());
        assert_eq!(measured(&md, 1.2349), first, "same at two decimals: the status is unchanged");
        assert_eq!(measured(&md, 1.236).placement.unwrap().imbalance, Some(1.24));
    }

    #[test]
    fn reconciles_carry_the_rebalancer_s_condition_and_history_over() {
        let (mut md, layout) = ready();
        md.status = Some(rebalancing(&md, &proposal(), &time("2025-01-01T00:05:00Z")));
        md.status = Some(rebalanced(&md, &proposal(), &time("2025-01-01T00:05:07Z")));
        let later = time("2025-01-01T01:00:00Z");
        // The controller reconciles with the epoch now in the ConfigMap: nothing changes.
        let (workers, router) = workloads();
        let one = PlacementPlan { epoch: 1, ..layout.initial_plan() };
        let observed =
            Observed { workers: Some(&workers), router: Some(&router), plan: &one, routed_workers: 2 };
        assert_eq!(&valid(&md, observed, &later), md.status.as_ref().unwrap());
        // A new epoch from a model change drops the imbalance, not when the last rebalance was.
        let two = PlacementPlan { epoch: 2, ..layout.initial_plan() };
        let observed = Observed { plan: &two, ..observed };
        let placement = valid(&md, observed, &later).placement.unwrap();
        assert_eq!((placement.epoch, placement.imbalance), (2, None));
        assert_eq!(placement.last_rebalance_time, Some(time("2025-01-01T00:05:07Z")));
        assert_eq!(placement.experts_moved, Some(6));
        // A refused spec keeps it too.
        let refused = Invalid { reason: "ExpertsNotDivisible", message: "x".into() };
        let status = invalid(&md, &refused, &later);
        assert_eq!(rebalancing_condition(&status).1, "Rebalanced");
    }

    /// A rolled-out StatefulSet of 2 ready workers and Deployment of 1 ready router.
    fn workloads() -> (StatefulSet, Deployment) {
        let workers = serde_json::from_value(serde_json::json!({
            "metadata": {"generation": 1}, "spec": {"replicas": 2, "selector": {}, "template": {}, "serviceName": "s"},
            "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "currentRevision": "r",
                       "updateRevision": "r", "observedGeneration": 1}}))
        .unwrap();
        let router = serde_json::from_value(serde_json::json!({
            "metadata": {"generation": 1}, "spec": {"replicas": 1, "selector": {}, "template": {}},
            "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}}))
        .unwrap();
        (workers, router)
    }
}
