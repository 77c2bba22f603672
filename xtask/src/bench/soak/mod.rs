//! `cargo xtask bench --soak MINUTES`: the agent under hours-like load, checked for leaks, losses
//! and counters that disagree with what the load generator itself did.
//!
//! Three generators run at once against one memcached (`-o idle_timeout=2`, every key stored
//! before the agent starts): steady traffic at a fixed rate on pooled connections used round
//! robin (re-opened every 10 s slice; one that memcached closes anyway after a stall of the
//! generator is re-opened and counted), churn (connections opened,
//! used for one `gets` and closed, 500 a second, from rotating loopback sources so TIME_WAIT
//! does not run out of ports), and idle connections that memcached times out, each followed by
//! one write onto the closed connection (a dead write). Every slice the agent's RSS and open fds
//! are sampled.
//!
//! Request counters are exact while the agent decodes every connection. Once its decoding
//! budget makes it sample connections (ratio p), they are estimates: each followed connection's
//! requests count 1/p times, so the estimate is unbiased and its variance is the sum over
//! connections of (1/p - 1) * requests^2. The checks allow four standard deviations of that,
//! computed from the requests each connection of this run carried and the ratio during its
//! slice; churn uses `gets`, a command nothing else sends, so its many one-request connections
//! get a check of their own, far tighter than the few heavy steady connections allow. The
//! agent's hits and misses are also checked against memcached's own `get_hits`/`get_misses`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    loadgen::{self, LoadSpec, Pool, WORKLOAD},
    observe::{self, Sample},
    procs::{self, agent_config, Agent, Memcached, Mode},
};
use checks::Ledger;
use load::{Counted, Counts, Generators};

mod checks;
mod load;

/// Requests per second of the steady generator.
pub const RATE: u64 = 50_000;
/// The steady pool. The sampled estimate's variance is (1/p - 1) * requests^2 summed over
/// connections: the same requests over 4 times the connections halve its standard deviation
/// (64 allowed +-57% at 1/16 in 2 minutes; 256, +-29%).
const STEADY_CONNECTIONS: usize = 256;
pub const CHURN_PER_SECOND: u64 = 500;
/// Connections a second left idle until memcached's idle timeout closes them.
const IDLE_PER_SECOND: u64 = 5;
const MEMCACHED_IDLE_TIMEOUT: &str = "idle_timeout=2";
const SLICE: Duration = Duration::from_secs(10);
/// Allowed growth after warm-up.
const RSS_SLACK_KB: u64 = 5 * 1024;
const FD_SLACK: u64 = 10;
/// Loopback sources the churn and idle connections rotate through.
const SOURCES: usize = 16;

struct Point {
    at: Duration,
    rss_kb: u64,
    fds: u64,
    ops_per_sec: f64,
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("agent {pid} is gone"))?
        .count() as u64)
}

fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// The counters' settling after the load stops: polled until they match the generators (or
/// stop moving), at most this long. The agent reports the last closes a little after the
/// generators see them, and a dead write whose fate it did not see after 5 s
/// (dead_writes::OUTCOME_WINDOW_NS); under load it may also still be draining its rings.
const SETTLE_MAX: Duration = Duration::from_secs(30);
const SETTLE_MIN: Duration = Duration::from_secs(7);

/// Four standard deviations of the scaled estimate of requests carried by `connections` (each
/// with its request count), sampled at `ratio`: each connection is followed with probability
/// `ratio` and counted 1/ratio times, so the variance is sum((1/ratio - 1) * requests^2).
pub fn estimate_tolerance(ratio: f64, connections: impl IntoIterator<Item = (u64, f64)>) -> f64 {
    4.0 * estimate_variance(ratio, connections).sqrt()
}

