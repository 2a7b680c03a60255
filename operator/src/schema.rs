//! What the API server checks of a ModelDeployment before it stores one, done the same way
//! offline, so that `operator render` and `up -f` accept exactly what `kubectl apply` would:
//! the CRD's structural OpenAPI schema (types, int32 ranges, minimum/maximum, lengths,
//! patterns, enums, required fields, and unknown fields, which kubectl's default strict field
//! validation refuses) on the manifest as written, then the CRD's CEL rules
//! (`x-kubernetes-validations`) on the object with its defaults applied, as the API server
//! defaults before it validates. Both come from the CRD this binary serves
//! ([`ModelDeployment::crd`]), so no rule is written twice; the CEL is evaluated by
//! cel-interpreter. Reference: Kubernetes, "Extend the Kubernetes API with
//! CustomResourceDefinitions", sections Validation, Validation rules, Field pruning.
//!
//! Not checked here (the API server's, not the CRD's): `metadata` beyond its name, and
//! `x-kubernetes-list-type` uniqueness inside embedded Kubernetes types.

use crate::deployment::ModelDeployment;
use kube::CustomResourceExt;
use serde_json::Value;

/// Every way `manifest` (one ModelDeployment as JSON) breaks the CRD, as `path: problem`;
/// empty when the API server would take it.
pub fn violations(manifest: &Value) -> Vec<String> {
    let crd = match serde_json::to_value(ModelDeployment::crd()) {
        Ok(crd) => crd,
        Err(e) => return vec![format!("the CRD does not encode: {e}")],
    };
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut found = Vec::new();
    // The object's own fields: the schema's root leaves metadata to the API server.
    if let Some(object) = manifest.as_object() {
        for (key, value) in object {
            match key.as_str() {
                "apiVersion" | "kind" | "metadata" => {}
                _ => structure(&schema["properties"][key], value, key, &mut found),
            }
        }
        if object.get("spec").is_none_or(Value::is_null) {
            found.push("spec: Required value".into());
        }
        if manifest["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            found.push("metadata.name: Required value".into());
        }
    }
    if !found.is_empty() {
        return found;
    }
    // CEL on the defaulted object.
    match serde_json::from_value::<ModelDeployment>(manifest.clone()).map(|md| serde_json::to_value(md.spec))
    {
        Ok(Ok(spec)) => rules(&schema["properties"]["spec"], &spec, "spec", &mut found),
        Ok(Err(e)) => found.push(format!("spec: {e}")),
        Err(e) => found.push(format!("spec: {e}")),
    }
    found
}

/// The structural schema at `path`.
fn structure(schema: &Value, value: &Value, path: &str, found: &mut Vec<String>) {
    let mut fail = |problem: String| found.push(format!("{path}: {problem}"));
    if schema.is_null() {
        return fail("unknown field (the API server refuses it)".into());
    }
    if value.is_null() {
        // Non-nullable nulls are dropped before validation, as if absent.
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            fail(format!("{value} is neither an integer nor a string"));
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            fail(format!("{value} is not one of {}", Value::Array(allowed.clone())));
        }
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else { return fail(format!("{value} is not an object")) };
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if object.get(required).is_none_or(Value::is_null) {
                    found.push(format!("{path}.{required}: Required value"));
                }
            }
            let open = schema["x-kubernetes-preserve-unknown-fields"] == true;
            for (key, field) in object {
                let at = format!("{path}.{key}");
                match (&schema["properties"][key], &schema["additionalProperties"]) {
                    (Value::Null, Value::Null) if open => {}
                    (Value::Null, Value::Bool(true)) => {}
                    (Value::Null, extra @ Value::Object(_)) => structure(extra, field, &at, found),
                    (property, _) => structure(property, field, &at, found),
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return fail(format!("{value} is not an array")) };
            if let Some(min) = schema["minItems"].as_u64().filter(|&m| (items.len() as u64) < m) {
                fail(format!("has {} items, fewer than {min}", items.len()));
            }
            if let Some(max) = schema["maxItems"].as_u64().filter(|&m| items.len() as u64 > m) {
                fail(format!("has {} items, more than {max}", items.len()));
            }
            for (i, item) in items.iter().enumerate() {
                structure(&schema["items"], item, &format!("{path}[{i}]"), found);
            }
        }
        Some("string") => {
            let Some(text) = value.as_str() else { return fail(format!("{value} is not a string")) };
            let chars = text.chars().count() as u64;
            if let Some(min) = schema["minLength"].as_u64().filter(|&m| chars < m) {
                fail(format!("{value} is shorter than {min} characters"));
            }
            if let Some(max) = schema["maxLength"].as_u64().filter(|&m| chars > m) {
                fail(format!("{value} is longer than {max} characters"));
            }
            if let Some(pattern) = schema["pattern"].as_str() {
                match regex::Regex::new(pattern) {
                    Ok(re) if re.is_match(text) => {}
                    Ok(_) => fail(format!("{value} does not match {pattern:?}")),
                    Err(e) => fail(format!("pattern {pattern:?} does not compile: {e}")),
                }
            }
        }
        Some(kind @ ("integer" | "number")) => {
            let Some(number) = value.as_f64() else { return fail(format!("{value} is not a number")) };
            if kind == "integer" && !(value.is_i64() || value.is_u64()) {
                return fail(format!("{value} is not an integer"));
            }
            let (low, high) = match schema["format"].as_str() {
                Some("int32") => (f64::from(i32::MIN), f64::from(i32::MAX)),
                _ => (f64::MIN, f64::MAX),
            };
            let minimum = schema["minimum"].as_f64().map_or(low, |m| m.max(low));
            let maximum = schema["maximum"].as_f64().map_or(high, |m| m.min(high));
            if number < minimum {
                fail(format!("{value} is less than {minimum}"));
            } else if number > maximum {
                fail(format!("{value} is more than {maximum}"));
            }
        }
        Some("boolean") if !value.is_boolean() => fail(format!("{value} is not a boolean")),
        _ => {}
    }
}

