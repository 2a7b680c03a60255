#![allow(clippy::unwrap_used)]
//! The operator's rebalancer against the in-memory apiserver (`support`) and fake routers and
//! workers: gRPC servers on loopback that keep epochs as the real ones do (routers commit
//! forward only; a worker prepares a newer epoch and releases the prepared one or the one in
//! force). What a rebalance writes and in which order, what a failure puts back, and how a
//! migration a stopped operator left is settled.

mod support;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kubemoe_api::cluster::Cluster;
use kubemoe_api::expert::balancer_server::{Balancer, BalancerServer};
use kubemoe_api::expert::expert_server::{Expert, ExpertServer};
use kubemoe_api::expert::*;
use kubemoe_operator::deployment::LoadingStatus;
use kubemoe_operator::deployment::ModelDeployment;
use kubemoe_operator::desired::{self, HASH_ANNOTATION};
use kubemoe_operator::rebalancer::{poll, Polled, Target};
use kubemoe_operator::status;
use kubemoe_placement::rebalance::{self, Proposal};
use kubemoe_placement::ModelConfig;
use kubemoe_placement::{self as placement, PlacementPlan};
use serde_json::json;
use std::sync::{Arc, Mutex};
use support::{FakeApi, World, EVENT, MD, PLACEMENT};
use tonic::{Request, Response, Status};

fn patch(path: &str) -> String {
    format!("PATCH {path}")
}

fn status_write() -> String {
    patch(&format!("{MD}/status"))
}

/// What the router saw when it committed: the epoch, the `Rebalancing` condition's status and
/// the ConfigMap's epoch at that moment.
type Commit = (u64, String, u64);

struct RouterState {
    plan: Mutex<PlacementPlan>,
    /// Tokens per logical expert, the same for every MoE layer.
    load: Mutex<Vec<u64>>,
    /// A commit of this epoch fails.
    refuse: Option<u64>,
    commits: Mutex<Vec<Commit>>,
    api: FakeApi,
    /// Workers it routes around.
    down: Mutex<Vec<u32>>,
}

#[derive(Clone)]
struct Router(Arc<RouterState>);

#[tonic::async_trait]
impl Balancer for Router {
    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let plan = self.0.plan.lock().unwrap().clone();
        let tokens = self.0.load.lock().unwrap().clone();
        let layers =
            plan.layers.iter().map(|l| LayerCounts { layer: l.layer, tokens: tokens.clone() }).collect();
        let workers_down = self.0.down.lock().unwrap().clone();
        Ok(Response::new(LoadResponse {
            layers,
            window_seconds: 60.0,
            plan: Some((&plan).into()),
            workers_down,
        }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let plan = PlacementPlan::try_from(request.into_inner().plan.unwrap()).unwrap();
        if self.0.refuse == Some(plan.epoch) {
            return Err(Status::unavailable("cannot switch"));
        }
        let mut current = self.0.plan.lock().unwrap();
        if plan.epoch < current.epoch {
            return Err(Status::failed_precondition("older than the committed epoch"));
        }
        let md: ModelDeployment = self.0.api.object(MD);
        let rebalancing = status::find(md.status.as_ref(), status::REBALANCING).map(|c| c.status.clone());
        let seen = (plan.epoch, rebalancing.unwrap_or_default(), stored(&self.0.api).epoch);
        self.0.commits.lock().unwrap().push(seen);
        *current = plan;
        Ok(Response::new(CommitResponse {}))
    }
}

#[derive(Default)]
struct WorkerState {
    in_force: Mutex<u64>,
    prepared: Mutex<Option<u64>>,
    fail_prepare: bool,
    calls: Mutex<Vec<String>>,
    /// (bytes loaded, bytes to load) while loading its weights.
    loading: Mutex<Option<(u64, u64)>>,
}

#[derive(Clone)]
struct Worker(Arc<WorkerState>);

#[tonic::async_trait]
impl Expert for Worker {
    async fn dispatch(&self, _: Request<DispatchRequest>) -> Result<Response<DispatchResponse>, Status> {
        Err(Status::unimplemented("not a data-plane test"))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Err(Status::unimplemented("not a data-plane test"))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let loading = self
            .0
            .loading
            .lock()
            .unwrap()
            .map(|(loaded_bytes, total_bytes)| LoadProgress { loaded_bytes, total_bytes });
        Ok(Response::new(InfoResponse { loading, ..InfoResponse::default() }))
    }

    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let epoch = request.into_inner().plan.unwrap().epoch;
        self.0.calls.lock().unwrap().push(format!("prepare {epoch}"));
        // As the real worker: the plan in force is held already (tests keep one plan per epoch).
        if epoch == *self.0.in_force.lock().unwrap() {
            return Ok(Response::new(PrepareResponse { loaded: 0 }));
        }
        if self.0.fail_prepare {
            return Err(Status::resource_exhausted("out of memory"));
        }
        if epoch < *self.0.in_force.lock().unwrap() {
            return Err(Status::failed_precondition("not newer than the epoch in force"));
        }
        *self.0.prepared.lock().unwrap() = Some(epoch);
        Ok(Response::new(PrepareResponse { loaded: 1 }))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        let epoch = request.into_inner().epoch;
        self.0.calls.lock().unwrap().push(format!("release {epoch}"));
        let mut prepared = self.0.prepared.lock().unwrap();
        let mut in_force = self.0.in_force.lock().unwrap();
        if *prepared == Some(epoch) || *in_force == epoch {
            *in_force = epoch;
            *prepared = None;
            Ok(Response::new(ReleaseResponse { released: 0 }))
        } else {
            Err(Status::failed_precondition("neither prepared nor in force"))
        }
    }
}

