//! A small in-memory apiserver behind kube-rs's mock service (tower-test), for reconcile tests
//! and the reconcile benchmark: GET, server-side apply (PATCH, with the `/status`
//! subresource), POST and PUT on object paths, every request logged.
//!
//! It keeps what the reconciler relies on (objects by path, resourceVersion, generation bumped
//! on spec changes, status kept across applies of the main resource, 409 Conflict for a status
//! write from an outdated read) and nothing else.

// Each test binary and the benchmark use a different part of it.
#![allow(dead_code)]

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub bytes: usize,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub requests: Vec<Recorded>,
    next_version: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// A client whose requests the returned fake answers.
pub fn client() -> (Client, FakeApi) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = FakeApi::default();
    let state = api.state.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let (status, reply) = {
                let mut state = state.lock().unwrap();
                state.requests.push(Recorded {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    bytes: bytes.len(),
                });
                state.serve(&parts.method, parts.uri.path(), &bytes)
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap();
            respond.send_response(response);
        }
    });
    (Client::new(service, "default"), api)
}

fn not_found(path: &str) -> (StatusCode, Value) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{path} not found"), "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, status)
}

fn conflict(path: &str) -> (StatusCode, Value) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{path} has changed since it was read"), "reason": "Conflict", "code": 409});
    (StatusCode::CONFLICT, status)
}

impl State {
    fn version(&mut self) -> String {
        self.next_version += 1;
        self.next_version.to_string()
    }

    fn serve(&mut self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(body).unwrap() };
        match *method {
            Method::GET => match self.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => not_found(path),
            },
            Method::PATCH => match path.strip_suffix("/status") {
                Some(parent) => {
                    let version = self.version();
                    let Some(object) = self.objects.get_mut(parent) else { return not_found(parent) };
                    let read = body["metadata"]["resourceVersion"].as_str();
                    if read.is_some_and(|read| Some(read) != object["metadata"]["resourceVersion"].as_str()) {
                        return conflict(parent);
                    }
                    object["status"] = body["status"].clone();
                    object["metadata"]["resourceVersion"] = version.into();
                    (StatusCode::OK, object.clone())
                }
                None => {
                    let object = self.store(path, body);
                    (StatusCode::OK, object)
                }
            },
            Method::PUT => {
                let object = self.store(path, body);
                (StatusCode::OK, object)
            }
            Method::POST => {
                let name = body["metadata"]["name"].as_str().map(str::to_string).unwrap_or_else(|| {
                    let prefix = body["metadata"]["generateName"].as_str().unwrap_or("object-").to_string();
                    format!("{prefix}{}", self.next_version)
                });
                let object = self.store(&format!("{path}/{name}"), body);
                (StatusCode::CREATED, object)
            }
            _ => (StatusCode::METHOD_NOT_ALLOWED, json!({"code": 405})),
        }
    }

    /// Stores `object` at `path` as the apiserver would after an apply or update.
    fn store(&mut self, path: &str, mut object: Value) -> Value {
        let version = self.version();
        let previous = self.objects.get(path);
        let generation = match previous {
            Some(p) if p["spec"] == object["spec"] => p["metadata"]["generation"].as_i64().unwrap_or(1),
            Some(p) => p["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
            None => 1,
        };
        let uid = previous
            .map_or_else(|| format!("uid-{version}"), |p| p["metadata"]["uid"].as_str().unwrap().into());
        if let Some(status) = previous.map(|p| p["status"].clone()).filter(|s| !s.is_null()) {
            object["status"] = status;
        }
        let metadata = &mut object["metadata"];
        metadata["uid"] = uid.into();
        metadata["resourceVersion"] = version.into();
        metadata["generation"] = generation.into();
        self.objects.insert(path.to_string(), object.clone());
        object
    }
}

impl FakeApi {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Puts an object in place as if a user had created it.
    pub fn insert(&self, path: &str, object: Value) {
        self.state().store(path, object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state().objects.get(path).cloned()
    }

    pub fn object<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        serde_json::from_value(self.get(path).unwrap_or_else(|| panic!("{path} missing"))).unwrap()
    }

    /// Sets the status of a stored object, as a workload controller would.
    pub fn set_status(&self, path: &str, status: Value) {
        let mut state = self.state();
        state.objects.get_mut(path).unwrap_or_else(|| panic!("{path} missing"))["status"] = status;
    }

