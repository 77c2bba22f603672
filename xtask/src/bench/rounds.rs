//! The overhead goals of issue 19: interleaved off/on rounds per scenario, loss as a median with
//! a bootstrap 95% interval, and the BPF time per program run of every agent-on run.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{
    floor::EmptyPrograms,
    loadgen::{self, LoadSpec, WORKLOAD},
    observe,
    paired::{self, Interval, Netns, Verdict},
    procs::{self, Agent, Memcached, Mode, SysctlGuard},
    report::{median, thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};

/// Where the load runs: both ends watched on loopback, or only the client end (see [`Netns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    Both,
    OneEnd,
}

impl Ends {
    pub fn label(self) -> &'static str {
        match self {
            Ends::Both => "both ends watched",
            Ends::OneEnd => "one end watched (client only)",
        }
    }
}

/// An agent mode as one build of the agent runs it: this build, or `--baseline`; `budget`: a
/// capture arm at another `capture_records_per_second` than the default (`--budgets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arm {
    mode: Mode,
    baseline: bool,
    budget: Option<u32>,
}

impl Arm {
    fn label(self) -> String {
        let mut label = self.mode.label().to_string();
        if let Some(budget) = self.budget {
            label.push_str(&format!(", budget {budget} records/s"));
        }
        if self.baseline {
            label.push_str(", baseline build");
        }
        label
    }
}

/// One scenario's outcome over all rounds.
pub struct ScenarioResult {
    pub ends: Ends,
    pub mode: Mode,
    /// Run by the `--baseline` build, not this one.
    pub baseline: bool,
    /// `--budgets`: capture at this capture_records_per_second instead of the default.
    pub budget: Option<u32>,
    pub rounds: usize,
    pub loss: Option<Interval>,
    /// Lowest and highest single-round loss.
    pub range: Option<(f64, f64)>,
    /// Standard deviation of a single round's loss: what noise does to one comparison.
    pub round_sd: Option<f64>,
    /// BPF ns per program run (all of the agent's programs), over the rounds' stats windows.
    pub ns_per_run: Option<Interval>,
    /// An empty program's ns per run on the send/receive tracepoints in the same windows: the
    /// part of `ns_per_run` any program pays here (clock reads, dispatch).
    pub floor_per_run: Option<Interval>,
    /// Saturation loss estimated from CPU per op (1 - off/on of the load generator's, memcached's
    /// and the agent's CPU ns per op, paired by round): what the agent's added work costs a
    /// CPU-bound host, far less disturbed by other processes than throughput is.
    pub cpu_loss: Option<Interval>,
    pub ns_per_op: Option<f64>,
    /// Capture modes: the BPF ns one captured (followed) call adds, over rounds (see
    /// [`per_captured_call`]), and the captured calls per second of the stats windows.
    pub ns_per_captured: Option<Interval>,
    pub captured_per_sec: Option<f64>,
}

impl ScenarioResult {
    pub fn label(&self) -> String {
        format!(
            "{}, {}",
            Arm {
                mode: self.mode,
                baseline: self.baseline,
                budget: self.budget,
            }
            .label(),
            self.ends.label()
        )
    }
}

/// What an agent-on run measured: its throughput, other processes' cores, the stats window's
/// (BPF ns, program runs, memcache ops) and the empty program's ns per run in that window.
struct OnRun {
    ops_per_sec: f64,
    cpu_ns_per_op: f64,
    others: f64,
    stats: (u64, u64, u64),
    floor_per_run: Option<f64>,
    /// Calls the agent says the kernel captured in the stats window (None: a build without
    /// `cacheprobe_capture_calls_total`), and the window's seconds.
    captured: Option<u64>,
    stats_seconds: f64,
}

/// One load run of a round.
struct RoundRun {
    round: usize,
    ends: Ends,
    mode: Mode,
    baseline: bool,
    budget: Option<u32>,
    ops_per_sec: f64,
    /// CPU ns per op of the load generator, memcached and the agent together.
    cpu_ns_per_op: f64,
    other_cores: f64,
    floor_per_run: Option<f64>,
    /// (BPF ns, program runs, memcache ops) of the stats window after an agent-on run.
    stats: Option<(u64, u64, u64)>,
    /// Captured calls in that window, and its seconds (see [`OnRun::captured`]).
    captured: Option<u64>,
    stats_seconds: f64,
}

