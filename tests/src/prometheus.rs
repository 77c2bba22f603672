//! A real Prometheus server for the tests that read the agent through it (alert rules,
//! exemplars, hostile scrapes, fleet diagnose over backfilled data).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{http_get, unique_port, Guard};

/// A `prometheus` on a unique loopback port, config and storage under `dir`; killed on drop.
pub struct Prometheus {
    pub port: u16,
    pub dir: PathBuf,
    pub server: Guard,
}

impl Prometheus {
    /// Writes `config` to `dir/prometheus.yml` and starts prometheus on it with its TSDB in
    /// `dir/data` and `extra_args`; returns at once (see `wait_ready`).
    pub fn start(dir: PathBuf, config: &str, extra_args: &[&str]) -> Prometheus {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = unique_port();
        let server = Guard(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .args(extra_args)
                .stdout(std::fs::File::create(dir.join("prometheus.log")).unwrap())
                .stderr(std::fs::File::create(dir.join("prometheus.err")).unwrap())
                .spawn()
                .expect("prometheus (Debian package prometheus) is installed by cargo xtask setup"),
        );
        Prometheus { port, dir, server }
    }

    /// Waits until prometheus says it is ready; panics after `timeout`.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while http_get(self.port, "/-/ready").is_err() {
            assert!(Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The JSON answer of an API path (`/api/v1/...`).
    pub fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&http_get(self.port, path)?)?)
    }

    /// The value of a query returning one series at `at` (Unix seconds), if any.
    pub fn value(&self, promql: &str, at: f64) -> Option<f64> {
        let json = self
            .api(&format!(
                "/api/v1/query?query={}&time={at:.3}",
                url_encode(promql)
            ))
            .ok()?;
        let result = json["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// A config that scrapes the agent at 127.0.0.1:`agent_port` every second as job "cacheprobe";
/// `global` adds lines to the global section (or top-level sections after it), `job` to the
/// scrape job (scheme, TLS).
pub fn agent_scrape_config(agent_port: u16, global: &str, job: &str) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n{global}\
         scrape_configs:\n  - job_name: cacheprobe\n{job}    static_configs:\n      \
         - targets: ['127.0.0.1:{agent_port}']\n"
    )
}

/// Now, in Unix seconds.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Percent-encodes everything but the unreserved characters (for PromQL in a query string).
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
