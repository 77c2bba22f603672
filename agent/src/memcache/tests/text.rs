//! Text-protocol commands and their responses, pipelines, latency, and queue mode (text
//! commands against a memcache-protocol queue server).

use super::*;

#[test]
fn get_hit_reports_key_latency_and_bytes() {
    let mut conn = Conn::new();
    conn.client(b"get alpha\r\n");
    conn.server(b"VALUE alpha 0 11\r\nhello world\r\nEND\r\n");
    let requests = conn.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.command, Command::Get);
    assert_eq!(r.status, Status::Hit);
    assert_eq!(r.key.unwrap().as_bytes(), b"alpha");
    assert_eq!(r.latency_ns, Some(10_000));
    assert_eq!(r.request_bytes, 11);
    assert_eq!(r.response_bytes, 36);
    assert_eq!(r.queue, None);
    assert_eq!(conn.decoder.pending(), 0);
}

#[test]
fn get_miss() {
    assert_eq!(
        exchange(b"get alpha\r\n", b"END\r\n"),
        vec![s("get", "miss", "alpha")]
    );
}

#[test]
fn multi_get_reports_each_key_and_splits_bytes() {
    let mut conn = Conn::new();
    conn.client(b"get a b c\r\n");
    conn.server(b"VALUE a 0 1\r\nx\r\nVALUE c 5 2\r\nyy\r\nEND\r\n");
    let requests = conn.requests();
    let summary: Vec<_> = requests.iter().map(summarize).collect();
    assert_eq!(
        summary,
        vec![
            s("get", "hit", "a"),
            s("get", "miss", "b"),
            s("get", "hit", "c")
        ]
    );
    assert_eq!(requests.iter().map(|r| r.request_bytes).sum::<u64>(), 11);
    assert_eq!(
        requests.iter().map(|r| r.response_bytes).sum::<u64>(),
        16 + 17 + 5
    );
    assert!(requests.iter().all(|r| r.latency_ns == Some(10_000)));
}

#[test]
fn multi_get_with_repeated_key() {
    assert_eq!(
        exchange(
            b"gets k k\r\n",
            b"VALUE k 0 1 99\r\nx\r\nVALUE k 0 1 99\r\nx\r\nEND\r\n"
        ),
        vec![s("gets", "hit", "k"), s("gets", "hit", "k")]
    );
}

#[test]
fn gat_and_gats_skip_the_exptime() {
    assert_exchanges(&[
        (
            b"gat 300 a b\r\n",
            b"VALUE b 0 1\r\nx\r\nEND\r\n",
            &[("gat", "miss", "a"), ("gat", "hit", "b")],
        ),
        (
            b"gats 0 a\r\n",
            b"VALUE a 0 1 7\r\nx\r\nEND\r\n",
            &[("gats", "hit", "a")],
        ),
    ]);
}

#[test]
fn storage_commands_and_their_statuses() {
    let cases: &[(&[u8], &[u8], Summary)] = &[
        (
            b"set k 0 0 2\r\nab\r\n",
            b"STORED\r\n",
            s("set", "stored", "k"),
        ),
        (
            b"add k 1 60 2\r\nab\r\n",
            b"NOT_STORED\r\n",
            s("add", "not_stored", "k"),
        ),
        (
            b"replace k 0 0 0\r\n\r\n",
            b"NOT_STORED\r\n",
            s("replace", "not_stored", "k"),
        ),
        (
            b"append k 0 0 1\r\nz\r\n",
            b"STORED\r\n",
            s("append", "stored", "k"),
        ),
        (
            b"prepend k 0 0 1\r\nz\r\n",
            b"NOT_STORED\r\n",
            s("prepend", "not_stored", "k"),
        ),
        (
            b"cas k 0 0 1 12\r\nz\r\n",
            b"EXISTS\r\n",
            s("cas", "exists", "k"),
        ),
        (
            b"cas k 0 0 1 12\r\nz\r\n",
            b"NOT_FOUND\r\n",
            s("cas", "not_found", "k"),
        ),
        (
            b"set k 0 0 3\r\na\r\n\r\n",
            b"SERVER_ERROR out of memory storing object\r\n",
            s("set", "server_error", "k"),
        ),
    ];
    assert_single_exchanges(cases);
}

