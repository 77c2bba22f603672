//! One request seen from both ends (issue 18): the client's and the server's view of one request
//! carry the same request id as OpenMetrics exemplars on the latency histogram, derived by each
//! end from the connection's 4-tuple (client and server address) and the TCP sequence number of
//! the request's first byte. Real memcached in one network namespace, pymemcache in another, one
//! agent watching both.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Output},
    time::{Duration, Instant},
};

use cacheprobe_tests::*;

/// /metrics as OpenMetrics (the only format with exemplars).
fn scrape_openmetrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: localhost\r\nAccept: application/openmetrics-text\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// (request id, exemplar value in seconds, server label) of every exemplar on the `get`
/// latency buckets of one role.
fn exemplars(text: &str, role: &str) -> Vec<(String, f64, String)> {
    text.lines()
        .filter(|line| {
            line.starts_with("cacheprobe_memcache_request_duration_seconds_bucket{")
                && line.contains(&format!("role=\"{role}\""))
                && line.contains("command=\"get\"")
        })
        .filter_map(|line| {
            let (_, exemplar) = line.split_once(" # {request_id=\"")?;
            let (id, value) = exemplar.split_once("\"} ")?;
            let server = line.split_once("server=\"")?.1.split_once('"')?.0;
            Some((
                id.to_string(),
                value.trim().parse().ok()?,
                server.to_string(),
            ))
        })
        .collect()
}

/// The request's first transmission is dropped on its way in: the client's agent sees the
/// request wait for the retransmit, the server's agent sees it only once it arrives. Both name
/// it by the same id, so the difference of the two times is the time between the boxes.
///
/// The request is slow only on the network: at the server it is fast, below any latency
/// threshold. Its exemplars come from the coordinated slice (`exemplar_sample_one_in`, here
/// every id, so the one request is in it), which both ends pick alike whatever the latency: the
/// threshold is set above both times (2 s), so the slice is the only way either end could have
/// an exemplar, and the join proves both ends chose the same request.
#[test]
fn one_request_has_one_id_at_both_ends() {
    require_root();
    let port = unique_port();
    let pair = NetnsPair::create("x", 21).unwrap();
    let _memcached = start_memcached(Some(&pair.server_ns), &pair.server_addr, port, &[]).unwrap();
    let config = format!(
        "sample_interval_seconds = 1\n\n[limits]\nexemplar_sample_one_in = 1\n\
         exemplar_min_latency_us = 2000000\n\n\
         [[services]]\nname = \"cache\"\nport = {port}\nprotocol = \"memcache\"\n"
    );
    let agent = Agent::start_with_config("exemplars", &config).unwrap();
    let status = pair.drop_to_server_port(
        "-A",
        port,
        &[
            "-m",
            "string",
            "--string",
            "get slowkey",
            "--algo",
            "bm",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "2",
            "--packet",
            "0",
        ],
    );
    assert!(
        status.success(),
        "iptables rule dropping the first transmission"
    );
    let server = pair.server_addr.clone();
    python(
        Some(&pair.client_ns),
        &format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('{server}', {port}), timeout=5)\n\
             assert c.get('slowkey') is None\n"
        ),
    )
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    let (client, server_side) = loop {
        let text = scrape_openmetrics(agent.metrics_port);
        let (client, server_side) = (exemplars(&text, "client"), exemplars(&text, "server"));
        if (!client.is_empty() && !server_side.is_empty()) || Instant::now() >= deadline {
            break (client, server_side);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("client exemplars {client:?}, server exemplars {server_side:?}");
    assert_eq!(client.len(), 1, "one get, one client exemplar: {client:?}");
    assert_eq!(server_side.len(), 1, "one server exemplar: {server_side:?}");
    let ((client_id, client_s, client_server), (server_id, server_s, server_server)) =
        (&client[0], &server_side[0]);
    assert_eq!(client_id, server_id, "both ends name the request alike");
    assert_eq!(client_id.len(), 16);
    let expected_server = format!("{server}:{port}");
    assert_eq!(client_server, &expected_server);
    assert_eq!(server_server, &expected_server);
    // The client waited for the retransmission (at least the 10 ms floor of the tail-loss
    // probe); memcached answered a miss at once.
    assert!(
        client_s - server_s >= 0.005,
        "client {client_s} s, server {server_s} s"
    );
    assert!(*server_s < 0.005, "server {server_s} s");
    // Text format 0.0.4 has no exemplars: the default scrape must still parse.
    let plain = agent.scrape_text().unwrap();
    assert!(!plain.contains("request_id"));
    assert!(
        Scrape::parse(&plain).sum(
            "cacheprobe_memcache_request_duration_seconds_count",
            &[("role", "client")]
        ) >= 1.0
    );

    // A real Prometheus keeping exemplars scrapes the agent; `diagnose --prometheus` joins the
    // two sightings through its exemplar API and names the time between the boxes.
    let prometheus = Prometheus::start(
        scratch_dir("exemplars-prometheus"),
        &agent_scrape_config(agent.metrics_port, "", ""),
        &["--enable-feature=exemplar-storage"],
    );
    prometheus.wait_ready(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    let finding = loop {
        let out = diagnose_fleet(&prometheus.url());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let found = report["findings"].as_array().and_then(|findings| {
            findings
                .iter()
                .find(|f| f["id"] == "fleet-request-both-ends")
                .cloned()
        });
        if let Some(finding) = found {
            break finding;
        }
        assert!(
            Instant::now() < deadline,
            "no fleet-request-both-ends finding: {report:#}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("{finding:#}");
    let values = &finding["values"];
    let number = |name: &str| values[name].as_f64().unwrap_or(f64::NAN);
    assert_eq!(number("requests_joined"), 1.0);
    assert!(
        (number("client_ms") - client_s * 1e3).abs() < 0.01,
        "{values}"
    );
    assert!(
        (number("server_ms") - server_s * 1e3).abs() < 0.01,
        "{values}"
    );
    assert!(number("between_ms") >= 5.0, "{values}");
    assert_eq!(finding["subjects"]["servers"][0], expected_server.as_str());
    assert!(
        finding["evidence"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("request {client_id} ")),
        "{finding:#}"
    );
}

fn diagnose_fleet(url: &str) -> Output {
    Command::new(agent_binary())
        .args(["diagnose", "--prometheus", url, "--since", "5m", "--json"])
        .output()
        .expect("run cacheprobe diagnose")
}
