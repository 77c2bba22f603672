//! `cacheprobe diagnose --prometheus`: fleet detectors over PromQL. Each detector collects a few query results, a pure judge turns them into findings, rendered like the per-host report.

pub mod bad_server;
pub mod both_ends;
pub mod coverage;
pub mod edge_time;
pub mod idle;
pub mod mesh;
pub mod prom;
pub mod ring;
pub mod shared;
pub mod spikes;

#[cfg(test)]
mod testkit;

use std::{
    collections::BTreeMap,
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::diagnose::{Edge, Finding, Report, Severity, Source, SourceKind, Span};
use prom::{Answer, Client, PromError, Sample, Series};

/// Thresholds of the fleet detectors. Fixed for now: the fleet view has no config file of its
/// own, and these mirror the per-host detectors' defaults.
#[derive(Debug, Clone)]
pub struct FleetThresholds {
    /// Requests per second a client host must send a server before its latency is judged.
    pub min_requests_per_s: f64,
    /// A client's p99 to a server at least this, and `slow_path_factor` times the median of the
    /// server's other clients, names a slow path.
    pub slow_path_min_ms: f64,
    pub slow_path_factor: f64,
    /// A server's own (server-side) p99 at least this, and that factor above its peers'.
    pub slow_server_min_ms: f64,
    pub slow_server_factor: f64,
    /// Share of requests timed out or unanswered that makes a server "not answering".
    pub failing_ratio: f64,
    /// Client connections per server, summed over hosts, that count as a mesh problem.
    pub mesh_connections: f64,
    /// Pools smaller than this are not called a full mesh: everybody talks to two servers.
    pub mesh_min_servers: usize,
    /// A host's per-minute connection attempts this many times its own median is a spike ...
    pub spike_factor: f64,
    /// ... and at least this many attempts in the minute.
    pub spike_min: f64,
    /// A minute where at least this share of hosts (and 3 hosts) spike is fleet-synchronous.
    pub spike_host_share: f64,
}

impl Default for FleetThresholds {
    fn default() -> Self {
        FleetThresholds {
            min_requests_per_s: 0.2,
            slow_path_min_ms: 10.0,
            slow_path_factor: 3.0,
            slow_server_min_ms: 20.0,
            slow_server_factor: 3.0,
            failing_ratio: 0.05,
            mesh_connections: 1000.0,
            mesh_min_servers: 4,
            spike_factor: 3.0,
            spike_min: 30.0,
            spike_host_share: 0.3,
        }
    }
}

/// Requests a latency must have been measured over before its p99 is judged: the p99 of fewer
/// than 100 requests is their slowest one, so one stall (a starved VM, a pause of the process)
/// would make a server "slow". Seen in `cargo xtask fleet-test` under load: 40 requests a
/// window, and a healthy server's p99 at its own socket 6 times its peers'.
pub const MIN_P99_REQUESTS: f64 = 100.0;

/// Requests a server's own p99 must rest on before the server is called slow for everyone: at
/// least 5 in its top 1%. Over 100-200 requests the p99 is one or two requests, and one stall
/// of the server's host (a VM paused for 70 ms in `cargo xtask fleet-test` at load 11) made
/// a healthy server "slow for everyone" against peers at 10 ms.
pub const MIN_SLOW_SERVER_REQUESTS: f64 = 500.0;

/// What a run asks about.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Evaluation time (unix seconds): the end of the window.
    pub at: u64,
    pub window_s: u64,
    /// `--service`: only this service's series.
    pub service: Option<String>,
}

impl Scope {
    /// The PromQL range of the window, e.g. "1800s".
    pub fn range(&self) -> String {
        format!("{}s", self.window_s.max(60))
    }

    /// Extra label matchers (with a leading comma) restricting to `--service`.
    pub fn service_matcher(&self) -> String {
        match &self.service {
            Some(service) => format!(",service=\"{}\"", escape(service)),
            None => String::new(),
        }
    }
}

/// Escapes a PromQL string literal's content.
pub fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Host names by Prometheus `instance`, from `cacheprobe_host_info`.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    pub names: BTreeMap<String, String>,
}

impl Hosts {
    pub fn from_samples(samples: &[Sample]) -> Hosts {
        let mut names = BTreeMap::new();
        for sample in samples {
            let hostname = sample.label("hostname");
            if !hostname.is_empty() {
                names.insert(sample.label("instance").to_string(), hostname.to_string());
            }
        }
        Hosts { names }
    }

