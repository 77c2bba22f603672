//! A bounded per-second history of what the agent observed, for `cacheprobe diagnose`.
//!
//! Facts are aggregated into one bucket per second: counters keyed by interned labels, a small
//! latency histogram per (service, server, role, process), a few idle-before-close samples per
//! close row. Memory is bounded three ways, all set by [`HistoryLimits`]:
//! - time: buckets older than `capacity_seconds` are evicted;
//! - rows: a second holds at most `max_rows_per_second` rows (plus a small reserve of rows whose
//!   process/server/command are folded into "other"); latency histograms are capped separately
//!   by `max_latency_series_per_second`; facts beyond that are only counted (`overflow`);
//! - labels: at most `max_labels` distinct strings of at most 128 bytes; when full, ids no
//!   bucket uses any more are reclaimed, and only then do new strings fold into "other";
//! - error reply texts: their own table of 64 (never process or server names' room), at most
//!   4 per (service, server, role, status) and second and 16 rows a second, the rest "other".
//!
//! Seconds stay writable for [`OPEN_SECONDS`] (facts such as dead-write outcomes arrive a few
//! seconds late) and are then frozen into sorted boxed slices without hash-table slack.
//!
//! Measured with a counting allocator (`agent/tests/history_memory.rs`): 900 s of 10 servers x
//! 5 commands x 3 processes with hits and misses (300 request rows and 30 latency series per
//! second) take 5.2 MB, and [`History::heap_bytes`] agrees within 0.1%. A flood of distinct
//! labels (3000 new process/server/command names a second) stays at about 3 MB because rows
//! fold into "other". The hard bound at the default limits, every second full of the largest
//! rows and dense histograms, is [`History::worst_case_bytes`]: 88 MB for 900 s (3.5 MB of it
//! error-text rows).

mod apply;
mod fact;
pub mod interner;
pub mod latency;
mod sample;
mod second;
mod series;
mod sink;
pub mod snapshot;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::{
    ClosedBy, ConnectFailureReason, DeadWriteOutcome, ResetDirection, RetransmitKind, Role, Status,
    SynDirection,
};
pub use fact::{fact_from_observation, Fact};
use interner::{Interner, LabelId, OTHER, UNKNOWN};
use latency::SecondHistogram;
pub use sample::{facts_from_sample, listener_drop_facts};
use series::{RowBudget, RowKey, RowValue, Series};
pub use sink::{unix_second_of_monotonic, HistorySink};
use snapshot::*;
pub use snapshot::{HistorySnapshot, HistoryStats, TcpEvent};

/// Seconds behind the newest one that still take facts directly (later ones thaw the bucket).
pub const OPEN_SECONDS: u64 = 10;
/// Idle-before-close samples kept per close row and second.
const IDLE_SAMPLES: usize = 4;
/// Key hashes kept per key-split row and second.
const KEY_SPLIT_EXAMPLES: usize = 2;
/// Connections shorter than this count as churn.
const SHORT_LIVED_S: f64 = 1.0;
/// Distinct error reply texts the history holds at once (its own small table, so a server
/// inventing texts cannot crowd process and server names out of the label table); when full
/// and none can be reclaimed, new texts count as "other".
const MAX_ERROR_TEXTS: usize = 64;
/// Distinct texts per (service, server, role, status) and second; more count as "other".
const ERROR_TEXTS_PER_SERVER: usize = 4;
/// Error-text rows per second, each with its replies' latency histogram.
/// A proxy with a few texts at both its ends takes about 8; each row may hold a dense
/// histogram, so this bounds the worst case (about 3.5 MB of 900 s).
const MAX_ERROR_ROWS_PER_SECOND: u32 = 16;
/// Folded error-text rows (server and text "other") a second may add past that.
const ERROR_ROWS_RESERVE: u32 = 4;

pub const DEFAULT_CAPACITY_SECONDS: u32 = 900;

