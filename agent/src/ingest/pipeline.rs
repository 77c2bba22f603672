//! The agent's event pipeline, independent of I/O: kernel records in, metrics (and anything
//! else that listens) out. `run` feeds it from the ring buffers; `diagnose` can drive the same
//! pipeline for a bounded time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use agent_common::{capture_sample, tcp_state};

use crate::{
    config::Config,
    conn::dead_writes::DeadWrite,
    conn::tracking::{Endpoint, Observation, Tracker},
    export::{
        metrics::{Metrics, ProgramLabels, SourceLabels},
        recorder::ObservationRecorder,
    },
    history::{Fact, History},
    ingest::capture_budget::CaptureBudget,
    kernel::capture::{parse_payload, Decoders, MemcacheEvent, CLOSE_GRACE_NS},
    kernel::events::{self, EventKind, SockEventRecord},
    kernel::loader::Probes,
    keystats::{
        key_id, KeyDisplay, KeyRouting, KeySampler, KeySampling, KeysReport, Routing,
        ServerHotKeys, TopK,
    },
    memcache::RequestObservation,
    model::Role,
    services::SharedServices,
};

/// Requests unanswered this long finish as timeouts.
const REQUEST_TIMEOUT_NS: u64 = 5_000_000_000;
const KEY_SPLIT_WINDOW_NS: u64 = 60_000_000_000;
const HOT_KEYS_PER_SERVER: usize = 32;
/// Ring views change when pools connect or age out, minutes apart: no need to look every tick.
const RING_VIEW_INTERVAL_S: u64 = 10;

/// Something that wants every observation as it happens (history for diagnose, tests).
pub trait ObservationSink {
    fn observation(&mut self, observation: &Observation);
    fn memcache(&mut self, event: &MemcacheEvent, comm: Option<&str>);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadOutcome {
    Handled,
    UnknownSocket,
}

use crate::clock::unix_now;

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

pub struct Pipeline {
    services: SharedServices,
    tracker: Tracker,
    recorder: ObservationRecorder,
    decoders: Decoders,
    routing: KeyRouting,
    hot_keys: foldhash::HashMap<Endpoint, (TopK, TopK)>,
    max_hot_key_endpoints: usize,
    key_sampler: KeySampler,
    key_display: KeyDisplay,
    /// Dead writes wait one tick for the payload that names their command.
    held_dead_writes: Vec<DeadWrite>,
    observations: Vec<Observation>,
    memcache_events: Vec<MemcacheEvent>,
    losses_seen: HashMap<&'static str, u64>,
    pub undecodable_records: u64,
    program_stats_seen: HashMap<String, (u64, u64)>,
    history: Option<Arc<Mutex<History>>>,
    sinks: Vec<Box<dyn ObservationSink + Send>>,
    capture_budget: CaptureBudget,
    /// Payload records handled since the budget was last checked, and when that was.
    records_since_check: u64,
    last_budget_check_ns: u64,
    /// A sample shift the kernel has yet to be told (see [`Pipeline::take_capture_shift`]).
    pending_capture_shift: Option<u32>,
    /// When the kernel was last told a new sample (monotonic ns).
    capture_shift_applied_ns: u64,
    /// When `service_servers_info` was last re-published (unix seconds).
    ring_views_published_s: u64,
    extremes: crate::keystats::extremes::Extremes,
    slab_fit: crate::sizes::slab::SlabFitTracker,
    queue_flow: crate::queues::flow::QueueFlow,
    /// Local memcached processes and when /proc was last read for them (unix seconds).
    local_memcacheds: (Vec<crate::sizes::slab::LocalMemcached>, u64),
}

fn key_sampling(config: &Config) -> KeySampling {
    KeySampling {
        exact_per_second: config.limits.key_stats_exact_per_second,
        sample_every: config.limits.key_stats_sample_every,
    }
}

/// Payload records between looks at the decoding budget while they stream in.
const BUDGET_CHECK_RECORDS: u64 = 1024;

impl Pipeline {
    /// `services` is the snapshot every consumer reads; the caller swaps it on reload.
    pub fn new(config: &Config, services: SharedServices, metrics: Metrics) -> Self {
        let max = config.limits.max_sockets as usize;
        metrics.capture_sample_ratio.set(1.0);
        let mut recorder = ObservationRecorder::new(
            metrics,
            services.clone(),
            config.limits.max_servers_per_service,
            config.limits.max_comms,
        );
        recorder.set_exemplars(
            config.limits.exemplar_min_latency_us.saturating_mul(1_000),
            config.limits.exemplars_per_second,
        );
        Pipeline {
            tracker: Tracker::new(services.clone(), max),
            recorder,
            decoders: Decoders::new(max),
            routing: KeyRouting::new(KEY_SPLIT_WINDOW_NS, 100_000),
            hot_keys: foldhash::HashMap::default(),
            max_hot_key_endpoints: config.limits.max_servers_per_service * 2,
            key_sampler: KeySampler::new(key_sampling(config)),
            key_display: config.keys,
            held_dead_writes: Vec::new(),
            observations: Vec::with_capacity(64),
            memcache_events: Vec::with_capacity(256),
            losses_seen: HashMap::new(),
            undecodable_records: 0,
            program_stats_seen: HashMap::new(),
            history: None,
            services,
            sinks: Vec::new(),
            capture_budget: CaptureBudget::new(u64::from(config.limits.capture_records_per_second)),
            records_since_check: 0,
            last_budget_check_ns: 0,
            pending_capture_shift: None,
            capture_shift_applied_ns: 0,
            ring_views_published_s: 0,
            extremes: crate::keystats::extremes::Extremes::new(
                config.limits.max_servers_per_service * 2,
            ),
            slab_fit: crate::sizes::slab::SlabFitTracker::default(),
            local_memcacheds: (Vec::new(), 0),
            queue_flow: crate::queues::flow::QueueFlow::default(),
        }
    }

