//! The prefix cache: recent prompts' keys and values, reused by later
//! prompts that start the same way.
//!
//! A hit skips the shared part of the prompt, which makes the first token
//! arrive much sooner — observable to whoever sent the prompt. Shared across
//! tenants, that let one tenant learn what another's prompts begin with
//! (vLLM's CVE-2025-46570). So every entry belongs to a [`CacheScope`]: a
//! tenant only ever hits its own entries, and entries of prefixes the
//! operator declared public, which match only as a whole.
//!
//! The cache holds at most a byte budget (keys and values as the CPU cache
//! stores them). When it is over, the scope holding the most bytes gives up
//! its least recently used entry, so a tenant alone may use all of it, and
//! with others around each keeps at least an equal share: one tenant cannot
//! flush the others.
//!
//! Keys and values depend on the adapter a sequence runs with, so an entry
//! is reused only by prompts with the same adapter (or none).
//!
//! Entries form a tree on the CPU: a prompt that continued from a cached
//! one keeps sharing that one's keys and values when it is cached in turn
//! (up to the chain depth attention reads, [`crate::arch`]'s segments), so
//! a tenant's prompts that start with one system prompt store it once. The
//! budget counts each shared buffer once.

use std::collections::HashSet;
use std::sync::Arc;

use crate::arch::{LoraAdapter, Sequence};

/// Prompts shorter than this are not worth caching.
pub(crate) const MIN_PREFIX: usize = 16;

/// Who may reuse a cached prompt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum CacheScope {
    /// Only this tenant's prompts.
    Tenant(Arc<str>),
    /// Every prompt that starts with the whole entry (a public prefix).
    Public,
}

struct Entry {
    scope: CacheScope,
    /// The adapter its keys and values were computed with.
    adapter: AdapterKey,
    tokens: Vec<u32>,
    seq: Sequence,
    /// The clock when last used, for LRU.
    used: u64,
}

/// An adapter's identity: its load's id (see [`LoraAdapter::id`]).
type AdapterKey = Option<u64>;

fn adapter_key(adapter: Option<&Arc<LoraAdapter>>) -> AdapterKey {
    adapter.map(|a| a.id())
}

/// A hit: the cached sequence and how many prompt tokens it covers.
pub(crate) struct Hit<'a> {
    pub(crate) seq: &'a Sequence,
    pub(crate) shared: usize,
}

