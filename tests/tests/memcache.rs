//! Memcache decoding against real servers and clients: per-command counts and hit/miss exactly
//! for scripted workloads, text and binary protocol, through twemproxy, and cross-checked
//! against memcached's own stats and tshark's memcache dissector.

use std::{collections::BTreeMap, process::Command, time::Duration};

use cacheprobe_tests::*;

const WAIT: Duration = Duration::from_secs(10);

/// Text protocol, both sides decoded: the clients' view and memcached's view agree exactly, and
/// latency and bytes are recorded.
#[test]
fn text_protocol_workload_is_counted_exactly_on_both_sides() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("mc-text", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    python(None, &scripted_text_workload(port)).unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.requests(&[("role", "server")]) >= 20.0 && s.requests(&[("role", "client")]) >= 20.0
    });
    assert_text_workload(&scrape, "client", 0.0, 0.0);
    assert_text_workload(&scrape, "server", 0.0, 0.0);
    scrape.assert_no_decode_errors();
    let latency_count = scrape.sum(
        "cacheprobe_memcache_request_duration_seconds_count",
        &[("role", "client"), ("command", "get")],
    );
    // Multi-get keys share one latency sample each.
    assert_eq!(latency_count, 11.0, "{}", scrape.text);
    let sent = scrape.sum(
        "cacheprobe_memcache_bytes_total",
        &[("role", "client"), ("direction", "sent")],
    );
    let received = scrape.sum(
        "cacheprobe_memcache_bytes_total",
        &[("role", "server"), ("direction", "received")],
    );
    assert!(
        sent > 0.0 && sent == received,
        "client sent {sent}, server received {received}"
    );

    // The local API shows the hottest key (k0: set, get, multi-get and touch) for the server.
    std::thread::sleep(Duration::from_millis(1500));
    let keys = keys_report(&agent);
    let client = keys["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == "client" && s["server"] == format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("{keys:#}"));
    assert_eq!(client["by_requests"][0]["key"], "k0", "{client:#}");
    assert_eq!(client["by_requests"][0]["count"], 4, "{client:#}");
}

/// Binary protocol (dalli) against memcached in binary mode, and the counts match memcached's
/// own stats.
#[test]
fn binary_protocol_with_dalli_matches_memcached_stats() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("mc-binary", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-B", "binary"]).unwrap();
    let dalli = Command::new("ruby")
        .args([
            "-e",
            &format!(
                "require 'dalli'; c = Dalli::Client.new('127.0.0.1:{port}')\n\
                 4.times {{ |i| c.set(\"d#{{i}}\", 'v') }}\n\
                 3.times {{ |i| raise 'miss' unless c.get(\"d#{{i}}\") == 'v' }}\n\
                 2.times {{ |i| raise 'hit' unless c.get(\"none#{{i}}\").nil? }}\n\
                 c.delete('d3')\n\
                 c.close"
            ),
        ])
        .output()
        .unwrap();
    assert!(
        dalli.status.success(),
        "{}",
        String::from_utf8_lossy(&dalli.stderr)
    );
    let scrape = agent.wait_for(WAIT, |s| {
        s.requests(&[("role", "client"), ("command", "bin_delete")]) >= 1.0
    });
    let count = |command: &str, status: &str| {
        scrape.requests(&[("role", "client"), ("command", command), ("status", status)])
    };
    assert_eq!(count("bin_set", "stored"), 4.0, "{}", scrape.text);
    assert_eq!(count("bin_get", "hit"), 3.0, "{}", scrape.text);
    assert_eq!(count("bin_get", "miss"), 2.0, "{}", scrape.text);
    assert_eq!(count("bin_delete", "deleted"), 1.0, "{}", scrape.text);

    // memcached's own counters are the oracle for the server side.
    let stats = python(
        None,
        &format!(
            "import socket\n\
             s = socket.create_connection(('127.0.0.1', {port}))\n\
             s.sendall(b'\\x80\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00')\n\
             data = b''\n\
             while True:\n\
             \x20   hdr = s.recv(24, socket.MSG_WAITALL)\n\
             \x20   klen = int.from_bytes(hdr[2:4], 'big'); blen = int.from_bytes(hdr[8:12], 'big')\n\
             \x20   body = s.recv(blen, socket.MSG_WAITALL) if blen else b''\n\
             \x20   if klen == 0: break\n\
             \x20   print(body[:klen].decode(), body[klen:].decode())\n"
        ),
    )
    .unwrap();
    let stats: BTreeMap<String, f64> = String::from_utf8_lossy(&stats.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect();
    let server = agent.wait_for(WAIT, |s| {
        s.requests(&[("role", "server"), ("command", "bin_delete")]) >= 1.0
    });
    let server_count = |command: &str, status: &str| {
        server.requests(&[("role", "server"), ("command", command), ("status", status)])
    };
    assert_eq!(
        server_count("bin_get", "hit"),
        stats["get_hits"],
        "{stats:?}"
    );
    assert_eq!(
        server_count("bin_get", "miss"),
        stats["get_misses"],
        "{stats:?}"
    );
    assert_eq!(
        server_count("bin_set", "stored"),
        stats["cmd_set"],
        "{stats:?}"
    );
    assert_eq!(
        server_count("bin_delete", "deleted"),
        stats["delete_hits"],
        "{stats:?}"
    );
}

/// twemproxy in front of memcached: the application's requests are seen on the twemproxy
/// service, and nutcracker's own requests to memcached on the memcached service.
#[test]
fn requests_through_twemproxy_are_seen_on_both_hops() {
    require_root();
    let backend = unique_port();
    let proxy = unique_port();
    let agent = Agent::start(
        "mc-twemproxy",
        &[
            ("memcached", backend, "memcache"),
            ("twemproxy", proxy, "memcache"),
        ],
    )
    .unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", backend, &[]).unwrap();
    let dir = scratch_dir("nutcracker");
    let conf = dir.join("nutcracker.yml");
    std::fs::write(
        &conf,
        format!(
            "pool:\n  listen: 127.0.0.1:{proxy}\n  hash: fnv1a_64\n  distribution: ketama\n  timeout: 1000\n  servers:\n   - 127.0.0.1:{backend}:1\n"
        ),
    )
    .unwrap();
    let _nutcracker = start_nutcracker(&conf, proxy).unwrap();
    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {proxy}))\n\
             for i in range(4):\n\
             \x20   assert c.set('t%d' % i, 'v', noreply=False)\n\
             for i in range(6):\n\
             \x20   c.get('t%d' % i)\n\
             c.close()\n"
        ),
    )
    .unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.requests(&[
            ("service", "memcached"),
            ("role", "client"),
            ("command", "get"),
        ]) >= 6.0
    });
    let app = |command: &str, status: &str| {
        scrape.requests(&[
            ("service", "twemproxy"),
            ("role", "client"),
            ("command", command),
            ("status", status),
        ])
    };
    assert_eq!(app("set", "stored"), 4.0, "{}", scrape.text);
    assert_eq!(app("get", "hit"), 4.0, "{}", scrape.text);
    assert_eq!(app("get", "miss"), 2.0, "{}", scrape.text);
    let hop = |command: &str, status: &str| {
        scrape.requests(&[
            ("service", "memcached"),
            ("role", "client"),
            ("command", command),
            ("status", status),
        ])
    };
    assert_eq!(hop("set", "stored"), 4.0, "{}", scrape.text);
    assert_eq!(
        hop("get", "hit") + hop("get", "miss"),
        6.0,
        "{}",
        scrape.text
    );
    assert_eq!(hop("get", "hit"), 4.0, "{}", scrape.text);
}

