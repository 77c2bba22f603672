//! The agent's user-space cost per memcache operation: payload records as the kernel writes
//! them, through `Pipeline::on_payload_record` with everything the daemon attaches (metrics,
//! history sink, key statistics), in operations per second.
//!
//! The workload is the one `cargo xtask bench` drives: 90% get (hits) / 10% set, 10000 keys of
//! 25 bytes, 256-byte values, text protocol, 32 connections, with the client and memcached on
//! this host, so each operation is four records: the client's send, memcached's receive,
//! memcached's send and the client's receive, each captured as the kernel's framing walk
//! captures it (`kernel_capture`: header lines and the first bytes of each value, bodies
//! skipped by their declared length).
//!
//! Records carry the TCP sequence number of their first byte, as the kernel reports it where it
//! can read `tcp_sock`, so each request has its request id (issue 18). The group runs the same
//! records with request-id exemplars off, at their defaults, and on every request (no budget),
//! side by side; the `latency_histogram` group isolates the histogram's observation.
//!
//! Run: `cargo bench -p cacheprobe --bench pipeline`

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use agent_common::framing::FrameState;
use cacheprobe::{
    config::Config,
    export::metrics::Metrics,
    history::{History, HistoryLimits, HistorySink},
    ingest::pipeline::Pipeline,
    kernel::capture::kernel_capture,
    kernel::events::{EventKind, SockEventRecord, SocketFacts},
    services::SharedServices,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The per-call capture budget (`limits.capture_bytes`, the default).
const CAPTURE: usize = 16384;
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
            state: agent_common::TcpState::Established as u8,
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
            written_after_peer_close: None,
        },
    }
}

/// A pipeline wired as `cacheprobe run` wires it, with both ends of every connection known. No
/// decoding budget: this measures what every decoded operation costs. `limits`: more lines of
/// the config's `[limits]` table.
fn pipeline(start_ns: u64, limits: &str) -> Pipeline {
    let config = Config::parse(
        &format!(
            "[[services]]\nname = \"bench\"\nport = {PORT}\nprotocol = \"memcache\"\n\
             [limits]\ncapture_bytes = {CAPTURE}\ncapture_records_per_second = 0\n{limits}"
        ),
        "bench.toml",
    )
    .expect("bench config");
    let (metrics, _registry) = Metrics::new();
    let services = SharedServices::from_config(&config).expect("bench services");
    let mut pipeline = Pipeline::new(&config, services.clone(), metrics);
    // As the daemon names records: by process, from /proc.
    pipeline.set_process_names(cacheprobe::ingest::process_names::ProcessNames::from_proc());
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
    // Per connection, the next sequence number of each direction (random starts, as ISNs).
    let mut seqs: Vec<(u32, u32)> = (0..CONNECTIONS)
        .map(|_| (rng.below(1 << 32) as u32, rng.below(1 << 32) as u32))
        .collect();
    // Per connection, the kernel's frame positions of the four directions it follows.
    let mut frames = vec![[FrameState::default(); 4]; CONNECTIONS as usize];
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
        let (request_seq, response_seq) = &mut seqs[connection as usize];
        let states = &mut frames[connection as usize];
        for (direction, (offset, sk, is_send, comm, bytes, seq)) in [
            (0, client, true, &b"loadgen"[..], &request, *request_seq),
            (
                1_000,
                server,
                false,
                &b"memcached"[..],
                &request,
                *request_seq,
            ),
            (
                4_000,
                server,
                true,
                &b"memcached"[..],
                &response,
                *response_seq,
            ),
            (
                5_000,
                client,
                false,
                &b"loadgen"[..],
                &response,
                *response_seq,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            for mut record in kernel_capture(
                ts + offset,
                sk,
                is_send,
                bytes,
                &mut states[direction],
                CAPTURE as u64,
            ) {
                with_comm(&mut record, comm);
                with_seq(&mut record, seq);
                out.push(record);
            }
        }
        *request_seq = request_seq.wrapping_add(request.len() as u32);
        *response_seq = response_seq.wrapping_add(response.len() as u32);
    }
    out
}

/// The process name the kernel puts in `PayloadHeader::comm`.
fn with_comm(record: &mut [u8], comm: &[u8]) {
    record[48..64].fill(0);
    record[48..48 + comm.len()].copy_from_slice(comm);
}

/// Marks a record as carrying the sequence number of its call's first byte, where the kernel
/// puts it (`PayloadHeader::seq`, flag `payload_flags::SEQ`).
fn with_seq(record: &mut [u8], seq: u32) {
    record[40] |= agent_common::payload_flags::SEQ;
    record[44..48].copy_from_slice(&seq.to_ne_bytes());
}

fn bench(c: &mut Criterion) {
    let start_ns = cacheprobe::clock::monotonic_ns();
    let records = records(start_ns);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(OPERATIONS as u64));
    // Requests here take 3-4 us: at the defaults the slice (every id, narrowed to the budget)
    // has exemplars, 20 per second of request time at most. "every_request" sets one on each (no budget): the bound.
    for (name, limits) in [
        ("memcache_ops_both_ends_decoded", ""),
        (
            "memcache_ops_both_ends_decoded_exemplars_off",
            "exemplars_per_second = 0\n",
        ),
        (
            "memcache_ops_both_ends_decoded_exemplar_every_request",
            "exemplar_sample_one_in = 1\nexemplars_per_second = 4294967295\n",
        ),
    ] {
        let mut pipeline = pipeline(start_ns, limits);
        group.bench_function(name, |b| {
            b.iter(|| {
                for record in &records {
                    black_box(pipeline.on_payload_record(black_box(record)));
                }
            })
        });
    }
    group.finish();

    // The histogram alone: prometheus-client's plain `Histogram` (the type before exemplars),
    // its `HistogramWithExemplars` (two locks; the type of 3e030f3) and the agent's
    // `LatencyHistogram` (one lock), without and with an exemplar.
    use prometheus_client::metrics::{exemplar::HistogramWithExemplars, histogram::Histogram};
    let values: Vec<f64> = (0..1024u32).map(|i| f64::from(i % 97 + 1) * 1e-5).collect();
    let bounds = cacheprobe::export::latency::LATENCY_BUCKETS;
    let mut group = c.benchmark_group("latency_histogram");
    group.throughput(Throughput::Elements(values.len() as u64));
    let plain = Histogram::new(bounds.iter().copied());
    group.bench_function("prometheus_client_histogram", |b| {
        b.iter(|| values.iter().for_each(|v| plain.observe(black_box(*v))))
    });
    let two_locks = HistogramWithExemplars::<Vec<(String, String)>>::new(bounds.iter().copied());
    group.bench_function("prometheus_client_histogram_with_exemplars_none", |b| {
        b.iter(|| {
            values
                .iter()
                .for_each(|v| two_locks.observe(black_box(*v), None))
        })
    });
    let one_lock = cacheprobe::export::latency::LatencyHistogram::default();
    group.bench_function("latency_histogram_none", |b| {
        b.iter(|| {
            values
                .iter()
                .for_each(|v| one_lock.observe(black_box(*v), None))
        })
    });
    // Every offer ranks higher than the last: each one takes its bucket's slot (the most work).
    let mut rank = 0u64;
    group.bench_function("latency_histogram_exemplar_every_observation", |b| {
        b.iter(|| {
            values.iter().for_each(|v| {
                rank += 1;
                let offer = cacheprobe::export::latency::Offer {
                    request_id: 0xab,
                    rank,
                };
                one_lock.observe(black_box(*v), Some(black_box(offer)))
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
