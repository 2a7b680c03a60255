//! The `ModelDeployment` custom resource (`kubemoe.io/v1alpha1`, short name `md`).
//!
//! Doc comments on the fields become the OpenAPI descriptions that `kubectl explain` prints.
//! Rules the spec alone decides are in the schema (ranges, enums, patterns, CEL rules); rules
//! that need the model's `config.json` (is `n_routed_experts + experts.redundant` divisible by
//! `workers.replicas`?) are checked by the operator, which then reports `Ready=False` with the
//! reason instead of creating anything. So are values the schema accepts for what is not built
//! yet (`transport: nccl`, `workers.gpusPerWorker > 0`,
//! `experts.placement: hierarchical`): refused with
//! reason `NotBuilt` and what to set instead, never served some other way.

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Go-style durations as the apiserver's CEL `duration()` parses them (`30s`, `5m`, `1h30m`).
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A DeepSeek-family Mixture-of-Experts model served with expert parallelism: router pods run
/// attention and the dense layers, worker pods each hold a shard of every MoE layer's experts.
// Each `printcolumn(...)` repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemoe.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "md",
    category = "kubemoe",
    doc = "A DeepSeek-family Mixture-of-Experts model served by router pods and expert-parallel worker pods.",
    status = "ModelDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.workers.replicas",
        label_selector_path = ".status.workerSelector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".status.workers.ready",
        description = "Worker pods ready"
    ),
    printcolumn(
        name = "Experts",
        type_ = "integer",
        json_path = ".status.placement.physicalExperts",
        description = "Physical expert slots per MoE layer (routed experts + redundant)"
    ),
    printcolumn(
        name = "Imbalance",
        type_ = "number",
        json_path = ".status.placement.imbalance",
        description = "Max over mean tokens per worker over the balancing window"
    ),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.placement.epoch"),
    printcolumn(
        name = "Loading",
        type_ = "string",
        json_path = ".status.loading.progress",
        description = "Weights loaded by the worker pods still loading, of theirs in all"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("self.transport != 'nccl' || self.workers.gpusPerWorker > 0")
        .message("transport nccl needs GPU workers (workers.gpusPerWorker > 0); neither is built yet: set transport to tcp"),
    validation = Rule::new("self.router.grpcPort != self.router.httpPort")
        .message("router.grpcPort and router.httpPort must differ"),
    validation = Rule::new("self.router.internalPort != self.router.grpcPort && self.router.internalPort != self.router.httpPort")
        .message("router.internalPort must differ from router.grpcPort and router.httpPort"),
    validation = Rule::new("self.workers.port != self.workers.httpPort")
        .message("workers.port and workers.httpPort must differ"),
    validation = Rule::new("self.workers.dataPort != self.workers.port && self.workers.dataPort != self.workers.httpPort")
        .message("workers.dataPort must differ from workers.port and workers.httpPort"),
    validation = Rule::new("!has(self.tls) || !(self.tls.healthPort in [self.router.grpcPort, self.router.httpPort, self.router.internalPort, self.workers.port, self.workers.httpPort, self.workers.dataPort])")
        .message("tls.healthPort must differ from the router's and the workers' other ports")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model to serve and where its weights come from.
    pub model: ModelSpec,
    /// The router pods: the API front door, attention, dense layers and expert dispatch.
    #[serde(default)]
    pub router: RouterSpec,
    /// The expert-parallel worker pods; each holds an equal share of every MoE layer's expert slots.
    pub workers: WorkersSpec,
    /// How experts are laid out over the workers.
    #[serde(default)]
    pub experts: ExpertsSpec,
    /// Load-driven rebalancing of experts between workers.
    #[serde(default)]
    pub balancing: BalancingSpec,
    /// How activations travel between routers and workers: tcp (anywhere). nccl (between GPUs)
    /// is not built yet and is refused with reason NotBuilt.
    #[serde(default)]
    pub transport: Transport,
    /// Placement of the pods with a gang-aware scheduler.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// Who may use the router's public APIs.
    #[serde(default)]
    pub auth: AuthSpec,
    /// TLS on every port of the routers and workers. Default: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Image of the router and worker pods (the one `kubemoe` image); defaults to the
    /// operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

/// The model to serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the Hugging Face model directory is: `pvc://<claim>/<path>` (a PersistentVolumeClaim
    /// in this namespace), `hostPath:///<path>` (a directory on every node), or
    /// `builtin:<preset>` (a generated model: tiny, small, v2-lite-shape, v3-shape).
    #[schemars(regex(
        pattern = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|hostPath:///.*|builtin:[a-z0-9][-a-z0-9]*)$"
    ))]
    pub source: String,
    /// Precision of the weight matrices in memory (every product accumulates in f32).
    /// `auto` (the default): the checkpoint's own (bf16 stays 16-bit, FP8 stays one byte a value
    /// with its block scales). `bf16`: f32 checkpoints rounded to bf16 at load. `fp8`: every
    /// `*_proj.weight` in e4m3 with 128×128 block scales (quantised at load when stored
    /// wider), the other matrices 16-bit. `f32`: everything widened (four bytes a value).
    /// `bf16` on an FP8 checkpoint is refused by the pods (it would round the stored values).
    #[serde(default)]
    pub dtype: Dtype,
    /// The model name clients of the OpenAI-compatible API send (`model`) and see in
    /// `/v1/models`; defaults to the ModelDeployment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[!-~]+$"))]
    pub served_name: Option<String>,
    /// Longest sequence (prompt + generated tokens) the router accepts; defaults to the model's
    /// `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_context_length: Option<i32>,
    /// Name of a ConfigMap in this namespace whose key `config.json` holds the model's
    /// `config.json`. Required for `pvc://` and `hostPath://` models: the operator cannot read
    /// the volume, and needs the expert and layer counts to lay experts out. Ignored for
    /// `builtin:` models, whose configuration is compiled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map: Option<String>,
}

