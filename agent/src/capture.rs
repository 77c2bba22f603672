//! From captured payloads to memcache observations: one decoder per watched connection, fed in
//! order, with the direction taken from the connection's role. Bounded in connections; a
//! connection's decoder goes when the connection closes.

use foldhash::{HashMap, HashMapExt};

use agent_common::{CAPTURE_MAX, COMM_LEN};

use crate::{
    events::Role,
    memcache::{
        Chunk, Command, ConnectionDecoder, DecodeErrorReason, DecoderConfig, Direction,
        Observation, RequestObservation,
    },
    tracking::Endpoint,
};

/// A payload record borrowed from the ring buffer: no copy of the data.
#[derive(Debug, Clone, Copy)]
pub struct PayloadView<'a> {
    pub ts_ns: u64,
    pub sk: u64,
    pub total_len: u64,
    pub pid: u32,
    pub is_send: bool,
    pub comm: &'a [u8; COMM_LEN],
    pub data: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload record of {0} bytes, shorter than its header or its captured length")]
    Size(usize),
    #[error("payload record claims {0} captured bytes")]
    CapturedLen(u16),
}

const HEADER: usize = agent_common::PAYLOAD_HEADER_LEN;

/// The timestamp of a payload record, for ordering it among socket events.
pub fn payload_ts(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?))
}

/// Parses a ring-buffer payload record without copying its data.
pub fn parse_payload(bytes: &[u8]) -> Result<PayloadView<'_>, PayloadError> {
    // Records are variable length: the header, then `captured_len` bytes.
    if bytes.len() < HEADER {
        return Err(PayloadError::Size(bytes.len()));
    }
    let u64_at =
        |offset: usize| u64::from_ne_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let captured_len = u16::from_ne_bytes([bytes[28], bytes[29]]);
    if captured_len as usize > CAPTURE_MAX {
        return Err(PayloadError::CapturedLen(captured_len));
    }
    if bytes.len() < HEADER + captured_len as usize {
        return Err(PayloadError::Size(bytes.len()));
    }
    let total_len = u64_at(16);
    let data_len = (captured_len as u64).min(total_len) as usize;
    Ok(PayloadView {
        ts_ns: u64_at(0),
        sk: u64_at(8),
        total_len,
        pid: u32::from_ne_bytes(bytes[24..28].try_into().expect("4 bytes")),
        is_send: bytes[30] != 0,
        comm: bytes[32..HEADER].try_into().expect("16 bytes"),
        data: &bytes[HEADER..HEADER + data_len],
    })
}

/// Builds a ring-buffer payload record as the kernel writes it (for tests and benches; the
/// inverse of [`parse_payload`]). `data` beyond the record's capacity is cut.
pub fn encode_payload_record(
    ts_ns: u64,
    sk: u64,
    total_len: u64,
    is_send: bool,
    comm: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let data = &data[..data.len().min(CAPTURE_MAX)];
    // Variable length, as the kernel writes them: the header, then the captured bytes.
    let mut bytes = vec![0u8; HEADER + data.len()];
    let comm = &comm[..comm.len().min(COMM_LEN)];
    bytes[0..8].copy_from_slice(&ts_ns.to_ne_bytes());
    bytes[8..16].copy_from_slice(&sk.to_ne_bytes());
    bytes[16..24].copy_from_slice(&total_len.to_ne_bytes());
    bytes[24..28].copy_from_slice(&7u32.to_ne_bytes());
    bytes[28..30].copy_from_slice(&(data.len() as u16).to_ne_bytes());
    bytes[30] = is_send as u8;
    bytes[32..32 + comm.len()].copy_from_slice(comm);
    bytes[HEADER..HEADER + data.len()].copy_from_slice(data);
    bytes
}

