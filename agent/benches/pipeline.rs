//! The agent's user-space cost per memcache operation: payload records as the kernel writes
//! them, through `Pipeline::on_payload_record` with everything the daemon attaches (metrics,
//! history sink, key statistics), in operations per second.
//!
//! The workload is the one `cargo xtask bench` drives: 90% get (hits) / 10% set, 10000 keys of
//! 25 bytes, 256-byte values, text protocol, 32 connections, with the client and memcached on
//! this host, so each operation is four records: the client's send, memcached's receive,
//! memcached's send and the client's receive, each captured to a 256-byte prefix.
//!
//! Run: `cargo bench -p cacheprobe --bench pipeline`

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use cacheprobe::{
    config::Config,
    export::metrics::Metrics,
    history::{History, HistoryLimits, HistorySink},
    ingest::pipeline::Pipeline,
    kernel::capture::encode_payload_record,
    kernel::events::{EventKind, SockEventRecord, SocketFacts},
    services::SharedServices,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CAPTURE: usize = 256;
const CONNECTIONS: u64 = 32;
const KEYS: u64 = 10_000;
const OPERATIONS: usize = 20_000;
const PORT: u16 = 11211;
/// Time between operations: 100k operations per second.
const OP_INTERVAL_NS: u64 = 10_000;

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn client_sk(connection: u64) -> u64 {
    0x1000 + connection
}

fn server_sk(connection: u64) -> u64 {
    0x2000 + connection
}

fn learned(sk: u64, local: SocketAddr, remote: SocketAddr, ts_ns: u64) -> SockEventRecord {
    SockEventRecord {
        kind: EventKind::Learned {
            state: agent_common::tcp_state::ESTABLISHED,
        },
        ts_ns,
        sk,
        local: Some(local),
        remote: Some(remote),
        pid: 7,
        comm: "bench".to_string(),
        facts: SocketFacts {
            last_activity_ns: ts_ns,
            bytes_sent: 0,
            bytes_received: 0,
            peer_closed_ns: 0,
            reset_received_ns: 0,
        },
    }
}

/// A pipeline wired as `cacheprobe run` wires it, with both ends of every connection known. No
/// decoding budget: this measures what every decoded operation costs.
fn pipeline(start_ns: u64) -> Pipeline {
    let config = Config::parse(
        &format!(
            "[[services]]\nname = \"bench\"\nport = {PORT}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_bytes = {CAPTURE}\ncapture_records_per_second = 0\n"
        ),
        "bench.toml",
    )
    .expect("bench config");
    let (metrics, _registry) = Metrics::new();
    let services = SharedServices::from_config(&config).expect("bench services");
    let mut pipeline = Pipeline::new(&config, services.clone(), metrics);
    let history = Arc::new(Mutex::new(History::new(
        HistoryLimits::default().capacity_seconds,
        HistoryLimits::default(),
    )));
    pipeline.add_sink(Box::new(HistorySink::new(history.clone(), services)));
    pipeline.set_history(history);
    let server: SocketAddr = format!("127.0.0.1:{PORT}").parse().expect("address");
    for connection in 0..CONNECTIONS {
        let client: SocketAddr = format!("127.0.0.1:{}", 40_000 + connection)
            .parse()
            .expect("address");
        pipeline.handle_socket_event(&learned(client_sk(connection), client, server, start_ns));
        pipeline.handle_socket_event(&learned(server_sk(connection), server, client, start_ns));
    }
    pipeline
}

/// Four records per operation, in the order the kernel would emit them.
fn records(start_ns: u64) -> Vec<Vec<u8>> {
    let mut rng = Lcg(7);
    let value = vec![b'v'; 256];
    let mut out = Vec::with_capacity(OPERATIONS * 4);
    for op in 0..OPERATIONS {
        let ts = start_ns + op as u64 * OP_INTERVAL_NS;
        let connection = op as u64 % CONNECTIONS;
        let key = format!("key:{:021}", rng.below(KEYS));
        let (request, response) = if rng.below(10) == 0 {
            let mut request = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
            request.extend_from_slice(&value);
            request.extend_from_slice(b"\r\n");
            (request, b"STORED\r\n".to_vec())
        } else {
            let mut response = format!("VALUE {key} 0 {}\r\n", value.len()).into_bytes();
            response.extend_from_slice(&value);
            response.extend_from_slice(b"\r\nEND\r\n");
            (format!("get {key}\r\n").into_bytes(), response)
        };
        let client = client_sk(connection);
        let server = server_sk(connection);
        for (offset, sk, is_send, comm, bytes) in [
            (0, client, true, &b"loadgen"[..], &request),
            (1_000, server, false, &b"memcached"[..], &request),
            (4_000, server, true, &b"memcached"[..], &response),
            (5_000, client, false, &b"loadgen"[..], &response),
        ] {
            out.push(encode_payload_record(
                ts + offset,
                sk,
                bytes.len() as u64,
                is_send,
                comm,
                &bytes[..bytes.len().min(CAPTURE)],
            ));
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let start_ns = cacheprobe::clock::monotonic_ns();
    let records = records(start_ns);
    let mut pipeline = pipeline(start_ns);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(OPERATIONS as u64));
    group.bench_function("memcache_ops_both_ends_decoded", |b| {
        b.iter(|| {
            for record in &records {
                black_box(pipeline.on_payload_record(black_box(record)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
