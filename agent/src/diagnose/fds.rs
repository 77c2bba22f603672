//! File descriptor pressure: processes near their fd limit or already failing with
//! EMFILE/ENFILE, and the usual cause on cache clients: every process holding a connection to
//! every server of a service.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{snapshot::SecondSnapshot, HistorySnapshot};

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

/// Everything this detector reads from the history, per process name (comm).
struct FdFacts {
    fullest: BTreeMap<String, Fullest>,
    errors: BTreeMap<String, Errors>,
    /// (comm, service) -> the process spread over the most servers.
    meshes: BTreeMap<(String, String), Mesh>,
    known_servers: BTreeMap<String, BTreeSet<String>>,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let facts = FdFacts::collect(snap);
    let mut reported = BTreeSet::new();
    for comm in facts.pressured(th) {
        let full = facts.fullest.get(comm).copied();
        let errs = facts.errors.get(comm);
        let error_count: u64 = errs.map_or(0, |e| e.by_kind.values().sum());
        let Some((severity, title)) = verdict(comm, full, error_count, th) else {
            continue;
        };
        let mut finding = Finding::new("fd-pressure", severity, title);
        let mut span = full.map(|f| usage_evidence(&mut finding, f));
        let mut host_table_full = false;
        if let Some(e) = errs {
            host_table_full = error_evidence(&mut finding, e, error_count);
            span = Some(Span::widened(span, e.first_t, e.last_t));
        }
        let mesh_services = facts.mesh_evidence(&mut finding, comm, full, &mut reported);
        finding.advice = pressure_advice(comm, &mesh_services, host_table_full);
        finding.subjects.processes.push(comm.clone());
        finding.subjects.services.extend(mesh_services);
        finding.span = span;
        finding.magnitude = full.map_or(0.0, |f| f.ratio) * 100.0 + error_count as f64;
        out.push(finding);
    }

    // A full mesh without fd pressure yet, big enough to matter as the tier grows.
    for ((comm, service), mesh) in &facts.meshes {
        if reported.contains(&(comm.clone(), service.clone())) {
            continue;
        }
        let total = facts.servers_of(service, mesh.distinct);
        if mesh.distinct < th.full_mesh_min_servers || (mesh.distinct as f64) < 0.9 * total as f64 {
            continue;
        }
        out.push(full_mesh(comm, service, mesh, total));
    }
}

impl FdFacts {
    fn collect(snap: &HistorySnapshot) -> FdFacts {
        let mut facts = FdFacts {
            fullest: BTreeMap::new(),
            errors: BTreeMap::new(),
            meshes: BTreeMap::new(),
            known_servers: util::servers_by_service(snap, true),
        };
        for second in &snap.seconds {
            facts.add_fds(snap, second);
            facts.add_errors(snap, second);
            facts.add_meshes(snap, second);
        }
        facts
    }

