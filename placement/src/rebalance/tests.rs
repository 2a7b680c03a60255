//! [`poll`] against servers in memory, once with each kind of record: local mode's [`Printed`]
//! and a ledger that keeps what the operator keeps (a plan of record, a `Rebalancing` flag that
//! outlives a crash, and the events).

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Routers and workers in memory: what each routes by, prepared and holds in force.
struct Fake {
    routers: Mutex<Vec<PlacementPlan>>,
    /// Per worker: (epoch in force, epoch prepared beside it).
    workers: Mutex<Vec<(u64, Option<u64>)>>,
    tokens: Vec<Vec<f64>>,
    fail_prepare: AtomicBool,
    /// Workers that answer nothing, and the routers' view of them.
    dead: Mutex<Vec<u32>>,
}

impl Fake {
    fn new(plan: &PlacementPlan, routers: usize) -> Self {
        // Experts 0 and 1, both on worker 0, are hot.
        let hot = vec![400.0, 300.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0];
        Fake {
            routers: Mutex::new(vec![plan.clone(); routers]),
            workers: Mutex::new(vec![(plan.epoch, None); plan.workers as usize]),
            tokens: vec![hot; plan.layers.len()],
            fail_prepare: AtomicBool::new(false),
            dead: Mutex::new(Vec::new()),
        }
    }

    fn router_epochs(&self) -> Vec<u64> {
        self.routers.lock().unwrap().iter().map(|p| p.epoch).collect()
    }

    fn workers(&self) -> Vec<(u64, Option<u64>)> {
        self.workers.lock().unwrap().clone()
    }
}

impl Servers for Fake {
    async fn loads(&self) -> Result<Vec<RouterLoad>> {
        let routers = self.routers.lock().unwrap().clone();
        Ok(routers
            .into_iter()
            .enumerate()
            .map(|(i, plan)| RouterLoad {
                router: format!("router {i}"),
                plan,
                tokens: self.tokens.clone(),
                down: self.dead.lock().unwrap().clone(),
            })
            .collect())
    }

    async fn prepare(&self, plan: &PlacementPlan, down: &[u32]) -> Result<()> {
        let mut workers = self.workers.lock().unwrap();
        for (rank, w) in workers.iter_mut().enumerate() {
            if down.contains(&(rank as u32)) {
                continue;
            }
            self.answers(rank, "prepare")?;
            if self.fail_prepare.load(Ordering::SeqCst) && rank == 1 {
                return Err(Error::Call {
                    step: "prepare",
                    target: "worker 1".into(),
                    source: "out of memory".into(),
                });
            }
            if w.0 != plan.epoch {
                w.1 = Some(plan.epoch);
            }
        }
        Ok(())
    }

    async fn commit(&self, plan: &PlacementPlan) -> Result<()> {
        self.routers.lock().unwrap().iter_mut().for_each(|r| *r = plan.clone());
        Ok(())
    }

    async fn release(&self, epoch: u64, down: &[u32]) -> Result<()> {
        for (rank, w) in self.workers.lock().unwrap().iter_mut().enumerate() {
            if !down.contains(&(rank as u32)) {
                self.answers(rank, "release")?;
                *w = (epoch, None);
            }
        }
        Ok(())
    }
}

impl Fake {
    /// Fails as a call to a dead worker would.
    fn answers(&self, rank: usize, step: &'static str) -> Result<()> {
        if self.dead.lock().unwrap().contains(&(rank as u32)) {
            return Err(Error::Call {
                step,
                target: format!("worker {rank}"),
                source: "connection refused".into(),
            });
        }
        Ok(())
    }
}

/// The operator's kind of record, in memory.
#[derive(Default)]
struct Ledger {
    stored: Mutex<Option<PlacementPlan>>,
    rebalancing: AtomicBool,
    since_last: Mutex<Option<Duration>>,
    events: Arc<Mutex<Vec<String>>>,
    highest: Mutex<u64>,
}

impl Ledger {
    fn event(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }
}

impl Record for Ledger {
    type Error = Error;

