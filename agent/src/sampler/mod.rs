//! The /proc sampler: periodic, cheap snapshots of what the kernel already counts about watched
//! services: accept-queue depth and limits of their listeners, descriptor usage of the processes
//! that hold their sockets, host file handles and listen-overflow counters, in every network
//! namespace. It also lists watched connections that already exist, so the tracker can adopt
//! connections opened before the agent started.
//!
//! Layout: `parse` (text -> values) and `aggregate` (values -> per-service / per-comm summaries)
//! are pure and tested on fixtures; `scan` and `diag` are the thin I/O layer.
//!
//! One sample, in order:
//! 1. list pids, read each `/proc/<pid>/ns/net` link, group pids by network namespace inode;
//! 2. per namespace, read net/tcp, net/tcp6 and net/netstat ONCE through one member pid (the
//!    representative; the next member is tried if it exits meanwhile), keeping only rows on
//!    watched ports;
//! 3. if the namespace has any watched socket with an inode, walk `/proc/<pid>/fd` of its member
//!    processes and match `socket:[inode]` links; matched processes get comm and limits read;
//! 4. per namespace with watched listeners, one sock_diag dump for the backlog limits (joining
//!    the namespace with setns when it is not ours); where setns is refused, each listener's
//!    limit is read through its owning process instead (`diag::backlog_via_owner`);
//! 5. aggregate.
//!
//! /proc/net/tcp is not an atomic snapshot (the kernel resumes its hash walk every 4 KiB), so
//! under socket churn a sample can miss a row; repeated rows are dropped.
//!
//! A sample is blocking file and netlink I/O (tens of ms to a few hundred on a busy host): run
//! it on a blocking thread (`tokio::task::spawn_blocking`), not on the async runtime.
//!
//! Known limits: a namespace with no process in it (kept alive by a bind mount only) is not
//! seen; a socket passed to a process in another namespace is only matched if that namespace
//! also has watched sockets; threads that setns(2) into another namespace are not followed.
//! Without root the agent sees only processes of its own user (ns/net and fd links need
//! ptrace-read access); the rest is counted in [`ScanErrors::permission_denied`]. Cost grows with
//! (namespaces x sockets on the host) for the tables, because each namespace's /proc/net/tcp walks
//! the host-wide socket hash (unless net.ipv4.tcp_child_ehash_entries gave it its own), and
//! with the descriptors of processes in namespaces that have watched sockets for the fd walk.

pub mod aggregate;
pub mod diag;
pub mod parse;
pub mod scan;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

pub use aggregate::{
    CommAggregate, CommUsage, ListenQueueSummary, ListenerQueue, ProcessUsage, OTHER_COMM,
};
pub use parse::{FileHandles, TcpExtCounters};

use crate::events::Role;
use aggregate::CounterAccumulator;
use parse::{tcp_state, ParseError, TcpRow};
use scan::{classify, Failure, ProcFs};

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// Normally "/proc".
    pub proc_root: PathBuf,
    /// Watched TCP port -> service name.
    pub watched_ports: BTreeMap<u16, String>,
    /// Distinct comm values reported before folding into [`OTHER_COMM`].
    pub max_comms: usize,
}

impl SamplerConfig {
    pub fn new(watched_ports: BTreeMap<u16, String>, max_comms: usize) -> Self {
        SamplerConfig {
            proc_root: PathBuf::from("/proc"),
            watched_ports,
            max_comms,
        }
    }

    /// Watches every configured service's port under the service's name.
    pub fn from_services(services: &[crate::config::Service], max_comms: usize) -> Self {
        SamplerConfig::new(
            services
                .iter()
                .map(|service| (service.port, service.name.clone()))
                .collect(),
            max_comms,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("cannot list processes in {path}: {source}")]
    ListProcesses { path: String, source: io::Error },
}

/// Problems met during one sample. None of them stops the sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanErrors {
    /// Processes or descriptors that disappeared mid-scan. Normal churn, not an error.
    pub vanished: u64,
    /// Reads refused for lack of privilege (other users' processes when not root, or
    /// processes protected from ptrace-read such as non-dumpable ones).
    pub permission_denied: u64,
    /// Anything else, including /proc text that did not parse.
    pub other: u64,
    /// The first permission or other error of this sample, for a log line.
    pub first_error: Option<String>,
}

