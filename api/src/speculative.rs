//! The value of `--speculative` (router, `up`) and of a ModelDeployment's
//! `spec.router.speculative`, which the operator passes on as that flag: `mtp:K`, speculative
//! decoding with K draft tokens per decode step from the model's multi-token-prediction module
//! (DeepSeek-V3 report §2.2). One parser, so the operator refuses exactly what a router would.

/// The most draft tokens a step may verify. DeepSeek-V3 has one MTP module; drafts past the
/// first chain it on its own output, and their acceptance falls with each.
pub const MAX_DRAFT_TOKENS: usize = 4;

/// The draft tokens per step `value` asks for; the error says what is accepted.
pub fn parse(value: &str) -> Result<usize, String> {
    let bad = || {
        format!("{value:?} is not mtp:K with K from 1 to {MAX_DRAFT_TOKENS} (draft K tokens per step with the model's MTP module)")
    };
    let k: usize = value.strip_prefix("mtp:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
    if !(1..=MAX_DRAFT_TOKENS).contains(&k) {
        return Err(bad());
    }
    Ok(k)
}

/// The KV cache, in tokens of the main model's cache (`layers` layers), a request of
/// `tokens` (prompt + `max_tokens`) reserves with `drafts` draft tokens per step: room for
/// its drafts, and for the MTP module's cache, one layer's rows.
pub fn reservation(tokens: usize, drafts: usize, layers: usize) -> usize {
    match drafts {
        0 => tokens,
        k => (tokens + k) + (tokens + k).div_ceil(layers.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculation_reserves_its_drafts_and_the_mtp_cache() {
        assert_eq!(reservation(100, 0, 4), 100);
        // 3 drafts, and one layer's rows for 4 layers' worth of cache: (100 + 3) / 4 rounded up.
        assert_eq!(reservation(100, 3, 4), 103 + 26);
    }

    #[test]
    fn mtp_with_a_draft_count_in_range() {
        assert_eq!(parse("mtp:1"), Ok(1));
        assert_eq!(parse("mtp:4"), Ok(4));
        for bad in ["mtp:0", "mtp:5", "mtp:", "mtp:x", "eagle:2", "2", ""] {
            assert!(parse(bad).unwrap_err().contains("mtp:K with K from 1 to 4"), "{bad}");
        }
    }
}
