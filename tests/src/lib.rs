//! Harness for cacheprobe's root integration tests: runs the real agent binary, real memcached
//! and real clients, in network namespaces the tests create and always remove.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

mod process;
mod prometheus;
mod report;
mod servers;
mod workloads;

pub use process::*;
pub use prometheus::*;
pub use report::*;
pub use servers::*;
pub use workloads::*;

/// Debian's python3, which sees the python3-* client packages (the pyenv one on PATH does not).
pub const PYTHON: &str = "/usr/bin/python3";

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "integration tests load eBPF programs and create network namespaces: run them as root (cargo xtask test does)");
}

/// Ports unique per test process and per call, so tests never see each other's traffic. They
/// stay below the ephemeral range (32768+) so no client socket can hold one, and ports that are
/// taken (a leftover from an earlier run) are skipped.
pub fn unique_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 120) as u16 * 100;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % 100;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

pub fn agent_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CACHEPROBE_BIN") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/release/cacheprobe")
}

pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cacheprobe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// An agent config watching `services` (name, port, protocol), sampling /proc every second so
/// fd and listen-queue assertions need not wait long. Sections such as `[limits]` may follow.
pub fn services_config(services: &[(&str, u16, &str)]) -> String {
    let mut config = String::from("sample_interval_seconds = 1\n\n");
    for (service, port, protocol) in services {
        config.push_str(&format!(
            "[[services]]\nname = \"{service}\"\nport = {port}\nprotocol = \"{protocol}\"\n\n"
        ));
    }
    config
}

/// What the agent logs once a reloaded config is in force (`commands/run.rs`).
pub const RELOADED: &str = "config reloaded";

/// A running `cacheprobe run`, stopped with SIGTERM on drop.
pub struct Agent {
    child: Child,
    pub metrics_port: u16,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    /// The agent's control socket, for `cacheprobe diagnose --socket`.
    pub control_socket: PathBuf,
}

impl Agent {
    /// Starts the agent watching `services` (name, port, protocol) and waits until /metrics answers.
    pub fn start(name: &str, services: &[(&str, u16, &str)]) -> anyhow::Result<Agent> {
        Agent::start_with_config(name, &services_config(services))
    }

    pub fn start_with_config(name: &str, config: &str) -> anyhow::Result<Agent> {
        Agent::start_prepared(name, config, |_| {})
    }

