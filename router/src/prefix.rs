//! Prefix caching: the latent KV rows of prompt prefixes already prefilled, kept in pages of
//! [`PAGE_TOKENS`] tokens (a block: a page per layer) and found by content, as vLLM's
//! automatic prefix caching finds its KV blocks: a block's key hashes its tokens and the key of
//! the block before it, so one key names the whole prefix up to the block's end. A request
//! starts from the longest run of cached blocks its prompt begins with, sharing their pages
//! (read in place, never copied or written: [`KvCache::share`]), and prefills only the rest;
//! when a prompt's prefill completes, the whole blocks not cached yet are copied once into one
//! run of pages (so that a later prompt's hit is one contiguous slice per layer for attention).
//!
//! Invariants: a hit is checked block by block from the prompt's first, against each block's
//! own tokens and the key of the block before it, and keys are hashed with keys drawn at
//! random per process, so that another prompt's rows are served only on a 64-bit collision
//! nobody can search for offline (vLLM's CVE-2025-25183 was predictable hashes); at least the
//! prompt's last token is prefilled (its logits give the first output token); the runs held
//! never exceed the budget (0 turns the cache off). A block's rows are what prefilling its
//! prefix computed, to float rounding: a prompt that itself started from cached blocks stores
//! its later blocks too, computed in another batch shape than a whole prefill.
//!
//! Eviction goes least recently used and deepest block first: a prefix's blocks are marked
//! used from its last to its first, so its first block is evicted last (a block whose parent
//! is gone could never be found again). A run's memory is freed with its last block, so the
//! budget counts whole runs and eviction goes on until what is left fits; a prompt larger than
//! the budget stores what fits of its beginning rather than evicting it. A run that a running
//! sequence reads is not evicted: its memory is counted here, once however many sequences
//! share it, and those sequences reserve KV budget only for their own rows
//! ([`PrefixCache::cached_tokens`]), as vLLM's block manager counts a shared block once.
//! Plain data and functions: the batch loop owns one and calls it between steps.

use kubemoe_model::{KvCache, Pages, PAGE_TOKENS};
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

/// A cached block: a run of pages and the block's page in it, as [`KvCache::share`] takes it.
pub type Block = (Pages, usize);

struct Entry {
    tokens: [u32; PAGE_TOKENS],
    /// The key of the block before it (0 for a prompt's first).
    parent: u64,
    block: Block,
    /// The run it was stored in.
    run: u64,
    /// When it was last looked up or stored (the LRU order's key).
    used: u64,
}

/// Pages stored together, and how many of its blocks the cache holds.
struct Run {
    pages: Pages,
    blocks: usize,
    bytes: usize,
}

impl Run {
    /// Whether a cache reads it: held elsewhere than by its blocks and this.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.pages) > self.blocks + 1
    }
}

