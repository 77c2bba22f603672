//! The Prometheus registry and the mapping from observations to series. Metric names and labels
//! are a contract with alert rules and dashboards (packaging/); change them only deliberately.

use std::sync::atomic::AtomicU64;

use foldhash::{HashMap, HashMapExt, HashSet};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    clock::unix_now,
    conn::tracking::{Endpoint, Observation},
    kernel::capture::MemcacheEvent,
    keystats::ring_view::RingView,
    memcache::Command,
    model::{Role, Status, SynDirection},
    services::SharedServices,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub closed_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadWriteLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub comm: String,
    pub outcome: &'static str,
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetransmitLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResetLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectFailureLabels {
    pub service: String,
    pub server: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SynLabels {
    pub service: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FdErrorLabels {
    pub comm: String,
    pub errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub command: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecodeErrorLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub service: String,
    pub server: String,
    pub queue: String,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommLabels {
    pub comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommServiceLabels {
    pub comm: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpClosedLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub hostname: String,
    pub kernel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RingViewLabels {
    pub service: String,
    pub fingerprint: String,
    pub servers: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Idle times that separate the usual server idle timeouts (memcached, Kestrel, load balancers).
const IDLE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];
/// Cache connections live from milliseconds (churn) to days (pools).
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0,
];

/// Resolves 50 us (a fast local hit) to 1 s (a timeout in all but name).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

fn idle_histogram() -> Histogram {
    Histogram::new(IDLE_BUCKETS.iter().copied())
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

/// Label value used once a bounded label has run out of room.
pub const OVERFLOW_LABEL: &str = "other";

/// Keeps label cardinality bounded: the first `limit` distinct values per group are kept, later
/// ones are folded into [`OVERFLOW_LABEL`].
#[derive(Debug)]
pub struct LabelBudget {
    limit: usize,
    seen: HashMap<usize, HashSet<String>>,
    pub folded: u64,
}

impl LabelBudget {
    pub fn new(limit: usize) -> Self {
        LabelBudget {
            limit,
            seen: HashMap::new(),
            folded: 0,
        }
    }

    pub fn admit(&mut self, group: usize, value: String) -> String {
        let seen = self.seen.entry(group).or_default();
        if seen.contains(&value) {
            return value;
        }
        if seen.len() < self.limit {
            seen.insert(value.clone());
            return value;
        }
        self.folded += 1;
        OVERFLOW_LABEL.to_string()
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub connections_opened: Family<EndpointLabels, Counter>,
    pub connections_closed: Family<ClosedLabels, Counter>,
    pub connections_active: Family<EndpointLabels, Gauge>,
    pub idle_before_close: HistogramFamily<ClosedLabels>,
    pub connection_duration: HistogramFamily<EndpointLabels>,
    pub probe_up: Family<ProbeLabels, Gauge>,
    pub events_lost: Family<SourceLabels, Counter>,
    pub build_info: Family<VersionLabels, Gauge>,
    pub host_info: Family<HostLabels, Gauge>,
    pub service_servers_info: Family<RingViewLabels, Gauge>,
    pub dead_socket_writes: Family<DeadWriteLabels, Counter>,
    pub tcp_retransmits: Family<RetransmitLabels, Counter>,
    pub tcp_resets: Family<ResetLabels, Counter>,
    pub connect_failures: Family<ConnectFailureLabels, Counter>,
    pub syn: Family<SynLabels, Counter>,
    pub fd_exhaustion_errors: Family<FdErrorLabels, Counter>,
    pub memcache_requests: Family<RequestLabels, Counter>,
    pub memcache_duration: HistogramFamily<CommandLabels>,
    pub memcache_bytes: Family<BytesLabels, Counter>,
    pub memcache_decode_errors: Family<DecodeErrorLabels, Counter>,
    pub queue_operations: Family<QueueLabels, Counter>,
    pub key_splits: Family<ServiceLabels, Counter>,
    pub listen_queue_length: Family<ServiceLabels, Gauge>,
    pub listen_queue_limit: Family<ServiceLabels, Gauge>,
    pub listen_overflows: Counter,
    pub listen_drops: Counter,
    pub syncookies_sent: Counter,
    pub process_open_fds: Family<CommLabels, Gauge>,
    pub process_fd_limit: Family<CommLabels, Gauge>,
    pub process_fd_usage_ratio: Family<CommLabels, Gauge<f64, AtomicU64>>,
    pub sampler_namespaces: Family<SourceLabels, Gauge>,
    pub sampler_samples: Counter,
    pub sampler_seconds: Counter<f64, AtomicU64>,
    pub sampler_processes_deferred: Gauge,
    pub process_connections: Family<CommServiceLabels, Gauge>,
    pub host_open_files: Gauge,
    pub host_file_limit: Gauge,
    pub fd_exhaustion_probes_armed: Gauge,
    pub capture_sample_ratio: Gauge<f64, AtomicU64>,
    pub bpf_run_seconds: Family<ProgramLabels, Counter<f64, AtomicU64>>,
    pub bpf_runs: Family<ProgramLabels, Counter>,
    pub http_connections_rejected: Family<HttpClosedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

impl Metrics {
    /// The families `cacheprobe top` reads over the control socket, in a registry of their own
    /// that shares their values: encoding it every second costs a small part of a full scrape,
    /// whose latency histograms top does not need.
    pub fn top_registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("cacheprobe");
        registry.register(
            "connections_active",
            "Watched TCP connections currently open",
            self.connections_active.clone(),
        );
        registry.register(
            "memcache_bytes",
            "Payload bytes on watched connections",
            self.memcache_bytes.clone(),
        );
        registry.register(
            "queue_operations",
            "Queue operations",
            self.queue_operations.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            self.process_open_fds.clone(),
        );
        registry.register(
            "process_fd_limit",
            "Soft RLIMIT_NOFILE",
            self.process_fd_limit.clone(),
        );
        registry.register(
            "process_connections",
            "Watched connections per process name and service",
            self.process_connections.clone(),
        );
        registry.register(
            "fd_exhaustion_errors",
            "EMFILE/ENFILE errors",
            self.fd_exhaustion_errors.clone(),
        );
        registry
    }

    pub fn new() -> (Metrics, Registry) {
        let mut registry = Registry::with_prefix("cacheprobe");
        let metrics = Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_active: Family::default(),
            idle_before_close: Family::new_with_constructor(idle_histogram),
            connection_duration: Family::new_with_constructor(duration_histogram),
            probe_up: Family::default(),
            events_lost: Family::default(),
            build_info: Family::default(),
            host_info: Family::default(),
            service_servers_info: Family::default(),
            dead_socket_writes: Family::default(),
            tcp_retransmits: Family::default(),
            tcp_resets: Family::default(),
            connect_failures: Family::default(),
            syn: Family::default(),
            fd_exhaustion_errors: Family::default(),
            memcache_requests: Family::default(),
            memcache_duration: Family::new_with_constructor(latency_histogram),
            memcache_bytes: Family::default(),
            memcache_decode_errors: Family::default(),
            queue_operations: Family::default(),
            key_splits: Family::default(),
            listen_queue_length: Family::default(),
            listen_queue_limit: Family::default(),
            listen_overflows: Counter::default(),
            listen_drops: Counter::default(),
            syncookies_sent: Counter::default(),
            process_open_fds: Family::default(),
            process_fd_limit: Family::default(),
            process_fd_usage_ratio: Family::default(),
            sampler_namespaces: Family::default(),
            sampler_samples: Counter::default(),
            sampler_seconds: Counter::default(),
            sampler_processes_deferred: Gauge::default(),
            process_connections: Family::default(),
            host_open_files: Gauge::default(),
            host_file_limit: Gauge::default(),
            fd_exhaustion_probes_armed: Gauge::default(),
            capture_sample_ratio: Gauge::default(),
            bpf_run_seconds: Family::default(),
            bpf_runs: Family::default(),
            http_connections_rejected: Family::default(),
        };
        registry.register(
            "connections_opened",
            "Watched TCP connections that reached ESTABLISHED",
            metrics.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Watched TCP connections that closed, by which side closed first (local, peer, reset)",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "connections_active",
            "Watched TCP connections currently open",
            metrics.connections_active.clone(),
        );
        registry.register(
            "connection_idle_before_close_seconds",
            "Time from a connection's last send or receive to its close",
            metrics.idle_before_close.clone(),
        );
        registry.register(
            "connection_duration_seconds",
            "Lifetime of watched connections opened while the agent ran",
            metrics.connection_duration.clone(),
        );
        registry.register(
            "probe_up",
            "Whether a kernel probe is attached (1) or unavailable (0)",
            metrics.probe_up.clone(),
        );
        registry.register(
            "events_lost",
            "Events the agent could not record (ringbuf: socket event ring buffer full, socket_map: kernel socket map full, payload_ringbuf: payload ring buffer full, uncaptured_syscall: a captured socket's send/receive came from a syscall capture cannot read (sendfile, sendmmsg, io_uring), capture_incomplete: a send/receive whose frames capture could not all follow (per-call budget, step bound or an endless line), frame_map: the kernel's frame-state map was full, tracker: connection table full)",
            metrics.events_lost.clone(),
        );
        registry.register(
            "build_info",
            "Build information of the running agent",
            metrics.build_info.clone(),
        );
        registry.register(
            "host_info",
            "This host's name and kernel release, always 1 (fleet views join on instance)",
            metrics.host_info.clone(),
        );
        registry.register(
            "service_servers_info",
            "Servers this host's clients used in the last 10 minutes, per service: a stable \
             fingerprint of the sorted set and its size, always 1 (hosts whose fingerprints \
             differ send the same key to different servers)",
            metrics.service_servers_info.clone(),
        );
        registry.register(
            "dead_socket_writes",
            "Sends onto connections the peer had already closed, by what the application saw next (eof, reset, unnoticed within 5 s)",
            metrics.dead_socket_writes.clone(),
        );
        registry.register(
            "tcp_retransmits",
            "TCP retransmissions on watched connections (kind: data, syn, synack)",
            metrics.tcp_retransmits.clone(),
        );
        registry.register(
            "tcp_resets",
            "TCP resets on watched ports, sent or received",
            metrics.tcp_resets.clone(),
        );
        registry.register(
            "connect_failures",
            "Connection attempts to watched services that never reached ESTABLISHED (refused, timeout)",
            metrics.connect_failures.clone(),
        );
        registry.register(
            "syn",
            "Connection attempts: out = SYNs sent by this host, in = attempts at local listeners (handshakes completed plus SYNs and handshakes refused with a full queue)",
            metrics.syn.clone(),
        );
        registry.register(
            "fd_exhaustion_errors",
            "Syscalls (socket, accept, accept4, open, openat, dup) that failed with EMFILE or ENFILE \
             while the probes were armed (see fd_exhaustion_probes_armed)",
            metrics.fd_exhaustion_errors.clone(),
        );
        registry.register(
            "memcache_requests",
            "Memcache requests decoded from watched connections, by command and outcome",
            metrics.memcache_requests.clone(),
        );
        registry.register(
            "memcache_request_duration_seconds",
            "Time from a request's send to the first byte of its response",
            metrics.memcache_duration.clone(),
        );
        registry.register(
            "memcache_bytes",
            "Payload bytes on watched connections, as sent or received by this host",
            metrics.memcache_bytes.clone(),
        );
        registry.register(
            "memcache_decode_errors",
            "Stretches of traffic the decoder could not decode (garbage, gaps, truncated captures, ...)",
            metrics.memcache_decode_errors.clone(),
        );
        registry.register(
            "queue_operations",
            "Queue operations on memcache-protocol queues (Starling, Kestrel)",
            metrics.queue_operations.clone(),
        );
        registry.register(
            "memcache_key_split",
            "Keys this host sent to two different servers of a service within a minute",
            metrics.key_splits.clone(),
        );
        registry.register(
            "listen_queue_length",
            "Connections waiting in accept queues of local listeners on the service port (sum over listeners)",
            metrics.listen_queue_length.clone(),
        );
        registry.register(
            "listen_queue_limit",
            "Accept backlog limits of local listeners on the service port (sum over listeners whose limit is readable)",
            metrics.listen_queue_limit.clone(),
        );
        registry.register(
            "listen_overflows",
            "TcpExt ListenOverflows summed over network namespaces: SYNs dropped because an accept queue was full",
            metrics.listen_overflows.clone(),
        );
        registry.register(
            "listen_drops",
            "TcpExt ListenDrops summed over network namespaces: all drops at listeners",
            metrics.listen_drops.clone(),
        );
        registry.register(
            "syncookies_sent",
            "TcpExt SyncookiesSent summed over network namespaces",
            metrics.syncookies_sent.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors of the process of this name with the highest fd usage (processes holding watched sockets)",
            metrics.process_open_fds.clone(),
        );
        registry.register(
            "process_fd_limit",
            "Soft RLIMIT_NOFILE of that same process, read live",
            metrics.process_fd_limit.clone(),
        );
        registry.register(
            "process_fd_usage_ratio",
            "Open fds over the soft fd limit, max over processes of this name",
            metrics.process_fd_usage_ratio.clone(),
        );
        registry.register(
            "sampler_socket_table_namespaces",
            "Network namespaces whose socket table the last /proc sample read, by how (sock_diag: kernel dump; proc_text: /proc/<pid>/net/tcp fallback, logged, costs CPU per socket of the namespace; reused: no connection came or went since the last dump)",
            metrics.sampler_namespaces.clone(),
        );
        registry.register(
            "sampler_samples",
            "/proc samples completed (the one at start-up included)",
            metrics.sampler_samples.clone(),
        );
        registry.register(
            "sampler_seconds",
            "Wall time spent in /proc samples (listing sockets, walking process fds), on a blocking thread",
            metrics.sampler_seconds.clone(),
        );
        registry.register(
            "sampler_processes_deferred",
            "Processes whose fd walk the last sample postponed to a later one (per-sample budget); their previous owners are used meanwhile",
            metrics.sampler_processes_deferred.clone(),
        );
        registry.register(
            "process_connections",
            "Watched connections held by processes of this name, per service",
            metrics.process_connections.clone(),
        );
        registry.register(
            "host_open_files",
            "Open file handles on the host (fs.file-nr)",
            metrics.host_open_files.clone(),
        );
        registry.register(
            "host_file_limit",
            "Host file handle limit (fs.file-max)",
            metrics.host_file_limit.clone(),
        );
        registry.register(
            "fd_exhaustion_probes_armed",
            "1 while the EMFILE/ENFILE syscall probes are attached: a process holding watched \
             sockets, or the host, uses at least half its descriptor limit (they tax every \
             syscall on the host, so they are detached after a calm minute)",
            metrics.fd_exhaustion_probes_armed.clone(),
        );
        registry.register(
            "capture_sample_ratio",
            "Share of healthy watched connections whose payloads are decoded: 1 until captured \
             records exceed limits.capture_records_per_second, then 1/2, 1/4, ... Request and \
             byte counters are scaled up by its inverse; latency histograms hold the decoded \
             requests only",
            metrics.capture_sample_ratio.clone(),
        );
        registry.register(
            "bpf_program_run_seconds",
            "Time the agent's kernel programs ran (needs sysctl kernel.bpf_stats_enabled=1)",
            metrics.bpf_run_seconds.clone(),
        );
        registry.register(
            "bpf_program_runs",
            "Runs of the agent's kernel programs (needs sysctl kernel.bpf_stats_enabled=1)",
            metrics.bpf_runs.clone(),
        );
        registry.register(
            "http_connections_rejected",
            "/metrics connections closed before or instead of a normal answer, by reason \
             (per-source or total connection limit, evicted for a newcomer, head timeout or too \
             large, bad request, TLS handshake, concurrent scrape, response not read in time or \
             stalled while another scrape waited)",
            metrics.http_connections_rejected.clone(),
        );
        for closed in crate::export::http::Closed::ALL {
            let _ = metrics
                .http_connections_rejected
                .get_or_create(&HttpClosedLabels {
                    reason: closed.label(),
                });
        }
        metrics
            .build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        metrics.host_info.get_or_create(&host_labels()).set(1);
        for source in [
            "ringbuf",
            "socket_map",
            "payload_ringbuf",
            "uncaptured_syscall",
            "capture_incomplete",
            "frame_map",
            "tracker",
        ] {
            // Exported from the start so "no loss" reads as 0, not as a missing series.
            let _ = metrics.events_lost.get_or_create(&SourceLabels { source });
        }
        (metrics, registry)
    }
}

/// The kernel's own names, read once: `hostname` as the UTS namespace sees it, `kernel` the release.
fn host_labels() -> HostLabels {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|err| {
                tracing::warn!(%err, path, "cannot read host identity for host_info");
                "unknown".to_string()
            })
    };
    HostLabels {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
    }
}

/// Applies observations to the metrics, resolving service indices to names and bounding the
/// `server` label per service.
pub struct ObservationRecorder {
    metrics: Metrics,
    services: SharedServices,
    servers: LabelBudget,
    comms: LabelBudget,
    queues: LabelBudget,
    server_labels: HashMap<Endpoint, EndpointLabels>,
    // Handles to series already created: the per-request path then costs one hash lookup and
    // an atomic add, no label allocation.
    request_counters: HashMap<(Endpoint, Command, Status), Counter>,
    duration_histograms: HashMap<(Endpoint, Command), Histogram>,
    byte_counters: HashMap<(Endpoint, bool), Counter>,
    ring_view: RingView,
    /// The info series currently exported per service, to remove when the view changes.
    ring_series: HashMap<usize, RingViewLabels>,
}

/// Cached series handles beyond this many are dropped and re-created on demand.
const MAX_CACHED_SERIES: usize = 100_000;

impl ObservationRecorder {
    pub fn new(
        metrics: Metrics,
        services: SharedServices,
        max_servers_per_service: usize,
        max_comms: usize,
    ) -> Self {
        ObservationRecorder {
            metrics,
            services,
            servers: LabelBudget::new(max_servers_per_service),
            comms: LabelBudget::new(max_comms),
            queues: LabelBudget::new(64),
            request_counters: HashMap::new(),
            duration_histograms: HashMap::new(),
            byte_counters: HashMap::new(),
            server_labels: HashMap::new(),
            ring_view: RingView::default(),
            ring_series: HashMap::new(),
        }
    }

    /// Re-publishes `service_servers_info` from the servers clients used recently: one series
    /// per service, replaced when the set changes.
    pub fn publish_ring_views(&mut self, now_s: u64) {
        let views = self.ring_view.views(now_s);
        let stale: Vec<usize> = self
            .ring_series
            .keys()
            .filter(|service| !views.contains_key(service))
            .copied()
            .collect();
        for service in stale {
            if let Some(labels) = self.ring_series.remove(&service) {
                self.metrics.service_servers_info.remove(&labels);
            }
        }
        for (service, view) in views {
            let labels = RingViewLabels {
                service: self.service_name(service),
                fingerprint: view.fingerprint,
                servers: view.servers.to_string(),
            };
            if self.ring_series.get(&service) == Some(&labels) {
                continue;
            }
            if let Some(old) = self.ring_series.insert(service, labels.clone()) {
                self.metrics.service_servers_info.remove(&old);
            }
            self.metrics
                .service_servers_info
                .get_or_create(&labels)
                .set(1);
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn service_name(&self, service: usize) -> String {
        self.services
            .load()
            .name(service)
            .unwrap_or(OVERFLOW_LABEL)
            .to_string()
    }

    /// Process names are bounded like servers: the first `max_comms` keep their own series.
    pub fn comm_label(&mut self, comm: &str) -> String {
        self.comms.admit(0, comm.to_string())
    }

    /// `weight`: how many requests (and bytes) each decoded one stands for while capture
    /// samples connections (1 otherwise).
    pub fn record_memcache(&mut self, event: &MemcacheEvent, weight: u64) {
        match event {
            MemcacheEvent::Request { endpoint, request } => {
                // Per request: one lookup when the series handle is cached, as it almost
                // always is.
                let key = (*endpoint, request.command, request.status);
                match self.request_counters.get(&key) {
                    Some(counter) => {
                        counter.inc_by(weight);
                    }
                    None => {
                        if self.request_counters.len() >= MAX_CACHED_SERIES {
                            self.request_counters.clear();
                        }
                        let labels = self.endpoint_labels(endpoint);
                        let counter = self
                            .metrics
                            .memcache_requests
                            .get_or_create(&RequestLabels {
                                service: labels.service,
                                server: labels.server,
                                role: labels.role,
                                command: request.command.as_str(),
                                status: request.status.as_str(),
                            })
                            .clone();
                        counter.inc_by(weight);
                        self.request_counters.insert(key, counter);
                    }
                }
                if let Some(latency) = request.latency_ns {
                    let seconds = latency as f64 / 1e9;
                    let key = (*endpoint, request.command);
                    match self.duration_histograms.get(&key) {
                        Some(histogram) => histogram.observe(seconds),
                        None => {
                            if self.duration_histograms.len() >= MAX_CACHED_SERIES {
                                self.duration_histograms.clear();
                            }
                            let labels = self.endpoint_labels(endpoint);
                            let histogram = self
                                .metrics
                                .memcache_duration
                                .get_or_create(&CommandLabels {
                                    service: labels.service,
                                    server: labels.server,
                                    role: labels.role,
                                    command: request.command.as_str(),
                                })
                                .clone();
                            histogram.observe(seconds);
                            self.duration_histograms.insert(key, histogram);
                        }
                    }
                }
                if let (Some(queue), Some(key)) = (&request.queue, &request.key) {
                    let labels = self.endpoint_labels(endpoint);
                    let name = String::from_utf8_lossy(key.as_bytes()).into_owned();
                    let queue_label = self.queues.admit(endpoint.service, name);
                    self.metrics
                        .queue_operations
                        .get_or_create(&QueueLabels {
                            service: labels.service,
                            server: labels.server,
                            queue: queue_label,
                            op: queue.op.as_str(),
                        })
                        .inc_by(weight);
                }
            }
            MemcacheEvent::DecodeError { service, reason } => {
                let service = self.service_name(*service);
                self.metrics
                    .memcache_decode_errors
                    .get_or_create(&DecodeErrorLabels {
                        service,
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            MemcacheEvent::Bytes {
                endpoint,
                sent,
                bytes,
            } => {
                let key = (*endpoint, *sent);
                match self.byte_counters.get(&key) {
                    Some(counter) => {
                        counter.inc_by(bytes.saturating_mul(weight));
                    }
                    None => {
                        if self.byte_counters.len() >= MAX_CACHED_SERIES {
                            self.byte_counters.clear();
                        }
                        let labels = self.endpoint_labels(endpoint);
                        let counter = self
                            .metrics
                            .memcache_bytes
                            .get_or_create(&BytesLabels {
                                service: labels.service,
                                server: labels.server,
                                role: labels.role,
                                direction: if *sent { "sent" } else { "received" },
                            })
                            .clone();
                        counter.inc_by(bytes.saturating_mul(weight));
                        self.byte_counters.insert(key, counter);
                    }
                }
            }
        }
    }

    pub fn record_key_split(&mut self, service: usize) {
        let service = self.service_name(service);
        self.metrics
            .key_splits
            .get_or_create(&ServiceLabels { service })
            .inc();
    }

    fn count_syn(&mut self, service: usize, direction: SynDirection) {
        let service = self.service_name(service);
        self.metrics
            .syn
            .get_or_create(&SynLabels {
                service,
                direction: direction.as_str(),
            })
            .inc();
    }

    fn endpoint_labels(&mut self, endpoint: &Endpoint) -> EndpointLabels {
        if let Some(labels) = self.server_labels.get(endpoint) {
            return labels.clone();
        }
        let service = self.service_name(endpoint.service);
        let server = self
            .servers
            .admit(endpoint.service, endpoint.server.to_string());
        let labels = EndpointLabels {
            service,
            server,
            role: endpoint.role.as_str(),
        };
        // Bounded by the label budget times roles: folded endpoints are not cached individually.
        if labels.server != OVERFLOW_LABEL {
            self.server_labels.insert(*endpoint, labels.clone());
        }
        labels
    }

    pub fn record(&mut self, observation: &Observation) {
        match observation {
            Observation::ConnectionOpened { endpoint, .. } => {
                if endpoint.role == Role::Client {
                    self.ring_view
                        .opened(endpoint.service, endpoint.server, unix_now());
                }
                let labels = self.endpoint_labels(endpoint);
                self.metrics.connections_opened.get_or_create(&labels).inc();
                self.metrics.connections_active.get_or_create(&labels).inc();
            }
            Observation::ConnectionAdopted { endpoint } => {
                if endpoint.role == Role::Client {
                    self.ring_view
                        .opened(endpoint.service, endpoint.server, unix_now());
                }
                let labels = self.endpoint_labels(endpoint);
                self.metrics.connections_active.get_or_create(&labels).inc();
                // Make the opened counter exist for this endpoint so rates start at 0.
                let _ = self.metrics.connections_opened.get_or_create(&labels);
            }
            Observation::ConnectionClosed {
                endpoint,
                closed_by,
                duration_ns,
                idle_before_close_ns,
                ..
            } => {
                if endpoint.role == Role::Client {
                    self.ring_view
                        .closed(endpoint.service, endpoint.server, unix_now());
                }
                let labels = self.endpoint_labels(endpoint);
                self.metrics.connections_active.get_or_create(&labels).dec();
                let closed = ClosedLabels {
                    service: labels.service.clone(),
                    server: labels.server.clone(),
                    role: labels.role,
                    closed_by: closed_by.as_str(),
                };
                self.metrics.connections_closed.get_or_create(&closed).inc();
                if let Some(idle) = idle_before_close_ns {
                    self.metrics
                        .idle_before_close
                        .get_or_create(&closed)
                        .observe(*idle as f64 / 1e9);
                }
                if let Some(duration) = duration_ns {
                    self.metrics
                        .connection_duration
                        .get_or_create(&labels)
                        .observe(*duration as f64 / 1e9);
                }
            }
            Observation::DeadSocketWrite(write) => {
                let labels = self.endpoint_labels(&write.endpoint);
                let comm = self.comm_label(&write.comm);
                self.metrics
                    .dead_socket_writes
                    .get_or_create(&DeadWriteLabels {
                        service: labels.service,
                        server: labels.server,
                        role: labels.role,
                        comm,
                        outcome: write.outcome.as_str(),
                        command: write.command.unwrap_or("unknown"),
                    })
                    .inc();
            }
            Observation::ConnectFailed { endpoint, reason } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .connect_failures
                    .get_or_create(&ConnectFailureLabels {
                        service: labels.service,
                        server: labels.server,
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            Observation::Retransmit { endpoint, kind } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .tcp_retransmits
                    .get_or_create(&RetransmitLabels {
                        service: labels.service,
                        server: labels.server,
                        role: labels.role,
                        kind: kind.as_str(),
                    })
                    .inc();
            }
            Observation::Reset {
                endpoint,
                direction,
            } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .tcp_resets
                    .get_or_create(&ResetLabels {
                        service: labels.service,
                        server: labels.server,
                        role: labels.role,
                        direction: direction.as_str(),
                    })
                    .inc();
            }
            Observation::SynSent { service } => self.count_syn(*service, SynDirection::Out),
            Observation::HandshakeCompleted { service } => {
                self.count_syn(*service, SynDirection::In)
            }
            Observation::FdExhausted { comm, errno, .. } => {
                let comm = self.comm_label(comm);
                let errno = match errno {
                    24 => "EMFILE",
                    23 => "ENFILE",
                    _ => "other",
                };
                self.metrics
                    .fd_exhaustion_errors
                    .get_or_create(&FdErrorLabels { comm, errno })
                    .inc();
            }
            Observation::TrackingDropped => {
                self.metrics
                    .events_lost
                    .get_or_create(&SourceLabels { source: "tracker" })
                    .inc();
            }
        }
    }
}

/// Exposition formats. Prometheus negotiates OpenMetrics; promtool and most other tools read the
/// classic text format, so that is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(match format {
        Format::OpenMetrics => text,
        Format::PrometheusText => openmetrics_to_prometheus_text(&text),
    })
}

/// Where the next line starting with '#' begins (or the end). Searches for the byte '#' (a
/// memchr scan; '#' is rare in sample lines) rather than for "\n#", which is several times slower.
fn next_comment_line(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(offset) = text[from..].find('#') {
        let at = from + offset;
        if at > 0 && bytes[at - 1] == b'\n' {
            return at;
        }
        from = at + 1;
    }
    text.len()
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4: counters are announced under their
/// `_total` sample name, `unknown` becomes `untyped`, and UNIT/EOF lines go.
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    let mut rest = openmetrics;
    while !rest.is_empty() {
        if !rest.starts_with('#') {
            // Sample lines pass through unchanged: copy the whole run up to the next comment
            // line at once (a scrape at the cardinality ceiling is ~350k of them).
            let end = next_comment_line(rest);
            out.push_str(&rest[..end]);
            if !out.ends_with('\n') {
                out.push('\n');
            }
            rest = &rest[end..];
            continue;
        }
        let end = rest.find('\n').map_or(rest.len(), |newline| newline + 1);
        let line = rest[..end].trim_end_matches('\n');
        rest = &rest[end..];
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(help_line) = line.strip_prefix("# HELP ") {
            let (name, help) = help_line.split_once(' ').unwrap_or((help_line, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(type_line) = line.strip_prefix("# TYPE ") {
            let (name, kind) = type_line.split_once(' ').unwrap_or((type_line, "untyped"));
            let (suffix, kind_out) = match kind {
                "counter" => ("_total", "counter"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
                }
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind_out}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClosedBy, Role};

    fn endpoint(server: &str) -> Endpoint {
        Endpoint {
            service: 0,
            server: server.parse().unwrap(),
            role: Role::Client,
        }
    }

    #[test]
    fn close_is_recorded_with_all_contract_labels() {
        let (metrics, registry) = Metrics::new();
        let mut recorder = ObservationRecorder::new(
            metrics,
            SharedServices::watching(&[("memcached", 11211)]),
            10,
            10,
        );
        recorder.record(&Observation::ConnectionOpened {
            endpoint: endpoint("127.0.0.1:11211"),
            ts_ns: 0,
        });
        recorder.record(&Observation::ConnectionClosed {
            endpoint: endpoint("127.0.0.1:11211"),
            closed_by: ClosedBy::Peer,
            ts_ns: 0,
            duration_ns: Some(3_000_000_000),
            idle_before_close_ns: Some(2_500_000_000),
        });
        let text = encode(&registry, Format::OpenMetrics).unwrap();
        let labels = r#"service="memcached",server="127.0.0.1:11211",role="client""#;
        assert!(
            text.contains(&format!(
                "cacheprobe_connections_opened_total{{{labels}}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("cacheprobe_connections_active{{{labels}}} 0")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "cacheprobe_connections_closed_total{{{labels},closed_by=\"peer\"}} 1"
        )));
        assert!(text.contains(&format!(
            "cacheprobe_connection_idle_before_close_seconds_bucket{{le=\"5.0\",{labels},closed_by=\"peer\"}} 1"
        )) || text.contains(&format!(
            "cacheprobe_connection_idle_before_close_seconds_bucket{{{labels},closed_by=\"peer\",le=\"5.0\"}} 1"
        )), "{text}");
        assert!(text.contains("cacheprobe_build_info{version=\""), "{text}");
        assert!(
            text.contains("cacheprobe_events_lost_total{source=\"ringbuf\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP x_things Things.\n# TYPE x_things counter\nx_things_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# TYPE u unknown\nu 3\n# UNIT h seconds\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# HELP x_things_total Things.\n# TYPE x_things_total counter\nx_things_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# TYPE u untyped\nu 3\n"
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(None), Format::PrometheusText);
    }

    #[test]
    fn prometheus_text_keeps_runs_of_samples_and_ends_every_line() {
        let om = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# TYPE c counter\nc_total 5";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# TYPE c_total counter\nc_total 5\n"
        );
        // A '#' inside a label value is not a comment line.
        let om = "# TYPE g gauge\ng{comm=\"#x\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# TYPE g gauge\ng{comm=\"#x\"} 1\n"
        );
        assert_eq!(openmetrics_to_prometheus_text(""), "");
    }

    #[test]
    fn server_labels_are_bounded_per_service() {
        let mut budget = LabelBudget::new(2);
        assert_eq!(budget.admit(0, "a".into()), "a");
        assert_eq!(budget.admit(0, "b".into()), "b");
        assert_eq!(budget.admit(0, "c".into()), OVERFLOW_LABEL);
        assert_eq!(budget.admit(0, "a".into()), "a");
        assert_eq!(budget.admit(1, "c".into()), "c");
        assert_eq!(budget.folded, 1);
    }
}
