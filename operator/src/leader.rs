//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run and exactly one reconciles.
//!
//! Every write carries the Lease's `resourceVersion`, so two replicas racing for an expired
//! lease cannot both win: the apiserver rejects the second write with 409 Conflict and that
//! replica reads again. The holder renews every `renew_every`; a holder that cannot renew
//! within `duration` of its last renewal stops (another replica may take over after the lease
//! expires). [`decide`] is the pure rule; [`Elector`] does the I/O.

use crate::http::Metrics;
use crate::{Error, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid after its last renewal.
    pub duration: Duration,
    /// How often the holder renews (well below `duration`).
    pub renew_every: Duration,
}

/// What a replica should do with the Lease it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it.
    Create,
    /// Ours, or expired: write ourselves as holder.
    Take { transition: bool },
    /// Someone else holds a live lease.
    Wait { holder: String },
}

/// The election rule.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else { return Decision::Create };
    let spec = lease.spec.as_ref();
    let holder = spec.and_then(|s| s.holder_identity.as_deref()).unwrap_or("");
    if holder == identity {
        return Decision::Take { transition: false };
    }
    let duration = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0);
    let renewed = spec.and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref())).map(|t| t.0);
    let live = !holder.is_empty()
        && renewed.is_some_and(|at| at + SignedDuration::from_secs(i64::from(duration)) > now);
    if live {
        Decision::Wait { holder: holder.to_string() }
    } else {
        Decision::Take { transition: true }
    }
}

/// The lease as held by `identity` at `now`, keeping the rest of `previous`.
pub fn held(previous: Option<&Lease>, config: &LeaseConfig, now: Timestamp, transition: bool) -> Lease {
    let old = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
    let transitions = old.lease_transitions.unwrap_or(0) + i32::from(transition && previous.is_some());
    Lease {
        metadata: previous.map(|l| l.metadata.clone()).unwrap_or_else(|| ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: if transition || old.acquire_time.is_none() {
                Some(MicroTime(now))
            } else {
                old.acquire_time
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..old
        }),
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Elector { api: Api::namespaced(client, &config.namespace), config }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// One read-decide-write round. Ok(true): we hold the lease now.
    async fn try_take(&self) -> Result<bool> {
        let action = format!("reading Lease {}", self.lease_name());
        let current =
            self.api.get_opt(&self.config.name).await.map_err(|source| Error::Kube { action, source })?;
        let now = Timestamp::now();
        let result = match decide(current.as_ref(), &self.config.identity, now) {
            Decision::Wait { holder } => {
                tracing::debug!(%holder, "lease held by another replica");
                return Ok(false);
            }
            Decision::Create => self
                .api
                .create(&PostParams::default(), &held(None, &self.config, now, true))
                .await
                .map(|_| ()),
            Decision::Take { transition } => {
                let lease = held(current.as_ref(), &self.config, now, transition);
                self.api.replace(&self.config.name, &PostParams::default(), &lease).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            // Another replica wrote first (create raced, or resourceVersion moved on).
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => {
                Err(Error::Kube { action: format!("writing Lease {}", self.lease_name()), source })
            }
        }
    }

    /// Waits until this replica holds the lease. Ok(false): shut down first.
    pub async fn acquire(&self, metrics: &Metrics, shutdown: &CancellationToken) -> Result<bool> {
        loop {
            match self.try_take().await {
                Ok(true) => {
                    metrics.api_reachable.store(true, Ordering::Relaxed);
                    metrics.leader.set(1);
                    return Ok(true);
                }
                Ok(false) => metrics.api_reachable.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "leader election round failed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
    }

    /// Renews until shutdown (Ok) or until the lease is lost or cannot be renewed in time (Err).
    pub async fn hold(&self, metrics: &Metrics, shutdown: &CancellationToken) -> Result<()> {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
            match self.try_take().await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => break,
                Err(e) => tracing::warn!(error = %e, "renewing the lease failed"),
            }
            if renewed.elapsed() >= self.config.duration {
                break;
            }
        }
        metrics.leader.set(0);
        Err(Error::LeaseLost { lease: self.lease_name() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: "kubemoe-operator".into(),
            namespace: "kubemoe-system".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected_until_it_expires() {
        assert_eq!(decide(None, "a", at(0)), Decision::Create);
        let lease = held(None, &config("a"), at(0), true);
        assert_eq!(decide(Some(&lease), "a", at(1)), Decision::Take { transition: false });
        assert_eq!(decide(Some(&lease), "b", at(14)), Decision::Wait { holder: "a".into() });
        assert_eq!(decide(Some(&lease), "b", at(15)), Decision::Take { transition: true });
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let first = held(None, &config("a"), at(0), true);
        assert_eq!(first.spec.as_ref().unwrap().lease_transitions, Some(0));
        let renewed = held(Some(&first), &config("a"), at(5), false);
        let spec = renewed.spec.as_ref().unwrap();
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(5))));
        let taken = held(Some(&renewed), &config("b"), at(30), true);
        let spec = taken.spec.as_ref().unwrap();
        assert_eq!((spec.holder_identity.as_deref(), spec.lease_transitions), (Some("b"), Some(1)));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(30))));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }
}
