//! Loads the kernel object, hands it the discovered layouts, attaches what this kernel supports
//! and exposes the maps. Degrades per probe: a missing tracepoint costs the metrics that need
//! it, never the whole agent.

use std::collections::BTreeMap;

use agent_common::{
    wakeup, watch, KernelCounter, ProbeOffsets, SampledCalls, OFFSET_UNKNOWN, SAMPLED_CALLS_ENTRIES,
};
use anyhow::Context as _;
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        raw_trace_point::RawTracePointLinkId, tp_btf::BtfTracePointLinkId,
        trace_point::TracePointLinkId, BtfTracePoint, Iter, RawTracePoint, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};

use crate::config::Config;

use super::{
    offsets::Resolution,
    probes::{
        capture_status, is_fd_exhaustion_probe, is_perf_event_refusal, missing_offsets,
        perf_event_paranoid, perf_event_refused, AttachKind, ProbeSpec, ProbeStatus,
        FD_RAW_PROGRAM, FD_RAW_TRACEPOINT, PAYLOAD_CAPTURE, PERF_PARANOID_FIX, PROBES,
        STORAGE_PROGRAMS,
    },
};

/// Size of the payload ring (the kernel object's default; not configurable yet). At the default
/// capture length a memcache request/response pair takes about 900 bytes of it, so 16 MiB holds
/// some 18,000 operations: ~180 ms of a reader stall at 100k ops/s.
/// The payload ring when no service captures: nothing is written to it, so the smallest size
/// the config allows keeps it from costing memory.
const IDLE_PAYLOAD_RING_BYTES: u32 = 1 << 16;

/// The kernel object built by agent/build.rs, embedded so the binary is self-contained.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cacheprobe"));

/// Why a bpf()-link or raw variant was not used when `limits.classic_tracepoints` is set.
const FORCED_CLASSIC: &str = "off in the config (limits.classic_tracepoints = true)";

pub struct Probes {
    // Dropping `ebpf` detaches every program and frees the maps; nothing is pinned, so a crash
    // leaves nothing behind either.
    ebpf: Ebpf,
    pub status: BTreeMap<&'static str, ProbeStatus>,
    /// Whether the payload ring was sized for capture at load (a service captured then).
    pub capture_sized: bool,
    events: Option<RingBuf<MapData>>,
    payloads: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// Ports currently marked in WATCHED_PORTS, to unmark on reload.
    watched_ports: Vec<u16>,
    /// Probes (by classic program name) running as their raw-tracepoint variant.
    pub raw: Vec<&'static str>,
    /// Probes (by classic program name) running as their tp_btf variant (not counting the
    /// send/receive probes of the socket-storage path).
    pub btf: Vec<&'static str>,
    /// Probes (by classic program name) with a bpf()-link variant that is not used here, and
    /// why: they fall back to their classic tracepoint, which perf_event_paranoid may refuse.
    pub link_fallback: BTreeMap<&'static str, String>,
    /// Whether the send/receive probes keep per-socket state in socket-local storage (tp_btf),
    /// or why not (then they run as raw or classic tracepoints).
    pub socket_storage: Result<(), String>,
    /// The EMFILE/ENFILE probes' links (see [`Probes::set_fd_exhaustion_armed`]).
    fd: FdProbes,
    /// The socket-storage path's send and receive links while attached (see
    /// [`Probes::set_length_probes_armed`]), each None while detached or off that path.
    length_links: [Option<BtfTracePointLinkId>; 2],
}

