//! The metric families, their label sets and their registration. Metric names and labels are a
//! contract with alert rules and dashboards (packaging/); change them only deliberately.

use std::sync::atomic::AtomicU64;

use foldhash::{HashMap, HashMapExt, HashSet};

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// `service`, `server` and `role` of one endpoint: the labels every per-endpoint family starts
/// with. The family's own labels follow them ([`OnEndpoint`]); build those sets with the
/// constructors here, so the three are never copied by hand.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct EndpointLabels {
    pub service: String,
    pub server: String,
    pub role: &'static str,
}

impl EndpointLabels {
    /// Writes the three labels into a label set being encoded, in the contract's order.
    fn encode_into(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("service", self.service.as_str()).encode(encoder.encode_label())?;
        ("server", self.server.as_str()).encode(encoder.encode_label())?;
        ("role", self.role).encode(encoder.encode_label())
    }

    fn with<T>(self, own: T) -> OnEndpoint<T> {
        OnEndpoint {
            endpoint: self,
            own,
        }
    }

    pub fn closed(self, closed_by: &'static str) -> ClosedLabels {
        self.with(ClosedByLabel { closed_by })
    }

    pub fn dead_write(
        self,
        comm: String,
        outcome: &'static str,
        command: &'static str,
    ) -> DeadWriteLabels {
        self.with(DeadWriteLabel {
            comm,
            outcome,
            command,
        })
    }

    pub fn retransmit(self, kind: &'static str) -> RetransmitLabels {
        self.with(KindLabel { kind })
    }

    pub fn reset(self, direction: &'static str) -> ResetLabels {
        self.with(DirectionLabel { direction })
    }

    pub fn request(self, command: &'static str, status: &'static str) -> RequestLabels {
        self.with(RequestLabel { command, status })
    }

    pub fn command(self, command: &'static str) -> CommandLabels {
        self.with(CommandLabel { command })
    }

    pub fn bytes(self, direction: &'static str) -> BytesLabels {
        self.with(DirectionLabel { direction })
    }

    pub fn queue(self, queue: String, op: &'static str) -> QueueLabels {
        self.with(QueueLabel { queue, op })
    }

    /// Connect failures carry no role: only clients connect.
    pub fn connect_failure(self, reason: &'static str) -> ConnectFailureLabels {
        ConnectFailureLabels {
            service: self.service,
            server: self.server,
            reason,
        }
    }
}

impl EncodeLabelSet for EndpointLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.encode_into(&mut encoder)
    }
}

/// A per-endpoint family's label set: the endpoint's labels, then the family's own (`T`). Written
/// out by hand because prometheus-client 0.22's `#[prometheus(flatten)]` works only on the last
/// field, which would put the endpoint's labels after the family's and change the exposition.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct OnEndpoint<T> {
    pub endpoint: EndpointLabels,
    pub own: T,
}

impl<T: EncodeLabelSet> EncodeLabelSet for OnEndpoint<T> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.endpoint.encode_into(&mut encoder)?;
        self.own.encode(encoder)
    }
}

