//! From captured payloads to memcache observations: one decoder per watched connection, fed in
//! order, with the direction taken from the connection's role. Bounded in connections; a
//! connection's decoder goes when the connection closes.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use agent_common::{
    capture_sample,
    framing::{self, FrameState},
    payload_flags, CAPTURE_PIECE, COMM_LEN, RECORD_DATA_MAX, SEGMENT_HEADER_LEN,
};

use crate::{
    conn::tracking::Endpoint,
    kernel::events::Role,
    memcache::{
        Chunk, Command, ConnectionDecoder, DecodeErrorReason, Decoded, DecoderConfig, Direction,
        RequestObservation,
    },
};

/// A payload record borrowed from the ring buffer: no copy of the data. It covers
/// `[span_start, span_end)` of one send or receive; its segments hold the frame headers the
/// kernel copied, and the bytes between them are value bodies it skipped.
#[derive(Debug, Clone, Copy)]
pub struct PayloadView<'a> {
    pub ts_ns: u64,
    pub sk: u64,
    pub total_len: u64,
    pub span_start: u64,
    pub span_end: u64,
    pub pid: u32,
    pub is_send: bool,
    /// The kernel stopped following frames before the end of the call.
    pub incomplete: bool,
    /// TCP sequence number of the call's first byte, when the kernel could read it: a byte at
    /// call offset `o` has sequence number `seq + o` at both ends of the connection.
    pub seq: Option<u32>,
    /// The sample shift the kernel captured this call under as a sample of healthy
    /// connections (the call stands for 2^shift), or None: captured for the connection's
    /// trouble, it stands for itself.
    pub sample_shift: Option<u32>,
    /// The highest shift at which the connection stays followed ([`capture_sample::depth`]).
    pub sample_depth: u32,
    pub comm: &'a [u8; COMM_LEN],
    /// The segment area, validated by [`parse_payload`].
    segments: &'a [u8],
}

/// One run of captured bytes and where it lies in its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
}

impl<'a> PayloadView<'a> {
    /// The captured segments, in call order.
    pub fn segments(&self) -> impl Iterator<Item = Segment<'a>> + 'a {
        let area = self.segments;
        let mut at = 0usize;
        std::iter::from_fn(move || {
            let (offset, len, next) = segment_at(area, at)?;
            let bytes = &area[at + SEGMENT_HEADER_LEN..at + SEGMENT_HEADER_LEN + len];
            at = next;
            Some(Segment {
                offset: offset as u64,
                bytes,
            })
        })
    }

    /// The bytes at the start of this record's span when they were captured (the start of a
    /// request on a send), else nothing.
    pub fn leading_bytes(&self) -> &'a [u8] {
        match self.segments().next() {
            Some(segment) if segment.offset == self.span_start => segment.bytes,
            _ => &[],
        }
    }

    /// The decoder's view: one chunk per segment, each followed by the skipped bytes up to the
    /// next, after a leading chunk of skipped bytes when the span starts inside a body.
    pub fn chunks(&self) -> impl Iterator<Item = (&'a [u8], usize)> + 'a {
        let span_end = self.span_end;
        let incomplete = self.incomplete;
        let mut cursor = self.span_start;
        let mut segments = self.segments().peekable();
        std::iter::from_fn(move || {
            if cursor >= span_end {
                return None;
            }
            match segments.peek().copied() {
                Some(segment) if segment.offset > cursor => {
                    let gap = (segment.offset - cursor) as usize;
                    cursor = segment.offset;
                    Some((&[][..], gap))
                }
                Some(segment) => {
                    segments.next();
                    // After an incomplete capture's last segment nothing was followed: those
                    // bytes are not a skipped body, and the caller reports the gap.
                    let last_end = if incomplete {
                        segment.offset + segment.bytes.len() as u64
                    } else {
                        span_end
                    };
                    let end = segments.peek().map_or(last_end, |next| next.offset);
                    let total = (end - segment.offset) as usize;
                    cursor = end;
                    Some((segment.bytes, total))
                }
                None if incomplete => None,
                None => {
                    let gap = (span_end - cursor) as usize;
                    cursor = span_end;
                    Some((&[][..], gap))
                }
            }
        })
    }
}

/// The segment whose header is at `at`: (call offset, length, where the next header is).
fn segment_at(area: &[u8], at: usize) -> Option<(u32, usize, usize)> {
    let header = area.get(at..at + SEGMENT_HEADER_LEN)?;
    let offset = u32::from_ne_bytes(header[0..4].try_into().ok()?);
    let len = u32::from_ne_bytes(header[4..8].try_into().ok()?) as usize;
    let end = at + SEGMENT_HEADER_LEN + len;
    if end > area.len() {
        return None;
    }
    Some((offset, len, (end + 7) & !7))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload record of {0} bytes, shorter than its header or its data")]
    Size(usize),
    #[error("payload record claims {0} data bytes")]
    DataLen(u16),
    #[error("payload record's span {0}..{1} does not fit a call of {2} bytes")]
    Span(u64, u64, u64),
    #[error("payload record's segments overlap, leave their span or overrun the data")]
    Segments,
}

