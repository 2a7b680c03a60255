//! A `config.json` of any text: both readers (the model's and the placement's) must refuse it
//! or accept it, and an accepted one must give a layout and an initial plan (or a reason)
//! without panicking or allocating beyond the planners' limits.
#![no_main]

use kubemoe_placement::layout::{layout, LayoutSpec};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = kubemoe_model::Config::from_json(text, "fuzz");
    let Ok(model) = kubemoe_placement::ModelConfig::from_json(text, "fuzz") else { return };
    for (workers, redundant, min_replicas) in [(1, 0, 1), (2, 2, 1), (3, 1, 1), (2, 64, 2)] {
        if let Ok(layout) = layout(&LayoutSpec { workers, redundant, min_replicas }, &model) {
            let plan = layout.initial_plan();
            plan.validate().expect("the initial plan of a layout is valid");
        }
    }
});
