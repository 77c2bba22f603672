//! The agent's event pipeline, free of I/O: kernel records in, metrics (and anything else that
//! listens) out. `run` feeds it from the ring buffers (see [`crate::ingest::merge`]) and hands
//! each tick what the kernel and /proc say; tests drive it with records built in memory.
//!
//! It owns the connection side (the tracker, and dead writes held until their command is
//! known) and the decoders, and composes the other sides: the capture budget
//! ([`CaptureSampling`]), keys ([`KeyStats`]), queues ([`QueueSide`]), kernel counter deltas
//! ([`KernelStats`]) and the outputs ([`Outputs`]).

use std::sync::{Arc, Mutex};

use agent_common::TcpState;

use crate::{
    clock::{unix_now, MonotonicToUnix},
    config::Config,
    conn::tracking::{Endpoint, Observation, Tracker},
    export::{
        metrics::Metrics,
        recorder::{ExemplarPolicy, ObservationRecorder},
    },
    history::History,
    ingest::{
        capture_budget::CaptureSampling,
        kernel_stats::{self, KernelStats},
        keys::KeyStats,
        outputs::{ObservationSink, Outputs},
        process_names::ProcessNames,
        queues::QueueSide,
    },
    kernel::capture::parse_payload,
    kernel::events::{self, EventKind, SockEventRecord},
    kernel::readings::KernelReadings,
    keystats::{KeyDisplay, KeyRouting, KeysReport, TopK},
    memcache::decoders::{Decoders, MemcacheEvent, StreamSample, CLOSE_GRACE_NS},
    model::Role,
    services::{Services, SharedServices},
    sizes::slab::LocalMemcached,
};

/// Requests unanswered this long finish as timeouts.
const REQUEST_TIMEOUT_NS: u64 = 5_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadOutcome {
    Handled,
    UnknownSocket,
}

