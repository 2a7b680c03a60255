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
//! never exceed the budget but by a split's copy (0 turns the cache off). A block's rows are
//! what prefilling its prefix computed, to float rounding: a prompt that itself started from
//! cached blocks stores its later blocks too, computed in another batch shape than a whole
//! prefill.
//!
//! Eviction goes by run, least recently used first: a prefix's runs are marked used from its
//! last to its first, so its first run goes last (a block whose parent is gone could never be
//! found again), and a run's memory goes with it. A prompt that shares only the first blocks
//! of a run splits it: those blocks are copied to a run of their own, which it reads, so the
//! rest of the old run can go once nobody reads it (a radix tree's node split; until then the
//! copy may take the cache past its budget). A prompt larger than the budget stores what fits
//! of its beginning rather than evicting it. A run that a running sequence reads is not
//! evicted: its memory is counted here, once however many sequences share it, and those
//! sequences reserve KV budget only for their own rows ([`PrefixCache::cached_tokens`]), as
//! vLLM's block manager counts a shared block once.
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
    /// Its run and its page there.
    run: u64,
    page: usize,
}

/// Pages stored together (one allocation) and the blocks the cache holds in them.
struct Run {
    pages: Pages,
    /// Its blocks' keys in chain order, at pages `first..first + keys.len()`.
    keys: Vec<u64>,
    first: usize,
    /// Bytes of one page in every layer.
    block_bytes: usize,
    /// Bytes of the allocation, counted until the run goes, whatever blocks it still holds.
    bytes: usize,
    /// When a block of it was last looked up or stored (the LRU order's key).
    used: u64,
}

impl Run {
    /// Whether a sequence's cache reads it (holds it besides this).
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.pages) > 1
    }
}

