//! The dispatch plan of one MoE layer: which rows go to which worker, each token
//! once per destination worker however many of its experts live there, and how the partial
//! sums come back. Pure functions; the transport only moves the bytes they produce.
//!
//! Only workers marked live take part: a replicated expert whose holder is down is served by
//! its other holders, and an expert all of whose holders are down is an error naming them.
//!
//! A replicated expert's tokens go, one by one, to the least-loaded of the workers holding it
//! (as DeepSeek-V3's redundant experts are used, arXiv:2412.19437 §3.4): load is the routes already planned for each worker in this layer; ties go to a
//! worker that already receives the token (no extra activation bytes), then to the lower rank.

use kubemoe_kernels::dtype::{extend_f32_le, f32s_from_le};
use kubemoe_model::layers::Routing;

/// What one worker receives for one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerBatch {
    /// Rows of the layer input, in the order they are sent.
    pub rows: Vec<usize>,
    /// (index into `rows`, logical expert, gate weight).
    pub routes: Vec<(u32, u32, f32)>,
}

impl WorkerBatch {
    /// Activations [rows, hidden] as little-endian f32, and routes as [`kubemoe_api::route`] records.
    pub fn encode(&self, x: &[f32], hidden: usize) -> (Vec<u8>, Vec<u8>) {
        let mut act = Vec::with_capacity(self.rows.len() * hidden * 4);
        for &r in &self.rows {
            extend_f32_le(&mut act, &x[r * hidden..(r + 1) * hidden]);
        }
        (act, kubemoe_api::route::encode(&self.routes))
    }

