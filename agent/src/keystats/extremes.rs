//! The largest values and slowest requests per server over the last 15 minutes, for
//! `cacheprobe keys` (local only: keys never reach metrics). Bounded: a few entries per server
//! per minute, for a bounded number of servers.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};

use crate::{conn::tracking::Endpoint, keystats::KeyDisplay};

/// Minutes kept (the report covers the last 15).
const MINUTES: usize = 15;
/// Entries kept per server, minute and kind; the report shows the top [`REPORTED`] of them.
const PER_MINUTE: usize = 5;
const REPORTED: usize = 10;

/// One request worth showing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extreme {
    /// The key as configured (`keys = "hash"` shows its hash).
    pub key: String,
    pub command: String,
    /// The process that sent or served it.
    pub process: String,
    /// Value bytes (largest) or latency in microseconds (slowest).
    pub value: u64,
    pub unix_s: u64,
}

/// What `cacheprobe keys` shows per server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerExtremes {
    pub service: String,
    pub server: String,
    pub role: String,
    /// Largest values (stores and hits), largest first; `value` in bytes.
    pub largest_values: Vec<Extreme>,
    /// Slowest requests, slowest first; `value` in microseconds.
    pub slowest_requests: Vec<Extreme>,
}

#[derive(Debug, Default)]
struct Minute {
    minute: u64,
    largest: Vec<Extreme>,
    slowest: Vec<Extreme>,
}

/// Whether `value` would enter a top list of `PER_MINUTE`.
fn enters(list: &[Extreme], value: u64) -> bool {
    list.len() < PER_MINUTE || list.iter().any(|e| e.value < value)
}

fn insert(list: &mut Vec<Extreme>, entry: Extreme) {
    if list.len() >= PER_MINUTE {
        if let Some((i, _)) = list.iter().enumerate().min_by_key(|(_, e)| e.value) {
            list.swap_remove(i);
        }
    }
    list.push(entry);
}

/// A request as seen by the pipeline.
pub struct Seen<'a> {
    pub key: &'a [u8],
    pub command: &'static str,
    pub process: Option<&'a str>,
    pub value_len: Option<u32>,
    pub latency_ns: Option<u64>,
    pub unix_s: u64,
}

#[derive(Debug)]
pub struct Extremes {
    servers: HashMap<Endpoint, VecDeque<Minute>>,
    max_servers: usize,
    pub dropped_servers: u64,
}

impl Extremes {
    pub fn new(max_servers: usize) -> Extremes {
        Extremes {
            servers: HashMap::new(),
            max_servers,
            dropped_servers: 0,
        }
    }

    pub fn observe(&mut self, endpoint: &Endpoint, seen: &Seen<'_>, display: KeyDisplay) {
        let minute = seen.unix_s / 60;
        let len = self.servers.len();
        let minutes = match self.servers.get_mut(endpoint) {
            Some(minutes) => minutes,
            None if len < self.max_servers => self.servers.entry(*endpoint).or_default(),
            None => {
                self.dropped_servers += 1;
                return;
            }
        };
        if minutes.back().is_none_or(|m| m.minute < minute) {
            minutes.push_back(Minute {
                minute,
                ..Minute::default()
            });
            while minutes.len() > MINUTES {
                minutes.pop_front();
            }
        }
        let Some(current) = minutes.back_mut() else {
            return;
        };
        let entry = |value: u64| Extreme {
            key: display.show(seen.key),
            command: seen.command.to_string(),
            process: seen.process.unwrap_or("?").to_string(),
            value,
            unix_s: seen.unix_s,
        };
        if let Some(size) = seen.value_len.map(u64::from) {
            if size > 0 && enters(&current.largest, size) {
                insert(&mut current.largest, entry(size));
            }
        }
        if let Some(micros) = seen.latency_ns.map(|ns| ns / 1000) {
            if enters(&current.slowest, micros) {
                insert(&mut current.slowest, entry(micros));
            }
        }
    }

