//! Processes the bench starts and the system settings it changes, each behind a guard that
//! undoes it on every exit path: normal return, error, panic (unwinding) and Ctrl-C (the load
//! loops poll [`interrupted`] and return an error, which unwinds through the guards). Children
//! also get PR_SET_PDEATHSIG so they die with xtask even if it is killed outright.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

mod usage;

pub use usage::{
    bpf_object_ids, cpu_seconds, machine_busy_seconds, machine_user_seconds, memory, task_cpu_ns,
    thread_cpu_ns, user_seconds, wait_for_quiet, Memory, Quiet,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag the loops check, so cleanup runs instead of dying mid-run.
pub fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps so Ctrl-C is honoured promptly.
pub fn sleep(duration: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<ChildGuard> {
        die_with_parent(command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// An error when the process has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("{} exited unexpectedly with {status}", self.name);
            }
        }
        Ok(())
    }

    /// Stops the process and returns how it ended.
    pub fn stop(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        // SAFETY: kill on our own child's pid, which we have not reaped yet, so it is still ours.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: {} did not stop within 10 s of SIGTERM; killing it",
            self.name
        );
        let _ = child.kill();
        Ok(Some(child.wait()?))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("xtask: stopping {}: {err:#}", self.name);
        }
    }
}

/// Runs a command to completion within `timeout`, killing it when it overruns.
pub fn run_bounded(name: &str, command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(name, command)?;
    let child = guard.child_mut().context("child vanished")?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = guard.stop();
            bail!("{name} did not finish within {} s", timeout.as_secs());
        }
        if interrupted() {
            let _ = guard.stop();
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.child = None;
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Like [`run_bounded`], but a failed exit status is an error carrying stderr.
pub fn run_checked(name: &str, command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let output = run_bounded(name, command, timeout)?;
    if !output.status.success() {
        bail!(
            "{name} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Writes a /proc/sys value and puts the old one back on drop.
pub struct SysctlGuard {
    path: PathBuf,
    previous: String,
}

impl SysctlGuard {
    pub fn set(path: &str, value: &str) -> anyhow::Result<SysctlGuard> {
        let previous = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {path}"))?
            .trim()
            .to_string();
        std::fs::write(path, value).with_context(|| format!("cannot write {value} to {path}"))?;
        Ok(SysctlGuard {
            path: PathBuf::from(path),
            previous,
        })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(&self.path, &self.previous) {
            eprintln!(
                "xtask: could not restore {} to {}: {err}",
                self.path.display(),
                self.previous
            );
        }
    }
}

/// Raises this process's open-file limit towards `wanted` (children inherit it). Raising the
/// hard limit needs CAP_SYS_RESOURCE, which containers often drop; then the soft limit goes up to
/// the hard one and callers spread descriptors over several processes. Returns the limit now in
/// force and, when fs.nr_open had to be raised, the guard that restores it.
pub fn raise_nofile(wanted: u64) -> anyhow::Result<(u64, Option<SysctlGuard>)> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if current.rlim_max >= wanted {
        set_nofile(wanted, current.rlim_max)?;
        return Ok((wanted, None));
    }
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?
        .trim()
        .parse()
        .context("fs.nr_open is not a number")?;
    let guard = if nr_open < wanted {
        Some(SysctlGuard::set(
            "/proc/sys/fs/nr_open",
            &wanted.to_string(),
        )?)
    } else {
        None
    };
    match set_nofile(wanted, wanted) {
        Ok(()) => Ok((wanted, guard)),
        Err(_) => {
            drop(guard);
            set_nofile(current.rlim_max, current.rlim_max)?;
            Ok((current.rlim_max, None))
        }
    }
}

fn set_nofile(soft: u64, hard: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot set RLIMIT_NOFILE to {soft}/{hard}"));
    }
    Ok(())
}

/// A free TCP port on loopback at or above `from`, below the ephemeral range and away from the
/// integration tests' 20000-31999 block.
pub fn free_port(from: u16) -> anyhow::Result<u16> {
    (from..from.saturating_add(500))
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .with_context(|| format!("no free port in {from}-{}", from.saturating_add(500)))
}

pub const MEMCACHED_BASE_ARGS: &[&str] = &["-u", "root", "-t", "2", "-l", "127.0.0.1", "-m", "256"];

pub struct Memcached {
    /// Held so memcached is stopped when this is dropped.
    _process: ChildGuard,
    pub addr: SocketAddr,
    pub command_line: String,
}

impl Memcached {
    pub fn pid(&self) -> u32 {
        self._process.pid()
    }

    pub fn start(port: u16, max_connections: Option<u32>) -> anyhow::Result<Memcached> {
        Memcached::start_with(port, max_connections, &[])
    }

    /// `start` with more memcached options (the soak's idle timeout).
    pub fn start_with(
        port: u16,
        max_connections: Option<u32>,
        extra: &[&str],
    ) -> anyhow::Result<Memcached> {
        let mut args: Vec<String> = MEMCACHED_BASE_ARGS.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-p".to_string(), port.to_string()]);
        if let Some(max) = max_connections {
            // The listen backlog must absorb connection bursts of the idle-connection test.
            args.extend([
                "-c".to_string(),
                max.to_string(),
                "-b".to_string(),
                "4096".to_string(),
            ]);
        }
        let command_line = format!("memcached {}", args.join(" "));
        let mut command = Command::new("memcached");
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut guard = ChildGuard::spawn("memcached", &mut command)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            guard.check_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("memcached did not listen on {addr} within 10 s");
            }
            sleep(Duration::from_millis(50))?;
        }
        Ok(Memcached {
            _process: guard,
            addr,
            command_line,
        })
    }

    /// memcached inside the bench's namespace (see [`super::paired::Netns`]), listening on its
    /// `served` port.
    pub fn start_in(netns: &super::paired::Netns) -> anyhow::Result<Memcached> {
        let mut args: Vec<String> = MEMCACHED_BASE_ARGS.iter().map(|s| s.to_string()).collect();
        args.extend(["-p".to_string(), netns.served.to_string()]);
        let command_line = format!(
            "ip netns exec {} memcached {}   # iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport {} -j REDIRECT --to-ports {}",
            netns.name,
            args.join(" "),
            netns.watched,
            netns.served
        );
        let mut command = Command::new("ip");
        command
            .args(netns.exec_prefix())
            .arg("memcached")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut guard = ChildGuard::spawn("memcached", &mut command)?;
        // Clients reach it through the NAT rule, on the watched port.
        let addr: SocketAddr = ([127, 0, 0, 1], netns.watched).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            guard.check_running()?;
            if netns
                .run(|| Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()))?
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "memcached did not answer on {addr} in netns {} within 10 s",
                    netns.name
                );
            }
            sleep(Duration::from_millis(50))?;
        }
        Ok(Memcached {
            _process: guard,
            addr,
            command_line,
        })
    }

    /// One value of memcached's `stats` (e.g. curr_connections).
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"stats\r\n")?;
        let mut text = String::new();
        let mut reader = BufReader::new(stream);
        for _ in 0..1000 {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.starts_with("END") {
                break;
            }
            text.push_str(&line);
        }
        text.lines()
            .find_map(|line| {
                let mut parts = line.split_whitespace();
                (parts.next() == Some("STAT") && parts.next() == Some(name))
                    .then(|| parts.next()?.parse().ok())
                    .flatten()
            })
            .with_context(|| format!("memcached stats has no {name}"))
    }
}

