//! Unit tests of the ring merge: the ordering rules on an event queue, and on a real pipeline
//! fed from in-memory rings.

use std::collections::VecDeque;

use agent_common::{SockEvent, SockEventKind, TcpState, AF_INET};

use super::*;
use crate::{
    config::Config,
    export::metrics::{EndpointLabels, Metrics},
    kernel::capture::encode_payload_record,
    kernel::events::{EventKind, SocketFacts},
    services::SharedServices,
};

fn event(ts_ns: u64) -> SockEventRecord {
    SockEventRecord {
        kind: EventKind::StateChange {
            old_state: 0,
            new_state: 0,
        },
        ts_ns,
        sk: ts_ns,
        local: None,
        remote: None,
        pid: 1,
        comm: String::new(),
        facts: SocketFacts {
            last_activity_ns: 0,
            bytes_sent: 0,
            bytes_received: 0,
            peer_closed_ns: 0,
            reset_received_ns: 0,
            written_after_peer_close: None,
        },
    }
}

/// A ring that holds `ring` and records what was applied.
struct Recorder {
    ring: VecDeque<SockEventRecord>,
    applied: Vec<u64>,
}

impl Recorder {
    fn new(timestamps: impl IntoIterator<Item = u64>) -> Self {
        Recorder {
            ring: timestamps.into_iter().map(event).collect(),
            applied: Vec::new(),
        }
    }
}

impl EventFlow for Recorder {
    fn next_event(&mut self) -> Option<SockEventRecord> {
        self.ring.pop_front()
    }

    fn apply(&mut self, event: &SockEventRecord) {
        self.applied.push(event.ts_ns);
    }
}

#[test]
fn events_are_applied_up_to_each_payload_and_no_further() {
    let mut queue = EventQueue::new();
    let mut flow = Recorder::new([1, 2, 5, 7]);
    queue.apply_until(4, &mut flow);
    assert_eq!(flow.applied, [1, 2]);
    queue.apply_until(5, &mut flow);
    assert_eq!(
        flow.applied,
        [1, 2, 5],
        "an event at the payload's time goes first"
    );
    queue.apply_all(&mut flow);
    assert_eq!(flow.applied, [1, 2, 5, 7]);
    assert!(queue.pending.is_empty());
}

#[test]
fn a_burst_is_read_in_bounded_batches_and_applied_in_order() {
    let burst = 10 * PENDING_EVENTS_MAX as u64;
    let mut queue = EventQueue::new();
    let capacity = queue.pending.capacity();
    // Every event is later than the payload: only one batch may be read ahead.
    let mut flow = Recorder::new(100..100 + burst);
    queue.apply_until(50, &mut flow);
    assert!(flow.applied.is_empty());
    assert_eq!(queue.pending.len(), PENDING_EVENTS_MAX);
    assert_eq!(flow.ring.len() as u64, burst - PENDING_EVENTS_MAX as u64);
    // Every event is earlier than the next payload: all of them, in order, batch by batch.
    queue.apply_until(u64::MAX - 1, &mut flow);
    assert_eq!(flow.applied, (100..100 + burst).collect::<Vec<_>>());
    assert!(flow.ring.is_empty());
    assert_eq!(
        queue.pending.capacity(),
        capacity,
        "the buffer never grows past its cap"
    );
}

/// The ring is in reservation order: a record stamped late (its program was interrupted
/// between reserving and reading the clock) may come before one stamped earlier. Events still
/// apply in timestamp order, the earlier one first.
#[test]
fn an_event_stamped_late_does_not_hold_back_earlier_ones_behind_it() {
    let mut queue = EventQueue::new();
    let mut flow = Recorder::new([1, 5, 3, 7, 4]);
    queue.apply_until(4, &mut flow);
    assert_eq!(flow.applied, [1, 3, 4]);
    queue.apply_all(&mut flow);
    assert_eq!(flow.applied, [1, 3, 4, 5, 7]);
}

const PORT: u16 = 11211;
const SK: u64 = 0xffff_8880_0000_4000;

fn pipeline() -> (Pipeline, Metrics) {
    let config = Config::parse(
        &format!(
            "[[services]]\nname = \"mc\"\nport = {PORT}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_records_per_second = 0\n"
        ),
        "test.toml",
    )
    .expect("test config");
    let (metrics, _registry) = Metrics::new();
    let services = SharedServices::from_config(&config).expect("one service");
    (Pipeline::new(&config, services, metrics.clone()), metrics)
}

