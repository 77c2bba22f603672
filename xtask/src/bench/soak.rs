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
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    idle::{connect_from, source_address},
    loadgen::{self, LoadSpec, Pool, WORKLOAD},
    observe::{self, Sample},
    procs::{self, agent_config, Agent, Memcached, Mode},
};

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

/// What the churn and idle generators did, counted by themselves.
#[derive(Default)]
struct Counts {
    churn_connections: AtomicU64,
    churn_gets: AtomicU64,
    idle_connections: AtomicU64,
    idle_sets: AtomicU64,
    /// Idle connections memcached closed (seen as EOF).
    idle_closed_by_peer: AtomicU64,
    dead_writes: AtomicU64,
}

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

fn churn(target: SocketAddrV4, stop: &AtomicBool, counts: &Counts) -> anyhow::Result<()> {
    let mut next = 0usize;
    let mut reply = [0u8; 64];
    let mut tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..CHURN_PER_SECOND {
            let source = source_address(1 + next % SOURCES);
            next += 1;
            let mut stream = connect_from(source, target)?;
            counts.churn_connections.fetch_add(1, Ordering::Relaxed);
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"gets churn\r\n")?;
            // A miss is exactly "END\r\n".
            let mut got = 0;
            while got < 5 {
                let n = stream.read(&mut reply[got..])?;
                if n == 0 {
                    bail!("memcached closed a churn connection before answering");
                }
                got += n;
            }
            counts.churn_gets.fetch_add(1, Ordering::Relaxed);
        }
        tick += Duration::from_secs(1);
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    Ok(())
}

