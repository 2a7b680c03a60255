//! The single-process DeepSeek forward pass, with the MLA latent KV cache.
//!
//! Two attention paths compute the same function (DeepSeek-V2 report §2.1.2–2.1.3):
//! - [`Model::forward_full`]: the whole sequence at once with keys and values expanded
//!   from the latent (`W_kv_b · c_kv`), as the reference implementation does; no cache.
//! - [`Model::forward_step`]: new tokens of many sequences at once against each sequence's
//!   cache of `[c_kv, k_pe]` rows (`kv_lora_rank + qk_rope_head_dim` values per token and
//!   layer), with `W_kv_b` absorbed into the query (`q_nopeᵀ W_k`) and the output
//!   (`W_v · Σ p c_kv`), so attention runs on the latent cache directly.
//!
//! Both share every projection, the gate and the experts; tests hold them equal.

use crate::checkpoint::{Precision, TensorSource};
use crate::config::Config;
use crate::layers::{
    Attention, DecoderLayer, Experts, FeedForward, Linear, Loader, RmsNorm, RoutedExperts, Routing,
};
use crate::{Error, Result};
use kubemoe_kernels::attention::{causal_attention, latent_attention, Latent};
use kubemoe_kernels::rope::Rope;
use kubemoe_kernels::{View, Weight};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The multi-token-prediction module of DeepSeek-V3 (report §2.2), stored as decoder layer
/// `num_hidden_layers + j`. Its embedding and output head are the main model's (the
/// checkpoint's copies are identical and are not loaded again).
#[derive(Clone, Debug)]
pub struct MtpLayer {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    /// [hidden, 2·hidden], applied to `[enorm(embed(t_{i+1})), hnorm(h_i)]`.
    pub eh_proj: Linear,
    pub block: DecoderLayer,
    pub shared_head_norm: RmsNorm,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub config: Config,
    /// [vocab_size, hidden_size]
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub mtp: Vec<MtpLayer>,
    rope: Rope,
    /// The most values of any matrix a step multiplies by: whether a step's products split
    /// across the pool ([`Model::on_pool`]).
    widest: usize,
}

/// Intermediate values of [`Model::forward_full`], for checking against a reference.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The residual stream after each decoder layer, [tokens, hidden] each.
    pub layer_out: Vec<Vec<f32>>,
    /// The gate's decisions per MoE layer index.
    pub routing: BTreeMap<usize, Routing>,
}

/// Tokens per page of a [`KvCache`]'s shared rows (vLLM's default block size): the unit in
/// which caches share a prefix.
pub const PAGE_TOKENS: usize = 16;

/// Whole pages of consecutive tokens' `[c_kv, k_pe]` rows, per layer ([pages · PAGE_TOKENS,
/// width] each): read-only, held by every cache that starts with those tokens.
pub type Pages = Arc<Vec<Vec<f32>>>;

/// A run of pages of one [`Pages`] that a cache holds.
#[derive(Clone, Debug)]
struct Shared {
    pages: Pages,
    range: std::ops::Range<usize>,
}

/// One sequence's latent KV cache: per layer, the `[c_kv, k_pe]` rows of each cached token.
///
/// Its first tokens may be whole pages of [`PAGE_TOKENS`] tokens shared with other caches
/// ([`KvCache::share`], a prefix's pages as vLLM's prefix caching shares KV blocks, Kwon et
/// al. 2023), read in place; the rows after them are the sequence's own, one buffer per layer.
/// Shared pages are never written: cutting the cache inside one (a rollback below them)
/// copies that page's kept rows into the sequence's own buffer (copy-on-write). Attention
/// reads the runs of consecutive shared pages and the own buffer as slices of one cache
/// (`kubemoe_kernels::attention::latent_attention`): the sequence's own rows stay one buffer
/// because a GEMM per 16-token page costs 1.2–2.5× the single GEMM on these CPUs.
///
/// Invariant: `shared` covers tokens `..shared_tokens` in order, every layer of `own` holds
/// the rows of the tokens after them, and between steps `len` tokens in all.
#[derive(Clone, Debug)]
pub struct KvCache {
    shared: Vec<Shared>,
    shared_tokens: usize,
    own: Vec<Vec<f32>>,
    /// Values per row: `kv_lora_rank + qk_rope_head_dim`.
    width: usize,
    len: usize,
}

