//! Pooled connections opened before the agent (or `diagnose`) started: their traffic is decoded
//! like that of connections opened later.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use cacheprobe_tests::*;

const POOL: usize = 4;

/// A pymemcache pool of `POOL` connections, each used once, that then waits for a line on
/// stdin before running `work` (Python using `pool` and `port`).
fn pooled_client(
    port: u16,
    work: &str,
) -> (Guard, ChildStdin, BufReader<std::process::ChildStdout>) {
    let script = format!(
        "import sys\n\
         from pymemcache.client.base import Client\n\
         port = {port}\n\
         pool = [Client(('127.0.0.1', port)) for _ in range({POOL})]\n\
         for i, c in enumerate(pool):\n\
         \x20   assert c.set('warm%d' % i, b'w', noreply=False)\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         {work}\n\
         print('done', flush=True)\n"
    );
    let mut child: Child = Command::new(PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the pooled client did not start");
    (Guard(child), stdin, stdout)
}

fn requests(scrape: &Scrape, labels: &[(&str, &str)]) -> f64 {
    scrape.sum("cacheprobe_memcache_requests_total", labels)
}

/// The pool exists (connected and used) before `cacheprobe run` starts; then 1,000 sets and
/// 1,000 gets go over it. Nothing was in flight at the start, so every one of the 2,000 must
/// be decoded, on the client side and on memcached's.
#[test]
fn pooled_connections_opened_before_run_are_decoded() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let (_client, mut go, mut out) = pooled_client(
        port,
        "for i in range(1000):\n\
         \x20   assert pool[i % len(pool)].set('k%d' % i, b'v', noreply=False)\n\
         for i in range(1000):\n\
         \x20   assert pool[i % len(pool)].get('k%d' % i) == b'v'",
    );
    let agent = Agent::start_with_config(
        "pooled-run",
        &format!(
            "sample_interval_seconds = 1\n\
             [[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_records_per_second = 0\n"
        ),
    )
    .unwrap();
    // Both ends of every pooled connection are adopted from /proc at start.
    let adopted = agent.wait_for(Duration::from_secs(5), |s| {
        s.sum("cacheprobe_connections_active", &[]) >= (2 * POOL) as f64
    });
    assert_eq!(
        adopted.sum("cacheprobe_connections_active", &[]),
        (2 * POOL) as f64,
        "{}",
        adopted.text
    );
    writeln!(go, "go").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let scrape = agent.wait_for(Duration::from_secs(10), |s| {
        requests(s, &[("role", "client")]) >= 2000.0 && requests(s, &[("role", "server")]) >= 2000.0
    });
    for role in ["client", "server"] {
        let count = |command: &str, status: &str| {
            requests(
                &scrape,
                &[("role", role), ("command", command), ("status", status)],
            )
        };
        assert_eq!(
            (count("set", "stored"), count("get", "hit")),
            (1000.0, 1000.0),
            "{role}: sets stored and get hits decoded\n{}",
            scrape.text
        );
        assert_eq!(
            requests(&scrape, &[("role", role)]),
            2000.0,
            "{role}: {}",
            scrape.text
        );
    }
    assert_eq!(
        scrape.sum("cacheprobe_memcache_decode_errors_total", &[]),
        0.0,
        "{}",
        scrape.text
    );
}

/// `diagnose --local` (no daemon) started while a pooled client is busy: the edge table shows
/// the client's traffic to the server with a rate and latency.
#[test]
fn diagnose_local_shows_traffic_of_pooled_connections() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    // About 8 s of steady gets and sets: longer than diagnose watches.
    let (_client, mut go, _out) = pooled_client(
        port,
        "import time\n\
         end = time.monotonic() + 8\n\
         i = 0\n\
         while time.monotonic() < end:\n\
         \x20   c = pool[i % len(pool)]\n\
         \x20   c.set('d%d' % (i % 50), b'v', noreply=False)\n\
         \x20   c.get('d%d' % (i % 50))\n\
         \x20   i += 1\n\
         \x20   time.sleep(0.002)",
    );
    writeln!(go, "go").unwrap();
    let dir = scratch_dir("pooled-diag");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n"),
    )
    .unwrap();
    let output = Command::new(agent_binary())
        .args([
            "diagnose",
            "--local",
            "--json",
            "--duration",
            "5s",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "diagnose printed no JSON ({err}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(report["source"]["kind"], "local", "{report:#}");
    let server = format!("127.0.0.1:{port}");
    let edges = report["edges"].as_array().unwrap();
    let edge = edges
        .iter()
        .find(|e| e["process"] == "python3" && e["server"] == server)
        .unwrap_or_else(|| panic!("no python3 -> {server} edge: {report:#}"));
    // The client makes a few hundred requests a second; diagnose sees most of the 5 s.
    let rate = edge["requests_per_s"].as_f64().unwrap();
    assert!(rate >= 50.0, "{edge:#}");
    assert!(edge["requests"].as_u64().unwrap() >= 250, "{edge:#}");
    for quantile in ["p50_ms", "p99_ms"] {
        let ms = edge[quantile]
            .as_f64()
            .unwrap_or_else(|| panic!("{quantile} missing: {edge:#}"));
        assert!(ms > 0.0 && ms < 1000.0, "{quantile}: {edge:#}");
    }
    assert_eq!(edge["errors"], 0, "{edge:#}");
}
