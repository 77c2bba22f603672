//! `cacheprobe diagnose --prometheus` against a real Prometheus: several hosts' worth of series
//! are written as OpenMetrics text, backfilled with `promtool tsdb create-blocks-from
//! openmetrics`, and served by `prometheus` on loopback. Then the bad-input cases: unreachable,
//! refused credentials, something that is not Prometheus, a server that never answers.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use cacheprobe_tests::*;

/// The agent's latency buckets (agent/src/metrics.rs LATENCY_BUCKETS).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const IDLE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

/// OpenMetrics text for many series over one time grid, grouped by family as the format asks.
struct Gen {
    times: Vec<u64>,
    families: BTreeMap<String, (&'static str, String)>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", inner.join(","))
}

impl Gen {
    fn new(end: u64, minutes: u64, step_s: u64) -> Gen {
        let start = end - minutes * 60;
        Gen {
            times: (0..=minutes * 60 / step_s)
                .map(|i| start + i * step_s)
                .collect(),
            families: BTreeMap::new(),
        }
    }

    fn family(&mut self, name: &str, kind: &'static str) -> &mut String {
        &mut self
            .families
            .entry(name.to_string())
            .or_insert((kind, String::new()))
            .1
    }

    /// A series whose value at point i (0-based) is `value(i, t)`.
    fn series(
        &mut self,
        family: &str,
        kind: &'static str,
        sample: &str,
        l: &[(&str, &str)],
        value: impl Fn(usize, u64) -> Option<f64>,
    ) {
        let times = self.times.clone();
        let text = labels(l);
        let out = self.family(family, kind);
        for (i, t) in times.iter().enumerate() {
            if let Some(v) = value(i, *t) {
                let _ = writeln!(out, "{sample}{text} {v} {t}");
            }
        }
    }

    fn gauge(&mut self, name: &str, l: &[(&str, &str)], value: impl Fn(usize, u64) -> Option<f64>) {
        self.series(name, "gauge", name, l, value);
    }

    /// A counter growing by `per_step` every point.
    fn counter(&mut self, name: &str, l: &[(&str, &str)], per_step: f64) {
        self.series(name, "counter", &format!("{name}_total"), l, |i, _| {
            Some(per_step * i as f64)
        });
    }

    /// A histogram: every step adds `observations` (value, count).
    fn histogram(
        &mut self,
        name: &str,
        buckets: &[f64],
        l: &[(&str, &str)],
        observations: &[(f64, f64)],
    ) {
        let times = self.times.clone();
        let out = self.family(name, "histogram");
        let per_step_sum: f64 = observations.iter().map(|(v, n)| v * n).sum();
        let per_step_count: f64 = observations.iter().map(|(_, n)| n).sum();
        let mut les: Vec<(String, f64)> = buckets
            .iter()
            .map(|b| {
                let below: f64 = observations
                    .iter()
                    .filter(|(v, _)| v <= b)
                    .map(|(_, n)| n)
                    .sum();
                (format!("{b}"), below)
            })
            .collect();
        les.push(("+Inf".to_string(), per_step_count));
        let base = labels(l);
        let base = &base[1..base.len() - 1];
        for (i, t) in times.iter().enumerate() {
            let k = i as f64;
            for (le, n) in &les {
                let _ = writeln!(out, "{name}_bucket{{{base},le=\"{le}\"}} {} {t}", n * k);
            }
            let _ = writeln!(out, "{name}_sum{{{base}}} {} {t}", per_step_sum * k);
            let _ = writeln!(out, "{name}_count{{{base}}} {} {t}", per_step_count * k);
        }
    }

