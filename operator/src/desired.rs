//! The desired state: a ModelDeployment (plus its model's config) → the objects it owns.
//!
//! A pure, synchronous function: `kubemoe operator render` prints its output, the controller
//! server-side-applies it, and tests check it directly. Invariants:
//! - every child is named `<md>-…` (router Service: `<md>`) in the ModelDeployment's namespace,
//!   carries the instance labels, and a controller ownerReference when the ModelDeployment has
//!   a uid (a manifest read from a file has none, so `render` prints no ownerReference);
//! - every child carries [`HASH_ANNOTATION`], a hash of the rest of the object, so that the
//!   controller can tell an up-to-date child from a stale one without writing;
//! - worker `i` of the StatefulSet has rank `i`; the placement ConfigMap is mounted into every
//!   pod, so a restarted pod starts from the placement in force.

use crate::deployment::{Dtype, ModelDeployment};
use crate::spec::ModelSource;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, GRPCAction, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use kubemoe_placement::Layout;
use kubemoe_placement::{self as placement, PlacementPlan};
use serde::Serialize;
use std::collections::BTreeMap;

/// Hash of a child's desired content; equal hashes mean nothing to apply.
pub const HASH_ANNOTATION: &str = "kubemoe.io/desired-hash";
/// Pod annotation Volcano reads to find a pod's PodGroup.
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// Annotation of the worker StatefulSet naming the expert layout the spec asks for (the
/// placement in force reaches it by a live resize, with no pod restarted).
pub const LAYOUT_ANNOTATION: &str = "kubemoe.io/expert-layout";
/// Pod-template annotation naming the model's routed experts and MoE layers: pods read their
/// placement once, at start, and a new model gets a new plan of record, so a model whose shape
/// changed (even under the same source) must roll them onto it.
pub const MODEL_ANNOTATION: &str = "kubemoe.io/model-shape";
/// Pod label scheduler-plugins' coscheduling reads to find a pod's PodGroup.
pub const COSCHEDULING_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// Where the placement ConfigMap is mounted in router and worker pods.
pub const PLACEMENT_DIR: &str = "/etc/kubemoe/placement";
/// Where a volume-backed model is mounted.
pub const MODEL_DIR: &str = "/model";
/// Where a router mounts `auth.apiKeysSecret`, and the Secret's key that holds the API keys.
pub const AUTH_DIR: &str = "/etc/kubemoe/auth";
pub const API_KEYS_KEY: &str = "api-keys";
/// Where routers and workers mount the deployment's internal-token Secret, and its key.
pub const INTERNAL_DIR: &str = "/etc/kubemoe/internal";
pub const INTERNAL_TOKEN_KEY: &str = "token";
/// Where `spec.tls.secretName` is mounted (`tls.crt`, `tls.key`, `ca.crt`).
pub const TLS_DIR: &str = "/etc/kubemoe/tls";
/// The non-root user of the image (distroless `nonroot`).
const RUN_AS: i64 = 65532;

/// Inputs of the builder besides the ModelDeployment.
#[derive(Clone, Debug)]
pub struct BuildParams {
    /// Image of router and worker pods when the spec names none.
    pub image: String,
    /// Placement epoch to write into a new placement ConfigMap.
    pub epoch: u64,
    /// Workers a plan in force or being migrated to uses (0: none yet). The StatefulSet keeps
    /// them until a resize has moved their experts off: its replicas are the larger of this and
    /// the spec's.
    pub placed_workers: u32,
    /// Namespace of the operator's pods, the one place besides the routers that calls workers.
    pub operator_namespace: String,
    /// Makes the internal token of a deployment that has none
    /// ([`kubemoe_api::auth::generate_token`]; fixed in golden tests).
    pub token: fn() -> std::io::Result<String>,
}

/// Everything a ModelDeployment owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub placement: ConfigMap,
    pub worker_service: Service,
    pub workers: StatefulSet,
    pub router_service: Service,
    pub router: Deployment,
    pub disruption_budget: PodDisruptionBudget,
    /// Who may reach the workers' and the routers' ports.
    pub worker_policy: NetworkPolicy,
    pub router_policy: NetworkPolicy,
    /// Present when the spec asks for gang scheduling.
    pub pod_group: Option<PodGroup>,
}

/// A gang scheduler's PodGroup (a CRD of Volcano or scheduler-plugins, hence dynamic).
#[derive(Clone, Debug, PartialEq)]
pub struct PodGroup {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

impl Desired {
    /// The objects in the order they are applied (config first, workers before the router that
    /// dispatches to them), as JSON with apiVersion and kind.
    pub fn objects(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = vec![
            serde_json::to_value(&self.placement)?,
            serde_json::to_value(&self.worker_service)?,
            // Policies before the pods they guard: no pod runs unguarded.
            serde_json::to_value(&self.worker_policy)?,
            serde_json::to_value(&self.workers)?,
            serde_json::to_value(&self.disruption_budget)?,
        ];
        if let Some(group) = &self.pod_group {
            out.push(serde_json::to_value(&group.object)?);
        }
        out.push(serde_json::to_value(&self.router_service)?);
        out.push(serde_json::to_value(&self.router_policy)?);
        out.push(serde_json::to_value(&self.router)?);
        Ok(out)
    }
}

/// Names of the children of a ModelDeployment called `name`.
pub struct Names {
    pub router_service: String,
    pub router: String,
    pub worker_service: String,
    pub workers: String,
    pub placement: String,
    pub disruption_budget: String,
    pub pod_group: String,
    pub worker_policy: String,
    pub router_policy: String,
    /// The Secret of the internal token every worker and router call carries.
    pub internal_token: String,
}

impl Names {
    pub fn of(name: &str) -> Self {
        Names {
            router_service: name.to_string(),
            router: format!("{name}-router"),
            worker_service: format!("{name}-workers"),
            workers: format!("{name}-worker"),
            placement: format!("{name}-placement"),
            disruption_budget: format!("{name}-workers"),
            pod_group: format!("{name}-workers"),
            worker_policy: format!("{name}-workers"),
            router_policy: format!("{name}-router"),
            internal_token: format!("{name}-internal"),
        }
    }
}

/// Labels selecting the pods of one component of an instance.
pub fn selector_labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "kubemoe".to_string()),
        ("app.kubernetes.io/instance".to_string(), instance.to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
    ])
}

