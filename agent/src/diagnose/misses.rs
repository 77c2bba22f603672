//! Cold cache / miss storm: a server whose hit ratio falls sharply, typically because it was
//! restarted or flushed. Finds the second the ratio dropped by comparing a baseline window
//! before each second with a short window after it, and looks for restart signs around then.

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{HistorySnapshot, TcpEvent};

use crate::model::{ClosedBy, Role, Status};

#[derive(Default)]
struct Lookups {
    /// Per second offset from the snapshot start: (hits, misses).
    per_second: BTreeMap<u64, (u64, u64)>,
    misses_by_comm: BTreeMap<String, u64>,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let mut servers: BTreeMap<(String, String), Lookups> = BTreeMap::new();
    for second in &snap.seconds {
        for row in second
            .requests
            .iter()
            .filter(|r| r.role == Role::Client && r.status.is_lookup())
        {
            let lookups = servers
                .entry((
                    snap.label(row.service).to_string(),
                    snap.label(row.server).to_string(),
                ))
                .or_default();
            let slot = lookups.per_second.entry(second.t).or_default();
            if row.status == Status::Hit {
                slot.0 += row.count as u64;
            } else {
                slot.1 += row.count as u64;
                *lookups
                    .misses_by_comm
                    .entry(snap.label(row.comm).to_string())
                    .or_default() += row.count as u64;
            }
        }
    }
    for ((service, server), lookups) in &servers {
        if let Some(drop) = find_drop(lookups, snap.start_s, snap.end_s, th) {
            out.push(finding(service, server, lookups, &drop, snap, th));
        }
    }
}

struct Drop {
    at: u64,
    before: (u64, u64),
    after: (u64, u64),
    recent: (u64, u64),
}

fn ratio((hits, misses): (u64, u64)) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

fn find_drop(lookups: &Lookups, start: u64, end: u64, th: &DiagnoseThresholds) -> Option<Drop> {
    if end < start {
        return None;
    }
    // Prefix sums over the whole span (bounded by the history's capacity).
    let len = (end - start + 1) as usize;
    let mut prefix = vec![(0u64, 0u64); len + 1];
    for i in 0..len {
        let (h, m) = lookups
            .per_second
            .get(&(start + i as u64))
            .copied()
            .unwrap_or_default();
        prefix[i + 1] = (prefix[i].0 + h, prefix[i].1 + m);
    }
    let sum =
        |from: usize, to: usize| (prefix[to].0 - prefix[from].0, prefix[to].1 - prefix[from].1);
    let total = |(h, m): (u64, u64)| h + m;
    let mut best: Option<(f64, usize)> = None;
    for i in 1..len {
        let before = sum(i.saturating_sub(th.miss_before_s as usize), i);
        let after = sum(i, (i + th.miss_after_s as usize).min(len));
        if total(before) < th.miss_min_lookups || total(after) < th.miss_min_lookups {
            continue;
        }
        let fall = ratio(before) - ratio(after);
        if fall >= th.miss_min_drop && best.is_none_or(|(b, _)| fall > b + 1e-9) {
            best = Some((fall, i));
        }
    }
    let (_, i) = best?;
    let recent_from = len.saturating_sub(th.miss_after_s as usize).max(i);
    Some(Drop {
        at: start + i as u64,
        before: sum(i.saturating_sub(th.miss_before_s as usize), i),
        after: sum(i, (i + th.miss_after_s as usize).min(len)),
        recent: sum(recent_from, len),
    })
}