async fn listen(routes: tonic::service::Routes) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder().add_routes(routes);
    tokio::spawn(server.serve_with_incoming(kubemoe_api::conn::incoming(listener, None)));
    url
}

/// The plan the placement ConfigMap holds.
fn stored(api: &FakeApi) -> PlacementPlan {
    let config_map: ConfigMap = api.object(PLACEMENT);
    serde_json::from_str(&config_map.data.unwrap()[placement::KEY]).unwrap()
}

/// Routers and workers of `tiny` serving the placement in its ConfigMap.
struct Fleet {
    routers: Vec<Arc<RouterState>>,
    workers: Vec<Arc<WorkerState>>,
    cluster: Cluster,
}

impl Fleet {
    async fn start(
        api: &FakeApi,
        routers: usize,
        load: &[u64],
        refuse: Option<u64>,
        failing_worker: Option<usize>,
    ) -> Self {
        Self::with_workers(api, routers, load, refuse, failing_worker, stored(api).workers as usize).await
    }

    /// With `workers` workers, however many the placement names (a resize adds or removes some).
    async fn with_workers(
        api: &FakeApi,
        routers: usize,
        load: &[u64],
        refuse: Option<u64>,
        failing_worker: Option<usize>,
        workers: usize,
    ) -> Self {
        let plan = stored(api);
        let routers: Vec<Arc<RouterState>> = (0..routers)
            .map(|_| {
                Arc::new(RouterState {
                    plan: Mutex::new(plan.clone()),
                    load: Mutex::new(load.to_vec()),
                    refuse,
                    commits: Mutex::default(),
                    api: api.clone(),
                    down: Mutex::default(),
                })
            })
            .collect();
        let workers: Vec<Arc<WorkerState>> = (0..workers)
            .map(|rank| {
                let state =
                    WorkerState { fail_prepare: failing_worker == Some(rank), ..WorkerState::default() };
                *state.in_force.lock().unwrap() = plan.epoch;
                Arc::new(state)
            })
            .collect();
        let mut router_urls = Vec::new();
        for r in &routers {
            router_urls
                .push(listen(tonic::service::Routes::new(BalancerServer::new(Router(r.clone())))).await);
        }
        let mut worker_urls = Vec::new();
        for w in &workers {
            worker_urls.push(listen(tonic::service::Routes::new(ExpertServer::new(Worker(w.clone())))).await);
        }
        let cluster =
            Cluster::new(&worker_urls, &router_urls, &kubemoe_api::auth::Bearer(None), None).unwrap();
        Fleet { routers, workers, cluster }
    }