const HEADER: usize = agent_common::PAYLOAD_HEADER_LEN;

/// The timestamp of a payload record, for ordering it among socket events.
pub fn payload_ts(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?))
}

/// Parses a ring-buffer payload record without copying its data. Every segment is checked
/// once here, so iterating them later cannot fail.
pub fn parse_payload(bytes: &[u8]) -> Result<PayloadView<'_>, PayloadError> {
    if bytes.len() < HEADER {
        return Err(PayloadError::Size(bytes.len()));
    }
    let u64_at =
        |offset: usize| u64::from_ne_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let u32_at =
        |offset: usize| u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    let data_len = u16::from_ne_bytes([bytes[36], bytes[37]]);
    if data_len as usize > RECORD_DATA_MAX {
        return Err(PayloadError::DataLen(data_len));
    }
    if bytes.len() < HEADER + data_len as usize {
        return Err(PayloadError::Size(bytes.len()));
    }
    let total_len = u64_at(16);
    let span_start = u32_at(24) as u64;
    let span_end = u32_at(28) as u64;
    if span_start > span_end || span_end > total_len {
        return Err(PayloadError::Span(span_start, span_end, total_len));
    }
    let segments = &bytes[HEADER..HEADER + data_len as usize];
    let mut at = 0usize;
    let mut cursor = span_start;
    while at < segments.len() {
        let (offset, len, next) = segment_at(segments, at).ok_or(PayloadError::Segments)?;
        let offset = offset as u64;
        if offset < cursor || offset + len as u64 > span_end {
            return Err(PayloadError::Segments);
        }
        cursor = offset + len as u64;
        at = next;
    }
    Ok(PayloadView {
        ts_ns: u64_at(0),
        sk: u64_at(8),
        total_len,
        span_start,
        span_end,
        pid: u32_at(32),
        is_send: bytes[38] != 0,
        incomplete: bytes[40] & payload_flags::INCOMPLETE != 0,
        seq: (bytes[40] & payload_flags::SEQ != 0).then(|| u32_at(44)),
        sample_shift: (bytes[41] != capture_sample::NOT_SAMPLED).then_some(u32::from(bytes[41])),
        sample_depth: u32::from(bytes[42]),
        comm: bytes[48..HEADER].try_into().expect("16 bytes"),
        segments,
    })
}

/// Builds one ring-buffer payload record as the kernel writes it, for tests and benches: its
/// span is the whole call of `total_len` bytes and `data` its one captured segment at offset 0
/// (cut at the record's capacity). Bytes of the call past `data` count as skipped.
pub fn encode_payload_record(
    ts_ns: u64,
    sk: u64,
    total_len: u64,
    is_send: bool,
    comm: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let data = &data[..data.len().min(RECORD_DATA_MAX - SEGMENT_HEADER_LEN)];
    let segments: &[(u64, &[u8])] = if data.is_empty() { &[] } else { &[(0, data)] };
    encode_record(
        RecordHeader {
            ts_ns,
            sk,
            total_len,
            span: (0, total_len),
            is_send,
            incomplete: false,
            comm,
        },
        segments,
    )
}

/// The header fields of a record built on the host.
struct RecordHeader<'a> {
    ts_ns: u64,
    sk: u64,
    total_len: u64,
    span: (u64, u64),
    is_send: bool,
    incomplete: bool,
    comm: &'a [u8],
}

fn encode_record(header: RecordHeader<'_>, segments: &[(u64, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (offset, bytes) in segments {
        data.resize((data.len() + 7) & !7, 0);
        data.extend_from_slice(&(*offset as u32).to_ne_bytes());
        data.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        data.extend_from_slice(bytes);
    }
    let mut record = vec![0u8; HEADER];
    let comm = &header.comm[..header.comm.len().min(COMM_LEN)];
    record[0..8].copy_from_slice(&header.ts_ns.to_ne_bytes());
    record[8..16].copy_from_slice(&header.sk.to_ne_bytes());
    record[16..24].copy_from_slice(&header.total_len.to_ne_bytes());
    record[24..28].copy_from_slice(&(header.span.0 as u32).to_ne_bytes());
    record[28..32].copy_from_slice(&(header.span.1 as u32).to_ne_bytes());
    record[32..36].copy_from_slice(&7u32.to_ne_bytes());
    record[36..38].copy_from_slice(&(data.len() as u16).to_ne_bytes());
    record[38] = header.is_send as u8;
    record[40] = if header.incomplete {
        payload_flags::INCOMPLETE
    } else {
        0
    };
    record[48..48 + comm.len()].copy_from_slice(comm);
    record.extend_from_slice(&data);
    record
}

