#![allow(clippy::unwrap_used)]
//! Leader election through kube-rs's mock service: one replica takes the Lease, another waits
//! until it expires, and the first then finds it lost.

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use kubemoe_operator::http::Metrics;
use kubemoe_operator::leader::{Elector, LeaseConfig};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/kubemoe-operator";

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "kubemoe-operator".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(100),
    }
}

fn holder(api: &support::FakeApi) -> (String, i32) {
    let spec = api.object::<Lease>(LEASE).spec.unwrap();
    (spec.holder_identity.unwrap(), spec.lease_transitions.unwrap())
}

#[tokio::test]
async fn a_second_replica_takes_over_only_after_the_lease_expires() {
    let (client, api) = support::client();
    let shutdown = CancellationToken::new();
    let metrics_a = Metrics::default();
    let a = Elector::new(client.clone(), config("a"));
    assert!(a.acquire(&metrics_a, &shutdown).await.unwrap());
    assert_eq!(metrics_a.leader.get(), 1);
    assert_eq!(holder(&api), ("a".to_string(), 0));

    // "a" stops renewing, as a crashed leader would; "b" waits for the lease to expire.
    let b = Elector::new(client.clone(), config("b"));
    let b_shutdown = shutdown.clone();
    let waiting = tokio::spawn(async move { b.acquire(&Metrics::default(), &b_shutdown).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "b must not take a live lease");
    assert_eq!(holder(&api).0, "a");
    let took = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap().unwrap();
    assert!(took);
    assert_eq!(holder(&api), ("b".to_string(), 1));

    // "a" comes back and finds the lease lost: it must stop reconciling.
    let lost = a.hold(&metrics_a, &shutdown).await.unwrap_err();
    assert!(matches!(lost, kubemoe_operator::Error::LeaseLost { .. }), "{lost}");
    assert_eq!(metrics_a.leader.get(), 0);
}

#[tokio::test]
async fn acquiring_stops_at_shutdown() {
    let (client, _api) = support::client();
    let shutdown = CancellationToken::new();
    let a = Elector::new(client.clone(), config("a"));
    assert!(a.acquire(&Metrics::default(), &shutdown).await.unwrap());
    let b = Elector::new(client, config("b"));
    shutdown.cancel();
    assert!(!b.acquire(&Metrics::default(), &shutdown).await.unwrap(), "shut down while waiting");
}
