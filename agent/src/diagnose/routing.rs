//! Key routing inconsistency: the same key sent by this host to two servers of one service,
//! which is what clients with different server lists or hashing settings produce.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::HistorySnapshot;

#[derive(Default)]
struct Pair {
    /// Requests sent to the other server.
    count: u64,
    /// Distinct keys among them.
    keys: u64,
    /// (comm sending to the first server, comm sending to the second) -> requests
    senders: BTreeMap<(String, String), u64>,
    /// Requests of `count` whose key one process (one pid) sent to both servers.
    one_process: u64,
    examples: BTreeSet<u64>,
}

const EXAMPLES: usize = 3;

/// Server pairs per service, and when splits were seen.
#[derive(Default)]
struct Splits {
    services: BTreeMap<String, BTreeMap<(String, String), Pair>>,
    spans: BTreeMap<String, Span>,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let Splits { services, spans } = collect(snap);
    for (service, pairs) in services {
        let total: u64 = pairs.values().map(|p| p.count).sum();
        if total >= th.key_split_min {
            let span = spans.get(&service).copied();
            out.push(key_routing(service, &pairs, total, span));
        }
    }
}

fn collect(snap: &HistorySnapshot) -> Splits {
    let mut splits = Splits::default();
    for second in &snap.seconds {
        for row in &second.key_splits {
            let service = snap.label(row.service).to_string();
            let mut ends = [
                (snap.label(row.servers[0]), snap.label(row.comms[0])),
                (snap.label(row.servers[1]), snap.label(row.comms[1])),
            ];
            ends.sort();
            let pair = splits
                .services
                .entry(service.clone())
                .or_default()
                .entry((ends[0].0.to_string(), ends[1].0.to_string()))
                .or_default();
            pair.count += row.count as u64;
            pair.keys += row.keys as u64;
            if row.one_process {
                pair.one_process += row.count as u64;
            }
            *pair
                .senders
                .entry((ends[0].1.to_string(), ends[1].1.to_string()))
                .or_default() += row.count as u64;
            for &hash in &row.examples {
                if pair.examples.len() < EXAMPLES {
                    pair.examples.insert(hash);
                }
            }
            let span = splits.spans.entry(service).or_insert(Span {
                start_s: second.t,
                end_s: second.t,
            });
            span.end_s = second.t;
        }
    }
    splits
}

fn key_routing(
    service: String,
    pairs: &BTreeMap<(String, String), Pair>,
    total: u64,
    span: Option<Span>,
) -> Finding {
    let keys: u64 = pairs.values().map(|p| p.keys).sum();
    let one_sender = one_sender(pairs);
    let why = match &one_sender {
        Some(Sender::OneProcess(comm)) => format!("{comm} sent them to both"),
        Some(Sender::SameName(comm)) => format!("{comm} processes disagree on routing"),
        None => "clients disagree on routing".to_string(),
    };
    let mut finding = Finding::new(
        "key-routing",
        Severity::Warning,
        format!(
            "{} of {service} went to two different servers ({}): {why}",
            util::plural(keys, "key"),
            util::plural(total, "request")
        ),
    );
    let mut ordered: Vec<_> = pairs.iter().collect();
    ordered.sort_by_key(|(_, pair)| std::cmp::Reverse(pair.count));
    for ((a, b), pair) in ordered.iter().take(5) {
        pair_evidence(&mut finding, a, b, pair);
    }
    if let Some(span) = span {
        finding.evidence.push(format!(
            "seen {}",
            util::clock_span(span.start_s, span.end_s)
        ));
        finding.span = Some(span);
    }
    let general = "Clients use different server lists or hashing settings (order, \
        weights, hash or distribution function, or one client ejected a server), so a key \
        is cached twice and reads can return stale data. Give every client the identical \
        server list and hashing options (e.g. ketama consistent hashing), or route all of \
        them through one proxy such as twemproxy.";
    finding.advice = match one_sender {
        // A proxy's ejection looks like this, and the advice to route through a proxy would
        // be wrong for it.
        Some(Sender::OneProcess(comm)) => format!(
            "Only {comm} sent these keys, each key to both servers from one process. If it is \
             a proxy or a client that ejects failing servers (twemproxy with auto_eject_hosts, \
             a client's failover), it moved the keys off a server that failed or stalled then \
             (see the other findings) and moves them back when it returns: reads may return \
             stale data meanwhile, so keep ejection for caches that tolerate it. Otherwise the \
             clients it holds (one per library, thread or pool) use different server lists or \
             hashing settings: {general}"
        ),
        // Workers of one program (php-fpm, gunicorn) share a name, not a ring.
        Some(Sender::SameName(comm)) => format!(
            "Different {comm} processes sent these keys to different servers: their server \
             lists or hashing settings differ (processes left running on an old config after \
             a deploy, or each process ejecting failing servers on its own). {general}"
        ),
        None => general.to_string(),
    };
    finding.subjects.services.push(service);
    finding.value("split_keys", keys as f64);
    finding.value("split_requests", total as f64);
    finding.magnitude = total as f64;
    finding
}

/// Who sent the split keys to both servers of every pair, when one program name did.
enum Sender {
    /// Each key from one process (one pid) to both servers.
    OneProcess(String),
    /// Processes of one name, not all the same process.
    SameName(String),
}

/// The one program name that sent the split keys to both servers of every pair, if one did,
/// and whether it was one process: names alone cannot tell a proxy's ejection from workers
/// of one program with different server lists.
fn one_sender(pairs: &BTreeMap<(String, String), Pair>) -> Option<Sender> {
    let mut senders = pairs.values().flat_map(|pair| pair.senders.keys());
    let (first, second) = senders.next()?;
    let same = |(a, b): &(String, String)| a == first && b == first;
    if first.is_empty() || first != second || !senders.all(same) {
        return None;
    }
    let one_process = pairs.values().all(|pair| pair.one_process == pair.count);
    Some(match one_process {
        true => Sender::OneProcess(first.clone()),
        false => Sender::SameName(first.clone()),
    })
}

/// The lines for one pair of servers: its keys, and which programs sent them where.
fn pair_evidence(finding: &mut Finding, a: &String, b: &String, pair: &Pair) {
    let examples: Vec<String> = pair.examples.iter().map(|h| format!("#{h:016x}")).collect();
    finding.evidence.push(format!(
        "{a} and {b}: {} in {} (key hashes {})",
        util::plural(pair.keys, "key"),
        util::plural(pair.count, "request"),
        examples.join(", ")
    ));
    for ((comm_a, comm_b), n) in &pair.senders {
        if comm_a.is_empty() && comm_b.is_empty() {
            continue;
        }
        let who = |c: &str| if c.is_empty() { "?" } else { c }.to_string();
        finding.evidence.push(format!(
            "  {} sent them to {a}, {} to {b} ({n})",
            who(comm_a),
            who(comm_b)
        ));
        for comm in [comm_a, comm_b] {
            if !comm.is_empty() && !finding.subjects.processes.contains(comm) {
                finding.subjects.processes.push(comm.clone());
            }
        }
    }
    for server in [a, b] {
        if !finding.subjects.servers.contains(server) {
            finding.subjects.servers.push(server.clone());
        }
    }
}
