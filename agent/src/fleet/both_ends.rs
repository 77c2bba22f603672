//! One request seen from both ends: client and server exemplars of the latency histogram joined on their request id (from the connection's 4-tuple and the TCP sequence number of the request's first byte), so the slowest requests show the client's time, the server's time and the time between the boxes.

use std::collections::BTreeMap;

use super::{
    increase_with_new, ms, new_finding,
    prom::{ExemplarSeries, PromError, Sample},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{Finding, Severity};

pub const ID: &str = "fleet-request-both-ends";

/// Joined requests shown per finding.
const SHOWN: usize = 5;
/// Client hosts with a finding of their own: the slowest request's, then others whose time
/// went between the boxes.
const SHOWN_HOSTS: usize = 5;
/// Exemplars carry the scrape time: two sightings of one request more than this apart are
/// not the same request (a sequence number met again on another connection).
const JOIN_WINDOW_S: f64 = 300.0;

#[derive(Debug, Default)]
pub struct Input {
    /// Exemplars of `cacheprobe_memcache_request_duration_seconds_bucket`, both roles.
    pub exemplars: Vec<ExemplarSeries>,
    /// Client-side retransmits in the window, by (instance, server).
    pub retransmits: Vec<Sample>,
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    Ok(Input {
        exemplars: c.exemplars(&format!(
            "cacheprobe_memcache_request_duration_seconds_bucket{{{}}}",
            svc.trim_start_matches(',')
        ))?,
        retransmits: c.instant(&format!(
            "sum by (instance, server) ({}) > 0",
            increase_with_new(
                &format!("cacheprobe_tcp_retransmits_total{{role=\"client\"{svc}}}"),
                &w
            )
        ))?,
    })
}

/// One end's sighting of a request.
#[derive(Debug, Clone)]
struct Sighting<'a> {
    instance: &'a str,
    service: &'a str,
    server: &'a str,
    command: &'a str,
    seconds: f64,
    at_s: f64,
}

/// A request seen by a client's agent and by its server's.
#[derive(Debug, Clone)]
pub struct Joined {
    pub request_id: String,
    pub client_instance: String,
    pub server_instance: String,
    pub service: String,
    pub server: String,
    pub command: String,
    pub client_s: f64,
    pub server_s: f64,
    pub at_s: u64,
}

impl Joined {
    pub fn between_s(&self) -> f64 {
        (self.client_s - self.server_s).max(0.0)
    }
}

/// Every request both ends reported, slowest at the client first.
pub fn join(exemplars: &[ExemplarSeries]) -> (Vec<Joined>, usize, usize) {
    // request id -> (client sightings, server sightings)
    type Sides<'a> = (Vec<Sighting<'a>>, Vec<Sighting<'a>>);
    let mut by_id: BTreeMap<&str, Sides> = BTreeMap::new();
    for series in exemplars {
        let role = series.label("role");
        for exemplar in &series.exemplars {
            let Some(id) = exemplar.labels.get("request_id") else {
                continue;
            };
            if !exemplar.value.is_finite() {
                continue;
            }
            let sighting = Sighting {
                instance: series.label("instance"),
                service: series.label("service"),
                server: series.label("server"),
                command: series.label("command"),
                seconds: exemplar.value,
                at_s: exemplar.timestamp,
            };
            let sides = by_id.entry(id).or_default();
            match role {
                "client" => sides.0.push(sighting),
                "server" => sides.1.push(sighting),
                _ => {}
            }
        }
    }
    let clients = by_id.values().filter(|(c, _)| !c.is_empty()).count();
    let servers = by_id.values().filter(|(_, s)| !s.is_empty()).count();
    let mut joined = Vec::new();
    for (id, (client_side, server_side)) in &by_id {
        // Repeated scrapes report one exemplar again: the earliest sighting stands for all.
        let Some(client) = client_side.iter().min_by(|a, b| a.at_s.total_cmp(&b.at_s)) else {
            continue;
        };
        let Some(server) = server_side
            .iter()
            .filter(|s| s.server == client.server && (s.at_s - client.at_s).abs() <= JOIN_WINDOW_S)
            .min_by(|a, b| a.at_s.total_cmp(&b.at_s))
        else {
            continue;
        };
        joined.push(Joined {
            request_id: id.to_string(),
            client_instance: client.instance.to_string(),
            server_instance: server.instance.to_string(),
            service: client.service.to_string(),
            server: client.server.to_string(),
            command: client.command.to_string(),
            client_s: client.seconds,
            server_s: server.seconds,
            at_s: client.at_s.max(0.0) as u64,
        });
    }
    joined.sort_by(|a, b| {
        b.client_s
            .total_cmp(&a.client_s)
            .then_with(|| a.request_id.cmp(&b.request_id))
    });
    (joined, clients, servers)
}

