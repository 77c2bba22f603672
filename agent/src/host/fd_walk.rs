//! The fd walk (sample step 3): which processes hold the watched sockets, found by matching
//! `socket:[inode]` links in `/proc/<pid>/fd`, walking again only the processes whose descriptors
//! may have changed, within a per-sample budget; owners get comm and limits read.

use std::collections::{BTreeMap, HashMap};

use super::{
    aggregate::ProcessUsage,
    found::{find_watched, socket_inode, ServerTable, WatchedSocket},
    Namespace, Sampler, ScanErrors, SocketOwner, WatchedConnection,
};

/// What the fd walk last found in one process. Kept between samples so a process whose
/// descriptors did not change is not walked again (see [`Sampler::scan_processes`]).
#[derive(Debug, Clone)]
pub(super) struct CachedProcess {
    pub(super) netns: u64,
    /// Descriptor count at the last walk (or, without `fd_count`, as counted by it).
    pub(super) open_fds: u64,
    /// Inodes of the watched sockets held at the last walk, sorted; 4 bytes a socket.
    /// Refilled in place by the next walk.
    pub(super) sockets: Vec<u32>,
    /// (inode, fd) of the listeners among them, sorted by inode, one fd each: the descriptor
    /// a listener's backlog can be read through (see [`diag::backlog_via_owner`]). Connections
    /// need none, and a socket listed as a connection does not turn into a listener (listen(2)
    /// needs an unconnected socket, which the tables do not list).
    pub(super) listener_fds: Vec<(u32, i32)>,
    /// Sample number of the last walk.
    pub(super) walked_at: u64,
    /// Sample number in which the process was last seen in a namespace with watched sockets.
    pub(super) seen_at: u64,
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
pub(super) const REWALK_AFTER_SAMPLES: u64 = 12;

impl Sampler {
    /// The descriptor count of every process, sorted by pid; empty where the kernel cannot
    /// count without a walk.
    pub(super) fn fd_counts(
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

    /// Which processes hold watched sockets, walking `/proc/<pid>/fd` only where something may
    /// have changed since the last walk. A process's previous result is reused when its
    /// descriptor count is unchanged (a stat of its fd directory, Linux 6.2+), every watched
    /// socket it held still exists, and it was walked less than [`REWALK_AFTER_SAMPLES`] ago.
    /// A process without watched sockets is walked again when its count changed only if some
    /// watched socket has no known owner. The walks due are done most urgent first, within
    /// [`MAX_FDS_WALKED_PER_SAMPLE`] descriptors (unbounded when listing connections).
    pub(super) fn scan_processes(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        fd_counts: &[(u32, u64)],
        watched: &[WatchedSocket],
        mut listed: ListedConnections,
        unbounded: bool,
        errors: &mut ScanErrors,
    ) -> ProcessScan {
        let mut processes = Vec::new();
        let mut listener_owners = HashMap::new();
        let mut stats = FdWalkStats::default();
        let mut edges = ClientEdgeCounts::default();
        if watched.is_empty() {
            self.processes.clear();
            return ProcessScan {
                processes,
                listener_owners,
                stats,
                edges,
            };
        }
        let sample = self.samples;

        // Pass 1: the descriptor count of every candidate process and whether its cached
        // result still holds; sockets of holding results are claimed.
        let mut claims = Claims::new(watched.len());
        let candidates = self.candidates(namespaces, fd_counts, watched, &mut claims);
        let unclaimed = !claims.all();

        // Pass 2: walk what is due, most urgent (then least recently walked) first.
        self.walk_due(
            &candidates,
            unclaimed,
            watched,
            unbounded,
            &mut stats,
            errors,
        );
        stats.processes_cached = candidates
            .iter()
            .filter(|candidate| candidate.urgency == 4 || (candidate.urgency == 2 && !unclaimed))
            .count();
        self.processes.retain(|_, cached| cached.seen_at == sample);

        // Pass 3: usage of every process holding watched sockets, in pid order per namespace
        // (the first owner of a connection is its lowest pid). A connection shared by forked
        // processes counts in each one's usage but once, for its first owner, in the edges.
        let mut on_edge = Claims::new(watched.len());
        for candidate in &candidates {
            let usage = self.usage_of(
                candidate,
                watched,
                &mut listed,
                &mut listener_owners,
                (&mut edges, &mut on_edge),
                errors,
            );
            processes.extend(usage);
        }
        ProcessScan {
            processes,
            listener_owners,
            stats,
            edges,
        }
    }

    /// Pass 1 of [`Sampler::scan_processes`]: every process of a namespace with watched
    /// sockets, with its descriptor count and how urgently it needs a walk. Sockets of cached
    /// results that still hold are claimed; processes whose count could not be read are
    /// forgotten.
    fn candidates(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        fd_counts: &[(u32, u64)],
        watched: &[WatchedSocket],
        claims: &mut Claims,
    ) -> Vec<Candidate> {
        let sample = self.samples;
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
                        urgency(cached, open_fds, watched, claims, sample)
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
        candidates
    }

    /// Pass 2 of [`Sampler::scan_processes`]: walks the candidates that are due, most urgent
    /// (then least recently walked) first, until the budget is spent; the rest are deferred.
    fn walk_due(
        &mut self,
        candidates: &[Candidate],
        unclaimed: bool,
        watched: &[WatchedSocket],
        unbounded: bool,
        stats: &mut FdWalkStats,
        errors: &mut ScanErrors,
    ) {
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
            if budget_left == 0 {
                stats.processes_deferred += 1;
                continue;
            }
            let Some(open_fds) = self.walk(&candidates[index], watched, errors) else {
                continue;
            };
            stats.processes_walked += 1;
            stats.descriptors_walked += open_fds;
            budget_left = budget_left.saturating_sub(open_fds.max(1));
        }
    }

