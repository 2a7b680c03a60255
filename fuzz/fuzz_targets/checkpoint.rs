//! A `model.safetensors` of any bytes beside a valid config.json: loading the model must
//! fail with an error (a bad header, a missing, misshapen or non-finite tensor), never panic,
//! abort or allocate what the header merely claims.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("kubemoe-fuzz-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = kubemoe_placement::config::preset_json("tiny").expect("the tiny preset");
    std::fs::write(dir.join("config.json"), config).expect("config.json");
    std::fs::write(dir.join("model.safetensors"), data).expect("model.safetensors");
    let _ = kubemoe_model::source::open(dir.to_str().expect("utf-8 temp dir"), kubemoe_model::Experts::All);
});
