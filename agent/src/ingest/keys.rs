//! The pipeline's key side: what decoded requests say per key (hot keys, keys split between
//! servers, largest values and slowest requests, item sizes for the slab fit), and the
//! sampling that keeps its cost bounded.

use crate::{
    config::Config,
    conn::tracking::Endpoint,
    history::Fact,
    keystats::{
        extremes::{Extremes, Seen},
        key_id, KeyDisplay, KeyRouting, KeySampler, KeySampling, KeysReport, Routing,
        ServerHotKeys, TopK,
    },
    memcache::RequestObservation,
    model::Role,
    services::SharedServices,
    sizes::slab::{LocalMemcached, SlabFitReport, SlabFitTracker},
};

const KEY_SPLIT_WINDOW_NS: u64 = 60_000_000_000;
const HOT_KEYS_PER_SERVER: usize = 32;

/// A key the clients of a service sent to two servers.
pub struct Split {
    pub service: usize,
    /// The key's first split (again once it has been quiet for a window): what the split-key
    /// counter counts. A key bouncing between two servers splits on every request.
    pub new_key: bool,
    /// The fact for the history, when the service still has a name.
    pub fact: Option<Fact>,
}

pub struct KeyStats {
    routing: KeyRouting,
    hot_keys: foldhash::HashMap<Endpoint, (TopK, TopK)>,
    max_hot_key_endpoints: usize,
    sampler: KeySampler,
    display: KeyDisplay,
    extremes: Extremes,
    slab_fit: SlabFitTracker,
    /// Local memcached processes and when they were last read (unix seconds).
    local_memcacheds: (Vec<LocalMemcached>, u64),
}

impl KeyStats {
    pub fn new(config: &Config) -> Self {
        KeyStats {
            routing: KeyRouting::new(KEY_SPLIT_WINDOW_NS, 100_000),
            hot_keys: foldhash::HashMap::default(),
            max_hot_key_endpoints: config.limits.max_servers_per_service * 2,
            sampler: KeySampler::new(KeySampling {
                exact_per_second: config.limits.key_stats_exact_per_second,
                sample_every: config.limits.key_stats_sample_every,
            }),
            display: config.keys,
            extremes: Extremes::new(config.limits.max_servers_per_service * 2),
            slab_fit: SlabFitTracker::default(),
            local_memcacheds: (Vec::new(), 0),
        }
    }

    /// A reload's key display. Hot keys are kept raw and shown at each report; the split
    /// examples and extremes were kept as shown, so a switch to hash hashes them now rather
    /// than leaving plain keys in `cacheprobe keys` for up to 15 minutes.
    pub fn set_display(&mut self, display: KeyDisplay) {
        if display == KeyDisplay::Hash && self.display != KeyDisplay::Hash {
            self.routing.hash_keys();
            self.extremes.hash_keys();
        }
        self.display = display;
    }

    pub fn display(&self) -> KeyDisplay {
        self.display
    }

    pub fn routing(&self) -> &KeyRouting {
        &self.routing
    }

    pub fn hot_keys(&self) -> &foldhash::HashMap<Endpoint, (TopK, TopK)> {
        &self.hot_keys
    }

    /// Feeds one request's key to the key statistics (hot keys, routing), if sampled. Returns
    /// the split when the key went to another server than the last time.
    #[allow(clippy::too_many_arguments)]
    pub fn observe_key(
        &mut self,
        endpoint: &Endpoint,
        request: &RequestObservation,
        key: &[u8],
        comm: Option<&str>,
        pid: u32,
        capture_weight: u64,
        services: &SharedServices,
    ) -> Option<Split> {
        let weight = self.sampler.weight(request.request_ts_ns) * capture_weight;
        if weight == 0 {
            return None;
        }
        let id = key_id(key);
        let routing = if endpoint.role == Role::Client {
            self.routing.observe_with_id(
                endpoint.service,
                id,
                key,
                endpoint.server,
                comm,
                pid,
                request.request_ts_ns,
                self.display,
            )
        } else {
            Routing::Consistent
        };
        let split = if let Routing::Split { new_key } = routing {
            let services = services.load();
            let fact = match (
                self.routing.examples.last(),
                services.name(endpoint.service),
            ) {
                (Some(example), Some(service)) => Some(Fact::KeySplit {
                    service: service.to_string(),
                    key_hash: crate::keystats::key_hash(key),
                    new_key,
                    servers: [example.first_server.clone(), example.second_server.clone()],
                    comms: [example.first_comm.clone(), example.second_comm.clone()],
                    one_process: example.one_process,
                }),
                _ => None,
            };
            Some(Split {
                service: endpoint.service,
                new_key,
                fact,
            })
        } else {
            None
        };
        let bytes = (request.request_bytes + request.response_bytes).saturating_mul(weight);
        if let Some((by_requests, by_bytes)) = self.hot_keys.get_mut(endpoint) {
            by_requests.add_with_id(id, key, weight);
            by_bytes.add_with_id(id, key, bytes);
        } else if self.hot_keys.len() < self.max_hot_key_endpoints {
            let mut by_requests = TopK::new(HOT_KEYS_PER_SERVER);
            let mut by_bytes = TopK::new(HOT_KEYS_PER_SERVER);
            by_requests.add_with_id(id, key, weight);
            by_bytes.add_with_id(id, key, bytes);
            self.hot_keys.insert(*endpoint, (by_requests, by_bytes));
        }
        split
    }

