//! BPF time per memcache get with framing-aware capture, by keys per get and value size
//! (issue 17): whether the kernel's cost per op stays flat as values grow.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    floor::EmptyPrograms,
    observe,
    procs::{self, Memcached, Mode, SysctlGuard},
    report::{thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};

/// (keys per get, value bytes): the grid of issue 17.
const GRID: &[(usize, usize)] = &[
    (1, 100),
    (10, 100),
    (100, 100),
    (1, 10_000),
    (10, 10_000),
    (100, 10_000),
    (1, 500_000),
    (10, 500_000),
    (100, 500_000),
];

/// The smoke run's part of [`GRID`]: one of each kind, to keep CI's `--quick` short.
const QUICK_GRID: &[(usize, usize)] = &[(1, 100), (10, 100), (1, 500_000)];

/// Reply bytes a scenario moves at most (so 100 x 500 KB gets stay a few seconds).
const BYTES_PER_SCENARIO: usize = 512 << 20;

fn read_until(stream: &mut TcpStream, end: &[u8], buf: &mut [u8]) -> anyhow::Result<usize> {
    // Values are all b'v', so `end` can only appear at the end of the reply.
    let mut total = 0usize;
    let mut tail: Vec<u8> = Vec::with_capacity(end.len() * 2);
    loop {
        let n = stream.read(buf).context("reading from memcached")?;
        if n == 0 {
            bail!("memcached closed the connection");
        }
        total += n;
        tail.extend_from_slice(&buf[n.saturating_sub(end.len())..n]);
        if tail.len() > end.len() {
            tail.drain(..tail.len() - end.len());
        }
        if tail == end {
            return Ok(total);
        }
    }
}

/// A connection to memcached and its reply buffer.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Bench {
    pub(super) fn frame_cost(&mut self) -> anyhow::Result<()> {
        crate::util::step("frame cost: BPF ns per get by keys per get and value size");
        // Its own memcached: 500 KB values need room that the A/B server's working set has not.
        let memcached = Memcached::start(procs::free_port(17700)?, None)?;
        // Beside ours on the same tracepoints: what any program costs per run at that point.
        // Attached first, so it runs first: a cold cache after a large copy hits it, not only us.
        let floor = EmptyPrograms::attach(&["sock_send_length", "sock_recv_length"])?;
        let mut agent =
            self.start_agent(memcached.addr.port(), Mode::CaptureAll, DEFAULT_MAX_SOCKETS)?;
        let (programs, _) = procs::bpf_object_ids(agent.pid())?;
        let measured: Vec<u32> = programs.iter().chain(&floor.ids).copied().collect();
        let stream = TcpStream::connect(memcached.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut client = Client {
            stream,
            buf: vec![0u8; 1 << 20],
        };
        let gets_cap = if self.quick { 50 } else { 2_000 };
        let mut table = Table::new(&[
            "keys per get",
            "value bytes",
            "gets",
            "BPF ns per get (both ends)",
            "program runs per get",
            "ns per program run",
            "empty program: ns per get",
            "reply bytes per get",
        ]);
        let mut per_get: Vec<(usize, usize, f64, f64)> = Vec::new();
        let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        let grid = if self.quick { QUICK_GRID } else { GRID };
        for &(keys, size) in grid {
            let row = client.grid_row(&measured, &floor.ids, keys, size, gets_cap, &mut per_get)?;
            table.row(row);
        }
        agent.check_running()?;
        agent.stop()?;

        let flat = self.flatness(&per_get);
        let mut section =
            Section::new("Framing-aware capture: BPF time per get by keys and value size");
        section.say(format!(
            "Issue 17. A fresh agent watches a memcached of its own with capture on and no \
             decoding budget (`capture_records_per_second = 0`: every op followed) and \
             `kernel.bpf_stats_enabled=1` for the whole measure. One blocking client stores the \
             keys, then sends the same `get` back to back (at most {gets_cap} gets, fewer for \
             large replies); BPF time is the run time of the send/receive programs only. Both \
             ends are on this host, so one get is seen by at least four program runs (more when \
             a large reply is sent or read in several calls). Value bodies are never copied or \
             scanned, only frame headers, so the cost per get should not grow with the value \
             size; the second table says whether it does. The machine is shared: a program run \
             can be preempted, which inflates single figures; compare within a table. An empty \
             program is attached to the same two tracepoints before the agent starts (so it runs \
             first on each call), measured in the same gets: its growth is what larger replies \
             do to any program here (more send/receive calls per get, caches the kernel's copy \
             of megabytes of values has left cold), not work of ours."
        ));
        section.command(format!(
            "{}\n{}   # capture on, capture_records_per_second = 0\nsysctl -w kernel.bpf_stats_enabled=1",
            memcached.command_line,
            self.agent_command(Mode::CaptureAll)
        ));
        section.table("", table);
        section.table(
            "Flat in value size? (ratio of BPF ns per get, 500 KB over 100 B values)",
            flat,
        );
        self.finish(section);
        Ok(())
    }

    /// The second table: BPF ns per get at 500 KB over 100 B values, per keys per get, and
    /// the same for the empty program; records the ratios for the targets.
    fn flatness(&mut self, per_get: &[(usize, usize, f64, f64)]) -> Table {
        let mut flat = Table::new(&[
            "keys per get",
            "ns per get at 100 B",
            "at 500 KB",
            "500 KB / 100 B",
            "empty program: 500 KB / 100 B",
        ]);
        for keys in [1, 10, 100] {
            let at = |size| {
                per_get
                    .iter()
                    .find(|(k, s, _, _)| *k == keys && *s == size)
                    .map(|(_, _, ns, floor)| (*ns, *floor))
            };
            if let (Some((small, small_floor)), Some((large, large_floor))) = (at(100), at(500_000))
            {
                flat.row(vec![
                    keys.to_string(),
                    thousands(small),
                    thousands(large),
                    format!("{:.2}", large / small.max(1.0)),
                    format!("{:.2}", large_floor / small_floor.max(1.0)),
                ]);
                self.targets.frame_flatness.push((
                    keys,
                    large / small.max(1.0),
                    large_floor / small_floor.max(1.0),
                ));
            }
        }
        flat
    }
}

