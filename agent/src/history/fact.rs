//! The history's input vocabulary. `Fact`s are owned and plain so the pipeline can build them
//! from tracking observations, decoded requests and procfs samples without sharing types with
//! the history's storage, which interns every string into a small id.

use crate::model::{
    ClosedBy, ConnectFailureReason, DeadWriteOutcome, ResetDirection, RetransmitKind, Role, Status,
    SynDirection,
};

/// One thing that happened, as the history stores it. Strings are label values: service names,
/// servers as "ip:port", process names (comm), command words ("get", "ms", "bin_set").
/// `comm: None` means the process is not known (e.g. a close seen in softirq context).
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    ConnectionOpened {
        service: String,
        server: String,
        role: Role,
        comm: Option<String>,
    },
    ConnectionClosed {
        service: String,
        server: String,
        role: Role,
        comm: Option<String>,
        closed_by: ClosedBy,
        /// Time from the last send/receive to the first close, when known.
        idle_before_close_s: Option<f64>,
        /// Lifetime of the connection, when its open was seen.
        duration_s: Option<f64>,
    },
    /// A send onto a connection the peer had already closed.
    DeadWrite {
        service: String,
        server: String,
        role: Role,
        comm: String,
        /// The memcache command written, when the decoder saw it.
        command: Option<String>,
        outcome: DeadWriteOutcome,
    },
    /// A decoded memcache request and its outcome. Requests with no answer may be recorded
    /// here with status `Timeout`/`Unanswered` or as [`Fact::RequestTimeout`].
    Request {
        service: String,
        server: String,
        role: Role,
        comm: Option<String>,
        command: String,
        status: Status,
        /// From the request's send to the response's first byte.
        latency_us: Option<u32>,
    },
    /// A request that got no answer within the decoder's timeout (same as a `Request` with
    /// status `Timeout` and no latency).
    RequestTimeout {
        service: String,
        server: String,
        role: Role,
        comm: Option<String>,
        command: String,
    },
    Retransmit {
        service: String,
        server: String,
        role: Role,
        kind: RetransmitKind,
    },
    Reset {
        service: String,
        server: String,
        role: Role,
        direction: ResetDirection,
    },
    ConnectFailure {
        service: String,
        server: String,
        reason: ConnectFailureReason,
    },
    /// SYNs counted since the previous sample.
    Syns {
        service: String,
        direction: SynDirection,
        count: u32,
    },
    /// Accept backlog of a local listener (sampled): the fullest of the service's.
    ListenQueue {
        service: String,
        /// The listener's local address.
        listener: String,
        length: u32,
        limit: u32,
    },
    /// Host-wide /proc/net/netstat deltas since the previous sample.
    HostListenDrops {
        overflows: u64,
        drops: u64,
        syncookies_sent: u64,
    },
    /// File descriptors of one process (sampled); the history keeps the fullest per comm.
    ProcessFds {
        comm: String,
        pid: u32,
        open_fds: u32,
        limit: u32,
    },
    /// Connections one process holds to a service (sampled); the history keeps, per comm and
    /// service, the process holding connections to the most distinct servers.
    ProcessConnections {
        comm: String,
        pid: u32,
        service: String,
        /// Distinct servers of the service this process is connected to.
        distinct_servers: u32,
        connections: u32,
    },
    /// Open connections from one process name to one server (sampled gauge, for the edge table).
    EdgeConnections {
        service: String,
        server: String,
        role: Role,
        comm: String,
        open: u32,
    },
    /// A syscall failed with EMFILE or ENFILE.
    FdExhausted {
        comm: String,
        syscall: String,
        errno: String,
    },
    /// The same key was sent to two different servers of a service within the decoder's window.
    KeySplit {
        service: String,
        key_hash: u64,
        /// The key's first split in the routing window: what counts distinct split keys.
        new_key: bool,
        servers: [String; 2],
        /// The processes that sent the key to each server, when known.
        comms: [Option<String>; 2],
        /// Both were one process (one pid): see [`crate::keystats::KeySplit::one_process`].
        one_process: bool,
    },
    /// Events the agent lost (ring buffer or map full): the history is incomplete.
    EventsLost { count: u64 },
}

/// Converts a tracking observation into a fact, naming services by their id in `services`.
/// Observations without a fact (adoptions, table-full notices) and unknown service ids give
/// `None`. Connection observations carry no process, so `comm` is `None` there.
pub fn fact_from_observation(
    observation: &crate::conn::tracking::Observation,
    services: &crate::services::Services,
) -> Option<Fact> {
    use crate::conn::tracking::Observation;
    let name = |id: usize| services.name(id).map(str::to_string);
    let seconds = |ns: u64| ns as f64 / 1e9;
    Some(match observation {
        Observation::ConnectionOpened { endpoint, .. } => Fact::ConnectionOpened {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role,
            comm: None,
        },
        Observation::ConnectionClosed {
            endpoint,
            closed_by,
            duration_ns,
            idle_before_close_ns,
            ..
        } => Fact::ConnectionClosed {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role,
            comm: None,
            closed_by: *closed_by,
            idle_before_close_s: idle_before_close_ns.map(seconds),
            duration_s: duration_ns.map(seconds),
        },
        Observation::DeadSocketWrite(write) => Fact::DeadWrite {
            service: name(write.endpoint.service)?,
            server: write.endpoint.server.to_string(),
            role: write.endpoint.role,
            comm: write.comm.clone(),
            command: write.command.map(str::to_string),
            outcome: write.outcome,
        },
        Observation::ConnectFailed { endpoint, reason } => Fact::ConnectFailure {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            reason: *reason,
        },
        Observation::Retransmit { endpoint, kind } => Fact::Retransmit {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role,
            kind: *kind,
        },
        Observation::Reset {
            endpoint,
            direction,
        } => Fact::Reset {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role,
            direction: *direction,
        },
        Observation::SynSent { service } => Fact::Syns {
            service: name(*service)?,
            direction: SynDirection::Out,
            count: 1,
        },
        Observation::HandshakeCompleted { service } => Fact::Syns {
            service: name(*service)?,
            direction: SynDirection::In,
            count: 1,
        },
        Observation::FdExhausted {
            comm,
            syscall,
            errno,
        } => Fact::FdExhausted {
            comm: comm.clone(),
            syscall: (*syscall).to_string(),
            errno: errno_name(*errno),
        },
        Observation::ConnectionAdopted { .. }
        | Observation::ConnectionForgotten { .. }
        | Observation::ConnectionMoved { .. }
        | Observation::TrackingDropped => return None,
    })
}

fn errno_name(errno: i64) -> String {
    match errno.unsigned_abs() {
        23 => "ENFILE".to_string(),
        24 => "EMFILE".to_string(),
        other => format!("E{other}"),
    }
}