#[test]
fn value_containing_protocol_text_is_skipped_by_length() {
    assert_exchanges(&[
        (
            b"set k 0 0 13\r\nEND\r\nSTORED\r\n\r\n",
            b"STORED\r\n",
            &[("set", "stored", "k")],
        ),
        (
            b"get k\r\n",
            b"VALUE k 0 7\r\nEND\r\n\r\n\r\nEND\r\n",
            &[("get", "hit", "k")],
        ),
    ]);
}

#[test]
fn noreply_is_reported_at_once_without_a_response() {
    let mut conn = Conn::new();
    conn.client(b"set alpha 0 0 11 noreply\r\nhello world\r\n");
    let requests = conn.requests();
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![s("set", "noreply", "alpha")]
    );
    assert_eq!(requests[0].latency_ns, None);
    assert_eq!(requests[0].request_bytes, 39);
    assert_eq!(conn.decoder.pending(), 0);
    conn.client(
        b"delete a noreply\r\nincr n 1 noreply\r\ndecr n 1 noreply\r\ntouch t 10 noreply\r\n",
    );
    conn.client(
        b"cas k 0 0 1 5 noreply\r\nx\r\nflush_all 0 noreply\r\nverbosity 1 noreply\r\nquit\r\n",
    );
    assert_eq!(
        conn.summary(),
        vec![
            s("delete", "noreply", "a"),
            s("incr", "noreply", "n"),
            s("decr", "noreply", "n"),
            s("touch", "noreply", "t"),
            s("cas", "noreply", "k"),
            s("flush_all", "noreply", ""),
            s("verbosity", "noreply", ""),
            s("quit", "noreply", ""),
        ]
    );
    // Nothing is outstanding, so the next exchange pairs normally.
    conn.client(b"get alpha\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "alpha")]);
    assert!(conn.errors().is_empty());
}

#[test]
fn other_single_line_commands() {
    let cases: &[(&[u8], &[u8], Summary)] = &[
        (b"delete k\r\n", b"DELETED\r\n", s("delete", "deleted", "k")),
        (
            b"delete k 0\r\n",
            b"NOT_FOUND\r\n",
            s("delete", "not_found", "k"),
        ),
        (b"incr n 5\r\n", b"15\r\n", s("incr", "ok", "n")),
        (
            b"decr n 5\r\n",
            b"NOT_FOUND\r\n",
            s("decr", "not_found", "n"),
        ),
        (
            b"incr n 5\r\n",
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
            s("incr", "client_error", "n"),
        ),
        (
            b"touch k 60\r\n",
            b"TOUCHED\r\n",
            s("touch", "touched", "k"),
        ),
        (
            b"touch k 60\r\n",
            b"NOT_FOUND\r\n",
            s("touch", "not_found", "k"),
        ),
        (
            b"version\r\n",
            b"VERSION 1.6.18\r\n",
            s("version", "ok", ""),
        ),
        (b"verbosity 1\r\n", b"OK\r\n", s("verbosity", "ok", "")),
        (b"flush_all\r\n", b"OK\r\n", s("flush_all", "ok", "")),
        (
            b"stats\r\n",
            b"STAT pid 1\r\nSTAT uptime 5\r\nEND\r\n",
            s("stats", "ok", ""),
        ),
        (b"stats reset\r\n", b"RESET\r\n", s("stats", "ok", "")),
        (
            b"stats cachedump 1 1\r\n",
            b"ITEM k [1 b; 0 s]\r\nEND\r\n",
            s("stats", "ok", ""),
        ),
        (b"slabs automove 1\r\n", b"OK\r\n", s("other", "ok", "")),
        (b"get\r\n", b"ERROR\r\n", s("get", "error", "")),
    ];
    assert_single_exchanges(cases);
}