    async fn stored(&self) -> Result<Option<PlacementPlan>> {
        Ok(self.stored.lock().unwrap().clone())
    }
    async fn store(&self, plan: &PlacementPlan) -> Result<()> {
        *self.stored.lock().unwrap() = Some(plan.clone());
        Ok(())
    }
    fn unfinished(&self) -> bool {
        self.rebalancing.load(Ordering::SeqCst)
    }
    fn since_last(&self) -> Option<Duration> {
        *self.since_last.lock().unwrap()
    }
    fn highest_epoch(&self) -> u64 {
        *self.highest.lock().unwrap()
    }
    async fn measured(&self, _: f64) -> Result<()> {
        Ok(())
    }
    async fn rebalancing(&self, p: &Proposal) -> Result<()> {
        let mut highest = self.highest.lock().unwrap();
        *highest = (*highest).max(p.plan.epoch);
        drop(highest);
        self.rebalancing.store(true, Ordering::SeqCst);
        self.event(p.to_string());
        Ok(())
    }
    async fn rebalanced(&self, p: &Proposal) -> Result<()> {
        self.rebalancing.store(false, Ordering::SeqCst);
        *self.since_last.lock().unwrap() = Some(Duration::ZERO);
        self.event(format!("placement epoch {} in force", p.plan.epoch));
        Ok(())
    }
    async fn failed(&self, epoch: u64, error: &str) -> Result<()> {
        self.rebalancing.store(false, Ordering::SeqCst);
        *self.since_last.lock().unwrap() = Some(Duration::ZERO);
        self.event(format!("migration to epoch {epoch} failed: {error}"));
        Ok(())
    }
    async fn settled(&self, plan: &PlacementPlan) -> Result<()> {
        self.rebalancing.store(false, Ordering::SeqCst);
        self.event(format!("placement settled at epoch {}", plan.epoch));
        Ok(())
    }
    async fn degraded(&self, state: &Degraded) -> Result<()> {
        if !state.down.is_empty() {
            self.event(state.to_string());
        }
        Ok(())
    }
}

fn layout() -> Layout {
    Layout {
        logical: 8,
        redundant: 0,
        workers: 4,
        slots_per_worker: 2,
        min_replicas: 1,
        moe_layers: vec![1, 2],
    }
}

fn policy() -> Policy {
    Policy::parse(true, "30s", "1m", 1.1, 16).unwrap()
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Each record kind: how to make one holding a plan, and what it said (events or lines).
trait Kind: Record<Error = Error> + Sized {
    fn make(plan: PlacementPlan) -> (Self, Arc<Mutex<Vec<String>>>);
    fn stored_epoch(&self) -> u64;
}

impl Kind for Ledger {
    fn make(plan: PlacementPlan) -> (Self, Arc<Mutex<Vec<String>>>) {
        let ledger = Ledger { stored: Mutex::new(Some(plan)), ..Ledger::default() };
        let events = ledger.events.clone();
        (ledger, events)
    }
    fn stored_epoch(&self) -> u64 {
        self.stored.lock().unwrap().as_ref().unwrap().epoch
    }
}

type Sink = Box<dyn Fn(String) + Send + Sync>;

/// Numbers the placement files of the records the tests make.
static NEXT_FILE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Kind for Printed<Sink> {
    fn make(plan: PlacementPlan) -> (Self, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let file = std::env::temp_dir().join(format!(
            "kubemoe-printed-{}-{}.json",
            std::process::id(),
            NEXT_FILE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&file, serde_json::to_string(&plan).unwrap()).unwrap();
        (Printed::new(plan, file, Box::new(move |l| sink.lock().unwrap().push(l)) as Sink), lines)
    }
    /// What a process that restarts would read: the file, which must agree with memory.
    fn stored_epoch(&self) -> u64 {
        let text = std::fs::read_to_string(&self.file).unwrap();
        let file: PlacementPlan = serde_json::from_str(&text).unwrap();
        assert_eq!(file, self.with(|s| s.stored.clone()));
        file.epoch
    }
}

fn said(lines: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    lines.lock().unwrap().clone()
}

fn skewed_load_rebalances_then_cools_down<R: Kind>() {
    let initial = layout().initial_plan();
    let servers = Fake::new(&initial, 2);
    let (record, lines) = R::make(initial);
    let polled = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 1 });
    assert_eq!(servers.router_epochs(), [1, 1]);
    assert_eq!(servers.workers(), vec![(1, None); 4]);
    assert_eq!(record.stored_epoch(), 1);
    let said = said(&lines);
    assert!(
        said[0].starts_with("rebalancing to epoch 1: ") || said[0] == "rebalancing to epoch 1",
        "{said:?}"
    );
    assert!(said.iter().any(|l| l == "placement epoch 1 in force"), "{said:?}");
    // Right after: the cooldown holds (or the plan is balanced enough).
    let again = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    assert!(matches!(again, Polled::Kept { .. }), "{again:?}");
    assert_eq!(servers.router_epochs(), [1, 1]);
}

