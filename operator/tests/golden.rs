#![allow(clippy::unwrap_used)]
//! Golden tests of `render`: every manifest in `examples/` against
//! `operator/tests/golden/<example>.yaml`. After an intended change, regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p kubemoe-operator --test golden` and review the diff.

use std::path::{Path, PathBuf};

/// A fixed image, so the files do not change with the crate version.
const IMAGE: &str = "ghcr.io/kubemoe/kubemoe:golden";

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_renders_as_its_golden_file() {
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let examples = examples();
    assert!(examples.len() >= 3, "examples/ holds the tiny, V2-Lite and V3 deployments");
    let mut mismatched = Vec::new();
    let params = kubemoe_operator::desired::BuildParams {
        image: IMAGE.into(),
        epoch: 0,
        placed_workers: 0,
        operator_namespace: "kubemoe-system".into(),
        token: || Ok("golden-token".into()),
    };
    for example in &examples {
        let manifest = std::fs::read_to_string(example).unwrap();
        let name = example.file_name().unwrap().to_str().unwrap();
        let rendered = kubemoe_operator::render::render(&manifest, name, None, &params)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = golden_dir.join(name);
        if update {
            std::fs::write(&golden, &rendered).unwrap();
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
            mismatched.push(name.to_string());
        }
    }
    assert!(
        mismatched.is_empty(),
        "render output differs for {mismatched:?}; rerun with UPDATE_GOLDEN=1 and review"
    );

    // No golden file outlives its example.
    for entry in std::fs::read_dir(&golden_dir).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            examples.iter().any(|e| e.file_name() == Some(name.as_os_str())),
            "stale golden file {name:?}"
        );
    }
}