/// How the EMFILE/ENFILE probes are attached, and which links are up now.
enum FdProbes {
    /// One raw `sys_exit` program ([`FD_RAW_PROGRAM`]) for all of them; its link while armed.
    Raw(Option<RawTracePointLinkId>),
    /// Their classic tracepoints: the links of those attached, and those loaded but detached.
    Classic {
        attached: Vec<(&'static ProbeSpec, TracePointLinkId)>,
        detached: Vec<&'static ProbeSpec>,
    },
}

impl Probes {
    pub fn load(config: &Config, resolution: &Resolution) -> anyhow::Result<Probes> {
        let offsets = &resolution.offsets;
        let capture_len = if config.any_captured() {
            config.limits.capture_bytes
        } else {
            0
        };
        let mut ebpf = load_object(config, offsets, capture_len)?;

        // The reason every bpf()-link and raw variant is skipped, when the config forces the
        // classic tracepoints (the path of kernels without BTF).
        let forced_classic = config.limits.classic_tracepoints.then_some(FORCED_CLASSIC);
        let storage = match forced_classic {
            Some(reason) => Err(reason.to_owned()),
            None => socket_storage_path(config, &mut ebpf, offsets),
        };
        let (socket_storage, length_links) = match storage {
            Ok([send, recv]) => (Ok(()), [Some(send), Some(recv)]),
            Err(reason) => (Err(reason), [None, None]),
        };
        // The kernel's BTF as aya reads it, for the tp_btf programs; read once, if any can run.
        let kernel_btf = (forced_classic.is_none() && resolution.links.values().any(Result::is_ok))
            .then(|| Btf::from_sys_fs().map_err(|err| format!("kernel BTF unreadable: {err}")));
        // The fd probes' raw sys_exit program: attached once here, for all of them.
        let fd_raw = match resolution.links.get(FD_RAW_TRACEPOINT) {
            _ if forced_classic.is_some() => Err(FORCED_CLASSIC.to_owned()),
            Some(Ok(())) => attach_raw(&mut ebpf, FD_RAW_PROGRAM, FD_RAW_TRACEPOINT)
                .map_err(|err| format!("raw tracepoint {FD_RAW_TRACEPOINT}: {err:#}")),
            Some(Err(reason)) => Err(reason.clone()),
            None => Err("not resolved".to_owned()),
        };
        let context = AttachContext {
            resolution,
            kernel_btf,
            fd_raw: fd_raw.as_ref().map(|_| ()).map_err(Clone::clone),
            socket_storage: socket_storage.is_ok(),
            forced_classic,
        };
        let mut attached = Attachments::default();
        for spec in PROBES {
            attached.attach(&mut ebpf, spec, &context);
        }
        warn_if_perf_events_refused(&attached.refused);

        let mut status = attached.status;
        let capture_status = capture_status(capture_len, offsets, &status);
        status.insert(PAYLOAD_CAPTURE, capture_status);

        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .context("kernel object has no EVENTS map")?,
        )?;
        let payloads = RingBuf::try_from(
            ebpf.take_map("PAYLOADS")
                .context("kernel object has no PAYLOADS map")?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .context("kernel object has no COUNTERS map")?,
        )?;
        let mut probes = Probes {
            ebpf,
            status,
            capture_sized: capture_len != 0,
            events: Some(events),
            payloads: Some(payloads),
            counters,
            watched_ports: Vec::new(),
            raw: attached.raw,
            btf: attached.btf,
            link_fallback: attached.link_fallback,
            socket_storage,
            fd: match fd_raw {
                Ok(link) => FdProbes::Raw(Some(link)),
                Err(_) => FdProbes::Classic {
                    attached: attached.fd_links,
                    detached: Vec::new(),
                },
            },
            length_links,
        };
        probes.set_watched_ports(config)?;
        Ok(probes)
    }

    /// How `spec` was attached (or, if it failed, was attempted) by this load.
    pub fn attach_kind(&self, spec: &ProbeSpec) -> AttachKind {
        let storage =
            self.socket_storage.is_ok() && STORAGE_PROGRAMS.iter().any(|&(p, _)| p == spec.program);
        if storage || self.btf.contains(&spec.program) {
            AttachKind::Btf
        } else if self.raw.contains(&spec.program) {
            AttachKind::Raw
        } else {
            AttachKind::Classic
        }
    }

    /// The ring buffer of socket events; taken once by whoever reads it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The ring buffer of captured payloads; taken once by whoever reads it.
    pub fn take_payloads(&mut self) -> Option<RingBuf<MapData>> {
        self.payloads.take()
    }

    pub fn any_attached(&self) -> bool {
        self.status.values().any(ProbeStatus::is_attached)
    }