/// Opens IDLE_PER_SECOND connections a second, stores one value on each and waits for memcached
/// to close it; then writes once more (the dead write) and closes. After `stop` it still waits
/// for the open ones, so every connection it counts ends the same way.
fn idle(target: SocketAddrV4, stop: &AtomicBool, counts: &Counts) -> anyhow::Result<()> {
    let mut waiting: Vec<(TcpStream, Instant)> = Vec::new();
    let mut next = 0usize;
    let mut last_open = Instant::now() - Duration::from_secs(1);
    let mut buf = [0u8; 64];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && waiting.is_empty() {
            return Ok(());
        }
        if !stopping && last_open.elapsed() >= Duration::from_secs(1) {
            last_open = Instant::now();
            for _ in 0..IDLE_PER_SECOND {
                let mut stream = connect_from(source_address(1 + next % SOURCES), target)?;
                next += 1;
                counts.idle_connections.fetch_add(1, Ordering::Relaxed);
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(b"set idle 0 0 1\r\nv\r\n")?;
                let n = stream.read(&mut buf)?;
                if !buf[..n].starts_with(b"STORED") {
                    bail!("idle set answered {:?}", String::from_utf8_lossy(&buf[..n]));
                }
                counts.idle_sets.fetch_add(1, Ordering::Relaxed);
                stream.set_nonblocking(true)?;
                waiting.push((stream, Instant::now()));
            }
        }
        let mut index = 0;
        while index < waiting.len() {
            let (stream, since) = &mut waiting[index];
            match stream.read(&mut buf) {
                Ok(0) => {
                    counts.idle_closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    // The application has not noticed the close and writes again, then reads
                    // its answer and meets the reset (the agent reports the write's outcome
                    // with that read, or after 5 s without one).
                    if stream.write(b"version\r\n").is_ok() {
                        counts.dead_writes.fetch_add(1, Ordering::Relaxed);
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                        let _ = stream.read(&mut buf);
                    }
                    waiting.swap_remove(index);
                    continue;
                }
                Ok(_) => bail!("memcached sent an idle connection unasked bytes"),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if since.elapsed() > Duration::from_secs(30) {
                        bail!("memcached did not close an idle connection within 30 s");
                    }
                }
                Err(err) => return Err(err).context("idle connection"),
            }
            index += 1;
        }
        thread::sleep(Duration::from_millis(50));
    }
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
    std::fs::create_dir_all(work)?;
    let config = work.join("soak.toml");
    // The default capture limits, as users run it, unless asked to decode everything (which
    // lost 130,409 payload records to a full ring buffer in a 2-minute soak on the shared
    // 2-core machine).
    let mode = if decode_all {
        Mode::CaptureAll
    } else {
        Mode::Capture
    };
    std::fs::write(&config, agent_config(&[port], mode, 65_536))?;
    let metrics: SocketAddr = ([127, 0, 0, 1], procs::free_port(29_150)?).into();
    let mut agent = Agent::start(binary, &config, metrics)?;
    let pid = agent.pid();
    eprintln!(
        "xtask: soak {minutes} min: {RATE} ops/s on {STEADY_CONNECTIONS} connections, {CHURN_PER_SECOND} connections/s churn, \
         {IDLE_PER_SECOND} idle timeouts + dead writes/s, memcached -o {MEMCACHED_IDLE_TIMEOUT}; agent pid {pid}{}",
        if decode_all { ", decoding all" } else { "" }
    );
    let before = observe::parse_samples(&observe::scrape(metrics)?);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let churn_thread = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || churn(target, &stop, &counts))
    };
    let idle_thread = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || idle(target, &stop, &counts))
    };

    let started = Instant::now();
    let mut points = Vec::new();
    let mut steady_ops = 0u64;
    let mut steady_errors = 0u64;
    let mut steady_connections = 0u64;
    // Steady connections memcached closed (re-opened), and requests lost in flight with them.
    let mut steady_server_closes = 0u64;
    let mut steady_lost_in_flight = 0u64;
    // Variance of the scaled steady estimate: each slice's connections with the requests each
    // carried, at the lowest ratio seen around the slice (the ratio before and after it).
    let mut steady_variance = 0.0f64;
    let mut failure = None;
    // The lowest capture_sample_ratio seen: below 1 the request counters are scaled estimates.
    let mut lowest_ratio = 1.0f64;
    let mut ratio_before = 1.0f64;
    // Requests unanswered at slice ends, scaled: up to one per steady connection, 1/ratio each.
    let mut unanswered = 0.0f64;
    for slice in 0..slices {
        let spec = LoadSpec {
            target: SocketAddr::V4(target),
            connections: STEADY_CONNECTIONS,
            duration: SLICE,
            rate: Some(RATE),
            workload: WORKLOAD,
        };
        steady_connections += STEADY_CONNECTIONS as u64;
        let report = match loadgen::run_pool(&spec, Pool::RoundRobin) {
            Ok(report) => report,
            Err(err) => {
                failure = Some(err.context(format!("steady load, slice {slice}")));
                break;
            }
        };
        steady_ops += report.ops;
        steady_errors += report.errors;
        steady_server_closes += report.server_closes;
        steady_lost_in_flight += report.lost_in_flight;
        steady_connections += report.server_closes;
        if let Err(err) = agent.check_running() {
            failure = Some(err);
            break;
        }
        match observe::scrape(metrics) {
            Ok(text) => {
                let ratio = sum(
                    &observe::parse_samples(&text),
                    "cacheprobe_capture_sample_ratio",
                    &[],
                );
                lowest_ratio = lowest_ratio.min(ratio);
                let slice_ratio = ratio.min(ratio_before).clamp(1.0 / 1024.0, 1.0);
                steady_variance += estimate_variance(
                    slice_ratio,
                    report.ops_per_connection.iter().map(|&ops| (1, ops as f64)),
                );
                unanswered += STEADY_CONNECTIONS as f64 / slice_ratio;
                ratio_before = ratio;
            }
            Err(err) => {
                failure = Some(err.context(format!("scrape after slice {slice}")));
                break;
            }
        }
        let point = Point {
            at: started.elapsed(),
            rss_kb: procs::memory(pid)?.rss_kb,
            fds: open_fds(pid)?,
            ops_per_sec: report.ops_per_sec(),
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
        points.push(point);
        if churn_thread.is_finished() || idle_thread.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let churn_result = churn_thread
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))?;
    let idle_result = idle_thread
        .join()
        .map_err(|_| anyhow::anyhow!("idle thread panicked"))?;
    if let Some(err) = failure {
        return Err(err);
    }
    churn_result.context("churn generator")?;
    idle_result.context("idle generator")?;
    let elapsed = started.elapsed();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let client = ("role", "client");
    let generated_connections =
        steady_connections + load(&counts.churn_connections) + load(&counts.idle_connections);
    let connection_counters = |samples: &[Sample]| {
        [
            sum(samples, "cacheprobe_connections_opened_total", &[client])
                - sum(&before, "cacheprobe_connections_opened_total", &[client]),
            sum(
                samples,
                "cacheprobe_connections_closed_total",
                &[client, ("closed_by", "peer")],
            ),
            sum(samples, "cacheprobe_dead_socket_writes_total", &[client]),
        ]
    };
    // A steady connection memcached closed: its FIN, or (a request written after it) that
    // request as a dead write; a request memcached had not read when it closed makes a reset
    // instead. Each of those few is allowed either way.
    let expected = [
        generated_connections as f64,
        (load(&counts.idle_closed_by_peer) + steady_server_closes) as f64,
        (load(&counts.dead_writes) + steady_lost_in_flight) as f64,
    ];
    let settle_started = Instant::now();
    procs::sleep(SETTLE_MIN)?;
    let mut after = observe::parse_samples(&observe::scrape(metrics)?);
    let mut previous = connection_counters(&after);
    while previous != expected && settle_started.elapsed() < SETTLE_MAX {
        procs::sleep(Duration::from_secs(2))?;
        after = observe::parse_samples(&observe::scrape(metrics)?);
        let now = connection_counters(&after);
        if now == previous {
            break;
        }
        previous = now;
    }
    let settled = settle_started.elapsed();
    // The last scrape, for reading what a failed check saw.
    if let Ok(text) = observe::scrape(metrics) {
        let path = work.join("soak-final.prom");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    agent.check_running()?;
    // After the last scrape: this connection is memcached's only view, not one to count.
    let stats_after = GetStats::read(&memcached)?;
    drop(memcached);

    let mut checks: Vec<(bool, String)> = Vec::new();
    let steady_after = &points[warmup_slices.min(points.len().saturating_sub(1))..];
    let spread = |f: &dyn Fn(&Point) -> u64| {
        let max = steady_after.iter().map(f).max().unwrap_or(0);
        let min = steady_after.iter().map(f).min().unwrap_or(0);
        (min, max)
    };
    let (rss_min, rss_max) = spread(&|p| p.rss_kb);
    let (fd_min, fd_max) = spread(&|p| p.fds);
    checks.push((
        rss_max - rss_min <= RSS_SLACK_KB,
        format!(
            "RSS after warm-up ({} samples from {:.0} s): {:.1}..{:.1} MB, spread {:.1} MB (limit {:.0})",
            steady_after.len(),
            steady_after.first().map_or(0.0, |p| p.at.as_secs_f64()),
            rss_min as f64 / 1024.0,
            rss_max as f64 / 1024.0,
            (rss_max - rss_min) as f64 / 1024.0,
            RSS_SLACK_KB as f64 / 1024.0
        ),
    ));
    checks.push((
        fd_max - fd_min <= FD_SLACK,
        format!("open fds after warm-up: {fd_min}..{fd_max} (limit spread {FD_SLACK})"),
    ));
    let losses = observe::lost_between(&before, &after);
    let requests = |samples: &[Sample], commands: &[&str]| -> f64 {
        commands
            .iter()
            .map(|command| {
                sum(
                    samples,
                    "cacheprobe_memcache_requests_total",
                    &[client, ("command", command)],
                ) - sum(
                    &before,
                    "cacheprobe_memcache_requests_total",
                    &[client, ("command", command)],
                )
            })
            .sum()
    };
    let steady_requests = requests(&after, &["get", "set"]);
    let churn_requests = requests(&after, &["gets"]);
    // Requests lost in flight with a closed steady connection were sent, and are decoded.
    let generated_steady = steady_ops + load(&counts.idle_sets) + steady_lost_in_flight;
    let generated_churn = load(&counts.churn_gets);
    let missing = (generated_steady as f64 - steady_requests).max(0.0)
        + (generated_churn as f64 - churn_requests).max(0.0);
    // Decoding everything, a full payload ring is the expected degradation, provided the
    // agent counted it and its count covers every request it missed.
    let degraded = decode_all && !losses.is_empty() && losses_account_for(&losses, missing);
    checks.push((
        losses.is_empty() || degraded,
        if degraded {
            format!(
                "events lost: {} (expected degradation decoding everything: covers the {missing:.0} requests missed)",
                observe::format_losses(&losses)
            )
        } else {
            format!("events lost: {}", observe::format_losses(&losses))
        },
    ));
    let [opened, peer_closed, dead] = previous;
    checks.push((
        opened as u64 == generated_connections,
        format!(
            "connections_opened_total{{role=client}} {opened} = generator {generated_connections} \
             ({steady_connections} steady incl. {steady_server_closes} re-opened after memcached closed them + {} churn + {} idle)",
            load(&counts.churn_connections),
            load(&counts.idle_connections)
        ),
    ));
    let idle_timeouts = load(&counts.idle_closed_by_peer);
    let peer_range = (
        idle_timeouts + steady_server_closes - steady_lost_in_flight,
        idle_timeouts + steady_server_closes,
    );
    checks.push((
        (peer_range.0..=peer_range.1).contains(&(peer_closed as u64)),
        format!(
            "connections_closed_total{{role=client,closed_by=peer}} {peer_closed} = idle timeouts seen by the generator {idle_timeouts} \
             + steady connections memcached closed {steady_server_closes} (less up to {steady_lost_in_flight} reset with a request in flight)",
        ),
    ));
    let dead_range = (
        load(&counts.dead_writes),
        load(&counts.dead_writes) + steady_lost_in_flight,
    );
    checks.push((
        (dead_range.0..=dead_range.1).contains(&(dead as u64)),
        format!(
            "dead_socket_writes_total{{role=client}} {dead} = generator's writes after the close {} \
             (+ up to {steady_lost_in_flight} steady requests in flight when memcached closed)",
            load(&counts.dead_writes)
        ),
    ));
    // The steady generator stops at each slice's deadline with up to one request per connection
    // sent but unanswered; the agent counts those requests (each 1/ratio times once sampled),
    // the generator does not.
    let ratio = lowest_ratio.clamp(1.0 / 1024.0, 1.0);
    let steady_tolerance =
        4.0 * (steady_variance + estimate_variance(ratio, [(load(&counts.idle_sets), 1.0)])).sqrt();
    let churn_tolerance = estimate_tolerance(ratio, [(generated_churn, 1.0)]);
    let payload_lost = losses.get(PAYLOAD_LOSS).copied().unwrap_or(0) as f64;
    let how = if ratio >= 1.0 {
        "exact".to_string()
    } else {
        format!("a scaled estimate, sampled down to {ratio}: 4 standard deviations")
    };
    let allowance = |tolerance: f64, over: f64| {
        let under = tolerance + if degraded { payload_lost } else { 0.0 };
        (under, tolerance + over)
    };
    let (under, over) = allowance(steady_tolerance, unanswered);
    let extra = steady_requests - generated_steady as f64;
    checks.push((
        -under <= extra && extra <= over,
        format!(
            "memcache_requests_total{{role=client,command=get|set}} {steady_requests:.0} vs generator {generated_steady} \
             ({steady_ops} steady + {} idle sets): {extra:+.0} ({:+.2}%), allowed -{under:.0}..+{over:.0} ({how}; \
             + up to {unanswered:.0} for requests unanswered at slice ends{})",
            load(&counts.idle_sets),
            100.0 * extra / generated_steady.max(1) as f64,
            if degraded { "; - the payload records lost" } else { "" },
        ),
    ));
    let (under, over) = allowance(churn_tolerance, 0.0);
    let extra = churn_requests - generated_churn as f64;
    checks.push((
        -under <= extra && extra <= over,
        format!(
            "memcache_requests_total{{role=client,command=gets}} {churn_requests:.0} vs churn gets {generated_churn} \
             (one per connection): {extra:+.0} ({:+.2}%), allowed -{under:.0}..+{over:.0} ({how}{})",
            100.0 * extra / generated_churn.max(1) as f64,
            if degraded { "; - the payload records lost" } else { "" },
        ),
    ));
    // Hits and misses against memcached's own counters. Requests the agent finished without an
    // answer (unanswered at slice ends, timeouts) may be either at memcached.
    let statuses = |status: &str| -> f64 {
        ["get", "gets"]
            .iter()
            .map(|command| {
                let labels = [client, ("command", command), ("status", status)];
                sum(&after, "cacheprobe_memcache_requests_total", &labels)
                    - sum(&before, "cacheprobe_memcache_requests_total", &labels)
            })
            .sum()
    };
    let (agent_hits, agent_misses) = (statuses("hit"), statuses("miss"));
    let agent_unsettled = requests(&after, &["get", "gets"]) - agent_hits - agent_misses;
    for (what, agent_count, memcached_count, tolerance) in [
        (
            "hit",
            agent_hits,
            stats_after.hits - stats_before.hits,
            steady_tolerance,
        ),
        (
            "miss",
            agent_misses,
            stats_after.misses - stats_before.misses,
            churn_tolerance,
        ),
    ] {
        // The agent's shortfall is memcached's surplus here: lost payload records on the
        // upper side.
        let under = tolerance;
        let over = tolerance + agent_unsettled + if degraded { payload_lost } else { 0.0 };
        let extra = memcached_count as f64 - agent_count;
        checks.push((
            -under <= extra && extra <= over,
            format!(
                "memcache_requests_total{{role=client,command=get|gets,status={what}}} {agent_count:.0} vs memcached get_{what}{} {memcached_count}: \
                 memcached {extra:+.0}, allowed -{under:.0}..+{over:.0} ({how}; + up to the {agent_unsettled:.0} gets the agent saw unanswered{})",
                if what == "hit" { "s" } else { "es" },
                if degraded { "; - the payload records lost" } else { "" },
            ),
        ));
    }
    checks.push((
        steady_errors == 0,
        format!("memcached errors seen by the steady generator: {steady_errors}"),
    ));

    let achieved = steady_ops as f64 / elapsed.as_secs_f64();
    println!(
        "\nsoak: {:.1} min, agent pid {pid}{}; counters settled {:.0} s after the load stopped; \
         lowest capture_sample_ratio {lowest_ratio}",
        elapsed.as_secs_f64() / 60.0,
        if decode_all { ", decoding all" } else { "" },
        settled.as_secs_f64(),
    );
    println!(
        "load: steady {:.0} ops/s achieved (target {RATE}) on {STEADY_CONNECTIONS} connections, churn {:.0} connections/s, \
         idle timeouts {:.1}/s, dead writes {:.1}/s",
        achieved,
        load(&counts.churn_connections) as f64 / elapsed.as_secs_f64(),
        load(&counts.idle_closed_by_peer) as f64 / elapsed.as_secs_f64(),
        load(&counts.dead_writes) as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "samples (every {} s): RSS MB {}",
        SLICE.as_secs(),
        points
            .iter()
            .map(|p| format!("{:.1}", p.rss_kb as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "samples: fds {}",
        points
            .iter()
            .map(|p| p.fds.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
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