impl KvCache {
    pub fn new(config: &Config) -> Self {
        Self::with_layers(config, config.num_hidden_layers)
    }

    /// The cache of the (first) MTP module's decoder layer ([`Model::mtp_step`]).
    pub fn for_mtp(config: &Config) -> Self {
        Self::with_layers(config, 1)
    }

    fn with_layers(config: &Config, layers: usize) -> Self {
        let width = config.kv_lora_rank + config.qk_rope_head_dim;
        Self { shared: Vec::new(), shared_tokens: 0, own: vec![Vec::new(); layers], width, len: 0 }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of rows held (f32 values), shared pages included.
    pub fn bytes(&self) -> usize {
        (self.shared_tokens * self.width * self.own.len() + self.own.iter().map(Vec::len).sum::<usize>()) * 4
    }

    /// Whether it was made for `layers` layers of the model `c`.
    fn fits(&self, c: &Config, layers: usize) -> bool {
        self.own.len() == layers && self.width == c.kv_lora_rank + c.qk_rope_head_dim
    }

    /// Values in a page of one layer.
    fn page_values(&self) -> usize {
        PAGE_TOKENS * self.width
    }

    /// Layer `layer`'s rows, in order, as slices: each run of shared pages, then its own.
    fn slices(&self, layer: usize) -> Vec<&[f32]> {
        let pv = self.page_values();
        let shared = self.shared.iter().map(|s| &s.pages[layer][s.range.start * pv..s.range.end * pv]);
        shared.chain(std::iter::once(&self.own[layer][..])).collect()
    }

    /// Keeps the first `len` rows of every layer; a shared page cut short is copied.
    fn truncate(&mut self, len: usize) {
        if len >= self.shared_tokens {
            let keep = (len - self.shared_tokens) * self.width;
            self.own.iter_mut().for_each(|rows| rows.truncate(keep));
            return;
        }
        let (pages, partial) = (len / PAGE_TOKENS, len % PAGE_TOKENS * self.width);
        let pv = self.page_values();
        for layer in 0..self.own.len() {
            self.own[layer] = copy_range(&self.slices(layer), pages * pv..pages * pv + partial);
        }
        let mut left = pages;
        self.shared.retain_mut(|s| {
            s.range.end = s.range.end.min(s.range.start + left);
            left -= s.range.len();
            !s.range.is_empty()
        });
        self.shared_tokens = pages * PAGE_TOKENS;
    }

    /// Forgets every token after the first `len` (speculative tokens that were rejected).
    pub fn rollback(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.truncate(len);
        }
    }

    /// Every layer's rows of cached tokens `start..start + n` ([n, width] each, layer order),
    /// copied.
    pub fn rows(&self, start: usize, n: usize) -> Result<Vec<Vec<f32>>> {
        if start + n > self.len {
            return Err(Error::Invalid(format!(
                "tokens {start}..{} of a cache holding {}",
                start + n,
                self.len
            )));
        }
        let w = self.width;
        Ok((0..self.own.len()).map(|l| copy_range(&self.slices(l), start * w..(start + n) * w)).collect())
    }

