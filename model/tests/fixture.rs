//! The engine against `shared/fixtures/deepseek-v3-tiny`: what Hugging Face transformers
//! computed on the same weights (logits, per-layer outputs, routing, greedy tokens).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use kubemoe_kernels::rel_err;
use kubemoe_kernels::weight::Dtype as Held;
use kubemoe_model::checkpoint::{Checkpoint, OwnedTensor, RawTensor, TensorMap, TensorSource};
use kubemoe_model::generate::{generate, Request};
use kubemoe_model::layers::FeedForward;
use kubemoe_model::{Config, Experts, KvCache, Model, Precision, SamplingParams, Trace};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    variant_dir("deepseek-v3-tiny")
}

fn variant_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("KUBEMOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let dir = base.join(name);
    assert!(
        dir.join("config.json").exists(),
        "fixtures not found at {}; set KUBEMOE_FIXTURES",
        dir.display()
    );
    dir
}

fn load() -> Model {
    load_as("deepseek-v3-tiny", Precision::Auto)
}

fn load_as(variant: &str, precision: Precision) -> Model {
    let dir = variant_dir(variant);
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    Model::load_as(config, &Checkpoint::open(&dir).unwrap(), Experts::All, precision).unwrap()
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open() -> Self {
        Self::of("deepseek-v3-tiny")
    }
    fn of(variant: &str) -> Self {
        Self { bytes: std::fs::read(variant_dir(variant).join("reference.safetensors")).unwrap() }
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64);
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    }
}

const SEQS: [&str; 2] = ["s0", "s1"];

/// The reference's sequences as greedy requests of 8 new tokens.
fn greedy_requests(r: &Reference) -> Vec<Request> {
    SEQS.iter()
        .map(|s| Request {
            prompt: r.ids(&format!("{s}.input_ids")),
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
        })
        .collect()
}

#[test]
fn full_forward_matches_reference_logits_layers_and_routing() {
    let model = load();
    let r = Reference::open();
    for s in SEQS {
        let ids = r.ids(&format!("{s}.input_ids"));
        let mut trace = Trace::default();
        let logits = model.forward_full(&ids, Some(&mut trace)).unwrap();
        let err = rel_err(&logits, &r.f32(&format!("{s}.logits")));
        assert!(err < 1e-4, "{s}: logits relative error {err}");
        let layer_out = r.f32(&format!("{s}.layer_out"));
        let per_layer = layer_out.len() / trace.layer_out.len();
        for (l, ours) in trace.layer_out.iter().enumerate() {
            let err = rel_err(ours, &layer_out[l * per_layer..(l + 1) * per_layer]);
            assert!(err < 1e-4, "{s}: layer {l} output relative error {err}");
        }
        for l in [1usize, 2] {
            let routing = &trace.routing[&l];
            assert_eq!(routing.ids, r.ids(&format!("{s}.layer{l}.topk_idx")), "{s}: layer {l} experts");
            let want = r.f32(&format!("{s}.layer{l}.topk_weight"));
            for (a, b) in routing.weights.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{s}: layer {l} weight {a} vs {b}");
            }
        }
    }
}

#[test]
fn greedy_generation_with_kv_cache_matches_reference() {
    let model = load();
    let r = Reference::open();
    let requests = greedy_requests(&r);
    // Together in one batch of different lengths, and each alone.
    let together = generate(&model, &requests).unwrap();
    for (i, s) in SEQS.iter().enumerate() {
        let want = r.ids(&format!("{s}.greedy"));
        assert_eq!(together[i], want, "{s} batched");
        assert_eq!(generate(&model, &requests[i..=i]).unwrap()[0], want, "{s} alone");
    }
}

