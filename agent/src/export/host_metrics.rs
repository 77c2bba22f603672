//! Turns /proc samples into metrics: listen queues, TcpExt counters, fd pressure per process
//! name and connections held per process name and service.

use std::collections::{BTreeMap, HashSet};

use crate::{
    export::metrics::{
        CommLabels, CommServiceLabels, Metrics, ServiceLabels, SourceLabels, SynLabels,
    },
    host::{aggregate::OTHER_COMM, parse::TcpExtCounters, Snapshot},
    model::SynDirection,
};

/// Per process name: the process with the highest fd usage, so open fds, limit and ratio
/// describe one real process rather than mixing several.
#[derive(Debug, Clone, PartialEq)]
pub struct FdPressure {
    pub open_fds: u64,
    pub limit: u64,
    pub ratio: f64,
}

pub fn fd_pressure_by_comm(snapshot: &Snapshot) -> BTreeMap<String, FdPressure> {
    let named: HashSet<&str> = snapshot
        .comms
        .comms
        .iter()
        .map(|c| c.comm.as_str())
        .filter(|c| *c != OTHER_COMM)
        .collect();
    let mut by_comm: BTreeMap<String, FdPressure> = BTreeMap::new();
    for process in &snapshot.processes {
        let comm = if named.contains(process.comm.as_str()) {
            process.comm.clone()
        } else {
            OTHER_COMM.to_string()
        };
        let candidate = FdPressure {
            open_fds: process.open_fds,
            limit: process.soft_nofile,
            ratio: process.fd_usage_ratio(),
        };
        let entry = by_comm.entry(comm).or_insert_with(|| candidate.clone());
        if candidate.ratio > entry.ratio {
            *entry = candidate;
        }
    }
    by_comm
}

/// Applies one sample. Gauges are replaced wholesale so processes that went away stop
/// reporting; counters advance by the sampler's monotonic totals.
pub fn apply(metrics: &Metrics, snapshot: &Snapshot, last_tcp_ext: &mut TcpExtCounters) {
    apply_sampler_work(metrics, snapshot);
    apply_listen_queues(metrics, snapshot);
    apply_tcp_ext(metrics, snapshot, last_tcp_ext);
    if let Some(files) = &snapshot.file_handles {
        metrics.host_open_files.set(files.open as i64);
        metrics
            .host_file_limit
            .set(files.max.min(i64::MAX as u64) as i64);
    }
    apply_processes(metrics, snapshot);
}

/// What the sample cost: namespaces per table source, samples, seconds, deferred walks.
fn apply_sampler_work(metrics: &Metrics, snapshot: &Snapshot) {
    let sources = snapshot.table_sources;
    for (source, namespaces) in [
        ("sock_diag", sources.sock_diag),
        ("proc_text", sources.proc_text),
        ("reused", sources.reused_namespaces),
    ] {
        metrics
            .sampler_namespaces
            .get_or_create(&SourceLabels { source })
            .set(namespaces as i64);
    }
    metrics.sampler_samples.inc();
    metrics
        .sampler_seconds
        .inc_by(snapshot.duration.as_secs_f64());
    metrics
        .sampler_processes_deferred
        .set(snapshot.fd_walk.processes_deferred as i64);
}

/// Listen queues per service, and the SYNs their listeners dropped.
fn apply_listen_queues(metrics: &Metrics, snapshot: &Snapshot) {
    metrics.listen_queue_length.clear();
    metrics.listen_queue_limit.clear();
    for (service, summary) in &snapshot.listen_queues {
        if summary.listeners == 0 {
            continue;
        }
        let labels = ServiceLabels {
            service: service.clone(),
        };
        metrics
            .listen_queue_length
            .get_or_create(&labels)
            .set(summary.queue_len_sum as i64);
        if summary.limit_unknown < summary.listeners {
            metrics
                .listen_queue_limit
                .get_or_create(&labels)
                .set(summary.queue_limit_sum as i64);
        }
    }

    // Connection attempts a listener refused never became sockets, so no probe saw them; the
    // accepted ones are counted from their state changes as they happen.
    for (service, &dropped) in &snapshot.listener_drops {
        metrics
            .syn
            .get_or_create(&SynLabels {
                service: service.clone(),
                direction: SynDirection::In.as_str(),
            })
            .inc_by(dropped);
    }
}