/// The label selector string of the pods of `component` (status.routerSelector and
/// status.workerSelector, the latter for `kubectl scale`).
pub fn selector(instance: &str, component: &str) -> String {
    selector_labels(instance, component).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Builds every child of `md` for a layout already checked by [`crate::spec::layout`].
pub fn build(
    md: &ModelDeployment,
    source: &ModelSource,
    layout: &Layout,
    params: &BuildParams,
) -> Result<Desired, serde_json::Error> {
    let ctx = Ctx::new(md, source, layout, params);
    let names = Names::of(&ctx.name);
    let initial = PlacementPlan {
        epoch: params.epoch,
        ..PlacementPlan::initial(layout.workers, layout.slots_per_worker, layout.logical, &layout.moe_layers)
    };
    Ok(Desired {
        placement: placement_config_map(md, &initial)?,
        worker_service: stamp(ctx.worker_service(&names))?,
        workers: stamp(ctx.worker_statefulset(&names))?,
        router_service: stamp(ctx.router_service(&names))?,
        router: stamp(ctx.router_deployment(&names))?,
        disruption_budget: stamp(ctx.disruption_budget(&names))?,
        worker_policy: stamp(ctx.worker_policy(&names))?,
        router_policy: stamp(ctx.router_policy(&names))?,
        pod_group: match ctx.pod_group(&names) {
            Some(PodGroup { resource, object }) => Some(PodGroup { resource, object: stamp(object)? }),
            None => None,
        },
    })
}

/// The placement ConfigMap of `md` holding `plan`: the controller writes the initial plan of a
/// layout, the rebalancer each later epoch, both through this so that labels, owner and hash
/// agree whoever wrote it last.
pub fn placement_config_map(
    md: &ModelDeployment,
    plan: &PlacementPlan,
) -> Result<ConfigMap, serde_json::Error> {
    let names = Names::of(&md.name_any());
    stamp(ConfigMap {
        metadata: child_meta(md, &names.placement, "placement"),
        data: Some(BTreeMap::from([(placement::KEY.to_string(), serde_json::to_string(plan)?)])),
        ..ConfigMap::default()
    })
}

/// The Secret holding `md`'s internal token: made once, when missing (never applied over an
/// existing one: a new token would lock the running pods out of each other).
pub fn internal_token_secret(md: &ModelDeployment, token: &str) -> Result<Secret, serde_json::Error> {
    let names = Names::of(&md.name_any());
    stamp(Secret {
        metadata: child_meta(md, &names.internal_token, "internal-token"),
        string_data: Some(BTreeMap::from([(INTERNAL_TOKEN_KEY.to_string(), token.to_string())])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    })
}

/// The model name of the OpenAI API: `spec.model.servedName`, else the ModelDeployment's name.
pub fn served_name(md: &ModelDeployment) -> String {
    md.spec.model.served_name.clone().unwrap_or_else(|| md.name_any())
}

/// `host:port` of every worker rank of `md`, in rank order: the headless Service's per-pod DNS
/// names, which routers dispatch to and the rebalancer migrates through.
pub fn worker_addresses(md: &ModelDeployment, workers: u32) -> Vec<String> {
    (0..workers).map(|rank| worker_address(md, &rank.to_string())).collect()
}

/// `host:port` of worker `rank` of `md` (`{rank}`: the routers' template for every rank).
fn worker_address(md: &ModelDeployment, rank: &str) -> String {
    let names = Names::of(&md.name_any());
    let namespace = namespace_of(md);
    format!("{}-{rank}.{}.{namespace}.svc:{}", names.workers, names.worker_service, md.spec.workers.port)
}

/// The name every internal TLS call of `md` checks: its router Service's, which the one
/// certificate of the deployment holds for the API's clients anyway.
pub fn tls_server_name(md: &ModelDeployment) -> String {
    format!("{}.{}.svc", Names::of(&md.name_any()).router_service, namespace_of(md))
}

fn namespace_of(md: &ModelDeployment) -> String {
    md.namespace().unwrap_or_else(|| "default".to_string())
}

/// Name, namespace, instance labels and (when `md` has a uid) the controller ownerReference of
/// a child of `md`.
fn child_meta(md: &ModelDeployment, name: &str, component: &str) -> ObjectMeta {
    let mut labels = selector_labels(&md.name_any(), component);
    labels.insert("app.kubernetes.io/managed-by".into(), crate::FIELD_MANAGER.into());
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace_of(md)),
        labels: Some(labels),
        owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Adds the content hash annotation (computed without it).
fn stamp<K: Resource + Serialize>(mut obj: K) -> Result<K, serde_json::Error> {
    let hash = content_hash(&serde_json::to_string(&obj)?);
    obj.annotations_mut().insert(HASH_ANNOTATION.to_string(), hash);
    Ok(obj)
}

/// FNV-1a over the JSON text: stable across Rust versions and platforms (the golden files
/// contain it), unlike `std`'s hasher.
pub fn content_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

struct Ctx<'a> {
    md: &'a ModelDeployment,
    source: &'a ModelSource,
    layout: &'a Layout,
    params: &'a BuildParams,
    name: String,
}

impl<'a> Ctx<'a> {
    fn new(
        md: &'a ModelDeployment,
        source: &'a ModelSource,
        layout: &'a Layout,
        params: &'a BuildParams,
    ) -> Self {
        Ctx { md, source, layout, params, name: md.name_any() }
    }

    fn meta(&self, name: &str, component: &str) -> ObjectMeta {
        child_meta(self.md, name, component)
    }

    fn worker_service(&self, names: &Names) -> Service {
        Service {
            metadata: self.meta(&names.worker_service, "worker"),
            spec: Some(ServiceSpec {
                // Headless: one DNS name per rank. Not-ready workers are published so routers can
                // resolve every rank while the workers load their experts.
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(selector_labels(&self.name, "worker")),
                ports: Some(vec![
                    service_port("grpc", self.md.spec.workers.port, "kubernetes.io/h2c"),
                    service_port("http", self.md.spec.workers.http_port, "http"),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn router_service(&self, names: &Names) -> Service {
        let router = &self.md.spec.router;
        Service {
            metadata: self.meta(&names.router_service, "router"),
            spec: Some(ServiceSpec {
                selector: Some(selector_labels(&self.name, "router")),
                ports: Some(vec![
                    service_port("grpc", router.grpc_port, "kubernetes.io/h2c"),
                    service_port("http", router.http_port, "http"),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// The `--model` argument and the volume behind it.
    fn model_arg_and_volume(&self) -> (String, Option<Volume>) {
        let volume = |source: Volume| Some(Volume { name: "model".into(), ..source });
        match self.source {
            ModelSource::Builtin { preset } => (format!("builtin:{preset}"), None),
            ModelSource::Pvc { claim, .. } => (
                MODEL_DIR.into(),
                volume(Volume {
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                }),
            ),
            ModelSource::HostPath { path } => (
                MODEL_DIR.into(),
                volume(Volume {
                    host_path: Some(HostPathVolumeSource {
                        path: path.clone(),
                        type_: Some("Directory".into()),
                    }),
                    ..Volume::default()
                }),
            ),
        }
    }

    /// Arguments both roles share: the model, the mounted placement ConfigMap, so that a
    /// (re)started pod serves the epoch in force, and the internal token.
    fn common_args(&self, model: String) -> Vec<String> {
        let mut args = vec![
            "--model".into(),
            model,
            "--placement".into(),
            format!("{PLACEMENT_DIR}/{}", placement::KEY),
            "--internal-token-file".into(),
            format!("{INTERNAL_DIR}/{INTERNAL_TOKEN_KEY}"),
        ];
        // `auto` is the processes' default: pods of such deployments name no dtype.
        if self.md.spec.model.dtype != Dtype::Auto {
            args.extend(["--dtype".into(), self.md.spec.model.dtype.as_str().into()]);
        }
        if let Some(tls) = &self.md.spec.tls {
            args.extend([
                "--tls-dir".into(),
                TLS_DIR.into(),
                "--health-port".into(),
                tls.health_port.to_string(),
            ]);
        }
        args
    }

    /// Volumes and mounts both roles share: writable /tmp on a read-only root filesystem, the
    /// placement, the internal token and the TLS Secret (whole Secrets, no subPath, so that the
    /// kubelet's updates reach the pod), and the model.
    fn volumes(&self, names: &Names, model_volume: Option<Volume>) -> (Vec<Volume>, Vec<VolumeMount>) {
        let mut volumes = vec![
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            Volume {
                name: "placement".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names.placement.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "internal-token".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(names.internal_token.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        ];
        let mut mounts = vec![
            mount("tmp", "/tmp", false),
            mount("placement", PLACEMENT_DIR, true),
            mount("internal-token", INTERNAL_DIR, true),
        ];
        if let Some(tls) = &self.md.spec.tls {
            volumes.push(Volume {
                name: "tls".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(tls.secret_name.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(mount("tls", TLS_DIR, true));
        }
        if let Some(volume) = model_volume {
            let mut model_mount = mount("model", MODEL_DIR, true);
            if let ModelSource::Pvc { path, .. } = self.source {
                model_mount.sub_path = Some(path.clone()).filter(|p| !p.is_empty());
            }
            volumes.push(volume);
            mounts.push(model_mount);
        }
        (volumes, mounts)
    }

    /// `ports` and, with TLS, the plaintext health port.
    fn with_health_port(&self, mut ports: Vec<ContainerPort>) -> Vec<ContainerPort> {
        if let Some(tls) = &self.md.spec.tls {
            ports.push(container_port("health", tls.health_port));
        }
        ports
    }

    fn model_annotations(&self) -> BTreeMap<String, String> {
        let l = self.layout;
        let layers = match (l.moe_layers.first(), l.moe_layers.last()) {
            (Some(first), Some(last)) => format!("{} MoE layers, {first} to {last}", l.moe_layers.len()),
            _ => "no MoE layers".into(),
        };
        BTreeMap::from([(MODEL_ANNOTATION.to_string(), format!("{} routed experts, {layers}", l.logical))])
    }

    fn layout_annotations(&self) -> BTreeMap<String, String> {
        let l = self.layout;
        let value = format!("{} experts in {} workers x {} slots", l.logical, l.workers, l.slots_per_worker);
        BTreeMap::from([(LAYOUT_ANNOTATION.to_string(), value)])
    }

    fn image(&self) -> String {
        self.md.spec.image.clone().unwrap_or_else(|| self.params.image.clone())
    }

    fn worker_statefulset(&self, names: &Names) -> StatefulSet {
        let spec = &self.md.spec;
        let workers = &spec.workers;
        let (model, model_volume) = self.model_arg_and_volume();
        let mut args = vec!["worker".to_string()];
        args.extend(self.common_args(model));
        args.extend([
            "--rank".into(),
            // The StatefulSet controller labels each pod with its ordinal. No world size: the
            // placement says it, so that a resize changes no pod template (`rebalance::reshape`).
            "$(POD_INDEX)".into(),
            "--port".into(),
            workers.port.to_string(),
            "--http-port".into(),
            workers.http_port.to_string(),
            "--data-port".into(),
            workers.data_port.to_string(),
        ]);
        let (mut volumes, mut mounts) = self.volumes(names, model_volume);
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(workers.shm_size.clone().unwrap_or_else(|| Quantity("1Gi".into()))),
            }),
            ..Volume::default()
        });
        mounts.push(mount("dshm", "/dev/shm", false));

        let mut resources = workers.resources.clone().unwrap_or_default();
        if workers.gpus_per_worker > 0 {
            let gpus = Quantity(workers.gpus_per_worker.to_string());
            resources.limits.get_or_insert_with(BTreeMap::new).insert("nvidia.com/gpu".into(), gpus);
        }
        let mut env = pod_env();
        env.push(EnvVar {
            name: "POD_INDEX".into(),
            value_from: Some(field_ref("metadata.labels['apps.kubernetes.io/pod-index']")),
            ..EnvVar::default()
        });
        let container = Container {
            name: "worker".into(),
            args: Some(args),
            env: Some(env),
            ports: Some(self.with_health_port(vec![
                container_port("grpc", workers.port),
                container_port("http", workers.http_port),
                container_port("data", workers.data_port),
            ])),
            resources: Some(resources).filter(|r| *r != ResourceRequirements::default()),
            volume_mounts: Some(mounts),
            ..self.container(workers.port)
        };

        let labels = selector_labels(&self.name, "worker");
        let mut pod_labels = labels.clone();
        let mut pod_annotations = self.model_annotations();
        if spec.scheduling.gang {
            pod_labels.insert(COSCHEDULING_GROUP_LABEL.into(), names.pod_group.clone());
            pod_annotations.insert(VOLCANO_GROUP_ANNOTATION.into(), names.pod_group.clone());
        }
        let spread = workers.topology_spread_constraints.clone().unwrap_or_else(|| {
            vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "kubernetes.io/hostname".into(),
                when_unsatisfiable: "ScheduleAnyway".into(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..LabelSelector::default()
                }),
                ..TopologySpreadConstraint::default()
            }]
        });
        let pod = PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: workers.node_selector.clone(),
            tolerations: workers.tolerations.clone(),
            topology_spread_constraints: Some(spread),
            scheduler_name: spec.scheduling.scheduler_name.clone(),
            ..self.pod_spec()
        };
        StatefulSet {
            metadata: ObjectMeta {
                annotations: Some(self.layout_annotations()),
                ..self.meta(&names.workers, "worker")
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(spec.workers.replicas.max(self.params.placed_workers as i32)),
                service_name: Some(names.worker_service.clone()),
                // Ranks are independent processes; start them all at once.
                pod_management_policy: Some("Parallel".into()),
                selector: LabelSelector { match_labels: Some(labels), ..LabelSelector::default() },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(pod_annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(pod),
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn router_deployment(&self, names: &Names) -> Deployment {
        let spec = &self.md.spec;
        let router = &spec.router;
        let (model, model_volume) = self.model_arg_and_volume();
        let mut args = vec!["router".to_string()];
        args.extend(self.common_args(model));
        args.extend([
            "--port".into(),
            router.grpc_port.to_string(),
            "--http-port".into(),
            router.http_port.to_string(),
            "--internal-port".into(),
            router.internal_port.to_string(),
            // Every rank a plan may name, by its per-pod DNS name: no pod template names the
            // worker count, so that a resize restarts no router.
            "--workers".into(),
            worker_address(self.md, "{rank}"),
            "--max-batch-tokens".into(),
            router.max_batch_tokens.to_string(),
            "--max-concurrent".into(),
            router.max_concurrent_requests.to_string(),
            "--kv-budget-mib".into(),
            router.kv_cache_mib.to_string(),
            "--prefix-cache-mib".into(),
            router.prefix_cache_mib.to_string(),
            "--load-window".into(),
            spec.balancing.window.clone(),
            "--served-model-name".into(),
            served_name(self.md),
        ]);
        if let Some(max) = spec.model.max_context_length {
            args.extend(["--max-context".into(), max.to_string()]);
        }
        if let Some(speculative) = &router.speculative {
            args.extend(["--speculative".into(), speculative.clone()]);
        }
        if spec.tls.is_some() {
            // Workers present the deployment's certificate, issued for the router Service.
            args.extend(["--tls-server-name".into(), tls_server_name(self.md)]);
        }
        let (mut volumes, mut mounts) = self.volumes(names, model_volume);
        if let Some(secret) = &spec.auth.api_keys_secret {
            // The whole key as a file (no subPath), so the kubelet's updates reach the router.
            volumes.push(Volume {
                name: "api-keys".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    items: Some(vec![KeyToPath {
                        key: API_KEYS_KEY.into(),
                        path: API_KEYS_KEY.into(),
                        ..KeyToPath::default()
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(mount("api-keys", AUTH_DIR, true));
            args.extend(["--api-keys-file".into(), format!("{AUTH_DIR}/{API_KEYS_KEY}")]);
        }
        let container = Container {
            name: "router".into(),
            args: Some(args),
            env: Some(pod_env()),
            ports: Some(self.with_health_port(vec![
                container_port("grpc", router.grpc_port),
                container_port("http", router.http_port),
                container_port("internal", router.internal_port),
            ])),
            resources: router.resources.clone(),
            volume_mounts: Some(mounts),
            // Ready once `/health` answers 200: the model loaded and every worker answering (503
            // while it loads or waits, and while it drains).
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/health".into()),
                    port: IntOrString::String("http".into()),
                    // kubelet does not check the certificate.
                    scheme: spec.tls.as_ref().map(|_| "HTTPS".into()),
                    ..HTTPGetAction::default()
                }),
                ..readiness()
            }),
            ..self.container(router.grpc_port)
        };
        let labels = selector_labels(&self.name, "router");
        Deployment {
            metadata: self.meta(&names.router, "router"),
            spec: Some(DeploymentSpec {
                replicas: Some(router.replicas),
                selector: LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        annotations: Some(self.model_annotations()),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..self.pod_spec()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    /// Worker disruptions cost expert capacity until the rebalancer re-places the lost experts;
    /// allow one at a time so that node drains proceed without taking down several shards.
    fn disruption_budget(&self, names: &Names) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(&names.disruption_budget, "worker"),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name, "worker")),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }
    }

    /// The operator's pods, wherever its chart put them.
    fn operator_peer(&self) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    self.params.operator_namespace.clone(),
                )])),
                ..LabelSelector::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/name".to_string(), "kubemoe".to_string()),
                    ("app.kubernetes.io/component".to_string(), "operator".to_string()),
                ])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        }
    }

    /// Workers' gRPC port (dispatch, prepare, release) only from this deployment's routers and
    /// the operator, their data port (dispatch) from the routers only; their HTTP port
    /// (metrics and health only) from anywhere, for Prometheus.
    fn worker_policy(&self, names: &Names) -> NetworkPolicy {
        let workers = &self.md.spec.workers;
        let routers = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&self.name, "router")),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        };
        let rules = vec![
            NetworkPolicyIngressRule {
                from: Some(vec![routers.clone(), self.operator_peer()]),
                ports: Some(vec![policy_port(workers.port)]),
            },
            NetworkPolicyIngressRule {
                from: Some(vec![routers]),
                ports: Some(vec![policy_port(workers.data_port)]),
            },
            NetworkPolicyIngressRule { from: None, ports: Some(vec![policy_port(workers.http_port)]) },
        ];
        self.network_policy(&names.worker_policy, "worker", rules)
    }

    /// Routers' APIs from `router.allowedFrom` (default: pods of this namespace), and their
    /// internal port (Balancer `Load`/`Commit`) from the operator only.
    fn router_policy(&self, names: &Names) -> NetworkPolicy {
        let router = &self.md.spec.router;
        let same_namespace = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        };
        let rules = vec![
            NetworkPolicyIngressRule {
                from: Some(router.allowed_from.clone().unwrap_or_else(|| vec![same_namespace])),
                ports: Some(vec![policy_port(router.grpc_port), policy_port(router.http_port)]),
            },
            NetworkPolicyIngressRule {
                from: Some(vec![self.operator_peer()]),
                ports: Some(vec![policy_port(router.internal_port)]),
            },
        ];
        self.network_policy(&names.router_policy, "router", rules)
    }

    fn network_policy(
        &self,
        name: &str,
        component: &str,
        ingress: Vec<NetworkPolicyIngressRule>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            metadata: self.meta(name, component),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name, component)),
                    ..LabelSelector::default()
                }),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(ingress),
                ..NetworkPolicySpec::default()
            }),
        }
    }

    /// The PodGroup of the gang scheduler named in `scheduling.schedulerName`: Volcano's for
    /// `volcano`, scheduler-plugins' (coscheduling) for any other.
    fn pod_group(&self, names: &Names) -> Option<PodGroup> {
        let scheduling = &self.md.spec.scheduling;
        if !scheduling.gang {
            return None;
        }
        let gvk = if scheduling.scheduler_name.as_deref() == Some("volcano") {
            GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup")
        } else {
            GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup")
        };
        let mut spec = serde_json::json!({ "minMember": self.layout.workers });
        if let Some(priority) = &scheduling.priority_class_name {
            spec["priorityClassName"] = priority.clone().into();
        }
        let resource = ApiResource::from_gvk(&gvk);
        let mut object =
            DynamicObject::new(&names.pod_group, &resource).data(serde_json::json!({ "spec": spec }));
        object.metadata = self.meta(&names.pod_group, "worker");
        Some(PodGroup { resource, object })
    }

    /// Security, probes and image shared by both containers. With TLS the probes ask the
    /// plaintext health port (kubelet's gRPC probes speak no TLS).
    fn container(&self, grpc_port: i32) -> Container {
        let probe_port = self.md.spec.tls.as_ref().map_or(grpc_port, |t| t.health_port);
        Container {
            image: Some(self.image()),
            // Liveness asks the gRPC health service for `liveness`, served as soon as the process
            // runs; readiness asks for the server as a whole, served once the weights are loaded.
            liveness_probe: Some(Probe {
                grpc: Some(GRPCAction { port: probe_port, service: Some("liveness".into()) }),
                period_seconds: Some(10),
                failure_threshold: Some(3),
                ..Probe::default()
            }),
            readiness_probe: Some(Probe {
                grpc: Some(GRPCAction { port: probe_port, service: None }),
                ..readiness()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        }
    }

    fn pod_spec(&self) -> PodSpec {
        PodSpec {
            // Pods never call the Kubernetes API: the placement arrives as a mounted file.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            priority_class_name: self.md.spec.scheduling.priority_class_name.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }
    }
}

/// A port of a Service, `app_protocol` telling gateways and meshes what it speaks.
fn service_port(name: &str, port: i32, app_protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        app_protocol: Some(app_protocol.into()),
        ..ServicePort::default()
    }
}

/// How often readiness is asked, and how many failures make a pod unready.
fn readiness() -> Probe {
    Probe { period_seconds: Some(5), failure_threshold: Some(2), ..Probe::default() }
}

fn policy_port(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort { name: Some(name.into()), container_port: port, ..ContainerPort::default() }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only).filter(|r| *r),
        ..VolumeMount::default()
    }
}

