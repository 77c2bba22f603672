//! Reading what the agent and the kernel report: the agent's /metrics and `bpftool` JSON.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _};

/// GET /metrics; the body as text.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    stream
        .take(64 << 20)
        .read_to_end(&mut response)
        .context("reading /metrics")?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("/metrics answer has no header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "/metrics answered {:?}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Samples of the Prometheus text format (comments skipped, escapes in label values kept as-is
/// apart from \" so label matching works on the plain values the agent uses).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => {
                    end = Some(eq + 2 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((name, value));
        match end {
            Some(end) => rest = &rest[end..],
            None => break,
        }
    }
    labels
}

/// The sum of every series of `name`.
pub fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// `name`'s series summed per value of `label`.
pub fn by_label(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.name == name) {
        let key = sample
            .labels
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        *out.entry(key).or_insert(0.0) += sample.value;
    }
    out
}

pub const EVENTS_LOST: &str = "cacheprobe_events_lost_total";

/// Losses per source between two scrapes (sources that did not grow are left out).
pub fn lost_between(before: &[Sample], after: &[Sample]) -> BTreeMap<String, u64> {
    let before = by_label(before, EVENTS_LOST, "source");
    by_label(after, EVENTS_LOST, "source")
        .into_iter()
        .filter_map(|(source, value)| {
            let grown = value - before.get(&source).copied().unwrap_or(0.0);
            (grown > 0.0).then_some((source, grown as u64))
        })
        .collect()
}

