//! Partial captures, gaps and resynchronisation: split points, prefixes of large values,
//! garbage, lost chunks, the bounds on buffers and pending requests, and an uncaptured last
//! line inferred from what was captured.

use super::*;

#[test]
fn every_split_point_gives_the_same_result() {
    let request: &[u8] =
        b"get a b\r\nset k 0 0 5\r\nab\r\nc\r\nmg m v\r\nms n 2 T0\r\nxy\r\ndelete z\r\n";
    let response: &[u8] = b"VALUE b 0 3\r\nEND\r\nEND\r\nSTORED\r\nVA 2\r\nhi\r\nHD\r\nDELETED\r\n";
    let expected = vec![
        s("get", "miss", "a"),
        s("get", "hit", "b"),
        s("set", "stored", "k"),
        s("mg", "hit", "m"),
        s("ms", "stored", "n"),
        s("delete", "deleted", "z"),
    ];
    for split_request in 0..=request.len() {
        for split_response in 0..=response.len() {
            let mut conn = Conn::new();
            conn.client(&request[..split_request]);
            conn.client(&request[split_request..]);
            conn.server(&response[..split_response]);
            conn.server(&response[split_response..]);
            assert_eq!(
                conn.summary(),
                expected,
                "split at {split_request}/{split_response}"
            );
            assert!(conn.errors().is_empty());
        }
    }
}

#[test]
fn byte_by_byte_feeding_works() {
    let mut conn = Conn::new();
    for &b in b"get a\r\nset k 0 0 1\r\nx\r\n" {
        conn.client(&[b]);
    }
    for &b in b"VALUE a 0 1\r\n1\r\nEND\r\nNOT_STORED\r\n" {
        conn.server(&[b]);
    }
    assert_eq!(
        conn.summary(),
        vec![s("get", "hit", "a"), s("set", "not_stored", "k")]
    );
}

#[test]
fn large_values_are_framed_from_a_captured_prefix() {
    let mut conn = Conn::new();
    let value = vec![b'v'; 1000];
    let mut request = b"set big 0 0 1000\r\n".to_vec();
    request.extend_from_slice(&value);
    request.extend_from_slice(b"\r\n");
    // Only 64 bytes are captured; the rest is framed by length.
    conn.feed(Direction::ClientToServer, &request, 64);
    conn.server(b"STORED\r\n");
    conn.client(b"get big\r\n");
    let mut response = b"VALUE big 0 1000\r\n".to_vec();
    response.extend_from_slice(&value);
    response.extend_from_slice(b"\r\nEND\r\n");
    // The END line itself lies beyond the capture: its length alone identifies it.
    conn.feed(Direction::ServerToClient, &response, 256);
    let requests = conn.requests();
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![s("set", "stored", "big"), s("get", "hit", "big")]
    );
    assert_eq!(requests[0].request_bytes, request.len() as u64);
    assert_eq!(requests[1].response_bytes, response.len() as u64);
    assert!(conn.errors().is_empty());
    assert_eq!(conn.decoder.stats(), DecoderStats::default());
}

