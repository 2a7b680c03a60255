//! The loading poll: while a ModelDeployment has worker pods that are not ready, the operator
//! asks each of its workers how far it has got loading its weights (`Expert.Info`, which a
//! worker answers from its start) and writes the sum to `status.loading`, shown by `kubectl get
//! modeldeployments` as `Loading` (`37%`). DeepSeek-V3's experts take minutes to read; `Ready`
//! alone says nothing of how far they got, and a stalled load looks like a slow one.
//!
//! Only workers are asked: they hold the experts, nearly all of a model's bytes. A router's
//! progress is in its logs, its `/health` and its `/metrics`.
//!
//! [`due`] and [`summary`] are the rules; [`run`] polls every [`TICK`], apart from the
//! rebalancer's loop (a migration can hold that one for minutes). The status write carries
//! `resourceVersion` like every other ([`crate::status`]); the controller clears `loading` once
//! every worker is ready, and a poll that finds none loading clears it too.

use crate::controller::Context;
use crate::deployment::{LoadingStatus, ModelDeployment};
use crate::{desired, rebalancer, status, Result};
use kube::runtime::reflector::Store;
use kubemoe_api::expert::LoadProgress;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often deployments with workers not ready are polled.
pub const TICK: Duration = Duration::from_secs(5);
/// How long a worker may take to answer `Info`.
const DEADLINE: Duration = Duration::from_secs(2);

/// Whether `md`'s workers are polled now: it is not being deleted, and some of its workers are
/// not ready, or the status still says some are loading.
pub fn due(md: &ModelDeployment) -> bool {
    let Some(status) = md.status.as_ref() else { return false };
    let not_ready = status.workers.is_some_and(|w| w.ready < md.spec.workers.replicas);
    md.metadata.deletion_timestamp.is_none() && (not_ready || status.loading.is_some())
}

/// The status of the workers that answered loading (`None`: none did).
pub fn summary(loading: &[LoadProgress]) -> Option<LoadingStatus> {
    if loading.is_empty() {
        return None;
    }
    // Saturating: the numbers come from the pods.
    let loaded = loading.iter().fold(0u64, |sum, p| sum.saturating_add(p.loaded_bytes));
    let total = loading.iter().fold(0u64, |sum, p| sum.saturating_add(p.total_bytes));
    // Whole percent, rounded down: 100% only once all is read.
    let percent = (u128::from(loaded) * 100 / u128::from(total.max(1))).min(100);
    Some(LoadingStatus {
        workers: loading.len() as i32,
        loaded_bytes: loaded.min(i64::MAX as u64) as i64,
        total_bytes: total.min(i64::MAX as u64) as i64,
        progress: format!("{percent}%"),
    })
}

/// Polls every [`due`] deployment of `deployments` each [`TICK`] until `shutdown`.
pub async fn run(
    context: std::sync::Arc<Context>,
    deployments: Store<ModelDeployment>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        for md in deployments.state().iter().filter(|md| due(md)) {
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                polled = poll(&context, md) => polled,
            };
            if let Err(e) = polled {
                let object = crate::controller::key(md);
                tracing::warn!(%object, error = %kubemoe_placement::error_chain(&e), "loading poll failed");
            }
        }
    }
}

/// Asks `md`'s workers and records what they said.
async fn poll(context: &Context, md: &ModelDeployment) -> Result<()> {
    let workers = desired::worker_addresses(md, md.spec.workers.replicas.max(0) as u32);
    let Some(cluster) = rebalancer::cluster(context, md, &workers, &[]).await? else { return Ok(()) };
    record(context, md, &cluster).await?;
    Ok(())
}

/// Asks the workers of `cluster` and writes the [`summary`] as `md`'s `status.loading` when it
/// [`moved`] from what the status says; returns it.
pub async fn record(
    context: &Context,
    md: &ModelDeployment,
    cluster: &kubemoe_api::cluster::Cluster,
) -> Result<Option<LoadingStatus>> {
    let found = summary(&cluster.loading(DEADLINE).await);
    let shown = md.status.as_ref().and_then(|s| s.loading.as_ref());
    if moved(shown, found.as_ref()) {
        rebalancer::update_status(context, md, |md| status::loading(md, found.clone())).await?;
    }
    Ok(found)
}

/// Whether `found` is worth a status write over `shown`: other workers, another total, or
/// another whole percent. Bytes alone change at every poll, and each write costs the controller
/// a reconcile; a percent is what the column shows.
pub fn moved(shown: Option<&LoadingStatus>, found: Option<&LoadingStatus>) -> bool {
    let key = |s: Option<&LoadingStatus>| s.map(|s| (s.workers, s.total_bytes, s.progress.clone()));
    key(shown) != key(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_adds_up_the_workers_loading_and_says_100_only_when_all_is_read() {
        assert_eq!(summary(&[]), None);
        let p = |loaded_bytes, total_bytes| LoadProgress { loaded_bytes, total_bytes };
        let s = summary(&[p(1 << 30, 4 << 30), p(2 << 30, 4 << 30)]);
        let expected =
            LoadingStatus { workers: 2, loaded_bytes: 3 << 30, total_bytes: 8 << 30, progress: "37%".into() };
        assert_eq!(s, Some(expected));
        assert_eq!(summary(&[p(999, 1000)]).unwrap().progress, "99%");
        assert_eq!(summary(&[p(1000, 1000)]).unwrap().progress, "100%");
        // A worker that has not opened its shards yet (nothing to read so far).
        assert_eq!(summary(&[p(0, 0)]).unwrap().progress, "0%");
        assert_eq!(summary(&[p(u64::MAX, u64::MAX), p(1, 1)]).unwrap().loaded_bytes, i64::MAX);
    }

    #[test]
    fn a_write_is_worth_it_for_another_percent_total_or_worker_count_not_for_bytes_alone() {
        let p = |loaded_bytes, total_bytes| LoadProgress { loaded_bytes, total_bytes };
        let shown = summary(&[p(300, 1000)]);
        assert!(!moved(shown.as_ref(), summary(&[p(305, 1000)]).as_ref()));
        assert!(moved(shown.as_ref(), summary(&[p(310, 1000)]).as_ref()));
        assert!(moved(shown.as_ref(), summary(&[p(300, 1001)]).as_ref()));
        assert!(moved(shown.as_ref(), summary(&[p(300, 1000), p(0, 0)]).as_ref()));
        assert!(moved(shown.as_ref(), None));
        assert!(!moved(None, None));
    }
}