    /// Replaces the watched-port set (used at start and on config reload).
    pub fn set_watched_ports(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut ports: Array<_, u8> = Array::try_from(
            self.ebpf
                .map_mut("WATCHED_PORTS")
                .context("kernel object has no WATCHED_PORTS map")?,
        )?;
        let wanted = watched_port_bits(config);
        for &port in &self.watched_ports {
            if !wanted.iter().any(|&(p, _)| p == port) {
                ports.set(u32::from(port), 0, 0)?;
            }
        }
        for &(port, bits) in &wanted {
            ports
                .set(u32::from(port), bits, 0)
                .with_context(|| format!("cannot watch port {port}"))?;
        }
        self.watched_ports = wanted.into_iter().map(|(port, _)| port).collect();
        if self.socket_storage.is_ok() {
            // Connections to newly watched ports that already exist get their storage now;
            // those opened from here on get it at their first state change.
            if let Err(err) = self.adopt_existing() {
                tracing::warn!(
                    error = format!("{err:#}"),
                    impact = "connections opened before now are not seen until they reconnect",
                    "adopting existing connections into socket-local storage failed"
                );
            }
        }
        Ok(())
    }

    /// Runs the `adopt_tcp` iterator once over every TCP socket (see agent-ebpf).
    fn adopt_existing(&mut self) -> anyhow::Result<()> {
        let iter: &mut Iter = self
            .ebpf
            .program_mut("adopt_tcp")
            .context("kernel object has no program adopt_tcp")?
            .try_into()?;
        let link_id = iter.attach().context("cannot attach the tcp iterator")?;
        let link = iter.take_link(link_id)?;
        let mut file = link.into_file()?;
        // The program writes nothing; reading to the end is what walks the sockets.
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut sink).context("tcp iterator read failed")?;
        Ok(())
    }

    /// Attaches (armed) or detaches the EMFILE/ENFILE syscall probes. Only probes that
    /// attached at load take part; they stay loaded, so re-attaching needs no verifier run.
    pub fn set_fd_exhaustion_armed(&mut self, armed: bool) -> anyhow::Result<()> {
        let (fd_links, fd_detached) = match &mut self.fd {
            FdProbes::Raw(link) => {
                let program: &mut RawTracePoint = self
                    .ebpf
                    .program_mut(FD_RAW_PROGRAM)
                    .with_context(|| format!("kernel object has no program {FD_RAW_PROGRAM}"))?
                    .try_into()?;
                match (armed, link.take()) {
                    (true, None) => {
                        *link = Some(program.attach(FD_RAW_TRACEPOINT).with_context(|| {
                            format!("cannot attach to raw tracepoint {FD_RAW_TRACEPOINT}")
                        })?)
                    }
                    (false, Some(up)) => program
                        .detach(up)
                        .with_context(|| format!("cannot detach {FD_RAW_PROGRAM}"))?,
                    (_, unchanged) => *link = unchanged,
                }
                return Ok(());
            }
            FdProbes::Classic { attached, detached } => (attached, detached),
        };
        if armed {
            while let Some(spec) = fd_detached.pop() {
                match attach(&mut self.ebpf, spec) {
                    Ok(link) => fd_links.push((spec, link)),
                    Err(err) => {
                        fd_detached.push(spec);
                        return Err(err);
                    }
                }
            }
        } else {
            while let Some((spec, link)) = fd_links.pop() {
                let program: &mut TracePoint = self
                    .ebpf
                    .program_mut(spec.program)
                    .with_context(|| format!("kernel object has no program {}", spec.program))?
                    .try_into()?;
                program
                    .detach(link)
                    .with_context(|| format!("cannot detach {}", spec.program))?;
                fd_detached.push(spec);
            }
        }
        Ok(())
    }

    /// Whether the EMFILE/ENFILE probes are attached now.
    pub fn fd_exhaustion_armed(&self) -> bool {
        match &self.fd {
            FdProbes::Raw(link) => link.is_some(),
            FdProbes::Classic { attached, .. } => !attached.is_empty(),
        }
    }

    /// Attaches (armed) or detaches the socket-storage path's send and receive programs. They
    /// stay loaded, so attaching again needs no verifier run. Only on that path: elsewhere the
    /// programs are always attached, and this says why not.
    pub fn set_length_probes_armed(&mut self, armed: bool) -> anyhow::Result<()> {
        if let Err(reason) = &self.socket_storage {
            anyhow::bail!(
                "send/receive probes stay attached off the socket-storage path: {reason}"
            );
        }
        if !armed && self.length_links.iter().any(Option::is_some) {
            self.mark_length_probes_detached(true)?;
        }
        // One program at a time, each link kept as it is: a failure part way leaves the
        // state true (never a program attached twice on the next try).
        for (slot, &(_, name)) in STORAGE_PROGRAMS.iter().enumerate() {
            let program: &mut BtfTracePoint = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("kernel object has no program {name}"))?
                .try_into()?;
            match (armed, self.length_links[slot].take()) {
                (true, None) => {
                    self.length_links[slot] = Some(
                        program
                            .attach()
                            .with_context(|| format!("cannot attach {name} again"))?,
                    );
                }
                (false, Some(link)) => program
                    .detach(link)
                    .with_context(|| format!("cannot detach {name}"))?,
                (_, unchanged) => self.length_links[slot] = unchanged,
            }
        }
        if armed {
            self.mark_length_probes_detached(false)?;
        }
        Ok(())
    }

    /// Tells the kernel whether the send/receive programs are off (see LENGTH_PROBES_DETACHED):
    /// marked before they come off and cleared once they are on, so no peer close in between
    /// waits for the ring's timer.
    fn mark_length_probes_detached(&mut self, detached: bool) -> anyhow::Result<()> {
        let mut flag: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut("LENGTH_PROBES_DETACHED")
                .context("kernel object has no LENGTH_PROBES_DETACHED map")?,
        )?;
        flag.set(0, u32::from(detached), 0)?;
        Ok(())
    }

    pub fn length_probes_armed(&self) -> bool {
        self.socket_storage.is_err() || self.length_links.iter().all(Option::is_some)
    }

    /// Whether the capture sample can take effect: the programs tell a healthy connection (the
    /// only kind they sample) from one in trouble by the kernel's own activity stamps, which
    /// need the tcp_sock layout and the tick length.
    pub fn can_sample_capture(offsets: &ProbeOffsets) -> bool {
        offsets.tcp_lsndtime != OFFSET_UNKNOWN
            && offsets.tcp_lrcvtime != OFFSET_UNKNOWN
            && ns_per_jiffy() != 0
    }

    /// Why the send/receive programs must stay attached here even with nothing captured
    /// (`limits.socket_probes_on_demand`); None when they may come off. They may when the
    /// kernel tells a healthy connection apart without them (socket-local storage and the
    /// activity stamps) and a write in the moment before they are back is still counted
    /// (the write sequence number the state-change program notes). `run` applies this and
    /// `check` reports it.
    pub fn on_demand_blocker(&self, offsets: &ProbeOffsets) -> Option<String> {
        if let Err(reason) = &self.socket_storage {
            return Some(format!("needs socket-local storage ({reason})"));
        }
        if !Self::can_sample_capture(offsets) {
            return Some(
                "the kernel's activity stamps (tcp_sock lsndtime, icsk_ack.lrcvtime) or its \
                 tick length are unknown: healthy connections need the programs to tell them \
                 apart"
                    .into(),
            );
        }
        if offsets.tcp_write_seq == OFFSET_UNKNOWN {
            return Some(
                "tcp_sock write_seq is unknown: a write in the moment before the programs are \
                 back would go uncounted"
                    .into(),
            );
        }
        None
    }

    /// Each service slot follows one healthy captured connection in 2^`shifts[slot]` from now
    /// on (see [`agent_common::capture_sample`]; slot 0: services past the 63rd). All entries
    /// are written (64 updates, only when a sample changes): no copy of the kernel's to drift.
    pub fn set_capture_sample_shifts(&mut self, shifts: &[u32]) -> anyhow::Result<()> {
        let mut sample: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut("CAPTURE_SAMPLE_SHIFT")
                .context("kernel object has no CAPTURE_SAMPLE_SHIFT map")?,
        )?;
        for (slot, &shift) in shifts.iter().enumerate() {
            sample
                .set(slot as u32, shift, 0)
                .with_context(|| format!("cannot set the capture sample of slot {slot}"))?;
        }
        Ok(())
    }

    /// Totals since load of [`SampledCalls`] by `SAMPLED_CALLS` index (summed over CPUs).
    /// Errs on an object without the map: the agent then scales by 2^shift.
    pub fn sampled_calls(&self) -> anyhow::Result<Vec<SampledCalls>> {
        let calls: PerCpuArray<_, SampledCalls> = PerCpuArray::try_from(
            self.ebpf
                .map("SAMPLED_CALLS")
                .context("kernel object has no SAMPLED_CALLS map")?,
        )?;
        (0..SAMPLED_CALLS_ENTRIES)
            .map(|index| {
                let per_cpu = calls.get(&index, 0)?;
                Ok(per_cpu
                    .iter()
                    .fold(SampledCalls::default(), |sum, cpu| SampledCalls {
                        seen: sum.seen.wrapping_add(cpu.seen),
                        followed: sum.followed.wrapping_add(cpu.followed),
                    }))
            })
            .collect()
    }

    /// Cumulative run time and run count per loaded program (kernel bpf_stats; zero unless
    /// `kernel.bpf_stats_enabled` is 1).
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_string(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Totals of the kernel's loss counters since load, by `events_lost_total` source.
    pub fn kernel_losses(&self) -> anyhow::Result<[(&'static str, u64); 6]> {
        let sum = |counter: KernelCounter| -> anyhow::Result<u64> {
            Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
        };
        Ok([
            ("ringbuf", sum(KernelCounter::RingbufFull)?),
            ("socket_map", sum(KernelCounter::SocketMapFull)?),
            ("payload_ringbuf", sum(KernelCounter::PayloadRingbufFull)?),
            ("uncaptured_syscall", sum(KernelCounter::UncapturedSyscall)?),
            ("capture_incomplete", sum(KernelCounter::CaptureIncomplete)?),
            ("frame_map", sum(KernelCounter::FrameMapFull)?),
        ])
    }
}

/// The WATCHED_PORTS value for each configured port: watch bits and the service's slot in
/// SAMPLED_CALLS ([`watch::slot_of_position`]). Two services on one port (rejected by the config,
/// but cheap to be safe about) capture if either does and keep the first one's slot.
fn watched_port_bits(config: &Config) -> Vec<(u16, u8)> {
    let mut bits: Vec<(u16, u8)> = Vec::new();
    for (position, service) in config.services.iter().enumerate() {
        let flags = watch::WATCHED | if service.capture { watch::CAPTURE } else { 0 };
        let slot = (watch::slot_of_position(position) << watch::SLOT_SHIFT) as u8;
        for &service_port in &service.ports {
            match bits.iter_mut().find(|(port, _)| *port == service_port) {
                Some((_, existing)) => *existing |= flags,
                None => bits.push((service_port, flags | slot)),
            }
        }
    }
    bits
}

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec) -> anyhow::Result<TracePointLinkId> {
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .with_context(|| format!("kernel object has no program {}", spec.program))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("verifier rejected {}", spec.program))?;
    }
    program.attach(spec.category, spec.event).with_context(|| {
        format!(
            "cannot attach to tracepoint {}/{}",
            spec.category, spec.event
        )
    })
}

