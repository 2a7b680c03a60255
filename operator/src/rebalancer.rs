//! The operator's rebalancer (DESIGN §4): next to the controller, it polls the routers of every
//! ready ModelDeployment with `balancing.enabled` once per `balancing.interval` and, when
//! [`decide`] proposes a better placement, migrates to it and records it in the placement
//! ConfigMap, the status and events. [`triage`] and the [`status`] functions are the pure rules;
//! [`poll`] does one deployment's I/O, [`run`] the loop.
//!
//! One rebalance from epoch N to N+1, in order:
//! 1. status `Rebalancing=True` (reason `Migrating`) and event `Rebalancing`;
//! 2. every worker prepares N+1: loads the experts N+1 places on it, still serving N's;
//! 3. the placement ConfigMap gets N+1;
//! 4. every router commits N+1 (switches between two of its steps);
//! 5. every worker releases: N+1 in force, N's experts that N+1 does not place there dropped;
//! 6. status `placement` (epoch N+1, imbalance, expertsMoved, lastRebalanceTime) and
//!    `Rebalancing=False` (reason `Rebalanced`), event `Rebalanced`.
//!
//! Crash safety. Workers hold the union of N and N+1 from their prepare to their release, so
//! routers on either epoch are served meanwhile; a pod that (re)starts serves what the ConfigMap
//! holds, and only that. A crash, a lost lease or a poll past [`POLL_TIMEOUT`] during
//! - 1–2 leaves every pod routing by and serving N, and the ConfigMap at N; some workers hold
//!   N+1's experts too. Safe: nothing routes by N+1.
//! - 3–4 leaves the ConfigMap at N+1 and some or all routers at N: the one unsafe window, where
//!   a worker restarting would hold N+1's experts only while routers at N send it others. It
//!   spans one commit (milliseconds to a step), which is why the ConfigMap is written after the
//!   slow prepare rather than before it; a router restarting reads N+1, which workers hold.
//! - 5 leaves routers and the ConfigMap at N+1; workers not yet released hold the union.
//! - 6 leaves everything at N+1; only the status lags.
//!
//! Whatever is left over is settled by the next poll before it judges load ([`triage`]): a
//! migration is known unfinished when `Rebalancing=True` outlived the operator that set it or
//! this process saw one fail, and shows as a ConfigMap that differs from what the routers route
//! by, or as routers that disagree. The ConfigMap, routers and workers are then converged on one
//! plan with [`Cluster::finish`], which is idempotent: the routers' plan when they agree (a
//! ConfigMap ahead of them is put back and workers drop what they prepared; one behind them
//! catches up; workers not yet released are released), the ConfigMap's N+1 when only some
//! routers committed it (they cannot go back). A failed migration is settled the same way at
//! once, rather than an interval later.
//!
//! Limits: kubelet refreshes a mounted ConfigMap after a delay (up to about a minute), so a pod
//! restarting right after step 3 may still read N; a router that does shows as split routers
//! and is committed forward, a worker is not detected. Deployments are polled one after the
//! other, so a long migration delays the polls of the others.

use crate::controller::{self, Context};
use crate::desired::{self, Names};
use crate::http::{DeploymentLabel, Metrics, ResultLabel};
use crate::layout::{self, Layout};
use crate::model::ModelConfig;
use crate::rebalance::{decide, Cluster, Decision, Policy, Proposal};
use crate::status;
use crate::{Error, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use kubemoe_api::deployment::{parse_duration, ModelDeploymentSpec, ModelDeploymentStatus, PlacementPolicy};
use kubemoe_api::placement::PlacementPlan;
use kubemoe_api::ModelDeployment;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the loop looks for deployments whose interval has elapsed.
const TICK: Duration = Duration::from_secs(5);
/// Longest one deployment's poll may take, migration included (a V3 worker loads its new
/// experts for minutes). A poll past it is dropped as a crash would be, and settled next time.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(900);
/// Status writes refused as outdated (the controller wrote in between) before the poll fails.
const STATUS_ATTEMPTS: usize = 3;

/// What a poll needs to know of a deployment besides its pods.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub layout: Layout,
    pub policy: Policy,
}