/// Precision of the weights in memory.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Auto,
    Bf16,
    Fp8,
    F32,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
            Dtype::F32 => "f32",
        }
    }
}

/// The router pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Router pods (data parallel; each dispatches to every worker). The scale subresource
    /// (`kubectl scale md/<name>`, HorizontalPodAutoscaler) sets this.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// CPU, memory (and accelerator) requests and limits of each router container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Most tokens (prefill and decode together) in one forward step of a router's batch; a
    /// longer prompt is prefilled in chunks over several steps, between decode steps of the
    /// requests already running.
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_batch_tokens: i32,
    /// Most requests a router serves at once; more wait in its queue.
    #[serde(default = "default_max_concurrent_requests")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_concurrent_requests: i32,
    /// MiB of KV cache a router holds for its running requests (MLA's latent rows, f32); each
    /// request reserves its prompt plus `max_tokens`. It must hold one request of the context
    /// length (`model.maxContextLength`), else the spec is refused (`KvCacheTooSmall`); budget
    /// it inside the router's memory request.
    #[serde(default = "default_kv_cache_mib", rename = "kvCacheMiB")]
    #[schemars(range(min = 1, max = 16777216))]
    pub kv_cache_mib: i32,
    /// MiB of prefix cache a router holds besides `kvCacheMiB`: the latent KV rows of prompts
    /// already prefilled, in blocks of 16 tokens, reused by later prompts that begin with them
    /// (a shared system prompt is prefilled once); least recently used blocks go first. 0
    /// turns it off. Budget it inside the router's memory request.
    #[serde(default = "default_prefix_cache_mib", rename = "prefixCacheMiB")]
    #[schemars(range(min = 0, max = 16777216))]
    pub prefix_cache_mib: i32,
    /// Speculative decoding: `mtp:K` drafts K tokens (1 to 4) per decode step with the model's
    /// multi-token-prediction module (DeepSeek-V3's MTP) and verifies them in the same step:
    /// greedy outputs are unchanged, sampled ones keep their distribution, and the acceptance
    /// rate is in `/metrics` (`vllm:spec_decode_*`). The model's config must have
    /// `num_nextn_predict_layers` and its checkpoint the module's weights (a router without
    /// them refuses to start). Each request then reserves K more tokens of KV cache and the
    /// module's one-layer cache. Absent: no speculation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<String>,
    /// Port of the gRPC API (Generate) and of the gRPC health service the probes call.
    #[serde(default = "default_grpc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub grpc_port: i32,
    /// Port of the router's HTTP server: the OpenAI-compatible API (`/v1/models`,
    /// `/v1/completions`, `/v1/chat/completions`), `/health` and Prometheus `/metrics`.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// Port of the router's internal gRPC service (the rebalancer's `Load` and `Commit`): not
    /// in the Service, reachable from the operator only, and only with the deployment's
    /// internal token.
    #[serde(default = "default_router_internal_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub internal_port: i32,
    /// Who may reach the routers' APIs (`grpcPort`, `httpPort`), as NetworkPolicy peers;
    /// default: pods of this namespace. Add your gateway's and Prometheus' namespaces here, or
    /// `[{namespaceSelector: {}}]` for every pod of the cluster. Only the operator reaches
    /// `internalPort`; workers take calls from this deployment's routers and the operator only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub allowed_from: Option<Vec<NetworkPolicyPeer>>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: one(),
            resources: None,
            max_batch_tokens: default_max_batch_tokens(),
            max_concurrent_requests: default_max_concurrent_requests(),
            kv_cache_mib: default_kv_cache_mib(),
            prefix_cache_mib: default_prefix_cache_mib(),
            speculative: None,
            grpc_port: default_grpc_port(),
            http_port: default_http_port(),
            internal_port: default_router_internal_port(),
            allowed_from: None,
        }
    }
}