/// The kernel's tick length: the resolution of CLOCK_MONOTONIC_COARSE, which advances once
/// per jiffy. 0 (the programs then stamp activity themselves) if it looks like no real HZ.
fn ns_per_jiffy() -> u64 {
    let mut resolution = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres only writes the timespec it is given.
    let status = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut resolution) };
    // HZ is between 100 and 1000 on every kernel configuration.
    if status == 0
        && resolution.tv_sec == 0
        && (1_000_000..=10_000_000).contains(&resolution.tv_nsec)
    {
        resolution.tv_nsec as u64
    } else {
        0
    }
}

/// Attaches the socket-local-storage path (issue 19): the tp_btf keeper of the storage on
/// `inet_sock_set_state` first, so no connection opened from then on lacks storage, then the
/// send/receive programs; loads the adoption iterator. All or nothing: on any error what was
/// attached is unloaded and the error (the verifier's or the kernel's) says why.
fn attach_socket_storage(
    ebpf: &mut Ebpf,
    offsets: &ProbeOffsets,
) -> anyhow::Result<[BtfTracePointLinkId; 2]> {
    let layout = &offsets.sock_common;
    if [
        offsets.sock_protocol,
        layout.dport,
        layout.num,
        layout.state,
    ]
    .contains(&OFFSET_UNKNOWN)
    {
        anyhow::bail!(
            "kernel BTF does not give sock.sk_protocol and sock_common's ports and state"
        );
    }
    let btf = Btf::from_sys_fs().context("no kernel BTF (/sys/kernel/btf/vmlinux)")?;
    let programs = [
        ("btf_inet_sock_set_state", "inet_sock_set_state"),
        (STORAGE_PROGRAMS[0].1, "sock_send_length"),
        (STORAGE_PROGRAMS[1].1, "sock_recv_length"),
    ];
    let mut result = Ok(());
    let mut attached = Vec::new();
    let mut links = Vec::new();
    for (program, event) in programs {
        match attach_btf(ebpf, program, event, &btf) {
            Ok(link) => links.push(link),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
        attached.push(program);
    }
    if result.is_ok() {
        result = (|| -> anyhow::Result<()> {
            let iter: &mut Iter = ebpf
                .program_mut("adopt_tcp")
                .context("kernel object has no program adopt_tcp")?
                .try_into()?;
            iter.load("tcp", &btf)
                .context("verifier rejected the tcp iterator adopt_tcp")?;
            Ok(())
        })();
    }
    if result.is_err() {
        for program in attached {
            if let Some(program) = ebpf.program_mut(program) {
                let program: Result<&mut BtfTracePoint, _> = program.try_into();
                if let Ok(program) = program {
                    let _ = program.unload();
                }
            }
        }
    }
    result?;
    // The keeper's link stays with its program for good; the send/receive ones can be armed.
    let [_, send, recv]: [BtfTracePointLinkId; 3] = links
        .try_into()
        .map_err(|_| anyhow::anyhow!("three tp_btf links"))?;
    Ok([send, recv])
}

fn attach_btf(
    ebpf: &mut Ebpf,
    program: &str,
    event: &str,
    btf: &Btf,
) -> anyhow::Result<BtfTracePointLinkId> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("kernel object has no program {program}"))?
        .try_into()?;
    program
        .load(event, btf)
        .with_context(|| format!("tp_btf {event}: not loaded (verifier or kernel BTF)"))?;
    program
        .attach()
        .with_context(|| format!("cannot attach tp_btf {event}"))
}