    /// Appends page `page` of `pages` to a cache that holds only shared pages, without a copy:
    /// the cache then holds what prefilling those tokens at the next positions leaves in it.
    pub fn share(&mut self, pages: &Pages, page: usize) -> Result<()> {
        let pv = self.page_values();
        if self.len != self.shared_tokens
            || pages.len() != self.own.len()
            || pages.iter().any(|rows| rows.len() < (page + 1) * pv || !rows.len().is_multiple_of(pv))
        {
            return Err(Error::Invalid(format!(
                "page {page} shared into a cache of {} tokens ({} shared) needs {} layers of whole pages of {pv} values",
                self.len,
                self.shared_tokens,
                self.own.len()
            )));
        }
        match self.shared.last_mut() {
            Some(last) if Arc::ptr_eq(&last.pages, pages) && last.range.end == page => last.range.end += 1,
            _ => self.shared.push(Shared { pages: pages.clone(), range: page..page + 1 }),
        }
        self.shared_tokens += PAGE_TOKENS;
        self.len += PAGE_TOKENS;
        Ok(())
    }
}

impl Model {
    /// Every weight matrix this process holds, each once (a tied LM head is the embedding).
    pub fn matrices(&self) -> Vec<&Weight> {
        let mut all = vec![&self.embed_tokens];
        if self.lm_head.weight.raw().0.as_ptr() != self.embed_tokens.raw().0.as_ptr() {
            all.push(&self.lm_head.weight);
        }
        let blocks = self.layers.iter().chain(self.mtp.iter().map(|m| &m.block));
        for l in blocks {
            all.extend(l.matrices());
        }
        all.extend(self.mtp.iter().map(|m| &m.eh_proj.weight));
        all
    }

    /// Writes the full-sequence logits of `ids` to the safetensors file `path`: `logits`
    /// (f32 [T, vocab]) and, with an MTP module, `mtp_logits` (f32 [T-1, vocab]).
    pub fn write_logits(&self, ids: &[u32], path: &std::path::Path) -> Result<()> {
        self.write_logits_with(ids, path, self)
    }

    /// [`Model::write_logits`] with the main layers' routed experts computed by `experts` (the
    /// MTP module's are this model's own, as a router holds them).
    pub fn write_logits_with(
        &self,
        ids: &[u32],
        path: &std::path::Path,
        experts: &dyn RoutedExperts,
    ) -> Result<()> {
        use crate::checkpoint::{OwnedTensor, TensorMap};
        let hidden = self.hidden_full_with(ids, experts, None)?;
        let logits = self.lm_head.forward(&self.norm.forward(&hidden)?)?;
        let vocab = self.config.vocab_size;
        let tensor = |values: Vec<f32>| OwnedTensor {
            dtype: safetensors::Dtype::F32,
            shape: vec![values.len() / vocab, vocab],
            data: kubemoe_kernels::dtype::f32_to_le(&values),
        };
        let mut map = TensorMap { label: path.display().to_string(), ..Default::default() };
        map.tensors.insert("logits".into(), tensor(logits));
        if let Some(mtp) = self.mtp_logits(ids, &hidden)? {
            map.tensors.insert("mtp_logits".into(), tensor(mtp));
        }
        map.save(path)
    }

    /// Builds the model from `src`, loading the routed experts `experts` selects, with the
    /// checkpoint's precision.
    pub fn load(config: Config, src: &dyn TensorSource, experts: Experts) -> Result<Self> {
        Self::load_as(config, src, experts, Precision::Auto)
    }

