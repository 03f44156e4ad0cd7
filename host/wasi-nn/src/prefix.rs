//! The prefix cache: KV caches of earlier requests on the same model, reused by later requests
//! whose tokens start the same way (a shared system prompt, the earlier turns of a chat).
//!
//! Transparent to the guest: the wasi:nn execution context looks up the longest cached prefix
//! of its prompt, seeds its session with it and computes only the rest. Bounded by bytes, least
//! recently used entries go first.

use std::sync::Mutex;

use slm_engine::KvSnapshot;

/// What the cache needs of a KV snapshot.
pub trait Kv: Clone {
    /// Tokens covered.
    fn len(&self) -> usize;
    fn bytes(&self) -> usize;
}

impl Kv for KvSnapshot {
    fn len(&self) -> usize {
        KvSnapshot::len(self)
    }
    fn bytes(&self) -> usize {
        KvSnapshot::bytes(self)
    }
}

/// Entries shorter than this are not worth keeping.
pub const MIN_TOKENS: usize = 8;

struct Entry<K> {
    tokens: Vec<i64>,
    kv: K,
    bytes: usize,
    last_used: u64,
}

struct Entries<K> {
    list: Vec<Entry<K>>,
    bytes: usize,
    clock: u64,
}

pub struct PrefixCache<K: Kv = KvSnapshot> {
    limit_bytes: usize,
    entries: Mutex<Entries<K>>,
}

fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<K: Kv> PrefixCache<K> {
    /// A cache holding at most `limit_bytes` of KV tensors (0 disables it).
    pub fn new(limit_bytes: usize) -> Self {
        PrefixCache {
            limit_bytes,
            entries: Mutex::new(Entries {
                list: Vec::new(),
                bytes: 0,
                clock: 0,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit_bytes > 0
    }

    /// The entry sharing the longest prefix with `tokens`, and that prefix's length.
    pub fn lookup(&self, tokens: &[i64]) -> Option<(K, usize)> {
        let mut e = self.entries.lock().ok()?;
        e.clock += 1;
        let now = e.clock;
        let best = e
            .list
            .iter_mut()
            .map(|entry| {
                (
                    common_prefix(&entry.tokens, tokens).min(entry.kv.len()),
                    entry,
                )
            })
            .filter(|(n, _)| *n > 0)
            .max_by_key(|(n, _)| *n)?;
        best.1.last_used = now;
        Some((best.1.kv.clone(), best.0))
    }

    /// Keeps the KV of `tokens` (the snapshot must cover exactly them).
    pub fn insert(&self, tokens: &[i64], kv: K) {
        if !self.enabled() || tokens.len() < MIN_TOKENS || kv.len() != tokens.len() {
            return;
        }
        let bytes = kv.bytes();
        if bytes > self.limit_bytes {
            return;
        }
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        e.clock += 1;
        let now = e.clock;
        // Already covered by a longer entry: only refresh it.
        if let Some(entry) = e.list.iter_mut().find(|x| x.tokens.starts_with(tokens)) {
            entry.last_used = now;
            return;
        }
        // Entries this one extends are superseded.
        let before = e.list.len();
        e.list.retain(|x| !tokens.starts_with(&x.tokens));
        if e.list.len() != before {
            e.bytes = e.list.iter().map(|x| x.bytes).sum();
        }
        e.bytes += bytes;
        e.list.push(Entry {
            tokens: tokens.to_vec(),
            kv,
            bytes,
            last_used: now,
        });
        while e.bytes > self.limit_bytes {
            let Some(oldest) = e
                .list
                .iter()
                .enumerate()
                .min_by_key(|(_, x)| x.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let gone = e.list.swap_remove(oldest);
            e.bytes -= gone.bytes;
        }
    }

    /// Drops every entry.
    pub fn clear(&self) {
        if let Ok(mut e) = self.entries.lock() {
            e.list.clear();
            e.bytes = 0;
        }
    }

    /// (entries, bytes) held now (for metrics and tests).
    pub fn usage(&self) -> (usize, usize) {
        self.entries
            .lock()
            .map(|e| (e.list.len(), e.bytes))
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a KV snapshot: the cache only looks at its length and size.
    #[derive(Clone, Debug, PartialEq)]
    struct FakeKv(usize);

    impl Kv for FakeKv {
        fn len(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.0 * 100
        }
    }

    fn toks(range: std::ops::Range<i64>) -> Vec<i64> {
        range.collect()
    }

    #[test]
    fn longest_common_prefix_wins() {
        let c = PrefixCache::new(1 << 20);
        c.insert(&toks(0..10), FakeKv(10));
        c.insert(&toks(100..120), FakeKv(20));
        let mut q = toks(0..6);
        q.extend([55, 56]);
        assert_eq!(c.lookup(&q), Some((FakeKv(10), 6)));
        assert_eq!(c.lookup(&toks(100..130)), Some((FakeKv(20), 20)));
        assert_eq!(c.lookup(&[7, 8, 9]), None);
    }

    #[test]
    fn extensions_replace_their_prefix_and_short_or_mismatched_entries_are_skipped() {
        let c = PrefixCache::new(1 << 20);
        c.insert(&toks(0..10), FakeKv(10));
        c.insert(&toks(0..30), FakeKv(30));
        assert_eq!(c.usage(), (1, 3000));
        c.insert(&toks(0..20), FakeKv(20)); // covered by the longer entry
        assert_eq!(c.usage(), (1, 3000));
        c.insert(&toks(0..3), FakeKv(3)); // too short
        c.insert(&toks(50..70), FakeKv(19)); // snapshot does not match the tokens
        assert_eq!(c.usage(), (1, 3000));
    }

    #[test]
    fn least_recently_used_goes_first_and_the_limit_holds() {
        let c = PrefixCache::new(2500); // room for two 10-token entries
        c.insert(&toks(0..10), FakeKv(10));
        c.insert(&toks(100..110), FakeKv(10));
        assert!(c.lookup(&toks(0..10)).is_some()); // 0..10 is now the most recent
        c.insert(&toks(200..210), FakeKv(10));
        assert_eq!(c.usage(), (2, 2000));
        assert!(c.lookup(&toks(100..110)).is_none());
        assert!(c.lookup(&toks(0..10)).is_some());
        assert!(c.lookup(&toks(200..210)).is_some());
    }

    #[test]
    fn a_zero_limit_disables_the_cache() {
        let c = PrefixCache::new(0);
        c.insert(&toks(0..10), FakeKv(10));
        assert!(!c.enabled());
        assert_eq!(c.lookup(&toks(0..10)), None);
    }
}