fn attach_raw(ebpf: &mut Ebpf, program: &str, event: &str) -> anyhow::Result<RawTracePointLinkId> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("kernel object has no program {program}"))?
        .try_into()?;
    program
        .load()
        .context("verifier rejected the raw tracepoint program")?;
    program
        .attach(event)
        .with_context(|| format!("cannot attach to raw tracepoint {event}"))
}

/// Loads the kernel object with this kernel's layouts, the capture length, the rings' sizes
/// and wake-up thresholds and the map sizes from the config.
fn load_object(config: &Config, offsets: &ProbeOffsets, capture_len: u32) -> anyhow::Result<Ebpf> {
    // Socket events are 144-byte records (152 with the ring header), so the default 4 MiB
    // ring holds ~27,500: about 5.5 s of a 100k-connection burst at the ~5,000 connections/s
    // loopback manages (~5 events each). A bigger ring only buys time if the reader keeps up
    // on average, and its data pages count twice in the agent's RSS (they are mapped twice),
    // so the default stays and `limits.ring_buffer_bytes` raises it.
    let events_wakeup_bytes = u64::from(config.limits.ring_buffer_bytes) >> wakeup::THRESHOLD_SHIFT;
    let payload_ring_bytes = if capture_len == 0 {
        IDLE_PAYLOAD_RING_BYTES
    } else {
        config.limits.payload_ring_buffer_bytes
    };
    let payloads_wakeup_bytes = u64::from(payload_ring_bytes) >> wakeup::THRESHOLD_SHIFT;
    EbpfLoader::new()
        .override_global("OFFSETS", offsets, true)
        .override_global("CAPTURE_LEN", &capture_len, true)
        .override_global("EVENTS_WAKEUP_BYTES", &events_wakeup_bytes, true)
        .override_global("NS_PER_JIFFY", &ns_per_jiffy(), true)
        .override_global("PAYLOADS_WAKEUP_BYTES", &payloads_wakeup_bytes, true)
        .map_max_entries("SOCKETS", config.limits.max_sockets)
        .map_max_entries("FRAMES", config.limits.max_sockets)
        .map_max_entries("EVENTS", config.limits.ring_buffer_bytes)
        .map_max_entries("PAYLOADS", payload_ring_bytes)
        .load(KERNEL_OBJECT)
        .context("loading the kernel programs failed (is this root, or does it have CAP_BPF and CAP_PERFMON?)")
}

