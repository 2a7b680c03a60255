//! Continuous-batching admission: between two steps, waiting requests join the running batch
//! in arrival order while the step's new tokens, the number of running sequences and the KV
//! cache reserved for them stay within their limits (Orca, Yu et al. OSDI 2022, iteration-
//! level scheduling). Each admitted sequence reserves cache for its prompt plus `max_tokens`,
//! so a running sequence never has to be preempted.
//!
//! Invariants: admission is FIFO (a request that does not fit blocks those behind it, so none
//! starves); a request is admitted into an empty batch even when its prompt alone exceeds
//! `max_batch_tokens`, so an oversize prompt delays others but cannot deadlock. A request's
//! reservation never exceeds `kv_budget_tokens` (the router refuses to start with a budget
//! smaller than one request of its context length, and requests longer than the context),
//! so an empty batch always admits the head of the queue and the loop never waits for room
//! that cannot come.

/// Limits on one step of the running batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// New tokens (prompt tokens of joining sequences plus one per decoding sequence) per step.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// Tokens of KV cache all running sequences may reserve together.
    pub kv_budget_tokens: usize,
}

/// What the running batch already uses in the next step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub running: usize,
    pub step_tokens: usize,
    pub reserved_tokens: usize,
}

/// A waiting request: its prompt length and the cache it needs (prompt + max_tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub prompt_len: usize,
    pub reserve_tokens: usize,
}

/// How many of `waiting` (in order) join the next step.
pub fn admit(limits: &Limits, mut usage: Usage, waiting: impl IntoIterator<Item = Waiting>) -> usize {
    let mut admitted = 0;
    for w in waiting {
        let first = usage.running == 0;
        let fits = usage.running < limits.max_running
            && (first || usage.step_tokens + w.prompt_len <= limits.max_batch_tokens)
            && usage.reserved_tokens + w.reserve_tokens <= limits.kv_budget_tokens;
        if !fits {
            break;
        }
        usage.running += 1;
        usage.step_tokens += w.prompt_len;
        usage.reserved_tokens += w.reserve_tokens;
        admitted += 1;
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_batch_tokens: 100, max_running: 3, kv_budget_tokens: 1000 };

    fn w(prompt_len: usize, reserve_tokens: usize) -> Waiting {
        Waiting { prompt_len, reserve_tokens }
    }

    #[test]
    fn joins_until_a_limit_is_reached() {
        // Step tokens: 40 + 50 fit, the third (20) would make 110.
        assert_eq!(admit(&LIMITS, Usage::default(), [w(40, 100), w(50, 100), w(20, 100)]), 2);
        // Running sequences cap.
        let busy = Usage { running: 2, step_tokens: 2, reserved_tokens: 0 };
        assert_eq!(admit(&LIMITS, busy, [w(1, 1), w(1, 1)]), 1);
        // KV budget.
        let full = Usage { running: 1, step_tokens: 1, reserved_tokens: 950 };
        assert_eq!(admit(&LIMITS, full, [w(1, 60)]), 0);
    }

    #[test]
    fn fifo_order_is_kept_and_oversize_prompts_run_alone() {
        // The second does not fit, so the small third waits behind it.
        assert_eq!(
            admit(
                &LIMITS,
                Usage { running: 1, step_tokens: 1, reserved_tokens: 0 },
                [w(10, 10), w(95, 95), w(1, 1)]
            ),
            1
        );
        // A prompt larger than a step joins an empty batch.
        assert_eq!(admit(&LIMITS, Usage::default(), [w(500, 600), w(1, 1)]), 1);
        // But never past the KV budget.
        assert_eq!(admit(&LIMITS, Usage::default(), [w(500, 2000)]), 0);
    }
}
