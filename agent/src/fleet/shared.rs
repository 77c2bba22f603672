//! Query results several fleet detectors share, fetched once per run and derived in Rust: reading every latency bucket series of a large fleet is most of a run's cost, so it happens once instead of once per quantile and detector.

use std::collections::BTreeMap;

use super::{
    prom::{PromError, Sample},
    Collector,
};

pub const HIST: &str = "cacheprobe_memcache_request_duration_seconds";
const REQUESTS: &str = "cacheprobe_memcache_requests_total";

/// One (role, instance, service, server)'s latency histogram over the window.
#[derive(Debug, Clone, Default)]
struct Hist {
    /// (upper bound, cumulative per-second rate), unsorted as Prometheus returned them.
    buckets: Vec<(f64, f64)>,
    /// Per-second rate of the summed latency, when the `_sum` series exists.
    sum: Option<f64>,
}

type PathKey = (String, String, String, String); // (role, instance, service, server)

/// Client- and server-side latency histograms by (role, instance, service, server).
#[derive(Debug, Clone, Default)]
pub struct Latency {
    paths: BTreeMap<PathKey, Hist>,
}

/// Which labels a derived sample keeps: per host, or summed over hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    InstanceServiceServer,
    ServiceServer,
}

fn sample(by: By, instance: &str, service: &str, server: &str, value: f64) -> Sample {
    let mut labels = BTreeMap::new();
    if by == By::InstanceServiceServer {
        labels.insert("instance".to_string(), instance.to_string());
    }
    labels.insert("service".to_string(), service.to_string());
    labels.insert("server".to_string(), server.to_string());
    Sample { labels, value }
}

impl Latency {
    pub fn from_samples(buckets: &[Sample], sums: &[Sample]) -> Latency {
        let mut paths: BTreeMap<PathKey, Hist> = BTreeMap::new();
        let key = |s: &Sample| {
            (
                s.label("role").to_string(),
                s.label("instance").to_string(),
                s.label("service").to_string(),
                s.label("server").to_string(),
            )
        };
        for s in buckets {
            let le = match s.label("le") {
                "+Inf" => f64::INFINITY,
                text => match text.parse::<f64>() {
                    Ok(le) => le,
                    Err(_) => continue,
                },
            };
            paths.entry(key(s)).or_default().buckets.push((le, s.value));
        }
        for s in sums {
            if let Some(hist) = paths.get_mut(&key(s)) {
                hist.sum = Some(s.value);
            }
        }
        Latency { paths }
    }

    /// The role's histograms grouped by `by`, bucket rates summed within a group.
    fn grouped(&self, role: &str, by: By) -> BTreeMap<(String, String, String), Hist> {
        let mut groups: BTreeMap<(String, String, String), Hist> = BTreeMap::new();
        for ((r, instance, service, server), hist) in &self.paths {
            if r != role {
                continue;
            }
            let instance = match by {
                By::InstanceServiceServer => instance.clone(),
                By::ServiceServer => String::new(),
            };
            let group = groups
                .entry((instance, service.clone(), server.clone()))
                .or_default();
            for &(le, rate) in &hist.buckets {
                match group.buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some(bucket) => bucket.1 += rate,
                    None => group.buckets.push((le, rate)),
                }
            }
            if let Some(sum) = hist.sum {
                group.sum = Some(group.sum.unwrap_or(0.0) + sum);
            }
        }
        groups
    }

    /// `histogram_quantile(q, sum by (le, <by>) (rate(bucket{role}[w])))`, NaNs dropped.
    pub fn quantile(&self, q: f64, role: &str, by: By) -> Vec<Sample> {
        self.grouped(role, by)
            .into_iter()
            .filter_map(|((instance, service, server), hist)| {
                let value = bucket_quantile(q, hist.buckets);
                value
                    .is_finite()
                    .then(|| sample(by, &instance, &service, &server, value))
            })
            .collect()
    }

    /// Requests per second: the `+Inf` bucket's rate.
    pub fn rate(&self, role: &str, by: By) -> Vec<Sample> {
        self.grouped(role, by)
            .into_iter()
            .filter_map(|((instance, service, server), hist)| {
                let count = hist.buckets.iter().find(|(le, _)| le.is_infinite())?.1;
                Some(sample(by, &instance, &service, &server, count))
            })
            .collect()
    }

    /// Mean latency: sum over count, where both exist and the count is not zero.
    pub fn mean(&self, role: &str, by: By) -> Vec<Sample> {
        self.grouped(role, by)
            .into_iter()
            .filter_map(|((instance, service, server), hist)| {
                let count = hist.buckets.iter().find(|(le, _)| le.is_infinite())?.1;
                let mean = hist.sum? / count;
                mean.is_finite()
                    .then(|| sample(by, &instance, &service, &server, mean))
            })
            .collect()
    }
}