    /// Walks one process's descriptors and caches which watched sockets it holds; the number of
    /// descriptors walked, or `None` (counted, and the process forgotten) when it could not be.
    fn walk(
        &mut self,
        candidate: &Candidate,
        watched: &[WatchedSocket],
        errors: &mut ScanErrors,
    ) -> Option<u64> {
        let sample = self.samples;
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
        let lookup =
            |inode: u64| socket_inode(inode).and_then(|inode| find_watched(watched, inode));
        let open_fds = match self.procfs.scan_fds(
            candidate.pid,
            |inode| lookup(inode).is_some(),
            |found| {
                let Some(socket) = lookup(found.inode).map(|index| watched[index]) else {
                    return;
                };
                sockets.push(socket.inode);
                if socket.listening() {
                    listener_fds.push((socket.inode, found.fd));
                }
            },
        ) {
            Ok(open) => open,
            Err(err) => {
                errors.io(&format!("pid {} fd", candidate.pid), &err);
                self.processes.remove(&candidate.pid);
                return None;
            }
        };
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
        Some(open_fds)
    }

    /// Pass 3 of [`Sampler::scan_processes`] for one process: its usage if it holds watched
    /// sockets and its comm and limits could be read. Notes it as the owner of the listed
    /// connections it holds (unless a lower pid was first) and of its listeners' descriptors.
    fn usage_of(
        &self,
        candidate: &Candidate,
        watched: &[WatchedSocket],
        listed: &mut ListedConnections,
        listener_owners: &mut HashMap<u64, ListenerOwner>,
        (edges, on_edge): (&mut ClientEdgeCounts, &mut Claims),
        errors: &mut ScanErrors,
    ) -> Option<ProcessUsage> {
        let cached = self.processes.get(&candidate.pid)?;
        let pid = candidate.pid;
        let mut held = cached
            .sockets
            .iter()
            .filter_map(|inode| Some((find_watched(watched, *inode)?, *inode)))
            .peekable();
        held.peek()?;
        let (comm, soft_nofile) = self.comm_and_limit(pid, errors)?;
        let mut usage = ProcessUsage {
            pid,
            comm,
            netns: candidate.netns,
            open_fds: candidate.open_fds.unwrap_or(cached.open_fds),
            soft_nofile,
            connections: BTreeMap::new(),
            listening_sockets: BTreeMap::new(),
            client_spread: BTreeMap::new(),
        };
        let mut per_service: Vec<(u64, u64)> = vec![(0, 0); self.service_names.len()];
        // (service, server, first holder) of each client-role connection, for its spread and
        // the edges.
        let mut to_servers: Vec<(u16, u16, bool)> = Vec::new();
        for (index, inode) in held {
            let socket = watched[index];
            if let Some(server) = socket.server() {
                to_servers.push((socket.service, server, !on_edge.test_and_set(index)));
            }
            let Some(counts) = per_service.get_mut(usize::from(socket.service)) else {
                continue;
            };
            if socket.listening() {
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
        to_servers.sort_unstable();
        for run in to_servers.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (service, server, _) = run[0];
            let Some(name) = self.service_names.get(usize::from(service)) else {
                continue;
            };
            let spread = usage.client_spread.entry(name.clone()).or_default();
            spread.servers += 1;
            spread.connections += run.len() as u64;
            let first_held = run.iter().filter(|(_, _, first)| *first).count() as u64;
            if first_held > 0 {
                edges.add(service, server, &usage.comm, first_held);
            }
        }
        Some(usage)
    }

    /// A process's comm and soft RLIMIT_NOFILE, or `None` (counted) when either is unreadable.
    fn comm_and_limit(&self, pid: u32, errors: &mut ScanErrors) -> Option<(String, u64)> {
        let comm = match self.procfs.read_comm(pid) {
            Ok(comm) => comm,
            Err(err) => {
                errors.io(&format!("pid {pid} comm"), &err);
                return None;
            }
        };
        let soft_nofile = match self.procfs.read_soft_nofile(pid) {
            Ok(Ok(limit)) => limit,
            Ok(Err(err)) => {
                errors.parse(&format!("pid {pid} limits"), &err);
                return None;
            }
            Err(err) => {
                errors.io(&format!("pid {pid} limits"), &err);
                return None;
            }
        };
        Some((comm, soft_nofile))
    }
}

/// What [`Sampler::scan_processes`] found: the processes holding watched sockets, the owner of
/// each listener, the walk's work, and the client connections per edge.
pub(super) struct ProcessScan {
    pub(super) processes: Vec<ProcessUsage>,
    pub(super) listener_owners: HashMap<u64, ListenerOwner>,
    pub(super) stats: FdWalkStats,
    pub(super) edges: ClientEdgeCounts,
}

/// A process that may hold watched sockets, as pass 1 of [`Sampler::scan_processes`] found it.
struct Candidate {
    pid: u32,
    netns: u64,
    /// From stat, when supported.
    open_fds: Option<u64>,
    /// 0 = never walked or its result is void, 1 = an owner that changed, 2 = a
    /// non-owner that changed, 3 = due for the periodic walk, 4 = cached result holds.
    urgency: u8,
}

/// How urgently a process walked before (in the same namespace) needs walking again (see
/// [`Candidate::urgency`]); claims its sockets when its cached result still holds.
fn urgency(
    cached: &mut CachedProcess,
    open_fds: Option<u64>,
    watched: &[WatchedSocket],
    claims: &mut Claims,
    sample: u64,
) -> u8 {
    cached.seen_at = sample;
    let unchanged = open_fds == Some(cached.open_fds);
    let sockets_present = cached
        .sockets
        .iter()
        .all(|inode| find_watched(watched, *inode).is_some());
    if !sockets_present || (!unchanged && !cached.sockets.is_empty()) {
        return 1;
    }
    for inode in &cached.sockets {
        if let Some(index) = find_watched(watched, *inode) {
            claims.set(index);
        }
    }
    if !unchanged {
        2
    } else if sample.saturating_sub(cached.walked_at) >= REWALK_AFTER_SAMPLES {
        3
    } else {
        4
    }
}

/// The start-up listing of connections, for noting their owners.
pub(super) struct ListedConnections<'a> {
    pub(super) connections: &'a mut [WatchedConnection],
    /// (inode, index in `connections`), sorted by inode ([`Found::connection_of`]).
    pub(super) by_inode: &'a [(u32, u32)],
}

impl ListedConnections<'_> {
    pub(super) fn by_socket(&mut self, inode: u32) -> Option<&mut WatchedConnection> {
        let at = self
            .by_inode
            .binary_search_by_key(&inode, |(inode, _)| *inode)
            .ok()?;
        self.connections.get_mut(self.by_inode[at].1 as usize)
    }
}