    /// "web-3 (10.0.0.3:19150)", or the instance alone when the host did not say its name.
    pub fn describe(&self, instance: &str) -> String {
        match self.names.get(instance) {
            Some(name) if name != instance => format!("{name} ({instance})"),
            _ => instance.to_string(),
        }
    }

    /// The short name for lists: the hostname, else the instance.
    pub fn short(&self, instance: &str) -> String {
        self.names
            .get(instance)
            .cloned()
            .unwrap_or_else(|| instance.to_string())
    }
}

/// Runs queries for the detectors and remembers what went wrong, so one failed query marks the
/// report partial instead of ending it.
pub struct Collector<'a> {
    pub client: &'a Client,
    pub scope: Scope,
    problems: Mutex<Vec<String>>,
    deadline: Instant,
    /// Queries in flight: detectors run side by side, but more queries at once than this only
    /// make each slower on the Prometheus side.
    in_flight: Mutex<usize>,
    slot_freed: Condvar,
    latency: OnceLock<Result<Arc<shared::Latency>, PromError>>,
    requests: OnceLock<Result<Arc<shared::Requests>, PromError>>,
}

/// Queries one run keeps in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;

impl<'a> Collector<'a> {
    pub fn new(client: &'a Client, scope: Scope) -> Collector<'a> {
        Collector {
            client,
            scope,
            problems: Mutex::new(Vec::new()),
            deadline: Instant::now() + RUN_DEADLINE,
            in_flight: Mutex::new(0),
            slot_freed: Condvar::new(),
            latency: OnceLock::new(),
            requests: OnceLock::new(),
        }
    }

    /// Both roles' latency histograms, fetched by the first detector that asks.
    pub fn latency(&self) -> Result<Arc<shared::Latency>, PromError> {
        self.latency
            .get_or_init(|| shared::fetch_latency(self).map(Arc::new))
            .clone()
    }

    /// Client-side request counts by status, fetched by the first detector that asks.
    pub fn requests(&self) -> Result<Arc<shared::Requests>, PromError> {
        self.requests
            .get_or_init(|| shared::fetch_requests(self).map(Arc::new))
            .clone()
    }

    fn with_slot<T>(&self, query: impl FnOnce() -> T) -> T {
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            while *in_flight >= MAX_IN_FLIGHT {
                in_flight = self
                    .slot_freed
                    .wait(in_flight)
                    .unwrap_or_else(|e| e.into_inner());
            }
            *in_flight += 1;
        }
        let result = query();
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.slot_freed.notify_one();
        result
    }

    fn check_deadline(&self) -> Result<(), PromError> {
        if Instant::now() >= self.deadline {
            return Err(PromError::Timeout {
                url: self.client.url().to_string(),
                timeout_s: RUN_DEADLINE.as_secs(),
            });
        }
        Ok(())
    }

    fn keep_warnings<T>(&self, answer: Answer<T>) -> T {
        if !answer.warnings.is_empty() {
            let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
            for warning in answer.warnings {
                problems.push(format!("Prometheus warned: {warning}"));
            }
        }
        answer.data
    }

    pub fn instant(&self, query: &str) -> Result<Vec<Sample>, PromError> {
        self.check_deadline()?;
        let answer = self.with_slot(|| self.client.query(query, self.scope.at))?;
        Ok(self.keep_warnings(answer))
    }

    pub fn exemplars(&self, query: &str) -> Result<Vec<prom::ExemplarSeries>, PromError> {
        self.check_deadline()?;
        let start = self.scope.at.saturating_sub(self.scope.window_s);
        let answer = self.with_slot(|| self.client.query_exemplars(query, start, self.scope.at))?;
        Ok(self.keep_warnings(answer))
    }

    pub fn range(&self, query: &str, step_s: u64) -> Result<Vec<Series>, PromError> {
        self.check_deadline()?;
        let start = self.scope.at.saturating_sub(self.scope.window_s);
        let answer =
            self.with_slot(|| self.client.query_range(query, start, self.scope.at, step_s))?;
        Ok(self.keep_warnings(answer))
    }

    fn problem(&self, text: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text);
    }
}

/// A detector as the runner sees it: collect, then judge.
type Detector = fn(&Collector, &Hosts, &FleetThresholds) -> Result<DetectorOutput, PromError>;