/// The host's TcpExt counters, advanced by what they grew since the last sample.
fn apply_tcp_ext(metrics: &Metrics, snapshot: &Snapshot, last_tcp_ext: &mut TcpExtCounters) {
    let advance =
        |counter: &prometheus_client::metrics::counter::Counter, now: u64, last: &mut u64| {
            if now > *last {
                counter.inc_by(now - *last);
            }
            *last = now.max(*last);
        };
    advance(
        &metrics.listen_overflows,
        snapshot.tcp_ext.listen_overflows,
        &mut last_tcp_ext.listen_overflows,
    );
    advance(
        &metrics.listen_drops,
        snapshot.tcp_ext.listen_drops,
        &mut last_tcp_ext.listen_drops,
    );
    advance(
        &metrics.syncookies_sent,
        snapshot.tcp_ext.syncookies_sent,
        &mut last_tcp_ext.syncookies_sent,
    );
}

/// Descriptor pressure per process name, and connections held per process name and service.
fn apply_processes(metrics: &Metrics, snapshot: &Snapshot) {
    metrics.process_open_fds.clear();
    metrics.process_fd_limit.clear();
    metrics.process_fd_usage_ratio.clear();
    for (comm, pressure) in fd_pressure_by_comm(snapshot) {
        let labels = CommLabels { comm };
        metrics
            .process_open_fds
            .get_or_create(&labels)
            .set(pressure.open_fds as i64);
        metrics
            .process_fd_limit
            .get_or_create(&labels)
            .set(pressure.limit.min(i64::MAX as u64) as i64);
        metrics
            .process_fd_usage_ratio
            .get_or_create(&labels)
            .set(pressure.ratio);
    }
    metrics.process_connections.clear();
    for usage in &snapshot.comms.comms {
        for (service, count) in &usage.connections {
            metrics
                .process_connections
                .get_or_create(&CommServiceLabels {
                    comm: usage.comm.clone(),
                    service: service.clone(),
                })
                .set(*count as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::encode::{encode, Format};

    /// A sampler fallback is logged once; the gauge keeps it visible on every scrape.
    #[test]
    fn socket_table_sources_are_exported() {
        let (metrics, registry) = Metrics::new();
        let mut snapshot = Snapshot::default();
        snapshot.table_sources.sock_diag = 2;
        snapshot.table_sources.proc_text = 1;
        apply(&metrics, &snapshot, &mut TcpExtCounters::default());
        let text = encode(&registry, Format::PrometheusText).unwrap();
        for line in [
            "cacheprobe_sampler_socket_table_namespaces{source=\"sock_diag\"} 2",
            "cacheprobe_sampler_socket_table_namespaces{source=\"proc_text\"} 1",
            "cacheprobe_sampler_socket_table_namespaces{source=\"reused\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    /// The exported ratio and the EMFILE probe arming read the same number for every kind of
    /// limit: zero, unlimited and normal.
    #[test]
    fn exported_fd_ratio_is_the_one_arming_reads() {
        use crate::host::aggregate::ProcessUsage;
        let process = |pid: u32, comm: &str, open_fds: u64, soft_nofile: u64| ProcessUsage {
            pid,
            comm: comm.to_string(),
            netns: 1,
            open_fds,
            soft_nofile,
            connections: Default::default(),
            listening_sockets: Default::default(),
            client_spread: Default::default(),
        };
        let (metrics, registry) = Metrics::new();
        for (comm, open, limit, ratio) in [
            ("zero", 3, 0, "1.0"),
            ("unlimited", 70_000, crate::model::UNLIMITED, "0.0"),
            ("normal", 256, 1024, "0.25"),
        ] {
            let mut snapshot = Snapshot::default();
            snapshot.processes = vec![process(7, comm, open, limit)];
            snapshot.comms = crate::host::aggregate::aggregate_by_comm(&snapshot.processes, 10);
            apply(&metrics, &snapshot, &mut TcpExtCounters::default());
            let text = encode(&registry, Format::PrometheusText).unwrap();
            let line = format!("cacheprobe_process_fd_usage_ratio{{comm=\"{comm}\"}} {ratio}");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
            assert_eq!(
                crate::host::fd_arming::peak_fd_usage(&snapshot),
                fd_pressure_by_comm(&snapshot)[comm].ratio,
                "{comm}"
            );
        }
    }
}
