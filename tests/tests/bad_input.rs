//! Bad input on the wire to a real memcached: lengths that lie (up to 2 GB), half frames,
//! garbage between frames, a client that closes mid-value. The agent stays bounded, counts what
//! it could not decode, and decodes the next good frame.

use std::time::Duration;

use cacheprobe_tests::*;

const WAIT: Duration = Duration::from_secs(8);

/// Python: `conn()` opens a connection to memcached, `good(tag)` runs one good exchange on a
/// fresh connection (a set and a get hit of key `good<tag>`) and checks memcached's answers.
fn prelude(port: u16) -> String {
    format!(
        "import socket, time\n\
         def conn():\n\
         \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   s.settimeout(5)\n\
         \x20   return s\n\
         def read_until(s, end):\n\
         \x20   data = b''\n\
         \x20   while not data.endswith(end):\n\
         \x20       chunk = s.recv(65536)\n\
         \x20       if not chunk:\n\
         \x20           break\n\
         \x20       data += chunk\n\
         \x20   return data\n\
         def good(tag):\n\
         \x20   s = conn()\n\
         \x20   s.sendall(b'set good%d 0 0 2\\r\\nok\\r\\n' % tag)\n\
         \x20   assert read_until(s, b'\\r\\n') == b'STORED\\r\\n'\n\
         \x20   s.sendall(b'get good%d\\r\\n' % tag)\n\
         \x20   assert read_until(s, b'END\\r\\n') == b'VALUE good%d 0 2\\r\\nok\\r\\nEND\\r\\n' % tag\n\
         \x20   s.close()\n"
    )
}

/// Runs `script` (after [`prelude`]) against memcached watched by a fresh agent that decodes
/// everything; returns the final scrape once `good_exchanges` good exchanges are decoded on
/// both sides (or after the wait), and the agent's RSS growth in KiB.
fn run_bad_input(name: &str, script: &str, good_exchanges: f64) -> (Scrape, i64) {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent = Agent::start_with_config(
        name,
        &format!(
            "[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_records_per_second = 0\n"
        ),
    )
    .unwrap();
    let rss_before = rss_kib(agent.pid()).expect("VmRSS in /proc/<pid>/status");
    python(None, &format!("{}{script}", prelude(port))).unwrap();
    agent.wait_for(WAIT, |s| {
        ["client", "server"].iter().all(|role| {
            s.requests(&[("role", role), ("command", "get"), ("status", "hit")]) >= good_exchanges
        })
    });
    // A closed connection's requests finish (unanswered) once the agent's close grace (300 ms,
    // for replies recorded just after the close) has passed: scrape after it.
    std::thread::sleep(Duration::from_millis(800));
    let scrape = agent.wait_for(WAIT, |_| true);
    let growth =
        rss_kib(agent.pid()).expect("VmRSS in /proc/<pid>/status") as i64 - rss_before as i64;
    let table: Vec<String> = scrape
        .text
        .lines()
        .filter(|l| {
            l.starts_with("cacheprobe_memcache_requests_total")
                || l.starts_with("cacheprobe_memcache_decode_errors_total")
        })
        .map(str::to_string)
        .collect();
    eprintln!(
        "== {name}: agent RSS grew {growth} KiB\n{}",
        table.join("\n")
    );
    (scrape, growth)
}

/// Every good exchange is decoded exactly on both sides: its set stored and its get a hit.
fn assert_good_exchanges(name: &str, scrape: &Scrape, good: f64) {
    for role in ["client", "server"] {
        let count = |command: &str, status: &str| {
            scrape.requests(&[("role", role), ("command", command), ("status", status)])
        };
        assert_eq!(
            (count("set", "stored"), count("get", "hit")),
            (good, good),
            "{name} {role}: the good exchanges after the bad input\n{}",
            scrape.text
        );
    }
}

/// What the agent admits it could not follow: decode errors, plus requests it finished with an
/// error, unknown or unanswered status.
fn counted_trouble(scrape: &Scrape) -> f64 {
    scrape.sum("cacheprobe_memcache_decode_errors_total", &[])
        + [
            "error",
            "client_error",
            "server_error",
            "unknown",
            "unanswered",
        ]
        .iter()
        .map(|status| scrape.requests(&[("status", status)]))
        .sum::<f64>()
}

/// A text `set` and a binary set each claiming 2 GB, each followed by 1 MB of the value and a
/// close: memcached refuses them; the agent must not try to hold 2 GB, and the good exchange
/// that follows is decoded.
#[test]
fn headers_claiming_2_gb_are_skipped_within_bounded_memory() {
    let (scrape, growth) = run_bad_input(
        "bad-2gb",
        "s = conn()\n\
         s.sendall(b'set big 0 0 2147483648\\r\\n')\n\
         try:\n\
         \x20   s.sendall(b'x' * (1 << 20))\n\
         except OSError:\n\
         \x20   pass\n\
         time.sleep(0.2)\n\
         s.close()\n\
         s = conn()\n\
         # binary set: magic, opcode 1, key length 3, extras 8, body length 2 GB\n\
         s.sendall(b'\\x80\\x01\\x00\\x03\\x08\\x00\\x00\\x00\\x80\\x00\\x00\\x00' + b'\\x00' * 12 + b'\\x00' * 8 + b'big')\n\
         try:\n\
         \x20   s.sendall(b'y' * (1 << 20))\n\
         except OSError:\n\
         \x20   pass\n\
         time.sleep(0.2)\n\
         s.close()\n\
         good(1)\n",
        1.0,
    );
    assert_good_exchanges("bad-2gb", &scrape, 1.0);
    assert!(
        growth < 64 * 1024,
        "agent RSS grew {growth} KiB on 2 GB claims"
    );
    assert!(
        counted_trouble(&scrape) >= 2.0,
        "the two refused 2 GB frames are counted\n{}",
        scrape.text
    );
}

