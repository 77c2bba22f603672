//! What a request observation carries besides command and status: the TCP sequence number of
//! its first byte, value sizes and keys per request.

use super::*;

/// The sequence numbers of finished requests, in completion order.
fn seqs(conn: &mut Conn) -> Vec<Option<u32>> {
    conn.requests().iter().map(|r| r.seq).collect()
}

/// Each request carries the sequence number of its own first byte: pipelined requests in one
/// send, a storage command whose value block is skipped, a line split over two sends, a send
/// that wraps the 32-bit sequence space, and after a gap only once a chunk re-anchors it.
#[test]
fn text_requests_carry_the_sequence_number_of_their_first_byte() {
    let mut conn = Conn::new();
    let base = u32::MAX - 20;
    // "get a\r\n" (7 bytes) then "set b 0 0 3\r\nxyz\r\n" (18) in one send: 25 bytes that wrap.
    let first = b"get a\r\nset b 0 0 3\r\nxyz\r\n";
    conn.feed_seq(Direction::ClientToServer, first, usize::MAX, Some(base));
    conn.server(b"END\r\nSTORED\r\n");
    assert_eq!(seqs(&mut conn), [Some(base), Some(base.wrapping_add(7))]);

    // A line cut over two sends; the second send's own number is not needed.
    let next = base.wrapping_add(first.len() as u32);
    conn.feed_seq(Direction::ClientToServer, b"get lo", usize::MAX, Some(next));
    conn.client(b"ng\r\n");
    conn.server(b"END\r\n");
    assert_eq!(seqs(&mut conn), [Some(next)]);

    // A value block mostly not captured still counts its bytes.
    let set = b"set c 0 0 100\r\n";
    let mut call = set.to_vec();
    call.extend_from_slice(&[b'v'; 100]);
    call.extend_from_slice(b"\r\nget d\r\n");
    let at = next.wrapping_add(10);
    conn.feed_seq(Direction::ClientToServer, &call, set.len(), Some(at));
    // The tail ("get d") was not captured: it counts as one unread request (of the command
    // read last, without a number: what those bytes held is not known), and the set keeps
    // its number.
    conn.server(b"STORED\r\n");
    let requests = conn.requests();
    let set = requests.iter().find(|r| r.status == Status::Stored);
    assert_eq!(set.map(|r| r.seq), Some(Some(at)));
    let unread = requests.iter().find(|r| r.status == Status::Unknown);
    assert_eq!(unread.map(|r| r.seq), Some(None));

    // After lost bytes the old anchor is void; the next numbered chunk sets a new one.
    conn.decoder
        .note_gap(Direction::ClientToServer, &mut conn.out);
    conn.out.clear();
    conn.client(b"get e\r\n");
    conn.server(b"END\r\n");
    assert_eq!(seqs(&mut conn), [None]);
    conn.feed_seq(Direction::ClientToServer, b"get f\r\n", usize::MAX, Some(5));
    conn.server(b"END\r\n");
    assert_eq!(seqs(&mut conn), [Some(5)]);
}

