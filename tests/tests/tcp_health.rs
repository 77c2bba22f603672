//! Dead-socket writes, retransmits, resets, connect failures, SYN pressure and fd exhaustion,
//! each induced for real: memcached's idle timeout, iptables drops inside test namespaces, a
//! listener that never accepts, and a client with a lowered fd limit.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

// memcached's idle check uses its 1 s coarse clock and closes a client only when idle is
// strictly greater than idle_timeout, after sleeping between scans: with idle_timeout=2 the close
// lands 3-5 s after the last command. Clients that must be closed on sleep 6.5 s.

const WAIT: Duration = Duration::from_secs(10);

fn dead_writes(scrape: &Scrape, comm: &str, outcome: Option<&str>) -> f64 {
    let mut labels = vec![("comm", comm), ("role", "client")];
    if let Some(outcome) = outcome {
        labels.push(("outcome", outcome));
    }
    scrape.sum("cacheprobe_dead_socket_writes_total", &labels)
}

/// Real clients set a key, sleep past memcached's 2 s idle timeout and set again: exactly that
/// second write is dead, attributed to the client process, and the client noticed (eof/reset).
#[test]
fn late_writes_after_idle_close_are_dead_writes() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    let agent = Agent::start("deadwrite", &[("memcached", port, "memcache")]).unwrap();

    // pymemcache raises on the EOF; python-memcache reports failure; neither may crash us.
    python(
        None,
        &format!(
            "import time, memcache\n\
             from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             c.set('a', '1', noreply=False)\n\
             m = memcache.Client(['127.0.0.1:{port}'])\n\
             assert m.set('b', '2')\n\
             time.sleep(6.5)\n\
             try:\n\
             \x20   c.set('a', '2', noreply=False)\n\
             except Exception:\n\
             \x20   pass\n\
             m.set('b', '3')\n"
        ),
    )
    .unwrap();
    let dalli = Command::new("ruby")
        .args([
            "-e",
            &format!(
                "require 'dalli'; c = Dalli::Client.new('127.0.0.1:{port}', socket_max_failures: 1); c.set('d', 'v'); sleep 6.5; begin; c.set('e', 'v'); rescue StandardError; end"
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
        dead_writes(s, "python3", None) >= 2.0 && dead_writes(s, "ruby", None) >= 1.0
    });
    assert_eq!(
        dead_writes(&scrape, "python3", None),
        2.0,
        "{}",
        scrape.text
    );
    assert_eq!(dead_writes(&scrape, "ruby", None), 1.0, "{}", scrape.text);
    assert_eq!(
        dead_writes(&scrape, "python3", Some("unnoticed"))
            + dead_writes(&scrape, "ruby", Some("unnoticed")),
        0.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_dead_socket_writes_total", &[]),
        3.0,
        "{}",
        scrape.text
    );
    assert!(scrape
        .text
        .contains(&format!("server=\"127.0.0.1:{port}\"")));
}

/// The same clients without the sleep write nothing dead.
#[test]
fn no_dead_writes_without_idle_close() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    let agent = Agent::start("nodeadwrite", &[("memcached", port, "memcache")]).unwrap();
    python(
        None,
        &format!(
            "import memcache\n\
             from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             m = memcache.Client(['127.0.0.1:{port}'])\n\
             for i in range(20):\n\
             \x20   c.set('a', str(i), noreply=False)\n\
             \x20   assert m.set('b', str(i))\n\
             c.close()\n\
             m.disconnect_all()\n"
        ),
    )
    .unwrap();
    // Wait for both connections to close on both sides, then past the 5 s outcome window.
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[]) >= 4.0
    });
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &[]),
        4.0,
        "{}",
        scrape.text
    );
    assert_no_dead_writes_after_the_window(&agent);
}