    /// Largest values, slowest requests and (for local memcached) stored item sizes.
    pub fn observe_sizes(
        &mut self,
        endpoint: &Endpoint,
        request: &RequestObservation,
        key: &[u8],
        comm: Option<&str>,
        weight: u64,
        now_s: u64,
    ) {
        self.extremes.observe(
            endpoint,
            &Seen {
                key,
                command: request.command.as_str(),
                process: comm,
                value_len: request.value_len,
                // A blocking queue fetch's wait is not a slow key.
                latency_ns: request.server_latency_ns(),
                unix_s: now_s,
            },
            self.display,
        );
        if let (Role::Server, None, Some(value_len)) =
            (endpoint.role, request.queue, request.value_len)
        {
            if crate::sizes::slab::stores_item(request.command, request.status) {
                self.slab_fit.stored(
                    endpoint.service,
                    endpoint.server,
                    key.len() as u64,
                    u64::from(value_len),
                    weight,
                );
            }
        }
    }

    /// The hottest keys per server (top 10 by requests and by bytes), recent key splits and
    /// the extremes, as of `now_s`.
    pub fn report(&self, services: &SharedServices, now_s: u64) -> KeysReport {
        let services = services.load();
        let mut servers: Vec<ServerHotKeys> = self
            .hot_keys
            .iter()
            .map(|(endpoint, (by_requests, by_bytes))| ServerHotKeys {
                service: services
                    .name(endpoint.service)
                    .unwrap_or_default()
                    .to_string(),
                server: endpoint.server.to_string(),
                role: endpoint.role,
                by_requests: by_requests.top(10, self.display),
                by_bytes: by_bytes.top(10, self.display),
            })
            .collect();
        servers.sort_by(|a, b| {
            (&a.service, &a.server, &a.role).cmp(&(&b.service, &b.server, &b.role))
        });
        let extremes = self.extremes.report(now_s, |endpoint| {
            Some((
                services.name(endpoint.service)?.to_string(),
                endpoint.server.to_string(),
                endpoint.role.as_str().to_string(),
            ))
        });
        KeysReport {
            servers,
            splits: self.routing.examples.clone(),
            extremes,
        }
    }

    /// Re-estimates slab fit for the servers seen, None when none stored anything. The local
    /// memcached processes come from `read_locals` (the caller's /proc reader): every minute,
    /// and sooner (at most every 5 s) when a server seen has no local memcached yet: one
    /// started after the agent, or after the last read.
    pub fn slab_fit_reports(
        &mut self,
        now_s: u64,
        read_locals: &mut dyn FnMut() -> Vec<LocalMemcached>,
        services: &SharedServices,
    ) -> Option<Vec<SlabFitReport>> {
        if self.slab_fit.is_empty() {
            return None;
        }
        let unmatched = self
            .slab_fit
            .ports()
            .any(|port| !self.local_memcacheds.0.iter().any(|m| m.port == port));
        if now_s >= self.local_memcacheds.1 + 60
            || (unmatched && now_s >= self.local_memcacheds.1 + 5)
        {
            self.local_memcacheds = (read_locals(), now_s);
        }
        let services = services.load();
        Some(self.slab_fit.reports(&self.local_memcacheds.0, |service| {
            services.name(service).map(str::to_string)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit's reload: `keys = "hash"` arrives while the extremes and split examples hold
    /// keys recorded in plain. The report right after the reload has no plain key; a key whose
    /// shown text was escaped (so its hash cannot be told) is dropped rather than kept plain.
    #[test]
    fn a_switch_to_hash_leaves_no_plain_key_in_the_report() {
        let services = SharedServices::watching(&[("mc", 11211)]);
        let mut stats = KeyStats::new(&Config::default());
        assert_eq!(stats.display(), KeyDisplay::Plain);
        let now_s = crate::clock::unix_now();
        let [a, b] = ["10.0.0.1:11211", "10.0.0.2:11211"].map(|server| Endpoint {
            service: 0,
            server: server.parse().unwrap(),
            role: Role::Client,
        });
        for (i, key) in [&b"user:secret"[..], b"odd\nkey", b"bad\xffkey"]
            .into_iter()
            .enumerate()
        {
            let ts_ns = 1_000 + i as u64;
            stats.observe_sizes(
                &a,
                &RequestObservation::stored_set(ts_ns),
                key,
                Some("php"),
                1,
                now_s,
            );
            stats.observe_key(
                &a,
                &RequestObservation::stored_set(ts_ns),
                key,
                Some("php"),
                0,
                1,
                &services,
            );
            stats.observe_key(
                &b,
                &RequestObservation::stored_set(ts_ns + 10),
                key,
                Some("php"),
                0,
                1,
                &services,
            );
        }
        let plain = stats.report(&services, now_s);
        let shown = serde_json::to_string(&plain).unwrap();
        assert!(shown.contains("user:secret"), "{shown}");
        assert_eq!(plain.splits.len(), 3);

        stats.set_display(KeyDisplay::Hash);
        let report = stats.report(&services, now_s);
        let shown = serde_json::to_string(&report).unwrap();
        assert!(
            !shown.contains("user:secret") && !shown.contains("odd") && !shown.contains("bad"),
            "{shown}"
        );
        let hashed = KeyDisplay::Hash.show(b"user:secret");
        assert!(report.splits.iter().all(|s| s.key == hashed), "{shown}");
        let largest = &report.extremes[0].largest_values;
        assert_eq!(largest.len(), 1, "{shown}");
        assert_eq!(largest[0].key, hashed, "the daemon's own hash of the key");
        assert!(report
            .servers
            .iter()
            .flat_map(|s| s.by_requests.iter().chain(&s.by_bytes))
            .all(|k| KeyDisplay::is_hash(&k.key)));
    }
}
