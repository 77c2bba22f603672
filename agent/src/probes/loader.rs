//! Loads the kernel object, hands it the discovered layouts, attaches what this kernel supports
//! and exposes the maps. Degrades per probe: a missing tracepoint costs the metrics that need
//! it, never the whole agent.

use std::collections::BTreeMap;

use agent_common::{counter, ProbeOffsets, ServiceIndex, OFFSET_UNKNOWN};
use anyhow::Context as _;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};

use crate::config::Config;

/// The kernel object built by agent/build.rs, embedded so the binary is self-contained.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cacheprobe"));

/// One attachable program: the function name in agent-ebpf and its tracepoint.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub program: &'static str,
    pub category: &'static str,
    pub event: &'static str,
    /// What the user loses when it cannot attach.
    pub impact: &'static str,
}

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "inet_sock_set_state",
        category: "sock",
        event: "inet_sock_set_state",
        impact: "no connection lifecycle: opened/closed/active, closed_by, durations",
    },
    ProbeSpec {
        program: "sock_send_length",
        category: "sock",
        event: "sock_send_length",
        impact: "no send activity stamps: idle-before-close counts from the open; dead-socket writes not seen",
    },
    ProbeSpec {
        program: "sock_recv_length",
        category: "sock",
        event: "sock_recv_length",
        impact: "no receive activity stamps: idle-before-close counts from the open",
    },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeStatus {
    Attached,
    /// Not attempted: the kernel lacks what it needs (reason given).
    Unavailable(String),
    /// Attempted and failed (error given).
    Failed(String),
}

impl ProbeStatus {
    pub fn is_attached(&self) -> bool {
        matches!(self, ProbeStatus::Attached)
    }
}

pub struct Probes {
    // Dropping `ebpf` detaches every program and frees the maps; nothing is pinned, so a crash
    // leaves nothing behind either.
    ebpf: Ebpf,
    pub status: BTreeMap<&'static str, ProbeStatus>,
    events: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
}

impl Probes {
    pub fn load(config: &Config, offsets: &ProbeOffsets) -> anyhow::Result<Probes> {
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", offsets, true)
            .map_max_entries("SOCKETS", config.limits.max_sockets)
            .map_max_entries("EVENTS", config.limits.ring_buffer_bytes)
            .load(KERNEL_OBJECT)
            .context("loading the kernel programs failed (is this root, or does it have CAP_BPF and CAP_PERFMON?)")?;

        let mut status = BTreeMap::new();
        for spec in PROBES {
            let outcome = match missing_offsets(spec, offsets) {
                Some(reason) => ProbeStatus::Unavailable(reason),
                None => match attach(&mut ebpf, spec) {
                    Ok(()) => ProbeStatus::Attached,
                    Err(err) => ProbeStatus::Failed(format!("{err:#}")),
                },
            };
            match &outcome {
                ProbeStatus::Attached => tracing::debug!(probe = spec.event, "attached"),
                ProbeStatus::Unavailable(reason) | ProbeStatus::Failed(reason) => tracing::warn!(
                    probe = spec.event,
                    reason = reason.as_str(),
                    impact = spec.impact,
                    "probe not attached"
                ),
            }
            status.insert(spec.program, outcome);
        }

        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .context("kernel object has no EVENTS map")?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .context("kernel object has no COUNTERS map")?,
        )?;
        let mut probes = Probes {
            ebpf,
            status,
            events: Some(events),
            counters,
        };
        probes.set_watched_ports(config)?;
        Ok(probes)
    }

    /// The ring buffer of socket events; taken once by whoever reads it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn any_attached(&self) -> bool {
        self.status.values().any(ProbeStatus::is_attached)
    }

    /// Replaces the watched-port set (used at start and on config reload).
    pub fn set_watched_ports(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut ports: BpfHashMap<_, u16, ServiceIndex> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("WATCHED_PORTS")
                .context("kernel object has no WATCHED_PORTS map")?,
        )?;
        let stale: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        for port in stale {
            if config.service_for_port(port).is_none() {
                ports.remove(&port)?;
            }
        }
        for (index, service) in config.services.iter().enumerate() {
            ports
                .insert(service.port, index as ServiceIndex, 0)
                .with_context(|| format!("cannot watch port {}", service.port))?;
        }
        Ok(())
    }

    /// Totals of the kernel's loss counters since load: (ring buffer full, socket map full).
    pub fn kernel_losses(&self) -> anyhow::Result<(u64, u64)> {
        let sum =
            |index: u32| -> anyhow::Result<u64> { Ok(self.counters.get(&index, 0)?.iter().sum()) };
        Ok((sum(counter::RINGBUF_FULL)?, sum(counter::SOCKET_MAP_FULL)?))
    }
}

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .with_context(|| format!("kernel object has no program {}", spec.program))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("verifier rejected {}", spec.program))?;
    program.attach(spec.category, spec.event).with_context(|| {
        format!(
            "cannot attach to tracepoint {}/{}",
            spec.category, spec.event
        )
    })?;
    Ok(())
}

/// A program whose tracepoint fields were not found must not run: it would read garbage.
fn missing_offsets(spec: &ProbeSpec, offsets: &ProbeOffsets) -> Option<String> {
    let required: &[u16] = match spec.program {
        "inet_sock_set_state" => &[
            offsets.state_skaddr,
            offsets.state_oldstate,
            offsets.state_newstate,
            offsets.state_sport,
            offsets.state_dport,
            offsets.state_family,
            offsets.state_protocol,
        ],
        _ => &[offsets.len_sk, offsets.len_protocol, offsets.len_ret],
    };
    required.contains(&OFFSET_UNKNOWN).then(|| {
        format!(
            "tracepoint {}/{} or its fields are not available on this kernel",
            spec.category, spec.event
        )
    })
}