/// Prometheus' `histogram_quantile` on one histogram's (upper bound, cumulative count) pairs:
/// the same interpolation, so the numbers match what the same PromQL would have returned.
pub fn bucket_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|(le, _)| !le.is_infinite()) {
        return f64::NAN;
    }
    // Bucket counts scraped at slightly different moments can dip: Prometheus evens them out.
    let mut max = f64::NEG_INFINITY;
    for bucket in buckets.iter_mut() {
        if bucket.1 < max {
            bucket.1 = max;
        } else {
            max = bucket.1;
        }
    }
    if buckets.len() < 2 {
        return f64::NAN;
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = buckets
        .iter()
        .position(|(_, count)| *count >= rank)
        .unwrap_or(buckets.len() - 1);
    if b == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let (mut start, end, mut count) = (0.0, buckets[b].0, buckets[b].1);
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// Client-side request counts over the window by (instance, service, server, status).
#[derive(Debug, Clone, Default)]
pub struct Requests {
    samples: Vec<Sample>,
}

impl Requests {
    /// Increase over the window, summed by `by`, over the statuses `status` accepts; groups
    /// whose total fails `keep` are left out.
    pub fn sum(
        &self,
        by: By,
        status: impl Fn(&str) -> bool,
        keep: impl Fn(f64) -> bool,
    ) -> Vec<Sample> {
        self.grouped(by, &status)
            .into_iter()
            .filter(|(_, total)| keep(*total))
            .map(|((instance, service, server), total)| {
                sample(by, &instance, &service, &server, total)
            })
            .collect()
    }

    /// Client hosts per (service, server) whose own total passes `keep`.
    pub fn count_hosts(
        &self,
        status: impl Fn(&str) -> bool,
        keep: impl Fn(f64) -> bool,
    ) -> Vec<Sample> {
        let mut hosts: BTreeMap<(String, String), f64> = BTreeMap::new();
        for ((_, service, server), total) in self.grouped(By::InstanceServiceServer, &status) {
            if keep(total) {
                *hosts.entry((service, server)).or_default() += 1.0;
            }
        }
        hosts
            .into_iter()
            .map(|((service, server), n)| sample(By::ServiceServer, "", &service, &server, n))
            .collect()
    }

    fn grouped(
        &self,
        by: By,
        status: &impl Fn(&str) -> bool,
    ) -> BTreeMap<(String, String, String), f64> {
        let mut groups: BTreeMap<(String, String, String), f64> = BTreeMap::new();
        for s in &self.samples {
            if !status(s.label("status")) || !s.value.is_finite() {
                continue;
            }
            let instance = match by {
                By::InstanceServiceServer => s.label("instance").to_string(),
                By::ServiceServer => String::new(),
            };
            *groups
                .entry((
                    instance,
                    s.label("service").to_string(),
                    s.label("server").to_string(),
                ))
                .or_default() += s.value;
        }
        groups
    }
}

/// Two halves of the fleet by `instance`, an exact partition whatever the instances look like
/// (a trailing even digit, before the port, or not): each half's buckets are read by a query
/// of its own, side by side, which halves the longest query of a run.
const SHARDS: [&str; 2] = [
    "instance=~\"[^:]*[02468](:[0-9]+)?\"",
    "instance!~\"[^:]*[02468](:[0-9]+)?\"",
];

/// Fetches the latency histograms of both roles: one read of every bucket series, split in
/// two concurrent queries, and the sums beside them.
pub fn fetch_latency(c: &Collector) -> Result<Latency, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    let by = "role, instance, service, server";
    let bucket_query = |shard: &str| {
        format!(
            "sum by (le, {by}) (rate({HIST}_bucket{{role=~\"client|server\",{shard}{svc}}}[{w}]))"
        )
    };
    let sum_query =
        format!("sum by ({by}) (rate({HIST}_sum{{role=~\"client|server\"{svc}}}[{w}]))");
    let (shards, sums) = std::thread::scope(|s| {
        let shards: Vec<_> = SHARDS
            .iter()
            .map(|shard| {
                let query = bucket_query(shard);
                s.spawn(move || c.instant(&query))
            })
            .collect();
        let sums = c.instant(&sum_query);
        let shards: Vec<Result<Vec<Sample>, PromError>> = shards
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|_| Err(panicked())))
            .collect();
        (shards, sums)
    });
    let mut buckets = Vec::new();
    for shard in shards {
        buckets.extend(shard?);
    }
    Ok(Latency::from_samples(&buckets, &sums?))
}