    fn write(&self, path: &Path) {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        for (name, (kind, body)) in &self.families {
            writeln!(file, "# TYPE {name} {kind}").unwrap();
            file.write_all(body.as_bytes()).unwrap();
        }
        writeln!(file, "# EOF").unwrap();
        file.flush().unwrap();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A Prometheus serving backfilled data on loopback.
struct Prom {
    prometheus: Prometheus,
    keep: bool,
}

/// Writes `data` as OpenMetrics and backfills it into `dir/data`.
fn backfill(dir: &Path, data: &Gen) {
    let input = dir.join("series.om");
    data.write(&input);
    let tsdb = dir.join("data");
    let started = Instant::now();
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(&tsdb)
        .output()
        .expect("promtool (Debian package prometheus) is installed by cargo xtask setup");
    assert!(
        out.status.success(),
        "backfill failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "backfill of {} took {:?}",
        input.display(),
        started.elapsed()
    );
    let _ = std::fs::remove_file(&input);
}

impl Prom {
    fn start(name: &str, data: &Gen) -> Prom {
        let dir = scratch_dir(name);
        backfill(&dir, data);
        Prom::serve(dir, false)
    }

    /// Serves `dir/data`; a kept directory survives the test, for benchmarks rerun on it.
    fn serve(dir: PathBuf, keep: bool) -> Prom {
        let prometheus = Prometheus::start(
            dir,
            "global:\n  scrape_interval: 15s\n",
            &["--storage.tsdb.retention.time=30d"],
        );
        prometheus.wait_ready(Duration::from_secs(60));
        Prom { prometheus, keep }
    }

    fn url(&self) -> String {
        self.prometheus.url()
    }
}

impl Drop for Prom {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.prometheus.dir);
    }
}

fn diagnose_prometheus(args: &[&str]) -> Output {
    let started = Instant::now();
    let output = Command::new(agent_binary())
        .arg("diagnose")
        .args(args)
        .output()
        .expect("run cacheprobe diagnose");
    eprintln!(
        "cacheprobe diagnose {} -> {:?} in {:?}\nstderr: {}",
        args.join(" "),
        output.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `diagnose --prometheus` over the last 30 minutes before `at`, as JSON.
fn diagnose_json_30m(prom: &Prom, at: &str) -> Output {
    diagnose_prometheus(&[
        "--prometheus",
        &prom.url(),
        "--since",
        "30m",
        "--at",
        at,
        "--json",
    ])
}

struct Host {
    name: String,
    instance: String,
}

fn host(name: &str, ip: &str) -> Host {
    Host {
        name: name.to_string(),
        instance: format!("{ip}:19150"),
    }
}

/// Agent-level series every host exports; `until` cuts them off (an agent that went away).
fn agent_series(g: &mut Gen, h: &Host, until: Option<u64>) {
    let l = [("job", "cacheprobe"), ("instance", h.instance.as_str())];
    let alive = move |_: usize, t: u64| until.is_none_or(|u| t < u).then_some(1.0);
    g.gauge(
        "cacheprobe_build_info",
        &[l[0], l[1], ("version", "0.1.0")],
        alive,
    );
    g.gauge(
        "cacheprobe_host_info",
        &[
            l[0],
            l[1],
            ("hostname", h.name.as_str()),
            ("kernel", "6.18.0"),
        ],
        alive,
    );
    g.gauge(
        "cacheprobe_probe_up",
        &[l[0], l[1], ("probe", "sock/inet_sock_set_state")],
        alive,
    );
    // Prometheus' own up: 0 once the agent is gone (the target stays in service discovery).
    g.gauge("up", &l, move |_, t| {
        Some(if until.is_some_and(|u| t >= u) {
            0.0
        } else {
            1.0
        })
    });
}

/// Per step (15 s): requests from one client host to one server.
struct Path15 {
    fast: f64,
    slow: f64,
    slow_s: f64,
    timeouts: f64,
}

fn client_path(g: &mut Gen, h: &Host, server: &str, p: &Path15) {
    let base = [
        ("job", "cacheprobe"),
        ("instance", h.instance.as_str()),
        ("service", "memcached"),
        ("server", server),
        ("role", "client"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l: Vec<(&str, &str)> = base.to_vec();
        l.extend_from_slice(extra);
        l
    };
    g.counter(
        "cacheprobe_memcache_requests",
        &with(&[("command", "get"), ("status", "hit")]),
        p.fast + p.slow,
    );
    g.counter(
        "cacheprobe_memcache_requests",
        &with(&[("command", "get"), ("status", "timeout")]),
        p.timeouts,
    );
    g.histogram(
        "cacheprobe_memcache_request_duration_seconds",
        LATENCY_BUCKETS,
        &with(&[("command", "get")]),
        &[(0.0003, p.fast), (p.slow_s, p.slow)],
    );
    g.gauge("cacheprobe_connections_active", &base, |_, _| Some(4.0));
}

/// The fleet of the scenarios: web-1..web-5 are clients of memcached on cache-1..cache-3;
/// web-6's agent goes away 20 minutes before the end.
fn scenario(end: u64) -> Gen {
    let mut g = Gen::new(end, 40, 15);
    let web: Vec<Host> = (1..=6)
        .map(|i| host(&format!("web-{i}"), &format!("10.0.1.{i}")))
        .collect();
    let cache: Vec<Host> = (1..=3)
        .map(|i| host(&format!("cache-{i}"), &format!("10.0.2.{i}")))
        .collect();
    for h in &web[..5] {
        agent_series(&mut g, h, None);
    }
    agent_series(&mut g, &web[5], Some(end - 20 * 60));
    for h in &cache {
        agent_series(&mut g, h, None);
    }
    let (s1, s2, s3) = ("10.0.2.1:11211", "10.0.2.2:11211", "10.0.2.3:11211");
    let healthy = Path15 {
        fast: 150.0,
        slow: 0.0,
        slow_s: 0.0,
        timeouts: 0.0,
    };
    for (i, h) in web[..5].iter().enumerate() {
        // A slow link: web-3's requests to cache-1 lose packets, 5% wait ~200 ms.
        let to_s1 = if i == 2 {
            Path15 {
                fast: 142.5,
                slow: 7.5,
                slow_s: 0.2,
                timeouts: 0.0,
            }
        } else {
            Path15 { ..healthy }
        };
        client_path(&mut g, h, s1, &to_s1);
        client_path(&mut g, h, s2, &healthy);
        // web-5 has an old server list without cache-3.
        if i < 4 {
            // cache-3 hangs: 80% of requests time out.
            client_path(
                &mut g,
                h,
                s3,
                &Path15 {
                    fast: 30.0,
                    slow: 0.0,
                    slow_s: 0.0,
                    timeouts: 120.0,
                },
            );
        }
        let (fingerprint, servers) = if i < 4 {
            ("8fd719b6f7f1ce90", "3")
        } else {
            ("5b0a3c7f2d9e4411", "2")
        };
        g.gauge(
            "cacheprobe_service_servers_info",
            &[
                ("job", "cacheprobe"),
                ("instance", h.instance.as_str()),
                ("service", "memcached"),
                ("fingerprint", fingerprint),
                ("servers", servers),
            ],
            |_, _| Some(1.0),
        );
        // web-3's retransmits to cache-1.
        if i == 2 {
            g.counter(
                "cacheprobe_tcp_retransmits",
                &[
                    ("job", "cacheprobe"),
                    ("instance", h.instance.as_str()),
                    ("service", "memcached"),
                    ("server", s1),
                    ("role", "client"),
                    ("kind", "data"),
                ],
                3.0,
            );
        }
    }
    // cache-2 closes clients idle for 30 s; web-1 (php-fpm) and web-2 (cron) then write onto
    // the dead connections.
    for (h, comm, command, per_step) in [
        (&web[0], "php-fpm", "get", 1.0),
        (&web[1], "cron", "set", 0.5),
    ] {
        let l = [
            ("job", "cacheprobe"),
            ("instance", h.instance.as_str()),
            ("service", "memcached"),
            ("server", s2),
            ("role", "client"),
        ];
        let mut closed = l.to_vec();
        closed.push(("closed_by", "peer"));
        g.counter("cacheprobe_connections_closed", &closed, 2.0);
        g.histogram(
            "cacheprobe_connection_idle_before_close_seconds",
            IDLE_BUCKETS,
            &closed,
            &[(30.6, 2.0)],
        );
        let mut dead = l.to_vec();
        dead.extend_from_slice(&[("comm", comm), ("outcome", "eof"), ("command", command)]);
        g.counter("cacheprobe_dead_socket_writes", &dead, per_step);
    }
    // Server side: cache-1 and cache-2 answer in 0.3 ms at their own sockets.
    for (h, server, per_step) in [(&cache[0], s1, 750.0), (&cache[1], s2, 750.0)] {
        g.histogram(
            "cacheprobe_memcache_request_duration_seconds",
            LATENCY_BUCKETS,
            &[
                ("job", "cacheprobe"),
                ("instance", h.instance.as_str()),
                ("service", "memcached"),
                ("server", server),
                ("role", "server"),
                ("command", "get"),
            ],
            &[(0.0003, per_step)],
        );
    }
    g
}

fn close(value: &serde_json::Value, expected: f64, tolerance: f64) -> bool {
    value
        .as_f64()
        .is_some_and(|v| (v - expected).abs() <= tolerance)
}

#[test]
fn fleet_scenarios_are_named_with_their_numbers() {
    let end = now() - 30;
    let prom = Prom::start("fleet-scenarios", &scenario(end));
    let at = end.to_string();
    let output = diagnose_json_30m(&prom, &at);
    assert_eq!(output.status.code(), Some(1), "findings mean exit 1");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["source"]["kind"], "prometheus");
    assert_eq!(report["source"]["hosts"], 9);
    assert!(
        report["source"].get("partial").is_none(),
        "{}",
        report["notes"]
    );

    // The slow client link: web-3 -> cache-1, named as time between the boxes, not a slow server.
    let slow = findings(&report, &["fleet-slow-path"]);
    assert_eq!(slow.len(), 1, "{report:#}");
    assert_eq!(slow[0]["subjects"]["hosts"][0], "10.0.1.3:19150");
    assert_eq!(slow[0]["subjects"]["servers"][0], "10.0.2.1:11211");
    assert!(slow[0]["title"]
        .as_str()
        .unwrap()
        .starts_with("web-3 (10.0.1.3:19150) -> 10.0.2.1:11211"));
    // 5% of requests in the 100-250 ms bucket: p99 interpolates to 220 ms; 0.5 ms at the server.
    assert!(
        close(&slow[0]["values"]["p99_ms"], 220.0, 1.0),
        "{}",
        slow[0]
    );
    assert!(
        close(&slow[0]["values"]["server_p99_ms"], 0.495, 0.01),
        "{}",
        slow[0]
    );
    assert!(
        close(&slow[0]["values"]["between_p99_ms"], 219.5, 1.0),
        "{}",
        slow[0]
    );
    // 3 retransmits every 15 s for 30 minutes.
    assert!(
        close(&slow[0]["values"]["retransmits"], 360.0, 10.0),
        "{}",
        slow[0]
    );
    assert!(
        findings(&report, &["fleet-slow-server"]).is_empty(),
        "{report:#}"
    );

    // The hung server: cache-3, critical, seen by all four of its client hosts.
    let bad = findings(&report, &["fleet-bad-server"]);
    assert_eq!(
        bad.len(),
        1,
        "the slow path must not make cache-1 a bad server: {report:#}"
    );
    assert_eq!(bad[0]["severity"], "critical");
    assert_eq!(bad[0]["subjects"]["servers"][0], "10.0.2.3:11211");
    assert!(
        close(&bad[0]["values"]["failed_ratio"], 0.8, 0.01),
        "{}",
        bad[0]
    );
    assert_eq!(bad[0]["values"]["failing_client_hosts"], 4.0);
    assert_eq!(bad[0]["values"]["client_hosts"], 4.0);

    // Idle timeouts with dead writes: cache-2 at 30 s, php-fpm on web-1 and cron on web-2.
    let idle = findings(&report, &["fleet-idle-timeouts"]);
    assert_eq!(idle.len(), 1, "{report:#}");
    assert_eq!(idle[0]["subjects"]["servers"][0], "10.0.2.2:11211");
    assert_eq!(idle[0]["values"]["idle_timeout_s"], 30.0);
    // 1 + 0.5 writes every 15 s for 30 minutes.
    assert!(
        close(&idle[0]["values"]["dead_writes"], 180.0, 5.0),
        "{}",
        idle[0]
    );
    assert_eq!(idle[0]["values"]["hosts"], 2.0);
    assert_eq!(
        idle[0]["subjects"]["processes"],
        serde_json::json!(["php-fpm", "cron"])
    );
    let evidence = idle[0]["evidence"].to_string();
    // Counts come from increase(), which extrapolates to the window's edges: 120 and 60 give or
    // take one.
    assert!(
        evidence.contains("web-1 (10.0.1.1:19150): php-fpm wrote "),
        "{evidence}"
    );
    assert!(
        evidence.contains("web-2 (10.0.1.2:19150): cron wrote "),
        "{evidence}"
    );
    assert!(
        evidence.contains("(get x") && evidence.contains("(set x"),
        "{evidence}"
    );

    // The host with another ring: web-5, which lacks cache-3.
    let ring = findings(&report, &["fleet-ring-disagreement"]);
    assert_eq!(ring.len(), 1, "{report:#}");
    assert_eq!(
        ring[0]["subjects"]["hosts"],
        serde_json::json!(["10.0.1.5:19150"])
    );
    assert!(
        ring[0]["evidence"][1]
            .as_str()
            .unwrap()
            .contains("missing 10.0.2.3:11211"),
        "{}",
        ring[0]
    );
    assert_eq!(ring[0]["values"]["hosts"], 5.0);

    // The down agent: web-6, named with its hostname.
    let coverage = findings(&report, &["fleet-coverage"]);
    assert_eq!(coverage.len(), 1, "{report:#}");
    assert_eq!(
        coverage[0]["subjects"]["hosts"],
        serde_json::json!(["10.0.1.6:19150"])
    );
    assert!(coverage[0]["evidence"][0]
        .as_str()
        .unwrap()
        .contains("web-6 (10.0.1.6:19150)"));
    assert_eq!(coverage[0]["values"]["agents_down"], 1.0);

    // Nothing else: no mesh (few connections), no synchronous spikes.
    assert_eq!(
        report["findings"].as_array().unwrap().len(),
        5,
        "{report:#}"
    );

    // The text report names the same, and --service narrows to one service.
    let text = diagnose_prometheus(&["--prometheus", &prom.url(), "--since", "30m", "--at", &at]);
    assert_eq!(text.status.code(), Some(1));
    let text = String::from_utf8(text.stdout).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("CRITICAL 10.0.2.3:11211 (memcached) does not answer"),
        "{text}"
    );
    assert!(text.contains("web-3"), "{text}");
    assert!(text.lines().all(|l| l.len() <= 80), "{text}");
    let other = diagnose_prometheus(&[
        "--prometheus",
        &prom.url(),
        "--at",
        &at,
        "--service",
        "nothing-here",
        "--json",
    ]);
    let other: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert!(
        other["findings"].is_array() && findings(&other, &["fleet-bad-server"]).is_empty(),
        "{other:#}"
    );
}

/// Answers every connection with `respond(request head)`; with `forward`, requests it accepts
/// are passed to that port and the answer relayed (a tiny auth-checking proxy).
fn tiny_server(respond: fn(&str) -> Option<String>, forward: Option<u16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut request = Vec::new();
                let mut buf = [0u8; 65536];
                // Head, then the body by Content-Length.
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let head = String::from_utf8_lossy(&request).to_string();
                match (respond(&head), forward) {
                    (Some(answer), _) => {
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    (None, Some(port)) => {
                        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)) else {
                            return;
                        };
                        // Close after one answer so the relay ends.
                        let request = String::from_utf8_lossy(&request).replacen(
                            "\r\n",
                            "\r\nConnection: close\r\n",
                            1,
                        );
                        let _ = upstream.write_all(request.as_bytes());
                        let mut answer = Vec::new();
                        let _ = upstream.read_to_end(&mut answer);
                        let _ = stream.write_all(&answer);
                    }
                    (None, None) => {
                        // Never answer: hold the connection open.
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
            });
        }
    });
    port
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn bad_input_exits_2_with_a_clear_message_and_never_hangs() {
    // Unreachable: nothing listens there.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = diagnose_prometheus(&["--prometheus", &format!("http://127.0.0.1:{free}")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "cannot reach Prometheus at http://127.0.0.1:{free}"
        )),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    // Not Prometheus: a web server answering HTML.
    let html = tiny_server(
        |_| {
            Some("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 19\r\nConnection: close\r\n\r\n<html>hello</html>\n".into())
        },
        None,
    );
    let out = diagnose_prometheus(&["--prometheus", &format!("http://127.0.0.1:{html}")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("does not look like a Prometheus query API"),
        "{}",
        stderr(&out)
    );

    // A server that never answers: the query timeout ends it.
    let silent = tiny_server(|_| None, None);
    let started = Instant::now();
    let out = diagnose_prometheus(&[
        "--prometheus",
        &format!("http://127.0.0.1:{silent}"),
        "--query-timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("did not answer within 2 s"),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Credentials: a proxy in front of a real Prometheus that wants a bearer token or basic
    // auth prom:secret.
    let end = now() - 30;
    let prom = Prom::start("fleet-auth", &scenario(end));
    fn check(head: &str) -> Option<String> {
        let ok = head.lines().any(|l| {
            l.eq_ignore_ascii_case("authorization: Bearer good-token")
                || l.eq_ignore_ascii_case("authorization: Basic cHJvbTpzZWNyZXQ=")
        });
        (!ok).then(|| "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string())
    }
    let proxy = tiny_server(check, Some(prom.prometheus.port));
    let url = format!("http://127.0.0.1:{proxy}");
    let dir = scratch_dir("fleet-secrets");
    let (good, bad, password) = (dir.join("good"), dir.join("bad"), dir.join("password"));
    std::fs::write(&good, "good-token\n").unwrap();
    std::fs::write(&bad, "wrong-token\n").unwrap();
    std::fs::write(&password, "secret\n").unwrap();
    let at = end.to_string();

    let out = diagnose_prometheus(&["--prometheus", &url, "--at", &at]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("refused the credentials (HTTP 401)"),
        "{}",
        stderr(&out)
    );
    let out = diagnose_prometheus(&[
        "--prometheus",
        &url,
        "--at",
        &at,
        "--bearer-token-file",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("refused the credentials"),
        "{}",
        stderr(&out)
    );

    let out = diagnose_prometheus(&[
        "--prometheus",
        &url,
        "--at",
        &at,
        "--json",
        "--bearer-token-file",
        good.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(findings(&report, &["fleet-bad-server"]).len(), 1);
    let out = diagnose_prometheus(&[
        "--prometheus",
        &url,
        "--at",
        &at,
        "--json",
        "--basic-auth-user",
        "prom",
        "--basic-auth-password-file",
        password.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Missing series: a window with no cacheprobe data at all.
    let out = diagnose_prometheus(&[
        "--prometheus",
        &prom.url(),
        "--at",
        &(end - 86_400).to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no cacheprobe series in Prometheus"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// 500 hosts' worth of series (20 clients per pool of 10 servers, 25 pools): diagnose must
/// answer within 10 s. Run by hand (it backfills ~100k series): see BENCHMARKS.md.
#[test]
#[ignore = "benchmark: cargo test -p cacheprobe-tests --test fleet -- --ignored fleet_500_hosts"]
fn fleet_500_hosts_answers_within_10_s() {
    // CACHEPROBE_FLEET_BENCH_KEEP=DIR keeps the backfilled blocks in DIR and reuses them on the
    // next run: the backfill takes minutes, the measured part seconds.
    let keep = std::env::var_os("CACHEPROBE_FLEET_BENCH_KEEP").map(PathBuf::from);
    let kept_end = keep
        .as_ref()
        .and_then(|dir| std::fs::read_to_string(dir.join("end")).ok())
        .and_then(|text| text.trim().parse::<u64>().ok());
    let (prom, end) = match (keep, kept_end) {
        (Some(dir), Some(end)) => {
            eprintln!("reusing the blocks in {}", dir.display());
            (Prom::serve(dir, true), end)
        }
        (keep, _) => {
            let end = now() - 30;
            let started = Instant::now();
            let g = fleet_500(end);
            eprintln!("generated in {:?}", started.elapsed());
            match keep {
                Some(dir) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).unwrap();
                    backfill(&dir, &g);
                    std::fs::write(dir.join("end"), end.to_string()).unwrap();
                    (Prom::serve(dir, true), end)
                }
                None => (Prom::start("fleet-500", &g), end),
            }
        }
    };
    let at = end.to_string();
    // Prometheus' CPU time for the run: the part of the cost that does not depend on how busy
    // the machine is (wall time on a loaded 2-core machine mostly measures the others).
    let prometheus_cpu = || cpu_seconds(prom.prometheus.server.0.id());
    // CACHEPROBE_FLEET_BENCH_ROUNDS=N runs diagnose N times against the same Prometheus (the
    // first one against cold blocks when they were just backfilled or reused): the spread
    // says how much of a number is the machine's load.
    let rounds: usize = std::env::var("CACHEPROBE_FLEET_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut walls = Vec::new();
    for round in 1..=rounds {
        let cpu_before = prometheus_cpu();
        let started = Instant::now();
        let out = diagnose_json_30m(&prom, &at);
        let took = started.elapsed();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!(
            "FLEET-BENCH 500 hosts: round {round}: {:.2} s wall, prometheus used {:.2} s of CPU \
             at load average {}",
            took.as_secs_f64(),
            prometheus_cpu() - cpu_before,
            load.split_whitespace().next().unwrap_or("?")
        );
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(1),
            "{}",
            stderr(&out)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["source"]["hosts"], 500);
        assert!(
            report["source"].get("partial").is_none(),
            "{}",
            report["notes"]
        );
        walls.push(took);
    }
    walls.sort();
    let median = walls[walls.len() / 2];
    eprintln!(
        "FLEET-BENCH 500 hosts: diagnose answered in {:.2} s",
        median.as_secs_f64()
    );
    eprintln!(
        "FLEET-BENCH 500 hosts: {rounds} rounds, min {:.2} s, median {:.2} s, max {:.2} s",
        walls[0].as_secs_f64(),
        median.as_secs_f64(),
        walls[walls.len() - 1].as_secs_f64()
    );
    assert!(median <= Duration::from_secs(10), "median {median:?}");
}

/// The benchmark's fleet: 500 client hosts, 25 pools of 10 servers, 35 minutes at 60 s.
fn fleet_500(end: u64) -> Gen {
    let mut g = Gen::new(end, 35, 60);
    for i in 0..500u32 {
        let h = host(
            &format!("host-{i}"),
            &format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256),
        );
        agent_series(&mut g, &h, None);
        let pool = i % 25;
        for s in 0..10 {
            let server = format!("10.200.{pool}.{s}:11211");
            client_path(
                &mut g,
                &h,
                &server,
                &Path15 {
                    fast: 600.0,
                    slow: 0.0,
                    slow_s: 0.0,
                    timeouts: 0.0,
                },
            );
        }
        g.gauge(
            "cacheprobe_service_servers_info",
            &[
                ("job", "cacheprobe"),
                ("instance", h.instance.as_str()),
                ("service", "memcached"),
                ("fingerprint", &format!("{pool:016x}")),
                ("servers", "10"),
            ],
            |_, _| Some(1.0),
        );
    }
    g
}

/// The agent creates a labelled series at its first event, so the series of a rare event (the
/// first idle closes and dead writes of a process to a server) is born with a value above zero.
/// `increase()` alone counts only growth between samples and would miss those first events
/// entirely (the fleet VM test, `cargo xtask fleet-test`, showed it: a first burst of dead
/// writes was invisible); the fleet view counts them from the series' first value.
#[test]
fn counters_born_inside_the_window_count_from_their_first_value() {
    let end = now() - 30;
    let mut g = Gen::new(end, 30, 15);
    let web = host("web-1", "10.0.1.1");
    agent_series(&mut g, &web, None);
    let born = end - 10 * 60;
    let client = [
        ("job", "cacheprobe"),
        ("instance", web.instance.as_str()),
        ("service", "memcached"),
        ("server", "10.0.2.2:11211"),
        ("role", "client"),
    ];
    let mut closed = client.to_vec();
    closed.push(("closed_by", "peer"));
    // Three closes after 30.6 s idle, all before the series' first scrape.
    g.series(
        "cacheprobe_connections_closed",
        "counter",
        "cacheprobe_connections_closed_total",
        &closed,
        |_, t| (t >= born).then_some(3.0),
    );
    let idle = "cacheprobe_connection_idle_before_close_seconds";
    let mut inf = closed.clone();
    inf.push(("le", "+Inf"));
    for (sample, labels, value) in [
        (format!("{idle}_bucket"), &inf, 3.0),
        (format!("{idle}_sum"), &closed, 91.8),
        (format!("{idle}_count"), &closed, 3.0),
    ] {
        g.series(idle, "histogram", &sample, labels, move |_, t| {
            (t >= born).then_some(value)
        });
    }
    // Three dead writes in the first scrape, two more five minutes later.
    let mut dead = client.to_vec();
    dead.extend_from_slice(&[("comm", "php-fpm"), ("outcome", "eof"), ("command", "set")]);
    g.series(
        "cacheprobe_dead_socket_writes",
        "counter",
        "cacheprobe_dead_socket_writes_total",
        &dead,
        |_, t| (t >= born).then_some(if t >= born + 300 { 5.0 } else { 3.0 }),
    );
    let prom = Prom::start("fleet-born-in-window", &g);
    let output = diagnose_json_30m(&prom, &end.to_string());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let idle = findings(&report, &["fleet-idle-timeouts"]);
    assert_eq!(idle.len(), 1, "{report:#}");
    assert_eq!(idle[0]["values"]["closes"], 3.0, "{}", idle[0]);
    assert_eq!(idle[0]["values"]["idle_timeout_s"], 30.0, "{}", idle[0]);
    // 3 at birth + 2 of growth (extrapolated by increase(): give or take a little).
    assert!(
        close(&idle[0]["values"]["dead_writes"], 5.0, 0.5),
        "{}",
        idle[0]
    );
}

/// A server that starts failing inside the window: each client's timeout series is born at
/// its first timeouts with a value above zero, and the clients then eject the server (no more
/// requests to it). With `increase()` alone the pool detector saw no failure at all; counting
/// the series from its first value, it names the server, with every timeout.
#[test]
fn timeouts_born_inside_the_window_name_the_failing_server() {
    let end = now() - 30;
    let step = 15;
    let mut g = Gen::new(end, 20, step);
    let start = end - 20 * 60;
    let failed_at = end - 150;
    let failing = "10.0.2.3:11211";
    for i in 1..=3 {
        let h = host(&format!("web-{i}"), &format!("10.0.1.{i}"));
        agent_series(&mut g, &h, None);
        for server in ["10.0.2.1:11211", "10.0.2.2:11211", failing] {
            let l = [
                ("job", "cacheprobe"),
                ("instance", h.instance.as_str()),
                ("service", "memcached"),
                ("server", server),
                ("role", "client"),
                ("command", "get"),
            ];
            let mut hit = l.to_vec();
            hit.push(("status", "hit"));
            // 10 hits a step; to the failing server only until it fails.
            let stop = if server == failing { failed_at } else { end };
            g.series(
                "cacheprobe_memcache_requests",
                "counter",
                "cacheprobe_memcache_requests_total",
                &hit,
                move |_, t| Some(10.0 * ((t.min(stop) - start) / step) as f64),
            );
            if server == failing {
                // 20 timeouts, all before the series' first scrape; then the client ejects it.
                let mut timeout = l.to_vec();
                timeout.push(("status", "timeout"));
                g.series(
                    "cacheprobe_memcache_requests",
                    "counter",
                    "cacheprobe_memcache_requests_total",
                    &timeout,
                    move |_, t| (t >= failed_at).then_some(20.0),
                );
            }
        }
    }
    let prom = Prom::start("fleet-timeouts-born-in-window", &g);
    let output = diagnose_prometheus(&[
        "--prometheus",
        &prom.url(),
        "--since",
        "5m",
        "--at",
        &end.to_string(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let bad = findings(&report, &["fleet-bad-server"]);
    assert_eq!(bad.len(), 1, "{report:#}");
    assert_eq!(bad[0]["severity"], "critical", "{}", bad[0]);
    assert_eq!(bad[0]["subjects"]["servers"][0], failing);
    // 3 hosts x 20 timeouts, every one from the series' first values.
    assert_eq!(bad[0]["values"]["failed"], 60.0, "{}", bad[0]);
    assert_eq!(bad[0]["values"]["client_hosts"], 3.0, "{}", bad[0]);
    assert_eq!(bad[0]["values"]["failing_client_hosts"], 3.0, "{}", bad[0]);
    // About 100 hits before it failed (150 s of the 5 minutes) and 20 timeouts per host.
    let ratio = bad[0]["values"]["failed_ratio"].as_f64().unwrap();
    assert!((0.12..=0.22).contains(&ratio), "{}", bad[0]);
}

/// A cron job's first connections to a service, on five of six hosts in the same minute: each
/// host's `cacheprobe_syn_total{service="sessions"}` series is born then, with every attempt of
/// the burst in its first sample. Per-minute `increase()` alone saw no attempt at all (a flat
/// fleet); counting a series born in the minute from its first value, the spike is named, with
/// its hosts.
#[test]
fn a_first_burst_of_connections_on_many_hosts_is_a_synchronous_spike() {
    let end = now() - 30;
    let mut g = Gen::new(end, 30, 15);
    let born = end - 10 * 60 + 20;
    let mut spiking = Vec::new();
    for i in 1..=6 {
        let h = host(&format!("web-{i}"), &format!("10.0.1.{i}"));
        agent_series(&mut g, &h, None);
        let base = [("job", "cacheprobe"), ("instance", h.instance.as_str())];
        // The steady pool: one attempt a step (4 a minute), a series as old as the data.
        let mut steady = base.to_vec();
        steady.extend_from_slice(&[("service", "memcached"), ("direction", "out")]);
        g.counter("cacheprobe_syn", &steady, 1.0);
        if i <= 5 {
            // 120 attempts in the burst, all before the new series' first scrape.
            let mut burst = base.to_vec();
            burst.extend_from_slice(&[("service", "sessions"), ("direction", "out")]);
            g.series(
                "cacheprobe_syn",
                "counter",
                "cacheprobe_syn_total",
                &burst,
                move |_, t| (t >= born).then_some(120.0),
            );
            spiking.push(h.instance.clone());
        }
    }
    let prom = Prom::start("fleet-spike-born-in-window", &g);
    let output = diagnose_json_30m(&prom, &end.to_string());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let spikes = findings(&report, &["fleet-synchronous-spikes"]);
    assert_eq!(spikes.len(), 1, "{report:#}");
    assert_eq!(spikes[0]["values"]["max_hosts"], 5.0, "{}", spikes[0]);
    assert_eq!(spikes[0]["values"]["spike_minutes"], 1.0, "{}", spikes[0]);
    assert_eq!(spikes[0]["values"]["hosts"], 6.0, "{}", spikes[0]);
    let mut named: Vec<String> = spikes[0]["subjects"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    named.sort();
    assert_eq!(named, spiking, "{}", spikes[0]);
}
