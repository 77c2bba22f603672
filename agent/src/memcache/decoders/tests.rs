//! The per-connection decoder table fed with payload records, some built by the kernel's
//! capture walk (`kernel_capture`).

use agent_common::{
    framing::{self, FrameState},
    payload_flags,
};

use super::*;
use crate::{
    kernel::capture::{encode_payload_record, kernel_capture, mark_sample, parse_payload},
    memcache::Status,
};

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

/// Decodes encoded payload `records` in order, as seen from the `role` end.
fn feed(decoders: &mut Decoders, records: &[Vec<u8>], role: Role, out: &mut Vec<MemcacheEvent>) {
    for bytes in records {
        let view = parse_payload(bytes).unwrap();
        decoders.on_payload(&view, endpoint(role), None, false, false, out);
    }
}

/// The status of each finished request in `out`, in order.
fn statuses(out: &[MemcacheEvent]) -> Vec<Status> {
    out.iter()
        .filter_map(|e| match e {
            MemcacheEvent::Request { request, .. } => Some(request.status),
            _ => None,
        })
        .collect()
}

/// How many gap decode errors `out` has.
fn gaps(out: &[MemcacheEvent]) -> usize {
    out.iter()
        .filter(|e| {
            matches!(
                e,
                MemcacheEvent::DecodeError {
                    reason: DecodeErrorReason::Gap,
                    ..
                }
            )
        })
        .count()
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
        decoders.on_payload(&view, endpoint(Role::Client), *flow, false, false, &mut out);
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
    feed(&mut decoders, &records, Role::Client, &mut out);
    assert_eq!(
        statuses(&out),
        [Status::Miss, Status::Unknown, Status::Miss],
        "{out:?}"
    );
    assert!(gaps(&out) > 0, "{out:?}");
}