/// Marks a record built by [`encode_payload_record`] as the kernel marks a call it captured as
/// a sample at `shift` of a connection of `depth`, or (None) for the connection's trouble.
pub fn mark_sample(record: &mut [u8], sample: Option<(u8, u8)>) {
    let (shift, depth) = sample.unwrap_or((capture_sample::NOT_SAMPLED, 0));
    record[41] = shift;
    record[42] = depth;
}

/// What the kernel's capture sends for one call of `call` bytes on a direction whose frames
/// stand at `state`: the same walk as agent-ebpf's `capture_step` (pieces of
/// [`CAPTURE_PIECE`] bytes, segments coalesced, records split at [`RECORD_DATA_MAX`], the
/// per-call `budget`), for tests and benches that need the kernel's exact output without a
/// kernel. Iovec boundaries are left out: they change where pieces are cut, not which bytes are
/// captured.
pub fn kernel_capture(
    ts_ns: u64,
    sk: u64,
    is_send: bool,
    call: &[u8],
    state: &mut FrameState,
    budget: u64,
) -> Vec<Vec<u8>> {
    let total = call.len() as u64;
    let mut records = Vec::new();
    let mut segments: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut data_len = 0u64;
    let mut span_start = 0u64;
    let mut pos = 0u64;
    let mut budget = budget;
    state.start_call();
    let header = |span: (u64, u64), incomplete: bool| RecordHeader {
        ts_ns,
        sk,
        total_len: total,
        span,
        is_send,
        incomplete,
        comm: b"python3",
    };
    let flush = |segments: &mut Vec<(u64, Vec<u8>)>, span: (u64, u64), incomplete: bool| {
        let borrowed: Vec<(u64, &[u8])> = segments.iter().map(|(o, b)| (*o, &b[..])).collect();
        let record = encode_record(header(span, incomplete), &borrowed);
        segments.clear();
        record
    };
    for _ in 0..agent_common::CAPTURE_MAX_STEPS {
        if pos >= total || state.mode == framing::mode::LOST {
            break;
        }
        if !state.captures() {
            pos += state.pass(total - pos);
            continue;
        }
        if budget == 0 {
            state.mode = framing::mode::LOST;
            break;
        }
        if data_len + (SEGMENT_HEADER_LEN + CAPTURE_PIECE) as u64 > RECORD_DATA_MAX as u64 {
            records.push(flush(&mut segments, (span_start, pos), false));
            data_len = 0;
            span_start = pos;
            continue;
        }
        let mut piece = (total - pos).min(CAPTURE_PIECE as u64).min(budget);
        if state.mode == framing::mode::SKIP {
            // A body's head: only its own bytes.
            piece = piece.min(state.head as u64);
        }
        let bytes = &call[pos as usize..(pos + piece) as usize];
        match segments.last_mut() {
            Some((offset, run)) if *offset + run.len() as u64 == pos => {
                run.extend_from_slice(bytes)
            }
            _ => {
                data_len = ((data_len + 7) & !7) + SEGMENT_HEADER_LEN as u64;
                segments.push((pos, bytes.to_vec()));
            }
        }
        let mut i = 0u64;
        while i < piece {
            match state.mode {
                framing::mode::SKIP | framing::mode::KEEP => i += state.pass(piece - i),
                framing::mode::LOST => break,
                _ => {
                    state.step(bytes[i as usize]);
                    i += 1;
                }
            }
        }
        data_len += piece;
        budget -= piece;
        pos += piece;
    }
    let incomplete = pos < total;
    if incomplete {
        state.mode = framing::mode::LOST;
    }
    records.push(flush(&mut segments, (span_start, total), incomplete));
    records
}

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
}

