//! `cacheprobe diagnose` against real incidents: it must name the problem (server, process,
//! command, inferred timeout) with a daemon and without one, and report nothing on healthy
//! traffic. JSON output is checked against its schema by the unit tests; here we read it.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

/// Listen overflows and EMFILE errors are host-wide: the SYN burst and the fd-pressure case must
/// not run while the healthy case is being judged.
static HOST_WIDE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn assert_idle_incident(report: &serde_json::Value, port: u16) {
    let server = format!("127.0.0.1:{port}");
    let idle = finding(report, "idle-disconnects")
        .unwrap_or_else(|| panic!("no idle-disconnects finding: {report:#}"));
    assert!(subjects(idle, "servers").contains(&server), "{idle:#}");
    let timeout = idle["values"]["idle_timeout_s"].as_f64().unwrap();
    assert!(
        (2.0..=5.0).contains(&timeout),
        "inferred idle timeout {timeout}: {idle:#}"
    );
    let title = idle["title"].as_str().unwrap();
    assert!(title.contains(&format!("{}", timeout as u64)), "{title}");
    // The processes that then wrote onto the dead connections, and what they wrote, are named
    // (in the idle finding itself, or in a dead-writes finding of their own).
    let writers = [Some(idle), finding(report, "dead-writes")];
    assert!(
        writers.iter().flatten().any(
            |f| subjects(f, "processes").contains(&"cronjob".to_string())
                && subjects(f, "commands").iter().any(|c| c == "set")
        ),
        "cronjob's SETs are not named: {report:#}"
    );
}

#[test]
fn names_idle_disconnects_and_dead_writes_from_the_daemon() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("diag-idle", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    python(None, &idle_then_write_script(port, 3)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert_eq!(report["source"]["kind"], "daemon");
    assert_idle_incident(&report, port);

    let dot = Command::new(agent_binary())
        .args(["diagnose", "--graph", "dot", "--duration", "0s", "--socket"])
        .arg(&agent.control_socket)
        .output()
        .unwrap();
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(
        dot.starts_with("digraph") && dot.contains("cronjob"),
        "{dot}"
    );
}

#[test]
fn names_the_incident_without_a_daemon() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    let dir = scratch_dir("diag-local");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n"),
    )
    .unwrap();
    let script = idle_then_write_script(port, 3);
    let clients = std::thread::spawn(move || {
        // Let diagnose attach first.
        std::thread::sleep(Duration::from_secs(2));
        python(None, &script).unwrap();
    });
    let (output, report) = diagnose(None, Some(&config), "13s");
    clients.join().unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{report:#}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["source"]["kind"], "local");
    assert_idle_incident(&report, port);
    // The per-edge table names the client process and the server.
    let edges = report["edges"].as_array().unwrap();
    assert!(
        edges
            .iter()
            .any(|e| e["process"] == "cronjob" && e["server"] == format!("127.0.0.1:{port}")),
        "{edges:#?}"
    );
}

