//! Coverage: agents that are down, no longer scraped, or running with probes missing, so that a clean fleet report is never silence.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    new_finding,
    prom::{PromError, Sample},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{Finding, Severity};

pub const ID: &str = "fleet-coverage";

#[derive(Debug, Default)]
pub struct Input {
    /// Agents with any cacheprobe series in the window: (instance, job).
    pub known: Vec<Sample>,
    /// Agents with a sample at the evaluation time (within Prometheus' 5-minute lookback).
    pub fresh: Vec<Sample>,
    /// `up` by (instance, job), all jobs: filtered to the jobs agents were seen in.
    pub up: Vec<Sample>,
    /// `cacheprobe_probe_up == 0` by (instance, probe).
    pub probes_down: Vec<Sample>,
}

pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let range = c.scope.range();
    Ok(Input {
        known: c.instant(&format!(
            "max by (instance, job) (max_over_time(cacheprobe_build_info[{range}]))"
        ))?,
        fresh: c.instant("max by (instance, job) (cacheprobe_build_info)")?,
        up: c.instant("max by (instance, job) (up)")?,
        probes_down: c.instant("max by (instance, probe) (cacheprobe_probe_up) == 0")?,
    })
}

/// The agents by state.
#[derive(Debug, Default)]
struct Coverage<'a> {
    /// Targets of the agents' jobs plus every agent seen in the window.
    targets: BTreeSet<&'a str>,
    down: BTreeSet<&'a str>,
    stale: Vec<&'a str>,
    /// instance -> probes not attached
    probes: BTreeMap<&'a str, Vec<String>>,
}

pub fn judge(input: &Input, hosts: &Hosts, _t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let c = gather(input);
    let reporting = c.targets.len() - c.down.len() - c.stale.len();
    out.notes.push(format!(
        "coverage: {reporting} of {} agents reporting now ({} down, {} not scraped, {} with probes missing)",
        c.targets.len(),
        c.down.len(),
        c.stale.len(),
        c.probes.len()
    ));

    if !c.down.is_empty() || !c.stale.is_empty() {
        out.findings.push(not_reporting(&c, hosts));
    }
    if !c.probes.is_empty() {
        out.findings.push(probes_missing(&c, hosts));
    }
    out
}

fn gather(input: &Input) -> Coverage<'_> {
    let jobs: BTreeSet<&str> = input.known.iter().map(|s| s.label("job")).collect();
    let known: BTreeSet<&str> = input.known.iter().map(|s| s.label("instance")).collect();
    let fresh: BTreeSet<&str> = input.fresh.iter().map(|s| s.label("instance")).collect();
    // Targets of the agents' jobs that Prometheus cannot scrape now, including agents that
    // were down for the whole window (they never exported anything in it).
    let down: BTreeSet<&str> = input
        .up
        .iter()
        .filter(|s| jobs.contains(s.label("job")) && s.value == 0.0)
        .map(|s| s.label("instance"))
        .collect();
    let targets: BTreeSet<&str> = input
        .up
        .iter()
        .filter(|s| jobs.contains(s.label("job")))
        .map(|s| s.label("instance"))
        .chain(known.iter().copied())
        .collect();
    // Seen earlier in the window, silent now, and not a failing target: gone from service
    // discovery, or its scrapes stopped.
    let stale: Vec<&str> = known
        .iter()
        .filter(|i| !fresh.contains(*i) && !down.contains(*i))
        .copied()
        .collect();
    let mut probes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for sample in &input.probes_down {
        probes
            .entry(sample.label("instance"))
            .or_default()
            .push(sample.label("probe").to_string());
    }
    Coverage {
        targets,
        down,
        stale,
        probes,
    }
}

/// Agents down or no longer scraped (at least one of either).
fn not_reporting(c: &Coverage, hosts: &Hosts) -> Finding {
    let Coverage {
        targets,
        down,
        stale,
        ..
    } = c;
    let missing = down.len() + stale.len();
    let mut finding = new_finding(
        ID,
        Severity::Warning,
        format!(
            "{missing} of {} cacheprobe agents are not reporting: this report does not cover their hosts",
            targets.len()
        ),
    );
    if !down.is_empty() {
        let names: Vec<String> = down.iter().map(|i| hosts.describe(i)).collect();
        finding.evidence.push(format!(
            "down (Prometheus cannot scrape them, up == 0): {}",
            super::list(&names, 10)
        ));
    }
    if !stale.is_empty() {
        let names: Vec<String> = stale.iter().map(|i| hosts.describe(i)).collect();
        finding.evidence.push(format!(
            "not scraped any more (series seen earlier in the window, none in the last 5 minutes): {}",
            super::list(&names, 10)
        ));
    }
    finding.advice = "Check the agents on those hosts (systemctl status cacheprobe) and \
        Prometheus' targets page; until they report, problems on their hosts are invisible \
        here."
        .to_string();
    finding.subjects.hosts = down
        .iter()
        .chain(stale.iter())
        .map(|i| i.to_string())
        .collect();
    set_value(&mut finding, "agents", targets.len() as f64);
    set_value(&mut finding, "agents_down", down.len() as f64);
    set_value(&mut finding, "agents_not_scraped", stale.len() as f64);
    finding.magnitude = missing as f64;
    finding
}