/// A set whose data is longer than its header says, and one whose data is shorter (the rest
/// arrives as the next "command"): memcached answers CLIENT_ERROR / ERROR. Then a good
/// exchange on a new connection.
#[test]
fn lying_lengths_are_counted_and_the_next_good_frame_decoded() {
    let (scrape, growth) = run_bad_input(
        "bad-lying",
        "s = conn()\n\
         s.sendall(b'set k 0 0 5\\r\\nabcdefghij\\r\\n')\n\
         r = read_until(s, b'\\r\\n')\n\
         assert r.startswith(b'CLIENT_ERROR'), r\n\
         s.close()\n\
         s = conn()\n\
         s.sendall(b'set k 0 0 20\\r\\nshort\\r\\n')\n\
         time.sleep(0.2)\n\
         s.close()\n\
         good(1)\n\
         good(2)\n",
        2.0,
    );
    assert_good_exchanges("bad-lying", &scrape, 2.0);
    assert!(growth < 64 * 1024, "agent RSS grew {growth} KiB");
    assert!(
        counted_trouble(&scrape) >= 2.0,
        "both lying sets are counted\n{}",
        scrape.text
    );
}

/// Frames cut across writes (a command line in three pieces, a value in two) are whole
/// frames: decoded exactly, no errors.
#[test]
fn half_frames_across_writes_decode_exactly() {
    let (scrape, _growth) = run_bad_input(
        "bad-half",
        "s = conn()\n\
         for piece in (b'se', b't half 0 0 1', b'0\\r\\nhello', b'world\\r\\n'):\n\
         \x20   s.sendall(piece)\n\
         \x20   time.sleep(0.05)\n\
         assert read_until(s, b'\\r\\n') == b'STORED\\r\\n'\n\
         for piece in (b'get ', b'half', b'\\r\\n'):\n\
         \x20   s.sendall(piece)\n\
         \x20   time.sleep(0.05)\n\
         assert read_until(s, b'END\\r\\n') == b'VALUE half 0 10\\r\\nhelloworld\\r\\nEND\\r\\n'\n\
         s.close()\n",
        1.0,
    );
    assert_good_exchanges("bad-half", &scrape, 1.0);
    assert_eq!(
        scrape.sum("cacheprobe_memcache_decode_errors_total", &[]),
        0.0,
        "{}",
        scrape.text
    );
}

/// Garbage between two good frames in one write: memcached answers ERROR for it; the frames
/// around it are decoded and the garbage is counted.
#[test]
fn garbage_between_frames_is_counted_and_the_frames_around_it_decoded() {
    let (scrape, _growth) = run_bad_input(
        "bad-garbage",
        "s = conn()\n\
         s.sendall(b'set good0 0 0 2\\r\\nok\\r\\n\\x00\\xff\\x13 not a command\\r\\nget good0\\r\\n')\n\
         r = read_until(s, b'END\\r\\n')\n\
         assert r == b'STORED\\r\\nERROR\\r\\nVALUE good0 0 2\\r\\nok\\r\\nEND\\r\\n', r\n\
         s.close()\n",
        1.0,
    );
    assert_good_exchanges("bad-garbage", &scrape, 1.0);
    assert!(
        counted_trouble(&scrape) >= 1.0,
        "the garbage line is counted\n{}",
        scrape.text
    );
}

/// A client that sends half of a 500 KB value and closes, and one that reads only the start of
/// a 500 KB reply and closes: bounded, counted, and the good exchange after is decoded.
#[test]
fn clients_closing_mid_value_are_counted() {
    let (scrape, growth) = run_bad_input(
        "bad-midvalue",
        "s = conn()\n\
         s.sendall(b'set half 0 0 500000\\r\\n' + b'v' * 250000)\n\
         time.sleep(0.2)\n\
         s.close()\n\
         s = conn()\n\
         s.sendall(b'set large 0 0 500000\\r\\n' + b'w' * 500000 + b'\\r\\n')\n\
         assert read_until(s, b'\\r\\n') == b'STORED\\r\\n'\n\
         s.sendall(b'get large\\r\\n')\n\
         s.recv(100)\n\
         s.close()\n\
         time.sleep(0.2)\n\
         good(1)\n",
        2.0,
    );
    assert!(growth < 64 * 1024, "agent RSS grew {growth} KiB");
    // The get of `large` was answered (a hit) though the client left mid-value.
    for role in ["client", "server"] {
        assert_eq!(
            scrape.requests(&[("role", role), ("command", "get"), ("status", "hit")]),
            2.0,
            "{role}\n{}",
            scrape.text
        );
        assert_eq!(
            scrape.requests(&[("role", role), ("command", "set"), ("status", "stored")]),
            2.0,
            "{role}\n{}",
            scrape.text
        );
    }
    assert!(
        counted_trouble(&scrape) >= 1.0,
        "the set cut by the close is counted\n{}",
        scrape.text
    );
}
