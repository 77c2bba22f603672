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
//! Before criterion's groups, two side-by-side comparisons are printed (stderr), each from one
//! run with every variant's passes interleaved, so load from other processes hits all alike:
//! - issue 21: the mixed workload with value sizes and values' first bytes on
//!   ([`DecoderConfig::sizes`], [`DecoderConfig::value_heads`]) against each switched off;
//! - issue 17: multi-get replies of 1, 10 and 100 items of 100 B and 10 KB, text and binary,
//!   as the framing-aware capture delivers them, in gets/s and items/s.

use std::hint::black_box;

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

/// Which of issue 21's reports the decoder produces: values' first bytes and value sizes.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    value_heads: bool,
    sizes: bool,
}

const ON: Variant = Variant {
    name: "on",
    value_heads: true,
    sizes: true,
};

/// The product's decoder first; the others switch one or both reports off.
const VARIANTS: [Variant; 4] = [
    ON,
    Variant {
        name: "heads off",
        value_heads: false,
        sizes: true,
    },
    Variant {
        name: "sizes off",
        value_heads: true,
        sizes: false,
    },
    Variant {
        name: "both off",
        value_heads: false,
        sizes: false,
    },
];

fn config(variant: Variant) -> DecoderConfig {
    DecoderConfig {
        value_heads: variant.value_heads,
        sizes: variant.sizes,
        ..DecoderConfig::default()
    }
}

/// Decodes the whole workload; returns (request observations, decode errors).
fn decode_all(payloads: &[Payload], out: &mut Vec<Decoded>) -> (u64, u64) {
    decode_all_with(payloads, out, ON)
}

