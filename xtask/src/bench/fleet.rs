//! `diagnose --prometheus` over 500 hosts' worth of backfilled series (issue 18), timed.

use std::{process::Command, time::Duration};

use anyhow::Context as _;

use super::{procs, report::Section, Bench};
use crate::util;

impl Bench {
    /// Issue 18: `diagnose --prometheus` over 500 hosts' worth of backfilled series answers
    /// within 10 s (tests/tests/fleet.rs, ignored in the normal test run).
    pub(super) fn fleet_diagnose(&mut self) -> anyhow::Result<()> {
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
}