    /// [`Model::load`] with the weight matrices held in `precision`.
    pub fn load_as(
        config: Config,
        src: &dyn TensorSource,
        experts: Experts,
        precision: Precision,
    ) -> Result<Self> {
        let l = Loader { src, fp8_block: config.fp8_block, precision };
        let c = &config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let embed_tokens = l.matrix("model.embed_tokens.weight", v, h)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(&l, c, i, experts))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings && src.raw("lm_head.weight")?.is_none() {
            Linear { weight: embed_tokens.clone(), out_features: v, in_features: h }
        } else {
            l.linear("lm_head", v, h)?
        };
        let mut mtp = Vec::new();
        for j in 0..c.num_nextn_predict_layers {
            let i = c.num_hidden_layers + j;
            let p = format!("model.layers.{i}");
            // Hugging Face exports drop the MTP weights; serve without them then.
            if src.raw(&format!("{p}.eh_proj.weight"))?.is_none() {
                break;
            }
            mtp.push(MtpLayer {
                enorm: l.norm(&format!("{p}.enorm"), h, c.rms_norm_eps)?,
                hnorm: l.norm(&format!("{p}.hnorm"), h, c.rms_norm_eps)?,
                eh_proj: l.linear(&format!("{p}.eh_proj"), h, 2 * h)?,
                block: DecoderLayer::load(&l, c, i, experts)?,
                shared_head_norm: l.norm(&format!("{p}.shared_head.norm"), h, c.rms_norm_eps)?,
            });
        }
        let rope = Rope::new(c.qk_rope_head_dim, c.rope_theta, c.yarn.as_ref(), c.rope_interleave)?;
        let mut model = Self {
            norm: l.norm("model.norm", h, c.rms_norm_eps)?,
            embed_tokens,
            layers,
            lm_head,
            mtp,
            rope,
            config,
            widest: 0,
        };
        // The embedding is looked up, never multiplied.
        model.widest = model.matrices().into_iter().skip(1).map(|w| w.rows() * w.cols()).max().unwrap_or(0);
        Ok(model)
    }

    /// Runs `f`, a step of `tokens` new tokens, on a thread of the pool when its products split
    /// there, and here otherwise (`kubemoe_kernels::pool`): a step on the pool forks and joins
    /// its products without waking threads, but getting there and back costs as much as a
    /// small model's decode step gains. Not for a step that shares the pool's threads with
    /// another waiting on it (two micro-batches taking turns).
    pub fn on_pool<R: Send>(&self, tokens: usize, f: impl FnOnce() -> R + Send) -> R {
        if kubemoe_kernels::pool::worth_splitting(tokens, self.widest) {
            kubemoe_kernels::pool::step(f)
        } else {
            f()
        }
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut out = vec![0f32; ids.len() * h];
        for ((position, &id), row) in ids.iter().enumerate().zip(out.chunks_mut(h)) {
            if id as usize >= self.config.vocab_size {
                return Err(Error::TokenOutOfVocab { id, position, vocab_size: self.config.vocab_size });
            }
            self.embed_tokens.row_into(id as usize, row)?;
        }
        Ok(out)
    }

    fn check_context(&self, len: usize) -> Result<()> {
        let max = self.config.max_position_embeddings;
        if len > max {
            return Err(Error::ContextOverflow { len, max });
        }
        Ok(())
    }

    /// Full-sequence logits [tokens, vocab] (causal, no cache), and, when `trace` is given,
    /// every layer's output and every MoE layer's routing.
    pub fn forward_full(&self, ids: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>> {
        let hidden = self.hidden_full(ids, trace)?;
        self.lm_head.forward(&self.norm.forward(&hidden)?)
    }

    /// The residual stream after the last decoder layer (before the final norm), [tokens, hidden].
    pub fn hidden_full(&self, ids: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>> {
        self.hidden_full_with(ids, self, trace)
    }

    /// [`Model::hidden_full`] with the routed experts computed by `experts`.
    pub fn hidden_full_with(
        &self,
        ids: &[u32],
        experts: &dyn RoutedExperts,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        self.check_context(ids.len())?;
        let mut h = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            self.layer_full(layer, i, &mut h, experts, trace.as_deref_mut())?;
            if let Some(t) = trace.as_deref_mut() {
                t.layer_out.push(h.clone());
            }
        }
        Ok(h)
    }

    fn layer_full(
        &self,
        layer: &DecoderLayer,
        i: usize,
        h: &mut [f32],
        experts: &dyn RoutedExperts,
        trace: Option<&mut Trace>,
    ) -> Result<()> {
        let x = layer.input_layernorm.forward(h)?;
        let a = self.attention_full(&layer.self_attn, &x)?;
        add(h, &a);
        let x = layer.post_attention_layernorm.forward(h)?;
        let f = self.feed_forward(layer, i, &x, experts, trace)?;
        add(h, &f);
        Ok(())
    }

    fn feed_forward(
        &self,
        layer: &DecoderLayer,
        i: usize,
        x: &[f32],
        experts: &dyn RoutedExperts,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        match &layer.mlp {
            FeedForward::Dense(mlp) => {
                let mut out = vec![0f32; x.len()];
                mlp.forward_add(x, &mut out)?;
                Ok(out)
            }
            FeedForward::Moe(moe) => {
                let routing = moe.route(&self.config, x)?;
                let mut out = experts.run(i, x, &routing)?;
                if let Some(shared) = &moe.shared_experts {
                    shared.forward_add(x, &mut out)?;
                }
                if let Some(t) = trace {
                    t.routing.insert(i, routing);
                }
                Ok(out)
            }
        }
    }

    /// `[c_kv, k_pe]` rows for `x` [tokens, hidden] at `positions`: the cache format.
    fn latent_kv(&self, attn: &Attention, x: &[f32], positions: &[usize]) -> Result<Vec<f32>> {
        let c = &self.config;
        let (r, w) = (c.kv_lora_rank, c.kv_lora_rank + c.qk_rope_head_dim);
        let mut kv = attn.kv_a_proj_with_mqa.forward(x)?; // [tokens, r + d_rope]
        for (row, &pos) in kv.chunks_mut(w).zip(positions) {
            kubemoe_kernels::norm::rms_norm_inplace(
                &mut row[..r],
                &attn.kv_a_layernorm.weight,
                attn.kv_a_layernorm.eps,
            )?;
            self.rope.rotate(row, w, r, pos)?;
        }
        Ok(kv)
    }

    /// Queries [tokens, heads, d_nope + d_rope] with RoPE applied at `positions`.
    fn queries(&self, attn: &Attention, x: &[f32], positions: &[usize]) -> Result<Vec<f32>> {
        let c = &self.config;
        let dq = c.q_head_dim();
        let mut q = attn.queries(x)?;
        for (row, &pos) in q.chunks_mut(c.num_attention_heads * dq).zip(positions) {
            self.rope.rotate(row, dq, c.qk_nope_head_dim, pos)?;
        }
        Ok(q)
    }

    /// Causal MLA over `x` [tokens, hidden] at positions 0.., keys and values expanded.
    fn attention_full(&self, attn: &Attention, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.config;
        let (heads, dn, dr, dv, r) =
            (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (dq, w) = (dn + dr, r + dr);
        let t = x.len() / c.hidden_size;
        let positions: Vec<usize> = (0..t).collect();
        let q = self.queries(attn, x, &positions)?;
        let latent = self.latent_kv(attn, x, &positions)?;
        let c_kv: Vec<f32> = latent.chunks(w).flat_map(|row| &row[..r]).copied().collect();
        let kv = attn.kv_b_proj.forward(&c_kv)?; // [t, heads, dn + dv]
        let mut k = vec![0f32; t * heads * dq];
        let mut v = vec![0f32; t * heads * dv];
        for i in 0..t {
            for h in 0..heads {
                let src = &kv[(i * heads + h) * (dn + dv)..][..dn + dv];
                let kd = &mut k[(i * heads + h) * dq..][..dq];
                kd[..dn].copy_from_slice(&src[..dn]);
                kd[dn..].copy_from_slice(&latent[i * w + r..][..dr]);
                v[(i * heads + h) * dv..][..dv].copy_from_slice(&src[dn..]);
            }
        }
        let mut out = vec![0f32; t * heads * dv];
        causal_attention(&q, &k, &v, t, t, heads, dq, dv, 0, c.softmax_scale(), &mut out)?;
        attn.o_proj.forward(&out)
    }

    /// Attention of `n` new tokens (queries `q` [n, heads, dq], roped) against a latent
    /// cache [p0 + n, r + d_rope] that already holds them, its rows in `pages`; writes `out`
    /// [n, heads, dv].
    fn attention_latent(
        &self,
        attn: &Attention,
        q: &[f32],
        pages: &[&[f32]],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        let (heads, dn, dr, dv, r) =
            (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (dq, w) = (dn + dr, r + dr);
        let kv_b = &attn.kv_b_proj.weight; // [heads, dn + dv, r]
                                           // Absorbed queries [n, heads, r + dr]: q_nope · W_k[h] (W_k[h] is [dn, r]), then q_pe.
        let mut qa = vec![0f32; n * heads * w];
        for h in 0..heads {
            let q_nope = View::strided(&q[h * dq..], n, dn, heads * dq)?;
            kv_b.rows_view(h * (dn + dv), dn)?.left(q_nope, &mut qa[h * w..], heads * w)?;
            for i in 0..n {
                let row = (i * heads + h) * w;
                qa[row + r..row + w].copy_from_slice(&q[(i * heads + h) * dq + dn..][..dr]);
            }
        }
        // Latent outputs [n, heads, r] = P · c_kv, then W_v[h] ([dv, r]) per head.
        let mut lat = vec![0f32; n * heads * r];
        let shape = Latent { heads, rank: r, rope: dr, scale: c.softmax_scale() };
        latent_attention(shape, &qa, pages, n, &mut lat)?;
        for h in 0..heads {
            let l = View::strided(&lat[h * r..], n, r, heads * r)?;
            kv_b.rows_view(h * (dn + dv) + dn, dv)?.linear(l, &mut out[h * dv..], heads * dv)?;
        }
        Ok(())
    }

    /// Runs the new `tokens` of each sequence against its cache (a prompt, a chunk of one, or
    /// one decode token), appends them to the cache, and returns each sequence's last-token
    /// logits [sequences, vocab]. If a layer fails, every cache is left as it was.
    pub fn forward_step(&self, batch: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<f32>> {
        self.forward_step_with(batch, self)
    }

    /// [`Model::forward_step`] with the routed experts computed by `experts` (a router
    /// dispatches them to the workers that hold them).
    pub fn forward_step_with(
        &self,
        batch: &mut [(&mut KvCache, &[u32])],
        experts: &dyn RoutedExperts,
    ) -> Result<Vec<f32>> {
        let hid = self.config.hidden_size;
        let h = self.step(batch, experts)?;
        let mut last = Vec::with_capacity(batch.len() * hid);
        let mut end = 0;
        for (_, tokens) in batch.iter() {
            end += tokens.len();
            last.extend_from_slice(&h[(end - 1) * hid..end * hid]);
        }
        self.lm_head.forward(&self.norm.forward(&last)?)
    }

    /// [`Model::forward_step_with`] returning the final hidden state of every new token
    /// [tokens, hidden], after the final norm: what the LM head ([`Model::logits`]) and the MTP
    /// module ([`Model::mtp_step`]) read. A speculative step needs every position's.
    pub fn forward_step_hidden(
        &self,
        batch: &mut [(&mut KvCache, &[u32])],
        experts: &dyn RoutedExperts,
    ) -> Result<Vec<f32>> {
        self.norm.forward(&self.step(batch, experts)?)
    }

    /// Logits [rows, vocab] of normed hidden states [rows, hidden].
    pub fn logits(&self, normed: &[f32]) -> Result<Vec<f32>> {
        self.lm_head.forward(normed)
    }

    /// The residual stream after the last layer for every new token; caches extended on
    /// success and left as they were on error.
    fn step(&self, batch: &mut [(&mut KvCache, &[u32])], experts: &dyn RoutedExperts) -> Result<Vec<f32>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (cache, tokens) in batch.iter() {
            if tokens.is_empty() {
                return Err(Error::Invalid("a sequence in the batch has no new tokens".into()));
            }
            if !cache.fits(c, c.num_hidden_layers) {
                return Err(Error::Invalid("KV cache was made for another model".into()));
            }
            self.check_context(cache.len + tokens.len())?;
            ids.extend_from_slice(tokens);
            positions.extend(cache.len..cache.len + tokens.len());
        }
        let counts: Vec<usize> = batch.iter().map(|(_, t)| t.len()).collect();
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|(c, _)| &mut **c).collect();
        let result = self.embed(&ids).and_then(|mut h| {
            for (li, layer) in self.layers.iter().enumerate() {
                self.layer_step(layer, li, li, &mut h, &positions, &mut caches, &counts, experts)?;
            }
            Ok(h)
        });
        settle(&mut caches, &counts, &result);
        result
    }

    /// Decoder layer `li` over the new rows `h` [tokens, hidden] of a batch at `positions`:
    /// sequence `j`'s `counts[j]` rows attend to its cache layer `slot`, which they extend.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        layer: &DecoderLayer,
        li: usize,
        slot: usize,
        h: &mut [f32],
        positions: &[usize],
        caches: &mut [&mut KvCache],
        counts: &[usize],
        experts: &dyn RoutedExperts,
    ) -> Result<()> {
        let c = &self.config;
        let (heads, dv, dq) = (c.num_attention_heads, c.v_head_dim, c.q_head_dim());
        let x = layer.input_layernorm.forward(h)?;
        let q = self.queries(&layer.self_attn, &x, positions)?;
        let kv = self.latent_kv(&layer.self_attn, &x, positions)?;
        let w = kv.len() / positions.len();
        let mut out = vec![0f32; positions.len() * heads * dv];
        let mut start = 0;
        for (cache, &n) in caches.iter_mut().zip(counts) {
            cache.own[slot].extend_from_slice(&kv[start * w..(start + n) * w]);
            let q = &q[start * heads * dq..(start + n) * heads * dq];
            self.attention_latent(
                &layer.self_attn,
                q,
                &cache.slices(slot),
                n,
                &mut out[start * heads * dv..],
            )?;
            start += n;
        }
        add(h, &layer.self_attn.o_proj.forward(&out)?);
        let x = layer.post_attention_layernorm.forward(h)?;
        add(h, &self.feed_forward(layer, li, &x, experts, None)?);
        Ok(())
    }

    /// One step of the MTP module (DeepSeek-V3 report §2.2) for a batch of sequences, each
    /// against its own MTP cache ([`KvCache::for_mtp`]): row `i` of a sequence combines a
    /// normed final hidden state at position `position + i` with the token after that
    /// position, and gives the MTP module's normed output [tokens, hidden], whose logits
    /// ([`Model::logits`]) predict the token after that. The output can stand in for the
    /// hidden state of the next row when drafting several tokens (vLLM's chained MTP).
    /// The routed experts of the module are this process's. On error every cache is left as
    /// it was.
    pub fn mtp_step(&self, batch: &mut [MtpRows<'_>]) -> Result<Vec<f32>> {
        let Some(mtp) = self.mtp.first() else {
            return Err(Error::Invalid("the model has no MTP module".into()));
        };
        let hid = self.config.hidden_size;
        let mut ids = Vec::new();
        let mut hidden = Vec::new();
        let mut positions = Vec::new();
        for rows in batch.iter() {
            let n = rows.tokens.len();
            if n == 0 || rows.hidden.len() != n * hid || !rows.cache.fits(&self.config, 1) {
                return Err(Error::Invalid(format!(
                    "MTP rows: {n} tokens, {} hidden values, a cache of {} layers",
                    rows.hidden.len(),
                    rows.cache.own.len()
                )));
            }
            self.check_context(rows.position + n)?;
            ids.extend_from_slice(rows.tokens);
            hidden.extend_from_slice(rows.hidden);
            positions.extend(rows.position..rows.position + n);
        }
        let counts: Vec<usize> = batch.iter().map(|r| r.tokens.len()).collect();
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|r| &mut *r.cache).collect();
        let layer = self.config.num_hidden_layers;
        let result = (|| {
            let e = mtp.enorm.forward(&self.embed(&ids)?)?;
            let hn = mtp.hnorm.forward(&hidden)?;
            let mut h = mtp.eh_proj.forward(&concat_rows(&e, &hn, hid))?;
            self.layer_step(&mtp.block, layer, 0, &mut h, &positions, &mut caches, &counts, self)?;
            mtp.shared_head_norm.forward(&h)
        })();
        settle(&mut caches, &counts, &result);
        result
    }

    /// MTP draft logits [tokens - 1, vocab] for a sequence: row `i` predicts token `i + 2`
    /// from the main model's hidden state at `i` (`hidden`, from [`Model::hidden_full`]) and
    /// the embedding of token `i + 1`. `None` when the checkpoint has no MTP module.
    ///
    /// The module sees the hidden state after the main model's final norm, as transformers'
    /// `MtpModel` and vLLM feed it (the DeepSeek-V3 report leaves it open); the MTP fixture
    /// holds us to transformers.
    pub fn mtp_logits(&self, ids: &[u32], hidden: &[f32]) -> Result<Option<Vec<f32>>> {
        let Some(mtp) = self.mtp.first() else { return Ok(None) };
        let hid = self.config.hidden_size;
        let t = ids.len().saturating_sub(1);
        let e = mtp.enorm.forward(&self.embed(&ids[1..])?)?;
        let hn = mtp.hnorm.forward(&self.norm.forward(&hidden[..t * hid])?)?;
        let mut h = mtp.eh_proj.forward(&concat_rows(&e, &hn, hid))?;
        self.layer_full(&mtp.block, self.config.num_hidden_layers, &mut h, self, None)?;
        Ok(Some(self.lm_head.forward(&mtp.shared_head_norm.forward(&h)?)?))
    }
}