    fn add_fds(&mut self, snap: &HistorySnapshot, second: &SecondSnapshot) {
        for row in &second.fds {
            let entry = self
                .fullest
                .entry(snap.label(row.comm).to_string())
                .or_default();
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
    }

    fn add_errors(&mut self, snap: &HistorySnapshot, second: &SecondSnapshot) {
        for row in &second.fd_errors {
            let entry = self
                .errors
                .entry(snap.label(row.comm).to_string())
                .or_default();
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
    }

    fn add_meshes(&mut self, snap: &HistorySnapshot, second: &SecondSnapshot) {
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
            self.meshes
                .entry(key)
                .and_modify(|m| {
                    if mesh.distinct >= m.distinct {
                        *m = mesh;
                    }
                })
                .or_insert(mesh);
        }
    }

    /// Processes near their limit or with failed calls: the candidates for a finding.
    fn pressured(&self, th: &DiagnoseThresholds) -> BTreeSet<&String> {
        let mut comms: BTreeSet<&String> = self
            .fullest
            .iter()
            .filter(|(_, f)| f.ratio >= th.fd_warn_ratio)
            .map(|(c, _)| c)
            .collect();
        comms.extend(self.errors.keys());
        comms
    }

    /// How many servers `service` has, at least the `seen` one process connects to.
    fn servers_of(&self, service: &str, seen: u32) -> u32 {
        (self.known_servers.get(service).map_or(0, |s| s.len()) as u32).max(seen)
    }

    /// Adds a line per service `comm` connects to, marks those meshes reported, and returns
    /// the services whose connections explain the pressure (a full mesh, or a large share).
    fn mesh_evidence(
        &self,
        finding: &mut Finding,
        comm: &str,
        full: Option<Fullest>,
        reported: &mut BTreeSet<(String, String)>,
    ) -> Vec<String> {
        let mut mesh_services = Vec::new();
        for ((mesh_comm, service), mesh) in &self.meshes {
            if mesh_comm != comm || mesh.distinct == 0 {
                continue;
            }
            let total = self.servers_of(service, mesh.distinct);
            finding.evidence.push(mesh_line(mesh, service, total));
            let is_mesh = mesh.distinct >= 2 && mesh.distinct as f64 >= 0.9 * total as f64;
            let dominant = full.is_some_and(|f| mesh.connections as f64 >= 0.3 * f.open as f64);
            if is_mesh || dominant {
                mesh_services.push(service.clone());
            }
            reported.insert((mesh_comm.clone(), service.clone()));
        }
        mesh_services
    }
}

/// Severity and title of a process's fd pressure: failed calls first, then how full it is.
fn verdict(
    comm: &str,
    full: Option<Fullest>,
    error_count: u64,
    th: &DiagnoseThresholds,
) -> Option<(Severity, String)> {
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
        (None, _) => return None,
    };
    Some((severity, title))
}

/// The fullest moment's line and values; returns that moment as a span.
fn usage_evidence(finding: &mut Finding, f: Fullest) -> Span {
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
    Span {
        start_s: f.t,
        end_s: f.t,
    }
}

/// The failed calls' line and count; returns whether the host's file table was full (ENFILE).
fn error_evidence(finding: &mut Finding, e: &Errors, error_count: u64) -> bool {
    let kinds: Vec<String> = e
        .by_kind
        .iter()
        .map(|((syscall, errno), n)| format!("{syscall} {errno} x{n}"))
        .collect();
    finding.evidence.push(format!(
        "failed calls {}: {}",
        util::clock_span(e.first_t, e.last_t),
        kinds.join(", ")
    ));
    finding.value("fd_errors", error_count as f64);
    e.by_kind.keys().any(|(_, errno)| errno == "ENFILE")
}

fn pressure_advice(comm: &str, mesh_services: &[String], host_table_full: bool) -> String {
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
    advice
}

/// The evidence line for one process's mesh: how many of `service`'s servers it holds
/// connections to, so mesh-pressure and full-mesh findings word it the same way.
fn mesh_line(mesh: &Mesh, service: &str, total: u32) -> String {
    format!(
        "pid {} holds {} to {} of the {total} {service} servers",
        mesh.pid,
        util::plural(mesh.connections as u64, "connection"),
        mesh.distinct,
    )
}

fn full_mesh(comm: &str, service: &str, mesh: &Mesh, total: u32) -> Finding {
    let mut finding = Finding::new(
        "full-mesh",
        Severity::Info,
        format!(
            "{comm} connects to all {} {service} servers from every process",
            mesh.distinct
        ),
    );
    finding.evidence.push(mesh_line(mesh, service, total));
    finding.advice = "Each process of this program holds a connection to every server, so \
        connections grow with processes x servers and eventually exhaust descriptors on \
        clients and connection slots on servers. Consider a per-host proxy such as \
        twemproxy (nutcracker) or a shared connection pool."
        .to_string();
    finding.subjects.processes.push(comm.to_string());
    finding.subjects.services.push(service.to_string());
    finding.value("distinct_servers", mesh.distinct as f64);
    finding.magnitude = mesh.distinct as f64;
    finding
}
