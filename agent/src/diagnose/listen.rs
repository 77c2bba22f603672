//! Connection pressure: SYN storms at local listeners, accept queues at their limit with the
//! host's listen overflow/drop counters, and connection churn (clients opening a connection per
//! request instead of keeping them).

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::HistorySnapshot;

use crate::model::{Role, SynDirection};

#[derive(Default)]
struct Syns {
    total: u64,
    peak: u64,
    peak_t: u64,
    first_t: u64,
    last_t: u64,
}

#[derive(Default)]
struct Queue {
    full_seconds: u64,
    max_length: u32,
    limit: u32,
    first_full_t: u64,
    last_full_t: u64,
}

#[derive(Default)]
struct Churn {
    opened: u64,
    closed: u64,
    short_lived: u64,
    requests: u64,
    opened_by_comm: BTreeMap<String, u64>,
    /// Per second: (connections opened, SYNs sent); the larger is the attempt count.
    attempts_by_t: BTreeMap<u64, (u64, u64)>,
}

/// Churn is judged on the busiest window of this many seconds, so a burst is not diluted by
/// a long history and a pool warming up in one second is not mistaken for churn.
const CHURN_WINDOW_S: u64 = 10;

impl Churn {
    fn peak_rate(&self) -> (f64, u64) {
        let attempts: Vec<(u64, u64)> = self
            .attempts_by_t
            .iter()
            .map(|(&t, &(opened, syns))| (t, opened.max(syns)))
            .collect();
        let mut best = (0u64, 0u64);
        let mut sum = 0u64;
        let mut from = 0usize;
        for &(t, n) in attempts.iter() {
            sum += n;
            while attempts[from].0 + CHURN_WINDOW_S <= t {
                sum -= attempts[from].1;
                from += 1;
            }
            if sum > best.0 {
                best = (sum, attempts[from].0);
            }
        }
        (best.0 as f64 / CHURN_WINDOW_S as f64, best.1)
    }
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let mut syns_in: BTreeMap<String, Syns> = BTreeMap::new();
    let mut queues: BTreeMap<String, Queue> = BTreeMap::new();
    let mut churn: BTreeMap<(String, Role), Churn> = BTreeMap::new();
    let (mut overflows, mut drops, mut cookies) = (0u64, 0u64, 0u64);
    let mut host_span: Option<Span> = None;
    for second in &snap.seconds {
        for row in &second.syns {
            let service = snap.label(row.service).to_string();
            match row.direction {
                SynDirection::In => {
                    let s = syns_in.entry(service).or_default();
                    if s.total == 0 {
                        s.first_t = second.t;
                    }
                    s.total += row.count as u64;
                    s.last_t = second.t;
                    if row.count as u64 > s.peak {
                        s.peak = row.count as u64;
                        s.peak_t = second.t;
                    }
                }
                SynDirection::Out => {
                    churn
                        .entry((service, Role::Client))
                        .or_default()
                        .attempts_by_t
                        .entry(second.t)
                        .or_default()
                        .1 += row.count as u64
                }
            }
        }
        for row in &second.listen_queues {
            let q = queues
                .entry(snap.label(row.service).to_string())
                .or_default();
            q.limit = q.limit.max(row.limit);
            q.max_length = q.max_length.max(row.length);
            if row.limit > 0 && row.length as f64 >= th.listen_queue_full_ratio * row.limit as f64 {
                if q.full_seconds == 0 {
                    q.first_full_t = second.t;
                }
                q.full_seconds += 1;
                q.last_full_t = second.t;
            }
        }
        let host = second.host_listen;
        if !host.is_zero() {
            overflows += host.overflows;
            drops += host.drops;
            cookies += host.syncookies_sent;
            let span = host_span.get_or_insert(Span {
                start_s: second.t,
                end_s: second.t,
            });
            span.end_s = second.t;
        }
        for row in &second.opened {
            let c = churn
                .entry((snap.label(row.service).to_string(), row.role))
                .or_default();
            c.opened += row.count as u64;
            c.attempts_by_t.entry(second.t).or_default().0 += row.count as u64;
            *c.opened_by_comm
                .entry(snap.label(row.comm).to_string())
                .or_default() += row.count as u64;
        }
        for row in &second.closed {
            let c = churn
                .entry((snap.label(row.service).to_string(), row.role))
                .or_default();
            c.closed += row.count as u64;
            c.short_lived += row.short_lived as u64;
        }
        for row in &second.requests {
            if let Some(c) = churn.get_mut(&(snap.label(row.service).to_string(), row.role)) {
                c.requests += row.count as u64;
            }
        }
    }

