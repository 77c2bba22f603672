//! `cargo xtask bench --only budget`: what the decoding budget costs in accuracy. For each
//! workload users run and each budget (`limits.capture_records_per_second`, 0 = decode all),
//! the agent's scaled request counters are compared window by window with memcached's own
//! `stats` deltas, next to the captured calls/s and the agent's CPU that budget buys.
//!
//! The loads start before the agent, as pooled clients do on a host whose agent restarts:
//! - many connections: memcaslap, 48 connections, saturating;
//! - a few pooled connections: 3 pymemcache processes holding 2 connections each, multi-key gets
//!   of 10 keys and sets, as fast as they go;
//! - mixed: memcaslap as above on one service and a quiet service beside it on the same agent
//!   (pymemcache, 2 connections, 100 requests/s).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    observe::{self, Sample},
    procs::{self, Agent, ChildGuard, Memcached, Mode},
    report::{thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

/// Budgets measured when `--budgets` names none: the default, lower ones, and decode-all.
const BUDGETS: &[u32] = &[0, 25_000, 10_000, 5_000, 2_500];

/// The pymemcache client every pooled load runs (`python3 - PORT CONNECTIONS KEYS SECONDS RATE
/// POPULATE`): it opens its connections first, then takes a random one for each operation, as a
/// pool hands out whichever connection is free: a set in four (at random too), a multi-key get of
/// KEYS distinct keys (of 2,000, half of them stored) otherwise. (Round robin with a set every
/// fourth operation put every set on the same connection of each pair: a per-service estimator
/// then scaled the sets of a followed connection by a ratio of all its calls, 50-117% off.)
const POOLED_CLIENT: &str = r#"
import random, sys, time
from pymemcache.client.base import Client
port, conns, keys, seconds, rate, populate = (int(a) for a in sys.argv[1:7])
clients = [Client(('127.0.0.1', port), connect_timeout=5, timeout=5, no_delay=True) for _ in range(conns)]
value = b'v' * 100
if populate:
    clients[0].set_many({'bk%d' % i: value for i in range(1000)})
    sys.exit(0)
for c in clients:
    c.version()
deadline = time.monotonic() + seconds
interval = 1.0 / rate if rate else 0.0
due = time.monotonic()
i = 0
while time.monotonic() < deadline:
    c = clients[random.randrange(conns)]
    if random.randrange(4) == 3:
        c.set('bk%d' % random.randrange(1000), value)
    else:
        c.get_many(['bk%d' % k for k in random.sample(range(2000), keys)])
    i += 1
    if interval:
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
"#;

const PYTHON: &str = "/usr/bin/python3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Many,
    Pooled,
    Mixed,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Many, Workload::Pooled, Workload::Mixed];

    fn label(self) -> &'static str {
        match self {
            Workload::Many => "many connections (memcaslap -c 48)",
            Workload::Pooled => "6 pooled connections (pymemcache, 10-key gets)",
            Workload::Mixed => "busy memcaslap + quiet pooled service",
        }
    }
}

/// One look at everything a window compares: the agent's metrics between two readings of each
/// memcached's stats (their mean stands for the moment of the scrape).
struct Snapshot {
    at: Instant,
    samples: Vec<Sample>,
    /// Per service name: get_hits, get_misses, cmd_set, bytes_read.
    stats: BTreeMap<&'static str, [f64; 4]>,
    agent_cpu: f64,
}

/// What one view (service and role) saw in one window, and what memcached counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Window {
    /// The agent's scaled counts: get hits, get misses, sets (any status).
    agent: [f64; 3],
    /// memcached's get_hits, get_misses, cmd_set deltas.
    truth: [f64; 3],
    /// Request bytes: the agent's scaled count (`received` by the server, `sent` by the
    /// client) and memcached's `bytes_read`.
    agent_bytes: f64,
    truth_bytes: f64,
}

impl Window {
    fn gets(counts: &[f64; 3]) -> f64 {
        counts[0] + counts[1]
    }

    /// Relative errors of gets, sets, hits and misses (None where memcached counted none).
    fn errors(&self) -> [Option<f64>; 4] {
        let rel = |agent: f64, truth: f64| (truth > 0.0).then(|| (agent - truth) / truth);
        [
            rel(Window::gets(&self.agent), Window::gets(&self.truth)),
            rel(self.agent[2], self.truth[2]),
            rel(self.agent[0], self.truth[0]),
            rel(self.agent[1], self.truth[1]),
        ]
    }