#[test]
fn uncaptured_responses_after_a_value_are_unknown() {
    let mut conn = Conn::new();
    conn.client(b"get a b\r\n");
    let mut response = b"VALUE a 0 500\r\n".to_vec();
    response.extend_from_slice(&[b'x'; 500]);
    response.extend_from_slice(b"\r\nVALUE b 0 1\r\ny\r\nEND\r\n");
    conn.feed(Direction::ServerToClient, &response, 200);
    assert_eq!(
        conn.summary(),
        vec![s("get", "hit", "a"), s("get", "unknown", "b")]
    );
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
    // The next payload starts at a response again.
    conn.client(b"get c\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "c")]);
    assert!(conn.errors().is_empty());
}

#[test]
fn command_line_longer_than_the_capture() {
    let mut conn = Conn::new();
    let key = "k".repeat(240);
    let request = format!("get {key}\r\n");
    conn.feed(Direction::ClientToServer, request.as_bytes(), 100);
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
    let response = format!("VALUE {key} 0 1\r\nx\r\nEND\r\n");
    conn.feed(Direction::ServerToClient, response.as_bytes(), 100);
    let requests = conn.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, Status::Hit);
    let kept = requests[0].key.unwrap();
    assert!(kept.is_truncated());
    assert_eq!(kept.as_bytes(), &key.as_bytes()[..96]);
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
    // Both directions resynchronise on the next payload.
    conn.client(b"get next\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "next")]);
    assert!(conn.errors().is_empty());
}

#[test]
fn uncaptured_pipelined_requests_do_not_shift_pairing() {
    let mut conn = Conn::new();
    // Three gets in one send; only the first is captured. The two unread are one unknown
    // (how many there were is not known), out of the hit ratio.
    conn.feed(Direction::ClientToServer, b"get a\r\nget b\r\nget c\r\n", 7);
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
    conn.server(b"END\r\nEND\r\nEND\r\n");
    assert_eq!(
        conn.summary(),
        vec![s("get", "unknown", ""), s("get", "miss", "a")]
    );
    // The answers to b and c fit nothing we saw.
    assert_eq!(
        conn.errors(),
        vec!["unexpected_response", "unexpected_response"]
    );
    conn.client(b"set d 0 0 1\r\nx\r\n");
    conn.server(b"STORED\r\n");
    assert_eq!(conn.summary(), vec![s("set", "stored", "d")]);
}

#[test]
fn partial_line_buffer_is_bounded() {
    let mut conn = Conn::with(DecoderConfig {
        max_line_len: 100,
        ..DecoderConfig::default()
    });
    let mut line = b"get".to_vec();
    for i in 0..40 {
        line.extend_from_slice(format!(" key{i}").as_bytes());
    }
    line.extend_from_slice(b"\r\n");
    for piece in line.chunks(30) {
        conn.client(piece);
    }
    assert_eq!(conn.errors(), vec!["line_too_long"]);
    conn.server(b"VALUE key0 0 1\r\nx\r\nEND\r\n");
    let summary = conn.summary();
    assert_eq!(summary[0], s("get", "hit", "key0"));
    assert!(summary.len() < 40 && summary.len() > 10, "{summary:?}");
    // Framing continued after the long line.
    conn.client(b"get z\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "z")]);
    assert!(conn.errors().is_empty());
}

#[test]
fn garbage_without_newline_never_grows_the_buffer() {
    let mut conn = Conn::new();
    for _ in 0..1000 {
        conn.client(&[b'a'; 1000]);
    }
    assert_eq!(conn.errors(), vec!["line_too_long"]);
    conn.client(b"\r\nget k\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "k")]);
}

#[test]
fn resync_after_garbage() {
    let mut conn = Conn::new();
    conn.client(b"\x16\x03\x01garbage\r\nmore junk\r\nget k\r\n");
    assert_eq!(conn.errors(), vec!["garbage"]);
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "k")]);
    conn.client(b"get j\r\n");
    conn.server(b"\x00\x01\x02 junk\r\nVALUE j 0 1\r\nx\r\nEND\r\n");
    assert_eq!(conn.errors(), vec!["garbage"]);
    assert_eq!(conn.summary(), vec![s("get", "hit", "j")]);
    assert!(conn.decoder.stats().undecoded_client_bytes >= 20);
}

#[test]
fn wrong_data_length_is_detected_by_the_terminator() {
    let mut conn = Conn::new();
    // Declares 2 bytes but sends 5: the block's "\r\n" is not where it should be.
    conn.client(b"set k 0 0 2\r\nhello\r\nget k\r\n");
    assert_eq!(conn.errors(), vec!["garbage"]);
    conn.server(b"CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n");
    let summary = conn.summary();
    assert_eq!(
        summary,
        vec![s("set", "client_error", "k"), s("get", "miss", "k")]
    );
    // The ERROR answering the misread data line is not taken for get's answer.
    assert_eq!(conn.errors(), vec!["unexpected_response"]);
}

