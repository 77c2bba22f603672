//! Writes the registry out as OpenMetrics or, for promtool and most other tools, the classic Prometheus text format.

use std::sync::atomic::{AtomicUsize, Ordering};

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

/// The last encode's length: the next one starts at about that capacity instead of growing
/// by doubling from 64 KiB. Doubling left the allocator holding the outgrown buffers (about one
/// more body per encode) and up to twice the body in capacity, so a large /metrics body under
/// concurrent scrapes cost several bodies of RSS per permit.
static LAST_LEN: AtomicUsize = AtomicUsize::new(64 * 1024);

pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let hint = LAST_LEN.load(Ordering::Relaxed);
    let mut text = String::with_capacity(hint + hint / 16);
    crate::export::latency::encoding_with_exemplars(format == Format::OpenMetrics, || {
        prometheus_client::encoding::text::encode(&mut text, registry)
    })?;
    LAST_LEN.store(text.len().max(64 * 1024), Ordering::Relaxed);
    let text = apply_exemplar_markers(text, format == Format::OpenMetrics);
    Ok(match format {
        Format::OpenMetrics => text,
        Format::PrometheusText => openmetrics_to_prometheus_text(&text),
    })
}

/// Replaces the exemplar marker lines of [`crate::export::latency::LatencyHistogram`] (written
/// right after a series' bucket lines) by exemplars on those bucket lines (`keep`), or just
/// removes them. A marker whose bucket lines are not where it says (never, unless the encoder
/// changes) is dropped with its exemplars and counted in the log.
fn apply_exemplar_markers(text: String, keep: bool) -> String {
    use crate::export::latency::{parse_marker, MARKER_LABEL};
    let needle = format!("_info{{{MARKER_LABEL}=\"");
    if !text.contains(&needle) {
        return text;
    }
    // (byte offset, text to insert there) and (start, end) of marker lines, in text order.
    let mut inserts: Vec<(usize, String)> = Vec::new();
    let mut removals: Vec<(usize, usize)> = Vec::new();
    let mut misplaced = 0u64;
    let mut from = 0;
    while let Some(found) = text[from..].find(&needle) {
        let at = from + found;
        let line_start = text[..at].rfind('\n').map_or(0, |newline| newline + 1);
        let line_end = text[at..]
            .find('\n')
            .map_or(text.len(), |newline| at + newline + 1);
        from = line_end;
        removals.push((line_start, line_end));
        let value_start = at + needle.len();
        let Some(value) = text[value_start..line_end]
            .split_once('"')
            .map(|(value, _)| value)
        else {
            misplaced += 1;
            continue;
        };
        let Some((lines, exemplars)) = parse_marker(value) else {
            misplaced += 1;
            continue;
        };
        if !keep {
            continue;
        }
        // The `lines` lines before the marker are the series' buckets: where each one ends.
        let mut ends = Vec::with_capacity(lines);
        let mut cursor = line_start;
        while ends.len() < lines && cursor > 0 {
            let end = cursor - 1; // the '\n' ending the line before
            let start = text[..end].rfind('\n').map_or(0, |newline| newline + 1);
            if !text[start..end].contains("_bucket{") {
                break;
            }
            ends.push(end);
            cursor = start;
        }
        if ends.len() < lines {
            misplaced += 1;
            continue;
        }
        ends.reverse();
        for exemplar in exemplars {
            inserts.push((ends[exemplar.bucket], exemplar.suffix));
        }
    }
    if misplaced > 0 {
        tracing::warn!(
            misplaced,
            "exemplar markers without their bucket lines: exemplars dropped"
        );
    }
    inserts.sort_by_key(|(at, _)| *at);
    let mut out = String::with_capacity(text.len() + inserts.len() * 48);
    let mut copied = 0;
    let mut inserts = inserts.into_iter().peekable();
    for (start, end) in removals {
        while let Some((at, suffix)) = inserts.next_if(|(at, _)| *at < start) {
            out.push_str(&text[copied..at]);
            out.push_str(&suffix);
            copied = at;
        }
        out.push_str(&text[copied..start]);
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
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

    /// Two series of the latency histogram, one with exemplars: they land on that series'
    /// bucket lines in OpenMetrics, nowhere in text 0.0.4, and no marker line is left; a marker
    /// without its bucket lines is dropped.
    #[test]
    fn exemplar_markers_become_exemplars_on_their_own_series() {
        use crate::export::latency::{LatencyHistogram, BUCKET_LINES};
        use prometheus_client::metrics::family::Family;
        let mut registry = Registry::with_prefix("cacheprobe");
        let family: Family<Vec<(String, String)>, LatencyHistogram> = Family::default();
        registry.register("lat", "Latency", family.clone());
        let labels = |server: &str| vec![("server".to_string(), server.to_string())];
        family.get_or_create(&labels("a")).observe(0.0001, None);
        let b = family.get_or_create(&labels("b")).clone();
        let offer = |request_id| {
            Some(crate::export::latency::Offer {
                request_id,
                rank: 0,
            })
        };
        b.observe(0.03, offer(0x1234));
        b.observe(7.0, offer(0xabcd));
        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert!(
            !om.contains("cacheprobe_exemplars") && !om.contains("_info"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        let with: Vec<&str> = om.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(
            with,
            vec![
                "cacheprobe_lat_bucket{le=\"0.05\",server=\"b\"} 1 # {request_id=\"0000000000001234\"} 0.03",
                "cacheprobe_lat_bucket{le=\"+Inf\",server=\"b\"} 2 # {request_id=\"000000000000abcd\"} 7",
            ],
            "{om}"
        );
        assert_eq!(om.matches("_bucket{").count(), 2 * BUCKET_LINES);
        let plain = encode(&registry, Format::PrometheusText).unwrap();
        assert!(
            !plain.contains("request_id") && !plain.contains("_info"),
            "{plain}"
        );
        assert_eq!(plain.matches("_bucket{").count(), 2 * BUCKET_LINES);

        let orphan = "# TYPE x gauge\nx 1\nx_info{cacheprobe_exemplars=\"15 1:0000000000001234:0.1\"} 1\n# EOF\n";
        assert_eq!(
            apply_exemplar_markers(orphan.to_string(), true),
            "# TYPE x gauge\nx 1\n# EOF\n"
        );
    }

    /// A text-format read (an operator's curl) does not use up an exemplar: only a read that
    /// shows it (OpenMetrics, Prometheus' scrape) lets the next offer replace it.
    #[test]
    fn only_a_read_that_shows_exemplars_marks_them_shown() {
        use crate::export::latency::{LatencyHistogram, Offer};
        let mut registry = Registry::with_prefix("cacheprobe");
        let histogram = LatencyHistogram::default();
        registry.register("lat", "Latency", histogram.clone());
        let offer = |request_id, rank| Some(Offer { request_id, rank });
        histogram.observe(0.03, offer(0x1234, 9));
        encode(&registry, Format::PrometheusText).unwrap();
        // Unread by Prometheus: a lower-ranked offer does not take the slot.
        histogram.observe(0.03, offer(0x5678, 1));
        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert!(om.contains("0000000000001234"), "{om}");
        // Shown: the next offer takes it whatever its rank.
        histogram.observe(0.03, offer(0x9abc, 1));
        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert!(om.contains("0000000000009abc"), "{om}");
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
