//! Load-driven expert rebalancing (DESIGN §4): poll the routers' expert load, decide whether
//! the placement should change, and migrate live.
//!
//! [`decide`] is pure: imbalance (max / mean tokens per worker, token-weighted over the MoE
//! layers, 1.0 is perfect) above `balancing.imbalanceThreshold`, outside the cooldown, gives a
//! plan from the incremental planner that moves at most `maxExpertsMovedPerRebalance` expert
//! copies, at the next epoch. [`Cluster::migrate`] carries it out without failing a request:
//! every worker loads the new epoch's experts while serving the old ones (`Prepare`); only
//! when all have, every router switches between two steps (`Commit`, which answers once no
//! step routes by the old plan); then workers drop what the new epoch does not use
//! (`Release`). A failed prepare rolls the workers back; routers never see the new plan.
//! [`Cluster::finish`], the commit and release half on its own, is idempotent for a plan already
//! committed or in force, which is how an interrupted migration is finished or rolled back.
//!
//! `kubemoe up` and the operator both run this; the operator ([`crate::rebalancer`]) also
//! records each rebalance in the placement ConfigMap, the status and events.

use kubemoe_api::deployment::{parse_duration, BalancingSpec};
use kubemoe_api::expert::balancer_client::BalancerClient;
use kubemoe_api::expert::expert_client::ExpertClient;
use kubemoe_api::expert::{CommitRequest, LoadRequest, PrepareRequest, ReleaseRequest};
use kubemoe_api::placement::PlacementPlan;
use kubemoe_api::planner::{self, Problem};
use std::time::Duration;
use tonic::transport::Channel;

// The crate's error, under the name `kubemoe up` knows it by.
pub use crate::{Error, Result};

/// `spec.balancing`, parsed, and the shape of the placement problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub interval: Duration,
    pub threshold: f64,
    pub cooldown: Duration,
    pub max_moves: usize,
    /// Expert groups (`n_group`) and nodes for the planner's hierarchical mode.
    pub groups: usize,
    pub nodes: usize,
}

impl Policy {
    pub fn new(spec: &BalancingSpec, groups: usize, nodes: usize) -> Result<Self> {
        let duration = |field: &str, text: &str| parse_duration(field, text).map_err(Error::Balancing);
        Ok(Policy {
            interval: duration("balancing.interval", &spec.interval)?,
            cooldown: duration("balancing.cooldown", &spec.cooldown)?,
            threshold: spec.imbalance_threshold,
            max_moves: spec.max_experts_moved_per_rebalance.max(0) as usize,
            groups: groups.max(1),
            nodes: nodes.max(1),
        })
    }
}

/// What [`decide`] concluded.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Keep the placement; `imbalance` is `None` when there was no load to judge.
    Keep {
        imbalance: Option<f64>,
        reason: &'static str,
    },
    Rebalance(Proposal),
}

/// A new placement and what it should achieve on the measured load.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub plan: PlacementPlan,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub moved: usize,
}

/// Max over mean tokens per worker of `phy_to_log` under `loads` (1.0 is perfect).
pub fn imbalance(loads: &[Vec<f64>], phy_to_log: &[Vec<u32>], slots_per_worker: usize) -> f64 {
    1.0 / planner::balance(loads, phy_to_log, slots_per_worker).overall.max(f64::MIN_POSITIVE)
}

/// Whether and how to rebalance `plan` under `loads` (tokens per logical expert of each of the
/// plan's layers), `since_last` after the previous rebalance (`None`: never).
pub fn decide(
    policy: &Policy,
    plan: &PlacementPlan,
    loads: &[Vec<f64>],
    since_last: Option<Duration>,
) -> Result<Decision> {
    if loads.iter().flatten().sum::<f64>() <= 0.0 {
        return Ok(Decision::Keep { imbalance: None, reason: "no load measured yet" });
    }
    let s = plan.slots_per_worker as usize;
    let current = plan.phy_to_log();
    let before = imbalance(loads, &current, s);
    if before <= policy.threshold {
        return Ok(Decision::Keep { imbalance: Some(before), reason: "balanced" });
    }
    if since_last.is_some_and(|t| t < policy.cooldown) {
        return Ok(Decision::Keep { imbalance: Some(before), reason: "cooling down" });
    }
    let problem = Problem {
        workers: plan.workers as usize,
        nodes: policy.nodes,
        groups: policy.groups,
        slots_per_worker: s,
    };
    let next = planner::incremental(loads, &current, &problem, policy.max_moves).map_err(Error::Plan)?;
    let after = imbalance(loads, &next, s);
    let moved = planner::moved(&current, &next);
    if moved == 0 || after >= before {
        return Ok(Decision::Keep {
            imbalance: Some(before),
            reason: "no better placement within the move budget",
        });
    }
    Ok(Decision::Rebalance(Proposal {
        plan: plan.with_slots(plan.epoch + 1, next),
        imbalance_before: before,
        imbalance_after: after,
        moved,
    }))
}

