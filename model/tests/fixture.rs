//! The engine against `shared/fixtures/deepseek-v3-tiny`: what Hugging Face transformers
//! computed on the same weights (logits, per-layer outputs, routing, greedy tokens).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use kubemoe_kernels::rel_err;
use kubemoe_model::checkpoint::Checkpoint;
use kubemoe_model::generate::{generate, Request};
use kubemoe_model::{Config, Experts, KvCache, Model, SamplingParams, Trace};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    let base = std::env::var_os("KUBEMOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let dir = base.join("deepseek-v3-tiny");
    assert!(
        dir.join("config.json").exists(),
        "fixtures not found at {}; set KUBEMOE_FIXTURES",
        dir.display()
    );
    dir
}

fn load() -> Model {
    let dir = fixture_dir();
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    Model::load(config, &Checkpoint::open(&dir).unwrap(), Experts::All).unwrap()
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open() -> Self {
        Self { bytes: std::fs::read(fixture_dir().join("reference.safetensors")).unwrap() }
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
    let requests: Vec<Request> = SEQS
        .iter()
        .map(|s| Request {
            prompt: r.ids(&format!("{s}.input_ids")),
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
        })
        .collect();
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
