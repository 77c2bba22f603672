//! Connection pressure: SYN storms at local listeners, accept queues at their limit with the
//! host's listen overflow/drop counters, and connection churn (clients opening a connection per
//! request instead of keeping them).

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{snapshot::SecondSnapshot, HistorySnapshot};

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
    /// The address of the listener that was fullest ("" when the history lacks it).
    listener: String,
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

/// The host's own listen counters, summed over the window (all listeners, not per service).
#[derive(Default)]
struct HostCounters {
    overflows: u64,
    drops: u64,
    cookies: u64,
    span: Option<Span>,
}

impl HostCounters {
    /// Handshakes the kernel dropped. Linux counts every accept-queue overflow in
    /// ListenDrops as well (`tcp_listendrop` after the overflow), so drops already include
    /// the overflows; adding the two reported each lost connection twice.
    fn lost(&self) -> u64 {
        self.drops.max(self.overflows)
    }
}

/// Everything this detector reads from the history, per service.
#[derive(Default)]
struct Pressure {
    syns_in: BTreeMap<String, Syns>,
    queues: BTreeMap<String, Queue>,
    churn: BTreeMap<(String, Role), Churn>,
    host: HostCounters,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let pressure = Pressure::collect(snap, th);
    for (service, s) in &pressure.syns_in {
        if s.peak >= th.syn_storm_per_s {
            out.push(syn_storm(service, s, pressure.host.cookies));
        }
    }
    if let Some(full) = overflowing(&pressure.queues, &pressure.host, th) {
        out.push(accept_queue_overflow(&full, &pressure.host, th));
    }
    let span_s = snap.span_seconds().max(1) as f64;
    for ((service, role), c) in &pressure.churn {
        let (rate, busiest_t) = c.peak_rate();
        if rate >= th.churn_opens_per_s {
            out.push(connection_churn(service, *role, c, rate, busiest_t, span_s));
        }
    }
}

impl Pressure {
    fn collect(snap: &HistorySnapshot, th: &DiagnoseThresholds) -> Pressure {
        let mut pressure = Pressure::default();
        for second in &snap.seconds {
            pressure.add_syns(snap, second);
            pressure.add_queues(snap, second, th);
            pressure.add_host(second);
            pressure.add_connections(snap, second);
        }
        pressure
    }

    fn add_syns(&mut self, snap: &HistorySnapshot, second: &SecondSnapshot) {
        for row in &second.syns {
            let service = snap.label(row.service).to_string();
            match row.direction {
                SynDirection::In => {
                    let s = self.syns_in.entry(service).or_default();
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
                    self.churn
                        .entry((service, Role::Client))
                        .or_default()
                        .attempts_by_t
                        .entry(second.t)
                        .or_default()
                        .1 += row.count as u64
                }
            }
        }
    }

    fn add_queues(
        &mut self,
        snap: &HistorySnapshot,
        second: &SecondSnapshot,
        th: &DiagnoseThresholds,
    ) {
        for row in &second.listen_queues {
            let q = self
                .queues
                .entry(snap.label(row.service).to_string())
                .or_default();
            // The fullest second's length with its own limit: maxima taken apart read a
            // 2-deep queue of a 1-slot listener as "2/1024" beside a quiet default one.
            let fuller = row.length as u64 * q.limit.max(1) as u64
                > q.max_length as u64 * row.limit.max(1) as u64;
            if fuller || q.limit == 0 {
                q.max_length = row.length;
                q.limit = row.limit;
                snap.label(row.listener).clone_into(&mut q.listener);
            }
            if row.limit > 0 && row.length as f64 >= th.listen_queue_full_ratio * row.limit as f64 {
                if q.full_seconds == 0 {
                    q.first_full_t = second.t;
                }
                q.full_seconds += 1;
                q.last_full_t = second.t;
            }
        }
    }

    fn add_host(&mut self, second: &SecondSnapshot) {
        let host = second.host_listen;
        if !host.is_zero() {
            self.host.overflows += host.overflows;
            self.host.drops += host.drops;
            self.host.cookies += host.syncookies_sent;
            let span = self.host.span.get_or_insert(Span {
                start_s: second.t,
                end_s: second.t,
            });
            span.end_s = second.t;
        }
    }

    fn add_connections(&mut self, snap: &HistorySnapshot, second: &SecondSnapshot) {
        for row in &second.opened {
            let c = self
                .churn
                .entry((snap.label(row.service).to_string(), row.role))
                .or_default();
            c.opened += row.count as u64;
            c.attempts_by_t.entry(second.t).or_default().0 += row.count as u64;
            *c.opened_by_comm
                .entry(snap.label(row.comm).to_string())
                .or_default() += row.count as u64;
        }
        for row in &second.closed {
            let c = self
                .churn
                .entry((snap.label(row.service).to_string(), row.role))
                .or_default();
            c.closed += row.count as u64;
            c.short_lived += row.short_lived as u64;
        }
        for row in &second.requests {
            let key = (snap.label(row.service).to_string(), row.role);
            if let Some(c) = self.churn.get_mut(&key) {
                c.requests += row.count as u64;
            }
        }
    }
}