/// Bounds of the history. Deserialised from the config (`[history]`), unknown keys rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryLimits {
    /// Seconds of history kept (1 s buckets). At least 900 for the 15 minutes diagnose expects.
    pub capacity_seconds: u32,
    /// Rows per second across all counter families.
    pub max_rows_per_second: u32,
    /// Latency histograms per second (one per service, server, role and process).
    pub max_latency_series_per_second: u32,
    /// Folded ("other") rows a full second may still add, so floods keep their counts.
    pub fold_reserve: u32,
    /// Distinct label strings (service, server, process, command, ...).
    pub max_labels: u32,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            capacity_seconds: DEFAULT_CAPACITY_SECONDS,
            max_rows_per_second: 1024,
            max_latency_series_per_second: 128,
            fold_reserve: 64,
            max_labels: 4096,
        }
    }
}

impl HistoryLimits {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.capacity_seconds) {
            return Err(format!(
                "history.capacity_seconds = {} must be in 1-86400",
                self.capacity_seconds
            ));
        }
        if self.max_rows_per_second == 0 || self.max_rows_per_second > 1_000_000 {
            return Err("history.max_rows_per_second must be in 1-1000000".to_string());
        }
        if self.max_latency_series_per_second > self.max_rows_per_second {
            return Err(
                "history.max_latency_series_per_second must not exceed max_rows_per_second"
                    .to_string(),
            );
        }
        if !(16..=65_536).contains(&self.max_labels) {
            return Err("history.max_labels must be in 16-65536".to_string());
        }
        Ok(())
    }
}

/// A decoded request as [`History::record_request`] takes it: the strings of a
/// `Fact::Request`, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    pub service: &'a str,
    pub server: &'a str,
    pub role: Role,
    pub comm: Option<&'a str>,
    pub command: &'a str,
    pub status: Status,
    pub latency_us: Option<u32>,
    /// What an error reply said ([`crate::memcache::ErrorText`]), kept for error statuses.
    pub error_text: Option<&'a str>,
}

// ---- keys -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RequestKey {
    service: LabelId,
    server: LabelId,
    comm: LabelId,
    command: LabelId,
    role: Role,
    status: Status,
}

impl RowKey for RequestKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        for id in [self.service, self.server, self.comm, self.command] {
            mark(id);
        }
    }
    fn folded(&self) -> Self {
        RequestKey {
            server: OTHER,
            comm: OTHER,
            command: OTHER,
            ..*self
        }
    }
}

/// (service, server, comm, role): latency histograms, opens, edge connection gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    service: LabelId,
    server: LabelId,
    comm: LabelId,
    role: Role,
}

impl RowKey for EdgeKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        for id in [self.service, self.server, self.comm] {
            mark(id);
        }
    }
    fn folded(&self) -> Self {
        EdgeKey {
            server: OTHER,
            comm: OTHER,
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CloseKey {
    edge: EdgeKey,
    closed_by: ClosedBy,
}

impl RowKey for CloseKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        self.edge.label_ids(mark);
    }
    fn folded(&self) -> Self {
        CloseKey {
            edge: self.edge.folded(),
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct DeadWriteKey {
    edge: EdgeKey,
    command: LabelId,
    outcome: DeadWriteOutcome,
}

impl RowKey for DeadWriteKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        self.edge.label_ids(mark);
        mark(self.command);
    }
    fn folded(&self) -> Self {
        DeadWriteKey {
            edge: self.edge.folded(),
            command: OTHER,
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TcpKey {
    service: LabelId,
    server: LabelId,
    role: Role,
    event: TcpEvent,
}

impl RowKey for TcpKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        mark(self.service);
        mark(self.server);
    }
    fn folded(&self) -> Self {
        TcpKey {
            server: OTHER,
            ..*self
        }
    }
}

/// Keys made of up to three labels plus nothing else (syns, listen queues, fds, fd errors,
/// process connections); the tag keeps families apart when they share this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LabelsKey {
    labels: [LabelId; 3],
    tag: u8,
}

impl RowKey for LabelsKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        for id in self.labels {
            mark(id);
        }
    }
    fn folded(&self) -> Self {
        // The first label is the grouping one (service or comm); keep it.
        LabelsKey {
            labels: [self.labels[0], OTHER, OTHER],
            tag: self.tag,
        }
    }
}

