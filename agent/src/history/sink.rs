//! Feeds the daemon's shared [`History`] from the pipeline: an [`ObservationSink`] that turns
//! tracking observations and decoded requests into [`Fact`]s, stamped with the unix second
//! they happened in (kernel timestamps are CLOCK_MONOTONIC; the offset to wall time is taken
//! when the fact is recorded).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use foldhash::{HashMap, HashMapExt};

use super::{fact_from_observation, Fact, History, RequestRecord};

use crate::{
    clock::MonotonicToUnix, conn::tracking::Observation, ingest::outputs::ObservationSink,
    memcache::decoders::MemcacheEvent, services::SharedServices,
};

/// Server addresses formatted once; cleared when it grows past this (endpoints are few).
const MAX_CACHED_SERVERS: usize = 4096;

pub struct HistorySink {
    history: Arc<Mutex<History>>,
    services: SharedServices,
    /// Per decoded request nothing is allocated: server labels are formatted once per address
    /// and the wall-clock offset is measured at most once a second of event time.
    server_labels: HashMap<SocketAddr, String>,
    clock: MonotonicToUnix,
}

impl HistorySink {
    pub fn new(history: Arc<Mutex<History>>, services: SharedServices) -> HistorySink {
        HistorySink {
            history,
            services,
            server_labels: HashMap::new(),
            clock: MonotonicToUnix::default(),
        }
    }

    fn record(&self, unix_second: u64, fact: Fact) {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .record(unix_second, fact);
    }
}

/// The unix second of a CLOCK_MONOTONIC timestamp (0 means "now").
pub fn unix_second_of_monotonic(ts_ns: u64) -> u64 {
    let now_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    if ts_ns == 0 {
        return now_unix_ns / 1_000_000_000;
    }
    let age_ns = crate::clock::monotonic_ns().saturating_sub(ts_ns);
    now_unix_ns.saturating_sub(age_ns) / 1_000_000_000
}

fn observation_ts_ns(observation: &Observation) -> u64 {
    match observation {
        Observation::ConnectionOpened { ts_ns, .. }
        | Observation::ConnectionClosed { ts_ns, .. } => *ts_ns,
        Observation::DeadSocketWrite(write) => write.ts_ns,
        _ => 0,
    }
}

impl ObservationSink for HistorySink {
    fn observation(&mut self, observation: &Observation) {
        if let Some(fact) = fact_from_observation(observation, &self.services.load()) {
            self.record(
                unix_second_of_monotonic(observation_ts_ns(observation)),
                fact,
            );
        }
    }

    fn memcache(&mut self, event: &MemcacheEvent, comm: Option<&str>) {
        let MemcacheEvent::Request {
            endpoint, request, ..
        } = event
        else {
            return;
        };
        let services = self.services.load();
        let Some(service) = services.name(endpoint.service) else {
            return;
        };
        if self.server_labels.len() >= MAX_CACHED_SERVERS
            && !self.server_labels.contains_key(&endpoint.server)
        {
            self.server_labels.clear();
        }
        let server = self
            .server_labels
            .entry(endpoint.server)
            .or_insert_with(|| {
                let mut label = String::with_capacity(24);
                let _ = write!(label, "{}", endpoint.server);
                label
            });
        let unix_second = self.clock.unix_second(request.request_ts_ns);
        let record = RequestRecord {
            service,
            server,
            role: endpoint.role,
            comm,
            command: request.command.as_str(),
            status: request.status,
            // A blocking queue fetch's wait is the client's choice, not the server's latency:
            // it stays out of the latency rows the slow-server findings and top read.
            latency_us: request
                .server_latency_ns()
                .map(|ns| u32::try_from(ns / 1000).unwrap_or(u32::MAX)),
            error_text: request.error_text.as_ref().map(|text| text.as_str()),
        };
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .record_request(unix_second, &record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conn::tracking::Endpoint,
        history::HistoryLimits,
        memcache::{Command, RequestObservation, Status},
    };

    #[test]
    fn records_decoded_requests_and_observations() {
        let history = Arc::new(Mutex::new(History::new(900, HistoryLimits::default())));
        let mut sink = HistorySink::new(
            history.clone(),
            SharedServices::watching(&[("memcached", 11211)]),
        );
        let endpoint = Endpoint {
            service: 0,
            server: "10.0.0.1:11211".parse().unwrap(),
            role: crate::model::Role::Client,
        };
        let now = crate::clock::monotonic_ns();
        sink.memcache(
            &MemcacheEvent::Request {
                endpoint,
                request: RequestObservation::stored_set(now),
                sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
                pid: 0,
                comm: [0; agent_common::COMM_LEN],
            },
            Some("php-fpm"),
        );
        sink.observation(&Observation::Retransmit {
            endpoint,
            kind: crate::model::RetransmitKind::Data,
        });
        sink.observation(&Observation::TrackingDropped);
        let snapshot = history.lock().unwrap().snapshot(0);
        let rows: Vec<_> = snapshot.seconds.iter().flat_map(|s| &s.requests).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, Status::Stored);
        assert_eq!(snapshot.label(rows[0].command), "set");
        assert_eq!(snapshot.label(rows[0].comm), "php-fpm");
        let latency = snapshot
            .seconds
            .iter()
            .flat_map(|s| &s.latency)
            .next()
            .unwrap();
        let p50 = latency.histogram().quantile_us(0.5).unwrap();
        assert!((200.0..=300.0).contains(&p50), "{p50}");
        assert_eq!(
            snapshot.seconds.iter().map(|s| s.tcp.len()).sum::<usize>(),
            1
        );
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(snapshot.end_s.abs_diff(wall) <= 1);
    }

