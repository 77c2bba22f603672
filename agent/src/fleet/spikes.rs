//! Fleet-synchronous spikes: the same minute's burst of connection attempts on many hosts at once (cron jobs or deploys starting everywhere together), with the minute-of-hour pattern.

use std::collections::BTreeMap;

use super::{
    increase_with_new, new_finding,
    prom::{PromError, Series},
    set_value, Collector, DetectorOutput, FleetThresholds, Hosts,
};
use crate::diagnose::{util, Finding, Severity};

pub const ID: &str = "fleet-synchronous-spikes";
/// One point per minute: Prometheus' resolution is the scrape interval, and cron's is a minute.
pub const STEP_S: u64 = 60;

#[derive(Debug, Default)]
pub struct Input {
    /// Connection attempts per minute by instance.
    pub attempts: Vec<Series>,
}

/// Per minute, counting a series born in that minute from its first value: a cron job's first
/// connections to a service (a new `service` series on every host at once) are exactly the
/// burst, and `increase()` alone cannot see what a series held at its first sample.
pub fn collect(c: &Collector) -> Result<Input, PromError> {
    let svc = c.scope.service_matcher();
    let attempts = format!("cacheprobe_syn_total{{direction=\"out\"{svc}}}");
    Ok(Input {
        attempts: c.range(
            &format!("sum by (instance) ({})", increase_with_new(&attempts, "1m")),
            STEP_S,
        )?,
    })
}

/// Per minute, the hosts whose attempts spiked then and their summed attempts.
#[derive(Debug, Default)]
struct Spikes<'a> {
    /// minute -> hosts spiking then
    spiking: BTreeMap<u64, Vec<&'a str>>,
    peak: BTreeMap<u64, f64>,
    hosts_with_data: usize,
}

pub fn judge(input: &Input, hosts: &Hosts, t: &FleetThresholds) -> DetectorOutput {
    let mut out = DetectorOutput::default();
    let spikes = gather(input, t);
    let needed = ((spikes.hosts_with_data as f64 * t.spike_host_share).ceil() as usize).max(3);
    let minutes: Vec<(u64, usize)> = spikes
        .spiking
        .iter()
        .filter(|(_, h)| h.len() >= needed)
        .map(|(t, h)| (*t, h.len()))
        .collect();
    if minutes.is_empty() {
        return out;
    }
    out.findings.push(finding(&spikes, &minutes, hosts));
    out
}

/// Each host's minutes at or above `spike_factor` x its own median (and `spike_min`).
fn gather<'a>(input: &'a Input, t: &FleetThresholds) -> Spikes<'a> {
    let mut spikes = Spikes::default();
    for series in &input.attempts {
        let values: Vec<f64> = series
            .points
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| v.is_finite())
            .collect();
        if values.len() < 5 {
            continue;
        }
        spikes.hosts_with_data += 1;
        let baseline = util::median(&values).unwrap_or(0.0);
        for (time, value) in &series.points {
            if value.is_finite() && *value >= t.spike_min && *value >= t.spike_factor * baseline {
                spikes
                    .spiking
                    .entry(*time)
                    .or_default()
                    .push(series.label("instance"));
                *spikes.peak.entry(*time).or_default() += value;
            }
        }
    }
    spikes
}