/// The agent's count of captured calls, or None when its build does not export it.
fn captured_calls(agent: &Agent) -> anyhow::Result<Option<f64>> {
    let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
    Ok(samples
        .iter()
        .any(|s| s.name == CAPTURE_CALLS)
        .then(|| observe::total(&samples, CAPTURE_CALLS)))
}

pub(super) const CAPTURE_CALLS: &str = "cacheprobe_capture_calls_total";

/// BPF ns one captured call adds: the capture run's BPF time minus its program runs at the
/// per-run cost of the same build's sockets-only run of the same round and setup, over the
/// calls the agent says were captured. At a fixed records/s budget the sample follows
/// throughput, so BPF ns per op cannot compare two builds' capture; this can.
fn per_captured_call(capture: &RoundRun, sockets: &RoundRun) -> Option<f64> {
    let (ns, runs, _) = capture.stats?;
    let (s_ns, s_runs, _) = sockets.stats?;
    let captured = capture.captured.filter(|&c| c > 0)?;
    let base = runs as f64 * s_ns as f64 / s_runs.max(1) as f64;
    Some((ns as f64 - base) / captured as f64)
}

impl Bench {
    /// Saturation load, in `netns` when given; returns the report, how many cores other
    /// processes kept busy meanwhile, and the CPU ns the work itself took: the load
    /// generator's thread plus every thread of `pids` (memcached, the agent).
    fn load_once(
        &self,
        spec: &LoadSpec,
        netns: Option<&Netns>,
        pids: &[u32],
    ) -> anyhow::Result<(loadgen::LoadReport, f64, u64)> {
        let tasks = || -> anyhow::Result<u64> {
            pids.iter()
                .try_fold(0u64, |sum, pid| Ok(sum + procs::task_cpu_ns(*pid)?))
        };
        // Measured in the generator's own thread (a netns run spawns one).
        let measured = || -> anyhow::Result<(loadgen::LoadReport, u64)> {
            let _pinned = self
                .pin
                .then(|| procs::Pinned::thread_to(procs::Cpu::Last))
                .transpose()?;
            let before = procs::thread_cpu_ns();
            let report = loadgen::run(spec)?;
            Ok((report, procs::thread_cpu_ns().saturating_sub(before)))
        };
        let ours = || -> anyhow::Result<f64> {
            let mut total = procs::user_seconds(std::process::id())?;
            for pid in pids {
                total += procs::user_seconds(*pid)?;
            }
            Ok(total)
        };
        let (machine_before, ours_before) = (procs::machine_user_seconds()?, ours()?);
        let tasks_before = tasks()?;
        let (report, generator_ns) = match netns {
            Some(netns) => netns.run(measured)?,
            None => measured()?,
        };
        let cpu_ns = generator_ns + tasks()?.saturating_sub(tasks_before);
        let (machine_after, ours_after) = (procs::machine_user_seconds()?, ours()?);
        if report.ops == 0 {
            anyhow::bail!(
                "the load generator completed no operation against {}",
                spec.target
            );
        }
        let others = ((machine_after - machine_before) - (ours_after - ours_before)).max(0.0);
        let cores = others / report.elapsed.as_secs_f64().max(1e-3);
        Ok((report, cores, cpu_ns))
    }

