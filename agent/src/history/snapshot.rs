//! The serialisable copy of a time range of history: what the daemon sends over the control
//! socket and what the detectors read. Labels are stored once in `labels`; rows refer to them by
//! index. High-volume rows (requests, latency) serialise as JSON arrays to stay compact.
//!
//! Everything here may come from another process, so lookups are total: an index out of range
//! reads as "other", never a panic.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::latency::LatencyHistogram;
use crate::model::{ClosedBy, DeadWriteOutcome, Role, Status, SynDirection};

pub const SNAPSHOT_VERSION: u32 = 1;

/// An index into [`HistorySnapshot::labels`].
pub type Label = u32;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistorySnapshot {
    pub version: u32,
    /// First second covered, inclusive (unix seconds).
    pub start_s: u64,
    /// Last second covered, inclusive; seconds in range without a row had no facts.
    pub end_s: u64,
    pub labels: Vec<String>,
    /// Seconds that had facts, ascending.
    pub seconds: Vec<SecondSnapshot>,
    pub stats: HistoryStats,
    /// The latest slab-fit estimate per local memcached (not per second).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slab_fit: Vec<crate::sizes::slab::SlabFitReport>,
    /// Memcache-queue flow per queue since the agent started (not per second).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<crate::queues::flow::QueueReport>,
}

/// What the history could not keep (cumulative since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStats {
    /// Facts for seconds already evicted (older than the capacity).
    pub late_facts: u64,
    /// Facts dropped because their second had no room even for a folded row.
    pub overflow_facts: u64,
    /// Label strings that found no room in the label table and became "other".
    pub folded_labels: u64,
    /// Facts whose second ran out of rows and were counted under "other" labels instead.
    pub folded_rows: u64,
    /// Events the agent itself lost (reported through `Fact::EventsLost`).
    pub events_lost: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecondSnapshot {
    /// Unix second.
    pub t: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<LatencyRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opened: Vec<OpenedRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed: Vec<ClosedRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_writes: Vec<DeadWriteRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub syns: Vec<SynRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen_queues: Vec<ListenQueueRow>,
    #[serde(default, skip_serializing_if = "HostListen::is_zero")]
    pub host_listen: HostListen,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fds: Vec<FdRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub process_connections: Vec<ProcessConnectionsRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge_connections: Vec<EdgeConnectionsRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fd_errors: Vec<FdErrorRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_splits: Vec<KeySplitRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_replies: Vec<ErrorReplyRow>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events_lost: u64,
    /// Facts of this second that were dropped for lack of room.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overflow: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

type RequestTuple = (Label, Label, Role, Label, Label, Status, u32);

/// Requests of one (service, server, role, process, command, status) in one second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RequestTuple", into = "RequestTuple")]
pub struct RequestRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    pub command: Label,
    pub status: Status,
    pub count: u32,
}

impl From<RequestTuple> for RequestRow {
    fn from((service, server, role, comm, command, status, count): RequestTuple) -> Self {
        RequestRow {
            service,
            server,
            role,
            comm,
            command,
            status,
            count,
        }
    }
}

impl From<RequestRow> for RequestTuple {
    fn from(r: RequestRow) -> Self {
        (
            r.service, r.server, r.role, r.comm, r.command, r.status, r.count,
        )
    }
}

type LatencyTuple = (Label, Label, Role, Label, Vec<u32>);

/// Latency histogram of one (service, server, role, process) in one second. `cells` are packed
/// `bucket << 26 | count` (see `history::latency`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LatencyTuple", into = "LatencyTuple")]
pub struct LatencyRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    pub cells: Vec<u32>,
}

impl From<LatencyTuple> for LatencyRow {
    fn from((service, server, role, comm, cells): LatencyTuple) -> Self {
        LatencyRow {
            service,
            server,
            role,
            comm,
            cells,
        }
    }
}

impl From<LatencyRow> for LatencyTuple {
    fn from(r: LatencyRow) -> Self {
        (r.service, r.server, r.role, r.comm, r.cells)
    }
}

impl LatencyRow {
    pub fn histogram(&self) -> LatencyHistogram {
        let mut hist = LatencyHistogram::default();
        hist.add_cells(&self.cells);
        hist
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenedRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    pub closed_by: ClosedBy,
    pub count: u32,
    /// Closes of connections that lived less than a second (churn).
    pub short_lived: u32,
    /// Up to a few idle-before-close samples in milliseconds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle_ms: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadWriteRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    /// The command written; the empty label when the decoder did not see it.
    pub command: Label,
    pub outcome: DeadWriteOutcome,
    pub count: u32,
}

/// Error replies of one (service, server, role, status) in one second that said `text` (the
/// words after the error keyword, cut to plain words; "other" past the few kept per server).
/// `cells` are their latencies, packed as in [`LatencyRow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReplyRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub status: Status,
    pub text: Label,
    pub count: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<u32>,
}

