//! Decoder throughput on a realistic mixed workload, in commands (requests) per second.
//!
//! Three connections are interleaved: classic text (60% of commands), meta (20%) and binary
//! (20%). Each connection runs 70% gets (single keys with an 80% hit rate, plus multi-gets of
//! four keys), 22% sets with 100-1000 byte values, 4% deletes and 4% incr. Every request is
//! one send and every response one receive, captured to a 256-byte prefix as the agent does;
//! values beyond the prefix are framed by length.
//!
//! Run: `cargo bench -p cacheprobe --bench decoder`
//!
//! Before criterion's groups, the mixed workload is also decoded with value heads (issue 21's
//! fingerprints, [`DecoderConfig::value_heads`]) on and off in interleaved rounds, and the
//! change in commands/s is printed with a bootstrap 95% confidence interval: the two sides run
//! side by side, so load from other processes hits both alike.

use std::{hint::black_box, time::Instant};

use cacheprobe::memcache::{Chunk, ConnectionDecoder, Decoded, DecoderConfig, Direction};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CAPTURE: usize = 256;
const COMMANDS: usize = 30_000;

struct Payload {
    connection: usize,
    direction: Direction,
    ts_ns: u64,
    bytes: Vec<u8>,
}

/// A small deterministic generator so every run decodes the same bytes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Op {
    Get { hit: bool },
    MultiGet { hits: [bool; 4] },
    Set,
    Delete,
    Incr,
}

fn pick_op(rng: &mut Lcg) -> Op {
    match rng.below(100) {
        0..=61 => Op::Get {
            hit: rng.below(10) < 8,
        },
        62..=69 => Op::MultiGet {
            hits: [
                rng.below(4) < 3,
                rng.below(4) < 3,
                rng.below(4) < 3,
                rng.below(4) < 3,
            ],
        },
        70..=91 => Op::Set,
        92..=95 => Op::Delete,
        _ => Op::Incr,
    }
}

fn value(rng: &mut Lcg) -> Vec<u8> {
    let len = 100 + rng.below(901) as usize;
    vec![b'v'; len]
}

fn text_exchange(op: &Op, key: &str, rng: &mut Lcg) -> (Vec<u8>, Vec<u8>) {
    let mut request = Vec::new();
    let mut response = Vec::new();
    match op {
        Op::Get { hit } => {
            request.extend_from_slice(format!("get {key}\r\n").as_bytes());
            if *hit {
                let v = value(rng);
                response.extend_from_slice(format!("VALUE {key} 0 {}\r\n", v.len()).as_bytes());
                response.extend_from_slice(&v);
                response.extend_from_slice(b"\r\n");
            }
            response.extend_from_slice(b"END\r\n");
        }
        Op::MultiGet { hits } => {
            request.extend_from_slice(b"get");
            for (i, hit) in hits.iter().enumerate() {
                request.extend_from_slice(format!(" {key}:{i}").as_bytes());
                if *hit {
                    response.extend_from_slice(format!("VALUE {key}:{i} 0 20\r\n").as_bytes());
                    response.extend_from_slice(&[b'm'; 20]);
                    response.extend_from_slice(b"\r\n");
                }
            }
            request.extend_from_slice(b"\r\n");
            response.extend_from_slice(b"END\r\n");
        }
        Op::Set => {
            let v = value(rng);
            request.extend_from_slice(format!("set {key} 0 3600 {}\r\n", v.len()).as_bytes());
            request.extend_from_slice(&v);
            request.extend_from_slice(b"\r\n");
            response.extend_from_slice(b"STORED\r\n");
        }
        Op::Delete => {
            request.extend_from_slice(format!("delete {key}\r\n").as_bytes());
            response.extend_from_slice(b"NOT_FOUND\r\n");
        }
        Op::Incr => {
            request.extend_from_slice(format!("incr {key} 1\r\n").as_bytes());
            response.extend_from_slice(b"17\r\n");
        }
    }
    (request, response)
}

