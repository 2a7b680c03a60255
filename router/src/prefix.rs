//! Prefix caching: the latent KV rows of prompt prefixes already prefilled, kept in blocks of
//! [`BLOCK`] tokens and found by content, as vLLM's automatic prefix caching finds its KV
//! blocks: a block's key hashes its tokens and the key of the block before it, so one key
//! names the whole prefix up to the block's end. A request starts from the longest run of
//! cached blocks its prompt begins with, copied into its own cache, and prefills only the rest;
//! when a prompt's prefill completes, its whole blocks are stored. Past the byte budget the
//! least recently used blocks go first.
//!
//! Invariants: a block's rows are what prefilling its whole prefix computed (blocks are stored
//! only from a cache that prefilled the prompt from its first token); a hit is checked token
//! by token against the block's own tokens, so a hash collision is a miss, never another
//! prompt's rows; at least the prompt's last token is prefilled (its logits give the first
//! output token); the blocks held never exceed the budget (0 turns the cache off).
//!
//! Rows are copied, not shared: each running sequence owns one contiguous buffer per layer
//! (what the attention kernels read); pages shared copy-on-write would save the copy and the
//! memory of running sequences and are not built. Plain data and functions: the batch loop
//! owns one and calls it between steps.

use kubemoe_model::KvCache;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Tokens per block (vLLM's default block size).
pub const BLOCK: usize = 16;

/// Every layer's rows of one block ([`BLOCK`] tokens × the latent width each).
pub type Rows = Arc<Vec<Vec<f32>>>;

struct Entry {
    tokens: [u32; BLOCK],
    rows: Rows,
    bytes: usize,
    /// When it was last looked up or stored (the LRU order's key).
    used: u64,
}

/// The cached blocks, by key, and their use order.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    entries: HashMap<u64, Entry>,
    /// (last use, key), oldest first.
    order: BTreeSet<(u64, u64)>,
    clock: u64,
}

/// The key of the block of `tokens` following the prefix whose key is `parent`.
fn key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (parent, tokens).hash(&mut h);
    h.finish()
}

