//! The loader on more than the fixture: generated checkpoints in every storage dtype and
//! both families, selective expert loading, and every kind of bad input.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use kubemoe_kernels::rel_err;
use kubemoe_model::checkpoint::{Checkpoint, OwnedTensor, TensorMap};
use kubemoe_model::generate::{generate, Request};
use kubemoe_model::synth::{self, StorageDtype};
use kubemoe_model::{source, Config, Error, Experts, KvCache, Model, Pages, SamplingParams, PAGE_TOKENS};
use std::path::PathBuf;
use std::sync::Arc;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kubemoe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gen(preset: &str, dtype: StorageDtype, name: &str) -> PathBuf {
    let dir = scratch(name);
    synth::write_model_dir(&dir, preset, &[], dtype, 7, 0.0, 1 << 20).unwrap();
    dir
}

fn open(dir: &std::path::Path) -> Model {
    source::open(dir.to_str().unwrap(), Experts::All).unwrap()
}

const PROMPT: [u32; 9] = [0, 17, 301, 42, 7, 199, 3, 88, 250];

/// The f32 weights of `preset` (seed 7) rounded in memory as `storage` would store them,
/// through the kernels' conversions rather than the file path.
fn rounded_in_memory(preset: &str, storage: StorageDtype) -> Model {
    use kubemoe_kernels::dtype;
    let config = Config::from_json(&synth::preset_config(preset).unwrap().to_string(), preset).unwrap();
    let mut map = synth::generate_tensors(&config, StorageDtype::F32, 7, 0.0, "memory", &|_| true).unwrap();
    for (name, t) in map.tensors.iter_mut() {
        let w = dtype::f32_from_le(&t.data);
        let rounded = if storage == StorageDtype::Fp8 && t.shape.len() == 2 && name.contains("_proj.") {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (q, s) = dtype::quant_fp8_blocks(&w, rows, cols, [128, 128]).unwrap();
            dtype::dequant_fp8_blocks(&q, rows, cols, &s, [128, 128]).unwrap()
        } else {
            dtype::bf16_from_le(&dtype::bf16_to_le(&w))
        };
        t.data = dtype::f32_to_le(&rounded);
    }
    Model::load(config, &map, Experts::All).unwrap()
}