fn decode_all_with(payloads: &[Payload], out: &mut Vec<Decoded>, variant: Variant) -> (u64, u64) {
    let mut decoders: Vec<ConnectionDecoder> = (0..3)
        .map(|_| ConnectionDecoder::new(config(variant)))
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
    let rounds = env_usize("CACHEPROBE_AB_ROUNDS", AB_ROUNDS);
    reports_side_by_side(&payloads, requests, rounds, &mut out);
    many_items_side_by_side(rounds.div_ceil(4).max(5), &mut out);
    let mut group = c.benchmark_group("decoder");
    group.throughput(Throughput::Elements(requests));
    group.bench_function("mixed_text_meta_binary", |b| {
        b.iter(|| black_box(decode_all(&payloads, &mut out)))
    });
    group.finish();

    // Issue 17: multi-get replies of 1, 10 and 100 items as the framing-aware capture delivers
    // them (one chunk per frame header and its value's first 8 bytes, the rest of the body
    // uncaptured), in commands (gets) per second.
    let mut group = c.benchmark_group("decoder_many_items");
    for shape in SHAPES {
        let (gets, items, calls) = shape.workload();
        let (observations, errors) = decode_chunks(&calls, &mut out, ON);
        assert_eq!(errors, 0, "{}: must decode cleanly", shape.name());
        // One observation per key, and one per binary no-op.
        let noops = if shape.binary { gets } else { 0 };
        assert_eq!(
            observations,
            items + noops,
            "{}: one observation per key",
            shape.name()
        );
        group.throughput(Throughput::Elements(gets));
        group.bench_function(shape.name(), |b| {
            b.iter(|| black_box(decode_chunks(&calls, &mut out, ON)))
        });
    }
    group.finish();
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rounds of the side-by-side comparison (`CACHEPROBE_AB_ROUNDS` overrides), and timed passes
/// per variant per round.
const AB_ROUNDS: usize = 100;
const AB_PASSES: usize = 5;

/// CPU time of the calling thread, in seconds: unlike wall time, it does not count the time
/// other processes held the core, which on a shared machine is most of the noise.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Times `pass` for every variant, passes interleaved (on, heads off, sizes off, both off, on,
/// ...; the order rotates each round) so load from other processes falls on all alike. Time
/// is the thread's CPU time. A variant's rate in a round is `work` over its fastest pass: what
/// other processes do (cache misses, a preemption's cost) only ever slows a pass down, so the
/// fastest is the least disturbed. Returns rates[variant][round].
fn interleaved_rates(rounds: usize, work: u64, mut pass: impl FnMut(Variant)) -> Vec<Vec<f64>> {
    // Warm-up, every variant.
    for variant in VARIANTS {
        pass(variant);
    }
    let mut rates = vec![Vec::with_capacity(rounds); VARIANTS.len()];
    for round in 0..rounds {
        let mut best = [f64::INFINITY; VARIANTS.len()];
        for _ in 0..AB_PASSES {
            for k in 0..VARIANTS.len() {
                let v = (k + round) % VARIANTS.len();
                let start = thread_cpu_secs();
                pass(VARIANTS[v]);
                best[v] = best[v].min(thread_cpu_secs() - start);
            }
        }
        for (v, secs) in best.iter().enumerate() {
            rates[v].push(work as f64 / secs);
        }
    }
    rates
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The change of `on` against `off`, paired by round: the mean of the per-round log ratios
/// with its 95% t interval, as percentages (exp back), and the median per-round change with a
/// percentile-bootstrap 95% interval.
struct Change {
    mean: f64,
    mean_low: f64,
    mean_high: f64,
    median: f64,
    median_low: f64,
    median_high: f64,
}

fn paired_change(on: &[f64], off: &[f64]) -> Change {
    let logs: Vec<f64> = on.iter().zip(off).map(|(a, b)| (a / b).ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    // Two-sided 95% t quantile; 1.98 at 100 rounds, a little more for fewer.
    let t = 1.96 + 2.4 / (n - 1.0).max(1.0);
    let half = t * (var / n).sqrt();
    let pct = |x: f64| 100.0 * (x.exp() - 1.0);
    let changes: Vec<f64> = logs.iter().map(|&x| pct(x)).collect();
    let mut rng = Lcg(0xb007);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| {
            let sample: Vec<f64> = (0..changes.len())
                .map(|_| changes[rng.below(changes.len() as u64) as usize])
                .collect();
            median(&sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    Change {
        mean: pct(mean),
        mean_low: pct(mean - half),
        mean_high: pct(mean + half),
        median: median(&changes),
        median_low: medians[50],
        median_high: medians[1949],
    }
}

/// Issue 21: commands/s of the mixed workload with sizes and values' first bytes on against
/// each switched off, side by side in one run. Prints one line per variant.
fn reports_side_by_side(
    payloads: &[Payload],
    requests: u64,
    rounds: usize,
    out: &mut Vec<Decoded>,
) {
    let rates = interleaved_rates(rounds, requests, |variant| {
        black_box(decode_all_with(payloads, out, variant));
    });
    eprintln!(
        "issue 21 side by side: mixed workload, {rounds} rounds, fastest of {AB_PASSES} \
         interleaved passes per variant per round (thread CPU time); change = commands/s with \
         everything on against the variant, paired by round"
    );
    eprintln!(
        "{:<10} {:>14} {:>30} {:>30}",
        "variant", "commands/s", "mean change (95% t CI)", "median change (95% bootstrap)"
    );
    for (v, variant) in VARIANTS.iter().enumerate() {
        let line = if v == 0 {
            String::new()
        } else {
            let c = paired_change(&rates[0], &rates[v]);
            format!(
                "{:>+7.2}% ({:+.2}..{:+.2}) {:>+9.2}% ({:+.2}..{:+.2})",
                c.mean, c.mean_low, c.mean_high, c.median, c.median_low, c.median_high
            )
        };
        eprintln!("{:<10} {:>14.0} {line}", variant.name, median(&rates[v]));
    }
}

/// Issue 17: many-item replies, decoded with everything on; the last columns compare with
/// sizes and heads both off.
fn many_items_side_by_side(rounds: usize, out: &mut Vec<Decoded>) {
    eprintln!(
        "issue 17 many-item replies ({rounds} rounds, fastest of {AB_PASSES} interleaved passes, \
         thread CPU time): commands are multi-gets (text get, binary getkq per key + noop)"
    );
    eprintln!(
        "{:<20} {:>12} {:>14} {:>14} {:>26}",
        "shape", "gets/s", "items/s", "both off gets/s", "change on vs off (95% t CI)"
    );
    for shape in SHAPES {
        let (gets, items, calls) = shape.workload();
        let rates = interleaved_rates(rounds, gets, |variant| {
            black_box(decode_chunks(&calls, out, variant));
        });
        let c = paired_change(&rates[0], &rates[3]);
        let on = median(&rates[0]);
        eprintln!(
            "{:<20} {:>12.0} {:>14.0} {:>14.0} {:>+8.2}% ({:+.2}..{:+.2})",
            shape.name(),
            on,
            on * items as f64 / gets as f64,
            median(&rates[3]),
            c.mean,
            c.mean_low,
            c.mean_high
        );
    }
}

/// (captured header bytes, bytes of the call they stand for) per segment of one call.
type Segments = Vec<(Vec<u8>, usize)>;

/// One send or receive as the kernel's framing-aware capture reports it.
struct Framed {
    direction: Direction,
    ts_ns: u64,
    chunks: Segments,
}

#[derive(Clone, Copy)]
struct Shape {
    binary: bool,
    keys: usize,
    value_len: usize,
}

const SHAPES: [Shape; 12] = {
    let mut shapes = [Shape {
        binary: false,
        keys: 1,
        value_len: 100,
    }; 12];
    let keys = [1, 10, 100];
    let lens = [100, 10_240];
    let mut i = 0;
    while i < 12 {
        shapes[i] = Shape {
            binary: i >= 6,
            keys: keys[(i % 6) / 2],
            value_len: lens[i % 2],
        };
        i += 1;
    }
    shapes
};

/// Items decoded per pass, whatever the shape.
const ITEMS_PER_PASS: usize = 20_000;

impl Shape {
    fn name(&self) -> String {
        let size = if self.value_len >= 1024 {
            format!("{}KB", self.value_len / 1024)
        } else {
            format!("{}B", self.value_len)
        };
        let protocol = if self.binary { "binary" } else { "text" };
        format!("{protocol}_{}keys_{size}", self.keys)
    }

    /// Returns (gets, items, calls) on one connection, every key a hit.
    fn workload(&self) -> (u64, u64, Vec<Framed>) {
        let gets = ITEMS_PER_PASS / self.keys;
        let mut calls = Vec::new();
        let mut ts = 1_000_000u64;
        for get in 0..gets {
            let names: Vec<String> = (0..self.keys).map(|k| format!("item:{get}:{k}")).collect();
            let (request, reply) = if self.binary {
                self.binary_exchange(&names, get as u32)
            } else {
                self.text_exchange(&names)
            };
            ts += 20_000;
            calls.push(Framed {
                direction: Direction::ClientToServer,
                ts_ns: ts,
                chunks: request,
            });
            ts += 150_000;
            calls.push(Framed {
                direction: Direction::ServerToClient,
                ts_ns: ts,
                chunks: reply,
            });
        }
        (gets as u64, (self.keys * gets) as u64, calls)
    }

    /// The value's first bytes, as the capture copies them after each header.
    fn head(&self) -> impl Iterator<Item = u8> {
        std::iter::repeat_n(b'v', self.value_len.min(8))
    }

    fn text_exchange(&self, names: &[String]) -> (Segments, Segments) {
        let request = format!("get {}\r\n", names.join(" ")).into_bytes();
        let request_len = request.len();
        let mut reply = Vec::new();
        for name in names {
            let mut header = format!("VALUE {name} 0 {}\r\n", self.value_len).into_bytes();
            let len = header.len() + self.value_len + 2;
            header.extend(self.head());
            reply.push((header, len));
        }
        reply.push((b"END\r\n".to_vec(), 5));
        (vec![(request, request_len)], reply)
    }

    fn binary_exchange(&self, names: &[String], get: u32) -> (Segments, Segments) {
        let opaque = get * 128;
        let mut request = Vec::new();
        let mut reply = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let key = name.as_bytes();
            request.extend(bin_packet(0x80, 0x0d, 0, opaque + i as u32, &[], key, &[]));
            // getkq hit: header, 4 bytes of flags, the key, the value's head; the rest of the
            // body uncaptured.
            let mut frame = bin_packet(0x81, 0x0d, 0, opaque + i as u32, &[0; 4], key, &[]);
            let len = frame.len() + self.value_len;
            let body = (4 + key.len() + self.value_len) as u32;
            frame[8..12].copy_from_slice(&body.to_be_bytes());
            frame.extend(self.head());
            reply.push((frame, len));
        }
        let noop = opaque + names.len() as u32;
        request.extend(bin_packet(0x80, 0x0a, 0, noop, &[], &[], &[]));
        reply.push((bin_packet(0x81, 0x0a, 0, noop, &[], &[], &[]), 24));
        let request_len = request.len();
        (vec![(request, request_len)], reply)
    }
}

/// Decodes framed calls on one connection; returns (request observations, decode errors).
fn decode_chunks(calls: &[Framed], out: &mut Vec<Decoded>, variant: Variant) -> (u64, u64) {
    let mut decoder = ConnectionDecoder::new(config(variant));
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
