//! The socket table: which watched connections exist, which service and role they belong to,
//! and how they end. Pure state machine over kernel events; produces [`Observation`]s that
//! metrics and history consume.

use std::net::SocketAddr;

use foldhash::{HashMap, HashMapExt};

use agent_common::TcpState;

use crate::{
    conn::dead_writes::{DeadWrite, DeadWriteTracker},
    kernel::events::{EventKind, SockEventRecord, TcpTrouble},
    model::{
        ClosedBy, ConnectFailureReason, DeadWriteOutcome, ResetDirection, RetransmitKind, Role,
    },
    services::SharedServices,
};

/// How long a closed socket's endpoint is remembered for sends that race its close.
const RECENTLY_CLOSED_NS: u64 = 10_000_000_000;

/// The process of a dead write known only from the kernel's sequence numbers after a reset.
pub const UNKNOWN_WRITER: &str = "unknown";

/// The service endpoint a connection belongs to. For server-role sockets `server` is this
/// host's listening address, so clients are aggregated rather than given series of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub service: usize,
    pub server: SocketAddr,
    pub role: Role,
}

/// Two or three words instead of the derived field-by-field hashing (`SocketAddr` feeds its
/// enum tags, octets and port to the hasher one write at a time): the metrics recorder hashes
/// an endpoint up to five times per decoded request. Equal endpoints hash equal (every word
/// comes from fields `Eq` compares).
impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let role = u64::from(self.role == Role::Server);
        match self.server {
            SocketAddr::V4(v4) => state
                .write_u64(u64::from(u32::from(*v4.ip())) << 32 | u64::from(v4.port()) << 8 | role),
            SocketAddr::V6(v6) => {
                state.write_u128(u128::from(*v6.ip()));
                state.write_u64(u64::from(v6.port()) << 8 | 2 | role);
            }
        }
        state.write_usize(self.service);
    }
}

/// What the connection tracker concludes from socket events: connections opened and closed,
/// dead writes, TCP trouble, descriptor exhaustion. (What the bytes on a connection say is a
/// [`crate::memcache::decoders::MemcacheEvent`].)
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    ConnectionOpened {
        endpoint: Endpoint,
        ts_ns: u64,
    },
    /// A connection that was already open when the agent started: it counts as active but was
    /// not opened while we watched.
    ConnectionAdopted {
        endpoint: Endpoint,
    },
    ConnectionClosed {
        endpoint: Endpoint,
        closed_by: ClosedBy,
        ts_ns: u64,
        /// None for adopted connections whose open we never saw.
        duration_ns: Option<u64>,
        /// Time from the last send/receive to the first close; None when no activity is known.
        idle_before_close_ns: Option<u64>,
    },
    /// A reload took the connection's port out of the watched set: the kernel reports
    /// nothing more of it, so no close will come. It stops counting as active; no close is
    /// counted. Also a start-up scan entry that turned out to be a connection the programs
    /// reported (its count moves to that one).
    ConnectionForgotten {
        endpoint: Endpoint,
    },
    /// A reload gave the connection's port to another service id (the service was renamed,
    /// or the port moved): it now counts as active under `to`, not `from`; no open or close.
    ConnectionMoved {
        from: Endpoint,
        to: Endpoint,
    },
    /// The table was full; a connection is not tracked.
    TrackingDropped,
    /// A send onto a connection the peer had closed, with what the application saw next.
    DeadSocketWrite(DeadWrite),
    /// A client connect that never reached ESTABLISHED.
    ConnectFailed {
        endpoint: Endpoint,
        reason: ConnectFailureReason,
    },
    Retransmit {
        endpoint: Endpoint,
        kind: RetransmitKind,
    },
    Reset {
        endpoint: Endpoint,
        direction: ResetDirection,
    },
    /// This host sent a SYN to a watched service (a connection attempt).
    SynSent {
        service: usize,
    },
    /// A local listener of a watched service completed a handshake: an incoming SYN became a
    /// connection. The attempts it refused never become sockets; the sampler counts them from
    /// the listener's drop counter.
    HandshakeCompleted {
        service: usize,
    },
    FdExhausted {
        comm: String,
        syscall: &'static str,
        errno: i64,
    },
}

/// A SYN answered by a reset was refused; one that never got an answer timed out.
fn connect_failure_reason(facts: &crate::kernel::events::SocketFacts) -> ConnectFailureReason {
    if facts.reset_received() {
        ConnectFailureReason::Refused
    } else {
        ConnectFailureReason::Timeout
    }
}

