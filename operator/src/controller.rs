//! The reconcile loop around [`crate::desired`] and [`crate::status`].
//!
//! One reconcile: resolve the model's config, check the layout, then either report why the
//! spec cannot be served (no children are created or changed, so the last valid spec keeps
//! serving) or server-side-apply every child whose [`HASH_ANNOTATION`] differs from the desired
//! one, and write the status if it changed. Reads happen every time; writes only when something
//! changed, so reconciling an unchanged object writes nothing. Events mark transitions only
//! (applied children, a newly refused spec, becoming ready), for the same reason.

use crate::deployment::ModelDeployment;
use crate::deployment::ModelDeploymentStatus;
use crate::desired::{self, BuildParams, Desired, Names, HASH_ANNOTATION};
use crate::http::{KindLabel, Metrics, ResultLabel};
use crate::spec::{self, ModelSource};
use crate::status::{self, Observed};
use crate::{Error, Result, FIELD_MANAGER};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use kubemoe_placement::{self as placement, PlacementPlan};
use kubemoe_placement::{Invalid, ModelConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Periodic re-check of a healthy object (children changes trigger reconciles sooner).
const RESYNC: Duration = Duration::from_secs(600);
/// Re-check of a refused spec whose model config lives in a ConfigMap the operator does not watch.
const RECHECK_INVALID: Duration = Duration::from_secs(60);
/// Error backoff: 2^failures seconds, capped.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Image of pods whose spec names none.
    pub image: String,
    /// The operator's own namespace (its pods reach workers through their NetworkPolicy).
    pub namespace: String,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, image: String, namespace: String, metrics: Arc<Metrics>) -> Arc<Self> {
        let reporter =
            Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            image,
            namespace,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding this lock loses backoff counts at worst.
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The watches of ModelDeployments and the objects they own. Its store (`.store()`) is the
/// rebalancer's view of the ModelDeployments, so both share one watch.
pub fn controller(client: &Client) -> Controller<ModelDeployment> {
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    Controller::new(Api::<ModelDeployment>::all(client.clone()), watcher::Config::default().any_semantic())
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned.clone())
        .owns(Api::<NetworkPolicy>::all(client.clone()), owned)
}

