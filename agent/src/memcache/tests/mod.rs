//! Unit tests of the decoder: the harness (one connection fed chunk by chunk, binary packet
//! builders) and one file per concern: `text` (text commands and queue mode), `meta`, `binary`,
//! `capture` (partial captures, gaps, bounds and resynchronisation), `real_traffic` (a recorded
//! memcached transcript) and `fields` (sequence numbers and sizes a request carries).

use super::*;

mod binary;
mod capture;
mod fields;
mod meta;
mod multikey;
mod real_traffic;
mod text;

/// Drives one decoder with a clock that advances 10 µs per chunk.
struct Conn {
    decoder: ConnectionDecoder,
    out: Vec<Decoded>,
    ts: u64,
}

/// (command, status, key) of a request observation, for compact assertions.
type Summary = (&'static str, &'static str, String);

impl Conn {
    fn new() -> Conn {
        Conn::with(DecoderConfig::default())
    }

    fn with(config: DecoderConfig) -> Conn {
        Conn {
            decoder: ConnectionDecoder::new(config),
            out: Vec::new(),
            ts: 1_000_000,
        }
    }

    fn queue() -> Conn {
        Conn::with(DecoderConfig {
            queue_mode: true,
            ..DecoderConfig::default()
        })
    }

    fn feed(&mut self, direction: Direction, bytes: &[u8], capture: usize) {
        self.feed_seq(direction, bytes, capture, None);
    }

    /// Feeds one chunk of which `capture` bytes were captured; `seq` is the TCP sequence
    /// number of its first byte, when known.
    fn feed_seq(&mut self, direction: Direction, bytes: &[u8], capture: usize, seq: Option<u32>) {
        self.ts += 10_000;
        let chunk = Chunk {
            direction,
            ts_ns: self.ts,
            captured: &bytes[..capture.min(bytes.len())],
            total_len: bytes.len(),
            seq,
        };
        self.decoder.feed(chunk, &mut self.out);
    }

    fn client(&mut self, bytes: &[u8]) {
        self.feed(Direction::ClientToServer, bytes, usize::MAX);
    }

    fn server(&mut self, bytes: &[u8]) {
        self.feed(Direction::ServerToClient, bytes, usize::MAX);
    }

    fn requests(&mut self) -> Vec<RequestObservation> {
        let mut requests = Vec::new();
        self.out.retain(|o| match o {
            Decoded::Request(r) => {
                requests.push(r.clone());
                false
            }
            Decoded::DecodeError(_) => true,
        });
        requests
    }

    fn summary(&mut self) -> Vec<Summary> {
        self.requests().iter().map(summarize).collect()
    }

    fn errors(&mut self) -> Vec<&'static str> {
        let mut errors = Vec::new();
        self.out.retain(|o| match o {
            Decoded::DecodeError(e) => {
                errors.push(e.reason.as_str());
                false
            }
            Decoded::Request(_) => true,
        });
        errors
    }
}

fn summarize(r: &RequestObservation) -> Summary {
    let key = r
        .key
        .map(|k| String::from_utf8_lossy(k.as_bytes()).into_owned())
        .unwrap_or_default();
    (r.command.as_str(), r.status.as_str(), key)
}

fn s(command: &'static str, status: &'static str, key: &str) -> Summary {
    (command, status, key.to_string())
}

/// A request, its response, and the (command, status, key) of each request they hold.
type ExchangeCase<'a> = (
    &'a [u8],
    &'a [u8],
    &'a [(&'static str, &'static str, &'a str)],
);

/// Each (request, response, expected (command, status, key)s) as an exchange on a fresh text
/// connection, without decode errors.
fn assert_exchanges(cases: &[ExchangeCase]) {
    for (request, response, expected) in cases {
        let expected: Vec<Summary> = expected.iter().map(|(c, st, k)| s(c, st, k)).collect();
        assert_eq!(
            exchange(request, response),
            expected,
            "request {:?}",
            String::from_utf8_lossy(request)
        );
    }
}

/// Each (request, response, expected summary) as an exchange on a fresh text connection that
/// yields exactly that one request, without decode errors.
fn assert_single_exchanges(cases: &[(&[u8], &[u8], Summary)]) {
    for (request, response, expected) in cases {
        assert_eq!(
            exchange(request, response),
            vec![expected.clone()],
            "{}",
            request.escape_ascii()
        );
    }
}

/// A request/response exchange on a fresh text connection.
fn exchange(request: &[u8], response: &[u8]) -> Vec<Summary> {
    let mut conn = Conn::new();
    conn.client(request);
    conn.server(response);
    let summary = conn.summary();
    assert_eq!(
        conn.errors(),
        Vec::<&str>::new(),
        "no decode errors expected"
    );
    summary
}

/// A binary-protocol packet, built by `bin_request`/`bin_response` (also used by the property
/// tests).
struct Packet<'a> {
    magic: u8,
    opcode: u8,
    status: u16,
    opaque: u32,
    extras: &'a [u8],
    key: &'a [u8],
    value: &'a [u8],
}

impl Packet<'_> {
    fn bytes(&self) -> Vec<u8> {
        let body = self.extras.len() + self.key.len() + self.value.len();
        let mut b = vec![self.magic, self.opcode];
        b.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        b.push(self.extras.len() as u8);
        b.push(0);
        b.extend_from_slice(&self.status.to_be_bytes());
        b.extend_from_slice(&(body as u32).to_be_bytes());
        b.extend_from_slice(&self.opaque.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(self.extras);
        b.extend_from_slice(self.key);
        b.extend_from_slice(self.value);
        b
    }
}

pub(super) fn bin_request(opcode: u8, opaque: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let extras: &[u8] = match opcode {
        0x01..=0x03 | 0x11..=0x13 => &[0; 8],
        0x05 | 0x06 | 0x15 | 0x16 => &[0; 20],
        0x1c..=0x1e | 0x23 | 0x24 => &[0; 4],
        _ => &[],
    };
    Packet {
        magic: 0x80,
        opcode,
        status: 0,
        opaque,
        extras,
        key,
        value,
    }
    .bytes()
}

pub(super) fn bin_response(
    opcode: u8,
    status: u16,
    opaque: u32,
    key: &[u8],
    value: &[u8],
) -> Vec<u8> {
    let extras: &[u8] = if status == 0
        && matches!(
            opcode,
            0x00 | 0x09 | 0x0c | 0x0d | 0x1d | 0x1e | 0x23 | 0x24
        ) {
        &[0; 4]
    } else {
        &[]
    };
    Packet {
        magic: 0x81,
        opcode,
        status,
        opaque,
        extras,
        key,
        value,
    }
    .bytes()
}

#[test]
fn labels_are_unique_lowercase_and_bounded() {
    fn check(labels: Vec<&'static str>) {
        let mut unique = labels.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), labels.len(), "duplicate label in {labels:?}");
        for label in labels {
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
        }
    }
    check(Command::ALL.iter().map(|c| c.as_str()).collect());
    check(Status::ALL.iter().map(|c| c.as_str()).collect());
    check(QueueOpKind::ALL.iter().map(|c| c.as_str()).collect());
    check(DecodeErrorReason::ALL.iter().map(|c| c.as_str()).collect());
    assert_eq!(Command::from_opcode(0x0d), Command::BinGetKQ);
    assert_eq!(Command::from_opcode(0x99), Command::BinOther);
    assert_eq!(Command::MetaGet.protocol().as_str(), "meta");
    assert_eq!(Command::BinGet.protocol().as_str(), "binary");
    assert_eq!(Command::FlushAll.protocol().as_str(), "text");
}