/// Cached prompts, scoped, within a byte budget.
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes_per_token: usize,
    public: Vec<Vec<u32>>,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `budget` bytes, entries costing `bytes_per_token`
    /// per token; `public` are the prefixes (token ids) any tenant may share.
    pub(crate) fn new(budget: usize, bytes_per_token: usize, public: Vec<Vec<u32>>) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes_per_token: bytes_per_token.max(1),
            // Shorter ones are refused when the batcher starts.
            public: public
                .into_iter()
                .filter(|p| p.len() >= MIN_PREFIX)
                .collect(),
            clock: 0,
        }
    }

    /// The entry sharing the longest prefix with `prompt` that `tenant` may
    /// use with `adapter`: its own entries (at least [`MIN_PREFIX`] tokens
    /// in common) and public ones (only as a whole), computed with the same
    /// adapter. At least one prompt token is left to run.
    pub(crate) fn lookup(
        &mut self,
        tenant: &str,
        prompt: &[u32],
        adapter: Option<&Arc<LoraAdapter>>,
    ) -> Option<Hit<'_>> {
        let limit = prompt.len().checked_sub(1)?;
        let key = adapter_key(adapter);
        let mut best: Option<(usize, usize)> = None;
        for (i, entry) in self.entries.iter().enumerate() {
            if entry.adapter != key {
                continue;
            }
            let shared = match &entry.scope {
                CacheScope::Tenant(owner) if **owner == *tenant => common(&entry.tokens, prompt),
                CacheScope::Public if prompt.starts_with(&entry.tokens) => entry.tokens.len(),
                _ => continue,
            }
            .min(limit);
            if shared >= MIN_PREFIX && best.is_none_or(|(_, b)| shared > b) {
                best = Some((i, shared));
            }
        }
        let (index, shared) = best?;
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.used = self.clock;
        Some(Hit {
            seq: &entry.seq,
            shared,
        })
    }

    /// Remembers `prompt` (all of it cached in `seq`) for `tenant`, and the
    /// public prefixes it starts with.
    pub(crate) fn insert(&mut self, tenant: &str, prompt: &[u32], seq: &Sequence) {
        let scope = CacheScope::Tenant(Arc::from(tenant));
        let key = adapter_key(seq.adapter());
        if prompt.len() >= MIN_PREFIX {
            // The tenant's entries this prompt extends are superseded by it.
            self.entries
                .retain(|e| e.scope != scope || e.adapter != key || !prompt.starts_with(&e.tokens));
            let covered = self
                .entries
                .iter()
                .any(|e| e.scope == scope && e.adapter == key && e.tokens.starts_with(prompt));
            if !covered {
                self.add(scope, prompt, seq);
            }
        }
        let public: Vec<Vec<u32>> =
            self.public
                .iter()
                .filter(|p| prompt.starts_with(p))
                .filter(|p| {
                    !self.entries.iter().any(|e| {
                        e.scope == CacheScope::Public && e.adapter == key && e.tokens == **p
                    })
                })
                .cloned()
                .collect();
        for prefix in public {
            self.add(CacheScope::Public, &prefix, seq);
        }
    }

    fn add(&mut self, scope: CacheScope, tokens: &[u32], seq: &Sequence) {
        if tokens.len() * self.bytes_per_token > self.budget {
            return;
        }
        self.clock += 1;
        self.entries.push(Entry {
            scope,
            adapter: adapter_key(seq.adapter()),
            tokens: tokens.to_vec(),
            // Kept without the adapter, so an unloaded adapter is not held
            // in memory by the cache; its id stays as the key.
            seq: {
                let mut copy = seq.copy_prefix(tokens.len(), tokens.len());
                copy.set_adapter(None);
                copy
            },
            used: self.clock,
        });
        self.evict();
    }

    /// Bytes held now, each shared buffer once.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes_where(|_| true)
    }

    /// Bytes `scope`'s entries hold (buffers they share with other scopes
    /// included).
    fn bytes_of(&self, scope: &CacheScope) -> usize {
        self.bytes_where(|e| e.scope == *scope)
    }

    fn bytes_where(&self, keep: impl Fn(&Entry) -> bool) -> usize {
        let mut seen = HashSet::new();
        let mut positions = 0;
        for entry in self.entries.iter().filter(|e| keep(e)) {
            match entry.seq.shared_buffers() {
                Some(buffers) => {
                    for (buffer, held) in buffers {
                        if seen.insert(buffer) {
                            positions += held;
                        }
                    }
                }
                // A device cache is a private copy.
                None => positions += entry.tokens.len(),
            }
        }
        positions * self.bytes_per_token
    }

    /// Evicts until within budget: the least recently used entry of the
    /// scope holding the most bytes goes first.
    fn evict(&mut self) {
        while self.bytes() > self.budget {
            let mut scopes: Vec<CacheScope> =
                self.entries.iter().map(|e| e.scope.clone()).collect();
            scopes.sort();
            scopes.dedup();
            let Some(largest) = scopes.into_iter().max_by_key(|s| self.bytes_of(s)) else {
                return;
            };
            let Some(victim) = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.scope == largest)
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                return;
            };
            self.entries.swap_remove(victim);
        }
    }
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU sequence of `len` tokens.
    fn seq(len: usize) -> Sequence {
        Sequence::filled_for_tests(len)
    }

    fn prompt(start: u32, len: usize) -> Vec<u32> {
        (start..start + len as u32).collect()
    }

    #[test]
    fn a_tenant_never_hits_another_tenants_prompt() {
        let mut cache = PrefixCache::new(1 << 20, 1, Vec::new());
        let secret = prompt(0, 64);
        cache.insert("victim", &secret, &seq(64));
        assert!(cache.lookup("attacker", &secret, None).is_none());
        let mut guess = secret.clone();
        guess.push(999);
        assert!(cache.lookup("attacker", &guess, None).is_none());
        assert_eq!(cache.lookup("victim", &guess, None).unwrap().shared, 64);
    }

    #[test]
    fn public_prefixes_are_shared_only_whole() {
        let public = prompt(0, 32);
        let mut cache = PrefixCache::new(1 << 20, 1, vec![public.clone()]);
        let mut with_secret = public.clone();
        with_secret.extend(prompt(1000, 40));
        cache.insert("a", &with_secret, &seq(72));
        // Another tenant shares the public part, and nothing of a's own.
        let mut other = with_secret.clone();
        other.push(7);
        let hit = cache.lookup("b", &other, None).unwrap();
        assert_eq!(hit.shared, 32);
        // A prompt with only part of the public prefix shares nothing.
        assert!(cache.lookup("b", &prompt(0, 20), None).is_none());
    }

    #[test]
    fn the_largest_holder_is_evicted_first() {
        // Budget of 100 tokens at one byte each.
        let mut cache = PrefixCache::new(100, 1, Vec::new());
        cache.insert("victim", &prompt(0, 30), &seq(30));
        for i in 0..10 {
            cache.insert("flooder", &prompt(10_000 * (i + 1), 30), &seq(30));
        }
        assert!(cache.bytes() <= 100);
        let mut again = prompt(0, 30);
        again.push(1);
        assert!(
            cache.lookup("victim", &again, None).is_some(),
            "the flooder evicts its own entries, not the victim's"
        );
    }

    #[test]
    fn prompts_sharing_a_beginning_store_it_once() {
        let mut cache = PrefixCache::new(1 << 20, 1, Vec::new());
        let system = prompt(0, 100);
        let first = [system.clone(), prompt(1000, 10)].concat();
        cache.insert("t", &first, &seq(110));
        // The second prompt continues from the first's cached beginning,
        // as the batcher does on a hit, then is cached in turn.
        let second = [system.clone(), prompt(2000, 10)].concat();
        let hit = cache.lookup("t", &second, None).unwrap();
        assert_eq!(hit.shared, 100);
        let running = hit.seq.continued_for_tests(100, 10);
        cache.insert("t", &second, &running);
        // 110 positions and 10 more, not 220.
        assert_eq!(cache.bytes(), 120);
        let third = [system, prompt(2000, 10), prompt(5000, 3)].concat();
        assert_eq!(cache.lookup("t", &third, None).unwrap().shared, 110);
        // Evicting the first frees nothing the second still shares, so
        // under a budget of 119 the second has to go too.
        cache.budget = 119;
        cache.evict();
        assert_eq!(
            cache.entries.len(),
            0,
            "over budget, both go: {}",
            cache.bytes()
        );
    }

    #[test]
    fn entries_over_the_budget_are_not_kept() {
        let mut cache = PrefixCache::new(10, 1, Vec::new());
        cache.insert("a", &prompt(0, 20), &seq(20));
        assert_eq!(cache.bytes(), 0);
    }
}
