//! Idle timeouts across the fleet: servers that close idle clients (the inferred timeout) and the client hosts and processes that then wrote onto dead connections, per command.

use std::collections::BTreeMap;

use super::{
    finite, increase_with_new, new_finding,
    prom::{PromError, Sample},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{util, Finding, Severity};

pub const ID: &str = "fleet-idle-timeouts";

#[derive(Debug, Default)]
pub struct Input {
    /// Closes by the server seen from clients, by (instance, service, server).
    pub peer_closes: Vec<Sample>,
    /// Mean idle time before those closes, by (service, server).
    pub idle_mean: Vec<Sample>,
    /// Dead writes by (instance, service, server, comm, command), only those > 0.
    pub dead_writes: Vec<Sample>,
    /// Of those, what the application saw: by (service, server, outcome).
    pub outcomes: Vec<Sample>,
}

const IDLE: &str = "cacheprobe_connection_idle_before_close_seconds";

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    let peer = format!("{{role=\"client\",closed_by=\"peer\"{svc}}}");
    // These events are rare, so a series is often born inside the window with its first
    // events in it: counted with `increase_with_new`, not `increase` alone.
    let closes = increase_with_new(&format!("cacheprobe_connections_closed_total{peer}"), &w);
    let idle_sum = increase_with_new(&format!("{IDLE}_sum{peer}"), &w);
    let idle_count = increase_with_new(&format!("{IDLE}_count{peer}"), &w);
    let dead = increase_with_new(
        &format!("cacheprobe_dead_socket_writes_total{{role=\"client\"{svc}}}"),
        &w,
    );
    Ok(Input {
        peer_closes: c.instant(&format!(
            "sum by (instance, service, server) ({closes}) > 0"
        ))?,
        idle_mean: finite(c.instant(&format!(
            "sum by (service, server) ({idle_sum}) / sum by (service, server) ({idle_count})"
        ))?),
        dead_writes: c.instant(&format!(
            "sum by (instance, service, server, comm, command) ({dead}) > 0"
        ))?,
        outcomes: c.instant(&format!("sum by (service, server, outcome) ({dead}) > 0"))?,
    })
}

type Key = (String, String);

fn key(s: &Sample) -> Key {
    (
        s.label("service").to_string(),
        s.label("server").to_string(),
    )
}

/// Per server: host -> process -> command -> writes.
type Writers = BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>;

/// The series keyed by (service, server).
#[derive(Debug, Default)]
struct Gathered {
    writes: BTreeMap<Key, Writers>,
    /// Closes by the server and how many client hosts saw them.
    closes: BTreeMap<Key, (f64, usize)>,
    idle: BTreeMap<Key, f64>,
    outcomes: BTreeMap<Key, BTreeMap<String, f64>>,
}

fn gather(input: &Input) -> Gathered {
    let mut writes: BTreeMap<Key, Writers> = BTreeMap::new();
    for s in &input.dead_writes {
        *writes
            .entry(key(s))
            .or_default()
            .entry(s.label("instance").to_string())
            .or_default()
            .entry(s.label("comm").to_string())
            .or_default()
            .entry(s.label("command").to_string())
            .or_default() += s.value;
    }
    let mut closes: BTreeMap<Key, (f64, usize)> = BTreeMap::new();
    for s in &input.peer_closes {
        let entry = closes.entry(key(s)).or_default();
        entry.0 += s.value;
        entry.1 += 1;
    }
    let idle: BTreeMap<Key, f64> = input.idle_mean.iter().map(|s| (key(s), s.value)).collect();
    let mut outcomes: BTreeMap<Key, BTreeMap<String, f64>> = BTreeMap::new();
    for s in &input.outcomes {
        *outcomes
            .entry(key(s))
            .or_default()
            .entry(s.label("outcome").to_string())
            .or_default() += s.value;
    }
    Gathered {
        writes,
        closes,
        idle,
        outcomes,
    }
}