/// One tracked socket. The table holds one per watched socket (hundreds of thousands on a busy
/// host), so the entry is packed: the endpoint is an index into the tracker's [`Endpoints`]
/// (few distinct ones, shared by all connections of a service address), no `Option` padding.
/// See `connection_entry_is_compact`.
#[derive(Debug, Clone)]
struct Connection {
    /// `NO_TIME` for adopted connections whose open we never saw.
    opened_ns: u64,
    /// The connection's [`crate::model::flow_id`] (from its 4-tuple in client/server order),
    /// `NO_FLOW` until both ports are known: request ids of its requests start from it.
    flow: u64,
    /// Index into [`Endpoints`].
    endpoint: u32,
    first_close_by: Option<ClosedBy>,
    /// Counted in the active gauge (opened or adopted), so its close must be reported.
    counted: bool,
}

/// Stands for "no flow id yet" (a real id is 0 once in 2^64).
const NO_FLOW: u64 = 0;

/// Stands for "unknown" in packed timestamps; kernel clocks never reach it.
const NO_TIME: u64 = u64::MAX;

fn unpack_time(ns: u64) -> Option<u64> {
    (ns != NO_TIME).then_some(ns)
}

impl Connection {
    fn new(endpoint: u32, counted: bool, first_close_by: Option<ClosedBy>) -> Self {
        Connection {
            opened_ns: NO_TIME,
            flow: NO_FLOW,
            endpoint,
            first_close_by,
            counted,
        }
    }

    /// Learns the flow id from an event's addresses, once both ports are bound.
    fn learn_flow(&mut self, role: Role, local: Option<SocketAddr>, remote: Option<SocketAddr>) {
        if self.flow == NO_FLOW {
            if let (Some(local), Some(remote)) = (local, remote) {
                self.flow = flow_of(role, local, remote).unwrap_or(NO_FLOW);
            }
        }
    }

    fn flow(&self) -> Option<u64> {
        (self.flow != NO_FLOW).then_some(self.flow)
    }

    fn opened_ns(&self) -> Option<u64> {
        unpack_time(self.opened_ns)
    }
}

/// The distinct endpoints of tracked connections, each stored once: a connection keeps a
/// 4-byte index instead of its own copy (22 bytes packed), 16 bytes less per table slot.
/// Indexes are never reused while a connection holds them; endpoints nobody holds any more
/// are dropped by [`Endpoints::compact`], so the table stays bounded by the live ones.
#[derive(Default)]
struct Endpoints {
    list: Vec<Endpoint>,
    index: HashMap<Endpoint, u32>,
    /// `compact` runs when the list grows past this.
    compact_above: usize,
}

/// Endpoints kept without compaction (a handful per service is normal).
const ENDPOINTS_SLACK: usize = 64;

impl Endpoints {
    /// The endpoint's index; None only past `u32::MAX` distinct endpoints.
    fn intern(&mut self, endpoint: Endpoint) -> Option<u32> {
        if let Some(&id) = self.index.get(&endpoint) {
            return Some(id);
        }
        let id = u32::try_from(self.list.len()).ok()?;
        self.list.push(endpoint);
        self.index.insert(endpoint, id);
        Some(id)
    }

    fn get(&self, id: u32) -> Endpoint {
        self.list[id as usize]
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    /// Drops the endpoints no connection holds and renumbers the held ones, when the list has
    /// grown to more than twice what was held at the last compaction (amortised O(1) per
    /// intern).
    fn compact<'a>(&mut self, held: impl Iterator<Item = &'a mut Connection>) {
        if self.len() <= self.compact_above {
            return;
        }
        let mut renumbered = vec![u32::MAX; self.list.len()];
        let mut list = Vec::new();
        let mut index = HashMap::new();
        for connection in held {
            let old = connection.endpoint as usize;
            if renumbered[old] == u32::MAX {
                let endpoint = self.list[old];
                // Fewer than before, so it fits.
                renumbered[old] = list.len() as u32;
                index.insert(endpoint, renumbered[old]);
                list.push(endpoint);
            }
            connection.endpoint = renumbered[old];
        }
        self.compact_above = (list.len() * 2).max(ENDPOINTS_SLACK);
        self.list = list;
        self.index = index;
    }
}