/// A client that half-closes after its requests (shutdown(SHUT_WR), as `printf 'stats\r\n' |
/// nc -N` does) still reads memcached's replies: they go out after the client's FIN, but the
/// client takes them, so they are no dead writes (memcached's server-side sockets used to count
/// every such reply). Its requests are still decoded, and a client that really closed still
/// counts (late_writes_after_idle_close_are_dead_writes).
#[test]
fn replies_to_a_half_closed_client_are_not_dead_writes() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent = Agent::start("halfclose", &[("memcached", port, "memcache")]).unwrap();
    python(
        None,
        &format!(
            "import socket\n\
             for i in range(5):\n\
             \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
             \x20   s.sendall(b'set k 0 0 1\\r\\nv\\r\\nget k\\r\\nstats\\r\\n')\n\
             \x20   s.shutdown(socket.SHUT_WR)\n\
             \x20   reply = b''\n\
             \x20   while True:\n\
             \x20       d = s.recv(65536)\n\
             \x20       if not d:\n\
             \x20           break\n\
             \x20       reply += d\n\
             \x20   assert reply.startswith(b'STORED\\r\\nVALUE k 0 1\\r\\nv\\r\\nEND\\r\\n'), reply\n\
             \x20   assert reply.endswith(b'END\\r\\n'), reply[-40:]\n\
             \x20   s.close()\n"
        ),
    )
    .unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[]) >= 10.0
            && s.sum(
                "cacheprobe_memcache_requests_total",
                &[("role", "server"), ("command", "get")],
            ) >= 5.0
    });
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &[]),
        10.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_memcache_requests_total",
            &[("role", "server"), ("command", "get"), ("status", "hit")]
        ),
        5.0,
        "{}",
        scrape.text
    );
    // Past the 5 s window in which an unanswered write would still be waiting for a reset.
    assert_no_dead_writes_after_the_window(&agent);
}

/// None after the 5 s window in which any write waits for its fate (and its reset).
fn assert_no_dead_writes_after_the_window(agent: &Agent) {
    std::thread::sleep(Duration::from_secs(6));
    let scrape = agent.scrape();
    assert_eq!(
        scrape.sum("cacheprobe_dead_socket_writes_total", &[]),
        0.0,
        "{}",
        scrape.text
    );
}

/// A peer gone without a word: memcached closes the idle client, then every packet to it is
/// dropped (a dead host, a firewall forgetting the flow), so the client's late write draws no
/// reset, only its own retransmits. Still a dead write, at the window's end.
#[test]
fn a_late_write_to_a_silent_peer_is_a_dead_write() {
    require_root();
    let port = unique_port();
    let pair = NetnsPair::create("s", 24).unwrap();
    let _memcached = start_memcached(
        Some(&pair.server_ns),
        &pair.server_addr,
        port,
        &["-o", "idle_timeout=2"],
    )
    .unwrap();
    let agent = Agent::start("silent", &[("cache", port, "memcache")]).unwrap();
    let dir = std::env::temp_dir().join(format!("cacheprobe-silent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ready, go) = (dir.join("ready"), dir.join("go"));
    let script = format!(
        "import os, socket, time\n\
         s = socket.create_connection(('{server}', {port}))\n\
         s.sendall(b'set k 0 0 1\\r\\nv\\r\\n')\n\
         assert s.recv(100) == b'STORED\\r\\n'\n\
         time.sleep(6.5)\n\
         open('{ready}', 'w').close()\n\
         while not os.path.exists('{go}'):\n\
         \x20   time.sleep(0.05)\n\
         s.sendall(b'set k 0 0 1\\r\\nw\\r\\n')\n\
         time.sleep(7)\n",
        server = pair.server_addr,
        ready = ready.display(),
        go = go.display(),
    );
    let client_ns = pair.client_ns.clone();
    let client = std::thread::spawn(move || python(Some(&client_ns), &script));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ready.exists(), "the client never got past its idle sleep");
    assert!(
        pair.drop_to_server_port("-A", port, &[]).success(),
        "iptables rule"
    );
    std::fs::write(&go, b"").unwrap();
    let scrape = agent.wait_for(Duration::from_secs(12), |s| {
        s.sum("cacheprobe_dead_socket_writes_total", &[]) >= 1.0
    });
    let _ = pair.drop_to_server_port("-D", port, &[]);
    client.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        dead_writes(&scrape, "python3", None),
        1.0,
        "{}",
        scrape.text
    );
    assert!(
        scrape.sum(
            "cacheprobe_tcp_retransmits_total",
            &[("role", "client"), ("kind", "data")]
        ) > 0.0,
        "{}",
        scrape.text
    );
}