impl StreamSample {
    /// Not sampled: captured for the connection's trouble, or with no budget; counts once.
    pub const UNSAMPLED: StreamSample = StreamSample {
        shift: None,
        depth: u32::MAX,
    };
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
    /// TCP sequence number the next record of each direction (client to server, then server
    /// to client) starts at, when known: a record starting elsewhere follows a lost one.
    next_seq: [Option<u32>; 2],
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
    /// their [`crate::model::request_id`]).
    pub fn on_payload(
        &mut self,
        payload: &PayloadView<'_>,
        endpoint: Endpoint,
        flow: Option<u64>,
        queue_mode: bool,
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
        if !known && !self.open_stream(payload.sk, endpoint, queue_mode, out) {
            return;
        }
        let Some(state) = self.connections.get_mut(&payload.sk) else {
            return;
        };
        state.flow = state.flow.or(flow);
        state.sample = match payload.sample_shift {
            Some(shift) => StreamSample {
                shift: Some(shift),
                depth: payload.sample_depth,
            },
            None => StreamSample::UNSAMPLED,
        };
        // A client sends requests; a server receives them.
        let direction = match (endpoint.role, payload.is_send) {
            (Role::Client, true) | (Role::Server, false) => Direction::ClientToServer,
            _ => Direction::ServerToClient,
        };
        // A record lost to a full ring (or never written) leaves a hole in the stream: the next
        // record of the direction starts past where the last one ended. Decoding on as if it
        // followed would read the tail of a lost value as framing (a lost `VALUE` line leaves
        // `END`: a hit read as a miss, 8,185 of them in a soak that lost payload records), so
        // the decoder is told of the gap and resynchronises.
        let lane = usize::from(direction == Direction::ServerToClient);
        let first_seq = payload
            .seq
            .map(|seq| seq.wrapping_add(payload.span_start as u32));
        if let (Some(expected), Some(first)) = (state.next_seq[lane], first_seq) {
            if expected != first {
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
            // The kernel stopped following frames: what comes next starts afresh.
            state.decoder.note_gap(direction, &mut self.scratch);
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
                next_seq: [None; 2],
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
    pub fn on_close(&mut self, sk: u64, out: &mut Vec<MemcacheEvent>) {
        if let Some(mut state) = self.connections.remove(&sk) {
            state.decoder.finish(&mut self.scratch);
            drain(&mut self.scratch, &state, out);
        }
    }

    /// Drops the decoders of streams a sample at `shift` no longer follows, without finishing
    /// them: their requests were answered, just not seen (counting them unanswered would invent
    /// timeouts).
    pub fn forget_unfollowed(&mut self, shift: u32) {
        self.connections
            .retain(|_, state| state.sample.depth >= shift);
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

    /// Requests without an answer for `timeout_ns` finish as timeouts.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<MemcacheEvent>) {
        for state in self.connections.values_mut() {
            state.decoder.expire(now_ns, timeout_ns, &mut self.scratch);
            drain(&mut self.scratch, state, out);
        }
    }
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
            }
        }
        Decoded::DecodeError(error) => MemcacheEvent::DecodeError {
            service: endpoint.service,
            reason: error.reason,
        },
    }));
}