/// The finding over the minutes where enough hosts spiked together (not empty).
fn finding(spikes: &Spikes, minutes: &[(u64, usize)], hosts: &Hosts) -> Finding {
    let Spikes {
        spiking,
        peak,
        hosts_with_data,
    } = spikes;
    let most = minutes.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let times: Vec<String> = minutes
        .iter()
        .map(|(t, n)| format!("{} ({n} hosts)", &util::clock(*t)[..5]))
        .collect();
    let mut finding = new_finding(
        ID,
        Severity::Warning,
        format!(
            "connection attempts spike on up to {most} of {hosts_with_data} hosts in the same minute, {} times",
            minutes.len()
        ),
    );
    finding
        .evidence
        .push(format!("minutes (UTC): {}", super::list(&times, 8)));
    if let Some(pattern) = minute_pattern(&minutes.iter().map(|(t, _)| *t).collect::<Vec<_>>()) {
        finding.evidence.push(pattern);
    }
    let worst = minutes
        .iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| *t)
        .unwrap_or(0);
    let names: Vec<String> = spiking
        .get(&worst)
        .map(|h| h.iter().map(|i| hosts.short(i)).collect())
        .unwrap_or_default();
    finding.evidence.push(format!(
        "at {}: {} connection attempts in the minute from {}",
        &util::clock(worst)[..5],
        peak.get(&worst).copied().unwrap_or(0.0).round(),
        super::list(&names, 8)
    ));
    finding.advice = "Many hosts open connections in the same minute: cron jobs, deploys or \
        restarts scheduled fleet-wide at the same time. Spread them (random delay, \
        RandomizedDelaySec= in systemd timers) so servers do not take every handshake and cold \
        pool at once."
        .to_string();
    finding.subjects.hosts = spiking
        .get(&worst)
        .map(|h| h.iter().map(|i| i.to_string()).collect())
        .unwrap_or_default();
    set_value(&mut finding, "spike_minutes", minutes.len() as f64);
    set_value(&mut finding, "max_hosts", most as f64);
    set_value(&mut finding, "hosts", *hosts_with_data as f64);
    finding.span = Some(crate::diagnose::Span {
        start_s: minutes[0].0,
        end_s: minutes[minutes.len() - 1].0,
    });
    finding.magnitude = most as f64;
    finding
}

/// "every 15 min, at minutes :00, :15, :30, :45" when the spikes recur evenly.
fn minute_pattern(times: &[u64]) -> Option<String> {
    if times.len() < 2 {
        return None;
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mut marks: Vec<String> = times
        .iter()
        .map(|t| format!(":{:02}", t / 60 % 60))
        .collect();
    marks.sort();
    marks.dedup();
    let even = gaps.iter().all(|g| *g == gaps[0]);
    Some(if even {
        format!(
            "every {} min, at minutes {}",
            gaps[0] / 60,
            super::list(&marks, 8)
        )
    } else {
        format!("at minutes {}", super::list(&marks, 8))
    })
}

pub fn run(c: &Collector, hosts: &Hosts, t: &FleetThresholds) -> Result<DetectorOutput, PromError> {
    Ok(judge(&collect(c)?, hosts, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testkit::series;

    #[test]
    fn the_same_minute_on_many_hosts_with_its_pattern() {
        // 10 hosts, 30 minutes from 12:00; 8 of them burst at :00, :10 and :20.
        let start = 1_700_000_000 / 3600 * 3600;
        let mut attempts = Vec::new();
        for h in 0..10 {
            let instance = format!("h{h}:19150");
            let points: Vec<(u64, f64)> = (0..30)
                .map(|m| {
                    let burst = h < 8 && m % 10 == 0;
                    (start + m * 60, if burst { 200.0 } else { 5.0 })
                })
                .collect();
            attempts.push(series(&[("instance", &instance)], &points));
        }
        let out = judge(
            &Input { attempts },
            &Hosts::default(),
            &FleetThresholds::default(),
        );
        assert_eq!(out.findings.len(), 1);
        let f = &out.findings[0];
        assert_eq!(
            f.title,
            "connection attempts spike on up to 8 of 10 hosts in the same minute, 3 times"
        );
        assert!(
            f.evidence
                .contains(&"every 10 min, at minutes :00, :10, :20".to_string()),
            "{:?}",
            f.evidence
        );
        assert_eq!(f.subjects.hosts.len(), 8);
    }

    #[test]
    fn one_host_bursting_alone_is_not_fleet_synchronous() {
        let mut attempts = Vec::new();
        for h in 0..10 {
            let points: Vec<(u64, f64)> = (0..30)
                .map(|m| (m * 60, if h == 0 && m == 7 { 500.0 } else { 5.0 }))
                .collect();
            attempts.push(series(&[("instance", &format!("h{h}"))], &points));
        }
        assert!(judge(
            &Input { attempts },
            &Hosts::default(),
            &FleetThresholds::default()
        )
        .findings
        .is_empty());
    }
}
