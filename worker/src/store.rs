//! The experts this worker holds and the tokens each has processed.
//!
//! Invariants: the experts held are those the plan in force places on this rank, plus, between
//! a `prepare` and its `release`, those the prepared plan places here (so that routers on
//! either epoch are served during a live migration, `kubemoe_placement::rebalance`); `counts[layer][expert]` only
//! grows. With `--device cuda:N` (the `cuda` feature) every expert held is resident on that
//! GPU in the precision it was loaded in, and its host copy is dropped once uploaded; the
//! grouped expert FFN then runs on the GPU (`kubemoe_kernels::cuda`), the same function as on
//! the CPU to summation order.

use crate::{Error, Result};
use kubemoe_kernels::device::DeviceSpec;
use kubemoe_kernels::dtype::f32s_from_le;
use kubemoe_model::layers::{load_expert, run_experts, Mlp, RoutedExperts, Routing};
use kubemoe_model::{source, Config, Precision};
use kubemoe_placement::PlacementPlan;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub struct ExpertStore {
    pub model: String,
    /// What the experts' matrices are held in.
    pub precision: Precision,
    pub config: Config,
    pub rank: usize,
    state: RwLock<State>,
    counts: BTreeMap<usize, Vec<AtomicU64>>,
    /// One `prepare` at a time: a second waits rather than loading the same experts twice.
    preparing: Mutex<()>,
    /// The GPU the experts live on (`--device cuda:N`); none: host memory.
    #[cfg(feature = "cuda")]
    gpu: Option<kubemoe_kernels::cuda::Gpu>,
}

struct State {
    plan: PlacementPlan,
    prepared: Option<PlacementPlan>,
    experts: BTreeMap<(usize, usize), Arc<Held>>,
}

/// An expert's weights, where dispatches read them.
enum Held {
    Host(Mlp),
    #[cfg(feature = "cuda")]
    Gpu(kubemoe_kernels::cuda::GpuExpert),
}

impl Held {
    /// (precision, bytes) of each matrix.
    fn matrices(&self) -> Vec<(&'static str, usize)> {
        match self {
            Held::Host(m) => m.matrices().iter().map(|w| (w.dtype().as_str(), w.bytes())).collect(),
            #[cfg(feature = "cuda")]
            Held::Gpu(g) => g.matrices().iter().map(|w| (w.dtype().as_str(), w.bytes())).collect(),
        }
    }
}

impl ExpertStore {
    /// Loads what `plan` (default: [`PlacementPlan::minimal`] over `world_size` workers)
    /// places on rank `rank` from `model` (a directory or `builtin:<preset>`), reading no other
    /// expert's bytes. The world size is the plan's: a rank past it (a worker a resize is
    /// adding) holds nothing until an epoch places experts on it.
    pub fn load(
        model: &str,
        precision: Precision,
        rank: usize,
        world_size: Option<usize>,
        plan: Option<PlacementPlan>,
    ) -> Result<Self> {
        Self::load_on(DeviceSpec::Cpu, model, precision, rank, world_size, plan)
    }