/// Binary packets carry the number of their header's first byte, also when the header is
/// split over two sends.
#[test]
fn binary_requests_carry_the_sequence_number_of_their_first_byte() {
    let packet = |opcode: u8, key: &[u8], opaque: u32| {
        let mut p = vec![0x80, opcode, 0, key.len() as u8, 0, 0, 0, 0];
        p.extend_from_slice(&(key.len() as u32).to_be_bytes());
        p.extend_from_slice(&opaque.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(key);
        p
    };
    let response = |opcode: u8, status: u16, opaque: u32| {
        let mut p = vec![0x81, opcode, 0, 0, 0, 0];
        p.extend_from_slice(&status.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&opaque.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    };
    let mut conn = Conn::new();
    let mut call = packet(0x00, b"k1", 1);
    let second = call.len() as u32;
    call.extend_from_slice(&packet(0x00, b"k2", 2));
    conn.feed_seq(
        Direction::ClientToServer,
        &call[..30],
        usize::MAX,
        Some(1_000),
    );
    conn.feed_seq(
        Direction::ClientToServer,
        &call[30..],
        usize::MAX,
        Some(1_030),
    );
    let mut answers = response(0x00, 1, 1);
    answers.extend_from_slice(&response(0x00, 1, 2));
    conn.server(&answers);
    assert_eq!(seqs(&mut conn), [Some(1_000), Some(1_000 + second)]);
}

/// (command, status, value_len, keys_in_request) per observation.
fn sizes(conn: &mut Conn) -> Vec<(&'static str, &'static str, Option<u32>, u16)> {
    conn.requests()
        .iter()
        .map(|r| {
            (
                r.command.as_str(),
                r.status.as_str(),
                r.value_len,
                r.keys_in_request,
            )
        })
        .collect()
}

#[test]
fn value_sizes_of_stores_and_hits_and_keys_per_request() {
    let mut conn = Conn::new();
    conn.client(b"set a 0 0 5\r\nhello\r\nset b 0 0 3 noreply\r\nxyz\r\n");
    conn.server(b"STORED\r\n");
    conn.client(b"get a b c\r\n");
    conn.server(b"VALUE a 0 5\r\nhello\r\nVALUE c 0 12\r\nhello world!\r\nEND\r\n");
    conn.client(b"append a 0 0 2\r\n!!\r\ndelete a\r\n");
    conn.server(b"STORED\r\nDELETED\r\n");
    let mut seen = sizes(&mut conn);
    seen.sort();
    assert_eq!(
        seen,
        [
            ("append", "stored", Some(2), 1),
            ("delete", "deleted", None, 1),
            ("get", "hit", Some(5), 3),
            ("get", "hit", Some(12), 0),
            ("get", "miss", None, 0),
            ("set", "noreply", Some(3), 1),
            ("set", "stored", Some(5), 1),
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn value_sizes_in_meta_and_binary() {
    let mut conn = Conn::new();
    conn.client(b"ms k 4 T0\r\nabcd\r\nmg k v\r\nmg nope v\r\n");
    conn.server(b"HD\r\nVA 4\r\nabcd\r\nEN\r\n");
    assert_eq!(
        sizes(&mut conn),
        [
            ("ms", "stored", Some(4), 1),
            ("mg", "hit", Some(4), 1),
            ("mg", "miss", None, 1),
        ]
    );

    let mut conn = Conn::new();
    // bin set: 8 bytes extras, key "k", value "vvv"; then getk hit with 4 bytes of flags.
    let mut set = vec![0x80, 0x01, 0, 1, 8, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 1];
    set.extend_from_slice(&[0; 8]);
    set.extend_from_slice(&[0; 8]);
    set.extend_from_slice(b"kvvv");
    let mut get = vec![0x80, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2];
    get.extend_from_slice(&[0; 8]);
    get.push(b'k');
    conn.client(&[set, get].concat());
    let mut stored = vec![0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    stored.extend_from_slice(&[0; 8]);
    let mut hit = vec![0x81, 0x00, 0, 0, 4, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 2];
    hit.extend_from_slice(&[0; 8]);
    hit.extend_from_slice(&[0, 0, 0, 0]);
    hit.extend_from_slice(b"vvv");
    let mut miss = vec![0x81, 0x00, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 3];
    miss.extend_from_slice(&[0; 8]);
    miss.extend_from_slice(b"Not found");
    conn.server(&[stored, hit].concat());
    let mut get3 = vec![0x80, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3];
    get3.extend_from_slice(&[0; 8]);
    get3.push(b'x');
    conn.client(&get3);
    conn.server(&miss);
    assert_eq!(
        sizes(&mut conn),
        [
            ("bin_set", "stored", Some(3), 1),
            ("bin_get", "hit", Some(3), 1),
            ("bin_get", "miss", None, 1),
        ]
    );
    assert!(conn.errors().is_empty());
}

#[test]
fn value_sizes_survive_uncaptured_bodies() {
    // Framing-aware capture skips value bodies: only the lines are captured.
    let mut conn = Conn::new();
    let body = vec![b'x'; 70_000];
    let set = [b"set big 0 0 70000\r\n".as_slice(), &body, b"\r\n"].concat();
    conn.feed(Direction::ClientToServer, &set, 19);
    conn.server(b"STORED\r\n");
    assert_eq!(sizes(&mut conn), [("set", "stored", Some(70_000), 1)]);
}

/// (command, status, value head) per observation.
type HeadSummary = (&'static str, &'static str, Option<Vec<u8>>);

fn heads(conn: &mut Conn) -> Vec<HeadSummary> {
    conn.requests()
        .iter()
        .map(|r| {
            (
                r.command.as_str(),
                r.status.as_str(),
                r.value_head.map(|h| h.as_bytes().to_vec()),
            )
        })
        .collect()
}

fn h(command: &'static str, status: &'static str, head: Option<&[u8]>) -> HeadSummary {
    (command, status, head.map(<[u8]>::to_vec))
}

/// Feeds `bytes` as two fully captured chunks cut at `at` (one chunk when `at` is 0).
fn feed_split(conn: &mut Conn, direction: Direction, bytes: &[u8], at: usize) {
    if at > 0 {
        conn.feed(direction, &bytes[..at], usize::MAX);
    }
    conn.feed(direction, &bytes[at..], usize::MAX);
}

#[test]
fn binary_values_carry_their_first_bytes_whatever_the_split() {
    // A set, a quiet multi-get (two hits, one miss) closed by a no-op, a get of a 3-byte value,
    // a get miss and an incr: heads for the set and the hits only.
    let requests = [
        bin_request(0x01, 1, b"job", b"fingerprint-binary"),
        bin_request(0x0d, 2, b"a", b""),
        bin_request(0x0d, 3, b"b", b""),
        bin_request(0x0d, 4, b"c", b""),
        bin_request(0x0a, 5, b"", b""),
        bin_request(0x00, 6, b"s", b""),
        bin_request(0x00, 7, b"m", b""),
        bin_request(0x05, 8, b"n", b""),
    ]
    .concat();
    let responses = [
        bin_response(0x01, 0, 1, b"", b""),
        bin_response(0x0d, 0, 2, b"a", b"\x80\x81VALUE a 0 5\r\n"),
        bin_response(0x0d, 0, 4, b"c", b"END\r\nsecond"),
        bin_response(0x0a, 0, 5, b"", b""),
        bin_response(0x00, 0, 6, b"", b"xyz"),
        bin_response(0x00, 1, 7, b"", b"Not found"),
        bin_response(0x05, 0, 8, b"", &7u64.to_be_bytes()),
    ]
    .concat();
    let expected = [
        h("bin_set", "stored", Some(b"fingerpr")),
        h("bin_getkq", "hit", Some(b"\x80\x81VALUE ")),
        h("bin_getkq", "miss", None),
        h("bin_getkq", "hit", Some(b"END\r\nsec")),
        h("bin_noop", "ok", None),
        h("bin_get", "hit", Some(b"xyz")),
        h("bin_get", "miss", None),
        h("bin_incr", "ok", None),
    ];
    for at in 0..requests.len().max(responses.len()) {
        let mut conn = Conn::new();
        feed_split(
            &mut conn,
            Direction::ClientToServer,
            &requests,
            at.min(requests.len() - 1),
        );
        feed_split(
            &mut conn,
            Direction::ServerToClient,
            &responses,
            at.min(responses.len() - 1),
        );
        let mut seen = heads(&mut conn);
        seen.sort();
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(seen, want, "split at {at}");
        assert!(conn.errors().is_empty(), "split at {at}");
    }
}

#[test]
fn meta_values_carry_their_first_bytes_whatever_the_split() {
    // ms, a hit, quiet hits echoing their keys closed by mn, a miss, an empty value, and an
    // arithmetic answer with its value.
    let requests =
        b"ms job 13 T0\r\nfirst-message\r\nmg job v\r\nmg a v k q\r\nmg b v k q\r\nmn\r\n\
mg nope v\r\nmg e v\r\nma n v\r\n";
    let responses =
        b"HD\r\nVA 13\r\nfirst-message\r\nVA 10 ka\r\nEND\r\nVA 10\r\nVA 4 kb\r\nabcd\r\n\
MN\r\nEN\r\nVA 0\r\n\r\nVA 2\r\n17\r\n";
    let expected = [
        h("ms", "stored", Some(b"first-me")),
        h("mg", "hit", Some(b"first-me")),
        h("mg", "hit", Some(b"END\r\nVA ")),
        h("mg", "hit", Some(b"abcd")),
        h("mn", "ok", None),
        h("mg", "miss", None),
        h("mg", "hit", Some(b"")),
        h("ma", "ok", Some(b"17")),
    ];
    for at in 0..responses.len() {
        let mut conn = Conn::new();
        feed_split(
            &mut conn,
            Direction::ClientToServer,
            requests,
            at.min(requests.len() - 1),
        );
        feed_split(&mut conn, Direction::ServerToClient, responses, at);
        assert_eq!(heads(&mut conn), expected, "split at {at}");
        assert!(conn.errors().is_empty(), "split at {at}");
    }
}

#[test]
fn a_value_whose_first_bytes_were_not_captured_has_no_head_but_keeps_its_answer() {
    // Binary: the capture stops 3 bytes into the value.
    let mut conn = Conn::new();
    conn.client(&bin_request(0x00, 1, b"k", b""));
    let hit = bin_response(0x00, 0, 1, b"", b"0123456789");
    conn.feed(Direction::ServerToClient, &hit, 24 + 4 + 3);
    let seen = conn.requests();
    assert_eq!(summarize(&seen[0]), s("bin_get", "hit", "k"));
    assert_eq!((seen[0].value_len, seen[0].value_head), (Some(10), None));

    // Meta: the capture stops inside the head; the hit is reported once the body is passed,
    // and the next exchange pairs as usual.
    let mut conn = Conn::new();
    conn.client(b"mg k v\r\nmg k2 v\r\n");
    let body = b"VA 10\r\n0123456789\r\n";
    conn.feed(Direction::ServerToClient, body, 9);
    conn.server(b"EN\r\n");
    assert_eq!(
        heads(&mut conn),
        [h("mg", "hit", None), h("mg", "miss", None)]
    );
    assert!(conn.errors().is_empty());

    // Meta: the body's bytes are lost with the events that carried them: the hit stands.
    let mut conn = Conn::new();
    conn.client(b"mg k v\r\n");
    conn.server(b"VA 10\r\n01");
    assert!(conn.requests().is_empty(), "held for the value's head");
    conn.decoder
        .note_gap(Direction::ServerToClient, &mut conn.out);
    assert_eq!(heads(&mut conn), [h("mg", "hit", None)]);

    // Meta: the connection closes mid-value.
    let mut conn = Conn::new();
    conn.client(b"mg k v\r\n");
    conn.server(b"VA 10\r\n0123");
    conn.decoder.finish(&mut conn.out);
    assert_eq!(heads(&mut conn), [h("mg", "hit", None)]);
}

#[test]
fn sizes_and_value_heads_can_be_switched_off() {
    let run = |config: DecoderConfig| {
        let mut text = Conn::with(config.clone());
        text.client(b"set a 0 0 5\r\nhello\r\nget a b\r\nms m 3\r\nabc\r\nmg m v\r\n");
        text.server(b"STORED\r\nVALUE a 0 5\r\nhello\r\nEND\r\nHD\r\nVA 3\r\nabc\r\n");
        let mut binary = Conn::with(config);
        binary.client(&bin_request(0x00, 1, b"k", b""));
        binary.server(&bin_response(0x00, 0, 1, b"", b"binary"));
        let mut requests = text.requests();
        requests.extend(binary.requests());
        assert!(text.errors().is_empty() && binary.errors().is_empty());
        let seen: Vec<_> = requests
            .iter()
            .map(|r| {
                (
                    summarize(r),
                    r.value_len,
                    r.keys_in_request,
                    r.value_head.is_some(),
                )
            })
            .collect();
        seen
    };
    let on = run(DecoderConfig::default());
    let off = run(DecoderConfig {
        sizes: false,
        value_heads: false,
        ..DecoderConfig::default()
    });
    assert_eq!(on.len(), 6);
    // Sizes and heads for the set, the hit, ms, mg and the binary hit; not for the miss.
    assert_eq!(on.iter().filter(|o| o.1.is_some()).count(), 5);
    assert_eq!(on.iter().filter(|o| o.3).count(), 5);
    assert_eq!(on.iter().map(|o| o.2).sum::<u16>(), 6);
    assert_eq!(
        on.iter().map(|o| o.0.clone()).collect::<Vec<_>>(),
        off.iter().map(|o| o.0.clone()).collect::<Vec<_>>()
    );
    assert!(off.iter().all(|o| o.1.is_none() && o.2 == 0 && !o.3));
}
