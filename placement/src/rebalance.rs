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
//!
//! Workers down. Routers route around a worker that fails its dispatches (the replicas of its
//! experts on live workers serve them) and report it in their load. While any worker is down
//! the loop does not judge load; it makes a recovery epoch ([`recover`]) when some logical
//! expert has no copy on a live worker: each lost expert takes a live slot from an expert that
//! keeps another live copy, and the epoch goes through the same prepare, record, commit and
//! release, skipping the workers down (their slots do not change, so a worker that returns
//! holds what the new epoch places on it, whether it restarted from the record or only
//! stalled). What is still lost for want of spare slots, and which workers are down, is
//! reported with every poll ([`Record::degraded`]); a worker that is back rejoins the routing
//! at once and the load-driven rebalance evens the placement out again.
//!
//! Resize. The worker count (and the slot count) is the plan's, not the processes': workers
//! serve whatever rank the plan gives them (none past its workers), routers dispatch to every
//! rank the committed plan names (a commit carries the workers' URLs). So a changed
//! `workers.replicas` or `experts.redundant` is one more migration through the same steps,
//! to the plan [`reshape`] makes for the new layout, and no pod restarts: on a scale-up the
//! new workers are started first (holding nothing) and prepare their experts like the others;
//! on a scale-down the workers past the new count are prepared with nothing, so that after the
//! commit nothing routes to them and they can go. The caller (the operator's StatefulSet, `up`'s
//! children) keeps every worker of both plans until the new one is in force.

use crate::layout::Layout;
use crate::plan::PlacementPlan;
use crate::planner::{self, Problem};
use crate::{error_chain, Error, Result};
use std::future::Future;
use std::time::Duration;

/// `balancing` of a deployment, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `balancing.enabled`: whether load is judged and lost experts recovered. A resize
    /// ([`reshape`]) and the settling of an unfinished migration happen either way.
    pub enabled: bool,
    pub interval: Duration,
    pub threshold: f64,
    pub cooldown: Duration,
    pub max_moves: usize,
}