    /// The agent-on half of a pair: the measured run with bpf_stats off, then a short window
    /// with bpf_stats on (two clock reads per program run would otherwise count as loss).
    fn on_run(
        &self,
        memcached: &Memcached,
        netns: Option<&Netns>,
        arm: Arm,
        spec: &LoadSpec,
    ) -> anyhow::Result<OnRun> {
        let binary = match (&self.baseline, arm.baseline) {
            (Some(baseline), true) => baseline.clone(),
            _ => self.binary.clone(),
        };
        let mut agent: Agent = match arm.budget {
            None => self.start_binary_on(
                &binary,
                &[memcached.addr.port()],
                arm.mode,
                DEFAULT_MAX_SOCKETS,
            )?,
            Some(budget) => self.start_capture_at(&binary, &[memcached.addr.port()], budget)?,
        };
        let pids = [memcached.pid(), agent.pid()];
        let (report, others, cpu_ns) = self.load_once(spec, netns, &pids)?;
        agent.check_running()?;
        let (programs, _) = procs::bpf_object_ids(agent.pid())?;
        let stats_spec = LoadSpec {
            duration: self.plan.stats_run,
            ..spec.clone()
        };
        // Attached after the agent, so it runs after ours on a warm cache: a floor, not a twin.
        // Without it (a kernel refusing raw tracepoints) the column says n/a.
        let floor = EmptyPrograms::attach(&["sock_send_length", "sock_recv_length"]).ok();
        let floor_ids = floor.as_ref().map_or(&[][..], |f| &f.ids[..]);
        let (before, after, stats_load, floor_before, floor_after, captured) = {
            let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
            let floor_before = observe::program_stats(floor_ids)?;
            let captured_before = captured_calls(&agent)?;
            let before = observe::program_stats(&programs)?;
            let (load, _, _) = self.load_once(&stats_spec, netns, &pids)?;
            let after = observe::program_stats(&programs)?;
            let floor_after = observe::program_stats(floor_ids)?;
            // The agent reads the payload ring at least every 20 ms: all of the window's
            // records are in after this.
            procs::sleep(Duration::from_millis(200))?;
            let captured = captured_calls(&agent)?
                .zip(captured_before)
                .map(|(after, before)| (after - before).max(0.0) as u64);
            (before, after, load, floor_before, floor_after, captured)
        };
        drop(floor);
        let floor_per_run = {
            let (ns, runs) = observe::run_deltas(&floor_before, &floor_after, |_, _| true);
            (runs > 0).then(|| ns as f64 / runs as f64)
        };
        agent.check_running()?;
        agent.stop()?;
        let (ns, runs) = observe::run_deltas(&before, &after, |_, _| true);
        Ok(OnRun {
            ops_per_sec: report.ops_per_sec(),
            cpu_ns_per_op: cpu_ns as f64 / report.ops.max(1) as f64,
            others,
            stats: (ns, runs, stats_load.ops),
            floor_per_run,
            captured,
            stats_seconds: stats_load.elapsed.as_secs_f64(),
        })
    }

    pub(super) fn paired_rounds(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        let rounds = self.plan.rounds;
        let twins = if self.baseline.is_some() {
            "the baseline build"
        } else {
            "the port check per call"
        };
        util_step(&format!(
            "overhead rounds: {rounds} x (off, sockets only, capture; each also with {twins}) x \
             (both ends, one end)"
        ));
        let watched = procs::free_port(17600)?;
        let served = procs::free_port(watched + 1)?;
        let netns = Netns::create(watched, served)?;
        let far = Memcached::start_in(&netns)?;
        self.memcached_lines.push(far.command_line.clone());
        netns.run(|| loadgen::populate(far.addr, &WORKLOAD))?;
        if self.pin {
            for server in [memcached, &far] {
                procs::pin_process(server.pid(), procs::Cpu::First)?;
            }
        }
        // Warm both servers so the first measured run is not penalised.
        for (server, ns) in [(memcached, None), (&far, Some(&netns))] {
            let warm = LoadSpec {
                duration: Duration::from_secs(1),
                ..self.paired_spec(server)
            };
            self.load_once(&warm, ns, &[server.pid()])?;
        }
        let arms = self.arms();
        let runs = self.run_rounds(memcached, &far, &netns, &arms)?;
        drop(far);
        drop(netns);

        let results = summarise(&runs, &arms);
        let mut section = Section::new("Overhead: interleaved off/on rounds (issue 19)");
        self.describe_rounds(&mut section);
        section.table("", summary_table(&results));
        section.say(
            "`BPF ns per captured call`: a capture run's BPF time in its stats window minus its \
             program runs at the per-run cost of the same build's `sockets only` run of the same \
             round and setup, divided by the calls the agent counted as captured in that window \
             (`cacheprobe_capture_calls_total`; n/a for a build without it). At the default \
             decoding budget the sample follows throughput, so BPF ns per op does not compare \
             two builds' capture at equal work; this column does.",
        );
        let noisiest = results
            .iter()
            .filter_map(|r| r.round_sd)
            .fold(f64::NAN, f64::max);
        if noisiest.is_finite() {
            section.say(format!(
                "What noise does to a single round: its loss scatters with a standard deviation \
                 of up to {:.1} points here (column `single-round sd`), so one round cannot tell \
                 a 1% loss from none or from 3%; a goal is called met or missed only when the \
                 whole 95% interval of the median lies on one side of it.",
                100.0 * noisiest
            ));
        }
        if self.baseline.is_some() {
            section.table(
                "This build against the baseline build, paired by round and setup (a round's \
                 change is this build's figure over the baseline's, minus 1; median and 95% \
                 bootstrap interval over rounds):",
                against_baseline(&runs),
            );
        }
        section.table("Every run, in the order run:", raw_table(&runs));
        self.targets.paired = results;
        self.finish(section);
        Ok(())
    }

