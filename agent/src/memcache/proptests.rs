//! Property tests: a generated conversation decodes to the same requests (and values' first
//! bytes) however its bytes are cut into chunks, and arbitrary input never panics or grows
//! state without bound.

use proptest::prelude::*;

use super::tests::{bin_request, bin_response};
use super::*;

/// (command, status, key, value head) of one observation.
type Summary = (&'static str, &'static str, Vec<u8>, Option<Vec<u8>>);

/// One request/response exchange: its bytes and what the decoder must report for it.
#[derive(Debug, Clone)]
struct Exchange {
    request: Vec<u8>,
    response: Vec<u8>,
    expected: Vec<Summary>,
}

/// Values are drawn from bytes that look like protocol, to prove values are never scanned.
fn value(len: usize, seed: u8) -> Vec<u8> {
    const ALPHABET: &[u8] = b"\r\nEND VALUE STORED 0x\x80\x81";
    (0..len)
        .map(|i| ALPHABET[(i + usize::from(seed)) % ALPHABET.len()])
        .collect()
}

fn summary(command: &'static str, status: &'static str, key: &[u8]) -> Summary {
    (command, status, key.to_vec(), None)
}

/// An observation that carries `value`: its head is the value's first bytes.
fn with_head(summary: Summary, value: &[u8]) -> Summary {
    let head = value[..value.len().min(VALUE_HEAD_LEN)].to_vec();
    (summary.0, summary.1, summary.2, Some(head))
}

#[derive(Debug, Clone)]
enum TextOp {
    Get {
        hits: Vec<bool>,
        gets: bool,
        len: usize,
    },
    Store {
        command: usize,
        len: usize,
        outcome: usize,
        noreply: bool,
    },
    Delete {
        found: bool,
        noreply: bool,
    },
    Incr {
        found: bool,
    },
    Touch {
        found: bool,
    },
    Stats {
        lines: usize,
    },
    Version,
    MetaGet {
        hit: bool,
        quiet: bool,
        len: usize,
    },
    MetaSet {
        len: usize,
        outcome: usize,
        quiet: bool,
    },
    MetaDelete {
        found: bool,
        quiet: bool,
    },
    MetaNoop,
}

fn text_op() -> impl Strategy<Value = TextOp> {
    prop_oneof![
        4 => (prop::collection::vec(any::<bool>(), 1..5), any::<bool>(), 0usize..40)
            .prop_map(|(hits, gets, len)| TextOp::Get { hits, gets, len }),
        3 => (0usize..6, 0usize..300, 0usize..4, any::<bool>())
            .prop_map(|(command, len, outcome, noreply)| TextOp::Store { command, len, outcome, noreply }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(found, noreply)| TextOp::Delete { found, noreply }),
        1 => any::<bool>().prop_map(|found| TextOp::Incr { found }),
        1 => any::<bool>().prop_map(|found| TextOp::Touch { found }),
        1 => (0usize..4).prop_map(|lines| TextOp::Stats { lines }),
        1 => Just(TextOp::Version),
        2 => (any::<bool>(), any::<bool>(), 0usize..40)
            .prop_map(|(hit, quiet, len)| TextOp::MetaGet { hit, quiet, len }),
        2 => (0usize..100, 0usize..4, any::<bool>())
            .prop_map(|(len, outcome, quiet)| TextOp::MetaSet { len, outcome, quiet }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(found, quiet)| TextOp::MetaDelete { found, quiet }),
        1 => Just(TextOp::MetaNoop),
    ]
}

