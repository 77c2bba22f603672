//! From captured payloads to memcache observations: one decoder per watched connection, fed in
//! order, with the direction taken from the connection's role. Bounded in connections; a
//! connection's decoder goes when the connection closes.

use std::collections::VecDeque;

use agent_common::COMM_LEN;
use foldhash::{HashMap, HashMapExt};

use crate::{
    conn::tracking::Endpoint,
    kernel::capture::PayloadView,
    memcache::{
        Chunk, Command, ConnectionDecoder, DecodeErrorReason, Decoded, DecoderConfig, Direction,
        RequestObservation,
    },
    model::Role,
};

/// What decoding produced ([`crate::memcache::Decoded`]) tied to the connection's endpoint, plus
/// the connection's payload bytes: what the pipeline hands to metrics, keys and history.
// Boxing the request (its key is inline) would cost an allocation per decoded request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MemcacheEvent {
    Request {
        endpoint: Endpoint,
        request: RequestObservation,
        /// The sample its stream was captured under: what the request counts for.
        sample: StreamSample,
        /// The process (tgid) and thread name of its stream's last record: who waited for a
        /// request that finishes by close or timeout, when no record is at hand.
        pid: u32,
        comm: [u8; COMM_LEN],
    },
    DecodeError {
        service: usize,
        reason: DecodeErrorReason,
    },
    Bytes {
        endpoint: Endpoint,
        sent: bool,
        bytes: u64,
    },
}

/// The sample a stream's records were captured under, from its last record: how many requests
/// each of its requests stands for, also when it finishes later by close or timeout (see
/// `CaptureSampling::weight_of_record`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSample {
    /// The record's sample shift, None when captured for the connection's trouble.
    pub shift: Option<u32>,
    /// The highest sample shift that still follows the stream (`u32::MAX` for trouble: no
    /// sample lets it go).
    pub depth: u32,
    /// The low 8 bits of the sample's epoch (see `agent_common::capture_sample`).
    pub epoch: u8,
}

impl StreamSample {
    /// Not sampled: captured for the connection's trouble, or with no budget; counts once.
    pub const UNSAMPLED: StreamSample = StreamSample {
        shift: None,
        depth: u32::MAX,
        epoch: 0,
    };

    /// A record's sample: `shift` (None: captured for its connection's trouble), the
    /// connection's depth in `epoch`.
    pub fn of_record(shift: Option<u32>, depth: u32, epoch: u8) -> StreamSample {
        match shift {
            Some(_) => StreamSample {
                shift,
                depth,
                epoch,
            },
            None => StreamSample::UNSAMPLED,
        }
    }
}

struct ConnectionState {
    endpoint: Endpoint,
    /// The connection's [`crate::model::flow_id`], once the tracker knows it.
    flow: Option<u64>,
    decoder: ConnectionDecoder,
    /// When the socket reached CLOSE, if it has: the stream stays open a moment longer.
    closed_ns: Option<u64>,
    /// The sample of its last record.
    sample: StreamSample,
    /// The process (tgid) and thread name of its last record.
    pid: u32,
    comm: [u8; COMM_LEN],
    /// TCP sequence number the next record of each direction (client to server, then server
    /// to client) starts at, when known: a record starting elsewhere follows a lost one.
    next_seq: [Option<u32>; 2],
    /// When its service stopped being captured (a reload), until a record written after that
    /// arrives: its waiting requests are answered unseen, so they do not time out.
    paused_ns: Option<u64>,
    /// When a reload captured its service again after a pause: requests sent since then are
    /// not among those a resumed record cuts.
    followed_again_ns: Option<u64>,
    /// Met mid-stream by a sample (its connection newly followed): answers before its first
    /// request went to requests nobody followed, and are not decoded (not an error either).
    awaiting_request: bool,
}

/// How long a closed socket's stream keeps taking payload records. A send that straddles the
/// close (a large reply still being copied when the peer's reset arrives) returns, and so is
/// recorded, after the state change: its bytes are the stream's last, not a new stream's first.
pub const CLOSE_GRACE_NS: u64 = 300_000_000;

pub struct Decoders {
    connections: HashMap<u64, ConnectionState>,
    max_connections: usize,
    scratch: Vec<Decoded>,
    /// Streams of closed sockets in close order, finished once [`CLOSE_GRACE_NS`] has passed.
    closing: VecDeque<(u64, u64)>,
    /// Connections not decoded because the table was full.
    pub dropped: u64,
}

