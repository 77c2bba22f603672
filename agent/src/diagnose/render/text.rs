//! The human report. Every line fits in [`WIDTH`] columns: text is wrapped at spaces with
//! hanging indents, over-long words are split, table cells are cut with "~".

use super::sanitize;
use crate::diagnose::{util, Edge, Finding, Report, Severity, SourceKind};

pub const WIDTH: usize = 80;
/// Edges shown in the table; the JSON has them all.
const MAX_EDGES: usize = 20;

#[derive(Debug, Clone, Copy, Default)]
pub struct TextOptions {
    /// ANSI colour for severities (only when stdout is a terminal).
    pub colour: bool,
}

pub fn text(report: &Report, options: TextOptions) -> String {
    let mut out = Vec::new();
    let window = format!(
        "{} UTC ({})",
        util::clock_span(report.window.start_s, report.window.end_s),
        match report.source.kind {
            SourceKind::Daemon => format!(
                "{} of daemon history, {} watched live",
                util::seconds(
                    (report.window.end_s + 1).saturating_sub(report.window.start_s) as f64
                ),
                util::seconds(report.source.watched_s as f64)
            ),
            SourceKind::Local =>
                format!("{} watched", util::seconds(report.source.watched_s as f64)),
            SourceKind::Prometheus => format!(
                "{} agents in Prometheus at {}{}",
                report.source.hosts.unwrap_or(0),
                report.source.prometheus.as_deref().unwrap_or("?"),
                if report.source.partial {
                    "; PARTIAL"
                } else {
                    ""
                }
            ),
        }
    );
    let headline = match report.findings.len() {
        0 => format!("cacheprobe diagnose: no problems found in {window}"),
        n => format!(
            "cacheprobe diagnose: {} in {window}",
            util::plural(n as u64, "finding")
        ),
    };
    out.extend(wrap(&headline, "", ""));
    for finding in &report.findings {
        out.push(String::new());
        finding_lines(finding, options, &mut out);
    }
    if !report.edges.is_empty() {
        out.push(String::new());
        edge_lines(&report.edges, report, &mut out);
    }
    if !report.notes.is_empty() {
        out.push(String::new());
        for note in &report.notes {
            out.extend(wrap(&format!("Note: {note}"), "", "      "));
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

fn finding_lines(finding: &Finding, options: TextOptions, out: &mut Vec<String>) {
    let tag = match finding.severity {
        Severity::Critical => "CRITICAL",
        Severity::Warning => "WARNING",
        Severity::Info => "INFO",
    };
    let plain_tag = format!("{tag:<9}");
    let mut title = wrap(&finding.title, &plain_tag, "         ");
    if options.colour {
        let code = match finding.severity {
            Severity::Critical => "\x1b[1;31m",
            Severity::Warning => "\x1b[1;33m",
            Severity::Info => "\x1b[1;36m",
        };
        if let Some(first) = title.first_mut() {
            *first = format!("{code}{tag}\x1b[0m{}", &first[tag.len()..]);
        }
    }
    out.append(&mut title);
    for line in &finding.evidence {
        // Evidence lines starting with spaces are continuations of the previous one.
        let (first, rest) = if line.starts_with("  ") {
            ("      ", "        ")
        } else {
            ("  - ", "    ")
        };
        out.extend(wrap(line.trim_start(), first, rest));
    }
    if !finding.advice.is_empty() {
        out.extend(wrap(
            &format!("What to do: {}", finding.advice),
            "  ",
            "    ",
        ));
    }
}

fn edge_lines(edges: &[Edge], report: &Report, out: &mut Vec<String>) {
    if report.source.kind == SourceKind::Prometheus {
        return fleet_edge_lines(edges, report, out);
    }
    let covered = report
        .edge_window
        .map_or(report.source.watched_s.max(1), |window| {
            window.end_s.saturating_sub(window.start_s) + 1
        });
    out.extend(wrap(
        &format!(
            "Traffic by process and server (last {}):",
            util::seconds(covered as f64)
        ),
        "",
        "",
    ));
    out.push(row(&[
        "PROCESS", "SERVER", "REQ/S", "P50", "P99", "ERRORS", "CONNS",
    ]));
    for edge in edges.iter().take(MAX_EDGES) {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |ms| util::latency(ms * 1000.0));
        out.push(row(&[
            &edge.process,
            &edge.server,
            &rate(edge.requests_per_s),
            &ms(edge.p50_ms),
            &ms(edge.p99_ms),
            &edge.errors.to_string(),
            &edge.connections.map_or("-".to_string(), |c| c.to_string()),
        ]));
    }
    if edges.len() > MAX_EDGES {
        out.push(format!(
            "... and {} more (see --json)",
            edges.len() - MAX_EDGES
        ));
    }
}

/// The fleet table: client host -> server, p99 at the client beside p99 at the server, so
/// the difference (time between the boxes) reads across a row.
fn fleet_edge_lines(edges: &[Edge], report: &Report, out: &mut Vec<String>) {
    out.extend(wrap(
        &format!(
            "Client host -> server over {} (P99 at the client, SRV P99 at the server's socket):",
            util::seconds((report.window.end_s.saturating_sub(report.window.start_s)) as f64)
        ),
        "",
        "",
    ));
    out.push(row(&[
        "HOST", "SERVER", "REQ/S", "P99", "SRV P99", "ERRORS",
    ]));
    for edge in edges.iter().take(MAX_EDGES) {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |ms| util::latency(ms * 1000.0));
        out.push(row(&[
            edge.host.as_deref().unwrap_or("?"),
            &edge.server,
            &rate(edge.requests_per_s),
            &ms(edge.p99_ms),
            &ms(edge.server_p99_ms),
            &edge.errors.to_string(),
        ]));
    }
    if edges.len() > MAX_EDGES {
        out.push(format!(
            "... and {} more (see --json)",
            edges.len() - MAX_EDGES
        ));
    }
}

fn rate(per_s: f64) -> String {
    if per_s >= 100.0 {
        format!("{per_s:.0}")
    } else {
        format!("{per_s:.1}")
    }
}

/// Column widths: 15 + 22 + 8 + 7 + 7 + 6 + 5 plus six separating spaces = 76.
const COLUMNS: [(usize, bool); 7] = [
    (15, false),
    (22, false),
    (8, true),
    (7, true),
    (7, true),
    (6, true),
    (5, true),
];

fn row(cells: &[&str]) -> String {
    let mut line = String::new();
    for (i, (cell, (width, right))) in cells.iter().zip(COLUMNS).enumerate() {
        if i > 0 {
            line.push(' ');
        }
        let cell = fit(&sanitize(cell), width);
        if right {
            line.push_str(&format!("{cell:>width$}"));
        } else {
            line.push_str(&format!("{cell:<width$}"));
        }
    }
    line.trim_end().to_string()
}

fn fit(cell: &str, width: usize) -> String {
    if cell.len() <= width {
        cell.to_string()
    } else {
        format!("{}~", &cell[..width - 1])
    }
}

/// Wraps `text` to [`WIDTH`] columns: the first line starts with `first`, later ones with
/// `rest`. Words longer than a line are split.
pub(crate) fn wrap(text: &str, first: &str, rest: &str) -> Vec<String> {
    let text = sanitize(text);
    let mut lines = Vec::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        let mut word = word;
        loop {
            let room = WIDTH.saturating_sub(line.len() + usize::from(!empty));
            if word.len() <= room {
                if !empty {
                    line.push(' ');
                }
                line.push_str(word);
                empty = false;
                break;
            }
            if !empty {
                lines.push(std::mem::replace(&mut line, rest.to_string()));
                empty = true;
                continue;
            }
            // A word longer than a whole line: split it.
            let take = room.max(1);
            line.push_str(&word[..take.min(word.len())]);
            word = &word[take.min(word.len())..];
            lines.push(std::mem::replace(&mut line, rest.to_string()));
            if word.is_empty() {
                break;
            }
        }
    }
    if !empty || lines.is_empty() {
        lines.push(line.trim_end().to_string());
    }
    lines
}
