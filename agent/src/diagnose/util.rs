//! Formatting and small statistics shared by the detectors. Times are UTC (servers usually
//! run in UTC, and the text report says so), so findings are reproducible in tests.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{snapshot::Label, HistorySnapshot};

/// "14:03:07" for a unix second, UTC.
pub fn clock(unix_s: u64) -> String {
    let day_s = unix_s % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        day_s / 3600,
        day_s / 60 % 60,
        day_s % 60
    )
}

/// "14:03:07-14:03:09", or one time when both ends are equal.
pub fn clock_span(start_s: u64, end_s: u64) -> String {
    if start_s == end_s {
        clock(start_s)
    } else {
        format!("{}-{}", clock(start_s), clock(end_s))
    }
}

/// Latency in microseconds as "85 us", "1.2 ms", "340 ms", "2.1 s".
pub fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} us")
    } else if us < 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

/// Seconds with at most one decimal, dropping ".0".
pub fn seconds(s: f64) -> String {
    let rounded = (s * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0} s")
    } else {
        format!("{rounded:.1} s")
    }
}

pub fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    // Keep "almost none" and "almost all" distinguishable from 0% and 100%.
    if (p > 0.0 && p < 1.0) || (p > 99.0 && p < 100.0) {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// "1 write", "3 writes".
pub fn plural(count: u64, word: &str) -> String {
    if count == 1 {
        format!("1 {word}")
    } else {
        format!("{count} {word}s")
    }
}

/// Quantile of an ascending slice by nearest rank; None when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of unsorted values (the mean of the middle two for even lengths); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// Servers close idle connections after (not before) their timeout, usually by up to the
/// period of their idle checker. Given the shortest observed idle time, pick the roundest
/// number just below or at it: 60.4 -> 60, 121 -> 120, 47.2 -> 45, 43.2 -> 43, 3.0 -> 3.
pub fn infer_timeout(shortest_idle_s: f64) -> f64 {
    let lo = shortest_idle_s.max(0.0);
    let slack = (0.05 * lo).max(1.5);
    let (low, high) = (lo - slack, lo + 0.5);
    for step in [3600.0, 600.0, 300.0, 60.0, 30.0, 10.0, 5.0, 1.0] {
        let first = (low / step).ceil().max(1.0);
        let last = (high / step).floor();
        if first > last {
            continue;
        }
        // Several multiples of a small step fit: take the one nearest the observation.
        let nearest = (lo / step).round().clamp(first, last);
        return nearest * step;
    }
    (lo * 10.0).round() / 10.0
}

/// Keeps the first `max` items of a list for evidence, saying how many were left out.
pub fn truncated<T: AsRef<str>>(items: &[T], max: usize) -> String {
    let shown: Vec<&str> = items.iter().take(max).map(AsRef::as_ref).collect();
    let mut text = shown.join(", ");
    if items.len() > max {
        text.push_str(&format!(" and {} more", items.len() - max));
    }
    text
}

/// Every server seen with traffic (requests or opened connections, and with `edges` also the
/// sampled edge connections) per service: a server's peers include those without trouble.
pub fn servers_by_service(
    snap: &HistorySnapshot,
    edges: bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut known: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for second in &snap.seconds {
        let edge_rows = second.edge_connections.iter().filter(|_| edges);
        let servers = second
            .requests
            .iter()
            .map(|r| (r.service, r.server))
            .chain(second.opened.iter().map(|r| (r.service, r.server)))
            .chain(edge_rows.map(|r| (r.service, r.server)));
        for (service, server) in servers {
            known
                .entry(snap.label(service).to_string())
                .or_default()
                .insert(snap.label(server).to_string());
        }
    }
    known
}

/// The entry of `service`'s `server` in a per-service, per-server map, made empty when new.
pub fn by_server<'a, V: Default>(
    services: &'a mut BTreeMap<String, BTreeMap<String, V>>,
    snap: &HistorySnapshot,
    service: Label,
    server: Label,
) -> &'a mut V {
    by_service(services, snap, service, snap.label(server).to_string())
}

/// The entry of `service`'s `key` in a per-service map (by server, second, ...), made empty
/// when new.
pub fn by_service<'a, K: Ord, V: Default>(
    services: &'a mut BTreeMap<String, BTreeMap<K, V>>,
    snap: &HistorySnapshot,
    service: Label,
    key: K,
) -> &'a mut V {
    services
        .entry(snap.label(service).to_string())
        .or_default()
        .entry(key)
        .or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_to_what_operators_configure() {
        assert_eq!(infer_timeout(60.4), 60.0);
        assert_eq!(infer_timeout(61.0), 60.0);
        assert_eq!(infer_timeout(62.9), 60.0);
        assert_eq!(infer_timeout(121.0), 120.0);
        assert_eq!(infer_timeout(300.2), 300.0);
        assert_eq!(infer_timeout(10.3), 10.0);
        assert_eq!(infer_timeout(3.0), 3.0);
        assert_eq!(infer_timeout(47.2), 45.0);
        assert_eq!(infer_timeout(43.2), 43.0);
        assert_eq!(infer_timeout(0.2), 0.2);
    }

    #[test]
    fn formats() {
        assert_eq!(clock(1_700_000_000), "22:13:20");
        assert_eq!(latency(85.0), "85 us");
        assert_eq!(latency(1234.0), "1.2 ms");
        assert_eq!(latency(340_000.0), "340 ms");
        assert_eq!(latency(2_100_000.0), "2.1 s");
        assert_eq!(seconds(60.0), "60 s");
        assert_eq!(seconds(3.25), "3.3 s");
        assert_eq!(percent(0.923), "92%");
        assert_eq!(percent(0.004), "0.4%");
        assert_eq!(percent(1020.0 / 1024.0), "99.6%");
        assert_eq!(plural(1, "write"), "1 write");
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(quantile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.1), Some(1.0));
        assert_eq!(truncated(&["a", "b", "c"], 2), "a, b and 1 more");
    }
}
