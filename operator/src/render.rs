//! `kubemoe operator render`: the objects the controller would apply for a manifest, as a
//! multi-document YAML stream, through the same [`crate::spec`] and [`crate::desired`] code.
//!
//! The manifest may hold several documents; every `ModelDeployment` in it is rendered. A
//! volume-backed model's config comes from `--model-config`, or else from a ConfigMap in the
//! same manifest named by `spec.model.configMap` (the examples ship theirs that way). A
//! ModelDeployment the API server would refuse is refused ([`crate::schema`]); spec defaults
//! are applied by deserialising, exactly as the CRD's defaults would be.
//!
//! Each deployment's internal-token Secret is rendered with a fresh token (the controller makes
//! it once, when missing): create it once (`kubectl create`), since applying a new token to
//! running pods locks them out of each other until every pod has re-read it.

use crate::deployment::ModelDeployment;
use crate::desired::{self, BuildParams};
use crate::spec::{self, ModelSource};
use crate::{Error, Result};
use kube::ResourceExt;
use kubemoe_placement::ModelConfig;
use serde::Deserialize;
use std::collections::HashMap;

/// Renders every ModelDeployment of `manifest`. `origin` names the manifest in errors;
/// `model_config` is the text of a config.json that overrides any the manifest carries;
/// `params` are what a running operator would build with (the epoch is ignored: 0).
pub fn render(
    manifest: &str,
    origin: &str,
    model_config: Option<&str>,
    params: &BuildParams,
) -> Result<String> {
    let mut deployments = Vec::new();
    let mut configs = HashMap::new();
    for document in serde_yaml::Deserializer::from_str(manifest) {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|source| Error::Yaml { origin: origin.to_string(), source })?;
        if value.is_null() {
            continue;
        }
        match value.get("kind").and_then(serde_yaml::Value::as_str) {
            Some("ModelDeployment") => {
                // What the API server would refuse is refused here, with every reason.
                let json = serde_json::to_value(&value)
                    .map_err(|source| Error::Encode { what: format!("{origin} as JSON"), source })?;
                let violations = crate::schema::violations(&json);
                if !violations.is_empty() {
                    return Err(Error::Manifest {
                        origin: origin.into(),
                        message: format!(
                            "the API server would refuse this ModelDeployment: {}",
                            violations.join("; ")
                        ),
                    });
                }
                deployments.push(
                    serde_yaml::from_value::<ModelDeployment>(value)
                        .map_err(|source| Error::Yaml { origin: origin.to_string(), source })?,
                )
            }
            Some("ConfigMap") => {
                let name =
                    value.get("metadata").and_then(|m| m.get("name")).and_then(serde_yaml::Value::as_str);
                let text =
                    value.get("data").and_then(|d| d.get("config.json")).and_then(serde_yaml::Value::as_str);
                if let (Some(name), Some(text)) = (name, text) {
                    configs.insert(name.to_string(), text.to_string());
                }
            }
            _ => {}
        }
    }
    if deployments.is_empty() {
        return Err(Error::Manifest {
            origin: origin.into(),
            message: "no ModelDeployment in the manifest".into(),
        });
    }
    let mut out = String::new();
    for md in &deployments {
        for object in render_one(md, origin, model_config, &configs, params)? {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object).map_err(Error::WriteYaml)?);
        }
    }
    Ok(out)
}

