//! File descriptor pressure: processes near their fd limit or already failing with
//! EMFILE/ENFILE, and the usual cause on cache clients: every process holding a connection to
//! every server of a service.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::HistorySnapshot;

#[derive(Default, Clone, Copy)]
struct Fullest {
    ratio: f64,
    pid: u32,
    open: u32,
    limit: u32,
    t: u64,
}

#[derive(Default)]
struct Errors {
    /// (syscall, errno) -> count
    by_kind: BTreeMap<(String, String), u64>,
    first_t: u64,
    last_t: u64,
}

#[derive(Clone, Copy)]
struct Mesh {
    pid: u32,
    distinct: u32,
    connections: u32,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let mut fullest: BTreeMap<String, Fullest> = BTreeMap::new();
    let mut errors: BTreeMap<String, Errors> = BTreeMap::new();
    let mut meshes: BTreeMap<(String, String), Mesh> = BTreeMap::new();
    let mut known_servers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.fds {
            let entry = fullest.entry(snap.label(row.comm).to_string()).or_default();
            if row.ratio() >= entry.ratio {
                *entry = Fullest {
                    ratio: row.ratio(),
                    pid: row.pid,
                    open: row.open_fds,
                    limit: row.limit,
                    t: second.t,
                };
            }
        }
        for row in &second.fd_errors {
            let entry = errors.entry(snap.label(row.comm).to_string()).or_default();
            if entry.by_kind.is_empty() {
                entry.first_t = second.t;
            }
            entry.last_t = second.t;
            *entry
                .by_kind
                .entry((
                    snap.label(row.syscall).to_string(),
                    snap.label(row.errno).to_string(),
                ))
                .or_default() += row.count as u64;
        }
        for row in &second.process_connections {
            let key = (
                snap.label(row.comm).to_string(),
                snap.label(row.service).to_string(),
            );
            let mesh = Mesh {
                pid: row.pid,
                distinct: row.distinct_servers,
                connections: row.connections,
            };
            meshes
                .entry(key)
                .and_modify(|m| {
                    if mesh.distinct >= m.distinct {
                        *m = mesh;
                    }
                })
                .or_insert(mesh);
        }
        let servers = second
            .requests
            .iter()
            .map(|r| (r.service, r.server))
            .chain(second.opened.iter().map(|r| (r.service, r.server)))
            .chain(
                second
                    .edge_connections
                    .iter()
                    .map(|r| (r.service, r.server)),
            );
        for (service, server) in servers {
            known_servers
                .entry(snap.label(service).to_string())
                .or_default()
                .insert(snap.label(server).to_string());
        }
    }
    let servers_of = |service: &str, seen: u32| {
        (known_servers.get(service).map_or(0, |s| s.len()) as u32).max(seen)
    };

    let mut comms: BTreeSet<&String> = fullest
        .iter()
        .filter(|(_, f)| f.ratio >= th.fd_warn_ratio)
        .map(|(c, _)| c)
        .collect();
    comms.extend(errors.keys());
    let mut reported = BTreeSet::new();
    for comm in comms {
        let full = fullest.get(comm).copied();
        let errs = errors.get(comm);
        let error_count: u64 = errs.map_or(0, |e| e.by_kind.values().sum());
        let severity = if error_count > 0 || full.is_some_and(|f| f.ratio >= th.fd_critical_ratio) {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let title = match (full, error_count) {
            (_, n) if n > 0 => format!(
                "{comm} ran out of file descriptors: {} failed with EMFILE/ENFILE",
                util::plural(n, "call")
            ),
            (Some(f), _) => format!(
                "{comm} is near its file descriptor limit: {}/{} open ({})",
                f.open,
                f.limit,
                util::percent(f.ratio)
            ),
            (None, _) => continue,
        };
        let mut finding = Finding::new("fd-pressure", severity, title);
        let mut span: Option<Span> = None;
        if let Some(f) = full {
            finding.evidence.push(format!(
                "pid {} had {} of {} descriptors open ({}) at {}",
                f.pid,
                f.open,
                f.limit,
                util::percent(f.ratio),
                util::clock(f.t)
            ));
            finding.value("fd_usage_ratio", f.ratio);
            finding.value("fd_limit", f.limit as f64);
            span = Some(Span {
                start_s: f.t,
                end_s: f.t,
            });
        }
        let mut host_table_full = false;
        if let Some(e) = errs {
            let kinds: Vec<String> = e
                .by_kind
                .iter()
                .map(|((syscall, errno), n)| format!("{syscall} {errno} x{n}"))
                .collect();
            host_table_full = e.by_kind.keys().any(|(_, errno)| errno == "ENFILE");
            finding.evidence.push(format!(
                "failed calls {}: {}",
                util::clock_span(e.first_t, e.last_t),
                kinds.join(", ")
            ));
            finding.value("fd_errors", error_count as f64);
            span = Some(match span {
                Some(s) => Span {
                    start_s: s.start_s.min(e.first_t),
                    end_s: s.end_s.max(e.last_t),
                },
                None => Span {
                    start_s: e.first_t,
                    end_s: e.last_t,
                },
            });
        }
        let mut mesh_services = Vec::new();
        for ((mesh_comm, service), mesh) in &meshes {
            if mesh_comm != comm || mesh.distinct == 0 {
                continue;
            }
            let total = servers_of(service, mesh.distinct);
            finding.evidence.push(format!(
                "pid {} holds {} to {} of the {} {service} servers",
                mesh.pid,
                util::plural(mesh.connections as u64, "connection"),
                mesh.distinct,
                total
            ));
            let is_mesh = mesh.distinct >= 2 && mesh.distinct as f64 >= 0.9 * total as f64;
            let dominant = full.is_some_and(|f| mesh.connections as f64 >= 0.3 * f.open as f64);
            if is_mesh || dominant {
                mesh_services.push(service.clone());
            }
            reported.insert((mesh_comm.clone(), service.clone()));
        }
        let mut advice = format!(
            "Raise {comm}'s descriptor limit (LimitNOFILE= in its systemd unit, ulimit -n, or \
             live with prlimit --nofile) and check it does not leak descriptors."
        );
        if !mesh_services.is_empty() {
            advice.push_str(&format!(
                " Its cache connections are a large share: every process connecting to every \
                 {} server multiplies descriptors by the number of servers. Share connections \
                 through a per-host pool, or put a proxy such as twemproxy (nutcracker) in front \
                 so each process needs one connection.",
                mesh_services.join("/")
            ));
        }
        if host_table_full {
            advice.push_str(
                " ENFILE means the whole host's file table is full: raise fs.file-max and find \
                 which processes hold the most files.",
            );
        }
        finding.advice = advice;
        finding.subjects.processes.push(comm.clone());
        finding.subjects.services.extend(mesh_services);
        finding.span = span;
        finding.magnitude = full.map_or(0.0, |f| f.ratio) * 100.0 + error_count as f64;
        out.push(finding);
    }

    // A full mesh without fd pressure yet, big enough to matter as the tier grows.
    for ((comm, service), mesh) in &meshes {
        if reported.contains(&(comm.clone(), service.clone())) {
            continue;
        }
        let total = servers_of(service, mesh.distinct);
        if mesh.distinct < th.full_mesh_min_servers || (mesh.distinct as f64) < 0.9 * total as f64 {
            continue;
        }
        let mut finding = Finding::new(
            "full-mesh",
            Severity::Info,
            format!(
                "{comm} connects to all {} {service} servers from every process",
                mesh.distinct
            ),
        );
        finding.evidence.push(format!(
            "pid {} holds {} to {} of {} servers",
            mesh.pid,
            util::plural(mesh.connections as u64, "connection"),
            mesh.distinct,
            total
        ));
        finding.advice = "Each process of this program holds a connection to every server, so \
            connections grow with processes x servers and eventually exhaust descriptors on \
            clients and connection slots on servers. Consider a per-host proxy such as \
            twemproxy (nutcracker) or a shared connection pool."
            .to_string();
        finding.subjects.processes.push(comm.clone());
        finding.subjects.services.push(service.clone());
        finding.value("distinct_servers", mesh.distinct as f64);
        finding.magnitude = mesh.distinct as f64;
        out.push(finding);
    }
}