pub fn judge(input: &Input, hosts: &Hosts, t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let (joined, clients, servers) = join(&input.exemplars);
    if clients == 0 && servers == 0 {
        out.notes.push(
            "no request exemplars in Prometheus: slow requests could not be seen from both ends \
             (needs agents with request ids, Prometheus with --enable-feature=exemplar-storage, \
             and OpenMetrics scrapes)"
                .to_string(),
        );
        return out;
    }
    let Some(slowest) = joined.first() else {
        out.notes.push(format!(
            "{clients} requests seen by clients and {servers} by servers, none by both: the \
             servers are not watched, NAT or a proxy (twemproxy) stands between the boxes \
             (their requests cannot be joined), or the requests were slow at one end only and \
             outside the sampled slice (limits.exemplar_sample_one_in)"
        ));
        return out;
    };
    let retransmits: Retransmits = input
        .retransmits
        .iter()
        .map(|s| ((s.label("instance"), s.label("server")), s.value))
        .collect();
    out.findings
        .push(finding(slowest, &joined, &retransmits, hosts, t));
    // One slow request anywhere (a stalled host, a GC pause) would otherwise hide a lossy path
    // behind it: each other client host whose own slowest request spent its time between the
    // boxes gets its finding too, slowest first, a bounded few.
    let mut by_host: BTreeMap<&str, Vec<Joined>> = BTreeMap::new();
    for request in &joined {
        by_host
            .entry(request.client_instance.as_str())
            .or_default()
            .push(request.clone());
    }
    let mut others: Vec<&Vec<Joined>> = by_host
        .iter()
        .filter(|(host, requests)| {
            **host != slowest.client_instance && between_dominates(&requests[0], t)
        })
        .map(|(_, requests)| requests)
        .collect();
    others.sort_by(|a, b| b[0].client_s.total_cmp(&a[0].client_s));
    for requests in others.into_iter().take(SHOWN_HOSTS - 1) {
        out.findings
            .push(finding(&requests[0], requests, &retransmits, hosts, t));
    }
    out
}

/// Whether a request's time went mostly between the boxes, and that time is slow.
fn between_dominates(request: &Joined, t: &FleetThresholds) -> bool {
    let between = request.between_s();
    between * 1e3 >= t.slow_path_min_ms && between >= request.server_s
}

/// Retransmits in the window by (client instance, server).
type Retransmits<'a> = BTreeMap<(&'a str, &'a str), f64>;

/// The slowest joined request and the others shown, Warning when the time between the boxes
/// dominates.
fn finding(
    slowest: &Joined,
    joined: &[Joined],
    retransmits: &Retransmits,
    hosts: &Hosts,
    t: &FleetThresholds,
) -> Finding {
    let between = slowest.between_s();
    let between_dominates = between_dominates(slowest, t);
    let mut finding = new_finding(
        ID,
        if between_dominates {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "slowest request seen from both ends: {} -> {} {} took {} at the client, {} in the \
             server, {} between the boxes",
            hosts.short(&slowest.client_instance),
            slowest.server,
            slowest.command,
            ms(slowest.client_s),
            ms(slowest.server_s),
            ms(between)
        ),
    );
    for request in joined.iter().take(SHOWN) {
        finding
            .evidence
            .push(request_line(request, retransmits, hosts));
    }
    if joined.len() > SHOWN {
        finding.evidence.push(format!(
            "{} more requests seen from both ends",
            joined.len() - SHOWN
        ));
    }
    finding.advice = if between_dominates {
        "Time between the boxes is the network, retransmits and kernel queues on either host: \
         check the client host's load and this path's retransmits (fleet-slow-path). Requests \
         through NAT or a proxy (twemproxy) cannot be joined and are not shown."
            .to_string()
    } else {
        "The server's own time explains these requests: see its load and slow commands. \
         Requests through NAT or a proxy (twemproxy) cannot be joined and are not shown."
            .to_string()
    };
    finding.subjects.hosts = vec![
        slowest.client_instance.clone(),
        slowest.server_instance.clone(),
    ];
    finding.subjects.hosts.dedup();
    finding.subjects.servers = vec![slowest.server.clone()];
    finding.subjects.services = vec![slowest.service.clone()];
    finding.subjects.commands = vec![slowest.command.clone()];
    set_value(&mut finding, "client_ms", slowest.client_s * 1e3);
    set_value(&mut finding, "server_ms", slowest.server_s * 1e3);
    set_value(&mut finding, "between_ms", between * 1e3);
    set_value(&mut finding, "requests_joined", joined.len() as f64);
    if let Some(n) = retransmits.get(&(slowest.client_instance.as_str(), slowest.server.as_str())) {
        set_value(&mut finding, "retransmits", *n);
    }
    finding.magnitude = between * 1e3;
    finding
}

