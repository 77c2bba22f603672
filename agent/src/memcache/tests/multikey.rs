//! Multi-key batches larger than the kernel's 16 KiB line or 64 KiB per-call capture, as
//! pymemcache's `get_many` and bmemcached's `get_multi` send them: keys that were read decode
//! exactly, hits that arrive for keys that were not count as hits, and the unread rest counts
//! as unknown (out of the hit ratio) instead of vanishing.

use std::collections::BTreeMap;

use super::*;

/// `n` keys as the session-24 audit's `wl_bigbatch.py` names them (18 bytes each).
fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bigbatchkey_{i:06}")).collect()
}

/// A text get of `keys` in one line.
fn get_line(keys: &[String]) -> Vec<u8> {
    format!("get {}\r\n", keys.join(" ")).into_bytes()
}

/// memcached's answer when the even-numbered keys are stored.
fn even_hits(keys: &[String]) -> Vec<u8> {
    let mut answer = Vec::new();
    for key in keys.iter().step_by(2) {
        answer.extend_from_slice(format!("VALUE {key} 0 2\r\nhi\r\n").as_bytes());
    }
    answer.extend_from_slice(b"END\r\n");
    answer
}

/// Per status, how many observations, and how many of them carried no key.
fn tally(requests: &[RequestObservation]) -> BTreeMap<&'static str, (usize, usize)> {
    let mut tally = BTreeMap::new();
    for r in requests {
        let entry = tally.entry(r.status.as_str()).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += usize::from(r.key.is_none());
    }
    tally
}

/// The kernel hands a call over in records of at most 4 KiB of data.
const RECORD: usize = 4096;

#[test]
fn a_get_of_2000_keys_split_across_records_decodes_whole() {
    let keys = keys(2000);
    let line = get_line(&keys);
    assert!(line.len() > 16 * 1024 && line.len() < 64 * 1024);
    let mut conn = Conn::new();
    for record in line.chunks(RECORD) {
        conn.client(record);
    }
    for record in even_hits(&keys).chunks(RECORD) {
        conn.server(record);
    }
    let requests = conn.requests();
    assert_eq!(
        tally(&requests),
        BTreeMap::from([("hit", (1000, 0)), ("miss", (1000, 0))])
    );
    // Every key read, in order.
    assert!(requests
        .iter()
        .zip(&keys)
        .all(|(r, key)| r.key.unwrap().as_bytes() == key.as_bytes()));
    assert_eq!(conn.errors(), Vec::<&str>::new());
    // The 38 KB line's buffer went with it: an idle stream keeps little.
    assert!(conn.decoder.line_buffer_capacity() <= 2 * 1024);
}

/// 5,000 keys make a 95 KB line; the kernel copies the first 64 KiB of the call.
#[test]
fn a_get_cut_by_the_capture_counts_seen_hits_and_its_unread_rest_as_unknown() {
    let keys = keys(5000);
    let line = get_line(&keys);
    let captured = agent_common::framing::MAX_LINE as usize;
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &line, captured);
    for record in even_hits(&keys).chunks(RECORD) {
        conn.server(record);
    }
    // Keys wholly in the capture ("get " and each key's 19 bytes).
    let read = (captured - 4) / 19;
    let requests = conn.requests();
    assert_eq!(
        tally(&requests),
        BTreeMap::from([
            // Every stored key's hit, read or not.
            ("hit", (2500, 0)),
            // Only the misses among the keys read; the key the capture cut is one of them
            // or a hit.
            ("miss", (read / 2 + read % 2, 0)),
            // The rest: one observation, no key, out of the hit ratio.
            ("unknown", (1, 1)),
        ]),
        "{read} keys read"
    );
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
}

