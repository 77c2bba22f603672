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
    // The tail ("get d") was not captured: its request is lost, but the set keeps its number.
    conn.server(b"STORED\r\n");
    let requests = conn.requests();
    assert_eq!(requests.first().map(|r| r.seq), Some(Some(at)));

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