/// The variance of that estimate (see [`estimate_tolerance`]); variances of independent
/// parts (slices sampled at different ratios) add up.
pub fn estimate_variance(ratio: f64, connections: impl IntoIterator<Item = (u64, f64)>) -> f64 {
    if ratio >= 1.0 {
        return 0.0;
    }
    connections
        .into_iter()
        .map(|(count, requests)| count as f64 * (1.0 / ratio - 1.0) * requests * requests)
        .sum()
}

/// Memcached's own get counters, read with `stats`.
#[derive(Debug, Clone, Copy)]
struct GetStats {
    hits: u64,
    misses: u64,
}

impl GetStats {
    fn read(memcached: &Memcached) -> anyhow::Result<GetStats> {
        Ok(GetStats {
            hits: memcached.stat("get_hits")?,
            misses: memcached.stat("get_misses")?,
        })
    }
}

/// Whether losses explain a shortfall: only the payload ring lost records (sockets' own
/// events all arrived), and at least as many records as requests went missing (a request
/// needs its send and its answer; losing either loses at most that one request).
pub fn losses_account_for(losses: &BTreeMap<String, u64>, missing_requests: f64) -> bool {
    let payload = losses.get(PAYLOAD_LOSS).copied().unwrap_or(0);
    losses.keys().all(|source| source == PAYLOAD_LOSS) && missing_requests <= payload as f64
}

const PAYLOAD_LOSS: &str = "payload_ringbuf";

