//! A manifest as `kubemoe operator render` (and so `up -f`) takes it: any text, then after a
//! NUL byte an optional `config.json` for a volume-backed model. Every ModelDeployment in it
//! goes through the CRD's schema and CEL rules ([`kubemoe_operator::schema`]), the operator's
//! own checks and the layout, and is rendered into the objects the controller would apply.
//! Refused or rendered, never a panic.
#![no_main]

use kubemoe_operator::desired::BuildParams;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (manifest, config) = match text.split_once('\0') {
        Some((manifest, config)) => (manifest, Some(config)),
        None => (text, None),
    };
    let params = BuildParams {
        image: "kubemoe:fuzz".into(),
        epoch: 0,
        placed_workers: 0,
        operator_namespace: "kubemoe-system".into(),
        token: || Ok("fuzz".into()),
    };
    let _ = kubemoe_operator::render::render(manifest, "fuzz", config, &params);
});
