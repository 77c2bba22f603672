//! `cacheprobe diagnose`'s brain: detectors that read a [`HistorySnapshot`] and name what is
//! wrong, with evidence and advice. Pure functions of the snapshot and the thresholds, so each
//! incident class is unit-tested from a synthetic history.

mod edges;
mod errors;
mod fds;
mod idle;
mod listen;
mod misses;
mod queues;
pub mod render;
mod routing;
mod slab_fit;
mod slow;
mod spikes;
mod tcp;
mod thresholds;
mod unread;
pub(crate) mod util;

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use edges::{edge_table, Edge};
pub use thresholds::DiagnoseThresholds;

use crate::history::HistorySnapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a finding is about, for filtering and for tests that assert the right culprit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subjects {
    pub services: Vec<String>,
    pub servers: Vec<String>,
    /// Process names (comm).
    pub processes: Vec<String>,
    pub commands: Vec<String>,
    /// Prometheus `instance`s of the hosts concerned (fleet reports only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// A time range in unix seconds, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start_s: u64,
    pub end_s: u64,
}

impl Span {
    /// `span` widened to cover `start_s..=end_s` too; that range alone when there is none.
    pub(crate) fn widened(span: Option<Span>, start_s: u64, end_s: u64) -> Span {
        match span {
            Some(s) => Span {
                start_s: s.start_s.min(start_s),
                end_s: s.end_s.max(end_s),
            },
            None => Span { start_s, end_s },
        }
    }
}

/// What some error replies said (the words after ERROR, CLIENT_ERROR or SERVER_ERROR, cut
/// to plain words; "other" for texts past the few the history keeps per server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotedReply {
    /// The status word (error, client_error, server_error).
    pub status: String,
    pub text: String,
    pub count: u64,
    /// Latency of these replies, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p90_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable slug of the detector that produced it, e.g. "idle-disconnects". Several findings
    /// may share an id (one per server).
    pub id: String,
    pub severity: Severity,
    /// One line, plain words.
    pub title: String,
    /// Lines with the numbers, time span, servers and processes behind the title.
    pub evidence: Vec<String>,
    /// What to do about it.
    pub advice: String,
    pub subjects: Subjects,
    /// Machine-readable numbers (e.g. "idle_timeout_s"), documented per id in the schema.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
    /// error-replies: what the error replies said, the most frequent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_texts: Vec<QuotedReply>,
    /// How bad it is within its severity, for ranking only.
    #[serde(skip)]
    pub magnitude: f64,
}

impl Finding {
    fn new(id: &str, severity: Severity, title: String) -> Finding {
        Finding {
            id: id.to_string(),
            severity,
            title,
            evidence: Vec::new(),
            advice: String::new(),
            subjects: Subjects::default(),
            values: BTreeMap::new(),
            span: None,
            error_texts: Vec::new(),
            magnitude: 0.0,
        }
    }

    fn value(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            self.values.insert(name.to_string(), value);
        }
    }
}

/// Runs every detector over the snapshot and ranks the findings: most severe first, then by
/// magnitude.
pub fn diagnose(snapshot: &HistorySnapshot, thresholds: &DiagnoseThresholds) -> Vec<Finding> {
    let mut findings = Vec::new();
    idle::detect(snapshot, thresholds, &mut findings);
    slow::detect(snapshot, thresholds, &mut findings);
    errors::detect(snapshot, thresholds, &mut findings);
    misses::detect(snapshot, thresholds, &mut findings);
    unread::detect(snapshot, thresholds, &mut findings);
    routing::detect(snapshot, thresholds, &mut findings);
    fds::detect(snapshot, thresholds, &mut findings);
    listen::detect(snapshot, thresholds, &mut findings);
    tcp::detect(snapshot, thresholds, &mut findings);
    spikes::detect(snapshot, thresholds, &mut findings);
    slab_fit::detect(snapshot, thresholds, &mut findings);
    queues::detect(snapshot, thresholds, &mut findings);
    listen::explain_syn_trouble(&mut findings);
    rank(&mut findings);
    findings
}