/// What the agent's configuration varies across the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    SocketsOnly,
    /// Capture with the default decoding budget: the agent as it ships.
    Capture,
    /// Capture with no budget: every connection decoded, whatever it costs.
    CaptureAll,
    /// `SocketsOnly` / `Capture` with `limits.socket_storage = false`: the send/receive probes
    /// as raw tracepoints that read each socket's ports per call (the path before issue 19,
    /// and the one kernels without tp_btf sock_send_length keep), measured beside the default.
    SocketsOnlyPortCheck,
    CapturePortCheck,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Off,
        Mode::SocketsOnly,
        Mode::Capture,
        Mode::CaptureAll,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::SocketsOnly => "sockets only",
            Mode::Capture => "capture + decoding",
            Mode::CaptureAll => "decoding, no budget",
            Mode::SocketsOnlyPortCheck => "sockets only, port check per call",
            Mode::CapturePortCheck => "capture + decoding, port check per call",
        }
    }
}

/// The agent config the bench uses: one memcache service per port.
pub fn agent_config(ports: &[u16], mode: Mode, max_sockets: u32) -> String {
    let (capture, capture_bytes) = match mode {
        // The agent's default per-call header budget.
        Mode::Capture | Mode::CaptureAll | Mode::CapturePortCheck => (true, 65536),
        Mode::Off | Mode::SocketsOnly | Mode::SocketsOnlyPortCheck => (false, 0),
    };
    let mut config = String::new();
    for (index, port) in ports.iter().enumerate() {
        let name = if index == 0 {
            "bench".to_string()
        } else {
            format!("bench-{index}")
        };
        config.push_str(&format!(
            "[[services]]\nname = \"{name}\"\nport = {port}\nprotocol = \"memcache\"\ncapture = {capture}\n\n"
        ));
    }
    config.push_str(&format!(
        "[limits]\ncapture_bytes = {capture_bytes}\nmax_sockets = {max_sockets}\n"
    ));
    if mode == Mode::CaptureAll {
        config.push_str("capture_records_per_second = 0\n");
    }
    if matches!(mode, Mode::SocketsOnlyPortCheck | Mode::CapturePortCheck) {
        config.push_str("socket_storage = false\n");
    }
    if matches!(mode, Mode::SocketsOnly | Mode::SocketsOnlyPortCheck) {
        // The arms measure what the programs cost attached; the on-demand arm turns this off.
        config.push_str(ALWAYS_ATTACHED);
    }
    config
}