fn syn_storm(service: &str, s: &Syns, cookies: u64) -> Finding {
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
    finding.subjects.services.push(service.to_string());
    finding.value("syn_peak_per_s", s.peak as f64);
    finding.span = Some(Span {
        start_s: s.first_t,
        end_s: s.last_t,
    });
    finding.magnitude = s.peak as f64;
    finding
}

/// The services whose accept queue was full, when any was or the host's listen overflows and
/// drops reach the threshold; None when neither happened.
fn overflowing<'a>(
    queues: &'a BTreeMap<String, Queue>,
    host: &HostCounters,
    th: &DiagnoseThresholds,
) -> Option<Vec<(&'a String, &'a Queue)>> {
    let full: Vec<(&String, &Queue)> = queues.iter().filter(|(_, q)| q.full_seconds > 0).collect();
    (!full.is_empty() || host.lost() >= th.listen_overflow_min.max(1)).then_some(full)
}

/// " at <address>" of the fullest listener, so the finding says which socket to look at
/// (`ss -ltn`) when a service listens on several.
fn at_listener(q: &Queue) -> String {
    if q.listener.is_empty() {
        String::new()
    } else {
        format!(" at {}", q.listener)
    }
}

fn accept_queue_overflow(
    full: &[(&String, &Queue)],
    host: &HostCounters,
    th: &DiagnoseThresholds,
) -> Finding {
    let HostCounters {
        overflows,
        drops,
        cookies,
        ..
    } = *host;
    let host_lost = host.lost();
    let title = match full.first() {
        Some((service, q)) => format!(
            "{service}'s accept queue{} was full ({}/{}) for {}",
            at_listener(q),
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
    let mut span = host.span;
    for (service, q) in full {
        finding.evidence.push(format!(
            "{service}: accept queue{} at {} or more of its limit (peak {}/{}), {}",
            at_listener(q),
            util::percent(th.listen_queue_full_ratio),
            q.max_length,
            q.limit,
            util::clock_span(q.first_full_t, q.last_full_t)
        ));
        finding.subjects.services.push(service.to_string());
        span = Some(Span::widened(span, q.first_full_t, q.last_full_t));
        finding.value("queue_limit", q.limit as f64);
    }
    if host_lost > 0 || cookies > 0 {
        finding.evidence.push(format!(
            "host-wide: {drops} listen drops ({overflows} of them accept-queue overflows), \
             {cookies} SYN cookies sent"
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
    finding
}

fn connection_churn(
    service: &str,
    role: Role,
    c: &Churn,
    rate: f64,
    busiest_t: u64,
    span_s: f64,
) -> Finding {
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
    finding.subjects.services.push(service.to_string());
    finding.value("opens_per_s", rate);
    finding.magnitude = rate;
    finding
}

/// How far apart an accept-queue overflow and the SYN trouble it explains may be, in seconds.
const OVERFLOW_NEAR_S: u64 = 10;

/// Connect timeouts and SYN retransmits towards a service whose accept queue on this host
/// overflowed at the time are that overflow (the kernel drops SYNs it cannot queue, and the
/// local clients retry and give up), not the network their advice would blame. Says so.
pub(super) fn explain_syn_trouble(findings: &mut [Finding]) {
    let overflows: Vec<(Vec<String>, Option<Span>)> = findings
        .iter()
        .filter(|f| f.id == "accept-queue-overflow")
        .map(|f| (f.subjects.services.clone(), f.span))
        .collect();
    for finding in findings
        .iter_mut()
        .filter(|f| f.id == "connect-failures" || f.id == "retransmits")
    {
        let Some(service) = overflows.iter().find_map(|(services, span)| {
            let near = match (span, finding.span) {
                (Some(a), Some(b)) => {
                    a.start_s <= b.end_s + OVERFLOW_NEAR_S && b.start_s <= a.end_s + OVERFLOW_NEAR_S
                }
                _ => true,
            };
            services
                .iter()
                .find(|s| near && finding.subjects.services.contains(s))
        }) else {
            continue;
        };
        if finding.id == "retransmits"
            && finding
                .values
                .get("syn_retransmits")
                .copied()
                .unwrap_or(0.0)
                == 0.0
        {
            continue;
        }
        finding.evidence.insert(
            0,
            format!(
                "{service}'s accept queue on this host overflowed at the same time (see the \
                 accept-queue finding)"
            ),
        );
        finding.advice = format!(
            "These are most likely this host's own full accept queue for {service}: the \
             kernel drops SYNs it cannot queue, and the clients retry and time out. Fix the \
             accept queue first (see that finding); look at the network only if they go on \
             after it. {}",
            finding.advice
        );
    }
}