/// Reconciles with `controller` until `shutdown`.
pub async fn run(
    controller: Controller<ModelDeployment>,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    controller
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

pub(crate) fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// Backs off exponentially per object; a success resets the count.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, context: Arc<Context>) -> Action {
    let failures = {
        let mut failures = context.failures();
        let count = failures.entry(key(&md)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = Duration::from_secs(1u64 << failures.min(16)).min(MAX_BACKOFF);
    tracing::warn!(object = %key(&md), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One reconcile of `md`.
pub async fn reconcile(md: Arc<ModelDeployment>, context: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &context).await;
    context.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok(Outcome::Valid) => "ok",
        Ok(Outcome::Invalid) => "invalid",
        Err(_) => "error",
    };
    context.metrics.reconciles.get_or_create(&ResultLabel { result: label }).inc();
    match result? {
        Outcome::Valid => {
            context.failures().remove(&key(&md));
            Ok(Action::requeue(RESYNC))
        }
        Outcome::Invalid => {
            context.failures().remove(&key(&md));
            Ok(Action::requeue(RECHECK_INVALID))
        }
    }
}

enum Outcome {
    Valid,
    Invalid,
}

async fn reconcile_inner(md: &ModelDeployment, context: &Context) -> Result<Outcome> {
    let namespace = md.namespace().unwrap_or_else(|| "default".into());
    let client = &context.client;
    let now = Time(Timestamp::now());
    let checked = match resolve_model(md, client, &namespace).await? {
        Ok((source, model)) => spec::check_name(&md.name_any())
            .and_then(|()| spec::layout(&md.spec, &model))
            .map(|layout| (source, layout)),
        Err(invalid) => Err(invalid),
    };
    let (source, layout) = match checked {
        Ok(checked) => checked,
        Err(invalid) => {
            let new_status = status::invalid(md, &invalid, &now);
            let newly_refused =
                status::find(md.status.as_ref(), status::READY).is_none_or(|c| c.reason != invalid.reason);
            write_status(md, client, &namespace, new_status).await?;
            if newly_refused {
                let note = format!("{}: {}", invalid.reason, invalid.message);
                publish(context, md, EventType::Warning, "InvalidSpec", "Validate", note).await;
            }
            return Ok(Outcome::Invalid);
        }
    };

    let names = Names::of(&md.name_any());
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let existing_placement = get(&config_maps, &names.placement).await?;
    let in_force = existing_placement.as_ref().and_then(plan_of);
    // A plan of the same model is kept whatever its workers and slots: the rebalancer migrates
    // it to a new layout live (`rebalance::reshape`). Another model's is replaced, and the pods
    // restart on the new model anyway.
    let keep_placement = in_force.as_ref().is_some_and(|plan| layout.same_model(plan));
    let epoch = match &in_force {
        Some(plan) if keep_placement => plan.epoch,
        // A new model's plan is numbered above every epoch proposed so far.
        Some(plan) => plan.epoch.max(status::highest_epoch(md.status.as_ref())) + 1,
        None => 0,
    };
    // What the routers route by: the rebalancer's last report while the plan is kept (it writes
    // the ConfigMap before the routers commit, so a scale-down must not shrink the StatefulSet
    // on the ConfigMap alone), else the new plan's.
    let routed_workers = match &in_force {
        Some(plan) if keep_placement => status::routed_workers(md.status.as_ref()).unwrap_or(plan.workers),
        _ => layout.workers,
    };
    let params = BuildParams {
        image: context.image.clone(),
        epoch,
        placed_workers: routed_workers
            .max(in_force.as_ref().filter(|_| keep_placement).map_or(0, |p| p.workers)),
        operator_namespace: context.namespace.clone(),
        token: kubemoe_api::auth::generate_token,
    };
    let desired = desired::build(md, &source, &layout, &params)
        .map_err(|source| Error::Encode { what: format!("the children of {}", key(md)), source })?;

    let mut applied = Vec::new();
    // The token before the pods that mount it: they would wait for it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    if get(&secrets, &names.internal_token).await?.is_none() {
        let token = (params.token)()
            .map_err(|e| Error::Token { name: names.internal_token.clone(), reason: e.to_string() })?;
        let secret = desired::internal_token_secret(md, &token)
            .map_err(|source| Error::Encode { what: format!("the token of {}", key(md)), source })?;
        apply(&secrets, &secret).await?;
        applied.push("Secret");
    }
    if !keep_placement {
        apply(&config_maps, &desired.placement).await?;
        applied.push("ConfigMap");
    }
    let (workers, router) = apply_workloads(&desired, client, &namespace, &mut applied).await?;
    for kind in &applied {
        context.metrics.applies.get_or_create(&KindLabel { kind: (*kind).to_string() }).inc();
    }
    if !applied.is_empty() {
        let note = format!("applied {}", applied.join(", "));
        publish(context, md, EventType::Normal, "Applied", "Apply", note).await;
    }

    let initial = PlacementPlan { epoch, ..layout.initial_plan() };
    let plan = in_force.as_ref().filter(|_| keep_placement).unwrap_or(&initial);
    let observed = Observed { workers: Some(&workers), router: Some(&router), plan, routed_workers };
    let new_status = status::valid(md, observed, &now);
    let became_ready = new_status.phase == Some(crate::deployment::Phase::Ready)
        && md.status.as_ref().and_then(|s| s.phase) != Some(crate::deployment::Phase::Ready);
    write_status(md, client, &namespace, new_status).await?;
    if became_ready {
        publish(
            context,
            md,
            EventType::Normal,
            "Ready",
            "Observe",
            "all routers and workers are ready".into(),
        )
        .await;
    }
    Ok(Outcome::Valid)
}

/// Applies every child except the placement; returns the worker StatefulSet and the router
/// Deployment as the apiserver has them (with status).
async fn apply_workloads(
    desired: &Desired,
    client: &Client,
    namespace: &str,
    applied: &mut Vec<&'static str>,
) -> Result<(StatefulSet, Deployment)> {
    let mut track = |kind: &'static str, changed: bool| {
        if changed {
            applied.push(kind);
        }
    };
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    track("Service", sync(&services, &desired.worker_service).await?.1);
    // Each policy before the pods it guards: no pod runs unguarded.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), namespace);
    track("NetworkPolicy", sync(&policies, &desired.worker_policy).await?.1);
    let (workers, changed) = sync(&Api::namespaced(client.clone(), namespace), &desired.workers).await?;
    track("StatefulSet", changed);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    track("PodDisruptionBudget", sync(&budgets, &desired.disruption_budget).await?.1);
    if let Some(group) = &desired.pod_group {
        let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &group.resource);
        track("PodGroup", sync(&groups, &group.object).await?.1);
    }
    track("Service", sync(&services, &desired.router_service).await?.1);
    track("NetworkPolicy", sync(&policies, &desired.router_policy).await?.1);
    let (router, changed) = sync(&Api::namespaced(client.clone(), namespace), &desired.router).await?;
    track("Deployment", changed);
    Ok((workers, router))
}