fn meta_exchange(op: &Op, key: &str, rng: &mut Lcg) -> (Vec<u8>, Vec<u8>) {
    let mut request = Vec::new();
    let mut response = Vec::new();
    match op {
        Op::Get { hit } => {
            request.extend_from_slice(format!("mg {key} v f t\r\n").as_bytes());
            if *hit {
                let v = value(rng);
                response.extend_from_slice(format!("VA {} f0 t-1\r\n", v.len()).as_bytes());
                response.extend_from_slice(&v);
                response.extend_from_slice(b"\r\n");
            } else {
                response.extend_from_slice(b"EN\r\n");
            }
        }
        Op::MultiGet { hits } => {
            // Meta clients batch quiet gets with their keys echoed, closed by mn.
            for (i, hit) in hits.iter().enumerate() {
                request.extend_from_slice(format!("mg {key}:{i} v k q\r\n").as_bytes());
                if *hit {
                    response.extend_from_slice(format!("VA 20 k{key}:{i}\r\n").as_bytes());
                    response.extend_from_slice(&[b'm'; 20]);
                    response.extend_from_slice(b"\r\n");
                }
            }
            request.extend_from_slice(b"mn\r\n");
            response.extend_from_slice(b"MN\r\n");
        }
        Op::Set => {
            let v = value(rng);
            request.extend_from_slice(format!("ms {key} {} T3600\r\n", v.len()).as_bytes());
            request.extend_from_slice(&v);
            request.extend_from_slice(b"\r\n");
            response.extend_from_slice(b"HD\r\n");
        }
        Op::Delete => {
            request.extend_from_slice(format!("md {key}\r\n").as_bytes());
            response.extend_from_slice(b"NF\r\n");
        }
        Op::Incr => {
            request.extend_from_slice(format!("ma {key} v\r\n").as_bytes());
            response.extend_from_slice(b"VA 2\r\n17\r\n");
        }
    }
    (request, response)
}

