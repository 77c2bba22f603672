//! `cargo xtask bench [--quick]`: what cacheprobe costs on a cache host, measured against real
//! memcached on loopback. Every measure is printed as a table and written with its commands and
//! the machine's facts to BENCHMARKS.md (`--quick` writes target/bench/BENCHMARKS.quick.md so a
//! smoke run never replaces the committed numbers).
//!
//! Modes compared in one invocation, alternating: agent off, agent with socket probes only
//! (capture off, capture_bytes = 0), agent with payload capture and decoding (capture on,
//! capture_bytes = 65536). Nothing is pinned: on a 2-core machine memcached's two threads, the
//! single-threaded load generator and the agent share both cores, as they would on a small host.

mod account;
mod attach;
mod bpf_cost;
mod budget;
mod criterion;
mod document;
mod fleet;
mod floor;
mod frame_cost;
mod harness;
mod idle;
mod idle_cost;
mod loadgen;
mod loss;
mod modes;
mod observe;
mod paired;
mod percall;
mod procs;
mod report;
mod rounds;
mod soak;
mod targets;
mod toggle;
mod top;
mod tshark;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::util;
use document::machine_facts;
use loadgen::WORKLOAD;
use procs::Memcached;
use report::Section;
use targets::Targets;

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
    /// `ab`: memcached on the first CPU, the load generator on the last, the agent free.
    pub pin: bool,
}

/// The measures, in the order they run; `--only` picks from these.
pub const PHASES: &[&str] = &[
    "attach",
    "toggle",
    "toggle-one",
    "ab",
    "modes",
    "bpf",
    "frame-cost",
    "percall",
    "account",
    "loss",
    "tshark",
    "idle",
    "decoder",
    "scrape",
    "fleet",
    "top",
    "budget",
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
    /// The toggled windows under continuous load (`toggle`, `toggle-one`).
    toggle: toggle::TogglePlan,
    /// The same windows kept for accounting (`account`): its figures vary little between
    /// windows, so fewer cycles do.
    account: toggle::TogglePlan,
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
                toggle: toggle::TogglePlan {
                    cycles: 2,
                    trim: Duration::from_millis(500),
                    window: Duration::from_secs(2),
                    sample_every: Duration::from_millis(500),
                },
                account: toggle::TogglePlan {
                    cycles: 1,
                    trim: Duration::from_millis(500),
                    window: Duration::from_secs(2),
                    sample_every: Duration::from_millis(500),
                },
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
                // 16 cycles of 4 arms x 2 windows of about 4.5 s: about 10 minutes per setup.
                toggle: toggle::TogglePlan {
                    cycles: 16,
                    trim: Duration::from_secs(1),
                    window: Duration::from_secs(3),
                    sample_every: Duration::from_millis(500),
                },
                // 10 cycles (issue 19 asks for at least 10 interleaved rounds) of 3 arms x 2
                // windows of about 5 s: about 6 minutes per setup.
                account: toggle::TogglePlan {
                    cycles: 10,
                    trim: Duration::from_secs(1),
                    window: Duration::from_secs(3),
                    sample_every: Duration::from_millis(500),
                },
                quiet_wait: Duration::from_secs(45),
            }
        }
    }
}

/// Busy cores below which the machine counts as quiet (the idle agent and memcached included).
const QUIET_CORES: f64 = 0.15;

/// The default kernel socket map size; larger only where the idle-connection test needs it.
const DEFAULT_MAX_SOCKETS: u32 = 65_536;

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
    /// `--budgets`: capture arms of `ab` and `account` at other decoding budgets.
    budgets: Vec<u32>,
    /// `--pin`: see [`BenchOptions::pin`].
    pin: bool,
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