#[test]
fn incremental_decode_logits_equal_full_forward() {
    let model = load();
    let r = Reference::open();
    let ids = r.ids("s0.input_ids");
    let full = model.forward_full(&ids, None).unwrap();
    let vocab = model.config.vocab_size;
    // Prefill a prefix of 5 in one step, then one token per step.
    let mut cache = KvCache::new(&model.config);
    let first = model.forward_step(&mut [(&mut cache, &ids[..5])]).unwrap();
    assert!(rel_err(&first, &full[4 * vocab..5 * vocab]) < 1e-5);
    for t in 5..ids.len() {
        let step = model.forward_step(&mut [(&mut cache, &ids[t..=t])]).unwrap();
        let err = rel_err(&step, &full[t * vocab..(t + 1) * vocab]);
        assert!(err < 1e-5, "position {t}: relative error {err}");
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn batch_of_different_lengths_equals_each_alone() {
    let model = load();
    let r = Reference::open();
    let (a, b) = (r.ids("s0.input_ids"), r.ids("s1.input_ids"));
    let vocab = model.config.vocab_size;
    let (mut ca, mut cb) = (KvCache::new(&model.config), KvCache::new(&model.config));
    // Mixed step: a prefills 3 tokens while b prefills all of its 7.
    let mixed = model.forward_step(&mut [(&mut ca, &a[..3]), (&mut cb, &b)]).unwrap();
    // Then a decode step with one token each, at different positions.
    let next = model.forward_step(&mut [(&mut ca, &a[3..4]), (&mut cb, &[5])]).unwrap();
    let (mut sa, mut sb) = (KvCache::new(&model.config), KvCache::new(&model.config));
    let alone_a = model.forward_step(&mut [(&mut sa, &a[..3])]).unwrap();
    let alone_b = model.forward_step(&mut [(&mut sb, &b)]).unwrap();
    assert!(rel_err(&mixed[..vocab], &alone_a) < 1e-6);
    assert!(rel_err(&mixed[vocab..], &alone_b) < 1e-6);
    let next_a = model.forward_step(&mut [(&mut sa, &a[3..4])]).unwrap();
    let next_b = model.forward_step(&mut [(&mut sb, &[5])]).unwrap();
    assert!(rel_err(&next[..vocab], &next_a) < 1e-6);
    assert!(rel_err(&next[vocab..], &next_b) < 1e-6);
}

#[test]
fn out_of_vocabulary_id_is_refused_and_cache_left_intact() {
    let model = load();
    let mut cache = KvCache::new(&model.config);
    model.forward_step(&mut [(&mut cache, &[1, 2, 3])]).unwrap();
    let bytes = cache.bytes();
    let err = model.forward_step(&mut [(&mut cache, &[4, 512])]).unwrap_err();
    assert!(err.to_string().contains("input id 512 at position 1"), "{err}");
    assert_eq!((cache.len(), cache.bytes()), (3, bytes));
    let err = model.forward_full(&[600], None).unwrap_err();
    assert!(err.to_string().contains("vocab_size 512"), "{err}");
}

/// Greedy continuations from a variant's `reference.json`, by sequence.
fn reference_greedy(variant: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(variant_dir(variant).join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    json["sequences"].as_array().unwrap().iter().map(|s| (ids(&s["input_ids"]), ids(&s["greedy"]))).collect()
}

#[test]
fn stored_bf16_and_fp8_fixtures_match_their_references_kept_in_their_precision() {
    for (variant, held) in [("deepseek-v3-tiny-bf16", Held::Bf16), ("deepseek-v3-tiny-fp8", Held::Fp8)] {
        let model = load_as(variant, Precision::Auto);
        let FeedForward::Moe(moe) = &model.layers[1].mlp else { panic!("layer 1 is MoE") };
        let expert = moe.experts[0].as_ref().unwrap();
        assert_eq!(expert.gate_proj.weight.dtype(), held, "{variant}: experts held as stored");
        assert_eq!(
            model.layers[0].self_attn.kv_b_proj.weight.dtype(),
            held,
            "{variant}: attention held as stored"
        );
        assert_eq!(model.lm_head.weight.dtype(), Held::Bf16, "{variant}: LM head is bf16 in both");
        let r = Reference::of(variant);
        let greedy = reference_greedy(variant);
        for (s, (ids, _)) in SEQS.iter().zip(&greedy) {
            let logits = model.forward_full(ids, None).unwrap();
            let err = rel_err(&logits, &r.f32(&format!("{s}.logits")));
            assert!(err < 1e-4, "{variant} {s}: logits relative error {err}");
        }
        let requests: Vec<Request> = greedy
            .iter()
            .map(|(prompt, _)| Request {
                prompt: prompt.clone(),
                max_new_tokens: 8,
                sampling: SamplingParams::default(),
            })
            .collect();
        let out = generate(&model, &requests).unwrap();
        for (got, (_, want)) in out.iter().zip(&greedy) {
            assert_eq!(got, want, "{variant}: greedy tokens");
        }
        // Widened to f32 (dequantised at load, as before FP8 could be held): the same function.
        let wide = load_as(variant, Precision::F32);
        for (s, (ids, _)) in SEQS.iter().zip(&greedy) {
            let err = rel_err(&wide.forward_full(ids, None).unwrap(), &r.f32(&format!("{s}.logits")));
            assert!(err < 1e-4, "{variant} {s} as f32: logits relative error {err}");
        }
    }
}

/// The f32 fixture with every matrix rounded as `precision` holds it (the kernels' own
/// conversion), stored back as f32: what the f32 engine runs on the same rounded values.
fn rounded_as_f32(precision: Precision) -> TensorMap {
    let dir = fixture_dir();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let st_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let mut map = TensorMap { label: format!("fixture rounded as {precision:?}"), ..Default::default() };
    for name in st.names() {
        let RawTensor { dtype, shape, data } = ckpt.raw(name).unwrap().unwrap();
        let mut data = data.to_vec();
        if shape.len() == 2 {
            let w = kubemoe_kernels::Weight::stored(Held::F32, data.clone().into(), shape[0], shape[1], None)
                .unwrap();
            let to = match precision {
                Precision::Fp8 if name.ends_with("_proj.weight") => Held::Fp8,
                _ => Held::Bf16,
            };
            data = kubemoe_kernels::dtype::f32_to_le(&w.to(to, [128, 128]).unwrap().widen_all());
        }
        map.tensors.insert(name.to_string(), OwnedTensor { dtype, shape: shape.to_vec(), data });
    }
    map
}

#[test]
fn bf16_and_fp8_residency_compute_the_f32_function_of_the_rounded_weights() {
    let r = Reference::open();
    for precision in [Precision::Bf16, Precision::Fp8] {
        let held = load_as("deepseek-v3-tiny", precision);
        let config = Config::from_file(&fixture_dir().join("config.json")).unwrap();
        let widened =
            Model::load_as(config, &rounded_as_f32(precision), Experts::All, Precision::F32).unwrap();
        for s in SEQS {
            let ids = r.ids(&format!("{s}.input_ids"));
            let (mut t_held, mut t_wide) = (Trace::default(), Trace::default());
            let a = held.forward_full(&ids, Some(&mut t_held)).unwrap();
            let b = widened.forward_full(&ids, Some(&mut t_wide)).unwrap();
            let err = rel_err(&a, &b);
            assert!(
                err < 1e-5,
                "{precision:?} {s}: logits relative error {err} against f32 on the rounded weights"
            );
            for (layer, routing) in &t_wide.routing {
                assert_eq!(
                    t_held.routing[layer].ids, routing.ids,
                    "{precision:?} {s}: experts of layer {layer}"
                );
            }
        }
        let prompts = greedy_requests(&r);
        assert_eq!(
            generate(&held, &prompts).unwrap(),
            generate(&widened, &prompts).unwrap(),
            "{precision:?}: greedy"
        );
        // bf16 on an FP8 checkpoint would round its values: refused, naming the way out.
        if precision == Precision::Bf16 {
            let dir = variant_dir("deepseek-v3-tiny-fp8");
            let config = Config::from_file(&dir.join("config.json")).unwrap();
            let err = Model::load_as(config, &Checkpoint::open(&dir).unwrap(), Experts::All, precision)
                .unwrap_err();
            assert!(err.to_string().contains("use dtype auto (FP8 kept) or f32"), "{err}");
        }
    }
}

/// The project's own fixture with an MTP module (`model/tests/fixtures/mtp-tiny`, made by
/// `scripts/train-tiny-chat/fixture.py`): transformers' main model and its `MtpModel` on the
/// same weights.
#[test]
fn mtp_draft_logits_match_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtp-tiny");
    check_against_transformers(&dir, &dir);
}

/// kubemoe-tiny-chat, the trained model `up` serves (bf16, held in bf16), against
/// transformers' `DeepseekV3ForCausalLM` and `MtpModel` loading it (reference made by
/// `fixture.py models/kubemoe-tiny-chat --out model/tests/fixtures/kubemoe-tiny-chat`).
#[test]
fn the_trained_model_matches_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    check_against_transformers(
        &root.join("../models/kubemoe-tiny-chat"),
        &root.join("tests/fixtures/kubemoe-tiny-chat"),
    );
}

/// The model in `model_dir` gives transformers' logits and MTP draft logits of the reference
/// in `reference_dir`, and its next greedy token.
fn check_against_transformers(model_dir: &std::path::Path, reference_dir: &std::path::Path) {
    let model = kubemoe_model::source::open(model_dir.to_str().unwrap(), Experts::All).unwrap();
    assert_eq!(model.mtp.len(), 1);
    let r = Reference { bytes: std::fs::read(reference_dir.join("reference.safetensors")).unwrap() };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference_dir.join("reference.json")).unwrap())
            .unwrap();
    for s in SEQS {
        let ids = r.ids(&format!("{s}.input_ids"));
        let hidden = model.hidden_full(&ids, None).unwrap();
        let logits = model.lm_head.forward(&model.norm.forward(&hidden).unwrap()).unwrap();
        let err = rel_err(&logits, &r.f32(&format!("{s}.logits")));
        assert!(err < 1e-4, "{s}: logits relative error {err}");
        let draft = model.mtp_logits(&ids, &hidden).unwrap().unwrap();
        let err = rel_err(&draft, &r.f32(&format!("{s}.mtp_logits")));
        assert!(err < 1e-4, "{s}: MTP logits relative error {err}");
        let vocab = model.config.vocab_size;
        let last = kubemoe_model::sampling::argmax(&logits[logits.len() - vocab..]);
        assert_eq!(Some(u64::from(last)), json["next_token"][s].as_u64(), "{s}: next greedy token");
    }
}