    for (service, s) in &syns_in {
        if s.peak < th.syn_storm_per_s {
            continue;
        }
        let mut finding = Finding::new(
            "syn-storm",
            Severity::Warning,
            format!(
                "SYN storm at {service}: {} connection attempts in one second",
                s.peak
            ),
        );
        finding.evidence.push(format!(
            "{} connection attempts arrived {}, peak {}/s at {}",
            s.total,
            util::clock_span(s.first_t, s.last_t),
            s.peak,
            util::clock(s.peak_t)
        ));
        if cookies > 0 {
            finding.evidence.push(format!(
                "the host sent {cookies} SYN cookies (SYN queue full)"
            ));
        }
        finding.advice = "Something opens connections to this server in bursts: a client \
            without connection reuse, a restart stampede, or a flood. Find the sources (ss -tn \
            state syn-recv), make clients pool connections, and keep tcp_syncookies on."
            .to_string();
        finding.subjects.services.push(service.clone());
        finding.value("syn_peak_per_s", s.peak as f64);
        finding.span = Some(Span {
            start_s: s.first_t,
            end_s: s.last_t,
        });
        finding.magnitude = s.peak as f64;
        out.push(finding);
    }

    let full: Vec<(&String, &Queue)> = queues.iter().filter(|(_, q)| q.full_seconds > 0).collect();
    let host_lost = overflows + drops;
    if !full.is_empty() || host_lost >= th.listen_overflow_min.max(1) {
        let title = match full.first() {
            Some((service, q)) => format!(
                "{service}'s accept queue was full ({}/{}) for {}",
                q.max_length,
                q.limit,
                util::plural(q.full_seconds, "second")
            ),
            None => format!(
                "The kernel dropped {} incoming connections (listen queue overflows)",
                host_lost
            ),
        };
        let mut finding = Finding::new("accept-queue-overflow", Severity::Critical, title);
        let mut span = host_span;
        for (service, q) in &full {
            finding.evidence.push(format!(
                "{service}: accept queue at {} or more of its limit (peak {}/{}), {}",
                util::percent(th.listen_queue_full_ratio),
                q.max_length,
                q.limit,
                util::clock_span(q.first_full_t, q.last_full_t)
            ));
            finding.subjects.services.push(service.to_string());
            span = Some(match span {
                Some(s) => Span {
                    start_s: s.start_s.min(q.first_full_t),
                    end_s: s.end_s.max(q.last_full_t),
                },
                None => Span {
                    start_s: q.first_full_t,
                    end_s: q.last_full_t,
                },
            });
            finding.value("queue_limit", q.limit as f64);
        }
        if host_lost > 0 || cookies > 0 {
            finding.evidence.push(format!(
                "host-wide: {overflows} listen overflows, {drops} listen drops, {cookies} SYN cookies sent"
            ));
        }
        finding.advice = "Connections arrive faster than the server accepts them, or its \
            backlog is tiny. Raise the listen backlog (memcached -b, capped by \
            net.core.somaxconn), check the server is not stalled (slow-server findings), and \
            reduce connection churn from clients."
            .to_string();
        finding.value("listen_overflows", overflows as f64);
        finding.value("listen_drops", drops as f64);
        finding.span = span;
        finding.magnitude =
            host_lost as f64 + full.iter().map(|(_, q)| q.full_seconds).sum::<u64>() as f64;
        out.push(finding);
    }

    let span_s = snap.span_seconds().max(1) as f64;
    for ((service, role), c) in &churn {
        let (rate, busiest_t) = c.peak_rate();
        if rate < th.churn_opens_per_s {
            continue;
        }
        let who = match role {
            Role::Client => {
                format!("Clients on this host open {rate:.0} connections/s to {service}")
            }
            Role::Server => format!("This host's {service} accepts {rate:.0} new connections/s"),
        };
        let mut finding = Finding::new("connection-churn", Severity::Warning, who);
        finding.evidence.push(format!(
            "busiest {}: {}; whole window: {} opened, {} closed in {}, {} lived under a second",
            util::seconds(CHURN_WINDOW_S as f64),
            util::clock_span(busiest_t, busiest_t + CHURN_WINDOW_S - 1),
            c.opened,
            c.closed,
            util::seconds(span_s),
            c.short_lived
        ));
        if c.requests > 0 && c.opened > 0 {
            finding.evidence.push(format!(
                "{:.1} requests per new connection",
                c.requests as f64 / c.opened as f64
            ));
        }
        // Name the programs behind the churn, not every program that opened a connection.
        let mut comms: Vec<(&String, &u64)> = c
            .opened_by_comm
            .iter()
            .filter(|(k, n)| !k.is_empty() && **n * 10 >= c.opened)
            .collect();
        comms.sort_by(|a, b| b.1.cmp(a.1));
        if !comms.is_empty() {
            let listed: Vec<String> = comms.iter().map(|(k, n)| format!("{k} ({n})")).collect();
            finding
                .evidence
                .push(format!("opened by: {}", util::truncated(&listed, 4)));
            finding
                .subjects
                .processes
                .extend(comms.iter().map(|(k, _)| k.to_string()));
        }
        finding.advice = "Connections are opened and closed instead of reused: each costs a \
            handshake, a TIME_WAIT socket and an accept on the server, and bursts of them fill \
            accept queues. Use persistent connections or a pool (or a local twemproxy)."
            .to_string();
        finding.subjects.services.push(service.clone());
        finding.value("opens_per_s", rate);
        finding.magnitude = rate;
        out.push(finding);
    }
}
