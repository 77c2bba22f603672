//! The rows `cacheprobe top` shows, computed from a history snapshot, the daemon's counters and
//! its hot keys: pure functions, so rates, ratios and windows are unit-tested.

use std::collections::BTreeMap;

use crate::{
    diagnose::{DiagnoseThresholds, Severity},
    history::{latency::LatencyHistogram, snapshot::SecondSnapshot, HistorySnapshot},
    keystats::{HotKey, KeyDisplay, KeysReport},
    memcache::QueueOpKind,
    model::Role,
};

use super::counters::Counters;

/// Seconds of the sparklines and of the "last minute" counts.
pub const MINUTE_S: u64 = 60;

/// One row per (service, server, role).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRow {
    pub service: String,
    pub server: String,
    pub role: Role,
    pub requests_per_s: f64,
    /// Hits over hits and misses in the rate window; None without lookups.
    pub hit_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// With no answer in the rate window (no p99) after answers earlier in the last minute:
    /// seconds since the last second that had one. A stalled server reads as its stall's age,
    /// not as a blank. (Requests still waiting are not recorded until they finish.)
    pub unanswered_for_s: Option<u64>,
    /// Failed requests (error replies, timeouts, no answer) per second in the rate window.
    pub errors_per_s: f64,
    /// Requests that got no answer in the last minute.
    pub timeouts: u64,
    /// Writes onto connections the peer had closed, in the last minute.
    pub dead_writes: u64,
    /// TCP retransmits in the last minute.
    pub retransmits: u64,
    /// Open connections (the daemon's gauge), when known.
    pub connections: Option<u64>,
    pub bytes_in_per_s: Option<f64>,
    pub bytes_out_per_s: Option<f64>,
    /// Requests in each of the last [`MINUTE_S`] seconds, oldest first.
    pub requests_spark: Vec<u64>,
    /// p99 latency in microseconds in each of the last [`MINUTE_S`] seconds (0: no requests).
    pub p99_spark: Vec<u64>,
    /// Per second of `requests_spark`, whether it is a backlog ([`backlog_seconds`]): a server
    /// end reading at once what its clients sent over the silence before. Empty: none.
    pub backlog: Vec<bool>,
}

/// One row per process name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessRow {
    pub comm: String,
    pub open_fds: Option<u64>,
    pub fd_limit: Option<u64>,
    /// Watched connections held, per service.
    pub connections: BTreeMap<String, u64>,
    /// Distinct servers this process sent requests to in the last minute.
    pub servers_reached: u64,
    /// Services it holds connections to or sent requests to.
    pub services: std::collections::BTreeSet<String>,
    pub requests_per_s: f64,
    /// Dead writes in the last minute.
    pub dead_writes: u64,
    /// EMFILE/ENFILE errors in the last minute (history) or since the daemon started
    /// (counters), whichever is larger.
    pub fd_errors: u64,
}

impl ProcessRow {
    pub fn fd_ratio(&self) -> Option<f64> {
        match (self.open_fds, self.fd_limit) {
            (Some(open), Some(limit)) if limit > 0 => Some(open as f64 / limit as f64),
            _ => None,
        }
    }

