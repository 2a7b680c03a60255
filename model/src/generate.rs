//! Batched generation on one process: every sequence's prompt is prefilled in one step,
//! then all unfinished sequences decode together, one token each per step.

use crate::layers::RoutedExperts;
use crate::{KvCache, Model, Result, Sampler, SamplingParams};

/// One sequence to continue.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
}

/// Generates for every request together; returns each one's new tokens. A sequence stops
/// after `max_new_tokens` or after emitting one of the model's `eos_token_id`s (kept).
pub fn generate(model: &Model, requests: &[Request]) -> Result<Vec<Vec<u32>>> {
    generate_with(model, model, requests)
}

/// [`generate`] with the routed experts computed by `experts`.
pub fn generate_with(
    model: &Model,
    experts: &dyn RoutedExperts,
    requests: &[Request],
) -> Result<Vec<Vec<u32>>> {
    let mut samplers =
        requests.iter().map(|r| Sampler::new(r.sampling.clone())).collect::<Result<Vec<_>>>()?;
    let mut caches: Vec<KvCache> = requests.iter().map(|_| KvCache::new(&model.config)).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    // The tokens each running sequence feeds next; `None` once it has finished.
    let mut pending: Vec<Option<Vec<u32>>> =
        requests.iter().map(|r| (r.max_new_tokens > 0).then(|| r.prompt.clone())).collect();
    loop {
        let running: Vec<usize> = (0..pending.len()).filter(|i| pending[*i].is_some()).collect();
        if running.is_empty() {
            break;
        }
        let mut batch: Vec<(&mut KvCache, &[u32])> =
            caches.iter_mut().zip(&pending).filter_map(|(c, p)| p.as_deref().map(|t| (c, t))).collect();
        let tokens = batch.iter().map(|(_, t)| t.len()).sum();
        let logits = model.on_pool(tokens, || model.forward_step_with(&mut batch, experts))?;
        for (&i, row) in running.iter().zip(logits.chunks(model.config.vocab_size)) {
            let token = samplers[i].sample(row)?;
            outputs[i].push(token);
            let done =
                outputs[i].len() >= requests[i].max_new_tokens || model.config.eos_token_ids.contains(&token);
            pending[i] = (!done).then(|| vec![token]);
        }
    }
    Ok(outputs)
}
