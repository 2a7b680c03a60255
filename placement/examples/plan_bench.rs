//! Expert-placement planner on a DeepSeek-V3-sized problem: 58 MoE layers × 256 experts on
//! 32 workers × 9 slots (288 slots), 4 nodes, 8 groups, Zipf (s = 1) loads.
//! Run: `cargo run --release -p kubemoe-placement --example plan_bench`.

use std::time::{Duration, Instant};

use kubemoe_kernels::rng::Rng;
use kubemoe_placement::planner::{balance, eplb, eplb_aligned, incremental, moved, Problem};

const LAYERS: usize = 58;
const EXPERTS: usize = 256;
const RUNS: usize = 7;
/// Routed tokens per layer in a measurement window (8192 tokens × top-8).
const TOKENS: f64 = 65536.0;

/// Zipf(s = 1) token counts over a random permutation of the experts, per layer.
fn zipf_loads(rng: &mut Rng) -> Vec<Vec<f64>> {
    let harmonic: f64 = (1..=EXPERTS).map(|r| 1.0 / r as f64).sum();
    (0..LAYERS)
        .map(|_| {
            let mut rank: Vec<usize> = (0..EXPERTS).collect();
            rng.shuffle(&mut rank);
            rank.iter().map(|&r| (TOKENS / ((r + 1) as f64 * harmonic)).round()).collect()
        })
        .collect()
}

/// Median wall time of `RUNS` calls, and the last result.
fn timed<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut out = f();
    for _ in 0..RUNS {
        let start = Instant::now();
        out = f();
        times.push(start.elapsed());
    }
    times.sort();
    (times[RUNS / 2], out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), kubemoe_placement::Error> {
    let p = Problem { workers: 32, nodes: 4, groups: 8, slots_per_worker: 9, min_replicas: 1 };
    let s = p.slots_per_worker;
    let mut rng = Rng::new(0x6b75_6265_6d6f_6521);
    let loads = zipf_loads(&mut rng);
    let initial: Vec<Vec<u32>> =
        (0..LAYERS).map(|_| (0..p.slots()).map(|q| (q % EXPERTS) as u32).collect()).collect();

    let (t_eplb, plan) = timed(|| eplb(&loads, &p));
    let plan = plan?;
    let aligned = eplb_aligned(&loads, &initial, &p)?;
    let (t_inc, inc) = timed(|| incremental(&loads, &initial, &p, usize::MAX));
    let inc = inc?;
    let (b_init, b_eplb, b_inc) = (
        balance(&loads, &initial, s).overall,
        balance(&loads, &plan, s).overall,
        balance(&loads, &inc, s).overall,
    );
    println!(
        "V3 shape: {LAYERS} layers x {EXPERTS} experts, {} slots = {} workers x {s}, {} nodes, {} groups; \
         Zipf s=1; median of {RUNS} runs, {} threads",
        p.slots(),
        p.workers,
        p.nodes,
        p.groups,
        std::thread::available_parallelism().map_or(1, |t| t.get())
    );
    println!(
        "time: eplb {:.2} ms ({:.3} x 50 ms budget); incremental unbounded from p%256 {:.1} ms",
        ms(t_eplb),
        ms(t_eplb) / 50.0,
        ms(t_inc)
    );
    println!(
        "balance: initial {b_init:.4}, eplb {b_eplb:.4}, incremental unbounded {b_inc:.4} \
         (incremental/eplb {:.4}, goal >= 1.0)",
        b_inc / b_eplb
    );
    // The target depends only on the loads, so a second run on the result must not move.
    let again = incremental(&loads, &inc, &p, usize::MAX)?;
    println!(
        "moves from initial ({} slots): incremental {}, eplb aligned {}, eplb raw {}; \
         incremental re-run on its own output {}",
        LAYERS * p.slots(),
        moved(&initial, &inc),
        moved(&initial, &aligned),
        moved(&initial, &plan),
        moved(&inc, &again)
    );

    // Drift: the loads move by up to ±30% per expert after the old EPLB plan went live.
    let drifted: Vec<Vec<f64>> = loads
        .iter()
        .map(|l| l.iter().map(|&x| (x * (0.7 + 0.6 * rng.uniform())).round()).collect())
        .collect();
    let replan = eplb(&drifted, &p)?;
    let replan_aligned = eplb_aligned(&drifted, &plan, &p)?;
    let (t_free, free) = timed(|| incremental(&drifted, &plan, &p, usize::MAX));
    let free = free?;
    let (t_64, bounded) = timed(|| incremental(&drifted, &plan, &p, 64));
    let bounded = bounded?;
    let bal = |x: &[Vec<u32>]| balance(&drifted, x, s).overall;
    println!(
        "drift x U[0.7,1.3] from old eplb plan: balance stale {:.4}; eplb re-plan {:.4} ({} moves raw, {} aligned)",
        bal(&plan),
        bal(&replan),
        moved(&plan, &replan),
        moved(&plan, &replan_aligned)
    );
    println!(
        "drift incremental: unbounded {:.4} ({} moves, {:.1} ms); max_moves=64 {:.4} ({} moves, {:.1} ms)",
        bal(&free),
        moved(&plan, &free),
        ms(t_free),
        bal(&bounded),
        moved(&plan, &bounded),
        ms(t_64)
    );
    Ok(())
}