    /// Decodes every connection whatever the rate (the kernel cannot sample).
    pub fn disable_capture_budget(&mut self) {
        self.capture_budget.set_budget(0);
    }

    /// A new capture sample shift for the kernel, once, after the tick that chose it.
    pub fn take_capture_shift(&mut self) -> Option<u32> {
        self.pending_capture_shift.take()
    }

    /// The kernel follows the sample from [`Pipeline::take_capture_shift`] since `now_ns`.
    /// Records it captured before then from connections the sample has let go are dropped:
    /// their stream's other half will never come, so decoding them would invent timeouts.
    pub fn capture_shift_applied(&mut self, now_ns: u64) {
        self.capture_shift_applied_ns = now_ns;
        // The next budget window starts now: records written under the old sample, still in
        // the ring, would make the new sample look too busy and narrow it again at once.
        self.last_budget_check_ns = now_ns;
        self.records_since_check = 0;
    }

    /// Checks the decoding budget: about once a second, or as soon as a tenth of a second
    /// shows the rate over budget (the payload ring must not fill while the agent waits).
    /// When the sample changes, streams no longer followed are dropped here at once, so their
    /// open requests never read as timeouts.
    fn check_capture_budget(&mut self, now_ns: u64) {
        if self.last_budget_check_ns == 0 {
            self.last_budget_check_ns = now_ns;
            self.records_since_check = 0;
            return;
        }
        // Records are stamped when the kernel wrote them, ticks when they run: a record older
        // than the last look just counts towards the window that started then.
        let Some(elapsed_ns) = now_ns.checked_sub(self.last_budget_check_ns) else {
            return;
        };
        let interval_s = elapsed_ns as f64 / 1e9;
        let over_budget = self
            .capture_budget
            .is_over(self.records_since_check, interval_s);
        if interval_s < 1.0 && !(interval_s >= 0.1 && over_budget) {
            return;
        }
        let records = std::mem::take(&mut self.records_since_check);
        self.last_budget_check_ns = now_ns;
        let Some(shift) = self.capture_budget.observe(records, interval_s) else {
            return;
        };
        tracing::info!(
            records_per_second = (records as f64 / interval_s) as u64,
            followed = format!("1/{}", 1u64 << shift),
            "payload decoding budget: capture sample changed"
        );
        self.decoders.forget_unfollowed(shift);
        self.recorder
            .metrics()
            .capture_sample_ratio
            .set(1.0 / (1u64 << shift) as f64);
        self.pending_capture_shift = Some(shift);
    }

    /// Facts that do not flow through observations (incoming SYNs, key splits, losses) also go
    /// to this history.
    pub fn set_history(&mut self, history: Arc<Mutex<History>>) {
        self.history = Some(history);
    }

    fn record_fact(&self, fact: Fact) {
        if let Some(history) = &self.history {
            if let Ok(mut history) = history.lock() {
                history.record(unix_now(), fact);
            }
        }
    }

    pub fn add_sink(&mut self, sink: Box<dyn ObservationSink + Send>) {
        self.sinks.push(sink);
    }

    /// Records observations produced outside the event stream (e.g. connections seeded from
    /// /proc at start).
    pub fn record_observations(&mut self, observations: Vec<Observation>) {
        self.observations.extend(observations);
        self.flush();
    }

    pub fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// The services snapshot this pipeline reads, for sinks that must name services the same way.
    pub fn services(&self) -> &SharedServices {
        &self.services
    }

    /// A config reload. Services change through the shared snapshot, which the caller swaps;
    /// existing connections keep their endpoints, whose service ids keep their names.
    pub fn reconfigure(&mut self, config: &Config) {
        self.key_display = config.keys;
        self.recorder.set_exemplars(
            config.limits.exemplar_min_latency_us.saturating_mul(1_000),
            config.limits.exemplars_per_second,
        );
    }

    /// One record from the socket event ring buffer.
    pub fn on_socket_record(&mut self, bytes: &[u8]) {
        if let Some(event) = self.decode_socket_record(bytes) {
            self.handle_socket_event(&event);
        }
    }

    /// Decodes a socket event record, counting (not failing on) bad ones.
    pub fn decode_socket_record(&mut self, bytes: &[u8]) -> Option<SockEventRecord> {
        match events::decode(bytes) {
            Ok(event) => Some(event),
            Err(err) => {
                self.undecodable_records += 1;
                if self.undecodable_records.is_power_of_two() {
                    tracing::warn!(%err, count = self.undecodable_records, "undecodable ring buffer record");
                }
                None
            }
        }
    }