#[test]
fn client_gap_makes_responses_prove_their_request() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\n");
    conn.decoder
        .note_gap(Direction::ClientToServer, &mut conn.out);
    // Lost: "set b ..." and its STORED arrives.
    conn.server(b"END\r\nSTORED\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "a")]);
    assert_eq!(conn.errors(), vec!["gap", "unexpected_response"]);
    conn.client(b"delete c\r\n");
    conn.server(b"DELETED\r\n");
    assert_eq!(conn.summary(), vec![s("delete", "deleted", "c")]);
}

#[test]
fn server_gap_finishes_outstanding_requests_as_unknown() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\nget b\r\n");
    conn.server(b"VALUE a 0 10\r\n01234");
    conn.decoder
        .note_gap(Direction::ServerToClient, &mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![s("get", "hit", "a"), s("get", "unknown", "b")]
    );
    assert_eq!(conn.errors(), vec!["gap"]);
    // The rest of the value arrives. Digits at a chunk start look like an incr answer, so
    // resynchronisation takes it for one; nothing is outstanding, so all three lines are
    // reported as unexpected rather than paired.
    conn.server(b"56789\r\nEND\r\nEND\r\n");
    assert_eq!(
        conn.errors(),
        vec![
            "unexpected_response",
            "unexpected_response",
            "unexpected_response"
        ]
    );
    conn.client(b"get c\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "c")]);
}

#[test]
fn lost_response_is_skipped_when_a_later_one_fits() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\nset b 0 0 1\r\nx\r\n");
    // get a's END never shows up (no gap was reported); STORED only fits set b.
    conn.server(b"STORED\r\n");
    assert_eq!(
        conn.summary(),
        vec![s("get", "unknown", "a"), s("set", "stored", "b")]
    );
}

#[test]
fn expire_and_finish() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\n");
    let sent = conn.ts;
    conn.client(b"get b\r\n");
    conn.decoder.expire(sent + 5_000, 10_000, &mut conn.out);
    assert!(conn.summary().is_empty());
    conn.decoder.expire(sent + 10_000, 10_000, &mut conn.out);
    assert_eq!(conn.summary(), vec![s("get", "timeout", "a")]);
    conn.client(b"set c 0 0 100\r\nonly part");
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![s("get", "unanswered", "b"), s("set", "unanswered", "c")]
    );
    assert_eq!(conn.decoder.pending(), 0);
}

#[test]
fn pending_queue_is_bounded() {
    let mut conn = Conn::with(DecoderConfig {
        max_pending: 2,
        ..DecoderConfig::default()
    });
    conn.client(b"get a\r\nget b\r\nget c\r\nget d\r\n");
    assert_eq!(conn.errors(), vec!["pending_overflow", "pending_overflow"]);
    assert_eq!(conn.decoder.pending(), 2);
    conn.server(b"END\r\nEND\r\nEND\r\nEND\r\n");
    assert_eq!(
        conn.summary(),
        vec![s("get", "miss", "a"), s("get", "miss", "b")]
    );
    assert_eq!(
        conn.errors(),
        vec!["unexpected_response", "unexpected_response"]
    );
}

