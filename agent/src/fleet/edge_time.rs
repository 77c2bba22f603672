//! Time between the boxes: each client host's latency to a server against the latency measured at that server's own socket, naming slow paths (one client slow, others fine) apart from servers slow for everyone.

use std::collections::BTreeMap;

use super::{
    increase_with_new, ms, new_finding,
    prom::{PromError, Sample},
    set_value,
    shared::By,
    Collector, DetectorOutput, FleetThresholds, Hosts, MIN_SLOW_SERVER_REQUESTS,
};
use crate::diagnose::{util, Edge, Finding, Severity};

pub const SLOW_PATH_ID: &str = "fleet-slow-path";
pub const SLOW_SERVER_ID: &str = "fleet-slow-server";

/// Per-(instance, service, server) client-side and per-(service, server) server-side numbers.
#[derive(Debug, Default, Clone)]
pub struct Input {
    pub client_rate: Vec<Sample>,
    pub client_mean: Vec<Sample>,
    pub client_p50: Vec<Sample>,
    pub client_p99: Vec<Sample>,
    pub client_errors: Vec<Sample>,
    pub client_retransmits: Vec<Sample>,
    /// Server side, by (instance, service, server): `instance` is the server's host.
    pub server_mean: Vec<Sample>,
    pub server_p99: Vec<Sample>,
    /// Requests per second measured at the server's socket, and the window's length: a server's
    /// own p99 is judged over at least `MIN_SLOW_SERVER_REQUESTS` requests.
    pub server_rate: Vec<Sample>,
    pub window_s: f64,
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    let by = "instance, service, server";
    let latency = c.latency()?;
    let per_host = By::InstanceServiceServer;
    Ok(Input {
        client_rate: latency.rate("client", per_host),
        client_mean: latency.mean("client", per_host),
        client_p50: latency.quantile(0.5, "client", per_host),
        client_p99: latency.quantile(0.99, "client", per_host),
        client_errors: c.requests()?.sum(
            per_host,
            |status| matches!(status, "timeout" | "unanswered" | "server_error" | "error"),
            |_| true,
        ),
        // A path's retransmit series is born at its first retransmit, often inside the window.
        client_retransmits: c.instant(&format!(
            "sum by ({by}) ({})",
            increase_with_new(
                &format!("cacheprobe_tcp_retransmits_total{{role=\"client\",kind=\"data\"{svc}}}"),
                &w
            )
        ))?,
        server_mean: latency.mean("server", per_host),
        server_p99: latency.quantile(0.99, "server", per_host),
        server_rate: latency.rate("server", per_host),
        window_s: c.scope.window_s.max(60) as f64,
    })
}

type Key = (String, String); // (service, server)

#[derive(Debug, Default, Clone)]
struct ClientPath {
    rate: f64,
    mean: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    errors: f64,
    retransmits: f64,
}

#[derive(Debug, Default, Clone)]
struct ServerSide {
    instance: String,
    mean: Option<f64>,
    p99: Option<f64>,
    requests: f64,
}

fn key(s: &Sample) -> Key {
    (
        s.label("service").to_string(),
        s.label("server").to_string(),
    )
}

type Clients = BTreeMap<Key, BTreeMap<String, ClientPath>>;
type Servers = BTreeMap<Key, ServerSide>;

pub fn judge(input: &Input, hosts: &Hosts, t: &FleetThresholds) -> DetectorOutput {
    let clients = client_paths(input);
    let servers = server_sides(input);
    let mut out = DetectorOutput {
        edges: edges(&clients, &servers, hosts),
        ..DetectorOutput::default()
    };
    out.findings
        .extend(slow_paths(&clients, &servers, hosts, t));
    out.findings
        .extend(slow_servers(&clients, &servers, hosts, t));
    out
}