/// The cached MTP step ([`Model::mtp_step`]) computes what the full-sequence MTP pass does,
/// whatever the chunking, and rolled-back tokens leave no trace: what a speculating router
/// relies on.
#[test]
fn mtp_steps_with_their_cache_match_the_full_pass_after_rollbacks() {
    use kubemoe_model::MtpRows;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtp-tiny");
    let model = kubemoe_model::source::open(dir.to_str().unwrap(), Experts::All).unwrap();
    let r = Reference { bytes: std::fs::read(dir.join("reference.safetensors")).unwrap() };
    let ids = r.ids(&format!("{}.input_ids", SEQS[0]));
    let want = model.mtp_logits(&ids, &model.hidden_full(&ids, None).unwrap()).unwrap().unwrap();
    let (mut cache, mut mtp) = (KvCache::new(&model.config), KvCache::for_mtp(&model.config));
    let mut got = Vec::new();
    let hid = model.config.hidden_size;
    let mut start = 0;
    for end in [3, 4, ids.len()] {
        // Two wrong tokens ride along and are rolled back, from both caches.
        let fed = [&ids[start..end], &[5, 6][..]].concat();
        let hidden = model.forward_step_hidden(&mut [(&mut cache, &fed)], &model).unwrap();
        // The MTP rows whose next token is known: all but the sequence's last.
        let rows = (end - start).min(ids.len() - 1 - start);
        let next = [&ids[start + 1..start + 1 + rows], &[7][..]].concat();
        let out = model
            .mtp_step(&mut [MtpRows {
                cache: &mut mtp,
                position: start,
                hidden: &hidden[..(rows + 1) * hid],
                tokens: &next,
            }])
            .unwrap();
        got.extend(model.logits(&out[..rows * hid]).unwrap());
        cache.rollback(end);
        mtp.rollback(start + rows);
        start = end;
    }
    assert_eq!((cache.len(), mtp.len()), (ids.len(), ids.len() - 1));
    let err = rel_err(&got, &want);
    assert!(err < 1e-4, "MTP logits relative error {err}");
}
