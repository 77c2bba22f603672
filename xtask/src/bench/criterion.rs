//! The criterion benchmarks the bench runs and reads: decoder throughput (against tshark) and
//! the cost of encoding /metrics with many series.

use std::{process::Command, time::Duration};

use anyhow::bail;

use super::{
    procs,
    report::{thousands, Section, Table},
    Bench,
};
use crate::util;

impl Bench {
    pub(super) fn decoder_throughput(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn scrape_cost(&mut self) -> anyhow::Result<()> {
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
}