impl Target {
    /// `None` when `spec` cannot be served with `model` (the controller reports why).
    pub fn of(spec: &ModelDeploymentSpec, model: &ModelConfig) -> Result<Option<Target>> {
        let Ok(layout) = layout::layout(spec, model) else { return Ok(None) };
        let groups = match spec.experts.placement {
            // Keeps each expert group's experts together (layout() refuses it without groups).
            PlacementPolicy::Hierarchical => model.n_group as usize,
            PlacementPolicy::Global => 1,
        };
        // One node: worker ranks are not pinned to nodes, so there is no node level to pack for.
        let policy = Policy::new(&spec.balancing, groups, 1)?;
        Ok(Some(Target { layout, policy }))
    }
}

/// Whether the rebalancer looks at `md` at all: balancing enabled, Ready, not being deleted.
pub fn eligible(md: &ModelDeployment) -> bool {
    md.spec.balancing.enabled
        && md.metadata.deletion_timestamp.is_none()
        && status::find(md.status.as_ref(), status::READY).is_some_and(|c| c.status == "True")
}

/// gRPC URLs of the router pods that may route a step: every Running pod with an IP, ready or
/// not, terminating or not, since each of them must commit a new plan.
pub fn router_urls(pods: &[Pod], port: i32) -> Vec<String> {
    let mut urls: Vec<String> =
        pods.iter()
            .filter_map(|pod| pod.status.as_ref())
            .filter(|status| status.phase.as_deref() == Some("Running"))
            .filter_map(|status| status.pod_ip.as_deref())
            .map(|ip| {
                if ip.contains(':') {
                    format!("http://[{ip}]:{port}")
                } else {
                    format!("http://{ip}:{port}")
                }
            })
            .collect();
    urls.sort();
    urls
}

/// Time since the last rebalance or failed migration `status` records (`None`: neither). Read from the status so that
/// the cooldown outlives operator restarts; a clock behind the recorded time counts as now.
pub fn since_last_rebalance(status: Option<&ModelDeploymentStatus>, now: Timestamp) -> Option<Duration> {
    let status = status?;
    let done = status.placement.as_ref().and_then(|p| p.last_rebalance_time.as_ref());
    // A failed migration starts the cooldown too: one failing for a lasting reason (a worker
    // out of memory) is not retried, reloading experts everywhere, every interval.
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == status::REBALANCING && c.reason == "MigrationFailed")
        .map(|c| &c.last_transition_time);
    done.into_iter()
        .chain(failed)
        .map(|at| Duration::try_from(now.duration_since(at.0)).unwrap_or(Duration::ZERO))
        .min()
}

/// What the routers route by, as one load poll found it.
#[derive(Clone, Debug, PartialEq)]
pub enum Routing {
    /// Every router routes by `plan`; `loads` are their summed token counts.
    Agreed { plan: PlacementPlan, loads: Vec<Vec<f64>> },
    /// Routers route by different epochs, `highest` the newest: a commit stopped midway.
    Split { highest: u64 },
}

/// What a poll does after looking.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing is left over: judge `loads` under `plan`.
    Judge { plan: PlacementPlan, loads: Vec<Vec<f64>> },
    /// First converge the ConfigMap, routers and workers on this plan.
    Settle(PlacementPlan),
}

/// The rule for left-overs (module docs): `stored` is the ConfigMap's plan; `unsettled` says a
/// migration is known not to have finished.
pub fn triage(stored: &PlacementPlan, routing: Routing, unsettled: bool) -> Result<Next> {
    match routing {
        // Agreeing routers are what serves. A ConfigMap ahead of them holds an epoch that no
        // router committed (a commit that stopped midway shows as split routers instead), so it
        // is put back to theirs, and workers drop what they prepared for it.
        Routing::Agreed { plan, .. } if unsettled || plan != *stored => Ok(Next::Settle(plan)),
        Routing::Agreed { plan, loads } => Ok(Next::Judge { plan, loads }),
        // Routers that committed cannot go back (commits only move forward): finish the epoch
        // the ConfigMap got just before the commits.
        Routing::Split { highest } if highest == stored.epoch => Ok(Next::Settle(stored.clone())),
        Routing::Split { highest } => Err(Error::Routers(format!(
            "routers route by epochs up to {highest} while the placement ConfigMap holds {}; \
             not a migration of this operator, nothing to settle",
            stored.epoch
        ))),
    }
}