/// The kernel's record of a client socket to the service, first met at `ts_ns`.
fn learned_record(ts_ns: u64) -> Vec<u8> {
    learned_record_of(SK, 40_000, ts_ns)
}

/// The kernel's record of the client socket at `sk` (source port `port`), first met at `ts_ns`.
fn learned_record_of(sk: u64, port: u16, ts_ns: u64) -> Vec<u8> {
    // SAFETY: SockEvent is repr(C) plain old data, valid for any bit pattern.
    let mut raw: SockEvent = unsafe { std::mem::zeroed() };
    raw.kind = SockEventKind::Learned as u8;
    raw.new_state = TcpState::Established as u8;
    raw.family = AF_INET;
    raw.local_port = port;
    raw.remote_port = PORT;
    raw.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    raw.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    raw.ts_ns = ts_ns;
    raw.sk = sk;
    // SAFETY: reading a repr(C) plain old data value as its bytes.
    unsafe {
        std::slice::from_raw_parts(
            (&raw as *const SockEvent).cast::<u8>(),
            std::mem::size_of::<SockEvent>(),
        )
    }
    .to_vec()
}

/// A get of `k` sent at `ts_ns` and its hit a microsecond later.
fn get_hit(ts_ns: u64) -> [Vec<u8>; 2] {
    let (request, response) = (&b"get k\r\n"[..], &b"VALUE k 0 1\r\nv\r\nEND\r\n"[..]);
    [
        encode_payload_record(ts_ns, SK, request.len() as u64, true, b"c", request),
        encode_payload_record(
            ts_ns + 1_000,
            SK,
            response.len() as u64,
            false,
            b"c",
            response,
        ),
    ]
}

fn hits(metrics: &Metrics) -> u64 {
    let labels = EndpointLabels {
        service: "mc".into(),
        server: format!("127.0.0.1:{PORT}"),
        role: "client",
    }
    .request("get", "hit");
    metrics.memcache_requests.get_or_create(&labels).get()
}

/// Both rings read in one pump: the socket's first event, recorded before its payloads (or at
/// the same time), is applied before them, so they are decoded.
#[test]
fn a_payload_comes_after_the_events_recorded_before_it() {
    for learned_at in [5, 10] {
        let (mut pipeline, metrics) = pipeline();
        let mut events = VecDeque::from([learned_record(learned_at)]);
        let mut payloads = VecDeque::from(get_hit(10).to_vec());
        pump(
            &mut EventQueue::new(),
            &mut pipeline,
            &mut events,
            &mut payloads,
            || 20,
        );
        assert_eq!(hits(&metrics), 1, "learned at {learned_at}");
        assert!(events.is_empty() && payloads.is_empty());
    }
}

/// An event recorded after a payload is not applied before it, even when it sits in the ring
/// already: the payload of a socket not known yet is dropped, and the event still applied.
#[test]
fn an_event_recorded_after_a_payload_is_applied_after_it() {
    let (mut pipeline, metrics) = pipeline();
    let mut events = VecDeque::from([learned_record(15)]);
    let mut payloads = VecDeque::from(get_hit(10).to_vec());
    payloads.extend(get_hit(5_000));
    pump(
        &mut EventQueue::new(),
        &mut pipeline,
        &mut events,
        &mut payloads,
        || 10_000,
    );
    assert_eq!(
        hits(&metrics),
        1,
        "only the exchange after the socket was learned"
    );
}