    /// A saturation run of one round against `server`.
    fn paired_spec(&self, server: &Memcached) -> LoadSpec {
        LoadSpec {
            target: server.addr,
            connections: self.plan.saturation_connections,
            duration: self.plan.paired_run,
            rate: None,
            workload: WORKLOAD,
        }
    }

    /// Each agent mode beside its twin, measured in the same rounds: the baseline build's
    /// same mode when one is given (before and after a change), else the port-check mode
    /// (socket_storage = false: the path before socket-local storage).
    fn arms(&self) -> Vec<Arm> {
        let arm = |mode, baseline| Arm {
            mode,
            baseline,
            budget: None,
        };
        let mut arms = if self.baseline.is_some() {
            vec![
                arm(Mode::Off, false),
                arm(Mode::SocketsOnly, false),
                arm(Mode::SocketsOnly, true),
                arm(Mode::Capture, false),
                arm(Mode::Capture, true),
            ]
        } else {
            vec![
                arm(Mode::Off, false),
                arm(Mode::SocketsOnly, false),
                arm(Mode::SocketsOnlyPortCheck, false),
                arm(Mode::Capture, false),
                arm(Mode::CapturePortCheck, false),
            ]
        };
        arms.extend(self.budgets.iter().map(|&budget| Arm {
            budget: Some(budget),
            ..arm(Mode::Capture, false)
        }));
        arms
    }

    /// Every round: both setups (alternating which goes first), each running every arm in an
    /// order rotated by round.
    fn run_rounds(
        &self,
        memcached: &Memcached,
        far: &Memcached,
        netns: &Netns,
        modes: &[Arm],
    ) -> anyhow::Result<Vec<RoundRun>> {
        let rounds = self.plan.rounds;
        let started = Instant::now();
        let mut runs: Vec<RoundRun> = Vec::new();
        for round in 0..rounds {
            let setups = if round % 2 == 0 {
                [Ends::Both, Ends::OneEnd]
            } else {
                [Ends::OneEnd, Ends::Both]
            };
            for ends in setups {
                let (server, ns) = match ends {
                    Ends::Both => (memcached, None),
                    Ends::OneEnd => (far, Some(netns)),
                };
                let spec = self.paired_spec(server);
                // Rotate so `off` is first, middle and last in turn.
                for i in 0..modes.len() {
                    let arm = modes[(i + round) % modes.len()];
                    eprintln!(
                        "xtask: round {}/{rounds}, {}, {} ({:.0} s in)",
                        round + 1,
                        ends.label(),
                        arm.label(),
                        started.elapsed().as_secs_f64()
                    );
                    if !self.plan.paired_quiet.is_zero() {
                        procs::wait_for_quiet(super::QUIET_CORES, &[], self.plan.paired_quiet)?;
                    }
                    runs.push(self.round_run(round, ends, arm, server, ns, &spec)?);
                }
            }
        }
        Ok(runs)
    }

