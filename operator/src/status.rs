//! The status a ModelDeployment should report, from what the controller observed. Pure:
//! the controller writes the result only when it differs from the current status, so an
//! unchanged world produces no status write.
//!
//! Conditions keep their `lastTransitionTime` while their status stays the same, so recomputing
//! with a later clock changes nothing.

use crate::layout::{Invalid, Layout};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kubemoe_api::deployment::{ModelDeploymentStatus, Phase, PlacementStatus, ReplicaCounts};
use kubemoe_api::ModelDeployment;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the controller saw of the workloads after applying them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed<'a> {
    pub workers: Option<&'a StatefulSet>,
    pub router: Option<&'a Deployment>,
    /// Epoch of the placement ConfigMap in force.
    pub epoch: u64,
}

/// Status for a spec that cannot be served: `Ready=False` with the reason, nothing else claimed.
pub fn invalid(md: &ModelDeployment, invalid: &Invalid, now: &Time) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let generation = md.metadata.generation;
    let conditions = vec![
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
pub fn valid(
    md: &ModelDeployment,
    layout: &Layout,
    observed: Observed<'_>,
    now: &Time,
) -> ModelDeploymentStatus {
    let previous = md.status.as_ref();
    let generation = md.metadata.generation;
    let spec = &md.spec;

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
    // Degraded: the rollout is done and the deployment served before, yet pods are missing now.
    let degraded = rolled_out && !ready && was_ready;

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
    let degraded_message =
        if degraded { counts.clone() } else { "all pods that served are serving".to_string() };
    let degraded_reason = if !degraded {
        "AsExpected"
    } else if !workers_ready {
        "WorkersUnavailable"
    } else {
        "RoutersUnavailable"
    };

    let conditions = vec![
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
    let phase = if ready {
        Phase::Ready
    } else if degraded {
        Phase::Degraded
    } else {
        Phase::Progressing
    };
    let earlier = previous.and_then(|s| s.placement.as_ref()).filter(|p| p.epoch == observed.epoch as i64);
    let placement = PlacementStatus {
        epoch: observed.epoch as i64,
        logical_experts: layout.logical as i32,
        physical_experts: layout.physical() as i32,
        // The rebalancer measures these; a new epoch starts without them.
        imbalance: earlier.and_then(|p| p.imbalance),
        last_rebalance_time: earlier.and_then(|p| p.last_rebalance_time.clone()),
        experts_moved: earlier.and_then(|p| p.experts_moved),
    };
    let names = crate::desired::Names::of(&md.name_any());
    let namespace = md.namespace().unwrap_or_else(|| "default".into());
    ModelDeploymentStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        routers: Some(routers),
        workers: Some(workers),
        router_selector: Some(crate::desired::router_selector(&md.name_any())),
        placement: Some(placement),
        endpoint: Some(format!("{}.{namespace}.svc:{}", names.router_service, spec.router.grpc_port)),
    }
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