#[test]
fn stats_bytes_cover_every_line() {
    let mut conn = Conn::new();
    conn.client(b"stats\r\n");
    conn.server(b"STAT pid 1\r\nSTAT uptime 5\r\nEND\r\n");
    let r = &conn.requests()[0];
    assert_eq!(r.response_bytes, 12 + 15 + 5);
}

#[test]
fn pipelined_requests_pair_in_order() {
    let mut conn = Conn::new();
    conn.client(b"get a\r\nset b 0 0 1\r\nx\r\ndelete c\r\nget d e\r\nincr n 1\r\n");
    assert_eq!(conn.decoder.pending(), 5);
    conn.server(
        b"VALUE a 0 1\r\n1\r\nEND\r\nSTORED\r\nNOT_FOUND\r\nVALUE e 0 1\r\n2\r\nEND\r\n3\r\n",
    );
    assert_eq!(
        conn.summary(),
        vec![
            s("get", "hit", "a"),
            s("set", "stored", "b"),
            s("delete", "not_found", "c"),
            s("get", "miss", "d"),
            s("get", "hit", "e"),
            s("incr", "ok", "n"),
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn latency_is_from_request_completion_to_first_response_byte() {
    let mut conn = Conn::new();
    conn.client(b"set k 0 0 4\r\n"); // ts +10us
    conn.client(b"da"); // +20us
    conn.client(b"ta\r\n"); // +30us: request complete
    conn.server(b"STO"); // +40us: first response byte
    conn.server(b"RED\r\n");
    let r = &conn.requests()[0];
    assert_eq!(r.status, Status::Stored);
    assert_eq!(r.latency_ns, Some(10_000));
    assert_eq!(r.request_bytes, 19);
}

#[test]
fn queue_mode_enqueue_dequeue_and_empty_poll() {
    let mut conn = Conn::queue();
    conn.client(b"set jobs 0 0 3\r\nabc\r\n");
    conn.server(b"STORED\r\n");
    conn.client(b"get jobs\r\n");
    conn.server(b"VALUE jobs 0 3\r\nabc\r\nEND\r\n");
    conn.client(b"get jobs\r\n");
    conn.server(b"END\r\n");
    let ops: Vec<_> = conn
        .requests()
        .iter()
        .map(|r| {
            (
                r.key.unwrap().as_bytes().to_vec(),
                r.queue.unwrap().op,
                r.status,
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            (b"jobs".to_vec(), QueueOpKind::Enqueue, Status::Stored),
            (b"jobs".to_vec(), QueueOpKind::Dequeue, Status::Hit),
            (b"jobs".to_vec(), QueueOpKind::EmptyPoll, Status::Miss),
        ]
    );
}

#[test]
fn queue_mode_kestrel_options() {
    let mut conn = Conn::queue();
    let cases: &[(&[u8], &[u8], QueueOpKind)] = &[
        (
            b"get jobs/t=500/open\r\n",
            b"VALUE jobs 0 1\r\nx\r\nEND\r\n",
            QueueOpKind::Open,
        ),
        (
            b"get jobs/close/open\r\n",
            b"END\r\n",
            QueueOpKind::EmptyPoll,
        ),
        (b"get jobs/close\r\n", b"END\r\n", QueueOpKind::Close),
        (b"get jobs/abort\r\n", b"END\r\n", QueueOpKind::Abort),
        (
            b"get jobs/peek\r\n",
            b"VALUE jobs/peek 0 1\r\nx\r\nEND\r\n",
            QueueOpKind::Peek,
        ),
        (b"get jobs/t=10\r\n", b"END\r\n", QueueOpKind::EmptyPoll),
    ];
    for (request, response, op) in cases {
        conn.client(request);
        conn.server(response);
        let requests = conn.requests();
        assert_eq!(requests.len(), 1, "{}", request.escape_ascii());
        let r = &requests[0];
        assert_eq!(r.key.unwrap().as_bytes(), b"jobs");
        assert_eq!(r.queue.unwrap().op, *op, "{}", request.escape_ascii());
    }
    conn.client(b"get jobs/t=500/open/bogus\r\n");
    conn.server(b"END\r\n");
    let options = conn.requests()[0].queue.unwrap().options;
    assert_eq!(
        options,
        KestrelOptions {
            timeout_ms: Some(500),
            open: true,
            unknown_option: true,
            ..KestrelOptions::default()
        }
    );
    assert!(conn.errors().is_empty());
}

/// Kestrel's blocking fetch (`t=6000`) lets the server wait 6 s for an item: an empty answer
/// then is the wait the client asked for, not a timeout, and not the server's latency. Only
/// silence past the wait plus the usual timeout is one.
#[test]
fn queue_blocking_fetch_times_out_only_after_its_wait() {
    const SEC: u64 = 1_000_000_000;
    const TIMEOUT: u64 = 5 * SEC;
    let mut conn = Conn::queue();
    conn.client(b"get rare/t=6000\r\n");
    let sent = conn.ts;
    conn.decoder.expire(sent + 6 * SEC, TIMEOUT, &mut conn.out);
    assert!(conn.requests().is_empty(), "expired within its wait");
    conn.ts = sent + 6 * SEC;
    conn.server(b"END\r\n");
    let requests = conn.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.status, Status::Miss);
    assert_eq!(r.queue.unwrap().op, QueueOpKind::EmptyPoll);
    assert!(r.is_blocking_fetch());
    assert!(r.latency_ns.unwrap() >= 6 * SEC);
    assert_eq!(r.server_latency_ns(), None);

    conn.client(b"get rare/t=6000\r\n");
    let sent = conn.ts;
    conn.decoder
        .expire(sent + 6 * SEC + TIMEOUT - 1, TIMEOUT, &mut conn.out);
    assert!(conn.requests().is_empty(), "expired within its wait");
    conn.decoder
        .expire(sent + 6 * SEC + TIMEOUT, TIMEOUT, &mut conn.out);
    let requests = conn.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, Status::Timeout);

    // A fetch that does not wait, or only closes an open read, has the usual timeout.
    for request in [&b"get jobs\r\n"[..], b"get jobs/close/t=6000\r\n"] {
        conn.client(request);
        let sent = conn.ts;
        conn.decoder.expire(sent + TIMEOUT, TIMEOUT, &mut conn.out);
        let requests = conn.requests();
        assert_eq!(requests.len(), 1, "{}", request.escape_ascii());
        assert_eq!(requests[0].status, Status::Timeout);
        assert!(!requests[0].is_blocking_fetch());
    }
    assert!(conn.errors().is_empty());
}

#[test]
fn error_replies_keep_their_words_for_every_key() {
    let mut conn = Conn::new();
    conn.client(b"set k 0 0 1\r\nx\r\nget a b\r\ntouch k 10\r\nget c\r\n");
    conn.server(b"SERVER_ERROR out of memory storing object\r\n");
    conn.server(b"SERVER_ERROR Connection timed out\r\n");
    conn.server(b"ERROR\r\n");
    conn.server(b"CLIENT_ERROR bad key c0ffee:1 in get\r\n");
    let said: Vec<(String, Option<String>)> = conn
        .requests()
        .iter()
        .map(|r| {
            (
                r.status.as_str().to_string(),
                r.error_text.map(|t| t.to_string()),
            )
        })
        .collect();
    let text = |t: &str| Some(t.to_string());
    assert_eq!(
        said,
        vec![
            ("server_error".into(), text("out of memory storing object")),
            ("server_error".into(), text("Connection timed out")),
            ("server_error".into(), text("Connection timed out")),
            ("error".into(), text("")),
            ("client_error".into(), text("bad key ...")),
        ]
    );
    // Other answers carry no text.
    let mut conn = Conn::new();
    conn.client(b"get a\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.requests()[0].error_text, None);
}
