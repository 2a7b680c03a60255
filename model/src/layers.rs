//! DeepSeek-V2/V3 layers. Struct and field names mirror the checkpoint's tensor names
//! (`model.layers.N.self_attn.kv_b_proj.weight` is `layers[N].self_attn.kv_b_proj`).

use crate::checkpoint::{load_f32, load_weight, Precision, TensorSource};
use crate::config::Config;
use crate::{Error, Result};
use kubemoe_kernels::moe::{grouped_expert_ffn, Assignment, ExpertRef};
use kubemoe_kernels::{gate, norm, Weight};

/// Which routed experts a process loads.
#[derive(Clone, Copy)]
pub enum Experts<'a> {
    All,
    None,
    /// Those for which `f(layer, expert)` holds.
    Only(&'a (dyn Fn(usize, usize) -> bool + Sync)),
}

impl Experts<'_> {
    pub(crate) fn wants(&self, layer: usize, expert: usize) -> bool {
        match self {
            Experts::All => true,
            Experts::None => false,
            Experts::Only(f) => f(layer, expert),
        }
    }
}

/// Everything a layer loader needs to find and check its tensors.
pub(crate) struct Loader<'a> {
    pub src: &'a dyn TensorSource,
    pub fp8_block: Option<[usize; 2]>,
    pub precision: Precision,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        load_f32(self.src, name, shape, self.fp8_block)
    }
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        load_weight(self.src, name, [rows, cols], self.fp8_block, self.precision)
    }
    pub fn linear(&self, prefix: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        let weight = self.matrix(&format!("{prefix}.weight"), out_features, in_features)?;
        Ok(Linear { weight, out_features, in_features })
    }
    pub fn norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.tensor(&format!("{prefix}.weight"), &[dim])?, eps })
    }
    pub fn mlp(&self, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: self.linear(&format!("{prefix}.gate_proj"), inter, hidden)?,
            up_proj: self.linear(&format!("{prefix}.up_proj"), inter, hidden)?,
            down_proj: self.linear(&format!("{prefix}.down_proj"), hidden, inter)?,
        })
    }
}

/// `y = x · Wᵀ` with `weight` [out_features, in_features], held in its load precision.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub out_features: usize,
    pub in_features: usize,
}

impl Linear {
    /// `x` [rows, in_features] → [rows, out_features].
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(self.weight.linear(x)?)
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = x.to_vec();
        norm::rms_norm_inplace(&mut y, &self.weight, self.eps)?;
        Ok(y)
    }
}

/// A SwiGLU MLP: dense layers, shared experts and each routed expert.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn matrices(&self) -> [&Weight; 3] {
        [&self.gate_proj.weight, &self.up_proj.weight, &self.down_proj.weight]
    }

    pub fn as_expert(&self) -> ExpertRef<'_> {
        ExpertRef {
            gate_proj: &self.gate_proj.weight,
            up_proj: &self.up_proj.weight,
            down_proj: &self.down_proj.weight,
        }
    }

    /// `out += Mlp(x)` for `x` [rows, hidden] (a grouped FFN of one expert every row uses).
    pub fn forward_add(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let hidden = self.gate_proj.in_features;
        let rows = (x.len() / hidden) as u32;
        let all: Vec<Assignment> =
            (0..rows).map(|token| Assignment { token, expert: 0, weight: 1.0 }).collect();
        let inter = self.gate_proj.out_features;
        grouped_expert_ffn(x, hidden, inter, &[self.as_expert()], &all, out)?;
        Ok(())
    }
}

/// The MoE gate: `mlp.gate.weight` and, on V3, `mlp.gate.e_score_correction_bias`.
#[derive(Clone, Debug)]
pub struct Gate {
    pub weight: Linear,
    pub e_score_correction_bias: Option<Vec<f32>>,
}

/// Routing decisions for a batch of tokens: `ids`, `weights` are [tokens, top_k].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    /// Every decision as (token row, logical expert, weight), token by token.
    pub fn routes(&self) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        let k = self.top_k.max(1);
        self.ids.iter().zip(&self.weights).enumerate().map(move |(i, (&e, &w))| (i / k, e as usize, w))
    }
}

#[derive(Clone, Debug)]
pub struct Moe {
    pub gate: Gate,
    /// Indexed by logical expert id; `None` where this process did not load the expert.
    pub experts: Vec<Option<Mlp>>,
    pub shared_experts: Option<Mlp>,
}

