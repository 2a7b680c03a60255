//! Load-driven expert rebalancing: poll the routers' expert load, decide whether the placement
//! should change, and migrate live. [`poll`] is the one implementation; the operator runs it for
//! every deployment (recording in the placement ConfigMap, the status, events and metrics) and
//! `kubemoe up` for its one (recording in memory and printing). What differs is behind
//! [`Record`]; the servers are reached through [`Servers`] (gRPC, in `kubemoe-api`).
//!
//! [`decide`] is pure: imbalance (max / mean tokens per worker, token-weighted over the MoE
//! layers, 1.0 is perfect) above `balancing.imbalanceThreshold`, outside the cooldown, gives a
//! plan from the incremental planner that moves at most `maxExpertsMovedPerRebalance` expert
//! copies, at the next epoch.
//!
//! One rebalance from epoch N to N+1, in order:
//! 1. [`Record::rebalancing`] (operator: `Rebalancing=True`, event);
//! 2. every worker prepares N+1: loads the experts N+1 places on it, still serving N's; a failed
//!    prepare releases N again on every worker, and routers never see N+1;
//! 3. [`Record::store`] makes N+1 the plan of record (the placement ConfigMap);
//! 4. every router commits N+1 (switches between two of its steps);
//! 5. every worker releases: N+1 in force, N's experts that N+1 does not place there dropped;
//! 6. [`Record::rebalanced`] (operator: status `placement`, `Rebalancing=False`, event).
//!
//! Crash safety. Workers hold the union of N and N+1 from their prepare to their release, so
//! routers on either epoch are served meanwhile; a pod that (re)starts serves the plan of record,
//! and only that. A crash, a lost lease or a poll past its deadline during
//! - 1–2 leaves every pod routing by and serving N, and the record at N; some workers hold
//!   N+1's experts too. Safe: nothing routes by N+1.
//! - 3–4 leaves the record at N+1 and some or all routers at N: the one unsafe window, where a
//!   worker restarting would hold N+1's experts only while routers at N send it others. It spans
//!   one commit (milliseconds to a step), which is why the record is written after the slow
//!   prepare rather than before it; a router restarting reads N+1, which workers hold.
//! - 5 leaves routers and the record at N+1; workers not yet released hold the union.
//! - 6 leaves everything at N+1; only the recorded status lags.
//!
//! Whatever is left over is settled by the next poll before it judges load ([`triage`]): a
//! migration is known unfinished when the record says so ([`Record::unfinished`]) or the caller
//! saw one fail, and shows as a record that differs from what the routers route by, or as
//! routers that disagree. Record, routers and workers are then converged on one plan with
//! [`finish`], which is idempotent: the routers' plan when they agree (a record ahead of them is
//! put back and workers drop what they prepared; one behind them catches up; workers not yet
//! released are released), the record's N+1 when only some routers committed it (they cannot go
//! back). A failed migration is settled the same way at once, rather than an interval later.

use crate::layout::Layout;
use crate::plan::PlacementPlan;
use crate::planner::{self, Problem};
use crate::{error_chain, Error, Result};
use std::future::Future;
use std::time::Duration;

/// `balancing` of a deployment, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub interval: Duration,
    pub threshold: f64,
    pub cooldown: Duration,
    pub max_moves: usize,
}

