//! The /proc sampler: periodic, cheap snapshots of what the kernel already counts about watched
//! services: accept-queue depth and limits of their listeners, descriptor usage of the processes
//! that hold their sockets, host file handles and listen-overflow counters, in every network
//! namespace. It also lists watched connections that already exist, so the tracker can adopt
//! connections opened before the agent started.
//!
//! Layout: `parse` (text -> values) and `aggregate` (values -> per-service / per-comm summaries)
//! are pure and tested on fixtures; `scan` and `diag` are the thin I/O layer. This file holds the
//! sample's order (`Sampler::run`) and what it returns; `tables` reads each namespace's socket
//! tables (steps 2 and 4), `found` is what they yielded, and `fd_walk` is step 3.
//!
//! One sample, in order:
//! 1. list pids, read each `/proc/<pid>/ns/net` link, group pids by network namespace inode;
//! 2. per namespace, list the watched sockets with one sock_diag dump per address family, the
//!    kernel filtering on the watched ports and the wanted states (joining the namespace with
//!    setns from a short-lived thread when it is not ours), and read net/netstat through one
//!    member pid. sock_diag also gives each listener's accept-queue length and limit, and its
//!    drop count (asked for in a listener-only request per family). Where
//!    sock_diag cannot be used (unavailable, or setns refused for another namespace) the
//!    namespace's net/tcp and net/tcp6 text is read through a member instead, which costs CPU
//!    for every socket of the namespace; [`Snapshot::table_sources`] counts both paths and the
//!    reason is logged once;
//! 3. for namespaces with watched sockets, find which processes hold them by matching
//!    `socket:[inode]` links in `/proc/<pid>/fd`, reusing the previous walk of a process when
//!    its descriptor count and its watched sockets are unchanged (see
//!    `Sampler::scan_processes`), within a per-sample budget; owning processes get comm and
//!    limits read;
//! 4. listeners still without a limit (text path): one sock_diag listener dump in their
//!    namespace, or where setns is refused, through their owning process
//!    (`diag::backlog_via_owner`);
//! 5. aggregate, including what each listener dropped since the last sample
//!    ([`aggregate::ListenerDrops`]).
//!
//! Neither a dump nor /proc/net/tcp is an atomic snapshot (both resume their walk of the
//! kernel's socket hash between reads), so under socket churn a sample can miss a socket;
//! sockets seen twice are dropped.
//!
//! A sample is blocking file and netlink I/O (tens of ms to a few hundred on a busy host): run
//! it on a blocking thread (`tokio::task::spawn_blocking`), not on the async runtime.
//!
//! Known limits: a namespace with no process in it (kept alive by a bind mount only) is not
//! seen; a socket passed to a process in another namespace is only matched if that namespace
//! also has watched sockets; threads that setns(2) into another namespace are not followed.
//! Without root the agent sees only processes of its own user (ns/net and fd links need
//! ptrace-read access); the rest is counted in [`ScanErrors::permission_denied`]. Cost grows with
//! (namespaces x sockets on the host) for the dumps, because each namespace's dump walks the
//! host-wide socket hash (unless net.ipv4.tcp_child_ehash_entries gave it its own), though in
//! the kernel and without formatting text; and with the descriptors of processes whose
//! descriptors changed for the fd walk. Memory per watched socket is 12 bytes in the socket
//! list (which also keeps the connections of namespaces whose dump is reused) and 4 bytes in
//! the owner cache, both refilled in place between samples and shrunk after a spike.

pub mod aggregate;
pub mod diag;
pub mod fd_arming;
mod fd_walk;
mod found;
pub mod parse;
pub mod scan;
mod tables;
#[cfg(test)]
pub(crate) mod testing;

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
pub use fd_walk::FdWalkStats;
pub use parse::{FileHandles, TcpExtCounters};
pub use tables::TableSources;

