//! Micro-outages: error or latency spikes of a few seconds that vanish in one-minute averages.
//! Works per service at 1 s resolution, and reports when repeated spikes line up on the same
//! second of the minute (cron jobs, periodic flushes, scheduled tasks).

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{
    latency::{self, LatencyHistogram},
    HistorySnapshot, TcpEvent,
};

use crate::model::Role;

#[derive(Default)]
struct Second {
    requests: u64,
    failures: u64,
    hist: LatencyHistogram,
    /// Per server: failures plus slow requests, to name where a spike happened.
    trouble_by_server: BTreeMap<String, u64>,
}

struct Episode {
    start: u64,
    end: u64,
    requests: u64,
    failures: u64,
    worst_p99_us: f64,
    latency: bool,
    errors: bool,
    culprit: Option<(String, f64)>,
}

/// What an ordinary second of a service looks like, to judge each second against.
struct Typical {
    p99_us: Option<f64>,
    error_ratio: f64,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    for (service, seconds) in &collect(snap, th) {
        if let Some(finding) = detect_service(service, seconds, th) {
            out.push(finding);
        }
    }
}

/// Client-side requests, failures and latency per service and second.
fn collect(snap: &HistorySnapshot, th: &DiagnoseThresholds) -> BTreeMap<String, Seconds> {
    let mut services: BTreeMap<String, Seconds> = BTreeMap::new();
    let slow_us = th.spike_min_latency_ms * 1000.0;
    for second in &snap.seconds {
        let t = second.t;
        for row in second.requests.iter().filter(|r| r.role == Role::Client) {
            let s = util::by_service(&mut services, snap, row.service, t);
            s.requests += row.count as u64;
            if row.status.is_failure() {
                s.failures += row.count as u64;
                *s.trouble_by_server
                    .entry(snap.label(row.server).to_string())
                    .or_default() += row.count as u64;
            }
        }
        for row in second.latency.iter().filter(|r| r.role == Role::Client) {
            let hist = row.histogram();
            let s = util::by_service(&mut services, snap, row.service, t);
            let slow = hist.count_at_least(slow_us);
            if slow > 0 {
                *s.trouble_by_server
                    .entry(snap.label(row.server).to_string())
                    .or_default() += slow;
            }
            s.hist.merge(&hist);
        }
        for row in &second.tcp {
            if matches!(
                row.event,
                TcpEvent::ConnectRefused | TcpEvent::ConnectTimeout | TcpEvent::ConnectReset
            ) {
                util::by_service(&mut services, snap, row.service, t).failures += row.count as u64;
            }
        }
    }
    services
}

type Seconds = BTreeMap<u64, Second>;

fn detect_service(
    service: &str,
    seconds: &BTreeMap<u64, Second>,
    th: &DiagnoseThresholds,
) -> Option<Finding> {
    let typical = typical(seconds, th)?;
    let episodes = episodes(seconds, &typical, th);
    if episodes.is_empty() {
        return None;
    }
    micro_outage(service, &episodes, typical.p99_us)
}

/// The median p99 and error ratio over the service's seconds; None when it was active too
/// few seconds to call anything typical.
fn typical(seconds: &BTreeMap<u64, Second>, th: &DiagnoseThresholds) -> Option<Typical> {
    let active = seconds.values().filter(|s| s.requests > 0).count() as u64;
    if active < th.spike_min_active_s {
        return None;
    }
    let p99_us = util::median(
        &seconds
            .values()
            .filter(|s| s.requests >= th.spike_min_requests)
            .filter_map(|s| s.hist.quantile_us(0.99))
            .collect::<Vec<_>>(),
    );
    let error_ratio = util::median(
        &seconds
            .values()
            .filter(|s| s.requests > 0)
            .map(|s| s.failures as f64 / s.requests as f64)
            .collect::<Vec<_>>(),
    )
    .unwrap_or(0.0);
    Some(Typical {
        p99_us,
        error_ratio,
    })
}

/// Whether a second is an error spike and whether it is a latency spike.
fn spiking(s: &Second, typical: &Typical, th: &DiagnoseThresholds) -> (bool, bool) {
    let ratio = s.failures as f64 / s.requests.max(1) as f64;
    let errors = s.failures >= th.spike_min_errors
        && ratio >= th.spike_error_ratio
        && ratio > 5.0 * typical.error_ratio;
    let latency = match (typical.p99_us, s.hist.quantile_us(0.99)) {
        (Some(typical), Some(p99)) => {
            // Judged from the bucket that holds the bound, as stalls are (slow.rs): a p99 in
            // that bucket reads as its middle, which may sit just below the bound itself.
            let slow_us = latency::bucket_floor_us(
                (th.spike_latency_ratio * typical).max(th.spike_min_latency_ms * 1000.0),
            );
            s.requests >= th.spike_min_requests
                && p99 >= slow_us
                && s.hist.count_at_least(slow_us) >= th.spike_min_slow_requests
        }
        _ => false,
    };
    (errors, latency)
}