pub struct Pipeline {
    services: SharedServices,
    tracker: Tracker,
    decoders: Decoders,
    /// Dead writes wait one tick for the payload that names their command.
    observations: Vec<Observation>,
    memcache_events: Vec<MemcacheEvent>,
    pub undecodable_records: u64,
    /// Payload records dropped since the last tick because no event had told of their socket.
    unknown_socket_payloads: u64,
    capture: CaptureSampling,
    keys: KeyStats,
    queues: QueueSide,
    kernel_stats: KernelStats,
    outputs: Outputs,
    /// Wall-clock seconds of record timestamps, without a clock read per record.
    wall: MonotonicToUnix,
    /// Records carry their thread's name; everything downstream names their process.
    process_names: ProcessNames,
}

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
        recorder.set_exemplars(ExemplarPolicy::from_limits(&config.limits));
        let mut pipeline = Pipeline {
            tracker: Tracker::new(services.clone(), max),
            decoders: Decoders::new(max),
            observations: Vec::with_capacity(64),
            memcache_events: Vec::with_capacity(256),
            undecodable_records: 0,
            unknown_socket_payloads: 0,
            capture: CaptureSampling::new(u64::from(config.limits.capture_records_per_second)),
            keys: KeyStats::new(config),
            queues: QueueSide::default(),
            kernel_stats: KernelStats::default(),
            outputs: Outputs::new(recorder),
            wall: MonotonicToUnix::default(),
            process_names: ProcessNames::new(None),
            services,
        };
        let services = pipeline.services.load();
        pipeline.set_sampled_call_slots(config, &services);
        pipeline
    }

    /// Names records by their process as /proc shows it (see [`ProcessNames`]); without
    /// this, by the thread the kernel saw. Kept out of [`Pipeline::new`], which does no I/O.
    pub fn set_process_names(&mut self, names: ProcessNames) {
        self.process_names = names;
    }

    /// Decodes every connection whatever the rate (the kernel cannot sample).
    pub fn disable_capture_budget(&mut self) {
        self.capture.disable();
    }

    /// This kernel has no send/receive programs (see `Tracker::without_send_receive_probes`).
    pub fn without_send_receive_probes(&mut self) {
        self.tracker.without_send_receive_probes();
    }

    /// New capture sample shifts for the kernel (one per service slot), once, after the tick
    /// that chose them.
    pub fn take_capture_shift(&mut self) -> Option<Vec<u32>> {
        self.capture.take_shift()
    }

    /// The kernel follows the sample from [`Pipeline::take_capture_shift`] since `now_ns`.
    /// Records it captured before then from connections the sample has let go are dropped:
    /// their stream's other half will never come, so decoding them would invent timeouts.
    pub fn capture_shift_applied(&mut self, now_ns: u64) {
        self.capture.shift_applied(now_ns);
    }

    /// Checks the decoding budget (see [`CaptureSampling::check`]). When the sample changes,
    /// streams no longer followed are dropped here at once, so their open requests never read
    /// as timeouts.
    fn check_capture_budget(&mut self, now_ns: u64) {
        if self.capture.check(now_ns) {
            self.capture_sample_changed();
        }
    }

    /// Turns the samples of slots that went blind (see
    /// [`CaptureSampling::rotations_wanted`]) to other connections, each once none of its
    /// followed streams waits for an answer: a stream let go mid-request would lose its
    /// answer, and a hung server's waiting requests must time out where they are.
    fn turn_blind_samples(&mut self) {
        for slot in self.capture.rotations_wanted() {
            let capture = &self.capture;
            let in_slot = |service| capture.slot_has_service(slot, service);
            if self.decoders.sampled_waiting(in_slot) {
                continue;
            }
            self.decoders.forget_sampled(in_slot);
            self.capture.rotate(slot);
            self.outputs.metrics().capture_sample_turns.inc();
        }
    }

    /// The gauge shows the narrowest sample of any service.
    fn capture_sample_changed(&mut self) {
        let capture = &self.capture;
        self.decoders
            .forget_unfollowed(|service| capture.shift_of_service(service));
        self.outputs
            .metrics()
            .capture_sample_ratio
            .set(self.capture.narrowest_ratio());
    }

    /// Facts that do not flow through observations (incoming SYNs, key splits, losses) also go
    /// to this history.
    pub fn set_history(&mut self, history: Arc<Mutex<History>>) {
        self.outputs.set_history(history);
    }

    pub fn add_sink(&mut self, sink: Box<dyn ObservationSink + Send>) {
        self.outputs.add_sink(sink);
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

    /// See [`Tracker::any_peer_closed`].
    pub fn any_peer_closed(&self) -> bool {
        self.tracker.any_peer_closed()
    }

    /// The services snapshot this pipeline reads, for sinks that must name services the same way.
    pub fn services(&self) -> &SharedServices {
        &self.services
    }

    /// A config reload. Services change through the shared snapshot, which the caller swaps;
    /// existing connections move to the service that watches their port now (a renamed
    /// service's pooled connections take its new name), and what was recorded before keeps
    /// the name it was recorded under.
    pub fn reconfigure(&mut self, config: &Config) {
        let services = self.services.load();
        self.set_sampled_call_slots(config, &services);
        // Connections on ports no longer watched get no close event: forget them now.
        self.tracker.forget_unwatched(
            |endpoint| services.still_watches(endpoint),
            &mut self.observations,
        );
        self.tracker.rebind(
            |endpoint| services.rebound(endpoint),
            &mut self.observations,
        );
        self.decoders.rebind(|endpoint| {
            let rebound = services.rebound(endpoint);
            // A stream decoded as the other protocol is reopened (see `Decoders::rebind`).
            if services.is_queue(rebound.service) == services.is_queue(endpoint.service) {
                rebound
            } else {
                endpoint
            }
        });
        self.flush();
        // Services whose capture is now off (or that left the config): their streams pause.
        let captured: Vec<usize> = config
            .services
            .iter()
            .filter(|service| service.capture)
            .filter_map(|service| services.id_of(&service.name))
            .collect();
        self.decoders.pause_uncaptured(
            |service| captured.contains(&service),
            crate::clock::monotonic_ns(),
        );
        self.keys.set_display(config.keys);
        self.outputs
            .recorder
            .set_exemplars(ExemplarPolicy::from_limits(&config.limits));
    }

    /// Before a reload's new service order reaches the kernel's watched ports (`services`, the
    /// snapshot about to be swapped in): services that move take their samples to their new
    /// slots, and the shifts that bridge the change are returned for the kernel (see
    /// [`CaptureSampling::take_reslot_shifts`]); None when no service moved.
    pub fn reslot_services(&mut self, config: &Config, services: &Services) -> Option<Vec<u32>> {
        self.set_sampled_call_slots(config, services);
        self.capture.take_reslot_shifts()
    }

    /// Which `SAMPLED_CALLS` slot each service id counts in: the kernel's, by config position.
    fn set_sampled_call_slots(&mut self, config: &Config, services: &Services) {
        let mut slots = Vec::new();
        for (position, service) in config.services.iter().enumerate() {
            if let Some(id) = services.id_of(&service.name) {
                if slots.len() <= id {
                    slots.resize(id + 1, 0);
                }
                slots[id] = agent_common::watch::slot_of_position(position);
            }
        }
        self.capture.set_service_slots(slots);
    }

    /// The kernel's totals of sampled calls (None when unreadable), read once a tick before
    /// [`Pipeline::tick`]: requests decoded from here on weigh the last interval's ratios.
    pub fn observe_sampled_calls(
        &mut self,
        totals: Option<&[agent_common::SampledCalls]>,
        now_ns: u64,
    ) {
        self.capture.observe_sampled_calls(totals, now_ns);
    }

    /// One record from the socket event ring buffer.
    pub fn on_socket_record(&mut self, bytes: &[u8]) {
        if let Some(event) = self.decode_socket_record(bytes) {
            self.handle_socket_event(&event);
        }
    }

    /// Decodes a socket event record, counting (not failing on) bad ones.
    pub fn decode_socket_record(&mut self, bytes: &[u8]) -> Option<SockEventRecord> {
        let names = &mut self.process_names;
        match events::decode(bytes, &mut |pid, thread, ts_ns| {
            names.of(pid, thread, ts_ns)
        }) {
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
            if old_state == TcpState::Close as u8 || old_state == TcpState::Listen as u8 {
                self.decoders.on_close(event.sk, &mut self.memcache_events);
                self.tracker
                    .dead_writes_mut()
                    .socket_reused(event.sk, event.ts_ns);
            } else if new_state == TcpState::Close as u8 {
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
        let Some((endpoint, flow)) = self.tracker.endpoint_and_flow_of(payload.sk) else {
            return PayloadOutcome::UnknownSocket;
        };
        if payload.span_start == 0 {
            // A call's first record: counted once per followed call, what the kernel's
            // capture cost scales with (the bench divides its BPF time by this).
            self.outputs.metrics().capture_calls.inc();
        }
        let queue_mode = self.services.load().is_queue(endpoint.service);
        if payload.is_send
            && payload.span_start == 0
            && self.tracker.dead_writes().has_pending(payload.sk)
        {
            // A request's first bytes name what a dead write carried (a send that starts
            // mid-value has none). `pump` applies a send's dead-write event before its payload
            // and the payload before anything the application did after the send.
            let leading = payload.leading_bytes();
            if endpoint.role == Role::Server {
                if crate::memcache::decoders::is_quit_answer(leading) {
                    self.tracker
                        .dead_writes_mut()
                        .forget_quit_answer(payload.sk, payload.ts_ns);
                }
            } else if !leading.is_empty() {
                let queue = queue_mode
                    .then(|| crate::queues::flow::enqueue_target(leading))
                    .flatten();
                self.tracker.dead_writes_mut().name(
                    payload.sk,
                    payload.ts_ns,
                    crate::memcache::decoders::sniff_command(leading),
                    crate::memcache::decoders::asks_no_reply(leading),
                    queue,
                );
            }
        }
        if self.capture.count_record(
            payload.ts_ns,
            endpoint.service,
            payload.sample_shift.is_some(),
        ) {
            self.capture_sample_changed();
        }
        let sample = StreamSample::of_record(
            payload.sample_shift,
            payload.sample_depth,
            payload.sample_epoch,
        );
        if payload.span_start == 0 {
            self.capture.count_followed_call(
                sample,
                payload.sk,
                endpoint.service,
                endpoint.role == Role::Client,
                payload.ts_ns,
            );
        }
        let Some(weight) =
            self.capture
                .weight_of_record(sample, endpoint.service, endpoint.role == Role::Client)
        else {
            return PayloadOutcome::Handled;
        };
        self.decoders.on_payload(
            &payload,
            endpoint,
            flow,
            queue_mode,
            self.capture.is_time_sampled(endpoint.service),
            &mut self.memcache_events,
        );
        let slot = self
            .process_names
            .slot(payload.pid, payload.comm, payload.ts_ns);
        let comm = self.process_names.take(slot);
        self.flush_memcache(Some(&comm), weight, payload.ts_ns);
        self.process_names.put_back(slot, comm);
        PayloadOutcome::Handled
    }

    /// A payload record [`Pipeline::on_payload_record`] could not place even with every earlier
    /// event applied: dropped, counted in `events_lost_total{source="payload_unknown_socket"}`.
    pub fn payload_of_unknown_socket(&mut self) {
        self.unknown_socket_payloads += 1;
    }

    /// After each ring drain: streams of sockets closed longer than the grace ago finish.
    pub fn settle(&mut self, now_ns: u64) {
        self.decoders.finish_closed(
            now_ns.saturating_sub(CLOSE_GRACE_NS),
            &mut self.memcache_events,
        );
        self.flush();
    }

    /// Once a second: timeouts, dead-write outcomes, reports to history, kernel counters.
    /// `kernel` is what the caller read from the kernel for this tick (None without probes);
    /// `read_local_memcacheds` reads the local memcached processes, called only when the slab
    /// fit needs a fresh look (about once a minute).
    pub fn tick(
        &mut self,
        now_ns: u64,
        kernel: Option<&KernelReadings>,
        read_local_memcacheds: &mut dyn FnMut() -> Vec<LocalMemcached>,
    ) {
        // Writes held since the last tick have had their payload: name the command, report.
        // (Before `settle`, which may then finish the streams they were waiting for.)
        self.settle(now_ns);
        self.process_names.tick(now_ns);
        if self.outputs.has_history() {
            let keys = self.keys_report();
            let queues = self.queues.reports(now_ns, &self.services);
            self.outputs.with_history(|history| {
                history.advance_to(unix_now());
                history.set_keys(keys);
                if let Some(queues) = queues {
                    history.set_queues(queues);
                }
            });
        }
        self.check_capture_budget(now_ns);
        self.turn_blind_samples();
        let now_s = unix_now();
        if self.outputs.publish_ring_views_if_due(now_s) && self.outputs.has_history() {
            // Slab fit goes to history (for diagnose) with the ring views' cadence.
            if let Some(reports) =
                self.keys
                    .slab_fit_reports(now_s, read_local_memcacheds, &self.services)
            {
                self.outputs
                    .with_history(|history| history.set_slab_fit(reports));
            }
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

        let Some(kernel) = kernel else { return };
        let metrics = self.outputs.metrics();
        self.kernel_stats.apply(kernel, metrics);
        kernel_stats::count_lost(metrics, "queue_flow", self.queues.take_overflow());
        kernel_stats::count_lost(
            metrics,
            "decoder",
            std::mem::take(&mut self.decoders.dropped),
        );
        kernel_stats::count_lost(
            metrics,
            "payload_unknown_socket",
            std::mem::take(&mut self.unknown_socket_payloads),
        );
    }

    fn flush(&mut self) {
        for observation in self.observations.drain(..) {
            // Named from its own payload while still pending (see `on_payload_record`).
            if let Observation::DeadSocketWrite(write) = &observation {
                self.queues
                    .count_lost(write, &self.services, self.outputs.metrics());
            }
            self.outputs.observation(&observation);
        }
        // Requests finished here (close, timeout) weigh what their own stream was captured
        // under; nothing else comes out of a flush with a weight.
        self.flush_memcache(None, 1, 0);
    }

    /// `weight`: how many bytes each decoded one stands for (see [`CaptureSampling`]). A
    /// request weighs what the sample its stream was captured under makes it, whenever it
    /// finishes: a timeout on a stream captured for its trouble counts once, whatever the
    /// sample of healthy connections is by then. `record_ns`: the timestamp of the record that
    /// produced the events (its unix second stamps what keys see), 0 for now.
    fn flush_memcache(&mut self, comm: Option<&str>, weight: u64, record_ns: u64) {
        let events = std::mem::take(&mut self.memcache_events);
        let now_s = if events.is_empty() {
            0
        } else {
            self.wall.unix_second(record_ns)
        };
        for event in &events {
            // Requests finished by a close or a timeout come without a record: their own
            // stream names who sent them.
            let own_comm;
            let comm = match (comm, event) {
                (Some(comm), _) => Some(comm),
                (None, MemcacheEvent::Request { pid, comm: raw, .. }) => {
                    own_comm = self.process_names.of(*pid, raw, record_ns);
                    Some(own_comm.as_str()).filter(|name| !name.is_empty())
                }
                (None, _) => None,
            };
            let weight = match event {
                MemcacheEvent::Request {
                    sample, endpoint, ..
                } => {
                    match self.capture.weight_of_request(
                        *sample,
                        endpoint.service,
                        endpoint.role == Role::Client,
                    ) {
                        Some(weight) => weight,
                        // Its stream is no longer followed: dropped like its records.
                        None => continue,
                    }
                }
                _ => weight,
            };
            self.outputs.recorder.record_memcache(event, weight);
            if let MemcacheEvent::Request {
                endpoint,
                request,
                pid,
                ..
            } = event
            {
                if let Some(key) = &request.key {
                    let key = key.as_bytes();
                    if let Some(split) = self.keys.observe_key(
                        endpoint,
                        request,
                        key,
                        comm,
                        *pid,
                        weight,
                        &self.services,
                    ) {
                        if split.new_key {
                            self.outputs.recorder.record_key_split(split.service);
                        }
                        if let Some(fact) = split.fact {
                            self.outputs.fact(fact);
                        }
                    }
                    self.keys
                        .observe_sizes(endpoint, request, key, comm, weight, now_s);
                    if request.queue.is_some() {
                        self.queues.observe(
                            endpoint,
                            request,
                            key,
                            &self.services,
                            self.outputs.metrics(),
                        );
                    }
                }
            }
            self.outputs.memcache_to_sinks(event, comm);
        }
        let mut events = events;
        events.clear();
        self.memcache_events = events;
    }

    /// The hottest keys per server (top 10 by requests and by bytes) and recent key splits.
    pub fn keys_report(&self) -> KeysReport {
        self.keys.report(&self.services, unix_now())
    }

    pub fn key_routing(&self) -> &KeyRouting {
        self.keys.routing()
    }

    pub fn hot_keys(&self) -> &foldhash::HashMap<Endpoint, (TopK, TopK)> {
        self.keys.hot_keys()
    }

    pub fn key_display(&self) -> KeyDisplay {
        self.keys.display()
    }
}

#[cfg(test)]
mod tests {
    use agent_common::capture_sample;
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

    /// A socket event of `sk` with no addresses and no activity beyond its first stamp.
    fn sock_event(kind: EventKind, ts_ns: u64, sk: u64) -> SockEventRecord {
        SockEventRecord {
            kind,
            ts_ns,
            sk,
            local: None,
            remote: None,
            pid: 7,
            comm: "client".to_string(),
            facts: SocketFacts {
                last_activity_ns: 1,
                bytes_sent: 0,
                bytes_received: 0,
                peer_closed_ns: 0,
                reset_received_ns: 0,
                written_after_peer_close: None,
            },
        }
    }

    /// A socket at `sk` from `local` to `remote`, as met on its first send (adoption).
    fn learn(pipeline: &mut Pipeline, sk: u64, local: &str, remote: &str, pid: u32, comm: &str) {
        let kind = EventKind::Learned {
            state: TcpState::Established as u8,
        };
        pipeline.handle_socket_event(&SockEventRecord {
            local: Some(local.parse().unwrap()),
            remote: Some(remote.parse().unwrap()),
            pid,
            comm: comm.to_string(),
            ..sock_event(kind, 1, sk)
        });
    }

    const LOOPBACK: [u32; 4] = [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0];

    /// A client socket's address in these tests: its ephemeral port in bits 12 and up, so
    /// the connection's 4-tuple, and its sample key, follow from it.
    fn client_sk(client_port: u16) -> u64 {
        0xffff_8880_0000_0000 | u64::from(client_port) << 12
    }

    /// The sample key of [`client_sk`]'s connection to the service on loopback.
    fn client_key(sk: u64) -> u64 {
        capture_sample::key(LOOPBACK, PORT, LOOPBACK, (sk >> 12) as u16)
    }

    /// A client socket at `sk` ([`client_sk`]) connected to the service, as met on its first
    /// send.
    fn learn_client(pipeline: &mut Pipeline, sk: u64) {
        let client_port = (sk >> 12) as u16;
        let local = format!("127.0.0.1:{client_port}");
        learn(
            pipeline,
            sk,
            &local,
            &format!("127.0.0.1:{PORT}"),
            7,
            "client",
        );
    }

    /// One get and its hit on `sk` at `ts`, marked as the kernel marks a sampled call: the
    /// shift the kernel was told (the agent's once applied), epoch 0.
    fn get_hit(pipeline: &mut Pipeline, sk: u64, ts: u64) {
        let shift = pipeline.capture.kernel_shift_at(ts, 0);
        let sample = Some((shift as u8, capture_sample::depth(client_key(sk), 0) as u8));
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
        let labels = crate::export::metrics::EndpointLabels {
            service: "mc".into(),
            server: format!("127.0.0.1:{PORT}"),
            role: "client",
        }
        .request("get", status);
        metrics.memcache_requests.get_or_create(&labels).get()
    }

    /// [`two_clients`] at a budget of 500 records/s after a second of 961 records: the sample
    /// narrowed to one in two, and the kernel told so at 2 s + 10 ns.
    fn narrowed_to_one_in_two() -> (Pipeline, Metrics, u64, u64) {
        let (mut pipeline, metrics, followed, released) = two_clients(500);
        for i in 0..240 {
            get_hit(&mut pipeline, followed, SECOND + 1 + i * 3_000_000);
            get_hit(&mut pipeline, released, SECOND + 2 + i * 3_000_000);
        }
        pipeline.tick(2 * SECOND, None, &mut Vec::new);
        assert_eq!(
            pipeline.take_capture_shift().map(|shifts| shifts[1]),
            Some(1)
        );
        pipeline.capture_shift_applied(2 * SECOND + 10);
        (pipeline, metrics, followed, released)
    }

    /// A pipeline with the given budget that knows two client connections, one the sample keeps
    /// at one in two and one it lets go, one second into its first budget window.
    fn two_clients(records_per_second: u32) -> (Pipeline, Metrics, u64, u64) {
        let (mut pipeline, metrics) = pipeline(records_per_second);
        let (followed, released) = followed_and_released();
        learn_client(&mut pipeline, followed);
        learn_client(&mut pipeline, released);
        pipeline.tick(SECOND, None, &mut Vec::new);
        (pipeline, metrics, followed, released)
    }

    /// Two sockets: one the sample keeps at one in two (in epoch 0), one it lets go.
    fn followed_and_released() -> (u64, u64) {
        let mut candidates = (40_001..).map(client_sk);
        let followed = candidates
            .by_ref()
            .find(|&sk| capture_sample::is_followed(client_key(sk), 1, 0))
            .unwrap();
        let released = candidates
            .find(|&sk| !capture_sample::is_followed(client_key(sk), 1, 0))
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
        // Every call the kernel followed, decoded or not: 240 gets and answers on each socket.
        assert_eq!(metrics.capture_calls.get(), 960);
        // The released stream has a request in flight when the sample narrows.
        let mut request = encode_payload_record(2 * SECOND, released, 7, true, b"c", b"get k\r\n");
        mark_sample(&mut request, Some((0, 0)));
        pipeline.on_payload_record(&request);
        pipeline.tick(2 * SECOND + 10, None, &mut Vec::new);
        assert_eq!(
            pipeline.take_capture_shift().map(|shifts| shifts[1]),
            Some(1)
        );
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
        pipeline.tick(2 * SECOND + 60 * SECOND, None, &mut Vec::new);
        assert_eq!(gets(&metrics, "timeout"), 0);
        assert_eq!(gets(&metrics, "unanswered"), 0);
    }

    /// Requests that finish by close (or timeout) weigh what their own stream was captured
    /// under, not the sample of the moment: at one in two, an unanswered request on a stream
    /// captured for its trouble (the soak's idle connections: a `version` written after
    /// memcached closed them) counts once, one on a sampled stream twice. (Both used to count
    /// as the current sample: trouble was over-counted 8 times in a soak at 1/8.)
    #[test]
    fn requests_finished_by_close_weigh_what_their_stream_was_captured_under() {
        let (mut pipeline, metrics, followed, released) = narrowed_to_one_in_two();
        let ask = |pipeline: &mut Pipeline, sk: u64, ts: u64, sample: Option<(u8, u8)>| {
            let mut record = encode_payload_record(ts, sk, 7, true, b"c", b"get k\r\n");
            mark_sample(&mut record, sample);
            assert_eq!(pipeline.on_payload_record(&record), PayloadOutcome::Handled);
        };
        ask(&mut pipeline, released, 2 * SECOND + 100, None);
        let depth = capture_sample::depth(client_key(followed), 0) as u8;
        ask(&mut pipeline, followed, 2 * SECOND + 200, Some((1, depth)));
        for (i, sk) in [released, followed].into_iter().enumerate() {
            let closed = EventKind::StateChange {
                old_state: TcpState::Established as u8,
                new_state: TcpState::Close as u8,
            };
            pipeline.handle_socket_event(&sock_event(closed, 2 * SECOND + 300 + i as u64, sk));
        }
        pipeline.settle(3 * SECOND + CLOSE_GRACE_NS);
        assert_eq!(gets(&metrics, "unanswered"), 1 + 2);
    }

    /// Records the kernel wrote under the old sample, read after the switch, say nothing about
    /// the new one: they must not narrow it again.
    #[test]
    fn records_from_before_a_switch_do_not_count_against_the_new_sample() {
        let (mut pipeline, _metrics, followed, _released) = narrowed_to_one_in_two();
        // A backlog twice the budget, all of it written before the switch.
        for i in 0..500 {
            get_hit(&mut pipeline, followed, SECOND + 5 + i * 1_000);
        }
        // Then a second of what the new sample lets through: 300 records, within the budget
        // but not so far within it that the sample widens again.
        for i in 0..150 {
            get_hit(&mut pipeline, followed, 2 * SECOND + 100 + i * 6_000_000);
        }
        pipeline.tick(3 * SECOND + 20, None, &mut Vec::new);
        assert_eq!(pipeline.take_capture_shift(), None);
    }

    /// A connection from before the agent, learned from the kernel mid-stream: the reply to a
    /// request sent before capture started is the one exchange lost, and it is counted; the
    /// next request is decoded.
    #[test]
    fn an_adopted_connection_is_decoded_from_its_first_request_and_the_cut_exchange_counted() {
        let (mut pipeline, metrics) = pipeline(0);
        let sk = client_sk(40_003);
        learn_client(&mut pipeline, sk);
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
        let (first, second) = (client_sk(40_001), client_sk(40_002));
        learn_client(&mut pipeline, first);
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
        learn_client(&mut pipeline, second);
        let now = crate::clock::monotonic_ns();
        get_hit(&mut pipeline, first, now);
        get_hit(&mut pipeline, second, now + 10_000);
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

    /// A reload that renames the service of a port: a pooled connection opened before it
    /// counts after it under the new name (requests, the active gauge, history), as new
    /// connections do; a request in flight across the reload is answered, not cut; what was
    /// counted before the reload stays under the old name.
    #[test]
    fn a_reload_that_renames_a_service_moves_its_open_connections() {
        let (mut pipeline, metrics) = pipeline(0);
        let history = Arc::new(Mutex::new(History::new(
            900,
            crate::history::HistoryLimits::default(),
        )));
        pipeline.add_sink(Box::new(crate::history::HistorySink::new(
            history.clone(),
            pipeline.services().clone(),
        )));
        let pooled = client_sk(40_003);
        learn_client(&mut pipeline, pooled);
        let now = crate::clock::monotonic_ns();
        get_hit(&mut pipeline, pooled, now);
        // A get sent before the reload, its answer coming after it.
        let sample = Some((
            pipeline.capture.kernel_shift_at(now, 0) as u8,
            capture_sample::depth(client_key(pooled), 0) as u8,
        ));
        let request = b"get k\r\n";
        let mut send = encode_payload_record(
            now + 10_000,
            pooled,
            request.len() as u64,
            true,
            b"c",
            request,
        );
        mark_sample(&mut send, sample);
        pipeline.on_payload_record(&send);
        let reload = Config::parse(
            &format!("[[services]]\nname = \"cache\"\nport = {PORT}\nprotocol = \"memcache\"\n"),
            "reload.toml",
        )
        .unwrap();
        pipeline
            .services()
            .reconfigure(&reload.services)
            .expect("one service");
        pipeline.reconfigure(&reload);
        let answer = b"VALUE k 0 1\r\nv\r\nEND\r\n";
        let mut recv = encode_payload_record(
            now + 20_000,
            pooled,
            answer.len() as u64,
            false,
            b"c",
            answer,
        );
        mark_sample(&mut recv, sample);
        pipeline.on_payload_record(&recv);
        get_hit(&mut pipeline, pooled, now + 30_000);
        pipeline.flush();

        let server = format!("127.0.0.1:{PORT}");
        let labels = |service: &str| crate::export::metrics::EndpointLabels {
            service: service.into(),
            server: server.clone(),
            role: "client",
        };
        let hits = |service: &str| {
            metrics
                .memcache_requests
                .get_or_create(&labels(service).request("get", "hit"))
                .get()
        };
        assert_eq!((hits("mc"), hits("cache")), (1, 2));
        let active = |service: &str| {
            metrics
                .connections_active
                .get_or_create(&labels(service))
                .get()
        };
        assert_eq!((active("mc"), active("cache")), (0, 1));

        let snapshot = history.lock().unwrap().snapshot(0);
        let mut services: Vec<&str> = snapshot
            .seconds
            .iter()
            .flat_map(|second| &second.requests)
            .flat_map(|row| std::iter::repeat_n(snapshot.label(row.service), row.count as usize))
            .collect();
        services.sort();
        assert_eq!(services, ["cache", "cache", "mc"]);
    }

    /// The tick does no I/O: kernel totals come in as readings and become increments, and the
    /// local memcached processes are read through the caller's reader only when the slab fit
    /// is due (first at the ring views' cadence, then every minute, or every 5 s while a
    /// server seen has no local memcached).
    #[test]
    fn a_tick_takes_kernel_readings_and_reads_local_memcacheds_only_when_due() {
        let (mut pipeline, metrics) = pipeline(0);
        let history = Arc::new(Mutex::new(History::new(
            900,
            crate::history::HistoryLimits::default(),
        )));
        pipeline.set_history(history.clone());
        // A server-side socket of the service stores an item: the slab fit has a server.
        let sk = 0xffff_8880_0000_2000;
        learn(
            &mut pipeline,
            sk,
            &format!("127.0.0.1:{PORT}"),
            "127.0.0.1:40009",
            8,
            "memcached",
        );
        for (ts, is_send, data) in [
            (SECOND, false, &b"set k 0 0 1\r\nv\r\n"[..]),
            (SECOND + 1_000, true, &b"STORED\r\n"[..]),
        ] {
            let record = encode_payload_record(ts, sk, data.len() as u64, is_send, b"m", data);
            assert_eq!(pipeline.on_payload_record(&record), PayloadOutcome::Handled);
        }

        let reads = std::cell::Cell::new(0);
        let mut read_locals = || {
            reads.set(reads.get() + 1);
            Vec::<LocalMemcached>::new()
        };
        let readings = |ringbuf: u64| KernelReadings {
            losses: Some(vec![("ringbuf", ringbuf)]),
            program_stats: None,
        };
        pipeline.tick(2 * SECOND, Some(&readings(4)), &mut read_locals);
        assert_eq!(reads.get(), 1, "the first tick publishes the slab fit");
        pipeline.tick(3 * SECOND, Some(&readings(6)), &mut read_locals);
        pipeline.tick(4 * SECOND, None, &mut read_locals);
        assert_eq!(reads.get(), 1, "not again within the ring views' interval");
        let lost = metrics
            .events_lost
            .get_or_create(&crate::export::metrics::SourceLabels { source: "ringbuf" })
            .get();
        assert_eq!(lost, 6);
        let snapshot = history.lock().unwrap().snapshot(0);
        assert_eq!(snapshot.slab_fit.len(), 1, "{:?}", snapshot.slab_fit);
    }

    /// Issue 21's lost enqueue, in the order a failing run recorded it: the idle-dropped
    /// producer's socket is reset during its dead write (loopback), reads EOF, and a new socket
    /// (the next client's) takes its address before the next tick. The write is named by its
    /// own bytes, `set` to `lostq`, not by whatever the address sends next (it used to be
    /// named `stats`, and the lost message went uncounted).
    #[test]
    fn a_lost_enqueue_is_named_by_its_own_bytes_when_a_new_socket_takes_the_address() {
        let config = Config::parse(
            "[[services]]\nname = \"starling\"\nport = 22133\nprotocol = \"memcache-queue\"\n\
             [limits]\ncapture_records_per_second = 0\n",
            "test.toml",
        )
        .expect("test config");
        let (metrics, _registry) = Metrics::new();
        let services = SharedServices::from_config(&config).expect("one service");
        let mut pipeline = Pipeline::new(&config, services, metrics.clone());
        let sk = 0xffff_8880_0000_3000u64;
        let local: SocketAddr = "127.0.0.1:40007".parse().unwrap();
        let remote: SocketAddr = "127.0.0.1:22133".parse().unwrap();
        let event = |kind: EventKind, ts_ns: u64, peer_closed_ns: u64, reset_received_ns: u64| {
            SockEventRecord {
                kind,
                ts_ns,
                sk,
                local: Some(local),
                remote: Some(remote),
                pid: 7,
                comm: "python3".to_string(),
                facts: SocketFacts {
                    last_activity_ns: 1,
                    bytes_sent: 0,
                    bytes_received: 0,
                    peer_closed_ns,
                    reset_received_ns,
                    written_after_peer_close: None,
                },
            }
        };
        let state = |old_state, new_state| EventKind::StateChange {
            old_state,
            new_state,
        };
        let payload = |pipeline: &mut Pipeline, ts: u64, is_send: bool, data: &[u8]| {
            let record =
                encode_payload_record(ts, sk, data.len() as u64, is_send, b"python3", data);
            assert_eq!(pipeline.on_payload_record(&record), PayloadOutcome::Handled);
        };
        pipeline.handle_socket_event(&event(
            EventKind::Learned {
                state: TcpState::Established as u8,
            },
            1_000,
            0,
            0,
        ));
        payload(&mut pipeline, 2_000, true, b"set lostq 0 0 5\r\nfirst\r\n");
        payload(&mut pipeline, 3_000, false, b"STORED\r\n");
        // The queue server drops the idle producer; its next enqueue resets the connection
        // while it is being sent, and the producer reads EOF.
        pipeline.handle_socket_event(&event(
            state(TcpState::Established as u8, TcpState::CloseWait as u8),
            SECOND,
            SECOND,
            0,
        ));
        pipeline.handle_socket_event(&event(
            state(TcpState::CloseWait as u8, TcpState::Close as u8),
            2 * SECOND,
            SECOND,
            2 * SECOND,
        ));
        pipeline.handle_socket_event(&event(
            EventKind::SendAfterPeerClose { ret: 33 },
            2 * SECOND + 10,
            SECOND,
            2 * SECOND,
        ));
        payload(
            &mut pipeline,
            2 * SECOND + 20,
            true,
            b"set lostq 0 0 13\r\nnever arrives\r\n",
        );
        pipeline.handle_socket_event(&event(
            EventKind::RecvAfterPeerClose { ret: 0 },
            2 * SECOND + 30,
            SECOND,
            2 * SECOND,
        ));
        // A new socket at the same address asks for stats.
        pipeline.handle_socket_event(&event(
            state(TcpState::Close as u8, TcpState::SynSent as u8),
            2 * SECOND + 40,
            0,
            0,
        ));
        pipeline.handle_socket_event(&event(
            state(TcpState::SynSent as u8, TcpState::Established as u8),
            2 * SECOND + 50,
            0,
            0,
        ));
        payload(&mut pipeline, 2 * SECOND + 60, true, b"stats\r\n");
        pipeline.tick(3 * SECOND, None, &mut Vec::new);
        let lost = metrics
            .queue_messages_lost
            .get_or_create(&crate::export::metrics::QueueLostLabels {
                service: "starling".into(),
                queue: "lostq".into(),
                outcome: "eof",
            })
            .get();
        assert_eq!(lost, 1);
        let written = |command: &'static str| {
            metrics
                .dead_socket_writes
                .get_or_create(
                    &crate::export::metrics::EndpointLabels {
                        service: "starling".into(),
                        server: "127.0.0.1:22133".into(),
                        role: "client",
                    }
                    .dead_write("python3".into(), "eof", command),
                )
                .get()
        };
        assert_eq!((written("set"), written("stats")), (1, 0));
    }

    #[test]
    fn without_a_budget_nothing_is_sampled() {
        let (mut pipeline, metrics, _, released) = two_clients(0);
        for i in 0..5_000 {
            get_hit(&mut pipeline, released, SECOND + 1 + i * 100_000);
        }
        pipeline.tick(2 * SECOND, None, &mut Vec::new);
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
        let pool: Vec<u64> = (0..POOL).map(|i| client_sk(30_000 + i as u16)).collect();
        let short = [client_sk(30_100), client_sk(30_101)];
        for &sk in pool.iter().chain(&short) {
            learn_client(&mut pipeline, sk);
        }
        // Every connection: its address, its ephemeral port, its requests.
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
            let key = capture_sample::key(LOOPBACK, PORT, LOOPBACK, port);
            if !capture_sample::is_followed(key, SHIFT, 0) {
                continue;
            }
            let sample = Some((SHIFT as u8, capture_sample::depth(key, 0) as u8));
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

        // The same traffic sampled by socket address alone (the address as the key's only
        // word).
        let by_address: u64 = connections
            .iter()
            .filter(|c| {
                let address = [c.0 as u32, (c.0 >> 32) as u32, 0, 0];
                capture_sample::is_followed(capture_sample::key(address, 0, [0; 4], 0), SHIFT, 0)
            })
            .map(|c| c.2 << SHIFT)
            .sum();
        assert!(
            (by_address as f64 - truth as f64).abs() > tolerance,
            "by address {by_address} vs {truth}: the old sample would pass too"
        );
    }

    /// Audit 2026-12-07: libmemcached's binary clients (pylibmc, PHP) end a connection with a
    /// Quit and close without reading memcached's answer, which then meets the closed
    /// connection: 384 of 2,000 such connections read as replies whose clients gave up
    /// waiting. A server's send that is a Quit's answer is no dead write; another answer
    /// written the same way still is.
    #[test]
    fn a_servers_answer_to_a_quit_after_the_client_closed_is_no_dead_write() {
        let (mut pipeline, metrics) = pipeline(0);
        let labels = crate::export::metrics::EndpointLabels {
            service: "mc".into(),
            server: format!("127.0.0.1:{PORT}"),
            role: "server",
        }
        .dead_write("mc-worker".into(), "eof", "unknown");
        let quit_answer = [
            0x81, 0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        for (i, answer) in [&quit_answer[..], b"STORED\r\n"].into_iter().enumerate() {
            let sk = client_sk(40_100 + i as u16);
            let client = format!("127.0.0.1:{}", 40_100 + i);
            learn(
                &mut pipeline,
                sk,
                &format!("127.0.0.1:{PORT}"),
                &client,
                9,
                "mc-worker",
            );
            let t = (10 + 10 * i as u64) * SECOND;
            let event = |kind: EventKind, ts: u64, reset: bool| {
                let mut event = sock_event(kind, ts, sk);
                event.pid = 9;
                event.comm = "mc-worker".to_string();
                event.facts.peer_closed_ns = t;
                event.facts.reset_received_ns = if reset { t + 2 } else { 0 };
                event
            };
            let state = |old: TcpState, new: TcpState| EventKind::StateChange {
                old_state: old as u8,
                new_state: new as u8,
            };
            pipeline.handle_socket_event(&event(
                state(TcpState::Established, TcpState::CloseWait),
                t,
                false,
            ));
            // On loopback the client's reset comes inside the send that draws it.
            let sent = answer.len() as i64;
            pipeline.handle_socket_event(&event(
                EventKind::SendAfterPeerClose { ret: sent },
                t + 2,
                true,
            ));
            let record = encode_payload_record(t + 2, sk, sent as u64, true, b"mc-worker", answer);
            assert_eq!(pipeline.on_payload_record(&record), PayloadOutcome::Handled);
            pipeline.handle_socket_event(&event(
                EventKind::RecvAfterPeerClose { ret: 0 },
                t + 3,
                true,
            ));
            pipeline.handle_socket_event(&event(
                state(TcpState::CloseWait, TcpState::Close),
                t + 4,
                true,
            ));
            pipeline.tick(t + 8 * SECOND, None, &mut Vec::new);
            assert_eq!(
                metrics.dead_socket_writes.get_or_create(&labels).get(),
                i as u64,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    /// What sinks were told: the process of each request and of each fd-exhaustion event.
    #[derive(Clone, Default)]
    struct Names(Arc<Mutex<Vec<String>>>);

    impl ObservationSink for Names {
        fn observation(&mut self, observation: &Observation) {
            if let Observation::FdExhausted { comm, .. } = observation {
                self.0.lock().unwrap().push(format!("fds {comm}"));
            }
        }
        fn memcache(&mut self, event: &MemcacheEvent, comm: Option<&str>) {
            if let MemcacheEvent::Request { request, .. } = event {
                let status = request.status.as_str();
                self.0.lock().unwrap().push(format!("{status} {comm:?}"));
            }
        }
    }

    /// memcached's requests were counted under its worker threads' name (`mc-worker`) and
    /// its fds under `memcached`: every record is named by its process, records of a process
    /// /proc no longer has by their thread.
    #[test]
    fn records_are_named_by_their_process_and_gone_processes_by_their_thread() {
        let (mut pipeline, _metrics) = pipeline(0);
        pipeline.set_process_names(ProcessNames::new(Some(Box::new(|pid| {
            (pid == 9).then(|| "memcached".to_string())
        }))));
        let names = Names::default();
        pipeline.add_sink(Box::new(names.clone()));
        let sk = client_sk(40_200);
        learn_client(&mut pipeline, sk);
        let record = |ts: u64, is_send: bool, pid: u32, thread: &[u8], data: &[u8]| {
            let mut record =
                encode_payload_record(ts, sk, data.len() as u64, is_send, thread, data);
            record[32..36].copy_from_slice(&pid.to_ne_bytes());
            record
        };
        for (ts, is_send, pid, thread, data) in [
            (SECOND, true, 9, &b"mc-worker"[..], &b"get a\r\n"[..]),
            (SECOND + 10, false, 9, b"mc-worker", b"END\r\n"),
            // pid 10 has exited by the time its records are read.
            (SECOND + 20, true, 10, b"short", b"get b\r\n"),
            (SECOND + 30, false, 10, b"short", b"END\r\n"),
            // Unanswered: it times out later, named from its stream.
            (SECOND + 40, true, 9, b"mc-worker", b"get c\r\n"),
        ] {
            let outcome = pipeline.on_payload_record(&record(ts, is_send, pid, thread, data));
            assert_eq!(outcome, PayloadOutcome::Handled);
        }
        pipeline.tick(8 * SECOND, None, &mut Vec::new);
        // SAFETY: SockEvent is repr(C) plain old data, valid all zero.
        let mut fd_event: agent_common::SockEvent = unsafe { std::mem::zeroed() };
        fd_event.kind = agent_common::SockEventKind::FdExhausted as u8;
        fd_event.fd_syscall = agent_common::FdSyscall::Accept4 as u8;
        fd_event.ret = -24;
        fd_event.pid = 9;
        fd_event.ts_ns = 9 * SECOND;
        fd_event.comm[..9].copy_from_slice(b"mc-worker");
        pipeline.on_socket_record(&crate::kernel::events::record_bytes(&fd_event));
        assert_eq!(
            *names.0.lock().unwrap(),
            [
                "miss Some(\"memcached\")",
                "miss Some(\"short\")",
                "timeout Some(\"memcached\")",
                "fds memcached",
            ]
        );
    }
}