/// Agents running with kernel probes missing (at least one).
fn probes_missing(c: &Coverage, hosts: &Hosts) -> Finding {
    let Coverage {
        targets, probes, ..
    } = c;
    let mut finding = new_finding(
        ID,
        Severity::Info,
        format!(
            "{} of {} agents run with kernel probes missing: some of their metrics stay at zero",
            probes.len(),
            targets.len()
        ),
    );
    for (instance, missing) in probes.iter().take(10) {
        finding.evidence.push(format!(
            "{}: {}",
            hosts.describe(instance),
            super::list(missing, 4)
        ));
    }
    if probes.len() > 10 {
        finding
            .evidence
            .push(format!("and {} more hosts", probes.len() - 10));
    }
    finding.advice = "Run `sudo cacheprobe check` on those hosts: it says why a probe cannot \
        attach and what that costs (often an older kernel)."
        .to_string();
    finding.subjects.hosts = probes.keys().map(|i| i.to_string()).collect();
    set_value(&mut finding, "agents_probes_missing", probes.len() as f64);
    finding
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::{recorded, sample};

    #[test]
    fn names_down_stale_and_probe_missing_agents() {
        let input = Input {
            known: recorded(
                r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"instance":"10.0.0.1:19150","job":"cacheprobe"},"value":[1,"1"]},
                {"metric":{"instance":"10.0.0.2:19150","job":"cacheprobe"},"value":[1,"1"]},
                {"metric":{"instance":"10.0.0.3:19150","job":"cacheprobe"},"value":[1,"1"]}]}}"#,
            ),
            fresh: vec![
                sample(
                    &[("instance", "10.0.0.1:19150"), ("job", "cacheprobe")],
                    1.0,
                ),
                sample(
                    &[("instance", "10.0.0.2:19150"), ("job", "cacheprobe")],
                    1.0,
                ),
            ],
            up: vec![
                sample(
                    &[("instance", "10.0.0.1:19150"), ("job", "cacheprobe")],
                    1.0,
                ),
                sample(
                    &[("instance", "10.0.0.2:19150"), ("job", "cacheprobe")],
                    1.0,
                ),
                // Down all window long: only `up` knows it.
                sample(
                    &[("instance", "10.0.0.4:19150"), ("job", "cacheprobe")],
                    0.0,
                ),
                // Another job's target is none of our business.
                sample(&[("instance", "10.0.0.9:9100"), ("job", "node")], 0.0),
            ],
            probes_down: vec![sample(
                &[
                    ("instance", "10.0.0.2:19150"),
                    ("probe", "sock/sock_send_length"),
                ],
                0.0,
            )],
        };
        let mut hosts = Hosts::default();
        hosts
            .names
            .insert("10.0.0.4:19150".to_string(), "cache-4".to_string());
        let out = judge(&input, &hosts, &FleetThresholds::default());
        assert_eq!(out.findings.len(), 2);
        let missing = &out.findings[0];
        assert_eq!(missing.severity, Severity::Warning);
        assert!(
            missing.title.starts_with("2 of 4 cacheprobe agents"),
            "{}",
            missing.title
        );
        assert_eq!(
            missing.subjects.hosts,
            vec!["10.0.0.4:19150".to_string(), "10.0.0.3:19150".to_string()]
        );
        assert!(missing.evidence[0].contains("cache-4 (10.0.0.4:19150)"));
        assert_eq!(missing.values["agents_down"], 1.0);
        assert_eq!(missing.values["agents_not_scraped"], 1.0);
        let probes = &out.findings[1];
        assert_eq!(probes.subjects.hosts, vec!["10.0.0.2:19150".to_string()]);
        assert!(probes.evidence[0].contains("sock/sock_send_length"));
        assert!(
            out.notes[0].contains("2 of 4 agents reporting now"),
            "{}",
            out.notes[0]
        );
    }

    #[test]
    fn a_healthy_fleet_says_so_in_a_note() {
        let up = sample(&[("instance", "a:19150"), ("job", "cp")], 1.0);
        let input = Input {
            known: vec![up.clone()],
            fresh: vec![up.clone()],
            up: vec![up],
            probes_down: vec![],
        };
        let out = judge(&input, &Hosts::default(), &FleetThresholds::default());
        assert!(out.findings.is_empty());
        assert_eq!(
            out.notes,
            vec!["coverage: 1 of 1 agents reporting now (0 down, 0 not scraped, 0 with probes missing)".to_string()]
        );
    }
}