impl Policy {
    /// From the manifest's `balancing` fields; a bad duration names its field.
    pub fn parse(interval: &str, cooldown: &str, threshold: f64, max_moves: i32) -> Result<Self> {
        Ok(Policy {
            interval: crate::parse_duration("balancing.interval", interval)?,
            cooldown: crate::parse_duration("balancing.cooldown", cooldown)?,
            threshold,
            max_moves: max_moves.max(0) as usize,
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
/// plan's layers), `since_last` after the previous rebalance or failed migration (`None`: never).
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
    // One node and no group packing: worker ranks are not pinned to nodes, so there is no node
    // level to keep groups on.
    let problem = Problem { workers: plan.workers as usize, nodes: 1, groups: 1, slots_per_worker: s };
    let next = planner::incremental(loads, &current, &problem, policy.max_moves)?;
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

/// One router's answer to a load poll.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterLoad {
    /// The router, for messages.
    pub router: String,
    /// The plan it routes by.
    pub plan: PlacementPlan,
    /// Tokens per logical expert of each layer of `plan`, over its load window.
    pub tokens: Vec<Vec<f64>>,
}

/// The routers and workers of one deployment, as the rebalance loop reaches them. Each call
/// covers every server of its kind and fails with [`Error::Call`] naming the first that failed.
pub trait Servers: Sync {
    /// Every router's load and plan.
    fn loads(&self) -> impl Future<Output = Result<Vec<RouterLoad>>> + Send;
    /// Every worker loads what `plan` places on it next to what it serves (a no-op where it is
    /// prepared or in force already).
    fn prepare(&self, plan: &PlacementPlan) -> impl Future<Output = Result<()>> + Send;
    /// Every router routes by `plan` from its next step; answers once none routes by the old one.
    fn commit(&self, plan: &PlacementPlan) -> impl Future<Output = Result<()>> + Send;
    /// Every worker puts `epoch` in force, dropping what it does not place there; goes on past
    /// a worker that fails.
    fn release(&self, epoch: u64) -> impl Future<Output = Result<()>> + Send;
}

/// Where the plan of record lives and how a rebalance is reported: the only part of [`poll`] that
/// differs between the operator and local mode.
pub trait Record: Sync {
    type Error: From<Error> + std::error::Error + Send + Sync + 'static;
    /// The plan pods start from (operator: the placement ConfigMap); `None` while there is none.
    fn stored(&self) -> impl Future<Output = Result<Option<PlacementPlan>, Self::Error>> + Send;
    /// Makes `plan` the plan of record.
    fn store(&self, plan: &PlacementPlan) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Whether the record says a migration started and did not finish.
    fn unfinished(&self) -> bool;
    /// Time since the last rebalance or failed migration (the cooldown runs from both: a
    /// migration failing for a lasting reason is not retried, reloading experts, every interval).
    fn since_last(&self) -> Option<Duration>;
    /// The load was judged and the placement kept.
    fn measured(&self, imbalance: f64) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A migration to `proposal` starts.
    fn rebalancing(&self, proposal: &Proposal) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The migration to `proposal` finished: its plan is in force everywhere.
    fn rebalanced(&self, proposal: &Proposal) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The migration to `epoch` failed with `error`.
    fn failed(&self, epoch: u64, error: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// What an unfinished migration left was converged on `plan`.
    fn settled(&self, plan: &PlacementPlan) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// What the routers route by, as one load poll found it.
#[derive(Clone, Debug, PartialEq)]
pub enum Routing {
    /// Every router routes by `plan`; `loads` are their summed token counts.
    Agreed { plan: PlacementPlan, loads: Vec<Vec<f64>> },
    /// Routers route by different epochs, `highest` the newest: a commit stopped midway.
    Split { highest: u64 },
}

impl Routing {
    /// Sums agreeing routers' loads; fails when there is no router.
    pub fn of(loads: Vec<RouterLoad>) -> Result<Routing> {
        let mut loads = loads.into_iter();
        let first = loads.next().ok_or_else(|| {
            Error::Routers(
                "no router to poll: no router is running with an address (on Kubernetes, check the \
                 router Deployment's pods)"
                    .into(),
            )
        })?;
        let (plan, mut sum) = (first.plan, first.tokens);
        let mut highest = None;
        for other in loads {
            if other.plan.epoch != plan.epoch {
                highest = Some(highest.unwrap_or(plan.epoch).max(other.plan.epoch));
                continue;
            }
            for (s, l) in sum.iter_mut().zip(&other.tokens) {
                s.iter_mut().zip(l).for_each(|(a, b)| *a += b);
            }
        }
        Ok(match highest {
            Some(highest) => Routing::Split { highest },
            None => Routing::Agreed { plan, loads: sum },
        })
    }
}

/// What a poll does after looking.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing is left over: judge `loads` under `plan`.
    Judge { plan: PlacementPlan, loads: Vec<Vec<f64>> },
    /// First converge the record, routers and workers on this plan.
    Settle(PlacementPlan),
}

/// The rule for left-overs (module docs): `stored` is the plan of record; `unsettled` says a
/// migration is known not to have finished.
pub fn triage(stored: &PlacementPlan, routing: Routing, unsettled: bool) -> Result<Next> {
    match routing {
        // Agreeing routers are what serves. A record ahead of them holds an epoch that no router
        // committed (a commit that stopped midway shows as split routers instead), so it is put
        // back to theirs, and workers drop what they prepared for it.
        Routing::Agreed { plan, .. } if unsettled || plan != *stored => Ok(Next::Settle(plan)),
        Routing::Agreed { plan, loads } => Ok(Next::Judge { plan, loads }),
        // Routers that committed cannot go back (commits only move forward): finish the epoch
        // the record got just before the commits.
        Routing::Split { highest } if highest == stored.epoch => Ok(Next::Settle(stored.clone())),
        Routing::Split { highest } => Err(Error::Routers(format!(
            "routers route by epochs up to {highest} while the plan of record is epoch {}; \
             not a migration of this rebalancer, nothing to settle",
            stored.epoch
        ))),
    }
}

/// What one poll did.
#[derive(Clone, Debug, PartialEq)]
pub enum Polled {
    /// Nothing to poll yet: no plan of record of the layout, or the routers do not route by the
    /// layout yet (a layout change is being rolled out).
    Waiting,
    Kept {
        imbalance: Option<f64>,
        reason: &'static str,
    },
    Rebalanced {
        epoch: u64,
    },
    /// The migration to `epoch` failed; `settled`: servers and record agree again.
    Failed {
        epoch: u64,
        settled: bool,
    },
    /// What an earlier migration left unfinished was settled at `epoch`.
    Settled {
        epoch: u64,
    },
}

/// Has every worker load what `plan` places on it; on failure, the workers that did drop it
/// again (back to epoch `from`) and the prepare's error is returned.
pub async fn prepare(servers: &impl Servers, plan: &PlacementPlan, from: u64) -> Result<()> {
    if let Err(err) = servers.prepare(plan).await {
        // Nothing routes to the new experts yet. The prepare's error is the one to report; a
        // failed release shows at the next settle.
        if let Err(release) = servers.release(from).await {
            tracing::warn!(error = %error_chain(&release), "releasing after a failed prepare");
        }
        return Err(err);
    }
    Ok(())
}

/// Makes sure every worker holds `plan` (a catch-up for a worker that restarted meanwhile),
/// routes every router by it, then puts it in force on every worker. Idempotent.
pub async fn finish(servers: &impl Servers, plan: &PlacementPlan) -> Result<()> {
    servers.prepare(plan).await?;
    servers.commit(plan).await?;
    servers.release(plan.epoch).await
}

/// One poll of a deployment whose expert layout is `layout`: settles what an earlier migration
/// left over, or judges the load and rebalances when [`decide`] says so. `unsettled`: the caller
/// saw a migration fail and not settle. Record and load poll failures are errors; a failed
/// migration is recorded and settled.
pub async fn poll<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    policy: &Policy,
    unsettled: bool,
) -> Result<Polled, R::Error> {
    let unsettled = unsettled || record.unfinished();
    let Some((stored, next)) = survey(record, servers, layout, unsettled).await? else {
        return Ok(Polled::Waiting);
    };
    // A layout change (workers, experts.redundant) is rolled out by restarting pods onto a new
    // plan of record. Nothing to judge or settle until the routers have it.
    let routed = match &next {
        Next::Settle(plan) | Next::Judge { plan, .. } => plan,
    };
    if !layout.fits(routed) {
        return Ok(Polled::Waiting);
    }
    let (current, loads) = match next {
        Next::Settle(plan) => {
            settle(record, servers, layout, &stored, &plan).await?;
            return Ok(Polled::Settled { epoch: plan.epoch });
        }
        Next::Judge { plan, loads } => (plan, loads),
    };
    let since_last = record.since_last();
    // The planner takes up to a second on V3-sized problems: off the async threads that also
    // serve health, renew leases and run the controller.
    let (p, plan) = (policy.clone(), current.clone());
    let decision = tokio::task::spawn_blocking(move || decide(&p, &plan, &loads, since_last))
        .await
        .map_err(Error::Planner)??;
    match decision {
        Decision::Keep { imbalance, reason } => {
            if let Some(imbalance) = imbalance {
                record.measured(imbalance).await?;
            }
            Ok(Polled::Kept { imbalance, reason })
        }
        Decision::Rebalance(proposal) => rebalance(record, servers, layout, current.epoch, proposal).await,
    }
}

/// Polls every `policy.interval` until `stop` completes, remembering a migration that failed
/// and did not settle: `kubemoe up`'s loop (the operator's polls many deployments).
pub async fn run<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    policy: &Policy,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut unsettled = false;
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(policy.interval) => {}
        }
        match poll(record, servers, layout, policy, unsettled).await {
            Ok(polled) => {
                tracing::debug!(?polled, "polled expert load");
                unsettled = matches!(polled, Polled::Failed { settled: false, .. });
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "rebalancer poll failed"),
        }
    }
}