use crate::model::Role;
use aggregate::{CounterAccumulator, ListenerDrops};
use fd_walk::{CachedProcess, ListedConnections};
use found::WatchedSocket;
use parse::ParseError;
use scan::{classify, Failure, ProcFs};
use tables::NamespaceDump;

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

    /// Watches every configured service's ports under the service's name.
    pub fn from_services(services: &[crate::config::Service], max_comms: usize) -> Self {
        SamplerConfig::new(
            services
                .iter()
                .flat_map(|service| {
                    service
                        .ports
                        .iter()
                        .map(|&port| (port, service.name.clone()))
                })
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
    /// Watched sockets (sock_diag, or tcp and tcp6 text) and netstat of every namespace.
    pub socket_tables: Duration,
    /// Walking `/proc/<pid>/fd` (where due) and reading comm and limits of owning processes.
    pub fd_scan: Duration,
    /// Backlog limits the socket tables did not give (text path only).
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
    /// How the namespaces' socket tables were read (sock_diag or the /proc text fallback).
    pub table_sources: TableSources,
    /// Work and reuse of the fd walk.
    pub fd_walk: FdWalkStats,
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
    /// SYNs and handshakes the service's listeners dropped since the previous sample (their
    /// sk_drops); services without any are absent. The first sample only sets the baseline.
    pub listener_drops: BTreeMap<String, u64>,
    /// Watched non-listening sockets per service seen in the tables (owned or not).
    pub connections_by_service: BTreeMap<String, u64>,
    /// Processes holding at least one watched socket, by pid.
    pub processes: Vec<ProcessUsage>,
    /// `processes` by comm, bounded by `max_comms`.
    pub comms: CommAggregate,
    /// Open client connections per service, server and process name.
    pub client_edges: Vec<aggregate::ClientEdge>,
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
    /// Kernel TCP state number ([`parse::TcpState`]).
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
    ports: HashMap<u16, u16>,
    service_names: Vec<String>,
    max_comms: usize,
    counters: CounterAccumulator,
    listener_drops: ListenerDrops,
    /// setns(2) was refused once (no CAP_SYS_ADMIN, or a service sandbox): that does not change
    /// while the process runs, so other namespaces go straight to the fallbacks.
    setns_refused: bool,
    /// socket(AF_NETLINK, NETLINK_SOCK_DIAG) failed: every namespace is read from /proc text.
    sock_diag_unavailable: bool,
    /// The kernel refused the port filter bytecode (before Linux 4.16 there is no port
    /// equality op): dumps are unfiltered and the ports checked here.
    port_filter_refused: bool,
    /// The inet_diag port filter for the watched ports, None when it would not fit.
    port_filter: Option<Vec<u8>>,
    /// Whether `stat /proc/<pid>/fd` reports the descriptor count (Linux 6.2+).
    fd_count_supported: bool,
    /// Fd-walk results by pid.
    processes: HashMap<u32, CachedProcess>,
    /// Sample counter, for the cache's ages.
    samples: u64,
    /// The last sample's watched-socket list, sorted by inode. Kept so its allocation is
    /// reused and so the connections of namespaces whose dump is reused need no other copy.
    watched_buffer: Vec<WatchedSocket>,
    /// The servers of client-role sockets in `watched_buffer`.
    servers: found::ServerTable,
    /// Last full dump per namespace, for reuse while its connections did not change.
    namespace_dumps: HashMap<u64, NamespaceDump>,
}

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
            // Services are configured by hand: far fewer than 65536.
            ports.insert(port, u16::try_from(index).unwrap_or(u16::MAX));
        }
        let port_list: Vec<u16> = ports.keys().copied().collect();
        let procfs = ProcFs::new(config.proc_root);
        Sampler {
            fd_count_supported: procfs.fd_count_supported(),
            procfs,
            port_filter: diag::port_filter_bytecode(&port_list),
            ports,
            service_names,
            max_comms: config.max_comms,
            counters: CounterAccumulator::default(),
            listener_drops: ListenerDrops::default(),
            setns_refused: false,
            sock_diag_unavailable: false,
            port_filter_refused: false,
            processes: HashMap::new(),
            samples: 0,
            watched_buffer: Vec::new(),
            servers: found::ServerTable::default(),
            namespace_dumps: HashMap::new(),
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

    fn run(
        &mut self,
        list_connections: bool,
    ) -> Result<(Snapshot, Vec<WatchedConnection>), SamplerError> {
        let started = Instant::now();
        self.samples += 1;
        let mut errors = ScanErrors::default();
        let pids = self
            .procfs
            .pids()
            .map_err(|source| SamplerError::ListProcesses {
                path: self.procfs.root().display().to_string(),
                source,
            })?;
        let mut namespaces = self.group_by_namespace(&pids, &mut errors);
        let fd_counts = self.fd_counts(&namespaces, &mut errors);
        let namespaces_done = started.elapsed();

        let mut found = self.read_tables(&mut namespaces, list_connections, &mut errors);
        let tables_done = started.elapsed();

        let fd_walk::ProcessScan {
            processes,
            listener_owners,
            stats: fd_walk,
            edges,
        } = self.scan_processes(
            &namespaces,
            &fd_counts,
            &found.watched,
            ListedConnections {
                connections: &mut found.connections,
                by_inode: &found.connection_of,
            },
            list_connections,
            &mut errors,
        );
        if found.servers.overflowed() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    impact = "processes' spread over servers leaves some servers out",
                    "more than 65,533 distinct servers of watched services"
                )
            });
        }
        if edges.dropped > 0 {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    dropped = edges.dropped,
                    bound = fd_walk::ClientEdgeCounts::MAX,
                    impact = "the edge table's connection counts leave some out",
                    "more (service, server, process name) edges than kept"
                )
            });
        }
        let client_edges = edges.resolve(&self.service_names, &found.servers);
        self.servers = std::mem::take(&mut found.servers);
        let mut connections = found.connections;
        drop_duplicates(&mut connections, &found.duplicate_connections);
        let fds_done = started.elapsed();
        let mut listeners = found.listeners;
        self.fill_backlog_limits(&namespaces, &listener_owners, &mut listeners, &mut errors);
        let backlog_done = started.elapsed();

        let file_handles = self.file_handles(&mut errors);
        let mut watched = found.watched;
        shrink_after_spike(&mut watched);
        self.watched_buffer = watched;
        release_freed_memory();

        let alive: BTreeSet<u64> = namespaces.keys().copied().collect();
        let tcp_ext = self.counters.update(&found.netstat_readings, &alive);
        let listen_queues = aggregate::summarize_listen_queues(&self.service_names, &listeners);
        let listener_drops = self.listener_drops.update(&listeners);
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
            table_sources: found.sources,
            fd_walk,
            tcp_ext,
            tcp_ext_by_netns: found.netstat_readings.into_iter().collect(),
            file_handles,
            listeners,
            listen_queues,
            listener_drops,
            connections_by_service: self
                .service_names
                .iter()
                .cloned()
                .zip(found.connections_by_service)
                .collect(),
            processes,
            comms,
            client_edges,
            errors,
        };
        Ok((snapshot, connections))
    }

    /// Step 1: the pids grouped by network namespace inode.
    fn group_by_namespace(
        &self,
        pids: &[u32],
        errors: &mut ScanErrors,
    ) -> BTreeMap<u64, Namespace> {
        let mut namespaces: BTreeMap<u64, Namespace> = BTreeMap::new();
        for &pid in pids {
            match self.procfs.netns_of(pid) {
                Ok(netns) => namespaces.entry(netns).or_default().members.push(pid),
                Err(err) => errors.io(&format!("pid {pid} ns/net"), &err),
            }
        }
        namespaces
    }

    /// The host's file handles (`/proc/sys/fs/file-nr`), `None` (counted) when unreadable.
    fn file_handles(&self, errors: &mut ScanErrors) -> Option<FileHandles> {
        match self.procfs.read_file_nr() {
            Ok(Ok(handles)) => Some(handles),
            Ok(Err(err)) => {
                errors.parse("sys/fs/file-nr", &err);
                None
            }
            Err(err) => {
                errors.io("sys/fs/file-nr", &err);
                None
            }
        }
    }
}