    pub fn total_connections(&self) -> u64 {
        self.connections.values().sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotKeyKind {
    Requests,
    Bytes,
}

impl HotKeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HotKeyKind::Requests => "requests",
            HotKeyKind::Bytes => "bytes",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HotKeyRow {
    pub service: String,
    pub server: String,
    /// Which side of this host's connections the key was seen on.
    pub role: Role,
    pub kind: HotKeyKind,
    pub key: String,
    /// Space-saving estimate since the daemon started: an over-estimate by up to `error`.
    pub total: u64,
    /// How much of `total` may belong to the keys this one replaced in the table.
    pub error: u64,
    /// Change of `total` per second over the rate window (against the report about a window
    /// before); None on the first refresh and for a key that was not in that report with the
    /// same error (new, or evicted and back): its count then includes the count it inherited,
    /// which the window did not span.
    pub per_s: Option<f64>,
}

impl HotKeyRow {
    /// The count the key certainly had: `total` less what it may have inherited.
    pub fn at_least(&self) -> u64 {
        self.total.saturating_sub(self.error)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub service: String,
    pub server: String,
    /// The end that counted: with producer or consumer and queue server on one host, each
    /// counts the same operations.
    pub role: Role,
    pub queue: String,
    pub enqueue_per_s: f64,
    pub dequeue_per_s: f64,
    pub empty_polls_per_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FindingLine {
    pub severity: Severity,
    pub title: String,
}

/// Everything one refresh shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    /// The last complete second shown (unix).
    pub end_s: u64,
    /// Seconds the rates are averaged over.
    pub window_s: u64,
    pub servers: Vec<ServerRow>,
    pub processes: Vec<ProcessRow>,
    pub hot_keys: Vec<HotKeyRow>,
    pub queues: Vec<QueueRow>,
    pub findings: Vec<FindingLine>,
    /// Per second of the last minute (oldest first), whether the daemon has no record of it:
    /// it was not running. Its zeros are not a silence of the servers.
    pub unrecorded: Vec<bool>,
}

/// What a refresh has to work with besides the history.
#[derive(Debug, Default)]
pub struct Inputs<'a> {
    /// The daemon's counters and hot keys now, and as they were about a window before (the
    /// newest sample at least `window_s` old), with the seconds between: what their rates
    /// are taken over.
    pub counters: Option<&'a Counters>,
    pub counters_before: Option<(&'a Counters, f64)>,
    pub keys: Option<&'a KeysReport>,
    pub keys_before: Option<(&'a KeysReport, f64)>,
    /// How top's own config wants keys shown: with `hash`, a daemon configured otherwise
    /// still gets no plain key onto this screen.
    pub key_display: KeyDisplay,
    /// Runs the detectors when given.
    pub thresholds: Option<&'a DiagnoseThresholds>,
    /// Spans of seconds (inclusive) the daemon has no record of.
    pub unrecorded: &'a [(u64, u64)],
}

#[derive(Default)]
struct ServerAcc {
    requests: u64,
    hits: u64,
    lookups: u64,
    errors: u64,
    hist: LatencyHistogram,
    timeouts: u64,
    dead_writes: u64,
    retransmits: u64,
    spark: Vec<u64>,
    p99_spark: Vec<LatencyHistogram>,
    /// The last second with an answered request.
    last_answer_s: Option<u64>,
}

#[derive(Default)]
struct ProcessAcc {
    fds: Option<(u64, u32, u64)>,
    connections: BTreeMap<String, u64>,
    servers: std::collections::BTreeSet<(String, String)>,
    requests: u64,
    dead_writes: u64,
    fd_errors: u64,
}

type ServerKey = (String, String, Role);

fn server_entry(servers: &mut BTreeMap<ServerKey, ServerAcc>, key: ServerKey) -> &mut ServerAcc {
    let acc = servers.entry(key).or_default();
    if acc.spark.is_empty() {
        acc.spark = vec![0; MINUTE_S as usize];
        acc.p99_spark = vec![LatencyHistogram::default(); MINUTE_S as usize];
    }
    acc
}

/// Builds the model for the complete seconds up to `end_s`: rates over the last `window_s`
/// seconds, counts and sparklines over the last minute.
pub fn build(snapshot: &HistorySnapshot, end_s: u64, window_s: u64, inputs: &Inputs) -> Model {
    let window_s = window_s.clamp(1, MINUTE_S);
    let rate_start = end_s + 1 - window_s.min(end_s + 1);
    let minute_start = end_s + 1 - MINUTE_S.min(end_s + 1);
    let mut acc = Accumulated::default();
    for second in snapshot
        .seconds
        .iter()
        .filter(|s| s.t >= minute_start && s.t <= end_s)
    {
        let at = At {
            slot: (second.t - minute_start) as usize,
            rate: second.t >= rate_start && second.t <= end_s,
        };
        acc.add_requests(snapshot, second, at);
        acc.add_server_rows(snapshot, second, at);
        acc.add_process_rows(snapshot, second);
    }
    if let Some(counters) = inputs.counters {
        acc.add_counted(counters);
    }

    let span = window_s as f64;
    let unrecorded: Vec<bool> = (0..MINUTE_S)
        .map(|slot| {
            let t = minute_start + slot;
            inputs
                .unrecorded
                .iter()
                .any(|&(from, to)| from <= t && t <= to)
        })
        .collect();
    Model {
        end_s,
        window_s,
        servers: acc
            .servers
            .into_iter()
            .map(|(key, server)| {
                let mut row = server_row(key, server, span, end_s, inputs);
                // At a server's socket a request counts when the server reads it: after a
                // stall, all it was sent meanwhile at once. Its clients' sends are timed as
                // they happened, so their rows need no mark.
                if row.role == Role::Server {
                    row.backlog = backlog_seconds(&row.requests_spark, &unrecorded);
                }
                row
            })
            .collect(),
        processes: acc
            .processes
            .into_iter()
            .map(|(comm, process)| process_row(comm, process, span, inputs.counters))
            .collect(),
        hot_keys: inputs
            .keys
            .map(|keys| hot_keys(keys, inputs.keys_before, inputs.key_display))
            .unwrap_or_default(),
        queues: inputs
            .counters
            .map_or_else(Vec::new, |c| queue_rows(c, inputs)),
        findings: inputs
            .thresholds
            .map(|thresholds| findings(snapshot, minute_start, end_s, thresholds))
            .unwrap_or_default(),
        unrecorded,
    }
}

/// Seconds of traffic read before a silence that a backlog second is measured against.
const BACKLOG_LEVEL_S: usize = 5;

/// Which seconds of `counts` (requests per second at a server's socket, oldest first) are a
/// backlog: requests its clients sent during a silence (a stalled server: SIGSTOP, a long GC,
/// swapping) that it read all at once when it resumed. Such a second follows at least one
/// recorded second without requests after steady traffic, is over 1.5 times the level before
/// the silence (the median of up to [`BACKLOG_LEVEL_S`] seconds), and holds no more than that
/// level over the silence and the second itself could have sent, twice over. A burst larger
/// than that (a batch job after idle minutes) is traffic, not a backlog.
pub fn backlog_seconds(counts: &[u64], unrecorded: &[bool]) -> Vec<bool> {
    let recorded = |i: usize| !unrecorded.get(i).copied().unwrap_or(false);
    let mut backlog = vec![false; counts.len()];
    for t in 1..counts.len() {
        if counts[t] == 0 || !recorded(t) {
            continue;
        }
        let mut start = t;
        while start > 0 && counts[start - 1] == 0 && recorded(start - 1) {
            start -= 1;
        }
        let silence = t - start;
        if silence == 0 {
            continue;
        }
        let mut before: Vec<u64> = (0..start)
            .rev()
            .take_while(|&i| counts[i] > 0 && recorded(i))
            .take(BACKLOG_LEVEL_S)
            .map(|i| counts[i])
            .collect();
        if before.is_empty() {
            continue;
        }
        before.sort_unstable();
        let level = before[before.len() / 2] as f64;
        let count = counts[t] as f64;
        backlog[t] = count > 1.5 * level && count <= 2.0 * level * (silence + 1) as f64;
    }
    backlog
}

/// Where a second falls: its sparkline slot, and whether it is in the rate window.
#[derive(Clone, Copy)]
struct At {
    slot: usize,
    rate: bool,
}

/// The last minute of history, per server and per process.
#[derive(Default)]
struct Accumulated {
    servers: BTreeMap<ServerKey, ServerAcc>,
    processes: BTreeMap<String, ProcessAcc>,
}

fn label(snapshot: &HistorySnapshot, id: u32) -> String {
    snapshot.label(id).to_string()
}

/// A process name, "?" when unknown.
fn comm_label(snapshot: &HistorySnapshot, id: u32) -> String {
    match snapshot.label(id) {
        "" => "?".to_string(),
        c => c.to_string(),
    }
}

impl Accumulated {
    fn server(
        &mut self,
        snapshot: &HistorySnapshot,
        service: u32,
        server: u32,
        role: Role,
    ) -> &mut ServerAcc {
        let key = (label(snapshot, service), label(snapshot, server), role);
        server_entry(&mut self.servers, key)
    }

    fn process(&mut self, snapshot: &HistorySnapshot, comm: u32) -> &mut ProcessAcc {
        self.processes
            .entry(comm_label(snapshot, comm))
            .or_default()
    }

    fn add_requests(&mut self, snapshot: &HistorySnapshot, second: &SecondSnapshot, at: At) {
        for row in &second.requests {
            let acc = self.server(snapshot, row.service, row.server, row.role);
            let count = row.count as u64;
            acc.spark[at.slot] += count;
            if row.status.is_no_answer() {
                acc.timeouts += count;
            }
            if at.rate {
                acc.requests += count;
                if row.status.is_lookup() {
                    acc.lookups += count;
                    if row.status == crate::model::Status::Hit {
                        acc.hits += count;
                    }
                }
                if row.status.is_failure() {
                    acc.errors += count;
                }
            }
            let process = self.process(snapshot, row.comm);
            process
                .servers
                .insert((label(snapshot, row.service), label(snapshot, row.server)));
            if at.rate {
                process.requests += count;
            }
        }
    }

    /// Latency, dead writes and retransmits per server.
    fn add_server_rows(&mut self, snapshot: &HistorySnapshot, second: &SecondSnapshot, at: At) {
        for row in &second.latency {
            let acc = self.server(snapshot, row.service, row.server, row.role);
            acc.p99_spark[at.slot].add_cells(&row.cells);
            acc.last_answer_s = acc.last_answer_s.max(Some(second.t));
            if at.rate {
                acc.hist.add_cells(&row.cells);
            }
        }
        for row in &second.dead_writes {
            let acc = self.server(snapshot, row.service, row.server, row.role);
            acc.dead_writes += row.count as u64;
            self.process(snapshot, row.comm).dead_writes += row.count as u64;
        }
        for row in second.tcp.iter().filter(|r| r.event.is_retransmit()) {
            let acc = self.server(snapshot, row.service, row.server, row.role);
            acc.retransmits += row.count as u64;
        }
    }

    /// Descriptors, connections and failed fd calls per process.
    fn add_process_rows(&mut self, snapshot: &HistorySnapshot, second: &SecondSnapshot) {
        for row in &second.fds {
            let acc = self.process(snapshot, row.comm);
            // The latest sample wins.
            acc.fds = Some((row.open_fds as u64, row.pid, row.limit as u64));
        }
        for row in &second.process_connections {
            let service = label(snapshot, row.service);
            self.process(snapshot, row.comm)
                .connections
                .insert(service, row.connections as u64);
        }
        for row in &second.fd_errors {
            self.process(snapshot, row.comm).fd_errors += row.count as u64;
        }
    }

    /// A row for every endpoint and process the daemon counts, even without history.
    fn add_counted(&mut self, counters: &Counters) {
        for (service, server, role) in counters.endpoints() {
            server_entry(&mut self.servers, (service, server, role));
        }
        for comm in counters.comms() {
            self.processes.entry(comm).or_default();
        }
    }
}

/// The per-second change of a counter over the window (against `counters_before`).
fn counter_rate(inputs: &Inputs, value: &dyn Fn(&Counters) -> Option<f64>) -> Option<f64> {
    let now = value(inputs.counters?)?;
    let (before, elapsed) = inputs.counters_before?;
    let before = value(before).unwrap_or(0.0);
    (elapsed > 0.0).then(|| (now - before).max(0.0) / elapsed)
}

fn server_row(
    (service, server, role): ServerKey,
    acc: ServerAcc,
    span: f64,
    end_s: u64,
    inputs: &Inputs,
) -> ServerRow {
    let p99_ms = acc.hist.quantile_us(0.99).map(|us| us / 1000.0);
    let connections = inputs
        .counters
        .and_then(|c| c.connections_active(&service, &server, role));
    let bytes = |direction: &'static str| {
        counter_rate(inputs, &|c: &Counters| {
            c.bytes(&service, &server, role, direction)
        })
    };
    ServerRow {
        requests_per_s: acc.requests as f64 / span,
        hit_ratio: (acc.lookups > 0).then(|| acc.hits as f64 / acc.lookups as f64),
        p50_ms: acc.hist.quantile_us(0.5).map(|us| us / 1000.0),
        p99_ms,
        unanswered_for_s: match (p99_ms, acc.last_answer_s) {
            (None, Some(t)) => Some(end_s.saturating_sub(t)),
            _ => None,
        },
        errors_per_s: acc.errors as f64 / span,
        timeouts: acc.timeouts,
        dead_writes: acc.dead_writes,
        retransmits: acc.retransmits,
        connections,
        bytes_in_per_s: bytes("received"),
        bytes_out_per_s: bytes("sent"),
        requests_spark: acc.spark,
        p99_spark: acc
            .p99_spark
            .iter()
            .map(|h| h.quantile_us(0.99).map_or(0, |us| us.round() as u64))
            .collect(),
        backlog: Vec::new(),
        service,
        server,
        role,
    }
}

/// A process's row: the daemon's counters, when given, are newer than the history's samples.
fn process_row(
    comm: String,
    acc: ProcessAcc,
    span: f64,
    counters: Option<&Counters>,
) -> ProcessRow {
    let (mut open_fds, mut fd_limit) = match acc.fds {
        Some((open, _, limit)) => (Some(open), Some(limit)),
        None => (None, None),
    };
    let mut connections = acc.connections;
    let mut fd_errors = acc.fd_errors;
    if let Some(counters) = counters {
        if let Some((open, limit)) = counters.fds(&comm) {
            (open_fds, fd_limit) = (Some(open), Some(limit));
        }
        for (service, count) in counters.process_connections(&comm) {
            connections.insert(service, count);
        }
        fd_errors = fd_errors.max(counters.fd_errors(&comm));
    }
    let services = acc
        .servers
        .iter()
        .map(|(service, _)| service.clone())
        .chain(connections.keys().cloned())
        .collect();
    ProcessRow {
        open_fds,
        fd_limit,
        services,
        connections,
        servers_reached: acc.servers.len() as u64,
        requests_per_s: acc.requests as f64 / span,
        dead_writes: acc.dead_writes,
        fd_errors,
        comm,
    }
}

fn queue_rows(counters: &Counters, inputs: &Inputs) -> Vec<QueueRow> {
    counters
        .queues()
        .into_iter()
        .map(|(service, server, role, queue)| {
            let op_rate = |op: QueueOpKind| {
                counter_rate(inputs, &|c: &Counters| {
                    c.queue_ops(&service, &server, role, &queue, op.as_str())
                })
                .unwrap_or(0.0)
            };
            QueueRow {
                enqueue_per_s: op_rate(QueueOpKind::Enqueue),
                dequeue_per_s: op_rate(QueueOpKind::Dequeue),
                empty_polls_per_s: op_rate(QueueOpKind::EmptyPoll),
                service: service.clone(),
                server: server.clone(),
                role,
                queue: queue.clone(),
            }
        })
        .collect()
}

/// The detectors over [start_s, end_s] only: top shows what is wrong now, not 15 minutes ago.
fn findings(
    snapshot: &HistorySnapshot,
    start_s: u64,
    end_s: u64,
    thresholds: &DiagnoseThresholds,
) -> Vec<FindingLine> {
    let recent = trimmed(snapshot, start_s, end_s);
    crate::diagnose::diagnose(&recent, thresholds)
        .into_iter()
        .map(|finding| FindingLine {
            severity: finding.severity,
            title: finding.title,
        })
        .collect()
}

/// A copy of `snapshot` restricted to [start_s, end_s].
pub fn trimmed(snapshot: &HistorySnapshot, start_s: u64, end_s: u64) -> HistorySnapshot {
    HistorySnapshot {
        version: snapshot.version,
        start_s: start_s.max(snapshot.start_s),
        end_s: end_s.min(snapshot.end_s),
        labels: snapshot.labels.clone(),
        seconds: snapshot
            .seconds
            .iter()
            .filter(|s| s.t >= start_s && s.t <= end_s)
            .cloned()
            .collect(),
        stats: snapshot.stats,
        slab_fit: snapshot.slab_fit.clone(),
        queues: snapshot.queues.clone(),
    }
}

/// `key` as `display` allows. The daemon hashes the raw bytes; for a key it sent in plain, the
/// hash of the shown text is the same hash whenever the key is printable ASCII, as memcache
/// keys are.
fn shown_key(key: &str, display: KeyDisplay) -> String {
    match display {
        KeyDisplay::Hash if !KeyDisplay::is_hash(key) => display.show(key.as_bytes()),
        _ => key.to_string(),
    }
}

fn hot_keys(
    keys: &KeysReport,
    previous: Option<(&KeysReport, f64)>,
    display: KeyDisplay,
) -> Vec<HotKeyRow> {
    let earlier = |service: &str, server: &str, role: Role, kind: HotKeyKind, key: &HotKey| {
        let (report, elapsed) = previous?;
        let entry = report
            .servers
            .iter()
            .find(|s| s.service == service && s.server == server && s.role == role)?;
        let list = match kind {
            HotKeyKind::Requests => &entry.by_requests,
            HotKeyKind::Bytes => &entry.by_bytes,
        };
        // Only a key counted all along has a rate: a key new to the table (or evicted and
        // back) starts from the count of the key it replaced, so count minus nothing would
        // be that whole inherited count in one refresh. The error changes only on entry.
        let before = list
            .iter()
            .find(|k| k.key == key.key && k.error == key.error)?;
        Some((before.count, elapsed))
    };
    let mut rows = Vec::new();
    for server in &keys.servers {
        for (kind, list) in [
            (HotKeyKind::Requests, &server.by_requests),
            (HotKeyKind::Bytes, &server.by_bytes),
        ] {
            for key in list {
                let per_s = earlier(&server.service, &server.server, server.role, kind, key)
                    .filter(|(_, elapsed)| *elapsed > 0.0)
                    .map(|(before, elapsed)| key.count.saturating_sub(before) as f64 / elapsed);
                rows.push(HotKeyRow {
                    service: server.service.clone(),
                    server: server.server.clone(),
                    role: server.role,
                    kind,
                    key: shown_key(&key.key, display),
                    total: key.count,
                    error: key.error.min(key.count),
                    per_s,
                });
            }
        }
    }
    rows
}
