//! What the socket tables of one sample yielded ([`Found`]): the watched-socket list the fd walk
//! matches descriptors against, listeners, the start-up listing of connections and per-service
//! counts, with the rollback of a namespace read that failed half-way and the removal of rows a
//! table walk repeated.

use std::net::SocketAddr;

use super::{
    aggregate::ListenerQueue, parse::TcpRow, parse::TcpState, Namespace, TableSources,
    TcpExtCounters, WatchedConnection,
};
use crate::model::Role;

/// States listed as existing connections: everything with a real socket behind it except
/// listeners. TIME_WAIT and SYN_RECV rows are kernel mini-sockets that no process holds and
/// no data flows on; adopting them would only produce connections that never close.
fn is_listed_connection_state(state: u8) -> bool {
    !matches!(
        TcpState::try_from(state),
        Ok(TcpState::Listen | TcpState::TimeWait | TcpState::SynRecv | TcpState::NewSynRecv)
    )
}

/// A watched socket with a file (inode != 0), for matching `/proc/<pid>/fd` links. 12 bytes:
/// with 100k connections on the host this list holds 200k of them. (The start-up listing of
/// connections maps inodes to its entries in [`Found::connection_of`] instead of a field here.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WatchedSocket {
    /// Socket inodes fit in 32 bits: sockfs numbers them with get_next_ino(), an unsigned int,
    /// and sock_diag reports them as a __u32 (see [`socket_inode`]).
    pub(super) inode: u32,
    /// Position of the socket's network namespace in the sample's namespace order, so the
    /// next sample can keep the sockets of a namespace whose dump it reuses (see
    /// [`NamespaceDump`]) without a copy of them.
    pub(super) namespace: u32,
    pub(super) service: u16,
    /// A client-role connection's server in the sample's [`ServerTable`] (what tells a process
    /// holding a connection to every server of a service, a full mesh, from one holding many
    /// to a few), [`ServerTable::LISTENER`] for a listener, else [`ServerTable::NONE`].
    pub(super) server: u16,
}

// The per-socket cost the module documentation states.
const _: () = assert!(std::mem::size_of::<WatchedSocket>() == 12);

impl WatchedSocket {
    pub(super) fn listening(&self) -> bool {
        self.server == ServerTable::LISTENER
    }

    /// The [`ServerTable`] index of a client-role connection's server.
    pub(super) fn server(&self) -> Option<u16> {
        (self.server < ServerTable::LISTENER).then_some(self.server)
    }
}

/// The servers that client-role watched sockets connect to, each stored once, by index. Made
/// afresh every sample from the sockets it keeps ([`ServerTable::carry`]), so it holds only
/// live servers: a tier's size, not its connections'.
#[derive(Debug, Default)]
pub(super) struct ServerTable {
    list: Vec<SocketAddr>,
    index: std::collections::HashMap<SocketAddr, u16>,
}

impl ServerTable {
    /// No server known: a server-role socket, or a client's past the table's 65,533 servers
    /// (see [`ServerTable::overflowed`]).
    pub(super) const NONE: u16 = u16::MAX;
    /// A listener.
    pub(super) const LISTENER: u16 = u16::MAX - 1;

    /// The index of `server`, added if new; [`ServerTable::NONE`] once the table is full.
    pub(super) fn intern(&mut self, server: SocketAddr) -> u16 {
        if let Some(&index) = self.index.get(&server) {
            return index;
        }
        let index = match u16::try_from(self.list.len()) {
            Ok(index) if index < Self::LISTENER => index,
            _ => return Self::NONE,
        };
        self.list.push(server);
        self.index.insert(server, index);
        index
    }

    /// Whether a server was left out because the table was full.
    pub(super) fn overflowed(&self) -> bool {
        self.list.len() >= usize::from(Self::LISTENER)
    }

    pub(super) fn get(&self, index: u16) -> Option<SocketAddr> {
        self.list.get(usize::from(index)).copied()
    }

    /// A table for the next sample holding the servers of `kept` (sockets reused from this
    /// sample), whose indexes it rewrites.
    pub(super) fn carry(&self, kept: &mut [WatchedSocket]) -> ServerTable {
        let mut next = ServerTable::default();
        let mut moved = vec![Self::NONE; self.list.len()];
        for socket in kept {
            let Some(server) = socket.server().and_then(|index| self.get(index)) else {
                continue;
            };
            let to = &mut moved[usize::from(socket.server)];
            if *to == Self::NONE {
                *to = next.intern(server);
            }
            socket.server = *to;
        }
        next
    }
}

