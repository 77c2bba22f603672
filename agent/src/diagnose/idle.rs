//! Idle disconnects: a server that closes connections after a consistent idle time, and the
//! processes that then wrote onto those dead connections (old memcache clients lost SETs this
//! way without noticing). Dead writes on servers without a consistent timeout are reported too.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{snapshot::Label, HistorySnapshot};

use crate::model::{ClosedBy, DeadWriteOutcome, Role};

#[derive(Default)]
struct Closes {
    count: u64,
    idle_s: Vec<f64>,
    first_t: u64,
    last_t: u64,
}

type Outcomes = BTreeMap<DeadWriteOutcome, u64>;

#[derive(Default)]
struct DeadWrites {
    /// (comm, command) -> outcome -> count
    by_writer: BTreeMap<(String, String), Outcomes>,
    total: u64,
    unnoticed: u64,
    first_t: u64,
    last_t: u64,
}

/// Commands that change data: losing one silently loses data, not just a cache fill.
const STORAGE_COMMANDS: &[&str] = &[
    "set",
    "add",
    "replace",
    "append",
    "prepend",
    "cas",
    "delete",
    "incr",
    "decr",
    "touch",
    "ms",
    "md",
    "ma",
    "bin_set",
    "bin_add",
    "bin_replace",
    "bin_delete",
    "bin_incr",
    "bin_decr",
    "bin_append",
    "bin_prepend",
    "bin_setq",
    "bin_addq",
    "bin_replaceq",
    "bin_deleteq",
    "bin_incrq",
    "bin_decrq",
    "bin_appendq",
    "bin_prependq",
    "bin_touch",
];

type Endpoint = (String, String, Role);

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let name = |id: Label| snap.label(id).to_string();
    let mut closes: BTreeMap<Endpoint, Closes> = BTreeMap::new();
    let mut dead: BTreeMap<Endpoint, DeadWrites> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.closed {
            // The server side closed first: the peer for a client socket, us for a server one.
            let server_closed = matches!(
                (row.role, row.closed_by),
                (Role::Client, ClosedBy::Peer) | (Role::Server, ClosedBy::Local)
            );
            if !server_closed {
                continue;
            }
            let entry = closes
                .entry((name(row.service), name(row.server), row.role))
                .or_default();
            if entry.count == 0 {
                entry.first_t = second.t;
            }
            entry.count += row.count as u64;
            entry.last_t = second.t;
            entry
                .idle_s
                .extend(row.idle_ms.iter().map(|&ms| ms as f64 / 1000.0));
        }
        for row in &second.dead_writes {
            let entry = dead
                .entry((name(row.service), name(row.server), row.role))
                .or_default();
            if entry.total == 0 {
                entry.first_t = second.t;
            }
            entry.last_t = second.t;
            entry.total += row.count as u64;
            if row.outcome == DeadWriteOutcome::Unnoticed {
                entry.unnoticed += row.count as u64;
            }
            let command = match snap.label(row.command) {
                "" => "unknown command".to_string(),
                c => c.to_string(),
            };
            *entry
                .by_writer
                .entry((writer_name(snap.label(row.comm)), command))
                .or_default()
                .entry(row.outcome)
                .or_default() += row.count as u64;
        }
    }

    for (endpoint, closes) in &closes {
        let Some(timeout) = consistent_timeout(closes, th) else {
            continue;
        };
        // This host's server writing onto connections its clients closed is another story
        // (their timeouts, below), not the writes its idle timeout caused: those are the
        // clients', on their hosts.
        let writes = match endpoint.2 {
            Role::Client => dead.remove(endpoint),
            Role::Server => None,
        };
        out.push(idle_finding(endpoint, closes, timeout, writes.as_ref()));
    }
    for (endpoint, writes) in &dead {
        out.push(dead_write_finding(endpoint, writes));
    }
}

fn writer_name(comm: &str) -> String {
    if comm.is_empty() {
        "unknown process".to_string()
    } else {
        comm.to_string()
    }
}

