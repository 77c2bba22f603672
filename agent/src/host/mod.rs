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

use crate::model::Role;
use aggregate::{CounterAccumulator, ListenerDrops};
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

/// A watched socket with a file (inode != 0), for matching `/proc/<pid>/fd` links. 12 bytes:
/// with 100k connections on the host this list holds 200k of them. (The start-up listing of
/// connections maps inodes to its entries in [`Found::connection_of`] instead of a field here.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WatchedSocket {
    /// Socket inodes fit in 32 bits: sockfs numbers them with get_next_ino(), an unsigned int,
    /// and sock_diag reports them as a __u32 (see [`socket_inode`]).
    inode: u32,
    /// Position of the socket's network namespace in the sample's namespace order, so the
    /// next sample can keep the sockets of a namespace whose dump it reuses (see
    /// [`NamespaceDump`]) without a copy of them.
    namespace: u32,
    service: u16,
    listening: bool,
    /// Some cached owner still holds it (see [`Sampler::scan_processes`]).
    claimed: bool,
}

// The per-socket cost the module documentation states.
const _: () = assert!(std::mem::size_of::<WatchedSocket>() == 12);

/// The 32-bit form of a socket inode, None for a value no socket can have.
fn socket_inode(inode: u64) -> Option<u32> {
    u32::try_from(inode).ok()
}

/// Looks `inode` up in `watched`, which is sorted by inode.
fn find_watched(watched: &[WatchedSocket], inode: u32) -> Option<usize> {
    watched
        .binary_search_by_key(&inode, |socket| socket.inode)
        .ok()
}

#[derive(Debug, Default)]
struct Namespace {
    members: Vec<u32>,
    /// The member whose tables were read.
    representative: Option<u32>,
    has_watched_sockets: bool,
    has_watched_listeners: bool,
}

/// What the fd walk last found in one process. Kept between samples so a process whose
/// descriptors did not change is not walked again (see [`Sampler::scan_processes`]).
#[derive(Debug, Clone)]
struct CachedProcess {
    netns: u64,
    /// Descriptor count at the last walk (or, without `fd_count`, as counted by it).
    open_fds: u64,
    /// Inodes of the watched sockets held at the last walk, sorted; 4 bytes a socket.
    /// Refilled in place by the next walk.
    sockets: Vec<u32>,
    /// (inode, fd) of the listeners among them, sorted by inode, one fd each: the descriptor
    /// a listener's backlog can be read through (see [`diag::backlog_via_owner`]). Connections
    /// need none, and a socket listed as a connection does not turn into a listener (listen(2)
    /// needs an unconnected socket, which the tables do not list).
    listener_fds: Vec<(u32, i32)>,
    /// Sample number of the last walk.
    walked_at: u64,
    /// Sample number in which the process was last seen in a namespace with watched sockets.
    seen_at: u64,
}

/// Where the socket tables of a namespace came from in one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSources {
    /// Namespaces read with a sock_diag dump (the normal case).
    pub sock_diag: usize,
    /// Namespaces read from /proc/<pid>/net/tcp{,6} text because sock_diag was unavailable,
    /// refused the port filter and the unfiltered dump, or (for another namespace) setns was
    /// not permitted. Costs CPU in proportion to every socket of the namespace.
    pub proc_text: usize,
    /// Namespaces of which only listeners were dumped: no TCP connection came or went in them
    /// since their last full dump, whose watched connections (and counts) were reused.
    pub reused_namespaces: usize,
}

/// Work of the fd walk in one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdWalkStats {
    /// Processes whose `/proc/<pid>/fd` was listed this sample.
    pub processes_walked: usize,
    /// Descriptors listed (each a readlink).
    pub descriptors_walked: u64,
    /// Processes whose walk was due but postponed by the per-sample budget; their previous
    /// result is used meanwhile.
    pub processes_deferred: usize,
    /// Processes whose previous result was reused because nothing suggested a change.
    pub processes_cached: usize,
}

/// Descriptors one periodic sample may walk (readlink each) before postponing the remaining
/// processes to the next sample: bounds the sampler's CPU on a host with very many sockets
/// (about 2-3 µs each, so ~0.15 s). At least one due process is walked per sample whatever
/// its size, so none starves. The start-up sample (listing connections) is not bounded.
const MAX_FDS_WALKED_PER_SAMPLE: u64 = 50_000;

/// A process whose descriptors look unchanged is still walked again after this many samples
/// (one minute at the default 5 s interval), to notice what the cheap checks cannot: a watched
/// socket received or inherited while an unrelated descriptor closed.
const REWALK_AFTER_SAMPLES: u64 = 12;

/// TCP states the sock_diag dump asks for: listeners, plus every connection state
/// [`is_listed_connection_state`] keeps.
fn dumped_states() -> u32 {
    use tcp_state::*;
    diag::state_mask(&[
        ESTABLISHED,
        SYN_SENT,
        FIN_WAIT1,
        FIN_WAIT2,
        CLOSE,
        CLOSE_WAIT,
        LAST_ACK,
        LISTEN,
        CLOSING,
    ])
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
    /// Last full dump per namespace, for reuse while its connections did not change.
    namespace_dumps: HashMap<u64, NamespaceDump>,
}