/// The CEL rules of `schema` and of every schema below it, on `value`.
fn rules(schema: &Value, value: &Value, path: &str, found: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let source = rule["rule"].as_str().unwrap_or_default();
        let message = rule["message"].as_str().map_or_else(|| format!("failed rule: {source}"), String::from);
        match evaluate(source, value) {
            Ok(true) => {}
            Ok(false) => found.push(format!("{path}: {message}")),
            Err(e) => found.push(format!("{path}: rule {source:?} cannot be evaluated: {e}")),
        }
    }
    match value {
        Value::Object(object) => {
            for (key, field) in object {
                let property = match &schema["properties"][key] {
                    Value::Null => &schema["additionalProperties"],
                    property => property,
                };
                rules(property, field, &format!("{path}.{key}"), found);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                rules(&schema["items"], item, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

fn evaluate(source: &str, value: &Value) -> Result<bool, String> {
    let program = cel_interpreter::Program::compile(source).map_err(|e| e.to_string())?;
    let mut context = cel_interpreter::Context::default();
    context.add_variable("self", value).map_err(|e| e.to_string())?;
    match program.execute(&context).map_err(|e| e.to_string())? {
        cel_interpreter::Value::Bool(b) => Ok(b),
        other => Err(format!("gave {other:?}, not a bool")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(spec: Value) -> Value {
        json!({"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"}, "spec": spec})
    }

    fn tiny(extra: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut spec = json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}});
        extra(&mut spec);
        violations(&manifest(spec))
    }

    #[test]
    fn a_valid_manifest_passes_and_every_example_does() {
        assert_eq!(tiny(|_| {}), Vec::<String>::new());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value: Value = serde::Deserialize::deserialize(document).unwrap();
                if value["kind"] == "ModelDeployment" {
                    assert_eq!(violations(&value), Vec::<String>::new(), "{value}");
                }
            }
        }
    }

    #[test]
    fn what_the_schema_refuses_is_refused_with_its_path() {
        let one = |edit: fn(&mut Value)| tiny(edit).join("; ");
        let got = one(|s| s["router"] = json!({"grpcPort": 70000}));
        assert!(got.starts_with("spec.router.grpcPort: 70000 is more than 65535"), "{got}");
        let got = one(|s| s["router"] = json!({"grpcport": 50051}));
        assert!(got.starts_with("spec.router.grpcport: unknown field"), "{got}");
        let got = one(|s| s["workers"]["replicas"] = json!("2"));
        assert!(got.contains("spec.workers.replicas: \"2\" is not"), "{got}");
        let got = one(|s| s["workers"]["replicas"] = json!(1.5));
        assert!(got.contains("not an integer"), "{got}");
        let got = one(|s| s["transport"] = json!("udp"));
        assert!(got.contains("spec.transport: \"udp\" is not one of"), "{got}");
        let got = one(|s| s.as_object_mut().unwrap().remove("model").map(drop).unwrap());
        assert!(got.contains("spec.model: Required value"), "{got}");
        let got = one(|s| s["router"] = json!({"allowedFrom": []}));
        assert!(got.contains("spec.router.allowedFrom: has 0 items, fewer than 1"), "{got}");
        // Inside embedded Kubernetes types too.
        let got = one(|s| s["router"] = json!({"allowedFrom": [{"podSelectr": {}}]}));
        assert!(got.contains("spec.router.allowedFrom[0].podSelectr: unknown field"), "{got}");
    }

    #[test]
    fn the_crds_cel_rules_are_evaluated_on_the_defaulted_object() {
        let got = tiny(|s| s["router"] = json!({"httpPort": 50051})).join("; ");
        assert!(got.contains("router.grpcPort and router.httpPort must differ"), "{got}");
        // internalPort's default (50053) against a grpcPort set to it.
        let got = tiny(|s| s["router"] = json!({"grpcPort": 50053})).join("; ");
        assert!(got.contains("router.internalPort must differ"), "{got}");
        let got = tiny(|s| s["balancing"] = json!({"interval": "10m", "window": "1m"})).join("; ");
        assert!(got.starts_with("spec.balancing: "), "{got}");
        let got = tiny(|s| s["scheduling"] = json!({"gang": true})).join("; ");
        assert!(got.starts_with("spec.scheduling: "), "{got}");
        assert_eq!(
            tiny(|s| s["scheduling"] = json!({"gang": true, "schedulerName": "volcano"})),
            Vec::<String>::new()
        );
        // The health port's default (50059) against a worker port set to it; tls is optional.
        let got = tiny(|s| {
            s["tls"] = json!({"secretName": "c"});
            s["workers"]["port"] = json!(50059);
        })
        .join("; ");
        assert!(got.contains("tls.healthPort must differ"), "{got}");
        assert_eq!(tiny(|s| s["tls"] = json!({"secretName": "c"})), Vec::<String>::new());
        let got = tiny(|s| s["tls"] = json!({"healthPort": 9000})).join("; ");
        assert!(got.contains("spec.tls.secretName: Required value"), "{got}");
    }
}