impl ScanErrors {
    fn io(&mut self, what: &str, err: &io::Error) {
        match classify(err) {
            Failure::Vanished => self.vanished += 1,
            Failure::Denied => self.note(|errors| &mut errors.permission_denied, what, err),
            Failure::Other => self.note(|errors| &mut errors.other, what, err),
        }
    }

    fn diag(&mut self, what: &str, err: &diag::DiagError) {
        match err.errno() {
            Some(libc::ENOENT | libc::ESRCH | libc::EBADF) => self.vanished += 1,
            Some(libc::EPERM | libc::EACCES) => {
                self.note(|errors| &mut errors.permission_denied, what, err)
            }
            _ => self.note(|errors| &mut errors.other, what, err),
        }
    }

    fn parse(&mut self, what: &str, err: &ParseError) {
        self.note(|errors| &mut errors.other, what, err);
    }

    fn note(
        &mut self,
        counter: impl Fn(&mut Self) -> &mut u64,
        what: &str,
        err: &dyn std::fmt::Display,
    ) {
        *counter(self) += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {err}"));
        }
    }
}

/// Where a sample's time went, to tell a slow /proc from a host with too many sockets or fds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplePhases {
    /// Listing pids and reading their ns/net links.
    pub namespaces: Duration,
    /// tcp, tcp6 and netstat of every namespace.
    pub socket_tables: Duration,
    /// Walking `/proc/<pid>/fd` and reading comm and limits of matched processes.
    pub fd_scan: Duration,
    /// sock_diag dumps for backlog limits.
    pub backlog_limits: Duration,
}

/// Everything one sample found. The lead maps it to metrics; nothing here is a label yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Wall time the sample took.
    pub duration: Duration,
    pub phases: SamplePhases,
    pub processes_seen: usize,
    pub network_namespaces: usize,
    /// ListenOverflows, ListenDrops and SyncookiesSent summed over every network namespace the
    /// agent has seen, kept monotonic across namespaces that disappear (see
    /// [`aggregate::CounterAccumulator`]); export as counters.
    pub tcp_ext: TcpExtCounters,
    /// This sample's raw per-namespace values, keyed by namespace inode.
    pub tcp_ext_by_netns: BTreeMap<u64, TcpExtCounters>,
    /// Host-wide (not namespaced): open file handles and fs.file-max.
    pub file_handles: Option<FileHandles>,
    /// Every LISTEN socket on a watched port, in every namespace.
    pub listeners: Vec<ListenerQueue>,
    /// `listeners` per service (every watched service has an entry).
    pub listen_queues: BTreeMap<String, ListenQueueSummary>,
    /// Watched non-listening sockets per service seen in the tables (owned or not).
    pub connections_by_service: BTreeMap<String, u64>,
    /// Processes holding at least one watched socket, by pid.
    pub processes: Vec<ProcessUsage>,
    /// `processes` by comm, bounded by `max_comms`.
    pub comms: CommAggregate,
    pub errors: ScanErrors,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOwner {
    pub pid: u32,
    pub comm: String,
}

/// A watched TCP connection that exists now, for adoption at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedConnection {
    pub netns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state number (`parse::tcp_state`).
    pub state: u8,
    /// 0 for sockets no process holds (orphans after close, children still in an accept queue).
    pub inode: u64,
    pub service: String,
    /// Server when the local port is the watched one (the rule `tracking` uses).
    pub role: Role,
    /// The lowest pid holding the socket; None when no process holds it or its namespace was
    /// not readable.
    pub owner: Option<SocketOwner>,
}