/// One namespace's watched connections from its last full dump, reused by later samples while
/// no TCP connection opened, failed or closed in the namespace (its /proc/net/snmp counters,
/// see [`parse::TcpConnectionCounters`], are unchanged): on an idle host with many connections
/// the dump is most of a sample's cost. Listeners are always dumped afresh. What the counters
/// cannot tell (a socket passed to another process, a state change that keeps a connection
/// established) waits for the next full dump, at most [`REWALK_AFTER_SAMPLES`] later; which
/// process holds what still follows descriptor counts every sample.
///
/// The namespace's watched non-listening sockets with an inode are not copied here: they stay
/// in [`Sampler::watched_buffer`], tagged with `namespace`, and a sample that reuses the dump
/// keeps them from there (12 bytes a socket in all, where a copy per namespace doubled that).
#[derive(Debug, Clone)]
struct NamespaceDump {
    counters: parse::TcpConnectionCounters,
    /// Sample number of the dump.
    sample: u64,
    /// [`WatchedSocket::namespace`] of its sockets in the last sample's list.
    namespace: u32,
    /// Its listed connections per service (including those without an inode), without the
    /// sockets [`Found::finish`] dropped as repeated rows.
    counts: Vec<u64>,
    has_sockets: bool,
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

        let mut namespaces: BTreeMap<u64, Namespace> = BTreeMap::new();
        for &pid in &pids {
            match self.procfs.netns_of(pid) {
                Ok(netns) => namespaces.entry(netns).or_default().members.push(pid),
                Err(err) => errors.io(&format!("pid {pid} ns/net"), &err),
            }
        }

        let fd_counts = self.fd_counts(&namespaces, &mut errors);
        let namespaces_done = started.elapsed();

        // Which namespaces reuse their last full dump: no TCP connection opened or closed in
        // them since (and that is recent), so their watched connections still hold and only
        // listeners are dumped. Decided for every namespace before any is read, so the last
        // sample's list can be cut down to their connections in one pass.
        let mut plans = Vec::with_capacity(namespaces.len());
        for (&netns, namespace) in &namespaces {
            let counters = self.connection_counters(namespace);
            let reusable = self.namespace_dumps.remove(&netns).filter(|last| {
                !list_connections
                    && counters == Some(last.counters)
                    && self.samples - last.sample < REWALK_AFTER_SAMPLES
            });
            plans.push((counters, reusable));
        }
        let mut watched = std::mem::take(&mut self.watched_buffer);
        keep_reused_connections(
            &mut watched,
            plans.iter().map(|(_, reusable)| reusable.as_ref()),
        );
        let mut found = Found::new(self.service_names.len(), list_connections, watched);
        let own_netns = self.procfs.own_netns().ok();
        for (position, ((&netns, namespace), (counters, reusable))) in
            namespaces.iter_mut().zip(plans).enumerate()
        {
            // Each namespace has a process in it: far fewer than 2^32.
            found.namespace = u32::try_from(position).unwrap_or(u32::MAX);
            let first = found.watched.len();
            // Only a fresh dump needs the counts before it, to tell its own.
            let counts_before = reusable
                .is_none()
                .then(|| found.connections_by_service.clone());
            let diag_before = found.sources.sock_diag;
            // A reusable namespace is read for its listeners only.
            found.listeners_only = reusable.is_some();
            self.read_namespace(
                netns,
                own_netns == Some(netns),
                namespace,
                &mut found,
                &mut errors,
            );
            found.listeners_only = false;
            if let Some(mut last) = reusable {
                for (total, count) in found.connections_by_service.iter_mut().zip(&last.counts) {
                    *total += count;
                }
                namespace.has_watched_sockets |= last.has_sockets;
                found.sources.reused_namespaces += 1;
                last.namespace = found.namespace;
                self.namespace_dumps.insert(netns, last);
                continue;
            }
            let counts_before = counts_before.unwrap_or_default();
            if let Some(counters) = counters.filter(|_| found.sources.sock_diag > diag_before) {
                let counts = found
                    .connections_by_service
                    .iter()
                    .zip(&counts_before)
                    .map(|(after, before)| after - before)
                    .collect();
                self.namespace_dumps.insert(
                    netns,
                    NamespaceDump {
                        counters,
                        sample: self.samples,
                        namespace: found.namespace,
                        has_sockets: found.watched[first..]
                            .iter()
                            .any(|socket| !socket.listening),
                        counts,
                    },
                );
            }
        }
        self.namespace_dumps
            .retain(|netns, _| namespaces.contains_key(netns));
        found.finish();
        uncount_repeated_rows(
            &mut self.namespace_dumps,
            namespaces.keys().copied(),
            &found.repeated_connections,
        );
        let Found {
            mut watched,
            mut listeners,
            mut connections,
            connection_of,
            connections_by_service,
            netstat_readings,
            duplicate_connections,
            sources,
            ..
        } = found;

