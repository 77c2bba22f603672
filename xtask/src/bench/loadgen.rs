//! A memcache text-protocol load generator: one thread, epoll, one request in flight per
//! connection. Closed loop (saturation: the next request goes out as soon as the answer is in)
//! or open loop at a fixed rate. memcaslap on Debian ignores `--tps` and only reports latency in
//! power-of-two buckets, so the fixed-rate runs and every p99 come from here.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::procs::interrupted;

/// What the requests look like: a fixed get/set mix over a fixed key space.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub keys: u32,
    pub value_len: usize,
    /// Percentage of requests that are sets; the rest are gets.
    pub set_percent: u32,
}

pub const WORKLOAD: Workload = Workload {
    keys: 10_000,
    value_len: 256,
    set_percent: 10,
};

impl Workload {
    pub fn describe(&self) -> String {
        format!(
            "{}% get / {}% set, {} keys of 25 bytes (all present), {}-byte values, text protocol",
            100 - self.set_percent,
            self.set_percent,
            self.keys,
            self.value_len
        )
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second across all connections; None drives every connection flat out.
    pub rate: Option<u64>,
    pub workload: Workload,
}

impl LoadSpec {
    pub fn describe(&self) -> String {
        let rate = match self.rate {
            Some(rate) => format!("open loop at {rate} ops/s"),
            None => "closed loop (saturation)".to_string(),
        };
        format!(
            "{} connections, {rate}, {:.0} s, 1 thread",
            self.connections,
            self.duration.as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
pub struct LoadReport {
    pub ops: u64,
    /// Answers that were memcache errors (ERROR, SERVER_ERROR, NOT_STORED...).
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
    /// Answered requests per connection of the pool, by index.
    pub ops_per_connection: Vec<u64>,
    /// Connections memcached closed under the generator, each re-opened ([`Pool::RoundRobin`]).
    pub server_closes: u64,
    /// Requests in flight on those connections when memcached's close arrived: sent, never
    /// answered (sent after the close, they were dead writes).
    pub lost_in_flight: u64,
}

/// How the generator hands requests to its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The connection answered last goes next, so a light load keeps to a few connections; a
    /// connection memcached closes ends the run with an error.
    Stack,
    /// Round robin, as a client pool spreads requests: no connection idles while the others
    /// work, and each carries the same share. A connection memcached closes anyway (its idle
    /// timeout during a stall of the generator) is re-opened and counted.
    RoundRobin,
}

impl LoadReport {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A hard ceiling on one run's operations, far above what a loopback run can reach, so no loop
/// depends on the clock alone to end.
const MAX_OPS_PER_RUN: u64 = 200_000_000;
/// A response larger than this is a protocol mistake, not a value of ours.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Get,
    Set,
}

/// xorshift64*: deterministic and cheap, so every mode sees the same request sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn write_request(out: &mut Vec<u8>, kind: Kind, key_index: u32, value: &[u8]) {
    use std::io::Write as _;
    match kind {
        Kind::Get => {
            let _ = write!(out, "get cacheprobe:bench:{key_index:08}\r\n");
        }
        Kind::Set => {
            let _ = write!(
                out,
                "set cacheprobe:bench:{key_index:08} 0 0 {}\r\n",
                value.len()
            );
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    Complete { consumed: usize, ok: bool },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unexpected response line {0:?}")]
    Unexpected(String),
    #[error("value block is not followed by CRLF")]
    BadValueEnd,
    #[error("response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn is_error_line(line: &[u8]) -> bool {
    line.starts_with(b"ERROR")
        || line.starts_with(b"CLIENT_ERROR")
        || line.starts_with(b"SERVER_ERROR")
}

/// Whether `buf` starts with one whole answer to a `kind` request, and how long it is.
pub fn parse_response(buf: &[u8], kind: Kind) -> Result<Parsed, ProtocolError> {
    let mut pos = 0;
    loop {
        let Some(end) = find_crlf(buf, pos) else {
            return if buf.len() > MAX_RESPONSE {
                Err(ProtocolError::TooLarge)
            } else {
                Ok(Parsed::Incomplete)
            };
        };
        let line = &buf[pos..end];
        let after_line = end + 2;
        if is_error_line(line) {
            return Ok(Parsed::Complete {
                consumed: after_line,
                ok: false,
            });
        }
        match kind {
            Kind::Set => {
                let ok = match line {
                    b"STORED" => true,
                    b"NOT_STORED" | b"EXISTS" | b"NOT_FOUND" => false,
                    _ => {
                        return Err(ProtocolError::Unexpected(
                            String::from_utf8_lossy(line).into_owned(),
                        ))
                    }
                };
                return Ok(Parsed::Complete {
                    consumed: after_line,
                    ok,
                });
            }
            Kind::Get if line == b"END" => {
                return Ok(Parsed::Complete {
                    consumed: after_line,
                    ok: true,
                })
            }
            Kind::Get if line.starts_with(b"VALUE ") => {
                let unexpected = || ProtocolError::Unexpected(String::from_utf8_lossy(line).into());
                let len: usize = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.split(' ').nth(3))
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(unexpected)?;
                if len > MAX_RESPONSE {
                    return Err(ProtocolError::TooLarge);
                }
                let data_end = after_line + len;
                if buf.len() < data_end + 2 {
                    return Ok(Parsed::Incomplete);
                }
                if &buf[data_end..data_end + 2] != b"\r\n" {
                    return Err(ProtocolError::BadValueEnd);
                }
                pos = data_end + 2;
            }
            Kind::Get => {
                return Err(ProtocolError::Unexpected(
                    String::from_utf8_lossy(line).into_owned(),
                ))
            }
        }
    }
}

/// Latency histogram with 64 linear sub-buckets per power of two (under 1.6% error), so
/// p99 differences of a few percent between modes are real, not bucket artefacts.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const LINEAR: u64 = 2 * SUB;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; Self::index(u64::MAX) + 1],
            total: 0,
        }
    }
}