/// memcaslap (libmemcached) load, decoded in full (no budget): the agent's server-side get/set
/// counts equal memcached's own cmd_get / cmd_set.
#[test]
fn memcaslap_load_matches_memcached_stats() {
    require_root();
    let port = unique_port();
    // Exact counts need every connection decoded: no decoding budget.
    let agent = Agent::start_with_config(
        "mc-memcaslap",
        &format!(
            "[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_records_per_second = 0\n"
        ),
    )
    .unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let output = Command::new("memcaslap")
        .args([
            "-s",
            &format!("127.0.0.1:{port}"),
            "-x",
            "2000",
            "-c",
            "4",
            "-T",
            "1",
        ])
        .output()
        .expect("memcaslap (package libmemcached-tools)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = server_stats(port, "stats");
    let expected = stats["cmd_get"] + stats["cmd_set"];
    let scrape = agent.wait_for(WAIT, |s| {
        s.requests(&[("role", "server"), ("command", "get")])
            + s.requests(&[("role", "server"), ("command", "set")])
            >= expected
    });
    assert_eq!(
        scrape.requests(&[("role", "server"), ("command", "get")]),
        stats["cmd_get"],
        "{stats:?}"
    );
    assert_eq!(
        scrape.requests(&[("role", "server"), ("command", "set")]),
        stats["cmd_set"],
        "{stats:?}"
    );
    assert_eq!(
        scrape.requests(&[("role", "server"), ("command", "get"), ("status", "hit")]),
        stats["get_hits"],
        "{stats:?}"
    );
    assert_eq!(
        scrape.sum("cacheprobe_events_lost_total", &[]),
        0.0,
        "{}",
        scrape.text
    );
}

/// Above `limits.capture_records_per_second` decoding follows a share of the connections: the
/// sample ratio drops, counts stay estimates of the real totals (scaled by the sample), and no
/// request of a connection that stopped being followed is reported as a timeout.
#[test]
fn decoding_above_its_budget_samples_connections_and_scales_counts() {
    require_root();
    let port = unique_port();
    let agent = Agent::start_with_config(
        "mc-budget",
        &format!(
            "sample_interval_seconds = 1\n\
             [[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_records_per_second = 40000\n"
        ),
    )
    .unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    // Three memcaslap processes of 64 connections each (memcaslap opens no more than 64), so a
    // sample of the 192 server-side sockets is still a fair share of the load.
    let loads: Vec<_> = (0..3)
        .map(|_| {
            Command::new("memcaslap")
                .args([
                    "-s",
                    &format!("127.0.0.1:{port}"),
                    "-t",
                    "6s",
                    "-c",
                    "64",
                    "-T",
                    "1",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("memcaslap (package libmemcached-tools)")
        })
        .collect();
    let sampled = agent.wait_for(Duration::from_secs(6), |s| {
        s.sum("cacheprobe_capture_sample_ratio", &[]) <= 0.5
    });
    for mut load in loads {
        assert!(load.wait().unwrap().success());
    }
    let ratio = sampled.sum("cacheprobe_capture_sample_ratio", &[]);
    assert!(ratio <= 0.5, "sample ratio {ratio}: {}", agent.log());
    assert!(
        agent.log().contains("capture sample changed"),
        "{}",
        agent.log()
    );

    let stats = server_stats(port, "stats");
    let served = stats["cmd_get"] + stats["cmd_set"];
    // Once the load stops the sample widens again, a step per second.
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_capture_sample_ratio", &[]) == 1.0
    });
    let counted = scrape.requests(&[("role", "server")]);
    eprintln!(
        "estimate/served = {:.2} at sample ratio {ratio}",
        counted / served
    );
    assert!(
        counted > served * 0.5 && counted < served * 2.0,
        "server-side requests estimated {counted}, memcached served {served}"
    );
    // memcaslap stops with requests in flight: those few are truly unanswered. Streams the
    // sample let go must not add to them, nor time out.
    assert_eq!(
        scrape.requests(&[("status", "timeout")]),
        0.0,
        "{}",
        scrape.text
    );
    let unanswered = scrape.requests(&[("status", "unanswered")]);
    assert!(
        unanswered < counted * 0.01,
        "{unanswered} unanswered: {}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_events_lost_total", &[]),
        0.0,
        "{}",
        scrape.text
    );
}