fn render_one(
    md: &ModelDeployment,
    origin: &str,
    model_config: Option<&str>,
    configs: &HashMap<String, String>,
    params: &BuildParams,
) -> Result<Vec<serde_json::Value>> {
    let refused = |invalid: kubemoe_placement::Invalid| Error::Invalid {
        name: md.name_any(),
        reason: invalid.reason.to_string(),
        message: invalid.message,
    };
    let source = ModelSource::parse(&md.spec.model.source).map_err(refused)?;
    let model = if let Some(text) = model_config {
        ModelConfig::from_json(text, "--model-config")?
    } else if let Some(builtin) = source.builtin_config() {
        builtin.map_err(refused)?
    } else {
        let name = md.spec.model.config_map.as_deref().unwrap_or_default();
        let text = configs.get(name).ok_or_else(|| Error::Manifest {
            origin: origin.into(),
            message: format!(
                "ModelDeployment {} serves {} and needs its config.json: pass --model-config, or add a \
                 ConfigMap with key config.json named by spec.model.configMap",
                md.name_any(),
                md.spec.model.source
            ),
        })?;
        ModelConfig::from_json(text, &format!("{origin}: ConfigMap {name}"))?
    };
    spec::check_name(&md.name_any()).map_err(refused)?;
    let layout = spec::layout(&md.spec, &model).map_err(refused)?;
    let params = BuildParams { epoch: 0, placed_workers: 0, ..params.clone() };
    let token = (params.token)().map_err(|e| Error::Token {
        name: desired::Names::of(&md.name_any()).internal_token,
        reason: e.to_string(),
    })?;
    let encode = |source| Error::Encode { what: format!("the children of {}", md.name_any()), source };
    // The internal token first, as the controller makes it before the pods that mount it.
    let secret = desired::internal_token_secret(md, &token).and_then(serde_json::to_value).map_err(encode)?;
    let objects = desired::build(md, &source, &layout, &params).and_then(|d| d.objects()).map_err(encode)?;
    Ok(std::iter::once(secret).chain(objects).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(image: &str) -> BuildParams {
        BuildParams {
            image: image.into(),
            epoch: 0,
            placed_workers: 0,
            operator_namespace: "kubemoe-system".into(),
            token: || Ok("test-token".into()),
        }
    }

    const TINY: &str = "apiVersion: kubemoe.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: t\n\
                        spec:\n  model:\n    source: builtin:tiny\n  workers:\n    replicas: 2\n";

    #[test]
    fn renders_every_child_in_apply_order() {
        let text = render(TINY, "t.yaml", None, &params("img:1")).unwrap();
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap()["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "Secret",
                "ConfigMap",
                "Service",
                "NetworkPolicy",
                "StatefulSet",
                "PodDisruptionBudget",
                "Service",
                "NetworkPolicy",
                "Deployment"
            ]
        );
        assert!(text.contains("image: img:1"));
    }

    #[test]
    fn what_the_api_server_or_the_operator_would_refuse_is_refused() {
        let text =
            TINY.replace("replicas: 2\n", "replicas: 2\n    prot: 1\n  router:\n    httpPort: 50051\n");
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml: the API server would refuse"), "{err}");
        assert!(err.contains("spec.workers.prot: unknown field"), "{err}");
        // The CEL rules run only on a structurally valid object, as in the API server.
        let text = TINY.replace("replicas: 2\n", "replicas: 2\n  router:\n    httpPort: 50051\n");
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err().to_string();
        assert!(err.contains("router.grpcPort and router.httpPort must differ"), "{err}");
        let text = TINY.replace("name: t\n", &format!("name: {}\n", "t".repeat(46)));
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err().to_string();
        assert!(err.contains("InvalidName") && err.contains("at most 45"), "{err}");
    }

    #[test]
    fn a_refused_spec_is_an_error_with_the_reason() {
        let text = TINY.replace("replicas: 2", "replicas: 3");
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err();
        assert!(err.to_string().contains("ExpertsNotDivisible"), "{err}");
    }

    #[test]
    fn nccl_is_refused_until_it_is_built_rather_than_served_over_tcp() {
        let text = format!("{TINY}    gpusPerWorker: 1\n  transport: nccl\n");
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err().to_string();
        assert!(err.contains("NotBuilt") && err.contains("set transport to tcp"), "{err}");
    }

    #[test]
    fn a_volume_model_needs_its_config() {
        let text = TINY.replace("builtin:tiny", "pvc://models/tiny");
        let err = render(&text, "t.yaml", None, &params("img")).unwrap_err();
        assert!(err.to_string().contains("--model-config"), "{err}");
        let config = kubemoe_placement::config::preset_json("tiny").unwrap();
        let rendered = render(&text, "t.yaml", Some(config), &params("img")).unwrap();
        assert!(rendered.contains("claimName: models"), "{rendered}");
        assert!(render("kind: Pod\n", "p.yaml", None, &params("img")).is_err());
    }
}
