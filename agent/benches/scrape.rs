//! Cost of one /metrics scrape (encoding the registry) as the number of series grows, in sample
//! lines per second and time per scrape.
//!
//! Two fleets: a typical cache host (one service, 16 servers) and the cardinality ceiling the
//! default limits allow (4 services x `max_servers_per_service` = 256 servers each, both roles,
//! 100 comms). Every endpoint carries the series a busy memcache client/server pair produces:
//! connection counters and histograms, requests by command and status, latency histograms by
//! command, bytes, TCP trouble.
//!
//! Run: `cargo bench -p cacheprobe --bench scrape`

use std::hint::black_box;

use cacheprobe::export::{
    encode::{encode, Format},
    metrics::{CommLabels, EndpointLabels, Metrics},
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prometheus_client::registry::Registry;

const COMMANDS: &[&str] = &["get", "gets", "set", "add", "delete", "incr"];
const STATUSES: &[&str] = &["hit", "miss"];

struct Fleet {
    name: &'static str,
    services: usize,
    servers_per_service: usize,
    comms: usize,
}

fn populate(fleet: &Fleet) -> Registry {
    let (metrics, registry) = Metrics::new();
    for service_index in 0..fleet.services {
        let service = format!("cache-{service_index}");
        for server_index in 0..fleet.servers_per_service {
            let server = format!(
                "10.{}.{}.{}:11211",
                service_index,
                server_index / 250,
                server_index % 250 + 1
            );
            for role in ["client", "server"] {
                let endpoint = EndpointLabels {
                    service: service.clone(),
                    server: server.clone(),
                    role,
                };
                metrics
                    .connections_opened
                    .get_or_create(&endpoint)
                    .inc_by(1000);
                metrics.connections_active.get_or_create(&endpoint).set(40);
                metrics
                    .connection_duration
                    .get_or_create(&endpoint)
                    .observe(120.0);
                for closed_by in ["peer", "local"] {
                    let closed = endpoint.clone().closed(closed_by);
                    metrics
                        .connections_closed
                        .get_or_create(&closed)
                        .inc_by(960);
                    metrics
                        .idle_before_close
                        .get_or_create(&closed)
                        .observe(61.0);
                }
                for command in COMMANDS {
                    let labels = endpoint.clone().command(command);
                    metrics
                        .memcache_duration
                        .get_or_create(&labels)
                        .observe(0.0003, None);
                    for status in STATUSES {
                        metrics
                            .memcache_requests
                            .get_or_create(&endpoint.clone().request(command, status))
                            .inc_by(123_456);
                    }
                }
                for direction in ["sent", "received"] {
                    metrics
                        .memcache_bytes
                        .get_or_create(&endpoint.clone().bytes(direction))
                        .inc_by(98_765_432);
                }
                metrics
                    .tcp_retransmits
                    .get_or_create(&endpoint.clone().retransmit("data"))
                    .inc_by(3);
            }
        }
    }
    for comm_index in 0..fleet.comms {
        let comm = CommLabels {
            comm: format!("worker-{comm_index}"),
        };
        metrics.process_open_fds.get_or_create(&comm).set(900);
        metrics.process_fd_limit.get_or_create(&comm).set(1024);
        metrics
            .process_fd_usage_ratio
            .get_or_create(&comm)
            .set(0.88);
    }
    registry
}

fn scrape(c: &mut Criterion) {
    let fleets = [
        Fleet {
            name: "typical host (1 service x 16 servers)",
            services: 1,
            servers_per_service: 16,
            comms: 20,
        },
        Fleet {
            name: "cardinality ceiling (4 services x 256 servers)",
            services: 4,
            servers_per_service: 256,
            comms: 100,
        },
    ];
    let mut group = c.benchmark_group("scrape");
    group.sample_size(10);
    for fleet in &fleets {
        let registry = populate(fleet);
        for format in [Format::PrometheusText, Format::OpenMetrics] {
            let text = encode(&registry, format).expect("registry encodes");
            let samples = text
                .lines()
                .filter(|line| !line.starts_with('#') && !line.is_empty())
                .count();
            // The line the xtask bench parses into BENCHMARKS.md.
            println!(
                "scrape-size fleet=\"{}\" format={format:?} samples={samples} bytes={}",
                fleet.name,
                text.len()
            );
            group.throughput(Throughput::Elements(samples as u64));
            group.bench_function(format!("{} {format:?}", fleet.name), |b| {
                b.iter(|| encode(black_box(&registry), format).expect("registry encodes"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