/// The send/receive probes' socket-local storage path, attached unless the config turns it
/// off; why not otherwise (then they run as raw or classic tracepoints).
fn socket_storage_path(
    config: &Config,
    ebpf: &mut Ebpf,
    offsets: &ProbeOffsets,
) -> Result<[BtfTracePointLinkId; 2], String> {
    if !config.limits.socket_storage {
        return Err("off in the config (limits.socket_storage = false)".into());
    }
    match attach_socket_storage(ebpf, offsets) {
        Ok(links) => Ok(links),
        Err(err) => {
            let reason = format!("{err:#}");
            tracing::info!(
                reason = reason.as_str(),
                "socket-local storage path not available; the send/receive probes \
                 read each socket's ports on every call"
            );
            Err(reason)
        }
    }
}

/// What every probe's attachment may need, found once before the probes are attached.
struct AttachContext<'a> {
    resolution: &'a Resolution,
    /// The kernel's BTF for the tp_btf programs; `None` when no link variant can run.
    kernel_btf: Option<Result<Btf, String>>,
    /// Whether the fd probes' raw `sys_exit` program is attached, or why not.
    fd_raw: Result<(), String>,
    /// Whether the send/receive probes run on the socket-local storage path.
    socket_storage: bool,
    /// Why every bpf()-link and raw variant is skipped (`limits.classic_tracepoints`).
    forced_classic: Option<&'static str>,
}