impl Moe {
    pub(crate) fn load(l: &Loader, c: &Config, prefix: &str, layer: usize, which: Experts) -> Result<Self> {
        let h = c.hidden_size;
        let e = c.n_routed_experts;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let e_score_correction_bias = match l.src.raw(&bias_name)? {
            Some(_) => Some(l.tensor(&bias_name, &[e])?),
            None if c.gate.method == gate::TopkMethod::NoauxTc => {
                return Err(Error::MissingTensor { name: bias_name, checkpoint: l.src.describe() })
            }
            None => None,
        };
        let experts = (0..e)
            .map(|i| {
                which
                    .wants(layer, i)
                    .then(|| l.mlp(&format!("{prefix}.experts.{i}"), h, c.moe_intermediate_size))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let shared_experts = (c.n_shared_experts > 0)
            .then(|| {
                l.mlp(&format!("{prefix}.shared_experts"), h, c.moe_intermediate_size * c.n_shared_experts)
            })
            .transpose()?;
        Ok(Self {
            gate: Gate { weight: l.linear(&format!("{prefix}.gate"), e, h)?, e_score_correction_bias },
            experts,
            shared_experts,
        })
    }

    /// The gate's decisions for `x` [tokens, hidden] (already normalised).
    pub fn route(&self, c: &Config, x: &[f32]) -> Result<Routing> {
        let logits = self.gate.weight.forward(x)?; // [tokens, n_experts], f32
        let tokens = logits.len() / c.n_routed_experts;
        let k = c.gate.top_k;
        let mut r = Routing { top_k: k, ids: vec![0; tokens * k], weights: vec![0.0; tokens * k] };
        gate::route(
            &c.gate,
            &logits,
            self.gate.e_score_correction_bias.as_deref(),
            &mut r.ids,
            &mut r.weights,
        )?;
        Ok(r)
    }

    /// The routed experts' part `Σ wᵢ · Expertᵢ(x)` with the experts loaded here.
    pub fn routed(&self, c: &Config, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>> {
        run_experts(|e| self.experts.get(e).and_then(Option::as_ref), layer, c, x, routing.routes())
    }
}

/// The distinct experts of `routes` (row, logical expert, weight) of layer `layer`, each as
/// `held` gives it, and the assignments that index them: what a grouped expert FFN takes, on
/// the CPU or a GPU. An expert `held` lacks is [`Error::ExpertNotLoaded`].
pub fn assign<T>(
    held: impl Fn(usize) -> Option<T>,
    layer: usize,
    routes: impl Iterator<Item = (usize, usize, f32)>,
) -> Result<(Vec<T>, Vec<Assignment>)> {
    let mut slots: std::collections::HashMap<usize, u32> = Default::default();
    let mut experts = Vec::new();
    let mut assignments = Vec::new();
    for (row, e, weight) in routes {
        let slot = match slots.get(&e) {
            Some(s) => *s,
            None => {
                experts.push(held(e).ok_or(Error::ExpertNotLoaded { layer, expert: e })?);
                slots.insert(e, experts.len() as u32 - 1);
                experts.len() as u32 - 1
            }
        };
        assignments.push(Assignment { token: row as u32, expert: slot, weight });
    }
    Ok((experts, assignments))
}

/// `out[row] = Σ weight · Expert_e(x[row])` over `routes` (row, logical expert, weight), with
/// the experts `held` returns; the grouped FFN runs each distinct expert once.
pub fn run_experts<'a>(
    held: impl Fn(usize) -> Option<&'a Mlp>,
    layer: usize,
    c: &Config,
    x: &[f32],
    routes: impl Iterator<Item = (usize, usize, f32)>,
) -> Result<Vec<f32>> {
    let (mlps, assignments) = assign(held, layer, routes)?;
    let refs: Vec<ExpertRef> = mlps.iter().map(|m| m.as_expert()).collect();
    let mut out = vec![0f32; x.len()];
    grouped_expert_ffn(x, c.hidden_size, c.moe_intermediate_size, &refs, &assignments, &mut out)?;
    Ok(out)
}

/// Computes the routed experts' part of MoE layer `layer` for `x` [tokens, hidden]: locally
/// in a single process, or dispatched to the workers that hold the experts.
pub trait RoutedExperts: Sync {
    fn run(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>>;

    /// Called by a batch loop before each forward step with the ids of the requests it serves
    /// (comma-separated): a transport that crosses processes names them to its peers, so that
    /// their logs can be matched with the requests.
    fn begin_step(&self, _requests: &str) {}

    /// Called by a batch loop after each forward step, whether it succeeded or not, on each
    /// thread that ran part of it (a step's micro-batches may run on two): a transport that
    /// switches placement between steps learns here that the step is over.
    fn end_step(&self) {}
}

/// Loads routed expert `expert` of decoder layer `layer` from `src`, in `precision`.
pub fn load_expert(
    src: &dyn TensorSource,
    c: &Config,
    layer: usize,
    expert: usize,
    precision: Precision,
) -> Result<Mlp> {
    let l = Loader { src, fp8_block: c.fp8_block, precision };
    l.mlp(&format!("model.layers.{layer}.mlp.experts.{expert}"), c.hidden_size, c.moe_intermediate_size)
}

#[derive(Clone, Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// The query projection: low-rank (`q_a_proj` → `q_a_layernorm` → `q_b_proj`, V3 and V2)
/// or a plain `q_proj` (`q_lora_rank: null`, V2-Lite).
#[derive(Clone, Debug)]
pub enum QueryProj {
    LowRank { q_a_proj: Linear, q_a_layernorm: RmsNorm, q_b_proj: Linear },
    Plain { q_proj: Linear },
}

/// Multi-head latent attention (DeepSeek-V2 report §2.1).
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: QueryProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
}

impl Attention {
    pub(crate) fn load(l: &Loader, c: &Config, prefix: &str) -> Result<Self> {
        let (h, heads, eps) = (c.hidden_size, c.num_attention_heads, c.rms_norm_eps);
        let q_out = heads * c.q_head_dim();
        let q = match c.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                q_a_proj: l.linear(&format!("{prefix}.q_a_proj"), r, h)?,
                q_a_layernorm: l.norm(&format!("{prefix}.q_a_layernorm"), r, eps)?,
                q_b_proj: l.linear(&format!("{prefix}.q_b_proj"), q_out, r)?,
            },
            None => QueryProj::Plain { q_proj: l.linear(&format!("{prefix}.q_proj"), q_out, h)? },
        };
        Ok(Self {
            q,
            kv_a_proj_with_mqa: l.linear(
                &format!("{prefix}.kv_a_proj_with_mqa"),
                c.kv_lora_rank + c.qk_rope_head_dim,
                h,
            )?,
            kv_a_layernorm: l.norm(&format!("{prefix}.kv_a_layernorm"), c.kv_lora_rank, eps)?,
            kv_b_proj: l.linear(
                &format!("{prefix}.kv_b_proj"),
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            )?,
            o_proj: l.linear(&format!("{prefix}.o_proj"), h, heads * c.v_head_dim)?,
        })
    }