impl Histogram {
    fn index(value: u64) -> usize {
        if value < LINEAR {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros() as u64;
        let sub = (value >> (exponent - SUB_BITS as u64)) & (SUB - 1);
        (LINEAR + (exponent - SUB_BITS as u64 - 1) * SUB + sub) as usize
    }

    /// The largest value that lands in bucket `index`.
    fn upper_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < LINEAR {
            return index;
        }
        let exponent = (index - LINEAR) / SUB + SUB_BITS as u64 + 1;
        let sub = (index - LINEAR) % SUB;
        let width = 1u64 << (exponent - SUB_BITS as u64);
        (1u64 << exponent)
            .saturating_add(sub * width)
            .saturating_add(width - 1)
    }

    pub fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
    }

    /// The value at quantile `q` (0..=1), as the upper edge of its bucket; None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::upper_bound(index));
            }
        }
        None
    }
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn control(&self, op: i32, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both fds are valid; the event struct lives across the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: the buffer is valid for events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err);
        }
        Ok(n as usize)
    }
}

struct Connection {
    stream: TcpStream,
    out: Vec<u8>,
    written: usize,
    inbuf: Vec<u8>,
    in_flight: Option<(Kind, Instant)>,
    waiting_to_write: bool,
    /// Re-opened before its next request ([`Progress::redraw`]).
    redraw: bool,
}

struct Generator<'a> {
    spec: &'a LoadSpec,
    epoll: Epoll,
    connections: Vec<Connection>,
    /// Connections without a request in flight: a stack or a queue ([`Pool`]).
    idle: VecDeque<usize>,
    pool: Pool,
    rng: Rng,
    value: Vec<u8>,
    report: LoadReport,
    issued: u64,
}

