//! BENCHMARKS.md as a whole: the machine's facts, how the numbers are taken, then the sections.

use std::{path::Path, process::Command, time::Instant};

use anyhow::Context as _;

use super::{
    report::{Section, Table},
    Bench, BenchOptions,
};
use crate::util;

fn first_line(text: Option<String>) -> String {
    text.unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

pub(super) fn machine_facts() -> Vec<(&'static str, String)> {
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

impl Bench {
    /// Writes the whole document to `output`: the command, the machine's facts (with the load
    /// average now and the bench's duration), the targets, the method, then every section.
    pub(super) fn write_document(
        &self,
        options: &BenchOptions,
        facts: &[(&'static str, String)],
        started: Instant,
        output: &Path,
    ) -> anyhow::Result<()> {
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
            "Written by `cargo xtask bench` (xtask/src/bench/); every number below comes from one \
             invocation on the machine described here. Rerun the command to reproduce.\n\n",
        );
        text.push_str(&format!("Command: `{command}` (as root)\n\n"));
        let mut facts_table = Table::new(&["fact", "value"]);
        for (name, value) in facts {
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
        text.push_str(&self.targets_section().markdown());
        text.push_str(&self.method_section().markdown());
        for section in &self.sections {
            text.push_str(&section.markdown());
        }
        let existing = match std::fs::read_to_string(output) {
            Ok(existing) => Some(existing),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", output.display()))
            }
        };
        let text = match existing {
            Some(existing) => splice(&existing, &text),
            None => text,
        };
        std::fs::write(output, text).with_context(|| format!("cannot write {}", output.display()))
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
             `limits.capture_bytes = 0`: the send/receive probes copy no payload; \
             `limits.socket_probes_on_demand = false`: they stay attached, to measure what they \
             cost) and `capture + \
             decoding` (`capture = true`, `capture_bytes = 65536`, the default decoding budget of \
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
}

/// The line that opens a generated report; what precedes it in an existing file is written by
/// hand (status, sections of single measures with their commands) and is kept.
const GENERATED_OPENING: &str = "Written by `cargo xtask bench`";

/// `generated` (a whole report, title included) put into `existing` in place of the previous
/// generated part: the hand-written head of `existing` stays, everything from its generated
/// opening on is replaced. A file without a generated part keeps all of its text and gets the
/// report appended.
pub(super) fn splice(existing: &str, generated: &str) -> String {
    let body = generated
        .find(GENERATED_OPENING)
        .map_or(generated, |at| &generated[at..]);
    let head = match existing.find(GENERATED_OPENING) {
        Some(at) => &existing[..at],
        None if existing.trim().is_empty() => return generated.to_string(),
        None => existing,
    };
    let mut text = head.trim_end().to_string();
    text.push_str("\n\n\n");
    text.push_str(body);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str =
        "# cacheprobe benchmarks\n\nWritten by `cargo xtask bench` (x); new.\n\n## Targets\nnew\n";

    #[test]
    fn a_full_run_replaces_only_the_previous_generated_part() {
        let existing = "# cacheprobe benchmarks\n\n> status by hand\n\n## A hand section\nkept\n\n\nWritten by `cargo xtask bench` (x); old.\n\n## Targets\nold\n";
        let text = splice(existing, NEW);
        assert!(text.starts_with("# cacheprobe benchmarks\n\n> status by hand"));
        assert!(text.contains("## A hand section\nkept"));
        assert!(text.contains("new.\n\n## Targets\nnew"));
        assert!(!text.contains("old"));
        assert_eq!(text.matches("# cacheprobe benchmarks").count(), 1);
    }

    #[test]
    fn a_file_without_a_generated_part_keeps_its_text() {
        let text = splice("# notes\n\nby hand\n", NEW);
        assert!(text.starts_with("# notes\n\nby hand\n"));
        assert!(text.ends_with("## Targets\nnew\n"));
        assert_eq!(splice("", NEW), NEW);
    }
}
