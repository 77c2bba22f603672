//! The agent's cost with many open watched connections: CPU while its samples catch up, idle
//! CPU, RSS, then a fixed-rate load on top (the connections are held by [`super::idle`]).

use std::time::{Duration, Instant};

use super::{
    harness::format_cpu,
    idle,
    loadgen::{self, WORKLOAD},
    observe,
    procs::{self, Agent, Memcached, Mode},
    report::{megabytes, thousands, Section, Table},
    targets::IdleFinding,
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

/// How long the agent is measured idle with many open connections: two of its default /proc
/// sampling intervals, so a window neither always catches nor always misses a sample.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// How long the agent's samples may take to catch up after a burst of connections before the
/// bench measures it idle anyway (and says so).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// How the agent caught up after the connections opened.
struct CatchUp {
    /// Whether a sample begun after the burst postponed nothing within [`CATCH_UP_LIMIT`].
    caught_up: bool,
    seconds: f64,
    cpu_percent: f64,
}

impl Bench {
    pub(super) fn idle_connections(&mut self) -> anyhow::Result<()> {
        util::step("agent cost with many open watched connections");
        let largest = self.plan.idle_counts.iter().copied().max().unwrap_or(0);
        // Each memcached and each holder process stays within this process's fd limit.
        let per_process = (self.nofile as usize)
            .saturating_sub(2_000)
            .clamp(1_000, 25_000);
        let mut instances: Vec<Memcached> = Vec::new();
        let mut port = 17400;
        for _ in 0..largest.div_ceil(per_process).max(1) {
            port = procs::free_port(port + 1)?;
            instances.push(Memcached::start(port, Some(per_process as u32 + 1_000))?);
        }
        loadgen::populate(instances[0].addr, &WORKLOAD)?;
        let mut table = Table::new(&[
            "open connections",
            "memcached instances",
            "time to open s",
            "memcached curr_connections",
            "agent connections_active",
            "agent RSS MB (idle)",
            "agent catch-up s",
            "agent CPU % (catching up)",
            "agent CPU % (idle)",
            "achieved ops/s",
            "agent CPU s/Mops",
            "agent RSS MB (after load)",
            "agent peak RSS MB",
            "events lost",
            "max_sockets",
        ]);
        for &count in self.plan.idle_counts {
            table.row(self.idle_row(&instances, per_process, count)?);
            // Give the memcached instances a moment to close their ends.
            procs::sleep(Duration::from_secs(1))?;
        }
        let mut section = Section::new("Agent cost with many open watched connections");
        section.say(format!(
            "For each count a fresh agent (capture on, one service per memcached instance, \
             `limits.max_sockets` sized for both ends of every connection) watches memcached \
             instances started with `-c`; RLIMIT_NOFILE here is {} and cannot be raised without \
             CAP_SYS_RESOURCE, so at most {} connections go to each instance, each held by its own \
             helper process (`xtask bench-hold`, connecting from 127.0.0.2 onwards). After opening, \
             the bench waits 2 s, then measures the agent's CPU while it catches up: its /proc \
             samples (every 5 s) list the new sockets and walk the fds of the processes that \
             changed, at most 50,000 descriptors per sample, until a sample begun after the \
             burst postpones nothing (`cacheprobe_sampler_processes_deferred` 0; `catch-up s` is \
             how long that took). Then it measures the agent idle over {window} s, two sampling \
             intervals, so a periodic sample is averaged in rather than caught or missed. Then it \
             drives {} ops/s ({}) over {} more connections to the first instance for {:.0} s. CPU \
             s/Mops is the agent's \
             utime+stime over that load divided by the operations. `connections_active` counts \
             both ends of each connection (the memcached side and the client side are both on \
             this host).",
            self.nofile,
            thousands(per_process as f64),
            thousands(self.plan.fixed_rate as f64),
            WORKLOAD.describe(),
            self.plan.open_loop_connections,
            self.plan.run.as_secs_f64(),
            window = IDLE_WINDOW.as_secs(),
        ));
        let mut commands = String::new();
        for memcached in &instances {
            commands.push_str(&memcached.command_line);
            commands.push('\n');
        }
        commands.push_str(&format!(
            "{}   # one [[services]] per instance, max_sockets per row",
            self.agent_command(Mode::Capture)
        ));
        section.command(commands);
        section.table("", table);
        if let Some(first) = instances.first() {
            self.memcached_lines.push(first.command_line.clone());
        }
        drop(instances);
        self.finish(section);
        Ok(())
    }

    /// One count of connections: a fresh agent watches them open, catch up and idle, then a
    /// fixed-rate load runs on top; records the idle finding (and the RSS at 100k).
    fn idle_row(
        &mut self,
        instances: &[Memcached],
        per_process: usize,
        count: usize,
    ) -> anyhow::Result<Vec<String>> {
        let load_target = instances[0].addr;
        let used = count.div_ceil(per_process).max(1);
        let per_instance = count.div_ceil(used);
        let ports: Vec<u16> = instances[..used].iter().map(|m| m.addr.port()).collect();
        eprintln!("xtask: {count} idle connections over {used} memcached instance(s)");
        let max_sockets = max_sockets_for(count);
        let mut agent = self.start_agent_on(&ports, Mode::Capture, max_sockets)?;
        let before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
        let opening = Instant::now();
        let holders =
            idle::Holders::open(&loopback(&ports), per_instance, Duration::from_secs(300))?;
        let open_seconds = opening.elapsed().as_secs_f64();
        // Let the agent drain the burst of state changes. Its samples then list every new
        // socket and walk the fds of every process that changed, at most
        // MAX_FDS_WALKED_PER_SAMPLE descriptors per sample: CPU while catching up is
        // measured until a sample begun after the burst postponed nothing, idle CPU after.
        procs::sleep(Duration::from_secs(2))?;
        let catch_up = catch_up(&agent)?;
        let cpu_idle_start = procs::cpu_seconds(agent.pid())?;
        procs::sleep(IDLE_WINDOW)?;
        let idle_percent =
            100.0 * (procs::cpu_seconds(agent.pid())? - cpu_idle_start) / IDLE_WINDOW.as_secs_f64();
        let idle_memory = procs::memory(agent.pid())?;
        let mut server_connections = 0;
        for memcached in &instances[..used] {
            server_connections += memcached.stat("curr_connections")?;
        }
        let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
        let active = observe::total(&samples, "cacheprobe_connections_active");
        let spec = self.spec(load_target, Some(self.plan.fixed_rate), self.plan.run);
        let measured = self.measure(&spec, Some(&mut agent), &instances[0])?;
        procs::sleep(Duration::from_millis(1500))?;
        let after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
        let memory = procs::memory(agent.pid())?;
        if count == 100_000 {
            self.targets.rss_at_100k = Some(memory);
        }
        let lost = observe::format_losses(&observe::lost_between(&before, &after));
        self.targets.idle = Some(IdleFinding {
            connections: per_instance * used,
            settling_cpu_percent: catch_up.cpu_percent,
            catch_up_seconds: catch_up.seconds,
            idle_cpu_percent: idle_percent,
            memory,
            active,
            lost: lost.clone(),
        });
        agent.stop()?;
        drop(holders);
        Ok(vec![
            thousands((per_instance * used) as f64),
            used.to_string(),
            format!("{open_seconds:.1}"),
            thousands(server_connections as f64),
            thousands(active),
            idle_memory.describe(),
            if catch_up.caught_up {
                format!("{:.0}", catch_up.seconds)
            } else {
                format!("not within {} s", CATCH_UP_LIMIT.as_secs())
            },
            format!("{:.1}", catch_up.cpu_percent),
            format!("{idle_percent:.1}"),
            thousands(measured.load.ops_per_sec()),
            format_cpu(measured.cpu_per_million()),
            memory.describe(),
            megabytes(memory.hwm_kb),
            lost,
            max_sockets.to_string(),
        ])
    }
}

/// Both ends of every connection are watched sockets, plus room for the load's own.
fn max_sockets_for(count: usize) -> u32 {
    ((2 * count + 16_384) as u32)
        .next_power_of_two()
        .max(DEFAULT_MAX_SOCKETS)
}

fn loopback(ports: &[u16]) -> Vec<std::net::SocketAddrV4> {
    ports
        .iter()
        .map(|port| std::net::SocketAddrV4::new([127, 0, 0, 1].into(), *port))
        .collect()
}

/// Waits until a sample begun after the burst postponed nothing (at most [`CATCH_UP_LIMIT`]),
/// measuring the agent's CPU meanwhile.
fn catch_up(agent: &Agent) -> anyhow::Result<CatchUp> {
    let sampler_state = |agent: &Agent| -> anyhow::Result<(f64, f64)> {
        let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
        Ok((
            observe::total(&samples, "cacheprobe_sampler_samples_total"),
            observe::total(&samples, "cacheprobe_sampler_processes_deferred"),
        ))
    };
    let catch_up_start = Instant::now();
    let cpu_start = procs::cpu_seconds(agent.pid())?;
    let (samples_at_start, _) = sampler_state(agent)?;
    let caught_up = loop {
        let (samples, deferred) = sampler_state(agent)?;
        if samples >= samples_at_start + 2.0 && deferred == 0.0 {
            break true;
        }
        if catch_up_start.elapsed() > CATCH_UP_LIMIT {
            break false;
        }
        procs::sleep(Duration::from_millis(500))?;
    };
    let catch_up_seconds = catch_up_start.elapsed().as_secs_f64();
    let settling_percent =
        100.0 * (procs::cpu_seconds(agent.pid())? - cpu_start) / catch_up_seconds;
    Ok(CatchUp {
        caught_up,
        seconds: catch_up_seconds,
        cpu_percent: settling_percent,
    })
}