/// tshark's memcache dissector, on a capture of the same traffic, counts the same requests per
/// command as the agent.
#[test]
fn request_counts_agree_with_tshark() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("mc-tshark", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let dir = scratch_dir("tshark");
    let pcap = dir.join("mc.pcap");
    let mut capture = Guard(
        Command::new("dumpcap")
            .args(["-q", "-i", "lo", "-f", &format!("tcp port {port}"), "-w"])
            .arg(&pcap)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dumpcap (package tshark)"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    python(None, &scripted_text_workload(port)).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill has no memory-safety preconditions; SIGINT lets dumpcap flush the file.
    unsafe { libc::kill(capture.0.id() as i32, libc::SIGINT) };
    let _ = capture.0.wait();
    let tshark = Command::new("tshark")
        .args(["-r"])
        .arg(&pcap)
        .args(["-d", &format!("tcp.port=={port},memcache")])
        .args(["-Y", &format!("memcache.command && tcp.dstport == {port}")])
        .args(["-T", "fields", "-e", "memcache.command"])
        .output()
        .unwrap();
    assert!(
        tshark.status.success(),
        "{}",
        String::from_utf8_lossy(&tshark.stderr)
    );
    let mut oracle: BTreeMap<String, f64> = BTreeMap::new();
    for line in String::from_utf8_lossy(&tshark.stdout).lines() {
        // One frame may hold several pipelined requests.
        for command in line.split(',').filter(|c| !c.is_empty()) {
            *oracle.entry(command.to_string()).or_default() += 1.0;
        }
    }
    assert!(!oracle.is_empty(), "tshark decoded nothing");
    let scrape = agent.wait_for(WAIT, |s| s.requests(&[("role", "client")]) >= 20.0);
    for (command, tshark_count) in &oracle {
        // The agent counts a multi-get once per key; tshark once per request line.
        let agent_count = if command == "get" {
            scrape.requests(&[("role", "client"), ("command", "get")]) - 3.0
        } else {
            scrape.requests(&[("role", "client"), ("command", command)])
        };
        assert_eq!(
            agent_count, *tshark_count,
            "command {command}: tshark {oracle:?}\n{}",
            scrape.text
        );
    }
}
