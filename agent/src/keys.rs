//! What keys tell us, kept bounded: the hottest keys per server (space-saving top-k, by requests
//! and by bytes) and keys that this host sends to more than one server (inconsistent hashing
//! rings between clients). Keys never become metric labels; they are shown only locally.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

use serde::Serialize;

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
    pub role: String,
    pub by_requests: Vec<HotKey>,
    pub by_bytes: Vec<HotKey>,
}

/// What the local API (`cacheprobe keys`) shows: never exported as metrics.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct KeysReport {
    pub servers: Vec<ServerHotKeys>,
    pub splits: Vec<KeySplit>,
}

/// Space-saving top-k (Metwally et al.): k counters; an unseen key replaces the minimum and
/// inherits its count as error. Memory is O(k) whatever the key stream.
#[derive(Debug)]
pub struct TopK {
    capacity: usize,
    entries: HashMap<Vec<u8>, (u64, u64)>,
}

impl TopK {
    pub fn new(capacity: usize) -> Self {
        TopK {
            capacity: capacity.max(1),
            entries: HashMap::with_capacity(capacity + 1),
        }
    }

    pub fn add(&mut self, key: &[u8], weight: u64) {
        if let Some((count, _)) = self.entries.get_mut(key) {
            *count += weight;
            return;
        }
        if self.entries.len() < self.capacity {
            self.entries.insert(key.to_vec(), (weight, 0));
            return;
        }
        let Some((victim, &(min, _))) = self.entries.iter().min_by_key(|(_, (count, _))| *count)
        else {
            return;
        };
        let victim = victim.clone();
        self.entries.remove(&victim);
        self.entries.insert(key.to_vec(), (min + weight, min));
    }

    pub fn top(&self, n: usize, display: KeyDisplay) -> Vec<HotKey> {
        let mut all: Vec<_> = self.entries.iter().collect();
        all.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .take(n)
            .map(|(key, &(count, error))| HotKey {
                key: display.show(key),
                count,
                error,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct KeySplit {
    pub key: String,
    pub first_server: String,
    pub second_server: String,
    pub ts_unix_s: u64,
}

/// Remembers which server each recently sent key went to, per service; a key seen going to a
/// different server within the window is a split.
#[derive(Debug)]
pub struct KeyRouting {
    window_ns: u64,
    max_keys: usize,
    last_server: HashMap<(usize, u64), (std::net::SocketAddr, u64)>,
    pub examples: Vec<KeySplit>,
    max_examples: usize,
}

impl KeyRouting {
    pub fn new(window_ns: u64, max_keys: usize) -> Self {
        KeyRouting {
            window_ns,
            max_keys,
            last_server: HashMap::new(),
            examples: Vec::new(),
            max_examples: 16,
        }
    }

    /// Returns true when this request splits the key across servers.
    pub fn observe(
        &mut self,
        service: usize,
        key: &[u8],
        server: std::net::SocketAddr,
        ts_ns: u64,
        display: KeyDisplay,
    ) -> bool {
        let id = (service, key_hash(key));
        let split = match self.last_server.get(&id) {
            Some((previous, seen))
                if *previous != server && ts_ns.saturating_sub(*seen) <= self.window_ns =>
            {
                if self.examples.len() >= self.max_examples {
                    self.examples.remove(0);
                }
                self.examples.push(KeySplit {
                    key: display.show(key),
                    first_server: previous.to_string(),
                    second_server: server.to_string(),
                    ts_unix_s: crate::clock::unix_now(),
                });
                true
            }
            _ => false,
        };
        if self.last_server.len() >= self.max_keys && !self.last_server.contains_key(&id) {
            // Forget everything older than the window; if the window itself is full, start over.
            let window = self.window_ns;
            self.last_server
                .retain(|_, (_, seen)| ts_ns.saturating_sub(*seen) <= window);
            if self.last_server.len() >= self.max_keys {
                self.last_server.clear();
            }
        }
        self.last_server.insert(id, (server, ts_ns));
        split
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
        assert!(top.entries.len() <= 4);
        let hottest = top.top(1, KeyDisplay::Plain);
        assert_eq!(hottest[0].key, "hot");
        assert!(hottest[0].count >= 3334);
        assert_eq!(top.top(1, KeyDisplay::Hash)[0].key.len(), 17);
    }

    #[test]
    fn key_sent_to_two_servers_within_the_window_is_a_split() {
        let a = "10.0.0.1:11211".parse().unwrap();
        let b = "10.0.0.2:11211".parse().unwrap();
        let mut routing = KeyRouting::new(60_000_000_000, 100);
        assert!(!routing.observe(0, b"user:1", a, 0, KeyDisplay::Plain));
        assert!(!routing.observe(0, b"user:1", a, 1, KeyDisplay::Plain));
        assert!(routing.observe(0, b"user:1", b, 2, KeyDisplay::Plain));
        // Another service with the same key is independent.
        assert!(!routing.observe(1, b"user:1", a, 3, KeyDisplay::Plain));
        // Outside the window a move is a re-shard, not a split.
        assert!(!routing.observe(0, b"user:1", a, 120_000_000_000, KeyDisplay::Plain));
        assert_eq!(routing.examples.len(), 1);
        assert_eq!(routing.examples[0].first_server, "10.0.0.1:11211");
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
}