#[test]
fn client_get_hit_is_decoded_with_latency_and_bytes() {
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let request = record(1_000, 5, true, b"get k\r\n", 7);
    let response = record(51_000, 5, false, b"VALUE k 0 1\r\nv\r\nEND\r\n", 21);
    for bytes in [&request, &response] {
        let view = parse_payload(bytes).unwrap();
        decoders.on_payload(&view, endpoint(Role::Client), None, false, false, &mut out);
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
    feed(
        &mut decoders,
        std::slice::from_ref(&request),
        Role::Server,
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
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let request = record(1_000, 9, false, b"get large\r\n", 11);
    feed(
        &mut decoders,
        std::slice::from_ref(&request),
        Role::Server,
        &mut out,
    );
    decoders.close_after_grace(9, 2_000);
    decoders.finish_closed(1_999, &mut out);
    assert!(statuses(&out).is_empty(), "{out:?}");
    let reply = record(3_000, 9, true, b"VALUE large 0 500000\r\n", 200_000);
    feed(
        &mut decoders,
        std::slice::from_ref(&reply),
        Role::Server,
        &mut out,
    );
    decoders.finish_closed(2_000, &mut out);
    assert!(decoders.is_empty());
    assert_eq!(statuses(&out), vec![Status::Hit], "{out:?}");
    // Without a reply the request finishes unanswered once the grace is over, and a stale
    // close time never finishes a stream that has started since at the address.
    let mut out = Vec::new();
    feed(
        &mut decoders,
        std::slice::from_ref(&request),
        Role::Server,
        &mut out,
    );
    decoders.close_after_grace(9, 5_000);
    let reused = record(6_000, 9, true, b"get b\r\n", 7);
    feed(
        &mut decoders,
        std::slice::from_ref(&reused),
        Role::Client,
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
    feed(
        &mut decoders,
        std::slice::from_ref(&request),
        Role::Client,
        &mut out,
    );
    // Same address, now a server-side socket receiving a request.
    let request = record(2_000, 9, false, b"get b\r\n", 7);
    feed(
        &mut decoders,
        std::slice::from_ref(&request),
        Role::Server,
        &mut out,
    );
    let response = record(3_000, 9, true, b"END\r\n", 5);
    feed(
        &mut decoders,
        std::slice::from_ref(&response),
        Role::Server,
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
            decoders.on_payload(&view, endpoint(role), None, false, false, &mut out);
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

/// A 24-byte binary-protocol header with its body (opaque 0).
fn bin_frame(magic: u8, opcode: u8, key: &[u8], extras: &[u8], value: &[u8]) -> Vec<u8> {
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

/// Values whose heads the capture tests follow: longer and shorter than the 8-byte head,
/// empty, and large.
fn head_test_values() -> Vec<Vec<u8>> {
    vec![
        b"job:0001-payload".to_vec(),
        b"ab".to_vec(),
        Vec::new(),
        b"big:"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'x', 70_000))
            .collect(),
    ]
}

/// Feeds stores, their answers, gets and their answers (`streams`, in that order) through the
/// kernel's capture walk in calls of `split` bytes and the decoders, as `role` sees them, and
/// returns the value heads of each finished request of `command`.
fn heads_through_capture(
    streams: &[Vec<u8>; 4],
    role: Role,
    split: usize,
) -> impl Fn(&str) -> Vec<Vec<u8>> {
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let mut send = FrameState::default();
    let mut recv = FrameState::default();
    let mut ts = 0;
    for (client_sends, stream) in [true, false, true, false].iter().zip(streams) {
        let is_send = *client_sends == (role == Role::Client);
        let state = if is_send { &mut send } else { &mut recv };
        for call in stream.chunks(split) {
            ts += 1_000;
            for record in kernel_capture(ts, 7, is_send, call, state, 65536) {
                let view = parse_payload(&record).unwrap();
                decoders.on_payload(&view, endpoint(role), None, true, false, &mut out);
            }
        }
    }
    decoders.on_close(7, &mut out);
    move |command: &str| {
        out.iter()
            .filter_map(|e| match e {
                MemcacheEvent::Request { request, .. } if request.command.as_str() == command => {
                    Some(request.value_head?.as_bytes().to_vec())
                }
                _ => None,
            })
            .collect()
    }
}

/// The first bytes of every value reach the observation through the kernel's capture,
/// wherever the calls split the stream: a body starting in a later call than its line, a
/// head split over two reads, values shorter than the head, large values. Text, binary and
/// meta alike (the frame follower copies every body's head, whatever the protocol).
#[test]
fn value_heads_reach_observations_through_capture_whatever_the_split() {
    let values = head_test_values();
    let expected: Vec<Vec<u8>> = values
        .iter()
        .map(|v| v[..v.len().min(8)].to_vec())
        .collect();
    // Per protocol: stores, their answers, gets, their answers (every get a hit).
    let mut text = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut binary = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut meta = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for (i, v) in values.iter().enumerate() {
        text[0].extend_from_slice(format!("set q 0 0 {}\r\n", v.len()).as_bytes());
        text[0].extend_from_slice(v);
        text[0].extend_from_slice(b"\r\n");
        text[1].extend_from_slice(b"STORED\r\n");
        text[2].extend_from_slice(b"get q\r\n");
        text[3].extend_from_slice(format!("VALUE q 0 {}\r\n", v.len()).as_bytes());
        text[3].extend_from_slice(v);
        text[3].extend_from_slice(b"\r\nEND\r\n");
        let opaque = i as u8;
        for (stream, mut frame) in binary.iter_mut().zip([
            bin_frame(0x80, 0x01, b"q", &[0; 8], v),
            bin_frame(0x81, 0x01, b"", &[], &[]),
            bin_frame(0x80, 0x00, b"q", &[], &[]),
            bin_frame(0x81, 0x00, b"", &[0; 4], v),
        ]) {
            frame[15] = opaque;
            stream.extend(frame);
        }
        meta[0].extend_from_slice(format!("ms q {} T0\r\n", v.len()).as_bytes());
        meta[0].extend_from_slice(v);
        meta[0].extend_from_slice(b"\r\n");
        meta[1].extend_from_slice(b"HD\r\n");
        meta[2].extend_from_slice(b"mg q v\r\n");
        meta[3].extend_from_slice(format!("VA {}\r\n", v.len()).as_bytes());
        meta[3].extend_from_slice(v);
        meta[3].extend_from_slice(b"\r\n");
    }
    let splits = [
        1usize,
        3,
        7,
        15,
        16,
        17,
        18,
        19,
        20,
        21,
        24,
        25,
        29,
        33,
        64,
        1500,
        1 << 20,
    ];
    for (streams, set, get) in [
        (&text, "set", "get"),
        (&binary, "bin_set", "bin_get"),
        (&meta, "ms", "mg"),
    ] {
        for split in splits {
            for role in [Role::Client, Role::Server] {
                let heads = heads_through_capture(streams, role, split);
                assert_eq!(heads(set), expected, "{set} {role:?} split {split}");
                assert_eq!(heads(get), expected, "{get} {role:?} split {split}");
            }
        }
    }
}

#[test]
fn binary_quiet_multi_get_decodes_exactly_through_capture() {
    let frame = bin_frame;
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
    // A binary request is named by its opcode, as the request metrics name it.
    assert_eq!(sniff_command(b"\x80\x01"), Some("bin_set"));
    assert_eq!(sniff_command(b"\x80"), Some("binary"));
    assert_eq!(sniff_command(b"HELLO"), None);
}

#[test]
fn knows_a_quit_answer() {
    assert!(is_quit_answer(b"\x81\x07\x00\x00"));
    assert!(!is_quit_answer(b"\x81\x17"));
    assert!(!is_quit_answer(b"\x80\x07"));
    assert!(!is_quit_answer(b"\x81"));
    assert!(!is_quit_answer(b"END\r\n"));
}

#[test]
fn connection_table_is_bounded() {
    let mut decoders = Decoders::new(1);
    let mut out = Vec::new();
    for sk in 1..=3 {
        let bytes = record(1, sk, true, b"get a\r\n", 7);
        feed(
            &mut decoders,
            std::slice::from_ref(&bytes),
            Role::Client,
            &mut out,
        );
    }
    assert_eq!(decoders.len(), 1);
    assert_eq!(decoders.dropped, 2);
}

/// A read that takes the client's last request together with its FIN: the kernel's
/// `copied_seq` counts the FIN, so the record's sequence number is one byte late. That is not a
/// gap (the soak's unexplained `gap` errors with nothing lost); the same one-byte step on a
/// healthy sampled stream, or a bigger step after a close, still is.
#[test]
fn a_read_that_also_takes_the_peers_fin_is_not_a_gap() {
    let with_seq = |mut bytes: Vec<u8>, seq: u32, sample: Option<(u8, u8)>| {
        mark_sample(&mut bytes, sample);
        bytes[40] |= payload_flags::SEQ;
        bytes[44..48].copy_from_slice(&seq.to_ne_bytes());
        bytes
    };
    let run = |step: u32, last_sample: Option<(u8, u8)>| {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let sampled = Some((2, 3));
        let records = [
            // memcached reads a get and answers it, on a followed connection.
            with_seq(record(100, 9, false, b"get a\r\n", 7), 1_000, sampled),
            with_seq(record(200, 9, true, b"END\r\n", 5), 5_000, sampled),
            // The next get arrives with the client's FIN and is read with it.
            with_seq(
                record(300, 9, false, b"get b\r\n", 7),
                1_007 + step,
                last_sample,
            ),
            with_seq(record(400, 9, true, b"END\r\n", 5), 5_005, last_sample),
        ];
        feed(&mut decoders, &records, Role::Server, &mut out);
        (statuses(&out), gaps(&out))
    };
    // The FIN read: captured on the trouble path (the peer has closed), one byte late.
    assert_eq!(run(1, None), (vec![Status::Miss, Status::Miss], 0));
    // Contiguous, as a read without the FIN is recorded.
    assert_eq!(run(0, None), (vec![Status::Miss, Status::Miss], 0));
    // A healthy sampled stream has no FIN in its reads: a byte missing there is a gap.
    assert_eq!(run(1, Some((2, 3))).1, 1);
    // More than the FIN's one byte is a hole whatever the path.
    assert_eq!(run(2, None).1, 1);
}

/// A record with the kernel's sequence number and, when `resumed`, its mark for a call that
/// does not start where it last followed the connection.
fn with_seq_marked(mut bytes: Vec<u8>, seq: u32, resumed: bool) -> Vec<u8> {
    bytes[40] |= payload_flags::SEQ;
    if resumed {
        bytes[40] |= payload_flags::RESUMED;
    }
    bytes[44..48].copy_from_slice(&seq.to_ne_bytes());
    bytes
}

/// Every decode error in `out`.
fn decode_errors(out: &[MemcacheEvent]) -> Vec<DecodeErrorReason> {
    out.iter()
        .filter_map(|e| match e {
            MemcacheEvent::DecodeError { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

/// Capture turned off and on again on a pooled connection (or the sample letting it go and
/// taking it back): the exchanges in between went by unfollowed, and the kernel marks the
/// first call it follows again. That is a clean new start from a request boundary, not a
/// loss: no `gap`, no `unexpected_response`, every exchange after it decoded. (Without the
/// mark, the jump in sequence numbers read as lost records: one gap per direction, and the
/// answer to the first new request taken as unexpected.)
#[test]
fn a_stream_followed_again_after_an_unfollowed_stretch_starts_clean() {
    for role in [Role::Client, Role::Server] {
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
        // The client's requests go out, the answers come in: the send of one end is the
        // receive of the other, so the direction follows the role.
        let ask = role == Role::Client;
        let records = [
            with_seq_marked(record(100, 5, ask, b"get k\r\n", 7), 1_000, false),
            with_seq_marked(record(200, 5, !ask, hit, 21), 9_000, false),
            // Twenty exchanges go by unfollowed; the first call followed again is a request.
            with_seq_marked(record(5_000, 5, ask, b"get k\r\n", 7), 1_147, true),
            with_seq_marked(record(5_100, 5, !ask, hit, 21), 9_441, false),
            with_seq_marked(record(5_200, 5, ask, b"get k\r\n", 7), 1_154, false),
            with_seq_marked(record(5_300, 5, !ask, hit, 21), 9_462, false),
        ];
        feed(&mut decoders, &records, role, &mut out);
        assert_eq!(statuses(&out), [Status::Hit; 3], "{role:?}: {out:?}");
        assert_eq!(decode_errors(&out), [], "{role:?}: {out:?}");
    }
}

/// Capture stops following while a request waits for its answer: that one exchange is cut,
/// and counted (one gap, the request unknown); the stream after the switch decodes as new.
#[test]
fn the_exchange_cut_by_a_switch_is_counted_once() {
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    let records = [
        with_seq_marked(record(100, 5, true, b"get k\r\n", 7), 1_000, false),
        // Its answer comes while the connection is not followed.
        with_seq_marked(record(5_000, 5, true, b"get k\r\n", 7), 1_147, true),
        with_seq_marked(record(5_100, 5, false, hit, 21), 9_441, false),
    ];
    feed(&mut decoders, &records, Role::Client, &mut out);
    assert_eq!(statuses(&out), [Status::Unknown, Status::Hit], "{out:?}");
    assert_eq!(decode_errors(&out), [DecodeErrorReason::Gap], "{out:?}");
}

/// A reload switches the service's capture off while a request waits: its answer goes by
/// unseen, so it never times out, however long capture stays off; when capture comes back the
/// request finishes as the one exchange the switch cut (unknown, one gap). A paused stream that
/// closes first finishes its waiting request the same way, not as unanswered.
#[test]
fn a_stream_paused_by_a_reload_does_not_time_out_and_counts_its_cut_exchange_once() {
    const SECOND: u64 = 1_000_000_000;
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    for sk in [5, 6] {
        let ask = with_seq_marked(record(100, sk, true, b"get k\r\n", 7), 1_000, false);
        feed(&mut decoders, &[ask], Role::Client, &mut out);
    }
    decoders.pause_uncaptured(|_| false, 200);
    decoders.expire(60 * SECOND, 5 * SECOND, &mut out);
    assert_eq!(statuses(&out), [], "{out:?}");

    let again = [
        with_seq_marked(record(61 * SECOND, 5, true, b"get k\r\n", 7), 1_147, true),
        with_seq_marked(record(61 * SECOND + 100, 5, false, hit, 21), 9_441, false),
    ];
    feed(&mut decoders, &again, Role::Client, &mut out);
    assert_eq!(statuses(&out), [Status::Unknown, Status::Hit], "{out:?}");
    assert_eq!(decode_errors(&out), [DecodeErrorReason::Gap], "{out:?}");
    // Resumed, the stream times out again like any other.
    let late = with_seq_marked(record(62 * SECOND, 5, true, b"get k\r\n", 7), 1_154, false);
    feed(&mut decoders, &[late], Role::Client, &mut out);
    decoders.expire(70 * SECOND, 5 * SECOND, &mut out);
    assert_eq!(statuses(&out).last(), Some(&Status::Timeout), "{out:?}");

    out.clear();
    decoders.on_close(6, &mut out);
    assert_eq!(statuses(&out), [Status::Unknown], "{out:?}");
    assert_eq!(decode_errors(&out), [DecodeErrorReason::Gap], "{out:?}");
}

/// Capture comes back by a reload, and the client's next get goes out (its send side skipped
/// nothing, so it is not marked) before the read that shows the skipped answer: only the get
/// sent before capture came back is cut (unknown, one gap); the new one is answered (hit).
#[test]
fn a_request_sent_after_capture_came_back_is_not_cut_with_the_one_before() {
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    let ask = with_seq_marked(record(100, 5, true, b"get k\r\n", 7), 1_000, false);
    feed(&mut decoders, &[ask], Role::Client, &mut out);
    decoders.pause_uncaptured(|_| false, 200);
    // Its answer is read unseen; then capture comes back.
    decoders.pause_uncaptured(|_| true, 300);
    let again = [
        with_seq_marked(record(400, 5, true, b"get k\r\n", 7), 1_007, false),
        with_seq_marked(record(500, 5, false, hit, 21), 9_021, true),
    ];
    feed(&mut decoders, &again, Role::Client, &mut out);
    assert_eq!(statuses(&out), [Status::Unknown, Status::Hit], "{out:?}");
    assert_eq!(decode_errors(&out), [DecodeErrorReason::Gap], "{out:?}");
}

/// A connection the sample starts following mid-stream (its sample turned, or a wider shift
/// took it in) may first show an answer to a request sent while nobody followed it: that
/// answer is not decoded and is no error; the stream decodes from its first request on. At
/// shift 0 (no sample) the same record is still the counted cut of an adopted connection.
#[test]
fn a_stream_met_by_a_sample_skips_answers_before_its_first_request() {
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    for role in [Role::Client, Role::Server] {
        let ask = role == Role::Client;
        let sampled = |mut bytes: Vec<u8>| {
            mark_sample(&mut bytes, Some((2, 3)));
            bytes
        };
        let records = [
            sampled(record(100, 5, !ask, hit, 21)),
            sampled(record(200, 5, ask, b"get k\r\n", 7)),
            sampled(record(300, 5, !ask, hit, 21)),
        ];
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        feed(&mut decoders, &records, role, &mut out);
        assert_eq!(statuses(&out), [Status::Hit], "{role:?}: {out:?}");
        assert_eq!(decode_errors(&out), [], "{role:?}: {out:?}");
    }
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    let records = [
        record(100, 5, false, hit, 21),
        record(200, 5, true, b"get k\r\n", 7),
    ];
    feed(&mut decoders, &records, Role::Client, &mut out);
    let errors = decode_errors(&out);
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| *e == DecodeErrorReason::UnexpectedResponse),
        "unsampled: {out:?}"
    );
}

/// A service sampled in time follows its connections again at shift 0 after seconds of
/// following none: a stream met then may first show the answer to a request sent unfollowed,
/// which is skipped, not a decode error (each followed second made one, and the root test of a
/// lone connection failed on them). Not sampled in time, the same shift-0 record stays the
/// counted cut of an adopted connection.
#[test]
fn a_stream_met_by_a_time_sample_skips_answers_before_its_first_request() {
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    for time_sampled in [true, false] {
        let at_shift_0 = |mut bytes: Vec<u8>| {
            mark_sample(&mut bytes, Some((0, 3)));
            bytes
        };
        let records = [
            at_shift_0(record(100, 5, false, hit, 21)),
            at_shift_0(record(200, 5, true, b"get k\r\n", 7)),
            at_shift_0(record(300, 5, false, hit, 21)),
        ];
        let mut decoders = Decoders::new(10);
        let mut out = Vec::new();
        for bytes in &records {
            let view = parse_payload(bytes).unwrap();
            let client = endpoint(Role::Client);
            decoders.on_payload(&view, client, None, false, time_sampled, &mut out);
        }
        assert_eq!(
            decode_errors(&out).is_empty(),
            time_sampled,
            "time sampled: {time_sampled}: {out:?}"
        );
        assert_eq!(statuses(&out).last(), Some(&Status::Hit), "{out:?}");
    }
}

/// Turning a slot's sample: a sampled stream with a request waiting holds the turn back (its
/// answer, or its timeout, must be seen where it is); once answered, the slot's sampled
/// streams are let go without finishing anything, while streams captured for their trouble
/// and streams of other slots stay.
#[test]
fn a_sample_turns_only_between_requests_and_lets_its_streams_go() {
    let hit = b"VALUE k 0 1\r\nv\r\nEND\r\n";
    let sampled = |mut bytes: Vec<u8>| {
        mark_sample(&mut bytes, Some((1, 1)));
        bytes
    };
    let trouble = |mut bytes: Vec<u8>| {
        mark_sample(&mut bytes, None);
        bytes
    };
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    feed(
        &mut decoders,
        &[
            sampled(record(100, 5, true, b"get k\r\n", 7)),
            trouble(record(100, 6, true, b"get k\r\n", 7)),
        ],
        Role::Client,
        &mut out,
    );
    let in_slot = |service: usize| service == 0;
    assert!(decoders.sampled_waiting(in_slot));
    assert!(!decoders.sampled_waiting(|_| false), "another slot");
    feed(
        &mut decoders,
        &[sampled(record(200, 5, false, hit, 21))],
        Role::Client,
        &mut out,
    );
    assert!(
        !decoders.sampled_waiting(in_slot),
        "a trouble stream's wait does not hold a turn: {out:?}"
    );
    out.clear();
    decoders.forget_sampled(in_slot);
    assert_eq!(decoders.len(), 1, "the trouble stream stays");
    assert!(statuses(&out).is_empty());
    // The trouble stream still answers.
    feed(
        &mut decoders,
        &[trouble(record(300, 6, false, hit, 21))],
        Role::Client,
        &mut out,
    );
    assert_eq!(statuses(&out), [Status::Hit]);
}

/// A request that finishes by close (or timeout) comes out without a record at hand: it names
/// the process of its stream, so diagnose can say who waited on a hung server.
#[test]
fn a_request_finished_by_close_names_its_sender() {
    let mut decoders = Decoders::new(10);
    let mut out = Vec::new();
    feed(
        &mut decoders,
        &[record(1_000, 9, true, b"get a\r\n", 7)],
        Role::Client,
        &mut out,
    );
    out.clear();
    decoders.on_close(9, &mut out);
    let finished: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            MemcacheEvent::Request { request, comm, .. } => Some((request.status, *comm)),
            _ => None,
        })
        .collect();
    let mut python3 = [0; agent_common::COMM_LEN];
    python3[..7].copy_from_slice(b"python3");
    assert_eq!(finished, vec![(Status::Unanswered, python3)]);
}

#[test]
fn knows_a_request_that_asks_no_reply() {
    assert!(asks_no_reply(b"set jobs 0 0 5 noreply\r\nhello\r\n"));
    assert!(!asks_no_reply(b"set jobs 0 0 5\r\nhello\r\n"));
    assert!(asks_no_reply(b"ms k 5 T0 q\r\nhello\r\n"));
    assert!(!asks_no_reply(b"ms k 5 T0\r\nhello\r\n"));
    assert!(asks_no_reply(b"\x80\x11\x00\x01"), "binary SETQ");
    assert!(!asks_no_reply(b"\x80\x01\x00\x01"), "binary SET");
    assert!(!asks_no_reply(b""));
}

/// pymemcache's `set_many` of 2,500 keys with 100-byte values: every `set ... noreply` in one
/// send of 367 KB. The kernel follows 64 KiB of headers of it: a value's bytes past its head
/// must not be charged to that budget (they were: 128 bytes a set, so 512 sets read), and the
/// sets in the part not followed count as unread instead of vanishing.
#[test]
fn a_set_many_past_the_capture_budget_reads_headers_and_counts_the_rest_as_unread() {
    let mut call = Vec::new();
    for i in 0..2500 {
        call.extend(format!("set storekey_{i:06} 0 0 100 noreply\r\n").into_bytes());
        call.extend([b'v'; 100]);
        call.extend(b"\r\n");
    }
    let calls = vec![
        (true, call),
        (true, b"version\r\n".to_vec()),
        (false, b"VERSION 1.6.21\r\n".to_vec()),
    ];
    let (counts, errors) = decode_through_capture(Role::Client, &calls, 65536);
    let count = |status: Status| counts.get(&("set".to_string(), status.as_str())).copied();
    // 41 bytes of line and 8 of value head a set.
    let read = count(Status::Noreply).unwrap_or(0);
    assert!(read >= 65536 / 49 - 1, "{counts:?}");
    // The set the budget cut (its noreply unread) and the rest: unknown, not lost.
    assert_eq!(count(Status::Unknown), Some(2), "{counts:?}");
    assert_eq!(counts.get(&("version".to_string(), "ok")), Some(&1));
    assert_eq!(errors, 1, "the cut, once");
}