    pub fn handle_socket_event(&mut self, event: &SockEventRecord) {
        tracing::trace!(?event, "kernel event");
        if let EventKind::StateChange {
            old_state,
            new_state,
        } = event.kind
        {
            // A new socket (connect, or a child cloned from a listener) at an address an old
            // one used: the old byte stream is over. A socket that closes: its stream ends
            // after a grace for sends that returned after the close (see CLOSE_GRACE_NS).
            if old_state == tcp_state::CLOSE || old_state == tcp_state::LISTEN {
                self.decoders.on_close(event.sk, &mut self.memcache_events);
            } else if new_state == tcp_state::CLOSE {
                self.decoders.close_after_grace(event.sk, event.ts_ns);
            }
        }
        self.tracker.handle(event, &mut self.observations);
        self.flush();
    }

    /// One record from the payload ring buffer. [`PayloadOutcome::UnknownSocket`] means the
    /// socket's events may still be waiting in the other ring: drain it and offer the record
    /// again.
    pub fn on_payload_record(&mut self, bytes: &[u8]) -> PayloadOutcome {
        let payload = match parse_payload(bytes) {
            Ok(payload) => payload,
            Err(err) => {
                self.undecodable_records += 1;
                if self.undecodable_records.is_power_of_two() {
                    tracing::warn!(%err, count = self.undecodable_records, "undecodable payload record");
                }
                return PayloadOutcome::Handled;
            }
        };
        let Some(endpoint) = self.tracker.endpoint_of(payload.sk) else {
            return PayloadOutcome::UnknownSocket;
        };
        if payload.ts_ns > self.capture_shift_applied_ns {
            self.records_since_check += 1;
            if self
                .records_since_check
                .is_multiple_of(BUDGET_CHECK_RECORDS)
            {
                self.check_capture_budget(payload.ts_ns);
            }
        }
        // How many calls this one stands for. A sampled call was followed with probability
        // 2^-shift, so it counts 2^shift (each request's expected count is then its true one,
        // whichever connections the sample drew). The shift is the kernel's when it wrote the
        // record, or the agent's if that is narrower already: a call written before the kernel
        // heard of a narrower sample, from a stream that sample lets go, is dropped (its
        // stream's other half will never come, so decoding it would invent timeouts), and the
        // calls kept from the streams it keeps stand for as many as the new ones. A call
        // captured for its connection's trouble (or by a kernel that cannot tell healthy
        // connections) was not sampled: it counts once.
        let weight = match payload.sample_shift {
            Some(recorded) => {
                let shift = recorded
                    .max(self.capture_budget.shift())
                    .min(capture_sample::MAX_SHIFT);
                if payload.sample_depth < shift {
                    return PayloadOutcome::Handled;
                }
                1u64 << shift
            }
            None => 1,
        };
        let queue_mode = self.services.load().is_queue(endpoint.service);
        if queue_mode && payload.is_send && endpoint.role == Role::Client {
            // Sends that start mid-value have no leading bytes: they change nothing.
            let leading = payload.leading_bytes();
            match crate::queues::flow::enqueue_target(leading) {
                Some(queue) => self
                    .queue_flow
                    .sent_enqueue(payload.sk, endpoint.service, queue),
                None if !leading.is_empty() => self.queue_flow.sent_other(payload.sk),
                None => {}
            }
        }
        self.decoders
            .on_payload(&payload, endpoint, queue_mode, &mut self.memcache_events);
        let comm = events::comm_str(payload.comm);
        self.flush_memcache(Some(&comm), weight);
        PayloadOutcome::Handled
    }

    /// After each ring drain: streams of sockets closed longer than the grace ago finish.
    pub fn settle(&mut self, now_ns: u64) {
        // A dead write is named at the next tick from its socket's recent commands: the socket
        // usually closes first (the application reads EOF and closes), so its stream waits.
        let held = &self.held_dead_writes;
        self.decoders.finish_closed(
            now_ns.saturating_sub(CLOSE_GRACE_NS),
            |sk| held.iter().any(|w| w.sk == sk),
            &mut self.memcache_events,
        );
        self.flush();
    }