/// A churn connection's first event sits in the ring behind another socket's event stamped
/// later: its payloads, stamped in between, are still decoded (they used to be dropped as of
/// an unknown socket, uncounted). A payload whose socket no event ever names is counted.
#[test]
fn a_payload_after_its_sockets_event_is_decoded_when_the_ring_has_them_out_of_order() {
    let (mut pipeline, metrics) = pipeline();
    let other = SK + 0x940;
    let mut events = VecDeque::from([learned_record_of(other, 40_001, 300), learned_record(5)]);
    let mut payloads = VecDeque::from(get_hit(10).to_vec());
    // A payload of a socket never seen: dropped, counted at the next tick.
    payloads.push_back(encode_payload_record(
        400,
        SK + 0x1280,
        7,
        true,
        b"c",
        b"get k\r\n",
    ));
    pump(
        &mut EventQueue::new(),
        &mut pipeline,
        &mut events,
        &mut payloads,
        || 1_000,
    );
    assert_eq!(hits(&metrics), 1);
    let readings = crate::kernel::readings::KernelReadings {
        losses: None,
        program_stats: None,
    };
    pipeline.tick(2_000, Some(&readings), &mut Vec::new);
    let unknown = metrics
        .events_lost
        .get_or_create(&crate::export::metrics::SourceLabels {
            source: "payload_unknown_socket",
        })
        .get();
    assert_eq!(unknown, 1);
}

/// A record that does not decode is counted and skipped; the events after it still apply.
#[test]
fn an_undecodable_event_is_skipped_not_an_end() {
    let (mut pipeline, metrics) = pipeline();
    let mut events = VecDeque::from([vec![0u8; 7], learned_record(5)]);
    let mut payloads = VecDeque::from(get_hit(10).to_vec());
    pump(
        &mut EventQueue::new(),
        &mut pipeline,
        &mut events,
        &mut payloads,
        || 20,
    );
    assert_eq!(pipeline.undecodable_records, 1);
    assert_eq!(hits(&metrics), 1);
}

/// Events left after the last payload are applied by the same pump, not the next one.
#[test]
fn events_after_the_last_payload_are_applied_in_the_same_pump() {
    let (mut pipeline, _metrics) = pipeline();
    let mut events = VecDeque::from([learned_record(50)]);
    pump(
        &mut EventQueue::new(),
        &mut pipeline,
        &mut events,
        &mut VecDeque::new(),
        || 60,
    );
    assert!(events.is_empty());
    assert!(pipeline.tracker_mut().endpoint_of(SK).is_some());
}

/// An event stamped after the payload ring was found empty waits for the next pump: a payload
/// recorded before it may not have been read yet (a dead write's, which names it).
#[test]
fn an_event_after_the_drain_waits_for_the_next_pump() {
    let (mut pipeline, _metrics) = pipeline();
    let mut events = VecDeque::from([learned_record(50)]);
    // One queue across pumps, as `run` keeps it: the event read early waits in it.
    let mut queue = EventQueue::new();
    pump(
        &mut queue,
        &mut pipeline,
        &mut events,
        &mut VecDeque::new(),
        || 40,
    );
    assert!(pipeline.tracker_mut().endpoint_of(SK).is_none());
    pump(
        &mut queue,
        &mut pipeline,
        &mut events,
        &mut VecDeque::new(),
        || 60,
    );
    assert!(pipeline.tracker_mut().endpoint_of(SK).is_some());
}

/// The tick reads the rings up to its own time first: a get whose hit waits in the payload ring
/// when its 5 s expire is a hit, not a timeout followed by an `unexpected_response`.
#[test]
fn a_tick_does_not_expire_a_request_whose_answer_waits_in_the_ring() {
    const SECOND: u64 = 1_000_000_000;
    let (mut pipeline, metrics) = pipeline();
    let mut queue = EventQueue::new();
    let mut events = VecDeque::from([learned_record(SECOND / 2)]);
    let [request, _] = get_hit(SECOND);
    let mut payloads = VecDeque::from([request]);
    pump(
        &mut queue,
        &mut pipeline,
        &mut events,
        &mut payloads,
        || SECOND + 10,
    );
    // The answer came 4.9 s later; the agent, behind, ticks 7 s in before reading it.
    let answer = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    let response = encode_payload_record(
        SECOND + 49 * SECOND / 10,
        SK,
        answer.len() as u64,
        false,
        b"c",
        answer,
    );
    payloads.push_back(response);
    drain_then_tick(
        &mut queue,
        &mut pipeline,
        &mut events,
        &mut payloads,
        || 7 * SECOND,
        None,
        &mut Vec::new,
    );
    assert_eq!(hits(&metrics), 1);
    let labels = EndpointLabels {
        service: "mc".into(),
        server: format!("127.0.0.1:{PORT}"),
        role: "client",
    }
    .request("get", "timeout");
    assert_eq!(metrics.memcache_requests.get_or_create(&labels).get(), 0);
}