    fn router_epochs(&self) -> Vec<u64> {
        self.routers.iter().map(|r| r.plan.lock().unwrap().epoch).collect()
    }

    /// (epoch in force, epoch prepared) of every worker.
    fn worker_epochs(&self) -> Vec<(u64, Option<u64>)> {
        self.workers.iter().map(|w| (*w.in_force.lock().unwrap(), *w.prepared.lock().unwrap())).collect()
    }

    fn worker_calls(&self) -> Vec<Vec<String>> {
        self.workers.iter().map(|w| w.calls.lock().unwrap().clone()).collect()
    }
}

/// 16 experts on 2 workers, experts 0–2 (all on worker 0 at first) hot: 350 against 80 tokens.
/// The best any placement does is 260 against 170 (imbalance 1.21), above the threshold of 1.1.
const SKEWED: [u64; 16] = [100, 100, 100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10];

/// `tiny` on 2 workers, reconciled, and Ready.
async fn ready() -> (World, Target) {
    ready_with(json!({
        "model": {"source": "builtin:tiny"}, "workers": {"replicas": 2},
        "balancing": {"imbalanceThreshold": 1.1, "cooldown": "1m"},
    }))
    .await
}

/// A ModelDeployment of `spec`, reconciled, and Ready.
async fn ready_with(spec: serde_json::Value) -> (World, Target) {
    let world = World::new(spec);
    world.reconcile().await;
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    let target =
        Target::of(&world.md().spec, &ModelConfig::preset("tiny").unwrap().unwrap()).unwrap().unwrap();
    world.writes();
    (world, target)
}