impl Policy {
    /// From the manifest's `balancing` fields; a bad duration names its field.
    pub fn parse(
        enabled: bool,
        interval: &str,
        cooldown: &str,
        threshold: f64,
        max_moves: i32,
    ) -> Result<Self> {
        Ok(Policy {
            enabled,
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
    /// For a recovery epoch, the workers down whose experts it places on live ones; empty for
    /// a rebalance of load.
    pub recovering: Vec<u32>,
    /// For a resize ([`reshape`]), the workers of the plan before.
    pub resized_from: Option<u32>,
}

/// The line local mode prints and the operator's `Rebalancing` condition says.
impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let epoch = self.plan.epoch;
        if let Some(from) = self.resized_from {
            return write!(
                f,
                "resizing to epoch {epoch}: {from} -> {} workers, {} slots each, loading {} experts; \
                 imbalance {:.3} -> {:.3}",
                self.plan.workers,
                self.plan.slots_per_worker,
                self.moved,
                self.imbalance_before,
                self.imbalance_after
            );
        }
        if self.recovering.is_empty() {
            return write!(
                f,
                "rebalancing to epoch {epoch}: imbalance {:.3} -> {:.3}, moving {} experts",
                self.imbalance_before, self.imbalance_after, self.moved
            );
        }
        let down: Vec<String> = self.recovering.iter().map(u32::to_string).collect();
        write!(
            f,
            "recovery epoch {epoch}: workers {} down; loading {} experts they alone held on live workers",
            down.join(", "),
            self.moved
        )
    }
}

/// Max over mean tokens per worker of `phy_to_log` under `loads` (1.0 is perfect).
pub fn imbalance(loads: &[Vec<f64>], phy_to_log: &[Vec<u32>], slots_per_worker: usize) -> f64 {
    1.0 / planner::balance(loads, phy_to_log, slots_per_worker).overall.max(f64::MIN_POSITIVE)
}

/// Whether and how to rebalance `plan` under `loads` (tokens per logical expert of each of the
/// plan's layers), `since_last` after the previous rebalance or failed migration (`None`: never),
/// with the workers in `down` routed around (module docs: only a recovery epoch then), every
/// expert kept on `min_replicas` distinct workers.
pub fn decide(
    policy: &Policy,
    plan: &PlacementPlan,
    loads: &[Vec<f64>],
    since_last: Option<Duration>,
    down: &[u32],
    min_replicas: u32,
) -> Result<Decision> {
    if !down.is_empty() {
        return Ok(recover(plan, loads, down));
    }
    let s = plan.slots_per_worker as usize;
    let current = plan.phy_to_log();
    // One node and no group packing: worker ranks are not pinned to nodes, so there is no node
    // level to keep groups on.
    let problem = Problem {
        workers: plan.workers as usize,
        nodes: 1,
        groups: 1,
        slots_per_worker: s,
        min_replicas: min_replicas as usize,
    };
    // A plan that keeps some expert on fewer workers (minReplicas was raised) is spread at
    // once, whatever the load says.
    if min_replicas > 1 {
        let experts = planner::check_problem(loads, &problem)?;
        planner::check_current(&current, loads.len(), experts, &problem)?;
        let spread = current
            .iter()
            .zip(loads)
            .map(|(layer, load)| planner::spread(layer.clone(), load, &problem))
            .collect::<Result<Vec<_>>>()?;
        if spread != current {
            return Ok(Decision::Rebalance(proposal(plan, loads, spread, Vec::new())));
        }
    }
    if loads.iter().flatten().sum::<f64>() <= 0.0 {
        return Ok(Decision::Keep { imbalance: None, reason: "no load measured yet" });
    }
    let before = imbalance(loads, &current, s);
    if before <= policy.threshold {
        return Ok(Decision::Keep { imbalance: Some(before), reason: "balanced" });
    }
    if since_last.is_some_and(|t| t < policy.cooldown) {
        return Ok(Decision::Keep { imbalance: Some(before), reason: "cooling down" });
    }
    let next = planner::incremental(loads, &current, &problem, policy.max_moves)?;
    let proposal = proposal(plan, loads, next, Vec::new());
    if proposal.moved == 0 || proposal.imbalance_after >= before {
        return Ok(Decision::Keep {
            imbalance: Some(before),
            reason: "no better placement within the move budget",
        });
    }
    Ok(Decision::Rebalance(proposal))
}

/// `next` as the epoch after `plan`, with what it does to the balance under `loads`.
fn proposal(plan: &PlacementPlan, loads: &[Vec<f64>], next: Vec<Vec<u32>>, recovering: Vec<u32>) -> Proposal {
    let (s, current) = (plan.slots_per_worker as usize, plan.phy_to_log());
    Proposal {
        imbalance_before: imbalance(loads, &current, s),
        imbalance_after: imbalance(loads, &next, s),
        moved: planner::moved(&current, &next),
        plan: plan.with_slots(plan.epoch + 1, next),
        recovering,
        resized_from: None,
    }
}

/// The plan of `layout` (another worker count or slot count than `plan`'s, for the same
/// model) that a live resize migrates to, at the epoch after `plan`'s. It starts from `plan`
/// cut to the new shape ([`seed`]: each rank that stays keeps its first slots, the experts
/// that lost their last slot fill the free ones, spare slots replicate the heaviest experts)
/// and balances that under `loads` (uniform while none was measured) with the incremental
/// planner, unbounded: as balanced as a fresh plan, moving few experts, every expert on
/// `layout.min_replicas` workers. New ranks start empty; ranks past the new count lose every
/// expert, so a scale-down moves their experts off before their pods go. Pure and
/// deterministic.
pub fn reshape(plan: &PlacementPlan, layout: &Layout, loads: &[Vec<f64>]) -> Result<Proposal> {
    let problem = Problem {
        workers: layout.workers as usize,
        nodes: 1,
        groups: 1,
        slots_per_worker: layout.slots_per_worker as usize,
        min_replicas: layout.min_replicas as usize,
    };
    let uniform;
    let loads = if loads.iter().flatten().sum::<f64>() > 0.0 {
        loads
    } else {
        uniform = vec![vec![1.0; plan.logical_experts as usize]; plan.layers.len()];
        &uniform
    };
    let (old_s, new_s) = (plan.slots_per_worker as usize, problem.slots_per_worker);
    let current: Vec<Vec<u32>> =
        plan.phy_to_log().iter().zip(loads).map(|(layer, load)| seed(layer, old_s, load, &problem)).collect();
    let next = planner::incremental(loads, &current, &problem, usize::MAX)?;
    // Copies each rank must load: its new experts it held no copy of before.
    let moved = plan
        .phy_to_log()
        .iter()
        .zip(&next)
        .map(|(old, new)| {
            new.chunks(new_s)
                .enumerate()
                .map(|(w, slots)| {
                    let had = old.get(w * old_s..(w + 1) * old_s).unwrap_or_default();
                    let mut wanted: Vec<u32> = slots.to_vec();
                    wanted.sort_unstable();
                    wanted.dedup();
                    wanted.iter().filter(|e| !had.contains(e)).count()
                })
                .sum::<usize>()
        })
        .sum();
    let reshaped = PlacementPlan {
        epoch: plan.epoch + 1,
        workers: layout.workers,
        slots_per_worker: layout.slots_per_worker,
        ..plan.with_slots(plan.epoch + 1, next.clone())
    };
    reshaped.validate_for(layout.logical, &layout.moe_layers)?;
    Ok(Proposal {
        imbalance_before: imbalance(loads, &plan.phy_to_log(), old_s),
        imbalance_after: imbalance(loads, &next, new_s),
        moved,
        plan: reshaped,
        recovering: Vec::new(),
        resized_from: Some(plan.workers),
    })
}

/// The recovery epoch for `plan` with the workers in `down` lost, when some logical expert has
/// no copy on a live worker and a live slot can take it. Per layer, the lost experts go
/// heaviest first (by `loads`, then id), each into a live slot of the expert that serves the
/// fewest tokens per live copy once it has one copy less (then lowest id), taking that
/// expert's highest live slot; an expert with one live copy is never taken from. Slots of the
/// workers down keep their experts. Pure and deterministic.
pub fn recover(plan: &PlacementPlan, loads: &[Vec<f64>], down: &[u32]) -> Decision {
    let s = plan.slots_per_worker.max(1) as usize;
    let current = plan.phy_to_log();
    let mut next = current.clone();
    let mut any_lost = false;
    for (l, slots) in next.iter_mut().enumerate() {
        let load = |e: u32| loads.get(l).and_then(|x| x.get(e as usize)).copied().unwrap_or(0.0);
        let live: Vec<usize> = (0..slots.len()).filter(|p| !down.contains(&((p / s) as u32))).collect();
        let mut copies = vec![0usize; plan.logical_experts as usize];
        live.iter().for_each(|&p| copies[slots[p] as usize] += 1);
        let mut lost: Vec<u32> = (0..copies.len() as u32).filter(|&e| copies[e as usize] == 0).collect();
        any_lost |= !lost.is_empty();
        lost.sort_by(|a, b| load(*b).total_cmp(&load(*a)).then(a.cmp(b)));
        for e in lost {
            let donor = (0..copies.len() as u32).filter(|&x| copies[x as usize] >= 2).min_by(|a, b| {
                let per_copy = |x: u32| load(x) / (copies[x as usize] - 1) as f64;
                per_copy(*a).total_cmp(&per_copy(*b)).then(a.cmp(b))
            });
            let Some(donor) = donor else { break };
            let Some(&p) = live.iter().rev().find(|&&p| slots[p] == donor) else { break };
            slots[p] = e;
            copies[donor as usize] -= 1;
            copies[e as usize] = 1;
        }
    }
    let moved = planner::moved(&current, &next);
    if moved == 0 {
        let reason = if any_lost {
            "workers down: no live slot is spare for the experts only they hold"
        } else {
            "workers down: every expert has a live copy; load is judged again once they are back"
        };
        return Decision::Keep { imbalance: None, reason };
    }
    Decision::Rebalance(proposal(plan, loads, next, down.to_vec()))
}

/// `layer` (slots of `old_s` per worker) cut to `p`'s shape as a valid placement: rank `w`'s
/// first slots kept where both shapes have them (a second copy of an expert counts as free),
/// then the experts left without a slot, then replicas of the heaviest experts (by `load`, then
/// id) in the slots still free.
fn seed(layer: &[u32], old_s: usize, load: &[f64], p: &Problem) -> Vec<u32> {
    const FREE: u32 = u32::MAX;
    let mut placed = vec![false; load.len()];
    let mut out = vec![FREE; p.slots()];
    for w in 0..p.workers {
        let old = layer.get(w * old_s..(w + 1) * old_s).unwrap_or_default();
        for (k, &e) in old.iter().take(p.slots_per_worker).enumerate() {
            if !std::mem::replace(&mut placed[e as usize], true) {
                out[w * p.slots_per_worker + k] = e;
            }
        }
    }
    let mut heaviest: Vec<u32> = (0..load.len() as u32).collect();
    heaviest.sort_by(|a, b| load[*b as usize].total_cmp(&load[*a as usize]).then(a.cmp(b)));
    let homeless = (0..load.len() as u32).filter(|&e| !placed[e as usize]);
    let mut fill = homeless.chain(heaviest.into_iter().cycle());
    for slot in out.iter_mut().filter(|s| **s == FREE) {
        *slot = fill.next().unwrap_or(0);
    }
    out
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
    /// Ranks of the workers it routes around.
    pub down: Vec<u32>,
}

/// The routers and workers of one deployment, as the rebalance loop reaches them. Each call
/// covers every server of its kind and fails with [`Error::Call`] naming the first that failed.
pub trait Servers: Sync {
    /// Every router's load and plan.
    fn loads(&self) -> impl Future<Output = Result<Vec<RouterLoad>>> + Send;
    /// Every worker but those in `down` loads what `plan` places on it next to what it serves
    /// (a no-op where it is prepared or in force already).
    fn prepare(&self, plan: &PlacementPlan, down: &[u32]) -> impl Future<Output = Result<()>> + Send;
    /// Every router routes by `plan` from its next step; answers once none routes by the old one.
    fn commit(&self, plan: &PlacementPlan) -> impl Future<Output = Result<()>> + Send;
    /// Every worker but those in `down` puts `epoch` in force, dropping what it does not place
    /// there; goes on past a worker that fails.
    fn release(&self, epoch: u64, down: &[u32]) -> impl Future<Output = Result<()>> + Send;
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
    /// The highest epoch [`Record::rebalancing`] was ever given: a new one is numbered above
    /// it, so that no epoch number names two plans (a migration put back leaves its epoch
    /// behind, prepared by some workers perhaps, but never reused).
    fn highest_epoch(&self) -> u64;
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
    /// Which workers are down and which experts have no live copy, after every poll that
    /// reached the routers (empty once every worker is back).
    fn degraded(&self, state: &Degraded) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Workers the routers route around, and the experts that leaves without a live copy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Degraded {
    /// Ranks of the workers some router marked down, ascending.
    pub down: Vec<u32>,
    /// Per MoE layer with a loss (its decoder layer id), the logical experts that only workers
    /// down hold, ascending.
    pub lost: Vec<(u32, Vec<u32>)>,
}

impl Degraded {
    /// What `down` costs under `plan`.
    pub fn of(plan: &PlacementPlan, down: Vec<u32>) -> Self {
        let s = plan.slots_per_worker.max(1) as usize;
        let lost = plan
            .layers
            .iter()
            .filter_map(|l| {
                let mut live = vec![false; plan.logical_experts as usize];
                for (p, &e) in l.slots.iter().enumerate() {
                    if !down.contains(&((p / s) as u32)) {
                        live[e as usize] = true;
                    }
                }
                let lost: Vec<u32> = (0..live.len() as u32).filter(|&e| !live[e as usize]).collect();
                (!lost.is_empty()).then_some((l.layer, lost))
            })
            .collect();
        Degraded { down, lost }
    }