/// A quiet get that has to give way to a newer request finishes as unknown, not as the miss
/// its silence would mean: its hit may still be on the way (and then fits nothing).
#[test]
fn quiet_gets_past_the_queue_give_way_as_unknown() {
    let mut conn = Conn::with(DecoderConfig {
        max_pending: 2,
        ..DecoderConfig::default()
    });
    let mut batch = Vec::new();
    for key in [b"a", b"b", b"c"] {
        batch.extend(bin_request(0x0d, 0, key, b""));
    }
    batch.extend(bin_request(0x0a, 0, b"", b""));
    conn.client(&batch);
    assert_eq!(conn.errors(), vec!["pending_overflow", "pending_overflow"]);
    let mut answers = bin_response(0x0d, 0, 0, b"a", b"va");
    answers.extend(bin_response(0x0d, 0, 0, b"c", b"vc"));
    answers.extend(bin_response(0x0a, 0, 0, b"", b""));
    conn.server(&answers);
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_getkq", "unknown", "a"),
            s("bin_getkq", "unknown", "b"),
            s("bin_getkq", "hit", "c"),
            s("bin_noop", "ok", ""),
        ]
    );
    assert_eq!(conn.errors(), vec!["unexpected_response"]);
}

/// Quiet requests give way to a key only while the key store is full: a keyless one (FlushQ)
/// frees no slot, so the next quiet one goes too.
#[test]
fn quiet_requests_give_way_until_a_key_fits() {
    let mut conn = Conn::with(DecoderConfig {
        max_pending_keys: 1,
        ..DecoderConfig::default()
    });
    let mut batch = bin_request(0x18, 1, b"", b"");
    batch.extend(bin_request(0x11, 2, b"a", b"v"));
    batch.extend(bin_request(0x11, 3, b"b", b"v"));
    batch.extend(bin_request(0x0a, 4, b"", b""));
    conn.client(&batch);
    conn.server(&bin_response(0x0a, 0, 4, b"", b""));
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_flushq", "ok", ""),
            s("bin_setq", "stored", "a"),
            s("bin_setq", "stored", "b"),
            s("bin_noop", "ok", ""),
        ]
    );
    assert_eq!(conn.errors(), vec!["pending_overflow", "pending_overflow"]);
}

#[test]
fn multi_get_keys_are_bounded() {
    let mut conn = Conn::with(DecoderConfig {
        max_pending_keys: 3,
        max_key_len: 2,
        ..DecoderConfig::default()
    });
    conn.client(b"get aaa bbb ccc ddd eee\r\n");
    assert_eq!(conn.errors(), vec!["pending_overflow"]);
    conn.server(b"VALUE aaa 0 1\r\nx\r\nVALUE eee 0 1\r\ny\r\nEND\r\n");
    let requests = conn.requests();
    // The hit of a key not kept counts as one (its key cut as kept keys are); the misses
    // among the keys not kept cannot be told: one unknown, out of the hit ratio.
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![
            s("get", "hit", "ee"),
            s("get", "hit", "aa"),
            s("get", "miss", "bb"),
            s("get", "miss", "cc"),
            s("get", "unknown", ""),
        ]
    );
    assert!(requests[..4].iter().all(|r| r.key.unwrap().is_truncated()));
}

// Inferring an uncaptured last line.

#[test]
fn end_partly_captured_is_recognised() {
    let mut conn = Conn::new();
    conn.client(b"get k\r\n");
    let mut response = b"VALUE k 0 100\r\n".to_vec();
    response.extend_from_slice(&[b'v'; 100]);
    response.extend_from_slice(b"\r\nEND\r\n");
    // The capture ends just after END's first byte.
    conn.feed(Direction::ServerToClient, &response, response.len() - 4);
    assert_eq!(conn.summary(), vec![s("get", "hit", "k")]);
    assert!(conn.errors().is_empty());
    conn.client(b"incr n 1\r\n");
    conn.server(b"2\r\n");
    assert_eq!(conn.summary(), vec![s("incr", "ok", "n")]);
}

#[test]
fn ambiguous_uncaptured_line_is_not_guessed() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\nset b 0 0 1\r\nx\r\n");
    let mut response = b"VALUE a 0 100\r\n".to_vec();
    response.extend_from_slice(&[b'v'; 100]);
    // END plus an 8-byte line: STORED and EXISTS are both 8 bytes long.
    response.extend_from_slice(b"\r\nEND\r\nSTORED\r\n");
    conn.feed(Direction::ServerToClient, &response, 100);
    assert_eq!(
        conn.summary(),
        vec![s("get", "hit", "a"), s("set", "unknown", "b")]
    );
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
}