/// The command word of a text request, or `binary` for the binary protocol; None when the bytes
/// do not start with a known command.
pub fn sniff_command(data: &[u8]) -> Option<&'static str> {
    if data.first() == Some(&0x80) {
        return Some("binary");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memcache::Status;
    use agent_common::PayloadHeader;

    fn endpoint(role: Role) -> Endpoint {
        Endpoint {
            service: 0,
            server: "127.0.0.1:11211".parse().unwrap(),
            role,
        }
    }

    fn record(ts: u64, sk: u64, is_send: bool, data: &[u8], total: u64) -> Vec<u8> {
        encode_payload_record(ts, sk, total, is_send, b"python3", data)
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::offset_of!(PayloadHeader, span_start), 24);
        assert_eq!(std::mem::offset_of!(PayloadHeader, span_end), 28);
        assert_eq!(std::mem::offset_of!(PayloadHeader, pid), 32);
        assert_eq!(std::mem::offset_of!(PayloadHeader, data_len), 36);
        assert_eq!(std::mem::offset_of!(PayloadHeader, is_send), 38);
        assert_eq!(std::mem::offset_of!(PayloadHeader, flags), 40);
        assert_eq!(std::mem::offset_of!(PayloadHeader, seq), 44);
        assert_eq!(std::mem::offset_of!(PayloadHeader, comm), 48);
        let mut bytes = record(1, 2, true, b"get k\r\n", 7);
        assert_eq!(parse_payload(&bytes).unwrap().seq, None);
        bytes[40] |= payload_flags::SEQ;
        bytes[44..48].copy_from_slice(&0xfffffff0u32.to_ne_bytes());
        assert_eq!(parse_payload(&bytes).unwrap().seq, Some(0xfffffff0));
    }

    /// Requests carry the id of their connection's flow and first byte's sequence number; a
    /// stream whose flow is not known yet takes it from a later payload.
    #[test]
    fn requests_carry_the_request_id_of_their_flow_and_sequence_number() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let flow = crate::model::flow_id(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:11211".parse().unwrap(),
        );
        let with_seq = |mut bytes: Vec<u8>, seq: u32| {
            bytes[40] |= payload_flags::SEQ;
            bytes[44..48].copy_from_slice(&seq.to_ne_bytes());
            bytes
        };
        let calls = [
            (
                None,
                with_seq(record(1_000, 5, true, b"get a\r\nget b\r\n", 14), 100),
            ),
            (
                flow,
                with_seq(record(2_000, 5, false, b"END\r\nEND\r\n", 10), 900),
            ),
            (flow, record(3_000, 5, true, b"get c\r\n", 7)),
            (flow, record(4_000, 5, false, b"END\r\n", 5)),
        ];
        for (flow, bytes) in &calls {
            let view = parse_payload(bytes).unwrap();
            decoders.on_payload(&view, endpoint(Role::Client), *flow, false, &mut out);
        }
        let ids: Vec<Option<u64>> = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request { request, .. } => Some(request.request_id),
                _ => None,
            })
            .collect();
        let flow = flow.unwrap();
        assert_eq!(
            ids,
            vec![
                Some(crate::model::request_id(flow, 100)),
                Some(crate::model::request_id(flow, 107)),
                // Unnumbered, but the decoder counts on from the last number (no gap).
                Some(crate::model::request_id(flow, 114)),
            ]
        );
    }

    /// A client reads a hit in two parts and the record of the first is lost: the second starts
    /// mid-value, past where the last record of that direction ended. Its `END` is not taken
    /// for a miss: the gap is reported and the request finishes as unknown. The exchanges
    /// before and after decode as usual. (A lost record that would have been its direction's
    /// first in the stream leaves nothing to compare with: not detected.)
    #[test]
    fn a_record_lost_mid_response_is_a_gap_not_a_miss() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let with_seq = |mut bytes: Vec<u8>, seq: u32| {
            bytes[40] |= payload_flags::SEQ;
            bytes[44..48].copy_from_slice(&seq.to_ne_bytes());
            bytes
        };
        let value = [b'v'; 300];
        let mut head = b"VALUE k 0 300\r\n".to_vec();
        head.extend_from_slice(&value[..100]);
        let mut tail = value[100..].to_vec();
        tail.extend_from_slice(b"\r\nEND\r\n");
        let response_seq = 5_000u32;
        let records = [
            with_seq(record(500, 5, true, b"get k\r\n", 7), 93),
            with_seq(record(600, 5, false, b"END\r\n", 5), response_seq - 5),
            with_seq(record(1_000, 5, true, b"get k\r\n", 7), 100),
            // `head`, at `response_seq`, is lost.
            with_seq(
                record(3_000, 5, false, &tail, tail.len() as u64),
                response_seq + head.len() as u32,
            ),
            with_seq(record(4_000, 5, true, b"get k\r\n", 7), 107),
            with_seq(
                record(5_000, 5, false, b"END\r\n", 5),
                response_seq + (head.len() + tail.len()) as u32,
            ),
        ];
        for bytes in &records {
            let view = parse_payload(bytes).unwrap();
            decoders.on_payload(&view, endpoint(Role::Client), None, false, &mut out);
        }
        let statuses: Vec<Status> = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request { request, .. } => Some(request.status),
                _ => None,
            })
            .collect();
        assert_eq!(
            statuses,
            [Status::Miss, Status::Unknown, Status::Miss],
            "{out:?}"
        );
        assert!(out.iter().any(|e| matches!(
            e,
            MemcacheEvent::DecodeError {
                reason: DecodeErrorReason::Gap,
                ..
            }
        )));
    }

    #[test]
    fn client_get_hit_is_decoded_with_latency_and_bytes() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 5, true, b"get k\r\n", 7);
        let response = record(51_000, 5, false, b"VALUE k 0 1\r\nv\r\nEND\r\n", 21);
        for bytes in [&request, &response] {
            let view = parse_payload(bytes).unwrap();
            decoders.on_payload(&view, endpoint(Role::Client), None, false, &mut out);
        }
        let requests: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request { request, .. } => Some(request),
                _ => None,
            })
            .collect();
        assert_eq!(requests.len(), 1, "{out:?}");
        assert_eq!(requests[0].command.as_str(), "get");
        assert_eq!(requests[0].status, Status::Hit);
        assert_eq!(requests[0].latency_ns, Some(50_000));
        let sent: u64 = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Bytes {
                    sent: true, bytes, ..
                } => Some(*bytes),
                _ => None,
            })
            .sum();
        assert_eq!(sent, 7);
    }

    #[test]
    fn server_side_direction_is_flipped_and_close_finishes_requests() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 9, false, b"set k 0 0 1\r\nv\r\n", 16);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        decoders.on_close(9, &mut out);
        assert!(decoders.is_empty());
        assert!(out.iter().any(|e| matches!(e, MemcacheEvent::Request { request, .. } if request.command.as_str() == "set")), "{out:?}");
    }

    /// memcached still copying a large reply when the client's reset arrives: the send returns
    /// (and is recorded) after the close, and its VALUE line still answers the get.
    #[test]
    fn a_reply_recorded_just_after_the_close_still_answers() {
        let statuses = |out: &[MemcacheEvent]| -> Vec<Status> {
            out.iter()
                .filter_map(|e| match e {
                    MemcacheEvent::Request { request, .. } => Some(request.status),
                    _ => None,
                })
                .collect()
        };
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 9, false, b"get large\r\n", 11);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        decoders.close_after_grace(9, 2_000);
        decoders.finish_closed(1_999, &mut out);
        assert!(statuses(&out).is_empty(), "{out:?}");
        let reply = record(3_000, 9, true, b"VALUE large 0 500000\r\n", 200_000);
        decoders.on_payload(
            &parse_payload(&reply).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        decoders.finish_closed(2_000, &mut out);
        assert!(decoders.is_empty());
        assert_eq!(statuses(&out), vec![Status::Hit], "{out:?}");
        // Without a reply the request finishes unanswered once the grace is over, and a stale
        // close time never finishes a stream that has started since at the address.
        let mut out = Vec::new();
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        decoders.close_after_grace(9, 5_000);
        let reused = record(6_000, 9, true, b"get b\r\n", 7);
        decoders.on_payload(
            &parse_payload(&reused).unwrap(),
            endpoint(Role::Client),
            None,
            false,
            &mut out,
        );
        assert_eq!(statuses(&out), vec![Status::Unanswered], "{out:?}");
        decoders.finish_closed(u64::MAX, &mut out);
        assert_eq!(decoders.len(), 1, "the new stream stays");
    }

    #[test]
    fn a_reused_socket_address_starts_a_new_stream() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 9, true, b"get a\r\n", 7);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Client),
            None,
            false,
            &mut out,
        );
        // Same address, now a server-side socket receiving a request.
        let request = record(2_000, 9, false, b"get b\r\n", 7);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        let response = record(3_000, 9, true, b"END\r\n", 5);
        decoders.on_payload(
            &parse_payload(&response).unwrap(),
            endpoint(Role::Server),
            None,
            false,
            &mut out,
        );
        let served: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request {
                    endpoint, request, ..
                } => Some((endpoint.role, request.status)),
                _ => None,
            })
            .collect();
        assert_eq!(
            served,
            vec![
                (Role::Client, Status::Unanswered),
                (Role::Server, Status::Miss)
            ]
        );
    }

    #[test]
    fn malformed_records_are_rejected() {
        assert_eq!(parse_payload(&[0u8; 3]).unwrap_err(), PayloadError::Size(3));
        let mut bytes = record(1, 1, true, b"x", 1);
        bytes[36..38].copy_from_slice(&9999u16.to_ne_bytes());
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::DataLen(9999)
        );
        // A span past the call.
        let mut bytes = record(1, 1, true, b"abc", 3);
        bytes[28..32].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::Span(0, 4, 3)
        );
        // A segment longer than the span.
        let bytes = record(1, 1, true, b"abc", 2);
        assert_eq!(parse_payload(&bytes).unwrap_err(), PayloadError::Segments);
        // A segment overrunning the data.
        let mut bytes = record(1, 1, true, b"abcd", 4);
        bytes[HEADER + 4..HEADER + 8].copy_from_slice(&40u32.to_ne_bytes());
        assert_eq!(parse_payload(&bytes).unwrap_err(), PayloadError::Segments);
        // A record cut short of its data (the kernel never writes one).
        let mut bytes = record(1, 1, true, b"abcd", 4);
        bytes.truncate(HEADER + 2);
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::Size(HEADER + 2)
        );
        // A prefix capture: the rest of the call counts as skipped.
        let bytes = record(1, 1, true, b"xy", 10);
        let view = parse_payload(&bytes).unwrap();
        assert_eq!(view.chunks().collect::<Vec<_>>(), vec![(&b"xy"[..], 10)]);
    }

    /// Feeds `calls` (direction from the client's view: true = client sends) through the
    /// kernel's capture walk and the decoders, as both ends would see them; returns the
    /// (status, count) of every decoded request and the decode errors.
    fn decode_through_capture(
        role: Role,
        calls: &[(bool, Vec<u8>)],
        budget: u64,
    ) -> (std::collections::BTreeMap<(String, &'static str), u64>, u64) {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let mut send = FrameState::default();
        let mut recv = FrameState::default();
        for (i, (client_sends, call)) in calls.iter().enumerate() {
            let is_send = match role {
                Role::Client => *client_sends,
                Role::Server => !*client_sends,
            };
            let state = if is_send { &mut send } else { &mut recv };
            for record in kernel_capture(1_000 * (i as u64 + 1), 7, is_send, call, state, budget) {
                let view = parse_payload(&record).unwrap();
                decoders.on_payload(&view, endpoint(role), None, false, &mut out);
            }
        }
        decoders.on_close(7, &mut out);
        let mut counts = std::collections::BTreeMap::new();
        let mut errors = 0;
        for event in out {
            match event {
                MemcacheEvent::Request { request, .. } => {
                    *counts
                        .entry((
                            request.command.as_str().to_string(),
                            request.status.as_str(),
                        ))
                        .or_insert(0) += 1;
                }
                MemcacheEvent::DecodeError { .. } => errors += 1,
                MemcacheEvent::Bytes { .. } => {}
            }
        }
        (counts, errors)
    }

    /// Values with protocol-looking bytes, sizes from 0 to 300 KB.
    fn value(i: usize) -> Vec<u8> {
        let pattern = b"END\r\nVALUE x 0 5\r\n\x80\x81 get k\r\n";
        let len = [0, 1, 10, 100, 2000, 70_000, 300_000][i % 7];
        pattern.iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn multi_gets_pipelines_and_large_values_decode_exactly_through_capture() {
        let keys: Vec<String> = (0..100).map(|i| format!("key:{i}")).collect();
        // 100 sets pipelined in one write, then a 100-key get answered by memcached's reply
        // (40 hits: header, value and CRLF per item), then the reply read in 1500-byte pieces
        // as a client's recv would, then a get of misses.
        let mut sets = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let v = value(i);
            sets.extend_from_slice(format!("set {key} 0 0 {}\r\n", v.len()).as_bytes());
            sets.extend_from_slice(&v);
            sets.extend_from_slice(b"\r\n");
        }
        let stored = b"STORED\r\n".repeat(100);
        let get = format!("get {}\r\n", keys.join(" ")).into_bytes();
        let mut reply = Vec::new();
        for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 5 < 2) {
            let v = value(i);
            reply.extend_from_slice(format!("VALUE {key} 0 {}\r\n", v.len()).as_bytes());
            reply.extend_from_slice(&v);
            reply.extend_from_slice(b"\r\n");
        }
        reply.extend_from_slice(b"END\r\n");
        let mut calls = vec![(true, sets), (false, stored), (true, get.clone())];
        calls.extend(reply.chunks(1500).map(|piece| (false, piece.to_vec())));
        calls.push((true, b"get nope1 nope2\r\n".to_vec()));
        calls.push((false, b"END\r\n".to_vec()));
        for role in [Role::Client, Role::Server] {
            let (counts, errors) = decode_through_capture(role, &calls, 65536);
            assert_eq!(errors, 0, "{role:?}: {counts:?}");
            let count = |command: &str, status: Status| {
                counts
                    .get(&(command.to_string(), status.as_str()))
                    .copied()
                    .unwrap_or(0)
            };
            assert_eq!(count("set", Status::Stored), 100, "{role:?}: {counts:?}");
            assert_eq!(count("get", Status::Hit), 40, "{role:?}: {counts:?}");
            assert_eq!(count("get", Status::Miss), 62, "{role:?}: {counts:?}");
            assert_eq!(counts.values().sum::<u64>(), 202, "{role:?}: {counts:?}");
        }
    }

    /// The first bytes of every value reach the observation through the kernel's capture,
    /// wherever the calls split the stream: a body starting in a later call than its line, a
    /// head split over two reads, values shorter than the head, large values.
    #[test]
    fn value_heads_reach_observations_through_capture_whatever_the_split() {
        let values: Vec<Vec<u8>> = vec![
            b"job:0001-payload".to_vec(),
            b"ab".to_vec(),
            Vec::new(),
            b"big:"
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'x', 70_000))
                .collect(),
        ];
        let mut sets = Vec::new();
        let mut stored = Vec::new();
        let mut gets = Vec::new();
        let mut replies = Vec::new();
        for v in &values {
            sets.extend_from_slice(format!("set q 0 0 {}\r\n", v.len()).as_bytes());
            sets.extend_from_slice(v);
            sets.extend_from_slice(b"\r\n");
            stored.extend_from_slice(b"STORED\r\n");
            gets.extend_from_slice(b"get q\r\n");
            replies.extend_from_slice(format!("VALUE q 0 {}\r\n", v.len()).as_bytes());
            replies.extend_from_slice(v);
            replies.extend_from_slice(b"\r\nEND\r\n");
        }
        let expected: Vec<Vec<u8>> = values
            .iter()
            .map(|v| v[..v.len().min(8)].to_vec())
            .collect();
        for split in [1usize, 3, 7, 15, 16, 17, 18, 19, 20, 21, 64, 1500, 1 << 20] {
            for role in [Role::Client, Role::Server] {
                let mut decoders = Decoders::new(10);
                let mut out = Vec::new();
                let mut send = FrameState::default();
                let mut recv = FrameState::default();
                let mut ts = 0;
                for (client_sends, stream) in [
                    (true, &sets),
                    (false, &stored),
                    (true, &gets),
                    (false, &replies),
                ] {
                    let is_send = client_sends == (role == Role::Client);
                    let state = if is_send { &mut send } else { &mut recv };
                    for call in stream.chunks(split) {
                        ts += 1_000;
                        for record in kernel_capture(ts, 7, is_send, call, state, 65536) {
                            let view = parse_payload(&record).unwrap();
                            decoders.on_payload(&view, endpoint(role), None, true, &mut out);
                        }
                    }
                }
                decoders.on_close(7, &mut out);
                let heads = |command: &str| -> Vec<Vec<u8>> {
                    out.iter()
                        .filter_map(|e| match e {
                            MemcacheEvent::Request { request, .. }
                                if request.command.as_str() == command =>
                            {
                                Some(request.value_head?.as_bytes().to_vec())
                            }
                            _ => None,
                        })
                        .collect()
                };
                assert_eq!(heads("set"), expected, "{role:?} split {split}: {out:?}");
                assert_eq!(heads("get"), expected, "{role:?} split {split}: {out:?}");
            }
        }
    }

    #[test]
    fn binary_quiet_multi_get_decodes_exactly_through_capture() {
        fn frame(magic: u8, opcode: u8, key: &[u8], extras: &[u8], value: &[u8]) -> Vec<u8> {
            let mut bytes = vec![0u8; 24];
            bytes[0] = magic;
            bytes[1] = opcode;
            bytes[2..4].copy_from_slice(&(key.len() as u16).to_be_bytes());
            bytes[4] = extras.len() as u8;
            let body = (extras.len() + key.len() + value.len()) as u32;
            bytes[8..12].copy_from_slice(&body.to_be_bytes());
            bytes.extend_from_slice(extras);
            bytes.extend_from_slice(key);
            bytes.extend_from_slice(value);
            bytes
        }
        // getkq x 30 + noop in one write; hits for every third key (with 2 KB values), noop.
        let mut request = Vec::new();
        let mut reply = Vec::new();
        for i in 0..30 {
            let key = format!("k{i}");
            request.extend(frame(0x80, 0x0d, key.as_bytes(), &[], &[]));
            if i % 3 == 0 {
                reply.extend(frame(0x81, 0x0d, key.as_bytes(), &[0; 4], &value(4)));
            }
        }
        request.extend(frame(0x80, 0x0a, b"", &[], &[]));
        reply.extend(frame(0x81, 0x0a, b"", &[], &[]));
        let calls = vec![(true, request), (false, reply)];
        for role in [Role::Client, Role::Server] {
            let (counts, errors) = decode_through_capture(role, &calls, 65536);
            assert_eq!(errors, 0, "{role:?}: {counts:?}");
            let hits: u64 = counts
                .iter()
                .filter(|((_, status), _)| *status == Status::Hit.as_str())
                .map(|(_, n)| n)
                .sum();
            let misses: u64 = counts
                .iter()
                .filter(|((_, status), _)| *status == Status::Miss.as_str())
                .map(|(_, n)| n)
                .sum();
            assert_eq!((hits, misses), (10, 20), "{role:?}: {counts:?}");
        }
    }

    #[test]
    fn capture_cost_follows_frames_not_value_sizes() {
        let mut state = FrameState::default();
        for size in [100usize, 10_000, 500_000] {
            let mut call = format!("VALUE k 0 {size}\r\n").into_bytes();
            call.extend(std::iter::repeat_n(b'v', size));
            call.extend_from_slice(b"\r\nEND\r\n");
            let records = kernel_capture(1, 1, false, &call, &mut state, 65536);
            let captured: usize = records.iter().map(|r| r.len()).sum();
            // The header line, the END line and at most one piece of the value.
            assert!(
                captured <= HEADER + 2 * 8 + 2 * CAPTURE_PIECE,
                "{size}: {captured}"
            );
            assert_eq!(state.mode, framing::mode::FRAME_START);
        }
    }

    #[test]
    fn a_call_past_the_budget_is_incomplete_and_resynchronises() {
        let get = format!("get {}\r\n", vec!["k"; 200].join(" ")).into_bytes();
        let mut state = FrameState::default();
        let records = kernel_capture(1, 1, true, &get, &mut state, 128);
        let view = parse_payload(records.last().unwrap()).unwrap();
        assert!(view.incomplete);
        assert_eq!(state.mode, framing::mode::LOST);
        // The next call starts afresh and decodes.
        let (counts, errors) = decode_through_capture(
            Role::Client,
            &[
                (true, get),
                (true, b"get a\r\n".to_vec()),
                (false, b"END\r\n".to_vec()),
            ],
            128,
        );
        assert!(errors > 0);
        assert!(
            counts.contains_key(&("get".to_string(), Status::Miss.as_str())),
            "{counts:?}"
        );
    }

    #[test]
    fn sniffs_text_and_binary_commands() {
        assert_eq!(sniff_command(b"set k 0 0 1\r\n"), Some("set"));
        assert_eq!(sniff_command(b"\x80\x01"), Some("binary"));
        assert_eq!(sniff_command(b"HELLO"), None);
    }

    #[test]
    fn connection_table_is_bounded() {
        let mut decoders = Decoders::new(1);
        let mut out = Vec::new();
        for sk in 1..=3 {
            let bytes = record(1, sk, true, b"get a\r\n", 7);
            decoders.on_payload(
                &parse_payload(&bytes).unwrap(),
                endpoint(Role::Client),
                None,
                false,
                &mut out,
            );
        }
        assert_eq!(decoders.len(), 1);
        assert_eq!(decoders.dropped, 2);
    }
}