fn text_exchange(op: &TextOp, index: usize) -> Exchange {
    let key = format!("key{index}").into_bytes();
    let k = String::from_utf8_lossy(&key).into_owned();
    let mut request = Vec::new();
    let mut response = Vec::new();
    let mut expected = Vec::new();
    match op {
        TextOp::Get { hits, gets, len } => {
            let command = if *gets { "gets" } else { "get" };
            request.extend_from_slice(command.as_bytes());
            for (i, hit) in hits.iter().enumerate() {
                let key = format!("{k}_{i}");
                request.extend_from_slice(format!(" {key}").as_bytes());
                if *hit {
                    response.extend_from_slice(format!("VALUE {key} 0 {len} 77\r\n").as_bytes());
                    response.extend(value(*len, i as u8));
                    response.extend_from_slice(b"\r\n");
                    expected.push(with_head(
                        summary(command, "hit", key.as_bytes()),
                        &value(*len, i as u8),
                    ));
                } else {
                    expected.push(summary(command, "miss", key.as_bytes()));
                }
            }
            request.extend_from_slice(b"\r\n");
            response.extend_from_slice(b"END\r\n");
        }
        TextOp::Store {
            command,
            len,
            outcome,
            noreply,
        } => {
            let name = ["set", "add", "replace", "append", "prepend", "cas"][*command];
            let cas = if name == "cas" { " 99" } else { "" };
            let tail = if *noreply { " noreply" } else { "" };
            request.extend_from_slice(format!("{name} {k} 0 0 {len}{cas}{tail}\r\n").as_bytes());
            request.extend(value(*len, 3));
            request.extend_from_slice(b"\r\n");
            let (line, status) = [
                ("STORED", "stored"),
                ("NOT_STORED", "not_stored"),
                ("EXISTS", "exists"),
                ("NOT_FOUND", "not_found"),
            ][*outcome];
            let sent = value(*len, 3);
            if *noreply {
                expected.push(with_head(summary(name, "noreply", &key), &sent));
            } else {
                response.extend_from_slice(format!("{line}\r\n").as_bytes());
                expected.push(with_head(summary(name, status, &key), &sent));
            }
        }
        TextOp::Delete { found, noreply } => {
            let tail = if *noreply { " noreply" } else { "" };
            request.extend_from_slice(format!("delete {k}{tail}\r\n").as_bytes());
            if *noreply {
                expected.push(summary("delete", "noreply", &key));
            } else if *found {
                response.extend_from_slice(b"DELETED\r\n");
                expected.push(summary("delete", "deleted", &key));
            } else {
                response.extend_from_slice(b"NOT_FOUND\r\n");
                expected.push(summary("delete", "not_found", &key));
            }
        }
        TextOp::Incr { found } => {
            request.extend_from_slice(format!("incr {k} 3\r\n").as_bytes());
            response.extend_from_slice(if *found {
                b"42\r\n".as_slice()
            } else {
                b"NOT_FOUND\r\n"
            });
            expected.push(summary(
                "incr",
                if *found { "ok" } else { "not_found" },
                &key,
            ));
        }
        TextOp::Touch { found } => {
            request.extend_from_slice(format!("touch {k} 10\r\n").as_bytes());
            response.extend_from_slice(if *found {
                b"TOUCHED\r\n".as_slice()
            } else {
                b"NOT_FOUND\r\n"
            });
            expected.push(summary(
                "touch",
                if *found { "touched" } else { "not_found" },
                &key,
            ));
        }
        TextOp::Stats { lines } => {
            request.extend_from_slice(b"stats\r\n");
            for i in 0..*lines {
                response.extend_from_slice(format!("STAT item_{i} {i}\r\n").as_bytes());
            }
            response.extend_from_slice(b"END\r\n");
            expected.push(summary("stats", "ok", b""));
        }
        TextOp::Version => {
            request.extend_from_slice(b"version\r\n");
            response.extend_from_slice(b"VERSION 1.6.18\r\n");
            expected.push(summary("version", "ok", b""));
        }
        TextOp::MetaGet { hit, quiet, len } => {
            let q = if *quiet { " q" } else { "" };
            request.extend_from_slice(format!("mg {k} v k{q}\r\n").as_bytes());
            if *hit {
                response.extend_from_slice(format!("VA {len} k{k}\r\n").as_bytes());
                response.extend(value(*len, 5));
                response.extend_from_slice(b"\r\n");
            } else if !quiet {
                response.extend_from_slice(b"EN\r\n");
            }
            expected.push(if *hit {
                with_head(summary("mg", "hit", &key), &value(*len, 5))
            } else {
                summary("mg", "miss", &key)
            });
        }
        TextOp::MetaSet {
            len,
            outcome,
            quiet,
        } => {
            let q = if *quiet { " q" } else { "" };
            request.extend_from_slice(format!("ms {k} {len} T0 k{q}\r\n").as_bytes());
            request.extend(value(*len, 9));
            request.extend_from_slice(b"\r\n");
            let (code, status) = [
                ("HD", "stored"),
                ("NS", "not_stored"),
                ("EX", "exists"),
                ("NF", "not_found"),
            ][*outcome];
            if !(*quiet && code == "HD") {
                response.extend_from_slice(format!("{code} k{k}\r\n").as_bytes());
            }
            expected.push(with_head(summary("ms", status, &key), &value(*len, 9)));
        }
        TextOp::MetaDelete { found, quiet } => {
            let q = if *quiet { " q" } else { "" };
            request.extend_from_slice(format!("md {k} k{q}\r\n").as_bytes());
            if !found {
                response.extend_from_slice(format!("NF k{k}\r\n").as_bytes());
            } else if !quiet {
                response.extend_from_slice(format!("HD k{k}\r\n").as_bytes());
            }
            expected.push(summary(
                "md",
                if *found { "deleted" } else { "not_found" },
                &key,
            ));
        }
        TextOp::MetaNoop => {
            request.extend_from_slice(b"mn\r\n");
            response.extend_from_slice(b"MN\r\n");
            expected.push(summary("mn", "ok", b""));
        }
    }
    Exchange {
        request,
        response,
        expected,
    }
}