fn rebalancing(md: &ModelDeployment) -> (String, String, String) {
    let c = status::find(md.status.as_ref(), status::REBALANCING).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn metric(world: &World, line: &str) -> bool {
    world.context.metrics.encode().lines().any(|l| l == line)
}

#[tokio::test]
async fn a_skewed_load_moves_experts_to_a_new_epoch_recorded_in_config_map_and_status() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 2, &SKEWED, None, None).await;

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 1 });
    assert_eq!(
        world.writes(),
        [status_write(), EVENT.into(), patch(PLACEMENT), status_write(), EVENT.into()],
        "Rebalancing=True, the new plan, the outcome"
    );
    // Every pod and the ConfigMap are on epoch 1, the same plan.
    let plan = stored(&world.api);
    assert_eq!(plan.epoch, 1);
    assert_eq!(fleet.router_epochs(), [1, 1]);
    assert!(fleet.routers.iter().all(|r| *r.plan.lock().unwrap() == plan));
    assert_eq!(fleet.worker_epochs(), [(1, None), (1, None)]);
    // The second prepare, just before the commits, catches up a worker that restarted meanwhile.
    let calls = ["prepare 1", "prepare 1", "release 1"];
    assert_eq!(fleet.worker_calls(), [calls, calls]);
    // Routers committed while the status said Rebalancing and the ConfigMap already held epoch 1.
    for router in &fleet.routers {
        assert_eq!(*router.commits.lock().unwrap(), [(1, "True".to_string(), 1)]);
    }
    // Written as the controller writes it: owned, labelled, hashed over the content.
    let md = world.md();
    let config_map: ConfigMap = world.api.object(PLACEMENT);
    let expected = desired::placement_config_map(&md, &plan).unwrap();
    assert_eq!(config_map.annotations()[HASH_ANNOTATION], expected.annotations()[HASH_ANNOTATION]);
    assert_eq!(config_map.owner_references()[0].uid, md.uid().unwrap());

    let placement = md.status.as_ref().unwrap().placement.clone().unwrap();
    assert_eq!(placement.epoch, 1);
    assert_eq!(placement.imbalance, Some(1.21));
    assert!(placement.experts_moved.unwrap() > 0);
    assert!(placement.last_rebalance_time.is_some());
    let (state, reason, message) = rebalancing(&md);
    assert_eq!((state.as_str(), reason.as_str()), ("False", "Rebalanced"));
    assert!(message.contains("epoch 1 in force: imbalance 1.63 -> 1.21"), "{message}");
    assert_eq!(status::find(md.status.as_ref(), status::READY).unwrap().status, "True");
    assert_eq!(
        world.events()[2..],
        [("Normal".into(), "Rebalancing".into()), ("Normal".into(), "Rebalanced".into())]
    );
    assert!(metric(&world, r#"kubemoe_operator_rebalances_total{result="rebalanced"} 1"#));
    let gauge = r#"kubemoe_operator_imbalance{namespace="ml",name="tiny"} "#;
    let after =
        world.context.metrics.encode().lines().find_map(|l| l.strip_prefix(gauge)?.parse::<f64>().ok());
    assert!((after.unwrap() - 260.0 / 215.0).abs() < 1e-9, "{after:?}");

    // The controller keeps the rebalanced placement and status: a reconcile writes nothing.
    assert_eq!(world.reconcile().await, Vec::<String>::new());
    // Still above the threshold, but inside the cooldown that the status records.
    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert!(matches!(polled, Polled::Kept { reason: "cooling down", .. }), "{polled:?}");
    assert_eq!(world.writes(), Vec::<String>::new(), "nothing changed, nothing written");
}

#[tokio::test]
async fn a_failed_commit_puts_the_config_map_back_and_says_why() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 1, &SKEWED, Some(1), None).await;
    let before = stored(&world.api);

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Failed { epoch: 1, settled: true });
    assert_eq!(
        world.writes(),
        [status_write(), EVENT.into(), patch(PLACEMENT), status_write(), EVENT.into(), patch(PLACEMENT)],
        "the new plan went in before the commit and came back out after it failed"
    );
    assert_eq!(stored(&world.api), before);
    assert_eq!(fleet.router_epochs(), [0]);
    // Workers dropped the experts they had prepared: the settle after the failure converges
    // on the routers' epoch 0 (prepare 0 is a no-op there), then releases it.
    assert_eq!(fleet.worker_epochs(), [(0, None), (0, None)]);
    assert_eq!(fleet.worker_calls()[0], ["prepare 1", "prepare 1", "prepare 0", "release 0"]);

    let md = world.md();
    let (state, reason, message) = rebalancing(&md);
    assert_eq!((state.as_str(), reason.as_str()), ("False", "MigrationFailed"));
    assert!(
        message.contains("epoch 1 failed: commit on http://127.0.0.1:") && message.contains("cannot switch"),
        "{message}"
    );
    let placement = md.status.unwrap().placement.unwrap();
    assert_eq!((placement.epoch, placement.last_rebalance_time), (0, None));
    // Epoch 1 is spent: the next plan will be epoch 2 (the reconcile below keeps this).
    assert_eq!(placement.highest_epoch, Some(1));
    assert_eq!(world.events().last().unwrap(), &("Warning".to_string(), "MigrationFailed".to_string()));
    assert!(metric(&world, r#"kubemoe_operator_rebalances_total{result="failed"} 1"#));
    assert!(!metric(&world, r#"result="settled""#), "the settle after a failure is part of the failure");
    assert_eq!(world.reconcile().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_prepare_never_reaches_routers_or_the_config_map() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 1, &SKEWED, None, Some(1)).await;

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Failed { epoch: 1, settled: true });
    assert_eq!(world.writes(), [status_write(), EVENT.into(), status_write(), EVENT.into()]);
    assert_eq!(stored(&world.api).epoch, 0);
    assert!(fleet.routers[0].commits.lock().unwrap().iter().all(|(epoch, ..)| *epoch == 0));
    assert_eq!(fleet.worker_epochs(), [(0, None), (0, None)]);
    let (_, reason, message) = rebalancing(&world.md());
    assert_eq!(reason, "MigrationFailed");
    assert!(message.contains("prepare on") && message.contains("out of memory"), "{message}");
}

/// The state an operator that stopped after writing epoch 1 into the ConfigMap leaves:
/// `Rebalancing=True`, workers holding epoch 1 prepared, the ConfigMap at epoch 1.
async fn stopped_mid_migration(world: &World, fleet: &Fleet) -> PlacementPlan {
    let md = world.md();
    let current = stored(&world.api);
    let mut slots = current.phy_to_log();
    for layer in &mut slots {
        layer.swap(1, 9);
    }
    let next = current.with_slots(1, slots);
    let proposal = Proposal {
        plan: next.clone(),
        imbalance_before: 1.6,
        imbalance_after: 1.2,
        moved: 2,
        recovering: vec![],
        resized_from: None,
    };
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    world.api.set_status(MD, serde_json::to_value(status::rebalancing(&md, &proposal, &now)).unwrap());
    world
        .api
        .insert(PLACEMENT, serde_json::to_value(desired::placement_config_map(&md, &next).unwrap()).unwrap());
    for worker in &fleet.workers {
        *worker.prepared.lock().unwrap() = Some(1);
    }
    next
}

#[tokio::test]
async fn the_next_poll_rolls_back_a_migration_no_router_committed() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 2, &SKEWED, None, None).await;
    stopped_mid_migration(&world, &fleet).await;
    world.writes();

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Settled { epoch: 0 });
    assert_eq!(world.writes(), [patch(PLACEMENT), status_write()]);
    assert_eq!(stored(&world.api).epoch, 0);
    assert_eq!(fleet.router_epochs(), [0, 0]);
    assert_eq!(fleet.worker_epochs(), [(0, None), (0, None)]);
    let (state, reason, message) = rebalancing(&world.md());
    assert_eq!((state.as_str(), reason.as_str()), ("False", "Interrupted"));
    assert!(message.contains("agree on epoch 0"), "{message}");
    assert!(metric(&world, r#"kubemoe_operator_rebalances_total{result="settled"} 1"#));
}

#[tokio::test]
async fn the_next_poll_finishes_a_migration_some_routers_committed() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 2, &SKEWED, None, None).await;
    let next = stopped_mid_migration(&world, &fleet).await;
    *fleet.routers[1].plan.lock().unwrap() = next.clone();
    world.writes();

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Settled { epoch: 1 });
    assert_eq!(world.writes(), [status_write()], "the ConfigMap already holds epoch 1");
    assert_eq!(stored(&world.api), next);
    assert_eq!(fleet.router_epochs(), [1, 1]);
    assert_eq!(fleet.worker_epochs(), [(1, None), (1, None)]);
    assert_eq!(rebalancing(&world.md()).1, "Interrupted");
}