/// What one poll did.
#[derive(Clone, Debug, PartialEq)]
pub enum Polled {
    /// Nothing to poll yet: the spec cannot be served, or the placement ConfigMap does not hold
    /// a plan of its layout yet (the controller sees to both).
    Waiting,
    Kept {
        imbalance: Option<f64>,
        reason: &'static str,
    },
    Rebalanced {
        epoch: u64,
    },
    /// The migration to `epoch` failed; `settled`: pods and ConfigMap agree again.
    Failed {
        epoch: u64,
        settled: bool,
    },
    /// What an earlier migration left unfinished was settled at `epoch`.
    Settled {
        epoch: u64,
    },
}

/// Polls every eligible ModelDeployment of `deployments` (the controller's store) whose
/// interval has elapsed, until `shutdown`. Stops at once, mid-migration too: the next leader
/// settles what is left (module docs), and one that lost its lease must stop writing.
pub async fn run(context: Arc<Context>, deployments: Store<ModelDeployment>, shutdown: CancellationToken) {
    let mut turns = Turns::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let all = deployments.state();
        turns.forget_deleted(&all.iter().map(|md| label(md)).collect(), &context.metrics);
        for md in all.iter().filter(|md| eligible(md)) {
            let key = label(md);
            // The schema admits only durations; a bad one fails the poll below with its field.
            let interval = parse_duration("balancing.interval", &md.spec.balancing.interval).unwrap_or(TICK);
            if !turns.due(&key, interval, Instant::now()) {
                continue;
            }
            let unsettled = turns.unsettled.contains(&key);
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                polled = tokio::time::timeout(POLL_TIMEOUT, turn(&context, md, unsettled)) => polled,
            };
            let object = controller::key(md);
            match polled {
                Ok(Ok(polled)) => {
                    tracing::debug!(%object, ?polled, "polled expert load");
                    if matches!(polled, Polled::Failed { settled: false, .. }) {
                        turns.unsettled.insert(key);
                    } else {
                        turns.unsettled.remove(&key);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(%object, error = %kubemoe_api::error_chain(&e), "rebalancer poll failed")
                }
                Err(_) => {
                    tracing::warn!(%object, timeout = ?POLL_TIMEOUT, "rebalancer poll timed out");
                    turns.unsettled.insert(key);
                }
            }
        }
    }
}

/// The loop's memory of each deployment.
#[derive(Default)]
struct Turns {
    polled: HashMap<DeploymentLabel, Instant>,
    /// Those whose last migration failed and has not been settled since.
    unsettled: HashSet<DeploymentLabel>,
}

impl Turns {
    /// Whether `key` is due at `now`; if so, counts it as polled.
    fn due(&mut self, key: &DeploymentLabel, interval: Duration, now: Instant) -> bool {
        let due = self.polled.get(key).is_none_or(|at| now.duration_since(*at) >= interval);
        if due {
            self.polled.insert(key.clone(), now);
        }
        due
    }

    fn forget_deleted(&mut self, live: &HashSet<DeploymentLabel>, metrics: &Metrics) {
        for gone in self.polled.keys().filter(|key| !live.contains(key)) {
            metrics.imbalance.remove(gone);
        }
        self.polled.retain(|key, _| live.contains(key));
        self.unsettled.retain(|key| live.contains(key));
    }
}

