//! One slow or hung server among its peers: with client-side hashing every server owns 1/N of
//! the keys, so one bad server slows every page that touches its keys while averages over the
//! tier look fine. Compares each server's p99, stalled requests and unanswered requests with
//! the other servers of the same service, and notices a server that stopped answering. When
//! this host also holds the server's end (a local server, a network namespace), the server's
//! own latency is known: clients far slower than it, with retransmits on the path, lost the
//! time between the boxes, and the finding says so instead of calling the server slow.

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{
    latency::{self, LatencyHistogram},
    HistorySnapshot, TcpEvent,
};

use crate::model::Role;

#[derive(Default)]
struct ServerStats {
    hist: LatencyHistogram,
    requests: u64,
    no_answer: u64,
    last_answer_t: Option<u64>,
    /// Requests that got no answer, per second, before dead writes are taken out of them.
    unanswered_by_t: BTreeMap<u64, u64>,
    /// This host's writes onto connections the server had already closed, per second.
    dead_writes_by_t: BTreeMap<u64, u64>,
    /// Unanswered requests and failed connects, per second.
    no_answer_by_t: BTreeMap<u64, u64>,
    /// Requests slower than the stall threshold or unanswered, per second.
    stalled_by_t: BTreeMap<u64, u64>,
    /// Requests per process, per second.
    requests_by_comm: BTreeMap<String, BTreeMap<u64, u64>>,
    /// The server's own latency, measured at its socket (server role), when its end is on this
    /// host too: from its read of a request to its reply.
    server_hist: LatencyHistogram,
    /// Retransmits on this host's connections with the server (either end), per second.
    retransmits_by_t: BTreeMap<u64, u64>,
}

/// Stalls are judged within this many seconds: a hung server stalls many requests at once,
/// while the odd retransmitted request scattered over 15 minutes is background noise.
const STALL_WINDOW_S: u64 = 10;

/// How far apart a dead write and the unanswered request it carried may be recorded: the
/// write's fate is settled within 5 s, the request's at the close or its timeout.
const DEAD_WRITE_MATCH_S: u64 = 15;

/// Where the stall count really starts: the histogram counts by bucket, and the bucket holding
/// `slow_stall_ms` starts below it (185 ms for 200 ms). Counting from the next bucket (262 ms)
/// left out stalls of one retransmit timeout (200-260 ms); the text names this boundary.
fn stall_floor_us(th: &DiagnoseThresholds) -> f64 {
    latency::bucket_floor_us(th.slow_stall_ms * 1000.0)
}

impl ServerStats {
    fn stalled(&self) -> u64 {
        self.stalled_by_t.values().sum()
    }

    /// The most stalled requests within any STALL_WINDOW_S seconds.
    fn stalled_burst(&self) -> u64 {
        let seconds: Vec<(u64, u64)> = self.stalled_by_t.iter().map(|(&t, &n)| (t, n)).collect();
        let (mut best, mut sum, mut from) = (0, 0, 0);
        for &(t, n) in &seconds {
            sum += n;
            while seconds[from].0 + STALL_WINDOW_S <= t {
                sum -= seconds[from].1;
                from += 1;
            }
            best = best.max(sum);
        }
        best
    }
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let services = collect(snap, th);
    for (service, servers) in &services {
        for (server, stats) in servers {
            let peers: Vec<&ServerStats> = servers
                .iter()
                .filter(|(name, s)| *name != server && s.requests > 0)
                .map(|(_, s)| s)
                .collect();
            if let Some(finding) = stopped(service, server, stats, snap, th) {
                out.push(finding);
            } else if let Some(verdict) = slow(stats, &peers, th) {
                let own = own_latency(stats, &verdict, th);
                out.push(slow_server(
                    service,
                    server,
                    stats,
                    &verdict,
                    own.as_ref(),
                    peers.len(),
                    th,
                ));
            }
        }
    }
}

