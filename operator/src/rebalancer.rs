//! The operator's rebalancer: next to the controller, it polls the routers of every ready
//! ModelDeployment with `balancing.enabled` once per `balancing.interval`, running
//! [`kubemoe_placement::rebalance::poll`] (the migration protocol, its crash points and how
//! they converge are documented there) with the [`Apiserver`] record: the plan of record is the
//! placement ConfigMap, a migration in progress is `Rebalancing=True` (which outlives this
//! process, so the next leader settles what it left), and every step is a status write, an event
//! and a metric. [`eligible`], [`router_urls`] and [`since_last_rebalance`] are the pure rules.
//!
//! Limits: kubelet refreshes a mounted ConfigMap after a delay (up to about a minute), so a pod
//! restarting right after the ConfigMap is written may still read the previous epoch; a router
//! that does shows as split routers and is committed forward, a worker is not detected.
//! Deployments are polled one after the other, so a long migration delays the polls of the
//! others.

use crate::controller::{self, Context};
use crate::deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
use crate::desired::{self, Names};
use crate::http::{DeploymentLabel, Metrics, ResultLabel};
use crate::status;
use crate::{spec, Error, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use kubemoe_api::auth::{Bearer, Keys};
use kubemoe_api::cluster::Cluster;
use kubemoe_placement::rebalance::{self, Degraded, Policy, Proposal, Record};
use kubemoe_placement::{error_chain, parse_duration, Layout, ModelConfig, PlacementPlan};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use kubemoe_placement::rebalance::Polled;

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
        let Ok(layout) = spec::layout(spec, model) else { return Ok(None) };
        Ok(Some(Target { layout, policy: spec::policy(spec)? }))
    }
}

/// Whether the rebalancer looks at `md` at all: not being deleted, Ready or Degraded (rolled
/// out and served, some pods missing now: when a worker pod is gone is when a recovery epoch is
/// needed), not while it rolls out or fails; and balancing enabled or a resize due (the
/// placement in force has other workers or slots than the spec asks for, which the rebalancer
/// migrates live whether or not it balances load).
pub fn eligible(md: &ModelDeployment) -> bool {
    let serving = [status::READY, status::DEGRADED]
        .iter()
        .any(|kind| status::find(md.status.as_ref(), kind).is_some_and(|c| c.status == "True"));
    let placement = md.status.as_ref().and_then(|s| s.placement.as_ref());
    let resizing = status::routed_workers(md.status.as_ref())
        .is_some_and(|w| w as i32 != md.spec.workers.replicas)
        || placement.is_some_and(|p| p.physical_experts != p.logical_experts + md.spec.experts.redundant);
    (md.spec.balancing.enabled || resizing) && md.metadata.deletion_timestamp.is_none() && serving
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
                    tracing::warn!(%object, error = %error_chain(&e), "rebalancer poll failed")
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
    let selector = desired::selector(&md.name_any(), "router");
    let routers = pods.list(&ListParams::default().labels(&selector)).await.map_err(|source| {
        Error::Kube { action: format!("listing the router pods of {}", controller::key(md)), source }
    })?;
    // During a resize, the workers of both plans: new ones prepare their experts, those going
    // drop theirs.
    let routed = status::routed_workers(md.status.as_ref()).unwrap_or(0);
    let workers = desired::worker_addresses(md, target.layout.workers.max(routed));
    let routers = router_urls(&routers.items, md.spec.router.internal_port);
    let Some(cluster) = cluster(context, md, &workers, &routers).await? else { return Ok(Polled::Waiting) };
    poll(context, md, &target, &cluster, unsettled).await
}