fn field_ref(path: &str) -> EnvVarSource {
    EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..ObjectFieldSelector::default() }),
        ..EnvVarSource::default()
    }
}

fn pod_env() -> Vec<EnvVar> {
    ["POD_NAME", "POD_NAMESPACE"]
        .into_iter()
        .zip(["metadata.name", "metadata.namespace"])
        .map(|(name, path)| EnvVar {
            name: name.into(),
            value_from: Some(field_ref(path)),
            ..EnvVar::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubemoe_placement::{LayoutSpec, ModelConfig};

    fn build_for(spec: serde_json::Value, uid: Option<&str>) -> Desired {
        let mut md = ModelDeployment::new("m", serde_json::from_value(spec).unwrap());
        md.metadata.namespace = Some("ns".into());
        md.metadata.uid = uid.map(str::to_string);
        let source = ModelSource::parse(&md.spec.model.source).unwrap();
        let model = ModelConfig::preset("tiny").unwrap().unwrap();
        // The placement's layout alone: these tests build pods for settings `spec::layout` refuses
        // until they are built (GPU workers).
        let experts = LayoutSpec {
            workers: md.spec.workers.replicas,
            redundant: md.spec.experts.redundant,
            min_replicas: md.spec.experts.min_replicas,
        };
        let layout = kubemoe_placement::layout::layout(&experts, &model).unwrap();
        let params = BuildParams {
            image: "img".into(),
            epoch: 3,
            placed_workers: 0,
            operator_namespace: "kubemoe-system".into(),
            token: kubemoe_api::auth::generate_token,
        };
        build(&md, &source, &layout, &params).unwrap()
    }

    /// builtin:tiny on two workers, the spec's defaults otherwise.
    fn tiny() -> Desired {
        build_for(serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}}), None)
    }

    fn worker_pod(desired: &Desired) -> PodSpec {
        desired.workers.spec.clone().unwrap().template.spec.unwrap()
    }

    #[test]
    fn gpu_workers_get_gpu_limits_next_to_their_resources() {
        let desired = build_for(
            serde_json::json!({"model": {"source": "builtin:tiny"}, "transport": "nccl",
                "workers": {"replicas": 2, "gpusPerWorker": 2, "resources": {"limits": {"memory": "8Gi"}}}}),
            None,
        );
        let limits = worker_pod(&desired).containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("2".into()));
        assert_eq!(limits["memory"], Quantity("8Gi".into()));
        let cpu_only = tiny();
        assert!(worker_pod(&cpu_only).containers[0].resources.is_none());
    }

    #[test]
    fn both_roles_get_the_dtype_unless_it_is_auto() {
        let args = |dtype: &str| {
            let spec = serde_json::json!({"model": {"source": "builtin:tiny", "dtype": dtype}, "workers": {"replicas": 2}});
            let d = build_for(spec, None);
            let router =
                d.router.spec.clone().unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
            [worker_pod(&d).containers[0].args.clone().unwrap(), router]
                .map(|a| a.iter().skip_while(|a| *a != "--dtype").nth(1).cloned())
        };
        assert_eq!(args("auto"), [None, None]);
        for dtype in ["bf16", "fp8", "f32"] {
            assert_eq!(args(dtype), [Some(dtype.to_string()), Some(dtype.to_string())]);
        }
    }

    #[test]
    fn routers_get_the_speculative_flag_when_it_is_set() {
        let router_args = |router: serde_json::Value| {
            let spec = serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}, "router": router});
            let d = build_for(spec, None);
            let args =
                d.router.spec.clone().unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
            args.iter().skip_while(|a| *a != "--speculative").nth(1).cloned()
        };
        assert_eq!(router_args(serde_json::json!({"speculative": "mtp:2"})).as_deref(), Some("mtp:2"));
        assert_eq!(router_args(serde_json::json!({})), None);
    }

    #[test]
    fn pods_run_hardened_with_shm_tmp_and_placement() {
        let desired = build_for(
            serde_json::json!({"model": {"source": "hostPath:///data/m"}, "workers": {"replicas": 2}}),
            None,
        );
        let pod = worker_pod(&desired);
        let security = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let volumes = pod.volumes.unwrap();
        let shm = volumes.iter().find(|v| v.name == "dshm").unwrap().empty_dir.clone().unwrap();
        assert_eq!(shm.medium.as_deref(), Some("Memory"));
        let model = volumes.iter().find(|v| v.name == "model").unwrap().host_path.clone().unwrap();
        assert_eq!(model.path, "/data/m");
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let paths: Vec<&str> = mounts.iter().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(paths, ["/tmp", PLACEMENT_DIR, INTERNAL_DIR, MODEL_DIR, "/dev/shm"]);
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(&args[..3], ["worker", "--model", MODEL_DIR]);
        let probe = pod.containers[0].readiness_probe.clone().unwrap().grpc.unwrap();
        assert_eq!(probe.port, 50052);
        // Prometheus scrapes the worker's own HTTP port, named like the router's.
        assert_eq!(args.iter().skip_while(|a| *a != "--http-port").nth(1).map(String::as_str), Some("8080"));
        let ports = pod.containers[0].ports.clone().unwrap();
        assert_eq!(
            ports.iter().map(|p| (p.name.as_deref(), p.container_port)).collect::<Vec<_>>(),
            [(Some("grpc"), 50052), (Some("http"), 8080), (Some("data"), 50054)]
        );
        // Routers dispatch over the data path: its port is passed and declared.
        assert_eq!(args.iter().skip_while(|a| *a != "--data-port").nth(1).map(String::as_str), Some("50054"));
        let service_ports = desired.worker_service.spec.clone().unwrap().ports.unwrap();
        assert_eq!(service_ports[1].name.as_deref(), Some("http"));
        // A router is ready when its HTTP `/health` answers; alive while gRPC `liveness` does.
        let router = desired.router.spec.clone().unwrap().template.spec.unwrap();
        let ready = router.containers[0].readiness_probe.clone().unwrap();
        let get = ready.http_get.unwrap();
        assert_eq!((get.path.as_deref(), get.port), (Some("/health"), IntOrString::String("http".into())));
        assert!(ready.grpc.is_none());
        let live = router.containers[0].liveness_probe.clone().unwrap().grpc.unwrap();
        assert_eq!(live.service.as_deref(), Some("liveness"));
    }

    #[test]
    fn api_keys_come_from_the_secret_as_a_file_the_router_rereads() {
        let open = tiny();
        let args =
            open.router.spec.clone().unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
        assert!(!args.iter().any(|a| a == "--api-keys-file"));
        let desired = build_for(
            serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2},
                "auth": {"apiKeysSecret": "team-keys"}}),
            None,
        );
        let pod = desired.router.spec.clone().unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(
            args.iter().skip_while(|a| *a != "--api-keys-file").nth(1).map(String::as_str),
            Some("/etc/kubemoe/auth/api-keys")
        );
        let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "api-keys").unwrap().secret.unwrap();
        assert_eq!(volume.secret_name.as_deref(), Some("team-keys"));
        assert_eq!(volume.items.unwrap()[0].key, "api-keys");
        let mount = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.name == "api-keys")
            .unwrap();
        // No subPath: the kubelet's updates of the Secret reach the file.
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only, mount.sub_path),
            (AUTH_DIR, Some(true), None)
        );
        // Workers never see the keys.
        let worker_volumes = worker_pod(&desired).volumes.unwrap();
        assert!(worker_volumes
            .iter()
            .filter_map(|v| v.secret.as_ref())
            .all(|s| s.secret_name.as_deref() == Some("m-internal")));
    }

    #[test]
    fn with_tls_both_roles_mount_the_secret_serve_tls_and_are_probed_on_the_plaintext_health_port() {
        let desired = build_for(
            serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2},
                "tls": {"secretName": "m-cert"}}),
            None,
        );
        let router = desired.router.spec.clone().unwrap().template.spec.unwrap();
        for pod in [worker_pod(&desired), router.clone()] {
            let container = &pod.containers[0];
            let args = container.args.clone().unwrap();
            let after = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
            assert_eq!(after("--tls-dir").as_deref(), Some(TLS_DIR));
            assert_eq!(after("--health-port").as_deref(), Some("50059"));
            let volume = pod.volumes.clone().unwrap().into_iter().find(|v| v.name == "tls").unwrap();
            assert_eq!(volume.secret.unwrap().secret_name.as_deref(), Some("m-cert"));
            let mounts = container.volume_mounts.clone().unwrap();
            let mount = mounts.iter().find(|m| m.name == "tls").unwrap();
            // No subPath: renewed certificates reach the running pods.
            assert_eq!((mount.mount_path.as_str(), mount.sub_path.as_deref()), (TLS_DIR, None));
            let ports = container.ports.clone().unwrap();
            assert!(ports.iter().any(|p| (p.name.as_deref(), p.container_port) == (Some("health"), 50059)));
            let live = container.liveness_probe.clone().unwrap().grpc.unwrap();
            assert_eq!(live.port, 50059);
        }
        let worker = worker_pod(&desired);
        assert_eq!(worker.containers[0].readiness_probe.clone().unwrap().grpc.unwrap().port, 50059);
        // The router's readiness asks /health over HTTPS; its workers must hold the router
        // Service's name.
        let ready = router.containers[0].readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(ready.scheme.as_deref(), Some("HTTPS"));
        let args = router.containers[0].args.clone().unwrap();
        let name = args.iter().skip_while(|a| *a != "--tls-server-name").nth(1).unwrap();
        assert!(name.starts_with("m.") && name.ends_with(".svc"), "{name}");
        // Without TLS: none of it.
        let plain = tiny();
        let args = worker_pod(&plain).containers[0].args.clone().unwrap();
        assert!(!args.iter().any(|a| a == "--tls-dir" || a == "--health-port"));
        assert!(worker_pod(&plain).volumes.unwrap().iter().all(|v| v.name != "tls"));
    }

    #[test]
    fn routers_and_workers_share_the_internal_token_and_the_balancer_has_its_own_port() {
        let desired = tiny();
        let router = desired.router.spec.clone().unwrap().template.spec.unwrap();
        for pod in [worker_pod(&desired), router.clone()] {
            let args = pod.containers[0].args.clone().unwrap();
            assert_eq!(
                args.iter().skip_while(|a| *a != "--internal-token-file").nth(1).map(String::as_str),
                Some("/etc/kubemoe/internal/token")
            );
            let volumes = pod.volumes.unwrap();
            let volume = volumes.iter().find(|v| v.name == "internal-token").unwrap().secret.clone().unwrap();
            assert_eq!(volume.secret_name.as_deref(), Some("m-internal"));
            let mounts = pod.containers[0].volume_mounts.clone().unwrap();
            let mount = mounts.iter().find(|m| m.name == "internal-token").unwrap();
            // No subPath: a rotated token reaches the running pods.
            assert_eq!((mount.mount_path.as_str(), mount.sub_path.as_deref()), (INTERNAL_DIR, None));
        }
        let args = router.containers[0].args.clone().unwrap();
        assert_eq!(
            args.iter().skip_while(|a| *a != "--internal-port").nth(1).map(String::as_str),
            Some("50053")
        );
        let ports = router.containers[0].ports.clone().unwrap();
        assert!(ports.iter().any(|p| (p.name.as_deref(), p.container_port) == (Some("internal"), 50053)));
        // The router Service exposes the public ports only.
        let service = desired.router_service.spec.clone().unwrap().ports.unwrap();
        assert!(service.iter().all(|p| p.port != 50053), "{service:?}");

        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ml", "uid": "u-1"},
            "spec": {"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}}}))
        .unwrap();
        let secret = internal_token_secret(&md, "t0k3n").unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("m-internal"));
        assert_eq!(secret.string_data.unwrap()[INTERNAL_TOKEN_KEY], "t0k3n");
        assert_eq!(secret.metadata.owner_references.unwrap()[0].uid, "u-1");
    }

    /// (ports, sources) of each ingress rule: sources as "component" for pods of this
    /// deployment, "operator@<ns>", "namespace" for any pod of it, "*" for anyone.
    fn rules(policy: &NetworkPolicy) -> Vec<(Vec<i32>, Vec<String>)> {
        let spec = policy.spec.clone().unwrap();
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        spec.ingress
            .unwrap()
            .into_iter()
            .map(|rule| {
                let ports = rule
                    .ports
                    .unwrap()
                    .into_iter()
                    .map(|p| match p.port {
                        Some(IntOrString::Int(port)) => port,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                let from = match rule.from {
                    None => vec!["*".to_string()],
                    Some(peers) => peers
                        .into_iter()
                        .map(|peer| {
                            let pods = peer.pod_selector.and_then(|s| s.match_labels).unwrap_or_default();
                            match peer.namespace_selector.and_then(|s| s.match_labels) {
                                Some(ns) => format!(
                                    "{}@{}",
                                    pods["app.kubernetes.io/component"], ns["kubernetes.io/metadata.name"]
                                ),
                                None if pods.is_empty() => "namespace".into(),
                                None => {
                                    assert_eq!(pods["app.kubernetes.io/instance"], "m");
                                    pods["app.kubernetes.io/component"].clone()
                                }
                            }
                        })
                        .collect(),
                };
                (ports, from)
            })
            .collect()
    }

    #[test]
    fn workers_take_calls_only_from_their_routers_and_the_operator() {
        let desired = tiny();
        let selector =
            desired.worker_policy.spec.clone().unwrap().pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(selector, selector_labels("m", "worker"));
        assert_eq!(
            rules(&desired.worker_policy),
            [
                (vec![50052], vec!["router".to_string(), "operator@kubemoe-system".to_string()]),
                (vec![50054], vec!["router".to_string()]),
                (vec![8080], vec!["*".to_string()]),
            ]
        );
        // Routers: both API ports from this namespace by default, the internal port from the
        // operator only.
        assert_eq!(
            rules(&desired.router_policy),
            [
                (vec![50051, 8080], vec!["namespace".to_string()]),
                (vec![50053], vec!["operator@kubemoe-system".to_string()]),
            ]
        );
        let open = build_for(
            serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2},
                "router": {"allowedFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]}}),
            None,
        );
        let peers = open.router_policy.spec.unwrap().ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].pod_selector.is_none());
        // The policies come before the pods they guard.
        let kinds: Vec<String> =
            desired.objects().unwrap().iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect();
        let at = |kind: &str| kinds.iter().position(|k| k == kind).unwrap();
        assert!(at("NetworkPolicy") < at("StatefulSet"));
        assert!(kinds.iter().rposition(|k| k == "NetworkPolicy").unwrap() < at("Deployment"));
    }

    #[test]
    fn gang_scheduling_labels_pods_and_creates_the_scheduler_s_pod_group() {
        let spec = |scheduler: &str| {
            serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 4},
                "scheduling": {"gang": true, "schedulerName": scheduler}})
        };
        let volcano = build_for(spec("volcano"), None);
        let template = volcano.workers.spec.clone().unwrap().template;
        let metadata = template.metadata.unwrap();
        assert_eq!(metadata.annotations.unwrap()[VOLCANO_GROUP_ANNOTATION], "m-workers");
        assert_eq!(metadata.labels.unwrap()[COSCHEDULING_GROUP_LABEL], "m-workers");
        assert_eq!(template.spec.unwrap().scheduler_name.as_deref(), Some("volcano"));
        let group = volcano.pod_group.unwrap();
        assert_eq!(group.resource.group, "scheduling.volcano.sh");
        assert_eq!(group.object.data["spec"]["minMember"], 4);
        let plugins = build_for(spec("scheduler-plugins-scheduler"), None).pod_group.unwrap();
        assert_eq!(plugins.resource.api_version, "scheduling.x-k8s.io/v1alpha1");
        assert!(build_for(
            serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 4}}),
            None
        )
        .pod_group
        .is_none());
    }

    #[test]
    fn children_are_owned_when_the_deployment_has_a_uid_and_hashes_follow_content() {
        let spec = serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}});
        let owned = build_for(spec.clone(), Some("u-1"));
        for object in owned.objects().unwrap() {
            assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "u-1", "{}", object["kind"]);
            assert_eq!(object["metadata"]["namespace"], "ns");
            assert!(object["metadata"]["annotations"][HASH_ANNOTATION].is_string());
        }
        let placement: PlacementPlan =
            serde_json::from_str(&owned.placement.data.clone().unwrap()[placement::KEY]).unwrap();
        assert_eq!(placement.epoch, 3);
        assert!(build_for(spec.clone(), None).workers.metadata.owner_references.is_none());

        let same = build_for(spec.clone(), Some("u-1"));
        assert_eq!(same, owned, "the builder is deterministic");
        let mut bigger = spec;
        bigger["router"] = serde_json::json!({"replicas": 2});
        let changed = build_for(bigger, Some("u-1"));
        assert_ne!(
            changed.router.annotations()[HASH_ANNOTATION],
            owned.router.annotations()[HASH_ANNOTATION]
        );
        assert_eq!(
            changed.workers.annotations()[HASH_ANNOTATION],
            owned.workers.annotations()[HASH_ANNOTATION]
        );
    }

    #[test]
    fn content_hash_is_fnv1a() {
        // FNV-1a 64 of "a", a published test vector.
        assert_eq!(content_hash("a"), "af63dc4c8601ec8c");
    }
}