pub fn judge(input: &Input, hosts: &Hosts, _t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let gathered = gather(input);
    for ((service, server), writers) in &gathered.writes {
        let total: f64 = writers
            .values()
            .flat_map(|comms| comms.values())
            .flat_map(|commands| commands.values())
            .sum();
        let total = total.round();
        if total < 1.0 {
            continue;
        }
        out.findings
            .push(finding(&gathered, service, server, writers, total, hosts));
    }
    out
}

/// One server's finding: its inferred timeout, the closes, who wrote onto them, what followed.
fn finding(
    g: &Gathered,
    service: &str,
    server: &str,
    writers: &Writers,
    total: f64,
    hosts: &Hosts,
) -> Finding {
    let k = (service.to_string(), server.to_string());
    let (close_count, close_hosts) = g.closes.get(&k).copied().unwrap_or_default();
    let timeout = g.idle.get(&k).map(|mean| util::infer_timeout(*mean));
    let title = match timeout {
        Some(timeout) => format!(
            "{server} ({service}) closes clients idle for {}; {} client hosts then wrote {} times onto closed connections",
            util::seconds(timeout),
            writers.len(),
            total
        ),
        None => format!(
            "{} client hosts wrote {} times onto connections {server} ({service}) had already closed",
            writers.len(),
            total
        ),
    };
    let mut finding = new_finding(ID, Severity::Warning, title);
    if close_count > 0.0 {
        let mean = g.idle.get(&k).map_or(String::new(), |m| {
            format!(" after {} idle on average", util::seconds(*m))
        });
        finding.evidence.push(format!(
            "{} connections closed by the server{mean}, seen by {} client hosts",
            close_count.round(),
            close_hosts
        ));
    }
    let (ranked, processes, commands) = writer_evidence(&mut finding, writers, hosts);
    if let Some(outcome) = g.outcomes.get(&k) {
        let parts: Vec<String> = outcome
            .iter()
            .map(|(o, n)| format!("{o} {}", n.round()))
            .collect();
        finding.evidence.push(format!(
            "what the applications saw next: {}",
            parts.join(", ")
        ));
    }
    finding.advice = advice(timeout);
    finding.subjects.services = vec![service.to_string()];
    finding.subjects.servers = vec![server.to_string()];
    finding.subjects.hosts = ranked;
    finding.subjects.processes = processes;
    finding.subjects.commands = commands;
    if let Some(timeout) = timeout {
        set_value(&mut finding, "idle_timeout_s", timeout);
    }
    if let Some(mean) = g.idle.get(&k) {
        set_value(&mut finding, "idle_mean_s", *mean);
    }
    set_value(&mut finding, "closes", close_count.round());
    set_value(&mut finding, "dead_writes", total);
    set_value(&mut finding, "hosts", writers.len() as f64);
    finding.magnitude = total;
    finding
}

/// One evidence line per writing host (most dead writes first, ten at most); returns all the
/// hosts ranked, and the processes and commands of the ten shown, in order of appearance.
fn writer_evidence(
    finding: &mut Finding,
    writers: &Writers,
    hosts: &Hosts,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    // Hosts with the most dead writes first.
    let mut ranked: Vec<(&String, f64)> = writers
        .iter()
        .map(|(host, comms)| (host, comms.values().flat_map(|c| c.values()).sum::<f64>()))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut processes = Vec::new();
    let mut commands = Vec::new();
    for (host, _) in ranked.iter().take(10) {
        let mut parts = Vec::new();
        for (comm, by_command) in &writers[*host] {
            let count: f64 = by_command.values().sum();
            let detail: Vec<String> = by_command
                .iter()
                .map(|(command, n)| format!("{command} x{}", n.round()))
                .collect();
            parts.push(format!(
                "{comm} wrote {} times ({})",
                count.round(),
                detail.join(", ")
            ));
            if !processes.contains(comm) {
                processes.push(comm.clone());
            }
            for command in by_command.keys() {
                if !commands.contains(command) {
                    commands.push(command.clone());
                }
            }
        }
        finding
            .evidence
            .push(format!("{}: {}", hosts.describe(host), parts.join("; ")));
    }
    if ranked.len() > 10 {
        finding
            .evidence
            .push(format!("and {} more client hosts", ranked.len() - 10));
    }
    let ranked = ranked.iter().map(|(h, _)| h.to_string()).collect();
    (ranked, processes, commands)
}

