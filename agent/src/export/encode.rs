//! Writes the registry out as OpenMetrics or, for promtool and most other tools, the classic Prometheus text format.

use prometheus_client::registry::Registry;

/// Exposition formats. Prometheus negotiates OpenMetrics; promtool and most other tools read the
/// classic text format, so that is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(match format {
        Format::OpenMetrics => text,
        Format::PrometheusText => openmetrics_to_prometheus_text(&text),
    })
}

/// Where the next line starting with '#' begins (or the end). Searches for the byte '#' (a
/// memchr scan; '#' is rare in sample lines) rather than for "\n#", which is several times slower.
fn next_comment_line(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(offset) = text[from..].find('#') {
        let at = from + offset;
        if at > 0 && bytes[at - 1] == b'\n' {
            return at;
        }
        from = at + 1;
    }
    text.len()
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4: counters are announced under their
/// `_total` sample name, `unknown` becomes `untyped`, and UNIT/EOF lines go.
/// Appends sample lines, dropping OpenMetrics exemplars (` # {labels} value` after a sample),
/// which text format 0.0.4 does not have. Lines without a '#' (nearly all) are copied as one run.
fn push_without_exemplars(out: &mut String, samples: &str) {
    if !samples.contains('#') {
        out.push_str(samples);
        return;
    }
    for line in samples.split_inclusive('\n') {
        match exemplar_start(line) {
            Some(at) => {
                out.push_str(&line[..at]);
                out.push('\n');
            }
            None => out.push_str(line),
        }
    }
}

/// Where a sample line's exemplar (" # {") begins: the first '#' outside quoted label values.
fn exemplar_start(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let (mut quoted, mut escaped) = (false, false);
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'#' if !quoted && i > 0 && bytes[i - 1] == b' ' => return Some(i - 1),
            _ => {}
        }
    }
    None
}

pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    let mut rest = openmetrics;
    while !rest.is_empty() {
        if !rest.starts_with('#') {
            // Sample lines pass through unchanged: copy the whole run up to the next comment
            // line at once (a scrape at the cardinality ceiling is ~350k of them).
            let end = next_comment_line(rest);
            push_without_exemplars(&mut out, &rest[..end]);
            if !out.ends_with('\n') {
                out.push('\n');
            }
            rest = &rest[end..];
            continue;
        }
        let end = rest.find('\n').map_or(rest.len(), |newline| newline + 1);
        let line = rest[..end].trim_end_matches('\n');
        rest = &rest[end..];
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(help_line) = line.strip_prefix("# HELP ") {
            let (name, help) = help_line.split_once(' ').unwrap_or((help_line, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(type_line) = line.strip_prefix("# TYPE ") {
            let (name, kind) = type_line.split_once(' ').unwrap_or((type_line, "untyped"));
            let (suffix, kind_out) = match kind {
                "counter" => ("_total", "counter"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
                }
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind_out}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_drops_exemplars_but_not_hashes_in_label_values() {
        let om = "# TYPE h histogram\nh_bucket{a=\"x # {y}\",le=\"1\"} 1 # {request_id=\"ab\"} 0.5\nh_bucket{le=\"+Inf\"} 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# TYPE h histogram\nh_bucket{a=\"x # {y}\",le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
        );
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP x_things Things.\n# TYPE x_things counter\nx_things_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# TYPE u unknown\nu 3\n# UNIT h seconds\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# HELP x_things_total Things.\n# TYPE x_things_total counter\nx_things_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# TYPE u untyped\nu 3\n"
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(None), Format::PrometheusText);
    }

    #[test]
    fn prometheus_text_keeps_runs_of_samples_and_ends_every_line() {
        let om = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# TYPE c counter\nc_total 5";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# TYPE c_total counter\nc_total 5\n"
        );
        // A '#' inside a label value is not a comment line.
        let om = "# TYPE g gauge\ng{comm=\"#x\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# TYPE g gauge\ng{comm=\"#x\"} 1\n"
        );
        assert_eq!(openmetrics_to_prometheus_text(""), "");
    }
}