/// `cacheprobe_connections_closed_total`, `cacheprobe_connection_idle_before_close_seconds`.
pub type ClosedLabels = OnEndpoint<ClosedByLabel>;
/// `cacheprobe_dead_socket_writes_total`.
pub type DeadWriteLabels = OnEndpoint<DeadWriteLabel>;
/// `cacheprobe_tcp_retransmits_total`.
pub type RetransmitLabels = OnEndpoint<KindLabel>;
/// `cacheprobe_tcp_resets_total`.
pub type ResetLabels = OnEndpoint<DirectionLabel>;
/// `cacheprobe_memcache_requests_total`.
pub type RequestLabels = OnEndpoint<RequestLabel>;
/// The per-command histograms: request duration, value size, keys per request.
pub type CommandLabels = OnEndpoint<CommandLabel>;
/// `cacheprobe_memcache_bytes_total`.
pub type BytesLabels = OnEndpoint<DirectionLabel>;
/// `cacheprobe_queue_operations_total`, `cacheprobe_queue_blocking_fetches_total`.
pub type QueueLabels = OnEndpoint<QueueLabel>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedByLabel {
    pub closed_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadWriteLabel {
    pub comm: String,
    pub outcome: &'static str,
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub command: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: &'static str,
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
pub struct DecodeErrorLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueNameLabels {
    pub service: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLostLabels {
    pub service: String,
    pub queue: String,
    pub outcome: &'static str,
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

pub use crate::export::latency::LatencyHistogram;
type LatencyFamily<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

/// Requests at least this slow carry their id as an exemplar (memcached answers in tens of
/// microseconds; a millisecond is slow for a cache).
pub const EXEMPLAR_MIN_LATENCY_NS: u64 = 1_000_000;
/// At most this many exemplars are set per second for slow requests, and as many again for the
/// sampled slice, whatever the request rate: Prometheus keeps only the last one per bucket per
/// scrape.
pub const EXEMPLARS_PER_SECOND: u32 = 20;
/// The widest slice of request ids that are exemplars at both ends whatever their latency, so a
/// request slow only between the boxes (fast at the server) is seen at both ends. Every id (1):
/// the budget narrows it each second to what it can keep (1 in 2, 4, ... alike at both ends,
/// `exemplar_budget`). A fixed 1 in 1000 left a quiet server (5 requests/s) with no fast
/// exemplar to join in minutes, so the cross-VM join rested on the server being slower than
/// the 1 ms threshold (issue 18).
pub const EXEMPLAR_SAMPLE_ONE_IN: u32 = 1;

/// Idle times that separate the usual server idle timeouts (memcached, Kestrel, load balancers).
const IDLE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];
/// Cache connections live from milliseconds (churn) to days (pools).
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0,
];

/// Time in queue: a busy consumer takes messages within milliseconds, a stalled one hours.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

fn queue_wait_histogram() -> Histogram {
    Histogram::new(QUEUE_WAIT_BUCKETS.iter().copied())
}

fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::default()
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

/// Declares every metric once: a row is a field of [`Metrics`], its initial value (the type's
/// default unless `= value` is given) and the name and help it is registered under. Rows are in
/// registration order, which is the order of the exposition.
macro_rules! declare_metrics {
    ($( $field:ident: $ty:ty $(= $init:expr)? => $name:literal, $help:literal $(, $top:ident)?; )+) => {
        #[derive(Clone)]
        pub struct Metrics {
            $( pub $field: $ty, )+
        }

        impl Metrics {
            /// Every metric's name (without the `cacheprobe_` prefix) and help, in registration
            /// order.
            pub const DECLARED: &'static [(&'static str, &'static str)] = &[$(($name, $help)),+];

            fn unregistered() -> Metrics {
                Metrics {
                    $( $field: declare_metrics!(@init $($init)?), )+
                }
            }

            fn register(&self, registry: &mut Registry) {
                $( registry.register($name, $help, self.$field.clone()); )+
            }

            /// The families `cacheprobe top` reads over the control socket (rows marked `top`), in
            /// a registry of their own that shares their values: encoding it every second costs
            /// a small part of a full scrape, whose latency histograms top does not need.
            pub fn top_registry(&self) -> Registry {
                let mut registry = Registry::with_prefix("cacheprobe");
                $(
                    if declare_metrics!(@top $($top)?) {
                        registry.register($name, $help, self.$field.clone());
                    }
                )+
                registry
            }
        }
    };
    (@top) => { false };
    (@top top) => { true };
    (@init) => { Default::default() };
    (@init $init:expr) => { $init };
}

declare_metrics! {
    connections_opened: Family<EndpointLabels, Counter>
        => "connections_opened",
        "Watched TCP connections that reached ESTABLISHED";
    connections_closed: Family<ClosedLabels, Counter>
        => "connections_closed",
        "Watched TCP connections that closed, by which side closed first (local, peer, reset)";
    connections_active: Family<EndpointLabels, Gauge>
        => "connections_active",
        "Watched TCP connections currently open", top;
    idle_before_close: HistogramFamily<ClosedLabels> = Family::new_with_constructor(idle_histogram)
        => "connection_idle_before_close_seconds",
        "Time from a connection's last send or receive to its close";
    connection_duration: HistogramFamily<EndpointLabels> = Family::new_with_constructor(duration_histogram)
        => "connection_duration_seconds",
        "Lifetime of watched connections opened while the agent ran";
    probe_up: Family<ProbeLabels, Gauge>
        => "probe_up",
        "Whether a kernel probe is attached (1) or unavailable (0)";
    events_lost: Family<SourceLabels, Counter>
        => "events_lost",
        "Events the agent could not record (ringbuf: socket event ring buffer full, socket_map: kernel socket map full, payload_ringbuf: payload ring buffer full, uncaptured_syscall: a captured socket's send/receive came from a syscall capture cannot read (sendfile, sendmmsg, io_uring), capture_incomplete: a send/receive whose frames capture could not all follow (per-call budget, step bound or an endless line), frame_map: the kernel's frame-state map was full, tracker: connection table full, payload_unknown_socket: a captured send/receive of a socket the agent did not know)";
    build_info: Family<VersionLabels, Gauge>
        => "build_info",
        "Build information of the running agent";
    host_info: Family<HostLabels, Gauge>
        => "host_info",
        "This host's name and kernel release, always 1 (fleet views join on instance)";
    service_servers_info: Family<RingViewLabels, Gauge>
        => "service_servers_info",
        "Servers this host's clients used in the last 10 minutes, per service: a stable \
             fingerprint of the sorted set and its size, always 1 (hosts whose fingerprints \
             differ send the same key to different servers)";
    dead_socket_writes: Family<DeadWriteLabels, Counter>
        => "dead_socket_writes",
        "Sends onto connections the peer had already closed, (after its FIN, and answered by its reset or never acknowledged), by what the application saw next (eof, reset, unnoticed within 5 s; unknown where the kernel lacks the send/receive tracepoints: one per connection, at its close)";
    tcp_retransmits: Family<RetransmitLabels, Counter>
        => "tcp_retransmits",
        "TCP retransmissions on watched connections (kind: data, syn, synack)";
    tcp_resets: Family<ResetLabels, Counter>
        => "tcp_resets",
        "TCP resets on watched ports, sent or received, at each watched end (a reset between \
             two sockets of this host is counted sent at one role and received at the other)";
    connect_failures: Family<ConnectFailureLabels, Counter>
        => "connect_failures",
        "Connection attempts to watched services that never reached ESTABLISHED (refused, timeout)";
    syn: Family<SynLabels, Counter>
        => "syn",
        "Connection attempts: out = SYNs sent by this host, in = attempts at local listeners (handshakes completed plus SYNs and handshakes refused with a full queue)";
    fd_exhaustion_errors: Family<FdErrorLabels, Counter>
        => "fd_exhaustion_errors",
        "Syscalls (socket, accept, accept4, open, openat, dup) that failed with EMFILE or ENFILE \
             while the probes were armed (see fd_exhaustion_probes_armed)", top;
    memcache_requests: Family<RequestLabels, Counter>
        => "memcache_requests",
        "Memcache requests decoded from watched connections, by command and outcome";
    memcache_duration: LatencyFamily<CommandLabels> = Family::new_with_constructor(latency_histogram)
        => "memcache_request_duration_seconds",
        "Time from a request's send to the first byte of its response";
    memcache_value_size: HistogramFamily<CommandLabels> = Family::new_with_constructor(crate::sizes::value_size_histogram)
        => "memcache_value_size_bytes",
        "Value sizes of stores and of hits (bucket bounds are every second chunk size of memcached's default slab classes)";
    memcache_keys_per_request: HistogramFamily<CommandLabels> = Family::new_with_constructor(crate::sizes::keys_per_request_histogram)
        => "memcache_keys_per_request",
        "Keys named per request (multi-key get batch sizes)";
    memcache_bytes: Family<BytesLabels, Counter>
        => "memcache_bytes",
        "Payload bytes on watched connections, as sent or received by this host", top;
    memcache_decode_errors: Family<DecodeErrorLabels, Counter>
        => "memcache_decode_errors",
        "Stretches of traffic the decoder could not decode (garbage, gaps, truncated captures, ...)";
    queue_operations: Family<QueueLabels, Counter>
        => "queue_operations",
        "Operations on memcache-protocol queues (Starling, Kestrel) seen at this end (role): \
             enqueues the server took (stored, or sent noreply), fetches it answered with an \
             item (dequeue, peek, open) or empty (empty_poll), closes and aborts it answered; \
             refused and unanswered requests are only in memcache_requests_total", top;
    queue_blocking_fetches: Family<QueueLabels, Counter>
        => "queue_blocking_fetches",
        "Queue fetches that let the server wait for an item (Kestrel t=<ms>), answered or not, by queue operation; their latency is left out of memcache_request_duration_seconds";
    queue_messages_lost: Family<QueueLostLabels, Counter>
        => "queue_messages_lost",
        "Enqueues written onto queue connections the server had already closed, by what the producer saw next (eof, reset: it could retry; unnoticed: silently lost)";
    queue_wait: HistogramFamily<QueueNameLabels> = Family::new_with_constructor(queue_wait_histogram)
        => "queue_wait_seconds",
        "Time messages spent in the queue, seen on the queue server's host (each dequeue matched to its enqueue in FIFO order by length)";
    queue_depth: Family<QueueNameLabels, Gauge>
        => "queue_depth_relative",
        "Messages enqueued minus dequeued on this host's queue servers since the agent started (relative: messages already queued then are not counted)";
    key_splits: Family<ServiceLabels, Counter>
        => "memcache_key_split",
        "Keys this host sent to two different servers of a service within a minute";
    listen_queue_length: Family<ServiceLabels, Gauge>
        => "listen_queue_length",
        "Connections waiting in accept queues of local listeners on the service port (sum over listeners)";
    listen_queue_limit: Family<ServiceLabels, Gauge>
        => "listen_queue_limit",
        "Accept backlog limits of local listeners on the service port (sum over listeners whose limit is readable)";
    listen_overflows: Counter
        => "listen_overflows",
        "TcpExt ListenOverflows summed over network namespaces: SYNs dropped because an accept queue was full";
    listen_drops: Counter
        => "listen_drops",
        "TcpExt ListenDrops summed over network namespaces: all drops at listeners";
    syncookies_sent: Counter
        => "syncookies_sent",
        "TcpExt SyncookiesSent summed over network namespaces";
    process_open_fds: Family<CommLabels, Gauge>
        => "process_open_fds",
        "Open file descriptors of the process of this name with the highest fd usage (processes holding watched sockets)", top;
    process_fd_limit: Family<CommLabels, Gauge>
        => "process_fd_limit",
        "Soft RLIMIT_NOFILE of that same process, read live", top;
    process_fd_usage_ratio: Family<CommLabels, Gauge<f64, AtomicU64>>
        => "process_fd_usage_ratio",
        "Open fds over the soft fd limit, max over processes of this name";
    sampler_namespaces: Family<SourceLabels, Gauge>
        => "sampler_socket_table_namespaces",
        "Network namespaces whose socket table the last /proc sample read, by how (sock_diag: kernel dump; proc_text: /proc/<pid>/net/tcp fallback, logged, costs CPU per socket of the namespace; reused: no connection came or went since the last dump)";
    sampler_samples: Counter
        => "sampler_samples",
        "/proc samples completed (the one at start-up included)";
    sampler_seconds: Counter<f64, AtomicU64>
        => "sampler_seconds",
        "Wall time spent in /proc samples (listing sockets, walking process fds), on a blocking thread";
    sampler_processes_deferred: Gauge
        => "sampler_processes_deferred",
        "Processes whose fd walk the last sample postponed to a later one (per-sample budget); their previous owners are used meanwhile";
    process_connections: Family<CommServiceLabels, Gauge>
        => "process_connections",
        "Watched connections held by processes of this name, per service", top;
    host_open_files: Gauge
        => "host_open_files",
        "Open file handles on the host (fs.file-nr)";
    host_file_limit: Gauge
        => "host_file_limit",
        "Host file handle limit (fs.file-max)";
    fd_exhaustion_probes_armed: Gauge
        => "fd_exhaustion_probes_armed",
        "1 while the EMFILE/ENFILE syscall probes are attached: a process holding watched \
             sockets, or the host, uses at least half its descriptor limit (they tax every \
             syscall on the host, so they are detached after a calm minute)";
    config_last_reload_successful: Gauge
        => "config_last_reload_successful",
        "1 unless the last reload (SIGHUP, systemctl reload) was rejected: the agent then keeps \
             running the config it had, and systemctl reload exits 0 all the same";
    send_receive_probes_attached: Gauge
        => "send_receive_probes_attached",
        "1 while the send/receive programs are attached (always, unless \
             limits.socket_probes_on_demand takes them off while nothing is captured and no \
             watched connection's peer has closed)";
    capture_sample_ratio: Gauge<f64, AtomicU64>
        => "capture_sample_ratio",
        "Share of healthy watched connections whose payloads are decoded, of the most sampled \
             service (each service has its own): 1 until captured records exceed its share of \
             limits.capture_records_per_second, then 1/2, 1/4, ... (1/c for a service with too \
             few connections to sample, whose every connection is followed one second in c; \
             less when that second is cut short at 8 shares of records). \
             Request and byte counters are scaled up; latency histograms hold the decoded \
             requests only";
    capture_sample_turns: Counter
        => "capture_sample_turns",
        "Times a service's capture sample turned to other connections because over a whole \
             second one of its roles had calls and none on a followed connection (a service \
             with few connections): each turn lets the followed streams go, between requests, \
             and meets others from their next request";
    capture_calls: Counter
        => "capture_calls",
        "Sends and receives on watched connections whose frames the kernel followed and \
             whose payload reached the agent (one per call, however many records it took): the \
             kernel's capture work grows with this count, the decoding budget bounds it";
    bpf_run_seconds: Family<ProgramLabels, Counter<f64, AtomicU64>>
        => "bpf_program_run_seconds",
        "Time the agent's kernel programs ran (needs sysctl kernel.bpf_stats_enabled=1)";
    bpf_runs: Family<ProgramLabels, Counter>
        => "bpf_program_runs",
        "Runs of the agent's kernel programs (needs sysctl kernel.bpf_stats_enabled=1)";
    http_connections_rejected: Family<HttpClosedLabels, Counter>
        => "http_connections_rejected",
        "/metrics connections closed before or instead of a normal answer, by reason \
             (per-source or total connection limit, evicted for a newcomer, head timeout or too \
             large, bad request, TLS handshake, concurrent scrape, response not read in time or \
             stalled while another scrape waited)";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

impl Metrics {
    pub fn new() -> (Metrics, Registry) {
        let mut registry = Registry::with_prefix("cacheprobe");
        let metrics = Metrics::unregistered();
        metrics.register(&mut registry);
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
            "payload_unknown_socket",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::encode::{encode, Format};

    /// Each declared metric is registered once, under its declared name and help.
    #[test]
    fn every_declared_metric_is_registered_once() {
        let (_, registry) = Metrics::new();
        let text = encode(&registry, Format::OpenMetrics).unwrap();
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert_eq!(helps.len(), Metrics::DECLARED.len(), "{text}");
        assert_eq!(Metrics::DECLARED.len(), 52);
        for (name, help) in Metrics::DECLARED {
            // prometheus-client ends every help with a full stop.
            let line = format!("# HELP cacheprobe_{name} {help}.");
            assert_eq!(helps.iter().filter(|l| **l == line).count(), 1, "{line}");
        }
    }

    /// `top`'s registry holds the families top reads, each under its declared name and help.
    #[test]
    fn the_top_registry_holds_the_rows_marked_top() {
        let (metrics, _) = Metrics::new();
        let text = encode(&metrics.top_registry(), Format::OpenMetrics).unwrap();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP cacheprobe_"))
            .map(|l| {
                let name = l.split(' ').next().unwrap();
                let help = Metrics::DECLARED
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap()
                    .1;
                assert_eq!(l, format!("{name} {help}."));
                name
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connections_active",
                "fd_exhaustion_errors",
                "memcache_bytes",
                "process_connections",
                "process_fd_limit",
                "process_open_fds",
                "queue_operations",
            ]
        );
    }
}