/// The expert-parallel worker pods (a StatefulSet: worker `i` has rank `i`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// Worker pods, the expert-parallel size. `n_routed_experts + experts.redundant` of the
    /// model must be divisible by it.
    #[schemars(range(min = 1, max = 1024))]
    pub replicas: i32,
    /// GPUs (`nvidia.com/gpu`) per worker pod. Experts compute on the CPU: GPU compute is not
    /// built yet, so anything above 0 is refused with reason NotBuilt.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_worker: i32,
    /// Port of the worker's gRPC service (dispatch, placement commands, health).
    #[serde(default = "default_worker_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port of the worker's HTTP server: Prometheus `/metrics` and `/health`.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// Port of the worker's data path: routers send it each layer's activations in
    /// length-prefixed frames over persistent connections (the internal token and TLS as on
    /// `port`), reachable from this deployment's routers only.
    #[serde(default = "default_worker_data_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub data_port: i32,
    /// CPU and memory requests and limits of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Size of the memory-backed `/dev/shm` of each worker; defaults to 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,
    /// Node labels a worker pod's node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the worker pods tolerate (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// How worker pods spread over the cluster; defaults to at most one more worker per node
    /// than on any other node, when it can be satisfied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

/// Expert layout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExpertsSpec {
    /// Extra physical expert slots per MoE layer beyond the model's `n_routed_experts`; they
    /// hold replicas of the most loaded experts.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4096))]
    pub redundant: i32,
    /// Distinct workers every logical expert is on, in the initial placement and after every
    /// rebalance: 2 lets any one worker die without a failed request (routers route around it
    /// through the other copies). Needs `minReplicas × n_routed_experts` expert slots
    /// (`experts.redundant`) and as many workers, refused with a reason otherwise.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub min_replicas: i32,
    /// `global` balances expert load over all workers at once. `hierarchical` (each expert
    /// group's replicas kept on one node, as DeepSeek's hierarchical EPLB does) needs workers
    /// pinned to nodes, which is not built yet: it is refused with reason NotBuilt.
    #[serde(default)]
    pub placement: PlacementPolicy,
}

impl Default for ExpertsSpec {
    fn default() -> Self {
        ExpertsSpec { redundant: 0, min_replicas: 1, placement: PlacementPolicy::default() }
    }
}

/// Expert placement algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    Hierarchical,
    #[default]
    Global,
}

/// Load-driven rebalancing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("duration(self.window) >= duration(self.interval)")
        .message("balancing.window must be at least balancing.interval: the load of one poll must fit in the window")
)]
#[serde(rename_all = "camelCase")]
pub struct BalancingSpec {
    /// Move and replicate experts when the load becomes unbalanced.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the operator polls the routers' expert load.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: String,
    /// Sliding window the load is measured over.
    #[serde(default = "default_window")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub window: String,
    /// Rebalance when max/mean tokens per worker over the window exceeds this.
    #[serde(default = "default_imbalance_threshold")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub imbalance_threshold: f64,
    /// Most expert copies loaded or dropped in one rebalance (bounds the migration's cost).
    #[serde(default = "default_max_moved")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_experts_moved_per_rebalance: i32,
    /// Least time between two rebalances.
    #[serde(default = "default_cooldown")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub cooldown: String,
}