/// The `[limits]` line that keeps the send/receive programs attached with nothing captured.
pub const ALWAYS_ATTACHED: &str = "socket_probes_on_demand = false\n";

/// A running `cacheprobe run` whose stderr is followed (the last lines are kept for errors).
pub struct Agent {
    pub guard: ChildGuard,
    pub metrics_addr: SocketAddr,
    /// From spawning the process to its `probes attached` log line.
    pub attach_wall: Duration,
    /// The `elapsed_ms` the agent itself reports in that line.
    pub attach_reported_ms: Option<u64>,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Lines of the whole log that said the capture sample changed (the budget measure counts
    /// them; the tail keeps too few).
    sample_changes: Arc<std::sync::atomic::AtomicU64>,
}

const LOG_TAIL: usize = 40;
pub const AGENT_SETTLE: Duration = Duration::from_secs(1);

impl Agent {
    pub fn start(binary: &Path, config: &Path, metrics_addr: SocketAddr) -> anyhow::Result<Agent> {
        Agent::start_with_control(binary, config, metrics_addr, None)
    }

    /// [`Agent::start`] serving its history on `control` (None: the default socket).
    pub fn start_with_control(
        binary: &Path,
        config: &Path,
        metrics_addr: SocketAddr,
        control: Option<&Path>,
    ) -> anyhow::Result<Agent> {
        let mut command = Command::new(binary);
        command
            .args(["--log", "info", "run", "--config"])
            .arg(config)
            .arg("--listen")
            .arg(metrics_addr.to_string());
        if let Some(control) = control {
            command.arg("--control-socket").arg(control);
        }
        command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut guard = ChildGuard::spawn("cacheprobe", &mut command)?;
        let stderr = guard
            .child_mut()
            .and_then(|c| c.stderr.take())
            .context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let sample_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let attached_rx = drain_stderr(stderr, Arc::clone(&log), Arc::clone(&sample_changes));
        let mut agent = Agent {
            guard,
            metrics_addr,
            attach_wall: Duration::ZERO,
            attach_reported_ms: None,
            log,
            sample_changes,
        };
        let (at, line) = agent.wait_attached(spawned, &attached_rx)?;
        agent.attach_wall = at - spawned;
        agent.attach_reported_ms = parse_elapsed_ms(&line);
        let deadline = Instant::now() + Duration::from_secs(10);
        while super::observe::scrape(metrics_addr).is_err() {
            agent.check_running()?;
            if Instant::now() >= deadline {
                bail!("the agent's /metrics on {metrics_addr} did not answer within 10 s");
            }
            sleep(Duration::from_millis(50))?;
        }
        // After /metrics is up the agent still reads /proc for existing connections and sets
        // up its loop; measuring starts once that start-up work is over.
        sleep(AGENT_SETTLE)?;
        agent.check_running()?;
        Ok(agent)
    }