/// Most severe first, then the largest magnitude; id and title make the order total, so a
/// report reads the same every time. `fleet` ranks its findings the same way.
pub(crate) fn rank(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(b.magnitude.total_cmp(&a.magnitude))
            .then_with(|| a.id.cmp(&b.id))
            .then_with(|| a.title.cmp(&b.title))
    });
}

/// Version of the `--json` report; bump on any incompatible change to its shape.
pub const REPORT_VERSION: u32 = 1;
pub const REPORT_SCHEMA: &str = "cacheprobe-diagnose";

/// Where the history came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A running `cacheprobe run` daemon's history plus a live watch.
    Daemon,
    /// Probes attached by `diagnose` itself for the watch duration.
    Local,
    /// `diagnose --prometheus`: the fleet's metrics in a Prometheus-compatible query API.
    Prometheus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub kind: SourceKind,
    /// Seconds watched live by this run.
    pub watched_s: u64,
    /// The query API's URL (fleet reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// Agents that reported in the window (fleet reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<u64>,
    /// Some queries failed or came back partial: findings may be missing (see notes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// The whole `diagnose` answer; this is what `--json` prints (docs/diagnose-schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub version: u32,
    pub generated_at_s: u64,
    pub source: Source,
    pub window: Span,
    pub findings: Vec<Finding>,
    pub edges: Vec<Edge>,
    /// The seconds `edges` cover, inclusive: the last complete ones of the live watch (None
    /// for the fleet view, whose edges cover `window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_window: Option<Span>,
    /// Caveats about the data (events lost, rows folded), not findings.
    pub notes: Vec<String>,
}

impl Report {
    /// Diagnoses `snapshot`; the edge table covers the last `edge_window_s` seconds (the live
    /// watch), since a 15-minute average hides what is happening now.
    pub fn build(
        snapshot: &HistorySnapshot,
        thresholds: &DiagnoseThresholds,
        source: Source,
        generated_at_s: u64,
        edge_window_s: u64,
    ) -> Report {
        let findings = diagnose(snapshot, thresholds);
        // The newest second is still filling (the history's current one): counted into a
        // rate it read a 2 s watch up to 30% low.
        let edge_end = if snapshot.end_s > snapshot.start_s {
            snapshot.end_s - 1
        } else {
            snapshot.end_s
        };
        let edge_start = edge_end
            .saturating_sub(edge_window_s.max(1) - 1)
            .max(snapshot.start_s);
        let edges = edge_table(snapshot, edge_start, edge_end);
        Report {
            schema: REPORT_SCHEMA.to_string(),
            version: REPORT_VERSION,
            generated_at_s,
            source,
            window: Span {
                start_s: snapshot.start_s,
                end_s: snapshot.end_s,
            },
            findings,
            edges,
            edge_window: Some(Span {
                start_s: edge_start,
                end_s: edge_end,
            }),
            notes: data_notes(snapshot),
        }
    }
}

fn data_notes(snapshot: &HistorySnapshot) -> Vec<String> {
    let mut notes = Vec::new();
    let stats = &snapshot.stats;
    let lost: u64 = snapshot.seconds.iter().map(|s| s.events_lost).sum();
    if lost > 0 {
        notes.push(format!(
            "{lost} kernel events were lost in this window (ring buffer or socket map full): counts are lower bounds"
        ));
    }
    let overflow: u64 = snapshot.seconds.iter().map(|s| s.overflow).sum();
    if overflow > 0 {
        notes.push(format!(
            "{overflow} facts did not fit the history's per-second limits and were dropped"
        ));
    }
    if stats.folded_labels > 0 {
        notes.push(format!(
            "{} label values (processes, servers, commands) were folded into \"other\"",
            stats.folded_labels
        ));
    }
    if snapshot.seconds.is_empty() {
        notes.push("no traffic to watched services was seen in this window".to_string());
    }
    notes
}