        let tables_done = started.elapsed();
        let (processes, listener_owners, fd_walk) = self.scan_processes(
            &namespaces,
            &fd_counts,
            &mut watched,
            ListedConnections {
                connections: &mut connections,
                by_inode: &connection_of,
            },
            list_connections,
            &mut errors,
        );
        if !duplicate_connections.is_empty() {
            let mut index = 0;
            connections.retain(|_| {
                let keep = duplicate_connections.binary_search(&index).is_err();
                index += 1;
                keep
            });
        }
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

        shrink_after_spike(&mut watched);
        self.watched_buffer = watched;
        release_freed_memory();

        let alive: BTreeSet<u64> = namespaces.keys().copied().collect();
        let tcp_ext = self.counters.update(&netstat_readings, &alive);
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
            table_sources: sources,
            fd_walk,
            tcp_ext,
            tcp_ext_by_netns: netstat_readings.into_iter().collect(),
            file_handles,
            listeners,
            listen_queues,
            listener_drops,
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

    /// Reads one namespace's sockets, with sock_diag when possible and from its /proc text
    /// otherwise, and its TcpExt counters, recording its watched sockets in `found`.
    fn read_namespace(
        &mut self,
        netns: u64,
        own: bool,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) {
        if self.read_namespace_diag(netns, own, namespace, found, errors) {
            found.sources.sock_diag += 1;
            for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
                match self.procfs.read_netstat(pid) {
                    Ok(Ok(counters)) => found.netstat_readings.push((netns, counters)),
                    Ok(Err(err)) => errors.parse(&format!("netns {netns} net/netstat"), &err),
                    Err(err) if classify(&err) == Failure::Vanished => continue,
                    Err(err) => errors.io(&format!("netns {netns} net/netstat"), &err),
                }
                namespace.representative.get_or_insert(pid);
                return;
            }
            return;
        }
        found.sources.proc_text += 1;
        self.read_namespace_text(netns, namespace, found, errors);
    }

    /// The sock_diag path: one filtered dump per address family. False when the namespace must
    /// be read from /proc text instead (the reason is logged once and remembered).
    fn read_namespace_diag(
        &mut self,
        netns: u64,
        own: bool,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) -> bool {
        if self.sock_diag_unavailable || (!own && self.setns_refused) {
            return false;
        }
        let handle = if own {
            None
        } else {
            let mut opened = None;
            for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
                match self.procfs.open_netns(pid) {
                    Ok(handle) => {
                        namespace.representative = Some(pid);
                        opened = Some(handle);
                        break;
                    }
                    Err(err) if classify(&err) == Failure::Vanished => continue,
                    Err(err) => {
                        errors.io(&format!("netns {netns} open"), &err);
                        return false;
                    }
                }
            }
            match opened {
                Some(handle) => Some(handle),
                // Every member tried has exited: the namespace is going away.
                None => return true,
            }
        };
        let states = if found.listeners_only {
            diag::state_mask(&[tcp_state::LISTEN])
        } else {
            dumped_states()
        };
        loop {
            let filter = if self.port_filter_refused {
                None
            } else {
                self.port_filter.as_deref()
            };
            let mark = found.mark();
            let ports = &self.ports;
            let names = &self.service_names;
            let result = {
                let mut visit = |socket: diag::DiagSocket| {
                    let row = TcpRow {
                        local: socket.local,
                        remote: socket.remote,
                        state: socket.state,
                        tx_queue: socket.wqueue,
                        rx_queue: socket.rqueue,
                        inode: socket.inode,
                    };
                    if let Some((service, role)) = service_of(ports, &row) {
                        // sock_diag reports a listener's accept-queue limit as its wqueue.
                        let counts = ListenerCounts {
                            limit: (row.state == tcp_state::LISTEN).then_some(socket.wqueue),
                            drops: socket.drops,
                        };
                        found.record(names, netns, row, service, role, counts);
                    }
                };
                diag::dump_sockets(handle.as_ref(), states, filter, &mut visit)
            };
            match result {
                Ok(()) => {
                    found.commit_namespace(namespace);
                    return true;
                }
                Err(err) => {
                    found.rollback(mark);
                    match &err {
                        diag::DiagError::Kernel(errno)
                            if *errno == libc::EINVAL && filter.is_some() =>
                        {
                            tracing::warn!(%err, "sock_diag refused the port filter; dumping all TCP sockets and filtering here");
                            self.port_filter_refused = true;
                            continue;
                        }
                        diag::DiagError::Unavailable(_) => {
                            tracing::warn!(%err, "sock_diag unavailable; reading /proc/<pid>/net/tcp text instead (costs CPU per socket on the host)");
                            self.sock_diag_unavailable = true;
                        }
                        diag::DiagError::Setns(io)
                            if !own && matches!(io.raw_os_error(), Some(libc::EPERM)) =>
                        {
                            tracing::info!("setns refused (no CAP_SYS_ADMIN): other network namespaces are read from /proc text");
                            self.setns_refused = true;
                        }
                        _ => errors.diag(&format!("netns {netns} sock_diag"), &err),
                    }
                    return false;
                }
            }
        }
    }

    /// The /proc text path: the namespace's tables and counters through its first member that
    /// stays alive long enough.
    fn read_namespace_text(
        &self,
        netns: u64,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) {
        for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
            // Rows are recorded as they are read (no list of them: on a host with many watched
            // sockets it would be tens of MB) and undone if the member exits half-way.
            let mark = found.mark();
            match self.read_namespace_tables(netns, pid, found, errors) {
                Ok(()) => {}
                Err(err) if classify(&err) == Failure::Vanished => {
                    found.rollback(mark);
                    errors.vanished += 1;
                    continue;
                }
                Err(err) => {
                    found.rollback(mark);
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
            found.commit_namespace(namespace);
            return;
        }
    }

    /// Records the watched rows of tcp and tcp6 as seen through `pid`. A missing tcp6 on a
    /// live process means IPv6 is disabled, not that the process exited.
    fn read_namespace_tables(
        &self,
        netns: u64,
        pid: u32,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) -> io::Result<()> {
        let mut visit = |row: Result<TcpRow, ParseError>| match row {
            Ok(row) => {
                if let Some((service, role)) = service_of(&self.ports, &row) {
                    found.record(
                        &self.service_names,
                        netns,
                        row,
                        service,
                        role,
                        ListenerCounts::default(),
                    );
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

    /// The descriptor count of every process, sorted by pid; empty where the kernel cannot
    /// count without a walk.
    fn fd_counts(
        &self,
        namespaces: &BTreeMap<u64, Namespace>,
        errors: &mut ScanErrors,
    ) -> Vec<(u32, u64)> {
        if !self.fd_count_supported {
            return Vec::new();
        }
        let mut counts = Vec::new();
        for namespace in namespaces.values() {
            for &pid in &namespace.members {
                match self.procfs.fd_count(pid) {
                    Ok(count) => counts.push((pid, count)),
                    Err(err) => errors.io(&format!("pid {pid} fd"), &err),
                }
            }
        }
        counts.sort_unstable();
        counts
    }

    /// The namespace's connection counters (see [`parse::TcpConnectionCounters`]) through its
    /// first member that answers; None when none did.
    fn connection_counters(&self, namespace: &Namespace) -> Option<parse::TcpConnectionCounters> {
        namespace
            .members
            .iter()
            .take(REPRESENTATIVE_ATTEMPTS)
            .find_map(|&pid| self.procfs.read_snmp_tcp(pid).ok()?.ok())
    }

    /// Which processes hold watched sockets, walking `/proc/<pid>/fd` only where something may
    /// have changed since the last walk. A process's previous result is reused when its
    /// descriptor count is unchanged (a stat of its fd directory, Linux 6.2+), every watched
    /// socket it held still exists, and it was walked less than [`REWALK_AFTER_SAMPLES`] ago.
    /// A process without watched sockets is walked again when its count changed only if some
    /// watched socket has no known owner. The walks due are done most urgent first, within
    /// [`MAX_FDS_WALKED_PER_SAMPLE`] descriptors (unbounded when listing connections).
    fn scan_processes(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        fd_counts: &[(u32, u64)],
        watched: &mut [WatchedSocket],
        mut listed: ListedConnections,
        unbounded: bool,
        errors: &mut ScanErrors,
    ) -> (Vec<ProcessUsage>, HashMap<u64, ListenerOwner>, FdWalkStats) {
        let mut processes = Vec::new();
        let mut listener_owners = HashMap::new();
        let mut stats = FdWalkStats::default();
        if watched.is_empty() {
            self.processes.clear();
            return (processes, listener_owners, stats);
        }
        let sample = self.samples;

        // Pass 1: the descriptor count of every candidate process and whether its cached
        // result still holds; sockets of holding results are claimed.
        struct Candidate {
            pid: u32,
            netns: u64,
            /// From stat, when supported.
            open_fds: Option<u64>,
            /// 0 = never walked or its result is void, 1 = an owner that changed, 2 = a
            /// non-owner that changed, 3 = due for the periodic walk, 4 = cached result holds.
            urgency: u8,
        }
        let mut candidates = Vec::new();
        for (&netns, namespace) in namespaces {
            if !namespace.has_watched_sockets {
                continue;
            }
            for &pid in &namespace.members {
                let open_fds = if self.fd_count_supported {
                    match fd_counts.binary_search_by_key(&pid, |(pid, _)| *pid) {
                        Ok(index) => Some(fd_counts[index].1),
                        // Its stat failed (counted then): gone or unreadable.
                        Err(_) => {
                            self.processes.remove(&pid);
                            continue;
                        }
                    }
                } else {
                    None
                };
                let urgency = match self.processes.get_mut(&pid) {
                    Some(cached) if cached.netns == netns => {
                        cached.seen_at = sample;
                        let unchanged = open_fds == Some(cached.open_fds);
                        let sockets_present = cached
                            .sockets
                            .iter()
                            .all(|inode| find_watched(watched, *inode).is_some());
                        if !sockets_present || (!unchanged && !cached.sockets.is_empty()) {
                            1
                        } else {
                            for inode in &cached.sockets {
                                if let Some(index) = find_watched(watched, *inode) {
                                    watched[index].claimed = true;
                                }
                            }
                            if !unchanged {
                                2
                            } else if sample.saturating_sub(cached.walked_at)
                                >= REWALK_AFTER_SAMPLES
                            {
                                3
                            } else {
                                4
                            }
                        }
                    }
                    _ => 0,
                };
                candidates.push(Candidate {
                    pid,
                    netns,
                    open_fds,
                    urgency,
                });
            }
        }
        let unclaimed = watched.iter().any(|socket| !socket.claimed);

        // Pass 2: walk what is due, most urgent (then least recently walked) first.
        let mut due: Vec<usize> = (0..candidates.len())
            .filter(|&index| match candidates[index].urgency {
                0 | 1 | 3 => true,
                2 => unclaimed,
                _ => false,
            })
            .collect();
        due.sort_by_key(|&index| {
            let candidate = &candidates[index];
            let walked_at = self
                .processes
                .get(&candidate.pid)
                .map_or(0, |cached| cached.walked_at);
            (candidate.urgency, walked_at, candidate.pid)
        });
        let mut budget_left = if unbounded {
            u64::MAX
        } else {
            MAX_FDS_WALKED_PER_SAMPLE
        };
        for index in due {
            let candidate = &candidates[index];
            if budget_left == 0 {
                stats.processes_deferred += 1;
                continue;
            }
            // The walk refills the process's previous lists in place.
            let (mut sockets, mut listener_fds) = self
                .processes
                .get_mut(&candidate.pid)
                .map(|cached| {
                    (
                        std::mem::take(&mut cached.sockets),
                        std::mem::take(&mut cached.listener_fds),
                    )
                })
                .unwrap_or_default();
            sockets.clear();
            listener_fds.clear();
            let watched_view: &[WatchedSocket] = watched;
            let lookup = |inode: u64| {
                socket_inode(inode).and_then(|inode| find_watched(watched_view, inode))
            };
            let open_fds = match self.procfs.scan_fds(
                candidate.pid,
                |inode| lookup(inode).is_some(),
                |found| {
                    let Some(socket) = lookup(found.inode).map(|index| watched_view[index]) else {
                        return;
                    };
                    sockets.push(socket.inode);
                    if socket.listening {
                        listener_fds.push((socket.inode, found.fd));
                    }
                },
            ) {
                Ok(open) => open,
                Err(err) => {
                    errors.io(&format!("pid {} fd", candidate.pid), &err);
                    self.processes.remove(&candidate.pid);
                    continue;
                }
            };
            stats.processes_walked += 1;
            stats.descriptors_walked += open_fds;
            budget_left = budget_left.saturating_sub(open_fds.max(1));
            // A process can hold the same socket in several fds (dup); count sockets once.
            sockets.sort_unstable();
            sockets.dedup();
            listener_fds.sort_unstable_by_key(|(inode, _)| *inode);
            listener_fds.dedup_by_key(|(inode, _)| *inode);
            // Kept as they are until the next walk, which may be minutes away: no spare room
            // (growth during a walk doubles). A no-op when the count did not change.
            sockets.shrink_to_fit();
            listener_fds.shrink_to_fit();
            self.processes.insert(
                candidate.pid,
                CachedProcess {
                    netns: candidate.netns,
                    // The stat count when known: the walk's own count can be off by the
                    // descriptors opened or closed while it ran, and would then look changed
                    // at the next sample.
                    open_fds: candidate.open_fds.unwrap_or(open_fds),
                    sockets,
                    listener_fds,
                    walked_at: sample,
                    seen_at: sample,
                },
            );
        }
        stats.processes_cached = candidates
            .iter()
            .filter(|candidate| candidate.urgency == 4 || (candidate.urgency == 2 && !unclaimed))
            .count();
        self.processes.retain(|_, cached| cached.seen_at == sample);

        // Pass 3: usage of every process holding watched sockets, in pid order per namespace
        // (the first owner of a connection is its lowest pid).
        for candidate in &candidates {
            let Some(cached) = self.processes.get(&candidate.pid) else {
                continue;
            };
            let pid = candidate.pid;
            let mut held = cached
                .sockets
                .iter()
                .filter_map(|inode| Some((find_watched(watched, *inode)?, *inode)))
                .peekable();
            if held.peek().is_none() {
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
                netns: candidate.netns,
                open_fds: candidate.open_fds.unwrap_or(cached.open_fds),
                soft_nofile,
                connections: BTreeMap::new(),
                listening_sockets: BTreeMap::new(),
            };
            let mut per_service: Vec<(u64, u64)> = vec![(0, 0); self.service_names.len()];
            for (index, inode) in held {
                let socket = watched[index];
                let Some(counts) = per_service.get_mut(usize::from(socket.service)) else {
                    continue;
                };
                if socket.listening {
                    counts.1 += 1;
                    let fd = cached
                        .listener_fds
                        .binary_search_by_key(&inode, |(inode, _)| *inode)
                        .ok()
                        .map(|at| cached.listener_fds[at].1);
                    if let Some(fd) = fd {
                        listener_owners
                            .entry(u64::from(inode))
                            .or_insert(ListenerOwner { pid, fd });
                    }
                } else {
                    counts.0 += 1;
                }
                if let Some(connection) = listed.by_socket(inode) {
                    connection.owner.get_or_insert_with(|| SocketOwner {
                        pid,
                        comm: usage.comm.clone(),
                    });
                }
            }
            for (name, (connected, listening)) in self.service_names.iter().zip(per_service) {
                if connected > 0 {
                    usage.connections.insert(name.clone(), connected);
                }
                if listening > 0 {
                    usage.listening_sockets.insert(name.clone(), listening);
                }
            }
            processes.push(usage);
        }
        (processes, listener_owners, stats)
    }

    /// Backlog limits of listeners the socket tables did not give one for (the /proc text
    /// path): one sock_diag dump per such namespace (joining the namespace when it is not
    /// ours); listeners still without a limit, because setns is not allowed or the dump missed
    /// them, are read through their owning process.
    fn fill_backlog_limits(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        listener_owners: &HashMap<u64, ListenerOwner>,
        listeners: &mut [ListenerQueue],
        errors: &mut ScanErrors,
    ) {
        if listeners.iter().all(|listener| listener.limit.is_some()) {
            return;
        }
        let own_netns = self.procfs.own_netns().ok();
        for (&netns, namespace) in namespaces {
            if !namespace.has_watched_listeners
                || self.sock_diag_unavailable
                || listeners
                    .iter()
                    .filter(|listener| listener.netns == netns)
                    .all(|listener| listener.limit.is_some())
            {
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
                    let found: HashMap<u64, &diag::ListenerBacklog> = dump
                        .iter()
                        .map(|listener| (listener.inode, listener))
                        .collect();
                    for listener in listeners.iter_mut().filter(|l| l.netns == netns) {
                        let backlog = found.get(&listener.inode);
                        listener.limit = backlog.map(|backlog| backlog.limit);
                        listener.drops = backlog.and_then(|backlog| backlog.drops);
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
                Ok(backlog) => {
                    listener.limit = Some(backlog.limit);
                    listener.drops = backlog.drops;
                }
                Err(diag::DiagError::Changed) => errors.vanished += 1,
                Err(err) => errors.diag(&format!("pid {} listener backlog", owner.pid), &err),
            }
        }
    }
}

/// The service a socket belongs to and our side of it: Server when the local port is watched.
/// Listeners only match on their local port.
fn service_of(ports: &HashMap<u16, u16>, row: &TcpRow) -> Option<(u16, Role)> {
    if let Some(&service) = ports.get(&row.local.port()) {
        return Some((service, Role::Server));
    }
    if row.state == tcp_state::LISTEN {
        return None;
    }
    ports
        .get(&row.remote.port())
        .map(|&service| (service, Role::Client))
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

/// Cuts the last sample's watched list down to the connections of the namespaces whose dump
/// is reused, in place, retagged with the namespaces' positions in this sample.
/// `reused_dumps` has one entry per namespace of this sample, in order.
fn keep_reused_connections<'a>(
    watched: &mut Vec<WatchedSocket>,
    reused_dumps: impl Iterator<Item = Option<&'a NamespaceDump>>,
) {
    const DROPPED: u32 = u32::MAX;
    // Indexed by the position a namespace had in the last sample.
    let mut new_position: Vec<u32> = Vec::new();
    for (position, dump) in reused_dumps.enumerate() {
        // Positions are below the last sample's namespace count (each has a process in it);
        // u32::MAX only marks one that did not fit, whose sockets cannot be told apart.
        let Some(dump) = dump.filter(|dump| dump.namespace != u32::MAX) else {
            continue;
        };
        let old = dump.namespace as usize;
        if new_position.len() <= old {
            new_position.resize(old + 1, DROPPED);
        }
        new_position[old] = u32::try_from(position).unwrap_or(DROPPED);
    }
    watched.retain_mut(|socket| {
        let position = new_position
            .get(socket.namespace as usize)
            .copied()
            .unwrap_or(DROPPED);
        if socket.listening || position == DROPPED {
            return false;
        }
        socket.namespace = position;
        socket.claimed = false;
        true
    });
}

/// The next sample reuses a dump's sockets as [`Found::finish`] left them, without the repeated
/// rows it dropped (see `repeated`): the dump's counts must not include those either.
/// `netns_by_position` lists this sample's namespaces in order.
fn uncount_repeated_rows(
    dumps: &mut HashMap<u64, NamespaceDump>,
    mut netns_by_position: impl Iterator<Item = u64>,
    repeated: &[(u32, u16)],
) {
    if repeated.is_empty() {
        return;
    }
    let mut repeated = repeated.to_vec();
    repeated.sort_unstable();
    let mut position = 0u32;
    let mut netns = netns_by_position.next();
    for (namespace, service) in repeated {
        while position < namespace {
            position += 1;
            netns = netns_by_position.next();
        }
        let dump = netns
            .and_then(|netns| dumps.get_mut(&netns))
            .filter(|dump| dump.namespace == namespace);
        if let Some(count) = dump.and_then(|dump| dump.counts.get_mut(usize::from(service))) {
            *count = count.saturating_sub(1);
        }
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

/// The start-up listing of connections, for noting their owners.
struct ListedConnections<'a> {
    connections: &'a mut [WatchedConnection],
    /// (inode, index in `connections`), sorted by inode ([`Found::connection_of`]).
    by_inode: &'a [(u32, u32)],
}

impl ListedConnections<'_> {
    fn by_socket(&mut self, inode: u32) -> Option<&mut WatchedConnection> {
        let at = self
            .by_inode
            .binary_search_by_key(&inode, |(inode, _)| *inode)
            .ok()?;
        self.connections.get_mut(self.by_inode[at].1 as usize)
    }
}

/// What a socket table row does not say about a listener: its accept-queue limit and drop
/// count (sock_diag reports both; the /proc text neither).
#[derive(Debug, Default, Clone, Copy)]
struct ListenerCounts {
    limit: Option<u32>,
    drops: Option<u32>,
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
    /// Watched sockets with an inode; sorted by inode and deduplicated by [`Found::finish`].
    watched: Vec<WatchedSocket>,
    /// [`WatchedSocket::namespace`] of the namespace being read.
    namespace: u32,
    listeners: Vec<ListenerQueue>,
    connections: Vec<WatchedConnection>,
    /// (inode, index in `connections`) of the listed connections with a file; sorted by inode
    /// and deduplicated by [`Found::finish`]. Empty unless listing connections.
    connection_of: Vec<(u32, u32)>,
    connections_by_service: Vec<u64>,
    netstat_readings: Vec<(u64, TcpExtCounters)>,
    /// Connections listed twice (indexes, sorted), removed at the end of the sample.
    duplicate_connections: Vec<u32>,
    /// Namespace and service of each non-listening socket [`Found::finish`] dropped as a
    /// repeated row.
    repeated_connections: Vec<(u32, u16)>,
    /// Sockets without a file seen in the namespace being read, to drop repeated rows (see
    /// [`drop_duplicate_rows`]): only those, since sockets with an inode are deduplicated by
    /// inode in [`Found::finish`] without a per-socket set.
    fileless: std::collections::HashSet<(SocketAddr, SocketAddr)>,
    /// What the namespace being read recorded, for [`Found::commit_namespace`].
    namespace_sockets: bool,
    namespace_listeners: bool,
    sources: TableSources,
    /// Record listeners only: the connections come from the previous full dump.
    listeners_only: bool,
}

/// Lengths and counts before a namespace's dump, to undo a dump that failed half-way.
struct FoundMark {
    watched: usize,
    listeners: usize,
    connections: usize,
    connection_of: usize,
    connections_by_service: Vec<u64>,
}

impl Found {
    fn new(services: usize, list_connections: bool, watched: Vec<WatchedSocket>) -> Self {
        Found {
            list_connections,
            watched,
            namespace: 0,
            listeners: Vec::new(),
            connections: Vec::new(),
            connection_of: Vec::new(),
            connections_by_service: vec![0; services],
            netstat_readings: Vec::new(),
            duplicate_connections: Vec::new(),
            repeated_connections: Vec::new(),
            fileless: Default::default(),
            namespace_sockets: false,
            namespace_listeners: false,
            sources: TableSources::default(),
            listeners_only: false,
        }
    }

    fn mark(&mut self) -> FoundMark {
        self.fileless.clear();
        self.namespace_sockets = false;
        self.namespace_listeners = false;
        FoundMark {
            watched: self.watched.len(),
            listeners: self.listeners.len(),
            connections: self.connections.len(),
            connection_of: self.connection_of.len(),
            connections_by_service: self.connections_by_service.clone(),
        }
    }

    fn rollback(&mut self, mark: FoundMark) {
        self.watched.truncate(mark.watched);
        self.listeners.truncate(mark.listeners);
        self.connections.truncate(mark.connections);
        self.connection_of.truncate(mark.connection_of);
        self.connections_by_service = mark.connections_by_service;
        self.fileless.clear();
        self.namespace_sockets = false;
        self.namespace_listeners = false;
    }

    /// Flags the namespace just read and forgets its per-namespace state.
    fn commit_namespace(&mut self, namespace: &mut Namespace) {
        namespace.has_watched_sockets |= self.namespace_sockets;
        namespace.has_watched_listeners |= self.namespace_listeners;
        self.fileless.clear();
        if self.fileless.capacity() > 4096 {
            self.fileless.shrink_to(0);
        }
        self.namespace_sockets = false;
        self.namespace_listeners = false;
    }

    /// Records one watched socket. `limit` is the listener's accept-queue limit when the
    /// source knows it (sock_diag).
    fn record(
        &mut self,
        service_names: &[String],
        netns: u64,
        row: TcpRow,
        service: u16,
        role: Role,
        counts: ListenerCounts,
    ) {
        let listening = row.state == tcp_state::LISTEN;
        if !listening && (self.listeners_only || !is_listed_connection_state(row.state)) {
            return;
        }
        if row.inode == 0 && !self.fileless.insert((row.local, row.remote)) {
            return;
        }
        let name = &service_names[usize::from(service)];
        if listening {
            self.namespace_listeners = true;
            self.listeners.push(ListenerQueue {
                service: name.clone(),
                netns,
                local: row.local,
                inode: row.inode,
                queue_len: row.rx_queue,
                limit: counts.limit,
                drops: counts.drops,
            });
        } else if let Some(count) = self.connections_by_service.get_mut(usize::from(service)) {
            *count += 1;
        }
        let mut connection = None;
        if self.list_connections && !listening {
            connection = u32::try_from(self.connections.len()).ok();
            self.connections.push(WatchedConnection {
                netns,
                local: row.local,
                remote: row.remote,
                state: row.state,
                inode: row.inode,
                service: name.clone(),
                role,
                owner: None,
            });
        }
        // A file-backed socket always has an inode below 2^32 (see `socket_inode`).
        if let Some(inode) = socket_inode(row.inode).filter(|inode| *inode != 0) {
            self.namespace_sockets = true;
            self.watched.push(WatchedSocket {
                inode,
                namespace: self.namespace,
                service,
                listening,
                claimed: false,
            });
            if let Some(connection) = connection {
                self.connection_of.push((inode, connection));
            }
        }
    }

    /// Sorts the watched sockets by inode and drops sockets seen twice (a table walk that
    /// repeated a row), undoing their counts.
    fn finish(&mut self) {
        self.watched.sort_unstable_by_key(|socket| socket.inode);
        let mut duplicate_listeners = Vec::new();
        let mut previous: Option<u32> = None;
        let connections_by_service = &mut self.connections_by_service;
        let duplicate_connections = &mut self.duplicate_connections;
        let repeated_connections = &mut self.repeated_connections;
        self.watched.retain(|socket| {
            if previous.replace(socket.inode) != Some(socket.inode) {
                return true;
            }
            if socket.listening {
                duplicate_listeners.push(socket.inode);
            } else {
                repeated_connections.push((socket.namespace, socket.service));
                if let Some(count) = connections_by_service.get_mut(usize::from(socket.service)) {
                    *count = count.saturating_sub(1);
                }
            }
            false
        });
        // The first listing of a repeated connection stays; later ones go.
        self.connection_of.sort_unstable();
        let mut previous: Option<u32> = None;
        self.connection_of.retain(|&(inode, connection)| {
            if previous.replace(inode) != Some(inode) {
                return true;
            }
            duplicate_connections.push(connection);
            false
        });
        self.duplicate_connections.sort_unstable();
        if !duplicate_listeners.is_empty() {
            let mut seen = std::collections::HashSet::new();
            self.listeners
                .retain(|listener| seen.insert(listener.inode));
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{
        net::TcpListener,
        os::fd::{FromRawFd, OwnedFd},
    };

    /// A port below the ephemeral range (10000-19999, clear of the integration tests'
    /// 20000-31999): no client socket on the host can have it as its local port, so tests that
    /// watch it see only their own sockets even while other work holds many connections.
    fn next_test_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        (10_000 + (std::process::id().wrapping_mul(37).wrapping_add(step)) % 10_000) as u16
    }

    /// A listener on 127.0.0.1 with an exact backlog (std picks its own).
    pub fn listen_loopback(backlog: i32) -> TcpListener {
        for _ in 0..10_000 {
            if let Some(listener) = try_listen_loopback(next_test_port(), backlog) {
                return listener;
            }
        }
        panic!("no free test port in 10000-19999");
    }

    fn try_listen_loopback(port: u16, backlog: i32) -> Option<TcpListener> {
        // SAFETY: plain socket calls on a descriptor we own; results are checked.
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
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
            if bound != 0 {
                return None;
            }
            assert_eq!(
                libc::listen(raw, backlog),
                0,
                "listen: {}",
                std::io::Error::last_os_error()
            );
            Some(TcpListener::from(fd))
        }
    }
}

#[cfg(test)]
mod tests;