/// Finds `md`'s layout, workers and routers, then polls.
async fn turn(context: &Context, md: &ModelDeployment, unsettled: bool) -> Result<Polled> {
    let namespace = namespace(md);
    let Ok((_, model)) = controller::resolve_model(md, &context.client, &namespace).await? else {
        return Ok(Polled::Waiting);
    };
    let Some(target) = Target::of(&md.spec, &model)? else { return Ok(Polled::Waiting) };
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &namespace);
    let selector = desired::router_selector(&md.name_any());
    let routers = pods.list(&ListParams::default().labels(&selector)).await.map_err(|source| {
        Error::Kube { action: format!("listing the router pods of {}", controller::key(md)), source }
    })?;
    let cluster = Cluster::new(
        &desired::worker_addresses(md, target.layout.workers),
        &router_urls(&routers.items, md.spec.router.grpc_port),
    )?;
    poll(context, md, &target, &cluster, unsettled).await
}

/// One poll of `md`, whose workers and routers `cluster` reaches: settles what an earlier
/// migration left over, or judges the load and rebalances when [`decide`] says so.
/// `unsettled`: this process saw a migration of `md` fail and not settle. Kubernetes API and
/// load poll failures are errors; a failed migration is reported (status, event) and settled.
pub async fn poll(
    context: &Context,
    md: &ModelDeployment,
    target: &Target,
    cluster: &Cluster,
    unsettled: bool,
) -> Result<Polled> {
    let unsettled = unsettled || status::is_rebalancing(md.status.as_ref());
    let Some((stored, next)) = survey(context, md, target, cluster, unsettled).await? else {
        return Ok(Polled::Waiting);
    };
    // A layout change (workers, experts.redundant) is the controller's to roll out: a new
    // ConfigMap, then pods restarted onto it. Nothing to judge or settle until it is done.
    let routed = match &next {
        Next::Settle(plan) | Next::Judge { plan, .. } => plan,
    };
    if !controller::same_layout(&stored, &target.layout) || !controller::same_layout(routed, &target.layout) {
        return Ok(Polled::Waiting);
    }
    let (current, loads) = match next {
        Next::Settle(plan) => {
            settle(context, md, target, cluster, &stored, &plan).await?;
            count(&context.metrics, "settled");
            return Ok(Polled::Settled { epoch: plan.epoch });
        }
        Next::Judge { plan, loads } => (plan, loads),
    };
    let since_last = since_last_rebalance(md.status.as_ref(), Timestamp::now());
    // The planner takes up to a second on V3-sized problems: off the async threads that also
    // renew the lease and run the controller.
    let (policy, plan) = (target.policy.clone(), current.clone());
    let decision = tokio::task::spawn_blocking(move || decide(&policy, &plan, &loads, since_last))
        .await
        .map_err(Error::Planner)??;
    match decision {
        Decision::Keep { imbalance, reason } => {
            if let Some(imbalance) = imbalance {
                gauge(&context.metrics, md, imbalance);
                update_status(context, md, |md| status::measured(md, imbalance)).await?;
            }
            Ok(Polled::Kept { imbalance, reason })
        }
        Decision::Rebalance(proposal) => {
            rebalance(context, md, target, cluster, current.epoch, proposal).await
        }
    }
}

/// The ConfigMap's plan and what to do next; `None` while the ConfigMap holds no plan of the
/// spec's layout (the controller is replacing it).
async fn survey(
    context: &Context,
    md: &ModelDeployment,
    target: &Target,
    cluster: &Cluster,
    unsettled: bool,
) -> Result<Option<(PlacementPlan, Next)>> {
    let config_maps: Api<ConfigMap> = Api::namespaced(context.client.clone(), &namespace(md));
    let stored = controller::get(&config_maps, &Names::of(&md.name_any()).placement)
        .await?
        .as_ref()
        .and_then(controller::plan_of)
        .filter(|plan| controller::same_layout(plan, &target.layout));
    let Some(stored) = stored else { return Ok(None) };
    let routing = match cluster.load().await {
        Ok((loads, plan)) => Routing::Agreed { plan, loads },
        Err(Error::Unfinished { epoch, other, .. }) => Routing::Split { highest: epoch.max(other) },
        Err(e) => return Err(e),
    };
    let next = triage(&stored, routing, unsettled)?;
    Ok(Some((stored, next)))
}