#[tokio::test]
async fn a_kept_placement_writes_the_imbalance_once_and_keeps_a_concurrent_controller_write() {
    let (world, target) = ready().await;
    let fleet = Fleet::start(&world.api, 1, &[10; 16], None, None).await;

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Kept { imbalance: Some(1.0), reason: "balanced" });
    assert_eq!(world.writes(), [status_write()]);
    assert_eq!(world.md().status.unwrap().placement.unwrap().imbalance, Some(1.0));
    poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(world.writes(), Vec::<String>::new(), "the same imbalance is not written again");

    // The controller writes the status after the rebalancer read it: the rebalancer's write is
    // refused, it reads again, and both changes stay.
    let read = world.md();
    {
        let mut state = world.api.state();
        let stored = state.objects.get_mut(MD).unwrap();
        stored["status"]["routers"]["replicas"] = 2.into();
        stored["metadata"]["resourceVersion"] = "999999".into();
    }
    *fleet.routers[0].load.lock().unwrap() =
        vec![12, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10];
    let polled = poll(&world.context, &read, &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Kept { imbalance: Some(1.0123456790123457), reason: "balanced" });
    assert_eq!(world.writes(), [status_write(), status_write()]);
    let status = world.md().status.unwrap();
    assert_eq!(status.routers.unwrap().replicas, 2);
    assert_eq!(status.placement.unwrap().imbalance, Some(1.01));
}