#[test]
fn bf16_and_fp8_checkpoints_load_as_their_dequantised_f32_weights() {
    for (preset, storage) in [("v3-shape", StorageDtype::Fp8), ("v2-lite-shape", StorageDtype::Bf16)] {
        let dir = gen(preset, storage, &format!("{preset}-{storage:?}"));
        let model = open(&dir);
        assert_eq!(model.mtp.len(), model.config.num_nextn_predict_layers);
        let logits = model.forward_full(&PROMPT, None).unwrap();
        let want = rounded_in_memory(preset, storage).forward_full(&PROMPT, None).unwrap();
        let err = rel_err(&logits, &want);
        assert!(err < 1e-6, "{preset} {storage:?}: relative error {err} against the dequantised weights");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn reduced_precision_stays_within_its_tolerance_of_f32() {
    // MoE amplifies rounding where it flips a routing decision; on the tiny preset bf16 moves
    // logits by ~0.5% and FP8 (3 mantissa bits) by ~12%.
    let f32_dir = gen("tiny", StorageDtype::F32, "tiny-f32");
    let reference = open(&f32_dir).forward_full(&PROMPT, None).unwrap();
    for (storage, tolerance) in [(StorageDtype::Bf16, 2e-2), (StorageDtype::Fp8, 2.5e-1)] {
        let dir = gen("tiny", storage, &format!("tiny-{storage:?}"));
        let err = rel_err(&open(&dir).forward_full(&PROMPT, None).unwrap(), &reference);
        assert!(err < tolerance && err > 1e-6, "{storage:?}: logits relative error {err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
    std::fs::remove_dir_all(f32_dir).unwrap();
}

#[test]
fn fp8_checkpoint_stores_e4m3_blocks_with_scales() {
    let dir = gen("tiny", StorageDtype::Fp8, "tiny-fp8");
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(config.fp8_block, Some([128, 128]));
    let ckpt = Checkpoint::open(&dir).unwrap();
    use kubemoe_model::checkpoint::TensorSource;
    let w = ckpt.raw("model.layers.1.mlp.experts.3.up_proj.weight").unwrap().unwrap();
    assert_eq!(w.dtype, safetensors::Dtype::F8_E4M3);
    let s = ckpt.raw("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv").unwrap().unwrap();
    assert_eq!(s.shape, &[1, 1]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn v2_lite_shape_with_yarn_runs_end_to_end_and_decode_matches_full_forward() {
    let dir = gen("v2-lite-shape", StorageDtype::Bf16, "v2lite");
    let model = open(&dir);
    let c = &model.config;
    assert!(c.q_lora_rank.is_none() && c.n_shared_experts == 2 && c.yarn.is_some());
    let full = model.forward_full(&PROMPT, None).unwrap();
    assert!(full.iter().all(|v| v.is_finite()));
    let vocab = c.vocab_size;
    let mut cache = KvCache::new(c);
    model.forward_step(&mut [(&mut cache, &PROMPT[..4])]).unwrap();
    for t in 4..PROMPT.len() {
        let step = model.forward_step(&mut [(&mut cache, &PROMPT[t..=t])]).unwrap();
        assert!(rel_err(&step, &full[t * vocab..(t + 1) * vocab]) < 1e-5, "position {t}");
    }
    // Pages shared from a cache continue as the original does (what a router's prefix cache
    // relies on), also when cut inside a shared page (whose kept rows are then copied).
    let long: Vec<u32> = (0..40).map(|i| PROMPT[i % PROMPT.len()]).collect();
    let mut cache = KvCache::new(c);
    model.forward_step(&mut [(&mut cache, &long[..20])]).unwrap();
    let pages: Pages = Arc::new(cache.rows(0, PAGE_TOKENS).unwrap());
    let mut copy = KvCache::new(c);
    assert!(copy.share(&pages, 1).is_err(), "one page only");
    copy.share(&pages, 0).unwrap();
    assert!(copy.share(&Arc::new(cache.rows(0, 15).unwrap()), 0).is_err(), "a page short");
    cache.rollback(16);
    let step = |cache: &mut KvCache, t: &[u32]| model.forward_step(&mut [(cache, t)]).unwrap();
    // The same rows read in two slices: equal to float rounding.
    let same = |a: Vec<f32>, b: Vec<f32>| rel_err(&a, &b) < 1e-6;
    assert!(same(step(&mut cache, &long[16..30]), step(&mut copy, &long[16..30])));
    cache.rollback(10);
    copy.rollback(10);
    assert_eq!(step(&mut cache, &long[10..12]), step(&mut copy, &long[10..12]), "one slice each");
    assert_eq!((copy.len(), copy.bytes()), (12, cache.bytes()));
    assert!(cache.rows(10, 3).is_err());
    let request = Request { prompt: PROMPT.to_vec(), max_new_tokens: 6, sampling: SamplingParams::default() };
    let out = generate(&model, &[request]).unwrap();
    assert_eq!(out[0].len(), 6);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn builtin_equals_generated_directory_with_seed_zero() {
    let dir = scratch("builtin");
    synth::write_model_dir(&dir, "tiny", &[], StorageDtype::F32, 0, 0.0, 1 << 20).unwrap();
    let a = open(&dir).forward_full(&PROMPT, None).unwrap();
    let b = source::open("builtin:tiny", Experts::All).unwrap().forward_full(&PROMPT, None).unwrap();
    assert_eq!(a, b);
    assert!(dir.join("tokenizer.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loading_chosen_experts_never_opens_shards_of_the_others() {
    let (config, tensors) = synth::builtin("tiny", &|_| true).unwrap();
    let dir = scratch("shards");
    // 8 KiB shards: every expert projection lands in its own file.
    tensors.save_sharded(&dir, 8 << 10).unwrap();
    std::fs::write(dir.join("config.json"), synth::preset_config("tiny").unwrap().to_string()).unwrap();
    let wanted = |layer: usize, expert: usize| layer == 1 && expert < 4;
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut by_file: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (name, file) in index["weight_map"].as_object().unwrap() {
        by_file.entry(file.as_str().unwrap().into()).or_default().push(name.clone());
    }
    let mut removed = 0;
    for (file, names) in by_file {
        let other_experts_only = names.iter().all(|n| {
            let parts: Vec<&str> = n.split('.').collect();
            parts.len() > 5
                && parts[4] == "experts"
                && !wanted(parts[2].parse().unwrap(), parts[5].parse().unwrap())
        });
        if other_experts_only {
            std::fs::remove_file(dir.join(file)).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 50, "only {removed} shards held other experts alone");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(config.clone(), &ckpt, Experts::Only(&wanted)).unwrap();
    let kubemoe_model::layers::FeedForward::Moe(moe) = &model.layers[1].mlp else { panic!("layer 1 is MoE") };
    let loaded: Vec<usize> = (0..16).filter(|e| moe.experts[*e].is_some()).collect();
    assert_eq!(loaded, vec![0, 1, 2, 3]);
    // Running a token routed elsewhere says which expert is missing.
    let err = model.forward_full(&PROMPT, None).unwrap_err();
    assert!(matches!(err, Error::ExpertNotLoaded { .. }), "{err}");
    // Loading them all needs the removed files, and says which.
    let err = Model::load(config, &ckpt, Experts::All).unwrap_err();
    assert!(err.to_string().contains("cannot read") && err.to_string().contains("shards/model-"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tiny_with(edit: impl FnOnce(&mut TensorMap)) -> Result<Model, Error> {
    let (config, mut tensors) = synth::builtin("tiny", &|_| true).unwrap();
    edit(&mut tensors);
    Model::load(config, &tensors, Experts::All)
}

#[test]
fn bad_checkpoints_name_the_tensor_and_the_cause() {
    let name = "model.layers.2.self_attn.kv_b_proj.weight";
    let err = tiny_with(|t| drop(t.tensors.remove(name))).unwrap_err();
    assert!(err.to_string().contains(&format!("tensor `{name}` is missing")), "{err}");

    let err = tiny_with(|t| t.tensors.get_mut(name).unwrap().shape = vec![32, 128]).unwrap_err();
    assert!(err.to_string().contains("shape [32, 128], config.json implies [128, 32]"), "{err}");

    let err = tiny_with(|t| {
        let w = t.tensors.get_mut(name).unwrap();
        *w = OwnedTensor { dtype: safetensors::Dtype::I32, shape: w.shape.clone(), data: w.data.clone() };
    })
    .unwrap_err();
    assert!(err.to_string().contains("has dtype I32"), "{err}");

    // A NaN or an infinity anywhere in a weight is refused at load, with the tensor named.
    for bad in [f32::NAN, f32::INFINITY] {
        let err = tiny_with(|t| {
            let w = t.tensors.get_mut(name).unwrap();
            let mut values = kubemoe_kernels::dtype::f32_from_le(&w.data);
            values[77] = bad;
            w.data = kubemoe_kernels::dtype::f32_to_le(&values);
        })
        .unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 77, .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("tensor `{name}`")) && err.to_string().contains("finite"),
            "{err}"
        );
    }
}

#[test]
fn an_index_cannot_name_shards_outside_the_model_directory() {
    let (_, tensors) = synth::builtin("tiny", &|_| true).unwrap();
    let dir = scratch("escape");
    tensors.save_sharded(&dir, 1 << 30).unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    for shard in ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", ""] {
        let mut edited = index.clone();
        edited["weight_map"]["model.norm.weight"] = shard.into();
        std::fs::write(&index_path, edited.to_string()).unwrap();
        let err = Checkpoint::open(&dir).err().expect("a shard outside the directory was accepted");
        assert!(
            err.to_string().contains(&format!("shard `{shard}`"))
                && err.to_string().contains("inside the model directory"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_config_files_name_the_file_and_key() {
    let dir = scratch("badconfig");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\"model_type\": \"deepseek_v3\", \"hidden_size\": }").unwrap();
    let err = source::open(dir.to_str().unwrap(), Experts::All).unwrap_err();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");

    let mut v = synth::preset_config("tiny").unwrap();
    v["model_type"] = "mixtral".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = source::open(dir.to_str().unwrap(), Experts::All).unwrap_err();
    assert!(err.to_string().contains("unsupported architecture `mixtral`"), "{err}");

    let mut v = synth::preset_config("tiny").unwrap();
    v["n_group"] = 5.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = source::open(dir.to_str().unwrap(), Experts::All).unwrap_err();
    assert!(err.to_string().contains("num_experts_per_tok") && err.to_string().contains("5 groups"), "{err}");

    std::fs::write(&path, synth::preset_config("tiny").unwrap().to_string()).unwrap();
    let err = source::open(dir.to_str().unwrap(), Experts::All).unwrap_err();
    assert!(err.to_string().contains("neither model.safetensors.index.json nor model.safetensors"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mtp_module_loads_and_drafts() {
    let (config, tensors) = synth::builtin("v3-shape", &|_| true).unwrap();
    let model = Model::load(config, &tensors, Experts::All).unwrap();
    let hidden = model.hidden_full(&PROMPT, None).unwrap();
    let draft = model.mtp_logits(&PROMPT, &hidden).unwrap().expect("v3-shape has MTP weights");
    assert_eq!(draft.len(), (PROMPT.len() - 1) * model.config.vocab_size);
    assert!(draft.iter().all(|v| v.is_finite()));
    // Draft row i depends on token i + 1: changing the last token changes only the last row.
    let mut other = PROMPT;
    other[PROMPT.len() - 1] = 5;
    let h2 = model.hidden_full(&other, None).unwrap();
    let d2 = model.mtp_logits(&other, &h2).unwrap().unwrap();
    let v = model.config.vocab_size;
    let rows = PROMPT.len() - 1;
    let (same, last) = ((rows - 1) * v, rows * v);
    assert!(rel_err(&draft[..same], &d2[..same]) < 1e-5);
    assert!(rel_err(&draft[same..last], &d2[same..last]) > 1e-3);
}
