//! What `cacheprobe top` costs: the daemon's CPU at a fixed memcache load with and without an
//! interactive top (in a tmux pane, 1 s refresh) attached, in interleaved rounds, and top's own.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _};

use super::{
    loadgen::LoadSpec,
    procs,
    procs::{Agent, Memcached, Mode},
    report::{median, thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

/// The load: 100k memcache ops/s (this machine may reach less; the table says).
const TOP_RATE: u64 = 100_000;
/// Rounds of (without, with) or (with, without), alternating which goes first.
const TOP_ROUNDS: usize = 4;
const TOP_RUN: Duration = Duration::from_secs(10);
/// Top's first refresh reads two minutes of history; its steady cost starts after that.
const TOP_SETTLE: Duration = Duration::from_secs(3);
/// A tmux server of its own, so the bench never touches anyone's sessions.
const TMUX_SOCKET: &str = "cacheprobe-bench-top";

/// An interactive `cacheprobe top` in a detached tmux pane; the tmux server goes on drop.
struct TopPane {
    top_pid: u32,
    tmux_pid: u32,
}

fn tmux(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("tmux")
        .args(["-L", TMUX_SOCKET])
        .args(args)
        .output()
        .context("cannot run tmux (cargo xtask setup installs it)")?;
    if !output.status.success() {
        bail!(
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

impl TopPane {
    fn start(binary: &Path, socket: &Path) -> anyhow::Result<TopPane> {
        let _ = tmux(&["kill-server"]);
        let command = format!(
            "exec {} top -d 1 --socket {}",
            binary.display(),
            socket.display()
        );
        tmux(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "50",
            &command,
        ])?;
        let pane = TopPane {
            top_pid: tmux(&["display-message", "-p", "-t", "top", "#{pane_pid}"])?
                .parse()
                .context("tmux gave no pane pid")?,
            tmux_pid: tmux(&["display-message", "-p", "#{pid}"])?
                .parse()
                .context("tmux gave no server pid")?,
        };
        procs::sleep(TOP_SETTLE)?;
        let screen = tmux(&["capture-pane", "-p", "-t", "top"])?;
        if !screen.contains("findings:") {
            bail!("cacheprobe top is not showing its view:\n{screen}");
        }
        Ok(pane)
    }
}

impl Drop for TopPane {
    fn drop(&mut self) {
        let _ = tmux(&["kill-server"]);
    }
}

fn hundredths(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.2}"))
}

struct TopRun {
    with_top: bool,
    ops_per_s: f64,
    daemon_cores: f64,
    top_cores: Option<f64>,
    tmux_cores: Option<f64>,
}

impl Bench {
    pub(super) fn top_cost(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("top cost: daemon CPU with and without `cacheprobe top` attached");
        let mut section = Section::new("`cacheprobe top` attached: cost");
        let command = "cargo xtask bench --only top";
        if self.quick {
            section.say(format!(
                "Skipped by `--quick` ({TOP_ROUNDS} rounds of 2 x {} s runs); the full bench \
                 runs `{command}`.",
                TOP_RUN.as_secs()
            ));
            self.finish(section);
            return Ok(());
        }
        let config = self.config_path(Mode::Capture);
        std::fs::write(
            &config,
            procs::agent_config(&[memcached.addr.port()], Mode::Capture, DEFAULT_MAX_SOCKETS),
        )?;
        let socket = self.scratch.join("top-control.sock");
        let mut agent =
            Agent::start_with_control(&self.binary, &config, self.metrics_addr, Some(&socket))?;
        let spec = self.spec(memcached.addr, Some(TOP_RATE), TOP_RUN);
        let mut runs = Vec::new();
        for round in 0..TOP_ROUNDS {
            // ABBA order: drift over the bench (someone else's build starting) hits both.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_top in order {
                runs.push(self.top_run(&spec, &mut agent, memcached, &socket, round, with_top)?);
            }
        }
        agent.stop()?;
        let daemon = |with: bool| -> Vec<f64> {
            runs.iter()
                .filter(|r| r.with_top == with)
                .map(|r| r.daemon_cores)
                .collect()
        };
        // Per round: with minus without, so slow drift cancels.
        let differences: Vec<f64> = runs
            .chunks(2)
            .filter_map(|pair| match pair {
                [a, b] => {
                    let (with, without) = if a.with_top { (a, b) } else { (b, a) };
                    Some(with.daemon_cores - without.daemon_cores)
                }
                _ => None,
            })
            .collect();
        let top_cores: Vec<f64> = runs.iter().filter_map(|r| r.top_cores).collect();
        let ops: Vec<f64> = runs.iter().map(|r| r.ops_per_s).collect();
        let daemon_more = median(&differences);
        let top_median = median(&top_cores);
        let reached = median(&ops).unwrap_or(0.0);
        self.describe_top(&mut section, &spec, reached, &socket, command);
        section.say(format!(
            "**Daemon: {} % of a core more with top attached** (median of the per-round \
             differences; target <= 1 %). Without top: median {} %, with: {} %. **top itself: \
             {} % of a core** (median; target <= 5 %). The machine is shared: other engineers' \
             builds and tests ran during the bench, so single runs move by more than the \
             difference measured; read the per-round rows.",
            hundredths(daemon_more.map(|d| d * 100.0)),
            hundredths(median(&daemon(false)).map(|d| d * 100.0)),
            hundredths(median(&daemon(true)).map(|d| d * 100.0)),
            hundredths(top_median.map(|d| d * 100.0)),
        ));
        section.table("", top_table(&runs));
        self.finish(section);
        Ok(())
    }

    /// One run at the fixed rate, with an interactive top attached or without; the daemon's,
    /// top's and tmux's CPU over it.
    fn top_run(
        &self,
        spec: &LoadSpec,
        agent: &mut Agent,
        memcached: &Memcached,
        socket: &Path,
        round: usize,
        with_top: bool,
    ) -> anyhow::Result<TopRun> {
        let pane = if with_top {
            Some(TopPane::start(&self.binary, socket)?)
        } else {
            None
        };
        let top_before = pane
            .as_ref()
            .map(|p| procs::cpu_seconds(p.top_pid))
            .transpose()?;
        let tmux_before = pane
            .as_ref()
            .map(|p| procs::cpu_seconds(p.tmux_pid))
            .transpose()?;
        let measured = self.measure(spec, Some(agent), memcached)?;
        let elapsed = measured.load.elapsed.as_secs_f64().max(1e-3);
        let cores = |pid: u32, before: Option<f64>| -> anyhow::Result<Option<f64>> {
            before
                .map(|b| Ok((procs::cpu_seconds(pid)? - b) / elapsed))
                .transpose()
        };
        let run = TopRun {
            with_top,
            ops_per_s: measured.load.ops_per_sec(),
            daemon_cores: measured.agent_cpu.unwrap_or(f64::NAN) / elapsed,
            top_cores: match &pane {
                Some(p) => cores(p.top_pid, top_before)?,
                None => None,
            },
            tmux_cores: match &pane {
                Some(p) => cores(p.tmux_pid, tmux_before)?,
                None => None,
            },
        };
        eprintln!(
            "xtask: round {} {}: {} ops/s, daemon {:.1}% of a core{}",
            round + 1,
            if with_top { "with top" } else { "without top" },
            thousands(run.ops_per_s),
            run.daemon_cores * 100.0,
            run.top_cores
                .map_or(String::new(), |c| format!(", top {:.2}%", c * 100.0))
        );
        drop(pane);
        Ok(run)
    }

    /// The method paragraph and the command.
    fn describe_top(
        &self,
        section: &mut Section,
        spec: &LoadSpec,
        reached: f64,
        socket: &Path,
        command: &str,
    ) {
        section.say(format!(
            "The daemon (`run`, capture + decoding as shipped) watches memcached while the bench's \
             load generator drives {} ({}). In each of {TOP_ROUNDS} rounds it runs once without \
             and once with an interactive `cacheprobe top -d 1` attached over the control socket \
             (in a detached 160x50 tmux pane, started {} s before the run so its first two-minute \
             history read is not counted), the order alternating round by round. CPU is user + \
             system time from /proc/PID/stat over each run. {}",
            spec.describe(),
            super::loadgen::WORKLOAD.describe(),
            TOP_SETTLE.as_secs(),
            if reached < TOP_RATE as f64 * 0.95 {
                format!(
                    "This machine did not reach {} ops/s with the agent running: the median \
                     run reached {} ops/s, its saturation here.",
                    thousands(TOP_RATE as f64),
                    thousands(reached)
                )
            } else {
                String::new()
            }
        ));
        section.command(format!(
            "{command}\n{} top -d 1 --socket {}",
            self.binary.display(),
            socket.display()
        ));
    }
}

/// Every run, in the order run.
fn top_table(runs: &[TopRun]) -> Table {
    let percent = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", v * 100.0));
    let mut table = Table::new(&[
        "round",
        "top attached",
        "ops/s reached",
        "daemon CPU (% of a core)",
        "top CPU (% of a core)",
        "tmux server CPU (% of a core)",
    ]);
    for (index, run) in runs.iter().enumerate() {
        table.row(vec![
            (index / 2 + 1).to_string(),
            if run.with_top { "yes" } else { "no" }.into(),
            thousands(run.ops_per_s),
            percent(Some(run.daemon_cores)),
            percent(run.top_cores),
            percent(run.tmux_cores),
        ]);
    }
    table
}