/// A line longer than the limit (sent in several calls, each captured whole) is decoded from
/// its first bytes; the rest of its keys are unread, as if the capture had cut it.
#[test]
fn a_get_past_the_line_limit_counts_its_unread_keys_as_unknown() {
    let keys = keys(5000);
    let line = get_line(&keys);
    assert!(line.len() > agent_common::framing::MAX_LINE as usize);
    let mut conn = Conn::new();
    for record in line.chunks(RECORD) {
        conn.client(record);
    }
    for record in even_hits(&keys).chunks(RECORD) {
        conn.server(record);
    }
    let requests = conn.requests();
    let tally = tally(&requests);
    assert_eq!(tally["hit"], (2500, 0));
    assert_eq!(tally["unknown"], (1, 1));
    let misses = tally["miss"].0;
    assert!(misses > 1500 && misses < 1800, "{misses}");
    assert_eq!(conn.errors(), vec!["line_too_long"]);
    // Framing goes on after the long line.
    conn.client(b"get z\r\n");
    conn.server(b"END\r\n");
    assert_eq!(conn.summary(), vec![s("get", "miss", "z")]);
}

/// A cut get that gets no answer: its unread keys share its fate, not unknown.
#[test]
fn a_cut_get_without_answer_times_out_whole() {
    let keys = keys(5000);
    let line = get_line(&keys);
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &line, 8192);
    conn.decoder.expire(u64::MAX, 1, &mut conn.out);
    let requests = conn.requests();
    assert!(requests.iter().all(|r| r.status == Status::Timeout));
    assert_eq!(requests.iter().filter(|r| r.key.is_none()).count(), 1);
}

/// bmemcached's `get_multi` of 4,000 keys: GetKQ per key and a NoOp, 168 KB in one send, of
/// which the kernel copies 64 KiB.
#[test]
fn a_binary_getkq_batch_cut_at_64_kib_counts_seen_hits_and_one_unknown() {
    let keys = keys(4000);
    let mut batch = Vec::new();
    for key in &keys {
        batch.extend(bin_request(0x0d, 0, key.as_bytes(), b""));
    }
    batch.extend(bin_request(0x0a, 0, b"", b""));
    let mut answers = Vec::new();
    for key in keys.iter().step_by(2) {
        answers.extend(bin_response(0x0d, 0, 0, key.as_bytes(), b"hi"));
    }
    answers.extend(bin_response(0x0a, 0, 0, b"", b""));
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &batch, 64 * 1024);
    // Each GetKQ is 24 + 18 bytes; the one the capture cuts is not read.
    let read = 64 * 1024 / 42;
    for record in answers.chunks(RECORD) {
        conn.server(record);
    }
    let requests = conn.requests();
    assert!(requests.iter().all(|r| r.command == Command::BinGetKQ));
    assert_eq!(
        tally(&requests),
        BTreeMap::from([
            ("hit", (2000, 0)),
            // Quiet misses among those read: the answers past them prove they missed.
            ("miss", (read / 2, 0)),
            ("unknown", (1, 1)),
        ]),
        "{read} read"
    );
    // Only the NoOp's answer fits nothing read.
    assert_eq!(
        conn.errors(),
        vec!["truncated_capture", "unexpected_response"]
    );
}

/// Garbage without line ends on a watched port is held only to the old 16 KiB per direction,
/// not to the 64 KiB a multi-key get may take: every connection of a hostile client would
/// otherwise keep 64 KiB of the agent's memory per direction. A get line split the same way
/// (its command word split too) is held whole.
#[test]
fn only_a_multi_key_get_is_held_past_16_kib() {
    let garbage = vec![b'x'; 40 * 1024];
    let mut conn = Conn::new();
    for record in garbage.chunks(RECORD) {
        conn.client(record);
        assert!(conn.decoder.line_buffer_capacity() <= 2 * 16 * 1024 + 2 * 1024);
    }
    assert_eq!(conn.errors(), vec!["line_too_long"]);

    let keys = keys(2000);
    let line = get_line(&keys);
    let mut conn = Conn::new();
    conn.client(&line[..2]);
    for record in line[2..].chunks(RECORD) {
        conn.client(record);
    }
    conn.server(&even_hits(&keys));
    assert_eq!(
        tally(&conn.requests()),
        BTreeMap::from([("hit", (1000, 0)), ("miss", (1000, 0))])
    );
}
