//! A dispatch as a router (or anyone reaching a worker's port) sends it: any layer, token
//! count, activations and route records against a worker holding `builtin:tiny`. The worker
//! must compute or refuse (wrong sizes, a row or expert out of range, a layer without
//! experts), never panic.
#![no_main]

use std::sync::OnceLock;

fn store() -> &'static kubemoe_worker::ExpertStore {
    static STORE: OnceLock<kubemoe_worker::ExpertStore> = OnceLock::new();
    STORE.get_or_init(|| kubemoe_worker::ExpertStore::load("builtin:tiny", kubemoe_model::Precision::Auto, 0, Some(1), None).expect("builtin:tiny"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [layer, tokens, sized, rest @ ..] = data else { return };
    // builtin:tiny's hidden size: activations of whole rows, or (odd `sized`) a wrong length.
    let hidden = 64;
    let tokens = usize::from(*tokens % 8);
    let need = tokens * hidden * 4;
    let take = if sized % 2 == 0 { need } else { need / 2 + usize::from(*sized) };
    let activations: Vec<u8> = rest.iter().copied().chain(std::iter::repeat(0)).take(take).collect();
    let routes = rest.get(take.min(rest.len())..).unwrap_or_default();
    let _ = store().dispatch(usize::from(*layer), tokens, &activations, routes);
});
