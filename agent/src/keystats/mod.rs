//! What keys tell us, kept bounded: the hottest keys per server (space-saving top-k, by requests
//! and by bytes) and keys that this host sends to more than one server (inconsistent hashing
//! rings between clients), and per server the largest values and slowest requests
//! ([`extremes`]). Keys never become metric labels; they are shown only locally.

pub mod extremes;
pub mod ring_view;

use std::{
    hash::{BuildHasher, Hash, Hasher},
    sync::OnceLock,
};

use serde::Serialize;

use crate::history::interner::{Interner, LabelId, UNKNOWN};

/// Hash used for key identity (and for display when keys must not be shown).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// How keys are shown in diagnose output and the local API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDisplay {
    #[default]
    Plain,
    Hash,
}

impl KeyDisplay {
    pub fn show(self, key: &[u8]) -> String {
        match self {
            KeyDisplay::Plain => String::from_utf8_lossy(key).escape_debug().to_string(),
            KeyDisplay::Hash => format!("#{:016x}", key_hash(key)),
        }
    }

    /// Whether `shown` is a key as [`KeyDisplay::Hash`] shows it.
    pub fn is_hash(shown: &str) -> bool {
        shown.len() == 17
            && shown.starts_with('#')
            && shown[1..].bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// A key [`KeyDisplay::Plain`] showed as `shown`, as [`KeyDisplay::Hash`] shows it; kept
    /// when already a hash. None when the text is not the key byte for byte (escapes start
    /// with a backslash, bytes that were not UTF-8 became U+FFFD), so its hash is unknown.
    pub fn hash_shown(shown: &str) -> Option<String> {
        if KeyDisplay::is_hash(shown) {
            return Some(shown.to_string());
        }
        (!shown.contains(['\\', char::REPLACEMENT_CHARACTER]))
            .then(|| KeyDisplay::Hash.show(shown.as_bytes()))
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct HotKey {
    pub key: String,
    /// Estimated count (space-saving overestimates by at most `error`).
    pub count: u64,
    pub error: u64,
}

/// The hottest keys of one server endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ServerHotKeys {
    pub service: String,
    pub server: String,
    pub role: crate::model::Role,
    pub by_requests: Vec<HotKey>,
    pub by_bytes: Vec<HotKey>,
}

/// What the local API (`cacheprobe keys`) shows: never exported as metrics.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct KeysReport {
    pub servers: Vec<ServerHotKeys>,
    pub splits: Vec<KeySplit>,
    /// Largest values and slowest requests per server, last 15 minutes.
    #[serde(default)]
    pub extremes: Vec<crate::keystats::extremes::ServerExtremes>,
}

/// The in-memory identity of a key: a fast hash (foldhash) with a per-process random seed, so
/// keys chosen by whoever talks to the cache cannot be crafted to collide, and cheap enough to
/// compute once per request. Not stable across runs: never shown (see [`key_hash`]).
pub fn key_id(key: &[u8]) -> u64 {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(key)
}

/// Space-saving top-k (Metwally et al.): k counters; an unseen key replaces the minimum and
/// inherits its count as error. Memory is O(k) whatever the key stream.
///
/// k is small (32 per server), so the counters are parallel arrays scanned linearly: a lookup
/// compares k hashes in one cache line run, and replacing the minimum reuses the victim's key
/// buffer, so a warmed-up table never allocates.
#[derive(Debug)]
pub struct TopK {
    capacity: usize,
    ids: Vec<u64>,
    counts: Vec<u64>,
    errors: Vec<u64>,
    keys: Vec<Vec<u8>>,
}

impl TopK {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        TopK {
            capacity,
            ids: Vec::with_capacity(capacity),
            counts: Vec::with_capacity(capacity),
            errors: Vec::with_capacity(capacity),
            keys: Vec::with_capacity(capacity),
        }
    }