    /// Once a second: timeouts, dead-write outcomes, kernel counters.
    pub fn tick(&mut self, now_ns: u64, probes: Option<&Probes>) {
        // Writes held since the last tick have had their payload: name the command, report.
        // (Before `settle`, which may then finish the streams they were waiting for.)
        for mut write in std::mem::take(&mut self.held_dead_writes) {
            if write.command.is_none() {
                write.command = self.decoders.command_sent_at(write.sk, write.ts_ns);
            }
            self.count_lost_message(&write);
            let observation = Observation::DeadSocketWrite(write);
            self.recorder.record(&observation);
            for sink in &mut self.sinks {
                sink.observation(&observation);
            }
        }
        self.settle(now_ns);
        if let Some(history) = &self.history {
            let keys = self.keys_report();
            let queues = (!self.queue_flow.is_empty()).then(|| {
                let services = self.services.load();
                self.queue_flow
                    .reports(now_ns, |service| services.name(service).map(str::to_string))
            });
            if let Ok(mut history) = history.lock() {
                history.advance_to(unix_now());
                history.set_keys(keys);
                if let Some(queues) = queues {
                    history.set_queues(queues);
                }
            }
        }
        self.check_capture_budget(now_ns);
        let now_s = unix_now();
        if now_s >= self.ring_views_published_s + RING_VIEW_INTERVAL_S {
            self.recorder.publish_ring_views(now_s);
            self.ring_views_published_s = now_s;
            self.publish_slab_fit(now_s);
        }
        self.tracker.tick(now_ns, &mut self.observations);
        self.decoders
            .expire(now_ns, REQUEST_TIMEOUT_NS, &mut self.memcache_events);
        let tracker = &self.tracker;
        self.decoders.retain_known(
            |sk| tracker.endpoint_of(sk).is_some(),
            &mut self.memcache_events,
        );
        self.flush();

        let Some(probes) = probes else { return };
        match probes.kernel_losses() {
            Ok(totals) => {
                for (source, total) in totals {
                    let seen = self.losses_seen.entry(source).or_insert(0);
                    if total > *seen {
                        self.recorder
                            .metrics()
                            .events_lost
                            .get_or_create(&SourceLabels { source })
                            .inc_by(total - *seen);
                        *seen = total;
                    }
                }
            }
            Err(err) => tracing::debug!(%err, "cannot read kernel loss counters"),
        }
        if bpf_stats_enabled() {
            let metrics = self.recorder.metrics().clone();
            for (program, run_time, runs) in probes.program_stats() {
                let seen = self
                    .program_stats_seen
                    .entry(program.clone())
                    .or_insert((0, 0));
                let labels = ProgramLabels { program };
                let run_ns = run_time.as_nanos() as u64;
                if run_ns > seen.0 {
                    metrics
                        .bpf_run_seconds
                        .get_or_create(&labels)
                        .inc_by((run_ns - seen.0) as f64 / 1e9);
                }
                if runs > seen.1 {
                    metrics
                        .bpf_runs
                        .get_or_create(&labels)
                        .inc_by(runs - seen.1);
                }
                *seen = (run_ns.max(seen.0), runs.max(seen.1));
            }
        }
        if self.queue_flow.overflow > 0 {
            self.recorder
                .metrics()
                .events_lost
                .get_or_create(&SourceLabels {
                    source: "queue_flow",
                })
                .inc_by(std::mem::take(&mut self.queue_flow.overflow));
        }
        if self.decoders.dropped > 0 {
            self.recorder
                .metrics()
                .events_lost
                .get_or_create(&SourceLabels { source: "decoder" })
                .inc_by(std::mem::take(&mut self.decoders.dropped));
        }
    }

    fn flush(&mut self) {
        for observation in self.observations.drain(..) {
            if let Observation::DeadSocketWrite(write) = observation {
                self.held_dead_writes.push(write);
                continue;
            }
            self.recorder.record(&observation);
            for sink in &mut self.sinks {
                sink.observation(&observation);
            }
        }
        self.flush_memcache(None, self.capture_budget.weight());
    }

    /// `weight`: how many requests each decoded one stands for (see [`CaptureBudget`]).
    fn flush_memcache(&mut self, comm: Option<&str>, weight: u64) {
        let events = std::mem::take(&mut self.memcache_events);
        let now_s = if events.is_empty() { 0 } else { unix_now() };
        for event in &events {
            self.recorder.record_memcache(event, weight);
            if let MemcacheEvent::Request { endpoint, request } = event {
                if let Some(key) = &request.key {
                    self.observe_key(endpoint, request, key.as_bytes(), comm, weight);
                    self.observe_sizes(endpoint, request, key.as_bytes(), comm, weight, now_s);
                    if request.queue.is_some() {
                        self.observe_queue(endpoint, request, key.as_bytes());
                    }
                }
            }
            for sink in &mut self.sinks {
                sink.memcache(event, comm);
            }
        }
        let mut events = events;
        events.clear();
        self.memcache_events = events;
    }

    /// A dead write that enqueued to a queue lost that message.
    fn count_lost_message(&mut self, write: &DeadWrite) {
        let services = self.services.load();
        // The decoder may have let go of the stream (the close comes before the write is
        // judged): then the queue flow's own note of the last send decides.
        let enqueue = match write.command {
            Some(command) => command == "set",
            None => self.queue_flow.last_send_enqueued(write.sk),
        };
        if !enqueue || !services.is_queue(write.endpoint.service) {
            return;
        }
        let queue = self
            .queue_flow
            .queue_of(write.sk)
            .unwrap_or("unknown")
            .to_string();
        let queue = self.queue_flow.lost(
            write.endpoint.service,
            &queue,
            &write.comm,
            write.outcome.as_str(),
        );
        self.recorder
            .metrics()
            .queue_messages_lost
            .get_or_create(&crate::export::metrics::QueueLostLabels {
                service: services
                    .name(write.endpoint.service)
                    .unwrap_or_default()
                    .to_string(),
                queue,
                outcome: write.outcome.as_str(),
            })
            .inc();
    }

