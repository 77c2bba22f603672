//! Reads the two kernel rings (socket events, payload captures) into the pipeline as one
//! stream in recording order.
//!
//! The rings are separate so payload floods cannot crowd out lifecycle events, but a
//! connection's bytes and its state changes must be seen in the order they happened: its
//! opening before its first payload, its last response before its close. Each ring is in
//! recording order, so this is a merge; only the events side is buffered, and only up to
//! [`PENDING_EVENTS_MAX`].

use std::collections::VecDeque;

use aya::maps::{ring_buf::RingBufItem, MapData, RingBuf};

use crate::{
    ingest::pipeline::{PayloadOutcome, Pipeline},
    kernel::{capture::payload_ts, events::SockEventRecord, readings::KernelReadings},
    sizes::slab::LocalMemcached,
};

/// At most this many decoded events wait in memory for the payload ring to catch up. A burst
/// of 100k connection opens otherwise queued every one of them (about 48 MB) before handling
/// any.
pub const PENDING_EVENTS_MAX: usize = 1024;

/// A ring of records, read in the order the kernel wrote them: the kernel's ring buffers, or
/// records held in memory (tests, replays).
pub trait RecordRing {
    type Record<'a>: std::ops::Deref<Target = [u8]>
    where
        Self: 'a;

    /// The next record, None when the ring is empty.
    fn next_record(&mut self) -> Option<Self::Record<'_>>;
}

impl RecordRing for RingBuf<MapData> {
    type Record<'a> = RingBufItem<'a>;

    fn next_record(&mut self) -> Option<RingBufItem<'_>> {
        self.next()
    }
}

impl RecordRing for VecDeque<Vec<u8>> {
    type Record<'a> = Vec<u8>;

    fn next_record(&mut self) -> Option<Vec<u8>> {
        self.pop_front()
    }
}

/// [`pump`] reads the clock once per this many payload records.
const CLOCK_EVERY_RECORDS: u32 = 32;

/// Where [`EventQueue`] reads socket events from and hands them to.
pub trait EventFlow {
    /// The next event from the ring, None when it is empty.
    fn next_event(&mut self) -> Option<SockEventRecord>;
    fn apply(&mut self, event: &SockEventRecord);
}

/// Socket events read from their ring but not applied yet because a payload recorded before
/// them has not been seen, in timestamp order. Never holds more than [`PENDING_EVENTS_MAX`];
/// the buffer is kept between pumps so steady traffic does not allocate.
///
/// The ring is in reservation order, which is not quite timestamp order across CPUs: a program
/// interrupted between reserving its record and reading the clock (a softirq that processes
/// loopback packets and emits events of its own) stamps its record later than records after
/// it. Events are therefore read ahead as far as the cap allows and kept sorted, so one stamped
/// late cannot hold back an earlier one behind it (the payloads of a socket whose first event
/// sat behind it were dropped as unknown: a soak counted 40 of 60,500 requests missing with
/// nothing lost).
pub struct EventQueue {
    pending: VecDeque<SockEventRecord>,
}

impl Default for EventQueue {
    fn default() -> Self {
        EventQueue::new()
    }
}

impl EventQueue {
    pub fn new() -> Self {
        EventQueue {
            pending: VecDeque::with_capacity(PENDING_EVENTS_MAX),
        }
    }

    /// Applies, in timestamp order, every event recorded at or before `ts_ns`, reading the
    /// ring ahead (up to the cap) so an event stamped earlier than one before it still comes
    /// first.
    pub fn apply_until(&mut self, ts_ns: u64, flow: &mut impl EventFlow) {
        loop {
            self.refill(flow);
            let mut applied = false;
            while self
                .pending
                .front()
                .is_some_and(|event| event.ts_ns <= ts_ns)
            {
                if let Some(event) = self.pending.pop_front() {
                    flow.apply(&event);
                    applied = true;
                }
            }
            if !applied {
                return;
            }
        }
    }

    /// Applies everything pending and everything left in the ring, a bounded batch at a time.
    #[cfg(test)]
    pub fn apply_all(&mut self, flow: &mut impl EventFlow) {
        self.apply_until(u64::MAX, flow);
    }