fn panicked() -> PromError {
    PromError::Query {
        query: String::new(),
        error_type: "internal".to_string(),
        error: "a query thread panicked".to_string(),
    }
}

/// Fetches client-side request counts by status: one read of every request counter.
pub fn fetch_requests(c: &Collector) -> Result<Requests, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    // A status's series is born at its first request of that status: the first timeouts of a
    // server that hangs inside the window are in its first value, which increase() misses.
    let counted = super::increase_with_new(&format!("{REQUESTS}{{role=\"client\"{svc}}}"), &w);
    let samples = c.instant(&format!(
        "sum by (instance, service, server, status) ({counted})"
    ))?;
    Ok(Requests { samples })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit;

    /// The interpolation Prometheus documents: linear within the bucket the rank falls in,
    /// the second-highest bound when it falls in +Inf, NaN without observations or +Inf.
    #[test]
    fn quantiles_match_prometheus() {
        let inf = f64::INFINITY;
        let h = vec![(0.1, 50.0), (inf, 100.0), (0.001, 0.0), (0.01, 10.0)];
        // rank 50 lies at the top of (0.01, 0.1].
        assert!((bucket_quantile(0.5, h.clone()) - 0.1).abs() < 1e-12);
        // rank 30: 20 of the 40 in (0.01, 0.1].
        assert!((bucket_quantile(0.3, h.clone()) - 0.055).abs() < 1e-12);
        // rank 99 falls in +Inf: the highest finite bound.
        assert_eq!(bucket_quantile(0.99, h.clone()), 0.1);
        assert!(bucket_quantile(0.5, vec![(0.1, 0.0), (inf, 0.0)]).is_nan());
        assert!(bucket_quantile(0.5, vec![(0.1, 3.0), (1.0, 5.0)]).is_nan());
        // A dip (counts read at different moments) is evened out, not trusted.
        let dip = vec![(0.01, 10.0), (0.1, 8.0), (inf, 20.0)];
        assert!((bucket_quantile(0.25, dip) - 0.01 * 5.0 / 10.0).abs() < 1e-12);
    }

    #[test]
    fn derived_series_sum_over_hosts_and_statuses() {
        let b = |instance: &str, le: &str, v: f64| {
            testkit::sample(
                &[
                    ("role", "client"),
                    ("instance", instance),
                    ("service", "m"),
                    ("server", "s:1"),
                    ("le", le),
                ],
                v,
            )
        };
        let buckets = vec![
            b("a", "0.001", 9.0),
            b("a", "+Inf", 10.0),
            b("b", "0.001", 0.0),
            b("b", "+Inf", 10.0),
        ];
        let sums = vec![testkit::sample(
            &[
                ("role", "client"),
                ("instance", "a"),
                ("service", "m"),
                ("server", "s:1"),
            ],
            0.005,
        )];
        let latency = Latency::from_samples(&buckets, &sums);
        let per_host = latency.rate("client", By::InstanceServiceServer);
        assert_eq!(per_host.len(), 2);
        assert_eq!(per_host[0].label("instance"), "a");
        let pooled = latency.rate("client", By::ServiceServer);
        assert_eq!(pooled.len(), 1);
        assert_eq!(pooled[0].value, 20.0);
        assert_eq!(pooled[0].label("instance"), "");
        assert!(
            (latency.mean("client", By::InstanceServiceServer)[0].value - 0.0005).abs() < 1e-12
        );
        // Host b has every request above 1 ms: its p50 is the highest finite bound.
        let p50 = latency.quantile(0.5, "client", By::InstanceServiceServer);
        assert_eq!(p50[1].value, 0.001);
        assert!(latency
            .quantile(0.5, "server", By::ServiceServer)
            .is_empty());

        let r = |instance: &str, status: &str, v: f64| {
            testkit::sample(
                &[
                    ("instance", instance),
                    ("service", "m"),
                    ("server", "s:1"),
                    ("status", status),
                ],
                v,
            )
        };
        let requests = Requests {
            samples: vec![
                r("a", "hit", 100.0),
                r("a", "timeout", 2.0),
                r("b", "hit", 50.0),
            ],
        };
        let failed = |s: &str| s == "timeout" || s == "unanswered";
        let all = requests.sum(By::ServiceServer, |_| true, |_| true);
        assert_eq!(all[0].value, 152.0);
        let per_host_failed = requests.sum(By::InstanceServiceServer, failed, |v| v > 0.0);
        assert_eq!(per_host_failed.len(), 1);
        assert_eq!(requests.count_hosts(|_| true, |v| v > 0.0)[0].value, 2.0);
        assert_eq!(requests.count_hosts(failed, |v| v >= 1.0)[0].value, 1.0);
    }
}