/// Runs of contiguous spiking seconds shorter than `spike_max_len_s` (longer ones are
/// outages, not micro-outages), each with the server most of its trouble came from.
fn episodes(
    seconds: &BTreeMap<u64, Second>,
    typical: &Typical,
    th: &DiagnoseThresholds,
) -> Vec<Episode> {
    let mut episodes: Vec<Episode> = Vec::new();
    let mut current: Option<Episode> = None;
    let mut close = |done: Option<Episode>| {
        if let Some(episode) = done {
            if episode.end - episode.start < th.spike_max_len_s {
                episodes.push(episode);
            }
        }
    };
    for (&t, s) in seconds {
        let (errors, latency) = spiking(s, typical, th);
        let contiguous = current.as_ref().is_some_and(|e| e.end + 1 == t);
        if !contiguous || !(errors || latency) {
            close(current.take());
        }
        if !(errors || latency) {
            continue;
        }
        let episode = current.get_or_insert(Episode {
            start: t,
            end: t,
            requests: 0,
            failures: 0,
            worst_p99_us: 0.0,
            latency: false,
            errors: false,
            culprit: None,
        });
        episode.end = t;
        episode.requests += s.requests;
        episode.failures += s.failures;
        episode.worst_p99_us = episode
            .worst_p99_us
            .max(s.hist.quantile_us(0.99).unwrap_or(0.0));
        episode.latency |= latency;
        episode.errors |= errors;
    }
    close(current.take());
    for episode in &mut episodes {
        episode.culprit = culprit(seconds, episode.start, episode.end);
    }
    episodes
}

/// The server with the most trouble in `start..=end`, with its share of it.
fn culprit(seconds: &BTreeMap<u64, Second>, start: u64, end: u64) -> Option<(String, f64)> {
    let mut by_server: BTreeMap<&String, u64> = BTreeMap::new();
    for (_, s) in seconds.range(start..=end) {
        for (server, n) in &s.trouble_by_server {
            *by_server.entry(server).or_default() += n;
        }
    }
    let total: u64 = by_server.values().sum();
    let (server, n) = by_server.into_iter().max_by_key(|(_, n)| *n)?;
    (total > 0).then(|| (server.clone(), n as f64 / total as f64))
}

fn micro_outage(service: &str, episodes: &[Episode], typical_p99: Option<f64>) -> Option<Finding> {
    let alignment = aligned_second(episodes);
    let mut finding = Finding::new(
        "micro-outage",
        Severity::Warning,
        spikes_title(service, episodes, alignment),
    );
    for e in episodes.iter().take(6) {
        let line = episode_line(e, typical_p99, &mut finding);
        finding.evidence.push(line);
    }
    if episodes.len() > 6 {
        finding
            .evidence
            .push(format!("and {} more", episodes.len() - 6));
    }
    if let Some(second) = alignment {
        finding.evidence.push(format!(
            "the spikes start at second :{second:02} of the minute"
        ));
        finding.value("aligned_second_of_minute", second as f64);
    }
    finding.advice = format!(
        "Spikes this short disappear in one-minute averages but fail real requests.{} Look for \
         periodic jobs on the clients, the servers and the network path at those times (cron, \
         backups, log rotation, batch loads, configuration pushes), and correlate with the \
         other findings for the servers named.",
        if alignment.is_some() {
            " Repeating at the same second of the minute points at something scheduled."
        } else {
            ""
        }
    );
    finding.subjects.services.push(service.to_string());
    finding.value("spikes", episodes.len() as f64);
    finding.span = Some(Span {
        start_s: episodes.first()?.start,
        end_s: episodes.last()?.end,
    });
    finding.magnitude = episodes.len() as f64;
    Some(finding)
}

fn spikes_title(service: &str, episodes: &[Episode], alignment: Option<u64>) -> String {
    let kinds = match (
        episodes.iter().any(|e| e.errors),
        episodes.iter().any(|e| e.latency),
    ) {
        (true, true) => "error and latency",
        (true, false) => "error",
        _ => "latency",
    };
    let longest = episodes
        .iter()
        .map(|e| e.end - e.start + 1)
        .max()
        .unwrap_or(1);
    let mut title = format!(
        "{} short {kinds} {} on {service} (up to {} each)",
        episodes.len(),
        if episodes.len() == 1 {
            "spike"
        } else {
            "spikes"
        },
        util::seconds(longest as f64)
    );
    if let Some(second) = alignment {
        title.push_str(&format!(", at :{second:02} of the minute"));
    }
    title
}

/// One episode's evidence line; names the server behind most of it as a subject.
fn episode_line(e: &Episode, typical_p99: Option<f64>, finding: &mut Finding) -> String {
    let mut line = format!(
        "{}: {} of {} requests failed, p99 {} (typical {})",
        util::clock_span(e.start, e.end),
        e.failures,
        e.requests,
        util::latency(e.worst_p99_us),
        typical_p99.map_or("-".to_string(), util::latency)
    );
    if let Some((server, share)) = &e.culprit {
        if *share >= 0.6 {
            line.push_str(&format!(", mostly {server}"));
            if !finding.subjects.servers.contains(server) {
                finding.subjects.servers.push(server.clone());
            }
        }
    }
    line
}

/// The second of the minute most spikes start at (within one second either way), when at
/// least two spikes and two thirds of them agree.
fn aligned_second(episodes: &[Episode]) -> Option<u64> {
    if episodes.len() < 2 {
        return None;
    }
    let starts: Vec<u64> = episodes.iter().map(|e| e.start % 60).collect();
    let near = |a: u64, b: u64| {
        let d = a.abs_diff(b);
        d.min(60 - d) <= 1
    };
    let (best, count) = (0..60u64)
        .map(|candidate| {
            let count = starts.iter().filter(|&&s| near(s, candidate)).count();
            (candidate, count)
        })
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| {
                    // Prefer the candidate where most starts are exactly.
                    let exact = |c: u64| starts.iter().filter(|&&s| s == c).count();
                    exact(a.0).cmp(&exact(b.0))
                })
                .then(b.0.cmp(&a.0))
        })?;
    (count >= 2 && count * 3 >= episodes.len() * 2).then_some(best)
}