    /// Experts without a live copy, over all layers.
    pub fn lost_experts(&self) -> usize {
        self.lost.iter().map(|(_, e)| e.len()).sum()
    }
}

impl std::fmt::Display for Degraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        if self.down.is_empty() {
            return write!(f, "every worker is up");
        }
        write!(f, "workers down: {}; ", list(&self.down))?;
        if self.lost.is_empty() {
            return write!(f, "every expert has a copy on a live worker");
        }
        let layers: Vec<String> = self.lost.iter().map(|(l, e)| format!("layer {l}: {}", list(e))).collect();
        write!(f, "experts with no live copy (requests needing them fail): {}", layers.join("; "))
    }
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
    /// Nothing to poll yet: no plan of record of the layout's model.
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

/// Has every worker but those `down` load what `plan` places on it; on failure, the workers
/// that did drop it again (back to epoch `from`) and the prepare's error is returned.
pub async fn prepare(servers: &impl Servers, plan: &PlacementPlan, from: u64, down: &[u32]) -> Result<()> {
    if let Err(err) = servers.prepare(plan, down).await {
        // Nothing routes to the new experts yet. The prepare's error is the one to report; a
        // failed release shows at the next settle.
        if let Err(release) = servers.release(from, down).await {
            tracing::warn!(error = %error_chain(&release), "releasing after a failed prepare");
        }
        return Err(err);
    }
    Ok(())
}

/// Makes sure every worker but those `down` holds `plan` (a catch-up for a worker that
/// restarted meanwhile), routes every router by it, then puts it in force on those workers.
/// Idempotent.
pub async fn finish(servers: &impl Servers, plan: &PlacementPlan, down: &[u32]) -> Result<()> {
    servers.prepare(plan, down).await?;
    servers.commit(plan).await?;
    servers.release(plan.epoch, down).await
}

/// One poll of a deployment whose expert layout is `layout`: settles what an earlier migration
/// left over, or judges the load and rebalances when [`decide`] says so; then reports the
/// workers down ([`Record::degraded`]). `unsettled`: the caller saw a migration fail and not
/// settle. Record and load poll failures are errors; a failed migration is recorded and settled.
pub async fn poll<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    policy: &Policy,
    unsettled: bool,
) -> Result<Polled, R::Error> {
    let unsettled = unsettled || record.unfinished();
    let Some(Survey { stored, next, down }) = survey(record, servers, layout, unsettled).await? else {
        return Ok(Polled::Waiting);
    };
    let (current, loads) = match next {
        Next::Settle(plan) => {
            settle(record, servers, layout, &stored, &plan, &down).await?;
            record.degraded(&Degraded::of(&plan, down)).await?;
            return Ok(Polled::Settled { epoch: plan.epoch });
        }
        Next::Judge { plan, loads } => (plan, loads),
    };
    // A resize (workers.replicas or experts.redundant changed) is migrated live like a
    // rebalance, once no worker that stays is down (those going may be: their experts move off).
    // The planners take up to a second on V3-sized problems: off the async threads that also
    // serve health, renew leases and run the controller.
    let resize = !layout.fits(&current) && down.iter().all(|&w| w >= layout.workers);
    let decision = if resize {
        let (plan, l) = (current.clone(), layout.clone());
        let reshaped = tokio::task::spawn_blocking(move || reshape(&plan, &l, &loads));
        Decision::Rebalance(reshaped.await.map_err(Error::Planner)??)
    } else if !policy.enabled {
        Decision::Keep { imbalance: None, reason: "balancing is disabled" }
    } else {
        let since_last = record.since_last();
        let (p, plan, d, m) = (policy.clone(), current.clone(), down.clone(), layout.min_replicas);
        tokio::task::spawn_blocking(move || decide(&p, &plan, &loads, since_last, &d, m))
            .await
            .map_err(Error::Planner)??
    };
    let (polled, in_force) = match decision {
        Decision::Keep { imbalance, reason } => {
            if let Some(imbalance) = imbalance {
                record.measured(imbalance).await?;
            }
            (Polled::Kept { imbalance, reason }, current)
        }
        Decision::Rebalance(mut proposal) => {
            proposal.plan.epoch = proposal.plan.epoch.max(record.highest_epoch() + 1);
            let next = proposal.plan.clone();
            let polled = rebalance(record, servers, layout, current.epoch, proposal, &down).await?;
            let in_force = if matches!(polled, Polled::Rebalanced { .. }) { next } else { current };
            (polled, in_force)
        }
    };
    // After a scale-down, the workers past the plan in force are none of its.
    let down = down.into_iter().filter(|&w| w < in_force.workers).collect();
    record.degraded(&Degraded::of(&in_force, down)).await?;
    Ok(polled)
}