/// Converges the ConfigMap (now holding `stored`), routers and workers on `plan`, and clears a
/// `Rebalancing=True` that a stopped operator left.
async fn settle(
    context: &Context,
    md: &ModelDeployment,
    target: &Target,
    cluster: &Cluster,
    stored: &PlacementPlan,
    plan: &PlacementPlan,
) -> Result<()> {
    let l = &target.layout;
    plan.validate_for(l.logical, &l.moe_layers, l.workers).map_err(|e| {
        Error::Routers(format!("the routers route by a placement that does not fit the spec: {e}"))
    })?;
    if plan != stored {
        write_placement(context, md, plan).await?;
    }
    cluster.finish(plan).await?;
    let now = Time(Timestamp::now());
    update_status(context, md, |md| status::settled(md, plan.epoch, &now)).await?;
    Ok(())
}

/// Migrates from epoch `from` to `proposal` in the order the module docs argue for.
async fn rebalance(
    context: &Context,
    md: &ModelDeployment,
    target: &Target,
    cluster: &Cluster,
    from: u64,
    proposal: Proposal,
) -> Result<Polled> {
    let plan = &proposal.plan;
    let now = Time(Timestamp::now());
    let md = update_status(context, md, |md| status::rebalancing(md, &proposal, &now)).await?;
    announce(context, &md, EventType::Normal, "Rebalancing").await;
    let migrated = async {
        cluster.prepare(plan, from).await?;
        write_placement(context, &md, plan).await?;
        cluster.finish(plan).await
    }
    .await;
    let now = Time(Timestamp::now());
    match migrated {
        Ok(()) => {
            count(&context.metrics, "rebalanced");
            gauge(&context.metrics, &md, proposal.imbalance_after);
            let md = update_status(context, &md, |md| status::rebalanced(md, &proposal, &now)).await?;
            announce(context, &md, EventType::Normal, "Rebalanced").await;
            Ok(Polled::Rebalanced { epoch: plan.epoch })
        }
        Err(error) => {
            count(&context.metrics, "failed");
            let error = kubemoe_api::error_chain(&error);
            let md = update_status(context, &md, |md| status::rebalance_failed(md, plan.epoch, &error, &now))
                .await?;
            announce(context, &md, EventType::Warning, "MigrationFailed").await;
            // At once rather than at the next poll: until then, a pod that restarts may read a
            // plan the routers do not route by.
            let settled = async {
                if let Some((stored, Next::Settle(back))) =
                    survey(context, &md, target, cluster, true).await?
                {
                    settle(context, &md, target, cluster, &stored, &back).await?;
                }
                Ok::<_, Error>(())
            }
            .await;
            if let Err(e) = &settled {
                let object = controller::key(&md);
                tracing::warn!(%object, error = %kubemoe_api::error_chain(e), "cannot settle the failed migration yet");
            }
            Ok(Polled::Failed { epoch: plan.epoch, settled: settled.is_ok() })
        }
    }
}

/// Writes `plan` into `md`'s placement ConfigMap as the controller writes it (same labels,
/// owner and content hash), so that reconciles keep it: they rewrite the ConfigMap only for a
/// new layout.
async fn write_placement(context: &Context, md: &ModelDeployment, plan: &PlacementPlan) -> Result<()> {
    let config_map = desired::placement_config_map(md, plan).map_err(|source| Error::Encode {
        what: format!("the placement of {}", controller::key(md)),
        source,
    })?;
    controller::apply(&Api::namespaced(context.client.clone(), &namespace(md)), &config_map).await?;
    Ok(())
}

