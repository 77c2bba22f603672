//! Multi-key batches larger than the kernel's 16 KiB line or 64 KiB per-call capture, as
//! pymemcache's `get_many`/`set_many`, bmemcached's `get_multi` and meta `mg ... q` batches
//! send them: requests that were read decode exactly, answers that arrive for requests that
//! were not count as what they say, and the unread rest counts as unknown (out of the hit
//! ratio) instead of vanishing.

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

/// Per (command, status), how many observations.
fn by_command(requests: &[RequestObservation]) -> BTreeMap<(&'static str, &'static str), usize> {
    let mut tally = BTreeMap::new();
    for r in requests {
        *tally
            .entry((r.command.as_str(), r.status.as_str()))
            .or_insert(0) += 1;
    }
    tally
}

/// pymemcache's `set_many`: `set <key> 0 0 <len> noreply` per key, all in one send.
fn set_many(keys: &[String], value_len: usize) -> Vec<u8> {
    let mut batch = Vec::new();
    for key in keys {
        batch.extend(format!("set {key} 0 0 {value_len} noreply\r\n").into_bytes());
        batch.extend(std::iter::repeat_n(b'v', value_len));
        batch.extend(b"\r\n");
    }
    batch
}

/// A noreply batch of sets of which only the first part was read: nothing answers, so the
/// unread sets can only be counted as such: one unknown stands for them (how many is not
/// known). The sets read count once each, and the one the cut went through is unknown when its
/// `noreply` went unread, not a timeout or unanswered.
#[test]
fn a_noreply_set_batch_cut_by_the_capture_counts_its_unread_rest() {
    let keys = keys(2500);
    let batch = set_many(&keys, 100);
    // The cut goes through the 465th line, before its noreply.
    let per_set = batch.len() / keys.len();
    let cut = 464 * per_set + 20;
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &batch, cut);
    conn.decoder.expire(u64::MAX, 1, &mut conn.out);
    conn.decoder.finish(&mut conn.out);
    let requests = conn.requests();
    assert_eq!(
        by_command(&requests),
        BTreeMap::from([(("set", "noreply"), 464), (("set", "unknown"), 2)])
    );
    // The set the cut went through keeps its key's first bytes; the rest has no key.
    assert_eq!(tally(&requests)["unknown"], (2, 1));
    assert_eq!(conn.errors(), vec!["truncated_capture"]);

    // Cut at a line boundary: the sets read and one unknown.
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &batch, 464 * per_set);
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        by_command(&conn.requests()),
        BTreeMap::from([(("set", "noreply"), 464), (("set", "unknown"), 1)])
    );
}

/// A cut that leaves no room for more requests than the one it cuts counts nothing more: the
/// rest of a set's line and its value are that set's.
#[test]
fn a_single_cut_set_is_not_counted_twice() {
    let mut conn = Conn::new();
    let set = b"set k 0 0 100 noreply\r\n".to_vec();
    let mut call = set.clone();
    call.extend([b'v'; 100]);
    call.extend(b"\r\n");
    conn.feed(Direction::ClientToServer, &call, 12);
    conn.decoder.finish(&mut conn.out);
    assert_eq!(
        by_command(&conn.requests()),
        BTreeMap::from([(("set", "unknown"), 1)])
    );
}

/// A meta quiet batch (`mg <key> v q` per key, `mn` last) of 4,000 keys, of which the capture
/// read the first 64 KiB. memcached answers the hits (even keys) and `MN`; the misses are
/// silent. Every hit counts and the unread rest is one unknown. With `k` each hit names its
/// request, so the read ones it passes over missed; without, hits are taken in order, so once
/// hits of unread ones come too, which read `mg` missed cannot be told: those left without an
/// answer when `MN` comes are unknown, not misses.
#[test]
fn a_meta_quiet_batch_cut_by_the_capture_counts_every_hit_and_its_unread_rest() {
    let keys = keys(4000);
    for with_key in [false, true] {
        let flags = if with_key { "v k q" } else { "v q" };
        let mut batch = Vec::new();
        for key in &keys {
            batch.extend(format!("mg {key} {flags}\r\n").into_bytes());
        }
        batch.extend(b"mn\r\n");
        let mut answers = Vec::new();
        for key in keys.iter().step_by(2) {
            let named = if with_key {
                format!(" k{key}")
            } else {
                String::new()
            };
            answers.extend(format!("VA 2{named}\r\nhi\r\n").into_bytes());
        }
        answers.extend(b"MN\r\n");
        let line = 3 + 18 + 1 + flags.len() + 2;
        let read = 64 * 1024 / line;
        let mut conn = Conn::new();
        conn.feed(Direction::ClientToServer, &batch, read * line);
        for record in answers.chunks(RECORD) {
            conn.server(record);
        }
        let requests = conn.requests();
        let tally = by_command(&requests);
        let expected = if with_key {
            // The odd keys read missed.
            BTreeMap::from([
                (("mg", "hit"), 2000),
                (("mg", "miss"), read / 2),
                (("mg", "unknown"), 1),
            ])
        } else {
            // The first 2,000 read took the hits; the rest read and the unread are unknown.
            BTreeMap::from([(("mg", "hit"), 2000), (("mg", "unknown"), 1 + read - 2000)])
        };
        assert_eq!(tally, expected, "{with_key}");
        // The MN closes the batch: nothing is left waiting, and nothing was unexpected.
        assert_eq!(conn.decoder.pending(), 0);
        assert_eq!(conn.errors(), vec!["truncated_capture"]);
        // Pairing goes on.
        conn.client(b"mg z v\r\n");
        conn.server(b"EN\r\n");
        assert_eq!(conn.summary(), vec![s("mg", "miss", "z")]);
    }
}

/// pymemcache's `set_many(..., noreply=False)`: the same batch without noreply, cut by the
/// capture. memcached answers every set; the answers of the unread ones count as what they
/// say, not as unexpected, beside the one unknown that marks the cut.
#[test]
fn answers_of_unread_sets_count_as_their_outcome() {
    let keys = keys(2500);
    let mut batch = Vec::new();
    for key in &keys {
        batch.extend(format!("set {key} 0 0 100\r\n").into_bytes());
        batch.extend([b'v'; 100]);
        batch.extend(b"\r\n");
    }
    let per_set = batch.len() / keys.len();
    let mut conn = Conn::new();
    conn.feed(Direction::ClientToServer, &batch, 464 * per_set);
    for record in b"STORED\r\n".repeat(2500).chunks(RECORD) {
        conn.server(record);
    }
    // Requests after the cut pair as before.
    conn.client(b"get z\r\n");
    conn.server(b"END\r\n");
    assert_eq!(
        by_command(&conn.requests()),
        BTreeMap::from([
            (("get", "miss"), 1),
            (("set", "stored"), 2500),
            (("set", "unknown"), 1)
        ])
    );
    assert_eq!(conn.errors(), vec!["truncated_capture"]);
}