    /// Relative errors of gets and sets if the followed connections' counts were scaled by the
    /// share of all request bytes they carried (a ratio estimator) instead of by 1/p.
    fn byte_ratio_errors(&self) -> [Option<f64>; 2] {
        if self.agent_bytes <= 0.0 {
            return [None; 2];
        }
        let scale = self.truth_bytes / self.agent_bytes;
        let rel = |agent: f64, truth: f64| (truth > 0.0).then(|| (agent * scale - truth) / truth);
        [
            rel(Window::gets(&self.agent), Window::gets(&self.truth)),
            rel(self.agent[2], self.truth[2]),
        ]
    }

    /// The agent's hit ratio minus memcached's, in points (None when either saw no get).
    fn hit_ratio_error(&self) -> Option<f64> {
        let ratio = |c: &[f64; 3]| (Window::gets(c) > 0.0).then(|| c[0] / Window::gets(c));
        Some(100.0 * (ratio(&self.agent)? - ratio(&self.truth)?))
    }

    /// memcached served this view's traffic but the agent reported none of it.
    fn blank(&self) -> bool {
        Window::gets(&self.truth) + self.truth[2] > 0.0
            && Window::gets(&self.agent) + self.agent[2] == 0.0
    }
}

/// Mean and largest absolute relative error, in percent, over the windows that had any.
fn error_summary(errors: impl IntoIterator<Item = Option<f64>>) -> Option<(f64, f64)> {
    let values: Vec<f64> = errors.into_iter().flatten().map(f64::abs).collect();
    if values.is_empty() {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let max = values.iter().copied().fold(0.0, f64::max);
    Some((100.0 * mean, 100.0 * max))
}

fn format_errors(summary: Option<(f64, f64)>) -> String {
    summary.map_or("n/a".to_string(), |(mean, max)| {
        format!("{mean:.1} / {max:.1}")
    })
}

/// The `q` quantile of a cumulative Prometheus histogram (upper bound, cumulative count; +Inf
/// last), interpolated linearly inside its bucket.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let wanted = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= wanted {
            if !bound.is_finite() {
                return Some(lower);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (wanted - below) / inside
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * share);
        }
        (lower, below) = (bound, count);
    }
    None
}

/// One view's labels in the agent's metrics.
fn matches(sample: &Sample, service: &str, role: &str) -> bool {
    let label = |name: &str| {
        sample
            .labels
            .iter()
            .find(|(l, _)| l == name)
            .map(|(_, v)| v.as_str())
    };
    label("service") == Some(service) && label("role") == Some(role)
}

fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample
        .labels
        .iter()
        .find(|(l, _)| l == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The agent's get hits, get misses and sets of one view.
fn agent_counts(samples: &[Sample], service: &str, role: &str) -> [f64; 3] {
    let mut counts = [0.0; 3];
    for sample in samples
        .iter()
        .filter(|s| s.name == "cacheprobe_memcache_requests_total" && matches(s, service, role))
    {
        match (label(sample, "command"), label(sample, "status")) {
            ("get", "hit") => counts[0] += sample.value,
            ("get", "miss") => counts[1] += sample.value,
            ("set", _) => counts[2] += sample.value,
            _ => {}
        }
    }
    counts
}

/// The agent's (scaled) request bytes of one view: what the server received, the client sent.
fn request_bytes(samples: &[Sample], service: &str, role: &str) -> f64 {
    let direction = if role == "server" { "received" } else { "sent" };
    samples
        .iter()
        .filter(|s| {
            s.name == "cacheprobe_memcache_bytes_total"
                && matches(s, service, role)
                && label(s, "direction") == direction
        })
        .map(|s| s.value)
        .sum()
}

/// Get latency histogram of one view: (upper bound in seconds, cumulative count).
fn get_latency_buckets(samples: &[Sample], service: &str, role: &str) -> BTreeMap<String, f64> {
    let mut buckets = BTreeMap::new();
    for sample in samples.iter().filter(|s| {
        s.name == "cacheprobe_memcache_request_duration_seconds_bucket"
            && matches(s, service, role)
            && label(s, "command") == "get"
    }) {
        *buckets
            .entry(label(sample, "le").to_string())
            .or_insert(0.0) += sample.value;
    }
    buckets
}

fn latency_quantiles(first: &[Sample], last: &[Sample], service: &str, role: &str) -> String {
    let before = get_latency_buckets(first, service, role);
    let mut buckets: Vec<(f64, f64)> = get_latency_buckets(last, service, role)
        .into_iter()
        .filter_map(|(le, count)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, count - before.get(&le).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let us = |q| {
        histogram_quantile(&buckets, q).map_or("n/a".to_string(), |s| format!("{:.0}", s * 1e6))
    };
    format!("{} / {}", us(0.5), us(0.99))
}

/// Every `stats` value of the memcached at `addr`.
fn memcached_stats(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"stats\r\n")?;
    let mut stats = BTreeMap::new();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.starts_with("END") {
            break;
        }
        let mut parts = line.split_whitespace();
        if let (Some("STAT"), Some(name), Some(value)) = (parts.next(), parts.next(), parts.next())
        {
            if let Ok(value) = value.parse() {
                stats.insert(name.to_string(), value);
            }
        }
    }
    Ok(stats)
}