/// Writes `compute(md)` as `md`'s status; when the controller wrote in between (the write is
/// refused as outdated), reads the ModelDeployment again and recomputes, so that neither
/// writer's change is lost. Returns the ModelDeployment as stored after.
async fn update_status(
    context: &Context,
    md: &ModelDeployment,
    compute: impl Fn(&ModelDeployment) -> ModelDeploymentStatus,
) -> Result<ModelDeployment> {
    let namespace = namespace(md);
    let api: Api<ModelDeployment> = Api::namespaced(context.client.clone(), &namespace);
    let mut md = md.clone();
    let mut attempt = 1;
    loop {
        match controller::write_status(&md, &context.client, &namespace, compute(&md)).await {
            Err(e) if e.is_conflict() && attempt < STATUS_ATTEMPTS => {
                md = api.get(&md.name_any()).await.map_err(|source| Error::Kube {
                    action: format!("reading ModelDeployment {}", controller::key(&md)),
                    source,
                })?;
                attempt += 1;
            }
            written => return written,
        }
    }
}

/// Publishes an event whose note is the `Rebalancing` condition's message.
async fn announce(context: &Context, md: &ModelDeployment, type_: EventType, reason: &str) {
    let note =
        status::find(md.status.as_ref(), status::REBALANCING).map(|c| c.message.clone()).unwrap_or_default();
    controller::publish(context, md, type_, reason, "Rebalance", note).await;
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics.rebalances.get_or_create(&ResultLabel { result }).inc();
}

fn gauge(metrics: &Metrics, md: &ModelDeployment, imbalance: f64) {
    metrics.imbalance.get_or_create(&label(md)).set(imbalance);
}

fn label(md: &ModelDeployment) -> DeploymentLabel {
    DeploymentLabel { namespace: namespace(md), name: md.name_any() }
}