/// `bench --soak MINUTES`: the soak alone (see soak/).
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
    let output = options
        .output
        .clone()
        .unwrap_or_else(|| default_output(&options, &scratch));
    let facts = machine_facts();
    let mut bench = Bench::new(&options, binary, scratch, nofile)?;
    for name in &options.only {
        if !PHASES.contains(&name.as_str()) {
            bail!(
                "unknown measure {name:?}; choose from {}",
                PHASES.join(", ")
            );
        }
    }
    bench.run_measures(&options)?;
    bench.write_document(&options, &facts, started, &output)?;
    println!("{}", bench.targets_section().markdown());
    eprintln!(
        "xtask: bench finished in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

/// Where a run's report goes without `--output`. Only a full run belongs in BENCHMARKS.md
/// (spliced in place of the previous full run's part, see `document::splice`): a quick or
/// partial run writes a scratch file, to be quoted into a hand-written section, so a
/// `--only percall` never replaces the document with one table.
fn default_output(options: &BenchOptions, scratch: &std::path::Path) -> PathBuf {
    if options.quick {
        scratch.join("BENCHMARKS.quick.md")
    } else if !options.only.is_empty() {
        scratch.join(format!("BENCHMARKS.only-{}.md", options.only.join("-")))
    } else {
        util::workspace_root().join("BENCHMARKS.md")
    }
}

impl Bench {
    fn new(
        options: &BenchOptions,
        binary: PathBuf,
        scratch: PathBuf,
        nofile: u64,
    ) -> anyhow::Result<Bench> {
        let mut plan = Plan::new(options.quick);
        if let Some(rounds) = options.rounds {
            if rounds < 2 {
                bail!("--rounds must be at least 2 (a single round has no interval)");
            }
            plan.rounds = rounds;
            plan.toggle.cycles = rounds;
        }
        Ok(Bench {
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
                Some(path) if !path.exists() => {
                    bail!("--baseline {}: no such file", path.display())
                }
                Some(path) => Some(
                    path.canonicalize()
                        .with_context(|| format!("cannot resolve --baseline {}", path.display()))?,
                ),
                None => None,
            },
            budgets: options.budgets.clone(),
            pin: options.pin,
        })
    }

    /// Runs the measures `--only` asks for (all without it), in the order of [`PHASES`].
    fn run_measures(&mut self, options: &BenchOptions) -> anyhow::Result<()> {
        let wanted =
            |phase: &str| options.only.is_empty() || options.only.iter().any(|o| o == phase);
        if wanted("attach") {
            self.attach_time()?;
        }
        if [
            "toggle",
            "toggle-one",
            "ab",
            "modes",
            "bpf",
            "frame-cost",
            "loss",
            "tshark",
            "top",
        ]
        .iter()
        .any(|p| wanted(p))
        {
            let memcached = Memcached::start(procs::free_port(17211)?, None)?;
            self.memcached_lines.push(memcached.command_line.clone());
            loadgen::populate(memcached.addr, &WORKLOAD)?;
            if wanted("toggle") {
                self.toggle(&memcached, rounds::Ends::Both)?;
            }
            if wanted("toggle-one") {
                self.toggle(&memcached, rounds::Ends::OneEnd)?;
            }
            if wanted("ab") {
                self.paired_rounds(&memcached)?;
            }
            // The descriptive four-mode table takes a minute even in one repeat: a smoke run
            // has the interleaved rounds instead, unless asked for it.
            if wanted("modes") && !(options.quick && options.only.is_empty()) {
                self.overhead_ab(&memcached)?;
            }
            if wanted("bpf") {
                self.bpf_program_cost(&memcached)?;
            }
            if wanted("frame-cost") {
                self.frame_cost()?;
            }
            if wanted("loss") {
                self.event_loss(&memcached)?;
            }
            if wanted("tshark") {
                self.tshark_capture(&memcached)?;
            }
            if wanted("top") {
                self.top_cost(&memcached)?;
            }
        }
        if wanted("percall") || wanted("account") {
            // The accounting takes its dispatch cost from percall, so it runs percall too.
            self.per_call_cost()?;
        }
        if wanted("account") {
            let memcached = Memcached::start(procs::free_port(17211)?, None)?;
            self.memcached_lines.push(memcached.command_line.clone());
            loadgen::populate(memcached.addr, &WORKLOAD)?;
            let plan = self.plan.account;
            self.account(&memcached, &plan)?;
        }
        if wanted("idle") {
            self.idle_connections()?;
        }
        if wanted("decoder") {
            self.decoder_throughput()?;
        }
        if wanted("scrape") {
            self.scrape_cost()?;
        }
        if wanted("fleet") {
            self.fleet_diagnose()?;
        }
        // Ten minutes of accuracy figures, not a cost: only when asked for by name.
        if options.only.iter().any(|o| o == "budget") {
            self.budget_accuracy()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(full.toggle.cycles >= 10 && full.account.cycles >= 10);
        assert_eq!(full.repeats, 3);
        assert!(full.idle_counts.contains(&100_000));
        assert!(full.loss_rates.contains(&Some(100_000)));
    }
}