/// The cached blocks, by key, and their use order.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    entries: HashMap<u64, Entry>,
    /// (last use, key), oldest first.
    order: BTreeSet<(u64, u64)>,
    runs: HashMap<u64, Run>,
    clock: u64,
    /// SipHash with keys drawn at random for this process.
    hasher: std::collections::hash_map::RandomState,
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of rows (0: off).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            bytes: 0,
            entries: HashMap::new(),
            order: BTreeSet::new(),
            runs: HashMap::new(),
            clock: 0,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Bytes of rows held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Most bytes of rows held (0: off).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// (key, parent key, tokens) of each whole block of `tokens`, in order.
    fn blocks<'t>(&self, tokens: &'t [u32]) -> Vec<(u64, u64, &'t [u32])> {
        let mut parent = 0u64;
        tokens
            .chunks_exact(PAGE_TOKENS)
            .map(|block| {
                let key = self.hasher.hash_one((parent, block));
                let out = (key, parent, block);
                parent = key;
                out
            })
            .collect()
    }

    /// Whether `key` holds the block `tokens` after the block `parent`.
    fn holds(&self, key: u64, parent: u64, tokens: &[u32]) -> bool {
        self.entries.get(&key).is_some_and(|e| e.parent == parent && e.tokens == tokens)
    }

    /// Marks `keys` used, the last first: the first is then the most recently used.
    fn touch(&mut self, keys: &[u64]) {
        for key in keys.iter().rev() {
            self.clock += 1;
            if let Some(e) = self.entries.get_mut(key) {
                self.order.remove(&(e.used, *key));
                e.used = self.clock;
                self.order.insert((e.used, *key));
            }
        }
    }

    /// Evicts the least recently used block that is neither one of `keep` nor in a run a
    /// cache reads (false when there is none), freeing its run's bytes with the run's last
    /// block.
    fn evict(&mut self, keep: &[u64]) -> bool {
        let evictable = |key: &u64| {
            !keep.contains(key)
                && self.entries.get(key).is_some_and(|e| self.runs.get(&e.run).is_none_or(|r| !r.in_use()))
        };
        let Some(&(used, key)) = self.order.iter().find(|(_, key)| evictable(key)) else {
            return false;
        };
        self.order.remove(&(used, key));
        if let Some(e) = self.entries.remove(&key) {
            if let Some(run) = self.runs.get_mut(&e.run) {
                run.blocks -= 1;
                if run.blocks == 0 {
                    self.bytes -= run.bytes;
                    self.runs.remove(&e.run);
                }
            }
        }
        true
    }

    /// Keys of the cached blocks `prompt` begins with, at most all but its last token.
    fn found(&self, prompt: &[u32]) -> Vec<u64> {
        if self.entries.is_empty() {
            return Vec::new(); // nothing to hash for (a cache that is off holds nothing)
        }
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        self.blocks(usable)
            .into_iter()
            .take_while(|(key, parent, block)| self.holds(*key, *parent, block))
            .map(|(key, _, _)| key)
            .collect()
    }

    /// Tokens of `prompt` that [`PrefixCache::lookup`] would find now.
    pub fn cached_tokens(&self, prompt: &[u32]) -> usize {
        self.found(prompt).len() * PAGE_TOKENS
    }

    /// The cached blocks `prompt` begins with, at most all but its last token, in order.
    pub fn lookup(&mut self, prompt: &[u32]) -> Vec<Block> {
        let found = self.found(prompt);
        self.touch(&found);
        found.iter().filter_map(|k| self.entries.get(k).map(|e| e.block.clone())).collect()
    }

    /// Stores the whole blocks of `prompt` not cached yet, from `cache`, which holds all of
    /// `prompt`, as one run; evicts the least recently used past the budget, never a block of
    /// `prompt` (what does not fit then is not stored).
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) -> kubemoe_model::Result<()> {
        if self.budget == 0 {
            return Ok(());
        }
        let block_bytes = cache.bytes() / cache.len().max(1) * PAGE_TOKENS;
        let blocks = self.blocks(prompt);
        let mut stored = Vec::with_capacity(blocks.len());
        // The blocks to store: from the first not cached, while they fit.
        let mut new = Vec::new();
        for &(key, parent, block) in &blocks {
            if new.is_empty() && self.holds(key, parent, block) {
                stored.push(key);
                continue;
            }
            if self.entries.contains_key(&key) {
                break; // another prefix under the same key: keep the one cached
            }
            let needed = (new.len() + 1) * block_bytes;
            if needed > self.budget {
                break;
            }
            while self.bytes + needed > self.budget && self.evict(&stored) {}
            if self.bytes + needed > self.budget {
                break;
            }
            new.push((key, parent, block));
        }
        if !new.is_empty() {
            let first = stored.len();
            let pages: Pages = Arc::new(cache.rows(first * PAGE_TOKENS, new.len() * PAGE_TOKENS)?);
            self.clock += 1;
            let run = self.clock;
            self.runs
                .insert(run, Run { pages: pages.clone(), blocks: new.len(), bytes: new.len() * block_bytes });
            self.bytes += new.len() * block_bytes;
            for (page, (key, parent, block)) in new.into_iter().enumerate() {
                let mut tokens = [0u32; PAGE_TOKENS];
                tokens.copy_from_slice(block);
                self.clock += 1;
                let entry = Entry { tokens, parent, block: (pages.clone(), page), run, used: self.clock };
                self.entries.insert(key, entry);
                self.order.insert((self.clock, key));
                stored.push(key);
            }
        }
        self.touch(&stored);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kubemoe_model::{source, Experts};
    use std::sync::Arc;

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
        let block_bytes = PAGE_TOKENS * model.config.kv_bytes_per_token();
        assert_eq!(prefixes.bytes(), 2 * block_bytes, "two whole blocks of 40 tokens");
        // The same prompt: both blocks (its last token is past them).
        let hit = prefixes.lookup(&prompt);
        assert_eq!(hit.len(), 2);
        // One run of pages for the prompt's blocks, found in place.
        assert!(Arc::ptr_eq(&hit[0].0, &hit[1].0) && (hit[0].1, hit[1].1) == (0, 1));
        let w = cache.rows(0, 1).unwrap()[0].len();
        let second: Vec<Vec<f32>> = hit[1].0.iter().map(|l| l[PAGE_TOKENS * w..].to_vec()).collect();
        assert_eq!(second, cache.rows(PAGE_TOKENS, PAGE_TOKENS).unwrap());
        // A prompt of exactly 32 tokens: one block, its last token is prefilled.
        assert_eq!(prefixes.lookup(&prompt[..32]).len(), 1);
        // Another second block: only the first is shared; another first block: nothing.
        let mut other = prompt.clone();
        other[20] = 999;
        assert_eq!(prefixes.lookup(&other).len(), 1);
        other[0] = 999;
        assert!(prefixes.lookup(&other).is_empty());
        // The pages continue the sequence as its own prefill would, and are read in place.
        let mut copy = KvCache::new(&model.config);
        for (pages, page) in prefixes.lookup(&prompt) {
            copy.share(&pages, page).unwrap();
        }
        assert_eq!(Arc::strong_count(&hit[0].0), 6, "two entries, the run, two in `hit`, one in `copy`");
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
        // A run's memory goes with its last block, deepest first: a prompt's two blocks make
        // room for one only when both are gone.
        let long: Vec<u32> = (300..349).collect();
        let (_, cache_long) = prefilled(&long);
        let mut three = PrefixCache::new(3 * block);
        three.insert(&long[..33], &cache_long).unwrap();
        three.insert(&a, &cache_a).unwrap();
        assert_eq!(three.bytes(), 3 * block);
        three.insert(&b, &cache_b).unwrap();
        assert_eq!((three.lookup(&long).len(), three.lookup(&a).len(), three.lookup(&b).len()), (0, 1, 1));
        assert_eq!(three.bytes(), 2 * block);
        // Its first block is evicted last: a prompt that extends a cached one adds a run
        // after it, and eviction takes the extension first.
        let mut three = PrefixCache::new(3 * block);
        three.insert(&long[..17], &cache_long).unwrap();
        three.insert(&long[..33], &cache_long).unwrap();
        three.insert(&a, &cache_a).unwrap();
        three.insert(&b, &cache_b).unwrap();
        assert_eq!((three.lookup(&long).len(), three.lookup(&a).len(), three.lookup(&b).len()), (1, 1, 1));
        // A prompt larger than the budget keeps what fits of its beginning rather than
        // evicting it.
        let mut two = PrefixCache::new(2 * block);
        two.insert(&long, &cache_long).unwrap();
        assert_eq!((two.bytes(), two.lookup(&long).len()), (2 * block, 2));
    }

    #[test]
    fn a_run_a_cache_reads_is_not_evicted_and_counts_once() {
        let a: Vec<u32> = (0..17).collect();
        let b: Vec<u32> = (100..117).collect();
        let (model, cache_a) = prefilled(&a);
        let (_, cache_b) = prefilled(&b);
        let mut prefixes = PrefixCache::new(1 << 30);
        prefixes.insert(&a, &cache_a).unwrap();
        let block = prefixes.bytes();
        // Room for one block, read by two sequences: b is not stored in its place.
        let mut prefixes = PrefixCache::new(block);
        prefixes.insert(&a, &cache_a).unwrap();
        let mut readers = [KvCache::new(&model.config), KvCache::new(&model.config)];
        for reader in &mut readers {
            for (pages, page) in prefixes.lookup(&a) {
                reader.share(&pages, page).unwrap();
            }
        }
        prefixes.insert(&b, &cache_b).unwrap();
        assert_eq!(
            (prefixes.cached_tokens(&a), prefixes.cached_tokens(&b), prefixes.bytes()),
            (PAGE_TOKENS, 0, block)
        );
        // Once they are done, it goes.
        drop(readers);
        prefixes.insert(&b, &cache_b).unwrap();
        assert_eq!(
            (prefixes.cached_tokens(&a), prefixes.cached_tokens(&b), prefixes.bytes()),
            (0, PAGE_TOKENS, block)
        );
    }

    #[test]
    fn a_block_is_found_only_after_the_same_blocks() {
        // The same 16 tokens after another first block: a miss, though they are cached.
        let p: Vec<u32> = (0..40).collect();
        let mut q = p.clone();
        q[..16].copy_from_slice(&[9; 16]);
        let (_, cache) = prefilled(&p);
        let mut prefixes = PrefixCache::new(1 << 30);
        prefixes.insert(&p, &cache).unwrap();
        assert!(prefixes.lookup(&q).is_empty());
        let keys =
            |c: &PrefixCache, t: &[u32]| c.blocks(t).into_iter().map(|(k, _, _)| k).collect::<Vec<_>>();
        // Keys are drawn per process (per cache): the same prompt keys differently elsewhere.
        assert_ne!(keys(&prefixes, &p), keys(&PrefixCache::new(1), &p));
    }
}