    /// Reads up to the cap, each event into its place by timestamp (almost always the back;
    /// events with the same stamp keep ring order).
    fn refill(&mut self, flow: &mut impl EventFlow) {
        while self.pending.len() < PENDING_EVENTS_MAX {
            let Some(event) = flow.next_event() else {
                break;
            };
            if self
                .pending
                .back()
                .is_none_or(|last| last.ts_ns <= event.ts_ns)
            {
                self.pending.push_back(event);
            } else {
                let at = self.pending.partition_point(|e| e.ts_ns <= event.ts_ns);
                self.pending.insert(at, event);
            }
        }
    }
}

/// The events ring as an [`EventFlow`] into the pipeline.
struct RingEvents<'a, R> {
    pipeline: &'a mut Pipeline,
    ring: &'a mut R,
}

impl<R: RecordRing> EventFlow for RingEvents<'_, R> {
    fn next_event(&mut self) -> Option<SockEventRecord> {
        // Records that do not decode are skipped (and counted by the pipeline), not an end.
        while let Some(item) = self.ring.next_record() {
            if let Some(event) = self.pipeline.decode_socket_record(&item) {
                return Some(event);
            }
        }
        None
    }

    fn apply(&mut self, event: &SockEventRecord) {
        self.pipeline.handle_socket_event(event);
    }
}

/// Processes both rings in timestamp order (see the module comment), then lets streams of
/// sockets closed longer than the grace ago finish as of `clock()` (read after the drain).
///
/// Events are applied only up to when the payload ring was last found empty. A thread's
/// payload record is in the ring before anything it does after that send, so an event stamped
/// before then has every payload it follows already handled: a dead write's payload (which
/// names it) comes before the EOF that resolves it, whichever ring is read first. Later events
/// wait for the next pump.
pub fn pump(
    queue: &mut EventQueue,
    pipeline: &mut Pipeline,
    events: &mut impl RecordRing,
    payloads: &mut impl RecordRing,
    mut clock: impl FnMut() -> u64,
) {
    // The clock is read before looking at the ring, but only every CLOCK_EVERY_RECORDS
    // records (a read per record was 5-7% of the agent's time at saturation): `drained_at` may
    // then be a few records early, which only defers later events to the next pump.
    let mut looked_at = clock();
    let mut since_look = 0;
    let drained_at = loop {
        if since_look == CLOCK_EVERY_RECORDS {
            looked_at = clock();
            since_look = 0;
        }
        let Some(item) = payloads.next_record() else {
            break looked_at;
        };
        since_look += 1;
        let ts = payload_ts(&item).unwrap_or(u64::MAX);
        queue.apply_until(
            ts,
            &mut RingEvents {
                pipeline: &mut *pipeline,
                ring: &mut *events,
            },
        );
        if pipeline.on_payload_record(&item) == PayloadOutcome::UnknownSocket {
            // Not known even with every earlier event applied: not a watched connection we
            // track (e.g. the table was full); the payload is dropped, and counted.
            pipeline.payload_of_unknown_socket();
        }
    };
    queue.apply_until(
        drained_at,
        &mut RingEvents {
            pipeline: &mut *pipeline,
            ring: events,
        },
    );
    pipeline.settle(clock());
}

/// The once-a-second [`Pipeline::tick`] as of `clock()`, after both rings are read up to then:
/// a request whose answer already waits in the payload ring does not expire. (An agent behind
/// its rings under load expired such requests as timeouts on the tick's clock, and their
/// answers, read next, became `unexpected_response` decode errors.)
pub fn drain_then_tick(
    queue: &mut EventQueue,
    pipeline: &mut Pipeline,
    events: &mut impl RecordRing,
    payloads: &mut impl RecordRing,
    mut clock: impl FnMut() -> u64,
    kernel: Option<&KernelReadings>,
    read_local_memcacheds: &mut dyn FnMut() -> Vec<LocalMemcached>,
) {
    let now = clock();
    pump(queue, pipeline, events, payloads, &mut clock);
    pipeline.tick(now, kernel, read_local_memcacheds);
}

#[cfg(test)]
mod tests;
