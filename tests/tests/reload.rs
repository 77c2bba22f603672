//! A SIGHUP that adds and reorders services: metrics and `diagnose` must keep naming every
//! connection's service, those opened before the reload and those opened after it.

use std::time::{Duration, Instant};

use cacheprobe_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// Healthy traffic from a process named "webapp".
fn healthy_script(port: u16) -> String {
    format!(
        "import ctypes\n\
         from pymemcache.client.base import Client\n\
         ctypes.CDLL(None).prctl(15, b'webapp', 0, 0, 0)\n\
         c = Client(('127.0.0.1', {port}))\n\
         for i in range(20):\n\
         \x20   c.set('k%d' % i, 'v', noreply=False)\n\
         \x20   c.get('k%d' % i)\n\
         c.close()\n"
    )
}

#[test]
fn a_reload_that_adds_and_reorders_services_keeps_every_name_right() {
    require_root();
    let old_port = unique_port();
    let new_port = unique_port();
    let old_server = format!("127.0.0.1:{old_port}");
    let new_server = format!("127.0.0.1:{new_port}");
    let agent = Agent::start("reload-order", &[("old", old_port, "memcache")]).unwrap();
    let _old = start_memcached(None, "127.0.0.1", old_port, &["-o", "idle_timeout=2"]).unwrap();
    let _new = start_memcached(None, "127.0.0.1", new_port, &[]).unwrap();

    // One connection opened before the reload, written onto after the server closed it.
    let before = std::thread::spawn(move || python(None, &idle_then_write_script(old_port, 1)));
    std::thread::sleep(Duration::from_millis(1500));

    // The new service goes first: every position in the service list changes meaning.
    std::fs::write(
        &agent.config_path,
        services_config(&[("new", new_port, "memcache"), ("old", old_port, "memcache")]),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while !agent.log().contains("config reloaded") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    let after = std::thread::spawn(move || python(None, &idle_then_write_script(old_port, 3)));
    python(None, &healthy_script(new_port)).unwrap();
    before.join().unwrap().unwrap();
    after.join().unwrap().unwrap();

    // Each dead write is reported once its outcome is known.
    let dead_writes = |s: &Scrape| {
        s.sum(
            "cacheprobe_dead_socket_writes_total",
            &[("service", "old"), ("server", &old_server)],
        )
    };
    let scrape = agent.wait_for(WAIT, |s| dead_writes(s) >= 4.0);
    assert_eq!(dead_writes(&scrape), 4.0, "{}", scrape.text);
    for (service, server) in [("old", &old_server), ("new", &new_server)] {
        assert!(
            scrape.sum(
                "cacheprobe_memcache_requests_total",
                &[("service", service), ("server", server), ("role", "client")]
            ) > 0.0,
            "no requests for {service} at {server}: {}",
            scrape.text
        );
    }
    // No series anywhere puts a server under the other service's name.
    for sample in &scrape.samples {
        let expected = match sample.labels.get("server") {
            Some(server) if *server == old_server => "old",
            Some(server) if *server == new_server => "new",
            _ => continue,
        };
        assert_eq!(
            sample.labels.get("service").map(String::as_str),
            Some(expected),
            "{sample:?}"
        );
    }

    let (output, report) = daemon_report(&agent);
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let findings = report["findings"].as_array().unwrap();
    for finding in findings {
        let servers = subjects(finding, "servers");
        let services = subjects(finding, "services");
        if servers.contains(&old_server) {
            assert_eq!(services, ["old"], "{finding:#}");
        }
        if servers.contains(&new_server) {
            assert_eq!(services, ["new"], "{finding:#}");
        }
    }
    // All four dead writes (before and after the reload) land on the old service.
    let dead_write_finding = findings
        .iter()
        .find(|f| {
            (f["id"] == "dead-writes" || f["id"] == "idle-disconnects")
                && subjects(f, "services") == ["old"]
                && f["values"]["dead_writes"].as_f64().is_some()
        })
        .unwrap_or_else(|| panic!("no dead-write finding on the old service: {report:#}"));
    assert_eq!(
        dead_write_finding["values"]["dead_writes"].as_f64(),
        Some(4.0),
        "{dead_write_finding:#}"
    );
    assert_eq!(
        subjects(dead_write_finding, "servers"),
        std::slice::from_ref(&old_server)
    );
    assert!(subjects(dead_write_finding, "processes").contains(&"cronjob".into()));
    assert!(subjects(dead_write_finding, "commands").contains(&"set".into()));
    // The per-edge table names each process's service by its server.
    let edges = report["edges"].as_array().unwrap();
    let edge = |process: &str, server: &str| {
        edges
            .iter()
            .find(|e| e["process"] == process && e["server"] == server)
            .unwrap_or_else(|| panic!("no {process} -> {server} edge: {edges:#?}"))
    };
    assert_eq!(edge("webapp", &new_server)["service"], "new");
    assert_eq!(edge("cronjob", &old_server)["service"], "old");
}
