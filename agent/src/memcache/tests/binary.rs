//! The binary protocol: statuses, quiet gets, opaque pairing, multi-packet stats, resync, every
//! split point, and telling text from binary.

use super::*;

#[test]
fn binary_get_set_delete_and_statuses() {
    let mut conn = Conn::new();
    let mut requests = Vec::new();
    requests.extend(bin_request(0x01, 1, b"k", b"value"));
    requests.extend(bin_request(0x00, 2, b"k", b""));
    requests.extend(bin_request(0x00, 3, b"missing", b""));
    requests.extend(bin_request(0x02, 4, b"k", b"v"));
    requests.extend(bin_request(0x04, 5, b"k", b""));
    requests.extend(bin_request(0x05, 6, b"n", b""));
    requests.extend(bin_request(0x1c, 7, b"k", b""));
    requests.extend(bin_request(0x0b, 8, b"", b""));
    requests.extend(bin_request(0x3f, 9, b"", b""));
    conn.client(&requests);
    assert_eq!(conn.decoder.wire_protocol(), Some(WireProtocol::Binary));
    let mut responses = Vec::new();
    responses.extend(bin_response(0x01, 0, 1, b"", b""));
    responses.extend(bin_response(0x00, 0, 2, b"", b"value"));
    responses.extend(bin_response(0x00, 1, 3, b"", b"Not found"));
    responses.extend(bin_response(0x02, 2, 4, b"", b"Data exists for key."));
    responses.extend(bin_response(0x04, 1, 5, b"", b"Not found"));
    responses.extend(bin_response(
        0x05,
        6,
        6,
        b"",
        b"Non-numeric server-side value for incr or decr",
    ));
    responses.extend(bin_response(0x1c, 0, 7, b"", b""));
    responses.extend(bin_response(0x0b, 0, 8, b"", b"1.6.18"));
    responses.extend(bin_response(0x3f, 0x81, 9, b"", b"Unknown command"));
    conn.server(&responses);
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_set", "stored", "k"),
            s("bin_get", "hit", "k"),
            s("bin_get", "miss", "missing"),
            s("bin_add", "exists", "k"),
            s("bin_delete", "not_found", "k"),
            s("bin_incr", "client_error", "n"),
            s("bin_touch", "touched", "k"),
            s("bin_version", "ok", ""),
            s("bin_other", "error", ""),
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn binary_quiet_multi_get_flushed_by_noop() {
    let mut conn = Conn::new();
    let mut requests = Vec::new();
    for (i, key) in [b"a", b"b", b"c"].iter().enumerate() {
        requests.extend(bin_request(0x0d, i as u32, *key, b""));
    }
    requests.extend(bin_request(0x11, 10, b"s", b"v")); // SetQ
    requests.extend(bin_request(0x11, 11, b"t", b"v")); // SetQ that fails
    requests.extend(bin_request(0x0a, 12, b"", b""));
    conn.client(&requests);
    let mut responses = Vec::new();
    responses.extend(bin_response(0x0d, 0, 1, b"b", b"value-b"));
    responses.extend(bin_response(0x11, 0x05, 11, b"", b"Not stored."));
    responses.extend(bin_response(0x0a, 0, 12, b"", b""));
    conn.server(&responses);
    let requests = conn.requests();
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![
            s("bin_getkq", "miss", "a"),
            s("bin_getkq", "hit", "b"),
            s("bin_getkq", "miss", "c"),
            s("bin_setq", "stored", "s"),
            s("bin_setq", "not_stored", "t"),
            s("bin_noop", "ok", ""),
        ]
    );
    assert!(requests.iter().all(|r| r.latency_ns == Some(10_000)));
    assert!(conn.errors().is_empty());
}

#[test]
fn binary_opaque_decides_pairing() {
    let mut conn = Conn::new();
    let mut requests = bin_request(0x00, 1, b"a", b"");
    requests.extend(bin_request(0x00, 2, b"b", b""));
    conn.client(&requests);
    // The response to opaque 1 was lost; opaque 2 proves it.
    conn.server(&bin_response(0x00, 0, 2, b"", b"x"));
    assert_eq!(
        conn.summary(),
        vec![s("bin_get", "unknown", "a"), s("bin_get", "hit", "b")]
    );
    conn.server(&bin_response(0x00, 0, 7, b"", b"x"));
    assert_eq!(conn.errors(), vec!["unexpected_response"]);
}