/// Error replies of one (service, server, role, status) by what they said; `text` is an id in
/// the history's error-text table, not the label table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ErrorReplyKey {
    service: LabelId,
    server: LabelId,
    role: Role,
    status: Status,
    text: LabelId,
}

impl ErrorReplyKey {
    fn same_server(&self, other: &ErrorReplyKey) -> bool {
        (self.service, self.server, self.role, self.status)
            == (other.service, other.server, other.role, other.status)
    }
}

impl RowKey for ErrorReplyKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        mark(self.service);
        mark(self.server);
    }
    fn folded(&self) -> Self {
        ErrorReplyKey {
            server: OTHER,
            text: OTHER,
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct KeySplitKey {
    service: LabelId,
    servers: [LabelId; 2],
    comms: [LabelId; 2],
    one_process: bool,
}

impl RowKey for KeySplitKey {
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId)) {
        mark(self.service);
        self.servers
            .iter()
            .chain(self.comms.iter())
            .for_each(|&id| mark(id));
    }
    fn folded(&self) -> Self {
        KeySplitKey {
            service: self.service,
            servers: [OTHER, OTHER],
            comms: [OTHER, OTHER],
            // Folded rows mix senders: no longer known to be one process.
            one_process: false,
        }
    }
}

// ---- values -----------------------------------------------------------------------------