/// The routers and workers of one deployment, as gRPC clients.
pub struct Cluster {
    workers: Vec<(String, ExpertClient<Channel>)>,
    routers: Vec<(String, BalancerClient<Channel>)>,
}

/// Largest placement message (a V3-sized plan is a few hundred KiB).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl Cluster {
    /// Workers in rank order and routers, as `host:port` or URLs; connects lazily.
    pub fn new(workers: &[String], routers: &[String]) -> Result<Self> {
        let channel = |url: &String| {
            kubemoe_api::channel(url)
                .map(|c| (url.clone(), c))
                .map_err(|source| Error::Connect { url: url.clone(), source })
        };
        Ok(Cluster {
            workers: workers
                .iter()
                .map(|u| {
                    channel(u)
                        .map(|(u, c)| (u, ExpertClient::new(c).max_decoding_message_size(MAX_MESSAGE_BYTES)))
                })
                .collect::<Result<_>>()?,
            routers: routers
                .iter()
                .map(|u| {
                    channel(u).map(|(u, c)| {
                        (u, BalancerClient::new(c).max_decoding_message_size(MAX_MESSAGE_BYTES))
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The routers' summed load (tokens per logical expert of each layer of the plan) and the
    /// plan they route by; fails unless they all route by the same epoch.
    pub async fn load(&self) -> Result<(Vec<Vec<f64>>, PlacementPlan)> {
        let mut total: Option<(Vec<Vec<f64>>, PlacementPlan)> = None;
        for (url, client) in &self.routers {
            let reply = call("load", url, LOAD_DEADLINE, client.clone().load(LoadRequest {})).await?;
            let plan = reply
                .plan
                .ok_or_else(|| Error::Routers(format!("router {url} reported no plan")))
                .and_then(|p| PlacementPlan::try_from(p).map_err(Error::Plan))?;
            let loads: Vec<Vec<f64>> =
                reply.layers.iter().map(|l| l.tokens.iter().map(|&t| t as f64).collect()).collect();
            match &mut total {
                None => total = Some((loads, plan)),
                Some((sum, first)) => {
                    if plan.epoch != first.epoch {
                        return Err(Error::Unfinished {
                            router: url.clone(),
                            epoch: plan.epoch,
                            other: first.epoch,
                        });
                    }
                    for (s, l) in sum.iter_mut().zip(&loads) {
                        s.iter_mut().zip(l).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        total.ok_or_else(|| {
            Error::Routers(
                "no router to poll: no router pod is running with an IP; check the router Deployment".into(),
            )
        })
    }

    /// Moves every worker and router from epoch `from` to `plan` (see the module docs).
    pub async fn migrate(&self, plan: &PlacementPlan, from: u64) -> Result<()> {
        self.prepare(plan, from).await?;
        self.finish(plan).await
    }

    /// Has every worker load what `plan` places on it, next to what it serves; on failure, the
    /// workers that did drop it again (back to epoch `from`).
    pub async fn prepare(&self, plan: &PlacementPlan, from: u64) -> Result<()> {
        if let Err(err) = self.prepare_all(plan).await {
            // Workers that prepared drop the new experts again; nothing routes to them yet. The
            // prepare's error is the one to report; a failed release shows at the next settle.
            self.release(from).await.ok();
            return Err(err);
        }
        Ok(())
    }

    /// Makes sure every worker holds `plan` (a no-op where it is prepared or in force already,
    /// a catch-up for a worker that restarted meanwhile), routes every router by it, then puts
    /// it in force on every worker (dropping what it does not place there).
    pub async fn finish(&self, plan: &PlacementPlan) -> Result<()> {
        self.prepare_all(plan).await?;
        let wire = kubemoe_api::expert::Plan::from(plan);
        for (url, c) in &self.routers {
            let request = CommitRequest { plan: Some(wire.clone()) };
            call("commit", url, COMMIT_DEADLINE, c.clone().commit(request)).await?;
        }
        self.release(plan.epoch).await
    }

    async fn prepare_all(&self, plan: &PlacementPlan) -> Result<()> {
        let wire = kubemoe_api::expert::Plan::from(plan);
        let prepares = self.workers.iter().map(|(url, c)| {
            let (request, mut c) = (PrepareRequest { plan: Some(wire.clone()) }, c.clone());
            async move { call("prepare", url, PREPARE_DEADLINE, c.prepare(request)).await }
        });
        first_error(futures::future::join_all(prepares).await)
    }

    /// Releases `epoch` on every worker, even past one that fails; reports the first failure.
    async fn release(&self, epoch: u64) -> Result<()> {
        let releases = self.workers.iter().map(|(url, c)| {
            let mut c = c.clone();
            async move { call("release", url, RELEASE_DEADLINE, c.release(ReleaseRequest { epoch })).await }
        });
        first_error(futures::future::join_all(releases).await)
    }
}

/// How long each step of a migration may take on one server. Prepare reads expert weights (a
/// V3 worker's share is tens of GiB from a volume); commit waits for one step of the router.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);
const PREPARE_DEADLINE: Duration = Duration::from_secs(30 * 60);
const COMMIT_DEADLINE: Duration = Duration::from_secs(120);
const RELEASE_DEADLINE: Duration = Duration::from_secs(120);

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
    Err(Error::Call { step, target: target.to_string(), source: status })
}

fn first_error<T>(results: Vec<Result<T>>) -> Result<()> {
    results.into_iter().find_map(Result::err).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&BalancingSpec { cooldown: "1m".into(), ..BalancingSpec::default() }, 1, 1).unwrap()
    }

    #[test]
    fn skewed_load_gives_a_better_plan_at_the_next_epoch_within_the_move_budget() {
        // 8 experts on 4 workers (2 slots each): experts 0 and 1, both on worker 0, are hot.
        let plan = PlacementPlan { epoch: 3, ..PlacementPlan::initial(4, 2, 8, &[1, 2]) };
        let loads = vec![vec![400.0, 300.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]; 2];
        let Decision::Rebalance(p) = decide(&policy(), &plan, &loads, None).unwrap() else { panic!() };
        assert_eq!(p.plan.epoch, 4);
        p.plan.validate_for(8, &[1, 2], 4).unwrap();
        assert!(p.imbalance_before > 2.5 && p.imbalance_after < p.imbalance_before, "{p:?}");
        assert!(p.moved > 0 && p.moved <= policy().max_moves);
        assert_eq!(p.moved, planner::moved(&plan.phy_to_log(), &p.plan.phy_to_log()));
        assert_eq!(p.imbalance_after, imbalance(&loads, &p.plan.phy_to_log(), 2));
    }

    #[test]
    fn balanced_idle_or_cooling_down_keeps_the_plan() {
        let plan = PlacementPlan::initial(4, 2, 8, &[1]);
        let even = vec![vec![10.0; 8]];
        let keep = |loads: &[Vec<f64>], since: Option<Duration>| match decide(&policy(), &plan, loads, since)
        {
            Ok(Decision::Keep { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(keep(&even, None), "balanced");
        assert_eq!(keep(&[vec![0.0; 8]], None), "no load measured yet");
        let hot = vec![vec![400.0, 300.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]];
        assert_eq!(keep(&hot, Some(Duration::from_secs(5))), "cooling down");
        assert!(matches!(
            decide(&policy(), &plan, &hot, Some(Duration::from_secs(61))),
            Ok(Decision::Rebalance(_))
        ));
    }

    #[test]
    fn bad_durations_name_the_field() {
        let spec = BalancingSpec { interval: "soon".into(), ..BalancingSpec::default() };
        let e = Policy::new(&spec, 1, 1).unwrap_err();
        let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(text.contains("balancing.interval"), "{text}");
    }
}