#[derive(Default)]
pub struct DetectorOutput {
    pub findings: Vec<Finding>,
    pub edges: Vec<Edge>,
    pub notes: Vec<String>,
}

const DETECTORS: &[(&str, Detector)] = &[
    ("coverage", coverage::run),
    ("time between the boxes", edge_time::run),
    ("idle timeouts", idle::run),
    ("bad server in a pool", bad_server::run),
    ("ring disagreement", ring::run),
    ("connection mesh", mesh::run),
    ("synchronous spikes", spikes::run),
    ("requests seen from both ends", both_ends::run),
];

/// The outcome of a fleet run: the report, and whether some detectors could not run.
pub struct FleetOutcome {
    pub report: Report,
    pub partial: bool,
}

/// Longest a whole run may take: each query has its own timeout, this bounds their sum.
pub const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// Runs every detector against Prometheus. Errors that make the whole run meaningless
/// (unreachable, auth refused, not Prometheus, no cacheprobe series at all) are returned;
/// a detector whose queries fail marks the report partial.
pub fn run(
    client: &Client,
    scope: Scope,
    thresholds: &FleetThresholds,
    generated_at_s: u64,
) -> anyhow::Result<FleetOutcome> {
    let collector = Collector::new(client, scope.clone());
    let known = agents_seen(&collector, client, &scope)?;
    let hosts = host_names(&collector, &scope.range());
    let results = run_detectors(&collector, &hosts, thresholds);
    let (mut output, failed) = combine(results);
    if failed.len() == DETECTORS.len() {
        anyhow::bail!(
            "every fleet detector failed against {}: {}",
            client.url(),
            failed.join("; ")
        );
    }
    merge_server_findings(&mut output.findings);
    crate::diagnose::rank(&mut output.findings);
    let problems = collector
        .problems
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let partial = !failed.is_empty() || !problems.is_empty();
    for failure in &failed {
        output.notes.push(format!("PARTIAL: detector {failure}"));
    }
    for problem in problems {
        output.notes.push(format!("PARTIAL: {problem}"));
    }
    output.edges.sort_by(|a, b| {
        b.requests_per_s
            .total_cmp(&a.requests_per_s)
            .then_with(|| a.host.cmp(&b.host))
            .then_with(|| a.server.cmp(&b.server))
    });
    let report = report(client, &scope, generated_at_s, known.len(), partial, output);
    Ok(FleetOutcome { report, partial })
}

/// The agents with series in the window, by (instance, job); an error when there are none.
fn agents_seen(
    collector: &Collector,
    client: &Client,
    scope: &Scope,
) -> anyhow::Result<Vec<Sample>> {
    // One cheap query first: an unreachable server, refused credentials or a non-Prometheus
    // endpoint end the run here with one clear message, before seven detectors fail alike.
    let range = scope.range();
    let known = collector
        .instant(&format!(
            "max by (instance, job) (max_over_time(cacheprobe_build_info[{range}]))"
        ))
        .map_err(anyhow::Error::from)?;
    anyhow::ensure!(
        !known.is_empty(),
        "no cacheprobe series in Prometheus at {} between {} and {} UTC: are the agents scraped \
         (job with targets on port 19150), and is --since long enough?",
        client.url(),
        crate::diagnose::util::clock(scope.at.saturating_sub(scope.window_s)),
        crate::diagnose::util::clock(scope.at),
    );
    Ok(known)
}

/// Host names and kernels from the agents' host info; none (and a PARTIAL note) if unavailable.
fn host_names(collector: &Collector, range: &str) -> Hosts {
    Hosts::from_samples(
        &collector
            .instant(&format!(
                "max by (instance, hostname, kernel) (last_over_time(cacheprobe_host_info[{range}]))"
            ))
            .unwrap_or_else(|err| {
                collector.problem(format!("host names unavailable: {err}"));
                Vec::new()
            }),
    )
}

/// Every detector on its own thread; a panicking detector counts as a failed one.
fn run_detectors<'a>(
    collector: &Collector,
    hosts: &Hosts,
    thresholds: &FleetThresholds,
) -> Vec<(&'a str, Result<DetectorOutput, PromError>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = DETECTORS
            .iter()
            .map(|(name, detector)| {
                let (collector, hosts) = (&collector, &hosts);
                (
                    *name,
                    s.spawn(move || detector(collector, hosts, thresholds)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, handle)| {
                let result = handle.join().unwrap_or_else(|_| {
                    Err(PromError::Query {
                        query: String::new(),
                        error_type: "internal".to_string(),
                        error: "the detector panicked".to_string(),
                    })
                });
                (name, result)
            })
            .collect()
    })
}