    /// [`ExpertStore::load`] with the experts on `device`.
    pub fn load_on(
        device: DeviceSpec,
        model: &str,
        precision: Precision,
        rank: usize,
        world_size: Option<usize>,
        plan: Option<PlacementPlan>,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let gpu = match device {
            DeviceSpec::Cpu => None,
            DeviceSpec::Cuda(n) => {
                Some(kubemoe_kernels::cuda::Gpu::new(n).map_err(kubemoe_model::Error::from)?)
            }
        };
        #[cfg(not(feature = "cuda"))]
        if device != DeviceSpec::Cpu {
            return Err(Error::Unsupported(format!(
                "--device {device}: this kubemoe was built without CUDA; build it with \
                 `cargo build --release --features cuda`, or use --device cpu"
            )));
        }
        let (config, _) = source::open_tensors(model, &|_| false)?;
        let (n, layers) = shape(&config);
        let plan = match (plan, world_size) {
            (Some(plan), Some(w)) if w != plan.workers as usize => {
                return Err(Error::Invalid(format!(
                    "--world-size {w} but the placement names {} workers: drop --world-size, the placement says it",
                    plan.workers
                )))
            }
            (Some(plan), _) => plan,
            (None, Some(w)) if w == 0 || rank >= w => {
                return Err(Error::Invalid(format!("rank {rank} outside world size {w}")))
            }
            (None, Some(w)) => PlacementPlan::minimal(n, &layers, w as u32),
            (None, None) => {
                return Err(Error::Invalid(
                    "give --placement (the plan says how many workers there are) or --world-size".into(),
                ))
            }
        };
        plan.validate_for(n, &layers)?;
        if rank >= plan.workers as usize {
            tracing::info!(
                rank,
                workers = plan.workers,
                "rank past the placement's workers: holding nothing until an epoch places experts here"
            );
        }
        let counts =
            layers.iter().map(|&l| (l as usize, (0..n).map(|_| AtomicU64::new(0)).collect())).collect();
        let mut store = Self {
            model: model.into(),
            precision,
            config,
            rank,
            state: RwLock::new(State { plan: plan.clone(), prepared: None, experts: BTreeMap::new() }),
            counts,
            preparing: Mutex::new(()),
            #[cfg(feature = "cuda")]
            gpu,
        };
        let experts = store.load_experts(&store.wanted(&plan))?;
        store.state.get_mut().map_err(|_| Error::Poisoned)?.experts = experts;
        Ok(store)
    }

    /// Loads the experts `plan` places here that are not held yet, while dispatches go on;
    /// returns how many were loaded. Preparing the plan in force again is a no-op, so that a
    /// rebalancer can make sure every worker holds a plan before routers use it.
    pub fn prepare(&self, plan: PlacementPlan) -> Result<usize> {
        let (n, layers) = shape(&self.config);
        plan.validate_for(n, &layers)?;
        let _one = self.preparing.lock().map_err(|_| Error::Poisoned)?;
        let missing: BTreeSet<(usize, usize)> = {
            let state = self.state.read().map_err(|_| Error::Poisoned)?;
            if plan == state.plan {
                return Ok(0);
            }
            if plan.epoch <= state.plan.epoch {
                return Err(Error::Epoch(format!(
                    "plan epoch {} is not newer than the epoch in force, {}: prepare epoch {} or later",
                    plan.epoch,
                    state.plan.epoch,
                    state.plan.epoch + 1
                )));
            }
            self.wanted(&plan).into_iter().filter(|k| !state.experts.contains_key(k)).collect()
        };
        let loaded = self.load_experts(&missing)?;
        let mut state = self.state.write().map_err(|_| Error::Poisoned)?;
        state.experts.extend(loaded);
        state.prepared = Some(plan);
        Ok(missing.len())
    }

    /// Puts the plan of `epoch` in force (the prepared one, or the one in force, which rolls a
    /// prepared plan back) and drops every expert it does not place here; returns how many.
    pub fn release(&self, epoch: u64) -> Result<usize> {
        // Not while a prepare is loading: it would insert experts next to a plan released meanwhile.
        let _one = self.preparing.lock().map_err(|_| Error::Poisoned)?;
        let mut state = self.state.write().map_err(|_| Error::Poisoned)?;
        if let Some(p) = state.prepared.take_if(|p| p.epoch == epoch) {
            state.plan = p;
        } else if state.plan.epoch == epoch {
            state.prepared = None;
        } else {
            let prepared = state.prepared.as_ref().map_or("none".to_string(), |p| p.epoch.to_string());
            return Err(Error::Epoch(format!(
                "release of epoch {epoch}: the epoch in force is {}, the prepared one {prepared}; \
                 prepare epoch {epoch} first",
                state.plan.epoch
            )));
        }
        let keep = self.wanted(&state.plan);
        let before = state.experts.len();
        state.experts.retain(|k, _| keep.contains(k));
        Ok(before - state.experts.len())
    }

    /// Epoch of the plan in force.
    pub fn epoch(&self) -> Result<u64> {
        Ok(self.state.read().map_err(|_| Error::Poisoned)?.plan.epoch)
    }

    /// Workers of the plan in force (this rank may be past them: it then holds nothing).
    pub fn world_size(&self) -> Result<usize> {
        Ok(self.state.read().map_err(|_| Error::Poisoned)?.plan.workers as usize)
    }

