//! The descriptive four-mode comparison (`modes`): off, sockets only, capture and capture
//! without a decoding budget in rotated rounds, each with the xtask generator at saturation and
//! at a fixed rate, then memcaslap; throughput, latency, agent CPU, RSS and losses per mode.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::Context as _;

use super::{
    harness::{format_cpu, Measured},
    loadgen::{self, WORKLOAD},
    observe,
    procs::{self, Memcached, Mode},
    report::{median, micros, ratio, thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS, QUIET_CORES,
};
use crate::util;

impl Bench {
    pub(super) fn overhead_ab(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
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