struct Timeout {
    inferred_s: f64,
    min_s: f64,
    median_s: f64,
    max_s: f64,
}

fn consistent_timeout(closes: &Closes, th: &DiagnoseThresholds) -> Option<Timeout> {
    if closes.idle_s.len() < th.idle_min_closes as usize {
        return None;
    }
    let mut idle = closes.idle_s.clone();
    idle.sort_by(f64::total_cmp);
    let low = util::quantile_sorted(&idle, 0.1)?;
    let median = util::quantile_sorted(&idle, 0.5)?;
    let high = util::quantile_sorted(&idle, 0.9)?;
    let allowed = th.idle_max_spread_s.max(th.idle_max_spread_ratio * median);
    if median < th.idle_min_timeout_s || high - low > allowed {
        return None;
    }
    Some(Timeout {
        inferred_s: util::infer_timeout(low),
        min_s: idle[0],
        median_s: median,
        max_s: idle[idle.len() - 1],
    })
}

fn idle_finding(
    (service, server, role): &Endpoint,
    closes: &Closes,
    timeout: Timeout,
    writes: Option<&DeadWrites>,
) -> Finding {
    let who = match role {
        Role::Client => format!("{server} ({service})"),
        Role::Server => format!("this host's {service} on {server}"),
    };
    let mut title = format!(
        "{who} closes clients idle for {}",
        util::seconds(timeout.inferred_s)
    );
    let severity = match writes {
        Some(w) if w.unnoticed > 0 && writes_storage(w) => Severity::Critical,
        Some(_) => Severity::Warning,
        None => Severity::Info,
    };
    if let Some(w) = writes {
        title.push_str(&format!(
            "; {} then went onto closed connections",
            util::plural(w.total, "write")
        ));
    }
    let mut finding = Finding::new("idle-disconnects", severity, title);
    finding.evidence.push(format!(
        "{} closed by the server after {}-{} idle (median {}), {}",
        util::plural(closes.count, "connection"),
        util::seconds(timeout.min_s).trim_end_matches(" s"),
        util::seconds(timeout.max_s),
        util::seconds(timeout.median_s),
        util::clock_span(closes.first_t, closes.last_t),
    ));
    let mut span = Span {
        start_s: closes.first_t,
        end_s: closes.last_t,
    };
    if let Some(w) = writes {
        dead_write_evidence(w, &mut finding);
        span.start_s = span.start_s.min(w.first_t);
        span.end_s = span.end_s.max(w.last_t);
    }
    finding.advice = format!(
        "Clients keep connections idle longer than the server allows. Make the clients close, \
         ping or re-validate pooled connections idle for more than {t} (pool max idle time, \
         TCP keepalive is not enough), or raise the server's idle timeout (memcached: \
         -o idle_timeout) above the clients' longest idle period.{lost}",
        t = util::seconds(timeout.inferred_s),
        lost = if writes.is_some_and(|w| w.unnoticed > 0) {
            " Writes marked unnoticed were lost while the application believed they succeeded: \
             upgrade or configure the client to detect closed connections before writing."
        } else {
            ""
        }
    );
    finding.subjects.services.push(service.clone());
    finding.subjects.servers.push(server.clone());
    finding.value("idle_timeout_s", timeout.inferred_s);
    finding.value("idle_min_s", timeout.min_s);
    finding.value("idle_median_s", timeout.median_s);
    finding.value("idle_max_s", timeout.max_s);
    finding.value("closes", closes.count as f64);
    if let Some(w) = writes {
        finding.value("dead_writes", w.total as f64);
        finding.value("dead_writes_unnoticed", w.unnoticed as f64);
    }
    finding.span = Some(span);
    finding.magnitude = writes.map_or(0.0, |w| w.unnoticed as f64 * 10.0 + w.total as f64)
        + closes.count as f64 / 100.0;
    finding
}