fn get_stats(addr: SocketAddr) -> anyhow::Result<[f64; 4]> {
    let stats = memcached_stats(addr)?;
    let value = |name: &str| {
        stats
            .get(name)
            .copied()
            .with_context(|| format!("memcached stats on {addr} has no {name}"))
    };
    Ok([
        value("get_hits")?,
        value("get_misses")?,
        value("cmd_set")?,
        value("bytes_read")?,
    ])
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

/// The two services every run's agent watches.
const BUSY: &str = "bench";
const QUIET: &str = "bench-1";

/// One budget on one workload: its windows per view, and what the agent spent.
struct Run {
    workload: Workload,
    budget: u32,
    /// "this" build, or the `--baseline` one.
    build: &'static str,
    /// Times the agent said its capture sample changed: during the windows, and in all.
    changes: (u64, u64),
    /// Per (service, role): its windows.
    views: BTreeMap<(&'static str, &'static str), Vec<Window>>,
    latency: BTreeMap<(&'static str, &'static str), String>,
    ratios: Vec<f64>,
    /// Per service: memcached's gets (keys) and sets per second.
    ops_per_second: BTreeMap<&'static str, f64>,
    calls_per_second: f64,
    agent_cores: f64,
    lost: String,
    load: String,
}

impl Bench {
    pub(super) fn budget_accuracy(&mut self) -> anyhow::Result<()> {
        util::step("decoding budget: accuracy against memcached's stats");
        let budgets: Vec<u32> = if self.budgets.is_empty() {
            BUDGETS.to_vec()
        } else {
            self.budgets.clone()
        };
        // Errors of one run persist from window to window (the same connections stay followed),
        // so fresh draws (repeats, new connections) matter more than long runs.
        let (repeats, windows, window) = if self.quick {
            (1, 2, Duration::from_secs(4))
        } else {
            (2, 3, Duration::from_secs(5))
        };
        let busy = Memcached::start(procs::free_port(17311)?, Some(4096))?;
        let quiet = Memcached::start(procs::free_port(busy.addr.port() + 1)?, None)?;
        for server in [&busy, &quiet] {
            self.memcached_lines.push(server.command_line.clone());
            procs::run_checked(
                "pymemcache populate",
                Command::new(PYTHON).args(pooled_args(server.addr.port(), 1, 1, 0, 0, true)),
                Duration::from_secs(60),
            )?;
        }
        let memcaslap_config = self.scratch.join("budget-memcaslap.cfg");
        std::fs::write(
            &memcaslap_config,
            "key\n25 25 1\nvalue\n100 100 1\ncmd\n0 0.1\n1 0.9\n",
        )?;
        // With --baseline each run of this build is paired with one of the baseline, right
        // after or before it (alternating by repeat), so both see the same machine load.
        let mut builds = vec![("this", self.binary.clone())];
        if let Some(baseline) = &self.baseline {
            builds.push(("baseline", baseline.clone()));
        }
        let mut runs = Vec::new();
        for repeat in 0..repeats {
            for workload in Workload::ALL {
                for &budget in &budgets {
                    let mut order = builds.clone();
                    if repeat % 2 == 1 {
                        order.reverse();
                    }
                    for (build, binary) in order {
                        eprintln!(
                            "xtask: repeat {}/{repeats}: budget {budget} on {}, {build} build \
                             (load average {})",
                            repeat + 1,
                            workload.label(),
                            load_average()
                        );
                        runs.push(self.budget_run(
                            (build, &binary),
                            workload,
                            budget,
                            [&busy, &quiet],
                            &memcaslap_config,
                            windows,
                            window,
                        )?);
                    }
                }
            }
        }
        let mut section = Section::new("Decoding budget: accuracy against memcached's stats");
        section.say(format!(
            "Each budget (`limits.capture_records_per_second`; 0 decodes every connection) on each \
             workload: the loads start, then the agent (their connections predate it, as after an \
             agent restart), 5 s to settle, then {windows} windows of {} s; {repeats} runs (fresh \
             connections, so fresh draws of the sample) per budget and workload, their windows \
             pooled. In each window the \
             agent's scaled `cacheprobe_memcache_requests_total` (get hit, get miss, set) of one \
             view (service, role) is compared with memcached's `get_hits`, `get_misses` and \
             `cmd_set` deltas (read just before and just after the scrape, averaged). Errors are \
             mean / largest |relative error| over the windows, in percent; hit ratio: largest \
             |agent - memcached| in points; blank: windows in which the view showed none of the \
             traffic memcached served. Latency: get p50 / p99 (us, interpolated in the agent's \
             histogram buckets) over all windows, unscaled. Predicted sd: the relative standard \
             deviation of a scaled count when each of n equally busy connections is followed \
             with probability p, sqrt((1/p - 1) / n), at the median p seen. By bytes: the errors if \
             the followed connections' counts were scaled by all connections' request bytes \
             (memcached's `bytes_read`, what sock_diag's tcp_info would give the agent) over \
             the followed ones' (the agent's scaled `cacheprobe_memcache_bytes_total`), a ratio \
             estimator, instead of by 1/p. memcached ops/s: gets (keys) and sets. Captured calls/s: \
             `cacheprobe_capture_calls_total`; agent CPU in cores; load: 1-minute load average \
             at the end.",
            window.as_secs()
        ));
        section.command(format!(
            "cargo xtask bench --only budget{}",
            if self.budgets.is_empty() {
                String::new()
            } else {
                format!(
                    " --budgets {}",
                    budgets
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ));
        section.say(format!(
            "memcaslap -s ADDR -t SECONDS -c 48 -T 2 -F CFG (100 B values, 9 gets : 1 set); \
             pooled clients: {PYTHON} with pymemcache, script in xtask/src/bench/budget.rs"
        ));
        if let Some(baseline) = &self.baseline {
            section.say(format!(
                "Side by side: every run of this build is paired with one of the baseline build \
                 ({}), run right after it (right before it in odd repeats), under the same load. \
                 Sample changes: the agent's `capture sample changed` log lines during the \
                 windows / from its start.",
                baseline.display()
            ));
        }
        section.table("", budget_table(&runs));
        self.finish(section);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn budget_run(
        &self,
        (build, binary): (&'static str, &std::path::Path),
        workload: Workload,
        budget: u32,
        servers: [&Memcached; 2],
        memcaslap_config: &std::path::Path,
        windows: usize,
        window: Duration,
    ) -> anyhow::Result<Run> {
        let settle = Duration::from_secs(5);
        // The loads outlast the agent's start (slow under load) and every window; they are
        // stopped after the last one.
        let seconds = (settle + window * windows as u32).as_secs() + 60;
        let [busy, quiet] = servers;
        let memcaslap = || -> anyhow::Result<ChildGuard> {
            ChildGuard::spawn(
                "memcaslap",
                Command::new("memcaslap")
                    .args(["-s", &busy.addr.to_string(), "-t", &format!("{seconds}s")])
                    .args(["-c", "48", "-T", "2", "-F"])
                    .arg(memcaslap_config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        };
        let pooled = |port: u16, connections: u32, keys: u32, rate: u32| {
            ChildGuard::spawn(
                "pymemcache",
                Command::new(PYTHON)
                    .args(pooled_args(port, connections, keys, seconds, rate, false))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null()),
            )
        };
        let mut loads = Vec::new();
        match workload {
            Workload::Many => loads.push(memcaslap()?),
            Workload::Pooled => {
                for _ in 0..3 {
                    loads.push(pooled(busy.addr.port(), 2, 10, 0)?);
                }
            }
            Workload::Mixed => {
                loads.push(memcaslap()?);
                loads.push(pooled(quiet.addr.port(), 2, 5, 100)?);
            }
        }
        procs::sleep(Duration::from_secs(1))?;
        let config = self.scratch.join("agent-budget.toml");
        let mut text = procs::agent_config(
            &[busy.addr.port(), quiet.addr.port()],
            Mode::Capture,
            DEFAULT_MAX_SOCKETS,
        );
        text.push_str(&format!("capture_records_per_second = {budget}\n"));
        std::fs::write(&config, text)?;
        let mut agent = Agent::start(binary, &config, self.metrics_addr)?;
        procs::sleep(settle)?;
        let snapshot = |agent: &Agent| -> anyhow::Result<Snapshot> {
            // Decoding everything at saturation on a loaded machine, the agent may take longer
            // than the scrape's 5 s to answer: try again (the stats are read again around it).
            let mut attempt = 0;
            let (before, samples) = loop {
                let before = [get_stats(busy.addr)?, get_stats(quiet.addr)?];
                match observe::scrape(agent.metrics_addr) {
                    Ok(text) => break (before, observe::parse_samples(&text)),
                    Err(err) if attempt < 2 => {
                        eprintln!("xtask: /metrics did not answer ({err:#}); trying again");
                        attempt += 1;
                    }
                    Err(err) => return Err(err.context("/metrics failed 3 times")),
                }
            };
            let at = Instant::now();
            let after = [get_stats(busy.addr)?, get_stats(quiet.addr)?];
            let mean = |i: usize| -> [f64; 4] {
                std::array::from_fn(|k| (before[i][k] + after[i][k]) / 2.0)
            };
            Ok(Snapshot {
                at,
                samples,
                stats: BTreeMap::from([(BUSY, mean(0)), (QUIET, mean(1))]),
                agent_cpu: procs::cpu_seconds(agent.pid())?,
            })
        };
        let mut snapshots = vec![snapshot(&agent)?];
        let changes_before = agent.sample_changes();
        for _ in 0..windows {
            procs::sleep(window)?;
            for load in &mut loads {
                load.check_running()?;
            }
            agent.check_running()?;
            snapshots.push(snapshot(&agent)?);
        }
        let load = load_average();
        let changes = agent.sample_changes();
        let changes = (changes - changes_before, changes);
        drop(loads);
        agent.stop()?;

        let (first, last) = (&snapshots[0], &snapshots[snapshots.len() - 1]);
        let elapsed = (last.at - first.at).as_secs_f64();
        let mut views = BTreeMap::new();
        let mut latency = BTreeMap::new();
        let services: &[&'static str] = match workload {
            Workload::Mixed => &[BUSY, QUIET],
            _ => &[BUSY],
        };
        for &service in services {
            for role in ["server", "client"] {
                let windows: Vec<Window> = snapshots
                    .windows(2)
                    .map(|pair| {
                        let (a, b) = (&pair[0], &pair[1]);
                        let agent_a = agent_counts(&a.samples, service, role);
                        let agent_b = agent_counts(&b.samples, service, role);
                        Window {
                            agent: std::array::from_fn(|k| agent_b[k] - agent_a[k]),
                            truth: std::array::from_fn(|k| {
                                b.stats[service][k] - a.stats[service][k]
                            }),
                            agent_bytes: request_bytes(&b.samples, service, role)
                                - request_bytes(&a.samples, service, role),
                            truth_bytes: b.stats[service][3] - a.stats[service][3],
                        }
                    })
                    .collect();
                views.insert((service, role), windows);
                latency.insert(
                    (service, role),
                    latency_quantiles(&first.samples, &last.samples, service, role),
                );
            }
        }
        let calls = observe::total(&last.samples, "cacheprobe_capture_calls_total")
            - observe::total(&first.samples, "cacheprobe_capture_calls_total");
        Ok(Run {
            workload,
            budget,
            build,
            changes,
            views,
            latency,
            ratios: snapshots[1..]
                .iter()
                .map(|s| observe::total(&s.samples, "cacheprobe_capture_sample_ratio"))
                .collect(),
            ops_per_second: [BUSY, QUIET]
                .into_iter()
                .map(|service| {
                    let done = |s: &Snapshot| s.stats[service][..3].iter().sum::<f64>();
                    (service, (done(last) - done(first)) / elapsed)
                })
                .collect(),
            calls_per_second: calls / elapsed,
            agent_cores: (last.agent_cpu - first.agent_cpu) / elapsed,
            lost: observe::format_losses(&observe::lost_between(&first.samples, &last.samples)),
            load,
        })
    }
}

fn pooled_args(
    port: u16,
    connections: u32,
    keys: u32,
    seconds: u64,
    rate: u32,
    populate: bool,
) -> Vec<String> {
    let mut args = vec!["-c".to_string(), POOLED_CLIENT.to_string()];
    args.extend([
        port.to_string(),
        connections.to_string(),
        keys.to_string(),
        seconds.to_string(),
        rate.to_string(),
        u8::from(populate).to_string(),
    ]);
    args
}

/// Connections at each end of one view's traffic (see the module doc).
fn connections(workload: Workload, service: &str) -> f64 {
    match (workload, service) {
        (Workload::Pooled, _) => 6.0,
        (Workload::Mixed, QUIET) => 2.0,
        _ => 48.0,
    }
}

/// The relative standard deviation of a count scaled by 1/p when each of `n` equally busy
/// connections is followed with probability `p`.
fn predicted_sd(p: f64, n: f64) -> f64 {
    if p >= 1.0 || p <= 0.0 {
        0.0
    } else {
        ((1.0 / p - 1.0) / n).sqrt()
    }
}

fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, count) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// One row per workload, view and budget, the windows of all its runs pooled.
fn budget_table(runs: &[Run]) -> Table {
    let mut table = Table::new(&[
        "workload",
        "view",
        "budget",
        "build",
        "followed",
        "sample changes (windows / all)",
        "gets err %",
        "sets err %",
        "hits err %",
        "misses err %",
        "predicted sd %",
        "gets / sets err % by bytes",
        "hit ratio err pp",
        "blank",
        "get p50 / p99 us",
        "memcached ops/s",
        "captured calls/s",
        "agent CPU",
        "lost",
        "load",
    ]);
    let mut groups: Vec<(Workload, u32, &str)> = Vec::new();
    for run in runs {
        if !groups.contains(&(run.workload, run.budget, run.build)) {
            groups.push((run.workload, run.budget, run.build));
        }
    }
    for (workload, budget, build) in groups {
        let group: Vec<&Run> = runs
            .iter()
            .filter(|r| r.workload == workload && r.budget == budget && r.build == build)
            .collect();
        let mut ratios: Vec<f64> = group
            .iter()
            .flat_map(|r| r.ratios.iter().copied())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let (low, high) = (
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
        );
        let median_ratio = super::report::median(&ratios).unwrap_or(f64::NAN);
        for view in group[0].views.keys() {
            let windows: Vec<Window> = group
                .iter()
                .flat_map(|r| r.views[view].iter().copied())
                .collect();
            let errors: Vec<[Option<f64>; 4]> = windows.iter().map(Window::errors).collect();
            let column = |k: usize| format_errors(error_summary(errors.iter().map(|e| e[k])));
            let by_bytes: Vec<[Option<f64>; 2]> =
                windows.iter().map(Window::byte_ratio_errors).collect();
            let ratio_error = windows
                .iter()
                .filter_map(Window::hit_ratio_error)
                .map(f64::abs)
                .fold(None, |max: Option<f64>, e| {
                    Some(max.map_or(e, |m| m.max(e)))
                });
            let (service, role) = view;
            table.row(vec![
                workload.label().to_string(),
                format!("{service} {role}"),
                if budget == 0 {
                    "0 (all)".to_string()
                } else {
                    thousands(f64::from(budget))
                },
                build.to_string(),
                if low == high {
                    format!("1/{:.0}", 1.0 / low)
                } else {
                    format!("1/{:.0}..1/{:.0}", 1.0 / high, 1.0 / low)
                },
                group
                    .iter()
                    .map(|r| format!("{} / {}", r.changes.0, r.changes.1))
                    .collect::<Vec<_>>()
                    .join(", "),
                column(0),
                column(1),
                column(2),
                column(3),
                format!(
                    "{:.1}",
                    100.0 * predicted_sd(median_ratio, connections(workload, service))
                ),
                format!(
                    "{} ; {}",
                    format_errors(error_summary(by_bytes.iter().map(|e| e[0]))),
                    format_errors(error_summary(by_bytes.iter().map(|e| e[1])))
                ),
                ratio_error.map_or("n/a".to_string(), |e| format!("{e:.1}")),
                format!(
                    "{}/{}",
                    windows.iter().filter(|w| w.blank()).count(),
                    windows.len()
                ),
                group
                    .iter()
                    .map(|r| r.latency[view].clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                thousands(mean(group.iter().map(|r| r.ops_per_second[service]))),
                thousands(mean(group.iter().map(|r| r.calls_per_second))),
                format!("{:.2}", mean(group.iter().map(|r| r.agent_cores))),
                group
                    .iter()
                    .map(|r| r.lost.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                group
                    .iter()
                    .map(|r| r.load.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_errors_are_relative_to_memcached() {
        let window = Window {
            agent: [110.0, 90.0, 0.0],
            truth: [100.0, 100.0, 50.0],
            agent_bytes: 500.0,
            truth_bytes: 1000.0,
        };
        let errors = window.errors();
        assert_eq!(errors[0], Some(0.0), "gets: 200 against 200");
        assert_eq!(errors[1], Some(-1.0), "sets: none seen");
        assert!((errors[2].unwrap() - 0.1).abs() < 1e-9);
        assert!((errors[3].unwrap() + 0.1).abs() < 1e-9);
        assert!((window.hit_ratio_error().unwrap() - 5.0).abs() < 1e-9);
        assert!(!window.blank());
        // Half the request bytes seen: counts doubled.
        let [gets, sets] = window.byte_ratio_errors();
        assert!((gets.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(sets, Some(-1.0));
        let blank = Window {
            agent: [0.0; 3],
            truth: [1.0, 0.0, 0.0],
            ..Window::default()
        };
        assert!(blank.blank());
        assert_eq!(blank.byte_ratio_errors(), [None; 2]);
        assert_eq!(blank.hit_ratio_error(), None);
        assert!(!Window::default().blank(), "no traffic is not a blank");
        assert_eq!(predicted_sd(1.0, 6.0), 0.0);
        assert!((predicted_sd(0.25, 48.0) - 0.25).abs() < 1e-12);
        assert_eq!(Window::default().errors(), [None; 4]);
    }

    #[test]
    fn error_summaries_skip_windows_without_traffic() {
        assert_eq!(error_summary([None, None]), None);
        let (mean, max) = error_summary([Some(0.1), None, Some(-0.3)]).unwrap();
        assert!((mean - 20.0).abs() < 1e-9);
        assert!((max - 30.0).abs() < 1e-9);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let buckets = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((histogram_quantile(&buckets, 0.5).unwrap() - 0.001).abs() < 1e-12);
        assert!((histogram_quantile(&buckets, 0.7).unwrap() - 0.0015).abs() < 1e-12);
        assert!((histogram_quantile(&buckets, 0.95).unwrap() - 0.003).abs() < 1e-12);
        assert_eq!(histogram_quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(
            histogram_quantile(&[(0.001, 0.0), (f64::INFINITY, 4.0)], 0.5),
            Some(0.001),
            "beyond the last bound: that bound"
        );
    }

    #[test]
    fn agent_counts_take_one_view() {
        let samples = observe::parse_samples(
            "cacheprobe_memcache_requests_total{service=\"bench\",server=\"a\",role=\"server\",command=\"get\",status=\"hit\"} 5\n\
             cacheprobe_memcache_requests_total{service=\"bench\",server=\"b\",role=\"server\",command=\"get\",status=\"hit\"} 2\n\
             cacheprobe_memcache_requests_total{service=\"bench\",server=\"a\",role=\"client\",command=\"get\",status=\"hit\"} 100\n\
             cacheprobe_memcache_requests_total{service=\"bench\",server=\"a\",role=\"server\",command=\"get\",status=\"miss\"} 3\n\
             cacheprobe_memcache_requests_total{service=\"bench\",server=\"a\",role=\"server\",command=\"set\",status=\"stored\"} 4\n\
             cacheprobe_memcache_requests_total{service=\"bench\",server=\"a\",role=\"server\",command=\"stats\",status=\"ok\"} 9\n\
             cacheprobe_memcache_requests_total{service=\"bench-1\",server=\"a\",role=\"server\",command=\"set\",status=\"stored\"} 40\n",
        );
        assert_eq!(agent_counts(&samples, "bench", "server"), [7.0, 3.0, 4.0]);
        assert_eq!(
            agent_counts(&samples, "bench-1", "server"),
            [0.0, 0.0, 40.0]
        );
    }
}
