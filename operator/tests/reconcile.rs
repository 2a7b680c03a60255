#![allow(clippy::unwrap_used)]
//! Reconcile scenarios against kube-rs's mock service: every request the reconciler makes is
//! answered by an in-memory apiserver (`support`) and logged, so the tests see exactly what
//! was written.

mod support;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::ResourceExt;
use kubemoe_operator::controller;
use kubemoe_operator::deployment::ModelDeployment;
use kubemoe_operator::deployment::Phase;
use kubemoe_operator::status;
use serde_json::json;
use std::sync::Arc;
use support::{World, EVENT, MD, PLACEMENT};

const STS: &str = "/apis/apps/v1/namespaces/ml/statefulsets/tiny-worker";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/ml/deployments/tiny-router";
const WORKER_SERVICE: &str = "/api/v1/namespaces/ml/services/tiny-workers";
const ROUTER_SERVICE: &str = "/api/v1/namespaces/ml/services/tiny";
const PDB: &str = "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/tiny-workers";
const WORKER_POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/tiny-workers";
const ROUTER_POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/tiny-router";
const TOKEN: &str = "/api/v1/namespaces/ml/secrets/tiny-internal";

fn tiny() -> serde_json::Value {
    json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}})
}

fn patch(path: &str) -> String {
    format!("PATCH {path}")
}

fn condition(md: &ModelDeployment, type_: &str) -> (String, String) {
    let c = status::find(md.status.as_ref(), type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

#[tokio::test]
async fn create_applies_every_child_and_reports_progressing() {
    let world = World::new(tiny());
    let writes = world.reconcile().await;
    assert_eq!(
        writes,
        [
            patch(TOKEN),
            patch(PLACEMENT),
            patch(WORKER_SERVICE),
            patch(WORKER_POLICY),
            patch(STS),
            patch(PDB),
            patch(ROUTER_SERVICE),
            patch(ROUTER_POLICY),
            patch(DEPLOYMENT),
            EVENT.to_string(),
            patch(&format!("{MD}/status")),
        ]
    );
    let md = world.md();
    assert_eq!(condition(&md, "Progressing"), ("True".into(), "RollingOut".into()));
    assert_eq!(condition(&md, "Ready"), ("False".into(), "WorkersNotReady".into()));
    let status = md.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(Phase::Progressing));
    assert_eq!(status.observed_generation, md.metadata.generation);
    assert_eq!(status.endpoint.as_deref(), Some("tiny.ml.svc:50051"));
    let placement = status.placement.as_ref().unwrap();
    assert_eq!((placement.epoch, placement.logical_experts, placement.physical_experts), (0, 16, 16));

    // Children are owned by the ModelDeployment (garbage-collected with it).
    let sts: StatefulSet = world.api.object(STS);
    let owner = &sts.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("ModelDeployment", md.uid().unwrap().as_str(), Some(true))
    );
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
    // The internal token: random, owned, made once (the next reconcile writes nothing, below).
    let secret: k8s_openapi::api::core::v1::Secret = world.api.object(TOKEN);
    let token = &secret.string_data.as_ref().unwrap()["token"];
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(secret.owner_references()[0].uid, md.uid().unwrap());
}

#[tokio::test]
async fn ready_workloads_make_it_ready_without_touching_children() {
    let world = World::new(tiny());
    world.reconcile().await;
    world.api.mark_ready("ml", "tiny");
    let writes = world.reconcile().await;
    assert_eq!(
        writes,
        [patch(&format!("{MD}/status")), EVENT.to_string()],
        "only status and the Ready event"
    );
    let md = world.md();
    assert_eq!(condition(&md, "Ready"), ("True".into(), "AllReplicasReady".into()));
    assert_eq!(condition(&md, "Progressing").0, "False");
    assert_eq!(condition(&md, "Degraded").0, "False");
    let status = md.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!((status.workers.unwrap().ready, status.routers.unwrap().ready), (2, 1));

    // Losing a worker after being ready is Degraded, not Progressing.
    world.api.set_status(
        STS,
        json!({"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2, "currentRevision": "r1",
               "updateRevision": "r1", "observedGeneration": 1}),
    );
    world.reconcile().await;
    let md = world.md();
    assert_eq!(condition(&md, "Degraded"), ("True".into(), "WorkersUnavailable".into()));
    assert_eq!(condition(&md, "Ready").0, "False");
    assert_eq!(md.status.unwrap().phase, Some(Phase::Degraded));
}

