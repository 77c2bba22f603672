//! Applies observations to the metrics: service ids resolved to names, label values bounded, series handles cached.

use foldhash::{HashMap, HashMapExt};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::{
    clock::unix_now,
    conn::tracking::{Endpoint, Observation},
    export::{latency::Offer, metrics::*},
    keystats::ring_view::RingView,
    memcache::decoders::MemcacheEvent,
    memcache::{Command, RequestObservation},
    model::{ClosedBy, Role, Status, SynDirection},
    services::SharedServices,
    sizes::{size_samples, SizeKind},
};

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
    request_counters: HandleCache<(Endpoint, Command, Status), Counter>,
    duration_histograms: HandleCache<(Endpoint, Command), LatencyHistogram>,
    exemplar_policy: ExemplarPolicy,
    /// The exemplars given this second (by request timestamp), and the slice's width.
    exemplar_budget: super::exemplar_budget::ExemplarBudget,
    byte_counters: HandleCache<(Endpoint, bool), Counter>,
    size_histograms: HandleCache<(Endpoint, Command, SizeKind), Histogram>,
    ring_view: RingView,
    /// The info series currently exported per service, to remove when the view changes.
    ring_series: HashMap<usize, RingViewLabels>,
}

/// Which requests leave their id as an exemplar on the latency histogram (issue 18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExemplarPolicy {
    /// Requests at least this slow do.
    pub min_latency_ns: u64,
    /// So does the slice of request ids [`crate::model::in_exemplar_slice`] picks (narrowed to
    /// the budget, see [`super::exemplar_budget`]), at both ends alike whatever the latency (0:
    /// no slice).
    pub sample_one_in: u32,
    /// At most this many per second for slow requests, and again for the slice (0: none).
    pub per_second: u32,
}

impl Default for ExemplarPolicy {
    fn default() -> Self {
        ExemplarPolicy {
            min_latency_ns: EXEMPLAR_MIN_LATENCY_NS,
            sample_one_in: EXEMPLAR_SAMPLE_ONE_IN,
            per_second: EXEMPLARS_PER_SECOND,
        }
    }
}

impl ExemplarPolicy {
    pub fn from_limits(limits: &crate::config::Limits) -> Self {
        ExemplarPolicy {
            min_latency_ns: limits.exemplar_min_latency_us.saturating_mul(1_000),
            sample_one_in: limits.exemplar_sample_one_in,
            per_second: limits.exemplars_per_second,
        }
    }
}

/// Cached series handles beyond this many are dropped and re-created on demand.
const MAX_CACHED_SERIES: usize = 100_000;

/// Handles to series already created, bounded by [`MAX_CACHED_SERIES`]: past it the cache starts
/// afresh (the series stay in the registry; only their handles are looked up again).
struct HandleCache<K, V>(HashMap<K, V>);

impl<K: std::hash::Hash + Eq, V> HandleCache<K, V> {
    fn new() -> Self {
        HandleCache(HashMap::new())
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.0.get(key)
    }

