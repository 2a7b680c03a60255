//! Tests of the planners: the published EPLB vector, random problems, budgets, idempotence.

use super::eplb::policy;
use super::incremental::CLOSE_ENOUGH;
use super::search::NOISE;
use super::*;
use kubemoe_kernels::rng::Rng;

/// A random shape: hierarchical (groups split over nodes) or global, small enough for a
/// debug build.
fn shape(rng: &mut Rng, hierarchical: bool) -> (Problem, usize, usize) {
    let nodes = [1, 2, 4][rng.below(3)];
    let workers = nodes * (1 + rng.below(3));
    let groups = if hierarchical { nodes * (1 + rng.below(2)) } else { [3, 5][rng.below(2)] };
    let experts = groups * (1 + rng.below(64 / groups));
    let slots_per_worker = experts.div_ceil(workers) + rng.below(3);
    let layers = 1 + rng.below(6);
    (Problem { workers, nodes, groups, slots_per_worker, min_replicas: 1 }, experts, layers)
}

/// Zipf-like skew over a random permutation: a few hot experts, a long cold tail, some zeros.
fn skewed(rng: &mut Rng, experts: usize, layers: usize) -> Vec<Vec<f64>> {
    (0..layers)
        .map(|_| {
            let mut rank: Vec<usize> = (0..experts).collect();
            rng.shuffle(&mut rank);
            let skew = 0.5 + (rng.below(11) as f64) / 10.0;
            rank.iter()
                .map(|&r| (5000.0 / ((r + 1) as f64).powf(skew)).floor() * (rng.below(8) != 0) as u8 as f64)
                .collect()
        })
        .collect()
}

/// Every expert once, the spare slots random, all shuffled.
fn random_placement(rng: &mut Rng, experts: usize, p: &Problem) -> Vec<u32> {
    let mut layer: Vec<u32> =
        (0..p.slots()).map(|q| if q < experts { q } else { rng.below(experts) } as u32).collect();
    rng.shuffle(&mut layer);
    layer
}

fn assert_valid(plan: &[Vec<u32>], experts: usize, p: &Problem) {
    for layer in plan {
        assert_eq!(layer.len(), p.slots());
        let mut count = vec![0; experts];
        for &e in layer {
            count[e as usize] += 1;
        }
        assert!(count.iter().all(|&c| c >= 1), "an expert has no slot: {layer:?}");
    }
}

#[test]
fn eplb_reproduces_the_published_vector() {
    let loads = vec![
        vec![90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0],
        vec![20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0],
    ];
    let p = Problem { workers: 8, nodes: 2, groups: 4, slots_per_worker: 2, min_replicas: 1 };
    let plan = eplb(&loads, &p).unwrap();
    assert_eq!(
        plan,
        vec![
            vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
        ]
    );
}

#[test]
fn eplb_plans_are_valid_and_keep_groups_on_their_node() {
    let mut rng = Rng::new(1);
    for case in 0..40 {
        let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
        let loads = skewed(&mut rng, experts, layers);
        let plan = eplb(&loads, &p).unwrap();
        assert_eq!(plan.len(), layers);
        assert_valid(&plan, experts, &p);
        if policy(experts, &p).1 > 1 {
            let (group_size, node_slots) = (experts / p.groups, p.slots() / p.nodes);
            for layer in &plan {
                let mut node_of_group = vec![None; p.groups];
                for (q, &e) in layer.iter().enumerate() {
                    let node = node_of_group[e as usize / group_size].get_or_insert(q / node_slots);
                    assert_eq!(*node, q / node_slots, "group of expert {e} spans nodes: {p:?}");
                }
            }
        }
    }
}