/// Which process descriptor holds a watched listener, for reading its backlog through it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListenerOwner {
    pub(super) pid: u32,
    pub(super) fd: i32,
}

/// Open client connections per (service, server, process name) over one sample's processes,
/// for the edge table's connection column; servers by their [`ServerTable`] index. Bounded by
/// [`ClientEdgeCounts::MAX`] entries (a tier's servers times the names of its clients).
#[derive(Debug, Default)]
pub(super) struct ClientEdgeCounts {
    /// By process name, then (service, server).
    counts: HashMap<String, HashMap<(u16, u16), u64>>,
    edges: usize,
    /// Connections left out once the bound was reached.
    pub(super) dropped: u64,
}

impl ClientEdgeCounts {
    pub(super) const MAX: usize = 16_384;

    pub(super) fn add(&mut self, service: u16, server: u16, comm: &str, open: u64) {
        // Looked up by &str: a process name is copied once per sample, not once per edge.
        if !self.counts.contains_key(comm) {
            if self.edges >= Self::MAX {
                self.dropped += open;
                return;
            }
            self.counts.insert(comm.to_string(), HashMap::new());
        }
        let Some(by_server) = self.counts.get_mut(comm) else {
            return;
        };
        if let Some(count) = by_server.get_mut(&(service, server)) {
            *count += open;
        } else if self.edges < Self::MAX {
            by_server.insert((service, server), open);
            self.edges += 1;
        } else {
            self.dropped += open;
        }
    }