#[test]
fn healthy_traffic_reports_nothing() {
    require_root();
    let _host_wide = HOST_WIDE.lock().unwrap_or_else(|e| e.into_inner());
    let port = unique_port();
    let agent = Agent::start("diag-healthy", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\n\
             import time\n\
             c = Client(('127.0.0.1', {port}))\n\
             for i in range(300):\n\
             \x20   c.set('k%d' % (i % 50), 'v', noreply=False)\n\
             \x20   c.get('k%d' % (i % 50))\n\
             \x20   if i % 100 == 0:\n\
             \x20       time.sleep(1)\n\
             c.close()\n"
        ),
    )
    .unwrap();
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(0), "{report:#}");
    assert_eq!(
        report["findings"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    // Traffic was seen: otherwise diagnose says so in a note.
    assert!(
        !report["notes"].to_string().contains("no traffic"),
        "{report:#}"
    );
}

/// A SYN burst at a listener with a tiny backlog that never accepts.
#[test]
fn names_the_syn_burst_at_a_full_accept_queue() {
    require_root();
    let _host_wide = HOST_WIDE.lock().unwrap_or_else(|e| e.into_inner());
    let port = unique_port();
    let agent = Agent::start("diag-syn", &[("stuck", port, "memcache")]).unwrap();
    let _listener = Guard(
        Command::new(PYTHON)
            .args([
                "-c",
                &format!(
                    "import socket, time\n\
                     s = socket.socket()\n\
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
            "import socket, time\n\
             socks = []\n\
             for i in range(200):\n\
             \x20   s = socket.socket()\n\
             \x20   s.setblocking(False)\n\
             \x20   s.connect_ex(('127.0.0.1', {port}))\n\
             \x20   socks.append(s)\n\
             time.sleep(3)\n"
        ),
    )
    .unwrap();
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let named = ["syn-storm", "accept-queue-overflow"]
        .iter()
        .filter_map(|id| finding(&report, id))
        .any(|f| subjects(f, "services").contains(&"stuck".to_string()));
    assert!(named, "{report:#}");
    // The queue stayed full for seconds of 1 s samples: the finding names the listener.
    let overflow = finding(&report, "accept-queue-overflow").expect("accept-queue-overflow");
    let title = overflow["title"].as_str().unwrap();
    assert!(
        title.starts_with(&format!(
            "stuck's accept queue at 127.0.0.1:{port} was full"
        )),
        "{title}"
    );
}

/// One of three memcached servers of one service (same port on 127.0.0.1-3) stops (SIGSTOP)
/// while clients keep asking all three: diagnose names that server alone.
#[test]
fn names_the_one_hung_server_among_three() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("diag-hung", &[("memcached", port, "memcache")]).unwrap();
    let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let servers: Vec<Guard> = hosts
        .iter()
        .map(|host| start_memcached(None, host, port, &[]).unwrap())
        .collect();
    let hung = servers[1].0.id() as i32;
    let load = std::thread::spawn(move || {
        python(
            None,
            &format!(
                "from pymemcache.client.base import Client\n\
                 import time, threading\n\
                 def work(host):\n\
                 \x20   c = Client((host, {port}), timeout=1, connect_timeout=1)\n\
                 \x20   end = time.time() + 8\n\
                 \x20   while time.time() < end:\n\
                 \x20       try:\n\
                 \x20           c.get('k')\n\
                 \x20       except Exception:\n\
                 \x20           c.close()\n\
                 \x20       time.sleep(0.02)\n\
                 ts = [threading.Thread(target=work, args=(h,)) for h in ('127.0.0.1', '127.0.0.2', '127.0.0.3') for _ in range(2)]\n\
                 [t.start() for t in ts]\n\
                 [t.join() for t in ts]\n"
            ),
        )
        .unwrap();
    });
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(hung, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(3));
    unsafe { libc::kill(hung, libc::SIGCONT) };
    load.join().unwrap();
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let hung_server = format!("127.0.0.2:{port}");
    let named = ["slow-server", "server-not-answering"]
        .iter()
        .filter_map(|id| finding(&report, id))
        .any(|f| subjects(f, "servers") == vec![hung_server.clone()]);
    assert!(
        named,
        "the hung server {hung_server} is not named alone: {report:#}"
    );
    assert_eq!(report["findings"][0]["severity"], "critical", "{report:#}");
    drop(servers);
}

/// A read-heavy client with a warm cache; the server restarts mid-run and every read misses.
#[test]
fn names_the_miss_storm_after_a_restart() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("diag-miss", &[("memcached", port, "memcache")]).unwrap();
    let memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let load = std::thread::spawn(move || {
        python(
            None,
            &format!(
                "from pymemcache.client.base import Client\n\
                 import time\n\
                 c = Client(('127.0.0.1', {port}), timeout=1, connect_timeout=1)\n\
                 for i in range(200):\n\
                 \x20   c.set('item%d' % i, 'v', noreply=False)\n\
                 end = time.time() + 10\n\
                 i = 0\n\
                 while time.time() < end:\n\
                 \x20   try:\n\
                 \x20       c.get('item%d' % (i % 200))\n\
                 \x20   except Exception:\n\
                 \x20       c.close()\n\
                 \x20       time.sleep(0.05)\n\
                 \x20   i += 1\n\
                 \x20   time.sleep(0.002)\n"
            ),
        )
        .unwrap();
    });
    std::thread::sleep(Duration::from_secs(4));
    drop(memcached);
    let _restarted = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    load.join().unwrap();
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let storm =
        finding(&report, "miss-storm").unwrap_or_else(|| panic!("no miss-storm: {report:#}"));
    assert!(
        subjects(storm, "servers").contains(&format!("127.0.0.1:{port}")),
        "{storm:#}"
    );
}

/// Two clients with different server lists (one knows two servers, the other three) send the
/// same keys to different servers.
#[test]
fn names_key_routing_inconsistency() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("diag-routing", &[("memcached", port, "memcache")]).unwrap();
    let _servers: Vec<Guard> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|host| start_memcached(None, host, port, &[]).unwrap())
        .collect();
    // Each key goes to a's server, then b's, twice over: a key the rings place apart splits
    // three times but is one split key. The clients' own rings say how many keys that is.
    let output = python(
        None,
        &format!(
            "from pymemcache.client.hash import HashClient\n\
             a = HashClient([('127.0.0.1', {port}), ('127.0.0.2', {port})])\n\
             b = HashClient([('127.0.0.1', {port}), ('127.0.0.2', {port}), ('127.0.0.3', {port})])\n\
             for _ in range(2):\n\
             \x20   for i in range(100):\n\
             \x20       a.set('user:%d' % i, 'v', noreply=False)\n\
             \x20       b.get('user:%d' % i)\n\
             print(sum(a._get_client('user:%d' % i).server != b._get_client('user:%d' % i).server for i in range(100)))\n"
        ),
    )
    .unwrap();
    let apart: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(apart > 0.0, "the two rings place every key alike");
    std::thread::sleep(Duration::from_secs(2));
    let scrape = agent.scrape();
    assert_eq!(
        scrape.sum(
            "cacheprobe_memcache_key_split_total",
            &[("service", "memcached")]
        ),
        apart,
        "{}",
        scrape.text
    );
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let routing =
        finding(&report, "key-routing").unwrap_or_else(|| panic!("no key-routing: {report:#}"));
    assert!(
        subjects(routing, "services").contains(&"memcached".to_string()),
        "{routing:#}"
    );
    // Both senders are named (the first was "?" before).
    let senders: Vec<&str> = routing["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|line| line.as_str())
        .filter(|line| line.contains(" sent them to "))
        .collect();
    assert!(
        !senders.is_empty() && senders.iter().all(|line| !line.contains("?")),
        "{routing:#}"
    );
}