#[tokio::test]
async fn a_worker_down_gets_a_recovery_epoch_and_is_named_in_status_events_and_metrics() {
    // 16 experts in 20 slots on 4 workers: 0-4, 5-9, 10-14 and 15, 0-3 (so 0-3 twice).
    let (world, target) = ready_with(json!({
        "model": {"source": "builtin:tiny"}, "workers": {"replicas": 4}, "experts": {"redundant": 4},
        "balancing": {"imbalanceThreshold": 1.1, "cooldown": "1m"},
    }))
    .await;
    let fleet = Fleet::start(&world.api, 1, &[10; 16], None, None).await;
    fleet.routers[0].down.lock().unwrap().push(1);
    let before = stored(&world.api);

    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 1 });
    assert_eq!(
        world.writes(),
        [
            status_write(),
            EVENT.into(),
            patch(PLACEMENT),
            status_write(),
            EVENT.into(),
            status_write(),
            EVENT.into()
        ],
        "Rebalancing=True, the recovery plan, its outcome, then Degraded"
    );
    // The worker down was never called; its slots did not change.
    assert!(fleet.worker_calls()[1].is_empty());
    assert_eq!(fleet.worker_epochs(), [(1, None), (0, None), (1, None), (1, None)]);
    let plan = stored(&world.api);
    assert_eq!(plan.held(1), before.held(1));
    // Worker 1's experts 5-8 took the second copies of 0-3 on worker 3; 4 slots for 5 experts
    // leave one lost in each MoE layer.
    let lost = rebalance::Degraded::of(&plan, vec![1]);
    assert_eq!(lost.lost, vec![(1, vec![9]), (2, vec![9])]);
    let md = world.md();
    let status = md.status.as_ref().unwrap();
    let placement = status.placement.as_ref().unwrap();
    assert_eq!((placement.workers_down.as_slice(), placement.lost_experts), (&[1][..], Some(2)));
    let degraded = status::find(Some(status), status::DEGRADED).unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", status::WORKERS_DOWN));
    assert_eq!(
        degraded.message,
        "workers down: 1; experts with no live copy (requests needing them fail): layer 1: 9; layer 2: 9"
    );
    assert_eq!(status.phase, Some(kubemoe_operator::deployment::Phase::Degraded));
    let (_, reason, message) = rebalancing(&md);
    assert_eq!(reason, "Rebalanced");
    assert!(message.contains("placement epoch 1 in force"), "{message}");
    assert_eq!(
        world.events()[2..],
        [
            ("Normal".into(), "Rebalancing".into()),
            ("Normal".into(), "Rebalanced".into()),
            ("Warning".into(), "WorkersDown".into())
        ]
    );
    assert!(metric(&world, r#"kubemoe_operator_rebalances_total{result="recovered"} 1"#));
    assert!(metric(&world, r#"kubemoe_operator_workers_down{namespace="ml",name="tiny"} 1"#));
    // The controller keeps what the rebalancer found: a reconcile writes nothing.
    assert_eq!(world.reconcile().await, Vec::<String>::new());
    // Still down, nothing spare: nothing moves, nothing is written.
    let polled = poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert!(matches!(polled, Polled::Kept { imbalance: None, .. }), "{polled:?}");
    assert_eq!(world.writes(), Vec::<String>::new());

    // Back: Degraded clears, the event says so.
    fleet.routers[0].down.lock().unwrap().clear();
    poll(&world.context, &world.md(), &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(world.events().last().unwrap(), &("Normal".to_string(), "WorkersBack".to_string()));
    let md = world.md();
    let status = md.status.as_ref().unwrap();
    assert!(status.placement.as_ref().unwrap().workers_down.is_empty());
    assert_eq!(status::find(Some(status), status::DEGRADED).unwrap().status, "False");
    assert_eq!(status.phase, Some(kubemoe_operator::deployment::Phase::Ready));
    assert!(metric(&world, r#"kubemoe_operator_workers_down{namespace="ml",name="tiny"} 0"#));
    world.writes();
    assert_eq!(world.reconcile().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_resize_is_migrated_live_with_balancing_disabled_and_recorded() {
    let (world, _) = ready_with(json!({
        "model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}, "balancing": {"enabled": false},
    }))
    .await;
    world.edit(|spec| spec["workers"]["replicas"] = 4.into());
    world.reconcile().await;
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    world.writes();
    let md = world.md();
    assert!(kubemoe_operator::rebalancer::eligible(&md));
    let target = Target::of(&md.spec, &ModelConfig::preset("tiny").unwrap().unwrap()).unwrap().unwrap();
    // The two new workers are up, holding nothing yet.
    let fleet = Fleet::with_workers(&world.api, 1, &SKEWED, None, None, 4).await;

    let polled = poll(&world.context, &md, &target, &fleet.cluster, false).await.unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 1 });
    assert_eq!(
        world.writes(),
        [status_write(), EVENT.into(), patch(PLACEMENT), status_write(), EVENT.into()]
    );
    let plan = stored(&world.api);
    assert_eq!((plan.epoch, plan.workers, plan.slots_per_worker), (1, 4, 4));
    assert_eq!(*fleet.routers[0].plan.lock().unwrap(), plan);
    assert_eq!(fleet.worker_epochs(), [(1, None); 4]);
    let md = world.md();
    let placement = md.status.as_ref().unwrap().placement.clone().unwrap();
    assert_eq!((placement.epoch, placement.workers), (1, Some(4)));
    assert_eq!(
        world.events()[world.events().len() - 2..],
        [("Normal".into(), "Rebalancing".into()), ("Normal".into(), "Rebalanced".into())]
    );
    // Done: nothing is due, and the controller keeps what the rebalancer wrote.
    assert!(!kubemoe_operator::rebalancer::eligible(&md));
    assert_eq!(world.reconcile().await, Vec::<String>::new());
}

#[tokio::test]
async fn workers_loading_their_weights_show_in_the_status_until_they_are_ready() {
    use kubemoe_operator::loading::{due, record};
    let world = World::new(json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}}));
    world.reconcile().await;
    world.writes();
    assert!(due(&world.md()), "workers not ready");
    let fleet = Fleet::start(&world.api, 1, &SKEWED, None, None).await;
    let set =
        |rank: usize, loading: Option<(u64, u64)>| *fleet.workers[rank].loading.lock().unwrap() = loading;
    set(0, Some((1 << 30, 4 << 30)));
    set(1, Some((2 << 30, 4 << 30)));

    let found = record(&world.context, &world.md(), &fleet.cluster).await.unwrap();
    let expected =
        LoadingStatus { workers: 2, loaded_bytes: 3 << 30, total_bytes: 8 << 30, progress: "37%".into() };
    assert_eq!(found.as_ref(), Some(&expected));
    assert_eq!(world.writes(), [status_write()]);
    let md = world.md();
    assert_eq!(md.status.as_ref().unwrap().loading.as_ref(), Some(&expected));
    // The rest of the status is the controller's, unchanged.
    assert_eq!(status::find(md.status.as_ref(), status::READY).unwrap().reason, "WorkersNotReady");
    // A few bytes further, the same percent: nothing written. The controller keeps it while
    // workers load.
    set(1, Some(((2 << 30) + (1 << 20), 4 << 30)));
    record(&world.context, &world.md(), &fleet.cluster).await.unwrap();
    assert!(world.writes().is_empty());
    assert!(world.reconcile().await.is_empty());
    assert_eq!(world.md().status.unwrap().loading, Some(expected));

    // One worker done (it serves), the other further on.
    set(0, None);
    set(1, Some((3 << 30, 4 << 30)));
    record(&world.context, &world.md(), &fleet.cluster).await.unwrap();
    let loading = world.md().status.unwrap().loading.unwrap();
    assert_eq!((loading.workers, loading.progress.as_str()), (1, "75%"));

    // Both ready: the controller clears it, and the poll is no longer due.
    set(1, None);
    world.api.mark_ready("ml", "tiny");
    world.reconcile().await;
    let md = world.md();
    assert_eq!(md.status.as_ref().unwrap().loading, None);
    assert_eq!(status::find(md.status.as_ref(), status::READY).unwrap().status, "True");
    assert!(!due(&md));
    // A poll finding none loading clears a leftover too.
    world.writes();
    let mut leftover = serde_json::to_value(md.status.unwrap()).unwrap();
    leftover["loading"] = json!({"workers": 1, "loadedBytes": 1, "totalBytes": 2, "progress": "50%"});
    world.api.set_status(MD, leftover);
    assert!(due(&world.md()));
    assert_eq!(record(&world.context, &world.md(), &fleet.cluster).await.unwrap(), None);
    assert_eq!(world.md().status.unwrap().loading, None);
}
