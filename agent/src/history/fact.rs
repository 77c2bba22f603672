//! The history's input vocabulary. `Fact`s are owned and plain so the pipeline can build them
//! from tracking observations, decoded requests and procfs samples without sharing types with
//! the history's storage, which interns every string into a small id.

use serde::{Deserialize, Serialize};

/// Which side of the connection this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Server,
}

/// Which side closed a connection first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    Local,
    Peer,
    Reset,
}

/// What the application saw after writing onto a dead connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadWriteOutcome {
    Eof,
    Reset,
    Unnoticed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetransmitKind {
    Data,
    Syn,
    Synack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetDirection {
    Sent,
    Received,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFailureReason {
    Refused,
    Timeout,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynDirection {
    /// Connection attempts from this host.
    Out,
    /// Connection attempts at a local watched listener: handshakes it completed, and SYNs and
    /// handshakes it refused because a queue was full.
    In,
}

/// The outcome of one memcache request, mirroring the decoder's status words so the pipeline
/// can convert with [`RequestStatus::from_label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Hit,
    Miss,
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    Error,
    ClientError,
    ServerError,
    Noreply,
    /// No response within the decoder's timeout.
    Timeout,
    Unknown,
    /// The connection ended before the response arrived.
    Unanswered,
}

impl RequestStatus {
    pub const ALL: [RequestStatus; 16] = [
        RequestStatus::Hit,
        RequestStatus::Miss,
        RequestStatus::Stored,
        RequestStatus::NotStored,
        RequestStatus::Exists,
        RequestStatus::NotFound,
        RequestStatus::Deleted,
        RequestStatus::Touched,
        RequestStatus::Ok,
        RequestStatus::Error,
        RequestStatus::ClientError,
        RequestStatus::ServerError,
        RequestStatus::Noreply,
        RequestStatus::Timeout,
        RequestStatus::Unknown,
        RequestStatus::Unanswered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Hit => "hit",
            RequestStatus::Miss => "miss",
            RequestStatus::Stored => "stored",
            RequestStatus::NotStored => "not_stored",
            RequestStatus::Exists => "exists",
            RequestStatus::NotFound => "not_found",
            RequestStatus::Deleted => "deleted",
            RequestStatus::Touched => "touched",
            RequestStatus::Ok => "ok",
            RequestStatus::Error => "error",
            RequestStatus::ClientError => "client_error",
            RequestStatus::ServerError => "server_error",
            RequestStatus::Noreply => "noreply",
            RequestStatus::Timeout => "timeout",
            RequestStatus::Unknown => "unknown",
            RequestStatus::Unanswered => "unanswered",
        }
    }

    /// The decoder's label for a status (`Status::as_str`); anything unknown is `Unknown`.
    pub fn from_label(label: &str) -> RequestStatus {
        RequestStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == label)
            .unwrap_or(RequestStatus::Unknown)
    }

    /// A lookup that found or missed its key: the denominator of the hit ratio.
    pub fn is_lookup(self) -> bool {
        matches!(self, RequestStatus::Hit | RequestStatus::Miss)
    }

    /// The server never answered: what a hung or unreachable server looks like.
    pub fn is_no_answer(self) -> bool {
        matches!(self, RequestStatus::Timeout | RequestStatus::Unanswered)
    }

    /// The request failed (server error or no answer); client errors are the client's bug and
    /// count too, since the application saw a failure.
    pub fn is_failure(self) -> bool {
        self.is_no_answer()
            || matches!(
                self,
                RequestStatus::Error | RequestStatus::ClientError | RequestStatus::ServerError
            )
    }

    /// The server produced a response (anything but no answer, noreply or unknown).
    pub fn is_answer(self) -> bool {
        !self.is_no_answer() && !matches!(self, RequestStatus::Noreply | RequestStatus::Unknown)
    }
}

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
        status: RequestStatus,
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
    /// Accept backlog of a local listener (sampled).
    ListenQueue {
        service: String,
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
        servers: [String; 2],
        /// The processes that sent the key to each server, when known.
        comms: [Option<String>; 2],
    },
    /// Events the agent lost (ring buffer or map full): the history is incomplete.
    EventsLost { count: u64 },
}