    /// `out[rows[i]] += partial[i]` for the worker's little-endian f32 reply.
    pub fn combine(&self, partial: &[u8], hidden: usize, out: &mut [f32]) -> Result<(), String> {
        if partial.len() != self.rows.len() * hidden * 4 {
            return Err(format!(
                "reply holds {} bytes, expected {}",
                partial.len(),
                self.rows.len() * hidden * 4
            ));
        }
        let partial = f32s_from_le(partial);
        for (&r, row) in self.rows.iter().zip(partial.chunks_exact(hidden)) {
            out[r * hidden..(r + 1) * hidden].iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        Ok(())
    }
}

/// Splits `routing` over the workers `live[w]` marks up: `holders[e]` are the workers holding
/// logical expert `e` (never empty for a valid placement; an expert without a live holder is
/// an error, never a dropped route).
pub fn plan(routing: &Routing, holders: &[Vec<u32>], live: &[bool]) -> Result<Vec<WorkerBatch>, String> {
    let mut batches = vec![WorkerBatch::default(); live.len()];
    let k = routing.top_k;
    for (token, (ids, weights)) in routing.ids.chunks(k).zip(routing.weights.chunks(k)).enumerate() {
        for (&e, &w) in ids.iter().zip(weights) {
            let chosen = holders
                .get(e as usize)
                .into_iter()
                .flatten()
                .filter(|&&h| live.get(h as usize) == Some(&true))
                .min_by_key(|&&h| {
                    let b = &batches[h as usize];
                    (b.routes.len(), b.rows.last() != Some(&token), h)
                })
                .ok_or_else(|| match holders.get(e as usize) {
                    Some(down) if !down.is_empty() => {
                        format!("every worker holding expert {e} is down ({down:?})")
                    }
                    _ => format!("no worker of the placement holds expert {e}"),
                })?;
            let b = &mut batches[*chosen as usize];
            if b.rows.last() != Some(&token) {
                b.rows.push(token);
            }
            b.routes.push((b.rows.len() as u32 - 1, e, w));
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_goes_once_to_each_worker_holding_its_experts() {
        // 4 experts, experts 0,1 on worker 0 and 2,3 on worker 1; top-2.
        let routing =
            Routing { top_k: 2, ids: vec![0, 1, 1, 3, 2, 3], weights: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6] };
        let b = plan(&routing, &[vec![0], vec![0], vec![1], vec![1]], &[true; 2]).unwrap();
        assert_eq!(b[0].rows, vec![0, 1]);
        assert_eq!(b[0].routes, vec![(0, 0, 0.1), (0, 1, 0.2), (1, 1, 0.3)]);
        assert_eq!(b[1].rows, vec![1, 2]);
        assert_eq!(b[1].routes, vec![(0, 3, 0.4), (1, 2, 0.5), (1, 3, 0.6)]);
    }

    #[test]
    fn replicated_experts_go_to_the_least_loaded_holder() {
        // Expert 0 on workers 0 and 1, expert 1 on worker 0 only; top-1, four tokens.
        let holders = [vec![0, 1], vec![0]];
        let routing = Routing { top_k: 1, ids: vec![1, 0, 0, 0], weights: vec![1.0; 4] };
        let b = plan(&routing, &holders, &[true; 2]).unwrap();
        // Token 0 loads worker 0, so token 1 goes to worker 1, token 2 back to worker 0 (tie,
        // lower rank), token 3 to worker 1.
        assert_eq!(b[0].rows, vec![0, 2]);
        assert_eq!(b[1].rows, vec![1, 3]);
        // A tie goes to the worker the token already travels to (no extra activation bytes):
        // after token 0 and token 1's expert 1, both workers have 2 routes; token 1's expert 0
        // joins it on worker 1 rather than going to the lower rank.
        let holders = [vec![0, 1], vec![1], vec![0]];
        let routing = Routing { top_k: 3, ids: vec![2, 2, 1, 1, 0, 2], weights: vec![1.0; 6] };
        let b = plan(&routing, &holders, &[true; 2]).unwrap();
        assert_eq!(b[1].rows, vec![0, 1]);
        assert_eq!(b[1].routes, vec![(0, 1, 1.0), (1, 1, 1.0), (1, 0, 1.0)]);
        assert_eq!(b[0].routes, vec![(0, 2, 1.0), (0, 2, 1.0), (1, 2, 1.0)]);
        // Every route is planned exactly once, whatever the replication.
        let routing = Routing { top_k: 2, ids: (0..64).map(|i| i % 3).collect(), weights: vec![1.0; 64] };
        let holders = [vec![0, 1, 2], vec![1], vec![0, 2]];
        let b = plan(&routing, &holders, &[true; 3]).unwrap();
        assert!(plan(&routing, &holders[..2], &[true; 3]).unwrap_err().contains("expert 2"));
        assert_eq!(b.iter().map(|b| b.routes.len()).sum::<usize>(), 64);
        for (w, batch) in b.iter().enumerate() {
            assert!(batch.routes.iter().all(|(_, e, _)| holders[*e as usize].contains(&(w as u32))));
        }
    }

    #[test]
    fn workers_down_are_routed_around_through_the_replicas() {
        // Expert 0 on workers 0 and 1, expert 1 on worker 1 only; worker 1 down.
        let holders = [vec![0, 1], vec![1]];
        let routing = Routing { top_k: 1, ids: vec![0, 0, 0], weights: vec![1.0; 3] };
        let b = plan(&routing, &holders, &[true, false]).unwrap();
        assert_eq!((b[0].rows.clone(), b[1].rows.clone()), (vec![0, 1, 2], vec![]));
        let routing = Routing { top_k: 1, ids: vec![0, 1], weights: vec![1.0; 2] };
        let err = plan(&routing, &holders, &[true, false]).unwrap_err();
        assert_eq!(err, "every worker holding expert 1 is down ([1])");
    }

    #[test]
    fn encode_and_combine_round_trip() {
        let b = WorkerBatch { rows: vec![2, 0], routes: vec![(0, 5, 1.0), (1, 5, 1.0)] };
        let x = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let (act, routes) = b.encode(&x, 2);
        assert_eq!(act.len(), 16);
        assert_eq!(routes.len(), 24);
        let mut out = vec![1.0f32; 6];
        b.combine(&act, 2, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 1.0, 1.0, 5.0, 6.0]);
        assert!(b.combine(&act[..8], 2, &mut out).is_err());
    }
}