/// Random drops inside the server namespace make the client retransmit SYNs and data and the
/// server retransmit SYN-ACKs; each is counted against the server endpoint. The rule lives in a
/// namespace the test owns, so it disappears with the namespace on every exit path.
#[test]
fn retransmits_are_counted_per_server() {
    require_root();
    let port = unique_port();
    let pair = NetnsPair::create("r", 18).unwrap();
    let _memcached = start_memcached(Some(&pair.server_ns), &pair.server_addr, port, &[]).unwrap();
    let agent = Agent::start("retransmit", &[("cache", port, "memcache")]).unwrap();
    let drop_rule = |action: &str| {
        pair.drop_to_server_port(
            action,
            port,
            &[
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.4",
            ],
        )
    };
    assert!(drop_rule("-A").success(), "iptables statistic rule");
    let server = pair.server_addr.clone();
    let result = python(
        Some(&pair.client_ns),
        &format!(
            "import threading, socket\n\
             def work(i):\n\
             \x20   try:\n\
             \x20       s = socket.create_connection(('{server}', {port}), timeout=8)\n\
             \x20       for j in range(5):\n\
             \x20           s.sendall(b'set k%d 0 0 100\\r\\n' % i + b'x' * 100 + b'\\r\\n')\n\
             \x20           s.recv(100)\n\
             \x20       s.close()\n\
             \x20   except Exception:\n\
             \x20       pass\n\
             ts = [threading.Thread(target=work, args=(i,)) for i in range(24)]\n\
             [t.start() for t in ts]\n\
             [t.join() for t in ts]\n"
        ),
    );
    let _ = drop_rule("-D");
    result.unwrap();
    let endpoint = format!("{}:{port}", pair.server_addr);
    let client = [
        ("service", "cache"),
        ("server", endpoint.as_str()),
        ("role", "client"),
    ];
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_tcp_retransmits_total", &[("kind", "syn")]) > 0.0
            && s.sum("cacheprobe_tcp_retransmits_total", &[("kind", "data")]) > 0.0
    });
    let with_kind = |kind| {
        let mut labels = client.to_vec();
        labels.push(("kind", kind));
        scrape.sum("cacheprobe_tcp_retransmits_total", &labels)
    };
    assert!(
        with_kind("syn") > 0.0,
        "no SYN retransmits: {}",
        scrape.text
    );
    assert!(
        with_kind("data") > 0.0,
        "no data retransmits: {}",
        scrape.text
    );
    // Only the namespaced server exists: nothing may be attributed elsewhere.
    let total = scrape.sum("cacheprobe_tcp_retransmits_total", &[]);
    let here = scrape.sum(
        "cacheprobe_tcp_retransmits_total",
        &[("server", pair.server_addr.as_str())],
    );
    let here_with_port = scrape.sum(
        "cacheprobe_tcp_retransmits_total",
        &[("server", endpoint.as_str())],
    );
    assert_eq!(total, here_with_port, "{}", scrape.text);
    assert_eq!(here, 0.0, "server label must include the port");
}