#[derive(Debug, Clone)]
enum BinOp {
    Get { opcode: u8, hit: bool, len: usize },
    Store { opcode: u8, len: usize, status: u16 },
    Delete { quiet: bool, found: bool },
    Incr { found: bool },
    Noop,
    Version,
}

fn bin_op() -> impl Strategy<Value = BinOp> {
    prop_oneof![
        4 => (prop::sample::select(vec![0x00u8, 0x09, 0x0c, 0x0d]), any::<bool>(), 0usize..40)
            .prop_map(|(opcode, hit, len)| BinOp::Get { opcode, hit, len }),
        3 => (prop::sample::select(vec![0x01u8, 0x02, 0x03, 0x11, 0x12, 0x13]), 0usize..300,
              prop::sample::select(vec![0u16, 1, 2, 5]))
            .prop_map(|(opcode, len, status)| BinOp::Store { opcode, len, status }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(quiet, found)| BinOp::Delete { quiet, found }),
        1 => any::<bool>().prop_map(|found| BinOp::Incr { found }),
        1 => Just(BinOp::Noop),
        1 => Just(BinOp::Version),
    ]
}

fn bin_exchange(op: &BinOp, index: usize) -> Exchange {
    let key = format!("key{index}").into_bytes();
    let opaque = index as u32;
    let quiet = |opcode: u8| matches!(opcode, 0x09 | 0x0d | 0x11..=0x16);
    let label = |opcode: u8| Command::from_opcode(opcode).as_str();
    let (request, response, expected) = match *op {
        BinOp::Get { opcode, hit, len } => {
            let echo_key: &[u8] = if matches!(opcode, 0x0c | 0x0d) {
                &key
            } else {
                b""
            };
            let response = if hit {
                bin_response(opcode, 0, opaque, echo_key, &value(len, 1))
            } else if quiet(opcode) {
                Vec::new()
            } else {
                bin_response(opcode, 1, opaque, echo_key, b"Not found")
            };
            let expected = if hit {
                with_head(summary(label(opcode), "hit", &key), &value(len, 1))
            } else {
                summary(label(opcode), "miss", &key)
            };
            (bin_request(opcode, opaque, &key, b""), response, expected)
        }
        BinOp::Store {
            opcode,
            len,
            status,
        } => {
            let response = if status == 0 && quiet(opcode) {
                Vec::new()
            } else {
                bin_response(opcode, status, opaque, b"", b"")
            };
            let status =
                ["stored", "not_found", "exists", "", "", "not_stored"][usize::from(status)];
            (
                bin_request(opcode, opaque, &key, &value(len, 2)),
                response,
                with_head(summary(label(opcode), status, &key), &value(len, 2)),
            )
        }
        BinOp::Delete { quiet: q, found } => {
            let opcode = if q { 0x14 } else { 0x04 };
            let response = match (q, found) {
                (true, true) => Vec::new(),
                (_, true) => bin_response(opcode, 0, opaque, b"", b""),
                (_, false) => bin_response(opcode, 1, opaque, b"", b"Not found"),
            };
            let status = if found { "deleted" } else { "not_found" };
            (
                bin_request(opcode, opaque, &key, b""),
                response,
                summary(label(opcode), status, &key),
            )
        }
        BinOp::Incr { found } => {
            let response = if found {
                bin_response(0x05, 0, opaque, b"", &7u64.to_be_bytes())
            } else {
                bin_response(0x05, 1, opaque, b"", b"Not found")
            };
            let status = if found { "ok" } else { "not_found" };
            (
                bin_request(0x05, opaque, &key, b""),
                response,
                summary("bin_incr", status, &key),
            )
        }
        BinOp::Noop => (
            bin_request(0x0a, opaque, b"", b""),
            bin_response(0x0a, 0, opaque, b"", b""),
            summary("bin_noop", "ok", b""),
        ),
        BinOp::Version => (
            bin_request(0x0b, opaque, b"", b""),
            bin_response(0x0b, 0, opaque, b"", b"1.6.18"),
            summary("bin_version", "ok", b""),
        ),
    };
    Exchange {
        request,
        response,
        expected: vec![expected],
    }
}

