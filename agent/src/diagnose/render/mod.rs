//! Output formats of `diagnose`: text for an 80-column terminal, JSON (the [`Report`] as is,
//! documented by docs/diagnose-schema.json) and a Graphviz graph of who talks to whom.

mod dot;
mod text;

#[cfg(test)]
mod tests;

pub use dot::dot;
pub use text::{text, TextOptions, WIDTH};

use super::Report;

pub fn json(report: &Report) -> String {
    // A Report holds only strings, numbers and vectors: serialising it cannot fail.
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|err| format!("{{\"error\": \"cannot serialise the report: {err}\"}}"))
}

/// Replaces anything that is not printable ASCII: labels come from process names and other
/// data a local user controls, and must not smuggle terminal escapes or break column widths.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}