/// States listed as existing connections: everything with a real socket behind it except
/// listeners. TIME_WAIT and SYN_RECV rows are kernel mini-sockets that no process holds and
/// no data flows on; adopting them would only produce connections that never close.
fn is_listed_connection_state(state: u8) -> bool {
    !matches!(
        state,
        tcp_state::LISTEN | tcp_state::TIME_WAIT | tcp_state::SYN_RECV | tcp_state::NEW_SYN_RECV
    )
}

#[derive(Debug, Clone, Copy)]
struct WatchedSocket {
    service: usize,
    listening: bool,
    /// Index into the connection list when connections are collected.
    connection: Option<usize>,
}

#[derive(Debug, Default)]
struct Namespace {
    members: Vec<u32>,
    /// The member whose tables were read.
    representative: Option<u32>,
    has_watched_sockets: bool,
    has_watched_listeners: bool,
}

pub struct Sampler {
    procfs: ProcFs,
    ports: HashMap<u16, usize>,
    service_names: Vec<String>,
    max_comms: usize,
    counters: CounterAccumulator,
    /// setns(2) was refused once (no CAP_SYS_ADMIN, or a service sandbox): that does not change
    /// while the process runs, so other namespaces go straight to the owner-based read.
    setns_refused: bool,
}

/// How many members of a namespace to try when the first ones exit during the read.
const REPRESENTATIVE_ATTEMPTS: usize = 4;

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let mut service_names: Vec<String> = Vec::new();
        let mut ports = HashMap::new();
        for (port, name) in config.watched_ports {
            let index = match service_names.iter().position(|known| *known == name) {
                Some(index) => index,
                None => {
                    service_names.push(name);
                    service_names.len() - 1
                }
            };
            ports.insert(port, index);
        }
        Sampler {
            procfs: ProcFs::new(config.proc_root),
            ports,
            service_names,
            max_comms: config.max_comms,
            counters: CounterAccumulator::default(),
            setns_refused: false,
        }
    }

    /// One periodic sample.
    pub fn sample(&mut self) -> Result<Snapshot, SamplerError> {
        self.run(false).map(|(snapshot, _)| snapshot)
    }

    /// A sample plus the list of watched connections that exist right now (start-up adoption).
    pub fn sample_with_connections(
        &mut self,
    ) -> Result<(Snapshot, Vec<WatchedConnection>), SamplerError> {
        self.run(true)
    }

    fn service_of(&self, row: &TcpRow) -> Option<(usize, Role)> {
        if let Some(&service) = self.ports.get(&row.local.port()) {
            return Some((service, Role::Server));
        }
        if row.state == tcp_state::LISTEN {
            return None;
        }
        self.ports
            .get(&row.remote.port())
            .map(|&service| (service, Role::Client))
    }

    fn run(
        &mut self,
        list_connections: bool,
    ) -> Result<(Snapshot, Vec<WatchedConnection>), SamplerError> {
        let started = Instant::now();
        let mut errors = ScanErrors::default();
        let pids = self
            .procfs
            .pids()
            .map_err(|source| SamplerError::ListProcesses {
                path: self.procfs.root().display().to_string(),
                source,
            })?;

        let mut namespaces: BTreeMap<u64, Namespace> = BTreeMap::new();
        for &pid in &pids {
            match self.procfs.netns_of(pid) {
                Ok(netns) => namespaces.entry(netns).or_default().members.push(pid),
                Err(err) => errors.io(&format!("pid {pid} ns/net"), &err),
            }
        }

        let namespaces_done = started.elapsed();

        let mut found = Found::new(self.service_names.len(), list_connections);
        for (&netns, namespace) in namespaces.iter_mut() {
            self.read_namespace(netns, namespace, &mut found, &mut errors);
        }
        let Found {
            watched,
            mut listeners,
            mut connections,
            connections_by_service,
            netstat_readings,
            ..
        } = found;

        let tables_done = started.elapsed();
        let (processes, listener_owners) =
            self.scan_processes(&namespaces, &watched, &mut connections, &mut errors);
        let fds_done = started.elapsed();
        self.fill_backlog_limits(&namespaces, &listener_owners, &mut listeners, &mut errors);
        let backlog_done = started.elapsed();

        let file_handles = match self.procfs.read_file_nr() {
            Ok(Ok(handles)) => Some(handles),
            Ok(Err(err)) => {
                errors.parse("sys/fs/file-nr", &err);
                None
            }
            Err(err) => {
                errors.io("sys/fs/file-nr", &err);
                None
            }
        };

        let alive: BTreeSet<u64> = namespaces.keys().copied().collect();
        let tcp_ext = self.counters.update(&netstat_readings, &alive);
        let listen_queues = aggregate::summarize_listen_queues(&self.service_names, &listeners);
        let comms = aggregate::aggregate_by_comm(&processes, self.max_comms);
        let snapshot = Snapshot {
            duration: started.elapsed(),
            phases: SamplePhases {
                namespaces: namespaces_done,
                socket_tables: tables_done - namespaces_done,
                fd_scan: fds_done - tables_done,
                backlog_limits: backlog_done - fds_done,
            },
            processes_seen: pids.len(),
            network_namespaces: namespaces.len(),
            tcp_ext,
            tcp_ext_by_netns: netstat_readings.into_iter().collect(),
            file_handles,
            listeners,
            listen_queues,
            connections_by_service: self
                .service_names
                .iter()
                .cloned()
                .zip(connections_by_service)
                .collect(),
            processes,
            comms,
            errors,
        };
        Ok((snapshot, connections))
    }

    /// Reads one namespace's tables and counters through its first member that stays alive
    /// long enough, and records its watched sockets in `found`.
    fn read_namespace(
        &self,
        netns: u64,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) {
        for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
            let mut rows = Vec::new();
            match self.read_namespace_tables(pid, &mut rows, errors) {
                Ok(()) => {}
                Err(err) if classify(&err) == Failure::Vanished => {
                    errors.vanished += 1;
                    continue;
                }
                Err(err) => {
                    errors.io(&format!("netns {netns} via pid {pid} net/tcp"), &err);
                    return;
                }
            }
            namespace.representative = Some(pid);
            match self.procfs.read_netstat(pid) {
                Ok(Ok(counters)) => found.netstat_readings.push((netns, counters)),
                Ok(Err(err)) => errors.parse(&format!("netns {netns} net/netstat"), &err),
                Err(err) => errors.io(&format!("netns {netns} net/netstat"), &err),
            }
            drop_duplicate_rows(&mut rows);
            for (row, service, role) in rows {
                self.record_row(netns, namespace, row, service, role, found);
            }
            return;
        }
    }

    fn record_row(
        &self,
        netns: u64,
        namespace: &mut Namespace,
        row: TcpRow,
        service: usize,
        role: Role,
        found: &mut Found,
    ) {
        let listening = row.state == tcp_state::LISTEN;
        if listening {
            namespace.has_watched_listeners = true;
            found.listeners.push(ListenerQueue {
                service: self.service_names[service].clone(),
                netns,
                local: row.local,
                inode: row.inode,
                queue_len: row.rx_queue,
                limit: None,
            });
        } else if is_listed_connection_state(row.state) {
            found.connections_by_service[service] += 1;
        } else {
            return;
        }
        let mut connection = None;
        if found.list_connections && !listening {
            connection = Some(found.connections.len());
            found.connections.push(WatchedConnection {
                netns,
                local: row.local,
                remote: row.remote,
                state: row.state,
                inode: row.inode,
                service: self.service_names[service].clone(),
                role,
                owner: None,
            });
        }
        if row.inode != 0 {
            namespace.has_watched_sockets = true;
            found.watched.insert(
                row.inode,
                WatchedSocket {
                    service,
                    listening,
                    connection,
                },
            );
        }
    }

    /// Watched rows of tcp and tcp6 as seen through `pid`. A missing tcp6 on a live process
    /// means IPv6 is disabled, not that the process exited.
    fn read_namespace_tables(
        &self,
        pid: u32,
        rows: &mut Vec<(TcpRow, usize, Role)>,
        errors: &mut ScanErrors,
    ) -> io::Result<()> {
        let mut visit = |row: Result<TcpRow, ParseError>| match row {
            Ok(row) => {
                if let Some((service, role)) = self.service_of(&row) {
                    rows.push((row, service, role));
                }
            }
            Err(err) => errors.parse(&format!("pid {pid} net/tcp row"), &err),
        };
        let wanted = |local: u16, remote: u16| {
            self.ports.contains_key(&local) || self.ports.contains_key(&remote)
        };
        self.procfs.read_tcp_table(pid, "tcp", wanted, &mut visit)?;
        match self.procfs.read_tcp_table(pid, "tcp6", wanted, &mut visit) {
            Err(err) if classify(&err) == Failure::Vanished => {
                if self.procfs.netns_of(pid).is_err() {
                    return Err(err);
                }
                Ok(())
            }
            other => other,
        }
    }

    fn scan_processes(
        &self,
        namespaces: &BTreeMap<u64, Namespace>,
        watched: &HashMap<u64, WatchedSocket>,
        connections: &mut [WatchedConnection],
        errors: &mut ScanErrors,
    ) -> (Vec<ProcessUsage>, HashMap<u64, ListenerOwner>) {
        let mut processes = Vec::new();
        let mut listener_owners = HashMap::new();
        if watched.is_empty() {
            return (processes, listener_owners);
        }
        let mut matched = Vec::new();
        for (&netns, namespace) in namespaces {
            if !namespace.has_watched_sockets {
                continue;
            }
            for &pid in &namespace.members {
                matched.clear();
                let open_fds = match self.procfs.scan_fds(pid, watched, &mut matched) {
                    Ok(open) => open,
                    Err(err) => {
                        errors.io(&format!("pid {pid} fd"), &err);
                        continue;
                    }
                };
                if matched.is_empty() {
                    continue;
                }
                let comm = match self.procfs.read_comm(pid) {
                    Ok(comm) => comm,
                    Err(err) => {
                        errors.io(&format!("pid {pid} comm"), &err);
                        continue;
                    }
                };
                let soft_nofile = match self.procfs.read_soft_nofile(pid) {
                    Ok(Ok(limit)) => limit,
                    Ok(Err(err)) => {
                        errors.parse(&format!("pid {pid} limits"), &err);
                        continue;
                    }
                    Err(err) => {
                        errors.io(&format!("pid {pid} limits"), &err);
                        continue;
                    }
                };
                let mut usage = ProcessUsage {
                    pid,
                    comm,
                    netns,
                    open_fds,
                    soft_nofile,
                    connections: BTreeMap::new(),
                    listening_sockets: BTreeMap::new(),
                };
                // A process can hold the same socket in several fds (dup); count sockets once.
                matched.sort_unstable_by_key(|found| found.inode);
                matched.dedup_by_key(|found| found.inode);
                for found in &matched {
                    let socket = watched[&found.inode];
                    if socket.listening {
                        listener_owners
                            .entry(found.inode)
                            .or_insert(ListenerOwner { pid, fd: found.fd });
                    }
                    let name = &self.service_names[socket.service];
                    let counts = if socket.listening {
                        &mut usage.listening_sockets
                    } else {
                        &mut usage.connections
                    };
                    *counts.entry(name.clone()).or_default() += 1;
                    if let Some(index) = socket.connection {
                        // Members are visited in ascending pid order: the first owner is
                        // the lowest pid.
                        connections[index].owner.get_or_insert_with(|| SocketOwner {
                            pid,
                            comm: usage.comm.clone(),
                        });
                    }
                }
                processes.push(usage);
            }
        }
        (processes, listener_owners)
    }

    /// Backlog limits: one sock_diag dump per namespace with watched listeners (joining the
    /// namespace when it is not ours); listeners still without a limit, because setns is not
    /// allowed or the dump missed them, are read through their owning process.
    fn fill_backlog_limits(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        listener_owners: &HashMap<u64, ListenerOwner>,
        listeners: &mut [ListenerQueue],
        errors: &mut ScanErrors,
    ) {
        if listeners.is_empty() {
            return;
        }
        let own_netns = self.procfs.own_netns().ok();
        for (&netns, namespace) in namespaces {
            if !namespace.has_watched_listeners {
                continue;
            }
            let Some(representative) = namespace.representative else {
                continue;
            };
            let dump = if own_netns == Some(netns) {
                diag::query_listeners(None)
            } else if self.setns_refused {
                continue;
            } else {
                match self.procfs.open_netns(representative) {
                    Ok(handle) => diag::query_listeners(Some(&handle)),
                    Err(err) => {
                        errors.io(&format!("netns {netns} open"), &err);
                        continue;
                    }
                }
            };
            match dump {
                Ok(dump) => {
                    let limits: HashMap<u64, u32> = dump
                        .iter()
                        .map(|listener| (listener.inode, listener.limit))
                        .collect();
                    for listener in listeners.iter_mut().filter(|l| l.netns == netns) {
                        listener.limit = limits.get(&listener.inode).copied();
                    }
                }
                // Expected where setns is not permitted: the owners are asked below instead, and
                // only a listener that stays without a limit is reported.
                Err(err) if own_netns != Some(netns) && err.errno() == Some(libc::EPERM) => {
                    self.setns_refused = true;
                }
                Err(err) => errors.diag(&format!("netns {netns} sock_diag"), &err),
            }
        }
        for listener in listeners.iter_mut().filter(|l| l.limit.is_none()) {
            let Some(owner) = listener_owners.get(&listener.inode) else {
                continue;
            };
            match diag::backlog_via_owner(owner.pid, owner.fd, listener.inode) {
                Ok((_, limit)) => listener.limit = Some(limit),
                Err(diag::DiagError::Changed) => errors.vanished += 1,
                Err(err) => errors.diag(&format!("pid {} listener backlog", owner.pid), &err),
            }
        }
    }
}