    /// The bytes of the experts held, per precision (on the GPU with `--device cuda:N`).
    pub fn held_weights(&self) -> Result<kubemoe_model::memory::Held> {
        let state = self.state.read().map_err(|_| Error::Poisoned)?;
        Ok(kubemoe_model::memory::Held::sum(state.experts.values().flat_map(|h| h.matrices())))
    }

    /// (layer, expert) pairs `plan` places on this rank.
    fn wanted(&self, plan: &PlacementPlan) -> BTreeSet<(usize, usize)> {
        plan.held(self.rank as u32)
            .into_iter()
            .flat_map(|(l, experts)| experts.into_iter().map(move |e| (l as usize, e as usize)))
            .collect()
    }

    fn load_experts(&self, wanted: &BTreeSet<(usize, usize)>) -> Result<BTreeMap<(usize, usize), Arc<Held>>> {
        if wanted.is_empty() {
            return Ok(BTreeMap::new());
        }
        // Names are `model.layers.<l>.mlp.experts.<e>.<proj>...`.
        let wants = |name: &str| {
            let parts: Vec<&str> = name.split('.').collect();
            parts.len() > 5
                && parts[4] == "experts"
                && parts[2]
                    .parse::<usize>()
                    .is_ok_and(|l| parts[5].parse::<usize>().is_ok_and(|e| wanted.contains(&(l, e))))
        };
        let (config, src) = source::open_tensors(&self.model, &wants)?;
        wanted
            .iter()
            .map(|&(l, e)| {
                Ok(((l, e), Arc::new(self.hold(load_expert(src.as_ref(), &config, l, e, self.precision)?)?)))
            })
            .collect()
    }