    /// Hashes the keys kept, dropping entries whose hash cannot be told: after a switch to
    /// `keys = "hash"`, the last 15 minutes must not keep showing plain keys.
    pub fn hash_keys(&mut self) {
        let hash = |list: &mut Vec<Extreme>| {
            list.retain_mut(|entry| match KeyDisplay::hash_shown(&entry.key) {
                Some(hashed) => {
                    entry.key = hashed;
                    true
                }
                None => false,
            })
        };
        for minute in self.servers.values_mut().flatten() {
            hash(&mut minute.largest);
            hash(&mut minute.slowest);
        }
    }

    /// Per server, the top entries of the minutes within 15 minutes of `now_s`.
    pub fn report(
        &self,
        now_s: u64,
        name: impl Fn(&Endpoint) -> Option<(String, String, String)>,
    ) -> Vec<ServerExtremes> {
        let oldest = (now_s / 60).saturating_sub(MINUTES as u64 - 1);
        let top = |mut list: Vec<Extreme>| {
            list.sort_by(|a, b| b.value.cmp(&a.value).then(b.unix_s.cmp(&a.unix_s)));
            list.truncate(REPORTED);
            list
        };
        let mut out: Vec<ServerExtremes> = self
            .servers
            .iter()
            .filter_map(|(endpoint, minutes)| {
                let recent = || minutes.iter().filter(|m| m.minute >= oldest);
                let largest = top(recent().flat_map(|m| m.largest.iter().cloned()).collect());
                let slowest = top(recent().flat_map(|m| m.slowest.iter().cloned()).collect());
                if largest.is_empty() && slowest.is_empty() {
                    return None;
                }
                let (service, server, role) = name(endpoint)?;
                Some(ServerExtremes {
                    service,
                    server,
                    role,
                    largest_values: largest,
                    slowest_requests: slowest,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.server, &a.role).cmp(&(&b.service, &b.server, &b.role)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint {
            service: 0,
            server: format!("127.0.0.1:{port}").parse().unwrap(),
            role: crate::model::Role::Server,
        }
    }

    fn names(e: &Endpoint) -> Option<(String, String, String)> {
        Some(("mc".into(), e.server.to_string(), e.role.as_str().into()))
    }

    #[test]
    fn keeps_the_largest_and_slowest_of_15_minutes_bounded() {
        let mut extremes = Extremes::new(2);
        let start = 1_700_000_000 / 60 * 60;
        for i in 0..30 * 60u64 {
            let key = format!("k{i}");
            extremes.observe(
                &endpoint(11211),
                &Seen {
                    key: key.as_bytes(),
                    command: "set",
                    process: Some("php"),
                    value_len: Some((i % 1000) as u32),
                    latency_ns: Some(i * 1000),
                    unix_s: start + i,
                },
                KeyDisplay::Plain,
            );
        }
        let report = extremes.report(start + 30 * 60 - 1, names);
        assert_eq!(report.len(), 1);
        let largest = &report[0].largest_values;
        assert_eq!(largest.len(), REPORTED);
        assert_eq!(largest[0].value, 999);
        // The slowest are the latest: the oldest 15 minutes have aged out.
        let slowest = &report[0].slowest_requests;
        assert_eq!(slowest[0].value, 30 * 60 - 1);
        assert_eq!(slowest[0].key, format!("k{}", 30 * 60 - 1));
        assert!(slowest.iter().all(|e| e.unix_s >= start + 15 * 60));
        let kept: usize = extremes
            .servers
            .values()
            .map(|m| {
                m.iter()
                    .map(|m| m.largest.len() + m.slowest.len())
                    .sum::<usize>()
            })
            .sum();
        assert!(kept <= MINUTES * PER_MINUTE * 2);
        // A third server is over the limit of two... the second is not.
        let seen = Seen {
            key: b"secret",
            command: "get",
            process: None,
            value_len: Some(5),
            latency_ns: None,
            unix_s: start,
        };
        extremes.observe(&endpoint(11212), &seen, KeyDisplay::Hash);
        extremes.observe(&endpoint(11213), &seen, KeyDisplay::Hash);
        assert_eq!(extremes.dropped_servers, 1);
        let report = extremes.report(start + 60, names);
        let hashed = &report[1].largest_values[0];
        assert!(hashed.key.starts_with('#'), "{hashed:?}");
    }
}