#[tokio::test]
async fn an_unchanged_object_is_reconciled_without_writes() {
    let world = World::new(tiny());
    world.reconcile().await;
    assert_eq!(world.reconcile().await, Vec::<String>::new(), "second pass while progressing");
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    assert_eq!(world.reconcile().await, Vec::<String>::new(), "second pass when ready");
}

#[tokio::test]
async fn a_spec_change_updates_exactly_the_children_it_affects() {
    let world = World::new(tiny());
    world.reconcile().await;
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    let template = |sts: &StatefulSet| serde_json::to_value(&sts.spec.as_ref().unwrap().template).unwrap();
    let first: StatefulSet = world.api.object(STS);
    let router_before: Deployment = world.api.object(DEPLOYMENT);

    // Resize 2 -> 4: the StatefulSet grows, and nothing else is written: no pod template
    // changes (no pod restarts), the placement stays for the rebalancer to migrate live.
    world.edit(|spec| spec["workers"]["replicas"] = 4.into());
    let writes = world.reconcile().await;
    assert_eq!(writes, [patch(STS), EVENT.to_string(), patch(&format!("{MD}/status"))]);
    let sts: StatefulSet = world.api.object(STS);
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(4));
    assert_eq!(template(&sts), template(&first));
    let router: Deployment = world.api.object(DEPLOYMENT);
    assert_eq!(router.spec, router_before.spec);
    let args = router.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    let workers = &args[args.iter().position(|a| a == "--workers").unwrap() + 1];
    assert_eq!(workers, "tiny-worker-{rank}.tiny-workers.ml.svc:50052");
    let placement = world.md().status.unwrap().placement.unwrap();
    assert_eq!((placement.epoch, placement.workers), (0, Some(2)));
    // Once the new workers are ready (holding nothing yet), the rebalancer takes it, balancing
    // enabled or not.
    assert!(!kubemoe_operator::rebalancer::eligible(&world.md()), "new workers not ready yet");
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    world.edit(|spec| spec["balancing"] = json!({"enabled": false}));
    world.reconcile().await;
    assert!(kubemoe_operator::rebalancer::eligible(&world.md()), "a resize is due");

    // The rebalancer's migration to 4 workers (what it writes: the ConfigMap) is reported.
    let md = world.md();
    let model = kubemoe_placement::ModelConfig::preset("tiny").unwrap().unwrap();
    let layout = |md: &ModelDeployment| kubemoe_operator::spec::layout(&md.spec, &model).unwrap();
    let migrated = |epoch, md: &ModelDeployment| {
        let plan = kubemoe_placement::PlacementPlan { epoch, ..layout(md).initial_plan() };
        let config_map = kubemoe_operator::desired::placement_config_map(md, &plan).unwrap();
        world.api.insert(PLACEMENT, serde_json::to_value(config_map).unwrap());
    };
    // What the rebalancer reports once the routers route by it (`status::rebalanced`).
    let reported = |workers: i32| {
        let mut status = world.md().status.unwrap();
        status.placement.as_mut().unwrap().workers = Some(workers);
        world.api.set_status(MD, serde_json::to_value(status).unwrap());
    };
    migrated(1, &md);
    reported(4);
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    let placement = world.md().status.unwrap().placement.unwrap();
    assert_eq!((placement.epoch, placement.workers, placement.physical_experts), (1, Some(4), 16));

    // Down to 3 (with 8 redundant slots, 24 = 3 × 8): the StatefulSet keeps the 4 workers
    // until the placement in force spreads the experts over 3.
    world.edit(|spec| {
        spec["workers"]["replicas"] = 3.into();
        spec["experts"] = json!({"redundant": 8});
    });
    let writes = world.reconcile().await;
    // The StatefulSet's layout annotation says what is asked for; its replicas and pods stay.
    assert_eq!(writes, [patch(STS), EVENT.to_string(), patch(&format!("{MD}/status"))]);
    let sts: StatefulSet = world.api.object(STS);
    let annotations = sts.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["kubemoe.io/expert-layout"], "16 experts in 3 workers x 8 slots");
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(4), "the workers stay");
    assert_eq!(template(&sts), template(&first));
    // The rebalancer writes the ConfigMap before the routers commit: that alone shrinks nothing.
    migrated(2, &world.md());
    world.reconcile().await;
    assert_eq!(world.api.object::<StatefulSet>(STS).spec.unwrap().replicas, Some(4));
    reported(3);
    let writes = world.reconcile().await;
    assert_eq!(writes, [patch(STS), EVENT.to_string(), patch(&format!("{MD}/status"))]);
    let sts: StatefulSet = world.api.object(STS);
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(template(&sts), template(&first), "no worker restarts");
    let placement = world.md().status.unwrap().placement.unwrap();
    assert_eq!((placement.epoch, placement.workers, placement.physical_experts), (2, Some(3), 24));
    assert_eq!(world.api.object::<Deployment>(DEPLOYMENT).spec, router_before.spec, "no router restarts");

    // Another model restarts the pods on a new plan of record, at a new epoch.
    world.edit(|spec| spec["model"]["source"] = "builtin:small".into());
    let writes = world.reconcile().await;
    assert!(writes.contains(&patch(PLACEMENT)) && writes.contains(&patch(DEPLOYMENT)), "{writes:?}");
    assert_eq!(world.md().status.unwrap().placement.unwrap().epoch, 3);

    // A change that keeps the layout keeps the placement epoch.
    world.edit(|spec| spec["router"] = json!({"replicas": 3}));
    let writes = world.reconcile().await;
    assert_eq!(writes, [patch(DEPLOYMENT), EVENT.to_string(), patch(&format!("{MD}/status"))]);
    assert_eq!(world.md().status.unwrap().placement.unwrap().epoch, 3);
}

