//! Continuous batching: between two steps, waiting requests join the running batch in arrival
//! order while the number of running sequences and the KV cache reserved for them stay within
//! their limits (Orca, Yu et al. OSDI 2022, iteration-level scheduling), and [`chunks`] splits
//! the step's token budget among them: one token for each decoding sequence first, then the
//! prompts still being prefilled, in order, a chunk each (chunked prefill, as in Sarathi-Serve,
//! Agrawal et al. OSDI 2024), so a long prompt no longer stalls every running stream for its
//! whole prefill. Each admitted sequence reserves cache for its prompt plus `max_tokens`, so a
//! running sequence never has to be preempted.
//!
//! Invariants: admission is FIFO (a request that does not fit blocks those behind it, so none
//! starves); a request's reservation never exceeds `kv_budget_tokens` (the router refuses to
//! start with a budget smaller than one request of its context length, and requests longer
//! than the context), so an empty batch always admits the head of the queue and the loop never
//! waits for room that cannot come. Every step feeds every decoding sequence and at least one
//! token of the first prompt being prefilled, so every sequence progresses.

/// Limits on one step of the running batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// New tokens (one per decoding sequence plus prompt chunks) per step.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// Tokens of KV cache all running sequences may reserve together.
    pub kv_budget_tokens: usize,
    /// Micro-batches a step runs in, overlapping one's dispatch with the other's compute
    /// ([`crate::engine::forward`]): 1 or 2.
    pub micro_batches: usize,
    /// Draft tokens per decode step (`--speculative mtp:K`; 0: no speculation). They count in
    /// `max_batch_tokens`.
    pub speculative_tokens: usize,
}

impl Limits {
    /// The KV cache a sequence of `tokens` (prompt + `max_tokens`) reserves in a model of
    /// `layers` layers ([`kubemoe_api::speculative::reservation`]).
    pub fn reservation(&self, tokens: usize, layers: usize) -> usize {
        kubemoe_api::speculative::reservation(tokens, self.speculative_tokens, layers)
    }
}

/// What the running batch already uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub running: usize,
    pub reserved_tokens: usize,
}

/// How many of `waiting` (in order; the cache each needs: prompt + max_tokens) join the
/// running batch.
pub fn admit(limits: &Limits, mut usage: Usage, waiting: impl IntoIterator<Item = usize>) -> usize {
    let mut admitted = 0;
    for reserve in waiting {
        let fits =
            usage.running < limits.max_running && usage.reserved_tokens + reserve <= limits.kv_budget_tokens;
        if !fits {
            break;
        }
        usage.running += 1;
        usage.reserved_tokens += reserve;
        admitted += 1;
    }
    admitted
}

/// Tokens each running sequence feeds in the next step, given the tokens each has pending (one
/// for a decoding sequence, what is left of the prompt for one being prefilled), in batch
/// order: every sequence with one pending token gets it, then those with more take what is
/// left of `max_batch_tokens`, in order; the first of them gets at least one token, so that
/// prefills progress even when decodes fill the step. A sequence given 0 sits the step out.
pub fn chunks(max_batch_tokens: usize, pending: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = pending.iter().map(|&p| p.min(1)).collect();
    let mut left = max_batch_tokens.saturating_sub(pending.iter().filter(|&&p| p == 1).count());
    let mut first = true;
    for (given, &p) in out.iter_mut().zip(pending).filter(|(_, p)| **p > 1) {
        *given = p.min(left.max(usize::from(first)));
        left -= (*given).min(left);
        first = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_batch_tokens: 100,
        max_running: 3,
        kv_budget_tokens: 1000,
        micro_batches: 1,
        speculative_tokens: 0,
    };

    #[test]
    fn joins_in_order_until_a_limit_is_reached() {
        // Running sequences cap.
        assert_eq!(admit(&LIMITS, Usage { running: 2, reserved_tokens: 0 }, [1, 1]), 1);
        // KV budget, FIFO: the small third waits behind the second that does not fit.
        assert_eq!(admit(&LIMITS, Usage { running: 0, reserved_tokens: 900 }, [50, 60, 1]), 1);
        // A prompt larger than a step joins (it is prefilled in chunks), never past the budget.
        assert_eq!(admit(&LIMITS, Usage::default(), [600]), 1);
        assert_eq!(admit(&LIMITS, Usage::default(), [2000]), 0);
    }

    #[test]
    fn decodes_go_first_then_prompts_take_chunks_of_what_is_left() {
        // Three decodes, two prompts: 97 tokens left, the first prompt takes 40, the second 57.
        assert_eq!(chunks(100, &[1, 40, 1, 500, 1]), [1, 40, 1, 57, 1]);
        // The step is full: the second prompt sits it out.
        assert_eq!(chunks(10, &[1, 9, 30]), [1, 9, 0]);
        // Decodes alone past the budget: the first prompt still gets a token.
        assert_eq!(chunks(2, &[1, 1, 1, 50, 50]), [1, 1, 1, 1, 0]);
        // A short prompt is fed whole.
        assert_eq!(chunks(100, &[7]), [7]);
        for budget in [1, 3, 64] {
            let pending = [1, 300, 1, 2, 1, 1000];
            let c = chunks(budget, &pending);
            assert!(c.iter().zip(&pending).all(|(c, p)| c <= p));
            assert!(pending.iter().zip(&c).all(|(p, c)| *p != 1 || *c == 1), "{c:?}: every decode");
            assert!(c[1] >= 1, "{c:?}: the first prompt progresses");
        }
    }
}
