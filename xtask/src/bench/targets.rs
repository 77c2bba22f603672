//! The targets table at the top of BENCHMARKS.md: each goal, what this run measured and
//! whether it was met, and the findings that say where the cost comes from.

use std::time::Duration;

use super::{
    account, percall, procs,
    report::{megabytes, thousands, Section, Table},
    rounds, toggle, Bench,
};

/// The measured targets from issue 8, filled in as the measures come in.
#[derive(Default)]
pub(super) struct Targets {
    pub(super) sockets_loss: Option<f64>,
    pub(super) capture_loss: Option<f64>,
    /// Lowest and highest loss of one round against the `off` run of the same round: how far
    /// the machine's own noise moves a single comparison.
    pub(super) sockets_loss_rounds: Option<(f64, f64)>,
    pub(super) capture_loss_rounds: Option<(f64, f64)>,
    /// Median saturation throughput with the agent off.
    pub(super) off_ops_per_sec: Option<f64>,
    /// BPF time per memcache op with socket probes only (bpf_stats run).
    pub(super) sockets_bpf_ns_per_op: Option<f64>,
    /// The same with no decoding budget (every connection decoded), for the findings.
    pub(super) capture_all_loss: Option<f64>,
    pub(super) capture_all_agent_us_per_op: Option<f64>,
    /// (achieved ops/s of the 100k step, events lost in it)
    pub(super) loss_at_100k: Option<(f64, u64)>,
    pub(super) rss_at_100k: Option<procs::Memory>,
    pub(super) attach_median: Option<Duration>,
    pub(super) decoder_per_core: Option<f64>,
    /// Agent process CPU per op in capture mode at saturation, µs (= CPU s per million ops).
    pub(super) capture_agent_us_per_op: Option<f64>,
    pub(super) bpf: Option<BpfSplit>,
    pub(super) idle: Option<IdleFinding>,
    /// The interleaved off/on rounds (issue 19), by scenario.
    pub(super) paired: Vec<rounds::ScenarioResult>,
    /// The toggled windows under continuous load (issues 19, 17), by setup and arm.
    pub(super) toggle: Vec<toggle::ArmResult>,
    /// The same goals by accounting (account.rs), by setup and arm.
    pub(super) account: Vec<account::ArmAccount>,
    /// (keys per get, BPF ns per get at 500 KB values over that at 100 B values, the same
    /// ratio for an empty program on the same tracepoints), issue 17.
    pub(super) frame_flatness: Vec<(usize, f64, f64)>,
    /// The decoder on replies of many items (criterion), items per second.
    pub(super) decoder_many_items: Option<f64>,
    /// What one program run costs without bpf_stats (issue 19).
    pub(super) per_call: Option<percall::PerCall>,
}

/// Where the BPF time per memcache op goes, from the bpf_stats run.
pub(super) struct BpfSplit {
    /// All of the agent's programs, per memcache op.
    pub(super) ns_per_op: f64,
    /// (program, share of all BPF time, ns per run)
    pub(super) top: (String, f64, f64),
}

/// The largest idle-connection row.
pub(super) struct IdleFinding {
    pub(super) connections: usize,
    pub(super) settling_cpu_percent: f64,
    pub(super) catch_up_seconds: f64,
    pub(super) idle_cpu_percent: f64,
    pub(super) memory: procs::Memory,
    pub(super) active: f64,
    pub(super) lost: String,
}