    /// Queries [tokens, heads, d_nope + d_rope], before RoPE.
    pub fn queries(&self, x: &[f32]) -> Result<Vec<f32>> {
        match &self.q {
            QueryProj::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)
            }
            QueryProj::Plain { q_proj } => q_proj.forward(x),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

impl DecoderLayer {
    /// The layer's weight matrices: attention, then the dense MLP or the gate, the experts
    /// loaded here and the shared experts.
    pub fn matrices(&self) -> Vec<&Weight> {
        let a = &self.self_attn;
        let mut all = match &a.q {
            QueryProj::LowRank { q_a_proj, q_b_proj, .. } => vec![&q_a_proj.weight, &q_b_proj.weight],
            QueryProj::Plain { q_proj } => vec![&q_proj.weight],
        };
        all.extend([&a.kv_a_proj_with_mqa.weight, &a.kv_b_proj.weight, &a.o_proj.weight]);
        match &self.mlp {
            FeedForward::Dense(d) => all.extend(d.matrices()),
            FeedForward::Moe(moe) => {
                all.push(&moe.gate.weight.weight);
                for m in moe.experts.iter().flatten().chain(&moe.shared_experts) {
                    all.extend(m.matrices());
                }
            }
        }
        all
    }

    pub(crate) fn load(l: &Loader, c: &Config, i: usize, which: Experts) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let mlp = if c.is_moe_layer(i) {
            FeedForward::Moe(Moe::load(l, c, &format!("{p}.mlp"), i, which)?)
        } else {
            FeedForward::Dense(l.mlp(&format!("{p}.mlp"), h, c.intermediate_size)?)
        };
        Ok(Self {
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), h, eps)?,
            self_attn: Attention::load(l, c, &format!("{p}.self_attn"))?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm"), h, eps)?,
            mlp,
        })
    }
}
