//! Unit tests of the text report: layout, truncation and wording of findings.

use super::*;
use crate::diagnose::{
    testkit::*, DiagnoseThresholds, Report, Severity, Source, SourceKind, REPORT_VERSION,
};
use crate::history::Fact;

use crate::model::{ClosedBy, DeadWriteOutcome, Role, Status, SynDirection};

const LONG_COMM: &str = "a-very-long-process-name-that-is-not-a-comm";
const IPV6_SERVER: &str = "[2001:db8:1234:5678:9abc:def0:1234:5678]:11211";

/// Several incidents at once, with labels longer than any column, to stress the layout.
fn incident_report() -> Report {
    let mut sim = Sim::new();
    sim.healthy(T0, T0 + 300);
    for (i, idle) in [60.3, 60.9, 61.4, 60.2].into_iter().enumerate() {
        let t = T0 + 20 + 50 * i as u64;
        sim.record(
            t,
            Fact::ConnectionClosed {
                service: SERVICE.into(),
                server: IPV6_SERVER.into(),
                role: Role::Client,
                comm: None,
                closed_by: ClosedBy::Peer,
                idle_before_close_s: Some(idle),
                duration_s: Some(100.0),
            },
        );
        sim.record(
            t + 5,
            Fact::DeadWrite {
                service: SERVICE.into(),
                server: IPV6_SERVER.into(),
                role: Role::Client,
                comm: format!("{LONG_COMM}\x1b[31m"),
                command: Some("set".into()),
                outcome: DeadWriteOutcome::Unnoticed,
            },
        );
    }
    for t in (T0 + 100..T0 + 160).flat_map(|t| [t; 5]) {
        sim.error_reply(
            t,
            (SERVICE, SERVERS[0]),
            Role::Client,
            "php-fpm",
            Status::ServerError,
            "out of memory storing object",
            300,
        );
    }
    for t in T0 + 100..T0 + 300 {
        for _ in 0..30 {
            let latency = 100 + sim.random(400) as u32;
            sim.request(t, IPV6_SERVER, LONG_COMM, "get", Status::Hit, Some(latency));
        }
    }
    for t in T0 + 200..T0 + 205 {
        sim.record(
            t,
            Fact::Syns {
                service: SERVICE.into(),
                direction: SynDirection::In,
                count: 900,
            },
        );
        sim.record(
            t,
            Fact::ListenQueue {
                service: SERVICE.into(),
                listener: "0.0.0.0:11211".into(),
                length: 1024,
                limit: 1024,
            },
        );
    }
    sim.record(
        T0 + 250,
        Fact::ProcessFds {
            comm: LONG_COMM.into(),
            pid: 99,
            open_fds: 1020,
            limit: 1024,
        },
    );
    let snapshot = sim.snapshot(T0 + 300);
    Report::build(
        &snapshot,
        &DiagnoseThresholds::default(),
        Source {
            kind: SourceKind::Daemon,
            watched_s: 30,
            prometheus: None,
            hosts: None,
            partial: false,
        },
        T0 + 301,
        30,
    )
}

#[test]
fn text_fits_80_columns_and_has_no_escapes_without_colour() {
    let report = incident_report();
    assert!(report.findings.len() >= 3, "{:#?}", report.findings);
    assert!(!report.edges.is_empty());
    let text = text(&report, TextOptions { colour: false });
    for line in text.lines() {
        assert!(line.len() <= WIDTH, "{} columns: {line:?}", line.len());
        assert!(line.chars().all(|c| (' '..='~').contains(&c)), "{line:?}");
    }
    assert!(text.contains("CRITICAL"));
    let flowing = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flowing.contains("closes clients idle for 60 s"), "{text}");
    assert!(text.contains("PROCESS"));
    assert!(
        text.contains("a-very-long-pr~"),
        "cut to the column: {text}"
    );
}

#[test]
fn colour_only_adds_escapes_around_the_severity() {
    let report = incident_report();
    let plain = text(&report, TextOptions { colour: false });
    let coloured = text(&report, TextOptions { colour: true });
    assert!(coloured.contains("\x1b[1;31mCRITICAL\x1b[0m"));
    let stripped = coloured
        .replace("\x1b[1;31m", "")
        .replace("\x1b[1;33m", "")
        .replace("\x1b[1;36m", "")
        .replace("\x1b[0m", "");
    assert_eq!(stripped, plain);
}