impl Bench {
    pub(super) fn targets_section(&self) -> Section {
        let targets = &self.targets;
        let mut table = Table::new(&["target", "goal", "measured", "status"]);
        if !targets.paired.is_empty() {
            rounds::goal_rows(&targets.paired, &mut table);
        } else if targets.toggle.is_empty() {
            targets.four_mode_rows(&mut table);
        }
        toggle::goal_rows(&targets.toggle, &mut table);
        account::goal_rows(&targets.account, &mut table);
        targets.per_call_row(&mut table);
        targets.host_rows(&mut table);
        targets.issue_17_rows(&mut table);
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
        [
            targets.sockets_finding(),
            targets.kernel_finding(),
            targets.user_finding(),
            targets.no_budget_finding(),
            targets.idle_finding(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn status(met: Option<bool>) -> String {
    match met {
        Some(true) => "met".to_string(),
        Some(false) => "**missed**".to_string(),
        None => "not measured".to_string(),
    }
}

fn percent(loss: Option<f64>, rounds: Option<(f64, f64)>) -> String {
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
}

impl Targets {
    /// The sockets-only program run timed by its caller, without bpf_stats' clock reads.
    fn per_call_row(&self, table: &mut Table) {
        let Some(per_call) = &self.per_call else {
            return;
        };
        table.row(vec![
            "BPF per program run without bpf_stats, sockets only (idle receive, all in)".into(),
            format!("<= {} ns (issue 19)", percall::GOAL_NS),
            format!(
                "{}; an empty program: {}; bpf_stats says {}",
                percall::ns(per_call.program),
                percall::ns(per_call.empty),
                percall::ns(per_call.stats_reported)
            ),
            percall::verdict(per_call.program),
        ]);
    }

    /// Without the interleaved rounds only the four-mode table's medians are at hand.
    fn four_mode_rows(&self, table: &mut Table) {
        table.row(vec![
            "throughput, sockets only, saturation (four-mode medians)".into(),
            "<= 1% loss".into(),
            percent(self.sockets_loss, self.sockets_loss_rounds),
            status(self.sockets_loss.map(|l| l <= 0.01)),
        ]);
        table.row(vec![
            "throughput, capture + decoding, saturation (four-mode medians)".into(),
            "<= 3% loss".into(),
            percent(self.capture_loss, self.capture_loss_rounds),
            status(self.capture_loss.map(|l| l <= 0.03)),
        ]);
    }

    /// Losses at 100k ops/s, RSS at 100k connections, start-up time and decoder speed.
    fn host_rows(&self, table: &mut Table) {
        table.row(vec![
            "lost events at 100k ops/s (capture on)".into(),
            "0".into(),
            self.loss_at_100k.map_or("n/a".into(), |(achieved, lost)| {
                format!(
                    "{} lost at {} ops/s achieved",
                    thousands(lost as f64),
                    thousands(achieved)
                )
            }),
            match self.loss_at_100k {
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
            self.rss_at_100k.map_or("n/a".into(), |m| {
                format!(
                    "{} MB VmRSS (private/anon {} MB)",
                    megabytes(m.rss_kb),
                    megabytes(m.anon_kb)
                )
            }),
            status(self.rss_at_100k.map(|m| m.rss_kb <= 50 * 1024)),
        ]);
        table.row(vec![
            "start to probes attached (median of 5)".into(),
            "<= 1 s".into(),
            self.attach_median.map_or("n/a".into(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1000.0)
            }),
            status(self.attach_median.map(|d| d <= Duration::from_secs(1))),
        ]);
        table.row(vec![
            "decoder throughput".into(),
            ">= 5M commands/s/core".into(),
            self.decoder_per_core
                .map_or("n/a".into(), |v| format!("{} commands/s", thousands(v))),
            status(self.decoder_per_core.map(|v| v >= 5e6)),
        ]);
    }

    /// Framing-aware capture's flatness in value size and the decoder on many items.
    fn issue_17_rows(&self, table: &mut Table) {
        for (keys, ratio, empty) in &self.frame_flatness {
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
        if let Some(items) = self.decoder_many_items {
            table.row(vec![
                "decoder on replies of 100 items (issue 17)".into(),
                "recorded".into(),
                format!("{} items/s", thousands(items)),
                "recorded".into(),
            ]);
        }
    }

    fn sockets_finding(&self) -> Option<String> {
        let (Some(bpf_ns), Some(off_ops)) = (self.sockets_bpf_ns_per_op, self.off_ops_per_sec)
        else {
            return None;
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu_ns_per_op = cores as f64 * 1e9 / off_ops.max(1.0);
        let spread = self
            .sockets_loss_rounds
            .map_or(String::new(), |(low, high)| {
                format!(
                    " Single rounds of the A/B scatter from {:.1}% to {:.1}%: that spread is \
                     the machine's, since every round compares runs seconds apart.",
                    100.0 * low,
                    100.0 * high
                )
            });
        Some(format!(
            "* Socket probes only (bpf_stats run): {bpf_ns:.0} ns of BPF per memcache op. With \
             the agent off, memcached and the load generator keep the {cores} cores busy at {} \
             ops/s, {:.1} µs of CPU per op, so the programs take {:.1}% of it. That is the \
             floor of the sockets-only throughput loss; the tracepoint dispatch around each \
             run, which bpf_stats does not count, comes on top.{spread}",
            thousands(off_ops),
            cpu_ns_per_op / 1000.0,
            100.0 * bpf_ns / cpu_ns_per_op
        ))
    }

    fn kernel_finding(&self) -> Option<String> {
        let bpf = self.bpf.as_ref()?;
        Some(format!(
            "* Kernel side (bpf_stats run, capture on): the programs cost {:.0} ns of BPF per \
             memcache op, payload copies included (they happen inside the send/receive \
             programs, for the connections the decoding budget follows); the costliest \
             program is `{}` ({:.0}% of BPF time, {:.0} ns per run). These numbers exclude the \
             tracepoint machinery around each run, which the A/B ratios include.",
            bpf.ns_per_op,
            bpf.top.0,
            100.0 * bpf.top.1,
            bpf.top.2
        ))
    }

    fn user_finding(&self) -> Option<String> {
        let us = self.capture_agent_us_per_op?;
        let decoder = self.decoder_per_core.map_or(String::new(), |per_second| {
            format!(
                "; the criterion decoder alone needs {:.2} µs per command, so the rest is the \
                     pipeline around it (ring reading, tracking, metrics, history, key statistics)",
                1e6 / per_second
            )
        });
        Some(format!(
            "* User side: with capture (default decoding budget) the agent process spends \
             {us:.2} µs of CPU per memcache op (median at saturation), i.e. {:.0}% of one core \
             per 100k ops/s{decoder}.",
            us * 10.0
        ))
    }

    fn no_budget_finding(&self) -> Option<String> {
        let (Some(loss), Some(us)) = (self.capture_all_loss, self.capture_all_agent_us_per_op)
        else {
            return None;
        };
        Some(format!(
            "* Without a decoding budget (`capture_records_per_second = 0`, every connection \
             decoded) throughput loss at saturation is {:.1}% and the agent spends {us:.2} µs \
             of CPU per op: the budget is what keeps capture's cost near that of socket probes \
             alone.",
            100.0 * loss
        ))
    }

    fn idle_finding(&self) -> Option<String> {
        let idle = self.idle.as_ref()?;
        Some(format!(
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
        ))
    }
}