/// A client with a low fd limit connects to every server of a service until EMFILE.
#[test]
fn names_fd_pressure_of_a_process_connected_to_every_server() {
    require_root();
    // EMFILE is seen host-wide: keep it away from the healthy case.
    let _host_wide = HOST_WIDE.lock().unwrap_or_else(|e| e.into_inner());
    let port = unique_port();
    let agent = Agent::start("diag-fds", &[("memcached", port, "memcache")]).unwrap();
    let _servers: Vec<Guard> = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|host| start_memcached(None, host, port, &[]).unwrap())
        .collect();
    let _client = Guard(
        Command::new(PYTHON)
            .args([
                "-c",
                &format!(
                    "import resource, socket, ctypes, time\n\
                     ctypes.CDLL(None).prctl(15, b'webworker', 0, 0, 0)\n\
                     resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))\n\
                     socks = []\n\
                     for i in range(40):\n\
                     \x20   try:\n\
                     \x20       socks.append(socket.create_connection(('127.0.0.%d' % (1 + i % 4), {port})))\n\
                     \x20   except OSError:\n\
                     \x20       pass\n\
                     time.sleep(30)\n"
                ),
            ])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(4));
    let (output, report) = diagnose(Some(&agent), None, "1s");
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let fds =
        finding(&report, "fd-pressure").unwrap_or_else(|| panic!("no fd-pressure: {report:#}"));
    assert!(
        subjects(fds, "processes").contains(&"webworker".to_string()),
        "{fds:#}"
    );
}