/// TCP trouble on one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpEvent {
    RetransmitData,
    RetransmitSyn,
    RetransmitSynack,
    ResetSent,
    ResetReceived,
    ConnectRefused,
    ConnectTimeout,
    ConnectReset,
}

impl TcpEvent {
    pub fn is_retransmit(self) -> bool {
        matches!(
            self,
            TcpEvent::RetransmitData | TcpEvent::RetransmitSyn | TcpEvent::RetransmitSynack
        )
    }

    pub fn is_reset(self) -> bool {
        matches!(self, TcpEvent::ResetSent | TcpEvent::ResetReceived)
    }

    pub fn is_connect_failure(self) -> bool {
        matches!(
            self,
            TcpEvent::ConnectRefused | TcpEvent::ConnectTimeout | TcpEvent::ConnectReset
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub event: TcpEvent,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynRow {
    pub service: Label,
    pub direction: SynDirection,
    pub count: u32,
}

/// The fullest accept queue sample of a local listener in the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenQueueRow {
    pub service: Label,
    /// The listener's local address ("" from a daemon before it was kept).
    #[serde(default)]
    pub listener: Label,
    pub length: u32,
    pub limit: u32,
}

/// Host-wide /proc/net/netstat deltas in the second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostListen {
    pub overflows: u64,
    pub drops: u64,
    pub syncookies_sent: u64,
}

impl HostListen {
    pub fn is_zero(&self) -> bool {
        *self == HostListen::default()
    }
}

/// The fullest process of a comm in the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRow {
    pub comm: Label,
    pub pid: u32,
    pub open_fds: u32,
    pub limit: u32,
}

impl FdRow {
    pub fn ratio(&self) -> f64 {
        crate::model::fd_usage_ratio(u64::from(self.open_fds), u64::from(self.limit))
    }
}

/// The process of a comm connected to the most distinct servers of a service in the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConnectionsRow {
    pub comm: Label,
    pub service: Label,
    pub pid: u32,
    pub distinct_servers: u32,
    pub connections: u32,
}

/// The largest sampled count of open connections from a comm to a server in the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeConnectionsRow {
    pub service: Label,
    pub server: Label,
    pub role: Role,
    pub comm: Label,
    pub open: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdErrorRow {
    pub comm: Label,
    pub syscall: Label,
    pub errno: Label,
    pub count: u32,
}

/// Keys sent to both `servers` (by `comms`, when known) in the second, with a few key hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySplitRow {
    pub service: Label,
    pub servers: [Label; 2],
    pub comms: [Label; 2],
    /// Both sends were one process's (one pid), not two processes of these names.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_process: bool,
    /// Requests that went to the other server.
    pub count: u32,
    /// Of those, the first split of their key: distinct split keys.
    #[serde(default)]
    pub keys: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<u64>,
}

impl HistorySnapshot {
    pub fn empty(start_s: u64, end_s: u64) -> HistorySnapshot {
        HistorySnapshot {
            version: SNAPSHOT_VERSION,
            start_s,
            end_s,
            labels: vec![String::new(), super::interner::OTHER_LABEL.to_string()],
            seconds: Vec::new(),
            stats: HistoryStats::default(),
            slab_fit: Vec::new(),
            queues: Vec::new(),
        }
    }

    /// The label text; out-of-range indexes (a corrupt or foreign snapshot) read as "other".
    pub fn label(&self, id: Label) -> &str {
        self.labels
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or(super::interner::OTHER_LABEL)
    }

    /// Seconds covered, counting empty ones.
    pub fn span_seconds(&self) -> u64 {
        if self.end_s < self.start_s {
            0
        } else {
            self.end_s - self.start_s + 1
        }
    }

    /// Merges a later snapshot of the same history into this one: seconds present in `newer`
    /// replace ours (they may have received late facts since), older seconds of ours are kept.
    pub fn merge_newer(mut self, newer: HistorySnapshot) -> HistorySnapshot {
        let mut index: HashMap<String, Label> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i as Label))
            .collect();
        let mut remap = Vec::with_capacity(newer.labels.len());
        for label in &newer.labels {
            let id = *index.entry(label.clone()).or_insert_with(|| {
                self.labels.push(label.clone());
                (self.labels.len() - 1) as Label
            });
            remap.push(id);
        }
        let map = |id: Label| {
            remap
                .get(id as usize)
                .copied()
                .unwrap_or(super::interner::OTHER as Label)
        };
        let mut seconds: std::collections::BTreeMap<u64, SecondSnapshot> =
            self.seconds.into_iter().map(|s| (s.t, s)).collect();
        if newer.start_s <= newer.end_s {
            // Seconds inside the newer range that it does not list were empty by then.
            seconds.retain(|t, _| *t < newer.start_s || *t > newer.end_s);
        }
        for mut second in newer.seconds {
            second.remap_labels(&map);
            seconds.insert(second.t, second);
        }
        HistorySnapshot {
            version: SNAPSHOT_VERSION,
            start_s: self.start_s.min(newer.start_s),
            end_s: self.end_s.max(newer.end_s),
            labels: self.labels,
            seconds: seconds.into_values().collect(),
            stats: newer.stats,
            slab_fit: newer.slab_fit,
            queues: newer.queues,
        }
    }
}