/// Client-side request outcomes and latency per service and server.
fn collect(
    snap: &HistorySnapshot,
    th: &DiagnoseThresholds,
) -> BTreeMap<String, BTreeMap<String, ServerStats>> {
    let stall_us = stall_floor_us(th);
    let mut services: BTreeMap<String, BTreeMap<String, ServerStats>> = BTreeMap::new();
    for second in &snap.seconds {
        for row in second.requests.iter().filter(|r| r.role == Role::Client) {
            let stats = util::by_server(&mut services, snap, row.service, row.server);
            let count = row.count as u64;
            stats.requests += count;
            *stats
                .requests_by_comm
                .entry(snap.label(row.comm).to_string())
                .or_default()
                .entry(second.t)
                .or_default() += count;
            if row.status.is_no_answer() {
                *stats.unanswered_by_t.entry(second.t).or_default() += count;
            } else if row.status.is_answer() {
                stats.last_answer_t = Some(second.t);
            }
        }
        for row in &second.latency {
            let hist = row.histogram();
            let stats = util::by_server(&mut services, snap, row.service, row.server);
            if row.role == Role::Server {
                stats.server_hist.merge(&hist);
                continue;
            }
            let stalled = hist.count_at_least(stall_us);
            if stalled > 0 {
                *stats.stalled_by_t.entry(second.t).or_default() += stalled;
            }
            stats.hist.merge(&hist);
        }
        for row in second.dead_writes.iter().filter(|r| r.role == Role::Client) {
            let stats = util::by_server(&mut services, snap, row.service, row.server);
            *stats.dead_writes_by_t.entry(second.t).or_default() += row.count as u64;
        }
        for row in &second.tcp {
            if row.event.is_retransmit() {
                if let Some(stats) = services
                    .get_mut(snap.label(row.service))
                    .and_then(|s| s.get_mut(snap.label(row.server)))
                {
                    *stats.retransmits_by_t.entry(second.t).or_default() += row.count as u64;
                }
            }
            if matches!(
                row.event,
                TcpEvent::ConnectTimeout | TcpEvent::RetransmitSyn
            ) {
                if let Some(stats) = services
                    .get_mut(snap.label(row.service))
                    .and_then(|s| s.get_mut(snap.label(row.server)))
                {
                    *stats.no_answer_by_t.entry(second.t).or_default() += row.count as u64;
                }
            }
        }
    }
    for stats in services
        .values_mut()
        .flat_map(|servers| servers.values_mut())
    {
        take_out_dead_writes(&mut stats.unanswered_by_t, &stats.dead_writes_by_t);
        for (&t, &count) in &stats.unanswered_by_t {
            stats.no_answer += count;
            *stats.no_answer_by_t.entry(t).or_default() += count;
            *stats.stalled_by_t.entry(t).or_default() += count;
        }
    }
    services
}

/// A request written onto a connection the server had already closed (an idle timeout, a
/// restart) ends unanswered too, but the server never got it: that says nothing about the
/// server answering. Each dead write takes one unanswered request of its server out, the
/// nearest in time within [`DEAD_WRITE_MATCH_S`]. (A dead write that carried a noreply request
/// may take out an unrelated one nearby; both need the server to have closed connections.)
fn take_out_dead_writes(unanswered: &mut BTreeMap<u64, u64>, dead_writes: &BTreeMap<u64, u64>) {
    for (&t, &writes) in dead_writes {
        for _ in 0..writes {
            let window = t.saturating_sub(DEAD_WRITE_MATCH_S)..=t + DEAD_WRITE_MATCH_S;
            let Some(nearest) = unanswered
                .range(window)
                .filter(|(_, count)| **count > 0)
                .map(|(&second, _)| second)
                .min_by_key(|&second| second.abs_diff(t))
            else {
                break;
            };
            if let Some(count) = unanswered.get_mut(&nearest) {
                *count -= 1;
                if *count == 0 {
                    unanswered.remove(&nearest);
                }
            }
        }
    }
}