fn advice(timeout: Option<f64>) -> String {
    match timeout {
        Some(timeout) => format!(
            "Clients keep connections idle longer than the server allows. Make the clients close, ping or re-validate pooled connections idle for more than {} (pool max idle time; TCP keepalive is not enough), or raise the server's idle timeout (memcached: -o idle_timeout) above the clients' longest idle period.",
            util::seconds(timeout)
        ),
        None => "Clients reuse connections the server already closed: make their pools \
            evict idle connections before the server does."
            .to_string(),
    }
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::{recorded, sample};

    #[test]
    fn names_the_timeout_hosts_processes_and_commands() {
        let input = Input {
            peer_closes: recorded(
                r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"instance":"10.0.1.1:19150","service":"memcached","server":"10.0.2.9:11211"},"value":[1,"20"]},
                {"metric":{"instance":"10.0.1.2:19150","service":"memcached","server":"10.0.2.9:11211"},"value":[1,"10.000001"]}]}}"#,
            ),
            idle_mean: vec![sample(
                &[("service", "memcached"), ("server", "10.0.2.9:11211")],
                30.8,
            )],
            dead_writes: recorded(
                r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"instance":"10.0.1.1:19150","service":"memcached","server":"10.0.2.9:11211","comm":"php-fpm","command":"get"},"value":[1,"12.0000003"]},
                {"metric":{"instance":"10.0.1.1:19150","service":"memcached","server":"10.0.2.9:11211","comm":"php-fpm","command":"set"},"value":[1,"3"]},
                {"metric":{"instance":"10.0.1.2:19150","service":"memcached","server":"10.0.2.9:11211","comm":"cron","command":"set"},"value":[1,"5"]}]}}"#,
            ),
            outcomes: vec![sample(
                &[
                    ("service", "memcached"),
                    ("server", "10.0.2.9:11211"),
                    ("outcome", "eof"),
                ],
                20.0,
            )],
        };
        let mut hosts = Hosts::default();
        hosts.names.insert("10.0.1.1:19150".into(), "web-1".into());
        let out = judge(&input, &hosts, &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1);
        let f = &out.findings[0];
        assert_eq!(
            f.title,
            "10.0.2.9:11211 (memcached) closes clients idle for 30 s; 2 client hosts then wrote 20 times onto closed connections"
        );
        assert_eq!(f.values["idle_timeout_s"], 30.0);
        assert_eq!(f.values["dead_writes"], 20.0);
        assert_eq!(f.values["closes"], 30.0);
        assert_eq!(
            f.subjects.hosts,
            vec!["10.0.1.1:19150".to_string(), "10.0.1.2:19150".to_string()]
        );
        assert_eq!(
            f.subjects.processes,
            vec!["php-fpm".to_string(), "cron".to_string()]
        );
        assert!(f.evidence.contains(
            &"web-1 (10.0.1.1:19150): php-fpm wrote 15 times (get x12, set x3)".to_string()
        ));
        assert!(f
            .evidence
            .contains(&"what the applications saw next: eof 20".to_string()));
    }

    #[test]
    fn idle_closes_without_dead_writes_are_not_a_finding() {
        let input = Input {
            peer_closes: vec![sample(
                &[("instance", "a"), ("service", "m"), ("server", "s:1")],
                50.0,
            )],
            idle_mean: vec![sample(&[("service", "m"), ("server", "s:1")], 60.2)],
            ..Input::default()
        };
        assert!(
            judge(&input, &Hosts::default(), &FleetThresholds::default())
                .findings
                .is_empty()
        );
    }
}