impl Default for BalancingSpec {
    fn default() -> Self {
        BalancingSpec {
            enabled: yes(),
            interval: default_interval(),
            window: default_window(),
            imbalance_threshold: default_imbalance_threshold(),
            max_experts_moved_per_rebalance: default_max_moved(),
            cooldown: default_cooldown(),
        }
    }
}

/// Activation transport between routers and workers: `tcp` (between pods, on any node); `nccl`
/// (send/recv between GPUs, needs workers.gpusPerWorker > 0) is refused until it is built.
// Variants carry no doc comments: schemars would turn them into a `oneOf`, which a structural
// CRD schema cannot hold.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Nccl,
    #[default]
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nccl => "nccl",
            Transport::Tcp => "tcp",
        }
    }
}

/// Authentication of the router's public APIs (gRPC inference and the OpenAI `/v1/*`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// A Secret in this namespace whose key `api-keys` holds API keys, one per line. Calls then
    /// need `Authorization: Bearer <key>` (401 / UNAUTHENTICATED otherwise); `/health`,
    /// `/metrics`, gRPC health and reflection stay open. Keys the Secret gains or loses apply
    /// within a minute or so (kubelet's sync), without a restart. Default: no keys, open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub api_keys_secret: Option<String>,
}

/// TLS on every port of the deployment's pods (the public gRPC and HTTP APIs, the routers'
/// internal port, the workers), and on the internal calls between them and from the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in this namespace with `tls.crt`, `tls.key` and `ca.crt`: what cert-manager
    /// writes for a Certificate. Its certificate must be valid for `<name>.<namespace>.svc`
    /// (the router Service, and the name every internal call checks), and `ca.crt` must hold
    /// the CA that issued it. Renewals apply to new connections without a restart.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// A plaintext port on every pod that serves gRPC health alone: kubelet's gRPC probes
    /// cannot speak TLS.
    #[serde(default = "default_health_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub health_port: i32,
}

/// Scheduling of the pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!self.gang || has(self.schedulerName)")
        .message("gang scheduling needs a gang-aware scheduler: set scheduling.schedulerName (for example volcano or scheduler-plugins-scheduler)")
)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Schedule all workers together or none (a partial set of workers cannot serve). Worker
    /// pods get the pod-group annotation Volcano reads and the pod-group label
    /// scheduler-plugins' coscheduling reads, and the operator creates the PodGroup
    /// (minMember = workers.replicas): Volcano's when schedulerName is `volcano`,
    /// scheduler-plugins' otherwise.
    #[serde(default)]
    pub gang: bool,
    /// The scheduler of the worker pods (default: the cluster's default scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// PriorityClass of the router and worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// What the operator observed. Written only through the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready` (routers and all workers serve), `Progressing` (children being created or
    /// rolled out), `Degraded` (was ready, lost workers or routers), `Rebalancing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routers: Option<ReplicaCounts>,
    /// Worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<ReplicaCounts>,
    /// Label selector of the router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_selector: Option<String>,
    /// Label selector of the worker pods, for the scale subresource (`kubectl scale md/<name>
    /// --replicas N` resizes the workers live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_selector: Option<String>,
    /// The expert placement in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// Where clients connect: `<service>.<namespace>.svc:<grpcPort>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Worker pods loading their weights, while any does (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loading: Option<LoadingStatus>,
}

/// How far the worker pods that are loading their weights have got, summed over them (as each
/// reports it in `Info`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LoadingStatus {
    /// Worker pods loading.
    pub workers: i32,
    /// Bytes of weights they have read.
    pub loaded_bytes: i64,
    /// Bytes of weights they read in all.
    pub total_bytes: i64,
    /// `loaded_bytes` of `total_bytes` in percent, whole (`37%`).
    pub progress: String,
}