impl Decoders {
    pub fn new(max_connections: usize) -> Self {
        Decoders {
            connections: HashMap::new(),
            max_connections,
            scratch: Vec::with_capacity(64),
            closing: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// `flow`: the connection's [`crate::model::flow_id`] when known (requests then carry
    /// their [`crate::model::request_id`]). `time_sampled`: the stream's service is followed
    /// one second in several (`CaptureSampling`), so a stream met by a sampled record is met
    /// mid-stream even at shift 0.
    pub fn on_payload(
        &mut self,
        payload: &PayloadView<'_>,
        endpoint: Endpoint,
        flow: Option<u64>,
        queue_mode: bool,
        time_sampled: bool,
        out: &mut Vec<MemcacheEvent>,
    ) {
        out.push(MemcacheEvent::Bytes {
            endpoint,
            sent: payload.is_send,
            bytes: payload.span_end - payload.span_start,
        });
        // Per payload: the usual case (a known stream) costs this one lookup and the next.
        let known = self
            .connections
            .get(&payload.sk)
            .is_some_and(|state| state.endpoint == endpoint);
        if !known {
            if !self.open_stream(payload.sk, endpoint, queue_mode, out) {
                return;
            }
            if payload
                .sample_shift
                .is_some_and(|shift| shift > 0 || time_sampled)
            {
                if let Some(state) = self.connections.get_mut(&payload.sk) {
                    state.awaiting_request = true;
                }
            }
        }
        let Some(state) = self.connections.get_mut(&payload.sk) else {
            return;
        };
        if state.paused_ns.is_some_and(|paused| payload.ts_ns > paused) {
            // Captured again (a record from before the pause is still the old stretch).
            state.paused_ns = None;
        }
        if known && payload.resumed {
            // Calls went by that the kernel did not follow (capture off, or outside the
            // sample): not a loss but a new start, like a connection met mid-stream. Only the
            // exchange cut by the switch, if any, is counted.
            state
                .decoder
                .resume(state.followed_again_ns.take(), &mut self.scratch);
            state.next_seq = [None; 2];
            // Under the sample they were captured under.
            drain(&mut self.scratch, state, out);
        }
        state.flow = state.flow.or(flow);
        state.pid = payload.pid;
        state.comm = *payload.comm;
        state.sample = StreamSample::of_record(
            payload.sample_shift,
            payload.sample_depth,
            payload.sample_epoch,
        );
        // A client sends requests; a server receives them.
        let direction = match (endpoint.role, payload.is_send) {
            (Role::Client, true) | (Role::Server, false) => Direction::ClientToServer,
            _ => Direction::ServerToClient,
        };
        if state.awaiting_request {
            if direction == Direction::ServerToClient {
                return;
            }
            state.awaiting_request = false;
        }
        // A record lost to a full ring (or never written) leaves a hole in the stream: the next
        // record of the direction starts past where the last one ended. Decoding on as if it
        // followed would read the tail of a lost value as framing (a lost `VALUE` line leaves
        // `END`: a hit read as a miss, 8,185 of them in a soak that lost payload records), so
        // the decoder is told of the gap and resynchronises.
        if !payload.resumed
            && direction == Direction::ServerToClient
            && state
                .followed_again_ns
                .is_some_and(|again| payload.ts_ns > again)
        {
            // Answers followed without a skip since capture came back: none went by unseen.
            state.followed_again_ns = None;
        }
        let lane = usize::from(direction == Direction::ServerToClient);
        let first_seq = payload
            .seq
            .map(|seq| seq.wrapping_add(payload.span_start as u32));
        if let (Some(expected), Some(first)) = (state.next_seq[lane], first_seq) {
            if expected != first && !consumed_the_peers_fin(payload, expected, first) {
                state.decoder.note_gap(direction, &mut self.scratch);
            }
        }
        state.next_seq[lane] = payload
            .seq
            .map(|seq| seq.wrapping_add(payload.span_end as u32));
        let mut offset = payload.span_start;
        for (captured, total_len) in payload.chunks() {
            state.decoder.feed(
                Chunk {
                    direction,
                    ts_ns: payload.ts_ns,
                    captured,
                    total_len,
                    seq: payload.seq.map(|seq| seq.wrapping_add(offset as u32)),
                },
                &mut self.scratch,
            );
            offset += total_len as u64;
        }
        if payload.incomplete {
            // The kernel stopped following frames: what comes next starts afresh. The
            // requests in the bytes it did not follow are counted as unread.
            let unread = (payload.span_end - offset) as usize;
            if direction == Direction::ClientToServer && unread > 0 {
                state.decoder.lose_request_tail(
                    payload.ts_ns,
                    payload.seq.map(|seq| seq.wrapping_add(offset as u32)),
                    unread,
                    &mut self.scratch,
                );
            } else {
                state.decoder.note_gap(direction, &mut self.scratch);
            }
        }
        drain(&mut self.scratch, state, out);
    }

    /// Starts decoding a stream on `sk`, ending any other stream that had the address; false
    /// when the table is full.
    fn open_stream(
        &mut self,
        sk: u64,
        endpoint: Endpoint,
        queue_mode: bool,
        out: &mut Vec<MemcacheEvent>,
    ) -> bool {
        if self.connections.contains_key(&sk) {
            // The address now belongs to another connection: never mix two byte streams.
            self.on_close(sk, out);
        }
        if self.connections.len() >= self.max_connections {
            self.dropped += 1;
            return false;
        }
        self.connections.insert(
            sk,
            ConnectionState {
                endpoint,
                decoder: ConnectionDecoder::new(DecoderConfig {
                    queue_mode,
                    ..DecoderConfig::default()
                }),
                flow: None,
                closed_ns: None,
                sample: StreamSample::UNSAMPLED,
                pid: 0,
                comm: [0; COMM_LEN],
                next_seq: [None; 2],
                paused_ns: None,
                followed_again_ns: None,
                awaiting_request: false,
            },
        );
        true
    }

    /// The socket reached CLOSE at `ts_ns`: its stream finishes in [`Decoders::finish_closed`]
    /// once the grace has passed, so payloads recorded just after the close still count.
    pub fn close_after_grace(&mut self, sk: u64, ts_ns: u64) {
        if let Some(state) = self.connections.get_mut(&sk) {
            if state.closed_ns.is_none() {
                state.closed_ns = Some(ts_ns);
                self.closing.push_back((sk, ts_ns));
            }
        }
    }

    /// Finishes the streams of sockets that closed at or before `before_ns`, in close order.
    pub fn finish_closed(&mut self, before_ns: u64, out: &mut Vec<MemcacheEvent>) {
        while let Some(&(sk, closed_ns)) = self.closing.front() {
            if closed_ns > before_ns {
                break;
            }
            self.closing.pop_front();
            // A stream that started since at the same address has no close time (or another).
            if self.connections.get(&sk).and_then(|s| s.closed_ns) == Some(closed_ns) {
                self.on_close(sk, out);
            }
        }
        if self.closing.is_empty() && self.closing.capacity() > 1024 {
            self.closing.shrink_to(64);
        }
    }

    /// The connection closed: outstanding requests finish (unanswered) and the decoder goes.
    /// On a paused stream their answers went by unseen: they finish as the exchange a switch
    /// cut ([`ConnectionDecoder::resume`]).
    pub fn on_close(&mut self, sk: u64, out: &mut Vec<MemcacheEvent>) {
        if let Some(mut state) = self.connections.remove(&sk) {
            if state.paused_ns.is_some() {
                state.decoder.resume(None, &mut self.scratch);
            }
            state.decoder.finish(&mut self.scratch);
            drain(&mut self.scratch, &state, out);
        }
    }

    /// Drops the decoders of streams their service's sample shift no longer follows, without finishing
    /// them: their requests were answered, just not seen (counting them unanswered would invent
    /// timeouts).
    pub fn forget_unfollowed(&mut self, shift_of_service: impl Fn(usize) -> u32) {
        self.connections
            .retain(|_, state| state.sample.depth >= shift_of_service(state.endpoint.service));
    }

    /// Whether a sampled stream of a service `in_slot` waits for an answer: turning the
    /// sample now would cut it (and a server that stopped answering would go unreported).
    pub fn sampled_waiting(&self, in_slot: impl Fn(usize) -> bool) -> bool {
        self.connections.values().any(|state| {
            state.sample.shift.is_some()
                && in_slot(state.endpoint.service)
                && state.decoder.is_waiting()
        })
    }

    /// Drops the sampled streams of services `in_slot` without finishing them: their sample
    /// turned to other connections ([`crate::ingest::capture_budget::CaptureSampling::rotate`]),
    /// nothing of theirs waits, and their next records, if the sample meets them again, start
    /// a stream afresh.
    pub fn forget_sampled(&mut self, in_slot: impl Fn(usize) -> bool) {
        self.connections
            .retain(|_, state| state.sample.shift.is_none() || !in_slot(state.endpoint.service));
    }

    /// Finishes and drops decoders of sockets that are no longer known (closed a while ago).
    pub fn retain_known(&mut self, known: impl Fn(u64) -> bool, out: &mut Vec<MemcacheEvent>) {
        let gone: Vec<u64> = self
            .connections
            .keys()
            .copied()
            .filter(|sk| !known(*sk))
            .collect();
        for sk in gone {
            self.on_close(sk, out);
        }
    }

    /// Streams of services no longer captured (`captured` says per service id) pause from
    /// `now_ns`: capture was switched off by a reload, so the answers to their waiting requests
    /// go by unseen. They do not time out; when capture comes back the kernel marks the stream
    /// resumed and its waiting requests finish as the one exchange the switch cut
    /// ([`ConnectionDecoder::resume`]), as they do if it closes first.
    /// A paused stream whose service is captured again remembers when (`now_ns`): requests
    /// it sends from then on are answered where capture follows them.
    pub fn pause_uncaptured(&mut self, captured: impl Fn(usize) -> bool, now_ns: u64) {
        for state in self.connections.values_mut() {
            if !captured(state.endpoint.service) {
                if state.paused_ns.is_none() {
                    state.paused_ns = Some(now_ns);
                }
                state.followed_again_ns = None;
            } else if state.paused_ns.is_some() {
                state.followed_again_ns = Some(now_ns);
            }
        }
    }

    /// After a reload: each stream takes the endpoint `rebound` gives its connection (see
    /// [`crate::conn::tracking::Tracker::rebind`]). A stream left on its old endpoint is cut
    /// and reopened by its next record, its requests in flight lost: `rebound` keeps the old
    /// one only where the decoding itself must change (the port's protocol did).
    pub fn rebind(&mut self, rebound: impl Fn(Endpoint) -> Endpoint) {
        for state in self.connections.values_mut() {
            state.endpoint = rebound(state.endpoint);
        }
    }

    /// Requests without an answer for `timeout_ns` finish as timeouts (not on paused streams).
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<MemcacheEvent>) {
        for state in self.connections.values_mut() {
            if state.paused_ns.is_some() {
                continue;
            }
            state.decoder.expire(now_ns, timeout_ns, &mut self.scratch);
            drain(&mut self.scratch, state, out);
        }
    }
}

/// Whether a receive record that starts one byte past where its direction's last record ended
/// is the read that also took the peer's FIN. The kernel's `copied_seq` counts the FIN as a
/// byte once a read consumes it, so such a read (the last request and the close arriving
/// together, as from a client that sends and closes at once) is recorded one byte late while
/// nothing is missing. It comes on the trouble path (the peer has closed: no sample), and no
/// byte can follow the FIN, so a real hole looks different. (A 2-minute soak counted 115 `gap`
/// errors with nothing lost: all 115 were such reads, by memcached of a client's last request.)
fn consumed_the_peers_fin(payload: &PayloadView<'_>, expected: u32, first: u32) -> bool {
    !payload.is_send && payload.sample_shift.is_none() && first == expected.wrapping_add(1)
}

fn drain(scratch: &mut Vec<Decoded>, state: &ConnectionState, out: &mut Vec<MemcacheEvent>) {
    let endpoint = state.endpoint;
    out.extend(scratch.drain(..).map(|observation| match observation {
        Decoded::Request(mut request) => {
            request.request_id = state
                .flow
                .zip(request.seq)
                .map(|(flow, seq)| crate::model::request_id(flow, seq));
            MemcacheEvent::Request {
                endpoint,
                request,
                sample: state.sample,
                pid: state.pid,
                comm: state.comm,
            }
        }
        Decoded::DecodeError(error) => MemcacheEvent::DecodeError {
            service: endpoint.service,
            reason: error.reason,
        },
    }));
}

/// Whether a server's send starts with the binary answer to a Quit, after which memcached
/// closes the connection (a text quit gets no answer).
pub fn is_quit_answer(data: &[u8]) -> bool {
    matches!(data, [magic, opcode, ..]
        if *magic == super::binary::RESPONSE_MAGIC
            && Command::from_opcode(*opcode) == Command::BinQuit)
}

/// The command word of a text request, or a binary request's command by its opcode (`binary`
/// when the opcode byte was not captured), named as the request metrics name them; None when
/// the bytes do not start with a known command.
pub fn sniff_command(data: &[u8]) -> Option<&'static str> {
    if data.first() == Some(&0x80) {
        return Some(
            data.get(1)
                .map_or("binary", |&opcode| Command::from_opcode(opcode).as_str()),
        );
    }
    let end = data
        .iter()
        .position(|b| *b == b' ' || *b == b'\r' || *b == b'\n')
        .unwrap_or(data.len());
    let word = &data[..end];
    Command::ALL
        .iter()
        .map(|command| command.as_str())
        .find(|name| name.as_bytes() == word)
}

/// Whether the request these bytes start asks for no answer: a text line ending in
/// `noreply`, a binary quiet opcode, or a meta command with the `q` flag. (Read from a
/// call's leading bytes: a text line longer than they are reads as one that asks.)
pub fn asks_no_reply(data: &[u8]) -> bool {
    if data.first() == Some(&0x80) {
        return data
            .get(1)
            .is_some_and(|&opcode| super::binary::is_quiet(opcode));
    }
    let line = data
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .map_or(data, |end| &data[..end]);
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    match words.next() {
        Some(b"ms" | b"md" | b"ma" | b"mg" | b"me") => words.any(|flag| flag == b"q"),
        Some(_) => line.split(|&b| b == b' ').next_back() == Some(b"noreply".as_slice()),
        None => false,
    }
}

#[cfg(test)]
mod tests;
