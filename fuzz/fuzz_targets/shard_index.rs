//! A `model.safetensors.index.json` of any bytes: opening the checkpoint must refuse what is
//! not an index and any shard outside the model directory, never panic or open such a path.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("kubemoe-fuzz-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("index");
    let _ = kubemoe_model::checkpoint::Checkpoint::open(&dir);
});
