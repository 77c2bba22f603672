//! Ring disagreement: hosts whose set of servers for a service (cacheprobe_service_servers_info's fingerprint) differs from the majority's, so the same key goes to different servers.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    new_finding,
    prom::{PromError, Sample},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{Finding, Severity};

pub const ID: &str = "fleet-ring-disagreement";

#[derive(Debug, Default)]
pub struct Input {
    /// `timestamp()` of each host's ring-view series, by (instance, service, fingerprint,
    /// servers): the newest per host and service is its current view.
    pub views: Vec<Sample>,
    /// Servers each host had client connections to in the window, by (instance, service,
    /// server): says which servers the odd hosts lack or add.
    pub used: Vec<Sample>,
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let (w, svc) = (c.scope.range(), c.scope.service_matcher());
    Ok(Input {
        views: c.instant(&format!(
            "max by (instance, service, fingerprint, servers) (timestamp(cacheprobe_service_servers_info{{{}}}))",
            svc.trim_start_matches(',')
        ))?,
        used: c.instant(&format!(
            "max by (instance, service, server) (max_over_time(cacheprobe_connections_active{{role=\"client\"{svc}}}[{w}])) > 0"
        ))?,
    })
}

/// Hosts sharing one server list: ((fingerprint, servers), instances).
type Group<'a> = ((&'a str, &'a str), Vec<&'a str>);
/// service -> instance -> (timestamp, fingerprint, servers)
type Views<'a> = BTreeMap<&'a str, BTreeMap<&'a str, (f64, &'a str, &'a str)>>;
/// (service, instance) -> servers it had client connections to.
type Used<'a> = BTreeMap<(&'a str, &'a str), BTreeSet<&'a str>>;

pub fn judge(input: &Input, hosts: &Hosts, _t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let (current, used) = gather(input);
    for (service, views) in current {
        if let Some(ranked) = groups(&views) {
            out.findings
                .push(finding(service, views.len(), &ranked, &used, hosts));
        }
    }
    out
}

/// Each host's current view per service (its newest series), and the servers it used.
fn gather(input: &Input) -> (Views<'_>, Used<'_>) {
    let mut current: Views = BTreeMap::new();
    for s in &input.views {
        let slot = current
            .entry(s.label("service"))
            .or_default()
            .entry(s.label("instance"))
            .or_insert((f64::MIN, "", ""));
        if s.value > slot.0 {
            *slot = (s.value, s.label("fingerprint"), s.label("servers"));
        }
    }
    let mut used: Used = BTreeMap::new();
    for s in &input.used {
        used.entry((s.label("service"), s.label("instance")))
            .or_default()
            .insert(s.label("server"));
    }
    (current, used)
}

/// The service's hosts grouped by server list, largest group first; `None` unless at least two
/// hosts hold at least two different lists.
fn groups<'a>(views: &BTreeMap<&'a str, (f64, &'a str, &'a str)>) -> Option<Vec<Group<'a>>> {
    if views.len() < 2 {
        return None;
    }
    let mut groups: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (instance, (_, fingerprint, servers)) in views {
        groups
            .entry((fingerprint, servers))
            .or_default()
            .push(instance);
    }
    if groups.len() < 2 {
        return None;
    }
    let mut ranked: Vec<Group> = groups.into_iter().collect();
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    Some(ranked)
}

fn finding(
    service: &str,
    view_count: usize,
    ranked: &[Group],
    used: &Used,
    hosts: &Hosts,
) -> Finding {
    let ((majority_fp, majority_n), majority_hosts) = &ranked[0];
    let tie = ranked[1].1.len() == majority_hosts.len();
    let odd: Vec<&str> = ranked[1..]
        .iter()
        .flat_map(|(_, hosts)| hosts.iter().copied())
        .collect();
    let mut finding = new_finding(
        ID,
        Severity::Warning,
        if tie {
            format!(
                "hosts disagree about the {service} servers: {} different server lists, none used by a majority",
                ranked.len()
            )
        } else {
            format!(
                "{} of {} hosts use a different {service} server list than the rest: the same key goes to different servers",
                odd.len(),
                view_count
            )
        },
    );
    finding.evidence.push(format!(
        "{} hosts use {majority_n} servers (fingerprint {majority_fp})",
        majority_hosts.len()
    ));
    // The servers the majority uses, from the hosts' connections.
    let majority_servers: BTreeSet<&str> = majority_hosts
        .iter()
        .filter_map(|h| used.get(&(service, *h)))
        .flat_map(|s| s.iter().copied())
        .collect();
    for group in ranked[1..].iter() {
        finding
            .evidence
            .push(group_line(service, group, &majority_servers, used, hosts));
    }
    finding.advice = format!(
        "Clients with different {service} server lists hash keys to different servers: \
         stale values, misses and double writes. Deploy one server list to every client \
         (config management, service discovery), then restart or reload the odd hosts' \
         clients. A host that serves a different pool under the same service name is \
         expected to differ: give that pool its own service name."
    );
    finding.subjects.services = vec![service.to_string()];
    finding.subjects.hosts = odd.iter().map(|h| h.to_string()).collect();
    set_value(&mut finding, "hosts", view_count as f64);
    set_value(&mut finding, "disagreeing_hosts", odd.len() as f64);
    set_value(&mut finding, "server_lists", ranked.len() as f64);
    finding.magnitude = odd.len() as f64;
    finding
}