/// Which process descriptor holds a watched listener, for reading its backlog through it.
#[derive(Debug, Clone, Copy)]
struct ListenerOwner {
    pid: u32,
    fd: i32,
}

/// What the namespace tables of one sample yielded.
struct Found {
    list_connections: bool,
    /// Socket inode -> what it is, for matching `/proc/<pid>/fd` links.
    watched: HashMap<u64, WatchedSocket>,
    listeners: Vec<ListenerQueue>,
    connections: Vec<WatchedConnection>,
    connections_by_service: Vec<u64>,
    netstat_readings: Vec<(u64, TcpExtCounters)>,
}

impl Found {
    fn new(services: usize, list_connections: bool) -> Self {
        Found {
            list_connections,
            watched: HashMap::new(),
            listeners: Vec::new(),
            connections: Vec::new(),
            connections_by_service: vec![0; services],
            netstat_readings: Vec::new(),
        }
    }
}

/// /proc/net/tcp is not an atomic snapshot: while sockets are created the kernel's walk can
/// print the same socket twice (seen here with a child socket entering an accept queue during
/// the read). One socket is one (local, remote, inode): distinct SO_REUSEPORT listeners differ
/// in inode, and two live connections never share both addresses.
fn drop_duplicate_rows(rows: &mut Vec<(TcpRow, usize, Role)>) {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    rows.retain(|(row, _, _)| seen.insert((row.local, row.remote, row.inode)));
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{
        net::TcpListener,
        os::fd::{FromRawFd, OwnedFd},
    };

    /// A listener on 127.0.0.1 with an exact backlog (std picks its own).
    pub fn listen_loopback(backlog: i32) -> TcpListener {
        // SAFETY: plain socket calls on a descriptor we own; results are checked.
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let bound = libc::bind(
                raw,
                (&address as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
            assert_eq!(
                libc::listen(raw, backlog),
                0,
                "listen: {}",
                std::io::Error::last_os_error()
            );
            TcpListener::from(fd)
        }
    }
}

#[cfg(test)]
mod tests;