/// Each client host's numbers per server.
fn client_paths(input: &Input) -> Clients {
    let mut clients = Clients::new();
    fn path<'a>(clients: &'a mut Clients, s: &Sample) -> &'a mut ClientPath {
        clients
            .entry(key(s))
            .or_default()
            .entry(s.label("instance").to_string())
            .or_default()
    }
    for s in &input.client_rate {
        path(&mut clients, s).rate = s.value;
    }
    for s in &input.client_mean {
        path(&mut clients, s).mean = Some(s.value);
    }
    for s in &input.client_p50 {
        path(&mut clients, s).p50 = Some(s.value);
    }
    for s in &input.client_p99 {
        path(&mut clients, s).p99 = Some(s.value);
    }
    for s in &input.client_errors {
        path(&mut clients, s).errors = s.value;
    }
    for s in &input.client_retransmits {
        path(&mut clients, s).retransmits = s.value;
    }
    clients
}

/// Each server's latency at its own socket.
fn server_sides(input: &Input) -> Servers {
    let mut servers = Servers::new();
    for s in &input.server_mean {
        let side = servers.entry(key(s)).or_default();
        side.instance = s.label("instance").to_string();
        side.mean = Some(s.value);
    }
    for s in &input.server_p99 {
        let side = servers.entry(key(s)).or_default();
        side.instance = s.label("instance").to_string();
        side.p99 = Some(s.value);
    }
    for s in &input.server_rate {
        if let Some(side) = servers.get_mut(&key(s)) {
            side.requests = s.value * input.window_s;
        }
    }
    servers
}

/// The table: every client host -> server path, with the server's own view beside it.
fn edges(clients: &Clients, servers: &Servers, hosts: &Hosts) -> Vec<Edge> {
    let mut edges = Vec::new();
    for ((service, server), paths) in clients {
        let side = servers.get(&(service.clone(), server.clone()));
        for (instance, p) in paths {
            if p.rate <= 0.0 {
                continue;
            }
            edges.push(Edge {
                process: "*".to_string(),
                service: service.clone(),
                server: server.clone(),
                requests: 0,
                requests_per_s: p.rate,
                p50_ms: p.p50.map(|v| v * 1e3),
                p99_ms: p.p99.map(|v| v * 1e3),
                errors: p.errors.round().max(0.0) as u64,
                connections: None,
                host: Some(hosts.short(instance)),
                server_p99_ms: side.and_then(|s| s.p99).map(|v| v * 1e3),
            });
        }
    }
    edges
}

/// Slow paths: one client's p99 far above the server's other clients and above what the
/// server itself measured, or its p50 so (a starved or loaded fleet pushes every path's p99
/// into the top latency bucket, where no p99 stands out, while the lossy path's median still
/// does; the p99 rule stays because a mildly lossy path moves only its tail).
fn slow_paths(
    clients: &Clients,
    servers: &Servers,
    hosts: &Hosts,
    t: &FleetThresholds,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for ((service, server), paths) in clients {
        let side = servers.get(&(service.clone(), server.clone()));
        let judged: Vec<(&String, &ClientPath, f64)> = paths
            .iter()
            .filter(|(_, p)| p.rate >= t.min_requests_per_s)
            .filter_map(|(i, p)| p.p99.map(|p99| (i, p, p99)))
            .collect();
        if judged.len() < 2 {
            continue;
        }
        for (instance, p, p99) in &judged {
            let others: Vec<f64> = judged
                .iter()
                .filter(|(i, _, _)| i != instance)
                .map(|(_, _, v)| *v)
                .collect();
            let others_p99 = util::median(&others).unwrap_or(0.0);
            let server_p99 = side.and_then(|s| s.p99);
            let slow_tail = *p99 * 1e3 >= t.slow_path_min_ms
                && *p99 >= t.slow_path_factor * others_p99
                && server_p99.is_none_or(|s| *p99 >= t.slow_path_factor * s);
            let median = slow_median(instance, p, &judged, side, t);
            if !slow_tail && median.is_none() {
                continue;
            }
            let path = SlowPath {
                service,
                server,
                instance,
                p,
                p99: *p99,
                others: others.len(),
                others_p99,
                server_p99,
                server_mean: side.and_then(|s| s.mean),
                median: median.filter(|_| !slow_tail),
            };
            findings.push(slow_path_finding(&path, hosts));
        }
    }
    findings
}