    /// One run of a round: the load alone for `off`, else [`Bench::on_run`].
    fn round_run(
        &self,
        round: usize,
        ends: Ends,
        arm: Arm,
        server: &Memcached,
        ns: Option<&Netns>,
        spec: &LoadSpec,
    ) -> anyhow::Result<RoundRun> {
        let mode = arm.mode;
        Ok(if mode == Mode::Off {
            let (report, others, cpu_ns) = self.load_once(spec, ns, &[server.pid()])?;
            RoundRun {
                round,
                ends,
                mode,
                baseline: false,
                budget: None,
                ops_per_sec: report.ops_per_sec(),
                cpu_ns_per_op: cpu_ns as f64 / report.ops.max(1) as f64,
                other_cores: others,
                stats: None,
                floor_per_run: None,
                captured: None,
                stats_seconds: 0.0,
            }
        } else {
            let OnRun {
                ops_per_sec: ops,
                cpu_ns_per_op,
                others,
                stats,
                floor_per_run,
                captured,
                stats_seconds,
            } = self
                .on_run(server, ns, arm, spec)
                .with_context(|| format!("{} {}", arm.label(), ends.label()))?;
            RoundRun {
                round,
                ends,
                mode,
                baseline: arm.baseline,
                budget: arm.budget,
                ops_per_sec: ops,
                cpu_ns_per_op,
                other_cores: others,
                stats: Some(stats),
                floor_per_run,
                captured,
                stats_seconds,
            }
        })
    }

    /// The section's method paragraph.
    fn describe_rounds(&self, section: &mut Section) {
        let rounds = self.plan.rounds;
        let twins_text = match &self.baseline {
            Some(baseline) => format!(
                "each agent mode also as run by the baseline build `{}`, in the same rounds",
                baseline.display()
            ),
            None => "each agent mode also as `port check per call`: `limits.socket_storage = \
                     false`, the raw-tracepoint path before socket-local storage, in the same \
                     rounds"
                .to_string(),
        };
        let budgets_text = if self.budgets.is_empty() {
            String::new()
        } else {
            let budgets: Vec<String> = self.budgets.iter().map(|b| thousands(*b as f64)).collect();
            format!(
                "; also `capture + decoding` at limits.capture_records_per_second = {} instead \
                 of the default (the loss curve against the decoding budget)",
                budgets.join(", ")
            )
        };
        let pin_text = if self.pin {
            "; pinned (`--pin`): memcached's threads on the first CPU, the load generator on the \
             last, the agent anywhere"
        } else {
            ""
        };
        let twins_text = format!("{twins_text}{budgets_text}{pin_text}");
        section.say(format!(
            "{rounds} rounds. Every round runs, for each setup, `off` (no agent), `sockets only` \
             and `capture + decoding` (default decoding budget) back to back, in an order rotated \
             every round ({twins_text}), \
             and the setups alternate which goes first; each agent-on run starts a \
             fresh agent. A run is the xtask load generator at saturation for {} s ({} \
             connections, {}). A round's loss is 1 - on/off against the `off` run of the same \
             round and setup, seconds away, so the machine's drift (other engineers' builds on \
             this 2-core host) cancels within the pair; the median over rounds is given with a \
             95% percentile-bootstrap interval ({} resamples of whole rounds). After each \
             agent-on run the agent keeps running for a {} s window with \
             `kernel.bpf_stats_enabled=1` (off during the measured run, since stats add two clock \
             reads per program run): its BPF ns per program run over all the agent's programs, \
             and per memcache op; beside it, an empty program attached to the send/receive \
             tracepoints for the same window, the floor any program pays per run on this machine \
             (clock reads, dispatch). `one end watched`: memcached in a network namespace of the \
             bench listens on an unwatched port, the client connects to the watched port and a \
             NAT rule in that namespace forwards it, so only the client's socket is watched \
             (the off runs pay for the NAT as well). A second estimate of the loss does not \
             depend on how much CPU other processes leave: the CPU ns per op of the load \
             generator's thread, memcached and the agent together (scheduler run time, user and \
             kernel, so BPF programs and loopback softirqs count where they run), 1 - off/on \
             paired by round: what the agent adds to a CPU-bound host's cost per op, which is its \
             throughput loss at saturation when nothing else runs.",
            self.plan.paired_run.as_secs(),
            self.plan.saturation_connections,
            WORKLOAD.describe(),
            paired::RESAMPLES,
            self.plan.stats_run.as_secs(),
            twins_text = twins_text,
        ));
    }
}

/// The `off` run a run is paired with: same round, same setup.
fn off_of<'a>(runs: &'a [RoundRun], run: &RoundRun) -> Option<&'a RoundRun> {
    runs.iter()
        .find(|o| o.mode == Mode::Off && o.round == run.round && o.ends == run.ends)
}

