//! A `placement.json` of any bytes: a plan either fails validation or routes (every logical
//! expert of every layer has a holder), without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(plan) = serde_json::from_slice::<kubemoe_placement::PlacementPlan>(data) else { return };
    if plan.validate().is_ok() {
        let holders = plan.holders();
        assert_eq!(holders.len(), plan.layers.len());
    }
});
