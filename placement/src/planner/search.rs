//! Local search on one layer's placement: swaps, re-assignments and new replicas around the
//! most loaded worker, each step taking the candidate with the lowest max worker load, then fewest
//! moves, then lowest sum of squares.

use super::{max_of, worker_loads};
use std::cmp::Ordering;

/// A point a layer can be taken to: its moves from `current` and its max worker load.
#[derive(Clone, Copy, Debug)]
pub(super) struct Point {
    pub(super) moves: usize,
    pub(super) max: f64,
    /// Which path (the local search from `current`, or the one from the aligned target), and how
    /// many of its steps to replay.
    pub(super) from_target: bool,
    pub(super) steps: usize,
}

/// One step of a path: the slots it changed and what they now hold.
pub(super) struct Step {
    pub(super) changes: Vec<(usize, u32)>,
}

/// Changes of a max below this fraction of the mean worker load are float noise, not worth a move.
pub(super) const NOISE: f64 = 1e-6;

/// The three kinds of local-search step around the most loaded worker `w*`.
#[derive(Clone, Copy)]
pub(super) enum Action {
    /// Exchange the experts of two slots on different workers (2 moves).
    Swap(usize, usize),
    /// Slot now holds this expert (1 move): drops a replica of its old expert, adds one of this.
    Assign(usize, u32),
}

#[derive(Clone, Copy)]
struct Candidate {
    max: f64,
    moves: i64,
    sos: f64,
    action: Action,
}

impl Candidate {
    /// Lower max (beyond `tol`), then fewer moves, then lower sum of squares.
    fn beats(&self, other: &Candidate, tol: f64) -> bool {
        if (self.max - other.max).abs() > tol {
            self.max < other.max
        } else if self.moves != other.moves {
            self.moves < other.moves
        } else {
            self.sos < other.sos
        }
    }
}

/// Local search on one layer: the state of its placement and loads.
pub(super) struct Search<'a> {
    load: &'a [f64],
    orig: &'a [u32],
    s: usize,
    pub(super) cur: Vec<u32>,
    /// Slots of each expert, ascending.
    slots_of: Vec<Vec<usize>>,
    /// Slots differing from `orig`: a slot changed twice counts once, restored counts 0.
    pub(super) moves: usize,
    /// Smaller changes of a max (tokens) are float noise, not worth a move.
    pub(super) tol: f64,
    sos_tol: f64,
    // Derived from the above by `refresh` after every step.
    wl: Vec<f64>,
    /// Workers by load, heaviest first (lowest index on ties).
    order: Vec<usize>,
    /// Load of each replica of each expert, now and with one replica more.
    per_replica: Vec<f64>,
    per_replica_more: Vec<f64>,
    /// Experts on the heaviest worker.
    on_top: Vec<bool>,
}

/// Per-worker accumulators for [`Search::eval`], kept zeroed between calls.
pub(super) struct Scratch {
    delta: Vec<f64>,
    seen: Vec<bool>,
}

impl<'a> Search<'a> {
    pub(super) fn new(load: &'a [f64], orig: &'a [u32], cur: Vec<u32>, s: usize) -> Self {
        let mut slots_of = vec![Vec::new(); load.len()];
        for (p, &e) in cur.iter().enumerate() {
            slots_of[e as usize].push(p);
        }
        let moves = cur.iter().zip(orig).filter(|(a, b)| a != b).count();
        let mean = load.iter().sum::<f64>() / (cur.len() / s) as f64;
        let tol = NOISE * mean;
        let mut search = Search {
            load,
            orig,
            s,
            cur,
            slots_of,
            moves,
            tol,
            sos_tol: tol * mean,
            wl: Vec::new(),
            order: Vec::new(),
            per_replica: Vec::new(),
            per_replica_more: Vec::new(),
            on_top: vec![false; load.len()],
        };
        search.refresh();
        search
    }

    pub(super) fn refresh(&mut self) {
        self.wl = worker_loads(self.load, &self.cur, self.s);
        self.order = (0..self.wl.len()).collect();
        let wl = &self.wl;
        self.order.sort_by(|&a, &b| wl[b].partial_cmp(&wl[a]).unwrap_or(Ordering::Equal));
        let replicas = |e: usize| self.slots_of[e].len() as f64;
        self.per_replica = (0..self.load.len()).map(|e| self.load[e] / replicas(e)).collect();
        self.per_replica_more = (0..self.load.len()).map(|e| self.load[e] / (replicas(e) + 1.0)).collect();
        self.on_top.iter_mut().for_each(|x| *x = false);
        let top = self.order[0];
        for &e in &self.cur[top * self.s..(top + 1) * self.s] {
            self.on_top[e as usize] = true;
        }
    }

    pub(super) fn max(&self) -> f64 {
        max_of(&self.wl)
    }