/// Cuts `bytes` into chunks of the given sizes (cycled).
fn chunks<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let size = sizes[i % sizes.len()].max(1);
        let end = (pos + size).min(bytes.len());
        out.push(&bytes[pos..end]);
        pos = end;
        i += 1;
    }
    out
}

fn feed(
    decoder: &mut ConnectionDecoder,
    direction: Direction,
    ts: &mut u64,
    bytes: &[u8],
    out: &mut Vec<Decoded>,
) {
    *ts += 1000;
    decoder.feed(
        Chunk {
            direction,
            ts_ns: *ts,
            captured: bytes,
            total_len: bytes.len(),
            seq: None,
        },
        out,
    );
}

/// Runs the exchanges either one at a time (request chunks, then response chunks) or fully
/// pipelined (every request, then every response), and returns the sorted request summaries
/// and any decode errors.
fn run(
    exchanges: &[Exchange],
    sizes: &[usize],
    pipelined: bool,
) -> (Vec<Summary>, Vec<DecodeErrorReason>) {
    let mut decoder = ConnectionDecoder::new(DecoderConfig::default());
    let mut out = Vec::new();
    let mut ts = 0;
    if pipelined {
        let requests: Vec<u8> = exchanges.iter().flat_map(|e| e.request.clone()).collect();
        let responses: Vec<u8> = exchanges.iter().flat_map(|e| e.response.clone()).collect();
        for chunk in chunks(&requests, sizes) {
            feed(
                &mut decoder,
                Direction::ClientToServer,
                &mut ts,
                chunk,
                &mut out,
            );
        }
        for chunk in chunks(&responses, sizes) {
            feed(
                &mut decoder,
                Direction::ServerToClient,
                &mut ts,
                chunk,
                &mut out,
            );
        }
    } else {
        for exchange in exchanges {
            for chunk in chunks(&exchange.request, sizes) {
                feed(
                    &mut decoder,
                    Direction::ClientToServer,
                    &mut ts,
                    chunk,
                    &mut out,
                );
            }
            for chunk in chunks(&exchange.response, sizes) {
                feed(
                    &mut decoder,
                    Direction::ServerToClient,
                    &mut ts,
                    chunk,
                    &mut out,
                );
            }
        }
    }
    // Quiet requests at the very end are answered only by their silence.
    decoder.finish(&mut out);
    let mut summaries = Vec::new();
    let mut errors = Vec::new();
    for observation in out {
        match observation {
            Decoded::Request(r) => summaries.push((
                r.command.as_str(),
                r.status.as_str(),
                r.key.map(|k| k.as_bytes().to_vec()).unwrap_or_default(),
                r.value_head.map(|h| h.as_bytes().to_vec()),
            )),
            Decoded::DecodeError(e) => errors.push(e.reason),
        }
    }
    summaries.sort();
    (summaries, errors)
}