/// What a look at the record and the routers found.
struct Survey {
    /// The plan of record.
    stored: PlacementPlan,
    next: Next,
    /// Workers some router routes around, ascending.
    down: Vec<u32>,
}

/// The plan of record of `layout` and what to do next; `None` while there is none.
async fn survey<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    unsettled: bool,
) -> Result<Option<Survey>, R::Error> {
    let Some(stored) = record.stored().await?.filter(|plan| layout.same_model(plan)) else {
        return Ok(None);
    };
    let loads = servers.loads().await?;
    // Ranks past the plan's workers name no worker: dropped, so a router cannot grow the list.
    let mut down: Vec<u32> =
        loads.iter().flat_map(|l| l.down.iter().copied()).filter(|&w| w < stored.workers).collect();
    down.sort_unstable();
    down.dedup();
    let next = triage(&stored, Routing::of(loads)?, unsettled)?;
    Ok(Some(Survey { stored, next, down }))
}

/// Converges the record (now holding `stored`), routers and workers but those `down` on `plan`.
async fn settle<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    stored: &PlacementPlan,
    plan: &PlacementPlan,
    down: &[u32],
) -> Result<(), R::Error> {
    plan.validate_for(layout.logical, &layout.moe_layers).map_err(|e| {
        Error::Routers(format!("the routers route by a placement that does not fit the spec: {e}"))
    })?;
    if plan != stored {
        record.store(plan).await?;
    }
    finish(servers, plan, down).await?;
    record.settled(plan).await
}