/// Drops the listed connections at the (sorted) positions the tables found twice.
fn drop_duplicates(connections: &mut Vec<WatchedConnection>, duplicates: &[u32]) {
    if duplicates.is_empty() {
        return;
    }
    let mut index: u32 = 0;
    connections.retain(|_| {
        let keep = duplicates.binary_search(&index).is_err();
        index += 1;
        keep
    });
}

/// Hands memory freed by this sample back to the kernel. glibc keeps freed memory in the
/// arena of the thread that used it, and samples run on whichever blocking-pool thread tokio
/// picks, so each of those arenas would otherwise keep a sample's peak for good (two arenas
/// of ~41 MB each with 100k connections and the old text parser, measured). malloc_trim walks
/// every arena, the main one included, once per sample.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Shrinks a reusable buffer that holds more than twice what the last sample needed, so a
/// one-off spike (a connection storm) does not pin its memory. A quarter is left spare so a
/// sample of about the same size does not reallocate; growth doubles, which never makes the
/// buffer look oversized to the next check.
fn shrink_after_spike<T>(buffer: &mut Vec<T>) {
    const FLOOR: usize = 1024;
    let need = buffer.len().max(FLOOR);
    if buffer.capacity() > 2 * need {
        buffer.shrink_to(need + need / 4);
    }
}

#[cfg(test)]
mod tests;
