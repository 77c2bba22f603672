//! The descriptive four-mode comparison (`modes`): off, sockets only, capture and capture
//! without a decoding budget in rotated rounds, each with the xtask generator at saturation and
//! at a fixed rate, then memcaslap; throughput, latency, agent CPU, RSS and losses per mode.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;

use super::{
    harness::{format_cpu, Measured},
    loadgen::{self, LoadSpec, WORKLOAD},
    observe,
    procs::{self, Memcached, Mode},
    report::{median, micros, ratio, thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS, QUIET_CORES,
};
use crate::util;

/// What every run of the table drives: the xtask generator at saturation and at a fixed rate,
/// then memcaslap at saturation.
struct Loads {
    saturation: LoadSpec,
    fixed: LoadSpec,
    memcaslap_config: PathBuf,
    memcaslap_args: Vec<String>,
}

/// One mode in one round.
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

impl Bench {
    pub(super) fn overhead_ab(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("overhead A/B: off, sockets only, capture (alternating)");
        let loads = self.mode_loads(memcached)?;
        // Warm memcached and the page cache so the first measured mode is not penalised.
        loadgen::run(&self.spec(memcached.addr, None, Duration::from_secs(2)))?;

        let mut runs = Vec::new();
        for round in 0..self.plan.repeats {
            // Rotate the order each round so no mode always runs first or last.
            let modes = Mode::ALL.len();
            let order: Vec<Mode> = (0..modes).map(|i| Mode::ALL[(i + round) % modes]).collect();
            for mode in order {
                runs.push(self.mode_run(memcached, &loads, round, mode)?);
            }
        }

        let mut section = Section::new("Overhead A/B on loopback");
        self.describe_modes(&mut section, memcached, &loads)?;
        let summary = self.modes_summary(&runs);
        section.table(
            "Medians (events lost: summed over all rounds, by source; RSS: largest after a run):",
            summary,
        );
        section.table("Every run, in the order run:", raw_table(&runs));
        self.finish(section);
        Ok(())
    }

    /// The generator's two loads, and memcaslap's arguments with its config written.
    fn mode_loads(&self, memcached: &Memcached) -> anyhow::Result<Loads> {
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
        Ok(Loads {
            saturation: self.spec(memcached.addr, None, self.plan.run),
            fixed: self.spec(memcached.addr, Some(self.plan.fixed_rate), self.plan.run),
            memcaslap_config,
            memcaslap_args,
        })
    }

    /// One mode of one round: a fresh agent (none for `off`), the three loads, each after
    /// waiting for a quiet machine, then the agent's losses and memory.
    fn mode_run(
        &self,
        memcached: &Memcached,
        loads: &Loads,
        round: usize,
        mode: Mode,
    ) -> anyhow::Result<Run> {
        eprintln!(
            "xtask: round {}/{} mode {}",
            round + 1,
            self.plan.repeats,
            mode.label()
        );
        let mut agent = match mode {
            Mode::Off => None,
            _ => Some(self.start_agent(memcached.addr.port(), mode, DEFAULT_MAX_SOCKETS)?),
        };
        let before = match &agent {
            Some(a) => observe::parse_samples(&observe::scrape(a.metrics_addr)?),
            None => Vec::new(),
        };
        let quiet = self.wait_for_quiet(agent.as_ref())?;
        let saturation_run = self.measure(&loads.saturation, agent.as_mut(), memcached)?;
        self.wait_for_quiet(agent.as_ref())?;
        let fixed_run = self.measure(&loads.fixed, agent.as_mut(), memcached)?;
        self.wait_for_quiet(agent.as_ref())?;
        let output = procs::run_checked(
            "memcaslap",
            Command::new("memcaslap").args(&loads.memcaslap_args),
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
        Ok(Run {
            round,
            mode,
            saturation: saturation_run,
            fixed: fixed_run,
            memcaslap_tps,
            lost,
            memory,
            quiet,
        })
    }

    /// The section's method paragraph and the commands and configs that reproduce it.
    fn describe_modes(
        &self,
        section: &mut Section,
        memcached: &Memcached,
        loads: &Loads,
    ) -> anyhow::Result<()> {
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
            loads.saturation.describe(),
            loads.fixed.describe(),
            loads.memcaslap_args.join(" "),
            std::fs::read_to_string(&loads.memcaslap_config)?.trim_end()
        ));
        for mode in [Mode::SocketsOnly, Mode::Capture, Mode::CaptureAll] {
            section.command(format!(
                "# {}\n{}",
                self.config_path(mode).display(),
                procs::agent_config(&[memcached.addr.port()], mode, DEFAULT_MAX_SOCKETS)
            ));
        }
        Ok(())
    }

    /// The medians table, one row per mode against `off`; records the four-mode targets.
    fn modes_summary(&mut self, runs: &[Run]) -> Table {
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
        let base = ModeStats::of(runs, Mode::Off);
        for mode in Mode::ALL {
            let stats = ModeStats::of(runs, mode);
            self.record_mode_targets(mode, &stats, base.ops);
            summary.row(summary_row(mode, &stats, &base));
        }
        summary
    }

    fn record_mode_targets(&mut self, mode: Mode, stats: &ModeStats, base_ops: f64) {
        if mode == Mode::Off {
            self.targets.off_ops_per_sec = Some(base_ops);
        }
        if mode != Mode::Off && base_ops > 0.0 {
            let loss = 1.0 - stats.ops / base_ops;
            match mode {
                Mode::SocketsOnly => {
                    self.targets.sockets_loss = Some(loss);
                    self.targets.sockets_loss_rounds = stats.round_range;
                }
                Mode::Capture => {
                    self.targets.capture_loss = Some(loss);
                    self.targets.capture_loss_rounds = stats.round_range;
                    self.targets.capture_agent_us_per_op = stats.cpu_sat;
                }
                Mode::CaptureAll => {
                    self.targets.capture_all_loss = Some(loss);
                    self.targets.capture_all_agent_us_per_op = stats.cpu_sat;
                }
                // Only in the interleaved rounds, which report them themselves.
                Mode::Off | Mode::SocketsOnlyPortCheck | Mode::CapturePortCheck => {}
            }
        }
    }
}

