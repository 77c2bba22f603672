//! The steps every measure shares: agent configs and starts, one measured load run (with the
//! agent's CPU and how busy everything else was), waiting for a quiet machine, printing a section.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    loadgen::{self, LoadReport, LoadSpec, WORKLOAD},
    observe,
    procs::{self, Agent, Memcached, Mode},
    report::Section,
    Bench, DEFAULT_MAX_SOCKETS, QUIET_CORES,
};

/// One measured load run against a running (or absent) agent.
pub(super) struct Measured {
    pub(super) load: LoadReport,
    pub(super) agent_cpu: Option<f64>,
    /// Cores' worth of user CPU used by unrelated processes during the run: noise indicator.
    pub(super) other_cores: f64,
}

impl Measured {
    pub(super) fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.agent_cpu?;
        (self.load.ops > 0).then(|| cpu / (self.load.ops as f64 / 1e6))
    }
}

pub(super) fn format_cpu(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.3}"))
}

impl Bench {
    pub(super) fn spec(
        &self,
        target: SocketAddr,
        rate: Option<u64>,
        duration: Duration,
    ) -> LoadSpec {
        LoadSpec {
            target,
            connections: if rate.is_some() {
                self.plan.open_loop_connections
            } else {
                self.plan.saturation_connections
            },
            duration,
            rate,
            workload: WORKLOAD,
        }
    }

    pub(super) fn config_path(&self, mode: Mode) -> PathBuf {
        self.scratch.join(match mode {
            Mode::Off => "agent-off.toml",
            Mode::SocketsOnly => "agent-sockets.toml",
            Mode::Capture => "agent-capture.toml",
            Mode::CaptureAll => "agent-capture-all.toml",
            Mode::SocketsOnlyPortCheck => "agent-sockets-port-check.toml",
            Mode::CapturePortCheck => "agent-capture-port-check.toml",
        })
    }

    pub(super) fn start_agent(
        &self,
        port: u16,
        mode: Mode,
        max_sockets: u32,
    ) -> anyhow::Result<Agent> {
        self.start_agent_on(&[port], mode, max_sockets)
    }

    pub(super) fn start_agent_on(
        &self,
        ports: &[u16],
        mode: Mode,
        max_sockets: u32,
    ) -> anyhow::Result<Agent> {
        self.start_binary_on(&self.binary, ports, mode, max_sockets)
    }

    /// [`Bench::start_agent_on`] with another build of the agent (`--baseline`).
    pub(super) fn start_binary_on(
        &self,
        binary: &Path,
        ports: &[u16],
        mode: Mode,
        max_sockets: u32,
    ) -> anyhow::Result<Agent> {
        let path = self.config_path(mode);
        std::fs::write(&path, procs::agent_config(ports, mode, max_sockets))?;
        Agent::start(binary, &path, self.metrics_addr)
    }

    /// [`Bench::start_binary_on`] capturing at `budget` records per second instead of the
    /// default decoding budget (`--budgets`).
    pub(super) fn start_capture_at(
        &self,
        binary: &Path,
        ports: &[u16],
        budget: u32,
    ) -> anyhow::Result<Agent> {
        let config = procs::agent_config(ports, Mode::Capture, DEFAULT_MAX_SOCKETS);
        // agent_config ends in its [limits] table.
        self.start_with(
            binary,
            &format!("agent-capture-{budget}.toml"),
            &format!("{config}capture_records_per_second = {budget}\n"),
        )
    }

    /// [`Bench::start_binary_on`] sockets only, with `limits.socket_probes_on_demand` (the
    /// agent's default, which the sockets-only arms turn off).
    pub(super) fn start_sockets_on_demand(
        &self,
        binary: &Path,
        ports: &[u16],
    ) -> anyhow::Result<Agent> {
        let config = procs::agent_config(ports, Mode::SocketsOnly, DEFAULT_MAX_SOCKETS)
            .replace(procs::ALWAYS_ATTACHED, "");
        self.start_with(binary, "agent-sockets-on-demand.toml", &config)
    }

    /// Starts the agent with `config`, written to `file` in the scratch directory.
    fn start_with(&self, binary: &Path, file: &str, config: &str) -> anyhow::Result<Agent> {
        let path = self.scratch.join(file);
        std::fs::write(&path, config)?;
        Agent::start(binary, &path, self.metrics_addr)
    }

    pub(super) fn agent_command(&self, mode: Mode) -> String {
        format!(
            "{} run --config {} --listen {}",
            self.binary.display(),
            self.config_path(mode).display(),
            self.metrics_addr
        )
    }

    /// Runs `spec` and records the agent's CPU and how busy everything else on the machine was
    /// (user CPU of processes other than this one, `server_pid` and the agent).
    pub(super) fn measure(
        &self,
        spec: &LoadSpec,
        agent: Option<&mut Agent>,
        server: &Memcached,
    ) -> anyhow::Result<Measured> {
        let server_pid = server.pid();
        let agent_pid = agent.as_ref().map(|a| a.pid());
        let ours = || -> anyhow::Result<f64> {
            let mut total =
                procs::user_seconds(std::process::id())? + procs::user_seconds(server_pid)?;
            if let Some(pid) = agent_pid {
                total += procs::user_seconds(pid)?;
            }
            Ok(total)
        };
        let machine_before = procs::machine_user_seconds()?;
        let ours_before = ours()?;
        let cpu_before = agent_pid.map(procs::cpu_seconds).transpose()?;
        let load = loadgen::run(spec).with_context(|| {
            // memcached's own view usually says why it dropped a client.
            let stats = [
                "curr_connections",
                "total_connections",
                "rejected_connections",
                "conn_yields",
            ]
            .iter()
            .map(|name| {
                format!(
                    "{name}={}",
                    server.stat(name).map_or("?".into(), |v| v.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
            format!(
                "load against {}: {} (memcached stats: {stats})",
                spec.target,
                spec.describe()
            )
        })?;
        let cpu_after = agent_pid.map(procs::cpu_seconds).transpose()?;
        let ours_after = ours()?;
        let machine_after = procs::machine_user_seconds()?;
        if let Some(agent) = agent {
            agent.check_running()?;
        }
        if load.ops == 0 {
            bail!(
                "the load generator completed no operation against {}",
                spec.target
            );
        }
        let others = ((machine_after - machine_before) - (ours_after - ours_before)).max(0.0);
        Ok(Measured {
            other_cores: others / load.elapsed.as_secs_f64().max(1e-3),
            load,
            agent_cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        })
    }

    /// Before a measured run: wait (bounded) for other work and other tracers to go away.
    pub(super) fn wait_for_quiet(&self, agent: Option<&Agent>) -> anyhow::Result<procs::Quiet> {
        let own = match agent {
            Some(agent) => procs::bpf_object_ids(agent.pid())?.0,
            None => Vec::new(),
        };
        if self.plan.quiet_wait.is_zero() {
            // Quick runs do not wait, but still say whether someone else was tracing.
            let foreign = observe::foreign_tracing_programs(&own)?;
            return Ok(procs::Quiet {
                waited: Duration::ZERO,
                busy_cores: 0.0,
                foreign_programs: foreign,
                quiet: foreign == 0,
            });
        }
        procs::wait_for_quiet(QUIET_CORES, &own, self.plan.quiet_wait)
    }

    pub(super) fn finish(&mut self, section: Section) {
        println!("\n{}", section.markdown());
        self.sections.push(section);
    }
}
