//! Meta commands: get forms, mutations and return codes, quiet pipelines, opaques and base64
//! keys.

use super::*;

#[test]
fn meta_get_forms() {
    assert_exchanges(&[
        (b"mg foo v\r\n", b"VA 3\r\nbar\r\n", &[("mg", "hit", "foo")]),
        (b"mg foo t\r\n", b"HD t-1\r\n", &[("mg", "hit", "foo")]),
        (b"mg foo v\r\n", b"EN\r\n", &[("mg", "miss", "foo")]),
        (
            b"me foo\r\n",
            b"ME foo exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n",
            &[("me", "hit", "foo")],
        ),
        (b"me foo\r\n", b"EN\r\n", &[("me", "miss", "foo")]),
        (b"mn\r\n", b"MN\r\n", &[("mn", "ok", "")]),
    ]);
}

#[test]
fn meta_mutations_and_return_codes() {
    let cases: &[(&[u8], &[u8], Summary)] = &[
        (b"ms k 2 T60\r\nhi\r\n", b"HD\r\n", s("ms", "stored", "k")),
        (
            b"ms k 2 ME\r\nhi\r\n",
            b"NS\r\n",
            s("ms", "not_stored", "k"),
        ),
        (b"ms k 2 C5\r\nhi\r\n", b"EX\r\n", s("ms", "exists", "k")),
        (b"ms k 2 C5\r\nhi\r\n", b"NF\r\n", s("ms", "not_found", "k")),
        (b"ms k S2 T0\r\nhi\r\n", b"HD\r\n", s("ms", "stored", "k")),
        (b"md k\r\n", b"HD\r\n", s("md", "deleted", "k")),
        (b"md k C9\r\n", b"EX\r\n", s("md", "exists", "k")),
        (b"md k\r\n", b"NF\r\n", s("md", "not_found", "k")),
        (b"ma n\r\n", b"HD\r\n", s("ma", "ok", "n")),
        (b"ma n v D5\r\n", b"VA 2\r\n10\r\n", s("ma", "ok", "n")),
        (b"ma n\r\n", b"NF\r\n", s("ma", "not_found", "n")),
        (b"ma n N0\r\n", b"NS\r\n", s("ma", "not_stored", "n")),
        (
            b"mg k v\r\n",
            b"CLIENT_ERROR bad command line format\r\n",
            s("mg", "client_error", "k"),
        ),
    ];
    assert_single_exchanges(cases);
}

#[test]
fn meta_quiet_pipeline_flushed_by_mn() {
    let mut conn = Conn::new();
    conn.client(b"mg a v q k\r\nmg b v q k\r\nmg c v q k\r\nms d 1 q\r\nx\r\nmd e q\r\nmn\r\n");
    // Only b hits; the misses, the stored set and the delete are silent.
    conn.server(b"VA 1 kb\r\nB\r\nMN\r\n");
    let requests = conn.requests();
    assert_eq!(
        requests.iter().map(summarize).collect::<Vec<_>>(),
        vec![
            s("mg", "miss", "a"),
            s("mg", "hit", "b"),
            s("mg", "miss", "c"),
            s("ms", "stored", "d"),
            s("md", "deleted", "e"),
            s("mn", "ok", ""),
        ]
    );
    assert!(requests.iter().all(|r| r.latency_ns.is_some()));
    assert!(conn.errors().is_empty());
}

#[test]
fn meta_quiet_failure_is_returned() {
    let mut conn = Conn::new();
    conn.client(b"ms a 1 q k\r\nx\r\nms b 1 q k C1\r\ny\r\nmn\r\n");
    conn.server(b"EX kb\r\nMN\r\n");
    assert_eq!(
        conn.summary(),
        vec![
            s("ms", "stored", "a"),
            s("ms", "exists", "b"),
            s("mn", "ok", "")
        ]
    );
}

#[test]
fn meta_opaque_matches_responses() {
    let mut conn = Conn::new();
    conn.client(b"mg a v q O1\r\nmg b v q O2\r\nmn\r\n");
    conn.server(b"VA 1 O2\r\nx\r\nMN\r\n");
    assert_eq!(
        conn.summary(),
        vec![s("mg", "miss", "a"), s("mg", "hit", "b"), s("mn", "ok", "")]
    );
}

#[test]
fn meta_base64_keys_are_decoded() {
    let mut conn = Conn::new();
    // "Zm9v" is "foo", "YmFy" is "bar".
    conn.client(b"mg Zm9v b v q k\r\nmg YmFy b v q k\r\nmn\r\n");
    conn.server(b"VA 1 kYmFy b\r\nx\r\nMN\r\n");
    assert_eq!(
        conn.summary(),
        vec![
            s("mg", "miss", "foo"),
            s("mg", "hit", "bar"),
            s("mn", "ok", "")
        ]
    );
}

/// A text or meta session's quit is answered by the close alone (as pylibmc's text mode and
/// meta clients end it): the quit is noreply, and a quiet meta mutation before it that no
/// `mn` flushed finishes with what its silence means; nothing is unanswered.
#[test]
fn quit_without_mn_then_close_leaves_nothing_unanswered() {
    let mut conn = Conn::new();
    conn.client(b"set q3 0 0 1\r\nv\r\n");
    conn.server(b"STORED\r\n");
    conn.client(b"get q3\r\n");
    conn.server(b"VALUE q3 0 1\r\nv\r\nEND\r\n");
    conn.client(b"ms m 1 q\r\nv\r\nquit\r\n");
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        conn.summary(),
        vec![
            s("set", "stored", "q3"),
            s("get", "hit", "q3"),
            s("quit", "noreply", ""),
            s("ms", "stored", "m"),
        ]
    );
    assert!(conn.errors().is_empty());
}