/// Migrates from epoch `from` to `proposal` in the order the module docs argue for, skipping
/// the workers `down`.
async fn rebalance<R: Record>(
    record: &R,
    servers: &impl Servers,
    layout: &Layout,
    from: u64,
    proposal: Proposal,
    down: &[u32],
) -> Result<Polled, R::Error> {
    let plan = &proposal.plan;
    record.rebalancing(&proposal).await?;
    let migrated = async {
        prepare(servers, plan, from, down).await?;
        record.store(plan).await?;
        finish(servers, plan, down).await.map_err(R::Error::from)
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
                if let Some(Survey { stored, next: Next::Settle(back), down }) =
                    survey(record, servers, layout, true).await?
                {
                    settle(record, servers, layout, &stored, &back, &down).await?;
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

/// Local mode's record (`kubemoe up`): the plan of record in memory and in the placement file
/// the processes start from (rewritten whole and renamed into place, so that a child `up`
/// restarts reads one plan or the other, never a mix), and each step said as one line, as the
/// operator records events.
pub struct Printed<F> {
    state: std::sync::Mutex<PrintedState>,
    file: std::path::PathBuf,
    say: F,
}

struct PrintedState {
    stored: PlacementPlan,
    last: Option<std::time::Instant>,
    degraded: Degraded,
    highest: u64,
}

impl<F: Fn(String) + Sync> Printed<F> {
    /// Starts from `plan`, which `file` holds (what the processes started from); `say` prints a
    /// line.
    pub fn new(plan: PlacementPlan, file: std::path::PathBuf, say: F) -> Self {
        Printed {
            state: std::sync::Mutex::new(PrintedState {
                highest: plan.epoch,
                stored: plan,
                last: None,
                degraded: Degraded::default(),
            }),
            file,
            say,
        }
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
        let written = serde_json::to_vec(plan).map_err(std::io::Error::from).and_then(|json| {
            let next = self.file.with_extension("next");
            std::fs::write(&next, json)?;
            std::fs::rename(&next, &self.file)
        });
        written.map_err(|source| Error::Write { path: self.file.display().to_string(), source })?;
        self.with(|s| s.stored = plan.clone());
        Ok(())
    }

    fn unfinished(&self) -> bool {
        false
    }

    fn since_last(&self) -> Option<Duration> {
        self.with(|s| s.last.map(|t| t.elapsed()))
    }

    fn highest_epoch(&self) -> u64 {
        self.with(|s| s.highest)
    }

    async fn measured(&self, imbalance: f64) -> Result<()> {
        tracing::debug!(imbalance, "expert load measured, placement kept");
        Ok(())
    }

    async fn rebalancing(&self, p: &Proposal) -> Result<()> {
        self.with(|s| s.highest = s.highest.max(p.plan.epoch));
        (self.say)(p.to_string());
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

    async fn degraded(&self, state: &Degraded) -> Result<()> {
        // Said when it changes, as the operator's condition changes.
        if self.with(|s| std::mem::replace(&mut s.degraded, state.clone())) != *state {
            (self.say)(state.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