/// The path's p50 and the other clients' median p50 when its median alone is slow: at least
/// `slow_path_factor` times the other clients' and the server's own mean, and twice
/// `slow_path_min_ms` (a median that high is no single slow request).
fn slow_median(
    instance: &str,
    p: &ClientPath,
    judged: &[(&String, &ClientPath, f64)],
    side: Option<&ServerSide>,
    t: &FleetThresholds,
) -> Option<(f64, f64)> {
    let p50 = p.p50?;
    let others: Vec<f64> = judged
        .iter()
        .filter(|(i, _, _)| i.as_str() != instance)
        .filter_map(|(_, other, _)| other.p50)
        .collect();
    let others_p50 = util::median(&others)?;
    let slow = p50 * 1e3 >= 2.0 * t.slow_path_min_ms
        && p50 >= t.slow_path_factor * others_p50
        && side
            .and_then(|s| s.mean)
            .is_none_or(|mean| p50 >= t.slow_path_factor * mean);
    slow.then_some((p50, others_p50))
}

/// One client path judged slow, with what it is compared against.
struct SlowPath<'a> {
    service: &'a str,
    server: &'a str,
    instance: &'a str,
    p: &'a ClientPath,
    p99: f64,
    others: usize,
    others_p99: f64,
    server_p99: Option<f64>,
    server_mean: Option<f64>,
    /// (this path's p50, the other clients' median p50) when only the median is slow.
    median: Option<(f64, f64)>,
}

fn slow_path_finding(path: &SlowPath, hosts: &Hosts) -> Finding {
    let SlowPath {
        service,
        server,
        instance,
        p,
        p99,
        others_p99,
        server_p99,
        ..
    } = *path;
    let host = hosts.describe(instance);
    let between = server_p99.map(|s| (p99 - s).max(0.0));
    let mut finding = new_finding(
        SLOW_PATH_ID,
        Severity::Warning,
        format!(
            "{host} -> {server} ({service}) is slow: p99 {} from this client while the server's {} other clients see {}",
            ms(p99),
            path.others,
            ms(others_p99)
        ),
    );
    match (server_p99, between) {
        (Some(s), Some(b)) => finding.evidence.push(format!(
            "p99 at the server's own socket: {}; {} of this client's p99 is spent between the boxes (network, retransmits, kernel queues)",
            ms(s),
            ms(b)
        )),
        _ => finding.evidence.push(
            "the server's host runs no agent, so its own latency is unknown; the other clients being fast points at this path".to_string(),
        ),
    }
    if let (Some(mean), Some(server_mean)) = (p.mean, path.server_mean) {
        finding.evidence.push(format!(
            "mean: {} at this client, {} at the server, {} between",
            ms(mean),
            ms(server_mean),
            ms((mean - server_mean).max(0.0))
        ));
    }
    if p.retransmits > 0.0 {
        finding.evidence.push(format!(
            "{} data retransmits on this host's connections to the server in the window",
            p.retransmits.round()
        ));
    }
    finding
        .evidence
        .push(format!("{:.1} requests/s from this host", p.rate));
    finding.advice = format!(
        "The server answers quickly and its other clients are fine: look at the path from {} (interface errors and drops with `ip -s link`, `ethtool -S`, its switch port, a saturated link, CPU or softirq load on the client host) rather than at the server.",
        hosts.short(instance)
    );
    finding.subjects.services = vec![service.to_string()];
    finding.subjects.servers = vec![server.to_string()];
    finding.subjects.hosts = vec![instance.to_string()];
    set_value(&mut finding, "p99_ms", p99 * 1e3);
    set_value(&mut finding, "others_p99_ms", others_p99 * 1e3);
    if let Some(s) = server_p99 {
        set_value(&mut finding, "server_p99_ms", s * 1e3);
    }
    if let Some(b) = between {
        set_value(&mut finding, "between_p99_ms", b * 1e3);
    }
    if let Some((p50, others_p50)) = path.median {
        finding.evidence.push(format!(
            "judged by the median: p50 {} from this client against {} at the others (every path's p99 is high in this window)",
            ms(p50),
            ms(others_p50)
        ));
        set_value(&mut finding, "p50_ms", p50 * 1e3);
        set_value(&mut finding, "others_p50_ms", others_p50 * 1e3);
    }
    set_value(&mut finding, "retransmits", p.retransmits);
    finding.magnitude = p99;
    finding
}

