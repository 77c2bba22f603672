//! Queue message flow against a Starling-protocol queue server (tests/peers/starling.py) with
//! pymemcache as producer and consumer: decoded enqueues, dequeues and empty polls equal the
//! server's own counters in both views, time in queue and relative depth follow the messages,
//! and a producer dropped for idling loses its next message where the agent can see it.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use cacheprobe_tests::*;

/// Starts the queue peer, closing clients idle for `idle_s`.
fn start_peer(port: u16, idle_s: f64) -> Guard {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/starling.py");
    let child = Command::new("/usr/bin/python3")
        .args([script, "--port", &port.to_string(), "--idle-timeout"])
        .arg(idle_s.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs the queue peer");
    let guard = Guard(child);
    wait_for_port(None, "127.0.0.1", port).expect("the queue peer listens");
    guard
}

/// The peer's own counters.
fn peer_stats(port: u16) -> BTreeMap<String, f64> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("the queue peer");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"stats\r\n").unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.ends_with("END\r\n") {
        let n = conn.read(&mut buf).expect("stats");
        assert!(n > 0, "peer closed during stats: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("STAT "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().parse().unwrap_or(0.0)))
        .collect()
}

/// queue_operations has no role label: on loopback both views add to one series.
fn ops(scrape: &Scrape, op: &str) -> f64 {
    scrape.sum("cacheprobe_queue_operations_total", &[("op", op)])
}

fn requests(scrape: &Scrape, role: &str, command: &str, status: &str) -> f64 {
    scrape.sum(
        "cacheprobe_memcache_requests_total",
        &[("role", role), ("command", command), ("status", status)],
    )
}

/// ~4 s: 40 pipelined enqueues (pymemcache set_many, one write), 30 single dequeues with
/// pymemcache, a raw write of 20 pipelined dequeues, empty polls; then an idle-dropped
/// producer whose next enqueue is lost.
#[test]
fn queue_counts_wait_depth_and_lost_messages() {
    require_root();
    let port = unique_port();
    let _peer = start_peer(port, 1.0);
    let agent = Agent::start_with_config(
        "queue-flow",
        &format!(
            "sample_interval_seconds = 1\n\n[[services]]\nname = \"starling\"\nport = {port}\n\
             protocol = \"memcache-queue\"\n\n[limits]\ncapture_records_per_second = 0\n"
        ),
    )
    .unwrap();
    let script = format!(
        "from pymemcache.client.base import Client\n\
         import socket, time\n\
         p = Client(('127.0.0.1', {port}))\n\
         # set_many on one key would be one item: 40 pipelined sets across two queues.\n\
         for batch in range(20):\n\
         \x20   assert not p.set_many({{'jobs': b'j%03d' % batch + b'x' * batch, 'mail': b'm' * (batch + 1)}}, noreply=False)\n\
         c = Client(('127.0.0.1', {port}))\n\
         got = [c.get('jobs') for _ in range(15)] + [c.get('mail') for _ in range(15)]\n\
         assert all(got), got\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(b'get jobs\\r\\n' * 10 + b'get mail\\r\\n' * 10)\n\
         data = b''\n\
         while data.count(b'END\\r\\n') < 20:\n\
         \x20   data += s.recv(65536)\n\
         assert data.count(b'VALUE') == 10, data\n\
         s.close()\n\
         p.close(); c.close()\n\
         # A producer the server drops for idling: its next enqueue is lost.\n\
         lost = Client(('127.0.0.1', {port}))\n\
         lost.set('lostq', b'first', noreply=False)\n\
         time.sleep(1.6)\n\
         try:\n\
         \x20   lost.set('lostq', b'never arrives', noreply=False)\n\
         \x20   raise SystemExit('the dead connection took the enqueue')\n\
         except Exception as e:\n\
         \x20   print('producer saw', type(e).__name__)\n"
    );
    python(None, &script).unwrap();
    let stats = peer_stats(port);
    eprintln!("peer stats: {stats:?}");
    let scrape = agent.wait_for(Duration::from_secs(10), |s| {
        s.sum("cacheprobe_queue_messages_lost_total", &[]) >= 1.0
            && requests(s, "server", "get", "hit") >= stats["get_hits"]
    });
    std::thread::sleep(Duration::from_millis(500));
    let scrape = Scrape::parse(&agent.scrape_text().unwrap_or(scrape.text));
    let errors = scrape.sum("cacheprobe_memcache_decode_errors_total", &[]);
    eprintln!(
        "{}",
        scrape
            .text
            .lines()
            .filter(|l| l.starts_with("cacheprobe_queue") || l.contains("decode_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Enqueues: 40 + the first of the dropped producer (its second never reached the queue).
    assert_eq!(stats["total_items"], 41.0);
    for role in ["client", "server"] {
        assert_eq!(requests(&scrape, role, "set", "stored"), stats["total_items"], "{role}");
        assert_eq!(requests(&scrape, role, "get", "hit"), stats["get_hits"], "{role}");
        assert_eq!(requests(&scrape, role, "get", "miss"), stats["get_misses"], "{role}");
    }
    // Both views count queue operations into one series: twice the peer's counters, plus
    // the lost enqueue the producer offered (client side only, unanswered).
    assert_eq!(ops(&scrape, "enqueue"), 2.0 * stats["total_items"] + 1.0);
    assert_eq!(ops(&scrape, "dequeue"), 2.0 * stats["get_hits"]);
    assert_eq!(ops(&scrape, "empty_poll"), 2.0 * stats["get_misses"]);
    assert_eq!(errors, 0.0, "decode errors");
    // Every dequeued message was enqueued while the agent watched: all matched.
    assert_eq!(
        scrape.sum("cacheprobe_queue_wait_seconds_count", &[]),
        stats["get_hits"]
    );
    assert_eq!(
        scrape.sum("cacheprobe_queue_depth_relative", &[]),
        stats["curr_items"]
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_queue_messages_lost_total",
            &[("queue", "lostq"), ("outcome", "eof")]
        ),
        1.0
    );
}