/// What decoding produced, tied to the connection's endpoint.
// Boxing the request (its key is inline) would cost an allocation per decoded request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MemcacheEvent {
    Request {
        endpoint: Endpoint,
        request: RequestObservation,
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

/// Recent client-to-server commands per connection, to name what a dead write carried.
const RECENT_COMMANDS: usize = 4;

struct ConnectionState {
    endpoint: Endpoint,
    decoder: ConnectionDecoder,
    recent: [(u64, Option<&'static str>); RECENT_COMMANDS],
    next: usize,
}

pub struct Decoders {
    connections: HashMap<u64, ConnectionState>,
    max_connections: usize,
    scratch: Vec<Observation>,
    /// Connections not decoded because the table was full.
    pub dropped: u64,
}

impl Decoders {
    pub fn new(max_connections: usize) -> Self {
        Decoders {
            connections: HashMap::new(),
            max_connections,
            scratch: Vec::with_capacity(64),
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn on_payload(
        &mut self,
        payload: &PayloadView<'_>,
        endpoint: Endpoint,
        queue_mode: bool,
        out: &mut Vec<MemcacheEvent>,
    ) {
        out.push(MemcacheEvent::Bytes {
            endpoint,
            sent: payload.is_send,
            bytes: payload.total_len,
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
        // A client sends requests; a server receives them.
        let direction = match (endpoint.role, payload.is_send) {
            (Role::Client, true) | (Role::Server, false) => Direction::ClientToServer,
            _ => Direction::ServerToClient,
        };
        if direction == Direction::ClientToServer && payload.is_send {
            state.recent[state.next % RECENT_COMMANDS] =
                (payload.ts_ns, sniff_command(payload.data));
            state.next = state.next.wrapping_add(1);
        }
        state.decoder.feed(
            Chunk {
                direction,
                ts_ns: payload.ts_ns,
                captured: payload.data,
                total_len: payload.total_len as usize,
            },
            &mut self.scratch,
        );
        drain(&mut self.scratch, state.endpoint, out);
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
                recent: [(0, None); RECENT_COMMANDS],
                next: 0,
            },
        );
        true
    }

    /// The command in the first send on `sk` at or after `ts_ns` (the send a dead write made).
    pub fn command_sent_at(&self, sk: u64, ts_ns: u64) -> Option<&'static str> {
        let state = self.connections.get(&sk)?;
        state
            .recent
            .iter()
            .filter(|(ts, _)| *ts >= ts_ns)
            .min_by_key(|(ts, _)| *ts)
            .and_then(|(_, command)| *command)
    }

    /// The connection closed: outstanding requests finish (unanswered) and the decoder goes.
    pub fn on_close(&mut self, sk: u64, out: &mut Vec<MemcacheEvent>) {
        if let Some(mut state) = self.connections.remove(&sk) {
            state.decoder.finish(&mut self.scratch);
            drain(&mut self.scratch, state.endpoint, out);
        }
    }

    /// Drops the decoders of sockets capture no longer follows, without finishing them: their
    /// requests were answered, just not seen (counting them unanswered would invent timeouts).
    pub fn forget_unfollowed(&mut self, followed: impl Fn(u64) -> bool) {
        self.connections.retain(|sk, _| followed(*sk));
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
            drain(&mut self.scratch, state.endpoint, out);
        }
    }
}

fn drain(scratch: &mut Vec<Observation>, endpoint: Endpoint, out: &mut Vec<MemcacheEvent>) {
    out.extend(scratch.drain(..).map(|observation| match observation {
        Observation::Request(request) => MemcacheEvent::Request { endpoint, request },
        Observation::DecodeError(error) => MemcacheEvent::DecodeError {
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
    use agent_common::PayloadEvent;

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
        assert_eq!(std::mem::offset_of!(PayloadEvent, captured_len), 28);
        assert_eq!(std::mem::offset_of!(PayloadEvent, is_send), 30);
        assert_eq!(std::mem::offset_of!(PayloadEvent, comm), 32);
        assert_eq!(std::mem::offset_of!(PayloadEvent, data), HEADER);
    }

    #[test]
    fn client_get_hit_is_decoded_with_latency_and_bytes() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 5, true, b"get k\r\n", 7);
        let response = record(51_000, 5, false, b"VALUE k 0 1\r\nv\r\nEND\r\n", 21);
        for bytes in [&request, &response] {
            let view = parse_payload(bytes).unwrap();
            decoders.on_payload(&view, endpoint(Role::Client), false, &mut out);
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
        assert_eq!(decoders.command_sent_at(5, 900), Some("get"));
        assert_eq!(decoders.command_sent_at(5, 2_000), None);
    }

    #[test]
    fn server_side_direction_is_flipped_and_close_finishes_requests() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 9, false, b"set k 0 0 1\r\nv\r\n", 15);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            false,
            &mut out,
        );
        decoders.on_close(9, &mut out);
        assert!(decoders.is_empty());
        assert!(out.iter().any(|e| matches!(e, MemcacheEvent::Request { request, .. } if request.command.as_str() == "set")), "{out:?}");
    }

    #[test]
    fn a_reused_socket_address_starts_a_new_stream() {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let request = record(1_000, 9, true, b"get a\r\n", 7);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Client),
            false,
            &mut out,
        );
        // Same address, now a server-side socket receiving a request.
        let request = record(2_000, 9, false, b"get b\r\n", 7);
        decoders.on_payload(
            &parse_payload(&request).unwrap(),
            endpoint(Role::Server),
            false,
            &mut out,
        );
        let response = record(3_000, 9, true, b"END\r\n", 5);
        decoders.on_payload(
            &parse_payload(&response).unwrap(),
            endpoint(Role::Server),
            false,
            &mut out,
        );
        let served: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request { endpoint, request } => {
                    Some((endpoint.role, request.status))
                }
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
        bytes[28..30].copy_from_slice(&9999u16.to_ne_bytes());
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::CapturedLen(9999)
        );
        // Captured length beyond the transferred length is clamped.
        let bytes = record(1, 1, true, b"abc", 2);
        assert_eq!(parse_payload(&bytes).unwrap().data, b"ab");
        // A record cut short of its captured length (the kernel never writes one).
        let mut bytes = record(1, 1, true, b"abcd", 4);
        bytes.truncate(HEADER + 2);
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::Size(HEADER + 2)
        );
        // A record of the full maximal size is still accepted.
        let mut bytes = record(1, 1, true, b"xy", 2);
        bytes.resize(std::mem::size_of::<PayloadEvent>(), 0);
        assert_eq!(parse_payload(&bytes).unwrap().data, b"xy");
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
                false,
                &mut out,
            );
        }
        assert_eq!(decoders.len(), 1);
        assert_eq!(decoders.dropped, 2);
    }
}