fn a_failed_prepare_settles_back_and_cools_down<R: Kind>() {
    let initial = layout().initial_plan();
    let servers = Fake::new(&initial, 2);
    servers.fail_prepare.store(true, Ordering::SeqCst);
    let (record, lines) = R::make(initial);
    let polled = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Failed { epoch: 1, settled: false });
    // Routers never saw epoch 1; workers were released back to 0; the record stayed at 0.
    assert_eq!(servers.router_epochs(), [0, 0]);
    assert_eq!(servers.workers(), vec![(0, None); 4]);
    assert_eq!(record.stored_epoch(), 0);
    let said = said(&lines);
    assert!(
        said.iter().any(|l| l.contains("migration to epoch 1 failed: prepare on worker 1: out of memory")),
        "{said:?}"
    );
    // The worker recovers: the caller's memory of the failure settles first, then the cooldown
    // holds, so experts are not reloaded every interval.
    servers.fail_prepare.store(false, Ordering::SeqCst);
    let settled = block_on(poll(&record, &servers, &layout(), &policy(), true)).unwrap();
    assert_eq!(settled, Polled::Settled { epoch: 0 });
    let kept = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(kept, Polled::Kept { imbalance: kept_imbalance(&kept), reason: "cooling down" });
}

fn kept_imbalance(p: &Polled) -> Option<f64> {
    match p {
        Polled::Kept { imbalance, .. } => *imbalance,
        _ => None,
    }
}

fn split_routers_are_committed_forward<R: Kind>() {
    let initial = layout().initial_plan();
    let next = initial.with_slots(1, {
        let mut s = initial.phy_to_log();
        s.iter_mut().for_each(|l| l.swap(1, 2));
        s
    });
    let servers = Fake::new(&initial, 2);
    servers.routers.lock().unwrap()[0] = next.clone();
    let (record, _) = R::make(next);
    let polled = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Settled { epoch: 1 });
    assert_eq!(servers.router_epochs(), [1, 1]);
    assert_eq!(servers.workers(), vec![(1, None); 4]);
}

#[test]
fn skewed_load_rebalances_then_cools_down_with_each_record() {
    skewed_load_rebalances_then_cools_down::<Ledger>();
    skewed_load_rebalances_then_cools_down::<Printed<Sink>>();
}

#[test]
fn a_failed_prepare_settles_back_and_cools_down_with_each_record() {
    a_failed_prepare_settles_back_and_cools_down::<Ledger>();
    a_failed_prepare_settles_back_and_cools_down::<Printed<Sink>>();
}

#[test]
fn split_routers_are_committed_forward_with_each_record() {
    split_routers_are_committed_forward::<Ledger>();
    split_routers_are_committed_forward::<Printed<Sink>>();
}