/// Refused (nothing listening: RST) and timed-out (SYNs dropped) connects.
#[test]
fn connect_failures_are_classified() {
    require_root();
    let refused_port = unique_port();
    let blackhole_port = unique_port();
    let pair = NetnsPair::create("c", 19).unwrap();
    let agent = Agent::start(
        "connectfail",
        &[
            ("refusing", refused_port, "memcache"),
            ("blackhole", blackhole_port, "memcache"),
        ],
    )
    .unwrap();
    let status = pair.drop_to_server_port("-A", blackhole_port, &[]);
    assert!(status.success());
    let server = pair.server_addr.clone();
    python(
        Some(&pair.client_ns),
        &format!(
            "import socket\n\
             for port, n in (({refused_port}, 3), ({blackhole_port}, 2)):\n\
             \x20   for i in range(n):\n\
             \x20       try:\n\
             \x20           socket.create_connection(('{server}', port), timeout=1.5)\n\
             \x20           raise SystemExit('connected?')\n\
             \x20       except (ConnectionRefusedError, socket.timeout):\n\
             \x20           pass\n"
        ),
    )
    .unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connect_failures_total", &[]) >= 5.0
    });
    assert_eq!(
        scrape.sum(
            "cacheprobe_connect_failures_total",
            &[("service", "refusing"), ("reason", "refused")]
        ),
        3.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connect_failures_total",
            &[("service", "blackhole"), ("reason", "timeout")]
        ),
        2.0,
        "{}",
        scrape.text
    );
    assert_eq!(scrape.sum("cacheprobe_connect_failures_total", &[]), 5.0);
    assert_eq!(
        scrape.sum("cacheprobe_syn_total", &[("direction", "out")]),
        5.0,
        "{}",
        scrape.text
    );
    // The refusing side sent a reset for each SYN; the client received it.
    assert_eq!(
        scrape.sum(
            "cacheprobe_tcp_resets_total",
            &[
                ("service", "refusing"),
                ("role", "client"),
                ("direction", "received")
            ]
        ),
        3.0,
        "{}",
        scrape.text
    );
    assert_eq!(scrape.sum("cacheprobe_connections_opened_total", &[]), 0.0);
}

/// A listener with a backlog of 1 that never accepts, hit by 20 connection attempts: every SYN
/// is counted as it arrives (tc ingress), including those the full queue drops.
#[test]
fn syn_burst_at_a_listener_that_never_accepts() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("synburst", &[("stuck", port, "memcache")]).unwrap();
    let mut listener = Guard(
        Command::new(PYTHON)
            .args([
                "-c",
                &format!(
                    "import socket, time\n\
                     s = socket.socket()\n\
                     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                     s.bind(('127.0.0.1', {port}))\n\
                     s.listen(1)\n\
                     time.sleep(60)\n"
                ),
            ])
            .spawn()
            .unwrap(),
    );
    wait_for_port(None, "127.0.0.1", port).unwrap();
    python(
        None,
        &format!(
            "import socket\n\
             socks = []\n\
             for i in range(20):\n\
             \x20   s = socket.socket()\n\
             \x20   s.setblocking(False)\n\
             \x20   s.connect_ex(('127.0.0.1', {port}))\n\
             \x20   socks.append(s)\n\
             import time; time.sleep(1.5)\n"
        ),
    )
    .unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_syn_total", &[("direction", "in")]) >= 20.0
            && s.sum("cacheprobe_listen_queue_length", &[("service", "stuck")]) >= 2.0
    });
    // backlog 1: the kernel admits limit + 1 connections, then drops SYNs.
    assert_eq!(
        scrape.sum("cacheprobe_listen_queue_limit", &[("service", "stuck")]),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_listen_queue_length", &[("service", "stuck")]),
        2.0,
        "{}",
        scrape.text
    );
    assert!(
        scrape.sum("cacheprobe_listen_overflows_total", &[]) > 0.0,
        "{}",
        scrape.text
    );
    assert!(
        scrape.sum("cacheprobe_listen_drops_total", &[]) > 0.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_syn_total",
            &[("service", "stuck"), ("direction", "out")]
        ),
        20.0,
        "{}",
        scrape.text
    );
    // Two handshakes completed; the other 18 attempts (and their SYN retries) were refused,
    // which only the listener's drop counter shows.
    assert!(
        scrape.sum(
            "cacheprobe_syn_total",
            &[("service", "stuck"), ("direction", "in")]
        ) >= 20.0,
        "{}",
        scrape.text
    );
    let _ = listener.0.kill();
}