    /// Keys currently counted (at most the capacity).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn add(&mut self, key: &[u8], weight: u64) {
        self.add_with_id(key_id(key), key, weight);
    }

    /// [`TopK::add`] with the key's [`key_id`] already computed.
    pub fn add_with_id(&mut self, id: u64, key: &[u8], weight: u64) {
        let mut from = 0;
        while let Some(offset) = self.ids[from..].iter().position(|&other| other == id) {
            let index = from + offset;
            if self.keys[index] == key {
                self.counts[index] += weight;
                return;
            }
            from = index + 1;
        }
        if self.ids.len() < self.capacity {
            self.ids.push(id);
            self.counts.push(weight);
            self.errors.push(0);
            self.keys.push(key.to_vec());
            return;
        }
        let Some((victim, &min)) = self
            .counts
            .iter()
            .enumerate()
            .min_by_key(|(_, count)| **count)
        else {
            return;
        };
        self.ids[victim] = id;
        self.counts[victim] = min + weight;
        self.errors[victim] = min;
        let buffer = &mut self.keys[victim];
        buffer.clear();
        buffer.extend_from_slice(key);
    }

    pub fn top(&self, n: usize, display: KeyDisplay) -> Vec<HotKey> {
        let mut all: Vec<usize> = (0..self.ids.len()).collect();
        all.sort_by(|&a, &b| {
            self.counts[b]
                .cmp(&self.counts[a])
                .then_with(|| self.keys[a].cmp(&self.keys[b]))
        });
        all.into_iter()
            .take(n)
            .map(|index| HotKey {
                key: display.show(&self.keys[index]),
                count: self.counts[index],
                error: self.errors[index],
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct KeySplit {
    pub key: String,
    pub first_server: String,
    pub second_server: String,
    /// The process names that sent the key to each server, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_comm: Option<String>,
    /// Both requests came from one process (the same pid): the process itself changed the
    /// key's server (a proxy's or client's ejection, failover), not two clients' differing
    /// server lists. Names cannot tell: every php-fpm worker is "php-fpm".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_process: bool,
    pub ts_unix_s: u64,
}

/// Remembers which server each recently sent key went to, per service; a key seen going to a
/// different server within the window is a split.
#[derive(Debug)]
pub struct KeyRouting {
    window_ns: u64,
    max_keys: usize,
    last_server: foldhash::HashMap<(usize, u64), LastSend>,
    /// The senders' process names. When full, names no remembered key uses are reclaimed.
    comms: Interner,
    pub examples: Vec<KeySplit>,
    max_examples: usize,
}

/// Per (service, key) in [`KeyRouting`]: the last server, when, whether the key has split
/// since it was last quiet for a window (so a key bouncing between servers counts once as a
/// key), and who sent it there (an id in `comms`, and its pid, 0 when unknown).
type LastSend = (std::net::SocketAddr, u64, bool, LabelId, u32);

/// What one request says about its key's routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The key's server as before, or its first request within the window.
    Consistent,
    /// Another server than the key's previous request within the window. `new_key` is true
    /// for the key's first split (again once the key has been quiet for a window).
    Split { new_key: bool },
}

impl Routing {
    pub fn is_split(self) -> bool {
        matches!(self, Routing::Split { .. })
    }
}

impl KeyRouting {
    pub fn new(window_ns: u64, max_keys: usize) -> Self {
        KeyRouting {
            window_ns,
            max_keys,
            last_server: foldhash::HashMap::default(),
            comms: Interner::new(MAX_SENDER_NAMES),
            examples: Vec::new(),
            max_examples: 16,
        }
    }

    /// Whether this request splits the key across servers.
    pub fn observe(
        &mut self,
        service: usize,
        key: &[u8],
        server: std::net::SocketAddr,
        ts_ns: u64,
        display: KeyDisplay,
    ) -> Routing {
        self.observe_with_id(service, key_id(key), key, server, None, 0, ts_ns, display)
    }

    /// [`KeyRouting::observe`] with the key's [`key_id`] already computed.
    /// `comm` and `pid`: the process that sent it, when known (pid 0: unknown).
    #[allow(clippy::too_many_arguments)]
    pub fn observe_with_id(
        &mut self,
        service: usize,
        key_id: u64,
        key: &[u8],
        server: std::net::SocketAddr,
        comm: Option<&str>,
        pid: u32,
        ts_ns: u64,
        display: KeyDisplay,
    ) -> Routing {
        let id = (service, key_id);
        let sender = self.sender_id(comm);
        // The common case, a key seen before: one lookup.
        if let Some((previous, seen, split_before, previous_sender, previous_pid)) =
            self.last_server.get_mut(&id)
        {
            let first_server = *previous;
            let first_sender = std::mem::replace(previous_sender, sender);
            let first_pid = std::mem::replace(previous_pid, pid);
            let in_window = ts_ns.saturating_sub(*seen) <= self.window_ns;
            let split = first_server != server && in_window;
            let new_key = split && !(*split_before && in_window);
            *split_before = split || (*split_before && in_window);
            *previous = server;
            *seen = ts_ns;
            if split {
                if self.examples.len() >= self.max_examples {
                    self.examples.remove(0);
                }
                self.examples.push(KeySplit {
                    key: display.show(key),
                    first_server: first_server.to_string(),
                    second_server: server.to_string(),
                    first_comm: (first_sender != UNKNOWN)
                        .then(|| self.comms.resolve(first_sender).to_string()),
                    second_comm: comm.map(str::to_string),
                    one_process: pid != 0 && pid == first_pid,
                    ts_unix_s: crate::clock::unix_now(),
                });
                return Routing::Split { new_key };
            }
            return Routing::Consistent;
        }
        if self.last_server.len() >= self.max_keys {
            // Forget everything older than the window; if the window itself is full, start over.
            let window = self.window_ns;
            self.last_server
                .retain(|_, (_, seen, _, _, _)| ts_ns.saturating_sub(*seen) <= window);
            if self.last_server.len() >= self.max_keys {
                self.last_server.clear();
            }
        }
        self.last_server
            .insert(id, (server, ts_ns, false, sender, pid));
        Routing::Consistent
    }
}

impl KeyRouting {
    /// Hashes the keys of the split examples kept, dropping those whose hash cannot be told:
    /// after a switch to `keys = "hash"`, no plain key remains to be shown.
    pub fn hash_keys(&mut self) {
        self.examples
            .retain_mut(|split| match KeyDisplay::hash_shown(&split.key) {
                Some(hashed) => {
                    split.key = hashed;
                    true
                }
                None => false,
            });
    }

    /// The id of the sending process's name (UNKNOWN when not known, or when every id is in
    /// use by a remembered key).
    fn sender_id(&mut self, comm: Option<&str>) -> LabelId {
        let Some(comm) = comm else {
            return UNKNOWN;
        };
        if let Some(id) = self.comms.try_intern(comm) {
            return id;
        }
        let mut in_use = vec![false; self.comms.slots()];
        for &(_, _, _, id, _) in self.last_server.values() {
            if let Some(used) = in_use.get_mut(usize::from(id)) {
                *used = true;
            }
        }
        self.comms.retain(&in_use);
        self.comms.try_intern(comm).unwrap_or(UNKNOWN)
    }
}

/// Process names the key routing remembers senders by at once.
const MAX_SENDER_NAMES: usize = 4096;

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Which requests feed the key statistics (hot keys and key routing). Every request counts
/// while a second has seen at most `exact_per_second` of them, so small workloads are counted
/// exactly; beyond that one request in `sample_every` counts, `sample_every` times over. The
/// counts stay unbiased and the keys that matter (the hot ones) keep a small relative error,
/// while a busy agent spends the bookkeeping on a fraction of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySampling {
    pub exact_per_second: u32,
    /// 1 turns sampling off.
    pub sample_every: u32,
}

impl Default for KeySampling {
    fn default() -> Self {
        KeySampling {
            exact_per_second: 2000,
            sample_every: 16,
        }
    }
}

/// Decides [`KeySampling`] per request. Deterministic: the choice depends only on the request
/// timestamps fed in, through a fixed-seed pseudo-random sequence rather than a stride, so a
/// client cycling through keys with a period that divides `sample_every` is not aliased.
#[derive(Debug, Clone)]
pub struct KeySampler {
    sampling: KeySampling,
    window_start_ns: u64,
    in_window: u32,
    state: u64,
}

impl KeySampler {
    pub fn new(sampling: KeySampling) -> Self {
        KeySampler {
            sampling: KeySampling {
                sample_every: sampling.sample_every.max(1),
                ..sampling
            },
            window_start_ns: 0,
            in_window: 0,
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn sampling(&self) -> KeySampling {
        self.sampling
    }

    /// How many requests the one at `ts_ns` stands for in the key statistics; 0 means it is
    /// left out.
    pub fn weight(&mut self, ts_ns: u64) -> u64 {
        // Requests of different connections arrive slightly out of order: only a jump of a
        // second either way starts a new window.
        if ts_ns.abs_diff(self.window_start_ns) >= NS_PER_SECOND {
            self.window_start_ns = ts_ns;
            self.in_window = 0;
        }
        if self.in_window < self.sampling.exact_per_second {
            self.in_window += 1;
            return 1;
        }
        let every = self.sampling.sample_every;
        if every == 1 {
            return 1;
        }
        // xorshift64: a fixed sequence, cheap, and free of the strides client loops have.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        if (self.state >> 32).is_multiple_of(u64::from(every)) {
            u64::from(every)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_finds_heavy_hitters_in_bounded_memory() {
        let mut top = TopK::new(4);
        for i in 0..10_000u32 {
            top.add(format!("noise{i}").as_bytes(), 1);
            if i % 3 == 0 {
                top.add(b"hot", 1);
            }
        }
        assert!(top.len() <= 4);
        let hottest = top.top(1, KeyDisplay::Plain);
        assert_eq!(hottest[0].key, "hot");
        assert!(hottest[0].count >= 3334);
        assert_eq!(top.top(1, KeyDisplay::Hash)[0].key.len(), 17);
    }

    /// A split names both senders: the process that sent the key to its first server is
    /// remembered with the key (it was "?" before).
    #[test]
    fn a_split_names_who_sent_the_key_to_each_server() {
        let a = "10.0.0.1:11211".parse().unwrap();
        let b = "10.0.0.2:11211".parse().unwrap();
        let mut routing = KeyRouting::new(60_000_000_000, 100);
        let id = key_id(b"user:1");
        let mut observe = |server, comm, ts| {
            routing.observe_with_id(0, id, b"user:1", server, comm, 0, ts, KeyDisplay::Plain)
        };
        assert!(!observe(a, Some("web"), 0).is_split());
        assert!(observe(b, Some("cron"), 1).is_split());
        assert!(observe(a, None, 2).is_split());
        let names = |split: &KeySplit| (split.first_comm.clone(), split.second_comm.clone());
        assert_eq!(
            names(&routing.examples[0]),
            (Some("web".into()), Some("cron".into()))
        );
        assert_eq!(names(&routing.examples[1]), (Some("cron".into()), None));
    }

    /// Two php-fpm workers (two pids, one name) sending a key to different servers are two
    /// clients whose server lists differ; one process sending it to both moved it itself
    /// (ejection, failover). Only the pid tells them apart.
    #[test]
    fn a_split_says_whether_one_process_sent_the_key_to_both_servers() {
        let a = "10.0.0.1:11211".parse().unwrap();
        let b = "10.0.0.2:11211".parse().unwrap();
        let mut routing = KeyRouting::new(60_000_000_000, 100);
        let id = key_id(b"user:1");
        let mut observe = |server, pid, ts| {
            routing.observe_with_id(
                0,
                id,
                b"user:1",
                server,
                Some("php-fpm"),
                pid,
                ts,
                KeyDisplay::Plain,
            )
        };
        observe(a, 101, 0);
        assert!(observe(b, 102, 1).is_split());
        assert!(observe(a, 102, 2).is_split());
        assert!(observe(b, 0, 3).is_split());
        let one: Vec<bool> = routing.examples.iter().map(|s| s.one_process).collect();
        // Two workers; then one worker itself; then an unknown sender is not "the same".
        assert_eq!(one, [false, true, false]);
    }

    /// Sender names are bounded, but names no remembered key uses any more are reclaimed:
    /// after more distinct senders than the table holds, a new one is still named.
    #[test]
    fn sender_names_of_forgotten_keys_are_reclaimed() {
        let a: std::net::SocketAddr = "10.0.0.1:11211".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.2:11211".parse().unwrap();
        let mut routing = KeyRouting::new(1_000, 100);
        for i in 0..2 * MAX_SENDER_NAMES as u64 {
            let key = format!("k{i}");
            let comm = format!("worker{i}");
            routing.observe_with_id(
                0,
                key_id(key.as_bytes()),
                key.as_bytes(),
                a,
                Some(&comm),
                0,
                i * 10_000,
                KeyDisplay::Plain,
            );
        }
        let ts = 2 * MAX_SENDER_NAMES as u64 * 10_000;
        let id = key_id(b"late");
        routing.observe_with_id(0, id, b"late", a, Some("late-a"), 0, ts, KeyDisplay::Plain);
        routing.observe_with_id(
            0,
            id,
            b"late",
            b,
            Some("late-b"),
            0,
            ts + 1,
            KeyDisplay::Plain,
        );
        let split = routing.examples.last().unwrap();
        assert_eq!(
            (split.first_comm.as_deref(), split.second_comm.as_deref()),
            (Some("late-a"), Some("late-b"))
        );
    }

    #[test]
    fn key_sent_to_two_servers_within_the_window_is_a_split() {
        let a = "10.0.0.1:11211".parse().unwrap();
        let b = "10.0.0.2:11211".parse().unwrap();
        let mut routing = KeyRouting::new(60_000_000_000, 100);
        assert!(!routing
            .observe(0, b"user:1", a, 0, KeyDisplay::Plain)
            .is_split());
        assert!(!routing
            .observe(0, b"user:1", a, 1, KeyDisplay::Plain)
            .is_split());
        assert!(routing
            .observe(0, b"user:1", b, 2, KeyDisplay::Plain)
            .is_split());
        // Another service with the same key is independent.
        assert!(!routing
            .observe(1, b"user:1", a, 3, KeyDisplay::Plain)
            .is_split());
        // Outside the window a move is a re-shard, not a split.
        assert!(!routing
            .observe(0, b"user:1", a, 120_000_000_000, KeyDisplay::Plain)
            .is_split());
        assert_eq!(routing.examples.len(), 1);
        assert_eq!(routing.examples[0].first_server, "10.0.0.1:11211");
    }

    /// One key bouncing between two servers splits on every request but is one split key,
    /// until it has been quiet for a window.
    #[test]
    fn a_bouncing_key_is_a_new_split_key_once_per_window() {
        let a = "10.0.0.1:11211".parse().unwrap();
        let b = "10.0.0.2:11211".parse().unwrap();
        let window = 60_000_000_000;
        let mut routing = KeyRouting::new(window, 100);
        routing.observe(0, b"k", a, 0, KeyDisplay::Plain);
        let outcomes: Vec<Routing> = (1..=6)
            .map(|i| {
                routing.observe(
                    0,
                    b"k",
                    if i % 2 == 0 { a } else { b },
                    i,
                    KeyDisplay::Plain,
                )
            })
            .collect();
        assert_eq!(outcomes[0], Routing::Split { new_key: true });
        assert!(outcomes[1..]
            .iter()
            .all(|o| *o == Routing::Split { new_key: false }));
        // Quiet for longer than the window: the next request starts over, its next split is new.
        assert_eq!(
            routing.observe(0, b"k", a, 10 + window, KeyDisplay::Plain),
            Routing::Consistent
        );
        assert_eq!(
            routing.observe(0, b"k", b, 11 + window, KeyDisplay::Plain),
            Routing::Split { new_key: true }
        );
    }

    #[test]
    fn routing_memory_is_bounded() {
        let server = "10.0.0.1:11211".parse().unwrap();
        let mut routing = KeyRouting::new(u64::MAX, 50);
        for i in 0..1000u32 {
            routing.observe(0, &i.to_ne_bytes(), server, i as u64, KeyDisplay::Hash);
        }
        assert!(routing.last_server.len() <= 50);
    }

    #[test]
    fn sampler_counts_exactly_below_the_budget_and_unbiased_above() {
        let mut sampler = KeySampler::new(KeySampling {
            exact_per_second: 100,
            sample_every: 8,
        });
        let quiet: u64 = (0..100).map(|i| sampler.weight(1_000 + i)).sum();
        assert_eq!(quiet, 100);
        // 100_000 more requests within the same second: about one in eight, weighted by 8.
        let weights: Vec<u64> = (0..100_000).map(|i| sampler.weight(2_000 + i)).collect();
        assert!(weights.iter().all(|&w| w == 0 || w == 8));
        let total: u64 = weights.iter().sum();
        assert!((95_000..=105_000).contains(&total), "{total}");
        // A new second is exact again.
        assert_eq!(sampler.weight(2 * NS_PER_SECOND), 1);
        // Same timestamps, same choices.
        let mut again = KeySampler::new(sampler.sampling());
        let mut first = KeySampler::new(sampler.sampling());
        let a: Vec<u64> = (0..1000).map(|i| again.weight(i)).collect();
        let b: Vec<u64> = (0..1000).map(|i| first.weight(i)).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn sampled_top_k_keeps_the_hot_key_and_its_count() {
        let mut sampler = KeySampler::new(KeySampling {
            exact_per_second: 0,
            sample_every: 16,
        });
        let mut top = TopK::new(8);
        // Keys cycle with period 16 (aliases a stride of 16); key 0 is also sent every 4th time.
        let mut hot = 0u64;
        for i in 0..200_000u64 {
            let key = if i % 4 == 0 {
                hot += 1;
                "hot".to_string()
            } else {
                format!("k{}", i % 16)
            };
            let weight = sampler.weight(i);
            if weight > 0 {
                top.add(key.as_bytes(), weight);
            }
        }
        let best = &top.top(1, KeyDisplay::Plain)[0];
        assert_eq!(best.key, "hot");
        let error = best.count.abs_diff(hot) as f64 / hot as f64;
        assert!(error < 0.05, "{} vs {hot}", best.count);
    }

    #[test]
    fn top_k_replaces_the_minimum_and_reuses_its_slot() {
        let mut top = TopK::new(2);
        top.add(b"a", 5);
        top.add(b"b", 2);
        top.add(b"c", 1);
        let all = top.top(10, KeyDisplay::Plain);
        assert_eq!(top.len(), 2);
        assert_eq!(
            all[0],
            HotKey {
                key: "a".into(),
                count: 5,
                error: 0
            }
        );
        assert_eq!(
            all[1],
            HotKey {
                key: "c".into(),
                count: 3,
                error: 2
            }
        );
        top.add(b"c", 4);
        assert_eq!(top.top(1, KeyDisplay::Plain)[0].count, 7);
    }
}