/// Runs the soak for `minutes` and fails on any violated bound. `decode_all`: the agent
/// decodes every connection (`capture_records_per_second = 0`) instead of sampling above its
/// budget; payload records it then loses to a full ring are the expected degradation, as long
/// as its own loss counter accounts for every request it missed.
pub fn soak(binary: &Path, work: &Path, minutes: f64, decode_all: bool) -> anyhow::Result<()> {
    if !(0.5..=24.0 * 60.0).contains(&minutes) {
        bail!("--soak takes 0.5 to 1440 minutes, not {minutes}");
    }
    let slices = ((minutes * 60.0) / SLICE.as_secs_f64()).ceil() as usize;
    // Warm-up: the first fifth, at least 30 s (allocator arenas, label sets, maps fill up).
    let warmup_slices = (slices / 5).max(3).min(slices.saturating_sub(2));
    procs::raise_nofile(65_536)?;
    let port = procs::free_port(23_211)?;
    let memcached = Memcached::start_with(port, Some(8192), &["-o", MEMCACHED_IDLE_TIMEOUT])?;
    let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    // Every key the steady load gets is stored first (before the agent, which would count the
    // connection): a get that misses is then the agent's mistake or memcached's own count.
    loadgen::populate(SocketAddr::V4(target), &WORKLOAD)?;
    let stats_before = GetStats::read(&memcached)?;
    let (mut agent, metrics) = start_agent(binary, work, port, decode_all)?;
    let pid = agent.pid();
    eprintln!(
        "xtask: soak {minutes} min: {RATE} ops/s on {STEADY_CONNECTIONS} connections, {CHURN_PER_SECOND} connections/s churn, \
         {IDLE_PER_SECOND} idle timeouts + dead writes/s, memcached -o {MEMCACHED_IDLE_TIMEOUT}; agent pid {pid}{}",
        if decode_all { ", decoding all" } else { "" }
    );
    let before = observe::parse_samples(&observe::scrape(metrics)?);

    let (steady, counts, elapsed) = run_load(target, slices, &mut agent, metrics)?;
    let generated_connections =
        steady.connections + counts.churn_connections + counts.idle_connections;
    // A steady connection memcached closed: its FIN, or (a request written after it) that
    // request as a dead write; a request memcached had not read when it closed makes a reset
    // instead. Each of those few is allowed either way.
    let expected = [
        generated_connections as f64,
        (counts.idle_closed_by_peer + steady.server_closes) as f64,
        (counts.dead_writes + steady.lost_in_flight) as f64,
    ];
    let (after, connections, settled) = settle(metrics, &before, expected)?;
    // The last scrape, for reading what a failed check saw.
    if let Ok(text) = observe::scrape(metrics) {
        let path = work.join("soak-final.prom");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    agent.check_running()?;
    // After the last scrape: this connection is memcached's only view, not one to count.
    let stats_after = GetStats::read(&memcached)?;
    drop(memcached);

    let ledger = Ledger {
        before: &before,
        after: &after,
        counts: &counts,
        steady: &steady,
        connections,
        generated_connections,
        losses: observe::lost_between(&before, &after),
        decode_all,
        stats: (stats_before, stats_after),
    };
    let checks = ledger.checks(warmup_slices);

    println!(
        "\nsoak: {:.1} min, agent pid {pid}{}; counters settled {:.0} s after the load stopped; \
         lowest capture_sample_ratio {}",
        elapsed.as_secs_f64() / 60.0,
        if decode_all { ", decoding all" } else { "" },
        settled.as_secs_f64(),
        steady.lowest_ratio,
    );
    print_load(&steady, &counts, elapsed);
    let mut failed = 0;
    for (ok, line) in &checks {
        println!("{} {line}", if *ok { "PASS" } else { "FAIL" });
        failed += usize::from(!ok);
    }
    agent.stop()?;
    if failed > 0 {
        bail!("soak: {failed} check(s) failed");
    }
    Ok(())
}

/// The three generators for `slices` slices (fewer if one fails); returns the steady
/// generator's totals, the others' counts and how long it ran.
fn run_load(
    target: SocketAddrV4,
    slices: usize,
    agent: &mut Agent,
    metrics: SocketAddr,
) -> anyhow::Result<(Steady, Counted, Duration)> {
    let pid = agent.pid();
    let generators = Generators::start(target);
    let started = Instant::now();
    let mut steady = Steady::default();
    let mut failure = None;
    for slice in 0..slices {
        let ops_per_sec = match steady.run_slice(slice, target, agent, metrics) {
            Ok(ops_per_sec) => ops_per_sec,
            Err(err) => {
                failure = Some(err);
                break;
            }
        };
        steady
            .points
            .push(sample(pid, started, ops_per_sec, &generators.counts)?);
        if generators.finished() {
            break;
        }
    }
    let (counts, generated) = generators.stop()?;
    if let Some(err) = failure {
        return Err(err);
    }
    generated?;
    let elapsed = started.elapsed();
    let counts = counts.load();
    Ok((steady, counts, elapsed))
}

/// Starts the agent on `port` with the default capture limits, as users run it, unless asked
/// to decode everything (which lost 130,409 payload records to a full ring buffer in a
/// 2-minute soak on the shared 2-core machine); returns it and its metrics address.
fn start_agent(
    binary: &Path,
    work: &Path,
    port: u16,
    decode_all: bool,
) -> anyhow::Result<(Agent, SocketAddr)> {
    std::fs::create_dir_all(work)?;
    let config = work.join("soak.toml");
    let mode = if decode_all {
        Mode::CaptureAll
    } else {
        Mode::Capture
    };
    std::fs::write(&config, agent_config(&[port], mode, 65_536))?;
    let metrics: SocketAddr = ([127, 0, 0, 1], procs::free_port(29_150)?).into();
    Ok((Agent::start(binary, &config, metrics)?, metrics))
}

/// What the steady generator did over all slices, counted by itself, and what the agent's
/// sampling made of it.
struct Steady {
    ops: u64,
    errors: u64,
    connections: u64,
    // Steady connections memcached closed (re-opened), and requests lost in flight with them.
    server_closes: u64,
    lost_in_flight: u64,
    // Variance of the scaled steady estimate: each slice's connections with the requests each
    // carried, at the lowest ratio seen around the slice (the ratio before and after it).
    variance: f64,
    // The lowest capture_sample_ratio seen: below 1 the request counters are scaled estimates.
    lowest_ratio: f64,
    ratio_before: f64,
    // Requests unanswered at slice ends, scaled: up to one per steady connection, 1/ratio each.
    unanswered: f64,
    points: Vec<Point>,
}

impl Default for Steady {
    fn default() -> Steady {
        Steady {
            ops: 0,
            errors: 0,
            connections: 0,
            server_closes: 0,
            lost_in_flight: 0,
            variance: 0.0,
            lowest_ratio: 1.0,
            ratio_before: 1.0,
            unanswered: 0.0,
            points: Vec::new(),
        }
    }
}

impl Steady {
    /// One slice of steady load on fresh pooled connections, then the agent's sampling ratio;
    /// returns the slice's ops/s.
    fn run_slice(
        &mut self,
        slice: usize,
        target: SocketAddrV4,
        agent: &mut Agent,
        metrics: SocketAddr,
    ) -> anyhow::Result<f64> {
        let spec = LoadSpec {
            target: SocketAddr::V4(target),
            connections: STEADY_CONNECTIONS,
            duration: SLICE,
            rate: Some(RATE),
            workload: WORKLOAD,
        };
        self.connections += STEADY_CONNECTIONS as u64;
        let report = loadgen::run_pool(&spec, Pool::RoundRobin)
            .map_err(|err| err.context(format!("steady load, slice {slice}")))?;
        self.ops += report.ops;
        self.errors += report.errors;
        self.server_closes += report.server_closes;
        self.lost_in_flight += report.lost_in_flight;
        self.connections += report.server_closes;
        agent.check_running()?;
        let text = observe::scrape(metrics)
            .map_err(|err| err.context(format!("scrape after slice {slice}")))?;
        let ratio = sum(
            &observe::parse_samples(&text),
            "cacheprobe_capture_sample_ratio",
            &[],
        );
        self.lowest_ratio = self.lowest_ratio.min(ratio);
        let slice_ratio = ratio.min(self.ratio_before).clamp(1.0 / 1024.0, 1.0);
        self.variance += estimate_variance(
            slice_ratio,
            report.ops_per_connection.iter().map(|&ops| (1, ops as f64)),
        );
        self.unanswered += STEADY_CONNECTIONS as f64 / slice_ratio;
        self.ratio_before = ratio;
        Ok(report.ops_per_sec())
    }
}

/// The agent's RSS and open fds after a slice, printed with the generators' progress.
fn sample(pid: u32, started: Instant, ops_per_sec: f64, counts: &Counts) -> anyhow::Result<Point> {
    let point = Point {
        at: started.elapsed(),
        rss_kb: procs::memory(pid)?.rss_kb,
        fds: open_fds(pid)?,
        ops_per_sec,
    };
    eprintln!(
        "  {:>6.0} s  rss {:>6.1} MB  fds {:>4}  steady {:>7.0} ops/s  churn {:>7}  idle {:>5}",
        point.at.as_secs_f64(),
        point.rss_kb as f64 / 1024.0,
        point.fds,
        point.ops_per_sec,
        counts.churn_connections.load(Ordering::Relaxed),
        counts.idle_connections.load(Ordering::Relaxed),
    );
    Ok(point)
}

/// The agent's client connections opened, closed by the peer, and dead writes since `before`.
fn connection_counters(samples: &[Sample], before: &[Sample]) -> [f64; 3] {
    let client = ("role", "client");
    [
        sum(samples, "cacheprobe_connections_opened_total", &[client])
            - sum(before, "cacheprobe_connections_opened_total", &[client]),
        sum(
            samples,
            "cacheprobe_connections_closed_total",
            &[client, ("closed_by", "peer")],
        ),
        sum(samples, "cacheprobe_dead_socket_writes_total", &[client]),
    ]
}

/// Polls the agent's connection counters until they match `expected` or stop moving (see
/// [`SETTLE_MAX`]); returns the last samples, their counters and how long it took.
fn settle(
    metrics: SocketAddr,
    before: &[Sample],
    expected: [f64; 3],
) -> anyhow::Result<(Vec<Sample>, [f64; 3], Duration)> {
    let settle_started = Instant::now();
    procs::sleep(SETTLE_MIN)?;
    let mut after = observe::parse_samples(&observe::scrape(metrics)?);
    let mut previous = connection_counters(&after, before);
    while previous != expected && settle_started.elapsed() < SETTLE_MAX {
        procs::sleep(Duration::from_secs(2))?;
        after = observe::parse_samples(&observe::scrape(metrics)?);
        let now = connection_counters(&after, before);
        if now == previous {
            break;
        }
        previous = now;
    }
    Ok((after, previous, settle_started.elapsed()))
}

/// The load the soak achieved, and the agent's RSS and fds at every slice.
fn print_load(steady: &Steady, counts: &Counted, elapsed: Duration) {
    let achieved = steady.ops as f64 / elapsed.as_secs_f64();
    println!(
        "load: steady {:.0} ops/s achieved (target {RATE}) on {STEADY_CONNECTIONS} connections, churn {:.0} connections/s, \
         idle timeouts {:.1}/s, dead writes {:.1}/s",
        achieved,
        counts.churn_connections as f64 / elapsed.as_secs_f64(),
        counts.idle_closed_by_peer as f64 / elapsed.as_secs_f64(),
        counts.dead_writes as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "samples (every {} s): RSS MB {}",
        SLICE.as_secs(),
        steady
            .points
            .iter()
            .map(|p| format!("{:.1}", p.rss_kb as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "samples: fds {}",
        steady
            .points
            .iter()
            .map(|p| p.fds.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tolerance_is_four_standard_deviations_of_the_scaled_estimate() {
        assert_eq!(estimate_tolerance(1.0, [(1000, 50.0)]), 0.0);
        // 60,000 one-request connections at 1/8: variance 60,000 * 7.
        let churn = estimate_tolerance(0.125, [(60_000, 1.0)]);
        assert!((churn - 4.0 * (420_000f64).sqrt()).abs() < 1e-6, "{churn}");
        // Few heavy connections weigh far more than many light ones with the same requests.
        let heavy = estimate_tolerance(0.125, [(64, 1_000.0)]);
        let light = estimate_tolerance(0.125, [(64_000, 1.0)]);
        assert!(heavy > 30.0 * light, "{heavy} vs {light}");
    }

    /// Slices sampled at different ratios: their variances add, and a slice decoded in full
    /// adds nothing; round robin spreads a slice's requests evenly, which is the least variance
    /// those requests can have over those connections.
    #[test]
    fn slice_variances_add_and_an_even_spread_is_the_tightest() {
        let at_16 = estimate_variance(1.0 / 16.0, [(256, 100.0)]);
        let at_64 = estimate_variance(1.0 / 64.0, [(256, 100.0)]);
        assert_eq!(estimate_variance(1.0, [(256, 100.0)]), 0.0);
        let both = 4.0 * (at_16 + at_64).sqrt();
        assert!(both < estimate_tolerance(1.0 / 64.0, [(512, 100.0)]));
        let uneven = estimate_variance(1.0 / 16.0, [(128, 150.0), (128, 50.0)]);
        assert!(uneven > at_16, "{uneven} vs {at_16}");
    }

    #[test]
    fn only_payload_losses_that_cover_the_gap_account_for_it() {
        let lost = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect()
        };
        assert!(losses_account_for(
            &lost(&[("payload_ringbuf", 100)]),
            100.0
        ));
        assert!(!losses_account_for(
            &lost(&[("payload_ringbuf", 99)]),
            100.0
        ));
        assert!(!losses_account_for(
            &lost(&[("payload_ringbuf", 1_000), ("ringbuf", 1)]),
            10.0
        ));
        assert!(losses_account_for(&lost(&[]), 0.0));
        assert!(!losses_account_for(&lost(&[]), 1.0));
    }
}