/// Clients of `md`'s `workers` and `routers` holding the deployment's internal token (and its
/// CA, with TLS); `None` while the controller has not made the Secrets yet.
pub(crate) async fn cluster(
    context: &Context,
    md: &ModelDeployment,
    workers: &[String],
    routers: &[String],
) -> Result<Option<Cluster>> {
    let namespace = namespace(md);
    // The deployment's internal token, which the controller made before its pods.
    let name = Names::of(&md.name_any()).internal_token;
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
    let Some(secret) = controller::get(&secrets, &name).await? else { return Ok(None) };
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(desired::INTERNAL_TOKEN_KEY))
        .and_then(|t| std::str::from_utf8(&t.0).ok())
        .ok_or_else(|| Error::Token {
            name: name.clone(),
            reason: format!("no UTF-8 key `{}`", desired::INTERNAL_TOKEN_KEY),
        })?;
    let token = Keys::fixed(token).map_err(|e| Error::Token { name, reason: e.to_string() })?;
    let tls = match &md.spec.tls {
        Some(tls) => {
            let Some(secret) = controller::get(&secrets, &tls.secret_name).await? else {
                return Ok(None);
            };
            let invalid = |reason: String| Error::Tls { name: tls.secret_name.clone(), reason };
            let ca =
                secret.data.as_ref().and_then(|d| d.get(kubemoe_api::tls::CA_FILE)).ok_or_else(|| {
                    invalid(format!("no key `{}` (the CA that issued tls.crt)", kubemoe_api::tls::CA_FILE))
                })?;
            let server_name = desired::tls_server_name(md);
            Some(
                kubemoe_api::tls::Client::from_ca_pem(&ca.0, Some(&server_name))
                    .map_err(|e| invalid(e.to_string()))?,
            )
        }
        None => None,
    };
    Ok(Some(Cluster::new(workers, routers, &Bearer(Some(Arc::new(token))), tls.as_ref())?))
}

/// One poll of `md`, whose workers and routers `servers` reaches, recorded in the apiserver.
/// `unsettled`: this process saw a migration of `md` fail and not settle.
pub async fn poll(
    context: &Context,
    md: &ModelDeployment,
    target: &Target,
    servers: &impl rebalance::Servers,
    unsettled: bool,
) -> Result<Polled> {
    let record = Apiserver { context, md: Mutex::new(md.clone()) };
    let polled = rebalance::poll(&record, servers, &target.layout, &target.policy, unsettled).await?;
    // Settling what a failed migration left is part of the failure, counted as `failed`.
    if matches!(polled, Polled::Settled { .. }) {
        count(&context.metrics, "settled");
    }
    Ok(polled)
}

/// The operator's [`Record`]: the placement ConfigMap, the status, events and metrics of one
/// ModelDeployment, as last read or written.
pub struct Apiserver<'a> {
    context: &'a Context,
    md: Mutex<ModelDeployment>,
}

impl Apiserver<'_> {
    fn md(&self) -> ModelDeployment {
        // A poisoned lock holds a whole ModelDeployment: every writer replaces it at once.
        self.md.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Writes `compute(md)` as the status (see [`update_status`]) and keeps what was stored.
    async fn status(&self, compute: impl Fn(&ModelDeployment) -> ModelDeploymentStatus) -> Result<()> {
        let md = update_status(self.context, &self.md(), compute).await?;
        *self.md.lock().unwrap_or_else(PoisonError::into_inner) = md;
        Ok(())
    }

    /// Publishes an event whose note is the `Rebalancing` condition's message.
    async fn announce(&self, type_: EventType, reason: &str) {
        let md = self.md();
        let note = status::find(md.status.as_ref(), status::REBALANCING)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        controller::publish(self.context, &md, type_, reason, "Rebalance", note).await;
    }
}