/// A minority group's evidence line: its hosts, its list, and the servers its first host
/// lacks or adds against the majority's.
fn group_line(
    service: &str,
    ((fingerprint, n), group): &Group,
    majority_servers: &BTreeSet<&str>,
    used: &Used,
    hosts: &Hosts,
) -> String {
    let names: Vec<String> = group.iter().map(|h| hosts.describe(h)).collect();
    let verb = if group.len() == 1 { "uses" } else { "use" };
    let mut line = format!(
        "{} {verb} {n} servers (fingerprint {fingerprint})",
        super::list(&names, 5)
    );
    if let Some(theirs) = group.first().and_then(|h| used.get(&(service, *h))) {
        let lacks: Vec<String> = majority_servers
            .difference(theirs)
            .map(|s| s.to_string())
            .collect();
        let extra: Vec<String> = theirs
            .difference(majority_servers)
            .map(|s| s.to_string())
            .collect();
        if !lacks.is_empty() {
            line.push_str(&format!("; missing {}", super::list(&lacks, 4)));
        }
        if !extra.is_empty() {
            line.push_str(&format!("; extra {}", super::list(&extra, 4)));
        }
    }
    line
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::{recorded, sample};

    #[test]
    fn names_the_minority_and_what_its_list_lacks() {
        let views = recorded(
            r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"h1:19150","service":"memcached","fingerprint":"aaaa","servers":"3"},"value":[1,"1700000000"]},
            {"metric":{"instance":"h2:19150","service":"memcached","fingerprint":"aaaa","servers":"3"},"value":[1,"1700000000"]},
            {"metric":{"instance":"h3:19150","service":"memcached","fingerprint":"aaaa","servers":"3"},"value":[1,"1700000000"]},
            {"metric":{"instance":"h4:19150","service":"memcached","fingerprint":"bbbb","servers":"2"},"value":[1,"1700000000"]},
            {"metric":{"instance":"h4:19150","service":"memcached","fingerprint":"aaaa","servers":"3"},"value":[1,"1699990000"]}]}}"#,
        );
        let mut used = Vec::new();
        for h in ["h1:19150", "h2:19150", "h3:19150", "h4:19150"] {
            for s in ["s1:11211", "s2:11211", "s3:11211"] {
                if h == "h4:19150" && s == "s3:11211" {
                    continue;
                }
                used.push(sample(
                    &[("instance", h), ("service", "memcached"), ("server", s)],
                    1.0,
                ));
            }
        }
        let mut hosts = Hosts::default();
        hosts.names.insert("h4:19150".into(), "web-4".into());
        let out = judge(&Input { views, used }, &hosts, &FleetThresholds::default());
        assert_eq!(out.findings.len(), 1);
        let f = &out.findings[0];
        assert_eq!(
            f.title,
            "1 of 4 hosts use a different memcached server list than the rest: the same key goes to different servers"
        );
        assert_eq!(f.subjects.hosts, vec!["h4:19150".to_string()]);
        assert_eq!(f.evidence[0], "3 hosts use 3 servers (fingerprint aaaa)");
        assert_eq!(
            f.evidence[1],
            "web-4 (h4:19150) uses 2 servers (fingerprint bbbb); missing s3:11211"
        );
        assert_eq!(f.values["disagreeing_hosts"], 1.0);
    }

    #[test]
    fn agreement_is_quiet() {
        let views = vec![
            sample(
                &[
                    ("instance", "a"),
                    ("service", "m"),
                    ("fingerprint", "f"),
                    ("servers", "2"),
                ],
                1.0,
            ),
            sample(
                &[
                    ("instance", "b"),
                    ("service", "m"),
                    ("fingerprint", "f"),
                    ("servers", "2"),
                ],
                1.0,
            ),
        ];
        let out = judge(
            &Input {
                views,
                used: vec![],
            },
            &Hosts::default(),
            &FleetThresholds::default(),
        );
        assert!(out.findings.is_empty());
    }
}