fn stopped(
    service: &str,
    server: &str,
    stats: &ServerStats,
    snap: &HistorySnapshot,
    th: &DiagnoseThresholds,
) -> Option<Finding> {
    let (since, unanswered) = match stats.last_answer_t {
        Some(last) => {
            if snap.end_s.saturating_sub(last) < th.slow_stopped_after_s {
                return None;
            }
            let after: u64 = stats.no_answer_by_t.range(last + 1..).map(|(_, c)| c).sum();
            (last + 1, after)
        }
        None => (
            stats.no_answer_by_t.keys().next().copied()?,
            stats.no_answer_by_t.values().sum(),
        ),
    };
    if unanswered < th.slow_min_stalled {
        return None;
    }
    let title = match stats.last_answer_t {
        Some(last) => format!(
            "{server} ({service}) stopped answering at {}",
            util::clock(last + 1)
        ),
        None => format!("{server} ({service}) never answered in this window"),
    };
    let mut finding = Finding::new("server-not-answering", Severity::Critical, title);
    finding.evidence.push(format!(
        "{} requests or connection attempts got no answer since {} (last answer {})",
        unanswered,
        util::clock(since),
        stats.last_answer_t.map_or("never".to_string(), util::clock),
    ));
    affected_processes(stats, since, snap.end_s, &mut finding);
    finding.advice = "The server is hung, stopped (SIGSTOP, swapping, a full disk on its host), \
        or unreachable. Check the process and its host; if it does not recover, remove it from \
        the clients' server list so its share of the keys moves to healthy servers."
        .to_string();
    finding.subjects.services.push(service.to_string());
    finding.subjects.servers.push(server.to_string());
    finding.value("unanswered", unanswered as f64);
    if let Some(last) = stats.last_answer_t {
        finding.value("last_answer_s", last as f64);
    }
    finding.span = Some(Span {
        start_s: since,
        end_s: snap.end_s,
    });
    finding.magnitude = unanswered as f64;
    Some(finding)
}

/// How a server compares with its peers, when it is slower or stalls more.
struct Slow {
    p99: Option<f64>,
    peer_p99: Option<f64>,
    /// Its p99 is far above the peers' (otherwise it stalled).
    slow_p99: bool,
    stalled: u64,
    peer_stalled: u64,
}

fn slow(stats: &ServerStats, peers: &[&ServerStats], th: &DiagnoseThresholds) -> Option<Slow> {
    if peers.is_empty() {
        return None;
    }
    let p99 = stats.hist.quantile_us(0.99);
    let comparable: Vec<f64> = peers
        .iter()
        .filter(|p| p.requests >= th.slow_min_requests)
        .filter_map(|p| p.hist.quantile_us(0.99))
        .collect();
    let peer_p99 = util::median(&comparable);
    let slow_p99 = match (p99, peer_p99) {
        (Some(p99), Some(peer)) if stats.requests >= th.slow_min_requests => {
            p99 >= th.slow_p99_ratio * peer && p99 - peer >= th.slow_min_p99_gap_ms * 1000.0
        }
        _ => false,
    };
    let burst = stats.stalled_burst();
    let peer_burst = peers.iter().map(|p| p.stalled_burst()).max().unwrap_or(0);
    let stalls =
        burst >= th.slow_min_stalled && burst as f64 >= th.slow_p99_ratio * peer_burst as f64;
    (slow_p99 || stalls).then(|| Slow {
        p99,
        peer_p99,
        slow_p99,
        stalled: stats.stalled(),
        peer_stalled: peers.iter().map(|p| p.stalled()).max().unwrap_or(0),
    })
}

/// The server's own latency beside what its clients saw, when this host holds its end too.
struct OwnLatency {
    p99: f64,
    requests: u64,
    /// Retransmits on the path in the seconds judged.
    retransmits: u64,
    /// The clients' slowness is far above the server's own time.
    far: bool,
    /// The clients' slowness is far above the server's own time and the path retransmitted:
    /// the time was lost between the boxes.
    between: bool,
}