fn writes_storage(writes: &DeadWrites) -> bool {
    writes.by_writer.iter().any(|((_, command), outcomes)| {
        outcomes.contains_key(&DeadWriteOutcome::Unnoticed)
            && (STORAGE_COMMANDS.contains(&command.as_str()) || command == "unknown command")
    })
}

fn dead_write_evidence(writes: &DeadWrites, finding: &mut Finding) {
    let mut by_comm: BTreeMap<&str, Vec<(&str, &Outcomes)>> = BTreeMap::new();
    for ((comm, command), outcomes) in &writes.by_writer {
        by_comm
            .entry(comm.as_str())
            .or_default()
            .push((command.as_str(), outcomes));
    }
    let mut commands = BTreeSet::new();
    for (comm, entries) in &by_comm {
        let total: u64 = entries.iter().flat_map(|(_, o)| o.values()).sum();
        let mut outcome_totals: BTreeMap<DeadWriteOutcome, u64> = BTreeMap::new();
        let mut parts = Vec::new();
        for (command, outcomes) in entries {
            let n: u64 = outcomes.values().sum();
            parts.push(format!("{command} x{n}"));
            commands.insert(command.to_string());
            for (outcome, count) in outcomes.iter() {
                *outcome_totals.entry(*outcome).or_default() += count;
            }
        }
        let outcomes: Vec<String> = outcome_totals
            .iter()
            .map(|(outcome, count)| match outcome {
                DeadWriteOutcome::Unnoticed => format!("{count} unnoticed"),
                DeadWriteOutcome::Eof => format!("{count} then read EOF"),
                DeadWriteOutcome::Reset => format!("{count} then got a reset/EPIPE"),
                DeadWriteOutcome::Unknown => {
                    format!(
                        "{count} of unknown fate, each one or more writes before the close \
                         (no send/receive tracepoints on this kernel)"
                    )
                }
            })
            .collect();
        finding.evidence.push(format!(
            "{comm} wrote {} onto closed connections ({}): {}",
            util::plural(total, "time"),
            parts.join(", "),
            outcomes.join(", ")
        ));
        if *comm != "unknown process" {
            finding.subjects.processes.push(comm.to_string());
        }
    }
    finding.subjects.commands.extend(commands);
    finding.evidence.push(format!(
        "dead writes seen {}",
        util::clock_span(writes.first_t, writes.last_t)
    ));
}

fn dead_write_finding((service, server, role): &Endpoint, writes: &DeadWrites) -> Finding {
    // A server's lost writes are replies: no data is lost with them.
    let severity = if *role == Role::Client && writes.unnoticed > 0 && writes_storage(writes) {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let writes_text = util::plural(writes.total, "write");
    let (title, advice) = match role {
        Role::Client => (
            format!("{writes_text} went onto connections {server} ({service}) had already closed"),
            "The server closed these connections (restart, idle timeout, connection limit) and \
             the clients wrote anyway. Make clients detect closed connections before reusing \
             them (check for EOF, validate pooled connections); writes marked unnoticed were \
             lost.",
        ),
        Role::Server => (
            format!(
                "this host's {service} on {server}: {writes_text} went onto connections its \
                 clients had already closed"
            ),
            "The clients closed these connections before the server's replies were written: \
             they gave up waiting (their request timeout, often after a stall of this server or \
             its host) or exited. The replies are lost, which is harmless in itself; many of \
             them mean clients time out on this server: look for slow or unanswered requests \
             and stalls just before.",
        ),
    };
    let mut finding = Finding::new("dead-writes", severity, title);
    dead_write_evidence(writes, &mut finding);
    finding.advice = advice.to_string();
    finding.subjects.services.push(service.clone());
    finding.subjects.servers.push(server.clone());
    finding.value("dead_writes", writes.total as f64);
    finding.value("dead_writes_unnoticed", writes.unnoticed as f64);
    finding.span = Some(Span {
        start_s: writes.first_t,
        end_s: writes.last_t,
    });
    finding.magnitude = writes.unnoticed as f64 * 10.0 + writes.total as f64;
    finding
}
