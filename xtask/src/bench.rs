//! `cargo xtask bench [--quick]`: what cacheprobe costs on a cache host, measured against real
//! memcached on loopback. Every measure is printed as a table and written with its commands and
//! the machine's facts to BENCHMARKS.md (`--quick` writes target/bench/BENCHMARKS.quick.md so a
//! smoke run never replaces the committed numbers).
//!
//! Modes compared in one invocation, alternating: agent off, agent with socket probes only
//! (capture off, capture_bytes = 0), agent with payload capture and decoding (capture on,
//! capture_bytes = 16384). Nothing is pinned: on a 2-core machine memcached's two threads, the
//! single-threaded load generator and the agent share both cores, as they would on a small host.

mod floor;
mod frame_cost;
mod idle;
mod loadgen;
mod observe;
mod paired;
mod procs;
mod report;
mod rounds;
mod soak;
mod top;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::util;
use loadgen::{LoadReport, LoadSpec, WORKLOAD};
use procs::{Agent, Memcached, Mode, SysctlGuard};
use report::{median, megabytes, micros, ratio, thousands, Section, Table};

/// `xtask bench-hold`: the helper process that holds idle connections open.
pub fn hold_connections(
    target: std::net::SocketAddrV4,
    count: usize,
    source: std::net::Ipv4Addr,
) -> anyhow::Result<()> {
    idle::hold(target, count, source)
}

pub struct BenchOptions {
    pub quick: bool,
    pub output: Option<PathBuf>,
    /// Run only these measures (names in [`PHASES`]); empty means all.
    pub only: Vec<String>,
    /// Interleaved off/on rounds of the `ab` measure (default 10, 2 with `--quick`).
    pub rounds: Option<usize>,
    /// An earlier build of the agent whose modes `ab` runs in the same rounds instead of the
    /// port-check twins: before and after a change, side by side.
    pub baseline: Option<PathBuf>,
    /// Extra `capture + decoding` arms of `ab` at these capture_records_per_second.
    pub budgets: Vec<u32>,
}

/// The measures, in the order they run; `--only` picks from these.
pub const PHASES: &[&str] = &[
    "attach",
    "ab",
    "modes",
    "bpf",
    "frame-cost",
    "loss",
    "tshark",
    "idle",
    "decoder",
    "scrape",
    "fleet",
    "top",
];

/// Durations, repeats and steps of one bench invocation.
struct Plan {
    /// Interleaved off/on rounds of the goal measure (`ab`), and each run's length.
    rounds: usize,
    paired_run: Duration,
    /// The bpf_stats window after each agent-on run of a round.
    stats_run: Duration,
    /// How long a round's run may wait for the machine to go quiet (interleaving, not waiting,
    /// is the defence against a loaded machine).
    paired_quiet: Duration,
    /// Repeats of the descriptive four-mode comparison (`modes`).
    repeats: usize,
    run: Duration,
    saturation_connections: usize,
    open_loop_connections: usize,
    fixed_rate: u64,
    idle_counts: &'static [usize],
    loss_rates: &'static [Option<u64>],
    loss_run: Duration,
    attach_runs: usize,
    capture_run: Duration,
    capture_rate: u64,
    criterion: bool,
    /// How long an A/B run may wait for the machine to go quiet before it starts anyway.
    quiet_wait: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                paired_run: Duration::from_secs(2),
                stats_run: Duration::from_secs(1),
                paired_quiet: Duration::ZERO,
                repeats: 1,
                run: Duration::from_secs(2),
                saturation_connections: 32,
                open_loop_connections: 128,
                fixed_rate: 40_000,
                idle_counts: &[1_000],
                loss_rates: &[Some(25_000), Some(100_000)],
                loss_run: Duration::from_secs(2),
                attach_runs: 5,
                capture_run: Duration::from_secs(2),
                capture_rate: 20_000,
                criterion: false,
                quiet_wait: Duration::ZERO,
            }
        } else {
            Plan {
                // Ten rounds give the bootstrap interval of the median something to work with;
                // 5 s runs keep all of them, both setups, inside about ten minutes.
                rounds: 10,
                paired_run: Duration::from_secs(5),
                stats_run: Duration::from_secs(2),
                paired_quiet: Duration::from_secs(3),
                // The four-mode table is descriptive now (memcaslap, fixed-rate latency, agent
                // CPU and RSS); the goals come from the interleaved rounds.
                repeats: 3,
                run: Duration::from_secs(10),
                saturation_connections: 32,
                open_loop_connections: 128,
                fixed_rate: 40_000,
                idle_counts: &[1_000, 10_000, 100_000],
                loss_rates: &[
                    Some(25_000),
                    Some(50_000),
                    Some(100_000),
                    Some(150_000),
                    Some(200_000),
                    None,
                ],
                loss_run: Duration::from_secs(5),
                attach_runs: 5,
                capture_run: Duration::from_secs(3),
                capture_rate: 20_000,
                criterion: true,
                quiet_wait: Duration::from_secs(45),
            }
        }
    }
}

/// The agent's export of its programs' kernel run time (from bpf_stats).
const EXPORTED_RUN_SECONDS: &str = "cacheprobe_bpf_program_run_seconds_total";

/// Busy cores below which the machine counts as quiet (the idle agent and memcached included).
const QUIET_CORES: f64 = 0.15;

/// The default kernel socket map size; larger only where the idle-connection test needs it.
const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// The measured targets from issue 8, filled in as the measures come in.
#[derive(Default)]
struct Targets {
    sockets_loss: Option<f64>,
    capture_loss: Option<f64>,
    /// Lowest and highest loss of one round against the `off` run of the same round: how far
    /// the machine's own noise moves a single comparison.
    sockets_loss_rounds: Option<(f64, f64)>,
    capture_loss_rounds: Option<(f64, f64)>,
    /// Median saturation throughput with the agent off.
    off_ops_per_sec: Option<f64>,
    /// BPF time per memcache op with socket probes only (bpf_stats run).
    sockets_bpf_ns_per_op: Option<f64>,
    /// The same with no decoding budget (every connection decoded), for the findings.
    capture_all_loss: Option<f64>,
    capture_all_agent_us_per_op: Option<f64>,
    /// (achieved ops/s of the 100k step, events lost in it)
    loss_at_100k: Option<(f64, u64)>,
    rss_at_100k: Option<procs::Memory>,
    attach_median: Option<Duration>,
    decoder_per_core: Option<f64>,
    /// Agent process CPU per op in capture mode at saturation, µs (= CPU s per million ops).
    capture_agent_us_per_op: Option<f64>,
    bpf: Option<BpfSplit>,
    idle: Option<IdleFinding>,
    /// The interleaved off/on rounds (issue 19), by scenario.
    paired: Vec<rounds::ScenarioResult>,
    /// (keys per get, BPF ns per get at 500 KB values over that at 100 B values, the same
    /// ratio for an empty program on the same tracepoints), issue 17.
    frame_flatness: Vec<(usize, f64, f64)>,
    /// The decoder on replies of many items (criterion), items per second.
    decoder_many_items: Option<f64>,
}

/// Where the BPF time per memcache op goes, from the bpf_stats run.
struct BpfSplit {
    /// All of the agent's programs, per memcache op.
    ns_per_op: f64,
    /// (program, share of all BPF time, ns per run)
    top: (String, f64, f64),
}

/// One bpf_stats run: per program (name, run ns, runs), busiest first.
struct BpfRun {
    spec: String,
    programs: Vec<(String, u64, u64)>,
    measured: Measured,
    /// Growth of the agent's own export of the programs' run time over the run.
    exported_run_seconds: f64,
    maps: Vec<observe::MapInfo>,
}

impl BpfRun {
    fn ops(&self) -> f64 {
        self.measured.load.ops as f64
    }

    fn total_ns(&self) -> u64 {
        self.programs.iter().map(|program| program.1).sum()
    }

    fn ns_per_op(&self) -> f64 {
        self.total_ns() as f64 / self.ops().max(1.0)
    }

    fn table(&self) -> Table {
        let ops = self.ops().max(1.0);
        let total_ns = self.total_ns().max(1) as f64;
        let mut table = Table::new(&[
            "program",
            "runs",
            "runs per op",
            "ns/run",
            "total ms",
            "share",
        ]);
        for (name, ns, cnt) in &self.programs {
            table.row(vec![
                name.clone(),
                thousands(*cnt as f64),
                format!("{:.2}", *cnt as f64 / ops),
                if *cnt > 0 {
                    format!("{:.0}", *ns as f64 / *cnt as f64)
                } else {
                    "-".into()
                },
                format!("{:.1}", *ns as f64 / 1e6),
                format!("{:.1}%", 100.0 * *ns as f64 / total_ns),
            ]);
        }
        table
    }
}

/// How long the agent is measured idle with many open connections: two of its default /proc
/// sampling intervals, so a window neither always catches nor always misses a sample.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// How long the agent's samples may take to catch up after a burst of connections before the
/// bench measures it idle anyway (and says so).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// The largest idle-connection row.
struct IdleFinding {
    connections: usize,
    settling_cpu_percent: f64,
    catch_up_seconds: f64,
    idle_cpu_percent: f64,
    memory: procs::Memory,
    active: f64,
    lost: String,
}

struct Bench {
    plan: Plan,
    quick: bool,
    binary: PathBuf,
    scratch: PathBuf,
    metrics_addr: SocketAddr,
    sections: Vec<Section>,
    targets: Targets,
    memcached_lines: Vec<String>,
    /// tshark's commands per second on the captured traffic, for the decoder ratio.
    tshark_rate: Option<f64>,
    /// RLIMIT_NOFILE in force: bounds connections per process in the idle-connection test.
    nofile: u64,
    /// `--baseline`: the earlier build `ab` compares this one with.
    baseline: Option<PathBuf>,
    /// `--budgets`: capture arms of `ab` at other decoding budgets.
    budgets: Vec<u32>,
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                util::workspace_root().join(dir)
            }
        }
        None => util::workspace_root().join("target"),
    }
}