#[test]
fn eplb_aligned_keeps_eplb_balance_and_undoes_a_relabelling() {
    let mut rng = Rng::new(2);
    for case in 0..30 {
        let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
        let loads = skewed(&mut rng, experts, layers);
        let plan = eplb(&loads, &p).unwrap();
        let current: Vec<Vec<u32>> = (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
        let aligned = eplb_aligned(&loads, &current, &p).unwrap();
        assert_valid(&aligned, experts, &p);
        let (b_plan, b_aligned) =
            (balance(&loads, &plan, p.slots_per_worker), balance(&loads, &aligned, p.slots_per_worker));
        for (x, y) in b_plan.per_layer.iter().zip(&b_aligned.per_layer) {
            assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
        assert!(moved(&current, &aligned) <= moved(&current, &plan));

        // EPLB's plan with nodes, workers within nodes and slots within workers shuffled.
        let per_node = p.workers / p.nodes;
        let mut nodes: Vec<usize> = (0..p.nodes).collect();
        rng.shuffle(&mut nodes);
        let mut workers: Vec<usize> = Vec::new();
        for &n in &nodes {
            let mut within: Vec<usize> = (n * per_node..(n + 1) * per_node).collect();
            rng.shuffle(&mut within);
            workers.extend(within);
        }
        let relabelled: Vec<Vec<u32>> = plan
            .iter()
            .map(|layer| {
                workers
                    .iter()
                    .flat_map(|&w| {
                        let mut slots = layer[w * p.slots_per_worker..(w + 1) * p.slots_per_worker].to_vec();
                        rng.shuffle(&mut slots);
                        slots
                    })
                    .collect()
            })
            .collect();
        assert_eq!(eplb_aligned(&loads, &relabelled, &p).unwrap(), relabelled);
    }
}

#[test]
fn incremental_stays_within_budget_and_never_worsens_a_layer() {
    let mut rng = Rng::new(3);
    for case in 0..16 {
        let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
        let loads = skewed(&mut rng, experts, layers);
        let current: Vec<Vec<u32>> = (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
        let before = balance(&loads, &current, p.slots_per_worker);
        for budget in [0, 1, 2, 5, 20, usize::MAX] {
            let plan = incremental(&loads, &current, &p, budget).unwrap();
            assert_valid(&plan, experts, &p);
            assert!(moved(&current, &plan) <= budget, "{} moves over {budget}", moved(&current, &plan));
            if budget == 0 {
                assert_eq!(plan, current);
            }
            let after = balance(&loads, &plan, p.slots_per_worker);
            for (b, a) in before.per_layer.iter().zip(&after.per_layer) {
                assert!(a >= &(b - 1e-12), "layer got worse: {b} -> {a}");
            }
            assert_eq!(plan, incremental(&loads, &current, &p, budget).unwrap(), "not deterministic");
        }
    }
}

#[test]
fn incremental_unbounded_beats_eplb_balance() {
    let mut rng = Rng::new(4);
    let (mut ours_sum, mut theirs_sum, mut better) = (0.0, 0.0, 0);
    let cases = 16;
    for case in 0..cases {
        let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
        let loads = skewed(&mut rng, experts, layers);
        let current: Vec<Vec<u32>> = (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
        let plan = incremental(&loads, &current, &p, usize::MAX).unwrap();
        let ours = balance(&loads, &plan, p.slots_per_worker).overall;
        let theirs = balance(&loads, &eplb(&loads, &p).unwrap(), p.slots_per_worker).overall;
        // Never below EPLB's, up to the search's tolerance.
        assert!(ours >= theirs * (1.0 - 2.0 * NOISE), "case {case}: {ours} < {theirs}");
        ours_sum += ours;
        theirs_sum += theirs;
        better += usize::from(ours > theirs * (1.0 + CLOSE_ENOUGH));
    }
    println!(
        "summed balances over {cases} cases, incremental unbounded / eplb: {:.4}; {better} cases \
         better by over {CLOSE_ENOUGH}",
        ours_sum / theirs_sum
    );
    // EPLB's greedy packing leaves balance that the refinement finds on skewed loads with
    // spare slots (small problems are often already optimal): on these seeded cases the mean
    // balances sum 9% higher and 6 cases gain over 0.5%, so the bars below are margins, not coin tosses.
    assert!(ours_sum > 1.02 * theirs_sum, "{ours_sum} vs eplb {theirs_sum}");
    assert!(better * 4 >= cases, "only {better} of {cases} cases better than eplb");
}

#[test]
fn incremental_on_its_own_unbounded_output_moves_nothing() {
    let mut rng = Rng::new(5);
    for case in 0..16 {
        let (p, experts, layers) = shape(&mut rng, case % 2 == 0);
        let loads = skewed(&mut rng, experts, layers);
        let random: Vec<Vec<u32>> = (0..layers).map(|_| random_placement(&mut rng, experts, &p)).collect();
        // From a random placement and from EPLB's plan, which is no longer a fixed point.
        for current in [random, eplb(&loads, &p).unwrap()] {
            let once = incremental(&loads, &current, &p, usize::MAX).unwrap();
            let twice = incremental(&loads, &once, &p, usize::MAX).unwrap();
            assert_eq!(moved(&once, &twice), 0, "case {case}: {p:?}");
        }
    }
}

#[test]
fn balance_of_a_hand_computed_placement() {
    // Layer 0: expert 0 (6 tokens) on both workers, 3 each: worker 0 = 3 + 2, worker 1 = 3 + 4.
    // Layer 1: every worker 1 token.
    let loads = vec![vec![6.0, 2.0, 4.0], vec![1.0, 1.0]];
    let placement = vec![vec![0, 1, 0, 2], vec![0, 1, 1, 0]];
    let b = balance(&loads, &placement, 2);
    assert_eq!(b.per_layer, vec![6.0 / 7.0, 1.0]);
    assert_eq!(b.overall, (6.0 + 1.0) / (7.0 + 1.0));
    assert_eq!(balance(&[vec![0.0, 0.0]], &[vec![0, 1]], 1).overall, 1.0);
}

#[test]
fn moved_counts_changed_slots() {
    let from = vec![vec![0, 1, 2, 0], vec![1, 0, 1, 0]];
    let to = vec![vec![0, 2, 1, 0], vec![1, 0, 1, 0]];
    assert_eq!(moved(&from, &to), 2);
    assert_eq!(moved(&from, &from), 0);
    assert_eq!(moved(&from[..1], &to), 2 + 4);
}

#[test]
fn invalid_inputs_say_what_to_change() {
    let p = Problem { workers: 2, nodes: 1, groups: 1, slots_per_worker: 2, min_replicas: 1 };
    let loads = vec![vec![1.0, 2.0, 3.0]];
    let current = vec![vec![0, 1, 2, 0]];
    let msg = |r: Result<Vec<Vec<u32>>>| match r {
        Err(Error::InvalidPlacement(m)) => m,
        Err(other) => panic!("{other}"),
        Ok(plan) => panic!("accepted: {plan:?}"),
    };
    for (field, bad) in [
        ("workers is 0", Problem { workers: 0, ..p }),
        ("slots_per_worker is 0", Problem { slots_per_worker: 0, ..p }),
        ("nodes is 0", Problem { nodes: 0, ..p }),
        ("groups is 0", Problem { groups: 0, ..p }),
        ("workers (2) is not a multiple of nodes (4)", Problem { nodes: 4, ..p }),
        ("fewer than experts (3): add workers or slots_per_worker", Problem { workers: 1, ..p }),
    ] {
        assert!(msg(eplb(&loads, &bad)).contains(field), "{field}");
        assert!(msg(incremental(&loads, &current, &bad, 4)).contains(field), "{field}");
    }
    assert!(msg(eplb(&[vec![1.0, 2.0], vec![1.0]], &p)).contains("layer 1 have 1 experts but layer 0 has 2"));
    assert!(msg(eplb(&[vec![1.0, -2.0]], &p))
        .contains("expert 1 in layer 0 is -2: loads must be finite, non-negative"));
    assert!(msg(eplb(&[vec![f64::NAN, 2.0]], &p)).contains("expert 0 in layer 0 is NaN"));
    for (what, bad) in [
        ("current has 2 layers but loads have 1", vec![vec![0, 1, 2, 0], vec![0, 1, 2, 0]]),
        ("current layer 0 has 3 slots but workers × slots_per_worker is 4", vec![vec![0, 1, 2]]),
        ("slot 3 holds expert id 3, but there are 3 experts: use ids below 3", vec![vec![0, 1, 2, 3]]),
        ("current layer 0 gives expert 2 no slot", vec![vec![0, 1, 1, 0]]),
    ] {
        assert!(msg(incremental(&loads, &bad, &p, 4)).contains(what), "{what}");
        assert!(msg(eplb_aligned(&loads, &bad, &p)).contains(what), "{what}");
    }
}

/// Distinct workers of each expert in `layer`.
fn workers_of(layer: &[u32], experts: usize, s: usize) -> Vec<usize> {
    (0..experts as u32)
        .map(|e| {
            let mut on: Vec<usize> = (0..layer.len()).filter(|&p| layer[p] == e).map(|p| p / s).collect();
            on.dedup();
            on.len()
        })
        .collect()
}

#[test]
fn both_planners_keep_every_expert_on_min_replicas_workers() {
    let mut rng = Rng::new(11);
    for case in 0..30 {
        let m = 2 + rng.below(2);
        let workers = m + rng.below(4);
        let experts = 4 + rng.below(20);
        // At least m copies of every expert, some spare.
        let slots_per_worker = (experts * m).div_ceil(workers) + rng.below(3);
        let p = Problem { workers, nodes: 1, groups: 1, slots_per_worker, min_replicas: m };
        let loads = skewed(&mut rng, experts, 2);
        let full = eplb(&loads, &p).unwrap();
        assert_valid(&full, experts, &p);
        // The initial plan's spacing holds when a worker has no more slots than experts.
        let current: Vec<Vec<u32>> =
            (0..2).map(|_| (0..p.slots()).map(|q| (q % experts) as u32).collect()).collect();
        let from_current = incremental(&loads, &current, &p, usize::MAX).unwrap();
        for (name, plan) in [("eplb", &full), ("incremental", &from_current)] {
            for layer in plan {
                let spread = workers_of(layer, experts, slots_per_worker);
                assert!(
                    spread.iter().all(|&w| w >= m),
                    "case {case} {name} m={m} {p:?}: {spread:?} {layer:?}"
                );
            }
        }
    }
}

#[test]
fn spread_swaps_duplicates_apart_keeping_the_loads_even() {
    // Two workers of four slots, each holding two copies of two experts.
    let p = Problem { workers: 2, nodes: 1, groups: 1, slots_per_worker: 4, min_replicas: 2 };
    let load = [10.0, 10.0, 10.0, 10.0];
    let layer = spread(vec![0, 0, 1, 1, 2, 2, 3, 3], &load, &p).unwrap();
    assert_eq!(workers_of(&layer, 4, 4), [2, 2, 2, 2], "{layer:?}");
    // Swaps only: every expert keeps its two copies, every worker its 20 tokens.
    let mut sorted = layer.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 0, 1, 1, 2, 2, 3, 3]);
    assert_eq!(worker_loads(&load, &layer, 4), [20.0, 20.0]);
    // Already spread: unchanged.
    assert_eq!(spread(layer.clone(), &load, &p).unwrap(), layer);
    // More than the workers can hold apart is refused by the problem check.
    let three = Problem { min_replicas: 3, ..p };
    assert!(eplb(&[load.to_vec()], &three).unwrap_err().to_string().contains("min_replicas (3)"));
}