impl SecondSnapshot {
    pub(crate) fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.latency.is_empty()
            && self.opened.is_empty()
            && self.closed.is_empty()
            && self.dead_writes.is_empty()
            && self.tcp.is_empty()
            && self.syns.is_empty()
            && self.listen_queues.is_empty()
            && self.host_listen.is_zero()
            && self.fds.is_empty()
            && self.process_connections.is_empty()
            && self.edge_connections.is_empty()
            && self.fd_errors.is_empty()
            && self.key_splits.is_empty()
            && self.error_replies.is_empty()
            && self.events_lost == 0
            && self.overflow == 0
    }

    fn remap_labels(&mut self, map: &dyn Fn(Label) -> Label) {
        for r in &mut self.requests {
            (r.service, r.server, r.comm, r.command) =
                (map(r.service), map(r.server), map(r.comm), map(r.command));
        }
        for r in &mut self.latency {
            (r.service, r.server, r.comm) = (map(r.service), map(r.server), map(r.comm));
        }
        for r in &mut self.opened {
            (r.service, r.server, r.comm) = (map(r.service), map(r.server), map(r.comm));
        }
        for r in &mut self.closed {
            (r.service, r.server, r.comm) = (map(r.service), map(r.server), map(r.comm));
        }
        for r in &mut self.dead_writes {
            (r.service, r.server, r.comm, r.command) =
                (map(r.service), map(r.server), map(r.comm), map(r.command));
        }
        for r in &mut self.tcp {
            (r.service, r.server) = (map(r.service), map(r.server));
        }
        for r in &mut self.syns {
            r.service = map(r.service);
        }
        for r in &mut self.listen_queues {
            (r.service, r.listener) = (map(r.service), map(r.listener));
        }
        for r in &mut self.fds {
            r.comm = map(r.comm);
        }
        for r in &mut self.process_connections {
            (r.comm, r.service) = (map(r.comm), map(r.service));
        }
        for r in &mut self.edge_connections {
            (r.service, r.server, r.comm) = (map(r.service), map(r.server), map(r.comm));
        }
        for r in &mut self.fd_errors {
            (r.comm, r.syscall, r.errno) = (map(r.comm), map(r.syscall), map(r.errno));
        }
        for r in &mut self.key_splits {
            r.service = map(r.service);
            r.servers = [map(r.servers[0]), map(r.servers[1])];
            r.comms = [map(r.comms[0]), map(r.comms[1])];
        }
        for r in &mut self.error_replies {
            (r.service, r.server, r.text) = (map(r.service), map(r.server), map(r.text));
        }
    }
}

/// Builds snapshot label tables from interned ids, keeping only the labels rows use.
pub(crate) struct LabelTable<'a> {
    interner: &'a super::interner::Interner,
    ids: HashMap<super::interner::LabelId, Label>,
    /// The error-text table and its ids' labels (texts share the snapshot's one label list).
    texts: &'a super::interner::Interner,
    text_ids: HashMap<super::interner::LabelId, Label>,
    pub labels: Vec<String>,
}

impl<'a> LabelTable<'a> {
    pub(crate) fn new(
        interner: &'a super::interner::Interner,
        texts: &'a super::interner::Interner,
    ) -> Self {
        let mut table = LabelTable {
            interner,
            ids: HashMap::new(),
            texts,
            text_ids: HashMap::new(),
            labels: Vec::new(),
        };
        // The reserved ids keep their indexes so "unknown" is 0 and "other" 1 everywhere.
        table.id(super::interner::UNKNOWN);
        table.id(super::interner::OTHER);
        table
    }

    pub(crate) fn id(&mut self, id: super::interner::LabelId) -> Label {
        if let Some(&label) = self.ids.get(&id) {
            return label;
        }
        let label = self.labels.len() as Label;
        self.labels.push(self.interner.resolve(id).to_string());
        self.ids.insert(id, label);
        label
    }

    /// The label of an error-text id; the reserved ids are the label table's own.
    pub(crate) fn text(&mut self, id: super::interner::LabelId) -> Label {
        if id <= super::interner::OTHER {
            return self.id(id);
        }
        if let Some(&label) = self.text_ids.get(&id) {
            return label;
        }
        let label = self.labels.len() as Label;
        self.labels.push(self.texts.resolve(id).to_string());
        self.text_ids.insert(id, label);
        label
    }
}
