//! Connection mesh: client connections per server summed over the fleet, and the hosts and processes whose fan-out is every server of a pool (the fd explosion).

use std::collections::BTreeMap;

use super::{
    new_finding,
    prom::{PromError, Sample},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{Finding, Severity};

pub const ID: &str = "fleet-connection-mesh";

#[derive(Debug, Default)]
pub struct Input {
    /// Client connections per (service, server), summed over hosts.
    pub per_server: Vec<Sample>,
    /// Servers each host holds client connections to, by (instance, service).
    pub fan_out: Vec<Sample>,
    /// Watched connections per (instance, comm, service).
    pub processes: Vec<Sample>,
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let svc = c.scope.service_matcher();
    // One read of the connection gauges serves both views.
    let active = c.instant(&format!(
        "sum by (instance, service, server) (cacheprobe_connections_active{{role=\"client\"{svc}}})"
    ))?;
    let mut per_server: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut fan_out: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in active.iter().filter(|s| s.value.is_finite()) {
        let service = s.label("service").to_string();
        *per_server
            .entry((service.clone(), s.label("server").to_string()))
            .or_default() += s.value;
        if s.value > 0.0 {
            *fan_out
                .entry((s.label("instance").to_string(), service))
                .or_default() += 1.0;
        }
    }
    let labelled =
        |map: BTreeMap<(String, String), f64>, first: &str, second: &str| -> Vec<Sample> {
            map.into_iter()
                .map(|((a, b), value)| Sample {
                    labels: BTreeMap::from([(first.to_string(), a), (second.to_string(), b)]),
                    value,
                })
                .collect()
        };
    Ok(Input {
        per_server: labelled(per_server, "service", "server"),
        fan_out: labelled(fan_out, "instance", "service"),
        processes: c.instant(&format!(
            "max by (instance, comm, service) (cacheprobe_process_connections{{{}}}) > 0",
            svc.trim_start_matches(',')
        ))?,
    })
}

/// One pool's connection mesh, as judged.
struct Mesh<'a> {
    service: &'a str,
    pool: usize,
    busiest: &'a str,
    most: f64,
    /// Total client connections to the pool.
    total: f64,
    /// Hosts connected to every server of the pool, of `total_hosts` client hosts.
    full: Vec<&'a str>,
    total_hosts: usize,
    /// Processes holding a connection to every server, and the hosts they do it on.
    processes: BTreeMap<&'a str, Vec<String>>,
}

pub fn judge(input: &Input, hosts: &Hosts, t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    for (service, servers) in pools(input) {
        if let Some(mesh) = judge_pool(input, hosts, t, service, &servers) {
            out.findings.push(finding(&mesh));
        }
    }
    out
}

/// Servers with client connections, per service.
fn pools(input: &Input) -> BTreeMap<&str, Vec<(&str, f64)>> {
    let mut pools: BTreeMap<&str, Vec<(&str, f64)>> = BTreeMap::new();
    for s in &input.per_server {
        if s.value > 0.0 {
            pools
                .entry(s.label("service"))
                .or_default()
                .push((s.label("server"), s.value));
        }
    }
    pools
}

fn judge_pool<'a>(
    input: &'a Input,
    hosts: &Hosts,
    t: &FleetThresholds,
    service: &'a str,
    servers: &[(&'a str, f64)],
) -> Option<Mesh<'a>> {
    let pool = servers.len();
    let (busiest, most) = servers
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .unwrap_or(("", 0.0));
    if pool < t.mesh_min_servers || most < t.mesh_connections {
        return None;
    }
    let full: Vec<&str> = input
        .fan_out
        .iter()
        .filter(|s| s.label("service") == service && s.value >= pool as f64)
        .map(|s| s.label("instance"))
        .collect();
    let total_hosts = input
        .fan_out
        .iter()
        .filter(|s| s.label("service") == service)
        .count();
    // On those hosts, processes holding at least one connection per server.
    let mut processes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in &input.processes {
        if s.label("service") == service
            && s.value >= pool as f64
            && full.contains(&s.label("instance"))
        {
            processes
                .entry(s.label("comm"))
                .or_default()
                .push(hosts.short(s.label("instance")));
        }
    }
    let total: f64 = servers.iter().map(|(_, n)| n).sum();
    Some(Mesh {
        service,
        pool,
        busiest,
        most,
        total,
        full,
        total_hosts,
        processes,
    })
}

fn finding(m: &Mesh) -> Finding {
    let Mesh {
        service,
        pool,
        busiest,
        most,
        total,
        ref full,
        total_hosts,
        ref processes,
    } = *m;
    let mut finding = new_finding(
        ID,
        Severity::Warning,
        format!(
            "{service}: up to {} client connections per server ({} on {busiest}); {} of {total_hosts} client hosts connect to all {pool} servers",
            most.round(),
            most.round(),
            full.len()
        ),
    );
    finding.evidence.push(format!(
        "{} client connections to {pool} servers in total",
        total.round()
    ));
    for (comm, on) in processes.iter().take(5) {
        finding.evidence.push(format!(
            "{comm} holds a connection to every server on {} hosts ({})",
            on.len(),
            super::list(on, 5)
        ));
    }
    finding.advice = "Every client process connecting to every server multiplies \
        connections (processes x servers): servers hit their connection and fd limits and \
        spend memory per connection. Put a proxy (twemproxy, mcrouter) or a shared pool per \
        host in between, or cap per-process pools."
        .to_string();
    finding.subjects.services = vec![service.to_string()];
    finding.subjects.servers = vec![busiest.to_string()];
    finding.subjects.processes = processes.keys().map(|c| c.to_string()).collect();
    finding.subjects.hosts = full.iter().map(|h| h.to_string()).collect();
    set_value(&mut finding, "max_connections_per_server", most);
    set_value(&mut finding, "connections", total);
    set_value(&mut finding, "servers", pool as f64);
    set_value(&mut finding, "full_mesh_hosts", full.len() as f64);
    finding.magnitude = most;
    finding
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::sample;

    #[test]
    fn a_full_mesh_names_hosts_and_processes() {
        let mut input = Input::default();
        for s in ["s1:1", "s2:1", "s3:1", "s4:1"] {
            input
                .per_server
                .push(sample(&[("service", "m"), ("server", s)], 1500.0));
        }
        for (h, n) in [("h1", 4.0), ("h2", 4.0), ("h3", 2.0)] {
            input
                .fan_out
                .push(sample(&[("instance", h), ("service", "m")], n));
        }
        input.processes.push(sample(
            &[("instance", "h1"), ("service", "m"), ("comm", "php-fpm")],
            400.0,
        ));
        input.processes.push(sample(
            &[("instance", "h3"), ("service", "m"), ("comm", "cron")],
            400.0,
        ));
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1);
        let f = &out.findings[0];
        assert_eq!(
            f.title,
            "m: up to 1500 client connections per server (1500 on s1:1); 2 of 3 client hosts connect to all 4 servers"
        );
        assert_eq!(f.subjects.processes, vec!["php-fpm".to_string()]);
        assert_eq!(f.values["connections"], 6000.0);

        // Few connections: no finding, however meshed.
        for s in &mut input.per_server {
            s.value = 10.0;
        }
        assert!(
            judge(&input, &Hosts::default(), &FleetThresholds::default())
                .findings
                .is_empty()
        );
    }
}
