//! Feeds the daemon's shared [`History`] from the pipeline: an [`ObservationSink`] that turns
//! tracking observations and decoded requests into [`Fact`]s, stamped with the unix second
//! they happened in (kernel timestamps are CLOCK_MONOTONIC; the offset to wall time is taken
//! when the fact is recorded).

use std::sync::{Arc, Mutex};

use super::{fact_from_observation, Fact, History, RequestStatus};
use crate::{capture::MemcacheEvent, pipeline::ObservationSink, tracking::Observation};

pub struct HistorySink {
    history: Arc<Mutex<History>>,
    service_names: Vec<String>,
}

impl HistorySink {
    pub fn new(history: Arc<Mutex<History>>, service_names: Vec<String>) -> HistorySink {
        HistorySink {
            history,
            service_names,
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
        if let Some(fact) = fact_from_observation(observation, &self.service_names) {
            self.record(
                unix_second_of_monotonic(observation_ts_ns(observation)),
                fact,
            );
        }
    }

    fn memcache(&mut self, event: &MemcacheEvent, comm: Option<&str>) {
        let MemcacheEvent::Request { endpoint, request } = event else {
            return;
        };
        let Some(service) = self.service_names.get(endpoint.service) else {
            return;
        };
        let fact = Fact::Request {
            service: service.clone(),
            server: endpoint.server.to_string(),
            role: endpoint.role.into(),
            comm: comm.map(str::to_string),
            command: request.command.as_str().to_string(),
            status: RequestStatus::from_label(request.status.as_str()),
            latency_us: request
                .latency_ns
                .map(|ns| u32::try_from(ns / 1000).unwrap_or(u32::MAX)),
        };
        self.record(unix_second_of_monotonic(request.request_ts_ns), fact);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        history::HistoryLimits,
        memcache::{Command, RequestObservation, Status},
        tracking::Endpoint,
    };

    #[test]
    fn records_decoded_requests_and_observations() {
        let history = Arc::new(Mutex::new(History::new(900, HistoryLimits::default())));
        let mut sink = HistorySink::new(history.clone(), vec!["memcached".into()]);
        let endpoint = Endpoint {
            service: 0,
            server: "10.0.0.1:11211".parse().unwrap(),
            role: crate::events::Role::Client,
        };
        let now = crate::clock::monotonic_ns();
        sink.memcache(
            &MemcacheEvent::Request {
                endpoint,
                request: RequestObservation {
                    command: Command::Set,
                    status: Status::Stored,
                    key: None,
                    latency_ns: Some(250_000),
                    request_ts_ns: now,
                    request_bytes: 30,
                    response_bytes: 8,
                    queue: None,
                },
            },
            Some("php-fpm"),
        );
        sink.observation(&Observation::Retransmit {
            endpoint,
            kind: crate::tracking::RetransmitKind::Data,
        });
        sink.observation(&Observation::TrackingDropped);
        let snapshot = history.lock().unwrap().snapshot(0);
        let rows: Vec<_> = snapshot.seconds.iter().flat_map(|s| &s.requests).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, RequestStatus::Stored);
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
}