impl Generator<'_> {
    fn send(&mut self, index: usize) -> anyhow::Result<()> {
        if std::mem::take(&mut self.connections[index].redraw) {
            self.reopen(index)?;
        }
        let roll = self.rng.next();
        let kind = if (roll % 100) < self.spec.workload.set_percent as u64 {
            Kind::Set
        } else {
            Kind::Get
        };
        let key_index = ((roll >> 8) % self.spec.workload.keys as u64) as u32;
        let connection = &mut self.connections[index];
        connection.out.clear();
        connection.written = 0;
        write_request(&mut connection.out, kind, key_index, &self.value);
        connection.in_flight = Some((kind, Instant::now()));
        self.issued += 1;
        self.flush(index)
    }

    fn next_idle(&mut self) -> Option<usize> {
        match self.pool {
            Pool::Stack => self.idle.pop_back(),
            Pool::RoundRobin => self.idle.pop_front(),
        }
    }

    /// Memcached closed connection `index` (EOF, or a reset): fatal for [`Pool::Stack`];
    /// otherwise counted, and the connection re-opened in its place.
    fn closed_by_server(&mut self, index: usize, why: &str) -> anyhow::Result<()> {
        if self.pool == Pool::Stack {
            bail!("memcached closed connection {index} ({why})");
        }
        self.report.server_closes += 1;
        self.reopen(index)?;
        let connection = &mut self.connections[index];
        if connection.in_flight.take().is_some() {
            self.report.lost_in_flight += 1;
            self.idle.push_back(index);
        }
        Ok(())
    }

    /// Connection `index` replaced by a new one to the same server, its buffers cleared.
    fn reopen(&mut self, index: usize) -> anyhow::Result<()> {
        let stream = connect(self.spec.target)?;
        stream.set_nonblocking(true)?;
        self.epoll.control(
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            index as u64,
            libc::EPOLLIN as u32,
        )?;
        let connection = &mut self.connections[index];
        // Dropping the old stream closes it, which also takes it out of the epoll set.
        connection.stream = stream;
        connection.out.clear();
        connection.written = 0;
        connection.inbuf.clear();
        connection.waiting_to_write = false;
        Ok(())
    }

    fn flush(&mut self, index: usize) -> anyhow::Result<()> {
        let connection = &mut self.connections[index];
        while connection.written < connection.out.len() {
            match connection
                .stream
                .write(&connection.out[connection.written..])
            {
                Ok(0) => return self.closed_by_server(index, "write returned 0"),
                Ok(n) => connection.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if is_reset(&err) => return self.closed_by_server(index, "reset"),
                Err(err) => return Err(err).context("write to memcached"),
            }
        }
        let want_write = connection.written < connection.out.len();
        if want_write != connection.waiting_to_write {
            let events = libc::EPOLLIN as u32 | if want_write { libc::EPOLLOUT as u32 } else { 0 };
            self.epoll.control(
                libc::EPOLL_CTL_MOD,
                connection.stream.as_raw_fd(),
                index as u64,
                events,
            )?;
            connection.waiting_to_write = want_write;
        }
        Ok(())
    }

    /// Reads once (epoll is level-triggered, so a partial answer wakes us again; reading until
    /// EAGAIN would add a syscall per request); returns whether the request completed.
    fn receive(&mut self, index: usize, scratch: &mut [u8]) -> anyhow::Result<bool> {
        let connection = &mut self.connections[index];
        match connection.stream.read(scratch) {
            Ok(0) => return self.closed_by_server(index, "EOF").map(|()| false),
            Ok(n) => connection.inbuf.extend_from_slice(&scratch[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(false)
            }
            Err(err) if is_reset(&err) => {
                return self.closed_by_server(index, "reset").map(|()| false)
            }
            Err(err) => return Err(err).context("read from memcached"),
        }
        let Some((kind, sent)) = connection.in_flight else {
            if connection.inbuf.is_empty() {
                return Ok(false);
            }
            bail!("memcached sent bytes nobody asked for on connection {index}");
        };
        match parse_response(&connection.inbuf, kind)
            .with_context(|| format!("memcache answer on connection {index}"))?
        {
            Parsed::Incomplete => Ok(false),
            Parsed::Complete { consumed, ok } => {
                connection.inbuf.drain(..consumed);
                connection.in_flight = None;
                self.report.latency.record(sent.elapsed().as_nanos() as u64);
                self.report.ops += 1;
                self.report.ops_per_connection[index] += 1;
                if !ok {
                    self.report.errors += 1;
                }
                Ok(true)
            }
        }
    }
}

fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to memcached at {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Runs one bounded load against `spec.target`; connection setup is not timed.
pub fn run(spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    run_pool(spec, Pool::Stack)
}

/// Shared with a generator started by [`run_continuous`]: the ops answered so far (read at any
/// moment by another thread, so windows can be cut out of one unbroken run), the generator
/// thread's id (for its CPU time) and the flag that ends the run.
#[derive(Debug, Default)]
pub struct Progress {
    pub ops: AtomicU64,
    /// The generator thread's kernel id (gettid), 0 until it runs.
    pub tid: AtomicU64,
    pub stop: AtomicBool,
    /// Raised to have every connection re-opened before its next request: a fresh set of
    /// connections is a fresh draw of the ones an agent's capture sample follows.
    pub redraw: AtomicU64,
}

/// [`run`] without a deadline: the load goes on until `progress.stop` is set (or the
/// [`MAX_OPS_PER_RUN`] ceiling), counting every answer in `progress.ops` as it comes.
pub fn run_continuous(spec: &LoadSpec, progress: &Progress) -> anyhow::Result<LoadReport> {
    // SAFETY: gettid has no preconditions.
    progress
        .tid
        .store(unsafe { libc::gettid() } as u64, Ordering::Relaxed);
    run_with(spec, Pool::Stack, Some(progress))
}

impl<'a> Generator<'a> {
    /// Opens `spec.connections` connections (non-blocking, registered with a new epoll), all
    /// idle.
    fn open(spec: &'a LoadSpec, pool: Pool) -> anyhow::Result<Generator<'a>> {
        let epoll = Epoll::new().context("epoll_create1")?;
        let mut connections = Vec::with_capacity(spec.connections);
        for index in 0..spec.connections {
            let stream = connect(spec.target)?;
            stream.set_nonblocking(true)?;
            epoll.control(
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                index as u64,
                libc::EPOLLIN as u32,
            )?;
            connections.push(Connection {
                stream,
                out: Vec::with_capacity(spec.workload.value_len + 64),
                written: 0,
                inbuf: Vec::with_capacity(spec.workload.value_len + 64),
                in_flight: None,
                waiting_to_write: false,
                redraw: false,
            });
        }
        Ok(Generator {
            spec,
            epoll,
            idle: (0..connections.len()).rev().collect(),
            pool,
            connections,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            value: vec![b'v'; spec.workload.value_len],
            report: LoadReport {
                ops: 0,
                errors: 0,
                elapsed: Duration::ZERO,
                latency: Histogram::default(),
                ops_per_connection: vec![0; spec.connections],
                server_closes: 0,
                lost_in_flight: 0,
            },
            issued: 0,
        })
    }
}

/// [`run`], with the connections used as `pool` says.
pub fn run_pool(spec: &LoadSpec, pool: Pool) -> anyhow::Result<LoadReport> {
    run_with(spec, pool, None)
}

/// The generator loop: until `spec.duration` is over, or with `progress` until its stop flag.
fn run_with(
    spec: &LoadSpec,
    pool: Pool,
    progress: Option<&Progress>,
) -> anyhow::Result<LoadReport> {
    let running = |now: Instant, deadline: Instant| match progress {
        Some(progress) => !progress.stop.load(Ordering::Relaxed),
        None => now < deadline,
    };
    let mut generator = Generator::open(spec, pool)?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut scratch = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut drawn = 0;
    loop {
        let now = Instant::now();
        if !running(now, deadline) || generator.issued >= MAX_OPS_PER_RUN || interrupted() {
            break;
        }
        if let Some(progress) = progress {
            let redraw = progress.redraw.load(Ordering::Relaxed);
            if redraw != drawn {
                drawn = redraw;
                for connection in &mut generator.connections {
                    connection.redraw = true;
                }
            }
        }
        let due = match spec.rate {
            None => u64::MAX,
            Some(rate) => {
                let should = (now.duration_since(start).as_secs_f64() * rate as f64) as u64;
                should.saturating_sub(generator.issued)
            }
        };
        let mut sent = 0;
        while sent < due {
            let Some(index) = generator.next_idle() else {
                break;
            };
            generator.send(index)?;
            sent += 1;
        }
        // Open loop wakes every millisecond to release what fell due; requests go out in
        // per-millisecond bursts, which is as smooth as epoll's timeout allows.
        let timeout_ms = if spec.rate.is_some() { 1 } else { 100 };
        let ready = generator.epoll.wait(&mut events, timeout_ms)?;
        for event in &events[..ready] {
            let index = event.u64 as usize;
            if event.events & (libc::EPOLLOUT as u32) != 0 {
                generator.flush(index)?;
            }
            if event.events & ((libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32) != 0
                && generator.receive(index, &mut scratch)?
            {
                if let Some(progress) = progress {
                    progress.ops.fetch_add(1, Ordering::Relaxed);
                }
                if spec.rate.is_none() && running(Instant::now(), deadline) {
                    generator.send(index)?;
                } else {
                    generator.idle.push_back(index);
                }
            }
        }
    }
    generator.report.elapsed = start.elapsed();
    if interrupted() {
        bail!("interrupted");
    }
    Ok(generator.report)
}

/// Stores every key once so gets hit, with pipelined sets on one blocking connection.
pub fn populate(target: SocketAddr, workload: &Workload) -> anyhow::Result<()> {
    let mut stream = connect(target)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let value = vec![b'v'; workload.value_len];
    let mut out = Vec::new();
    let mut inbuf = Vec::new();
    let mut scratch = vec![0u8; 64 * 1024];
    const BATCH: u32 = 100;
    for first in (0..workload.keys).step_by(BATCH as usize) {
        let last = (first + BATCH).min(workload.keys);
        out.clear();
        for key_index in first..last {
            write_request(&mut out, Kind::Set, key_index, &value);
        }
        stream.write_all(&out).context("populating memcached")?;
        let mut answered = 0;
        while answered < last - first {
            match parse_response(&inbuf, Kind::Set)? {
                Parsed::Complete { consumed, ok } => {
                    if !ok {
                        bail!("memcached refused to store a bench key");
                    }
                    inbuf.drain(..consumed);
                    answered += 1;
                }
                Parsed::Incomplete => {
                    let n = stream.read(&mut scratch).context("populating memcached")?;
                    if n == 0 {
                        bail!("memcached closed the connection while populating");
                    }
                    inbuf.extend_from_slice(&scratch[..n]);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_answers() {
        assert_eq!(
            parse_response(b"STORED\r\n", Kind::Set),
            Ok(Parsed::Complete {
                consumed: 8,
                ok: true
            })
        );
        assert_eq!(
            parse_response(b"NOT_STORED\r\nSTORED\r\n", Kind::Set),
            Ok(Parsed::Complete {
                consumed: 12,
                ok: false
            })
        );
        assert_eq!(parse_response(b"STOR", Kind::Set), Ok(Parsed::Incomplete));
        assert!(parse_response(b"VALUE x 0 1\r\n", Kind::Set).is_err());
    }

    #[test]
    fn get_hit_needs_the_whole_value_and_end() {
        let full = b"VALUE bench:00000001 0 3\r\nabc\r\nEND\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], Kind::Get),
                Ok(Parsed::Incomplete),
                "cut at {cut}"
            );
        }
        assert_eq!(
            parse_response(full, Kind::Get),
            Ok(Parsed::Complete {
                consumed: full.len(),
                ok: true
            })
        );
    }

    #[test]
    fn value_containing_crlf_and_end_is_skipped_by_length() {
        let full = b"VALUE k 0 7\r\nEND\r\nxx\r\nEND\r\n";
        assert_eq!(
            parse_response(full, Kind::Get),
            Ok(Parsed::Complete {
                consumed: full.len(),
                ok: true
            })
        );
    }

    #[test]
    fn get_miss_and_errors() {
        assert_eq!(
            parse_response(b"END\r\n", Kind::Get),
            Ok(Parsed::Complete {
                consumed: 5,
                ok: true
            })
        );
        assert_eq!(
            parse_response(b"SERVER_ERROR out of memory\r\n", Kind::Get),
            Ok(Parsed::Complete {
                consumed: 28,
                ok: false
            })
        );
        assert_eq!(
            parse_response(b"VALUE k 0 3\r\nabcXY", Kind::Get),
            Err(ProtocolError::BadValueEnd)
        );
        assert!(matches!(
            parse_response(b"HELLO\r\n", Kind::Get),
            Err(ProtocolError::Unexpected(_))
        ));
        assert!(matches!(
            parse_response(b"VALUE k 0 notanumber\r\n", Kind::Get),
            Err(ProtocolError::Unexpected(_))
        ));
    }

    #[test]
    fn requests_are_well_formed() {
        let mut out = Vec::new();
        write_request(&mut out, Kind::Get, 42, b"");
        assert_eq!(out, b"get cacheprobe:bench:00000042\r\n");
        out.clear();
        write_request(&mut out, Kind::Set, 7, b"xyz");
        assert_eq!(out, b"set cacheprobe:bench:00000007 0 0 3\r\nxyz\r\n");
    }

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut previous_upper = None;
        for index in 0..Histogram::index(1 << 40) {
            let upper = Histogram::upper_bound(index);
            if let Some(previous) = previous_upper {
                assert_eq!(
                    Histogram::index(previous + 1),
                    index,
                    "value after bucket {} must open bucket {index}",
                    index - 1
                );
            }
            assert_eq!(Histogram::index(upper), index);
            previous_upper = Some(upper);
        }
        for value in [200u64, 1_000, 12_345, 999_999, 50_000_000] {
            let upper = Histogram::upper_bound(Histogram::index(value));
            assert!(upper >= value);
            assert!(
                (upper - value) as f64 <= value as f64 / 60.0,
                "{value} -> {upper}"
            );
        }
        assert_eq!(
            Histogram::index(u64::MAX),
            Histogram::default().counts.len() - 1
        );
    }

    #[test]
    fn quantiles() {
        let mut histogram = Histogram::default();
        assert_eq!(histogram.quantile(0.99), None);
        for value in 1..=100u64 {
            histogram.record(value * 1000);
        }
        let p50 = histogram.quantile(0.5).unwrap();
        let p99 = histogram.quantile(0.99).unwrap();
        assert!((50_000..=50_800).contains(&p50), "{p50}");
        assert!((99_000..=100_600).contains(&p99), "{p99}");
        assert!(histogram.quantile(1.0).unwrap() >= 100_000);
        assert_eq!(histogram.total, 100);
    }

    /// Memcached's idle timeout against a pool: used as a stack at a light rate, the pool keeps
    /// to one connection and memcached closes the others, which ended the soak at 891 s; round
    /// robin uses every connection in turn, and a connection closed anyway (a rate too low for
    /// the timeout) is re-opened and counted, and the run goes on.
    #[test]
    fn round_robin_keeps_the_pool_busy_and_reopens_what_memcached_closes() -> anyhow::Result<()> {
        let port = super::super::procs::free_port(17_950)?;
        let memcached =
            super::super::procs::Memcached::start_with(port, None, &["-o", "idle_timeout=1"])?;
        let spec = |rate| LoadSpec {
            target: memcached.addr,
            connections: 8,
            duration: Duration::from_secs(4),
            rate: Some(rate),
            workload: WORKLOAD,
        };
        let busy = run_pool(&spec(40), Pool::RoundRobin)?;
        assert_eq!(busy.server_closes, 0, "{busy:?}");
        assert!(
            busy.ops_per_connection.iter().all(|&ops| ops >= 15),
            "{:?}",
            busy.ops_per_connection
        );
        let stack = run_pool(&spec(40), Pool::Stack).expect_err("memcached closes idle ones");
        assert!(
            format!("{stack:#}").contains("memcached closed connection"),
            "{stack:#}"
        );
        let sparse = run_pool(&spec(2), Pool::RoundRobin)?;
        assert!(sparse.server_closes > 0, "{sparse:?}");
        assert_eq!((sparse.errors, sparse.lost_in_flight), (0, 0));
        assert_eq!(sparse.ops, sparse.ops_per_connection.iter().sum::<u64>());
        Ok(())
    }

    /// A redraw re-opens every connection of a continuous load once, between requests: none
    /// lost, no error, and the load goes on.
    #[test]
    fn a_redraw_opens_every_connection_again_once() -> anyhow::Result<()> {
        let port = super::super::procs::free_port(17_960)?;
        let memcached = super::super::procs::Memcached::start_with(port, None, &[])?;
        let spec = LoadSpec {
            target: memcached.addr,
            connections: 4,
            duration: Duration::from_secs(60),
            rate: None,
            workload: WORKLOAD,
        };
        let progress = Progress::default();
        let after = |ops: u64| -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while progress.ops.load(Ordering::Relaxed) < ops {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the load stalled below {ops} ops"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        };
        let (opened, report) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let generator = scope.spawn(|| run_continuous(&spec, &progress));
            let measured = (|| -> anyhow::Result<u64> {
                after(200)?;
                // memcached's count of connections ever opened (the asking one included).
                let before = memcached.stat("total_connections")?;
                progress.redraw.fetch_add(1, Ordering::Relaxed);
                after(progress.ops.load(Ordering::Relaxed) + 2_000)?;
                Ok(memcached.stat("total_connections")? - before)
            })();
            progress.stop.store(true, Ordering::Relaxed);
            let report = generator.join().expect("generator thread")?;
            Ok((measured?, report))
        })?;
        // Four re-opened, and the second stats connection.
        assert_eq!(opened, 4 + 1);
        assert_eq!(
            (report.errors, report.lost_in_flight, report.server_closes),
            (0, 0, 0)
        );
        Ok(())
    }
}