/// The probes' attachment as [`Probes::load`] goes through them: each one's status and how
/// it runs.
#[derive(Default)]
struct Attachments {
    status: BTreeMap<&'static str, ProbeStatus>,
    /// See [`Probes::raw`], [`Probes::btf`] and [`Probes::link_fallback`].
    raw: Vec<&'static str>,
    btf: Vec<&'static str>,
    link_fallback: BTreeMap<&'static str, String>,
    /// Links of the fd probes attached as classic tracepoints.
    fd_links: Vec<(&'static ProbeSpec, TracePointLinkId)>,
    /// Classic tracepoints refused with EACCES/EPERM: summarised once after the loop.
    refused: Vec<&'static str>,
}

impl Attachments {
    /// Attaches one probe by its cheapest variant this kernel supports: the socket-storage
    /// path, a bpf() link (tp_btf, or the fd probes' raw sys_exit), a raw tracepoint, then the
    /// classic tracepoint.
    fn attach(&mut self, ebpf: &mut Ebpf, spec: &'static ProbeSpec, context: &AttachContext) {
        if context.socket_storage && STORAGE_PROGRAMS.iter().any(|&(p, _)| p == spec.program) {
            self.status.insert(spec.program, ProbeStatus::Attached);
            return;
        }
        if let Some(link_program) = spec.link_program {
            if self.attach_link(ebpf, spec, link_program, context) {
                return;
            }
        }
        if let (Some(_), Some(reason)) = (spec.raw_program, context.forced_classic) {
            // A raw tracepoint is a bpf() link too: `check` names why it is not used.
            self.link_fallback.insert(spec.program, reason.to_owned());
        }
        if let Some(raw_program) = spec.raw_program {
            if context.resolution.offsets.sock_protocol != OFFSET_UNKNOWN
                && context.forced_classic.is_none()
            {
                match attach_raw(ebpf, raw_program, spec.event) {
                    Ok(_) => {
                        tracing::debug!(probe = spec.event, "attached as a raw tracepoint");
                        self.raw.push(spec.program);
                        self.status.insert(spec.program, ProbeStatus::Attached);
                        return;
                    }
                    Err(err) => tracing::warn!(
                        probe = spec.event,
                        error = format!("{err:#}"),
                        "raw tracepoint not attached; using the classic tracepoint, which \
                         costs more per call"
                    ),
                }
            }
        }
        self.attach_classic(ebpf, spec, &context.resolution.offsets);
    }

