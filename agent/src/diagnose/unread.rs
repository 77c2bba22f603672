//! Hit ratios that leave lookups out: a service whose client side saw lookups it could not
//! tell hit from miss ([`Status::Unknown`]), most often multi-key batches larger than the
//! capture follows (64 KiB of headers per call), text, binary or meta `mg ... q`. Their hits
//! count where answers were seen; the rest is out of the ratio, which may then read high (the
//! misses of an unread batch are never answered), so the SRE is pointed at the server side,
//! which counts every key.

use std::collections::BTreeMap;

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::HistorySnapshot;
use crate::model::{Role, Status};

/// One service's lookups in the window, per role.
#[derive(Default)]
struct Lookups {
    hits: u64,
    misses: u64,
    /// Lookups of unknown outcome, per command.
    unknown: BTreeMap<String, u64>,
    first_s: Option<u64>,
    last_s: u64,
}

impl Lookups {
    fn unknown(&self) -> u64 {
        self.unknown.values().sum()
    }

    fn ratio(&self) -> Option<f64> {
        let lookups = self.hits + self.misses;
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    // Commands that look keys up: those seen with a hit or a miss anywhere in the window.
    let lookup_commands: std::collections::BTreeSet<&str> = snap
        .seconds
        .iter()
        .flat_map(|s| &s.requests)
        .filter(|r| r.status.is_lookup())
        .map(|r| snap.label(r.command))
        .collect();
    let mut services: BTreeMap<(String, Role), Lookups> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.requests {
            let command = snap.label(row.command);
            if !lookup_commands.contains(command) {
                continue;
            }
            let lookups = services
                .entry((snap.label(row.service).to_string(), row.role))
                .or_default();
            let count = u64::from(row.count);
            match row.status {
                Status::Hit => lookups.hits += count,
                Status::Miss => lookups.misses += count,
                Status::Unknown => {
                    *lookups.unknown.entry(command.to_string()).or_default() += count;
                    lookups.first_s.get_or_insert(second.t);
                    lookups.last_s = second.t;
                }
                _ => {}
            }
        }
    }
    for ((service, role), client) in &services {
        if *role != Role::Client || client.unknown() < th.unread_min_lookups {
            continue;
        }
        let server = services.get(&(service.clone(), Role::Server));
        out.push(finding(service, client, server));
    }
}

fn finding(service: &str, client: &Lookups, server: Option<&Lookups>) -> Finding {
    let unknown = client.unknown();
    let mut finding = Finding::new(
        "unread-lookups",
        Severity::Warning,
        format!(
            "Client-side hit ratio of {service} leaves out lookups it could not read ({unknown} \
             of unknown outcome)"
        ),
    );
    let counted = match client.ratio() {
        Some(ratio) => format!(
            "{} hits and {} misses counted (hit ratio {})",
            client.hits,
            client.misses,
            util::percent(ratio)
        ),
        None => "no hit or miss counted".to_string(),
    };
    let by_command: Vec<String> = client
        .unknown
        .iter()
        .map(|(command, n)| format!("{command} {n}"))
        .collect();
    finding.evidence.push(format!(
        "{counted}; of unknown outcome: {} (each a request, or the unread rest of a \
         multi-key batch, that the capture cut; its hits seen count, its misses cannot)",
        util::truncated(&by_command, 4)
    ));
    if let Some(ratio) = server.and_then(Lookups::ratio) {
        let server = server.unwrap_or(client);
        let also = match server.unknown() {
            0 => String::new(),
            n => format!("; it too has {n} of unknown outcome (a line past 64 KiB): only memcached's stats are exact"),
        };
        finding.evidence.push(format!(
            "server side of {service} on this host: {} hits and {} misses (hit ratio {}){also}",
            server.hits,
            server.misses,
            util::percent(ratio)
        ));
    }
    finding.advice = format!(
        "Read {service}'s hit ratio at the server: its role=\"server\" series where an agent \
         runs beside memcached, or memcached's own `stats` (get_hits, get_misses). The client \
         side follows at most 64 KiB of request headers per call (limits.capture_bytes): a \
         multi-get of thousands of keys in one call (pymemcache get_many, bmemcached or dalli \
         get_multi, a meta `mg ... q` batch) is read in part. Splitting such batches into calls of a few hundred keys \
         makes the client side exact again."
    );
    finding.subjects.services.push(service.to_string());
    finding
        .subjects
        .commands
        .extend(client.unknown.keys().cloned());
    finding.value("unread_lookups", unknown as f64);
    finding.value("hits", client.hits as f64);
    finding.value("misses", client.misses as f64);
    if let Some(start_s) = client.first_s {
        finding.span = Some(Span {
            start_s,
            end_s: client.last_s,
        });
    }
    finding.magnitude = unknown as f64;
    finding
}