#[test]
fn binary_stat_is_a_multi_packet_response() {
    let mut conn = Conn::new();
    conn.client(&bin_request(0x10, 1, b"", b""));
    let mut responses = bin_response(0x10, 0, 1, b"pid", b"42");
    responses.extend(bin_response(0x10, 0, 1, b"uptime", b"7"));
    responses.extend(bin_response(0x10, 0, 1, b"", b""));
    conn.server(&responses);
    let requests = conn.requests();
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![s("bin_stat", "ok", "")]
    );
    assert_eq!(requests[0].response_bytes, responses.len() as u64);
}

#[test]
fn binary_quitq_and_large_value_prefix() {
    let mut conn = Conn::new();
    let value = vec![7u8; 5000];
    let set = bin_request(0x01, 1, b"big", &value);
    conn.feed(Direction::ClientToServer, &set, 64);
    conn.server(&bin_response(0x01, 0, 1, b"", b""));
    conn.client(&bin_request(0x00, 2, b"big", b""));
    let hit = bin_response(0x00, 0, 2, b"", &value);
    conn.feed(Direction::ServerToClient, &hit, 64);
    conn.client(&bin_request(0x17, 3, b"", b""));
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_set", "stored", "big"),
            s("bin_get", "hit", "big"),
            s("bin_quitq", "noreply", "")
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn binary_resync_after_garbage() {
    let mut conn = Conn::with(DecoderConfig {
        protocol_hint: ProtocolHint::Binary,
        ..DecoderConfig::default()
    });
    let mut stream = vec![0x80, 0xff, 0xff, 0xff, 0x12, 0x34];
    stream.extend_from_slice(&[0x55; 40]);
    stream.extend(bin_request(0x00, 9, b"key", b""));
    conn.client(&stream);
    assert_eq!(conn.errors(), vec!["garbage"]);
    conn.server(&bin_response(0x00, 1, 9, b"", b""));
    assert_eq!(conn.summary(), vec![s("bin_get", "miss", "key")]);
}

#[test]
fn binary_split_at_every_point() {
    let mut requests = bin_request(0x0c, 1, b"kk", b"");
    requests.extend(bin_request(0x01, 2, b"s", b"abc"));
    let mut responses = bin_response(0x0c, 0, 1, b"kk", b"vv");
    responses.extend(bin_response(0x01, 0, 2, b"", b""));
    for split_request in 0..=requests.len() {
        for split_response in (0..=responses.len()).step_by(3) {
            let mut conn = Conn::new();
            conn.client(&requests[..split_request]);
            conn.client(&requests[split_request..]);
            conn.server(&responses[..split_response]);
            conn.server(&responses[split_response..]);
            assert_eq!(
                conn.summary(),
                vec![s("bin_getk", "hit", "kk"), s("bin_set", "stored", "s")],
                "split at {split_request}/{split_response}"
            );
        }
    }
}

#[test]
fn auto_detection_and_hints() {
    let mut conn = Conn::new();
    assert_eq!(conn.decoder.wire_protocol(), None);
    conn.client(b"get a\r\n");
    assert_eq!(conn.decoder.wire_protocol(), Some(WireProtocol::Text));
    let mut conn = Conn::new();
    conn.server(&bin_response(0x0a, 0, 0, b"", b""));
    assert_eq!(conn.decoder.wire_protocol(), Some(WireProtocol::Binary));
    let mut conn = Conn::with(DecoderConfig {
        protocol_hint: ProtocolHint::Text,
        ..DecoderConfig::default()
    });
    let mut request = bin_request(0x00, 1, b"k", b"");
    request.extend_from_slice(b"\r\n");
    conn.client(&request);
    assert_eq!(conn.decoder.wire_protocol(), Some(WireProtocol::Text));
    assert_eq!(conn.errors(), vec!["garbage"]);
}

/// What bmemcached's `set_multi` sends: one SetQ per key (opaque = the key's index) and a
/// closing NoOp (opaque 0), all in one write.
fn bmemcached_set_multi(keys: &[String], value: &[u8]) -> Vec<u8> {
    let mut batch = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        batch.extend(bin_request(0x11, i as u32, key.as_bytes(), value));
    }
    batch.extend(bin_request(0x0a, 0, b"", b""));
    batch
}