    #[test]
    fn borrowed_requests_record_like_owned_facts() {
        let limits = HistoryLimits::default();
        let mut owned = History::new(900, limits.clone());
        let mut borrowed = History::new(900, limits);
        for (second, comm, status, latency_us) in [
            (100, Some("php"), Status::Hit, Some(120)),
            (100, None, Status::Miss, None),
            (101, Some("php"), Status::Hit, Some(900)),
        ] {
            owned.record(
                second,
                Fact::Request {
                    service: "memcached".into(),
                    server: "10.0.0.1:11211".into(),
                    role: crate::model::Role::Client,
                    comm: comm.map(str::to_string),
                    command: "get".into(),
                    status,
                    latency_us,
                },
            );
            borrowed.record_request(
                second,
                &RequestRecord {
                    service: "memcached",
                    server: "10.0.0.1:11211",
                    role: crate::model::Role::Client,
                    comm,
                    command: "get",
                    status,
                    latency_us,
                    error_text: None,
                },
            );
        }
        assert_eq!(
            resolved_rows(serde_json::to_value(owned.snapshot(0)).unwrap()),
            resolved_rows(serde_json::to_value(borrowed.snapshot(0)).unwrap())
        );
    }

    /// A snapshot's rows with label indices replaced by the labels, sorted: the interning order
    /// and the (hash-seeded) row order differ between two histories holding the same facts.
    fn resolved_rows(snapshot: serde_json::Value) -> Vec<String> {
        let labels = snapshot["labels"].as_array().unwrap().clone();
        let label = |value: &serde_json::Value| match value.as_u64() {
            Some(index) => labels[index as usize].clone(),
            None => value.clone(),
        };
        let mut rows = Vec::new();
        for second in snapshot["seconds"].as_array().unwrap() {
            for (kind, label_positions) in
                [("requests", &[0, 1, 3, 4][..]), ("latency", &[0, 1, 3])]
            {
                for row in second[kind].as_array().into_iter().flatten() {
                    let mut row = row.as_array().unwrap().clone();
                    for &position in label_positions {
                        row[position] = label(&row[position]);
                    }
                    rows.push(format!("{} {kind} {row:?}", second["t"]));
                }
            }
        }
        rows.sort();
        assert!(!rows.is_empty());
        rows
    }

    #[test]
    fn cached_clock_offset_gives_the_same_second() {
        let mut clock = MonotonicToUnix::default();
        let now = crate::clock::monotonic_ns();
        for ts in [now, now - 3_000_000_000, now + 10_000_000] {
            let cached = clock.unix_second(ts);
            assert!(cached.abs_diff(unix_second_of_monotonic(ts)) <= 1, "{ts}");
        }
    }

    /// Idle workers long-polling an empty queue (`get jobs/t=1000`, answered `END` when the
    /// wait ends) on one queue server, beside a busy peer answering in 2 ms: the waits are the
    /// clients' choice, so diagnose finds no slow server (the audit's "p99 882 ms while its
    /// peers' is 4.9 ms ... take it out of the pool").
    #[test]
    fn long_poll_fetches_do_not_make_their_queue_server_slow() {
        use crate::memcache::{KestrelOptions, QueueOp, QueueOpKind};
        let history = Arc::new(Mutex::new(History::new(900, HistoryLimits::default())));
        let mut sink = HistorySink::new(
            history.clone(),
            SharedServices::watching(&[("kestrel", 22133)]),
        );
        let endpoint = |server: &str| Endpoint {
            service: 0,
            server: server.parse().unwrap(),
            role: crate::model::Role::Client,
        };
        let fetch = |options: KestrelOptions, status, op, latency_ms: u64, ts| RequestObservation {
            command: Command::Get,
            status,
            latency_ns: Some(latency_ms * 1_000_000),
            request_bytes: 20,
            response_bytes: 5,
            queue: Some(QueueOp { op, options }),
            value_len: None,
            ..RequestObservation::stored_set(ts)
        };
        let wait = KestrelOptions {
            timeout_ms: Some(1000),
            ..KestrelOptions::default()
        };
        let now = crate::clock::monotonic_ns();
        let second = 1_000_000_000;
        for s in 1..=40 {
            let ts = now - s * second;
            let mut events = Vec::new();
            for _ in 0..3 {
                events.push((
                    "10.0.0.1:22133",
                    fetch(wait, Status::Miss, QueueOpKind::EmptyPoll, 1000, ts),
                ));
            }
            // Now and then an item comes part way through a worker's wait.
            if s % 5 == 0 {
                events.push((
                    "10.0.0.1:22133",
                    fetch(wait, Status::Hit, QueueOpKind::Dequeue, 400, ts),
                ));
            }
            for _ in 0..50 {
                events.push((
                    "10.0.0.2:22133",
                    fetch(
                        KestrelOptions::default(),
                        Status::Hit,
                        QueueOpKind::Dequeue,
                        2,
                        ts,
                    ),
                ));
            }
            for (server, request) in events {
                sink.memcache(
                    &MemcacheEvent::Request {
                        endpoint: endpoint(server),
                        request,
                        sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
                        pid: 0,
                        comm: [0; agent_common::COMM_LEN],
                    },
                    Some("worker"),
                );
            }
        }
        let snapshot = history.lock().unwrap().snapshot(0);
        let findings =
            crate::diagnose::diagnose(&snapshot, &crate::diagnose::DiagnoseThresholds::default());
        assert!(
            findings.iter().all(|f| f.id != "slow-server"),
            "{findings:#?}"
        );
        // Their requests are still counted.
        let polls: u64 = snapshot
            .seconds
            .iter()
            .flat_map(|s| &s.requests)
            .filter(|r| snapshot.label(r.server) == "10.0.0.1:22133")
            .map(|r| r.count as u64)
            .sum();
        assert_eq!(polls, 40 * 3 + 8);
    }
}
