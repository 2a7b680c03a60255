//! `kubemoe plan` as other tools call it: files in, one JSON line out.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOADS: &str = "[[90,132,40,61,104,165,39,4,73,56,183,86],[20,107,104,64,19,197,187,157,172,86,16,27]]";

fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kubemoe-plan-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("load.json"), LOADS).unwrap();
    d
}

/// Runs `kubemoe plan` on the published EPLB problem (8 workers × 2 slots, 2 nodes, 4 groups).
fn plan(dir: &Path, extra: &[&str]) -> Result<Value, String> {
    let load = dir.join("load.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["plan", "--load", load.to_str().unwrap(), "--workers", "8", "--nodes", "2", "--groups", "4"])
        .args(["--slots-per-worker", "2"])
        .args(extra)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(r#"{"phy_to_log":"#), "{text}");
    Ok(serde_json::from_str(&text).unwrap())
}

#[test]
fn full_mode_is_eplb_and_incremental_mode_respects_the_current_placement() {
    let d = dir("modes");
    let full = plan(&d, &[]).unwrap();
    let want: Value =
        serde_json::from_str("[[5,6,5,7,8,4,3,4,10,9,10,2,0,1,11,1],[7,10,6,8,6,11,8,9,2,4,5,1,5,0,3,1]]")
            .unwrap();
    assert_eq!(full["phy_to_log"], want);
    let (before, after) =
        (full["balance"]["before"].as_f64().unwrap(), full["balance"]["after"].as_f64().unwrap());
    assert!(after > before && after <= 1.0, "{full}");
    assert!(full["moved"].as_u64().unwrap() > 0);

    // From EPLB's plan the incremental mode finds better balance (it refines EPLB's greedy
    // packing); from its own output there is nothing left to gain and nothing moves.
    std::fs::write(d.join("full.json"), full.to_string()).unwrap();
    let better = plan(&d, &["--current", d.join("full.json").to_str().unwrap()]).unwrap();
    assert_eq!(better["balance"]["before"], full["balance"]["after"]);
    assert!(better["balance"]["after"].as_f64() >= better["balance"]["before"].as_f64(), "{better}");
    std::fs::write(d.join("better.json"), better.to_string()).unwrap();
    let again = plan(&d, &["--current", d.join("better.json").to_str().unwrap()]).unwrap();
    assert_eq!((&again["phy_to_log"], again["moved"].as_u64()), (&better["phy_to_log"], Some(0)));

    // A placement.json (the ConfigMap's format) with a move budget.
    let initial: Vec<u32> = (0..16).map(|p| p % 12).collect();
    let placement = serde_json::json!({"epoch": 2, "workers": 8, "slotsPerWorker": 2, "logicalExperts": 12,
        "layers": [{"layer": 1, "slots": initial}, {"layer": 2, "slots": initial}]});
    std::fs::write(d.join("placement.json"), placement.to_string()).unwrap();
    let current = d.join("placement.json");
    for budget in [0u64, 1, 3, 6] {
        let b = budget.to_string();
        let p = plan(&d, &["--current", current.to_str().unwrap(), "--max-moves", &b]).unwrap();
        assert!(p["moved"].as_u64().unwrap() <= budget, "{p}");
        assert!(p["balance"]["after"].as_f64() >= p["balance"]["before"].as_f64(), "{p}");
        if budget == 6 {
            assert!(p["balance"]["after"].as_f64() > p["balance"]["before"].as_f64(), "{p}");
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_inputs_name_the_file_and_what_to_change() {
    let d = dir("bad");
    let err = plan(&d, &["--current", "/nonexistent/placement.json"]).unwrap_err();
    assert!(err.contains("/nonexistent/placement.json"), "{err}");
    std::fs::write(d.join("short.json"), "[[0,1,2],[0,1,2]]").unwrap();
    let err = plan(&d, &["--current", d.join("short.json").to_str().unwrap()]).unwrap_err();
    assert!(err.contains("short.json") && err.contains("16"), "{err}");
    let err = plan(&d, &["--max-moves", "3"]).unwrap_err();
    assert!(err.contains("--current"), "{err}");
    // Sizes no machine could hold are refused before anything is allocated.
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["plan", "--load", d.join("load.json").to_str().unwrap()])
        .args(["--workers", "1000000", "--slots-per-worker", "4000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("placement entries") && err.contains("fewer workers"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    std::fs::write(d.join("load.json"), "{\"not\": \"loads\"}").unwrap();
    let err = plan(&d, &[]).unwrap_err();
    assert!(err.contains("--load") && err.contains("array of arrays"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