    /// Takes `pick`'s steps until it has none, recording each with a point on path `from_target`.
    pub(super) fn walk(
        &mut self,
        from_target: bool,
        steps: &mut Vec<Step>,
        points: &mut Vec<Point>,
        pick: impl Fn(&Self, &mut Scratch) -> Option<Action>,
    ) {
        let mut scratch = Scratch { delta: vec![0.0; self.wl.len()], seen: vec![false; self.wl.len()] };
        // A bound against creeping improvements; real layers converge far earlier.
        for _ in 0..4 * self.cur.len() {
            let Some(action) = pick(self, &mut scratch) else { break };
            let changes = match action {
                Action::Swap(i, j) => vec![(i, self.cur[j]), (j, self.cur[i])],
                Action::Assign(i, e) => vec![(i, e)],
            };
            for &(slot, e) in &changes {
                self.set(slot, e);
            }
            self.refresh();
            steps.push(Step { changes });
            points.push(Point { moves: self.moves, max: self.max(), from_target, steps: steps.len() });
        }
    }

    pub(super) fn set(&mut self, slot: usize, e: u32) {
        let old = self.cur[slot];
        let was_moved = old != self.orig[slot];
        let now_moved = e != self.orig[slot];
        self.moves = self.moves + usize::from(now_moved) - usize::from(was_moved);
        if let Some(k) = self.slots_of[old as usize].iter().position(|&q| q == slot) {
            self.slots_of[old as usize].remove(k);
        }
        let to = &mut self.slots_of[e as usize];
        let at = to.partition_point(|&q| q < slot);
        to.insert(at, slot);
        self.cur[slot] = e;
    }

    /// Change in moves if `slot` held `e` instead of what it holds.
    fn dmoves(&self, slot: usize, e: u32) -> i64 {
        i64::from(e != self.orig[slot]) - i64::from(self.cur[slot] != self.orig[slot])
    }

    fn holds(&self, worker: usize, e: u32) -> bool {
        self.cur[worker * self.s..(worker + 1) * self.s].contains(&e)
    }

    /// New max and sum of squares of worker loads after adding `deltas` (worker, tokens);
    /// a worker may appear more than once.
    fn eval(&self, deltas: &[(usize, f64)], sos: f64, scratch: &mut Scratch) -> (f64, f64) {
        for &(w, d) in deltas {
            scratch.delta[w] += d;
        }
        let (mut max, mut sos) = (f64::NEG_INFINITY, sos);
        for &(w, _) in deltas {
            if !scratch.seen[w] {
                scratch.seen[w] = true;
                let new = self.wl[w] + scratch.delta[w];
                max = max.max(new);
                sos += new * new - self.wl[w] * self.wl[w];
            }
        }
        let rest = self.order.iter().find(|&&w| !scratch.seen[w]).map_or(0.0, |&w| self.wl[w]);
        for &(w, _) in deltas {
            scratch.delta[w] = 0.0;
            scratch.seen[w] = false;
        }
        (max.max(rest), sos)
    }

    /// Deltas of re-assigning `slot` from its expert (which keeps another replica) to `e`: the
    /// old expert's other replicas get heavier, `e`'s lighter, the slot's worker changes.
    fn reassign_deltas(&self, slot: usize, e: u32, deltas: &mut Vec<(usize, f64)>) {
        let (s, old) = (self.s, self.cur[slot] as usize);
        let inc = self.load[old] / (self.slots_of[old].len() - 1) as f64 - self.per_replica[old];
        let dec = self.per_replica_more[e as usize] - self.per_replica[e as usize];
        deltas.clear();
        deltas.extend(self.slots_of[old].iter().filter(|&&q| q != slot).map(|&q| (q / s, inc)));
        deltas.push((slot / s, self.per_replica_more[e as usize] - self.per_replica[old]));
        deltas.extend(self.slots_of[e as usize].iter().map(|&q| (q / s, dec)));
    }