    fn insert(&mut self, key: K, handle: V) {
        if self.0.len() >= MAX_CACHED_SERIES {
            self.0.clear();
        }
        self.0.insert(key, handle);
    }
}

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
            request_counters: HandleCache::new(),
            duration_histograms: HandleCache::new(),
            exemplar_policy: ExemplarPolicy::default(),
            exemplar_budget: Default::default(),
            byte_counters: HandleCache::new(),
            size_histograms: HandleCache::new(),
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

    /// Which requests carry their id as an exemplar.
    pub fn set_exemplars(&mut self, policy: ExemplarPolicy) {
        self.exemplar_policy = policy;
    }

    /// The exemplar offered for a request that took `latency_ns`: its id when the id is known
    /// and the request is slow or in the sampled slice, while that kind's budget for this second
    /// lasts, with the rank its bucket chooses by. A slow request in the slice counts as slow.
    fn exemplar(
        &mut self,
        request: &crate::memcache::RequestObservation,
        latency_ns: u64,
    ) -> Option<Offer> {
        let policy = self.exemplar_policy;
        if policy.per_second == 0 {
            return None;
        }
        let id = request.request_id?;
        let slow = latency_ns >= policy.min_latency_ns;
        self.exemplar_budget
            .admit(
                id,
                slow,
                request.request_ts_ns,
                policy.sample_one_in,
                policy.per_second,
            )
            .then(|| Offer {
                request_id: id,
                rank: crate::model::exemplar_rank(id, policy.sample_one_in),
            })
    }

    /// `weight`: how many requests (and bytes) each decoded one stands for while capture
    /// samples connections (1 otherwise).
    pub fn record_memcache(&mut self, event: &MemcacheEvent, weight: u64) {
        match event {
            MemcacheEvent::Request {
                endpoint, request, ..
            } => {
                self.count_request(endpoint, request, weight);
                // A blocking queue fetch's latency is mostly the wait its client asked for:
                // counted apart below rather than read as the server's slowness.
                if let Some(latency) = request.server_latency_ns() {
                    self.observe_latency(endpoint, request, latency);
                }
                self.observe_sizes(endpoint, request);
                if let (Some(queue), Some(key)) = (&request.queue, &request.key) {
                    let name = String::from_utf8_lossy(key.as_bytes()).into_owned();
                    let queue_label = self.queues.admit(endpoint.service, name);
                    let queue_labels = self
                        .endpoint_labels(endpoint)
                        .queue(queue_label, queue.op.as_str());
                    // Every blocking fetch is left out of the latency histogram, answered or not.
                    if request.is_blocking_fetch() {
                        self.metrics
                            .queue_blocking_fetches
                            .get_or_create(&queue_labels)
                            .inc_by(weight);
                    }
                    if request.queue_operation().is_some() {
                        self.metrics
                            .queue_operations
                            .get_or_create(&queue_labels)
                            .inc_by(weight);
                    }
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
                        let labels = self.endpoint_labels(endpoint);
                        let counter = self
                            .metrics
                            .memcache_bytes
                            .get_or_create(&labels.bytes(if *sent { "sent" } else { "received" }))
                            .clone();
                        counter.inc_by(bytes.saturating_mul(weight));
                        self.byte_counters.insert(key, counter);
                    }
                }
            }
        }
    }

    /// Per request: one lookup when the series handle is cached, as it almost always is.
    fn count_request(&mut self, endpoint: &Endpoint, request: &RequestObservation, weight: u64) {
        let key = (*endpoint, request.command, request.status);
        match self.request_counters.get(&key) {
            Some(counter) => {
                counter.inc_by(weight);
            }
            None => {
                let labels = self.endpoint_labels(endpoint);
                let counter = self
                    .metrics
                    .memcache_requests
                    .get_or_create(
                        &labels.request(request.command.as_str(), request.status.as_str()),
                    )
                    .clone();
                counter.inc_by(weight);
                self.request_counters.insert(key, counter);
            }
        }
    }

    fn observe_latency(&mut self, endpoint: &Endpoint, request: &RequestObservation, latency: u64) {
        let seconds = latency as f64 / 1e9;
        let exemplar = self.exemplar(request, latency);
        let key = (*endpoint, request.command);
        match self.duration_histograms.get(&key) {
            Some(histogram) => histogram.observe(seconds, exemplar),
            None => {
                let labels = self.endpoint_labels(endpoint);
                let histogram = self
                    .metrics
                    .memcache_duration
                    .get_or_create(&labels.command(request.command.as_str()))
                    .clone();
                histogram.observe(seconds, exemplar);
                self.duration_histograms.insert(key, histogram);
            }
        }
    }

    /// Value sizes and keys per request, where the request has them.
    fn observe_sizes(&mut self, endpoint: &Endpoint, request: &RequestObservation) {
        for (kind, sample) in size_samples(request) {
            let Some(sample) = sample else { continue };
            let key = (*endpoint, request.command, kind);
            if let Some(histogram) = self.size_histograms.get(&key) {
                histogram.observe(sample);
                continue;
            }
            let labels = self.endpoint_labels(endpoint);
            let family = match kind {
                SizeKind::Value => &self.metrics.memcache_value_size,
                SizeKind::Keys => &self.metrics.memcache_keys_per_request,
            };
            let histogram = family
                .get_or_create(&labels.command(request.command.as_str()))
                .clone();
            histogram.observe(sample);
            self.size_histograms.insert(key, histogram);
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
            Observation::ConnectionOpened { endpoint, .. } => self.record_open(endpoint, false),
            Observation::ConnectionAdopted { endpoint } => self.record_open(endpoint, true),
            Observation::ConnectionClosed {
                endpoint,
                closed_by,
                duration_ns,
                idle_before_close_ns,
                ..
            } => self.record_close(endpoint, *closed_by, *duration_ns, *idle_before_close_ns),
            Observation::DeadSocketWrite(write) => {
                let labels = self.endpoint_labels(&write.endpoint);
                let comm = self.comm_label(&write.comm);
                self.metrics
                    .dead_socket_writes
                    .get_or_create(&labels.dead_write(
                        comm,
                        write.outcome.as_str(),
                        write.command.unwrap_or("unknown"),
                    ))
                    .inc();
            }
            Observation::ConnectFailed { endpoint, reason } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .connect_failures
                    .get_or_create(&labels.connect_failure(reason.as_str()))
                    .inc();
            }
            Observation::Retransmit { endpoint, kind } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .tcp_retransmits
                    .get_or_create(&labels.retransmit(kind.as_str()))
                    .inc();
            }
            Observation::Reset {
                endpoint,
                direction,
            } => {
                let labels = self.endpoint_labels(endpoint);
                self.metrics
                    .tcp_resets
                    .get_or_create(&labels.reset(direction.as_str()))
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
            Observation::ConnectionForgotten { endpoint } => self.record_forgotten(endpoint),
            Observation::ConnectionMoved { from, to } => {
                self.record_forgotten(from);
                self.record_open(to, true);
            }
            Observation::TrackingDropped => {
                self.metrics
                    .events_lost
                    .get_or_create(&SourceLabels { source: "tracker" })
                    .inc();
            }
        }
    }

    /// A connection no longer counted as active, with no close: see
    /// [`Observation::ConnectionForgotten`].
    fn record_forgotten(&mut self, endpoint: &Endpoint) {
        if endpoint.role == Role::Client {
            self.ring_view
                .closed(endpoint.service, endpoint.server, unix_now());
        }
        let labels = self.endpoint_labels(endpoint);
        self.metrics.connections_active.get_or_create(&labels).dec();
    }

    /// A connection opened, or `adopted` (open before the agent started: active, not opened).
    fn record_open(&mut self, endpoint: &Endpoint, adopted: bool) {
        if endpoint.role == Role::Client {
            self.ring_view
                .opened(endpoint.service, endpoint.server, unix_now());
        }
        let labels = self.endpoint_labels(endpoint);
        if adopted {
            self.metrics.connections_active.get_or_create(&labels).inc();
            // Make the opened counter exist for this endpoint so rates start at 0.
            let _ = self.metrics.connections_opened.get_or_create(&labels);
        } else {
            self.metrics.connections_opened.get_or_create(&labels).inc();
            self.metrics.connections_active.get_or_create(&labels).inc();
        }
    }

    fn record_close(
        &mut self,
        endpoint: &Endpoint,
        closed_by: ClosedBy,
        duration_ns: Option<u64>,
        idle_before_close_ns: Option<u64>,
    ) {
        if endpoint.role == Role::Client {
            self.ring_view
                .closed(endpoint.service, endpoint.server, unix_now());
        }
        let labels = self.endpoint_labels(endpoint);
        self.metrics.connections_active.get_or_create(&labels).dec();
        let closed = labels.clone().closed(closed_by.as_str());
        self.metrics.connections_closed.get_or_create(&closed).inc();
        if let Some(idle) = idle_before_close_ns {
            self.metrics
                .idle_before_close
                .get_or_create(&closed)
                .observe(idle as f64 / 1e9);
        }
        if let Some(duration) = duration_ns {
            self.metrics
                .connection_duration
                .get_or_create(&labels)
                .observe(duration as f64 / 1e9);
        }
    }
}

#[cfg(test)]
mod tests;