/// One process holding a connection to each of 16 memcacheds (one port, each on its own
/// loopback address) is named as a full mesh from the daemon's periodic /proc samples: the
/// finding counts 16 distinct servers, and the edge table gives each of its 16 edges one open
/// connection. (Before session 23 the daemon's samples carried no connection spread: this
/// finding and the edge table's connection column had data in unit tests only.)
#[test]
fn names_a_full_mesh_from_the_daemons_samples() {
    require_root();
    let port = unique_port();
    // Samples every second (`services_config`).
    let agent = Agent::start("diag-mesh", &[("memcached", port, "memcache")]).unwrap();
    let servers: Vec<String> = (1..=16).map(|i| format!("127.0.0.{i}")).collect();
    let _servers: Vec<Guard> = servers
        .iter()
        .map(|host| start_memcached(None, host, port, &[]).unwrap())
        .collect();
    let mut client = Command::new(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket, ctypes, sys\n\
                 ctypes.CDLL(None).prctl(15, b'meshworker', 0, 0, 0)\n\
                 socks = [socket.create_connection(('127.0.0.%d' % i, {port})) for i in range(1, 17)]\n\
                 print('connected', flush=True)\n\
                 sys.stdin.read()\n"
            ),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    let _client = Guard(client);
    // Samples every second: three of them see the connections.
    std::thread::sleep(Duration::from_secs(4));
    let (_, report) = daemon_report(&agent);
    let mesh = finding(&report, "full-mesh").unwrap_or_else(|| panic!("no full-mesh: {report:#}"));
    assert!(
        subjects(mesh, "processes").contains(&"meshworker".to_string()),
        "{mesh:#}"
    );
    assert_eq!(mesh["values"]["distinct_servers"], 16.0, "{mesh:#}");
    let edges: Vec<&serde_json::Value> = report["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|edge| edge["process"] == "meshworker")
        .collect();
    let mut named: Vec<String> = edges
        .iter()
        .map(|edge| {
            assert_eq!(edge["connections"], 1, "{edge:#}");
            edge["server"].as_str().unwrap().to_string()
        })
        .collect();
    named.sort();
    let mut expected: Vec<String> = servers
        .iter()
        .map(|host| format!("{host}:{port}"))
        .collect();
    expected.sort();
    assert_eq!(named, expected, "{report:#}");
}

/// A client on this host aborting its connections to memcached on this host (SO_LINGER 0): each
/// reset is sent by the client's socket and received by memcached's, both watched. The metric
/// counts it at each end under its role and direction; the finding counts each reset once (it
/// said twice as many).
#[test]
fn counts_each_reset_between_two_sockets_of_this_host_once() {
    require_root();
    const ABORTED: u32 = 25;
    let port = unique_port();
    let agent = Agent::start("diag-resets", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    python(
        None,
        &format!(
            "import socket, struct\n\
             for i in range({ABORTED}):\n\
             \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
             \x20   s.sendall(b'set k%d 0 0 1\\r\\nx\\r\\n' % i)\n\
             \x20   assert s.recv(100) == b'STORED\\r\\n'\n\
             \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
             \x20   s.close()\n"
        ),
    )
    .unwrap();
    let resets = |scrape: &Scrape, role, direction| {
        scrape.sum(
            "cacheprobe_tcp_resets_total",
            &[("role", role), ("direction", direction)],
        )
    };
    let scrape = agent.wait_for(Duration::from_secs(10), |s| {
        resets(s, "server", "received") >= ABORTED as f64
    });
    assert_eq!(
        (
            resets(&scrape, "client", "sent"),
            resets(&scrape, "server", "received"),
            scrape.sum("cacheprobe_tcp_resets_total", &[]),
        ),
        (ABORTED as f64, ABORTED as f64, 2.0 * ABORTED as f64),
        "{}",
        scrape.text
    );
    let (_, report) = daemon_report(&agent);
    let finding =
        finding(&report, "resets").unwrap_or_else(|| panic!("no resets finding: {report:#}"));
    assert_eq!(
        subjects(finding, "servers"),
        [format!("127.0.0.1:{port}")],
        "{finding:#}"
    );
    assert_eq!(
        finding_value(finding, "resets"),
        ABORTED as f64,
        "{finding:#}"
    );
}

/// Audit s3: nutcracker with `timeout: 100` in front of three memcacheds, one of them stopped
/// 200 ms of every 250 ms. pymemcache through the proxy gets SERVER_ERROR for requests hashed
/// to the stalled backend; diagnose names the proxy, about as many errors as the client library
/// itself saw, and the backend that failed the proxy. The finding quotes what nutcracker said
/// ("Connection timed out", as many times as the client library read it) and infers its
/// timeout from how long those replies took.
#[test]
fn names_a_proxy_answering_errors_and_the_backend_behind_them() {
    require_root();
    let backends: Vec<u16> = (0..3).map(|_| unique_port()).collect();
    let proxy = unique_port();
    let agent = Agent::start_with_config(
        "diag-proxy-errors",
        &format!(
            "{}[[services]]\nname = \"memcached\"\nports = {backends:?}\n",
            services_config(&[("twemproxy", proxy, "memcache")])
        ),
    )
    .unwrap();
    let servers: Vec<Guard> = backends
        .iter()
        .map(|&port| start_memcached(None, "127.0.0.1", port, &[]).unwrap())
        .collect();
    let dir = scratch_dir("diag-proxy-nutcracker");
    let conf = dir.join("nutcracker.yml");
    let server_list: String = backends
        .iter()
        .enumerate()
        .map(|(i, port)| format!("   - 127.0.0.1:{port}:1 mc{i}\n"))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "pool:\n  listen: 127.0.0.1:{proxy}\n  hash: fnv1a_64\n  distribution: ketama\n  \
             timeout: 100\n  preconnect: true\n  auto_eject_hosts: false\n  \
             server_connections: 1\n  servers:\n{server_list}"
        ),
    )
    .unwrap();
    let _nutcracker = start_nutcracker(&conf, proxy).unwrap();
    let load = std::thread::spawn(move || {
        python(
            None,
            &format!(
                "import json, random, threading, time\n\
                 from pymemcache.client.base import Client\n\
                 from pymemcache.exceptions import MemcacheServerError\n\
                 keys = ['pk%d' % i for i in range(300)]\n\
                 c = Client(('127.0.0.1', {proxy}), timeout=2, connect_timeout=2)\n\
                 for k in keys:\n\
                 \x20   c.set(k, b'v' * 100, noreply=False)\n\
                 counts = dict(requests=0, server_errors=0, other=0)\n\
                 texts = {{}}\n\
                 lock = threading.Lock()\n\
                 def work():\n\
                 \x20   c = Client(('127.0.0.1', {proxy}), timeout=2, connect_timeout=2)\n\
                 \x20   mine = dict(requests=0, server_errors=0, other=0)\n\
                 \x20   end = time.time() + 13\n\
                 \x20   while time.time() < end:\n\
                 \x20       mine['requests'] += 1\n\
                 \x20       try:\n\
                 \x20           c.get(random.choice(keys))\n\
                 \x20       except MemcacheServerError as e:\n\
                 \x20           mine['server_errors'] += 1\n\
                 \x20           text = e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0])\n\
                 \x20           with lock:\n\
                 \x20               texts[text.strip()] = texts.get(text.strip(), 0) + 1\n\
                 \x20       except Exception:\n\
                 \x20           mine['other'] += 1\n\
                 \x20           c.close()\n\
                 \x20       time.sleep(0.005)\n\
                 \x20   with lock:\n\
                 \x20       for k in counts:\n\
                 \x20           counts[k] += mine[k]\n\
                 ts = [threading.Thread(target=work) for _ in range(4)]\n\
                 [t.start() for t in ts]\n\
                 [t.join() for t in ts]\n\
                 counts['texts'] = texts\n\
                 print(json.dumps(counts))\n"
            ),
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    // Ketama spreads 300 keys unevenly: stall the backend holding most of them, so the errors
    // are a clear share of the requests.
    let busiest = (0..backends.len())
        .max_by_key(|&i| server_stats(backends[i], "stats")["curr_items"] as u64)
        .unwrap();
    let stalled = servers[busiest].0.id() as i32;
    // Requests sent in the first 100 ms of a stop outlast the proxy's timeout.
    for _ in 0..40 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(stalled, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(200));
        unsafe { libc::kill(stalled, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = load.join().unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let client_errors = seen["server_errors"].as_f64().unwrap();
    assert!(client_errors >= 10.0, "too few errors to judge: {seen}");
    std::thread::sleep(Duration::from_secs(1));
    let (_, report) = diagnose(Some(&agent), None, "1s");
    let errors = finding(&report, "error-replies")
        .unwrap_or_else(|| panic!("no error-replies finding (client saw {seen}): {report:#}"));
    let proxy_addr = format!("127.0.0.1:{proxy}");
    let backend_addr = format!("127.0.0.1:{}", backends[busiest]);
    let title = errors["title"].as_str().unwrap();
    assert!(
        title.starts_with(&format!("twemproxy {proxy_addr} answered ")),
        "{title}"
    );
    assert!(title.contains(&backend_addr), "{title}");
    assert_eq!(
        subjects(errors, "servers"),
        vec![proxy_addr, backend_addr],
        "{errors:#}"
    );
    assert!(
        subjects(errors, "processes").contains(&"python3".to_string())
            && subjects(errors, "processes").contains(&"nutcracker".to_string()),
        "{errors:#}"
    );
    let counted = finding_value(errors, "server_error");
    assert!(
        (counted - client_errors).abs() <= (0.05 * client_errors).max(2.0),
        "diagnose counted {counted} server errors, the client library saw {seen}: {errors:#}"
    );
    // What nutcracker said, quoted as often as the client library read it.
    let quoted: Vec<(String, f64)> = errors["error_texts"]
        .as_array()
        .unwrap_or_else(|| panic!("no error_texts: {errors:#}"))
        .iter()
        .map(|t| {
            (
                t["text"].as_str().unwrap().to_string(),
                t["count"].as_f64().unwrap(),
            )
        })
        .collect();
    let read = seen["texts"].as_object().unwrap();
    let timed_out = read
        .get("Connection timed out")
        .and_then(|n| n.as_f64())
        .unwrap_or_else(|| panic!("the client read no 'Connection timed out': {seen}"));
    let (_, quoted_timed_out) = quoted
        .iter()
        .find(|(text, _)| text == "Connection timed out")
        .unwrap_or_else(|| panic!("'Connection timed out' not quoted: {errors:#}"));
    assert!(
        (quoted_timed_out - timed_out).abs() <= (0.05 * timed_out).max(2.0),
        "quoted {quoted_timed_out} 'Connection timed out', the client read {seen}: {errors:#}"
    );
    // `timeout: 100`: the replies saying so took 100 ms and a little, one histogram bucket.
    let timeout = finding_value(errors, "proxy_timeout_ms");
    assert!((90.0..140.0).contains(&timeout), "{errors:#}");
    assert!(
        errors["evidence"].as_array().unwrap().iter().any(|l| l
            .as_str()
            .unwrap()
            .starts_with("nutcracker's timeout looks like about")),
        "{errors:#}"
    );
    eprintln!("client saw {seen}; finding: {errors:#}");
    drop(servers);
}

/// Audit s5b: two memcacheds in one namespace, their clients in another, 15% of the packets to
/// one of them dropped at the server namespace's INPUT. This host sees both ends: the lossy
/// server's own socket stays fast while its clients wait retransmit timeouts, so diagnose names
/// time lost between the boxes (slow-path), not a slow server.
#[test]
fn names_time_lost_between_the_boxes_not_a_slow_server() {
    require_root();
    let (clean, lossy) = (unique_port(), unique_port());
    let pair = NetnsPair::create("l", 25).unwrap();
    let _servers: Vec<Guard> = [clean, lossy]
        .iter()
        .map(|&port| start_memcached(Some(&pair.server_ns), &pair.server_addr, port, &[]).unwrap())
        .collect();
    let agent = Agent::start_with_config(
        "diag-wireloss",
        &format!(
            "sample_interval_seconds = 1\n[[services]]\nname = \"cache\"\nports = [{clean}, {lossy}]\n"
        ),
    )
    .unwrap();
    let drop_rule = |action: &str| {
        pair.drop_to_server_port(
            action,
            lossy,
            &[
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.15",
            ],
        )
    };
    let server = pair.server_addr.clone();
    let client_ns = pair.client_ns.clone();
    let load = std::thread::spawn(move || {
        python(
            Some(&client_ns),
            &format!(
                "import time, threading\n\
                 from pymemcache.client.base import Client\n\
                 def work(port):\n\
                 \x20   c = Client(('{server}', port), timeout=5, connect_timeout=5)\n\
                 \x20   end = time.time() + 16\n\
                 \x20   while time.time() < end:\n\
                 \x20       c.get('k')\n\
                 \x20       time.sleep(0.01)\n\
                 ts = [threading.Thread(target=work, args=(p,)) for p in ({clean}, {lossy})]\n\
                 [t.start() for t in ts]\n\
                 [t.join() for t in ts]\n"
            ),
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(drop_rule("-A").success(), "iptables statistic rule");
    let result = load.join().unwrap();
    let _ = drop_rule("-D");
    result.unwrap();
    let (_, report) = diagnose(Some(&agent), None, "1s");
    let lossy_addr = format!("{}:{lossy}", pair.server_addr);
    let blamed = findings(&report, &["slow-server"])
        .into_iter()
        .any(|f| subjects(f, "servers").contains(&lossy_addr));
    assert!(
        !blamed,
        "the lossy path's server is called slow: {report:#}"
    );
    let path =
        finding(&report, "slow-path").unwrap_or_else(|| panic!("no slow-path finding: {report:#}"));
    assert_eq!(subjects(path, "servers"), vec![lossy_addr], "{path:#}");
    assert!(
        finding_value(path, "server_p99_ms") < 10.0 && finding_value(path, "p99_ms") > 150.0,
        "{path:#}"
    );
    assert!(finding_value(path, "retransmits") > 0.0, "{path:#}");
    eprintln!("{path:#}");
}