    /// The best improving step: lowest new max, then fewest moves, then lowest sum of squares.
    /// Improving means the max drops by more than `tol`, or stays and the sum of squares drops.
    /// No step leaves an expert without a slot or puts a second replica of one on a worker.
    pub(super) fn best(&self, scratch: &mut Scratch) -> Option<Action> {
        let (s, pr, pr_more) = (self.s, &self.per_replica, &self.per_replica_more);
        let ws = self.order[0];
        let top = self.wl[ws];
        let sos0: f64 = self.wl.iter().map(|x| x * x).sum();
        let mut best: Option<Candidate> = None;
        // Whether a step whose max is at least `lb` and that costs `moves` cannot beat the best so
        // far; checked before the costlier full evaluation.
        let skip = |best: &Option<Candidate>, lb: f64, moves: i64| match best {
            None => lb > top,
            Some(b) => lb > b.max + self.tol || (lb > b.max - self.tol && moves > b.moves),
        };
        let consider = |best: &mut Option<Candidate>, (max, sos): (f64, f64), moves: i64, action| {
            let improves = max < top - self.tol || (max <= top && sos < sos0 - self.sos_tol);
            let new = Candidate { max, moves, sos, action };
            if improves && best.as_ref().is_none_or(|b| new.beats(b, self.tol)) {
                *best = Some(new);
            }
        };
        let mut deltas = Vec::new();
        let top_slots = ws * s..(ws + 1) * s;
        for v in (0..self.wl.len()).filter(|&v| v != ws) {
            // Heaviest worker other than w* and v: a swap between the two leaves it as it is.
            let rest = self.order.iter().find(|&&w| w != ws && w != v).map_or(0.0, |&w| self.wl[w]);
            if skip(&best, rest, i64::MIN) {
                continue;
            }
            for j in v * s..(v + 1) * s {
                let b = self.cur[j];
                // (a) swap a heavier slot i of w* with slot j: only w* and v change.
                for i in top_slots.clone() {
                    let a = self.cur[i];
                    let d = pr[a as usize] - pr[b as usize];
                    if d <= self.tol {
                        continue;
                    }
                    let (new_ws, new_v) = (top - d, self.wl[v] + d);
                    let moves = self.dmoves(i, b) + self.dmoves(j, a);
                    if skip(&best, new_ws.max(new_v).max(rest), moves)
                        || self.on_top[b as usize]
                        || self.holds(v, a)
                    {
                        continue;
                    }
                    let sos = sos0 + new_ws * new_ws - top * top + new_v * new_v - self.wl[v] * self.wl[v];
                    consider(&mut best, (new_ws.max(new_v).max(rest), sos), moves, Action::Swap(i, j));
                }
                // (c) slot j drops a spare replica of b for one more replica of an expert a on w*.
                let cb = self.slots_of[b as usize].len();
                if cb > 1 {
                    let inc = self.load[b as usize] / (cb - 1) as f64 - pr[b as usize];
                    let b_max = self.slots_of[b as usize]
                        .iter()
                        .filter(|&&q| q != j)
                        .map(|&q| self.wl[q / s] + inc)
                        .fold(0.0, f64::max);
                    for i in top_slots.clone() {
                        let a = self.cur[i];
                        if a == b || self.cur[ws * s..i].contains(&a) {
                            continue;
                        }
                        let dec = pr[a as usize] - pr_more[a as usize];
                        let moves = self.dmoves(j, a);
                        let lb =
                            (self.wl[v] - pr[b as usize] + pr_more[a as usize]).max(top - dec).max(b_max);
                        if skip(&best, lb, moves) || self.holds(v, a) {
                            continue;
                        }
                        self.reassign_deltas(j, a, &mut deltas);
                        consider(&mut best, self.eval(&deltas, sos0, scratch), moves, Action::Assign(j, a));
                    }
                }
            }
        }
        // (b) a slot i of w* drops its replica of a (whose other replicas get heavier) for one of b.
        for i in top_slots {
            let a = self.cur[i] as usize;
            let ca = self.slots_of[a].len();
            if ca < 2 {
                continue;
            }
            let inc = self.load[a] / (ca - 1) as f64 - pr[a];
            let a_max = self.slots_of[a]
                .iter()
                .filter(|&&q| q != i)
                .map(|&q| self.wl[q / s] + inc)
                .fold(0.0, f64::max);
            for b in 0..self.load.len() as u32 {
                let yb = pr_more[b as usize];
                let moves = self.dmoves(i, b);
                if yb - pr[a] >= -self.tol
                    || skip(&best, (top - pr[a] + yb).max(a_max), moves)
                    || self.on_top[b as usize]
                {
                    continue;
                }
                self.reassign_deltas(i, b, &mut deltas);
                consider(&mut best, self.eval(&deltas, sos0, scratch), moves, Action::Assign(i, b));
            }
        }
        best.map(|b| b.action)
    }

    /// The best step back toward `orig` whose max stays within `cap`: a moved slot gets its
    /// original expert back, alone (if its expert keeps another slot) or by swapping with a slot
    /// holding that expert. Lowest new max first, then most moves saved, then sum of squares.
    pub(super) fn best_revert(&self, cap: f64, scratch: &mut Scratch) -> Option<Action> {
        let s = self.s;
        let sos0: f64 = self.wl.iter().map(|x| x * x).sum();
        let mut best: Option<Candidate> = None;
        let mut deltas = Vec::new();
        let mut consider = |(max, sos): (f64, f64), moves: i64, action| {
            let new = Candidate { max, moves, sos, action };
            if max <= cap && best.as_ref().is_none_or(|b| new.beats(b, self.tol)) {
                best = Some(new);
            }
        };
        for p in (0..self.cur.len()).filter(|&p| self.cur[p] != self.orig[p]) {
            let (x, c, w) = (self.cur[p], self.orig[p], p / s);
            if self.holds(w, c) {
                continue;
            }
            if self.slots_of[x as usize].len() > 1 {
                self.reassign_deltas(p, c, &mut deltas);
                consider(self.eval(&deltas, sos0, scratch), -1, Action::Assign(p, c));
            }
            let d = self.per_replica[c as usize] - self.per_replica[x as usize];
            for &q in &self.slots_of[c as usize] {
                let v = q / s;
                let moves = self.dmoves(p, c) + self.dmoves(q, x);
                if v == w || moves >= 0 || self.holds(v, x) {
                    continue;
                }
                consider(self.eval(&[(w, d), (v, -d)], sos0, scratch), moves, Action::Swap(p, q));
            }
        }
        best.map(|b| b.action)
    }
}