/// Slow servers: measured slow at their own socket, so slow for every client.
fn slow_servers(
    clients: &Clients,
    servers: &Servers,
    hosts: &Hosts,
    t: &FleetThresholds,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    // Every server with a p99 is a peer; only those over enough requests are judged. A peer's
    // p99 over few requests is about its slowest one, so it shows a slow host (every server of
    // a starved host, seen in `cargo xtask fleet-test` at load 16: 11211 42 ms over 120
    // requests, its peers 55 and 85 ms over fewer) and keeps its one busy server from being
    // named slow for want of peers.
    let mut by_service: BTreeMap<&str, Vec<(&str, &ServerSide, f64)>> = BTreeMap::new();
    for ((service, server), side) in servers {
        if let Some(p99) = side.p99 {
            by_service
                .entry(service.as_str())
                .or_default()
                .push((server.as_str(), side, p99));
        }
    }
    for (service, list) in by_service {
        for (server, side, p99) in &list {
            if side.requests < MIN_SLOW_SERVER_REQUESTS {
                continue;
            }
            let peers: Vec<f64> = list
                .iter()
                .filter(|(s, _, _)| s != server)
                .map(|(_, _, v)| *v)
                .collect();
            let peer_p99 = util::median(&peers);
            let slow = *p99 * 1e3 >= t.slow_server_min_ms
                && peer_p99.is_none_or(|peer| *p99 >= t.slow_server_factor * peer);
            if !slow {
                continue;
            }
            let paths = clients.get(&(service.to_string(), server.to_string()));
            let client_p99s: Vec<f64> = paths
                .map(|p| p.values().filter_map(|c| c.p99).collect())
                .unwrap_or_default();
            let peers = (peers.len(), peer_p99);
            findings.push(slow_server_finding(
                (service, server),
                side,
                *p99,
                peers,
                &client_p99s,
                hosts,
            ));
        }
    }
    findings
}