/// The server's own p99 (at its socket on this host) against what made its clients slow: the
/// p99, or for stalls the stall boundary. Far below it, the time went before the server read
/// the requests or after it replied: the path (loss: retransmits) or, with no retransmits, the
/// server not reading in time (a stopped or CPU-starved process leaves requests in its receive
/// queue, which its own clock does not see), so only retransmits make it "between the boxes".
fn own_latency(stats: &ServerStats, v: &Slow, th: &DiagnoseThresholds) -> Option<OwnLatency> {
    let requests = stats.server_hist.count();
    if requests < th.slow_min_requests {
        return None;
    }
    let own_p99 = stats.server_hist.quantile_us(0.99)?;
    let stall_us = stall_floor_us(th);
    let seen = if v.slow_p99 { v.p99? } else { stall_us };
    let far =
        seen >= th.slow_p99_ratio * own_p99 && seen - own_p99 >= th.slow_min_p99_gap_ms * 1000.0;
    let own_stalls = stats.server_hist.count_at_least(stall_us);
    let not_stalled_itself = own_stalls as f64 * th.slow_p99_ratio <= v.stalled as f64;
    let (from, to) = match (
        v.slow_p99,
        stats.stalled_by_t.keys().next(),
        stats.stalled_by_t.keys().next_back(),
    ) {
        (false, Some(&first), Some(&last)) => (first, last),
        _ => (0, u64::MAX),
    };
    let retransmits: u64 = stats
        .retransmits_by_t
        .range(from..=to)
        .map(|(_, n)| n)
        .sum();
    // Every request a lost segment holds up waits a retransmit timeout; one retransmit may
    // hold up a few pipelined requests, so half the stalls is enough to explain them.
    let explained = retransmits > 0 && retransmits * 2 >= v.stalled;
    Some(OwnLatency {
        p99: own_p99,
        requests,
        retransmits,
        far,
        between: far && not_stalled_itself && explained,
    })
}