#[test]
fn meta_mn_beyond_the_capture_closes_quiet_gets() {
    let mut conn = Conn::new();
    conn.client(b"mg a v q k\r\nmg b v q k\r\nmn\r\n");
    let mut response = b"VA 300 ka\r\n".to_vec();
    response.extend_from_slice(&[b'v'; 300]);
    response.extend_from_slice(b"\r\nMN\r\n");
    conn.feed(Direction::ServerToClient, &response, 256);
    assert_eq!(
        conn.summary(),
        vec![s("mg", "hit", "a"), s("mg", "miss", "b"), s("mn", "ok", "")]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn binary_noop_beyond_the_capture_closes_quiet_gets() {
    let mut conn = Conn::new();
    let mut requests = bin_request(0x0d, 1, b"a", b"");
    requests.extend(bin_request(0x0d, 2, b"b", b""));
    requests.extend(bin_request(0x0a, 3, b"", b""));
    conn.client(&requests);
    let mut responses = bin_response(0x0d, 0, 1, b"a", &[b'v'; 300]);
    responses.extend(bin_response(0x0a, 0, 3, b"", b""));
    conn.feed(Direction::ServerToClient, &responses, 256);
    assert_eq!(
        conn.summary(),
        vec![
            s("bin_getkq", "hit", "a"),
            s("bin_getkq", "miss", "b"),
            s("bin_noop", "ok", "")
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn numeric_answers_are_resync_points() {
    let mut conn = Conn::new();
    conn.client(b"incr n 1\r\n");
    conn.server(b"\x00junk\r\n");
    assert_eq!(conn.errors(), vec!["garbage"]);
    conn.server(b"7\r\n");
    assert_eq!(conn.summary(), vec![s("incr", "ok", "n")]);
}

#[test]
fn a_marker_does_not_block_pairing_forever() {
    let mut conn = Conn::new();
    // Lost client events, then an incr whose answer is lost as well, unreported.
    conn.decoder
        .note_gap(Direction::ClientToServer, &mut conn.out);
    conn.client(b"incr n 1\r\n");
    for i in 0..20 {
        conn.client(format!("get k{i}\r\n").as_bytes());
        conn.server(b"END\r\n");
    }
    // The marker holds back the first answers (they might belong to lost requests), then
    // gives up: the incr is reported unknown and the gets are paired again.
    let summary = conn.summary();
    assert_eq!(summary[0], s("incr", "unknown", "n"));
    assert_eq!(summary.len(), 1 + 20 - 8, "{summary:?}");
    assert_eq!(conn.decoder.pending(), 8);
    assert_eq!(conn.errors().len(), 1 + 8);
}

/// Issue #17: a multi-get answered with megabytes of values (node's `memcached` getMulti of
/// 100 keys up to 1 MB each, read slowly under load) was still arriving when the timeout,
/// counted from the request, expired it: the rest of its VALUE items became
/// `unexpected_response` and its unanswered keys timeouts. The timeout counts from the
/// answer's last progress (a response, or value bytes between two).
#[test]
fn multi_get_answer_in_progress_does_not_time_out() {
    let mut conn = Conn::new();
    let timeout = 25_000;
    conn.client(b"get a b c\r\n");
    conn.server(b"VALUE a 0 3\r\nxyz\r\nVALUE b 0 10\r\n0123");
    conn.server(b"4567");
    conn.server(b"89");
    // Longer than the timeout since the request, not since the last value bytes.
    conn.decoder.expire(conn.ts + 5_000, timeout, &mut conn.out);
    assert!(conn.summary().is_empty());
    conn.server(b"\r\nEND\r\n");
    assert_eq!(
        conn.summary(),
        vec![
            s("get", "hit", "a"),
            s("get", "hit", "b"),
            s("get", "miss", "c")
        ]
    );
    assert!(conn.errors().is_empty());
    // An answer that stops coming still times out, counted from its last progress.
    conn.client(b"get d e\r\n");
    conn.server(b"VALUE d 0 1\r\nx\r\n");
    conn.decoder
        .expire(conn.ts + timeout - 1, timeout, &mut conn.out);
    assert!(conn.summary().is_empty());
    conn.decoder
        .expire(conn.ts + timeout, timeout, &mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![s("get", "hit", "d"), s("get", "timeout", "e")]
    );
}

/// Audit 2026-12-07 (`slowread.py --pipe`): a client reads a 100 KB value 4 KiB at a time for
/// longer than the timeout, with two more gets pipelined behind it. Text was right; binary
/// timed out all three (its answer is paired only once its whole body is in, so its bytes
/// were no progress) and meta the two behind the value (the rest of the `VA` value after its
/// head is no answer of theirs). Bytes of an answer on the way count for every protocol.
#[test]
fn a_long_answer_that_keeps_coming_is_no_timeout_in_any_protocol() {
    let value: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let text = {
        let mut answer = format!("VALUE big 0 {}\r\n", value.len()).into_bytes();
        answer.extend_from_slice(&value);
        answer.extend_from_slice(b"\r\nEND\r\nVALUE small 0 10\r\nxxxxxxxxxx\r\nEND\r\nEND\r\n");
        (
            b"get big\r\nget small\r\nget nokeyp\r\n".to_vec(),
            answer,
            ["get", "get", "get"],
        )
    };
    let meta = {
        let mut answer = format!("VA {}\r\n", value.len()).into_bytes();
        answer.extend_from_slice(&value);
        answer.extend_from_slice(b"\r\nVA 10\r\nxxxxxxxxxx\r\nEN\r\n");
        (
            b"mg big v\r\nmg small v\r\nmg nokeyp v\r\n".to_vec(),
            answer,
            ["mg", "mg", "mg"],
        )
    };
    let binary = {
        let mut request = bin_request(0x00, 0, b"big", b"");
        request.extend(bin_request(0x00, 0, b"small", b""));
        request.extend(bin_request(0x00, 0, b"nokeyp", b""));
        let mut answer = bin_response(0x00, 0, 0, b"", &value);
        answer.extend(bin_response(0x00, 0, 0, b"", b"xxxxxxxxxx"));
        answer.extend(bin_response(0x00, 1, 0, b"", b"Not found"));
        (request, answer, ["bin_get", "bin_get", "bin_get"])
    };
    // 25 reads 10 µs apart: the answer takes 10 timeouts to arrive, never pausing for one.
    let timeout = 25_000;
    for (request, answer, commands) in [binary, meta, text] {
        let mut conn = Conn::new();
        conn.client(&request);
        for read in answer.chunks(4096) {
            conn.server(read);
            conn.decoder.expire(conn.ts, timeout, &mut conn.out);
        }
        assert_eq!(
            conn.summary(),
            vec![
                s(commands[0], "hit", "big"),
                s(commands[1], "hit", "small"),
                s(commands[2], "miss", "nokeyp"),
            ],
            "{}",
            commands[0]
        );
        assert!(conn.errors().is_empty(), "{}", commands[0]);
        // An answer that stops coming still times out, counted from its last bytes.
        conn.client(&request);
        conn.server(&answer[..5000]);
        let last = conn.ts;
        // What the bytes so far finished (meta's big hit) is not the point here.
        conn.summary();
        conn.decoder
            .expire(last + timeout - 1, timeout, &mut conn.out);
        assert!(conn.summary().is_empty(), "{}", commands[0]);
        conn.decoder.expire(last + timeout, timeout, &mut conn.out);
        assert!(
            conn.summary()
                .iter()
                .any(|(_, status, _)| *status == "timeout"),
            "{}",
            commands[0]
        );
    }
}