/// One-word summary of a ModelDeployment's state: `Failed` (the spec cannot be served as
/// written; see the Ready condition's message), `Progressing` (children being created or rolled
/// out), `Ready` (all routers and workers serve), `Degraded` (it was ready and has lost pods).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Failed,
    Progressing,
    Ready,
    Degraded,
}

/// Pod counts of a workload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Pods the workload has.
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    pub ready: i32,
}

/// The expert placement in force.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Placement version; the ConfigMap `<name>-placement` holds the same epoch.
    pub epoch: i64,
    /// Routed experts per MoE layer (the model's `n_routed_experts`).
    pub logical_experts: i32,
    /// Expert slots per MoE layer over all workers (logical + redundant).
    pub physical_experts: i32,
    /// Workers the placement in force spreads the experts over: `workers.replicas` once a
    /// resize is done (until then the StatefulSet keeps the workers of both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<i32>,
    /// Max over mean tokens per worker over the balancing window (1.0 is perfect balance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance: Option<f64>,
    /// When the last rebalance committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebalance_time: Option<Time>,
    /// Expert copies moved by the last rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_moved: Option<i64>,
    /// Ranks of the workers the routers route around (they stopped answering), at the last poll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers_down: Vec<i32>,
    /// The highest placement epoch ever proposed (the rebalancer's and the controller's next one
    /// is numbered above it): an epoch number never names two plans, even after a migration
    /// that was put back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_epoch: Option<i64>,
    /// Logical experts, summed over the MoE layers, that only workers down hold: requests
    /// needing them fail until a recovery epoch places them on live workers (the `Degraded`
    /// condition names them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_experts: Option<i64>,
}

fn one() -> i32 {
    1
}
fn yes() -> bool {
    true
}
fn default_max_batch_tokens() -> i32 {
    8192
}
fn default_max_concurrent_requests() -> i32 {
    256
}
fn default_kv_cache_mib() -> i32 {
    1024
}
fn default_prefix_cache_mib() -> i32 {
    256
}
fn default_grpc_port() -> i32 {
    50051
}
fn default_http_port() -> i32 {
    8080
}
fn default_router_internal_port() -> i32 {
    50053
}
fn default_health_port() -> i32 {
    50059
}
fn default_worker_port() -> i32 {
    50052
}
fn default_worker_data_port() -> i32 {
    50054
}
fn default_interval() -> String {
    "30s".into()
}
fn default_window() -> String {
    "5m".into()
}
fn default_imbalance_threshold() -> f64 {
    1.3
}
fn default_max_moved() -> i32 {
    16
}
fn default_cooldown() -> String {
    "5m".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    /// Fields left out of a manifest take the same defaults in Rust as the CRD gives them, so
    /// `render` (no apiserver defaulting) and the controller build the same objects.
    #[test]
    fn minimal_spec_takes_defaults() {
        let spec: ModelDeploymentSpec = serde_json::from_value(serde_json::json!({
            "model": {"source": "builtin:tiny"},
            "workers": {"replicas": 2}
        }))
        .unwrap();
        assert_eq!(spec.router, RouterSpec::default());
        assert_eq!(spec.router.replicas, 1);
        assert_eq!(spec.transport, Transport::Tcp);
        assert_eq!(spec.balancing.interval, "30s");
        assert_eq!(spec.workers.port, 50052);
        assert!(!spec.scheduling.gang);
    }

    #[test]
    fn crd_carries_names_subresources_columns_and_rules() {
        let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "modeldeployments.kubemoe.io");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "md");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["subresources"]["scale"]["specReplicasPath"], ".spec.workers.replicas");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Ready", "Workers", "Experts", "Imbalance", "Epoch", "Loading", "Age"]);
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rules: Vec<&str> = spec["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert!(rules.iter().any(|r| r.contains("nccl")), "{rules:?}");
        let workers = &spec["properties"]["workers"]["properties"];
        assert_eq!(workers["replicas"]["minimum"].as_f64(), Some(1.0));
        assert!(workers["replicas"]["description"].as_str().unwrap().contains("expert-parallel size"));
        assert_eq!(
            spec["properties"]["transport"]["enum"],
            serde_json::json!(["nccl", "tcp"]),
            "enums become schema enums"
        );
    }
}