fn finding(
    service: &str,
    server: &str,
    lookups: &Lookups,
    drop: &Drop,
    snap: &HistorySnapshot,
    th: &DiagnoseThresholds,
) -> Finding {
    let (before, after) = (ratio(drop.before), ratio(drop.after));
    let mut finding = Finding::new(
        "miss-storm",
        Severity::Warning,
        format!(
            "Hit ratio of {server} ({service}) fell from {} to {} at {}",
            util::percent(before),
            util::percent(after),
            util::clock(drop.at)
        ),
    );
    finding.evidence.push(format!(
        "{} lookups in the {} before: {} hits; {} lookups in the {} after: {} hits ({} misses/s)",
        drop.before.0 + drop.before.1,
        util::seconds(th.miss_before_s.min(drop.at - snap.start_s) as f64),
        util::percent(before),
        drop.after.0 + drop.after.1,
        util::seconds(th.miss_after_s as f64),
        util::percent(after),
        drop.after.1 / th.miss_after_s.max(1),
    ));
    if drop.recent.0 + drop.recent.1 > 0 {
        finding.evidence.push(format!(
            "hit ratio at the end of the window: {}",
            util::percent(ratio(drop.recent))
        ));
    }
    let restart = restart_signs(snap, service, server, drop.at);
    if !restart.is_empty() {
        finding.evidence.push(format!(
            "around then: {} (looks like a restart)",
            restart.join(", ")
        ));
    }
    let mut comms: Vec<(&String, &u64)> = lookups
        .misses_by_comm
        .iter()
        .filter(|(c, _)| !c.is_empty())
        .collect();
    comms.sort_by(|a, b| b.1.cmp(a.1));
    if !comms.is_empty() {
        let listed: Vec<String> = comms
            .iter()
            .map(|(c, n)| format!("{c} ({n} misses)"))
            .collect();
        finding.evidence.push(format!(
            "missing processes: {}",
            util::truncated(&listed, 4)
        ));
        finding
            .subjects
            .processes
            .extend(comms.iter().map(|(c, _)| c.to_string()));
    }
    finding.advice = "The server lost its data (restart, crash, flush_all) or its keys moved to \
        it from another server. Check its uptime (stats: uptime) and who sent flush_all. Misses \
        fall through to the backing store: watch its load, and warm the cache or throttle the \
        read path until the hit ratio recovers."
        .to_string();
    finding.subjects.services.push(service.to_string());
    finding.subjects.servers.push(server.to_string());
    finding.value("hit_ratio_before", before);
    finding.value("hit_ratio_after", after);
    finding.value("started_at_s", drop.at as f64);
    finding.span = Some(Span {
        start_s: drop.at,
        end_s: snap.end_s,
    });
    finding.magnitude = (before - after) * 100.0;
    finding
}

/// Connections to the server closed or reset, or refused, within 15 s before the drop.
fn restart_signs(snap: &HistorySnapshot, service: &str, server: &str, at: u64) -> Vec<String> {
    let (mut closed, mut resets, mut refused) = (0u64, 0u64, 0u64);
    for second in snap
        .seconds
        .iter()
        .filter(|s| s.t + 15 >= at && s.t <= at + 1)
    {
        let ours = |svc: u32, srv: u32| snap.label(svc) == service && snap.label(srv) == server;
        for row in &second.closed {
            if ours(row.service, row.server)
                && row.role == Role::Client
                && matches!(row.closed_by, ClosedBy::Peer | ClosedBy::Reset)
            {
                closed += row.count as u64;
            }
        }
        for row in &second.tcp {
            if !ours(row.service, row.server) {
                continue;
            }
            match row.event {
                // Resets the server sent its clients; one its own socket received (watched
                // when the server is on this host) came from a client, no sign of a restart.
                TcpEvent::ResetReceived if row.role == Role::Client => resets += row.count as u64,
                TcpEvent::ConnectRefused => refused += row.count as u64,
                _ => {}
            }
        }
    }
    let mut signs = Vec::new();
    if closed > 0 {
        signs.push(format!(
            "{} closed by the server",
            util::plural(closed, "connection")
        ));
    }
    if resets > 0 {
        signs.push(format!("{} received", util::plural(resets, "reset")));
    }
    if refused > 0 {
        signs.push(format!("{refused} connection attempts refused"));
    }
    signs
}