#[tokio::test]
async fn an_invalid_spec_gets_a_reason_and_no_children() {
    let world = World::new(json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 3}}));
    let writes = world.reconcile().await;
    assert_eq!(writes, [patch(&format!("{MD}/status")), EVENT.to_string()]);
    let md = world.md();
    let ready = status::find(md.status.as_ref(), "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ExpertsNotDivisible"));
    assert!(ready.message.contains("set experts.redundant to 2"), "{}", ready.message);
    assert_eq!(md.status.as_ref().unwrap().phase, Some(Phase::Failed));
    assert!(world.api.get(STS).is_none() && world.api.get(PLACEMENT).is_none());
    assert_eq!(world.reconcile().await, Vec::<String>::new(), "a refused spec is reported once");
}

#[tokio::test]
async fn a_setting_not_built_yet_gets_not_built_and_no_children() {
    let world = World::new(json!({"model": {"source": "builtin:tiny"}, "transport": "nccl",
        "workers": {"replicas": 2, "gpusPerWorker": 1}}));
    let writes = world.reconcile().await;
    assert_eq!(writes, [patch(&format!("{MD}/status")), EVENT.to_string()]);
    let md = world.md();
    let ready = status::find(md.status.as_ref(), "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "NotBuilt"));
    assert!(ready.message.contains("set transport to tcp"), "{}", ready.message);
    assert!(world.api.get(STS).is_none() && world.api.get(PLACEMENT).is_none());
}

#[tokio::test]
async fn a_volume_model_reads_its_config_map() {
    let world = World::new(json!({
        "model": {"source": "pvc://models/tiny", "configMap": "tiny-config"},
        "workers": {"replicas": 4},
    }));
    world.reconcile().await;
    assert_eq!(condition(&world.md(), "Ready").1, "ModelConfigNotFound");
    assert!(world.api.get(STS).is_none());

    let config = kubemoe_placement::config::preset_json("tiny").unwrap();
    world.api.insert(
        "/api/v1/namespaces/ml/configmaps/tiny-config",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-config"},
               "data": {"config.json": config}}),
    );
    world.reconcile().await;
    assert_eq!(condition(&world.md(), "Ready").1, "WorkersNotReady");
    let sts: StatefulSet = world.api.object(STS);
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let claim = pod.volumes.unwrap().into_iter().find_map(|v| v.persistent_volume_claim).unwrap();
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("models", Some(true)));
}

#[tokio::test]
async fn the_error_policy_backs_off_and_success_resets_it() {
    let world = World::new(tiny());
    let md = Arc::new(world.md());
    let error = kubemoe_operator::Error::LeaseLost { lease: "test".into() };
    let first = controller::error_policy(md.clone(), &error, world.context.clone());
    let second = controller::error_policy(md.clone(), &error, world.context.clone());
    assert_eq!(first, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2)));
    assert_eq!(second, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(4)));
    world.reconcile().await;
    let after_success = controller::error_policy(md, &error, world.context.clone());
    assert_eq!(after_success, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2)));
}