    /// The probe's bpf()-link variant: true when it runs; otherwise why not is noted for the
    /// classic fallback.
    fn attach_link(
        &mut self,
        ebpf: &mut Ebpf,
        spec: &'static ProbeSpec,
        link_program: &str,
        context: &AttachContext,
    ) -> bool {
        let attached = if is_fd_exhaustion_probe(spec) {
            context.fd_raw.clone()
        } else {
            match (
                context.resolution.links.get(spec.event),
                &context.kernel_btf,
            ) {
                _ if context.forced_classic.is_some() => Err(FORCED_CLASSIC.to_owned()),
                (Some(Ok(())), Some(Ok(btf))) => attach_btf(ebpf, link_program, spec.event, btf)
                    .map(|_| ())
                    .map_err(|err| format!("{err:#}")),
                (Some(Ok(())), Some(Err(reason))) => Err(reason.clone()),
                (Some(Err(reason)), _) => Err(reason.clone()),
                _ => Err("not resolved".to_owned()),
            }
        };
        match attached {
            Ok(()) => {
                tracing::debug!(
                    probe = spec.event,
                    "attached through a bpf() link (no perf_event_open)"
                );
                if is_fd_exhaustion_probe(spec) {
                    self.raw.push(spec.program);
                } else {
                    self.btf.push(spec.program);
                }
                self.status.insert(spec.program, ProbeStatus::Attached);
                true
            }
            Err(reason) => {
                tracing::info!(
                    probe = spec.event,
                    reason = reason.as_str(),
                    "bpf() link variant not used; trying the classic tracepoint \
                     (perf_event_open)"
                );
                self.link_fallback.insert(spec.program, reason);
                false
            }
        }
    }

    /// The probe's classic tracepoint (perf_event_open), unless this kernel lacks the fields
    /// it needs.
    fn attach_classic(
        &mut self,
        ebpf: &mut Ebpf,
        spec: &'static ProbeSpec,
        offsets: &ProbeOffsets,
    ) {
        let outcome = match missing_offsets(spec, offsets) {
            Some(reason) => ProbeStatus::Unavailable(reason),
            None => match attach(ebpf, spec) {
                Ok(link) => {
                    if is_fd_exhaustion_probe(spec) {
                        self.fd_links.push((spec, link));
                    }
                    ProbeStatus::Attached
                }
                Err(err) => {
                    if is_perf_event_refusal(&err) {
                        self.refused.push(spec.event);
                    }
                    match self.link_fallback.get(spec.program) {
                        Some(reason) => ProbeStatus::Failed(format!(
                            "{err:#} (bpf() link variant not used: {reason})"
                        )),
                        None => ProbeStatus::Failed(format!("{err:#}")),
                    }
                }
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
        self.status.insert(spec.program, outcome);
    }
}

/// Says once, with the fix, when classic tracepoints were refused because of
/// perf_event_paranoid.
fn warn_if_perf_events_refused(refused: &[&str]) {
    let paranoid = perf_event_paranoid();
    // Refused at all means this process lacks what the check needs, whatever its caps say.
    if !refused.is_empty() && perf_event_refused(paranoid, false, AttachKind::Classic) {
        tracing::error!(
            perf_event_paranoid = paranoid,
            probes = refused.join(", "),
            fix = PERF_PARANOID_FIX,
            "classic tracepoints refused: this kernel's perf_event_paranoid >= 3 (a Debian \
             patch) refuses perf_event_open to processes without CAP_SYS_ADMIN, which the \
             shipped unit does not grant"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str) -> Config {
        Config::parse(services, "test").expect("test config parses")
    }

    #[test]
    fn watched_port_bits_mark_every_service_and_its_capture_switch() {
        let config = config(
            "[[services]]\nname = \"a\"\nport = 11211\nprotocol = \"memcache\"\ncapture = true\n\
             [[services]]\nname = \"b\"\nport = 11212\nprotocol = \"memcache\"\ncapture = false\n",
        );
        assert_eq!(
            watched_port_bits(&config),
            vec![
                (
                    11211,
                    watch::WATCHED | watch::CAPTURE | 1 << watch::SLOT_SHIFT
                ),
                (11212, watch::WATCHED | 2 << watch::SLOT_SHIFT)
            ]
        );
        assert_eq!(watch::slot(watched_port_bits(&config)[1].1), 2);
    }

    #[test]
    fn sampled_calls_slots_fit_the_map_and_run_out_at_63() {
        assert_eq!(watch::slot_of_position(0), 1);
        assert_eq!(watch::slot_of_position(62), 63);
        assert_eq!(watch::slot_of_position(63), 0);
        assert!(
            watch::calls_index(watch::slot_of_position(62), true)
                < agent_common::SAMPLED_CALLS_ENTRIES
        );
    }

    #[test]
    fn the_tick_length_is_a_real_hz() {
        let tick = ns_per_jiffy();
        assert!(
            [1_000_000, 3_333_333, 4_000_000, 10_000_000].contains(&tick),
            "CLOCK_MONOTONIC_COARSE resolution {tick} ns is no HZ of 1000, 300, 250 or 100"
        );
    }
}