fn namespace(md: &ModelDeployment) -> String {
    md.namespace().unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use kubemoe_api::deployment::PlacementStatus;

    fn plan(epoch: u64) -> PlacementPlan {
        PlacementPlan { epoch, ..PlacementPlan::initial(2, 8, 16, &[1, 2]) }
    }

    fn agreed(epoch: u64) -> Routing {
        Routing::Agreed { plan: plan(epoch), loads: vec![vec![1.0; 16]; 2] }
    }

    #[test]
    fn triage_judges_only_when_nothing_is_left_over() {
        assert!(
            matches!(triage(&plan(3), agreed(3), false).unwrap(), Next::Judge { plan, .. } if plan.epoch == 3)
        );
        // Known unfinished (Rebalancing=True left over, or a failure seen): release the epoch
        // in force on every worker even though the ConfigMap and routers agree.
        assert_eq!(triage(&plan(3), agreed(3), true).unwrap(), Next::Settle(plan(3)));
        // ConfigMap ahead of the routers (stopped before any commit): back to the routers' plan.
        assert_eq!(triage(&plan(4), agreed(3), false).unwrap(), Next::Settle(plan(3)));
        // ConfigMap behind them: it catches up.
        assert_eq!(triage(&plan(3), agreed(4), false).unwrap(), Next::Settle(plan(4)));
        // Some routers committed the ConfigMap's epoch: forward.
        assert_eq!(triage(&plan(4), Routing::Split { highest: 4 }, false).unwrap(), Next::Settle(plan(4)));
        assert!(triage(&plan(4), Routing::Split { highest: 6 }, false).is_err());
    }

    #[test]
    fn eligible_needs_balancing_ready_and_no_deletion() {
        let mut md = ModelDeployment::new(
            "m",
            serde_json::from_value(
                serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}}),
            )
            .unwrap(),
        );
        assert!(!eligible(&md), "no status yet");
        md.status = Some(ModelDeploymentStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: status::READY.into(),
                status: "True".into(),
                reason: "AllReplicasReady".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..ModelDeploymentStatus::default()
        });
        assert!(eligible(&md));
        md.spec.balancing.enabled = false;
        assert!(!eligible(&md));
        md.spec.balancing.enabled = true;
        md.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert!(!eligible(&md));
    }

    #[test]
    fn routers_are_the_running_pods_with_an_ip() {
        let pod = |phase: &str, ip: Option<&str>| Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(str::to_string),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        let pods = [
            pod("Running", Some("10.0.0.9")),
            pod("Pending", None),
            pod("Running", None),
            pod("Succeeded", Some("10.0.0.7")),
            pod("Running", Some("fd00::1")),
            pod("Running", Some("10.0.0.2")),
        ];
        assert_eq!(
            router_urls(&pods, 50051),
            ["http://10.0.0.2:50051", "http://10.0.0.9:50051", "http://[fd00::1]:50051"]
        );
    }

    #[test]
    fn the_cooldown_runs_from_the_recorded_rebalance() {
        let now: Timestamp = "2025-01-01T00:10:00Z".parse().unwrap();
        let status = |at: Option<&str>| ModelDeploymentStatus {
            placement: Some(PlacementStatus {
                last_rebalance_time: at.map(|t| Time(t.parse().unwrap())),
                ..PlacementStatus::default()
            }),
            ..ModelDeploymentStatus::default()
        };
        assert_eq!(since_last_rebalance(None, now), None);
        assert_eq!(since_last_rebalance(Some(&status(None)), now), None);
        let at = status(Some("2025-01-01T00:08:30Z"));
        assert_eq!(since_last_rebalance(Some(&at), now), Some(Duration::from_secs(90)));
        let ahead = status(Some("2025-01-01T00:11:00Z"));
        assert_eq!(since_last_rebalance(Some(&ahead), now), Some(Duration::ZERO));
        // A later failure restarts the cooldown; a successful rebalance's reason does not.
        let failure = |reason: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: status::REBALANCING.into(),
            status: "False".into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time("2025-01-01T00:09:50Z".parse().unwrap()),
        };
        let mut failed = status(Some("2025-01-01T00:08:30Z"));
        failed.conditions.push(failure("MigrationFailed"));
        assert_eq!(since_last_rebalance(Some(&failed), now), Some(Duration::from_secs(10)));
        failed.placement = None;
        assert_eq!(since_last_rebalance(Some(&failed), now), Some(Duration::from_secs(10)));
        failed.conditions[0] = failure("Rebalanced");
        assert_eq!(since_last_rebalance(Some(&failed), now), None);
    }

    #[test]
    fn hierarchical_placement_plans_with_the_model_s_groups() {
        let tiny = ModelConfig::preset("tiny").unwrap().unwrap();
        let spec = |placement: &str| -> ModelDeploymentSpec {
            serde_json::from_value(serde_json::json!({"model": {"source": "builtin:tiny"},
                "workers": {"replicas": 2}, "experts": {"placement": placement}}))
            .unwrap()
        };
        let target = Target::of(&spec("hierarchical"), &tiny).unwrap().unwrap();
        assert_eq!((target.policy.groups, target.policy.nodes), (4, 1));
        assert_eq!(Target::of(&spec("global"), &tiny).unwrap().unwrap().policy.groups, 1);
        let mut indivisible = spec("global");
        indivisible.workers.replicas = 3;
        assert_eq!(Target::of(&indivisible, &tiny).unwrap(), None);
    }

    #[test]
    fn a_deployment_is_due_once_per_interval_and_forgotten_when_deleted() {
        let mut turns = Turns::default();
        let key = DeploymentLabel { namespace: "ml".into(), name: "m".into() };
        let start = Instant::now();
        let interval = Duration::from_secs(30);
        assert!(turns.due(&key, interval, start));
        assert!(!turns.due(&key, interval, start + Duration::from_secs(29)));
        assert!(turns.due(&key, interval, start + Duration::from_secs(30)));
        let metrics = Metrics::default();
        metrics.imbalance.get_or_create(&key).set(1.5);
        turns.unsettled.insert(key.clone());
        turns.forget_deleted(&HashSet::new(), &metrics);
        assert!(turns.polled.is_empty() && turns.unsettled.is_empty());
        assert!(!metrics.encode().contains("name=\"m\""), "{}", metrics.encode());
    }
}
