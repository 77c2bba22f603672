//! One bad server in a pool: a server that times out or is far slower than its peers, as seen by all of its client hosts together.

use std::collections::BTreeMap;

use super::{
    ms, new_finding,
    prom::{PromError, Sample},
    set_value,
    shared::By,
    Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{util, Severity};

pub const ID: &str = "fleet-bad-server";

/// All by (service, server), summed over client hosts.
#[derive(Debug, Default)]
pub struct Input {
    pub requests: Vec<Sample>,
    pub failed: Vec<Sample>,
    pub p99: Vec<Sample>,
    /// Client hosts sending requests to the server.
    pub client_hosts: Vec<Sample>,
    /// Client hosts that saw failures from it.
    pub failing_hosts: Vec<Sample>,
}

fn failed(status: &str) -> bool {
    matches!(status, "timeout" | "unanswered")
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let requests = c.requests()?;
    let any = |_: &str| true;
    Ok(Input {
        requests: requests.sum(By::ServiceServer, any, |_| true),
        failed: requests.sum(By::ServiceServer, failed, |_| true),
        p99: c.latency()?.quantile(0.99, "client", By::ServiceServer),
        client_hosts: requests.count_hosts(any, |total| total > 0.0),
        failing_hosts: requests.count_hosts(failed, |total| total >= 1.0),
    })
}

#[derive(Debug, Default, Clone)]
struct Server {
    requests: f64,
    failed: f64,
    p99: Option<f64>,
    hosts: f64,
    failing_hosts: f64,
}

pub fn judge(input: &Input, _hosts: &Hosts, t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let mut pools: BTreeMap<String, BTreeMap<String, Server>> = BTreeMap::new();
    fn at<'a>(
        pools: &'a mut BTreeMap<String, BTreeMap<String, Server>>,
        s: &Sample,
    ) -> &'a mut Server {
        pools
            .entry(s.label("service").to_string())
            .or_default()
            .entry(s.label("server").to_string())
            .or_default()
    }
    for s in &input.requests {
        at(&mut pools, s).requests = s.value;
    }
    for s in &input.failed {
        at(&mut pools, s).failed = s.value;
    }
    for s in &input.p99 {
        at(&mut pools, s).p99 = Some(s.value);
    }
    for s in &input.client_hosts {
        at(&mut pools, s).hosts = s.value;
    }
    for s in &input.failing_hosts {
        at(&mut pools, s).failing_hosts = s.value;
    }
    for (service, servers) in &pools {
        // One bad server among several: a pool of one or two has no majority to compare with.
        if servers.len() < 3 {
            continue;
        }
        for (server, s) in servers {
            if s.requests < 1.0 {
                continue;
            }
            let peers: Vec<&Server> = servers
                .iter()
                .filter(|(name, _)| *name != server)
                .map(|(_, p)| p)
                .collect();
            let ratio = s.failed / s.requests;
            let peer_ratio = util::median(
                &peers
                    .iter()
                    .filter(|p| p.requests >= 1.0)
                    .map(|p| p.failed / p.requests)
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(0.0);
            let peer_p99 = util::median(&peers.iter().filter_map(|p| p.p99).collect::<Vec<_>>());
            let hung = ratio >= t.failing_ratio && peer_ratio < t.failing_ratio / 5.0;
            let slow = s.p99.zip(peer_p99).is_some_and(|(p99, peer)| {
                p99 * 1e3 >= t.slow_path_min_ms && p99 >= t.slow_server_factor * 1.5 * peer
            });
            if !hung && !slow {
                continue;
            }
            let seen_by = format!(
                "{} of {} client hosts",
                s.failing_hosts.round(),
                s.hosts.round()
            );
            let mut finding = if hung {
                new_finding(
                    ID,
                    Severity::Critical,
                    format!(
                        "{server} ({service}) does not answer: {} of its requests timed out or went unanswered, against {} on its {} peers",
                        util::percent(ratio),
                        util::percent(peer_ratio),
                        peers.len()
                    ),
                )
            } else {
                new_finding(
                    ID,
                    Severity::Warning,
                    format!(
                        "{server} ({service}) is the slow one of its pool: p99 {} at its clients, peers {}",
                        ms(s.p99.unwrap_or(0.0)),
                        ms(peer_p99.unwrap_or(0.0))
                    ),
                )
            };
            if hung {
                finding.evidence.push(format!(
                    "{} of {} requests failed, seen by {seen_by}: every client of it is affected, not one path",
                    s.failed.round(),
                    s.requests.round()
                ));
            } else {
                finding.evidence.push(format!(
                    "seen from {} client hosts together",
                    s.hosts.round()
                ));
            }
            finding.advice = if hung {
                "Check the server process and host (alive, swapping, blocked, out of memory or \
                 connections). Until it is back, clients configured to eject failing servers \
                 should drop it from their ring; others time out on a share of their keys."
                    .to_string()
            } else {
                "Compare the slow server with its peers: CPU, swap, evictions, network \
                 interface, hot keys on it (cacheprobe keys on a client)."
                    .to_string()
            };
            finding.subjects.services = vec![service.clone()];
            finding.subjects.servers = vec![server.clone()];
            set_value(&mut finding, "failed_ratio", ratio);
            set_value(&mut finding, "peer_failed_ratio", peer_ratio);
            set_value(&mut finding, "failed", s.failed.round());
            set_value(&mut finding, "client_hosts", s.hosts);
            set_value(&mut finding, "failing_client_hosts", s.failing_hosts);
            if let Some(p99) = s.p99 {
                set_value(&mut finding, "p99_ms", p99 * 1e3);
            }
            if let Some(peer) = peer_p99 {
                set_value(&mut finding, "peer_p99_ms", peer * 1e3);
            }
            finding.magnitude = if hung { ratio } else { s.p99.unwrap_or(0.0) };
            out.findings.push(finding);
        }
    }
    out
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::sample;

    fn pool(servers: &[(&str, f64, f64, f64, f64)]) -> Input {
        let mut input = Input::default();
        for (server, requests, failed, p99, failing_hosts) in servers {
            let l = [("service", "memcached"), ("server", *server)];
            input.requests.push(sample(&l, *requests));
            input.failed.push(sample(&l, *failed));
            input.p99.push(sample(&l, *p99));
            input.client_hosts.push(sample(&l, 8.0));
            if *failing_hosts > 0.0 {
                input.failing_hosts.push(sample(&l, *failing_hosts));
            }
        }
        input
    }

    #[test]
    fn a_hung_server_is_critical_and_seen_by_all_clients() {
        let input = pool(&[
            ("10.0.2.1:11211", 10_000.0, 0.0, 0.001, 0.0),
            ("10.0.2.2:11211", 10_000.0, 3.0, 0.001, 1.0),
            ("10.0.2.3:11211", 4_000.0, 2_000.0, 0.9, 8.0),
        ]);
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        let f = &out.findings[0];
        assert_eq!(f.severity, Severity::Critical);
        assert_eq!(f.subjects.servers, vec!["10.0.2.3:11211".to_string()]);
        assert_eq!(f.values["failed_ratio"], 0.5);
        assert_eq!(f.values["failing_client_hosts"], 8.0);
        assert!(
            f.evidence[0].contains("seen by 8 of 8 client hosts"),
            "{}",
            f.evidence[0]
        );
    }

    #[test]
    fn a_slow_server_is_a_warning_and_small_pools_are_not_judged() {
        let input = pool(&[
            ("a:1", 1000.0, 0.0, 0.001, 0.0),
            ("b:1", 1000.0, 0.0, 0.0012, 0.0),
            ("c:1", 1000.0, 0.0, 0.0011, 0.0),
            ("d:1", 1000.0, 0.0, 0.080, 0.0),
        ]);
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1);
        assert_eq!(out.findings[0].severity, Severity::Warning);
        assert_eq!(out.findings[0].subjects.servers, vec!["d:1".to_string()]);
        assert_eq!(out.findings[0].values["peer_p99_ms"], 1.1);

        let input = pool(&[
            ("a:1", 1000.0, 900.0, 1.0, 8.0),
            ("b:1", 1000.0, 0.0, 0.001, 0.0),
        ]);
        assert!(
            judge(&input, &Hosts::default(), &FleetThresholds::default())
                .findings
                .is_empty()
        );
    }
}