/// The detectors' outputs in one, in detector order, and "name: error" per failed detector.
fn combine(
    results: Vec<(&str, Result<DetectorOutput, PromError>)>,
) -> (DetectorOutput, Vec<String>) {
    let mut all = DetectorOutput::default();
    let mut failed = Vec::new();
    for (name, result) in results {
        match result {
            Ok(mut output) => {
                all.findings.append(&mut output.findings);
                all.edges.append(&mut output.edges);
                all.notes.append(&mut output.notes);
            }
            Err(err) => failed.push(format!("{name}: {err}")),
        }
    }
    (all, failed)
}

fn report(
    client: &Client,
    scope: &Scope,
    generated_at_s: u64,
    known_hosts: usize,
    partial: bool,
    output: DetectorOutput,
) -> Report {
    Report {
        schema: crate::diagnose::REPORT_SCHEMA.to_string(),
        version: crate::diagnose::REPORT_VERSION,
        generated_at_s,
        source: Source {
            kind: SourceKind::Prometheus,
            watched_s: 0,
            prometheus: Some(client.url().to_string()),
            hosts: Some(known_hosts as u64),
            partial,
        },
        window: Span {
            start_s: scope.at.saturating_sub(scope.window_s),
            end_s: scope.at,
        },
        findings: output.findings,
        edges: output.edges,
        edge_window: None,
        notes: output.notes,
    }
}

/// A server named slow by the server-side comparison needs no second finding from the pool
/// comparison: keep the pool's evidence under the first.
fn merge_server_findings(findings: &mut Vec<Finding>) {
    let slow: Vec<(String, usize)> = findings
        .iter()
        .enumerate()
        .filter(|(_, f)| f.id == edge_time::SLOW_SERVER_ID)
        .filter_map(|(i, f)| f.subjects.servers.first().map(|s| (s.clone(), i)))
        .collect();
    // One slow client path also raises the pool-wide p99 of its server: that is the path's
    // finding, not a slow server.
    let slow_paths: Vec<String> = findings
        .iter()
        .filter(|f| f.id == edge_time::SLOW_PATH_ID)
        .filter_map(|f| f.subjects.servers.first().cloned())
        .collect();
    let mut drop = Vec::new();
    let mut explained = Vec::new();
    for (i, finding) in findings.iter().enumerate() {
        if finding.id != bad_server::ID || finding.severity == Severity::Critical {
            continue;
        }
        let server = finding.subjects.servers.first();
        if server.is_some_and(|s| slow_paths.contains(s))
            && !slow.iter().any(|(s, _)| Some(s) == server)
        {
            explained.push(i);
            continue;
        }
        if let Some((_, target)) = slow
            .iter()
            .find(|(server, _)| finding.subjects.servers.first() == Some(server))
        {
            drop.push((i, *target));
        }
    }
    for (from, to) in &drop {
        let lines = findings[*from].evidence.clone();
        findings[*to].evidence.extend(lines);
    }
    let mut index = 0;
    findings.retain(|_| {
        index += 1;
        !drop.iter().any(|(from, _)| *from == index - 1) && !explained.contains(&(index - 1))
    });
}

/// PromQL for what counter `selector` (a metric with its matchers) counted in the window `w`,
/// including what a series held at its first sample when it first appeared inside the
/// window. The agent creates a labelled series at its first event, so the series of a rare
/// event (the first dead write of a process to a server, the first idle close) is born with
/// a value above zero, which `increase()` alone cannot see: it only counts growth between
/// samples. A series with a sample before the window (`offset`, with the usual 5-minute
/// lookback) is counted by `increase()` only; one born inside the window also gets its first
/// value (`min_over_time`, the first for a counter), and one with a single sample there is
/// counted by that value alone.
pub fn increase_with_new(selector: &str, w: &str) -> String {
    let grown = format!("increase({selector}[{w}])");
    let born = format!("(min_over_time({selector}[{w}]) unless {selector} offset {w})");
    format!("(({grown} + {born}) or {grown} or {born})")
}

/// Finite values only: PromQL divisions by zero give NaN, which no judge should see.
pub fn finite(samples: Vec<Sample>) -> Vec<Sample> {
    samples
        .into_iter()
        .filter(|s| s.value.is_finite())
        .collect()
}