    /// The writes since the last call, as `METHOD path`, and forgets all logged requests.
    pub fn take_writes(&self) -> Vec<String> {
        let requests = std::mem::take(&mut self.state().requests);
        requests.iter().filter(|r| r.is_write()).map(|r| format!("{} {}", r.method, r.path)).collect()
    }

    /// The logged requests, forgetting them.
    pub fn take_requests(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.state().requests)
    }

    /// Marks the worker StatefulSet and router Deployment of `name` rolled out with every pod
    /// ready, as their controllers would report it.
    pub fn mark_ready(&self, namespace: &str, name: &str) {
        let sts = format!("/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}-worker");
        let deployment = format!("/apis/apps/v1/namespaces/{namespace}/deployments/{name}-router");
        let (workers, generation) = self.replicas_and_generation(&sts);
        self.set_status(
            &sts,
            json!({"replicas": workers, "readyReplicas": workers, "updatedReplicas": workers,
                   "availableReplicas": workers, "currentRevision": "r1", "updateRevision": "r1",
                   "observedGeneration": generation}),
        );
        let (routers, generation) = self.replicas_and_generation(&deployment);
        self.set_status(
            &deployment,
            json!({"replicas": routers, "readyReplicas": routers, "updatedReplicas": routers,
                   "availableReplicas": routers, "observedGeneration": generation}),
        );
    }

    fn replicas_and_generation(&self, path: &str) -> (i64, i64) {
        let object = self.get(path).unwrap_or_else(|| panic!("{path} missing"));
        (object["spec"]["replicas"].as_i64().unwrap(), object["metadata"]["generation"].as_i64().unwrap())
    }
}

/// The `tiny` ModelDeployment in namespace `ml`, and what its reconciles and polls share.
pub const MD: &str = "/apis/kubemoe.io/v1alpha1/namespaces/ml/modeldeployments/tiny";
pub const PLACEMENT: &str = "/api/v1/namespaces/ml/configmaps/tiny-placement";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";
/// An event written (created, or patched as a series when it repeats), in [`World::writes`].
pub const EVENT: &str = "event";

/// The in-memory apiserver holding ModelDeployment `tiny` and the operator's context on it.
pub struct World {
    pub api: FakeApi,
    pub context: std::sync::Arc<kubemoe_operator::controller::Context>,
}

impl World {
    pub fn new(spec: Value) -> Self {
        let (client, api) = client();
        let md = json!({
            "apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": "ml"},
            "spec": spec,
        });
        api.insert(MD, md);
        let metrics = std::sync::Arc::new(kubemoe_operator::http::Metrics::default());
        let context = kubemoe_operator::controller::Context::new(
            client,
            "kubemoe:test".into(),
            "kubemoe-system".into(),
            metrics,
        );
        World { api, context }
    }

    pub fn md(&self) -> kubemoe_operator::deployment::ModelDeployment {
        self.api.object(MD)
    }

    /// Reconciles the stored ModelDeployment; returns the writes it made.
    pub async fn reconcile(&self) -> Vec<String> {
        self.api.take_writes();
        kubemoe_operator::controller::reconcile(std::sync::Arc::new(self.md()), self.context.clone())
            .await
            .unwrap();
        self.writes()
    }

    /// The writes since the last call, as `METHOD path`, with every event write as [`EVENT`].
    pub fn writes(&self) -> Vec<String> {
        let writes = self.api.take_writes();
        writes.into_iter().map(|w| if w.contains(EVENTS) { EVENT.to_string() } else { w }).collect()
    }

    /// (type, reason) of every event recorded, oldest first.
    pub fn events(&self) -> Vec<(String, String)> {
        let state = self.api.state();
        let mut events: Vec<&Value> =
            state.objects.iter().filter(|(path, _)| path.starts_with(EVENTS)).map(|(_, e)| e).collect();
        events.sort_by_key(|e| e["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap());
        events
            .iter()
            .map(|e| (e["type"].as_str().unwrap().into(), e["reason"].as_str().unwrap().into()))
            .collect()
    }

    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut md = self.api.get(MD).unwrap();
        f(&mut md["spec"]);
        self.api.insert(MD, md);
    }
}