/// The experts loaded in this process.
impl RoutedExperts for Model {
    fn run(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>> {
        let mtp = |j: usize| self.mtp.get(j).map(|m| &m.block);
        let decoder = self.layers.get(layer).or_else(|| mtp(layer.checked_sub(self.layers.len())?));
        match decoder.map(|l| &l.mlp) {
            Some(FeedForward::Moe(moe)) => moe.routed(&self.config, layer, x, routing),
            _ => Err(Error::Invalid(format!("layer {layer} has no routed experts"))),
        }
    }
}

/// The rows of one MTP step of a sequence ([`Model::mtp_step`]).
pub struct MtpRows<'a> {
    pub cache: &'a mut KvCache,
    /// Position of the first row.
    pub position: usize,
    /// Normed final hidden states [tokens, hidden], of positions `position..`.
    pub hidden: &'a [f32],
    /// The token after each of those positions.
    pub tokens: &'a [u32],
}

/// Counts the rows a step appended to each cache, or drops them if the step failed.
fn settle<T>(caches: &mut [&mut KvCache], counts: &[usize], result: &Result<T>) {
    for (cache, n) in caches.iter_mut().zip(counts) {
        match result {
            Ok(_) => cache.len += n,
            Err(_) => cache.truncate(cache.len),
        }
    }
}

/// Values `range` of the concatenation of `slices`, copied.
fn copy_range(slices: &[&[f32]], range: std::ops::Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(range.len());
    let mut at = 0;
    for s in slices {
        let (lo, hi) = (range.start.max(at), range.end.min(at + s.len()));
        if lo < hi {
            out.extend_from_slice(&s[lo - at..hi - at]);
        }
        at += s.len();
    }
    out
}

/// `[a_i, b_i]` for each row of `a`, `b` ([tokens, width] each).
fn concat_rows(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
    a.chunks(width).zip(b.chunks(width)).flat_map(|(x, y)| x.iter().chain(y)).copied().collect()
}

fn add(h: &mut [f32], x: &[f32]) {
    h.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}