fn expected(exchanges: &[Exchange]) -> Vec<Summary> {
    let mut expected: Vec<Summary> = exchanges.iter().flat_map(|e| e.expected.clone()).collect();
    expected.sort();
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn text_conversation_is_independent_of_chunking(
        ops in prop::collection::vec(text_op(), 1..40),
        sizes in prop::collection::vec(1usize..64, 1..8),
        pipelined in any::<bool>(),
    ) {
        let exchanges: Vec<_> = ops.iter().enumerate().map(|(i, op)| text_exchange(op, i)).collect();
        let (summaries, errors) = run(&exchanges, &sizes, pipelined);
        prop_assert_eq!(errors, vec![]);
        prop_assert_eq!(summaries, expected(&exchanges));
    }

    #[test]
    fn binary_conversation_is_independent_of_chunking(
        ops in prop::collection::vec(bin_op(), 1..40),
        sizes in prop::collection::vec(1usize..64, 1..8),
        pipelined in any::<bool>(),
    ) {
        let exchanges: Vec<_> = ops.iter().enumerate().map(|(i, op)| bin_exchange(op, i)).collect();
        let (summaries, errors) = run(&exchanges, &sizes, pipelined);
        prop_assert_eq!(errors, vec![]);
        prop_assert_eq!(summaries, expected(&exchanges));
    }

    #[test]
    fn arbitrary_input_never_panics_and_stays_bounded(
        events in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0usize..400, 0u8..20),
            0..60,
        ),
        hint in prop::sample::select(vec![ProtocolHint::Auto, ProtocolHint::Text, ProtocolHint::Binary]),
        max_pending in 1usize..8,
    ) {
        let config = DecoderConfig { protocol_hint: hint, max_pending, max_line_len: 128, max_pending_keys: 16, ..DecoderConfig::default() };
        let mut decoder = ConnectionDecoder::new(config);
        let mut out = Vec::new();
        let mut ts = 0u64;
        for (to_server, bytes, capture, action) in &events {
            let direction = if *to_server { Direction::ClientToServer } else { Direction::ServerToClient };
            ts += 1000;
            match action {
                0 => decoder.note_gap(direction, &mut out),
                1 => decoder.expire(ts, 5000, &mut out),
                _ => {
                    // Claim more bytes than were captured half the time.
                    let total = if action % 2 == 0 { bytes.len() + capture } else { bytes.len() };
                    let captured = &bytes[..(*capture).min(bytes.len())];
                    decoder.feed(Chunk { direction, ts_ns: ts, captured, total_len: total, seq: None }, &mut out);
                }
            }
            prop_assert!(decoder.pending() <= max_pending);
            // A line buffer never outgrows its line limit (Vec growth at most doubles it).
            prop_assert!(decoder.line_buffer_capacity() <= 2 * 2 * 128);
        }
        decoder.finish(&mut out);
        prop_assert_eq!(decoder.pending(), 0);
    }

    #[test]
    fn protocol_like_junk_never_panics_and_recovers(
        pieces in prop::collection::vec(
            prop::sample::select(vec![
                "get ", "gets ", "set ", "cas ", "mg ", "ms ", "md ", "ma ", "mn", "me ", "VALUE ",
                "END", "STORED", "VA ", "HD ", "EN", "MN", "noreply", " ", "\r\n", "\n", "\r", "k",
                "0", "5", "99999999999999999999999", "-1", "q", "b", "O1", "kfoo", "jobs/t=5/open",
                "STAT x", "ERROR", "CLIENT_ERROR x", "\u{80}", "12",
            ]),
            0..80,
        ),
        sizes in prop::collection::vec(1usize..40, 1..6),
        capture in 0usize..64,
        queue_mode in any::<bool>(),
    ) {
        let junk: Vec<u8> = pieces.concat().into_bytes();
        let config = DecoderConfig { protocol_hint: ProtocolHint::Text, queue_mode, ..DecoderConfig::default() };
        let mut decoder = ConnectionDecoder::new(config);
        let mut out = Vec::new();
        let mut ts = 0u64;
        for (i, chunk) in chunks(&junk, &sizes).into_iter().enumerate() {
            let direction = if i % 3 == 0 { Direction::ServerToClient } else { Direction::ClientToServer };
            ts += 1000;
            let captured = &chunk[..capture.max(1).min(chunk.len())];
            decoder.feed(Chunk { direction, ts_ns: ts, captured, total_len: chunk.len(), seq: None }, &mut out);
        }
        // After lost events on both sides, a clean exchange decodes again.
        decoder.note_gap(Direction::ClientToServer, &mut out);
        decoder.note_gap(Direction::ServerToClient, &mut out);
        out.clear();
        feed(&mut decoder, Direction::ClientToServer, &mut ts, b"get zz\r\n", &mut out);
        feed(&mut decoder, Direction::ServerToClient, &mut ts, b"END\r\n", &mut out);
        let requests: Vec<_> = out.iter().filter_map(|o| match o {
            Decoded::Request(r) => Some((r.command, r.status, r.key.map(|k| k.as_bytes().to_vec()))),
            Decoded::DecodeError(_) => None,
        }).collect();
        prop_assert_eq!(requests, vec![(Command::Get, Status::Miss, Some(b"zz".to_vec()))]);
    }
}
