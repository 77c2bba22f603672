//! The per-edge table: which process on this host talks to which server, how much, how fast
//! and how badly. Client-side edges only: for a local server the "process" would always be the
//! server itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::{latency::LatencyHistogram, HistorySnapshot};

use crate::model::Role;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// Process name (comm); "?" when the process was not known.
    pub process: String,
    pub service: String,
    pub server: String,
    pub requests: u64,
    pub requests_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Requests that failed (error replies, timeouts, no answer).
    pub errors: u64,
    /// Open connections (largest sample in the window), when the sampler reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// The client host (fleet reports: Prometheus `instance` or its hostname); `process` is
    /// then "*", all processes of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// p99 measured at the server's own socket (fleet reports, when its host runs an agent):
    /// the rest of `p99_ms` is spent between the boxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_p99_ms: Option<f64>,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    errors: u64,
    hist: LatencyHistogram,
    connections: Option<u32>,
}

/// Edges with traffic or open connections in [start_s, end_s], busiest first.
pub fn edge_table(snap: &HistorySnapshot, start_s: u64, end_s: u64) -> Vec<Edge> {
    let mut edges: BTreeMap<(String, String, String), Acc> = BTreeMap::new();
    let key = |comm: u32, service: u32, server: u32| {
        let comm = match snap.label(comm) {
            "" => "?".to_string(),
            c => c.to_string(),
        };
        (
            comm,
            snap.label(service).to_string(),
            snap.label(server).to_string(),
        )
    };
    for second in snap
        .seconds
        .iter()
        .filter(|s| s.t >= start_s && s.t <= end_s)
    {
        for row in second.requests.iter().filter(|r| r.role == Role::Client) {
            let acc = edges
                .entry(key(row.comm, row.service, row.server))
                .or_default();
            acc.requests += row.count as u64;
            if row.status.is_failure() {
                acc.errors += row.count as u64;
            }
        }
        for row in second.latency.iter().filter(|r| r.role == Role::Client) {
            edges
                .entry(key(row.comm, row.service, row.server))
                .or_default()
                .hist
                .add_cells(&row.cells);
        }
        for row in second
            .edge_connections
            .iter()
            .filter(|r| r.role == Role::Client)
        {
            let acc = edges
                .entry(key(row.comm, row.service, row.server))
                .or_default();
            acc.connections = Some(acc.connections.unwrap_or(0).max(row.open));
        }
    }
    let span = (end_s.saturating_sub(start_s) + 1) as f64;
    let mut table: Vec<Edge> = edges
        .into_iter()
        .map(|((process, service, server), acc)| Edge {
            process,
            service,
            server,
            requests: acc.requests,
            requests_per_s: acc.requests as f64 / span,
            p50_ms: acc.hist.quantile_us(0.5).map(|us| us / 1000.0),
            p99_ms: acc.hist.quantile_us(0.99).map(|us| us / 1000.0),
            errors: acc.errors,
            connections: acc.connections,
            host: None,
            server_p99_ms: None,
        })
        .collect();
    table.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.process.cmp(&b.process))
            .then_with(|| a.server.cmp(&b.server))
    });
    table
}