    /// The counts with their service names and server addresses.
    pub(super) fn resolve(
        self,
        service_names: &[String],
        servers: &ServerTable,
    ) -> Vec<super::aggregate::ClientEdge> {
        let mut edges: Vec<_> = self
            .counts
            .into_iter()
            .flat_map(|(comm, by_server)| {
                by_server
                    .into_iter()
                    .filter_map(move |((service, server), open)| {
                        Some(super::aggregate::ClientEdge {
                            service: service_names.get(usize::from(service))?.clone(),
                            server: servers.get(server)?,
                            comm: comm.clone(),
                            open,
                        })
                    })
            })
            .collect();
        edges.sort_unstable_by(|a, b| {
            (&a.service, a.server, &a.comm).cmp(&(&b.service, b.server, &b.comm))
        });
        edges
    }
}

/// Which watched sockets (by index) a cached owner still holds this sample: one bit each.
struct Claims(Vec<u64>, usize);

impl Claims {
    fn new(sockets: usize) -> Self {
        Claims(vec![0; sockets.div_ceil(64)], sockets)
    }

    fn set(&mut self, index: usize) {
        if let Some(word) = self.0.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    /// Claims the socket; whether it already was.
    fn test_and_set(&mut self, index: usize) -> bool {
        let Some(word) = self.0.get_mut(index / 64) else {
            return true;
        };
        let bit = 1 << (index % 64);
        let was = *word & bit != 0;
        *word |= bit;
        was
    }

    /// Every socket is claimed.
    fn all(&self) -> bool {
        let (full, tail) = (self.1 / 64, self.1 % 64);
        self.0[..full].iter().all(|&word| word == u64::MAX)
            && (tail == 0 || self.0[full] == (1u64 << tail) - 1)
    }
}