/// The plan of record of `layout` and what to do next; `None` while there is none.
async fn survey<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    unsettled: bool,
) -> Result<Option<(PlacementPlan, Next)>, R::Error> {
    let Some(stored) = record.stored().await?.filter(|plan| layout.fits(plan)) else {
        return Ok(None);
    };
    let routing = Routing::of(servers.loads().await?)?;
    let next = triage(&stored, routing, unsettled)?;
    Ok(Some((stored, next)))
}

/// Converges the record (now holding `stored`), routers and workers on `plan`.
async fn settle<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    stored: &PlacementPlan,
    plan: &PlacementPlan,
) -> Result<(), R::Error> {
    plan.validate_for(layout.logical, &layout.moe_layers, layout.workers).map_err(|e| {
        Error::Routers(format!("the routers route by a placement that does not fit the spec: {e}"))
    })?;
    if plan != stored {
        record.store(plan).await?;
    }
    finish(servers, plan).await?;
    record.settled(plan).await
}

/// Migrates from epoch `from` to `proposal` in the order the module docs argue for.
async fn rebalance<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    from: u64,
    proposal: Proposal,
) -> Result<Polled, R::Error> {
    let plan = &proposal.plan;
    record.rebalancing(&proposal).await?;
    let migrated = async {
        prepare(servers, plan, from).await?;
        record.store(plan).await?;
        finish(servers, plan).await.map_err(R::Error::from)
    }
    .await;
    match migrated {
        Ok(()) => {
            record.rebalanced(&proposal).await?;
            Ok(Polled::Rebalanced { epoch: plan.epoch })
        }
        Err(error) => {
            record.failed(plan.epoch, &error_chain(&error)).await?;
            // At once rather than at the next poll: until then, a pod that restarts may read a
            // plan the routers do not route by.
            let settled = async {
                if let Some((stored, Next::Settle(back))) = survey(record, servers, layout, true).await? {
                    settle(record, servers, layout, &stored, &back).await?;
                }
                Ok::<_, R::Error>(())
            }
            .await;
            if let Err(e) = &settled {
                tracing::warn!(error = %error_chain(e), "cannot settle the failed migration yet");
            }
            Ok(Polled::Failed { epoch: plan.epoch, settled: settled.is_ok() })
        }
    }
}