/// The same build's sockets-only run of a run's round and setup.
fn sockets_of<'a>(runs: &'a [RoundRun], run: &RoundRun) -> Option<&'a RoundRun> {
    runs.iter().find(|s| {
        s.mode == Mode::SocketsOnly
            && s.round == run.round
            && s.ends == run.ends
            && s.baseline == run.baseline
    })
}

/// A capture run's BPF ns per captured call (see [`per_captured_call`]).
fn captured_cost(runs: &[RoundRun], run: &RoundRun) -> Option<f64> {
    match run.mode {
        Mode::Capture | Mode::CaptureAll => per_captured_call(run, sockets_of(runs, run)?),
        _ => None,
    }
}

/// A run's captured calls per second of its stats window.
fn captured_rate(run: &RoundRun) -> Option<f64> {
    run.captured
        .filter(|_| run.mode != Mode::SocketsOnly && run.stats_seconds > 0.0)
        .map(|c| c as f64 / run.stats_seconds)
}

/// Every run, in the order run.
fn raw_table(runs: &[RoundRun]) -> Table {
    let mut raw = Table::new(&[
        "round",
        "ends",
        "mode",
        "ops/s",
        "loss vs off of this round",
        "BPF ns per program run",
        "program runs per op",
        "BPF ns per op",
        "captured calls/s",
        "BPF ns per captured call",
        "CPU ns per op (generator + memcached + agent)",
        "other processes, cores",
    ]);
    for run in runs {
        let loss = off_of(runs, run).map(|off| 1.0 - run.ops_per_sec / off.ops_per_sec);
        let (per_run, runs_per_op, per_op) = match run.stats {
            Some((ns, count, ops)) => (
                format!("{:.1}", ns as f64 / count.max(1) as f64),
                format!("{:.2}", count as f64 / ops.max(1) as f64),
                format!("{:.0}", ns as f64 / ops.max(1) as f64),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        raw.row(vec![
            (run.round + 1).to_string(),
            run.ends.label().into(),
            Arm {
                mode: run.mode,
                baseline: run.baseline,
                budget: run.budget,
            }
            .label(),
            thousands(run.ops_per_sec),
            match (run.mode, loss) {
                (Mode::Off, _) | (_, None) => "-".into(),
                (_, Some(loss)) => format!("{:+.2}%", 100.0 * loss),
            },
            per_run,
            runs_per_op,
            per_op,
            captured_rate(run).map_or("-".into(), thousands),
            captured_cost(runs, run).map_or("-".into(), |ns| format!("{ns:.0}")),
            format!("{:.0}", run.cpu_ns_per_op),
            format!("{:.2}", run.other_cores),
        ]);
    }
    raw
}

/// Per setup and agent arm: the loss over rounds, its spread, BPF ns per run and per op.
fn summarise(runs: &[RoundRun], modes: &[Arm]) -> Vec<ScenarioResult> {
    let mut results = Vec::new();
    for ends in [Ends::Both, Ends::OneEnd] {
        for arm in modes.iter().copied().filter(|a| a.mode != Mode::Off) {
            results.push(scenario(runs, ends, arm));
        }
    }
    results
}

fn scenario(runs: &[RoundRun], ends: Ends, arm: Arm) -> ScenarioResult {
    let Arm {
        mode,
        baseline,
        budget,
    } = arm;
    let mine: Vec<&RoundRun> = runs
        .iter()
        .filter(|r| {
            r.ends == ends && r.mode == mode && r.baseline == baseline && r.budget == budget
        })
        .collect();
    let losses: Vec<f64> = mine
        .iter()
        .filter_map(|r| Some(1.0 - r.ops_per_sec / off_of(runs, r)?.ops_per_sec))
        .collect();
    let per_run: Vec<f64> = mine
        .iter()
        .filter_map(|r| r.stats)
        .map(|(ns, count, _)| ns as f64 / count.max(1) as f64)
        .collect();
    let cpu_losses: Vec<f64> = mine
        .iter()
        .filter_map(|r| Some(1.0 - off_of(runs, r)?.cpu_ns_per_op / r.cpu_ns_per_op.max(1e-9)))
        .collect();
    let floors: Vec<f64> = mine.iter().filter_map(|r| r.floor_per_run).collect();
    let per_op: Vec<f64> = mine
        .iter()
        .filter_map(|r| r.stats)
        .map(|(ns, _, ops)| ns as f64 / ops.max(1) as f64)
        .collect();
    let per_captured: Vec<f64> = mine.iter().filter_map(|r| captured_cost(runs, r)).collect();
    let captured_rates: Vec<f64> = mine.iter().filter_map(|r| captured_rate(r)).collect();
    let range = losses
        .iter()
        .copied()
        .fold(None, |acc: Option<(f64, f64)>, l| {
            Some(acc.map_or((l, l), |(lo, hi)| (lo.min(l), hi.max(l))))
        });
    let round_sd = (losses.len() >= 2).then(|| {
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        let var =
            losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (losses.len() - 1) as f64;
        var.sqrt()
    });
    ScenarioResult {
        ends,
        mode,
        baseline,
        budget,
        rounds: losses.len(),
        round_sd,
        loss: paired::median_ci(&losses),
        range,
        ns_per_run: paired::median_ci(&per_run),
        floor_per_run: paired::median_ci(&floors),
        cpu_loss: paired::median_ci(&cpu_losses),
        ns_per_op: median(&per_op),
        ns_per_captured: paired::median_ci(&per_captured),
        captured_per_sec: median(&captured_rates),
    }
}

/// One row per scenario: loss (median, interval, single rounds), CPU-per-op loss, BPF cost.
fn summary_table(results: &[ScenarioResult]) -> Table {
    let mut summary = Table::new(&[
        "scenario",
        "rounds",
        "median loss",
        "95% CI",
        "single rounds",
        "single-round sd",
        "loss from CPU per op (median, 95% CI)",
        "BPF ns per program run (median, 95% CI)",
        "empty program, ns per run",
        "BPF ns per op",
        "captured calls/s",
        "BPF ns per captured call (median, 95% CI)",
    ]);
    for result in results {
        summary.row(vec![
            result.label(),
            result.rounds.to_string(),
            result
                .loss
                .map_or("n/a".into(), |i| format!("{:.2}%", 100.0 * i.median)),
            result.loss.map_or("n/a".into(), |i| {
                format!("{:.2}% .. {:.2}%", 100.0 * i.low, 100.0 * i.high)
            }),
            result.range.map_or("n/a".into(), |(lo, hi)| {
                format!("{:.1}% .. {:.1}%", 100.0 * lo, 100.0 * hi)
            }),
            result
                .round_sd
                .map_or("n/a".into(), |sd| format!("{:.1} points", 100.0 * sd)),
            result.cpu_loss.map_or("n/a".into(), |i| {
                format!(
                    "{:.2}% ({:.2}% .. {:.2}%)",
                    100.0 * i.median,
                    100.0 * i.low,
                    100.0 * i.high
                )
            }),
            result.ns_per_run.map_or("n/a".into(), |i| {
                format!("{:.1} ({:.1} .. {:.1})", i.median, i.low, i.high)
            }),
            result.floor_per_run.map_or("n/a".into(), |i| {
                format!("{:.1} ({:.1} .. {:.1})", i.median, i.low, i.high)
            }),
            result.ns_per_op.map_or("n/a".into(), |v| format!("{v:.0}")),
            result.captured_per_sec.map_or("n/a".into(), thousands),
            result.ns_per_captured.map_or("n/a".into(), |i| {
                format!("{:.0} ({:.0} .. {:.0})", i.median, i.low, i.high)
            }),
        ]);
    }
    summary
}

/// Per scenario, this build's CPU ns per op, BPF ns per op and throughput against the baseline
/// build's run of the same mode, round and setup.
fn against_baseline(runs: &[RoundRun]) -> Table {
    let mut table = Table::new(&[
        "scenario",
        "rounds",
        "CPU ns per op (generator + memcached + agent)",
        "BPF ns per op",
        "BPF ns per captured call",
        "throughput",
    ]);
    let format = |changes: &[f64]| {
        paired::median_ci(changes).map_or("n/a".into(), |i| {
            format!(
                "{:+.1}% ({:+.1}% .. {:+.1}%)",
                100.0 * i.median,
                100.0 * i.low,
                100.0 * i.high
            )
        })
    };
    for ends in [Ends::Both, Ends::OneEnd] {
        for mode in [Mode::SocketsOnly, Mode::Capture] {
            let pairs: Vec<(&RoundRun, &RoundRun)> = runs
                .iter()
                .filter(|r| r.ends == ends && r.mode == mode && !r.baseline && r.budget.is_none())
                .filter_map(|new| {
                    let old = runs.iter().find(|o| {
                        o.baseline && o.mode == mode && o.ends == ends && o.round == new.round
                    })?;
                    Some((new, old))
                })
                .collect();
            let change = |of: &dyn Fn(&RoundRun) -> Option<f64>| -> Vec<f64> {
                pairs
                    .iter()
                    .filter_map(|(new, old)| Some(of(new)? / of(old)?.max(1e-9) - 1.0))
                    .collect()
            };
            let bpf_per_op =
                |r: &RoundRun| r.stats.map(|(ns, _, ops)| ns as f64 / ops.max(1) as f64);
            table.row(vec![
                format!("{}, {}", mode.label(), ends.label()),
                pairs.len().to_string(),
                format(&change(&|r: &RoundRun| Some(r.cpu_ns_per_op))),
                format(&change(&bpf_per_op)),
                if mode == Mode::Capture {
                    format(&change(&|r: &RoundRun| {
                        per_captured_call(r, sockets_of(runs, r)?)
                    }))
                } else {
                    "-".into()
                },
                format(&change(&|r: &RoundRun| Some(r.ops_per_sec))),
            ]);
        }
    }
    table
}

/// Goal rows of issue 19 (and #17's default-budget loss) for the targets table.
pub fn goal_rows(results: &[ScenarioResult], table: &mut Table) {
    let verdict = |v: Verdict| v.label().to_string();
    // The baseline build's goals are not this build's, nor are other budgets' the default's.
    for result in results.iter().filter(|r| !r.baseline && r.budget.is_none()) {
        let label = result.label();
        let limits: &[(f64, &str)] = match result.mode {
            Mode::SocketsOnly | Mode::SocketsOnlyPortCheck => &[(0.01, "<= 1% loss (issue 19)")],
            _ => &[
                (0.03, "<= 3% loss (issue 19)"),
                (0.05, "<= 5% loss (issue 17, default budget)"),
            ],
        };
        for (limit, goal) in limits {
            table.row(vec![
                format!("throughput at saturation, {label}"),
                goal.to_string(),
                result.loss.map_or("n/a".into(), |i| {
                    format!(
                        "{:.2}% loss (95% CI {:.2}% .. {:.2}%, {} rounds)",
                        100.0 * i.median,
                        100.0 * i.low,
                        100.0 * i.high,
                        result.rounds
                    )
                }),
                result
                    .loss
                    .map_or("not measured".into(), |i| verdict(i.against(*limit))),
            ]);
            table.row(vec![
                format!("the same, estimated from CPU per op, {label}"),
                goal.to_string(),
                result.cpu_loss.map_or("n/a".into(), |i| {
                    format!(
                        "{:.2}% (95% CI {:.2}% .. {:.2}%, {} rounds)",
                        100.0 * i.median,
                        100.0 * i.low,
                        100.0 * i.high,
                        result.rounds
                    )
                }),
                result
                    .cpu_loss
                    .map_or("not measured".into(), |i| verdict(i.against(*limit))),
            ]);
        }
        if matches!(result.mode, Mode::SocketsOnly | Mode::SocketsOnlyPortCheck) {
            table.row(vec![
                format!("BPF per program run, {label}"),
                "<= 45 ns (issue 19)".into(),
                result.ns_per_run.map_or("n/a".into(), |i| {
                    let floor = result.floor_per_run.map_or(String::new(), |f| {
                        format!(
                            "; an empty program on the same tracepoints: {:.1} ns",
                            f.median
                        )
                    });
                    format!(
                        "{:.1} ns (95% CI {:.1} .. {:.1}){floor}",
                        i.median, i.low, i.high
                    )
                }),
                result
                    .ns_per_run
                    .map_or("not measured".into(), |i| verdict(i.against(45.0))),
            ]);
        }
    }
}

fn util_step(text: &str) {
    crate::util::step(text);
}