    /// As [`Agent::start_with_config`], with `prepare` applied to the agent's command first
    /// (e.g. a seccomp filter installed before exec).
    pub fn start_prepared(
        name: &str,
        config: &str,
        prepare: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Agent> {
        let dir = scratch_dir(name);
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)?;
        let metrics_port = unique_port();
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let control_socket = dir.join("control.sock");
        let mut command = Command::new(agent_binary());
        prepare(&mut command);
        let child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--control-socket")
            .arg(&control_socket)
            .args(["--listen", &format!("127.0.0.1:{metrics_port}")])
            .args([
                "--log",
                &std::env::var("CACHEPROBE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", agent_binary().display()))?;
        let mut agent = Agent {
            child,
            metrics_port,
            log_path,
            config_path,
            control_socket,
        };
        // Generous: the suite starts several agents at once on two cores, and each has the
        // kernel verify its programs (the attach time itself is measured by the bench).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited early with {status}: {}", agent.log());
            }
            if agent.scrape_text().is_ok() {
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent did not serve /metrics within 30 s: {}", agent.log())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the agent process.
    pub fn signal(&self, signal_number: i32) {
        signal(self.child.id(), signal_number);
    }

    /// Waits for the agent to exit after a signal it does not survive (e.g. SIGKILL).
    pub fn wait_exit(mut self) -> anyhow::Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log holds `text` at least `count` times; panics with the log if it does
    /// not within 15 s (a reload takes under 1 s here, about 2 s in CI's slower VMs).
    pub fn wait_log(&self, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.log().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {count} of {text:?} in the agent's log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the config file as `config`, sends SIGHUP and waits until the agent has logged
    /// that it applied it: traffic sent after this meets the new config.
    pub fn reload(&self, config: &str) {
        let reloads = self.log().matches(RELOADED).count();
        std::fs::write(&self.config_path, config).expect("write the agent's config");
        self.signal(libc::SIGHUP);
        self.wait_log(RELOADED, reloads + 1);
    }

    pub fn scrape_text(&self) -> anyhow::Result<String> {
        http_get(self.metrics_port, "/metrics")
    }

    pub fn scrape(&self) -> Scrape {
        Scrape::parse(&self.scrape_text().expect("scrape /metrics"))
    }

    /// Polls until `condition` holds on a scrape, or returns the last scrape after `timeout`.
    pub fn wait_for(&self, timeout: Duration, condition: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape();
            if condition(&scrape) || Instant::now() >= deadline {
                return scrape;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent did not exit within 10 s of SIGTERM")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        // HTTP/1.0: servers answer without chunked encoding, so the body is what follows the head.
        "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        bail!("unexpected response: {head}");
    }
    Ok(body.to_string())
}

/// One parsed sample of the Prometheus/OpenMetrics text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// Sum of every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// `cacheprobe_memcache_requests_total` summed over the series matching `labels`.
    pub fn requests(&self, labels: &[(&str, &str)]) -> f64 {
        self.sum("cacheprobe_memcache_requests_total", labels)
    }

    /// Asserts the memcache decoder reported no error, showing the scrape when it did.
    #[track_caller]
    pub fn assert_no_decode_errors(&self) {
        let errors = self.sum("cacheprobe_memcache_decode_errors_total", &[]);
        assert_eq!(errors, 0.0, "decode errors: {}", self.text);
    }

    /// Asserts the three socket tracepoints are up and no event was lost on the way.
    #[track_caller]
    pub fn assert_probes_up_and_nothing_lost(&self) {
        for probe in [
            "sock/inet_sock_set_state",
            "sock/sock_send_length",
            "sock/sock_recv_length",
        ] {
            let up = self.sum("cacheprobe_probe_up", &[("probe", probe)]);
            assert_eq!(up, 1.0, "{probe}: {}", self.text);
        }
        let lost = self.sum("cacheprobe_events_lost_total", &[]);
        assert_eq!(lost, 0.0, "events lost: {}", self.text);
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = BTreeMap::new();
            for pair in split_labels(body) {
                let (k, v) = pair.split_once('=')?;
                labels.insert(k.to_string(), v.trim_matches('"').replace("\\\"", "\""));
            }
            (name.to_string(), labels)
        }
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn split_labels(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let bytes = body.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_quotes = !in_quotes,
            b',' if !in_quotes => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        parts.push(&body[start..]);
    }
    parts
}

/// A process killed on drop (servers, long-running clients).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts nutcracker (twemproxy) with the configuration file `conf` (its stats port a fresh
/// one) and waits until it listens on `proxy`.
pub fn start_nutcracker(conf: &Path, proxy: u16) -> anyhow::Result<Guard> {
    let child = Command::new("nutcracker")
        .arg("-c")
        .arg(conf)
        .args(["-s", &unique_port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nutcracker (package nutcracker) is installed by cargo xtask setup")?;
    let guard = Guard(child);
    wait_for_port(None, "127.0.0.1", proxy)?;
    Ok(guard)
}

/// Starts memcached in the foreground (optionally inside a network namespace) and waits until it
/// accepts connections.
pub fn start_memcached(
    netns: Option<&str>,
    addr: &str,
    port: u16,
    extra: &[&str],
) -> anyhow::Result<Guard> {
    let mut command = netns_command(netns, "memcached");
    command
        .args([
            "-u",
            "root",
            "-l",
            addr,
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-t",
            "2",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let guard = Guard(
        command
            .spawn()
            .context("cannot start memcached (is it installed? run cargo xtask setup)")?,
    );
    wait_for_port(netns, addr, port)?;
    Ok(guard)
}

pub fn netns_command(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, program]);
            command
        }
        None => Command::new(program),
    }
}

/// Waits for a TCP listener by looking at listening sockets, never by connecting: a probe
/// connection would itself be counted by the agent under test.
pub fn wait_for_port(netns: Option<&str>, _addr: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = netns_command(netns, "ss").args(["-ltnH"]).output()?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on port {port} after 10 s")
}

/// Runs a Python client script with Debian's python3, optionally in a namespace.
pub fn python(netns: Option<&str>, script: &str) -> anyhow::Result<Output> {
    let output = netns_command(netns, PYTHON).args(["-c", script]).output()?;
    if !output.status.success() {
        bail!(
            "python client failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Sends `request` to memcached on 127.0.0.1:`port` over a raw socket from python3 (a client
/// process of its own) and fails unless the answer is `reply` (empty: memcached closed). Both
/// are the bodies of Python bytes literals, e.g. `r"quit\r\n"`.
pub fn raw_request(port: u16, request: &str, reply: &str) -> anyhow::Result<Output> {
    python(
        None,
        &format!(
            "import socket\n\
             s = socket.create_connection(('127.0.0.1', {port}))\n\
             s.sendall(b'{request}')\n\
             assert s.recv(100) == b'{reply}'\n\
             s.close()\n"
        ),
    )
}

/// `gets` gets of one key on each of `connections` new connections (the key is set first on
/// the first one).
pub fn gets_script(port: u16, connections: u32, gets: u32) -> String {
    format!(
        "from pymemcache.client.base import Client\n\
         for n in range({connections}):\n\
         \x20   c = Client(('127.0.0.1', {port}))\n\
         \x20   if n == 0:\n\
         \x20       c.set('k', 'v', noreply=False)\n\
         \x20   for i in range({gets}):\n\
         \x20       assert c.get('k') == b'v'\n\
         \x20   c.close()\n"
    )
}

/// A Python script: `clients` connections from a process named "cronjob" each set a key, stay
/// idle for 6.5 s (past a memcached `-o idle_timeout=2`, which closes them) and set again onto
/// the closed connection: idle disconnects followed by dead writes.
pub fn idle_then_write_script(port: u16, clients: usize) -> String {
    format!(
        "import ctypes, time, threading\n\
         from pymemcache.client.base import Client\n\
         ctypes.CDLL(None).prctl(15, b'cronjob', 0, 0, 0)\n\
         def work(i):\n\
         \x20   c = Client(('127.0.0.1', {port}))\n\
         \x20   c.set('job%d' % i, 'queued', noreply=False)\n\
         \x20   time.sleep(6.5)\n\
         \x20   try:\n\
         \x20       c.set('job%d' % i, 'done', noreply=False)\n\
         \x20   except Exception:\n\
         \x20       pass\n\
         ts = [threading.Thread(target=work, args=(i,)) for i in range({clients})]\n\
         [t.start() for t in ts]\n\
         [t.join() for t in ts]\n"
    )
}

/// Two network namespaces joined by a veth pair: `server_ns` holds `server_addr`, `client_ns`
/// holds `client_addr`. Removed on drop, on every exit path.
pub struct NetnsPair {
    pub server_ns: String,
    pub client_ns: String,
    pub server_addr: String,
    pub client_addr: String,
}

impl NetnsPair {
    pub fn create(tag: &str, subnet_octet: u8) -> anyhow::Result<NetnsPair> {
        let id = std::process::id() % 10000;
        let pair = NetnsPair {
            server_ns: format!("cps{id}{tag}"),
            client_ns: format!("cpc{id}{tag}"),
            server_addr: format!("10.231.{subnet_octet}.1"),
            client_addr: format!("10.231.{subnet_octet}.2"),
        };
        let veth_server = format!("cpvs{id}{tag}");
        let veth_client = format!("cpvc{id}{tag}");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), pair.server_ns.clone()],
            vec!["netns".into(), "add".into(), pair.client_ns.clone()],
            vec![
                "link".into(),
                "add".into(),
                veth_server.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                veth_client.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                veth_server.clone(),
                "netns".into(),
                pair.server_ns.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                veth_client.clone(),
                "netns".into(),
                pair.client_ns.clone(),
            ],
            vec![
                "-n".into(),
                pair.server_ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/30", pair.server_addr),
                "dev".into(),
                veth_server.clone(),
            ],
            vec![
                "-n".into(),
                pair.client_ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/30", pair.client_addr),
                "dev".into(),
                veth_client.clone(),
            ],
            vec![
                "-n".into(),
                pair.server_ns.clone(),
                "link".into(),
                "set".into(),
                veth_server.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                pair.client_ns.clone(),
                "link".into(),
                "set".into(),
                veth_client.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                pair.server_ns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                pair.client_ns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let status = Command::new("ip").args(&step).status()?;
            if !status.success() {
                bail!("ip {} failed", step.join(" "));
            }
        }
        Ok(pair)
    }

    /// `iptables <action> INPUT -p tcp --dport <port> <matches...> -j DROP` inside the server
    /// namespace: drops (some of) the packets to the server's port; `-D` removes the rule.
    pub fn drop_to_server_port(
        &self,
        action: &str,
        port: u16,
        matches: &[&str],
    ) -> std::process::ExitStatus {
        let port = port.to_string();
        let head = [action, "INPUT", "-p", "tcp", "--dport", &port];
        self.server_iptables(&[&head[..], matches, &["-j", "DROP"]].concat())
    }

    /// Runs `iptables args...` inside the server namespace (rules that drop or delay the
    /// server's packets); the caller checks the status.
    pub fn server_iptables(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new("ip")
            .args(["netns", "exec", &self.server_ns, "iptables"])
            .args(args)
            .status()
            .unwrap()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the peer.
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|out| {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: kill has no memory-safety preconditions.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// BPF program ids held open by a process (from /proc/<pid>/fdinfo).
pub fn program_ids_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        if let Ok(info) = std::fs::read_to_string(entry.path()) {
            ids.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|v| v.trim().parse::<u64>().ok()),
            );
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Ids of every BPF program the kernel has loaded (`bpftool prog show`).
pub fn loaded_program_ids() -> Vec<u64> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .unwrap();
    let programs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    programs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Waits until none of `ids` is loaded any more; program teardown is asynchronous in the
/// kernel (RCU), so it may take a moment after the holder exits. Panics naming `what` after
/// `timeout`.
pub fn wait_unloaded(ids: &[u64], what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut left = ids.to_vec();
    loop {
        let loaded = loaded_program_ids();
        left.retain(|id| loaded.contains(id));
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: programs {left:?} still loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_samples() {
        let scrape = Scrape::parse(
            "# TYPE x counter\nx_total{a=\"1\",b=\"q,r\"} 3\nx_total{a=\"2\",b=\"s\"} 4.5\ny 1\n# EOF\n",
        );
        assert_eq!(scrape.sum("x_total", &[]), 7.5);
        assert_eq!(scrape.sum("x_total", &[("b", "q,r")]), 3.0);
        assert_eq!(scrape.sum("y", &[]), 1.0);
        assert_eq!(scrape.sum("z", &[]), 0.0);
    }
}