/// A server slow at its own socket, with its peers' median and what its clients see.
fn slow_server_finding(
    (service, server): (&str, &str),
    side: &ServerSide,
    p99: f64,
    (peer_count, peer_p99): (usize, Option<f64>),
    client_p99s: &[f64],
    hosts: &Hosts,
) -> Finding {
    let mut finding = new_finding(
        SLOW_SERVER_ID,
        Severity::Warning,
        format!(
            "{server} ({service}) on {} is slow for everyone: p99 {} measured at the server itself",
            hosts.describe(&side.instance),
            ms(p99)
        ),
    );
    if let Some(peer) = peer_p99 {
        finding.evidence.push(format!(
            "the other {} servers of {service} answer with p99 {} (median)",
            peer_count,
            ms(peer)
        ));
    }
    if let Some(median) = util::median(client_p99s) {
        finding.evidence.push(format!(
            "its {} client hosts see p99 {} (median): the time is spent in the server, not between the boxes",
            client_p99s.len(),
            ms(median)
        ));
    }
    finding.advice = "The server itself is slow: check its CPU, swap, eviction and \
        slab pressure, and large multi-gets or values; the network is not the cause."
        .to_string();
    finding.subjects.services = vec![service.to_string()];
    finding.subjects.servers = vec![server.to_string()];
    finding.subjects.hosts = vec![side.instance.clone()];
    set_value(&mut finding, "server_p99_ms", p99 * 1e3);
    if let Some(peer) = peer_p99 {
        set_value(&mut finding, "peer_p99_ms", peer * 1e3);
    }
    finding.magnitude = p99;
    finding
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::sample;

    fn client(instance: &str, server: &str, p99: f64, mean: f64) -> [Sample; 3] {
        let l = [
            ("instance", instance),
            ("service", "memcached"),
            ("server", server),
        ];
        [sample(&l, 50.0), sample(&l, p99), sample(&l, mean)]
    }

    fn input(clients: &[(&str, &str, f64, f64)], servers: &[(&str, &str, f64)]) -> Input {
        let mut input = Input::default();
        for (instance, server, p99, mean) in clients {
            let [rate, p99, mean] = client(instance, server, *p99, *mean);
            input.client_rate.push(rate);
            input.client_p99.push(p99);
            input.client_mean.push(mean);
        }
        for (instance, server, p99) in servers {
            let l = [
                ("instance", *instance),
                ("service", "memcached"),
                ("server", *server),
            ];
            input.server_p99.push(sample(&l, *p99));
            input.server_mean.push(sample(&l, p99 / 4.0));
            input.server_rate.push(sample(&l, 50.0));
        }
        input.window_s = 1800.0;
        input
    }

    #[test]
    fn one_slow_client_path_is_named_with_the_split() {
        let mut hosts = Hosts::default();
        hosts.names.insert("10.0.1.3:19150".into(), "web-3".into());
        let mut input = input(
            &[
                ("10.0.1.1:19150", "10.0.2.1:11211", 0.0009, 0.0003),
                ("10.0.1.2:19150", "10.0.2.1:11211", 0.0010, 0.0003),
                ("10.0.1.3:19150", "10.0.2.1:11211", 0.2400, 0.0120),
                ("10.0.1.4:19150", "10.0.2.1:11211", 0.0008, 0.0003),
            ],
            &[("10.0.2.1:19150", "10.0.2.1:11211", 0.0004)],
        );
        input.client_retransmits.push(sample(
            &[
                ("instance", "10.0.1.3:19150"),
                ("service", "memcached"),
                ("server", "10.0.2.1:11211"),
            ],
            42.0,
        ));
        let out = judge(&input, &hosts, &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        let f = &out.findings[0];
        assert_eq!(f.id, SLOW_PATH_ID);
        assert_eq!(f.subjects.hosts, vec!["10.0.1.3:19150".to_string()]);
        assert!(
            f.title
                .starts_with("web-3 (10.0.1.3:19150) -> 10.0.2.1:11211"),
            "{}",
            f.title
        );
        assert_eq!(f.values["p99_ms"], 240.0);
        assert!((f.values["between_p99_ms"] - 239.6).abs() < 1e-9);
        assert_eq!(f.values["others_p99_ms"], 0.9);
        assert_eq!(f.values["retransmits"], 42.0);
        assert!(f.evidence.iter().any(|e| e.contains("42 data retransmits")));
        // Every path is in the table, with the server's own p99 beside it.
        assert_eq!(out.edges.len(), 4);
        assert!(out.edges.iter().all(|e| e.server_p99_ms == Some(0.4)));
    }

    /// Seen in `cargo xtask fleet-test` at load 17-24: every path's p99 sat in the top
    /// latency bucket, so no p99 stood out, while the lossy client's p50 was 75-375 ms against
    /// 15 ms or less at the others.
    #[test]
    fn a_lossy_path_stands_out_by_its_median_when_every_p99_is_saturated() {
        let server = "10.0.2.1:11211";
        let clients = ["10.0.1.1:19150", "10.0.1.2:19150", "10.0.1.3:19150"];
        let mut input = input(
            &clients.map(|c| (c, server, 1.0, 0.02)),
            &[("10.0.2.1:19150", server, 0.005)],
        );
        let p50 = |input: &mut Input, instance: &str, v: f64| {
            let l = [
                ("instance", instance),
                ("service", "memcached"),
                ("server", server),
            ];
            input.client_p50.push(sample(&l, v));
        };
        p50(&mut input, clients[0], 0.004);
        p50(&mut input, clients[1], 0.006);
        let mut loaded = input.clone();
        p50(&mut loaded, clients[2], 0.010);
        let out = judge(&loaded, &Hosts::default(), &FleetThresholds::default());
        assert!(out.findings.is_empty(), "{:#?}", out.findings);

        p50(&mut input, clients[2], 0.150);
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        let f = &out.findings[0];
        assert_eq!(f.id, SLOW_PATH_ID);
        assert_eq!(f.subjects.hosts, vec![clients[2].to_string()]);
        assert_eq!(f.values["p50_ms"], 150.0);
        assert_eq!(f.values["others_p50_ms"], 5.0);
        assert!(f
            .evidence
            .iter()
            .any(|e| e.contains("judged by the median")));
    }

    #[test]
    fn a_server_slow_at_its_own_socket_is_slow_for_everyone_not_a_path() {
        let input = input(
            &[
                ("10.0.1.1:19150", "10.0.2.2:11211", 0.300, 0.08),
                ("10.0.1.2:19150", "10.0.2.2:11211", 0.310, 0.08),
                ("10.0.1.1:19150", "10.0.2.1:11211", 0.001, 0.0003),
                ("10.0.1.2:19150", "10.0.2.1:11211", 0.001, 0.0003),
            ],
            &[
                ("10.0.2.1:19150", "10.0.2.1:11211", 0.0005),
                ("10.0.2.2:19150", "10.0.2.2:11211", 0.2900),
            ],
        );
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        let f = &out.findings[0];
        assert_eq!(f.id, SLOW_SERVER_ID);
        assert_eq!(f.subjects.servers, vec!["10.0.2.2:11211".to_string()]);
        assert_eq!(f.values["server_p99_ms"], 290.0);
        assert_eq!(f.values["peer_p99_ms"], 0.5);
    }

    #[test]
    fn uniformly_fast_or_idle_paths_are_quiet() {
        let mut input = input(
            &[
                ("a", "s:1", 0.002, 0.001),
                ("b", "s:1", 0.003, 0.001),
                ("c", "s:1", 0.004, 0.001),
            ],
            &[],
        );
        // A slow host that sent almost nothing is not judged.
        input.client_rate.push(sample(
            &[
                ("instance", "d"),
                ("service", "memcached"),
                ("server", "s:1"),
            ],
            0.01,
        ));
        input.client_p99.push(sample(
            &[
                ("instance", "d"),
                ("service", "memcached"),
                ("server", "s:1"),
            ],
            0.9,
        ));
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert!(out.findings.is_empty(), "{:#?}", out.findings);
    }

    /// A starved server host: each server of its pool is slow at its own socket, but only one
    /// had enough requests to be judged (`cargo xtask fleet-test` at load 16). Its peers' p99s
    /// over fewer requests still show the whole host slow, so no server is named; with fast
    /// peers the same server is.
    #[test]
    fn the_busiest_server_of_a_starved_host_is_not_slow_for_everyone() {
        let servers = |peer_p99| {
            let mut input = input(
                &[],
                &[
                    ("s1:19150", "10.0.2.1:11211", 0.042),
                    ("s1:19150", "10.0.2.1:11212", peer_p99),
                    ("s1:19150", "10.0.2.1:11213", peer_p99 * 1.5),
                ],
            );
            // 600 requests in the 60 s window for 11211, 60 for its peers.
            input.window_s = 60.0;
            for rate in &mut input.server_rate {
                rate.value = if rate.label("server").ends_with(":11211") {
                    10.0
                } else {
                    1.0
                };
            }
            judge(&input, &Hosts::default(), &FleetThresholds::default())
        };
        let out = servers(0.055);
        assert!(out.findings.is_empty(), "{:#?}", out.findings);
        let out = servers(0.003);
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        assert_eq!(out.findings[0].id, SLOW_SERVER_ID);
        assert_eq!(out.findings[0].subjects.servers, ["10.0.2.1:11211"]);
    }

    /// A server's own p99 over a handful of requests is their slowest one: one stall of its
    /// host (seen under load in `cargo xtask fleet-test`: 161 ms against peers' 25 ms over
    /// about 40 requests) names no slow server; the same p99 over enough requests does.
    #[test]
    fn a_servers_p99_over_few_requests_names_nothing() {
        let mut input = input(
            &[],
            &[
                ("s1:19150", "10.0.2.1:11211", 0.161),
                ("s1:19150", "10.0.2.2:11211", 0.025),
                ("s1:19150", "10.0.2.3:11211", 0.026),
            ],
        );
        // 0.7 requests a second for 60 s.
        input.window_s = 60.0;
        for rate in &mut input.server_rate {
            rate.value = 0.7;
        }
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert!(out.findings.is_empty(), "{:#?}", out.findings);
        // 120 and 420 requests: a p99 of one to four requests, still a stall's.
        for window_s in [171.0, 600.0] {
            input.window_s = window_s;
            let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
            assert!(out.findings.is_empty(), "{window_s}: {:#?}", out.findings);
        }
        input.window_s = 1200.0;
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1, "{:#?}", out.findings);
        assert_eq!(out.findings[0].id, SLOW_SERVER_ID);
    }
}