fn bin_packet(
    magic: u8,
    opcode: u8,
    status: u16,
    opaque: u32,
    extras: &[u8],
    key: &[u8],
    value: &[u8],
) -> Vec<u8> {
    let body = extras.len() + key.len() + value.len();
    let mut b = vec![magic, opcode];
    b.extend_from_slice(&(key.len() as u16).to_be_bytes());
    b.push(extras.len() as u8);
    b.push(0);
    b.extend_from_slice(&status.to_be_bytes());
    b.extend_from_slice(&(body as u32).to_be_bytes());
    b.extend_from_slice(&opaque.to_be_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(extras);
    b.extend_from_slice(key);
    b.extend_from_slice(value);
    b
}

fn binary_exchange(op: &Op, key: &str, opaque: u32, rng: &mut Lcg) -> (Vec<u8>, Vec<u8>) {
    let k = key.as_bytes();
    match op {
        Op::Get { hit } => {
            let request = bin_packet(0x80, 0x00, 0, opaque, &[], k, &[]);
            let response = if *hit {
                bin_packet(0x81, 0x00, 0, opaque, &[0; 4], &[], &value(rng))
            } else {
                bin_packet(0x81, 0x00, 1, opaque, &[], &[], b"Not found")
            };
            (request, response)
        }
        Op::MultiGet { hits } => {
            // GetKQ for each key, closed by NoOp: only hits are answered.
            let mut request = Vec::new();
            let mut response = Vec::new();
            for (i, hit) in hits.iter().enumerate() {
                let key = format!("{key}:{i}");
                request.extend(bin_packet(
                    0x80,
                    0x0d,
                    0,
                    opaque + i as u32,
                    &[],
                    key.as_bytes(),
                    &[],
                ));
                if *hit {
                    response.extend(bin_packet(
                        0x81,
                        0x0d,
                        0,
                        opaque + i as u32,
                        &[0; 4],
                        key.as_bytes(),
                        &[b'm'; 20],
                    ));
                }
            }
            request.extend(bin_packet(0x80, 0x0a, 0, opaque + 4, &[], &[], &[]));
            response.extend(bin_packet(0x81, 0x0a, 0, opaque + 4, &[], &[], &[]));
            (request, response)
        }
        Op::Set => (
            bin_packet(0x80, 0x01, 0, opaque, &[0; 8], k, &value(rng)),
            bin_packet(0x81, 0x01, 0, opaque, &[], &[], &[]),
        ),
        Op::Delete => (
            bin_packet(0x80, 0x04, 0, opaque, &[], k, &[]),
            bin_packet(0x81, 0x04, 1, opaque, &[], &[], b"Not found"),
        ),
        Op::Incr => (
            bin_packet(0x80, 0x05, 0, opaque, &[0; 20], k, &[]),
            bin_packet(0x81, 0x05, 0, opaque, &[], &[], &17u64.to_be_bytes()),
        ),
    }
}

/// Returns the payloads and how many requests they hold.
fn workload() -> (Vec<Payload>, u64) {
    let mut rng = Lcg(0x5eed);
    let mut payloads = Vec::new();
    let mut requests = 0u64;
    let mut ts = 1_000_000u64;
    for i in 0..COMMANDS {
        let connection = match rng.below(10) {
            0..=5 => 0,
            6 | 7 => 1,
            _ => 2,
        };
        let op = pick_op(&mut rng);
        let key = format!("user:{}:profile", rng.below(100_000));
        requests += match (&op, connection) {
            (Op::MultiGet { .. }, 1 | 2) => 5, // four quiet gets and the closing no-op
            _ => 1,
        };
        let (request, response) = match connection {
            0 => text_exchange(&op, &key, &mut rng),
            1 => meta_exchange(&op, &key, &mut rng),
            _ => binary_exchange(&op, &key, (i as u32) * 8, &mut rng),
        };
        ts += 20_000;
        payloads.push(Payload {
            connection,
            direction: Direction::ClientToServer,
            ts_ns: ts,
            bytes: request,
        });
        ts += 150_000;
        payloads.push(Payload {
            connection,
            direction: Direction::ServerToClient,
            ts_ns: ts,
            bytes: response,
        });
    }
    (payloads, requests)
}

/// Decodes the whole workload; returns (request observations, decode errors).
fn decode_all(payloads: &[Payload], out: &mut Vec<Decoded>) -> (u64, u64) {
    decode_all_with(payloads, out, true)
}

fn decode_all_with(payloads: &[Payload], out: &mut Vec<Decoded>, value_heads: bool) -> (u64, u64) {
    let mut decoders: Vec<ConnectionDecoder> = (0..3)
        .map(|_| {
            ConnectionDecoder::new(DecoderConfig {
                value_heads,
                ..DecoderConfig::default()
            })
        })
        .collect();
    let (mut requests, mut errors) = (0, 0);
    for payload in payloads {
        let chunk = Chunk {
            direction: payload.direction,
            ts_ns: payload.ts_ns,
            captured: &payload.bytes[..payload.bytes.len().min(CAPTURE)],
            total_len: payload.bytes.len(),
            seq: None,
        };
        decoders[payload.connection].feed(chunk, out);
        // The agent reads observations after every chunk and clears the vector, which keeps
        // its capacity.
        for observation in out.iter() {
            match observation {
                Decoded::Request(r) => {
                    black_box(r);
                    requests += 1;
                }
                Decoded::DecodeError(_) => errors += 1,
            }
        }
        out.clear();
    }
    (requests, errors)
}

fn bench_decoder(c: &mut Criterion) {
    let (payloads, requests) = workload();
    let mut out = Vec::with_capacity(64);
    // Multi-gets report one observation per key, so observations exceed requests.
    let (observations, errors) = decode_all(&payloads, &mut out);
    assert_eq!(errors, 0, "the workload must decode cleanly");
    assert!(
        observations >= requests,
        "{observations} observations for {requests} requests"
    );
    let bytes: usize = payloads.iter().map(|p| p.bytes.len()).sum();
    eprintln!(
        "workload: {requests} requests, {observations} observations, {} payloads, {bytes} bytes on the wire",
        payloads.len()
    );
    value_heads_side_by_side(&payloads, requests, &mut out);
    let mut group = c.benchmark_group("decoder");
    group.throughput(Throughput::Elements(requests));
    group.bench_function("mixed_text_meta_binary", |b| {
        b.iter(|| black_box(decode_all(&payloads, &mut out)))
    });
    group.finish();

    // Issue 17: a multi-get of 100 keys and its reply of 100 VALUE items, as the framing-aware
    // capture delivers them: one chunk per frame header and its value's first 8 bytes, the
    // rest of the body uncaptured.
    let (items, many) = many_items_workload(100, 100, 200);
    let (observations, errors) = decode_chunks(&many, &mut out);
    assert_eq!(errors, 0, "the many-items workload must decode cleanly");
    assert_eq!(observations, items, "one observation per key");
    let mut group = c.benchmark_group("decoder");
    group.throughput(Throughput::Elements(items));
    group.bench_function("get_100_keys_many_items", |b| {
        b.iter(|| black_box(decode_chunks(&many, &mut out)))
    });
    group.finish();
}

/// Rounds of the value-heads comparison, and workload passes per side per round.
const AB_ROUNDS: usize = 30;
const AB_PASSES: usize = 5;

/// Commands/s with value heads on and off, interleaved round by round (the side that goes
/// first alternates); prints the median change and a percentile-bootstrap 95% CI of it.
fn value_heads_side_by_side(payloads: &[Payload], requests: u64, out: &mut Vec<Decoded>) {
    let rate = |on: bool, out: &mut Vec<Decoded>| {
        let start = Instant::now();
        for _ in 0..AB_PASSES {
            black_box(decode_all_with(payloads, out, on));
        }
        (requests * AB_PASSES as u64) as f64 / start.elapsed().as_secs_f64()
    };
    // Warm-up, both sides.
    rate(true, out);
    rate(false, out);
    let mut on = Vec::new();
    let mut changes = Vec::new();
    let mut off = Vec::new();
    for round in 0..AB_ROUNDS {
        let (a, b) = if round % 2 == 0 {
            let a = rate(true, out);
            (a, rate(false, out))
        } else {
            let b = rate(false, out);
            (rate(true, out), b)
        };
        on.push(a);
        off.push(b);
        changes.push(a / b - 1.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rng = Lcg(0xb007);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| {
            let mut sample: Vec<f64> = (0..changes.len())
                .map(|_| changes[rng.below(changes.len() as u64) as usize])
                .collect();
            median(&mut sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let (low, high) = (medians[50], medians[1949]);
    eprintln!(
        "value heads side by side ({AB_ROUNDS} interleaved rounds of {AB_PASSES} passes): \
         on {:.0} commands/s, off {:.0} commands/s (medians); change with heads on {:+.2}% \
         (95% CI {:+.2}% .. {:+.2}%)",
        median(&mut on),
        median(&mut off),
        100.0 * median(&mut changes.clone()),
        100.0 * low,
        100.0 * high
    );
}

/// One send or receive as the kernel's framing-aware capture reports it: (captured header
/// bytes, bytes of the call they stand for) per segment.
struct Framed {
    direction: Direction,
    ts_ns: u64,
    chunks: Vec<(Vec<u8>, usize)>,
}

/// `gets` multi-gets of `keys` keys with `value_len`-byte values on one text connection.
/// Returns (items, calls).
fn many_items_workload(keys: usize, value_len: usize, gets: usize) -> (u64, Vec<Framed>) {
    let mut calls = Vec::new();
    let mut ts = 1_000_000u64;
    for get in 0..gets {
        let names: Vec<String> = (0..keys).map(|k| format!("item:{get}:{k}")).collect();
        let request = format!("get {}\r\n", names.join(" ")).into_bytes();
        let request_len = request.len();
        let mut reply = Vec::new();
        for name in &names {
            // The header and the value's head (its first 8 bytes), as the capture copies them.
            let mut header = format!("VALUE {name} 0 {value_len}\r\n").into_bytes();
            let len = header.len() + value_len + 2;
            header.extend(std::iter::repeat_n(b'v', value_len.min(8)));
            reply.push((header, len));
        }
        reply.push((b"END\r\n".to_vec(), 5));
        ts += 20_000;
        calls.push(Framed {
            direction: Direction::ClientToServer,
            ts_ns: ts,
            chunks: vec![(request, request_len)],
        });
        ts += 150_000;
        calls.push(Framed {
            direction: Direction::ServerToClient,
            ts_ns: ts,
            chunks: reply,
        });
    }
    ((keys * gets) as u64, calls)
}

/// Decodes framed calls on one connection; returns (request observations, decode errors).
fn decode_chunks(calls: &[Framed], out: &mut Vec<Decoded>) -> (u64, u64) {
    let mut decoder = ConnectionDecoder::new(DecoderConfig::default());
    let (mut requests, mut errors) = (0, 0);
    for call in calls {
        for (captured, total_len) in &call.chunks {
            decoder.feed(
                Chunk {
                    direction: call.direction,
                    ts_ns: call.ts_ns,
                    captured,
                    total_len: *total_len,
                    seq: None,
                },
                out,
            );
        }
        for observation in out.iter() {
            match observation {
                Decoded::Request(r) => {
                    black_box(r);
                    requests += 1;
                }
                Decoded::DecodeError(_) => errors += 1,
            }
        }
        out.clear();
    }
    (requests, errors)
}

criterion_group!(benches, bench_decoder);
criterion_main!(benches);