#[test]
fn a_migration_the_record_left_unfinished_is_settled_before_judging() {
    let initial = layout().initial_plan();
    let servers = Fake::new(&initial, 1);
    let (ledger, _) = Ledger::make(initial);
    ledger.rebalancing.store(true, Ordering::SeqCst);
    servers.workers.lock().unwrap()[2].1 = Some(1);
    let polled = block_on(poll(&ledger, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Settled { epoch: 0 });
    assert_eq!(servers.workers(), vec![(0, None); 4]);
    assert!(!ledger.unfinished());
}

#[test]
fn triage_judges_only_when_nothing_is_left_over() {
    let plan = |epoch| PlacementPlan { epoch, ..PlacementPlan::initial(2, 8, 16, &[1, 2]) };
    let agreed = |epoch| Routing::Agreed { plan: plan(epoch), loads: vec![vec![1.0; 16]; 2] };
    assert!(
        matches!(triage(&plan(3), agreed(3), false).unwrap(), Next::Judge { plan, .. } if plan.epoch == 3)
    );
    // Known unfinished: release the epoch in force on every worker even though all agree.
    assert_eq!(triage(&plan(3), agreed(3), true).unwrap(), Next::Settle(plan(3)));
    // Record ahead of the routers (stopped before any commit): back to the routers' plan.
    assert_eq!(triage(&plan(4), agreed(3), false).unwrap(), Next::Settle(plan(3)));
    // Record behind them: it catches up.
    assert_eq!(triage(&plan(3), agreed(4), false).unwrap(), Next::Settle(plan(4)));
    // Some routers committed the record's epoch: forward.
    assert_eq!(triage(&plan(4), Routing::Split { highest: 4 }, false).unwrap(), Next::Settle(plan(4)));
    assert!(triage(&plan(4), Routing::Split { highest: 6 }, false).is_err());
}

#[test]
fn routing_sums_agreeing_routers_and_names_a_split() {
    let plan = |epoch| PlacementPlan { epoch, ..PlacementPlan::initial(2, 8, 16, &[1]) };
    let load = |epoch, t| RouterLoad {
        router: "r".into(),
        plan: plan(epoch),
        tokens: vec![vec![t; 16]],
        down: vec![],
    };
    assert_eq!(
        Routing::of(vec![load(2, 1.0), load(2, 2.0)]).unwrap(),
        Routing::Agreed { plan: plan(2), loads: vec![vec![3.0; 16]] }
    );
    assert_eq!(
        Routing::of(vec![load(2, 1.0), load(3, 1.0), load(2, 1.0)]).unwrap(),
        Routing::Split { highest: 3 }
    );
    assert!(Routing::of(Vec::new()).unwrap_err().to_string().contains("no router"));
}

#[test]
fn skewed_load_gives_a_better_plan_at_the_next_epoch_within_the_move_budget() {
    let plan = PlacementPlan { epoch: 3, ..PlacementPlan::initial(4, 2, 8, &[1, 2]) };
    let loads = vec![vec![400.0, 300.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]; 2];
    let Decision::Rebalance(p) = decide(&policy(), &plan, &loads, None, &[], 1).unwrap() else { panic!() };
    assert_eq!(p.plan.epoch, 4);
    p.plan.validate_for(8, &[1, 2]).unwrap();
    assert_eq!(p.plan.workers, 4);
    assert!(p.imbalance_before > 2.5 && p.imbalance_after < p.imbalance_before, "{p:?}");
    assert!(p.moved > 0 && p.moved <= policy().max_moves);
    assert_eq!(p.moved, planner::moved(&plan.phy_to_log(), &p.plan.phy_to_log()));
    assert_eq!(p.imbalance_after, imbalance(&loads, &p.plan.phy_to_log(), 2));
}

#[test]
fn balanced_idle_or_cooling_down_keeps_the_plan() {
    let plan = PlacementPlan::initial(4, 2, 8, &[1]);
    let keep =
        |loads: &[Vec<f64>], since: Option<Duration>| match decide(&policy(), &plan, loads, since, &[], 1) {
            Ok(Decision::Keep { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
    assert_eq!(keep(&[vec![10.0; 8]], None), "balanced");
    assert_eq!(keep(&[vec![0.0; 8]], None), "no load measured yet");
    let hot = vec![vec![400.0, 300.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]];
    assert_eq!(keep(&hot, Some(Duration::from_secs(5))), "cooling down");
    assert!(matches!(
        decide(&policy(), &plan, &hot, Some(Duration::from_secs(61)), &[], 1),
        Ok(Decision::Rebalance(_))
    ));
}

#[test]
fn bad_durations_name_the_field() {
    let e = Policy::parse(true, "soon", "1m", 1.1, 16).unwrap_err().to_string();
    assert!(e.contains("balancing.interval"), "{e}");
    let e = Policy::parse(true, "30s", "later", 1.1, 16).unwrap_err().to_string();
    assert!(e.contains("balancing.cooldown"), "{e}");
}

/// 2 layers of 8 experts on 4 workers of 3 slots: experts 0 and 1 on workers 0 and 2, 2 and 3
/// on workers 1 and 3, the others once.
fn replicated() -> PlacementPlan {
    let layer = vec![0, 1, 4, 2, 3, 5, 0, 1, 6, 2, 3, 7];
    PlacementPlan::initial(4, 3, 8, &[1, 2]).with_slots(5, vec![layer.clone(), layer])
}

#[test]
fn a_recovery_epoch_places_the_lost_experts_on_live_slots_of_replicated_ones() {
    let plan = replicated();
    // Worker 2 (slots 6..9: experts 0, 1, 6) is down: expert 6 has no live copy; 0 and 1 do.
    let loads = vec![vec![50.0, 5.0, 3.0, 1.0, 1.0, 1.0, 9.0, 1.0]; 2];
    assert_eq!(Degraded::of(&plan, vec![2]).lost, vec![(1, vec![6]), (2, vec![6])]);
    let Decision::Rebalance(p) = decide(&policy(), &plan, &loads, None, &[2], 1).unwrap() else { panic!() };
    assert_eq!((p.plan.epoch, p.recovering.as_slice(), p.moved), (6, &[2][..], 2));
    // Expert 6 takes the highest live slot of the expert with the least load per remaining
    // copy: 3 (1 token) rather than 2 (3 tokens); 0 and 1 have one live copy left and keep it.
    for slots in p.plan.phy_to_log() {
        assert_eq!(slots, vec![0, 1, 4, 2, 3, 5, 0, 1, 6, 2, 6, 7]);
    }
    // The down worker's slots are unchanged: when it returns it holds what the epoch places on it.
    assert_eq!(p.plan.held(2), plan.held(2));
    assert!(Degraded::of(&p.plan, vec![2]).lost.is_empty());
    assert!(p.to_string().starts_with("recovery epoch 6: workers 2 down"), "{p}");
    // Nothing lost: kept, and load is not judged while a worker is down.
    let Decision::Keep { reason, .. } = decide(&policy(), &p.plan, &loads, None, &[2], 1).unwrap() else {
        panic!()
    };
    assert!(reason.contains("every expert has a live copy"), "{reason}");
}

#[test]
fn without_spare_slots_the_loss_stays_and_is_named() {
    // Two workers of 4 slots, each expert once: nothing can be re-placed.
    let plan = PlacementPlan::initial(2, 4, 8, &[1]);
    let Decision::Keep { reason, imbalance: None } = recover(&plan, &[vec![1.0; 8]], &[1]) else { panic!() };
    assert!(reason.contains("no live slot is spare"), "{reason}");
    let degraded = Degraded::of(&plan, vec![1]);
    assert_eq!(degraded.lost_experts(), 4);
    assert_eq!(
        degraded.to_string(),
        "workers down: 1; experts with no live copy (requests needing them fail): layer 1: 4, 5, 6, 7"
    );
    // As many as the spare slots allow: one replicated expert gives one slot.
    let plan = PlacementPlan::initial(2, 5, 8, &[1]).with_slots(1, vec![vec![0, 1, 2, 3, 0, 4, 5, 6, 7, 1]]);
    let Decision::Rebalance(p) = recover(&plan, &[vec![1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0]], &[1]) else {
        panic!()
    };
    // Expert 5, the heaviest lost one, got the slot; 4, 6 and 7 stay lost.
    assert_eq!(p.plan.phy_to_log(), vec![vec![0, 1, 2, 3, 5, 4, 5, 6, 7, 1]]);
    assert_eq!(Degraded::of(&p.plan, vec![1]).lost, vec![(1, vec![4, 6, 7])]);
}

#[test]
fn a_dead_worker_is_recovered_around_then_rejoins_with_each_record() {
    fn check<R: Kind>() {
        let layout = Layout {
            logical: 8,
            redundant: 4,
            workers: 4,
            slots_per_worker: 3,
            min_replicas: 1,
            moe_layers: vec![1, 2],
        };
        let plan = replicated();
        let servers = Fake::new(&plan, 2);
        // Rank 99 names no worker of the plan: ignored.
        servers.dead.lock().unwrap().extend([2, 99]);
        let (record, lines) = R::make(plan);
        // The recovery epoch skips the dead worker; the routers route by it.
        let polled = block_on(poll(&record, &servers, &layout, &policy(), false)).unwrap();
        assert_eq!(polled, Polled::Rebalanced { epoch: 6 });
        assert_eq!(servers.router_epochs(), [6, 6]);
        assert_eq!(servers.workers(), vec![(6, None), (6, None), (5, None), (6, None)]);
        assert_eq!(record.stored_epoch(), 6);
        let said = said(&lines);
        assert!(said.iter().any(|l| l.starts_with("recovery epoch 6: workers 2 down")), "{said:?}");
        assert!(
            said.iter().any(|l| l == "workers down: 2; every expert has a copy on a live worker"),
            "{said:?}"
        );
        // Still down: nothing to do. Back: load is judged again (the record says so once).
        let kept = block_on(poll(&record, &servers, &layout, &policy(), false)).unwrap();
        assert!(matches!(kept, Polled::Kept { imbalance: None, .. }), "{kept:?}");
        servers.dead.lock().unwrap().clear();
        let judged = block_on(poll(&record, &servers, &layout, &policy(), false)).unwrap();
        assert!(
            matches!(judged, Polled::Kept { imbalance: Some(_), .. } | Polled::Rebalanced { .. }),
            "{judged:?}"
        );
    }
    check::<Ledger>();
    check::<Printed<Sink>>();
}

#[test]
fn an_epoch_a_failed_migration_used_is_never_given_to_another_plan() {
    let initial = layout().initial_plan();
    let servers = Fake::new(&initial, 1);
    servers.fail_prepare.store(true, Ordering::SeqCst);
    let (ledger, _) = Ledger::make(initial);
    let polled = block_on(poll(&ledger, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Failed { epoch: 1, settled: false });
    // Back at epoch 0 everywhere; some workers may have held epoch 1's plan for a while.
    servers.fail_prepare.store(false, Ordering::SeqCst);
    block_on(poll(&ledger, &servers, &layout(), &policy(), true)).unwrap();
    assert_eq!((ledger.stored_epoch(), servers.router_epochs()), (0, vec![0]));
    *ledger.since_last.lock().unwrap() = None;
    let polled = block_on(poll(&ledger, &servers, &layout(), &policy(), false)).unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 2 });
    assert_eq!((ledger.stored_epoch(), servers.router_epochs()), (2, vec![2]));
}

fn resized(workers: u32, redundant: u32, min_replicas: u32) -> Layout {
    Layout { workers, redundant, slots_per_worker: (8 + redundant) / workers, min_replicas, ..layout() }
}

/// Distinct experts rank `w` holds in the first layer of `plan`.
fn on(plan: &PlacementPlan, w: u32) -> Vec<u32> {
    plan.held(w)[0].1.clone()
}

#[test]
fn a_resize_keeps_what_each_rank_holds_where_it_can() {
    let two = resized(2, 0, 1).initial_plan();
    // Up to 4 workers: ranks 0 and 1 keep two of their four experts, ranks 2 and 3 load two each.
    let up = reshape(&two, &layout(), &[]).unwrap();
    assert_eq!((up.plan.epoch, up.plan.workers, up.plan.slots_per_worker), (1, 4, 2));
    up.plan.validate_for(8, &[1, 2]).unwrap();
    assert!(on(&up.plan, 0).iter().all(|e| on(&two, 0).contains(e)), "{:?}", up.plan);
    assert!(on(&up.plan, 1).iter().all(|e| on(&two, 1).contains(e)), "{:?}", up.plan);
    assert_eq!(up.moved, 2 * 2 * 2, "two new ranks, two experts each, two layers");
    assert_eq!(up.resized_from, Some(2));
    assert!(up
        .to_string()
        .starts_with("resizing to epoch 1: 2 -> 4 workers, 2 slots each, loading 8 experts"));
    // Down to 2 again: the survivors keep theirs and take the leavers' experts.
    let down = reshape(&up.plan, &resized(2, 0, 1), &[]).unwrap();
    assert_eq!((down.plan.workers, down.plan.slots_per_worker, down.moved), (2, 4, 8));
    assert!(on(&up.plan, 0).iter().all(|e| on(&down.plan, 0).contains(e)));
    // To 3 workers with 10 redundant slots (18 = 3 × 6) under a skewed load, every expert on two
    // workers: hot experts get the replicas.
    let mut hot = vec![vec![1.0; 8]; 2];
    hot.iter_mut().for_each(|l| l[5] = 50.0);
    let three = reshape(&two, &resized(3, 10, 2), &hot).unwrap();
    assert_eq!((three.plan.workers, three.plan.slots_per_worker), (3, 6));
    for holders in three.plan.holders().iter().flatten() {
        assert!(holders.len() >= 2, "{:?}", three.plan);
    }
    assert!(three.imbalance_after < three.imbalance_before, "{three:?}");
}

fn a_resize_migrates_live_both_ways<R: Kind>() {
    let two = resized(2, 0, 1).initial_plan();
    let servers = Fake::new(&two, 2);
    // The new workers are up (holding nothing) before the resize starts.
    servers.workers.lock().unwrap().resize(4, (0, None));
    let (record, lines) = R::make(two);
    let disabled = Policy { enabled: false, ..policy() };
    let polled = block_on(poll(&record, &servers, &layout(), &disabled, false)).unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 1 });
    assert_eq!(servers.router_epochs(), [1, 1]);
    assert_eq!(servers.routers.lock().unwrap()[0].workers, 4);
    assert_eq!(servers.workers(), vec![(1, None); 4]);
    assert_eq!(record.stored_epoch(), 1);
    assert!(said(&lines)[0].starts_with("resizing to epoch 1: 2 -> 4 workers"), "{:?}", said(&lines));
    // With balancing disabled nothing else happens, whatever the load.
    let kept = block_on(poll(&record, &servers, &layout(), &disabled, false)).unwrap();
    assert_eq!(kept, Polled::Kept { imbalance: None, reason: "balancing is disabled" });
    // Down to 2, with worker 3 dead already: the survivors take everything, the rest are let go.
    servers.dead.lock().unwrap().push(3);
    let polled = block_on(poll(&record, &servers, &resized(2, 0, 1), &disabled, false)).unwrap();
    assert_eq!(polled, Polled::Rebalanced { epoch: 2 });
    let routed = servers.routers.lock().unwrap()[0].clone();
    assert_eq!((routed.epoch, routed.workers), (2, 2));
    assert_eq!(servers.workers()[..3], [(2, None); 3]);
    assert_eq!(record.stored_epoch(), 2);
}

#[test]
fn a_resize_migrates_live_both_ways_with_each_record() {
    a_resize_migrates_live_both_ways::<Ledger>();
    a_resize_migrates_live_both_ways::<Printed<Sink>>();
}

#[test]
fn a_worker_that_stays_and_is_down_holds_the_resize_back() {
    let two = resized(2, 0, 1).initial_plan();
    let servers = Fake::new(&two, 1);
    servers.workers.lock().unwrap().resize(4, (0, None));
    servers.dead.lock().unwrap().push(1);
    let (record, _) = Ledger::make(two);
    let polled = block_on(poll(&record, &servers, &layout(), &policy(), false)).unwrap();
    // Worker 1 alone held its experts: no live slot takes them, nothing moves.
    assert!(matches!(polled, Polled::Kept { .. }), "{polled:?}");
    assert_eq!(servers.router_epochs(), [0]);
}