/// The key of each whole block of `tokens`, in order.
fn keys(tokens: &[u32]) -> impl Iterator<Item = (u64, &[u32])> {
    tokens.chunks_exact(BLOCK).scan(0u64, |parent, block| {
        *parent = key(*parent, block);
        Some((*parent, block))
    })
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of rows (0: off).
    pub fn new(budget: usize) -> Self {
        PrefixCache { budget, bytes: 0, entries: HashMap::new(), order: BTreeSet::new(), clock: 0 }
    }

    /// Bytes of rows held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Most bytes of rows held (0: off).
    pub fn budget(&self) -> usize {
        self.budget
    }

    fn touch(&mut self, key: u64) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            self.order.remove(&(e.used, key));
            e.used = self.clock;
            self.order.insert((e.used, key));
        }
    }

    /// The cached blocks `prompt` begins with, at most all but its last token, in order.
    pub fn lookup(&mut self, prompt: &[u32]) -> Vec<Rows> {
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        let mut found = Vec::new();
        for (k, block) in keys(usable) {
            match self.entries.get(&k) {
                Some(e) if e.tokens == block => found.push((k, e.rows.clone())),
                _ => break,
            }
        }
        found
            .into_iter()
            .map(|(k, rows)| {
                self.touch(k);
                rows
            })
            .collect()
    }

    /// Stores the whole blocks of `prompt` not cached yet, from `cache`, which prefilled all of
    /// `prompt` from its first token; evicts the least recently used past the budget.
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) -> kubemoe_model::Result<()> {
        if self.budget == 0 {
            return Ok(());
        }
        for (i, (k, block)) in keys(prompt).enumerate() {
            match self.entries.get(&k) {
                Some(e) if e.tokens == block => {
                    self.touch(k);
                    continue;
                }
                // Another prefix under the same key: keep the one cached.
                Some(_) => return Ok(()),
                None => {}
            }
            let rows = cache.rows(i * BLOCK, BLOCK)?;
            let bytes = rows.iter().map(|r| r.len() * 4).sum::<usize>();
            if bytes > self.budget {
                return Ok(());
            }
            while self.bytes + bytes > self.budget {
                let Some((_, oldest)) = self.order.pop_first() else { break };
                if let Some(e) = self.entries.remove(&oldest) {
                    self.bytes -= e.bytes;
                }
            }
            let mut tokens = [0u32; BLOCK];
            tokens.copy_from_slice(block);
            self.clock += 1;
            self.entries.insert(k, Entry { tokens, rows: Arc::new(rows), bytes, used: self.clock });
            self.order.insert((self.clock, k));
            self.bytes += bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kubemoe_model::{source, Experts};

    /// `builtin:tiny` and a cache that prefilled `prompt`.
    fn prefilled(prompt: &[u32]) -> (kubemoe_model::Model, KvCache) {
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let mut cache = KvCache::new(&model.config);
        model.forward_step(&mut [(&mut cache, prompt)]).unwrap();
        (model, cache)
    }

    #[test]
    fn prompts_find_the_whole_blocks_they_share_but_always_prefill_their_last_token() {
        let prompt: Vec<u32> = (0..40).collect();
        let (model, cache) = prefilled(&prompt);
        let mut prefixes = PrefixCache::new(1 << 30);
        assert!(prefixes.lookup(&prompt).is_empty());
        prefixes.insert(&prompt, &cache).unwrap();
        let block_bytes = BLOCK * model.config.kv_bytes_per_token();
        assert_eq!(prefixes.bytes(), 2 * block_bytes, "two whole blocks of 40 tokens");
        // The same prompt: both blocks (its last token is past them).
        let hit = prefixes.lookup(&prompt);
        assert_eq!(hit.len(), 2);
        assert_eq!(hit[1].as_slice(), cache.rows(BLOCK, BLOCK).unwrap());
        // A prompt of exactly 32 tokens: one block, its last token is prefilled.
        assert_eq!(prefixes.lookup(&prompt[..32]).len(), 1);
        // Another second block: only the first is shared; another first block: nothing.
        let mut other = prompt.clone();
        other[20] = 999;
        assert_eq!(prefixes.lookup(&other).len(), 1);
        other[0] = 999;
        assert!(prefixes.lookup(&other).is_empty());
        // The rows continue the sequence as its own prefill would.
        let mut copy = KvCache::new(&model.config);
        for rows in prefixes.lookup(&prompt) {
            copy.extend_rows(&rows, BLOCK, &model.config).unwrap();
        }
        let mut own = KvCache::new(&model.config);
        model.forward_step(&mut [(&mut own, &prompt[..32])]).unwrap();
        let (a, b) = (
            model.forward_step(&mut [(&mut copy, &prompt[32..])]).unwrap(),
            model.forward_step(&mut [(&mut own, &prompt[32..])]).unwrap(),
        );
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "{err}");
    }

    #[test]
    fn the_least_recently_used_blocks_go_past_the_budget_and_a_zero_budget_holds_nothing() {
        let a: Vec<u32> = (0..17).collect();
        let b: Vec<u32> = (100..117).collect();
        let c: Vec<u32> = (200..217).collect();
        let (_, cache_a) = prefilled(&a);
        let (_, cache_b) = prefilled(&b);
        let (_, cache_c) = prefilled(&c);
        let mut off = PrefixCache::new(0);
        off.insert(&a, &cache_a).unwrap();
        assert_eq!((off.bytes(), off.lookup(&a).len()), (0, 0));
        let mut one = PrefixCache::new(1 << 30);
        one.insert(&a, &cache_a).unwrap();
        let block = one.bytes();
        // Room for two blocks: a, b stored; a used; c evicts b (the least recently used).
        let mut two = PrefixCache::new(2 * block);
        two.insert(&a, &cache_a).unwrap();
        two.insert(&b, &cache_b).unwrap();
        assert_eq!(two.lookup(&a).len(), 1);
        two.insert(&c, &cache_c).unwrap();
        assert_eq!(two.bytes(), 2 * block);
        assert_eq!((two.lookup(&a).len(), two.lookup(&b).len(), two.lookup(&c).len()), (1, 0, 1));
        // A block larger than the whole budget is not stored.
        let mut small = PrefixCache::new(block - 1);
        small.insert(&a, &cache_a).unwrap();
        assert_eq!(small.bytes(), 0);
    }
}
