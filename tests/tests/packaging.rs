//! The agent under exactly the capabilities the systemd unit grants, as a non-root user: probes
//! attach and metrics flow.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

/// Capabilities from packaging/systemd/cacheprobe.service (AmbientCapabilities).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/systemd/cacheprobe.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("unit grants ambient capabilities");
    line.split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

#[test]
fn agent_works_with_only_the_units_capabilities_as_an_unprivileged_user() {
    require_root();
    let caps = unit_capabilities();
    assert!(caps.contains(&"bpf".to_string()) && caps.contains(&"perfmon".to_string()));
    let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let set = plus.join(",");
    let dir = scratch_dir("caps");
    let port = unique_port();
    let metrics_port = unique_port();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("sample_interval_seconds = 1\n[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n"),
    )
    .unwrap();
    let setpriv = |args: &[&str]| {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--no-new-privs",
            ])
            .arg(format!("--inh-caps=-all,{set}"))
            .arg(format!("--ambient-caps=-all,{set}"))
            .arg(format!("--bounding-set=-all,{set}"))
            .arg(agent_binary())
            .args(args);
        command
    };

    let check = setpriv(&["check", "--json", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!report.contains("\"failed\""), "{report}");
    assert!(!report.contains("\"missing\""), "{report}");

    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let agent = Guard(
        setpriv(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let mut scrape = None;
    for _ in 0..100 {
        if let Ok(text) = http_get(metrics_port, "/metrics") {
            scrape = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        scrape.is_some(),
        "agent never served metrics: {}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );

    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\nc = Client(('127.0.0.1', {port}))\nc.set('a', 'b', noreply=False)\nassert c.get('a') == b'b'\nc.close()\n"
        ),
    )
    .unwrap();
    let mut last = String::new();
    for _ in 0..100 {
        last = http_get(metrics_port, "/metrics").unwrap();
        let parsed = Scrape::parse(&last);
        if parsed.sum("cacheprobe_connections_closed_total", &[]) >= 2.0
            && parsed.sum("cacheprobe_memcache_requests_total", &[("role", "client")]) >= 2.0
            && parsed.sum("cacheprobe_listen_queue_limit", &[("service", "memcached")]) > 0.0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let scrape = Scrape::parse(&last);
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &[]),
        2.0,
        "{last}"
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &[]),
        2.0,
        "{last}"
    );
    assert_eq!(
        scrape.sum("cacheprobe_memcache_requests_total", &[("role", "client")]),
        2.0,
        "{last}"
    );
    assert!(
        scrape.sum("cacheprobe_listen_queue_limit", &[("service", "memcached")]) > 0.0,
        "{last}"
    );
    for sample in scrape.matching("cacheprobe_probe_up", &[]) {
        assert_eq!(sample.value, 1.0, "{:?} is down", sample.labels);
    }
    drop(agent);
}