    /// Waits (at most 30 s from `spawned`) for the agent's `probes attached` line; returns
    /// when it was read, and the line.
    fn wait_attached(
        &mut self,
        spawned: Instant,
        attached_rx: &mpsc::Receiver<(Instant, String)>,
    ) -> anyhow::Result<(Instant, String)> {
        let deadline = spawned + Duration::from_secs(30);
        loop {
            match attached_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(found) => return Ok(found),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.guard.check_running();
                    bail!(
                        "the agent exited before attaching its probes:\n{}",
                        self.log_tail()
                    );
                }
            }
            if let Err(err) = self.guard.check_running() {
                bail!("{err:#}:\n{}", self.log_tail());
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not attach its probes within 30 s:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// How many times the agent has said its capture sample changed.
    pub fn sample_changes(&self) -> u64 {
        self.sample_changes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|tail| tail.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Err(err) = self.guard.check_running() {
            bail!("{err:#}; its last log lines:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// SIGTERM and wait; a failed exit is an error (the agent must detach cleanly).
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.check_running()?;
        match self.guard.stop()? {
            // Dying of the SIGTERM itself (before its handler is installed) leaves nothing
            // behind either: nothing is pinned, so the kernel detaches everything.
            Some(status) if status.signal() == Some(libc::SIGTERM) => {
                eprintln!("xtask: note: the agent died of SIGTERM instead of handling it (its handler was not installed yet)");
                Ok(())
            }
            Some(status) if !status.success() => {
                bail!(
                    "the agent exited with {status} on SIGTERM:\n{}",
                    self.log_tail()
                )
            }
            _ => Ok(()),
        }
    }
}

/// Drains the agent's stderr for its whole life, so its logging can never block it, keeping
/// the last [`LOG_TAIL`] lines in `tail`; sends the `probes attached` line when it comes.
fn drain_stderr(
    stderr: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    sample_changes: Arc<std::sync::atomic::AtomicU64>,
) -> mpsc::Receiver<(Instant, String)> {
    let (attached_tx, attached_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("probes attached") {
                let _ = attached_tx.send((Instant::now(), line.clone()));
            }
            if line.contains("capture sample changed") {
                sample_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    attached_rx
}

fn parse_elapsed_ms(line: &str) -> Option<u64> {
    let start = line.find("elapsed_ms=")? + "elapsed_ms=".len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_line() {
        let line = "2026-11-25T09:51:01Z  INFO cacheprobe::commands::run: probes attached elapsed_ms=256 attached=30";
        assert_eq!(parse_elapsed_ms(line), Some(256));
        assert_eq!(parse_elapsed_ms("probes attached"), None);
    }

    #[test]
    fn config_per_mode() {
        let capture = agent_config(&[17211], Mode::Capture, 65536);
        assert!(capture.contains("capture = true") && capture.contains("capture_bytes = 65536"));
        assert!(!capture.contains("capture_records_per_second"));
        let everything = agent_config(&[17211], Mode::CaptureAll, 65536);
        assert!(everything.contains("capture = true"));
        assert!(everything.ends_with("capture_records_per_second = 0\n"));
        let sockets = agent_config(&[17211, 17212], Mode::SocketsOnly, 65536);
        assert!(sockets.contains("capture = false") && sockets.contains("capture_bytes = 0"));
        assert!(sockets.contains("name = \"bench-1\"\nport = 17212"));
        assert_eq!(sockets.matches("[[services]]").count(), 2);
    }
}

/// Which of this thread's allowed CPUs to pin to.
#[derive(Debug, Clone, Copy)]
pub enum Cpu {
    First,
    Last,
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> anyhow::Result<(libc::cpu_set_t, Vec<usize>)> {
    // SAFETY: plain libc calls on a zeroed cpu set owned here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let cpus = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect::<Vec<_>>();
        if cpus.is_empty() {
            bail!("this thread may run on no CPU");
        }
        Ok((set, cpus))
    }
}

fn set_affinity(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: plain libc calls on a zeroed cpu set owned here.
    unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pick(cpus: &[usize], which: Cpu) -> usize {
    match which {
        Cpu::First => cpus[0],
        Cpu::Last => cpus[cpus.len() - 1],
    }
}

/// Pins the calling thread to one CPU while it lives (its old set comes back on drop), so a
/// timed loop or a load generator runs where the last one did.
pub struct Pinned {
    previous: libc::cpu_set_t,
}

impl Pinned {
    pub fn thread_to(which: Cpu) -> anyhow::Result<Pinned> {
        let (previous, cpus) = allowed_cpus()?;
        set_affinity(0, pick(&cpus, which))
            .map_err(|e| anyhow::anyhow!("sched_setaffinity: {e}"))?;
        Ok(Pinned { previous })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the set read in `thread_to`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.previous);
        }
    }
}

/// Pins every thread of process `pid` (as it is now) to one CPU.
pub fn pin_process(pid: u32, which: Cpu) -> anyhow::Result<()> {
    let (_, cpus) = allowed_cpus()?;
    let cpu = pick(&cpus, which);
    let tasks = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let tid: libc::pid_t = entry?.file_name().to_string_lossy().parse()?;
        set_affinity(tid, cpu).with_context(|| format!("pinning thread {tid} of {pid}"))?;
    }
    Ok(())
}
