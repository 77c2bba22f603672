//! The classic-tracepoint path (perf_event_open, no bpf() links, no socket-local storage), which
//! kernels without BTF take, forced on this kernel with `limits.classic_tracepoints = true`:
//! `check` says every probe attached that way, and the agent still follows connections (one
//! opened before it included) and decodes every request on both sides.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

const WAIT: Duration = Duration::from_secs(15);
const CLASSIC: &str = "\n[limits]\nclassic_tracepoints = true\n";

#[test]
fn check_reports_every_probe_on_its_classic_tracepoint_when_forced() {
    require_root();
    let dir = scratch_dir("classic-check");
    let config = dir.join("config.toml");
    let services = services_config(&[("memcached", unique_port(), "memcache")]);
    std::fs::write(&config, format!("{services}{CLASSIC}")).unwrap();
    let report = succeeded_json(
        "check",
        Command::new(agent_binary())
            .args(["check", "--json", "--config"])
            .arg(&config),
    );
    assert_eq!(report["usable"], true, "{report:#}");
    let items = report["items"].as_array().unwrap();
    let probes: Vec<&serde_json::Value> = items
        .iter()
        .filter(|item| item["name"].as_str().unwrap().starts_with("tracepoint "))
        .collect();
    assert!(probes.len() >= 10, "{report:#}");
    for probe in probes {
        assert_eq!(probe["status"], "ok", "{probe:#}");
        let detail = probe["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("attached (classic tracepoint through perf_event_open")
                && detail.contains("limits.classic_tracepoints"),
            "{probe:#}"
        );
    }
    let storage = items
        .iter()
        .find(|item| item["name"] == "per-socket state")
        .unwrap_or_else(|| panic!("{report:#}"));
    let detail = storage["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("classic tracepoints:") && detail.contains("limits.classic_tracepoints"),
        "{storage:#}"
    );
    let capture = items
        .iter()
        .find(|item| item["name"] == "payload capture")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(capture["status"], "ok", "{capture:#}");
}

/// The lifecycle and memcache root tests' workloads on classic tracepoints: a pooled pymemcache
/// connection opened before the agent (adopted at its first send), the memcache tests' scripted
/// pymemcache + python-memcache workload, and a connection memcached closes (a raw `quit`: the
/// client sees its peer close, memcached closes locally).
#[test]
fn classic_tracepoints_follow_connections_and_decode_requests() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    // Opened before the agent: its set is not seen, its get after `release` is.
    let pooled = EarlyClient::connect(port, "classic-run-client", "pooled", Duration::ZERO);

    let services = services_config(&[("memcached", port, "memcache")]);
    let agent = Agent::start_with_config("classic-run", &format!("{services}{CLASSIC}")).unwrap();
    assert!(
        agent.log().contains("limits.classic_tracepoints"),
        "the agent does not say it was forced onto classic tracepoints: {}",
        agent.log()
    );
    pooled.release();
    pooled.finish();
    python(None, &scripted_text_workload(port)).unwrap();
    raw_request(port, r"quit\r\n", "").unwrap();
    // The script's 20 requests, the pooled connection's get and the `quit`.
    let scrape = agent.wait_for(WAIT, |s| {
        s.requests(&[("role", "server")]) >= 22.0
            && s.requests(&[("role", "client")]) >= 22.0
            && s.sum("cacheprobe_connections_closed_total", &[]) >= 8.0
    });
    for role in ["client", "server"] {
        assert_text_workload(&scrape, role, 1.0, 2.0);
        // memcached answers the `quit` by closing.
        assert_eq!(
            scrape.requests(&[("role", role), ("command", "quit")]),
            1.0,
            "{role}: {}",
            scrape.text
        );
    }
    scrape.assert_no_decode_errors();
    // Three connections opened under the agent (pymemcache's, python-memcache's, the raw one),
    // seen at both ends; the pooled one predates it and is no open, but its close counts.
    for role in ["client", "server"] {
        assert_eq!(
            scrape.sum("cacheprobe_connections_opened_total", &[("role", role)]),
            3.0,
            "{role}: {}",
            scrape.text
        );
        assert_eq!(
            scrape.sum("cacheprobe_connections_closed_total", &[("role", role)]),
            4.0,
            "{role}: {}",
            scrape.text
        );
    }
    // memcached closed the `quit` connection: the client saw its peer close.
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &[("role", "client"), ("closed_by", "peer")]
        ),
        1.0,
        "{}",
        scrape.text
    );
    scrape.assert_probes_up_and_nothing_lost();
    let status = agent.stop().unwrap();
    assert!(status.success(), "agent exit status {status}");
}