impl Record for Apiserver<'_> {
    type Error = Error;

    async fn stored(&self) -> Result<Option<PlacementPlan>> {
        let md = self.md();
        let config_maps: Api<ConfigMap> = Api::namespaced(self.context.client.clone(), &namespace(&md));
        let stored = controller::get(&config_maps, &Names::of(&md.name_any()).placement).await?;
        Ok(stored.as_ref().and_then(controller::plan_of))
    }

    async fn store(&self, plan: &PlacementPlan) -> Result<()> {
        write_placement(self.context, &self.md(), plan).await
    }

    fn unfinished(&self) -> bool {
        status::is_rebalancing(self.md().status.as_ref())
    }

    fn highest_epoch(&self) -> u64 {
        status::highest_epoch(self.md().status.as_ref())
    }

    fn since_last(&self) -> Option<Duration> {
        since_last_rebalance(self.md().status.as_ref(), Timestamp::now())
    }

    async fn measured(&self, imbalance: f64) -> Result<()> {
        gauge(&self.context.metrics, &self.md(), imbalance);
        self.status(|md| status::measured(md, imbalance)).await
    }

    async fn rebalancing(&self, proposal: &Proposal) -> Result<()> {
        let now = Time(Timestamp::now());
        self.status(|md| status::rebalancing(md, proposal, &now)).await?;
        self.announce(EventType::Normal, "Rebalancing").await;
        Ok(())
    }

    async fn rebalanced(&self, proposal: &Proposal) -> Result<()> {
        count(&self.context.metrics, if proposal.recovering.is_empty() { "rebalanced" } else { "recovered" });
        gauge(&self.context.metrics, &self.md(), proposal.imbalance_after);
        let now = Time(Timestamp::now());
        self.status(|md| status::rebalanced(md, proposal, &now)).await?;
        self.announce(EventType::Normal, "Rebalanced").await;
        Ok(())
    }

    async fn failed(&self, epoch: u64, error: &str) -> Result<()> {
        count(&self.context.metrics, "failed");
        let now = Time(Timestamp::now());
        self.status(|md| status::rebalance_failed(md, epoch, error, &now)).await?;
        self.announce(EventType::Warning, "MigrationFailed").await;
        Ok(())
    }

    async fn settled(&self, plan: &PlacementPlan) -> Result<()> {
        let now = Time(Timestamp::now());
        self.status(|md| status::settled(md, plan.epoch, plan.workers, &now)).await
    }

    async fn degraded(&self, state: &Degraded) -> Result<()> {
        let md = self.md();
        self.context.metrics.workers_down.get_or_create(&label(&md)).set(state.down.len() as i64);
        let before = md.status.as_ref().and_then(|s| s.placement.as_ref());
        let was = before.map(|p| (p.workers_down.clone(), p.lost_experts));
        let now_down: Vec<i32> = state.down.iter().map(|&w| w as i32).collect();
        let lost = (!state.down.is_empty()).then_some(state.lost_experts() as i64);
        if was.unwrap_or_default() == (now_down.clone(), lost) {
            return Ok(());
        }
        let now = Time(Timestamp::now());
        self.status(|md| status::degraded(md, state, &now)).await?;
        // An event per change: which workers went or came back, and what that leaves lost.
        let (type_, reason) = if state.down.is_empty() {
            (EventType::Normal, "WorkersBack")
        } else {
            (EventType::Warning, "WorkersDown")
        };
        // An event's note holds at most 1 KiB; the condition keeps the whole list.
        let note = status::clip(&state.to_string(), 1000);
        controller::publish(self.context, &self.md(), type_, reason, "Route", note).await;
        Ok(())
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
pub(crate) async fn update_status(
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
    use crate::deployment::PlacementStatus;
    use k8s_openapi::api::core::v1::PodStatus;

    #[test]
    fn eligible_needs_balancing_ready_or_degraded_and_no_deletion() {
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
        // A worker pod gone: Ready=False, Degraded=True. Still polled, for the recovery epoch.
        let conditions = &mut md.status.as_mut().unwrap().conditions;
        conditions[0].status = "False".into();
        let mut degraded = conditions[0].clone();
        (degraded.type_, degraded.status) = (status::DEGRADED.into(), "True".into());
        conditions.push(degraded);
        assert!(eligible(&md));
        // Rolling out (neither): not polled.
        md.status.as_mut().unwrap().conditions[1].status = "False".into();
        assert!(!eligible(&md));
        md.status.as_mut().unwrap().conditions[1].status = "True".into();
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
