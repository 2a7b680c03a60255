//! The routers and workers of one deployment as gRPC clients: how the rebalance loop
//! ([`kubemoe_placement::rebalance`]) reaches them, in the operator and in `kubemoe up`.

use crate::auth::{Bearer, Internal};
use crate::expert::balancer_client::BalancerClient;
use crate::expert::expert_client::ExpertClient;
use crate::expert::{CommitRequest, InfoRequest, LoadProgress, LoadRequest, PrepareRequest, ReleaseRequest};
use kubemoe_placement::rebalance::{RouterLoad, Servers};
use kubemoe_placement::{Error, PlacementPlan, Result};
use std::time::Duration;

/// How long each step of a migration may take on one server. Prepare reads expert weights (a
/// V3 worker's share is tens of GiB from a volume); commit waits for one step of the router.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);
const PREPARE_DEADLINE: Duration = Duration::from_secs(30 * 60);
const COMMIT_DEADLINE: Duration = Duration::from_secs(120);
const RELEASE_DEADLINE: Duration = Duration::from_secs(120);

/// Workers in rank order and routers (their internal ports), each with its URL for messages.
pub struct Cluster {
    workers: Vec<(String, ExpertClient<Internal>)>,
    routers: Vec<(String, BalancerClient<Internal>)>,
}

impl Cluster {
    /// Workers in rank order and routers' internal ports, as `host:port` or URLs, called with
    /// the deployment's internal credential (over TLS when `tls` is given); connects lazily. A URL that is not one fails with
    /// [`Error::Call`] naming it (step `connect`).
    pub fn new(
        workers: &[String],
        routers: &[String],
        credential: &Bearer,
        tls: Option<&crate::tls::Client>,
    ) -> Result<Self> {
        let max = crate::MAX_MESSAGE_BYTES;
        let channel = |url: &String| {
            crate::channel(url, tls).map_err(|source| Error::Call {
                step: "connect",
                target: url.clone(),
                source: Box::new(source),
            })
        };
        Ok(Cluster {
            workers: workers
                .iter()
                .map(|u| {
                    Ok((
                        u.clone(),
                        ExpertClient::with_interceptor(channel(u)?, credential.clone())
                            .max_decoding_message_size(max),
                    ))
                })
                .collect::<Result<_>>()?,
            routers: routers
                .iter()
                .map(|u| {
                    Ok((
                        u.clone(),
                        BalancerClient::with_interceptor(channel(u)?, credential.clone())
                            .max_decoding_message_size(max),
                    ))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// How far each worker that is loading its weights has got (`Info`), in rank order; a worker
    /// that serves, does not answer within `deadline` or fails is left out (not loading, or
    /// nothing to say).
    pub async fn loading(&self, deadline: Duration) -> Vec<LoadProgress> {
        let asked = self.workers.iter().map(|(_, client)| {
            let mut client = client.clone();
            async move { tokio::time::timeout(deadline, client.info(InfoRequest {})).await }
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .filter_map(|answer| answer.ok()?.ok()?.into_inner().loading)
            .collect()
    }

    /// The workers whose rank is not in `down`.
    fn live<'a>(&'a self, down: &'a [u32]) -> impl Iterator<Item = &'a (String, ExpertClient<Internal>)> {
        self.workers.iter().enumerate().filter(|(rank, _)| !down.contains(&(*rank as u32))).map(|(_, w)| w)
    }
}

impl Servers for Cluster {
    async fn loads(&self) -> Result<Vec<RouterLoad>> {
        let mut loads = Vec::with_capacity(self.routers.len());
        for (url, client) in &self.routers {
            let reply = call("load", url, LOAD_DEADLINE, client.clone().load(LoadRequest {})).await?;
            let plan = reply
                .plan
                .ok_or_else(|| Error::Routers(format!("router {url} reported no plan")))
                .and_then(PlacementPlan::try_from)?;
            let tokens = reply.layers.iter().map(|l| l.tokens.iter().map(|&t| t as f64).collect()).collect();
            loads.push(RouterLoad { router: url.clone(), plan, tokens, down: reply.workers_down });
        }
        Ok(loads)
    }

    async fn prepare(&self, plan: &PlacementPlan, down: &[u32]) -> Result<()> {
        let wire = crate::expert::Plan::from(plan);
        let prepares = self.live(down).map(|(url, c)| {
            let (request, mut c) = (PrepareRequest { plan: Some(wire.clone()) }, c.clone());
            async move { call("prepare", url, PREPARE_DEADLINE, c.prepare(request)).await }
        });
        first_error(futures::future::join_all(prepares).await)
    }

    async fn commit(&self, plan: &PlacementPlan) -> Result<()> {
        let wire = crate::expert::Plan::from(plan);
        // The plan's workers, so that routers reach ranks a resize added.
        let workers: Vec<String> =
            self.workers.iter().take(plan.workers as usize).map(|(u, _)| u.clone()).collect();
        if workers.len() < plan.workers as usize {
            return Err(Error::Routers(format!(
                "plan epoch {} names {} workers, this deployment reaches {}",
                plan.epoch,
                plan.workers,
                workers.len()
            )));
        }
        for (url, c) in &self.routers {
            let request = CommitRequest { plan: Some(wire.clone()), workers: workers.clone() };
            call("commit", url, COMMIT_DEADLINE, c.clone().commit(request)).await?;
        }
        Ok(())
    }

    async fn release(&self, epoch: u64, down: &[u32]) -> Result<()> {
        let releases = self.live(down).map(|(url, c)| {
            let mut c = c.clone();
            async move { call("release", url, RELEASE_DEADLINE, c.release(ReleaseRequest { epoch })).await }
        });
        first_error(futures::future::join_all(releases).await)
    }
}

/// One call to `target` under `deadline`.
async fn call<T>(
    step: &'static str,
    target: &str,
    deadline: Duration,
    reply: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    let status = match tokio::time::timeout(deadline, reply).await {
        Ok(Ok(r)) => return Ok(r.into_inner()),
        Ok(Err(status)) => status,
        Err(_) => tonic::Status::deadline_exceeded(format!("no answer in {deadline:?}")),
    };
    Err(Error::Call { step, target: target.to_string(), source: Box::new(status) })
}

fn first_error<T>(results: Vec<Result<T>>) -> Result<()> {
    results.into_iter().find_map(Result::err).map_or(Ok(()), Err)
}