pub fn format_losses(losses: &BTreeMap<String, u64>) -> String {
    if losses.is_empty() {
        return "0".to_string();
    }
    losses
        .iter()
        .map(|(source, count)| format!("{source}={count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

fn bpftool_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = super::procs::run_checked(
        "bpftool",
        Command::new("bpftool").args(args),
        Duration::from_secs(30),
    )?;
    serde_json::from_slice(&output.stdout).context("bpftool printed something other than JSON")
}

/// run_time_ns / run_cnt of the given programs (zeros unless kernel.bpf_stats_enabled is 1).
pub fn program_stats(ids: &[u32]) -> anyhow::Result<BTreeMap<u32, ProgramStats>> {
    parse_program_stats(&bpftool_json(&["--json", "prog", "show"])?, ids)
}

fn parse_program_stats(
    json: &serde_json::Value,
    ids: &[u32],
) -> anyhow::Result<BTreeMap<u32, ProgramStats>> {
    let programs = json.as_array().context("bpftool prog show: not a list")?;
    let mut out = BTreeMap::new();
    for program in programs {
        let Some(id) = program["id"].as_u64().map(|id| id as u32) else {
            continue;
        };
        if !ids.contains(&id) {
            continue;
        }
        out.insert(
            id,
            ProgramStats {
                name: program["name"].as_str().unwrap_or("?").to_string(),
                run_time_ns: program["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: program["run_cnt"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(out)
}

/// (run ns, runs) the programs `keep` picks added between two [`program_stats`] readings (a
/// program missing from `before` counts from zero).
pub fn run_deltas(
    before: &BTreeMap<u32, ProgramStats>,
    after: &BTreeMap<u32, ProgramStats>,
    keep: impl Fn(u32, &ProgramStats) -> bool,
) -> (u64, u64) {
    let (mut ns, mut runs) = (0u64, 0u64);
    for (id, stats) in after {
        if !keep(*id, stats) {
            continue;
        }
        let (ns0, runs0) = before
            .get(id)
            .map_or((0, 0), |b| (b.run_time_ns, b.run_cnt));
        ns += stats.run_time_ns.saturating_sub(ns0);
        runs += stats.run_cnt.saturating_sub(runs0);
    }
    (ns, runs)
}

/// Tracing programs (tracepoints, kprobes, fentry...) loaded by anyone but `own`: another agent
/// or tracer running during a measurement adds its own overhead to every syscall.
pub fn foreign_tracing_programs(own: &[u32]) -> anyhow::Result<usize> {
    Ok(count_foreign_tracing(
        &bpftool_json(&["--json", "prog", "show"])?,
        own,
    ))
}

fn count_foreign_tracing(json: &serde_json::Value, own: &[u32]) -> usize {
    json.as_array().map_or(0, |programs| {
        programs
            .iter()
            .filter(|p| {
                matches!(
                    p["type"].as_str(),
                    Some("tracepoint" | "raw_tracepoint" | "kprobe" | "tracing" | "perf_event")
                )
            })
            .filter(|p| {
                p["id"]
                    .as_u64()
                    .is_some_and(|id| !own.contains(&(id as u32)))
            })
            .count()
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInfo {
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
}

/// The given maps with their kernel memory (bytes_memlock).
pub fn maps(ids: &[u32]) -> anyhow::Result<Vec<MapInfo>> {
    let json = bpftool_json(&["--json", "map", "show"])?;
    let list = json.as_array().context("bpftool map show: not a list")?;
    Ok(list
        .iter()
        .filter(|m| {
            m["id"]
                .as_u64()
                .is_some_and(|id| ids.contains(&(id as u32)))
        })
        .map(|m| MapInfo {
            name: m["name"].as_str().unwrap_or("?").to_string(),
            kind: m["type"].as_str().unwrap_or("?").to_string(),
            max_entries: m["max_entries"].as_u64().unwrap_or(0),
            bytes_memlock: m["bytes_memlock"].as_u64().unwrap_or(0),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP cacheprobe_events_lost Events lost.
# TYPE cacheprobe_events_lost counter
cacheprobe_events_lost_total{source="ringbuf"} 0
cacheprobe_events_lost_total{source="payload_ringbuf"} 17
cacheprobe_connections_active{service="bench",role="server",server="127.0.0.1:1"} 3
cacheprobe_connections_active{service="bench",role="client",server="a \"q\", b"} 4
cacheprobe_build_info{version="0.1.0"} 1
process_resident_memory_bytes 1.5e7
"#;

    #[test]
    fn samples_and_sums() {
        let samples = parse_samples(METRICS);
        assert_eq!(samples.len(), 6);
        assert_eq!(total(&samples, "cacheprobe_connections_active"), 7.0);
        assert_eq!(total(&samples, "process_resident_memory_bytes"), 1.5e7);
        let lost = by_label(&samples, EVENTS_LOST, "source");
        assert_eq!(lost.get("payload_ringbuf"), Some(&17.0));
        let client = samples
            .iter()
            .find(|s| s.labels.iter().any(|(l, v)| l == "role" && v == "client"))
            .unwrap();
        assert_eq!(
            client.labels[2],
            ("server".to_string(), "a \"q\", b".to_string())
        );
    }

    #[test]
    fn losses_between_scrapes() {
        let before = parse_samples(METRICS);
        let after = parse_samples(
            "cacheprobe_events_lost_total{source=\"ringbuf\"} 5\n\
             cacheprobe_events_lost_total{source=\"payload_ringbuf\"} 17\n\
             cacheprobe_events_lost_total{source=\"socket_map\"} 2\n",
        );
        let lost = lost_between(&before, &after);
        assert_eq!(
            format_losses(&lost),
            "ringbuf=5, socket_map=2",
            "unchanged sources are left out"
        );
        assert_eq!(format_losses(&BTreeMap::new()), "0");
    }

    #[test]
    fn bpftool_program_json() {
        let json: serde_json::Value = serde_json::from_str(
            r#"[{"id":7,"type":"tracepoint","name":"sys_enter_read","run_time_ns":1000,"run_cnt":10},
                {"id":8,"type":"tracepoint","name":"other_tool"},
                {"id":9,"type":"tracepoint","name":"inet_sock_set_state"}]"#,
        )
        .unwrap();
        let stats = parse_program_stats(&json, &[7, 9]).unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[&7].run_time_ns, 1000);
        assert_eq!(stats[&9].run_cnt, 0, "no stats fields means zero");
        assert!(parse_program_stats(&serde_json::json!({}), &[]).is_err());
        let all: serde_json::Value = serde_json::from_str(
            r#"[{"id":7,"type":"tracepoint"},{"id":8,"type":"kprobe"},
                {"id":9,"type":"cgroup_skb"},{"id":10,"type":"tracepoint"}]"#,
        )
        .unwrap();
        assert_eq!(
            count_foreign_tracing(&all, &[7]),
            2,
            "kprobe 8 and tracepoint 10"
        );
        assert_eq!(count_foreign_tracing(&all, &[7, 8, 10]), 0);
    }
}