fn slow_server(
    service: &str,
    server: &str,
    stats: &ServerStats,
    v: &Slow,
    own: Option<&OwnLatency>,
    peers: usize,
    th: &DiagnoseThresholds,
) -> Finding {
    let (p99, peer_p99, stalled) = (v.p99, v.peer_p99, v.stalled);
    let p99_text = p99.map_or("-".to_string(), util::latency);
    let peer_text = peer_p99.map_or("-".to_string(), util::latency);
    let between = own.filter(|o| o.between);
    let title = match (between, v.slow_p99) {
        (Some(own), true) => format!(
            "requests to {server} ({service}) lose time between the boxes: p99 {p99_text} at \
             this host's clients, {} at the server's own socket",
            util::latency(own.p99)
        ),
        (Some(own), false) => format!(
            "requests to {server} ({service}) stalled between the boxes: {} over {} at this \
             host's clients, the server's own p99 {}",
            util::plural(stalled, "request"),
            util::latency(stall_floor_us(th)),
            util::latency(own.p99)
        ),
        (None, true) => {
            format!("{server} ({service}) is slow: p99 {p99_text} while its peers' is {peer_text}")
        }
        (None, false) => format!(
            "{server} ({service}) stalled: {} over {} or unanswered (peers: {})",
            util::plural(stalled, "request"),
            util::latency(stall_floor_us(th)),
            v.peer_stalled
        ),
    };
    let severity = if stats.no_answer >= th.slow_min_stalled {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let mut finding = if between.is_some() {
        Finding::new("slow-path", severity, title)
    } else {
        Finding::new("slow-server", severity, title)
    };
    finding.evidence.push(format!(
        "{} requests: p50 {}, p99 {}; median of {} peers: p99 {}",
        stats.requests,
        stats
            .hist
            .quantile_us(0.5)
            .map_or("-".to_string(), util::latency),
        p99_text,
        peers,
        peer_text,
    ));
    stall_evidence(&mut finding, stats, v.peer_stalled, th);
    if let Some(max) = stats.hist.max_us() {
        finding
            .evidence
            .push(format!("slowest request about {}", util::latency(max)));
    }
    if stats.no_answer > 0 {
        finding.evidence.push(format!(
            "{} got no answer",
            util::plural(stats.no_answer, "request")
        ));
    }
    if let Some(own) = own {
        own_evidence(&mut finding, own, p99);
    }
    // Stalls name who waited then; a slow p99 is over the whole window.
    let (from, to) = match finding.span {
        Some(span) if !v.slow_p99 => (span.start_s, span.end_s),
        _ => (0, u64::MAX),
    };
    affected_processes(stats, from, to, &mut finding);
    finding.advice = if between.is_some() {
        "The server answers fast once it reads a request: the clients' time is lost on the \
        path between them and it, with retransmits (see the retransmit findings: every \
        retransmit costs at least 200 ms). Check packet loss and drops on both ends and between \
        (ip -s link, nstat, ethtool -S, switch ports, firewall, conntrack or shaping rules, \
        veth/bridge queues); taking the server out of the pool only moves its keys."
            .to_string()
    } else {
        "One server is far slower than its peers. Check its host (CPU steal, swap, NIC errors, \
        a noisy neighbour), the memcached process (stats: evictions, connections, threads) and \
        the network path to it (see retransmit findings). Clients hash 1/N of the keys to it, \
        so every request touching those keys waits; if it stays slow, take it out of the pool."
            .to_string()
    };
    finding.subjects.services.push(service.to_string());
    finding.subjects.servers.push(server.to_string());
    if let Some(p99) = p99 {
        finding.value("p99_ms", p99 / 1000.0);
    }
    if let Some(peer) = peer_p99 {
        finding.value("peer_p99_ms", peer / 1000.0);
    }
    finding.value("stalled", stalled as f64);
    finding.value("unanswered", stats.no_answer as f64);
    if let Some(own) = own {
        finding.value("server_p99_ms", own.p99 / 1000.0);
        finding.value("retransmits", own.retransmits as f64);
    }
    finding.magnitude = match (p99, peer_p99) {
        (Some(p99), Some(peer)) if peer > 0.0 => p99 / peer,
        _ => 0.0,
    } + stalled as f64;
    finding
}

/// The stalled requests' line and span, when there were any.
fn stall_evidence(
    finding: &mut Finding,
    stats: &ServerStats,
    peer_stalled: u64,
    th: &DiagnoseThresholds,
) {
    if stats.stalled() == 0 {
        return;
    }
    let (Some((&first, _)), Some((&last, _)), Some((&worst_t, &worst))) = (
        stats.stalled_by_t.iter().next(),
        stats.stalled_by_t.iter().next_back(),
        stats.stalled_by_t.iter().max_by_key(|(_, c)| **c),
    ) else {
        return;
    };
    finding.evidence.push(format!(
        "{} over {} or unanswered, {} (worst second {}: {}); peers at most {}",
        util::plural(stats.stalled(), "request"),
        util::latency(stall_floor_us(th)),
        util::clock_span(first, last),
        util::clock(worst_t),
        worst,
        peer_stalled
    ));
    finding.span = Some(Span {
        start_s: first,
        end_s: last,
    });
}

/// The server's own latency line: where the clients' time went.
fn own_evidence(finding: &mut Finding, own: &OwnLatency, client_p99: Option<f64>) {
    if !own.far {
        finding.evidence.push(format!(
            "at the server's own socket on this host: p99 {} over {} requests: the server itself \
             is slow",
            util::latency(own.p99),
            own.requests
        ));
        return;
    }
    // Only retransmits put the rest on the path; without them it may be the server's own
    // receive queue.
    let outside = if own.between {
        "is spent between the boxes"
    } else {
        "passes outside the server's own clock"
    };
    let between = client_p99.map_or(String::new(), |p99| {
        format!(
            "; {} of the clients' p99 {outside}",
            util::latency((p99 - own.p99).max(0.0))
        )
    });
    finding.evidence.push(format!(
        "at the server's own socket on this host: p99 {} over {} requests{between}",
        util::latency(own.p99),
        own.requests
    ));
    finding.evidence.push(if own.retransmits > 0 {
        format!(
            "{} on this host's connections with it in those seconds",
            util::plural(own.retransmits, "TCP retransmit")
        )
    } else {
        "no TCP retransmits with it: the time went before the server read the requests (its \
         process stopped or starved of CPU, requests waiting in its receive queue)"
            .to_string()
    });
}

/// The processes that sent the server requests in seconds `from..=to` (the finding's span:
/// the whole history would name whoever used the server in the last 15 minutes).
fn affected_processes(stats: &ServerStats, from: u64, to: u64, finding: &mut Finding) {
    let mut comms: Vec<(&String, u64)> = stats
        .requests_by_comm
        .iter()
        .filter(|(c, _)| !c.is_empty())
        .map(|(comm, by_t)| (comm, by_t.range(from..=to).map(|(_, n)| n).sum::<u64>()))
        .filter(|(_, count)| *count > 0)
        .collect();
    comms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if comms.is_empty() {
        return;
    }
    let listed: Vec<String> = comms
        .iter()
        .map(|(comm, count)| format!("{comm} ({count} requests)"))
        .collect();
    finding.evidence.push(format!(
        "affected processes: {}",
        util::truncated(&listed, 4)
    ));
    finding
        .subjects
        .processes
        .extend(comms.iter().map(|(c, _)| c.to_string()));
}