impl Client {
    /// Stores `keys` values of `size` bytes, then sends the same get of all of them back to
    /// back; pushes (keys, size, BPF ns per get, empty program's ns per get) to `per_get` and
    /// returns the table row.
    fn grid_row(
        &mut self,
        measured: &[u32],
        floor_ids: &[u32],
        keys: usize,
        size: usize,
        gets_cap: usize,
        per_get: &mut Vec<(usize, usize, f64, f64)>,
    ) -> anyhow::Result<Vec<String>> {
        let Client { stream, buf } = self;
        let value = vec![b'v'; size];
        let names: Vec<String> = (0..keys).map(|i| format!("fc{i}")).collect();
        for name in &names {
            let mut set = format!("set {name} 0 0 {size}\r\n").into_bytes();
            set.extend_from_slice(&value);
            set.extend_from_slice(b"\r\n");
            stream.write_all(&set)?;
            read_until(stream, b"STORED\r\n", buf)?;
        }
        let request = format!("get {}\r\n", names.join(" ")).into_bytes();
        let reply_bytes = keys * (size + 20);
        let gets = (BYTES_PER_SCENARIO / reply_bytes).clamp(20, gets_cap);
        let before = observe::program_stats(measured)?;
        let started = Instant::now();
        let mut received = 0;
        for _ in 0..gets {
            stream.write_all(&request)?;
            received += read_until(stream, b"END\r\n", buf)?;
        }
        let elapsed = started.elapsed();
        let after = observe::program_stats(measured)?;
        let (floor_ns, _) = observe::run_deltas(&before, &after, |id, _| floor_ids.contains(&id));
        let (ns, runs) = observe::run_deltas(&before, &after, |id, stats| {
            !floor_ids.contains(&id)
                && (stats.name.ends_with("sock_send_length")
                    || stats.name.ends_with("sock_recv_length"))
        });
        let ns_per_get = ns as f64 / gets as f64;
        let floor_per_get = floor_ns as f64 / gets as f64;
        per_get.push((keys, size, ns_per_get, floor_per_get));
        eprintln!(
            "xtask: {keys} keys x {size} B: {gets} gets in {:.1} s, {ns_per_get:.0} BPF ns per get",
            elapsed.as_secs_f64()
        );
        Ok(vec![
            keys.to_string(),
            thousands(size as f64),
            gets.to_string(),
            thousands(ns_per_get),
            format!("{:.1}", runs as f64 / gets as f64),
            format!("{:.0}", ns as f64 / runs.max(1) as f64),
            thousands(floor_per_get),
            thousands(received as f64 / gets as f64),
        ])
    }
}
