//! `cargo xtask fleet-test`: `cacheprobe diagnose --prometheus` against a small fleet of QEMU VMs
//! (one server host with a memcached pool, two client hosts), each running the freshly built
//! agent, scraped by a real Prometheus with exemplar storage. Everything lives in a network
//! namespace this task creates: a bridge with one tap device per VM, Prometheus on the bridge,
//! nothing on the host's own network. The host drives each VM through a shell it serves on the
//! bridge (xtask/vm/fleet-init.sh) and asserts the names and numbers of the fleet findings.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{
    setup::install_debian_packages,
    util::{self, run_command, step},
    vm::{self, BootOptions, Kernel, Network, PreparedKernel, Row, Verdict, VmEnd},
};

/// What the fleet needs beyond vm-test's packages: the client library and its interpreter,
/// iptables for the lossy link, Prometheus.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "memcached",
    "python3-pymemcache",
    "iptables",
    "prometheus",
    "xz-utils",
];

/// The scenarios in the order they run; a scenario without a result line is a failure.
pub const SCENARIOS: &[&str] = &[
    "idle-timeouts",
    "ring-disagreement",
    "lossy-link",
    "hung-server",
    "coverage",
];

const BRIDGE: &str = "cpfleet0";
const BRIDGE_IP: &str = "10.77.0.1";
const PROMETHEUS: &str = "10.77.0.1:9090";
const CONTROL_PORT: u16 = 7000;
const AGENT_PORT: u16 = 19150;
/// The memcached pool every client uses, on the server host.
const POOL: [u16; 3] = [11211, 11212, 11213];
/// A fourth server only the odd client host lists.
const EXTRA: u16 = 11214;
/// The session store that closes idle clients.
const SESSIONS: u16 = 11220;
const IDLE_TIMEOUT_S: u32 = 5;
/// Requests per second of each host's background load.
const LOAD_RATE: u32 = 5;
/// Whole run, VM boot to poweroff; a VM still running then is killed.
const VM_TIMEOUT: Duration = Duration::from_secs(1500);
/// From QEMU's start to the agent serving /metrics on every VM (TCG loads the probes slowly).
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Boot to every agent ready on a quiet machine (25-30 s; 47 s at a load average of 14, 67 s
/// at 16). The ratio of a run's own boot time to this is its slowness: the harness's waits
/// scale with it instead of assuming a quiet machine.
const QUIET_READY_S: f64 = 30.0;

/// One VM of the fleet.
struct Host {
    name: &'static str,
    ip: &'static str,
    mac: &'static str,
    kernel: Kernel,
    /// memcached instances this host serves (plain ones, and the one with an idle timeout).
    memcached: &'static [u16],
    idle_timeout: &'static [u16],
    /// The servers its client process uses, as the application's config would list them.
    servers: &'static [u16],
}

const SERVER: usize = 0;
const CLIENT: usize = 1;
const ODD_CLIENT: usize = 2;
const LEGACY: usize = 3;

/// The server host runs a client of the pool too (as many cache hosts do: a cron job, a
/// warmer), so the hosts listing the pool outnumber the odd one. legacy-1 runs Debian 12's
/// own 6.1, which lacks sock_send_length/sock_recv_length (Linux 6.4+): its agent would see
/// connections but decode no requests, and the coverage detector must name it.
const HOSTS: [Host; 4] = [
    Host {
        name: "cache-1",
        ip: "10.77.0.11",
        mac: "52:54:00:77:00:11",
        kernel: Kernel::Debian6_12,
        memcached: &[POOL[0], POOL[1], POOL[2], EXTRA],
        idle_timeout: &[SESSIONS],
        servers: &POOL,
    },
    Host {
        name: "app-1",
        ip: "10.77.0.12",
        mac: "52:54:00:77:00:12",
        kernel: Kernel::Debian6_12,
        memcached: &[],
        idle_timeout: &[],
        servers: &POOL,
    },
    Host {
        name: "app-2",
        ip: "10.77.0.13",
        mac: "52:54:00:77:00:13",
        kernel: Kernel::Debian6_12,
        memcached: &[],
        idle_timeout: &[],
        servers: &[POOL[0], POOL[1], POOL[2], EXTRA],
    },
    Host {
        name: "legacy-1",
        ip: "10.77.0.14",
        mac: "52:54:00:77:00:14",
        kernel: Kernel::Debian6_1,
        memcached: &[],
        idle_timeout: &[],
        // No client load: a fourth busy emulated VM on this 2-core machine made every path
        // slow and the pool's healthy servers time out too (the hung-server and lossy-link
        // scenarios then found nothing). Its agent still runs and is scraped.
        servers: &[],
    },
];

/// Hosts running a client of the pool whose agent decodes requests (not on 6.1): the client
/// hosts request-level findings can count.
fn decoding_hosts() -> usize {
    HOSTS
        .iter()
        .filter(|h| h.kernel != Kernel::Debian6_1 && !h.servers.is_empty())
        .count()
}

/// Hosts running a client of the pool: the ones with a ring view.
fn client_hosts() -> usize {
    HOSTS.iter().filter(|h| !h.servers.is_empty()).count()
}

impl Host {
    fn instance(&self) -> String {
        format!("{}:{AGENT_PORT}", self.ip)
    }

    fn tap(&self) -> String {
        format!("cpft-{}", self.name)
    }

    fn server_list(&self) -> String {
        let server_ip = HOSTS[SERVER].ip;
        self.servers
            .iter()
            .map(|port| format!("{server_ip}:{port}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The agent's config on every host: the pool and the session store, as two services.
fn agent_config() -> String {
    let ports: Vec<String> = POOL.iter().chain([&EXTRA]).map(|p| p.to_string()).collect();
    format!(
        "listen = \"0.0.0.0:{AGENT_PORT}\"\nsample_interval_seconds = 2\n\n\
         [[services]]\nname = \"cache\"\nports = [{}]\n\n\
         [[services]]\nname = \"sessions\"\nport = {SESSIONS}\n",
        ports.join(", ")
    )
}

fn host_env(host: &Host) -> String {
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "HOST={}\nIP={}\nMEMCACHED_PORTS=\"{}\"\nIDLE_TIMEOUT_PORTS=\"{}\"\nIDLE_TIMEOUT={IDLE_TIMEOUT_S}\n\
         MEMCACHED_OPTIONS=\"\"\nSERVERS=\"{}\"\n",
        host.name,
        host.ip,
        join(host.memcached),
        join(host.idle_timeout),
        host.server_list(),
    )
}

fn prometheus_config() -> String {
    let targets: Vec<String> = HOSTS
        .iter()
        .map(|h| format!("'{}'", h.instance()))
        .collect();
    format!(
        "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n\
         scrape_configs:\n  - job_name: cacheprobe\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

/// Builds the stdlib zip (byte-compiled by this machine's python3, the same interpreter copied
/// into the VM) with pymemcache and six in it, at the path the interpreter looks for it.
const PYTHON_ZIP: &str = r#"
import os, sys, sysconfig, zipfile, pymemcache, six
root = sys.argv[1]
stdlib = sysconfig.get_paths()["stdlib"]
archive = next(p for p in sys.path if p.endswith(".zip"))
skip = {"test", "idlelib", "tkinter", "lib2to3", "ensurepip", "pydoc_data", "distutils",
        "turtledemo", "venv", "curses", "dbm", "sqlite3", "xmlrpc", "wsgiref"}
target = root + archive
os.makedirs(os.path.dirname(target), exist_ok=True)
os.makedirs(root + stdlib + "/lib-dynload", exist_ok=True)
with zipfile.PyZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as z:
    z.writepy(stdlib)
    for name in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, name)
        if name not in skip and os.path.isfile(os.path.join(path, "__init__.py")):
            z.writepy(path)
    z.writepy(os.path.dirname(pymemcache.__file__))
    z.writepy(six.__file__)
"#;

/// Where Debian keeps iptables' extensions.
const XTABLES: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// One initramfs per kernel: the common base, python3 + pymemcache, legacy iptables with the
/// extensions the loss rule needs, this kernel's NIC and netfilter modules, the fleet init.
fn build_base(
    cache: &Path,
    prepared: &PreparedKernel,
    agent: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let root = cache.join("fleet/initramfs").join(&prepared.release);
    vm::initramfs_base(&root, agent)?;
    let python = fs::canonicalize("/usr/bin/python3")?;
    vm::copy_binary(&root, &python, Path::new("/usr/bin/python3"))?;
    let zipped = Command::new("/usr/bin/python3")
        .args(["-c", PYTHON_ZIP])
        .arg(&root)
        .output()
        .context("cannot run /usr/bin/python3")?;
    if !zipped.status.success() {
        bail!(
            "building the python stdlib zip failed: {}",
            String::from_utf8_lossy(&zipped.stderr)
        );
    }
    let multi = Path::new("/usr/sbin/xtables-legacy-multi");
    vm::copy_binary(&root, multi, multi)?;
    symlink("xtables-legacy-multi", root.join("usr/sbin/iptables"))?;
    for extension in ["libxt_standard", "libxt_statistic", "libxt_tcp"] {
        let path = PathBuf::from(format!("{XTABLES}/{extension}.so"));
        vm::copy_binary(&root, &path, &path)?;
    }
    let modules = prepared
        .modules
        .as_ref()
        .context("the fleet boots Debian's kernels only")?;
    let order = fs::read_to_string(modules.join("ORDER"))?;
    for module in order.lines().chain(["ORDER"]) {
        let file = if module == "ORDER" {
            module.to_string()
        } else {
            format!("{module}.ko")
        };
        vm::copy_into(
            &root,
            &modules.join(&file),
            &Path::new("/lib/modules/fleet").join(&file),
        )?;
    }
    vm::write_file(&root, "/init", include_str!("../vm/fleet-init.sh"), 0o755)?;
    vm::write_file(
        &root,
        "/cptest/fleet_client.py",
        include_str!("../vm/fleet_client.py"),
        0o644,
    )?;
    vm::write_file(&root, "/cptest/agent.toml", &agent_config(), 0o644)?;
    vm::write_cpio_gz(&root, out)
}

/// The kernel's base archive followed by this host's own small one (the kernel unpacks
/// concatenated archives in order).
fn host_initrd(work: &Path, base: &Path, host: &Host) -> anyhow::Result<PathBuf> {
    let root = work.join("overlay").join(host.name);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    vm::write_file(&root, "/cptest/host.env", &host_env(host), 0o644)?;
    let overlay = work.join(format!("overlay-{}.cpio.gz", host.name));
    vm::write_cpio_gz(&root, &overlay)?;
    let initrd = work.join(format!("initrd-{}.img", host.name));
    let mut out = fs::File::create(&initrd)?;
    for part in [base, overlay.as_path()] {
        std::io::copy(&mut fs::File::open(part)?, &mut out)?;
    }
    Ok(initrd)
}

// --- the private network -------------------------------------------------------------------------

/// The namespace, the VMs and Prometheus; dropping it stops what is still running and removes
/// the namespace.
struct Fleet {
    netns: String,
    /// How much slower than on a quiet machine these VMs run (>= 1), measured at boot.
    slowness: f64,
    prometheus: Option<Child>,
    vms: Vec<(usize, JoinHandle<anyhow::Result<VmEnd>>)>,
    logs: Vec<PathBuf>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_command(Command::new("ip").args(args))
}

impl Fleet {
    fn create() -> anyhow::Result<Fleet> {
        let netns = format!("cpfleet-{}", std::process::id());
        ip(&["netns", "add", &netns])?;
        let fleet = Fleet {
            netns,
            slowness: 1.0,
            prometheus: None,
            vms: Vec::new(),
            logs: Vec::new(),
        };
        let ns = fleet.netns.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
        for host in &HOSTS {
            let tap = host.tap();
            ip(&["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["-n", ns, "link", "set", &tap, "master", BRIDGE])?;
            ip(&["-n", ns, "link", "set", &tap, "up"])?;
        }
        Ok(fleet)
    }

    fn start_prometheus(&mut self, dir: &Path) -> anyhow::Result<()> {
        let config = dir.join("prometheus.yml");
        fs::write(&config, prometheus_config())?;
        let data = dir.join("prometheus-data");
        let _ = fs::remove_dir_all(&data);
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--enable-feature=exemplar-storage")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start prometheus")?;
        self.prometheus = Some(child);
        Ok(())
    }

    /// `seconds` of a quiet machine, on this run's VMs.
    fn patience(&self, seconds: u64) -> Duration {
        Duration::from_secs_f64(seconds as f64 * self.slowness)
    }

    /// A TCP connection made from inside the namespace (the socket stays in it).
    fn connect(&self, address: &str) -> anyhow::Result<TcpStream> {
        let netns = self.netns.clone();
        let address = address.to_string();
        std::thread::spawn(move || -> anyhow::Result<TcpStream> {
            let ns = fs::File::open(format!("/run/netns/{netns}"))
                .with_context(|| format!("cannot open network namespace {netns}"))?;
            // SAFETY: setns on a valid fd; it changes only this short-lived thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {netns}: {}", std::io::Error::last_os_error());
            }
            let address: std::net::SocketAddr = address.parse()?;
            Ok(TcpStream::connect_timeout(
                &address,
                Duration::from_secs(5),
            )?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }

    /// Runs `script` in a VM's shell (the control channel of fleet-init.sh) and returns its
    /// output. Background jobs in the script must redirect their output, or the call waits for
    /// them.
    fn run(&self, host: &Host, script: &str, timeout: Duration) -> anyhow::Result<String> {
        let mut stream = self.connect(&format!("{}:{CONTROL_PORT}", host.ip))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(script.as_bytes())?;
        stream.write_all(b"\nexit\n")?;
        stream.shutdown(Shutdown::Write)?;
        let mut out = Vec::new();
        stream
            .read_to_end(&mut out)
            .with_context(|| format!("{}: no end of output within {timeout:?}", host.name))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// GET from Prometheus' HTTP API; the body, parsed.
    fn query_api(&self, path: &str) -> anyhow::Result<Value> {
        let mut stream = self.connect(PROMETHEUS)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {PROMETHEUS}\r\nAccept: application/json\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("Prometheus sent no HTTP body")?;
        serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))
    }

    /// An instant query's samples as (labels, value).
    fn query(&self, expr: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let answer = self.query_api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        let results = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("query {expr} failed: {answer}"))?;
        Ok(results
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect())
    }

    /// `cacheprobe diagnose --prometheus ... --json` over [start, end], run in the namespace.
    fn diagnose(&self, agent: &Path, start: u64, end: u64) -> anyhow::Result<Value> {
        let since = end.saturating_sub(start).max(60);
        let output = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(agent)
            .args(["diagnose", "--prometheus"])
            .arg(format!("http://{PROMETHEUS}"))
            .arg(format!("--since={since}s"))
            .arg(format!("--at={end}"))
            .arg("--json")
            .output()
            .context("cannot run cacheprobe diagnose")?;
        // 0 clean, 1 findings, 2 could not run or partial.
        if !matches!(output.status.code(), Some(0 | 1)) {
            bail!(
                "diagnose --prometheus failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        serde_json::from_slice(&output.stdout).context("diagnose printed no JSON report")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(mut child) = self.prometheus.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever still runs in the namespace was started by this run (QEMU of a VM that did
        // not power off): stop it by its pid.
        if let Some(pids) = util::output("ip", &["netns", "pids", &self.netns]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
        for (_, vm) in self.vms.drain(..) {
            let _ = vm.join();
        }
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Waits until every VM's console says READY (or FAIL, or the VM ended).
fn wait_ready(fleet: &Fleet) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let mut ready = 0;
        for ((index, vm), log) in fleet.vms.iter().zip(&fleet.logs) {
            let host = &HOSTS[*index];
            let console = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
            if let Some(line) = console.lines().find(|l| l.contains("CPFLEET-FAIL")) {
                bail!("{}: {}", host.name, line.trim());
            }
            if console.contains(&format!("CPFLEET-READY {}", host.name)) {
                ready += 1;
            } else if vm.is_finished() {
                bail!(
                    "{} stopped before it was ready; console: {}",
                    host.name,
                    log.display()
                );
            }
        }
        if ready == fleet.vms.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{ready} of {} VMs ready after {} s",
                fleet.vms.len(),
                READY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Waits until Prometheus has `expr` non-empty, up to `timeout`.
fn wait_for(fleet: &Fleet, expr: &str, want: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = fleet.query(expr).map(|r| r.len()).unwrap_or(0);
        if got >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{expr}: {got} series after {} s, want {want}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Waits until Prometheus has scraped every agent at or after `t` (unix seconds).
fn wait_scraped_since(fleet: &Fleet, t: u64) -> anyhow::Result<()> {
    wait_for(
        fleet,
        &format!("timestamp(up{{job=\"cacheprobe\"}}) >= {t}"),
        HOSTS.len(),
        fleet.patience(30),
    )
}

/// The sum of `selector`'s series by `instance`, now.
fn by_instance(fleet: &Fleet, selector: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    Ok(fleet
        .query(&format!("sum by (instance) ({selector})"))?
        .into_iter()
        .map(|(labels, v)| (labels["instance"].as_str().unwrap_or("?").to_string(), v))
        .collect())
}

/// Keeps a scenario's fault on for at least `min_s` and until `enough` holds for what the
/// agents counted since `before` (checked every 2 s), for at most `min_s` plus `min_s` scaled
/// by the fleet's slowness: a slow machine's clients send fewer requests a second, so a fixed
/// window would judge fewer of them. Returns how long the fault was on.
fn hold_until(
    fleet: &Fleet,
    min_s: u64,
    selector: &str,
    enough: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let before = by_instance(fleet, selector)?;
    let deadline = started + Duration::from_secs(min_s) + fleet.patience(min_s);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = by_instance(fleet, selector)?;
        let since: BTreeMap<String, f64> = now
            .iter()
            .map(|(i, v)| (i.clone(), v - before.get(i).copied().unwrap_or(0.0)))
            .collect();
        let held = started.elapsed();
        if (held.as_secs() >= min_s && enough(&since)) || Instant::now() >= deadline {
            eprintln!(
                "xtask: held {:.0} s (at least {min_s}); counted since: {since:?}",
                held.as_secs_f64()
            );
            return Ok(held.as_secs());
        }
    }
}

// --- findings ------------------------------------------------------------------------------------

fn findings<'a>(report: &'a Value, id: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .map(|all| all.iter().filter(|f| f["id"] == id).collect())
        .unwrap_or_default()
}

fn strings(finding: &Value, field: &str) -> Vec<String> {
    finding["subjects"][field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn value(finding: &Value, name: &str) -> f64 {
    finding["values"][name].as_f64().unwrap_or(f64::NAN)
}

/// The finding's title and numbers, for the result line.
fn summary(finding: &Value) -> String {
    let values = finding["values"]
        .as_object()
        .map(|v| {
            v.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "\"{}\" hosts={:?} [{values}]",
        finding["title"].as_str().unwrap_or(""),
        strings(finding, "hosts")
    )
}

fn ids(report: &Value) -> String {
    report["findings"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|f| f["id"].as_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// A scenario's verdict: the problems found (empty = PASS) and the numbers seen.
struct Outcome {
    problems: Vec<String>,
    seen: String,
}

impl Outcome {
    fn row(self, scenario: &str) -> Row {
        let verdict = if self.problems.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        let detail = if self.problems.is_empty() {
            self.seen
        } else {
            format!("{}; seen: {}", self.problems.join("; "), self.seen)
        };
        let row = Row {
            kernel: "fleet".into(),
            scenario: scenario.into(),
            verdict,
            detail,
        };
        eprintln!("  CPFLEET {} {} {}", row.scenario, row.verdict, row.detail);
        row
    }
}

// --- scenarios -----------------------------------------------------------------------------------

/// Rounds of app-1's idle clients, each IDLE_SLEEP_S idle (memcached's sweep closes an idle
/// connection 1-2 s after its timeout, or up to a sweep period later).
const IDLE_ROUNDS: u32 = 4;
const IDLE_SLEEP_S: u32 = 3 * IDLE_TIMEOUT_S;
const IDLE_CONNECTIONS: u32 = 3;

type Scenario = dyn Fn(&Fleet, &Path) -> anyhow::Result<Outcome>;

/// Starts each host's background load through pymemcache (LOAD_RATE requests/s over its
/// list), and app-1's idle session clients (scenario 1). Returns when the idle clients began.
fn start_load(fleet: &Fleet) -> anyhow::Result<u64> {
    let idle_started = now_s();
    fleet.run(
        &HOSTS[CLIENT],
        &format!(
            "python3 /cptest/fleet_client.py idle {IDLE_ROUNDS} {IDLE_SLEEP_S} {IDLE_CONNECTIONS} {}:{SESSIONS} </dev/null >/tmp/idle.log 2>&1 &",
            HOSTS[SERVER].ip
        ),
        fleet.patience(20),
    )?;
    for host in HOSTS.iter().filter(|h| !h.servers.is_empty()) {
        fleet.run(
            host,
            &format!(
                "python3 /cptest/fleet_client.py load 100000 {LOAD_RATE} {} </dev/null >/tmp/load.log 2>&1 &",
                host.server_list()
            ),
            fleet.patience(20),
        )?;
    }
    Ok(idle_started)
}

/// 1. The session store closes clients idle for IDLE_TIMEOUT_S; app-1's pooled clients then
///    write onto the closed connections, round after round (started by `start_load`).
///
/// Rounds, not one: a counter series is born at its first scrape with the value it has then,
/// and PromQL's increase() cannot count what a series held when it first appeared, so the
/// first round's closes and dead writes (new label sets) are not in the fleet view; the later
/// rounds are.
fn idle_timeouts(fleet: &Fleet, agent: &Path, start: u64) -> anyhow::Result<Outcome> {
    let client = &HOSTS[CLIENT];
    let server = format!("{}:{SESSIONS}", HOSTS[SERVER].ip);
    let deadline = Instant::now() + fleet.patience(u64::from(IDLE_ROUNDS * IDLE_SLEEP_S) + 120);
    let out = loop {
        let out = fleet.run(client, "cat /tmp/idle.log", fleet.patience(20))?;
        if out.contains("idle ") || Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    // Two scrapes after the last write.
    let end = now_s();
    wait_scraped_since(fleet, end + 2)?;
    let report = fleet.diagnose(agent, start, end + 2)?;
    let mut problems = Vec::new();
    let found = findings(&report, "fleet-idle-timeouts");
    let finding = found
        .iter()
        .find(|f| strings(f, "servers") == [server.clone()]);
    let said: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let seen = format!("client said: {}; ", said.join(" / "));
    let Some(finding) = finding else {
        return Ok(Outcome {
            problems: vec![format!("no fleet-idle-timeouts finding for {server}")],
            seen: seen + &format!("findings: {}", ids(&report)),
        });
    };
    // memcached's sweep closes a connection 1-2 s after its idle_timeout (whole seconds, then
    // sleeps until the oldest could expire, plus 1 s), and emulation adds to that: the mean idle
    // time seen was 5.6-7.0 s for a 5 s timeout, which the inference rounds to 5 or 7 s.
    let inferred = value(finding, "idle_timeout_s");
    let configured = f64::from(IDLE_TIMEOUT_S);
    if !(configured..=configured + 2.0).contains(&inferred) {
        problems.push(format!(
            "inferred timeout {inferred} s is not {IDLE_TIMEOUT_S}-{} s",
            IDLE_TIMEOUT_S + 2
        ));
    }
    if strings(finding, "hosts") != [client.instance()] {
        problems.push(format!("client hosts are not [{}]", client.instance()));
    }
    if !strings(finding, "processes").iter().any(|p| p == "python3") {
        problems.push("process python3 not named".into());
    }
    if !strings(finding, "commands").iter().any(|c| c == "set") {
        problems.push("command set not named".into());
    }
    // At least one round after the first: each of its connections wrote onto a closed one.
    if value(finding, "dead_writes") < f64::from(IDLE_CONNECTIONS) {
        problems.push(format!("fewer than {IDLE_CONNECTIONS} dead writes"));
    }
    Ok(Outcome {
        problems,
        seen: seen
            + &format!(
                "{} processes={:?} commands={:?}",
                summary(finding),
                strings(finding, "processes"),
                strings(finding, "commands")
            ),
    })
}

/// 2. app-2 lists a fourth server: two hosts agree, it does not.
fn ring_disagreement(fleet: &Fleet, agent: &Path) -> anyhow::Result<Outcome> {
    let odd = &HOSTS[ODD_CLIENT];
    wait_for(
        fleet,
        "cacheprobe_service_servers_info{service=\"cache\"}",
        client_hosts(),
        fleet.patience(60),
    )?;
    let end = now_s();
    let report = fleet.diagnose(agent, end - 60, end)?;
    let found = findings(&report, "fleet-ring-disagreement");
    let Some(finding) = found.first() else {
        return Ok(Outcome {
            problems: vec!["no fleet-ring-disagreement finding".into()],
            seen: format!("findings: {}", ids(&report)),
        });
    };
    let mut problems = Vec::new();
    if strings(finding, "hosts") != [odd.instance()] {
        problems.push(format!("odd hosts are not [{}]", odd.instance()));
    }
    if value(finding, "hosts") != client_hosts() as f64
        || value(finding, "disagreeing_hosts") != 1.0
    {
        problems.push(format!("not 1 of {} hosts", client_hosts()));
    }
    let extra = format!("{}:{EXTRA}", HOSTS[SERVER].ip);
    let names_extra = finding["evidence"].as_array().is_some_and(|e| {
        e.iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains(&extra)))
    });
    if !names_extra {
        problems.push(format!("evidence does not name the extra server {extra}"));
    }
    Ok(Outcome {
        problems,
        seen: format!("{} evidence={}", summary(finding), finding["evidence"]),
    })
}

/// 4. One memcached of the pool stops (SIGSTOP) for HUNG_S: every client host times out on it.
fn hung_server(fleet: &Fleet, agent: &Path) -> anyhow::Result<Outcome> {
    const HUNG_S: u64 = 60;
    let server_host = &HOSTS[SERVER];
    let hung = POOL[2];
    let start = now_s();
    fleet.run(
        server_host,
        &format!("kill -STOP $(cat /tmp/memcached-{hung}.pid)"),
        fleet.patience(20),
    )?;
    // Until every decoding client host has seen a few failures of its own (each costs it a
    // 3 s timeout, so a starved client gets few).
    let held = hold_until(
        fleet,
        HUNG_S,
        &format!(
            "cacheprobe_memcache_requests_total{{role=\"client\",server=\"{}:{hung}\",status=~\"timeout|unanswered\"}}",
            server_host.ip
        ),
        |failed| failed.values().filter(|n| **n >= 5.0).count() >= decoding_hosts(),
    )?;
    let end = now_s();
    fleet.run(
        server_host,
        &format!("kill -CONT $(cat /tmp/memcached-{hung}.pid)"),
        fleet.patience(20),
    )?;
    let server = format!("{}:{hung}", server_host.ip);
    // Each client host's view of the hung server, for the result line.
    let per_host = fleet
        .query(&format!(
            "sum by (instance, status) (increase(cacheprobe_memcache_requests_total{{role=\"client\",server=\"{server}\"}}[{held}s]))"
        ))?
        .iter()
        .map(|(labels, v)| {
            format!(
                "{}/{}={v:.0}",
                labels["instance"].as_str().unwrap_or("?"),
                labels["status"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let report = fleet.diagnose(agent, start, end)?;
    let found = findings(&report, "fleet-bad-server");
    let Some(finding) = found
        .iter()
        .find(|f| strings(f, "servers") == [server.clone()])
    else {
        return Ok(Outcome {
            problems: vec![format!("no fleet-bad-server finding for {server}")],
            seen: format!("findings: {}; requests: {per_host}", ids(&report)),
        });
    };
    let mut problems = Vec::new();
    if found.len() != 1 {
        let all: Vec<String> = found.iter().map(|f| summary(f)).collect();
        problems.push(format!(
            "{} bad servers, want 1: {}",
            found.len(),
            all.join(" | ")
        ));
    }
    let hosts = decoding_hosts() as f64;
    if value(finding, "client_hosts") != hosts || value(finding, "failing_client_hosts") != hosts {
        problems.push(format!(
            "not seen failing by all {hosts} decoding client hosts"
        ));
    }
    // The detector's own bar is 5% against peers under 1%.
    if value(finding, "failed_ratio") < 0.2 || value(finding, "peer_failed_ratio") > 0.01 {
        problems.push("failed ratio not >= 20% against peers' <= 1%".into());
    }
    if finding["severity"] != "critical" {
        problems.push("not critical".into());
    }
    Ok(Outcome {
        problems,
        seen: format!("{}; requests: {per_host}", summary(finding)),
    })
}

/// 3. app-1 drops 30% of the pool's packets in both directions (iptables `statistic` inside
///    the VM): its path to the pool is slow, the servers are not.
fn lossy_link(fleet: &Fleet, agent: &Path) -> anyhow::Result<Outcome> {
    const LOSSY_S: u64 = 60;
    let client = &HOSTS[CLIENT];
    let ports = format!("{}:{EXTRA}", POOL[0]);
    let rules = [
        format!("OUTPUT -p tcp --dport {ports}"),
        format!("INPUT -p tcp --sport {ports}"),
    ];
    let mut add = String::new();
    let mut delete = String::new();
    for rule in &rules {
        let rule = format!("{rule} -m statistic --mode random --probability 0.3 -j DROP");
        let _ = writeln!(add, "iptables -A {rule} || echo FAILED");
        let _ = writeln!(delete, "iptables -D {rule}");
    }
    let added = fleet.run(client, &add, fleet.patience(30))?;
    if added.contains("FAILED") {
        return Ok(Outcome {
            problems: vec![format!(
                "iptables failed in {}: {}",
                client.name,
                added.trim()
            )],
            seen: String::new(),
        });
    }
    let start = now_s();
    // Until the lossy client sent enough requests for its p99s to mean something.
    hold_until(
        fleet,
        LOSSY_S,
        &format!(
            "cacheprobe_memcache_requests_total{{role=\"client\",instance=\"{}\"}}",
            client.instance()
        ),
        |sent| sent.get(&client.instance()).is_some_and(|n| *n >= 150.0),
    )?;
    let end = now_s();
    let counters = fleet.run(
        client,
        "iptables -L -v -n -x | grep statistic",
        fleet.patience(30),
    )?;
    fleet.run(client, &delete, fleet.patience(30))?;
    let healed = Instant::now();
    let report = fleet.diagnose(agent, start, end)?;
    let dropped: u64 = counters
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let seen_drop = format!("iptables dropped {dropped} packets; ");
    let slow = findings(&report, "fleet-slow-path");
    let mut problems = Vec::new();
    let ours: Vec<&&Value> = slow
        .iter()
        .filter(|f| strings(f, "hosts") == [client.instance()])
        .collect();
    let others: Vec<&&Value> = slow
        .iter()
        .filter(|f| strings(f, "hosts") != [client.instance()])
        .collect();
    if ours.is_empty() {
        problems.push(format!(
            "no fleet-slow-path finding for {}",
            client.instance()
        ));
    }
    if !others.is_empty() {
        problems.push(format!("{} slow paths of other hosts", others.len()));
    }
    for id in ["fleet-slow-server", "fleet-bad-server"] {
        let wrong = findings(&report, id);
        if !wrong.is_empty() {
            problems.push(format!("{id}: {}", summary(wrong[0])));
        }
    }
    for finding in &ours {
        let between = value(finding, "between_p99_ms");
        if between.is_nan() || between < 100.0 {
            problems.push(format!("between_p99_ms {between} < 100"));
        }
        let retransmits = value(finding, "retransmits");
        if retransmits.is_nan() || retransmits < 1.0 {
            problems.push("no retransmits counted".into());
        }
    }
    let joined = both_ends(&report, client, &mut problems);
    let seen = ours
        .iter()
        .map(|f| format!("{} servers={:?}", summary(f), strings(f, "servers")))
        .collect::<Vec<_>>()
        .join(" | ");
    // The link's tail before the next scenario: a request sent just before the rules went
    // retransmits with backoff and fails at the client's 3 s timeout, and Prometheus scrapes
    // it a scrape later. Seen in CI: such a failure on app-1's healthy servers fell into the
    // hung-server window and app-1 no longer singled out the hung one.
    let settle = fleet.patience(3 + 2 * 2);
    if let Some(left) = settle.checked_sub(healed.elapsed()) {
        std::thread::sleep(left);
    }
    Ok(Outcome {
        problems,
        seen: seen_drop + &seen + "; " + &joined + &format!("; findings: {}", ids(&report)),
    })
}

/// The slowest request both ends reported in the lossy window (exemplars with one request id
/// from the client VM's agent and the server VM's, joined through Prometheus' exemplar API):
/// the lossy client's, with the server's own time small and the rest between the boxes.
fn both_ends(report: &Value, client: &Host, problems: &mut Vec<String>) -> String {
    let joined = findings(report, "fleet-request-both-ends");
    if joined.is_empty() {
        problems
            .push("no fleet-request-both-ends finding: no request joined across the VMs".into());
        return String::new();
    }
    // A VM stall elsewhere can make another host's request the slowest; the lossy client's
    // path has a finding of its own.
    let want = [client.instance(), HOSTS[SERVER].instance()];
    let Some(finding) = joined.iter().find(|f| strings(f, "hosts") == want) else {
        problems.push(format!(
            "no joined request of {} -> {} among {} findings",
            want[0],
            want[1],
            joined.len()
        ));
        return String::new();
    };
    let (client_ms, server_ms, between_ms) = (
        value(finding, "client_ms"),
        value(finding, "server_ms"),
        value(finding, "between_ms"),
    );
    // A lost segment costs at least the minimum RTO (200 ms); the server's own time is its
    // socket's, which no drop on the client's link delays.
    if !(between_ms >= 100.0 && server_ms < between_ms) {
        problems.push(format!(
            "joined request: {between_ms} ms between the boxes, {server_ms} ms in the server"
        ));
    }
    if (client_ms - server_ms - between_ms).abs() > 0.01 {
        problems.push("joined request: client time is not server time plus between".into());
    }
    let retransmits = value(finding, "retransmits");
    if retransmits.is_nan() || retransmits < 1.0 {
        problems.push("joined request: no retransmits on its path".into());
    }
    let first = finding["evidence"][0].as_str().unwrap_or("");
    format!("both ends: {} [{first}]", summary(finding))
}

/// 5. The 6.1 host runs with its send/receive probes missing: a clean request-level report
///    must not read as silence from it, so coverage names it (and only it).
fn coverage(fleet: &Fleet, agent: &Path) -> anyhow::Result<Outcome> {
    let legacy = &HOSTS[LEGACY];
    let end = now_s();
    let report = fleet.diagnose(agent, end - 60, end)?;
    let found = findings(&report, "fleet-coverage");
    let Some(finding) = found
        .iter()
        .find(|f| !value(f, "agents_probes_missing").is_nan())
    else {
        return Ok(Outcome {
            problems: vec!["no fleet-coverage finding about missing probes".into()],
            seen: format!("findings: {}", ids(&report)),
        });
    };
    let mut problems = Vec::new();
    if strings(finding, "hosts") != [legacy.instance()] {
        problems.push(format!(
            "hosts with probes missing are not [{}]",
            legacy.instance()
        ));
    }
    let down = found
        .iter()
        .filter(|f| value(f, "agents_down") > 0.0 || value(f, "agents_not_scraped") > 0.0)
        .count();
    if down > 0 {
        problems.push("agents reported down or not scraped".into());
    }
    Ok(Outcome {
        problems,
        seen: format!("{} evidence={}", summary(finding), finding["evidence"]),
    })
}

pub fn fleet_test() -> anyhow::Result<()> {
    let started = Instant::now();
    install_debian_packages(PACKAGES)?;
    util::require_root("network namespaces, tap devices and eBPF in the VMs")?;
    let agent = vm::target_dir().join("release/cacheprobe");
    if !agent.is_file() {
        bail!("{} not found: build it first", agent.display());
    }
    let cache = vm::target_dir().join("vm-cache");
    let work = cache.join("fleet");
    fs::create_dir_all(work.join("logs"))?;

    step("fleet-test: kernels and initramfs");
    let mut bases: Vec<(Kernel, PreparedKernel, PathBuf)> = Vec::new();
    for host in &HOSTS {
        if bases.iter().any(|(k, _, _)| *k == host.kernel) {
            continue;
        }
        let prepared = match vm::ready_or_row(
            host.kernel,
            vm::prepare_debian(host.kernel, &cache),
            Verdict::Fail,
        ) {
            Ok(prepared) => prepared,
            Err(row) => bail!("kernel {}: {}", row.kernel, row.detail),
        };
        let base = work.join(format!("base-{}.cpio.gz", host.kernel.label()));
        build_base(&cache, &prepared, &agent, &base)?;
        bases.push((host.kernel, prepared, base));
    }
    let prepare = started.elapsed();

    step(&format!(
        "fleet-test: network namespace, Prometheus, {} VMs",
        HOSTS.len()
    ));
    let mut fleet = Fleet::create()?;
    fleet.start_prometheus(&work)?;
    let boot_started = Instant::now();
    for (index, host) in HOSTS.iter().enumerate() {
        let (_, prepared, base) = bases
            .iter()
            .find(|(k, _, _)| *k == host.kernel)
            .context("kernel prepared above")?;
        let initrd = host_initrd(&work, base, host)?;
        let log = work.join("logs").join(format!("{}-console.log", host.name));
        // The last run's log would be read as this run's until QEMU's console replaces it.
        let _ = fs::remove_file(&log);
        let options = BootOptions {
            memory_mb: "768",
            timeout: VM_TIMEOUT,
            // no_timer_check: four emulated VMs on a loaded 2-core host are slow enough for
            // the kernel's IO-APIC timer check to fail and panic (seen with 6.1).
            append: "console=ttyS0 panic=-1 quiet no_timer_check",
            kvm_if_available: false,
            tcg_single_thread: true,
            network: Some(Network {
                netns: fleet.netns.clone(),
                tap: host.tap(),
                mac: host.mac.to_string(),
            }),
        };
        let prepared = prepared.clone();
        let console = log.clone();
        fleet.vms.push((
            index,
            std::thread::spawn(move || vm::boot(&prepared, &initrd, &console, &options)),
        ));
        fleet.logs.push(log);
    }
    wait_ready(&fleet)?;
    let ready = boot_started.elapsed();
    fleet.slowness = (ready.as_secs_f64() / QUIET_READY_S).clamp(1.0, 10.0);
    eprintln!(
        "xtask: every agent ready {:.1} s after boot: these VMs run {:.1}x slower than on a quiet \
         machine, and the waits below scale by that",
        ready.as_secs_f64(),
        fleet.slowness
    );
    wait_for(
        &fleet,
        "up{job=\"cacheprobe\"} == 1",
        HOSTS.len(),
        fleet.patience(60),
    )?;
    let idle_started = start_load(&fleet)?;

    let mut rows = Vec::new();
    let idle = move |fleet: &Fleet, agent: &Path| idle_timeouts(fleet, agent, idle_started);
    let scenarios: [(&str, &Scenario); 5] = [
        ("idle-timeouts", &idle),
        ("ring-disagreement", &ring_disagreement),
        // The lossy link before the hung server: a SIGCONTed memcached answers the requests
        // queued while it was stopped late, and its own socket then reads slow for a while
        // (seen: p99 262 ms in the next window, named a slow server).
        ("lossy-link", &lossy_link),
        ("hung-server", &hung_server),
        ("coverage", &coverage),
    ];
    let mut timings = Vec::new();
    for (name, scenario) in scenarios {
        step(&format!("fleet-test: {name}"));
        let scenario_started = Instant::now();
        let row = match scenario(&fleet, &agent) {
            Ok(outcome) => outcome.row(name),
            Err(err) => Row {
                kernel: "fleet".into(),
                scenario: name.into(),
                verdict: Verdict::Fail,
                detail: format!("{err:#}"),
            },
        };
        timings.push((name, scenario_started.elapsed()));
        rows.push(row);
    }

    step("fleet-test: poweroff");
    for host in &HOSTS {
        if let Err(err) = fleet.run(
            host,
            "tail -n 1 /tmp/load.log; touch /tmp/poweroff",
            fleet.patience(20),
        ) {
            eprintln!("xtask: {}: {err:#}", host.name);
        }
    }
    for (index, vm) in std::mem::take(&mut fleet.vms) {
        let end = vm
            .join()
            .map_err(|_| anyhow::anyhow!("VM thread panicked"))?;
        let host = &HOSTS[index];
        let console =
            String::from_utf8_lossy(&fs::read(&fleet.logs[index]).unwrap_or_default()).into_owned();
        let done = console.contains(&format!("CPFLEET-DONE {}", host.name));
        if !done || !matches!(end, Ok(VmEnd::Exited)) {
            rows.push(Row {
                kernel: "fleet".into(),
                scenario: format!("vm {}", host.name),
                verdict: Verdict::Fail,
                detail: format!("did not power off cleanly: {end:?}"),
            });
        }
    }
    drop(fleet);

    println!("\n{}", vm::render_table(&rows));
    println!(
        "time: prepare {:.1} s, boot to all agents ready {:.1} s, total {:.1} s",
        prepare.as_secs_f64(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for (name, took) in &timings {
        println!("time: {name:<18} {:.1} s", took.as_secs_f64());
    }
    for host in &HOSTS {
        println!(
            "console: {}",
            work.join("logs")
                .join(format!("{}-console.log", host.name))
                .display()
        );
    }
    let failed = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    let missing: Vec<&&str> = SCENARIOS
        .iter()
        .filter(|s| !rows.iter().any(|r| r.scenario == **s))
        .collect();
    if failed > 0 || !missing.is_empty() {
        bail!("fleet-test: {failed} failure(s)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_url_encoded() {
        assert_eq!(
            url_encode("up{job=\"x\"} == 1"),
            "up%7Bjob%3D%22x%22%7D%20%3D%3D%201"
        );
    }

    #[test]
    fn every_host_scrapes_and_lists_its_servers() {
        let config = prometheus_config();
        for host in &HOSTS {
            assert!(config.contains(&host.instance()), "{config}");
        }
        assert_eq!(
            HOSTS[ODD_CLIENT].server_list(),
            "10.77.0.11:11211 10.77.0.11:11212 10.77.0.11:11213 10.77.0.11:11214"
        );
        let env = host_env(&HOSTS[SERVER]);
        assert!(
            env.contains("MEMCACHED_PORTS=\"11211 11212 11213 11214\""),
            "{env}"
        );
        assert!(env.contains("IDLE_TIMEOUT_PORTS=\"11220\""), "{env}");
        assert!(agent_config().contains("ports = [11211, 11212, 11213, 11214]"));
    }
}
