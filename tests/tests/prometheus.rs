//! A real Prometheus server scrapes the agent on loopback with the shipped alert rules: series
//! arrive, and the dead-socket-write alert fires on a real incident.

use std::time::{Duration, Instant};

use cacheprobe_tests::*;

fn query(prometheus: &Prometheus, path: &str) -> serde_json::Value {
    prometheus
        .api(path)
        .unwrap_or_else(|err| panic!("prometheus {path}: {err}"))
}

#[test]
fn prometheus_scrapes_the_agent_and_the_dead_write_alert_fires() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("prometheus", &[("memcached", port, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();

    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus/cacheprobe.rules.yml")
        .canonicalize()
        .unwrap();
    let prometheus = Prometheus::start(
        scratch_dir("prometheus-server"),
        &agent_scrape_config(
            agent.metrics_port,
            &format!(
                "  evaluation_interval: 1s\nrule_files:\n  - {}\n",
                rules.display()
            ),
            "",
        ),
        &[],
    );

    // Series arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus
            .api("/api/v1/query?query=cacheprobe_build_info")
            .ok();
        if up.as_ref().is_some_and(|v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the agent: {up:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let probes = query(&prometheus, "/api/v1/query?query=cacheprobe_probe_up");
    assert!(
        probes["data"]["result"].as_array().unwrap().len() >= 3,
        "{probes}"
    );

    // The incident: two clients write onto connections memcached closed for idleness, a few
    // seconds apart, so the counter rises between scrapes.
    for delay in ["6.5", "9.5"] {
        let script = format!(
            "import time\n\
             from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             c.set('k', 'v', noreply=False)\n\
             time.sleep({delay})\n\
             try:\n\
             \x20   c.set('k', 'w', noreply=False)\n\
             except Exception:\n\
             \x20   pass\n"
        );
        std::thread::spawn(move || python(None, &script).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let alerts = query(&prometheus, "/api/v1/alerts");
        let firing = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "CacheprobeDeadSocketWrites" && a["state"] == "firing"
            });
        if let Some(alert) = firing {
            assert_eq!(alert["labels"]["comm"], "python3", "{alert}");
            assert_eq!(
                alert["labels"]["server"],
                format!("127.0.0.1:{port}"),
                "{alert}"
            );
            assert_eq!(alert["labels"]["command"], "set", "{alert}");
            assert!(alert["annotations"]["runbook"]
                .as_str()
                .unwrap()
                .contains("#runbook-deadsocketwrites"));
            break;
        }
        assert!(Instant::now() < deadline, "alert never fired: {alerts}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