/// A client with a lowered fd limit opens connections until EMFILE and holds them: the failures
/// are counted for its process name, its fd usage is near 1, and raising its limit live with
/// prlimit moves the limit metric.
#[test]
fn emfile_and_fd_pressure_are_reported_per_process_name() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-c", "4096"]).unwrap();
    let agent = Agent::start("emfile", &[("memcached", port, "memcache")]).unwrap();
    // Nothing is near a limit: the syscall probes, which tax every syscall on the host, are off.
    let armed = "cacheprobe_fd_exhaustion_probes_armed";
    let calm = agent.wait_for(WAIT, |s| s.sum(armed, &[]) == 0.0 && s.text.contains(armed));
    assert_eq!(calm.sum(armed, &[]), 0.0, "{}", calm.text);
    let dir = scratch_dir("emfile");
    let go = dir.join("go");
    let mut client = Command::new(PYTHON)
        .args([
            "-c",
            &format!(
                "import resource, socket, ctypes, os, sys, time\n\
                 ctypes.CDLL(None).prctl(15, b'fdhog', 0, 0, 0)\n\
                 resource.setrlimit(resource.RLIMIT_NOFILE, (32, 4096))\n\
                 socks, errors = [], 0\n\
                 for i in range(18):\n\
                 \x20   socks.append(socket.create_connection(('127.0.0.1', {port})))\n\
                 print('half', flush=True)\n\
                 while not os.path.exists('{go}'):\n\
                 \x20   time.sleep(0.05)\n\
                 for i in range(64):\n\
                 \x20   try:\n\
                 \x20       socks.append(socket.create_connection(('127.0.0.1', {port})))\n\
                 \x20   except OSError as e:\n\
                 \x20       if e.errno == 24:\n\
                 \x20           errors += 1\n\
                 print(errors, flush=True)\n\
                 time.sleep(30)\n",
                go = go.display()
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "half");
    // Over half of its 32 descriptors in use: the next sample attaches the probes.
    let pressed = agent.wait_for(WAIT, |s| s.sum(armed, &[]) == 1.0);
    assert_eq!(pressed.sum(armed, &[]), 1.0, "{}", pressed.text);
    std::fs::write(&go, "").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let client = Guard(client);
    let client_errors: f64 = line.trim().parse().unwrap();
    assert!(client_errors > 0.0);
    let hog = [("comm", "fdhog")];
    let labels = [("comm", "fdhog"), ("errno", "EMFILE")];
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_fd_exhaustion_errors_total", &labels) >= client_errors
            && s.sum("cacheprobe_process_fd_usage_ratio", &hog) > 0.9
    });
    assert_eq!(
        scrape.sum("cacheprobe_fd_exhaustion_errors_total", &labels),
        client_errors,
        "{}",
        scrape.text
    );
    let ratio = scrape.sum("cacheprobe_process_fd_usage_ratio", &hog);
    // Fds inherited above the new limit stay open, so usage can exceed 1.
    assert!(ratio > 0.9, "ratio {ratio}: {}", scrape.text);
    assert_eq!(
        scrape.sum("cacheprobe_process_fd_limit", &hog),
        32.0,
        "{}",
        scrape.text
    );
    let connections = scrape.sum(
        "cacheprobe_process_connections",
        &[("comm", "fdhog"), ("service", "memcached")],
    );
    assert!(
        (25.0..=32.0).contains(&connections),
        "connections {connections}"
    );
    assert!(scrape.sum("cacheprobe_host_file_limit", &[]) > 0.0);

    let status = Command::new("prlimit")
        .args(["--pid", &client.0.id().to_string(), "--nofile=1024:4096"])
        .status()
        .unwrap();
    assert!(status.success());
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_process_fd_limit", &hog) == 1024.0
    });
    assert_eq!(
        scrape.sum("cacheprobe_process_fd_limit", &hog),
        1024.0,
        "{}",
        scrape.text
    );
    assert!(scrape.sum("cacheprobe_process_fd_usage_ratio", &hog) < 0.05);
}