/// Reads `desired`'s object; applies `desired` when missing or when its hash differs.
/// Returns the object as stored and whether it was written.
async fn sync<K>(api: &Api<K>, desired: &K) -> Result<(K, bool)>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    if let Some(existing) = get(api, &name).await? {
        if existing.annotations().get(HASH_ANNOTATION) == desired.annotations().get(HASH_ANNOTATION) {
            return Ok((existing, false));
        }
    }
    Ok((apply(api, desired).await?, true))
}

pub(crate) async fn get<K>(api: &Api<K>, name: &str) -> Result<Option<K>>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    api.get_opt(name)
        .await
        .map_err(|source| Error::Kube { action: format!("reading {}", api.resource_url()), source })
}

pub(crate) async fn apply<K>(api: &Api<K>, desired: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    // Force: this operator owns these objects; a conflicting manager (kubectl edit) is overridden.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(desired)).await.map_err(|source| Error::Kube {
        action: format!("applying {name} to {}", api.resource_url()),
        source,
    })
}

/// The model source and its config: compiled in for `builtin:`, from `spec.model.configMap`
/// otherwise. The inner Err is a spec problem to report, the outer one an API failure to retry.
pub(crate) async fn resolve_model(
    md: &ModelDeployment,
    client: &Client,
    namespace: &str,
) -> Result<Result<(ModelSource, ModelConfig), Invalid>> {
    let source = match ModelSource::parse(&md.spec.model.source) {
        Ok(source) => source,
        Err(invalid) => return Ok(Err(invalid)),
    };
    if let Some(config) = source.builtin_config() {
        return Ok(config.map(|config| (source, config)));
    }
    let Some(name) = &md.spec.model.config_map else {
        return Ok(Err(Invalid {
            reason: "ModelConfigMissing",
            message: format!(
                "the operator needs the model's config.json to lay out experts: put it in a ConfigMap \
                 (kubectl create configmap {}-model-config --from-file=config.json) and set spec.model.configMap",
                md.name_any()
            ),
        }));
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let Some(config_map) = get(&config_maps, name).await? else {
        return Ok(Err(Invalid {
            reason: "ModelConfigNotFound",
            message: format!(
                "spec.model.configMap names ConfigMap {name}, which does not exist in {namespace}"
            ),
        }));
    };
    let Some(text) = config_map.data.as_ref().and_then(|d| d.get("config.json")) else {
        return Ok(Err(Invalid {
            reason: "ModelConfigMissing",
            message: format!("ConfigMap {name} has no key config.json"),
        }));
    };
    let parsed =
        ModelConfig::from_json(text, &format!("ConfigMap {name} key config.json")).map_err(|e| Invalid {
            reason: "InvalidModelConfig",
            message: format!(
                "{e}: {}",
                std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
            ),
        });
    Ok(parsed.map(|config| (source, config)))
}

/// The placement a ConfigMap holds; None when absent or unreadable (then it is rewritten).
pub(crate) fn plan_of(config_map: &ConfigMap) -> Option<PlacementPlan> {
    let text = config_map.data.as_ref()?.get(placement::KEY)?;
    serde_json::from_str(text).ok()
}

/// Writes the status, computed from `md`, through the status subresource when it differs from
/// `md`'s; returns the ModelDeployment as stored after. The write carries `md`'s
/// resourceVersion: the controller and the rebalancer both write the whole status, and one
/// computed from an outdated read would undo the other's change, so the apiserver refuses it
/// (409 Conflict; the controller retries with backoff, the rebalancer re-reads).
pub(crate) async fn write_status(
    md: &ModelDeployment,
    client: &Client,
    namespace: &str,
    status: ModelDeploymentStatus,
) -> Result<ModelDeployment> {
    if md.status.as_ref() == Some(&status) {
        return Ok(md.clone());
    }
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let mut patch = serde_json::json!({
        "apiVersion": "kubemoe.io/v1alpha1",
        "kind": "ModelDeployment",
        "status": status,
    });
    if let Some(version) = md.resource_version() {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    api.patch_status(&md.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Kube {
            action: format!("writing the status of ModelDeployment {}", key(md)),
            source,
        })
}

/// Events are best effort: a failure to record one must not fail the reconcile.
pub(crate) async fn publish(
    context: &Context,
    md: &ModelDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event =
        Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = context.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(object = %key(md), error = %e, "cannot record event");
    }
}