#[test]
fn wrap_splits_long_words_and_keeps_indents() {
    let word = "x".repeat(200);
    let lines = text::wrap(&format!("short {word} tail"), "  - ", "    ");
    assert!(lines.iter().all(|l| l.len() <= WIDTH), "{lines:?}");
    assert_eq!(lines[0], "  - short");
    assert!(lines[1..].iter().all(|l| l.starts_with("    ")));
    assert_eq!(lines.concat().matches('x').count(), 200);
    assert_eq!(text::wrap("", "", ""), vec![String::new()]);
}

#[test]
fn healthy_report_says_nothing_found() {
    let mut sim = Sim::new();
    sim.healthy(T0, T0 + 120);
    let snapshot = sim.snapshot(T0 + 120);
    let report = Report::build(
        &snapshot,
        &DiagnoseThresholds::default(),
        Source {
            kind: SourceKind::Local,
            watched_s: 120,
            prometheus: None,
            hosts: None,
            partial: false,
        },
        T0 + 121,
        120,
    );
    let text = text(&report, TextOptions::default());
    assert!(
        text.starts_with("cacheprobe diagnose: no problems found in"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.len() <= WIDTH));
}

fn schema() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/diagnose-schema.json");
    let text = std::fs::read_to_string(path).expect("docs/diagnose-schema.json exists");
    serde_json::from_str(&text).expect("the schema is JSON")
}

#[test]
fn json_matches_the_documented_schema() {
    let validator = jsonschema::validator_for(&schema()).expect("the schema is a valid schema");
    let report = incident_report();
    let json: serde_json::Value = serde_json::from_str(&json(&report)).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&json)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(json["version"], REPORT_VERSION);
    assert!(json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["values"]["idle_timeout_s"] == 60.0));
    assert!(json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["error_texts"][0]["text"] == "out of memory storing object"));

    // The schema really constrains: a wrong severity or a missing field is rejected.
    let mut broken = json.clone();
    broken["findings"][0]["severity"] = "fatal".into();
    assert!(!validator.is_valid(&broken));
    let mut broken = json;
    broken.as_object_mut().unwrap().remove("edges");
    assert!(!validator.is_valid(&broken));
}

#[test]
fn every_detector_id_is_in_the_schema() {
    let schema = schema();
    let ids: Vec<&str> = schema["$defs"]["finding"]["properties"]["id"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let sources = [
        include_str!("../idle.rs"),
        include_str!("../slow.rs"),
        include_str!("../errors.rs"),
        include_str!("../misses.rs"),
        include_str!("../routing.rs"),
        include_str!("../fds.rs"),
        include_str!("../listen.rs"),
        include_str!("../tcp.rs"),
        include_str!("../spikes.rs"),
    ];
    for source in sources {
        for part in source.split("Finding::new(").skip(1) {
            let id = part.trim_start().trim_start_matches('"');
            let id = &id[..id.find('"').unwrap()];
            assert!(ids.contains(&id), "{id} missing from the schema");
        }
    }
}

#[test]
fn dot_is_valid_graphviz() {
    let report = incident_report();
    let graph = dot(&report);
    assert!(graph.starts_with("digraph cacheprobe {\n") && graph.ends_with("}\n"));
    assert_eq!(
        graph.matches(" -> ").count(),
        report.edges.len(),
        "one arrow per edge"
    );
    assert!(!graph.contains('\x1b'), "escapes sanitised");
    assert!(graph.contains("color=red"), "the troubled server is red");
    // Render it for real when Graphviz is installed (xtask setup installs it).
    match std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(graph.as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "dot rejected the graph: {}\n{graph}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(String::from_utf8_lossy(&output.stdout).contains("<svg"));
        }
        Err(err) => eprintln!("graphviz not installed ({err}); checked the syntax only"),
    }
}

#[test]
fn severities_render_in_rank_order() {
    let report = incident_report();
    let severities: Vec<Severity> = report.findings.iter().map(|f| f.severity).collect();
    let mut sorted = severities.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(severities, sorted);
}

/// Prints an example report (for the README):
/// `cargo test -p cacheprobe --lib diagnose::render::tests::example -- --ignored --nocapture`
#[test]
#[ignore]
fn example() {
    let report = incident_report();
    println!("{}", text(&report, TextOptions { colour: false }));
    println!("{}", dot(&report));
}
