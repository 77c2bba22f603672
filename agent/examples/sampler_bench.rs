//! Measures the wall time of one /proc sample with many open loopback connections.
//!
//!   cargo run --release -p cacheprobe --example sampler_bench -- \
//!       [connections=10000] [listen ports=1] [idle processes=0] [samples=10]
//!
//! A child process (this binary with `--serve`) listens on loopback ports and holds the accepted
//! ends; this process holds the client ends; so the host has 2 x connections watched sockets in
//! two processes. Idle `sleep` processes stand in for a busy host's process count. Everything
//! stays on 127.0.0.1 and is torn down at exit. Raising the fd limit past the hard limit needs
//! root (CAP_SYS_RESOURCE).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cacheprobe::host::{Sampler, SamplerConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        let connections: u64 = args.get(1).context("--serve needs a count")?.parse()?;
        let ports: usize = args.get(2).context("--serve needs a port count")?.parse()?;
        return serve(connections, ports);
    }
    let number = |index: usize, default: u64| -> Result<u64> {
        Ok(match args.get(index) {
            Some(text) => text.parse().with_context(|| format!("argument {text:?}"))?,
            None => default,
        })
    };
    let connections = number(0, 10_000)?;
    let port_count = number(1, 1)?.max(1) as usize;
    let idle_processes = number(2, 0)?;
    let samples = number(3, 10)?.max(1);
    raise_nofile(connections + 1024)?;

    let mut server = Command::new(std::env::current_exe()?)
        .args(["--serve", &connections.to_string(), &port_count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = run(
        &mut server,
        connections,
        port_count,
        idle_processes,
        samples,
    );
    // Closing stdin tells the server to exit; kill it by its own handle if it does not.
    drop(server.stdin.take());
    if server.wait_timeout_secs(5).is_none() {
        let _ = server.kill();
        let _ = server.wait();
    }
    result
}

fn run(
    server: &mut Child,
    connections: u64,
    port_count: usize,
    idle_processes: u64,
    samples: u64,
) -> Result<()> {
    let mut ports_line = String::new();
    BufReader::new(server.stdout.as_mut().context("server stdout")?).read_line(&mut ports_line)?;
    let ports: Vec<u16> = ports_line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("server ports")?;
    if ports.len() != port_count {
        bail!("server announced {ports_line:?}");
    }

    // Before any client socket exists: a child forked from a process with 10k descriptors keeps
    // a 10k-slot descriptor table after exec, which makes every readdir of its /proc/<pid>/fd
    // walk those slots: real, but not what an ordinary idle process costs.
    let mut idle: Vec<Child> = Vec::new();
    for _ in 0..idle_processes {
        idle.push(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()?,
        );
    }

    let started = Instant::now();
    let mut clients = Vec::with_capacity(connections as usize);
    for index in 0..connections as usize {
        let port = ports[index % ports.len()];
        clients.push(
            TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect #{index}"))?,
        );
    }
    eprintln!(
        "opened {connections} connections in {:?}",
        started.elapsed()
    );

    let watched: BTreeMap<u16, String> = ports
        .iter()
        .map(|&port| (port, "bench".to_string()))
        .collect();
    let mut sampler = Sampler::new(SamplerConfig::new(watched, 32));
    // Wait until the server has accepted everything, so the numbers describe a steady state.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snapshot = sampler.sample()?;
        let queued: u64 = snapshot
            .listeners
            .iter()
            .map(|l| u64::from(l.queue_len))
            .sum();
        let owned: u64 = snapshot
            .processes
            .iter()
            .flat_map(|p| p.connections.values())
            .sum();
        if queued == 0 && owned == 2 * connections {
            break;
        }
        if Instant::now() > deadline {
            bail!("server did not accept everything: queued {queued}, owned {owned}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut durations = Vec::new();
    let mut last = None;
    // CPU time is steadier than wall time on a machine shared with other work.
    let cpu_before = own_cpu_time();
    for _ in 0..samples {
        let snapshot = sampler.sample()?;
        durations.push(snapshot.duration);
        last = Some(snapshot);
    }
    let cpu_per_sample = (own_cpu_time() - cpu_before) / samples as u32;
    let started = Instant::now();
    let (_, listed) = sampler.sample_with_connections()?;
    let with_connections = started.elapsed();
    durations.sort();
    let snapshot = last.context("at least one sample")?;
    println!(
        "connections={connections} watched_sockets={} listeners={} processes_seen={} netns={} owning_processes={} errors={:?}",
        snapshot.connections_by_service["bench"],
        snapshot.listeners.len(),
        snapshot.processes_seen,
        snapshot.network_namespaces,
        snapshot.processes.len(),
        snapshot.errors,
    );
    println!("phases of the last sample: {:?}", snapshot.phases);
    // Baseline: the kernel's cost of producing the tables, without any parsing.
    let started = Instant::now();
    let mut rows = 0usize;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        rows += BufReader::with_capacity(256 * 1024, std::fs::File::open(table)?)
            .split(b'\n')
            .count()
            - 1;
    }
    println!(
        "raw read of tcp+tcp6 ({rows} rows, watched or not): {:?}",
        started.elapsed()
    );
    println!(
        "sample wall time over {samples} samples: min {:?} median {:?} max {:?}; CPU (user+sys) per sample {:?}; with connection listing ({} rows): {:?}",
        durations[0],
        durations[durations.len() / 2],
        durations[durations.len() - 1],
        cpu_per_sample,
        listed.len(),
        with_connections,
    );
    for mut child in idle {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(clients);
    Ok(())
}

/// The server side: listens on `ports` loopback ports, accepts `connections`, holds them until
/// stdin closes.
fn serve(connections: u64, ports: usize) -> Result<()> {
    raise_nofile(connections + 1024)?;
    let listeners: Vec<TcpListener> = (0..ports)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    for listener in &listeners {
        // std listens with a backlog of 128; a burst of connects overflows that and each
        // dropped SYN costs the client a 1 s retransmit. listen() again just resizes the queue.
        // SAFETY: listen(2) on a descriptor the listener owns.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let mut line = String::new();
    for listener in &listeners {
        line.push_str(&format!("{} ", listener.local_addr()?.port()));
    }
    println!("{}", line.trim_end());
    std::io::stdout().flush()?;
    let per_port = connections.div_ceil(ports as u64);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let expected = per_port.min(connections.saturating_sub(per_port * index as u64));
            std::thread::spawn(move || -> std::io::Result<(TcpListener, Vec<TcpStream>)> {
                let streams = (0..expected)
                    .map(|_| listener.accept().map(|(stream, _)| stream))
                    .collect::<std::io::Result<_>>()?;
                // Keep the listener open: a real server does, and the sample should see it.
                Ok((listener, streams))
            })
        })
        .collect();
    let mut held = Vec::new();
    for handle in handles {
        held.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("accept thread panicked"))??,
        );
    }
    // Block until the parent closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}

fn own_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; a zeroed rusage is a valid initial value.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn raise_nofile(wanted: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if limit.rlim_cur >= wanted {
            return Ok(());
        }
        limit.rlim_cur = wanted;
        limit.rlim_max = limit.rlim_max.max(wanted);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("raising RLIMIT_NOFILE (run as root for many connections)");
        }
    }
    Ok(())
}

trait WaitTimeout {
    fn wait_timeout_secs(&mut self, seconds: u64) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout_secs(&mut self, seconds: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}