    /// Server-side queue flow: time in queue and relative depth.
    fn observe_queue(&mut self, endpoint: &Endpoint, request: &RequestObservation, queue: &[u8]) {
        use crate::memcache::QueueOpKind;
        let (Some(op), Role::Server) = (request.queue, endpoint.role) else {
            return;
        };
        let name = String::from_utf8_lossy(queue);
        let len = request.value_len.unwrap_or(0);
        let delta = match (op.op, request.status) {
            (QueueOpKind::Enqueue, crate::model::Status::Stored) => {
                self.queue_flow
                    .enqueued(endpoint.service, &name, len, request.request_ts_ns);
                1
            }
            (QueueOpKind::Dequeue | QueueOpKind::Open, crate::model::Status::Hit) => {
                let waited =
                    self.queue_flow
                        .dequeued(endpoint.service, &name, len, request.request_ts_ns);
                if let crate::queues::flow::Dequeued::Waited(seconds) = waited {
                    self.queue_metric_labels(endpoint, &name, |m, l| {
                        m.queue_wait.get_or_create(l).observe(seconds)
                    });
                }
                -1
            }
            _ => return,
        };
        self.queue_metric_labels(endpoint, &name, |m, l| {
            m.queue_depth.get_or_create(l).inc_by(delta);
        });
    }

    fn queue_metric_labels(
        &self,
        endpoint: &Endpoint,
        name: &str,
        apply: impl FnOnce(&crate::export::metrics::Metrics, &crate::export::metrics::QueueNameLabels),
    ) {
        let services = self.services.load();
        let labels = crate::export::metrics::QueueNameLabels {
            service: services
                .name(endpoint.service)
                .unwrap_or_default()
                .to_string(),
            queue: self.queue_flow.label(endpoint.service, name),
        };
        apply(self.recorder.metrics(), &labels);
    }