/// Milliseconds for evidence.
pub fn ms(seconds: f64) -> String {
    crate::diagnose::util::latency(seconds * 1e6)
}

pub fn new_finding(id: &str, severity: Severity, title: String) -> Finding {
    Finding {
        id: id.to_string(),
        severity,
        title,
        evidence: Vec::new(),
        advice: String::new(),
        subjects: Default::default(),
        values: BTreeMap::new(),
        span: None,
        error_texts: Vec::new(),
        magnitude: 0.0,
    }
}

pub fn set_value(finding: &mut Finding, name: &str, value: f64) {
    if value.is_finite() {
        finding.values.insert(name.to_string(), value);
    }
}

/// Lists at most `max` items, then "and N more".
pub fn list(items: &[String], max: usize) -> String {
    crate::diagnose::util::truncated(items, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::render;

    /// A fleet report built from the detectors' own judges: valid against the documented
    /// schema, and its text fits the terminal like the per-host report.
    #[test]
    fn fleet_reports_follow_the_schema_and_render() {
        let mut input = edge_time::Input::default();
        for (instance, p99) in [("h1:19150", 0.001), ("h2:19150", 0.0011), ("h3:19150", 0.3)] {
            let l = [
                ("instance", instance),
                ("service", "memcached"),
                ("server", "10.0.2.1:11211"),
            ];
            input.client_rate.push(testkit::sample(&l, 10.0));
            input.client_p99.push(testkit::sample(&l, p99));
        }
        input.server_p99.push(testkit::sample(
            &[
                ("instance", "s1:19150"),
                ("service", "memcached"),
                ("server", "10.0.2.1:11211"),
            ],
            0.0005,
        ));
        let mut hosts = Hosts::default();
        hosts
            .names
            .insert("h3:19150".into(), "a-rather-long-host-name-web-3".into());
        let out = edge_time::judge(&input, &hosts, &FleetThresholds::default());
        let report = Report {
            schema: crate::diagnose::REPORT_SCHEMA.to_string(),
            version: crate::diagnose::REPORT_VERSION,
            generated_at_s: 1_700_000_000,
            source: Source {
                kind: SourceKind::Prometheus,
                watched_s: 0,
                prometheus: Some("http://127.0.0.1:9090".into()),
                hosts: Some(4),
                partial: true,
            },
            window: Span {
                start_s: 1_699_998_200,
                end_s: 1_700_000_000,
            },
            findings: out.findings,
            edges: out.edges,
            edge_window: None,
            notes: vec!["PARTIAL: detector ring disagreement: timeout".into()],
        };
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/diagnose-schema.json")).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let json: serde_json::Value = serde_json::from_str(&render::json(&report)).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(json["source"]["kind"], "prometheus");
        assert_eq!(json["source"]["partial"], true);
        assert_eq!(json["findings"][0]["subjects"]["hosts"][0], "h3:19150");
        assert_eq!(json["edges"][0]["server_p99_ms"], 0.5);

        let text = render::text(&report, render::TextOptions::default());
        assert!(text.lines().all(|l| l.len() <= render::WIDTH), "{text}");
        assert!(text.contains("(4 agents in Prometheus"), "{text}");
        assert!(text.contains("9090; PARTIAL)"), "{text}");
        assert!(text.contains("HOST            SERVER"), "{text}");
        assert!(
            text.contains("a-rather-long-host-name-web-3 (h3:19150) -> 10.0.2.1:11211"),
            "{text}"
        );
    }

    #[test]
    fn merged_findings_keep_one_per_server() {
        let mut slow = new_finding(edge_time::SLOW_SERVER_ID, Severity::Warning, "a".into());
        slow.subjects.servers = vec!["s:1".into()];
        let mut pool = new_finding(bad_server::ID, Severity::Warning, "b".into());
        pool.subjects.servers = vec!["s:1".into()];
        pool.evidence
            .push("seen from 3 client hosts together".into());
        let mut other = new_finding(bad_server::ID, Severity::Warning, "c".into());
        other.subjects.servers = vec!["t:1".into()];
        let mut findings = vec![slow, pool, other];
        merge_server_findings(&mut findings);
        assert_eq!(findings.len(), 2);
        assert_eq!(
            findings[0].evidence,
            vec!["seen from 3 client hosts together".to_string()]
        );
        assert_eq!(findings[1].title, "c");
    }
}