/// One joined request: both ends' times, and its path's retransmits if any.
fn request_line(request: &Joined, retransmits: &Retransmits, hosts: &Hosts) -> String {
    let mut line = format!(
        "request {} at {}: {} -> {} on {}, {}: client {}, server {}, between {}",
        request.request_id,
        crate::diagnose::util::clock(request.at_s),
        hosts.describe(&request.client_instance),
        request.server,
        hosts.describe(&request.server_instance),
        request.command,
        ms(request.client_s),
        ms(request.server_s),
        ms(request.between_s())
    );
    if let Some(n) = retransmits.get(&(request.client_instance.as_str(), request.server.as_str())) {
        line.push_str(&format!(
            "; {n:.0} retransmits on this client's path to the server in the window"
        ));
    }
    line
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{prom::parse_exemplars, testkit::sample};

    /// A client saw request 00aa take 212 ms, the server 0.1 ms: 212 ms between the boxes,
    /// with the path's retransmits. A client-only exemplar and a server-only one join nothing;
    /// the same id seen again in a later scrape counts once.
    #[test]
    fn joins_client_and_server_sightings_of_one_request() {
        let body = r#"{"status":"success","data":[
          {"seriesLabels":{"instance":"web-3:19150","role":"client","service":"memcached","server":"10.0.0.2:11211","command":"get","le":"0.25"},
           "exemplars":[{"labels":{"request_id":"00aa"},"value":"0.212","timestamp":1700000000},
                        {"labels":{"request_id":"00aa"},"value":"0.212","timestamp":1700000015},
                        {"labels":{"request_id":"00bb"},"value":"0.2","timestamp":1700000000}]},
          {"seriesLabels":{"instance":"web-4:19150","role":"client","service":"memcached","server":"10.0.0.2:11211","command":"set","le":"0.0025"},
           "exemplars":[{"labels":{"request_id":"00cc"},"value":"0.002","timestamp":1700000001}]},
          {"seriesLabels":{"instance":"cache-1:19150","role":"server","service":"memcached","server":"10.0.0.2:11211","command":"get","le":"0.0001"},
           "exemplars":[{"labels":{"request_id":"00aa"},"value":"0.0001","timestamp":1700000004},
                        {"labels":{"request_id":"00dd"},"value":"0.0001","timestamp":1700000004}]},
          {"seriesLabels":{"instance":"cache-1:19150","role":"server","service":"memcached","server":"10.0.0.2:11211","command":"set","le":"0.001"},
           "exemplars":[{"labels":{"request_id":"00cc"},"value":"0.0009","timestamp":1700000004}]}
        ]}"#;
        let input = Input {
            exemplars: parse_exemplars("u", "q", body).unwrap().data,
            retransmits: vec![sample(
                &[("instance", "web-3:19150"), ("server", "10.0.0.2:11211")],
                3.0,
            )],
        };
        let (joined, clients, servers) = join(&input.exemplars);
        assert_eq!((joined.len(), clients, servers), (2, 3, 3));
        assert_eq!(joined[0].request_id, "00aa");
        assert_eq!(joined[0].at_s, 1_700_000_000);
        assert!((joined[0].between_s() - 0.2119).abs() < 1e-9);
        assert_eq!(joined[1].request_id, "00cc");

        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1);
        let finding = &out.findings[0];
        assert_eq!(finding.severity, Severity::Warning);
        assert!(
            finding
                .title
                .contains("web-3:19150 -> 10.0.0.2:11211 get took 212"),
            "{}",
            finding.title
        );
        assert_eq!(finding.values["retransmits"], 3.0);
        assert_eq!(finding.values["requests_joined"], 2.0);
        assert!((finding.values["between_ms"] - 211.9).abs() < 1e-6);
        assert!(
            finding.evidence[0].contains("3 retransmits"),
            "{:?}",
            finding.evidence
        );
        assert_eq!(finding.subjects.hosts, ["web-3:19150", "cache-1:19150"]);
    }

    /// A 2.1 s stall on one client host is the slowest request; the lossy path of another
    /// host still gets its own finding, and a host whose requests were fast gets none.
    #[test]
    fn a_stalled_host_does_not_hide_another_hosts_lossy_path() {
        let body = r#"{"status":"success","data":[
          {"seriesLabels":{"instance":"cache-1:19150","role":"client","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"01"},"value":"2.1","timestamp":1700000000}]},
          {"seriesLabels":{"instance":"web-1:19150","role":"client","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"02"},"value":"0.41","timestamp":1700000000},
                        {"labels":{"request_id":"03"},"value":"0.22","timestamp":1700000001}]},
          {"seriesLabels":{"instance":"web-2:19150","role":"client","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"04"},"value":"0.002","timestamp":1700000000}]},
          {"seriesLabels":{"instance":"cache-1:19150","role":"server","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"01"},"value":"0.0005","timestamp":1700000003},
                        {"labels":{"request_id":"02"},"value":"0.0004","timestamp":1700000003},
                        {"labels":{"request_id":"03"},"value":"0.0004","timestamp":1700000003},
                        {"labels":{"request_id":"04"},"value":"0.0004","timestamp":1700000003}]}
        ]}"#;
        let input = Input {
            exemplars: parse_exemplars("u", "q", body).unwrap().data,
            retransmits: vec![sample(
                &[("instance", "web-1:19150"), ("server", "s:1")],
                4.0,
            )],
        };
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        let hosts: Vec<&str> = out
            .findings
            .iter()
            .map(|f| f.subjects.hosts[0].as_str())
            .collect();
        assert_eq!(hosts, ["cache-1:19150", "web-1:19150"]);
        let lossy = &out.findings[1];
        assert_eq!(lossy.severity, Severity::Warning);
        assert!((lossy.values["between_ms"] - 409.6).abs() < 1e-6);
        assert_eq!(lossy.values["retransmits"], 4.0);
        assert_eq!(lossy.values["requests_joined"], 2.0);
    }

    /// A slow server explains its requests: info, not a warning about the path.
    #[test]
    fn a_request_slow_in_the_server_is_not_blamed_on_the_path() {
        let body = r#"{"status":"success","data":[
          {"seriesLabels":{"instance":"web-3:19150","role":"client","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"01"},"value":"0.3","timestamp":1700000000}]},
          {"seriesLabels":{"instance":"cache-1:19150","role":"server","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"01"},"value":"0.299","timestamp":1700000003}]}
        ]}"#;
        let input = Input {
            exemplars: parse_exemplars("u", "q", body).unwrap().data,
            retransmits: Vec::new(),
        };
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings[0].severity, Severity::Info);
    }

    /// No exemplars at all, or none joined: a note that says why, no finding.
    #[test]
    fn says_why_nothing_joined() {
        let out = judge(
            &Input::default(),
            &Hosts::default(),
            &FleetThresholds::default(),
        );
        assert!(out.findings.is_empty());
        assert!(out.notes[0].contains("exemplar-storage"), "{:?}", out.notes);
        let body = r#"{"status":"success","data":[
          {"seriesLabels":{"instance":"web-3:19150","role":"client","server":"s:1","command":"get"},
           "exemplars":[{"labels":{"request_id":"01"},"value":"0.3","timestamp":1700000000}]}
        ]}"#;
        let input = Input {
            exemplars: parse_exemplars("u", "q", body).unwrap().data,
            retransmits: Vec::new(),
        };
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert!(out.findings.is_empty());
        assert!(out.notes[0].contains("twemproxy"), "{:?}", out.notes);
    }
}