/// The 32-bit form of a socket inode, None for a value no socket can have.
pub(super) fn socket_inode(inode: u64) -> Option<u32> {
    u32::try_from(inode).ok()
}

/// Looks `inode` up in `watched`, which is sorted by inode.
pub(super) fn find_watched(watched: &[WatchedSocket], inode: u32) -> Option<usize> {
    watched
        .binary_search_by_key(&inode, |socket| socket.inode)
        .ok()
}

/// What a socket table row does not say about a listener: its accept-queue limit and drop
/// count (sock_diag reports both; the /proc text neither).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ListenerCounts {
    pub(super) limit: Option<u32>,
    pub(super) drops: Option<u32>,
}

/// What the namespace tables of one sample yielded.
pub(super) struct Found {
    pub(super) list_connections: bool,
    /// Watched sockets with an inode; sorted by inode and deduplicated by [`Found::finish`].
    pub(super) watched: Vec<WatchedSocket>,
    /// [`WatchedSocket::namespace`] of the namespace being read.
    pub(super) namespace: u32,
    pub(super) listeners: Vec<ListenerQueue>,
    pub(super) connections: Vec<WatchedConnection>,
    /// (inode, index in `connections`) of the listed connections with a file; sorted by inode
    /// and deduplicated by [`Found::finish`]. Empty unless listing connections.
    pub(super) connection_of: Vec<(u32, u32)>,
    pub(super) connections_by_service: Vec<u64>,
    /// The servers of the client-role sockets in `watched`.
    pub(super) servers: ServerTable,
    pub(super) netstat_readings: Vec<(u64, TcpExtCounters)>,
    /// Connections listed twice (indexes, sorted), removed at the end of the sample.
    pub(super) duplicate_connections: Vec<u32>,
    /// Namespace and service of each non-listening socket [`Found::finish`] dropped as a
    /// repeated row.
    pub(super) repeated_connections: Vec<(u32, u16)>,
    /// Sockets without a file seen in the namespace being read, to drop repeated rows (see
    /// [`drop_duplicate_rows`]): only those, since sockets with an inode are deduplicated by
    /// inode in [`Found::finish`] without a per-socket set.
    pub(super) fileless: std::collections::HashSet<(SocketAddr, SocketAddr)>,
    /// What the namespace being read recorded, for [`Found::commit_namespace`].
    pub(super) namespace_sockets: bool,
    pub(super) namespace_listeners: bool,
    pub(super) sources: TableSources,
    /// Record listeners only: the connections come from the previous full dump.
    pub(super) listeners_only: bool,
}

/// Lengths and counts before a namespace's dump, to undo a dump that failed half-way.
pub(super) struct FoundMark {
    pub(super) watched: usize,
    pub(super) listeners: usize,
    pub(super) connections: usize,
    pub(super) connection_of: usize,
    pub(super) connections_by_service: Vec<u64>,
}

impl Found {
    /// `watched` holds the sockets reused from the last sample, their servers in `servers`.
    pub(super) fn new(
        services: usize,
        list_connections: bool,
        watched: Vec<WatchedSocket>,
        servers: ServerTable,
    ) -> Self {
        Found {
            list_connections,
            watched,
            namespace: 0,
            listeners: Vec::new(),
            connections: Vec::new(),
            connection_of: Vec::new(),
            connections_by_service: vec![0; services],
            servers,
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

    pub(super) fn mark(&mut self) -> FoundMark {
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

    pub(super) fn rollback(&mut self, mark: FoundMark) {
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
    pub(super) fn commit_namespace(&mut self, namespace: &mut Namespace) {
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
    pub(super) fn record(
        &mut self,
        service_names: &[String],
        netns: u64,
        row: TcpRow,
        service: u16,
        role: Role,
        counts: ListenerCounts,
    ) {
        let listening = row.state == TcpState::Listen as u8;
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
            let server = if listening {
                ServerTable::LISTENER
            } else if role == Role::Client {
                self.servers.intern(row.remote)
            } else {
                ServerTable::NONE
            };
            self.watched.push(WatchedSocket {
                inode,
                namespace: self.namespace,
                service,
                server,
            });
            if let Some(connection) = connection {
                self.connection_of.push((inode, connection));
            }
        }
    }

    /// Sorts the watched sockets by inode and drops sockets seen twice (a table walk that
    /// repeated a row), undoing their counts.
    pub(super) fn finish(&mut self) {
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
            if socket.listening() {
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