fn sat_ops(r: &Run) -> f64 {
    r.saturation.load.ops_per_sec()
}

/// The median of `f` over the runs of `mode` (NaN without any).
fn med(runs: &[Run], mode: Mode, f: &dyn Fn(&Run) -> f64) -> f64 {
    median(
        &runs
            .iter()
            .filter(|r| r.mode == mode)
            .map(f)
            .collect::<Vec<_>>(),
    )
    .unwrap_or(f64::NAN)
}

/// One mode's figures over all rounds.
struct ModeStats {
    /// Median saturation throughput, and the best of rounds.
    ops: f64,
    best: f64,
    p99: f64,
    slap_ops: f64,
    fixed_p50: f64,
    fixed_p99: f64,
    cpu_sat: Option<f64>,
    cpu_fixed: Option<f64>,
    /// Summed over rounds, by source.
    lost: BTreeMap<String, u64>,
    /// The largest RSS after a run.
    largest: Option<procs::Memory>,
    /// Lowest and highest loss of one round against `off` of the same round.
    round_range: Option<(f64, f64)>,
}

impl ModeStats {
    fn of(runs: &[Run], mode: Mode) -> ModeStats {
        let sat_p99 = |r: &Run| r.saturation.load.latency.quantile(0.99).unwrap_or(0) as f64;
        let fixed_p50 = |r: &Run| r.fixed.load.latency.quantile(0.50).unwrap_or(0) as f64;
        let fixed_p99 = |r: &Run| r.fixed.load.latency.quantile(0.99).unwrap_or(0) as f64;
        let slap = |r: &Run| r.memcaslap_tps;
        let cpu = |per_million: &dyn Fn(&Run) -> Option<f64>| {
            median(
                &runs
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(per_million)
                    .collect::<Vec<_>>(),
            )
        };
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
        ModeStats {
            ops: med(runs, mode, &sat_ops),
            best: runs
                .iter()
                .filter(|r| r.mode == mode)
                .map(sat_ops)
                .fold(f64::NAN, f64::max),
            p99: med(runs, mode, &sat_p99),
            slap_ops: med(runs, mode, &slap),
            fixed_p50: med(runs, mode, &fixed_p50),
            fixed_p99: med(runs, mode, &fixed_p99),
            cpu_sat: cpu(&|r: &Run| r.saturation.cpu_per_million()),
            cpu_fixed: cpu(&|r: &Run| r.fixed.cpu_per_million()),
            lost,
            largest,
            round_range: round_range(runs, mode),
        }
    }
}

/// Lowest and highest loss of a single round of `mode` against the `off` run of that round.
fn round_range(runs: &[Run], mode: Mode) -> Option<(f64, f64)> {
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
    round_losses
        .iter()
        .copied()
        .fold(None, |range: Option<(f64, f64)>, loss| {
            Some(range.map_or((loss, loss), |(low, high)| (low.min(loss), high.max(loss))))
        })
}

fn summary_row(mode: Mode, stats: &ModeStats, base: &ModeStats) -> Vec<String> {
    vec![
        mode.label().into(),
        thousands(stats.ops),
        ratio(stats.ops, base.ops),
        thousands(stats.best),
        ratio(stats.best, base.best),
        format!("{:.1}", stats.p99 / 1000.0),
        ratio(stats.p99, base.p99),
        thousands(stats.slap_ops),
        ratio(stats.slap_ops, base.slap_ops),
        format!("{:.1}", stats.fixed_p50 / 1000.0),
        format!("{:.1}", stats.fixed_p99 / 1000.0),
        ratio(stats.fixed_p99, base.fixed_p99),
        format_cpu(stats.cpu_sat),
        format_cpu(stats.cpu_fixed),
        if mode == Mode::Off {
            "-".into()
        } else {
            observe::format_losses(&stats.lost)
        },
        stats.largest.map_or("-".into(), |m| m.describe()),
    ]
}

/// Every run, in the order run.
fn raw_table(runs: &[Run]) -> Table {
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
    for run in runs {
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
    raw
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcaslap_summary() {
        let out = "cmd_get: 488331\n\nRun time: 4.0s Ops: 542605 TPS: 135163 Net_rate: 52.1M/s\n";
        assert_eq!(parse_memcaslap_tps(out), Some(135163.0));
        assert_eq!(parse_memcaslap_tps("nothing"), None);
    }
}