/// The cached blocks, by key, their runs, and the runs' use order.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    entries: HashMap<u64, Entry>,
    runs: HashMap<u64, Run>,
    /// (last use, run), oldest first.
    order: BTreeSet<(u64, u64)>,
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
            runs: HashMap::new(),
            order: BTreeSet::new(),
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

    /// The key of the block `tokens` after the block keyed `parent`.
    fn key(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// Whether `key` holds the block `tokens` after the block `parent`.
    fn holds(&self, key: u64, parent: u64, tokens: &[u32]) -> bool {
        self.entries.get(&key).is_some_and(|e| e.parent == parent && e.tokens == tokens)
    }

    /// The runs of `keys`' blocks, in chain order, each once.
    fn runs_of(&self, keys: &[u64]) -> Vec<u64> {
        let mut runs: Vec<u64> = keys.iter().filter_map(|k| self.entries.get(k).map(|e| e.run)).collect();
        runs.dedup();
        runs
    }

    /// Marks the runs of `keys` used, the last first: a prefix's first run is then the most
    /// recently used, and its extensions go before it.
    fn touch(&mut self, keys: &[u64]) {
        for id in self.runs_of(keys).into_iter().rev() {
            self.clock += 1;
            if let Some(run) = self.runs.get_mut(&id) {
                self.order.remove(&(run.used, id));
                run.used = self.clock;
                self.order.insert((run.used, id));
            }
        }
    }

    /// Evicts the least recently used run that is neither one of `keep` nor read by a
    /// sequence, with its blocks (false when there is none).
    fn evict(&mut self, keep: &[u64]) -> bool {
        let evictable = |id: &u64| !keep.contains(id) && self.runs.get(id).is_some_and(|r| !r.in_use());
        let Some(id) = self.order.iter().map(|&(_, id)| id).find(evictable) else {
            return false;
        };
        if let Some(run) = self.runs.remove(&id) {
            self.order.remove(&(run.used, id));
            for key in &run.keys {
                self.entries.remove(key);
            }
            self.bytes -= run.bytes;
        }
        true
    }

    /// Keys of the cached blocks `prompt` begins with, at most all but its last token.
    fn found(&self, prompt: &[u32]) -> Vec<u64> {
        let mut keys = Vec::new();
        if self.entries.is_empty() {
            return keys; // nothing to hash for (a cache that is off holds nothing)
        }
        let mut parent = 0;
        for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(PAGE_TOKENS) {
            let key = self.key(parent, block);
            if !self.holds(key, parent, block) {
                break;
            }
            keys.push(key);
            parent = key;
        }
        keys
    }

    /// Tokens of `prompt` that [`PrefixCache::lookup`] would find now.
    pub fn cached_tokens(&self, prompt: &[u32]) -> usize {
        self.found(prompt).len() * PAGE_TOKENS
    }

    /// Moves the blocks of `key`'s run up to `key` into a run of their own (copied), unless
    /// `key` is the run's last: a prompt that shares only a run's first blocks then reads
    /// (and keeps from eviction) only those, and the rest can go (a radix tree's node split,
    /// as SGLang's RadixAttention splits at a divergence).
    fn split_after(&mut self, key: u64) {
        let Some(id) = self.entries.get(&key).map(|e| e.run) else { return };
        let Some(run) = self.runs.get_mut(&id) else { return };
        let Some(at) = run.keys.iter().position(|k| *k == key).filter(|at| at + 1 < run.keys.len()) else {
            return;
        };
        let alloc = run.bytes / run.block_bytes.max(1);
        let rows = |layer: &Vec<f32>| {
            let per_page = layer.len() / alloc.max(1);
            layer[run.first * per_page..(run.first + at + 1) * per_page].to_vec()
        };
        let head = Run {
            pages: Arc::new(run.pages.iter().map(rows).collect()),
            keys: run.keys.drain(..=at).collect(),
            first: 0,
            block_bytes: run.block_bytes,
            bytes: (at + 1) * run.block_bytes,
            used: run.used,
        };
        run.first += at + 1;
        self.clock += 1;
        let new = self.clock;
        for (page, k) in head.keys.iter().enumerate() {
            if let Some(e) = self.entries.get_mut(k) {
                (e.run, e.page) = (new, page);
            }
        }
        self.bytes += head.bytes;
        self.order.insert((head.used, new));
        self.runs.insert(new, head);
    }

    /// The cached blocks `prompt` begins with, at most all but its last token, in order. A run
    /// it shares only the beginning of is split first (the budget may be exceeded by the
    /// copy until the rest of the run is no longer read and can go).
    pub fn lookup(&mut self, prompt: &[u32]) -> Vec<Block> {
        let found = self.found(prompt);
        if let Some(&last) = found.last() {
            self.split_after(last);
        }
        self.touch(&found);
        let keep = self.runs_of(&found);
        while self.bytes > self.budget && self.evict(&keep) {}
        found
            .iter()
            .filter_map(|k| {
                let e = self.entries.get(k)?;
                Some((self.runs.get(&e.run)?.pages.clone(), e.page))
            })
            .collect()
    }

    /// Stores the whole blocks of `prompt` not cached yet, from `cache`, which holds all of
    /// `prompt`, as one run; evicts the least recently used runs past the budget, never one
    /// holding a block of `prompt` (what does not fit then is not stored).
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) -> kubemoe_model::Result<()> {
        if self.budget == 0 {
            return Ok(());
        }
        let block_bytes = (cache.bytes() / cache.len().max(1) * PAGE_TOKENS).max(1);
        let mut stored = Vec::new();
        // The blocks to store: from the first not cached.
        let mut new = Vec::new();
        let mut parent = 0;
        for block in prompt.chunks_exact(PAGE_TOKENS) {
            let key = self.key(parent, block);
            if new.is_empty() && self.holds(key, parent, block) {
                stored.push(key);
            } else if self.entries.contains_key(&key) {
                break; // another prefix under the same key: keep the one cached
            } else {
                new.push((key, parent, block));
            }
            parent = key;
        }
        new.truncate(self.budget / block_bytes);
        let keep = self.runs_of(&stored);
        while self.bytes + new.len() * block_bytes > self.budget && self.evict(&keep) {}
        new.truncate(self.budget.saturating_sub(self.bytes) / block_bytes);
        if !new.is_empty() {
            let first = stored.len();
            let pages: Pages = Arc::new(cache.rows(first * PAGE_TOKENS, new.len() * PAGE_TOKENS)?);
            self.clock += 1;
            let id = self.clock;
            let bytes = new.len() * block_bytes;
            let mut keys = Vec::with_capacity(new.len());
            for (page, (key, parent, block)) in new.into_iter().enumerate() {
                let mut tokens = [0u32; PAGE_TOKENS];
                tokens.copy_from_slice(block);
                self.entries.insert(key, Entry { tokens, parent, run: id, page });
                keys.push(key);
            }
            stored.extend(&keys);
            self.runs.insert(id, Run { pages, keys, first: 0, block_bytes, bytes, used: 0 });
            self.order.insert((0, id));
            self.bytes += bytes;
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
        // A prompt of exactly 32 tokens: one block, its last token is prefilled. It shares only
        // the run's first block, which moves (copied) to a run of its own.
        let short = prefixes.lookup(&prompt[..32]);
        assert_eq!(short.len(), 1);
        assert!(!Arc::ptr_eq(&short[0].0, &hit[0].0) && short[0].1 == 0);
        assert_eq!(short[0].0[0], hit[0].0[0][..PAGE_TOKENS * w]);
        assert_eq!(prefixes.bytes(), 3 * block_bytes, "the old run is counted until it goes");
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
        assert_eq!(Arc::strong_count(&hit[0].0), 4, "the run, two in `hit`, one in `copy`");
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
    fn a_prompt_sharing_only_the_first_blocks_of_a_run_splits_it_and_the_rest_can_go() {
        let long: Vec<u32> = (0..49).collect();
        let q: Vec<u32> = long[..PAGE_TOKENS].iter().copied().chain(400..417).collect();
        let (model, cache_long) = prefilled(&long);
        let (_, cache_q) = prefilled(&q);
        let mut prefixes = PrefixCache::new(1 << 30);
        prefixes.insert(&long[..17], &cache_long).unwrap();
        let block = prefixes.bytes();
        // One run of three blocks fills the budget, and a sequence reads all of it.
        let mut prefixes = PrefixCache::new(3 * block);
        prefixes.insert(&long, &cache_long).unwrap();
        let share = |prefixes: &mut PrefixCache, prompt: &[u32]| {
            let mut cache = KvCache::new(&model.config);
            for (pages, page) in prefixes.lookup(prompt) {
                cache.share(&pages, page).unwrap();
            }
            cache
        };
        let whole = share(&mut prefixes, &long);
        // q shares only its first block: that block is copied to a run of its own (over the
        // budget while the old run is read), and q reads the copy.
        let reader = share(&mut prefixes, &q);
        assert_eq!((reader.len(), prefixes.bytes()), (PAGE_TOKENS, 4 * block));
        assert_eq!(reader.rows(0, PAGE_TOKENS).unwrap(), cache_long.rows(0, PAGE_TOKENS).unwrap());
        // Once nobody reads the old run, storing q's own block evicts it: what is left fits.
        drop(whole);
        prefixes.insert(&q, &cache_q).unwrap();
        assert_eq!(
            (prefixes.cached_tokens(&long), prefixes.cached_tokens(&q), prefixes.bytes()),
            (PAGE_TOKENS, 2 * PAGE_TOKENS, 2 * block)
        );
        drop(reader);
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
        // Keys are drawn per process (per cache): the same prompt keys differently elsewhere.
        assert_ne!(prefixes.key(0, &p[..PAGE_TOKENS]), PrefixCache::new(1).key(0, &p[..PAGE_TOKENS]));
    }
}