impl From<crate::events::Role> for Role {
    fn from(role: crate::events::Role) -> Role {
        match role {
            crate::events::Role::Client => Role::Client,
            crate::events::Role::Server => Role::Server,
        }
    }
}

impl From<crate::tracking::ClosedBy> for ClosedBy {
    fn from(closed_by: crate::tracking::ClosedBy) -> ClosedBy {
        match closed_by {
            crate::tracking::ClosedBy::Local => ClosedBy::Local,
            crate::tracking::ClosedBy::Peer => ClosedBy::Peer,
            crate::tracking::ClosedBy::Reset => ClosedBy::Reset,
        }
    }
}

impl From<crate::dead_writes::Outcome> for DeadWriteOutcome {
    fn from(outcome: crate::dead_writes::Outcome) -> DeadWriteOutcome {
        match outcome {
            crate::dead_writes::Outcome::Eof => DeadWriteOutcome::Eof,
            crate::dead_writes::Outcome::Reset => DeadWriteOutcome::Reset,
            crate::dead_writes::Outcome::Unnoticed => DeadWriteOutcome::Unnoticed,
        }
    }
}

impl From<crate::tracking::RetransmitKind> for RetransmitKind {
    fn from(kind: crate::tracking::RetransmitKind) -> RetransmitKind {
        match kind {
            crate::tracking::RetransmitKind::Data => RetransmitKind::Data,
            crate::tracking::RetransmitKind::Syn => RetransmitKind::Syn,
            crate::tracking::RetransmitKind::SynAck => RetransmitKind::Synack,
        }
    }
}

impl From<crate::tracking::ResetDirection> for ResetDirection {
    fn from(direction: crate::tracking::ResetDirection) -> ResetDirection {
        match direction {
            crate::tracking::ResetDirection::Sent => ResetDirection::Sent,
            crate::tracking::ResetDirection::Received => ResetDirection::Received,
        }
    }
}

impl From<crate::tracking::ConnectFailure> for ConnectFailureReason {
    fn from(reason: crate::tracking::ConnectFailure) -> ConnectFailureReason {
        match reason {
            crate::tracking::ConnectFailure::Refused => ConnectFailureReason::Refused,
            crate::tracking::ConnectFailure::Timeout => ConnectFailureReason::Timeout,
        }
    }
}

/// Converts a tracking observation into a fact, naming services by their id in `services`.
/// Observations without a fact (adoptions, table-full notices) and unknown service ids give
/// `None`. Connection observations carry no process, so `comm` is `None` there.
pub fn fact_from_observation(
    observation: &crate::tracking::Observation,
    services: &crate::services::Services,
) -> Option<Fact> {
    use crate::tracking::Observation;
    let name = |id: usize| services.name(id).map(str::to_string);
    let seconds = |ns: u64| ns as f64 / 1e9;
    Some(match observation {
        Observation::ConnectionOpened { endpoint, .. } => Fact::ConnectionOpened {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role.into(),
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
            role: endpoint.role.into(),
            comm: None,
            closed_by: (*closed_by).into(),
            idle_before_close_s: idle_before_close_ns.map(seconds),
            duration_s: duration_ns.map(seconds),
        },
        Observation::DeadSocketWrite(write) => Fact::DeadWrite {
            service: name(write.endpoint.service)?,
            server: write.endpoint.server.to_string(),
            role: write.endpoint.role.into(),
            comm: write.comm.clone(),
            command: write.command.map(str::to_string),
            outcome: write.outcome.into(),
        },
        Observation::ConnectFailed { endpoint, reason } => Fact::ConnectFailure {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            reason: (*reason).into(),
        },
        Observation::Retransmit { endpoint, kind } => Fact::Retransmit {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role.into(),
            kind: (*kind).into(),
        },
        Observation::Reset {
            endpoint,
            direction,
        } => Fact::Reset {
            service: name(endpoint.service)?,
            server: endpoint.server.to_string(),
            role: endpoint.role.into(),
            direction: (*direction).into(),
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
        Observation::ConnectionAdopted { .. } | Observation::TrackingDropped => return None,
    })
}

fn errno_name(errno: i64) -> String {
    match errno.unsigned_abs() {
        23 => "ENFILE".to_string(),
        24 => "EMFILE".to_string(),
        other => format!("E{other}"),
    }
}
