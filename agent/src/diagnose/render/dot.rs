//! `--graph dot`: the edge table as a Graphviz digraph, processes on the left, servers on the
//! right, servers named by warning or critical findings drawn in red.

use std::collections::BTreeSet;

use super::sanitize;
use crate::diagnose::{util, Report, Severity};

pub fn dot(report: &Report) -> String {
    let troubled: BTreeSet<&str> = report
        .findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .flat_map(|f| f.subjects.servers.iter().map(String::as_str))
        .collect();
    let mut out = String::from("digraph cacheprobe {\n");
    out.push_str("  rankdir=LR;\n");
    out.push_str("  node [shape=box, fontname=\"Helvetica\", fontsize=10];\n");
    out.push_str("  edge [fontname=\"Helvetica\", fontsize=9];\n");
    let processes: BTreeSet<&str> = report.edges.iter().map(|e| e.process.as_str()).collect();
    for process in &processes {
        out.push_str(&format!(
            "  {} [label={}, shape=ellipse];\n",
            quote(&format!("process:{process}")),
            quote(process)
        ));
    }
    let servers: BTreeSet<(&str, &str)> = report
        .edges
        .iter()
        .map(|e| (e.service.as_str(), e.server.as_str()))
        .collect();
    for (service, server) in &servers {
        let colour = if troubled.contains(server) {
            ", color=red, fontcolor=red"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {} [label={}{colour}];\n",
            quote(&format!("server:{service}:{server}")),
            quote(&format!("{server}\n{service}"))
        ));
    }
    for edge in &report.edges {
        let mut label = format!("{:.1} req/s", edge.requests_per_s);
        if let Some(p99) = edge.p99_ms {
            label.push_str(&format!("\np99 {}", util::latency(p99 * 1000.0)));
        }
        if edge.errors > 0 {
            label.push_str(&format!("\n{} errors", edge.errors));
        }
        let colour = if edge.errors > 0 { ", color=red" } else { "" };
        out.push_str(&format!(
            "  {} -> {} [label={}{colour}];\n",
            quote(&format!("process:{}", edge.process)),
            quote(&format!("server:{}:{}", edge.service, edge.server)),
            quote(&label)
        ));
    }
    out.push_str("}\n");
    out
}

/// A dot double-quoted string: sanitised, with quotes and backslashes escaped and newlines
/// as the `\n` escape.
fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for line in text.split('\n').enumerate() {
        if line.0 > 0 {
            quoted.push_str("\\n");
        }
        for c in sanitize(line.1).chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
    }
    quoted.push('"');
    quoted
}