impl RowValue for SecondHistogram {
    fn freeze(&mut self) {
        SecondHistogram::freeze(self)
    }
    fn thaw(&mut self) {
        SecondHistogram::thaw(self)
    }
    fn heap_bytes(&self) -> usize {
        SecondHistogram::heap_bytes(self)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct CloseAgg {
    count: u32,
    short_lived: u32,
    idle_len: u8,
    idle_ms: [u32; IDLE_SAMPLES],
}
impl RowValue for CloseAgg {}

/// A sampled gauge keeping the sample with the largest `rank` in the second.
#[derive(Debug, Default, Clone, Copy)]
struct Gauge {
    rank: u64,
    a: u32,
    b: u32,
    c: u32,
}
impl RowValue for Gauge {}

impl Gauge {
    fn offer(&mut self, rank: u64, a: u32, b: u32, c: u32) {
        if rank >= self.rank {
            *self = Gauge { rank, a, b, c };
        }
    }
}

/// Error replies with one text, and how long they took (a proxy's timeout shows there).
#[derive(Debug, Default)]
struct ErrorReplyAgg {
    count: u32,
    latency: SecondHistogram,
}

impl RowValue for ErrorReplyAgg {
    fn freeze(&mut self) {
        self.latency.freeze()
    }
    fn thaw(&mut self) {
        self.latency.thaw()
    }
    fn heap_bytes(&self) -> usize {
        self.latency.heap_bytes()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct KeySplitAgg {
    count: u32,
    /// Splits that were their key's first: distinct split keys.
    keys: u32,
    examples_len: u8,
    examples: [u64; KEY_SPLIT_EXAMPLES],
}
impl RowValue for KeySplitAgg {}

// ---- buckets ----------------------------------------------------------------------------

const TAG_SYN_OUT: u8 = 0;
const TAG_SYN_IN: u8 = 1;

/// Families that most seconds never see, boxed so an ordinary second does not pay for them.
#[derive(Debug, Default)]
struct RareFamilies {
    opened: Series<EdgeKey, u32>,
    closed: Series<CloseKey, CloseAgg>,
    dead_writes: Series<DeadWriteKey, u32>,
    tcp: Series<TcpKey, u32>,
    /// [service, -, -], tag = direction.
    syns: Series<LabelsKey, u32>,
    /// [service, -, -]: length (rank), limit.
    listen_queues: Series<LabelsKey, Gauge>,
    /// [comm, -, -]: rank = fd ratio in ppm; a = pid, b = open, c = limit.
    fds: Series<LabelsKey, Gauge>,
    /// [comm, service, -]: rank = distinct servers; a = pid, b = distinct, c = connections.
    process_connections: Series<LabelsKey, Gauge>,
    edge_connections: Series<EdgeKey, Gauge>,
    /// [comm, syscall, errno].
    fd_errors: Series<LabelsKey, u32>,
    key_splits: Series<KeySplitKey, KeySplitAgg>,
    error_replies: Series<ErrorReplyKey, ErrorReplyAgg>,
    host_listen: HostListen,
    events_lost: u64,
}

macro_rules! for_each_rare_series {
    ($rare:expr, $series:ident => $body:expr) => {{
        let rare = $rare;
        {
            let $series = &mut rare.opened;
            $body;
        }
        {
            let $series = &mut rare.closed;
            $body;
        }
        {
            let $series = &mut rare.dead_writes;
            $body;
        }
        {
            let $series = &mut rare.tcp;
            $body;
        }
        {
            let $series = &mut rare.syns;
            $body;
        }
        {
            let $series = &mut rare.listen_queues;
            $body;
        }
        {
            let $series = &mut rare.fds;
            $body;
        }
        {
            let $series = &mut rare.process_connections;
            $body;
        }
        {
            let $series = &mut rare.edge_connections;
            $body;
        }
        {
            let $series = &mut rare.fd_errors;
            $body;
        }
        {
            let $series = &mut rare.key_splits;
            $body;
        }
        {
            let $series = &mut rare.error_replies;
            $body;
        }
    }};
}

#[derive(Debug)]
struct Bucket {
    second: u64,
    frozen: bool,
    rows: u32,
    latency_rows: u32,
    error_rows: u32,
    overflow: u64,
    requests: Series<RequestKey, u32>,
    latency: Series<EdgeKey, SecondHistogram>,
    rare: Option<Box<RareFamilies>>,
}

impl Bucket {
    fn new(second: u64) -> Bucket {
        Bucket {
            second,
            frozen: false,
            rows: 0,
            latency_rows: 0,
            error_rows: 0,
            overflow: 0,
            requests: Series::default(),
            latency: Series::default(),
            rare: None,
        }
    }

    fn freeze(&mut self) {
        self.requests.freeze();
        self.latency.freeze();
        if let Some(rare) = self.rare.as_deref_mut() {
            for_each_rare_series!(rare, series => series.freeze());
        }
        self.frozen = true;
    }

    fn mark_labels(&mut self, mark: &mut dyn FnMut(LabelId)) {
        self.requests.mark_labels(mark);
        self.latency.mark_labels(mark);
        if let Some(rare) = self.rare.as_deref_mut() {
            for_each_rare_series!(rare, series => series.mark_labels(mark));
        }
    }

    fn heap_bytes(&mut self) -> usize {
        let mut bytes = self.requests.heap_bytes() + self.latency.heap_bytes();
        if let Some(rare) = self.rare.as_deref_mut() {
            bytes += std::mem::size_of::<RareFamilies>();
            for_each_rare_series!(rare, series => bytes += series.heap_bytes());
        }
        bytes
    }
}

/// The per-second history. Not thread-safe by itself; the daemon shares it behind a mutex.
#[derive(Debug)]
pub struct History {
    limits: HistoryLimits,
    interner: Interner,
    /// Ascending by second; only seconds that had facts.
    buckets: VecDeque<Bucket>,
    /// First second observed (facts or `advance_to`).
    first: Option<u64>,
    /// Newest second observed.
    latest: Option<u64>,
    stats: HistoryStats,
    /// Second of the last label reclamation, so floods do not rescan the history per fact.
    last_reclaim: Option<u64>,
    /// What error replies said, ids for [`ErrorReplyKey::text`] (bounded apart from labels).
    error_texts: Interner,
    last_text_reclaim: Option<u64>,
    /// Hot keys and key splits as last published by the pipeline (bounded top-k).
    keys: crate::keystats::KeysReport,
    slab_fit: Vec<crate::sizes::slab::SlabFitReport>,
    queues: Vec<crate::queues::flow::QueueReport>,
}

impl History {
    /// `capacity_seconds` overrides `limits.capacity_seconds` (it is the one callers tune).
    pub fn new(capacity_seconds: u32, limits: HistoryLimits) -> History {
        let limits = HistoryLimits {
            capacity_seconds: capacity_seconds.max(1),
            max_labels: limits.max_labels.clamp(16, 65_536),
            ..limits
        };
        History {
            interner: Interner::new(limits.max_labels as usize),
            limits,
            buckets: VecDeque::new(),
            first: None,
            latest: None,
            stats: HistoryStats::default(),
            last_reclaim: None,
            error_texts: Interner::new(MAX_ERROR_TEXTS + 2),
            last_text_reclaim: None,
            keys: crate::keystats::KeysReport::default(),
            slab_fit: Vec::new(),
            queues: Vec::new(),
        }
    }

    pub fn limits(&self) -> &HistoryLimits {
        &self.limits
    }

    pub fn stats(&self) -> HistoryStats {
        HistoryStats {
            folded_labels: self.interner.folded,
            ..self.stats
        }
    }

    fn capacity(&self) -> u64 {
        self.limits.capacity_seconds as u64
    }

    /// Marks `unix_second` as observed even without facts (call it every tick), evicting
    /// seconds that fell out of the capacity and freezing those no longer open.
    pub fn advance_to(&mut self, unix_second: u64) {
        self.first.get_or_insert(unix_second);
        if self.latest.is_some_and(|latest| unix_second <= latest) {
            return;
        }
        self.latest = Some(unix_second);
        let capacity = self.capacity();
        while self
            .buckets
            .front()
            .is_some_and(|b| b.second + capacity <= unix_second)
        {
            self.buckets.pop_front();
        }
        for bucket in self.buckets.iter_mut() {
            if !bucket.frozen && bucket.second + OPEN_SECONDS <= unix_second {
                bucket.freeze();
            }
        }
    }

    /// Records a fact that happened in `unix_second`. Facts for evicted seconds are counted
    /// (`late_facts`) and dropped.
    pub fn record(&mut self, unix_second: u64, fact: Fact) {
        if !self.admit_second(unix_second) {
            return;
        }
        if let Fact::EventsLost { count } = fact {
            self.stats.events_lost = self.stats.events_lost.saturating_add(count);
        }
        let labels = self.intern_fact(&fact, unix_second);
        let index = self.open_bucket(unix_second);
        let limits = &self.limits;
        let bucket = &mut self.buckets[index];
        if !apply::apply(bucket, limits, fact, &labels) {
            bucket.overflow += 1;
            self.stats.overflow_facts += 1;
        }
    }

    /// [`History::record`] of a `Fact::Request` from borrowed strings: the daemon records one
    /// per decoded request, so this path interns without building an owned fact.
    pub fn record_request(&mut self, unix_second: u64, request: &RequestRecord<'_>) {
        if !self.admit_second(unix_second) {
            return;
        }
        let mut labels = [UNKNOWN; 4];
        self.intern_labels(
            &[
                Some(request.service),
                Some(request.server),
                request.comm,
                Some(request.command),
            ],
            unix_second,
            &mut labels,
        );
        let index = self.open_bucket(unix_second);
        let limits = &self.limits;
        let bucket = &mut self.buckets[index];
        let id = |i: usize| labels.get(i).copied().unwrap_or(OTHER);
        if !apply::request(
            bucket,
            limits,
            id,
            request.role,
            request.status,
            request.latency_us,
        ) {
            bucket.overflow += 1;
            self.stats.overflow_facts += 1;
            return;
        }
        if let Some(text) = request.error_text.filter(|_| request.status.is_error()) {
            let text = self.intern_error_text(text, unix_second);
            let key = ErrorReplyKey {
                service: labels[0],
                server: labels[1],
                role: request.role,
                status: request.status,
                text,
            };
            apply::error_reply(&mut self.buckets[index], key, request.latency_us);
        }
    }

    /// The error-text id of `text`; when the table is full, ids no second uses any more are
    /// reclaimed (at most once a second), else the text counts as "other".
    fn intern_error_text(&mut self, text: &str, second: u64) -> LabelId {
        if let Some(id) = self.error_texts.try_intern(text) {
            return id;
        }
        if self.last_text_reclaim != Some(second) {
            self.last_text_reclaim = Some(second);
            let mut in_use = vec![false; self.error_texts.slots()];
            for bucket in &self.buckets {
                let Some(rare) = bucket.rare.as_deref() else {
                    continue;
                };
                for (key, _) in rare.error_replies.iter() {
                    if let Some(slot) = in_use.get_mut(key.text as usize) {
                        *slot = true;
                    }
                }
            }
            self.error_texts.retain(&in_use);
        }
        self.error_texts.try_intern(text).unwrap_or(OTHER)
    }

    /// Moves time forward to `unix_second`; false (and counted) when that second was evicted.
    fn admit_second(&mut self, unix_second: u64) -> bool {
        self.advance_to(unix_second);
        let latest = self.latest.unwrap_or(unix_second);
        if unix_second + self.capacity() <= latest {
            self.stats.late_facts += 1;
            return false;
        }
        if self.first.is_some_and(|first| unix_second < first) {
            self.first = Some(unix_second);
        }
        true
    }

    /// The index of the bucket of `second`, created and thawed as needed.
    fn open_bucket(&mut self, second: u64) -> usize {
        let index = self.bucket_index(second);
        // A late fact for a frozen second reopens it; the next advance freezes it again.
        self.buckets[index].frozen = false;
        index
    }

    fn bucket_index(&mut self, second: u64) -> usize {
        // Facts nearly always go to the newest second.
        if self.buckets.back().is_some_and(|b| b.second == second) {
            return self.buckets.len() - 1;
        }
        match self.buckets.binary_search_by(|b| b.second.cmp(&second)) {
            Ok(index) => index,
            Err(index) => {
                self.buckets.insert(index, Bucket::new(second));
                index
            }
        }
    }

    /// Interns the fact's strings in order; reclaims unused ids at most once a second when the
    /// table is full. The fact's own earlier ids are pinned so reclaiming cannot free them.
    fn intern_fact(&mut self, fact: &Fact, second: u64) -> Vec<LabelId> {
        let strings = apply::fact_strings(fact);
        let mut ids = vec![UNKNOWN; strings.len()];
        self.intern_labels(&strings, second, &mut ids);
        ids
    }

    /// Interns `strings` into `ids` (same length), in order, as [`History::intern_fact`].
    fn intern_labels(&mut self, strings: &[Option<&str>], second: u64, ids: &mut [LabelId]) {
        for (index, label) in strings.iter().enumerate() {
            let id = match label {
                None => UNKNOWN,
                Some(label) => match self.interner.try_intern(label) {
                    Some(id) => id,
                    None => {
                        if self.last_reclaim != Some(second) {
                            self.last_reclaim = Some(second);
                            self.reclaim_labels(&ids[..index]);
                        }
                        self.interner.try_intern(label).unwrap_or_else(|| {
                            self.interner.folded += 1;
                            OTHER
                        })
                    }
                },
            };
            if let Some(slot) = ids.get_mut(index) {
                *slot = id;
            }
        }
    }

    fn reclaim_labels(&mut self, pinned: &[LabelId]) {
        let mut in_use = vec![false; self.interner.slots()];
        let mut mark = |id: LabelId| {
            if let Some(slot) = in_use.get_mut(id as usize) {
                *slot = true;
            }
        };
        for &id in pinned {
            mark(id);
        }
        for bucket in self.buckets.iter_mut() {
            bucket.mark_labels(&mut mark);
        }
        self.interner.retain(&in_use);
    }

    /// Approximate heap bytes held (bucket rows and tables, histograms, the label table).
    pub fn heap_bytes(&mut self) -> usize {
        let buckets: usize = self.buckets.iter_mut().map(Bucket::heap_bytes).sum();
        buckets
            + self.buckets.capacity() * std::mem::size_of::<Bucket>()
            + self.interner.heap_bytes()
            + self.error_texts.heap_bytes()
    }

    /// An upper bound of [`History::heap_bytes`] for these limits: every second full of the
    /// largest rows, every latency series dense, every label at its maximum length.
    pub fn worst_case_bytes(limits: &HistoryLimits) -> usize {
        let rows = (limits.max_rows_per_second + limits.fold_reserve) as usize;
        let latency = (limits.max_latency_series_per_second + limits.fold_reserve) as usize;
        let largest_row = [
            std::mem::size_of::<(RequestKey, u32)>(),
            std::mem::size_of::<(CloseKey, CloseAgg)>(),
            std::mem::size_of::<(KeySplitKey, KeySplitAgg)>(),
            std::mem::size_of::<(LabelsKey, Gauge)>(),
            std::mem::size_of::<(EdgeKey, Gauge)>(),
            std::mem::size_of::<(DeadWriteKey, u32)>(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        // Frozen tables are exact; open ones (OPEN_SECONDS of them) carry hash-table slack.
        let error_rows = (MAX_ERROR_ROWS_PER_SECOND + ERROR_ROWS_RESERVE) as usize;
        let per_second = rows * largest_row
            + latency * (std::mem::size_of::<(EdgeKey, SecondHistogram)>() + latency::BUCKETS * 4)
            + error_rows
                * (std::mem::size_of::<(ErrorReplyKey, ErrorReplyAgg)>() + latency::BUCKETS * 4)
            + std::mem::size_of::<Bucket>()
            + std::mem::size_of::<RareFamilies>();
        let open_slack =
            OPEN_SECONDS as usize * 2 * (rows * (largest_row + 1) + (latency + error_rows) * 40);
        let label_bytes = 2 * interner::MAX_LABEL_BYTES + 2 * 16 + 24 + 2 + 2;
        let labels = (limits.max_labels as usize + MAX_ERROR_TEXTS + 2) * label_bytes;
        limits.capacity_seconds as usize * per_second + open_slack + labels
    }

    /// Copies every second from `since_unix_s` on (clamped to what the history covers).
    /// Replaces the published hot keys and key splits.
    pub fn set_keys(&mut self, keys: crate::keystats::KeysReport) {
        self.keys = keys;
    }

    /// Replaces the published slab-fit estimates (see [`crate::sizes::slab`]).
    pub fn set_slab_fit(&mut self, reports: Vec<crate::sizes::slab::SlabFitReport>) {
        self.slab_fit = reports;
    }

    /// Replaces the published queue flow (see [`crate::queues::flow`]).
    pub fn set_queues(&mut self, reports: Vec<crate::queues::flow::QueueReport>) {
        self.queues = reports;
    }

    pub fn keys(&self) -> &crate::keystats::KeysReport {
        &self.keys
    }

    pub fn snapshot(&self, since_unix_s: u64) -> HistorySnapshot {
        let (Some(first), Some(latest)) = (self.first, self.latest) else {
            return HistorySnapshot::empty(since_unix_s, since_unix_s.saturating_sub(1));
        };
        let oldest_kept = (latest + 1).saturating_sub(self.capacity());
        let start = since_unix_s.max(first).max(oldest_kept);
        let mut table = LabelTable::new(&self.interner, &self.error_texts);
        let mut seconds = Vec::new();
        for bucket in self.buckets.iter().filter(|b| b.second >= start) {
            let second = second::snapshot_second(bucket, &mut table);
            if !second.is_empty() {
                seconds.push(second);
            }
        }
        HistorySnapshot {
            version: snapshot::SNAPSHOT_VERSION,
            start_s: start,
            end_s: latest.max(start.saturating_sub(1)),
            labels: table.labels,
            seconds,
            stats: self.stats(),
            slab_fit: self.slab_fit.clone(),
            queues: self.queues.clone(),
        }
    }
}