/// Local mode's record (`kubemoe up`): the plan of record in memory (the placement file the
/// processes started from is not rewritten: a child that restarts is restarted by hand, with
/// the epoch printed last), and each step said as one line, as the operator records events.
pub struct Printed<F> {
    state: std::sync::Mutex<PrintedState>,
    say: F,
}

struct PrintedState {
    stored: PlacementPlan,
    last: Option<std::time::Instant>,
}

impl<F: Fn(String) + Sync> Printed<F> {
    /// Starts from `plan` (what the processes started from); `say` prints a line.
    pub fn new(plan: PlacementPlan, say: F) -> Self {
        Printed { state: std::sync::Mutex::new(PrintedState { stored: plan, last: None }), say }
    }

    fn with<T>(&self, f: impl FnOnce(&mut PrintedState) -> T) -> T {
        // A poisoned lock held plain data that is still consistent: every writer sets whole fields.
        f(&mut self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl<F: Fn(String) + Sync> Record for Printed<F> {
    type Error = Error;

    async fn stored(&self) -> Result<Option<PlacementPlan>> {
        Ok(Some(self.with(|s| s.stored.clone())))
    }

    async fn store(&self, plan: &PlacementPlan) -> Result<()> {
        self.with(|s| s.stored = plan.clone());
        Ok(())
    }

    fn unfinished(&self) -> bool {
        false
    }

    fn since_last(&self) -> Option<Duration> {
        self.with(|s| s.last.map(|t| t.elapsed()))
    }

    async fn measured(&self, imbalance: f64) -> Result<()> {
        tracing::debug!(imbalance, "expert load measured, placement kept");
        Ok(())
    }

    async fn rebalancing(&self, p: &Proposal) -> Result<()> {
        (self.say)(format!(
            "rebalancing to epoch {}: imbalance {:.3} -> {:.3}, moving {} experts",
            p.plan.epoch, p.imbalance_before, p.imbalance_after, p.moved
        ));
        Ok(())
    }

    async fn rebalanced(&self, p: &Proposal) -> Result<()> {
        self.with(|s| s.last = Some(std::time::Instant::now()));
        (self.say)(format!("placement epoch {} in force", p.plan.epoch));
        Ok(())
    }

    async fn failed(&self, epoch: u64, error: &str) -> Result<()> {
        self.with(|s| s.last = Some(std::time::Instant::now()));
        (self.say)(format!("migration to epoch {epoch} failed: {error}"));
        Ok(())
    }

    async fn settled(&self, plan: &PlacementPlan) -> Result<()> {
        (self.say)(format!("placement settled at epoch {}", plan.epoch));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
