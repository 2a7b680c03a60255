#![allow(clippy::unwrap_used)]
//! The CRD committed in `crds/` and in the chart is what `kubemoe crd` prints. After changing
//! the API types, regenerate both with
//! `UPDATE_GOLDEN=1 cargo test -p kubemoe-operator --test crd` (or `kubemoe crd > …`).

use std::path::Path;

#[test]
fn committed_crds_match_the_api_types() {
    let generated = kubemoe_operator::crd_yaml().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for copy in
        ["crds/modeldeployments.kubemoe.io.yaml", "charts/kubemoe/crds/modeldeployments.kubemoe.io.yaml"]
    {
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(root.join(copy), &generated).unwrap();
        }
        let committed = std::fs::read_to_string(root.join(copy)).unwrap();
        assert!(committed == generated, "{copy} is stale: regenerate it with `kubemoe crd`");
    }
}