    /// Largest values, slowest requests and (for local memcached) stored item sizes.
    fn observe_sizes(
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
            &crate::keystats::extremes::Seen {
                key,
                command: request.command.as_str(),
                process: comm,
                value_len: request.value_len,
                latency_ns: request.latency_ns,
                unix_s: now_s,
            },
            self.key_display,
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

    /// Re-estimates slab fit for local servers and hands it to history (for diagnose).
    fn publish_slab_fit(&mut self, now_s: u64) {
        if self.slab_fit.is_empty() {
            return;
        }
        let Some(history) = &self.history else { return };
        // Re-read /proc every minute, and sooner (at most every 5 s) when a server seen has no
        // local memcached yet: one started after the agent, or after the last read.
        let unmatched = self
            .slab_fit
            .ports()
            .any(|port| !self.local_memcacheds.0.iter().any(|m| m.port == port));
        if now_s >= self.local_memcacheds.1 + 60
            || (unmatched && now_s >= self.local_memcacheds.1 + 5)
        {
            self.local_memcacheds = (
                crate::sizes::slab::local_memcacheds(std::path::Path::new("/proc")),
                now_s,
            );
        }
        let services = self.services.load();
        let reports = self.slab_fit.reports(&self.local_memcacheds.0, |service| {
            services.name(service).map(str::to_string)
        });
        if let Ok(mut history) = history.lock() {
            history.set_slab_fit(reports);
        }
    }

    /// Feeds one request's key to the key statistics (hot keys, routing), if sampled.
    fn observe_key(
        &mut self,
        endpoint: &Endpoint,
        request: &RequestObservation,
        key: &[u8],
        comm: Option<&str>,
        capture_weight: u64,
    ) {
        let weight = self.key_sampler.weight(request.request_ts_ns) * capture_weight;
        if weight == 0 {
            return;
        }
        let id = key_id(key);
        let routing = if endpoint.role == Role::Client {
            self.routing.observe_with_id(
                endpoint.service,
                id,
                key,
                endpoint.server,
                request.request_ts_ns,
                self.key_display,
            )
        } else {
            Routing::Consistent
        };
        if let Routing::Split { new_key } = routing {
            self.recorder.record_key_split(endpoint.service);
            let services = self.services.load();
            if let (Some(example), Some(service)) = (
                self.routing.examples.last(),
                services.name(endpoint.service),
            ) {
                self.record_fact(Fact::KeySplit {
                    service: service.to_string(),
                    key_hash: crate::keystats::key_hash(key),
                    new_key,
                    servers: [example.first_server.clone(), example.second_server.clone()],
                    comms: [None, comm.map(str::to_string)],
                });
            }
        }
        if let Some((by_requests, by_bytes)) = self.hot_keys.get_mut(endpoint) {
            by_requests.add_with_id(id, key, weight);
            by_bytes.add_with_id(
                id,
                key,
                (request.request_bytes + request.response_bytes).saturating_mul(weight),
            );
        } else if self.hot_keys.len() < self.max_hot_key_endpoints {
            let mut by_requests = TopK::new(HOT_KEYS_PER_SERVER);
            let mut by_bytes = TopK::new(HOT_KEYS_PER_SERVER);
            by_requests.add_with_id(id, key, weight);
            by_bytes.add_with_id(
                id,
                key,
                (request.request_bytes + request.response_bytes).saturating_mul(weight),
            );
            self.hot_keys.insert(*endpoint, (by_requests, by_bytes));
        }
    }

    /// The hottest keys per server (top 10 by requests and by bytes) and recent key splits.
    pub fn keys_report(&self) -> KeysReport {
        let services = self.services.load();
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
                by_requests: by_requests.top(10, self.key_display),
                by_bytes: by_bytes.top(10, self.key_display),
            })
            .collect();
        servers.sort_by(|a, b| {
            (&a.service, &a.server, &a.role).cmp(&(&b.service, &b.server, &b.role))
        });
        let extremes = self.extremes.report(unix_now(), |endpoint| {
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

    pub fn key_routing(&self) -> &KeyRouting {
        &self.routing
    }

    pub fn hot_keys(&self) -> &foldhash::HashMap<Endpoint, (TopK, TopK)> {
        &self.hot_keys
    }

    pub fn key_display(&self) -> KeyDisplay {
        self.key_display
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        kernel::capture::{encode_payload_record, mark_sample},
        kernel::events::{EventKind, SockEventRecord, SocketFacts},
    };

    const PORT: u16 = 11211;
    const SECOND: u64 = 1_000_000_000;

    fn pipeline(records_per_second: u32) -> (Pipeline, Metrics) {
        let config = Config::parse(
            &format!(
                "[[services]]\nname = \"mc\"\nport = {PORT}\nprotocol = \"memcache\"\n\
                 [limits]\ncapture_records_per_second = {records_per_second}\n"
            ),
            "test.toml",
        )
        .expect("test config");
        let (metrics, _registry) = Metrics::new();
        let services = SharedServices::from_config(&config).expect("one service");
        (Pipeline::new(&config, services, metrics.clone()), metrics)
    }

    /// A client socket at `sk` connected to the service, as met on its first send.
    fn learn_client(pipeline: &mut Pipeline, sk: u64, client_port: u16) {
        let local: SocketAddr = format!("127.0.0.1:{client_port}").parse().unwrap();
        let remote: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
        pipeline.handle_socket_event(&SockEventRecord {
            kind: EventKind::Learned {
                state: tcp_state::ESTABLISHED,
            },
            ts_ns: 1,
            sk,
            local: Some(local),
            remote: Some(remote),
            pid: 7,
            comm: "client".to_string(),
            facts: SocketFacts {
                last_activity_ns: 1,
                bytes_sent: 0,
                bytes_received: 0,
                peer_closed_ns: 0,
                reset_received_ns: 0,
            },
        });
    }

    /// One get and its hit on `sk` at `ts`, marked as the kernel marks a sampled call: the
    /// shift the kernel was told (the agent's once applied), `sk` itself as the key.
    fn get_hit(pipeline: &mut Pipeline, sk: u64, ts: u64) {
        let told =
            pipeline.pending_capture_shift.is_none() && ts > pipeline.capture_shift_applied_ns;
        let shift = if told {
            pipeline.capture_budget.shift()
        } else {
            0
        };
        let sample = Some((shift as u8, capture_sample::depth(sk) as u8));
        get_hit_marked(pipeline, sk, ts, sample);
    }

    /// One get and its hit on `sk` at `ts`, captured as a sample (shift, depth) or, with None,
    /// for the connection's trouble.
    fn get_hit_marked(pipeline: &mut Pipeline, sk: u64, ts: u64, sample: Option<(u8, u8)>) {
        for (offset, is_send, data) in [
            (0, true, &b"get k\r\n"[..]),
            (1_000, false, &b"VALUE k 0 1\r\nv\r\nEND\r\n"[..]),
        ] {
            let mut record =
                encode_payload_record(ts + offset, sk, data.len() as u64, is_send, b"c", data);
            mark_sample(&mut record, sample);
            assert!(matches!(
                pipeline.on_payload_record(&record),
                PayloadOutcome::Handled
            ));
        }
    }

    /// Client-side gets with `status` counted so far.
    fn gets(metrics: &Metrics, status: &'static str) -> u64 {
        let labels = crate::export::metrics::RequestLabels {
            service: "mc".into(),
            server: format!("127.0.0.1:{PORT}"),
            role: "client",
            command: "get",
            status,
        };
        metrics.memcache_requests.get_or_create(&labels).get()
    }

    /// A pipeline with the given budget that knows two client connections, one the sample keeps
    /// at one in two and one it lets go, one second into its first budget window.
    fn two_clients(records_per_second: u32) -> (Pipeline, Metrics, u64, u64) {
        let (mut pipeline, metrics) = pipeline(records_per_second);
        let (followed, released) = followed_and_released();
        learn_client(&mut pipeline, followed, 40_001);
        learn_client(&mut pipeline, released, 40_002);
        pipeline.tick(SECOND, None);
        (pipeline, metrics, followed, released)
    }

    /// Two sockets: one the sample keeps at one in two, one it lets go.
    fn followed_and_released() -> (u64, u64) {
        let mut candidates = (1..).map(|i| 0xffff_8880_0000_0000u64 + i * 2368);
        let followed = candidates
            .by_ref()
            .find(|&sk| capture_sample::is_followed(sk, 1))
            .unwrap();
        let released = candidates
            .find(|&sk| !capture_sample::is_followed(sk, 1))
            .unwrap();
        (followed, released)
    }

    #[test]
    fn over_budget_the_sample_narrows_counts_scale_and_released_streams_never_time_out() {
        let (mut pipeline, metrics, followed, released) = two_clients(500);
        assert_eq!(metrics.capture_sample_ratio.get(), 1.0);

        // 961 records in the next second (budget 500, and too few to look before the tick):
        // one in two from now on.
        for i in 0..240 {
            get_hit(&mut pipeline, followed, SECOND + 1 + i * 3_000_000);
            get_hit(&mut pipeline, released, SECOND + 2 + i * 3_000_000);
        }
        assert_eq!(gets(&metrics, "hit"), 480);
        // The released stream has a request in flight when the sample narrows.
        let mut request = encode_payload_record(2 * SECOND, released, 7, true, b"c", b"get k\r\n");
        mark_sample(&mut request, Some((0, 0)));
        pipeline.on_payload_record(&request);
        pipeline.tick(2 * SECOND + 10, None);
        assert_eq!(pipeline.take_capture_shift(), Some(1));
        assert_eq!(metrics.capture_sample_ratio.get(), 0.5);
        pipeline.capture_shift_applied(2 * SECOND + 30);
        // Records the kernel wrote before it heard of the new sample, read only now, are
        // dropped for the released stream: its answer never starts a stream of its own.
        let mut answer = encode_payload_record(
            2 * SECOND + 20,
            released,
            20,
            false,
            b"c",
            b"VALUE k 0 1\r\nv\r\nEND\r\n",
        );
        mark_sample(&mut answer, Some((0, 0)));
        pipeline.on_payload_record(&answer);
        assert_eq!(
            pipeline.decoders.len(),
            1,
            "only the followed stream is decoded"
        );

        // From now on each decoded request of the followed stream stands for two.
        get_hit(&mut pipeline, followed, 2 * SECOND + 100);
        assert_eq!(gets(&metrics, "hit"), 482);
        // A released connection still captured (it is in trouble) counts once.
        get_hit_marked(&mut pipeline, released, 2 * SECOND + 200, None);
        assert_eq!(gets(&metrics, "hit"), 483);

        // Nothing reads as a timeout, however long it waits.
        pipeline.tick(2 * SECOND + 60 * SECOND, None);
        assert_eq!(gets(&metrics, "timeout"), 0);
        assert_eq!(gets(&metrics, "unanswered"), 0);
    }

    /// Records the kernel wrote under the old sample, read after the switch, say nothing about
    /// the new one: they must not narrow it again.
    #[test]
    fn records_from_before_a_switch_do_not_count_against_the_new_sample() {
        let (mut pipeline, _metrics, followed, released) = two_clients(500);
        for i in 0..240 {
            get_hit(&mut pipeline, followed, SECOND + 1 + i * 3_000_000);
            get_hit(&mut pipeline, released, SECOND + 2 + i * 3_000_000);
        }
        pipeline.tick(2 * SECOND, None);
        assert_eq!(pipeline.take_capture_shift(), Some(1));
        pipeline.capture_shift_applied(2 * SECOND + 10);
        // A backlog twice the budget, all of it written before the switch.
        for i in 0..500 {
            get_hit(&mut pipeline, followed, SECOND + 5 + i * 1_000);
        }
        // Then a second of what the new sample lets through: 300 records, within the budget
        // but not so far within it that the sample widens again.
        for i in 0..150 {
            get_hit(&mut pipeline, followed, 2 * SECOND + 100 + i * 6_000_000);
        }
        pipeline.tick(3 * SECOND + 20, None);
        assert_eq!(pipeline.take_capture_shift(), None);
    }

    /// A connection from before the agent, learned from the kernel mid-stream: the reply to a
    /// request sent before capture started is the one exchange lost, and it is counted; the
    /// next request is decoded.
    #[test]
    fn an_adopted_connection_is_decoded_from_its_first_request_and_the_cut_exchange_counted() {
        let (mut pipeline, metrics) = pipeline(0);
        let sk = 0xffff_8880_0000_1000;
        learn_client(&mut pipeline, sk, 40_003);
        let reply = b"VALUE k 0 1\r\nv\r\nEND\r\n";
        let cut = encode_payload_record(SECOND, sk, reply.len() as u64, false, b"c", reply);
        assert_eq!(pipeline.on_payload_record(&cut), PayloadOutcome::Handled);
        get_hit(&mut pipeline, sk, 2 * SECOND);
        get_hit(&mut pipeline, sk, 3 * SECOND);
        assert_eq!((gets(&metrics, "hit"), gets(&metrics, "miss")), (2, 0));
        let lost: u64 = ["unexpected_response", "gap", "garbage"]
            .iter()
            .map(|reason| {
                metrics
                    .memcache_decode_errors
                    .get_or_create(&crate::export::metrics::DecodeErrorLabels {
                        service: "mc".into(),
                        reason,
                    })
                    .get()
            })
            .sum();
        assert!(lost >= 1, "the cut exchange is counted");
    }

    /// A reload that puts a new service first: a connection opened before it and one opened
    /// after it are both counted, in metrics and history, under the service they belong to.
    #[test]
    fn a_reload_that_reorders_services_keeps_names_in_metrics_and_history() {
        let (mut pipeline, metrics) = pipeline(0);
        let history = Arc::new(Mutex::new(History::new(
            900,
            crate::history::HistoryLimits::default(),
        )));
        pipeline.add_sink(Box::new(crate::history::HistorySink::new(
            history.clone(),
            pipeline.services().clone(),
        )));
        learn_client(&mut pipeline, 0x1000, 40_001);
        let reload = Config::parse(
            &format!(
                "[[services]]\nname = \"queue\"\nport = 22133\nprotocol = \"memcache-queue\"\n\
                 [[services]]\nname = \"mc\"\nport = {PORT}\nprotocol = \"memcache\"\n"
            ),
            "reload.toml",
        )
        .unwrap();
        pipeline
            .services()
            .reconfigure(&reload.services)
            .expect("two services");
        pipeline.reconfigure(&reload);
        learn_client(&mut pipeline, 0x2000, 40_002);
        let now = crate::clock::monotonic_ns();
        get_hit(&mut pipeline, 0x1000, now);
        get_hit(&mut pipeline, 0x2000, now + 10_000);
        assert_eq!(gets(&metrics, "hit"), 2);

        let snapshot = history.lock().unwrap().snapshot(0);
        let mut services: Vec<&str> = snapshot
            .seconds
            .iter()
            .flat_map(|second| &second.requests)
            .flat_map(|row| std::iter::repeat_n(snapshot.label(row.service), row.count as usize))
            .collect();
        services.sort();
        assert_eq!(services, ["mc", "mc"]);
    }

    #[test]
    fn without_a_budget_nothing_is_sampled() {
        let (mut pipeline, metrics, _, released) = two_clients(0);
        for i in 0..5_000 {
            get_hit(&mut pipeline, released, SECOND + 1 + i * 100_000);
        }
        pipeline.tick(2 * SECOND, None);
        assert_eq!(pipeline.take_capture_shift(), None);
        assert_eq!(gets(&metrics, "hit"), 5_000);
        assert_eq!(metrics.capture_sample_ratio.get(), 1.0);
    }

    /// Pooled connections re-opened again and again, and short connections one after
    /// another: the kernel hands each new connection one of the same few freed socket
    /// addresses, with a new port. Sampled at 1/16, the scaled request count is the true one
    /// within four standard deviations of the estimator (each connection drawn with
    /// probability p and counted 1/p, so the variance is the sum over connections of
    /// (1/p - 1) * requests^2). Sampled by socket address alone, the same traffic would be a
    /// fixed draw of those few addresses, off by far more (the soak saw 37% low).
    #[test]
    fn scaled_request_counts_are_unbiased_whatever_addresses_the_kernel_reuses() {
        let (mut pipeline, metrics) = pipeline(0);
        const SHIFT: u32 = 4;
        const POOL: u64 = 64;
        const REOPENS: u64 = 200;
        const GETS_PER_CONNECTION: u64 = 50;
        const SHORT: u64 = 5_000;
        let pool: Vec<u64> = (0..POOL)
            .map(|i| 0xffff_8880_4000_0000 + i * 2368)
            .collect();
        let short = [0xffff_8880_7000_0000u64, 0xffff_8880_7000_0940];
        for (i, &sk) in pool.iter().chain(&short).enumerate() {
            learn_client(&mut pipeline, sk, 30_000 + i as u16);
        }
        // Every connection: its address, its ephemeral port (and the kernel's random txhash),
        // its requests.
        let txhash = |port: u16| u32::from(port).wrapping_mul(0x9e37_79b9).rotate_left(7);
        let mut port = 32_768u16;
        let mut connections = Vec::new();
        for _ in 0..REOPENS {
            for &sk in &pool {
                connections.push((sk, port, GETS_PER_CONNECTION));
                port = port.wrapping_add(1).max(32_768);
            }
        }
        for i in 0..SHORT {
            connections.push((short[(i % 2) as usize], port, 1));
            port = port.wrapping_add(1).max(32_768);
        }
        let truth: u64 = connections.iter().map(|c| c.2).sum();
        let weight = (1u64 << SHIFT) as f64;
        let variance: f64 = connections
            .iter()
            .map(|c| (weight - 1.0) * (c.2 * c.2) as f64)
            .sum();
        let tolerance = 4.0 * variance.sqrt();

        let mut ts = SECOND;
        for &(sk, port, gets) in &connections {
            let key = capture_sample::key(sk, port, PORT, txhash(port));
            if !capture_sample::is_followed(key, SHIFT) {
                continue;
            }
            let sample = Some((SHIFT as u8, capture_sample::depth(key) as u8));
            for _ in 0..gets {
                get_hit_marked(&mut pipeline, sk, ts, sample);
                ts += 10_000;
            }
        }
        let estimate = gets(&metrics, "hit") as f64;
        assert!(
            (estimate - truth as f64).abs() <= tolerance,
            "estimate {estimate} vs {truth}, tolerance {tolerance:.0}"
        );

        // The same traffic sampled by address alone.
        let by_address: u64 = connections
            .iter()
            .filter(|c| capture_sample::is_followed(c.0, SHIFT))
            .map(|c| c.2 << SHIFT)
            .sum();
        assert!(
            (by_address as f64 - truth as f64).abs() > tolerance,
            "by address {by_address} vs {truth}: the old sample would pass too"
        );
    }
}