/// Removes the start-up scan's entry for (local, remote) from `seeded`, if any, with its part
/// of `peer_closed_seeded`. (Free of the tracker, so a caller holding a connection entry can
/// call it.)
fn take_seed(
    seeded: &mut HashMap<(SocketAddr, SocketAddr), Connection>,
    peer_closed_seeded: &mut usize,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<Connection> {
    let seed = seeded.remove(&(local, remote))?;
    if seed.first_close_by == Some(ClosedBy::Peer) {
        *peer_closed_seeded = peer_closed_seeded.saturating_sub(1);
    }
    Some(seed)
}

/// A connection's flow id from its local and remote address: the client is the local end of a
/// client-role socket and the remote end of a server-role one.
fn flow_of(role: Role, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    match role {
        Role::Client => crate::model::flow_id(local, remote),
        Role::Server => crate::model::flow_id(remote, local),
    }
}

#[derive(Debug, Clone, Copy)]
struct FirstClose {
    by: ClosedBy,
    idle_ns: Option<u64>,
}

pub struct Tracker {
    services: SharedServices,
    connections: HashMap<u64, Connection>,
    /// The endpoints that [`Connection::endpoint`] indexes (of `connections` and `seeded`).
    endpoints: Endpoints,
    /// Connections found in /proc at start-up, not yet matched to a kernel socket address.
    seeded: HashMap<(SocketAddr, SocketAddr), Connection>,
    /// Endpoints of sockets that closed after their peer did, for sends racing the close.
    recently_closed: HashMap<u64, (Endpoint, u64, Option<u64>)>,
    /// Idle time at the first close of connections that have begun closing (and whose idle
    /// time is known). Kept out of [`Connection`] because few connections are closing at any
    /// moment: 8 bytes less for every open one.
    idle_at_first_close: HashMap<u64, u64>,
    /// Open connections whose peer closed first: the send/receive programs' only work when
    /// nothing is captured (see `limits.socket_probes_on_demand`). Swept in [`Tracker::tick`].
    /// The value is the bytes the send programs saw written since the peer closed, to tell
    /// what they missed once the kernel's count is known (see [`Tracker::written_unseen`]).
    peer_closed_open: HashMap<u64, u64>,
    /// Connections found in /proc, not yet met, whose peer closed first (their socket
    /// addresses are unknown until met).
    peer_closed_seeded: usize,
    /// Bytes written unseen before a reset closed the socket, held until the send that
    /// caused the reset reports itself (on loopback the reset closes the socket inside that
    /// send, before the send's own event) or the application's next read tells their fate.
    unseen_before_reset: HashMap<u64, UnseenWrite>,
    /// Whether the send/receive programs exist (they do not before 6.4): without them no send
    /// reports a write and no read tells its fate, so the bytes the kernel's sequence numbers
    /// count are the only dead write there is, with [`DeadWriteOutcome::Unknown`].
    send_receive_probes: bool,
    dead_writes: DeadWriteTracker,
    dead_write_scratch: Vec<DeadWrite>,
    max_connections: usize,
}

/// See [`Tracker::unseen_before_reset`].
#[derive(Debug, Clone, Copy)]
struct UnseenWrite {
    endpoint: Endpoint,
    bytes: u64,
    ts_ns: u64,
}

/// How long unseen bytes wait for the send that reports them: its event follows the close's
/// in the same ring within microseconds, so a second is ample.
const UNSEEN_SETTLE_NS: u64 = 1_000_000_000;

impl Tracker {
    pub fn new(services: SharedServices, max_connections: usize) -> Self {
        Tracker {
            services,
            connections: HashMap::new(),
            endpoints: Endpoints::default(),
            seeded: HashMap::new(),
            recently_closed: HashMap::new(),
            idle_at_first_close: HashMap::new(),
            peer_closed_open: HashMap::new(),
            peer_closed_seeded: 0,
            unseen_before_reset: HashMap::new(),
            send_receive_probes: true,
            dead_writes: DeadWriteTracker::new(max_connections.min(4096)),
            dead_write_scratch: Vec::new(),
            max_connections,
        }
    }

    pub fn endpoint_of(&self, sk: u64) -> Option<Endpoint> {
        self.connections
            .get(&sk)
            .map(|c| self.endpoints.get(c.endpoint))
            .or_else(|| self.recently_closed.get(&sk).map(|(e, _, _)| *e))
    }

    /// The endpoint and, once known, the flow id of a socket (one lookup: the payload path).
    pub fn endpoint_and_flow_of(&self, sk: u64) -> Option<(Endpoint, Option<u64>)> {
        self.connections
            .get(&sk)
            .map(|c| (self.endpoints.get(c.endpoint), c.flow()))
            .or_else(|| {
                self.recently_closed
                    .get(&sk)
                    .map(|(e, _, flow)| (*e, *flow))
            })
    }

    /// This kernel has no send/receive programs (see [`Tracker::send_receive_probes`]).
    pub fn without_send_receive_probes(&mut self) {
        self.send_receive_probes = false;
    }

    pub fn dead_writes(&self) -> &DeadWriteTracker {
        &self.dead_writes
    }

    pub fn dead_writes_mut(&mut self) -> &mut DeadWriteTracker {
        &mut self.dead_writes
    }

    /// Periodic work: dead writes whose window passed, and forgetting old closed sockets.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Observation>) {
        let settled: Vec<u64> = self
            .unseen_before_reset
            .iter()
            .filter(|(_, unseen)| now_ns.saturating_sub(unseen.ts_ns) >= UNSEEN_SETTLE_NS)
            .map(|(&sk, _)| sk)
            .collect();
        for sk in settled {
            self.settle_unseen(sk);
        }
        self.dead_writes
            .expire(now_ns, &mut self.dead_write_scratch);
        out.extend(
            self.dead_write_scratch
                .drain(..)
                .map(Observation::DeadSocketWrite),
        );
        self.recently_closed
            .retain(|_, (_, closed_ns, _)| now_ns.saturating_sub(*closed_ns) < RECENTLY_CLOSED_NS);
        let connections = &self.connections;
        self.peer_closed_open
            .retain(|sk, _| connections.contains_key(sk));
        self.endpoints.compact(
            self.connections
                .values_mut()
                .chain(self.seeded.values_mut()),
        );
        release_slack(&mut self.connections);
        release_slack(&mut self.seeded);
        release_slack(&mut self.recently_closed);
        release_slack(&mut self.idle_at_first_close);
        release_slack(&mut self.unseen_before_reset);
    }

    /// Whether a watched connection's peer has closed while it is still open here, or one
    /// closed after its peer did a moment ago: the sends and receives that are dead writes.
    pub fn any_peer_closed(&self) -> bool {
        !self.peer_closed_open.is_empty()
            || !self.recently_closed.is_empty()
            || self.peer_closed_seeded > 0
    }

    /// After a reload: forgets the connections whose endpoint is not `still_watched` (see
    /// [`Observation::ConnectionForgotten`]), with what they held for dead writes.
    pub fn forget_unwatched(
        &mut self,
        still_watched: impl Fn(&Endpoint) -> bool,
        out: &mut Vec<Observation>,
    ) {
        let endpoints = &self.endpoints;
        // Whether a connection stays; one that goes is reported if it was counted.
        let mut keep = |connection: &Connection| {
            let endpoint = endpoints.get(connection.endpoint);
            let kept = still_watched(&endpoint);
            if !kept && connection.counted {
                out.push(Observation::ConnectionForgotten { endpoint });
            }
            kept
        };
        let mut forgotten = Vec::new();
        self.connections.retain(|&sk, connection| {
            keep(connection) || {
                forgotten.push(sk);
                false
            }
        });
        let mut peer_closed = 0;
        self.seeded.retain(|_, connection| {
            keep(connection) || {
                peer_closed += usize::from(connection.first_close_by == Some(ClosedBy::Peer));
                false
            }
        });
        self.peer_closed_seeded = self.peer_closed_seeded.saturating_sub(peer_closed);
        for sk in forgotten {
            self.peer_closed_open.remove(&sk);
            self.idle_at_first_close.remove(&sk);
            self.unseen_before_reset.remove(&sk);
            self.recently_closed.remove(&sk);
        }
    }

    /// After a reload: every tracked connection (and what is held for its dead writes and
    /// racing sends) takes the endpoint `rebound` gives it; a counted connection whose endpoint
    /// changes is reported as [`Observation::ConnectionMoved`]. Without this a renamed
    /// service's pooled connections kept the old name for as long as they lived.
    pub fn rebind(&mut self, rebound: impl Fn(Endpoint) -> Endpoint, out: &mut Vec<Observation>) {
        // Few distinct endpoints: each is mapped once, then connections swap indexes.
        let mut moved: HashMap<u32, (u32, Endpoint, Endpoint)> = HashMap::new();
        for index in 0..self.endpoints.len() as u32 {
            let from = self.endpoints.get(index);
            let to = rebound(from);
            if to != from {
                if let Some(to_index) = self.endpoints.intern(to) {
                    moved.insert(index, (to_index, from, to));
                }
            }
        }
        if moved.is_empty() {
            return;
        }
        for connection in self
            .connections
            .values_mut()
            .chain(self.seeded.values_mut())
        {
            if let Some(&(to_index, from, to)) = moved.get(&connection.endpoint) {
                connection.endpoint = to_index;
                if connection.counted {
                    out.push(Observation::ConnectionMoved { from, to });
                }
            }
        }
        for (endpoint, _, _) in self.recently_closed.values_mut() {
            *endpoint = rebound(*endpoint);
        }
        for unseen in self.unseen_before_reset.values_mut() {
            unseen.endpoint = rebound(unseen.endpoint);
        }
        self.dead_writes.rebind(&rebound);
    }

    pub fn active_connections(&self) -> usize {
        self.connections.values().filter(|c| c.counted).count()
            + self.seeded.values().filter(|c| c.counted).count()
    }

    /// Registers the connections /proc listed at start (local, remote, state) with
    /// [`Tracker::seed`], except those the programs already reported: a connection opened
    /// between the probes' attach and the /proc scan is both, and counted twice it stayed
    /// active after its close.
    pub fn seed_all(
        &mut self,
        existing: impl IntoIterator<Item = (SocketAddr, SocketAddr, u8)>,
        out: &mut Vec<Observation>,
    ) {
        let endpoints = &self.endpoints;
        // Both ends of a loopback connection share its flow id: the role tells them apart.
        let reported: std::collections::HashSet<(u64, Role)> = self
            .connections
            .values()
            .filter_map(|c| Some((c.flow()?, endpoints.get(c.endpoint).role)))
            .collect();
        let services = self.services.load();
        for (local, remote, state) in existing {
            let seen = services.endpoint(local, remote).is_some_and(|endpoint| {
                flow_of(endpoint.role, local, remote)
                    .is_some_and(|flow| reported.contains(&(flow, endpoint.role)))
            });
            if !seen {
                self.seed(local, remote, state, out);
            }
        }
    }

    /// Registers a connection that existed before the agent started (from /proc), so the active
    /// gauge is right from the first scrape.
    pub fn seed(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        state: u8,
        out: &mut Vec<Observation>,
    ) {
        let Some(endpoint) = self.services.load().endpoint(local, remote) else {
            return;
        };
        if !is_open_state(state) || self.seeded.contains_key(&(local, remote)) {
            return;
        }
        if self.connections.len() + self.seeded.len() >= self.max_connections {
            out.push(Observation::TrackingDropped);
            return;
        }
        let first_close = (state == TcpState::CloseWait as u8).then_some(FirstClose {
            by: ClosedBy::Peer,
            idle_ns: None,
        });
        let Some(id) = self.endpoints.intern(endpoint) else {
            out.push(Observation::TrackingDropped);
            return;
        };
        let mut connection = Connection::new(id, true, first_close.map(|close| close.by));
        connection.learn_flow(endpoint.role, Some(local), Some(remote));
        self.seeded.insert((local, remote), connection);
        self.peer_closed_seeded += usize::from(first_close.is_some());
        out.push(Observation::ConnectionAdopted { endpoint });
    }

    pub fn handle(&mut self, event: &SockEventRecord, out: &mut Vec<Observation>) {
        match event.kind {
            EventKind::StateChange {
                old_state,
                new_state,
            } => self.state_change(event, old_state, new_state, out),
            EventKind::Learned { state } => self.learned(event, state, out),
            EventKind::SendAfterPeerClose { ret } => {
                let sent = ret.max(0) as u64;
                if let Some(seen) = self.peer_closed_open.get_mut(&event.sk) {
                    *seen += sent;
                }
                if let Some(unseen) = self.unseen_before_reset.get_mut(&event.sk) {
                    unseen.bytes = unseen.bytes.saturating_sub(sent);
                    if unseen.bytes == 0 {
                        self.unseen_before_reset.remove(&event.sk);
                    }
                }
                let endpoint = self
                    .endpoint_of(event.sk)
                    .or_else(|| self.dead_writes.pending_endpoint(event.sk));
                if let Some(endpoint) = endpoint {
                    self.dead_writes.on_send(
                        event.sk,
                        endpoint,
                        event.ts_ns,
                        ret,
                        &event.comm,
                        event.pid,
                        event.facts.reset_received(),
                        &mut self.dead_write_scratch,
                    );
                }
            }
            EventKind::RecvAfterPeerClose { ret } => {
                self.settle_unseen(event.sk);
                self.dead_writes.on_recv(
                    event.sk,
                    ret,
                    event.facts.reset_received(),
                    &mut self.dead_write_scratch,
                );
            }
            EventKind::TcpTrouble { trouble, state } => {
                match trouble {
                    TcpTrouble::ResetReceived => self
                        .dead_writes
                        .reset_received(event.sk, &mut self.dead_write_scratch),
                    TcpTrouble::Retransmit => self.dead_writes.retransmitted(event.sk),
                    _ => {}
                }
                let Some(observation) = self.tcp_trouble(event, trouble, state) else {
                    return;
                };
                out.push(observation);
            }
            EventKind::FdExhausted { syscall, errno } => out.push(Observation::FdExhausted {
                comm: event.comm.clone(),
                syscall,
                errno,
            }),
        }
        out.extend(
            self.dead_write_scratch
                .drain(..)
                .map(Observation::DeadSocketWrite),
        );
    }

    /// Finds or creates the table entry for a socket first met in the middle of its life.
    fn adopt(&mut self, event: &SockEventRecord, state: u8, out: &mut Vec<Observation>) -> bool {
        let (Some(local), Some(remote)) = (event.local, event.remote) else {
            return false;
        };
        if let Some(seed) = take_seed(
            &mut self.seeded,
            &mut self.peer_closed_seeded,
            local,
            remote,
        ) {
            if seed.first_close_by == Some(ClosedBy::Peer) {
                self.peer_closed_open.insert(event.sk, 0);
            }
            self.connections.insert(event.sk, seed);
            return true;
        }
        let Some(endpoint) = self.services.load().endpoint(local, remote) else {
            return false;
        };
        if !is_open_state(state) {
            return false;
        }
        if self.connections.len() + self.seeded.len() >= self.max_connections {
            out.push(Observation::TrackingDropped);
            return false;
        }
        let first_close = (state == TcpState::CloseWait as u8).then(|| FirstClose {
            by: ClosedBy::Peer,
            idle_ns: idle(
                event.facts.peer_closed_ns,
                event.facts.last_activity_ns,
                None,
            ),
        });
        let Some(id) = self.endpoints.intern(endpoint) else {
            out.push(Observation::TrackingDropped);
            return false;
        };
        let mut connection = Connection::new(id, true, first_close.map(|close| close.by));
        connection.learn_flow(endpoint.role, Some(local), Some(remote));
        self.connections.insert(event.sk, connection);
        if first_close.is_some() {
            self.peer_closed_open.insert(event.sk, 0);
        }
        if let Some(idle_ns) = first_close.and_then(|close| close.idle_ns) {
            self.idle_at_first_close.insert(event.sk, idle_ns);
        }
        out.push(Observation::ConnectionAdopted { endpoint });
        true
    }

    /// A socket first seen in a send or receive (it predates the agent): adopted if watched.
    fn learned(&mut self, event: &SockEventRecord, state: u8, out: &mut Vec<Observation>) {
        if !self.connections.contains_key(&event.sk) && self.adopt(event, state, out) {
            // First seen sending into a connection the peer already closed.
            if state == TcpState::CloseWait as u8 && event.facts.bytes_sent > 0 {
                if let Some(endpoint) = self.endpoint_of(event.sk) {
                    self.dead_writes.on_send(
                        event.sk,
                        endpoint,
                        event.ts_ns,
                        event.facts.bytes_sent as i64,
                        &event.comm,
                        event.pid,
                        event.facts.reset_received(),
                        &mut self.dead_write_scratch,
                    );
                }
            }
        }
    }

    /// A retransmission or reset on a watched connection; `state` is the socket's state where
    /// the tracepoint has it.
    fn tcp_trouble(
        &self,
        event: &SockEventRecord,
        trouble: TcpTrouble,
        state: u8,
    ) -> Option<Observation> {
        let (Some(local), Some(remote)) = (event.local, event.remote) else {
            return None;
        };
        let endpoint = self.services.load().endpoint(local, remote)?;
        Some(match trouble {
            TcpTrouble::Retransmit => Observation::Retransmit {
                endpoint,
                kind: if state == TcpState::SynSent as u8 {
                    RetransmitKind::Syn
                } else {
                    RetransmitKind::Data
                },
            },
            TcpTrouble::RetransmitSynAck => Observation::Retransmit {
                endpoint,
                kind: RetransmitKind::SynAck,
            },
            TcpTrouble::ResetReceived => Observation::Reset {
                endpoint,
                direction: ResetDirection::Received,
            },
            TcpTrouble::ResetSent => Observation::Reset {
                endpoint,
                direction: ResetDirection::Sent,
            },
        })
    }

    fn state_change(
        &mut self,
        event: &SockEventRecord,
        old_state: u8,
        new_state: u8,
        out: &mut Vec<Observation>,
    ) {
        if old_state == TcpState::Close as u8 || old_state == TcpState::Listen as u8 {
            // A new socket at this address (a connect, or a listener's child): an entry still
            // there is stale, a socket adopted from a send that raced its own close (the
            // kernel's `learn` can read the old state in the instant the close tracepoint
            // runs). Kept, it took the new connection for itself: not born, so neither its SYN
            // nor its open was counted (1 of 64,667 in a soak; its close still was).
            if self.connections.remove(&event.sk).is_some() {
                self.idle_at_first_close.remove(&event.sk);
            }
            if self.unseen_before_reset.contains_key(&event.sk) {
                self.settle_unseen(event.sk);
                // The old socket's write, settled after the pipeline marked the reuse.
                self.dead_writes.socket_reused(event.sk, event.ts_ns);
            }
        }
        if old_state == TcpState::Listen as u8 || new_state == TcpState::Listen as u8 {
            self.listener_change(event, old_state, new_state, out);
            return;
        }
        if !self.connections.contains_key(&event.sk)
            && !self.start_tracking(event, old_state, new_state, out)
        {
            return;
        }
        let Some(connection) = self.connections.get_mut(&event.sk) else {
            return;
        };
        // A connecting client's source port is bound after its SYN_SENT state change: the
        // flow is learned from the first event that has both ports.
        let endpoint = self.endpoints.get(connection.endpoint);
        connection.learn_flow(endpoint.role, event.local, event.remote);

        if new_state == TcpState::Established as u8
            && matches!(
                TcpState::try_from(old_state),
                Ok(TcpState::SynSent | TcpState::SynRecv)
            )
            && !connection.counted
        {
            connection.opened_ns = event.ts_ns;
            connection.counted = true;
            out.push(Observation::ConnectionOpened {
                endpoint,
                ts_ns: event.ts_ns,
            });
            // Opened just before the start-up /proc scan, which read it before this event was
            // handled: the scan's entry is this connection, counted once already.
            if let (Some(local), Some(remote)) = (event.local, event.remote) {
                if let Some(seed) = take_seed(
                    &mut self.seeded,
                    &mut self.peer_closed_seeded,
                    local,
                    remote,
                ) {
                    out.push(Observation::ConnectionForgotten {
                        endpoint: self.endpoints.get(seed.endpoint),
                    });
                }
            }
        }

        if connection.first_close_by.is_none() && connection.counted {
            let by = match TcpState::try_from(new_state) {
                Ok(TcpState::FinWait1) => Some(ClosedBy::Local),
                Ok(TcpState::CloseWait) => Some(ClosedBy::Peer),
                Ok(TcpState::Close) => Some(ClosedBy::Reset),
                _ => None,
            };
            if let Some(by) = by {
                connection.first_close_by = Some(by);
                if by == ClosedBy::Peer {
                    self.peer_closed_open.insert(event.sk, 0);
                }
                if let Some(idle_ns) = idle(
                    event.ts_ns,
                    event.facts.last_activity_ns,
                    connection.opened_ns(),
                ) {
                    self.idle_at_first_close.insert(event.sk, idle_ns);
                }
            }
        }

        if old_state == TcpState::CloseWait as u8 {
            self.written_unseen(event, endpoint);
        }
        if new_state == TcpState::Close as u8 {
            // Whether a reset ended it decides whether writes after the peer's FIN were dead.
            self.dead_writes.closed(
                event.sk,
                event.facts.reset_received(),
                &mut self.dead_write_scratch,
            );
            self.closed(event, old_state, out);
        }
    }

    /// The socket left CLOSE_WAIT: the kernel's sequence numbers now tell how much the
    /// application wrote after its peer closed. Bytes the send programs did not report (they
    /// were off for the moment after the close, see `limits.socket_probes_on_demand`, or their
    /// events were lost, or there are none: 6.1) are one more write after the peer's close,
    /// dead as any other once the peer's reset answers it, its fate from the application's
    /// next read. How many calls wrote them is unknown: counted as one.
    fn written_unseen(&mut self, event: &SockEventRecord, endpoint: Endpoint) {
        let Some(written) = event.facts.written_after_peer_close else {
            return;
        };
        let seen = self
            .peer_closed_open
            .get_mut(&event.sk)
            .map_or(0, |seen| std::mem::replace(seen, u64::from(written)));
        let bytes = u64::from(written).saturating_sub(seen);
        if bytes == 0 {
            return;
        }
        let unseen = UnseenWrite {
            endpoint,
            bytes,
            ts_ns: event.ts_ns,
        };
        if !event.facts.reset_received() {
            // The application's own close or shutdown: its name, and no send still to come.
            // Dead only if the peer's reset answers it (see DeadWriteTracker::closed).
            self.record_unseen(event.sk, unseen, &event.comm, event.pid, false);
        } else if self.send_receive_probes
            && self.unseen_before_reset.len() < self.max_connections.min(4096)
        {
            // Held for the send that drew the reset (none comes without send programs).
            self.unseen_before_reset.insert(event.sk, unseen);
        } else {
            self.record_unseen(event.sk, unseen, UNKNOWN_WRITER, 0, true);
        }
    }

    /// Unseen bytes before a reset that no send has claimed: a dead write from here on. A
    /// reset is handled wherever the kernel happens to be running, so the writer is unknown.
    fn settle_unseen(&mut self, sk: u64) {
        if let Some(unseen) = self.unseen_before_reset.remove(&sk) {
            self.record_unseen(sk, unseen, UNKNOWN_WRITER, 0, true);
        }
    }

    /// `reset`: the peer's reset has come (the write is dead). Without send/receive programs
    /// no read will tell the write's fate: it is [`DeadWriteOutcome::Unknown`] from the start.
    fn record_unseen(&mut self, sk: u64, unseen: UnseenWrite, comm: &str, pid: u32, reset: bool) {
        self.dead_writes.on_written(
            sk,
            unseen.endpoint,
            unseen.ts_ns,
            unseen.bytes,
            comm,
            pid,
            (!self.send_receive_probes).then_some(DeadWriteOutcome::Unknown),
            reset,
            &mut self.dead_write_scratch,
        );
    }

    /// A listener's own change, or one of its children taking shape. The kernel clones a
    /// listener into a SYN_RECV child when the handshake's last ACK (or a Fast Open SYN, or a
    /// valid SYN cookie) arrives, before the child gets its peer's address: only the local
    /// port is known here.
    fn listener_change(
        &self,
        event: &SockEventRecord,
        old_state: u8,
        new_state: u8,
        out: &mut Vec<Observation>,
    ) {
        if old_state == TcpState::Listen as u8 && new_state == TcpState::SynRecv as u8 {
            let server = event
                .local
                .zip(event.remote)
                .and_then(|(local, remote)| self.services.load().endpoint(local, remote))
                .filter(|endpoint| endpoint.role == Role::Server);
            if let Some(endpoint) = server {
                out.push(Observation::HandshakeCompleted {
                    service: endpoint.service,
                });
            }
        }
    }

    /// The first state change seen on a socket not tracked yet: a connection being born (its
    /// SYN or its failed connect noted) or one that predates the agent (adopted). False when
    /// it is not tracked after all (unwatched, failed, or the table full).
    fn start_tracking(
        &mut self,
        event: &SockEventRecord,
        old_state: u8,
        new_state: u8,
        out: &mut Vec<Observation>,
    ) -> bool {
        let newborn = matches!(
            TcpState::try_from(old_state),
            Ok(TcpState::Close | TcpState::SynSent | TcpState::SynRecv)
        );
        if !newborn {
            return self.adopt(event, old_state, out);
        }
        let (Some(local), Some(remote)) = (event.local, event.remote) else {
            return false;
        };
        let Some(endpoint) = self.services.load().endpoint(local, remote) else {
            return false;
        };
        if old_state == TcpState::Close as u8
            && new_state == TcpState::SynSent as u8
            && endpoint.role == Role::Client
        {
            out.push(Observation::SynSent {
                service: endpoint.service,
            });
        }
        if new_state == TcpState::Close as u8 {
            // Never established: a failed connect (or an aborted handshake).
            if old_state == TcpState::SynSent as u8 && endpoint.role == Role::Client {
                out.push(Observation::ConnectFailed {
                    endpoint,
                    reason: connect_failure_reason(&event.facts),
                });
            }
            return false;
        }
        if self.connections.len() + self.seeded.len() >= self.max_connections {
            out.push(Observation::TrackingDropped);
            return false;
        }
        let Some(id) = self.endpoints.intern(endpoint) else {
            out.push(Observation::TrackingDropped);
            return false;
        };
        let connection = Connection::new(id, false, None);
        self.connections.insert(event.sk, connection);
        true
    }

    /// The socket reached CLOSE: its connection is forgotten (kept briefly among the recently
    /// closed when its peer had closed first, for dead writes that arrive after) and its close,
    /// or its failed connect, reported.
    fn closed(&mut self, event: &SockEventRecord, old_state: u8, out: &mut Vec<Observation>) {
        let Some(connection) = self.connections.remove(&event.sk) else {
            return;
        };
        let endpoint = self.endpoints.get(connection.endpoint);
        let idle_at_first_close = self.idle_at_first_close.remove(&event.sk);
        if !connection.counted
            && old_state == TcpState::SynSent as u8
            && endpoint.role == Role::Client
        {
            out.push(Observation::ConnectFailed {
                endpoint,
                reason: connect_failure_reason(&event.facts),
            });
        }
        if event.facts.peer_closed_ns != 0 {
            if self.recently_closed.len() >= self.max_connections {
                self.recently_closed.clear();
            }
            self.recently_closed
                .insert(event.sk, (endpoint, event.ts_ns, connection.flow()));
        }
        if connection.counted {
            let first_close = connection.first_close_by.map_or(
                FirstClose {
                    by: ClosedBy::Reset,
                    idle_ns: None,
                },
                |by| FirstClose {
                    by,
                    idle_ns: idle_at_first_close,
                },
            );
            out.push(Observation::ConnectionClosed {
                endpoint,
                closed_by: first_close.by,
                ts_ns: event.ts_ns,
                duration_ns: connection
                    .opened_ns()
                    .map(|opened| event.ts_ns.saturating_sub(opened)),
                idle_before_close_ns: first_close.idle_ns,
            });
        }
    }
}