/// Audit 2026-12-07: bmemcached `set_multi` of 5,000 keys, then plain gets on the same
/// connection (its `wl_overflow_after.py`, server role: memcached reads 16 KiB at a time).
/// The 904 SetQ past the 4,096-entry queue and the NoOp overflowed behind a marker that no
/// answer could clear, and every later get overflowed too: 0 hits and 0 misses for good.
/// Now the oldest silent SetQ give way (counted as overflows) and everything is paired.
#[test]
fn quiet_batch_larger_than_the_queue_does_not_blind_the_connection() {
    let mut conn = Conn::new();
    let keys: Vec<String> = (0..5000).map(|i| format!("ov{i:06}")).collect();
    let batch = bmemcached_set_multi(&keys, b"xxxxxxxxxx");
    for read in batch.chunks(16 * 1024) {
        conn.client(read);
    }
    conn.server(&bin_response(0x0a, 0, 0, b"", b""));
    for i in 0..100 {
        // The first half of the keys were stored, the second half never were.
        let key = if i < 50 {
            format!("ov{i:06}")
        } else {
            format!("ov{:06}", 5000 + i)
        };
        conn.client(&bin_request(0x00, 0, key.as_bytes(), b""));
        if i < 50 {
            conn.server(&bin_response(0x00, 0, 0, b"", b"xxxxxxxxxx"));
        } else {
            conn.server(&bin_response(0x00, 1, 0, b"", b"Not found"));
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for (command, status, _) in conn.summary() {
        *counts.entry((command, status)).or_insert(0) += 1;
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![
            (("bin_get", "hit"), 50),
            (("bin_get", "miss"), 50),
            (("bin_noop", "ok"), 1),
            (("bin_setq", "stored"), 5000),
        ]
    );
    // The SetQ finished before their NoOp answered (and the NoOp) are the overflow.
    assert_eq!(conn.errors(), vec!["pending_overflow"; 5000 - 4096 + 1]);
    assert_eq!(conn.decoder.pending(), 0);
}

/// The NoOp closing a quiet batch was lost (a gap on the client side): its answer fits no
/// request seen, but it proves the SetQ before it succeeded, so they do not wait for a later
/// answer or the timeout.
#[test]
fn an_unexpected_binary_answer_settles_the_quiet_requests_before_the_gap() {
    let mut conn = Conn::new();
    let keys: Vec<String> = (0..3).map(|i| format!("k{i}")).collect();
    let batch = bmemcached_set_multi(&keys, b"v");
    let noop_at = batch.len() - 24;
    conn.client(&batch[..noop_at]);
    conn.decoder
        .note_gap(Direction::ClientToServer, &mut conn.out);
    conn.server(&bin_response(0x0a, 0, 0, b"", b""));
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_setq", "stored", "k0"),
            s("bin_setq", "stored", "k1"),
            s("bin_setq", "stored", "k2"),
        ]
    );
    assert_eq!(conn.errors(), vec!["gap", "unexpected_response"]);
    assert_eq!(conn.decoder.pending(), 0);
    conn.client(&bin_request(0x00, 0, b"k0", b""));
    conn.server(&bin_response(0x00, 0, 0, b"", b"v"));
    assert_eq!(conn.summary(), vec![s("bin_get", "hit", "k0")]);
}

/// Audit 2026-12-07: libmemcached in binary mode (pylibmc, PHP's non-persistent connections)
/// ends each connection with a Quit and closes without reading its answer; 2,000 such
/// connections counted 2,000 `bin_quit` as unanswered and diagnose said clients gave up
/// waiting. The close is what a quit asks for.
#[test]
fn binary_quit_then_close_is_not_unanswered() {
    let mut conn = Conn::new();
    conn.client(&bin_request(0x01, 0, b"q3", b"v"));
    conn.server(&bin_response(0x01, 0, 0, b"", b""));
    conn.client(&bin_request(0x0c, 0, b"q3", b""));
    conn.server(&bin_response(0x0c, 0, 0, b"q3", b"v"));
    conn.client(&bin_request(0x07, 0, b"", b""));
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_set", "stored", "q3"),
            s("bin_getk", "hit", "q3"),
            s("bin_quit", "ok", ""),
        ]
    );
    assert!(conn.errors().is_empty());
    // A request before the quit whose answer never came is still unanswered, and a quit
    // that was answered keeps its latency.
    let mut conn = Conn::new();
    let mut requests = bin_request(0x00, 1, b"a", b"");
    requests.extend(bin_request(0x07, 2, b"", b""));
    conn.client(&requests);
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![s("bin_get", "unanswered", "a"), s("bin_quit", "ok", "")]
    );
    let mut conn = Conn::new();
    conn.client(&bin_request(0x07, 0, b"", b""));
    conn.server(&bin_response(0x07, 0, 0, b"", b""));
    conn.decoder.finish(&mut conn.out);
    let requests = conn.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, Status::Ok);
    assert_eq!(requests[0].latency_ns, Some(10_000));
}