/// `bench --soak MINUTES`: the soak alone (see soak.rs).
pub fn soak(minutes: f64, decode_all: bool) -> anyhow::Result<()> {
    util::require_root("the soak loads eBPF programs")?;
    procs::install_interrupt_handler();
    let binary = target_dir().join("release/cacheprobe");
    if !binary.exists() {
        bail!("{} is missing: build it first", binary.display());
    }
    soak::soak(&binary, &target_dir().join("bench"), minutes, decode_all)
}

pub fn bench(options: BenchOptions) -> anyhow::Result<()> {
    util::require_root("the bench loads eBPF programs and changes sysctls")?;
    let started = Instant::now();
    procs::install_interrupt_handler();
    // 100k idle connections need 100k client fds here and as many in memcached (inherited).
    let (nofile, _nr_open) = procs::raise_nofile(262_144)?;
    let scratch = target_dir().join("bench");
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let binary = target_dir().join("release/cacheprobe");
    if !binary.exists() {
        bail!("{} is missing: build it first", binary.display());
    }
    let output = options.output.clone().unwrap_or_else(|| {
        if options.quick {
            scratch.join("BENCHMARKS.quick.md")
        } else {
            util::workspace_root().join("BENCHMARKS.md")
        }
    });
    let facts = machine_facts();
    let mut plan = Plan::new(options.quick);
    if let Some(rounds) = options.rounds {
        if rounds < 2 {
            bail!("--rounds must be at least 2 (a single round has no interval)");
        }
        plan.rounds = rounds;
    }
    let mut bench = Bench {
        plan,
        quick: options.quick,
        binary,
        scratch,
        metrics_addr: ([127, 0, 0, 1], procs::free_port(17950)?).into(),
        sections: Vec::new(),
        targets: Targets::default(),
        memcached_lines: Vec::new(),
        tshark_rate: None,
        nofile,
        baseline: match options.baseline.clone() {
            Some(path) if !path.exists() => bail!("--baseline {}: no such file", path.display()),
            Some(path) => Some(
                path.canonicalize()
                    .with_context(|| format!("cannot resolve --baseline {}", path.display()))?,
            ),
            None => None,
        },
        budgets: options.budgets.clone(),
    };

    for name in &options.only {
        if !PHASES.contains(&name.as_str()) {
            bail!(
                "unknown measure {name:?}; choose from {}",
                PHASES.join(", ")
            );
        }
    }
    let wanted = |phase: &str| options.only.is_empty() || options.only.iter().any(|o| o == phase);
    if wanted("attach") {
        bench.attach_time()?;
    }
    if ["ab", "modes", "bpf", "frame-cost", "loss", "tshark", "top"]
        .iter()
        .any(|p| wanted(p))
    {
        let memcached = Memcached::start(procs::free_port(17211)?, None)?;
        bench.memcached_lines.push(memcached.command_line.clone());
        loadgen::populate(memcached.addr, &WORKLOAD)?;
        if wanted("ab") {
            bench.paired_rounds(&memcached)?;
        }
        // The descriptive four-mode table takes a minute even in one repeat: a smoke run
        // has the interleaved rounds instead, unless asked for it.
        if wanted("modes") && !(options.quick && options.only.is_empty()) {
            bench.overhead_ab(&memcached)?;
        }
        if wanted("bpf") {
            bench.bpf_program_cost(&memcached)?;
        }
        if wanted("frame-cost") {
            bench.frame_cost()?;
        }
        if wanted("loss") {
            bench.event_loss(&memcached)?;
        }
        if wanted("tshark") {
            bench.tshark_capture(&memcached)?;
        }
        if wanted("top") {
            bench.top_cost(&memcached)?;
        }
    }
    if wanted("idle") {
        bench.idle_connections()?;
    }
    if wanted("decoder") {
        bench.decoder_throughput()?;
    }
    if wanted("scrape") {
        bench.scrape_cost()?;
    }
    if wanted("fleet") {
        bench.fleet_diagnose()?;
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let mut command = String::from("cargo xtask bench");
    if options.quick {
        command.push_str(" --quick");
    }
    if let Some(rounds) = options.rounds {
        command.push_str(&format!(" --rounds {rounds}"));
    }
    if let Some(baseline) = &options.baseline {
        command.push_str(&format!(" --baseline {}", baseline.display()));
    }
    if !options.budgets.is_empty() {
        let budgets: Vec<String> = options.budgets.iter().map(|b| b.to_string()).collect();
        command.push_str(&format!(" --budgets {}", budgets.join(",")));
    }
    if !options.only.is_empty() {
        command.push_str(&format!(" --only {}", options.only.join(",")));
    }
    let mut text = String::from("# cacheprobe benchmarks\n\n");
    text.push_str(
        "Written by `cargo xtask bench` (xtask/src/bench.rs); every number below comes from one \
         invocation on the machine described here. Rerun the command to reproduce.\n\n",
    );
    text.push_str(&format!("Command: `{command}` (as root)\n\n"));
    let mut facts_table = Table::new(&["fact", "value"]);
    for (name, value) in &facts {
        facts_table.row(vec![name.to_string(), value.clone()]);
    }
    facts_table.row(vec![
        "load average after".into(),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ]);
    facts_table.row(vec![
        "bench duration".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ]);
    text.push_str(&facts_table.markdown());
    text.push('\n');
    text.push_str(&bench.targets_section().markdown());
    text.push_str(&bench.method_section().markdown());
    for section in &bench.sections {
        text.push_str(&section.markdown());
    }
    std::fs::write(&output, text).with_context(|| format!("cannot write {}", output.display()))?;
    println!("{}", bench.targets_section().markdown());
    eprintln!(
        "xtask: bench finished in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

fn first_line(text: Option<String>) -> String {
    text.unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

fn machine_facts() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1048576.0)
        });
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(util::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    vec![
        (
            "date (UTC)",
            first_line(util::output("date", &["-u", "+%Y-%m-%d %H:%M:%S"])),
        ),
        ("kernel", first_line(util::output("uname", &["-srm"]))),
        ("CPU model", cpu),
        ("cores", cores.to_string()),
        ("memory", memory),
        (
            "cacheprobe commit",
            format!(
                "{commit}{}",
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
        ),
        ("memcached", first_line(util::output("memcached", &["-V"]))),
        ("memcaslap", first_line(util::output("memcaslap", &["-V"]))),
        ("tshark", first_line(util::output("tshark", &["-v"]))),
        ("bpftool", first_line(util::output("bpftool", &["version"]))),
        (
            "load average before",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]
}

/// One measured load run against a running (or absent) agent.
struct Measured {
    load: LoadReport,
    agent_cpu: Option<f64>,
    /// Cores' worth of user CPU used by unrelated processes during the run: noise indicator.
    other_cores: f64,
}

impl Measured {
    fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.agent_cpu?;
        (self.load.ops > 0).then(|| cpu / (self.load.ops as f64 / 1e6))
    }
}

fn format_cpu(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.3}"))
}

impl Bench {
    fn spec(&self, target: SocketAddr, rate: Option<u64>, duration: Duration) -> LoadSpec {
        LoadSpec {
            target,
            connections: if rate.is_some() {
                self.plan.open_loop_connections
            } else {
                self.plan.saturation_connections
            },
            duration,
            rate,
            workload: WORKLOAD,
        }
    }

    fn config_path(&self, mode: Mode) -> PathBuf {
        self.scratch.join(match mode {
            Mode::Off => "agent-off.toml",
            Mode::SocketsOnly => "agent-sockets.toml",
            Mode::Capture => "agent-capture.toml",
            Mode::CaptureAll => "agent-capture-all.toml",
            Mode::SocketsOnlyPortCheck => "agent-sockets-port-check.toml",
            Mode::CapturePortCheck => "agent-capture-port-check.toml",
        })
    }

    fn start_agent(&self, port: u16, mode: Mode, max_sockets: u32) -> anyhow::Result<Agent> {
        self.start_agent_on(&[port], mode, max_sockets)
    }

    fn start_agent_on(&self, ports: &[u16], mode: Mode, max_sockets: u32) -> anyhow::Result<Agent> {
        self.start_binary_on(&self.binary, ports, mode, max_sockets)
    }

    /// [`Bench::start_agent_on`] with another build of the agent (`--baseline`).
    fn start_binary_on(
        &self,
        binary: &Path,
        ports: &[u16],
        mode: Mode,
        max_sockets: u32,
    ) -> anyhow::Result<Agent> {
        let path = self.config_path(mode);
        std::fs::write(&path, procs::agent_config(ports, mode, max_sockets))?;
        Agent::start(binary, &path, self.metrics_addr)
    }

    fn agent_command(&self, mode: Mode) -> String {
        format!(
            "{} run --config {} --listen {}",
            self.binary.display(),
            self.config_path(mode).display(),
            self.metrics_addr
        )
    }

    /// Runs `spec` and records the agent's CPU and how busy everything else on the machine was
    /// (user CPU of processes other than this one, `server_pid` and the agent).
    fn measure(
        &self,
        spec: &LoadSpec,
        agent: Option<&mut Agent>,
        server: &Memcached,
    ) -> anyhow::Result<Measured> {
        let server_pid = server.pid();
        let agent_pid = agent.as_ref().map(|a| a.pid());
        let ours = || -> anyhow::Result<f64> {
            let mut total =
                procs::user_seconds(std::process::id())? + procs::user_seconds(server_pid)?;
            if let Some(pid) = agent_pid {
                total += procs::user_seconds(pid)?;
            }
            Ok(total)
        };
        let machine_before = procs::machine_user_seconds()?;
        let ours_before = ours()?;
        let cpu_before = agent_pid.map(procs::cpu_seconds).transpose()?;
        let load = loadgen::run(spec).with_context(|| {
            // memcached's own view usually says why it dropped a client.
            let stats = [
                "curr_connections",
                "total_connections",
                "rejected_connections",
                "conn_yields",
            ]
            .iter()
            .map(|name| {
                format!(
                    "{name}={}",
                    server.stat(name).map_or("?".into(), |v| v.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
            format!(
                "load against {}: {} (memcached stats: {stats})",
                spec.target,
                spec.describe()
            )
        })?;
        let cpu_after = agent_pid.map(procs::cpu_seconds).transpose()?;
        let ours_after = ours()?;
        let machine_after = procs::machine_user_seconds()?;
        if let Some(agent) = agent {
            agent.check_running()?;
        }
        if load.ops == 0 {
            bail!(
                "the load generator completed no operation against {}",
                spec.target
            );
        }
        let others = ((machine_after - machine_before) - (ours_after - ours_before)).max(0.0);
        Ok(Measured {
            other_cores: others / load.elapsed.as_secs_f64().max(1e-3),
            load,
            agent_cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        })
    }

    fn attach_time(&mut self) -> anyhow::Result<()> {
        util::step("time from start to probes attached");
        let mut section = Section::new("Time from start to probes attached");
        section.say(format!(
            "The agent is started {} times with payload capture on (all programs) and no load; \
             wall time is measured from spawning the process to its `probes attached` log line \
             on stderr, and `elapsed_ms` is what the agent reports itself (from `main` to that \
             line: config, tracefs/BTF offset resolution, verifier, attach).",
            self.plan.attach_runs
        ));
        section.command(self.agent_command(Mode::Capture));
        let mut table = Table::new(&[
            "run",
            "wall to `probes attached` (ms)",
            "agent-reported elapsed_ms",
            "programs attached",
        ]);
        let mut walls = Vec::new();
        // No memcached needed: attaching does not depend on traffic. Any free port will do.
        let port = procs::free_port(17300)?;
        for run in 1..=self.plan.attach_runs {
            let agent = self.start_agent(port, Mode::Capture, DEFAULT_MAX_SOCKETS)?;
            let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let up = observe::total(&samples, "cacheprobe_probe_up");
            walls.push(agent.attach_wall.as_secs_f64() * 1000.0);
            table.row(vec![
                run.to_string(),
                format!("{:.0}", agent.attach_wall.as_secs_f64() * 1000.0),
                agent
                    .attach_reported_ms
                    .map_or("?".into(), |ms| ms.to_string()),
                format!("{up:.0}"),
            ]);
            agent.stop()?;
        }
        let median_ms = median(&walls).unwrap_or(f64::NAN);
        self.targets.attach_median = Some(Duration::from_secs_f64(median_ms / 1000.0));
        section.say(format!("Median wall time: **{median_ms:.0} ms**."));
        section.table("", table);
        self.finish(section);
        Ok(())
    }

    fn overhead_ab(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("overhead A/B: off, sockets only, capture (alternating)");
        let port = memcached.addr.port();
        let saturation = self.spec(memcached.addr, None, self.plan.run);
        let fixed = self.spec(memcached.addr, Some(self.plan.fixed_rate), self.plan.run);
        let memcaslap_config = self.scratch.join("memcaslap.cfg");
        std::fs::write(
            &memcaslap_config,
            format!(
                "key\n25 25 1\nvalue\n{len} {len} 1\ncmd\n0 {set:.2}\n1 {get:.2}\n",
                len = WORKLOAD.value_len,
                set = WORKLOAD.set_percent as f64 / 100.0,
                get = (100 - WORKLOAD.set_percent) as f64 / 100.0
            ),
        )?;
        let memcaslap_args = vec![
            "-s".to_string(),
            memcached.addr.to_string(),
            "-t".to_string(),
            format!("{}s", self.plan.run.as_secs()),
            "-c".to_string(),
            self.plan.saturation_connections.to_string(),
            "-T".to_string(),
            "1".to_string(),
            "-F".to_string(),
            memcaslap_config.display().to_string(),
        ];
        // Warm memcached and the page cache so the first measured mode is not penalised.
        loadgen::run(&self.spec(memcached.addr, None, Duration::from_secs(2)))?;

        struct Run {
            round: usize,
            mode: Mode,
            saturation: Measured,
            fixed: Measured,
            memcaslap_tps: f64,
            lost: BTreeMap<String, u64>,
            memory: Option<procs::Memory>,
            quiet: procs::Quiet,
        }
        let mut runs = Vec::new();
        for round in 0..self.plan.repeats {
            // Rotate the order each round so no mode always runs first or last.
            let modes = Mode::ALL.len();
            let order: Vec<Mode> = (0..modes).map(|i| Mode::ALL[(i + round) % modes]).collect();
            for mode in order {
                eprintln!(
                    "xtask: round {}/{} mode {}",
                    round + 1,
                    self.plan.repeats,
                    mode.label()
                );
                let mut agent = match mode {
                    Mode::Off => None,
                    _ => Some(self.start_agent(port, mode, DEFAULT_MAX_SOCKETS)?),
                };
                let before = match &agent {
                    Some(a) => observe::parse_samples(&observe::scrape(a.metrics_addr)?),
                    None => Vec::new(),
                };
                let quiet = self.wait_for_quiet(agent.as_ref())?;
                let saturation_run = self.measure(&saturation, agent.as_mut(), memcached)?;
                self.wait_for_quiet(agent.as_ref())?;
                let fixed_run = self.measure(&fixed, agent.as_mut(), memcached)?;
                self.wait_for_quiet(agent.as_ref())?;
                let output = procs::run_checked(
                    "memcaslap",
                    Command::new("memcaslap").args(&memcaslap_args),
                    self.plan.run + Duration::from_secs(30),
                )?;
                let memcaslap_tps = parse_memcaslap_tps(&String::from_utf8_lossy(&output.stdout))
                    .context("memcaslap printed no TPS")?;
                let (lost, memory) = match agent.as_mut() {
                    Some(a) => {
                        a.check_running()?;
                        let after = observe::parse_samples(&observe::scrape(a.metrics_addr)?);
                        (
                            observe::lost_between(&before, &after),
                            Some(procs::memory(a.pid())?),
                        )
                    }
                    None => (BTreeMap::new(), None),
                };
                if let Some(agent) = agent {
                    agent.stop()?;
                }
                runs.push(Run {
                    round,
                    mode,
                    saturation: saturation_run,
                    fixed: fixed_run,
                    memcaslap_tps,
                    lost,
                    memory,
                    quiet,
                });
            }
        }

        let mut section = Section::new("Overhead A/B on loopback");
        section.say(format!(
            "memcached and its clients on 127.0.0.1; {} rounds, each running the four modes \
             (order rotated every round). In every mode: the xtask load generator at saturation, \
             the same generator at a fixed {} ops/s, then memcaslap at saturation. Workload: {}. \
             Throughput and p99 are medians over rounds (best of rounds: the highest \
             throughput, least disturbed by other work on the machine); ratios are against `off` from the same \
             invocation. Latency is measured per request from send to complete answer. Agent CPU \
             is utime+stime of the agent process from /proc/<pid>/stat around each run; kernel \
             time spent in the BPF programs is charged to memcached and the clients, not to the \
             agent (see the per-program table). Agent RSS is VmRSS, split in parentheses into \
             private (anonymous) memory, which the agent allocates, and file/shared mappings, \
             which for the agent are mostly the BPF ring buffers it maps (kernel memory whose data \
             area is mapped twice, already counted in the map table) plus its own binary. \
             The last column of the run table is user CPU used by unrelated processes during the \
             run (from /proc/stat minus memcached, the bench and the agent): anything well above \
             0 means the machine was not quiet and that run is noisy. Before each run the bench \
             waits up to {} s for the machine to be quiet (under {QUIET_CORES} cores busy over a \
             second, and no tracing BPF program loaded by anyone but the agent under test, since \
             another agent's syscall tracepoints would tax every mode); the run table shows how \
             long it waited and whether the machine got quiet.",
            self.plan.repeats,
            thousands(self.plan.fixed_rate as f64),
            WORKLOAD.describe(),
            self.plan.quiet_wait.as_secs()
        ));
        section.command(format!(
            "{}\n# modes: off = no agent; sockets only / capture =\n{}\n# load (xtask/src/bench/loadgen.rs): saturation: {}; fixed rate: {}\nmemcaslap {}\n# memcaslap.cfg:\n{}",
            memcached.command_line,
            self.agent_command(Mode::SocketsOnly),
            saturation.describe(),
            fixed.describe(),
            memcaslap_args.join(" "),
            std::fs::read_to_string(&memcaslap_config)?.trim_end()
        ));
        for mode in [Mode::SocketsOnly, Mode::Capture, Mode::CaptureAll] {
            section.command(format!(
                "# {}\n{}",
                self.config_path(mode).display(),
                procs::agent_config(&[port], mode, DEFAULT_MAX_SOCKETS)
            ));
        }

        let mut summary = Table::new(&[
            "mode",
            "saturation ops/s",
            "vs off",
            "best of rounds",
            "vs off",
            "p99 µs",
            "vs off",
            "memcaslap ops/s",
            "vs off",
            &format!("{}k/s p50 µs", self.plan.fixed_rate / 1000),
            &format!("{}k/s p99 µs", self.plan.fixed_rate / 1000),
            "vs off",
            "agent CPU s/Mops (sat)",
            "agent CPU s/Mops (fixed)",
            "events lost",
            "agent RSS MB",
        ]);
        let med = |mode: Mode, f: &dyn Fn(&Run) -> f64| {
            median(
                &runs
                    .iter()
                    .filter(|r| r.mode == mode)
                    .map(f)
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(f64::NAN)
        };
        let sat_ops = |r: &Run| r.saturation.load.ops_per_sec();
        let sat_p99 = |r: &Run| r.saturation.load.latency.quantile(0.99).unwrap_or(0) as f64;
        let fixed_p50 = |r: &Run| r.fixed.load.latency.quantile(0.50).unwrap_or(0) as f64;
        let fixed_p99 = |r: &Run| r.fixed.load.latency.quantile(0.99).unwrap_or(0) as f64;
        let slap = |r: &Run| r.memcaslap_tps;
        let best = |mode: Mode| {
            runs.iter()
                .filter(|r| r.mode == mode)
                .map(sat_ops)
                .fold(f64::NAN, f64::max)
        };
        let base_best = best(Mode::Off);
        let base_ops = med(Mode::Off, &sat_ops);
        let base_p99 = med(Mode::Off, &sat_p99);
        let base_slap = med(Mode::Off, &slap);
        let base_fixed_p99 = med(Mode::Off, &fixed_p99);
        for mode in Mode::ALL {
            let ops = med(mode, &sat_ops);
            let p99 = med(mode, &sat_p99);
            let slap_ops = med(mode, &slap);
            let f99 = med(mode, &fixed_p99);
            let cpu_sat = median(
                &runs
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| r.saturation.cpu_per_million())
                    .collect::<Vec<_>>(),
            );
            let cpu_fixed = median(
                &runs
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| r.fixed.cpu_per_million())
                    .collect::<Vec<_>>(),
            );
            let mut lost: BTreeMap<String, u64> = BTreeMap::new();
            let mut largest: Option<procs::Memory> = None;
            for run in runs.iter().filter(|r| r.mode == mode) {
                for (source, count) in &run.lost {
                    *lost.entry(source.clone()).or_default() += count;
                }
                if let Some(memory) = run.memory {
                    if largest.is_none_or(|l| memory.rss_kb > l.rss_kb) {
                        largest = Some(memory);
                    }
                }
            }
            let round_losses: Vec<f64> = runs
                .iter()
                .filter(|r| r.mode == mode)
                .filter_map(|r| {
                    let off = runs
                        .iter()
                        .find(|o| o.mode == Mode::Off && o.round == r.round)?;
                    Some(1.0 - sat_ops(r) / sat_ops(off))
                })
                .collect();
            let round_range =
                round_losses
                    .iter()
                    .copied()
                    .fold(None, |range: Option<(f64, f64)>, loss| {
                        Some(
                            range.map_or((loss, loss), |(low, high)| {
                                (low.min(loss), high.max(loss))
                            }),
                        )
                    });
            if mode == Mode::Off {
                self.targets.off_ops_per_sec = Some(base_ops);
            }
            if mode != Mode::Off && base_ops > 0.0 {
                let loss = 1.0 - ops / base_ops;
                match mode {
                    Mode::SocketsOnly => {
                        self.targets.sockets_loss = Some(loss);
                        self.targets.sockets_loss_rounds = round_range;
                    }
                    Mode::Capture => {
                        self.targets.capture_loss = Some(loss);
                        self.targets.capture_loss_rounds = round_range;
                        self.targets.capture_agent_us_per_op = cpu_sat;
                    }
                    Mode::CaptureAll => {
                        self.targets.capture_all_loss = Some(loss);
                        self.targets.capture_all_agent_us_per_op = cpu_sat;
                    }
                    // Only in the interleaved rounds, which report them themselves.
                    Mode::Off | Mode::SocketsOnlyPortCheck | Mode::CapturePortCheck => {}
                }
            }
            summary.row(vec![
                mode.label().into(),
                thousands(ops),
                ratio(ops, base_ops),
                thousands(best(mode)),
                ratio(best(mode), base_best),
                format!("{:.1}", p99 / 1000.0),
                ratio(p99, base_p99),
                thousands(slap_ops),
                ratio(slap_ops, base_slap),
                format!("{:.1}", med(mode, &fixed_p50) / 1000.0),
                format!("{:.1}", f99 / 1000.0),
                ratio(f99, base_fixed_p99),
                format_cpu(cpu_sat),
                format_cpu(cpu_fixed),
                if mode == Mode::Off {
                    "-".into()
                } else {
                    observe::format_losses(&lost)
                },
                largest.map_or("-".into(), |m| m.describe()),
            ]);
        }
        section.table(
            "Medians (events lost: summed over all rounds, by source; RSS: largest after a run):",
            summary,
        );

        let mut raw = Table::new(&[
            "round",
            "mode",
            "sat ops/s",
            "sat p50 µs",
            "sat p99 µs",
            "sat errors",
            "fixed achieved ops/s",
            "fixed p99 µs",
            "memcaslap ops/s",
            "agent CPU s (sat)",
            "agent CPU s (fixed)",
            "other processes' CPU, cores (sat / fixed)",
            "waited for quiet s",
        ]);
        for run in &runs {
            raw.row(vec![
                (run.round + 1).to_string(),
                run.mode.label().into(),
                thousands(run.saturation.load.ops_per_sec()),
                micros(run.saturation.load.latency.quantile(0.5)),
                micros(run.saturation.load.latency.quantile(0.99)),
                run.saturation.load.errors.to_string(),
                thousands(run.fixed.load.ops_per_sec()),
                micros(run.fixed.load.latency.quantile(0.99)),
                thousands(run.memcaslap_tps),
                format_cpu(run.saturation.agent_cpu),
                format_cpu(run.fixed.agent_cpu),
                format!(
                    "{:.2} / {:.2}",
                    run.saturation.other_cores, run.fixed.other_cores
                ),
                run.quiet.describe(),
            ]);
        }
        section.table("Every run, in the order run:", raw);
        self.finish(section);
        Ok(())
    }

    /// One saturation run of the agent in `mode` with bpf_stats on.
    fn bpf_stats_run(&mut self, memcached: &Memcached, mode: Mode) -> anyhow::Result<BpfRun> {
        let mut agent = self.start_agent(memcached.addr.port(), mode, DEFAULT_MAX_SOCKETS)?;
        let (programs, maps) = procs::bpf_object_ids(agent.pid())?;
        if programs.is_empty() {
            bail!("the agent holds no BPF program fds");
        }
        let spec = self.spec(memcached.addr, None, self.plan.run);
        let exported_run_seconds;
        let (measured, before, after) = {
            // Stats cost two clock reads per program run, so they are on for this run only
            // (never during the A/B runs), and put back when this block ends, error or not.
            self.wait_for_quiet(Some(&agent))?;
            let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
            let before = observe::program_stats(&programs)?;
            let exported_before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let measured = self.measure(&spec, Some(&mut agent), memcached)?;
            let after = observe::program_stats(&programs)?;
            // The agent folds program stats into its metrics once a second.
            procs::sleep(Duration::from_millis(1500))?;
            let exported_after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            exported_run_seconds = observe::total(&exported_after, EXPORTED_RUN_SECONDS)
                - observe::total(&exported_before, EXPORTED_RUN_SECONDS);
            (measured, before, after)
        };
        let maps = observe::maps(&maps)?;
        agent.stop()?;
        let mut programs: Vec<(String, u64, u64)> = after
            .iter()
            .map(|(id, stats)| {
                let (ns0, cnt0) = before
                    .get(id)
                    .map_or((0, 0), |b| (b.run_time_ns, b.run_cnt));
                (
                    stats.name.clone(),
                    stats.run_time_ns.saturating_sub(ns0),
                    stats.run_cnt.saturating_sub(cnt0),
                )
            })
            .collect();
        programs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(BpfRun {
            spec: spec.describe(),
            programs,
            measured,
            exported_run_seconds,
            maps,
        })
    }

    fn bpf_program_cost(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("BPF program cost (kernel.bpf_stats_enabled=1, sockets only, saturation)");
        let sockets = self.bpf_stats_run(memcached, Mode::SocketsOnly)?;
        self.targets.sockets_bpf_ns_per_op = Some(sockets.ns_per_op());
        util::step("BPF program cost (kernel.bpf_stats_enabled=1, capture on, saturation)");
        let capture = self.bpf_stats_run(memcached, Mode::Capture)?;
        if let Some((name, ns, cnt)) = capture.programs.first() {
            let total_ns = capture.total_ns();
            self.targets.bpf = Some(BpfSplit {
                ns_per_op: capture.ns_per_op(),
                top: (
                    name.clone(),
                    *ns as f64 / total_ns.max(1) as f64,
                    *ns as f64 / (*cnt).max(1) as f64,
                ),
            });
        }
        let (ops, total_ns, measured, exported_run_seconds) = (
            capture.ops(),
            capture.total_ns(),
            &capture.measured,
            capture.exported_run_seconds,
        );
        let spec = &capture.spec;
        let mut section = Section::new("BPF program cost per program");
        section.say(format!(
            "Two extra saturation runs ({spec}), one with socket probes only and one with capture \
             on, with `sysctl kernel.bpf_stats_enabled=1` (restored afterwards); run_time_ns and \
             run_cnt from `bpftool --json prog show` before and after, for the programs whose fds \
             the agent holds (/proc/<pid>/fdinfo); the stats themselves add a little time per \
             run. Sockets only: {} ops/s, **{:.0} ns of BPF per memcache op**. Capture on: {} \
             ops/s ({} ops), **{:.0} ns of BPF per memcache op**, i.e. {:.3} CPU s per million \
             ops in the kernel, on top of the agent process's own {} s per million ops.",
            thousands(sockets.measured.load.ops_per_sec()),
            sockets.ns_per_op(),
            thousands(measured.load.ops_per_sec()),
            thousands(ops),
            total_ns as f64 / ops.max(1.0),
            total_ns as f64 / 1e9 / (ops / 1e6).max(1e-9),
            format_cpu(measured.cpu_per_million()),
        ));
        section.say(format!(
            "Cross-check: the agent's own `{EXPORTED_RUN_SECONDS}` grew by {:.3} s over the \
             capture run (plus the 1.5 s after it); bpftool says {:.3} s.",
            exported_run_seconds,
            total_ns as f64 / 1e9
        ));
        section.command("sysctl -w kernel.bpf_stats_enabled=1\nbpftool --json prog show   # before and after the run\nsysctl -w kernel.bpf_stats_enabled=<previous>");
        section.table("Sockets only:", sockets.table());
        section.table("Capture on:", capture.table());
        let mut map_table = Table::new(&["map", "type", "max_entries", "kernel memory MB"]);
        let mut map_total = 0;
        for map in &capture.maps {
            map_total += map.bytes_memlock;
            map_table.row(vec![
                map.name.clone(),
                map.kind.clone(),
                map.max_entries.to_string(),
                format!("{:.1}", map.bytes_memlock as f64 / 1048576.0),
            ]);
        }
        map_table.row(vec![
            "total".into(),
            String::new(),
            String::new(),
            format!("{:.1}", map_total as f64 / 1048576.0),
        ]);
        section.table(
            "Kernel memory held by the agent's maps (`bytes_memlock` from `bpftool --json map show`; not part of the agent's RSS), default limits:",
            map_table,
        );
        self.finish(section);
        Ok(())
    }

    fn event_loss(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("event loss: stepping the op rate up with capture on");
        let mut agent =
            self.start_agent(memcached.addr.port(), Mode::Capture, DEFAULT_MAX_SOCKETS)?;
        let mut table = Table::new(&[
            "target ops/s",
            "achieved ops/s",
            "p99 µs",
            "events lost in step (by source)",
            "agent CPU %",
            "agent RSS MB",
            "agent peak RSS MB",
        ]);
        let mut best_clean: Option<f64> = None;
        let mut rows_text = Vec::new();
        for rate in self.plan.loss_rates {
            let spec = self.spec(memcached.addr, *rate, self.plan.loss_run);
            let before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let measured = self.measure(&spec, Some(&mut agent), memcached)?;
            // The agent reads the kernel's loss counters once a second.
            procs::sleep(Duration::from_millis(1500))?;
            let after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let lost = observe::lost_between(&before, &after);
            let memory = procs::memory(agent.pid())?;
            let achieved = measured.load.ops_per_sec();
            let lost_total: u64 = lost.values().sum();
            if lost_total == 0 {
                best_clean = Some(best_clean.map_or(achieved, |b: f64| b.max(achieved)));
            }
            if *rate == Some(100_000) {
                self.targets.loss_at_100k = Some((achieved, lost_total));
            }
            let cpu_percent = measured
                .agent_cpu
                .map(|cpu| 100.0 * cpu / measured.load.elapsed.as_secs_f64());
            rows_text.push((
                rate.map_or("saturation".into(), |r| thousands(r as f64)),
                lost_total,
            ));
            table.row(vec![
                rate.map_or("saturation".into(), |r| thousands(r as f64)),
                thousands(achieved),
                micros(measured.load.latency.quantile(0.99)),
                observe::format_losses(&lost),
                cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                memory.describe(),
                megabytes(memory.hwm_kb),
            ]);
        }
        agent.stop()?;
        let mut section = Section::new("Event loss as the op rate rises");
        section.say(format!(
            "One agent with capture on (config as in the A/B); the xtask generator steps through \
             the target rates, {:.0} s each, {} connections open loop (saturation: {} connections \
             closed loop). Losses are the growth of `cacheprobe_events_lost_total{{source}}` over \
             the step (scraped 1.5 s after it, since the agent folds kernel counters in once a \
             second). Highest achieved rate with zero lost events: **{}**.",
            self.plan.loss_run.as_secs_f64(),
            self.plan.open_loop_connections,
            self.plan.saturation_connections,
            best_clean.map_or(
                "none (events were lost at every step)".to_string(),
                |r| format!("{} ops/s", thousands(r))
            )
        ));
        section.command(format!(
            "{}\n{}",
            memcached.command_line,
            self.agent_command(Mode::Capture)
        ));
        section.table("", table);
        self.finish(section);
        Ok(())
    }

    fn idle_connections(&mut self) -> anyhow::Result<()> {
        util::step("agent cost with many open watched connections");
        let largest = self.plan.idle_counts.iter().copied().max().unwrap_or(0);
        // Each memcached and each holder process stays within this process's fd limit.
        let per_process = (self.nofile as usize)
            .saturating_sub(2_000)
            .clamp(1_000, 25_000);
        let mut instances: Vec<Memcached> = Vec::new();
        let mut port = 17400;
        for _ in 0..largest.div_ceil(per_process).max(1) {
            port = procs::free_port(port + 1)?;
            instances.push(Memcached::start(port, Some(per_process as u32 + 1_000))?);
        }
        let load_target = instances[0].addr;
        loadgen::populate(load_target, &WORKLOAD)?;
        let mut table = Table::new(&[
            "open connections",
            "memcached instances",
            "time to open s",
            "memcached curr_connections",
            "agent connections_active",
            "agent RSS MB (idle)",
            "agent catch-up s",
            "agent CPU % (catching up)",
            "agent CPU % (idle)",
            "achieved ops/s",
            "agent CPU s/Mops",
            "agent RSS MB (after load)",
            "agent peak RSS MB",
            "events lost",
            "max_sockets",
        ]);
        for &count in self.plan.idle_counts {
            let used = count.div_ceil(per_process).max(1);
            let per_instance = count.div_ceil(used);
            let ports: Vec<u16> = instances[..used].iter().map(|m| m.addr.port()).collect();
            let targets: Vec<std::net::SocketAddrV4> = ports
                .iter()
                .map(|port| std::net::SocketAddrV4::new([127, 0, 0, 1].into(), *port))
                .collect();
            eprintln!("xtask: {count} idle connections over {used} memcached instance(s)");
            // Both ends of every connection are watched sockets, plus room for the load's own.
            let max_sockets = ((2 * count + 16_384) as u32)
                .next_power_of_two()
                .max(DEFAULT_MAX_SOCKETS);
            let mut agent = self.start_agent_on(&ports, Mode::Capture, max_sockets)?;
            let before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let opening = Instant::now();
            let holders = idle::Holders::open(&targets, per_instance, Duration::from_secs(300))?;
            let open_seconds = opening.elapsed().as_secs_f64();
            // Let the agent drain the burst of state changes. Its samples then list every new
            // socket and walk the fds of every process that changed, at most
            // MAX_FDS_WALKED_PER_SAMPLE descriptors per sample: CPU while catching up is
            // measured until a sample begun after the burst postponed nothing, idle CPU after.
            procs::sleep(Duration::from_secs(2))?;
            let sampler_state = |agent: &Agent| -> anyhow::Result<(f64, f64)> {
                let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
                Ok((
                    observe::total(&samples, "cacheprobe_sampler_samples_total"),
                    observe::total(&samples, "cacheprobe_sampler_processes_deferred"),
                ))
            };
            let catch_up_start = Instant::now();
            let cpu_start = procs::cpu_seconds(agent.pid())?;
            let (samples_at_start, _) = sampler_state(&agent)?;
            let caught_up = loop {
                let (samples, deferred) = sampler_state(&agent)?;
                if samples >= samples_at_start + 2.0 && deferred == 0.0 {
                    break true;
                }
                if catch_up_start.elapsed() > CATCH_UP_LIMIT {
                    break false;
                }
                procs::sleep(Duration::from_millis(500))?;
            };
            let catch_up_seconds = catch_up_start.elapsed().as_secs_f64();
            let settling_percent =
                100.0 * (procs::cpu_seconds(agent.pid())? - cpu_start) / catch_up_seconds;
            let cpu_idle_start = procs::cpu_seconds(agent.pid())?;
            procs::sleep(IDLE_WINDOW)?;
            let idle_percent = 100.0 * (procs::cpu_seconds(agent.pid())? - cpu_idle_start)
                / IDLE_WINDOW.as_secs_f64();
            let idle_memory = procs::memory(agent.pid())?;
            let mut server_connections = 0;
            for memcached in &instances[..used] {
                server_connections += memcached.stat("curr_connections")?;
            }
            let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let active = observe::total(&samples, "cacheprobe_connections_active");
            let spec = self.spec(load_target, Some(self.plan.fixed_rate), self.plan.run);
            let measured = self.measure(&spec, Some(&mut agent), &instances[0])?;
            procs::sleep(Duration::from_millis(1500))?;
            let after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let memory = procs::memory(agent.pid())?;
            if count == 100_000 {
                self.targets.rss_at_100k = Some(memory);
            }
            let lost = observe::format_losses(&observe::lost_between(&before, &after));
            self.targets.idle = Some(IdleFinding {
                connections: per_instance * used,
                settling_cpu_percent: settling_percent,
                catch_up_seconds,
                idle_cpu_percent: idle_percent,
                memory,
                active,
                lost: lost.clone(),
            });
            agent.stop()?;
            drop(holders);
            table.row(vec![
                thousands((per_instance * used) as f64),
                used.to_string(),
                format!("{open_seconds:.1}"),
                thousands(server_connections as f64),
                thousands(active),
                idle_memory.describe(),
                if caught_up {
                    format!("{catch_up_seconds:.0}")
                } else {
                    format!("not within {} s", CATCH_UP_LIMIT.as_secs())
                },
                format!("{settling_percent:.1}"),
                format!("{idle_percent:.1}"),
                thousands(measured.load.ops_per_sec()),
                format_cpu(measured.cpu_per_million()),
                memory.describe(),
                megabytes(memory.hwm_kb),
                lost,
                max_sockets.to_string(),
            ]);
            // Give the memcached instances a moment to close their ends.
            procs::sleep(Duration::from_secs(1))?;
        }
        let mut section = Section::new("Agent cost with many open watched connections");
        section.say(format!(
            "For each count a fresh agent (capture on, one service per memcached instance, \
             `limits.max_sockets` sized for both ends of every connection) watches memcached \
             instances started with `-c`; RLIMIT_NOFILE here is {} and cannot be raised without \
             CAP_SYS_RESOURCE, so at most {} connections go to each instance, each held by its own \
             helper process (`xtask bench-hold`, connecting from 127.0.0.2 onwards). After opening, \
             the bench waits 2 s, then measures the agent's CPU while it catches up: its /proc \
             samples (every 5 s) list the new sockets and walk the fds of the processes that \
             changed, at most 50,000 descriptors per sample, until a sample begun after the \
             burst postpones nothing (`cacheprobe_sampler_processes_deferred` 0; `catch-up s` is \
             how long that took). Then it measures the agent idle over {window} s, two sampling \
             intervals, so a periodic sample is averaged in rather than caught or missed. Then it \
             drives {} ops/s ({}) over {} more connections to the first instance for {:.0} s. CPU \
             s/Mops is the agent's \
             utime+stime over that load divided by the operations. `connections_active` counts \
             both ends of each connection (the memcached side and the client side are both on \
             this host).",
            self.nofile,
            thousands(per_process as f64),
            thousands(self.plan.fixed_rate as f64),
            WORKLOAD.describe(),
            self.plan.open_loop_connections,
            self.plan.run.as_secs_f64(),
            window = IDLE_WINDOW.as_secs(),
        ));
        let mut commands = String::new();
        for memcached in &instances {
            commands.push_str(&memcached.command_line);
            commands.push('\n');
        }
        commands.push_str(&format!(
            "{}   # one [[services]] per instance, max_sockets per row",
            self.agent_command(Mode::Capture)
        ));
        section.command(commands);
        section.table("", table);
        if let Some(first) = instances.first() {
            self.memcached_lines.push(first.command_line.clone());
        }
        drop(instances);
        self.finish(section);
        Ok(())
    }

    fn tshark_capture(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("tshark decoding a capture of the same traffic");
        let port = memcached.addr.port();
        let pcap = self.scratch.join("memcache.pcapng");
        let _ = std::fs::remove_file(&pcap);
        let filter = format!("tcp port {port}");
        let mut dumpcap_command = Command::new("dumpcap");
        dumpcap_command
            .args(["-i", "lo", "-q", "-f", &filter, "-w"])
            .arg(&pcap)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut dumpcap = procs::ChildGuard::spawn("dumpcap", &mut dumpcap_command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // dumpcap writes the pcapng header once it is capturing.
        while std::fs::metadata(&pcap).map_or(true, |m| m.len() == 0) {
            dumpcap.check_running()?;
            if Instant::now() >= deadline {
                bail!("dumpcap did not start capturing within 10 s");
            }
            procs::sleep(Duration::from_millis(50))?;
        }
        procs::sleep(Duration::from_millis(500))?;
        let spec = LoadSpec {
            connections: 16,
            ..self.spec(
                memcached.addr,
                Some(self.plan.capture_rate),
                self.plan.capture_run,
            )
        };
        let load = loadgen::run(&spec)?;
        procs::sleep(Duration::from_millis(500))?;
        dumpcap.stop()?;
        let decode_as = format!("tcp.port=={port},memcache");
        let tshark_args = |limit: Option<&str>| {
            let mut args = vec!["-r".to_string(), pcap.display().to_string()];
            if let Some(limit) = limit {
                args.extend(["-c".to_string(), limit.to_string()]);
            }
            args.extend(
                [
                    "-d",
                    &decode_as,
                    "-Y",
                    "memcache.command",
                    "-T",
                    "fields",
                    "-e",
                    "memcache.command",
                    "-E",
                    "occurrence=a",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            args
        };
        let startup_started = Instant::now();
        procs::run_checked(
            "tshark",
            Command::new("tshark").args(tshark_args(Some("1"))),
            Duration::from_secs(120),
        )?;
        let startup = startup_started.elapsed().as_secs_f64();
        let decode_started = Instant::now();
        let output = procs::run_checked(
            "tshark",
            Command::new("tshark").args(tshark_args(None)),
            Duration::from_secs(600),
        )?;
        let wall = decode_started.elapsed().as_secs_f64();
        let commands: u64 = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.split(',').filter(|c| !c.trim().is_empty()).count() as u64)
            .sum();
        if commands == 0 {
            bail!("tshark decoded no memcache command from {}", pcap.display());
        }
        let size = std::fs::metadata(&pcap).map_or(0, |m| m.len());
        let per_second = commands as f64 / wall;
        let per_second_net = commands as f64 / (wall - startup).max(1e-3);
        let mut section = Section::new("tshark decoding the same traffic");
        section.say(format!(
            "dumpcap captures loopback traffic to memcached while the xtask generator runs at {} \
             ops/s for {:.0} s over 16 connections (agent not running); the generator completed {} \
             requests, the capture holds {:.1} MB. tshark then decodes it once, single-threaded; \
             its startup (dissector registration, timed by decoding just the first packet) is \
             shown separately.",
            thousands(self.plan.capture_rate as f64),
            self.plan.capture_run.as_secs_f64(),
            thousands(load.ops as f64),
            size as f64 / 1048576.0
        ));
        section.command(format!(
            "dumpcap -i lo -q -f '{filter}' -w {}\ntime tshark {}",
            pcap.display(),
            tshark_args(None).join(" ")
        ));
        let mut table = Table::new(&[
            "commands decoded",
            "wall s",
            "startup s",
            "commands/s (wall)",
            "commands/s (without startup)",
        ]);
        table.row(vec![
            thousands(commands as f64),
            format!("{wall:.2}"),
            format!("{startup:.2}"),
            thousands(per_second),
            thousands(per_second_net),
        ]);
        section.table("", table);
        self.tshark_rate = Some(per_second_net);
        self.finish(section);
        Ok(())
    }
}

impl Bench {
    /// Before a measured run: wait (bounded) for other work and other tracers to go away.
    fn wait_for_quiet(&self, agent: Option<&Agent>) -> anyhow::Result<procs::Quiet> {
        let own = match agent {
            Some(agent) => procs::bpf_object_ids(agent.pid())?.0,
            None => Vec::new(),
        };
        if self.plan.quiet_wait.is_zero() {
            // Quick runs do not wait, but still say whether someone else was tracing.
            let foreign = observe::foreign_tracing_programs(&own)?;
            return Ok(procs::Quiet {
                waited: Duration::ZERO,
                busy_cores: 0.0,
                foreign_programs: foreign,
                quiet: foreign == 0,
            });
        }
        procs::wait_for_quiet(QUIET_CORES, &own, self.plan.quiet_wait)
    }

    fn finish(&mut self, section: Section) {
        println!("\n{}", section.markdown());
        self.sections.push(section);
    }

    fn decoder_throughput(&mut self) -> anyhow::Result<()> {
        util::step("decoder throughput (criterion)");
        let mut section = Section::new("Decoder throughput");
        let bench_file = util::workspace_root().join("agent/benches/decoder.rs");
        let has_criterion =
            std::fs::read_to_string(&bench_file).is_ok_and(|text| text.contains("criterion_main"));
        let command = "cargo bench -p cacheprobe --bench decoder";
        let tshark = self.tshark_rate;
        let mut table = Table::new(&["benchmark", "commands/s (one core)", "vs tshark"]);
        if !has_criterion {
            section.say(format!(
                "**Not measured (hook):** {} has no criterion benchmark yet. Once it does, this \
                 step runs `{command}` and reports its throughput against tshark.",
                bench_file.display()
            ));
        } else if !self.plan.criterion {
            section.say(format!(
                "Skipped by `--quick` (building the benches takes minutes); the full bench runs `{command}`."
            ));
        } else {
            let stdout = run_criterion("decoder")?;
            let results = parse_criterion(&stdout);
            if results.is_empty() {
                bail!("`{command}` printed no throughput (thrpt:) line:\n{stdout}");
            }
            for (name, per_second) in &results {
                table.row(vec![
                    name.clone(),
                    thousands(*per_second),
                    tshark.map_or("n/a".into(), |t| format!("{:.1}×", per_second / t)),
                ]);
            }
            // The 5M goal is about the mixed workload; replies of many items are reported apart.
            self.targets.decoder_per_core = results
                .iter()
                .filter(|(name, _)| !name.contains("many_items"))
                .map(|(_, v)| *v)
                .reduce(f64::min);
            // Gets of 100 keys with 100 B values: items/s is 100 times the gets/s.
            self.targets.decoder_many_items = results
                .iter()
                .find(|(name, _)| name.contains("many_items/text_100keys_100B"))
                .map(|(_, v)| *v * 100.0);
            section.say(
                "Criterion's median throughput of the user-space decoder (agent/benches/decoder.rs, \
                 single thread, so per core), and its ratio to tshark's commands/s (without \
                 startup) on the capture above.",
            );
            section.command(command);
        }
        if let Some(rate) = tshark {
            table.row(vec![
                "tshark (capture above, without startup)".into(),
                thousands(rate),
                "1.0×".into(),
            ]);
        }
        section.table("", table);
        self.finish(section);
        Ok(())
    }

    /// Issue 7: /metrics stays fast with many series (agent/benches/scrape.rs).
    fn scrape_cost(&mut self) -> anyhow::Result<()> {
        util::step("scrape cost with many series (criterion)");
        let mut section = Section::new("/metrics with many series");
        let command = "cargo bench -p cacheprobe --bench scrape";
        if !self.plan.criterion {
            section.say(format!(
                "Skipped by `--quick` (building the benches takes minutes); the full bench runs `{command}`."
            ));
            self.finish(section);
            return Ok(());
        }
        let stdout = run_criterion("scrape")?;
        let rates = parse_criterion(&stdout);
        let sizes = parse_scrape_sizes(&stdout);
        if rates.is_empty() || sizes.is_empty() {
            bail!("`{command}` printed no throughput or size lines:\n{stdout}");
        }
        let mut table = Table::new(&[
            "registry",
            "format",
            "samples",
            "body MB",
            "encode ms per scrape",
            "samples/s",
        ]);
        for size in &sizes {
            let Some((_, per_second)) = rates
                .iter()
                .find(|(name, _)| name.contains(&size.fleet) && name.ends_with(&size.format))
            else {
                continue;
            };
            table.row(vec![
                size.fleet.clone(),
                size.format.clone(),
                thousands(size.samples as f64),
                format!("{:.1}", size.bytes as f64 / 1e6),
                format!("{:.2}", size.samples as f64 / per_second * 1e3),
                thousands(*per_second),
            ]);
        }
        section.say(
            "Time to encode the whole registry for one scrape (criterion median, one thread), \
             for a typical cache host and for the most series the default `[limits]` allow \
             (4 services x 256 servers, both roles, 100 comms; every endpoint with connection \
             histograms, requests by command and status, latency histograms by command, bytes \
             and retransmits). Prometheus text is the default; OpenMetrics is served when the \
             scraper asks for it. The HTTP server encodes on a blocking thread, so a slow scrape \
             never stalls the ring buffers (unit test `a_slow_scrape_does_not_stall_the_event_loop`), \
             and at most two bodies exist at once however many scrapers connect.",
        );
        section.command(command);
        section.table("", table);
        self.finish(section);
        Ok(())
    }

    /// Issue 18: `diagnose --prometheus` over 500 hosts' worth of backfilled series answers
    /// within 10 s (tests/tests/fleet.rs, ignored in the normal test run).
    fn fleet_diagnose(&mut self) -> anyhow::Result<()> {
        const FLEET_ROUNDS: usize = 5;
        util::step("fleet diagnose over 500 hosts (real Prometheus, backfilled)");
        let mut section = Section::new("Fleet diagnose over 500 hosts");
        let command =
            "cargo test -p cacheprobe-tests --test fleet -- --ignored fleet_500_hosts --nocapture";
        if self.quick {
            section.say(format!(
                "Skipped by `--quick` (the backfill takes minutes); the full bench runs `{command}`."
            ));
            self.finish(section);
            return Ok(());
        }
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(util::workspace_root())
            .args(command.split_whitespace().skip(1))
            .env("CACHEPROBE_BIN", &self.binary)
            .env("CACHEPROBE_FLEET_BENCH_ROUNDS", FLEET_ROUNDS.to_string())
            .env("PATH", util::path_with_cargo_bin());
        let output = procs::run_checked("fleet bench", &mut cargo, Duration::from_secs(1800))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let seconds = stderr
            .lines()
            .find_map(|l| {
                l.split_once("diagnose answered in ")?
                    .1
                    .strip_suffix(" s")?
                    .parse::<f64>()
                    .ok()
            })
            .with_context(|| format!("`{command}` printed no timing:\n{stderr}"))?;
        let backfill = stderr
            .lines()
            .find_map(|l| {
                l.split_once(" took ")
                    .filter(|_| l.starts_with("backfill"))
                    .map(|(_, t)| t.to_string())
            })
            .unwrap_or_else(|| "?".into());
        // "round 2: 3.10 s wall, prometheus used 4.27 s of CPU at load average 15.0": the CPU
        // is the load-independent part.
        let cpu: Vec<&str> = stderr
            .lines()
            .filter_map(|l| {
                l.split_once(", prometheus used ")?
                    .1
                    .split_once(" s of CPU")
            })
            .map(|(seconds, _)| seconds)
            .collect();
        let spread = stderr
            .lines()
            .filter_map(|l| l.split_once("FLEET-BENCH 500 hosts: ").map(|(_, t)| t))
            .find(|t| t.contains(" rounds, min "))
            .unwrap_or("? rounds");
        let cpu = format!("{} s of CPU per round", cpu.join(", "));
        section.say(format!(
            "500 hosts, each a client of a pool of 10 memcached servers (25 pools): about 100k \
             series over 35 minutes at 60 s, written as OpenMetrics and backfilled with \
             `promtool tsdb create-blocks-from openmetrics` ({backfill}), served by `prometheus` \
             on loopback. `cacheprobe diagnose --prometheus URL --since 30m --json` answered in \
             a median **{seconds:.2} s** (goal: 10 s; {spread}); Prometheus used {cpu}. Command: \
             `CACHEPROBE_FLEET_BENCH_ROUNDS={FLEET_ROUNDS} {command}`."
        ));
        self.finish(section);
        Ok(())
    }

    fn method_section(&self) -> Section {
        let mut section = Section::new("How these numbers are taken");
        section.say(
            "* Everything runs on loopback on this machine: memcached, the load generators, the \
             agent and (for the capture) tshark share the same cores; nothing is pinned. On a \
             2-core machine the single-threaded load generator and memcached's two worker threads \
             compete for CPU, so an agent that takes CPU away from either shows up directly as lost \
             throughput: this is a pessimistic setup for the agent.\n\
             * Load: `xtask/src/bench/loadgen.rs`, one thread with epoll, one request in flight per \
             connection, text protocol, latency per request with 1.6% bucket precision. memcaslap \
             (libmemcached-tools) is run as well at saturation; its `--tps` option is ignored by \
             the Debian build and it reports latency only in power-of-two buckets, so fixed-rate \
             runs and percentiles come from the xtask generator.\n\
             * Modes: `off` (no agent), `sockets only` (service `capture = false`, \
             `limits.capture_bytes = 0`: the send/receive probes copy no payload) and `capture + \
             decoding` (`capture = true`, `capture_bytes = 16384`, the default decoding budget of \
             `limits.capture_records_per_second = 25000`: above it the agent decodes one \
             connection in 2, 4, ... and scales its counts; `cacheprobe_capture_sample_ratio` \
             says which), and `decoding, no budget` (the same with `capture_records_per_second = 0`: \
             every connection decoded). Everything else is the agent as built at this commit.\n\
             * The machine may be shared with other work; the load average before and after is in \
             the facts table. Alternating modes within one invocation keeps such drift out of the \
             ratios as far as possible.",
        );
        let mut commands = String::from("# memcached instances used\n");
        for line in &self.memcached_lines {
            commands.push_str(line);
            commands.push('\n');
        }
        section.command(commands);
        section
    }

    fn targets_section(&self) -> Section {
        let targets = &self.targets;
        let mut table = Table::new(&["target", "goal", "measured", "status"]);
        let status = |met: Option<bool>| match met {
            Some(true) => "met".to_string(),
            Some(false) => "**missed**".to_string(),
            None => "not measured".to_string(),
        };
        let percent = |loss: Option<f64>, rounds: Option<(f64, f64)>| {
            let Some(loss) = loss else {
                return "n/a".to_string();
            };
            match rounds {
                Some((low, high)) if low < high => format!(
                    "{:.1}% loss (single rounds: {:.1}% to {:.1}%)",
                    100.0 * loss,
                    100.0 * low,
                    100.0 * high
                ),
                _ => format!("{:.1}% loss", 100.0 * loss),
            }
        };
        if targets.paired.is_empty() {
            // Without the interleaved rounds only the four-mode table's medians are at hand.
            table.row(vec![
                "throughput, sockets only, saturation (four-mode medians)".into(),
                "<= 1% loss".into(),
                percent(targets.sockets_loss, targets.sockets_loss_rounds),
                status(targets.sockets_loss.map(|l| l <= 0.01)),
            ]);
            table.row(vec![
                "throughput, capture + decoding, saturation (four-mode medians)".into(),
                "<= 3% loss".into(),
                percent(targets.capture_loss, targets.capture_loss_rounds),
                status(targets.capture_loss.map(|l| l <= 0.03)),
            ]);
        } else {
            rounds::goal_rows(&targets.paired, &mut table);
        }
        table.row(vec![
            "lost events at 100k ops/s (capture on)".into(),
            "0".into(),
            targets
                .loss_at_100k
                .map_or("n/a".into(), |(achieved, lost)| {
                    format!(
                        "{} lost at {} ops/s achieved",
                        thousands(lost as f64),
                        thousands(achieved)
                    )
                }),
            match targets.loss_at_100k {
                Some((achieved, 0)) if achieved < 95_000.0 => format!(
                    "unproven: no loss, but this machine drove only {} ops/s",
                    thousands(achieved)
                ),
                other => status(other.map(|(_, lost)| lost == 0)),
            },
        ]);
        table.row(vec![
            "agent RSS with 100k open connections".into(),
            "<= 50 MB".into(),
            targets.rss_at_100k.map_or("n/a".into(), |m| {
                format!(
                    "{} MB VmRSS (private/anon {} MB)",
                    megabytes(m.rss_kb),
                    megabytes(m.anon_kb)
                )
            }),
            status(targets.rss_at_100k.map(|m| m.rss_kb <= 50 * 1024)),
        ]);
        table.row(vec![
            "start to probes attached (median of 5)".into(),
            "<= 1 s".into(),
            targets.attach_median.map_or("n/a".into(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1000.0)
            }),
            status(targets.attach_median.map(|d| d <= Duration::from_secs(1))),
        ]);
        table.row(vec![
            "decoder throughput".into(),
            ">= 5M commands/s/core".into(),
            targets
                .decoder_per_core
                .map_or("n/a".into(), |v| format!("{} commands/s", thousands(v))),
            status(targets.decoder_per_core.map(|v| v >= 5e6)),
        ]);
        for (keys, ratio, empty) in &targets.frame_flatness {
            table.row(vec![
                format!("BPF ns per get, {keys} keys per get: 500 KB values over 100 B (issue 17)"),
                "flat (<= 1.5x)".into(),
                format!("{ratio:.2}x"),
                status(Some(*ratio <= 1.5)),
            ]);
            // The same growth for a program that does nothing: what more calls per get and
            // caches the kernel's copy of the values left cold add to any program.
            let relative = ratio / empty.max(1e-9);
            table.row(vec![
                format!(
                    "the same, over an empty program's growth on the same tracepoints ({empty:.2}x)"
                ),
                "<= 1.5x".into(),
                format!("{relative:.2}x"),
                status(Some(relative <= 1.5)),
            ]);
        }
        if let Some(items) = targets.decoder_many_items {
            table.row(vec![
                "decoder on replies of 100 items (issue 17)".into(),
                "recorded".into(),
                format!("{} items/s", thousands(items)),
                "recorded".into(),
            ]);
        }
        let mut section = Section::new("Targets");
        if self.quick {
            section.say(
                "`--quick` is a smoke run (2 rounds of 2 s runs, 1 repeat of the four modes, 1k \
                 connections only): every number here is **indicative**, not a result, and no \
                 status below says more than that.",
            );
        }
        section.table("", table);
        for finding in self.findings() {
            section.say(finding);
        }
        section
    }

    /// Where the cost comes from, stated from this run's own numbers.
    fn findings(&self) -> Vec<String> {
        let targets = &self.targets;
        let mut out = Vec::new();
        if let (Some(bpf_ns), Some(off_ops)) =
            (targets.sockets_bpf_ns_per_op, targets.off_ops_per_sec)
        {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let cpu_ns_per_op = cores as f64 * 1e9 / off_ops.max(1.0);
            let spread = targets
                .sockets_loss_rounds
                .map_or(String::new(), |(low, high)| {
                    format!(
                        " Single rounds of the A/B scatter from {:.1}% to {:.1}%: that spread is \
                         the machine's, since every round compares runs seconds apart.",
                        100.0 * low,
                        100.0 * high
                    )
                });
            out.push(format!(
                "* Socket probes only (bpf_stats run): {bpf_ns:.0} ns of BPF per memcache op. With \
                 the agent off, memcached and the load generator keep the {cores} cores busy at {} \
                 ops/s, {:.1} µs of CPU per op, so the programs take {:.1}% of it. That is the \
                 floor of the sockets-only throughput loss; the tracepoint dispatch around each \
                 run, which bpf_stats does not count, comes on top.{spread}",
                thousands(off_ops),
                cpu_ns_per_op / 1000.0,
                100.0 * bpf_ns / cpu_ns_per_op
            ));
        }
        if let Some(bpf) = &targets.bpf {
            out.push(format!(
                "* Kernel side (bpf_stats run, capture on): the programs cost {:.0} ns of BPF per \
                 memcache op, payload copies included (they happen inside the send/receive \
                 programs, for the connections the decoding budget follows); the costliest \
                 program is `{}` ({:.0}% of BPF time, {:.0} ns per run). These numbers exclude the \
                 tracepoint machinery around each run, which the A/B ratios include.",
                bpf.ns_per_op,
                bpf.top.0,
                100.0 * bpf.top.1,
                bpf.top.2
            ));
        }
        if let Some(us) = targets.capture_agent_us_per_op {
            let decoder = targets
                .decoder_per_core
                .map_or(String::new(), |per_second| {
                    format!(
                    "; the criterion decoder alone needs {:.2} µs per command, so the rest is the \
                     pipeline around it (ring reading, tracking, metrics, history, key statistics)",
                    1e6 / per_second
                )
                });
            out.push(format!(
                "* User side: with capture (default decoding budget) the agent process spends \
                 {us:.2} µs of CPU per memcache op (median at saturation), i.e. {:.0}% of one core \
                 per 100k ops/s{decoder}.",
                us * 10.0
            ));
        }
        if let (Some(loss), Some(us)) = (
            targets.capture_all_loss,
            targets.capture_all_agent_us_per_op,
        ) {
            out.push(format!(
                "* Without a decoding budget (`capture_records_per_second = 0`, every connection \
                 decoded) throughput loss at saturation is {:.1}% and the agent spends {us:.2} µs \
                 of CPU per op: the budget is what keeps capture's cost near that of socket probes \
                 alone.",
                100.0 * loss
            ));
        }
        if let Some(idle) = &targets.idle {
            out.push(format!(
                "* At {} open connections the idle agent uses {:.1}% of a core ({:.1}% over the \
                 {:.0} s its samples took to catch up after they opened); its RSS is {} MB of \
                 which {} MB private (the rest is mostly the mapped ring buffers); it counts {} of {} \
                 watched sockets and lost events while they opened: {}.",
                thousands(idle.connections as f64),
                idle.idle_cpu_percent,
                idle.settling_cpu_percent,
                idle.catch_up_seconds,
                megabytes(idle.memory.rss_kb),
                megabytes(idle.memory.anon_kb),
                thousands(idle.active),
                thousands(2.0 * idle.connections as f64),
                idle.lost
            ));
        }
        out
    }
}

/// The TPS memcaslap reports in its final line ("Run time: 10.0s Ops: ... TPS: 123456 ...").
fn parse_memcaslap_tps(output: &str) -> Option<f64> {
    output.lines().rev().find_map(|line| {
        line.split("TPS: ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Runs `cargo bench -p cacheprobe --bench <name>` (criterion) and returns its stdout.
fn run_criterion(name: &str) -> anyhow::Result<String> {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(util::workspace_root())
        .args(["bench", "-p", "cacheprobe", "--bench", name])
        .env("PATH", util::path_with_cargo_bin());
    let output = procs::run_checked("cargo bench", &mut cargo, Duration::from_secs(1800))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

struct ScrapeSize {
    fleet: String,
    format: String,
    samples: u64,
    bytes: u64,
}

/// The `scrape-size fleet="..." format=X samples=N bytes=B` lines agent/benches/scrape.rs prints.
fn parse_scrape_sizes(output: &str) -> Vec<ScrapeSize> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("scrape-size fleet=\"")?;
            let (fleet, rest) = rest.split_once('"')?;
            let mut fields = rest.split_whitespace().filter_map(|f| f.split_once('='));
            let (_, format) = fields.next()?;
            let (_, samples) = fields.next()?;
            let (_, bytes) = fields.next()?;
            Some(ScrapeSize {
                fleet: fleet.to_string(),
                format: format.to_string(),
                samples: samples.parse().ok()?,
                bytes: bytes.parse().ok()?,
            })
        })
        .collect()
}

/// (benchmark name, median elements per second) from criterion's text output.
fn parse_criterion(output: &str) -> Vec<(String, f64)> {
    let mut results = Vec::new();
    let mut name = String::new();
    let mut previous = String::new();
    for line in output.lines() {
        let trimmed = line.trim();
        if let Some((before, _)) = trimmed.split_once("time:") {
            name = if before.trim().is_empty() {
                previous.clone()
            } else {
                before.trim().to_string()
            };
        } else if let Some(rest) = trimmed.split_once("thrpt:").map(|(_, r)| r) {
            let inside = rest.trim().trim_start_matches('[').trim_end_matches(']');
            let parts: Vec<&str> = inside.split_whitespace().collect();
            if parts.len() == 6 {
                let scale = match parts[3] {
                    "elem/s" => Some(1.0),
                    "Kelem/s" => Some(1e3),
                    "Melem/s" => Some(1e6),
                    "Gelem/s" => Some(1e9),
                    _ => None,
                };
                if let (Some(scale), Ok(value)) = (scale, parts[2].parse::<f64>()) {
                    results.push((name.clone(), value * scale));
                }
            }
        } else if !trimmed.is_empty()
            && !trimmed.starts_with("Benchmarking")
            && !trimmed.starts_with("Found")
            && !trimmed.starts_with("change:")
        {
            previous = trimmed.to_string();
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_sizes() {
        let out = "scrape-size fleet=\"typical host (1 service x 16 servers)\" format=PrometheusText samples=5607 bytes=748628\nother\n";
        let sizes = parse_scrape_sizes(out);
        assert_eq!(sizes.len(), 1);
        assert_eq!(sizes[0].fleet, "typical host (1 service x 16 servers)");
        assert_eq!(sizes[0].format, "PrometheusText");
        assert_eq!((sizes[0].samples, sizes[0].bytes), (5607, 748628));
    }

    #[test]
    fn memcaslap_summary() {
        let out = "cmd_get: 488331\n\nRun time: 4.0s Ops: 542605 TPS: 135163 Net_rate: 52.1M/s\n";
        assert_eq!(parse_memcaslap_tps(out), Some(135163.0));
        assert_eq!(parse_memcaslap_tps("nothing"), None);
    }

    #[test]
    fn criterion_throughput() {
        let out = "workload: 33000 requests\n\
Benchmarking decoder/mixed_text_meta_binary: Warming up for 3.0000 s\n\
decoder/mixed_text_meta_binary\n\
                        time:   [5.0 ms 5.1 ms 5.2 ms]\n\
                        thrpt:  [6.3000 Melem/s 6.4700 Melem/s 6.6000 Melem/s]\n\
decoder/short           time:   [1.0 us 1.1 us 1.2 us]\n\
                        thrpt:  [900.00 Kelem/s 910.00 Kelem/s 920.00 Kelem/s]\n";
        let results = parse_criterion(out);
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].0, "decoder/mixed_text_meta_binary");
        assert!((results[0].1 - 6.47e6).abs() < 1.0);
        assert_eq!(results[1].0, "decoder/short");
        assert!((results[1].1 - 910e3).abs() < 1e-6);
    }

    #[test]
    fn plans_are_bounded() {
        let quick = Plan::new(true);
        assert_eq!(quick.repeats, 1);
        assert_eq!(quick.idle_counts, &[1_000]);
        assert!(!quick.criterion);
        let full = Plan::new(false);
        // The goals come from at least 10 interleaved off/on rounds; the descriptive four-mode
        // table runs 3 repeats.
        assert!(full.rounds >= 10);
        assert_eq!(full.repeats, 3);
        assert!(full.idle_counts.contains(&100_000));
        assert!(full.loss_rates.contains(&Some(100_000)));
    }
}