    /// `mlp` where dispatches will read it: on the GPU (its host copy dropped) or as it is.
    fn hold(&self, mlp: Mlp) -> Result<Held> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            let (hidden, inter) = (self.config.hidden_size, self.config.moe_intermediate_size);
            let on_gpu = gpu.expert(hidden, inter, &mlp.as_expert()).map_err(kubemoe_model::Error::from)?;
            return Ok(Held::Gpu(on_gpu));
        }
        Ok(Held::Host(mlp))
    }

    /// Refuses a dispatch by its sizes alone (what the data path checks before it reads the
    /// payload): `activations` bytes must be `tokens` rows of the hidden size, `routes` bytes
    /// whole records, at most one per token and expert, of an MoE layer.
    pub fn admit(&self, layer: usize, tokens: usize, activations: usize, routes: usize) -> Result<()> {
        let hidden = self.config.hidden_size;
        if Some(activations) != tokens.checked_mul(hidden * 4) {
            return Err(Error::Invalid(format!(
                "activations hold {activations} bytes, {tokens} tokens of hidden size {hidden} need {}",
                tokens.saturating_mul(hidden * 4)
            )));
        }
        let record = kubemoe_api::route::ROUTE_BYTES;
        let most = tokens.saturating_mul(self.config.n_routed_experts);
        if !routes.is_multiple_of(record) || routes / record > most {
            return Err(Error::Invalid(format!(
                "routes hold {routes} bytes: whole {record}-byte records are needed, at most {most} of them"
            )));
        }
        if !self.counts.contains_key(&layer) {
            return Err(Error::Invalid(format!("layer {layer} is not an MoE layer of {}", self.model)));
        }
        Ok(())
    }

    /// Runs one dispatch: `activations` [tokens, hidden] little-endian f32 and packed `routes`;
    /// returns the [tokens, hidden] partial sums.
    pub fn dispatch(
        &self,
        layer: usize,
        tokens: usize,
        activations: &[u8],
        routes: &[u8],
    ) -> Result<Vec<f32>> {
        self.admit(layer, tokens, activations.len(), routes.len())?;
        let routes = kubemoe_api::route::decode(routes)
            .ok_or_else(|| Error::Invalid("routes are not whole records".into()))?;
        let routes: Vec<_> = routes.into_iter().map(|(r, e, w)| (r as usize, e as usize, w)).collect();
        self.compute(layer, &f32s_from_le(activations), &routes)
    }

    /// The partial sums [tokens, hidden] of `x` [tokens, hidden] over `routes` (row, logical
    /// expert, weight), with the experts held; each route adds one to its expert's count.
    /// Sizes already [admitted].
    ///
    /// [admitted]: ExpertStore::admit
    fn compute(&self, layer: usize, x: &[f32], routes: &[(usize, usize, f32)]) -> Result<Vec<f32>> {
        let counts = self
            .counts
            .get(&layer)
            .ok_or_else(|| Error::Invalid(format!("layer {layer} is not an MoE layer of {}", self.model)))?;
        let tokens = x.len() / self.config.hidden_size.max(1);
        if let Some((row, expert, _)) = routes.iter().find(|(r, e, _)| *r >= tokens || *e >= counts.len()) {
            return Err(Error::Invalid(format!("route of row {row} to expert {expert} is out of range")));
        }
        let state = self.state.read().map_err(|_| Error::Poisoned)?;
        #[cfg(feature = "cuda")]
        let on_gpu = self.gpu.as_ref().map(|gpu| gpu_experts(gpu, &state.experts, layer, x, routes));
        #[cfg(not(feature = "cuda"))]
        let on_gpu: Option<Result<Vec<f32>>> = None;
        let host = |e| match state.experts.get(&(layer, e)).map(Arc::as_ref) {
            Some(Held::Host(mlp)) => Some(mlp),
            _ => None,
        };
        let out = match on_gpu {
            Some(out) => out?,
            None => run_experts(host, layer, &self.config, x, routes.iter().copied())?,
        };
        drop(state);
        for (_, e, _) in routes {
            counts[*e].fetch_add(1, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Tokens per logical expert, per MoE layer.
    pub fn stats(&self) -> Vec<(usize, Vec<u64>)> {
        self.counts.iter().map(|(l, c)| (*l, c.iter().map(|a| a.load(Ordering::Relaxed)).collect())).collect()
    }

    /// The experts held, per MoE layer.
    pub fn held(&self) -> Result<Vec<(usize, Vec<usize>)>> {
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (l, e) in self.state.read().map_err(|_| Error::Poisoned)?.experts.keys() {
            by_layer.entry(*l).or_default().push(*e);
        }
        Ok(by_layer.into_iter().collect())
    }
}

/// A store in the same process computes a model's routed experts directly (`kubemoe run
/// --device cuda:N`: the experts on the GPU, the rest of the model on the host), with the
/// same code and checks as a dispatch that arrived over the network.
impl RoutedExperts for ExpertStore {
    fn run(&self, layer: usize, x: &[f32], routing: &Routing) -> kubemoe_model::Result<Vec<f32>> {
        let routes: Vec<(usize, usize, f32)> = routing.routes().collect();
        let tokens = x.len() / self.config.hidden_size.max(1);
        let checked = self.admit(layer, tokens, x.len() * 4, routes.len() * kubemoe_api::route::ROUTE_BYTES);
        // In one process a refused computation is the caller's bug, not a worker to retry.
        checked.and_then(|()| self.compute(layer, x, &routes)).map_err(|e| match e {
            Error::Model(e) => e,
            Error::Invalid(why) => kubemoe_model::Error::Invalid(why),
            other => kubemoe_model::Error::ExpertsUnavailable { layer, source: Box::new(other) },
        })
    }
}

/// The model's routed expert count and MoE layers, as a placement names them.
fn shape(config: &Config) -> (u32, Vec<u32>) {
    (config.n_routed_experts as u32, config.moe_layers().map(|l| l as u32).collect())
}

/// `run_experts` on the GPU: each distinct expert of `routes` once, `x` [tokens, hidden]
/// uploaded, the partial sums [tokens, hidden] read back.
#[cfg(feature = "cuda")]
fn gpu_experts(
    gpu: &kubemoe_kernels::cuda::Gpu,
    held: &BTreeMap<(usize, usize), Arc<Held>>,
    layer: usize,
    x: &[f32],
    routes: &[(usize, usize, f32)],
) -> Result<Vec<f32>> {
    let on_gpu = |e| match held.get(&(layer, e)).map(Arc::as_ref) {
        Some(Held::Gpu(g)) => Some(g),
        _ => None,
    };
    let (experts, assignments) = kubemoe_model::layers::assign(on_gpu, layer, routes.iter().copied())?;
    let kernel = |e: kubemoe_kernels::Error| Error::Model(e.into());
    let mut out = vec![0f32; x.len()];
    if assignments.is_empty() || x.is_empty() {
        return Ok(out);
    }
    let mut sums = gpu.upload(&out).map_err(kernel)?;
    gpu.grouped_expert_ffn(&gpu.upload(x).map_err(kernel)?, &experts, &assignments, &mut sums)
        .map_err(kernel)?;
    out.copy_from_slice(&gpu.download(&sums).map_err(kernel)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubemoe_kernels::dtype::f32_to_le;
    use kubemoe_model::layers::FeedForward;
    use kubemoe_model::Experts;

    fn routes(r: &[(u32, u32, f32)]) -> Vec<u8> {
        kubemoe_api::route::encode(r)
    }

    /// The store loaded on `device`; none if it is a GPU this machine cannot open, which is
    /// said (`KUBEMOE_REQUIRE_GPU=1` makes it a failure).
    fn loaded_on(device: DeviceSpec, loaded: Result<ExpertStore>) -> Option<ExpertStore> {
        match loaded {
            Ok(store) => Some(store),
            Err(e) if device != DeviceSpec::Cpu => {
                let why = tonic::Status::from(e).message().to_string();
                let required = std::env::var("KUBEMOE_REQUIRE_GPU").as_deref() == Ok("1");
                assert!(!required, "a GPU is required: {why}");
                eprintln!("SKIPPED on the GPU: {why}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn partial_sums_equal_the_single_process_experts_and_counts_grow() {
        let store = ExpertStore::load("builtin:tiny", Precision::Auto, 1, Some(2), None).unwrap();
        assert_eq!(store.held().unwrap(), vec![(1, (8..16).collect()), (2, (8..16).collect())]);
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let h = model.config.hidden_size;
        let x: Vec<f32> = (0..2 * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let r = [(0, 9, 0.5), (0, 12, 0.25), (1, 9, 1.5)];
        let out = store.dispatch(1, 2, &f32_to_le(&x), &routes(&r)).unwrap();
        let FeedForward::Moe(moe) = &model.layers[1].mlp else { panic!() };
        let want = run_experts(
            |e| moe.experts[e].as_ref(),
            1,
            &model.config,
            &x,
            r.iter().map(|(a, b, w)| (*a as usize, *b as usize, *w)),
        )
        .unwrap();
        assert_eq!(out, want);
        let stats = store.stats();
        assert_eq!(stats[0].1[9], 2);
        assert_eq!(stats[0].1[12], 1);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_is_refused_without_the_cuda_feature() {
        let err =
            ExpertStore::load_on(DeviceSpec::Cuda(0), "builtin:tiny", Precision::Auto, 0, Some(2), None)
                .err()
                .unwrap();
        assert!(tonic::Status::from(err).message().contains("--features cuda"));
    }

    /// The same dispatch on experts held on the GPU and in host memory, in each precision
    /// (skipped without a GPU, which it says; `KUBEMOE_REQUIRE_GPU=1` makes that a failure).
    #[cfg(feature = "cuda")]
    #[test]
    fn experts_on_the_gpu_compute_what_the_cpu_does() {
        let h = source::open("builtin:tiny", Experts::All).unwrap().config.hidden_size;
        let x: Vec<f32> = (0..5 * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let r =
            [(0, 9, 0.5), (0, 12, 0.25), (1, 9, 1.5), (2, 15, 0.7), (3, 8, 1.0), (3, 9, 0.1), (4, 12, 2.0)];
        for precision in [Precision::Auto, Precision::Bf16, Precision::Fp8] {
            let gpu = DeviceSpec::Cuda(0);
            let Some(gpu) =
                loaded_on(gpu, ExpertStore::load_on(gpu, "builtin:tiny", precision, 1, Some(2), None))
            else {
                return;
            };
            let cpu = ExpertStore::load("builtin:tiny", precision, 1, Some(2), None).unwrap();
            assert_eq!(gpu.held_weights().unwrap(), cpu.held_weights().unwrap());
            let got = gpu.dispatch(1, 5, &f32_to_le(&x), &routes(&r)).unwrap();
            let want = cpu.dispatch(1, 5, &f32_to_le(&x), &routes(&r)).unwrap();
            let e = kubemoe_kernels::rel_err(&got, &want);
            assert!(e < 1e-5, "{}: rel err {e:e}", precision.as_str());
            let err = gpu.dispatch(1, 1, &f32_to_le(&x[..h]), &routes(&[(0, 3, 1.0)])).unwrap_err();
            assert!(tonic::Status::from(err).message().contains("expert 3"));
        }
    }

    /// `kubemoe run --device`'s model: the dense half in host memory and every routed expert
    /// in a store, on the CPU and (with `cuda`) on the GPU, in the precision each shared
    /// fixture stores; full-sequence logits against transformers' as the engine's own test
    /// holds them (`model/tests/fixture.rs`). The GPU part is skipped without a GPU, which it
    /// says; `KUBEMOE_REQUIRE_GPU=1` makes that a failure.
    #[test]
    fn experts_on_the_gpu_and_the_cpu_give_the_fixtures_logits() {
        let base = std::env::var_os("KUBEMOE_FIXTURES")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
            });
        assert!(base.is_dir(), "fixtures not found at {}; set KUBEMOE_FIXTURES", base.display());
        let mut devices = vec![DeviceSpec::Cpu];
        if cfg!(feature = "cuda") {
            devices.push(DeviceSpec::Cuda(0));
        }
        for variant in ["deepseek-v3-tiny", "deepseek-v3-tiny-bf16", "deepseek-v3-tiny-fp8"] {
            let dir = base.join(variant);
            let path = dir.to_str().unwrap();
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
            let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
            let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
            let dense = source::open(path, Experts::None).unwrap();
            for device in &devices {
                let loaded = ExpertStore::load_on(*device, path, Precision::Auto, 0, Some(1), None);
                let Some(store) = loaded_on(*device, loaded) else { continue };
                for (i, sequence) in json["sequences"].as_array().unwrap().iter().enumerate() {
                    let ids: Vec<u32> = sequence["input_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect();
                    let hidden = dense.hidden_full_with(&ids, &store, None).unwrap();
                    let logits = dense.logits(&dense.norm.forward(&hidden).unwrap()).unwrap();
                    let want = kubemoe_kernels::dtype::f32s_from_le(
                        reference.tensor(&format!("s{i}.logits")).unwrap().data(),
                    );
                    let err = kubemoe_kernels::rel_err(&logits, &want);
                    assert!(
                        err < 1e-4,
                        "{variant} s{i} with the experts on {device}: relative error {err:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_store_serves_the_model_in_process_with_the_checks_of_a_dispatch() {
        let store = ExpertStore::load("builtin:tiny", Precision::Auto, 0, Some(1), None).unwrap();
        let h = store.config.hidden_size;
        let x: Vec<f32> = (0..2 * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let routing = Routing { top_k: 2, ids: vec![3, 9, 9, 12], weights: vec![0.5, 0.25, 1.5, 0.7] };
        let got = RoutedExperts::run(&store, 1, &x, &routing).unwrap();
        let want = store.dispatch(
            1,
            2,
            &f32_to_le(&x),
            &routes(&[(0, 3, 0.5), (0, 9, 0.25), (1, 9, 1.5), (1, 12, 0.7)]),
        );
        assert_eq!(got, want.unwrap());
        let counts = &store.stats()[0];
        assert_eq!((counts.0, counts.1[3], counts.1[9], counts.1[12]), (1, 2, 4, 2));
        let out_of_range = Routing { top_k: 1, ids: vec![99, 1], weights: vec![1.0, 1.0] };
        let err = RoutedExperts::run(&store, 1, &x, &out_of_range).unwrap_err();
        assert!(matches!(&err, kubemoe_model::Error::Invalid(m) if m.contains("expert 99")), "{err}");
        let dense_layer = RoutedExperts::run(&store, 0, &x, &routing).unwrap_err();
        assert!(matches!(dense_layer, kubemoe_model::Error::Invalid(_)));
        let ragged = RoutedExperts::run(&store, 1, &x[..h + 1], &routing).unwrap_err();
        assert!(matches!(ragged, kubemoe_model::Error::Invalid(_)));
    }

    #[test]
    fn bad_dispatches_are_refused() {
        let store = ExpertStore::load("builtin:tiny", Precision::Auto, 0, Some(2), None).unwrap();
        let x = f32_to_le(&[0.0; 64]);
        let err = store.dispatch(1, 1, &x, &routes(&[(0, 9, 1.0)])).unwrap_err();
        assert!(tonic::Status::from(err).message().to_string().contains("expert 9"));
        assert!(store.dispatch(0, 1, &x, &routes(&[(0, 1, 1.0)])).is_err());
        assert!(store.dispatch(1, 2, &x, &[]).is_err());
        assert!(store.dispatch(1, 1, &x, &routes(&[(3, 1, 1.0)])).is_err());
        assert!(ExpertStore::load("builtin:tiny", Precision::Auto, 2, Some(2), None).is_err());
        let mut lost = PlacementPlan::initial(2, 8, 16, &[1, 2]);
        lost.layers[1].slots[0] = 1;
        let err = ExpertStore::load("builtin:tiny", Precision::Auto, 0, None, Some(lost)).err().unwrap();
        assert!(tonic::Status::from(err).message().contains("layer 2 gives expert 0 no slot"));
    }

    #[test]
    fn a_rank_past_the_plan_holds_nothing_until_a_resize_places_experts_on_it() {
        let two = PlacementPlan::initial(2, 8, 16, &[1, 2]);
        let store = ExpertStore::load("builtin:tiny", Precision::Auto, 2, None, Some(two.clone())).unwrap();
        assert_eq!((store.held().unwrap(), store.world_size().unwrap()), (vec![], 2));
        let err = ExpertStore::load("builtin:tiny", Precision::Auto, 0, Some(3), Some(two)).err().unwrap();
        assert!(tonic::Status::from(err).message().contains("drop --world-size"));
        let mut three = PlacementPlan::initial(3, 6, 16, &[1, 2]);
        three.epoch = 1;
        let placed: usize = three.held(2).iter().map(|(_, e)| e.len()).sum();
        assert_eq!(store.prepare(three.clone()).unwrap(), placed);
        store.release(1).unwrap();
        let held =
            three.held(2).into_iter().map(|(l, e)| (l as usize, e.into_iter().map(|x| x as usize).collect()));
        assert_eq!(store.held().unwrap(), held.collect::<Vec<_>>());
        assert_eq!(store.world_size().unwrap(), 3);
    }

    #[test]
    fn migration_serves_both_epochs_until_release_then_only_the_new_one() {
        let store = ExpertStore::load("builtin:tiny", Precision::Auto, 0, Some(2), None).unwrap();
        let h = store.config.hidden_size;
        let x = f32_to_le(&vec![0.5; h]);
        let run = |e: u32| store.dispatch(1, 1, &x, &routes(&[(0, e, 1.0)]));
        // Epoch 1: worker 0 swaps experts 0 and 1 for 8 and 9 in layer 1 (8 slots per worker).
        let mut next = PlacementPlan::initial(2, 8, 16, &[1, 2]);
        next.epoch = 1;
        next.layers[0].slots.swap(0, 8);
        next.layers[0].slots.swap(1, 9);
        assert_eq!(store.prepare(next.clone()).unwrap(), 2);
        let before = run(0).unwrap();
        let moved = run(8).unwrap();
        assert_eq!(store.epoch().unwrap(), 0);
        // Released: the new epoch is in force and expert 0 of layer 1 has gone to worker 1.
        assert_eq!(store.release(1).unwrap(), 2);
        assert_eq!(store.epoch().unwrap(), 1);
        assert!(run(0).is_err());
        assert_eq!(run(8).unwrap(), moved);
        assert!(store.release(0).is_err(), "an old epoch cannot come back by release");
        assert_eq!(store.prepare(next.clone()).unwrap(), 0, "the plan in force is held already");
        let mut other = next.clone();
        other.layers[1].slots.swap(0, 8);
        assert!(store.prepare(other).is_err(), "another plan under the epoch in force");
        // A prepared plan rolled back by releasing the epoch in force.
        let mut back = PlacementPlan::initial(2, 8, 16, &[1, 2]);
        back.epoch = 2;
        assert_eq!(store.prepare(back).unwrap(), 2);
        assert_eq!(run(0).unwrap(), before);
        assert_eq!(store.release(1).unwrap(), 2);
        assert!(run(0).is_err());
        assert!(store.release(2).is_err(), "the rolled-back plan is gone");
    }
}