/// Tables below this capacity are left alone: shrinking them saves little and regrowing costs.
const RETAINED_CAPACITY: usize = 1024;

/// Hands back memory a burst left behind. The tables grow on demand (doubling) and never
/// shrink by themselves, so 200k sockets opened once would keep their slots for good. Shrinks
/// to twice the live entries only when under a quarter is used, so a table hovering around one
/// size is not rehashed every tick.
fn release_slack<K: Eq + std::hash::Hash, V>(table: &mut HashMap<K, V>) {
    if table.capacity() > RETAINED_CAPACITY && table.capacity() / 4 > table.len() {
        table.shrink_to((table.len() * 2).max(RETAINED_CAPACITY));
    }
}

/// Idle time at `now`: since the last send/receive, or since the open when nothing was ever
/// exchanged. Unknown when neither is known.
fn idle(now: u64, last_activity_ns: u64, opened_ns: Option<u64>) -> Option<u64> {
    let since = if last_activity_ns != 0 {
        last_activity_ns
    } else {
        opened_ns?
    };
    Some(now.saturating_sub(since))
}

fn is_open_state(state: u8) -> bool {
    matches!(
        TcpState::try_from(state),
        Ok(TcpState::Established
            | TcpState::CloseWait
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::LastAck
            | TcpState::Closing)
    )
}

#[cfg(test)]
mod tests;
