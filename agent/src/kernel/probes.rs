//! The probe table: every program, the event it follows, what is lost without it and how it
//! may attach (classic tracepoints through perf_event_open, which `perf_event_paranoid` can
//! refuse); which of them this kernel's layouts let run, and whether payload capture can.

use std::collections::BTreeMap;

use agent_common::{ProbeOffsets, TupleLayout, OFFSET_UNKNOWN};

/// One attachable program: the function name in agent-ebpf and its tracepoint.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub program: &'static str,
    pub category: &'static str,
    pub event: &'static str,
    /// What the user loses when it cannot attach.
    pub impact: &'static str,
    /// A raw-tracepoint program for the same event, tried first when the offsets say it can
    /// run (it skips the trace record the classic one reads).
    pub raw_program: Option<&'static str>,
    /// The program that follows the same event through a bpf() link instead of
    /// perf_event_open, tried before anything else when kernel BTF confirms its arguments
    /// ([`super::offsets::Resolution::links`]): a tp_btf program on `event`, or for the fd probes the one raw
    /// `sys_exit` program [`FD_RAW_PROGRAM`].
    pub link_program: Option<&'static str>,
}

/// The EMFILE/ENFILE probes' bpf()-link program: one raw `sys_exit` tracepoint for all six
/// (per-syscall exit events are no raw tracepoints).
pub const FD_RAW_PROGRAM: &str = "raw_sys_exit_fd";
pub(super) const FD_RAW_TRACEPOINT: &str = "sys_exit";

macro_rules! fd_exit_probe {
    ($name:literal) => {
        ProbeSpec {
            program: concat!("sys_exit_", $name),
            category: "syscalls",
            event: concat!("sys_exit_", $name),
            impact: concat!("EMFILE/ENFILE from ", $name, "() not counted"),
            raw_program: None,
            link_program: Some(FD_RAW_PROGRAM),
        }
    };
}

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "inet_sock_set_state",
        category: "sock",
        event: "inet_sock_set_state",
        impact: "no connection lifecycle: opened/closed/active, closed_by, durations, connect failures, SYNs sent, handshakes completed at listeners",
        raw_program: None,
        link_program: Some("btf_set_state_events"),
    },
    ProbeSpec {
        program: "sock_send_length",
        category: "sock",
        event: "sock_send_length",
        impact: "no per-call activity (idle before close comes from the kernel's tcp_sock stamps at the close); dead-socket writes only as the socket leaves CLOSE_WAIT (TCP sequence numbers: one per connection, bytes exact, outcome unknown); no payload capture, so no memcache decoding",
        raw_program: Some("raw_sock_send_length"),
        link_program: None,
    },
    ProbeSpec {
        program: "sock_recv_length",
        category: "sock",
        event: "sock_recv_length",
        impact: "no per-call activity; what an application saw after a dead-socket write (eof/reset) not seen: its outcome is unknown; no payload capture, so no memcache decoding",
        raw_program: Some("raw_sock_recv_length"),
        link_program: None,
    },
    ProbeSpec {
        program: "tcp_retransmit_skb",
        category: "tcp",
        event: "tcp_retransmit_skb",
        impact: "data and SYN retransmits not counted",
        raw_program: None,
        link_program: Some("btf_tcp_retransmit_skb"),
    },
    ProbeSpec {
        program: "tcp_retransmit_synack",
        category: "tcp",
        event: "tcp_retransmit_synack",
        impact: "SYN-ACK retransmits not counted",
        raw_program: None,
        link_program: Some("btf_tcp_retransmit_synack"),
    },
    ProbeSpec {
        program: "tcp_receive_reset",
        category: "tcp",
        event: "tcp_receive_reset",
        impact: "received resets not counted; refused connects counted as timeouts",
        raw_program: None,
        link_program: Some("btf_tcp_receive_reset"),
    },
    ProbeSpec {
        program: "tcp_send_reset",
        category: "tcp",
        event: "tcp_send_reset",
        impact: "sent resets not counted",
        raw_program: None,
        link_program: Some("btf_tcp_send_reset"),
    },
    fd_exit_probe!("socket"),
    fd_exit_probe!("accept"),
    fd_exit_probe!("accept4"),
    fd_exit_probe!("open"),
    fd_exit_probe!("openat"),
    fd_exit_probe!("dup"),
];

/// Payload capture is no program of its own (the send/receive probes copy the bytes); its
/// status says whether they do.
pub const PAYLOAD_CAPTURE: &str = "payload_capture";
pub const PAYLOAD_CAPTURE_IMPACT: &str =
    "no payloads captured: no memcache commands, latencies, hit ratios or key statistics";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeStatus {
    Attached,
    /// Not attempted: the kernel lacks what it needs (reason given).
    Unavailable(String),
    /// Attempted and failed (error given).
    Failed(String),
}

/// How a probe reaches its event. Classic tracepoints attach through `perf_event_open`; raw
/// tracepoints and tp_btf through `bpf()` links, which `kernel.perf_event_paranoid` does not gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    Classic,
    Raw,
    Btf,
}

/// `kernel.perf_event_paranoid`, if readable.
pub fn perf_event_paranoid() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the kernel refuses `perf_event_open` to a classic-tracepoint attach. Upstream treats
/// values above 2 like 2 (CAP_PERFMON suffices), but Debian's kernel (its
/// "perf_event_paranoid=3" patch, also in Android) makes 3, its default, refuse
/// `perf_event_open` to every process without CAP_SYS_ADMIN, CAP_PERFMON or not.
pub fn perf_event_refused(paranoid: Option<i64>, has_sys_admin: bool, kind: AttachKind) -> bool {
    kind == AttachKind::Classic && !has_sys_admin && paranoid.is_some_and(|p| p >= 3)
}

/// What an operator can do about [`perf_event_refused`], with what each choice costs.
pub const PERF_PARANOID_FIX: &str = "either a sysctl.d drop-in `kernel.perf_event_paranoid = 2` \
     (upstream's default: processes with CAP_PERFMON may then open perf events, and unprivileged \
     users may profile their own processes in user space), or CAP_SYS_ADMIN added to the unit \
     with a drop-in (`AmbientCapabilities=`/`CapabilityBoundingSet=` += CAP_SYS_ADMIN: only this \
     agent gains it, but CAP_SYS_ADMIN is close to full root)";

/// Whether an attach error is `perf_event_open` refused with EACCES/EPERM (not, say, an
/// unreadable tracefs, which fails with EACCES too but earlier).
pub(super) fn is_perf_event_refusal(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<aya::programs::ProgramError>(),
            Some(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "perf_event_open_trace_point",
                io_error,
            })) if matches!(io_error.raw_os_error(), Some(libc::EACCES | libc::EPERM))
        )
    })
}

impl ProbeStatus {
    pub fn is_attached(&self) -> bool {
        matches!(self, ProbeStatus::Attached)
    }
}

/// The EMFILE/ENFILE probes: attached only while descriptors run short (see
/// [`crate::host::fd_arming`]).
pub(super) fn is_fd_exhaustion_probe(spec: &ProbeSpec) -> bool {
    spec.category == "syscalls"
}

/// The send/receive probes (by classic program name) that the socket-storage path replaces,
/// with their tp_btf programs.
pub const STORAGE_PROGRAMS: &[(&str, &str)] = &[
    ("sock_send_length", "btf_sock_send_length"),
    ("sock_recv_length", "btf_sock_recv_length"),
];

/// The send/receive probes (by classic program name) not attached: payload capture runs inside
/// them, so it needs both.
pub fn missing_length_probes(status: &BTreeMap<&'static str, ProbeStatus>) -> Vec<&'static str> {
    ["sock_send_length", "sock_recv_length"]
        .into_iter()
        .filter(|program| !status.get(program).is_some_and(ProbeStatus::is_attached))
        .collect()
}

/// Whether the send/receive probes capture payloads: capture must be on in the config, the
/// kernel must say where the syscall registers are, and both probes must be attached (a
/// one-sided capture would pair no request with its response).
pub(super) fn capture_status(
    capture_len: u32,
    offsets: &ProbeOffsets,
    status: &BTreeMap<&'static str, ProbeStatus>,
) -> ProbeStatus {
    if capture_len == 0 {
        return ProbeStatus::Unavailable("payload capture is off in the config".to_string());
    }
    let missing = missing_length_probes(status);
    if !missing.is_empty() {
        return ProbeStatus::Unavailable(format!("{} not attached", missing.join(" and ")));
    }
    if !offsets.syscall_regs.is_known() {
        return ProbeStatus::Unavailable(
            "the kernel does not say where the syscall registers are (struct pt_regs)".to_string(),
        );
    }
    ProbeStatus::Attached
}

/// A program whose tracepoint fields were not found must not run: it would read garbage.
pub(super) fn missing_offsets(spec: &ProbeSpec, offsets: &ProbeOffsets) -> Option<String> {
    let set_state = &offsets.set_state;
    let tuple_ok = |layout: &TupleLayout| {
        layout.has_ports()
            && (layout.family != OFFSET_UNKNOWN || layout.sockaddr_src != OFFSET_UNKNOWN)
    };
    let ok = match spec.program {
        "inet_sock_set_state" => {
            tuple_ok(&set_state.tuple)
                && ![
                    set_state.tuple.skaddr,
                    set_state.oldstate,
                    set_state.newstate,
                    set_state.protocol,
                ]
                .contains(&OFFSET_UNKNOWN)
        }
        "sock_send_length" | "sock_recv_length" => ![
            offsets.length.sk,
            offsets.length.protocol,
            offsets.length.ret,
        ]
        .contains(&OFFSET_UNKNOWN),
        "tcp_retransmit_skb" => tuple_ok(&offsets.retransmit_skb),
        "tcp_retransmit_synack" => tuple_ok(&offsets.retransmit_synack),
        "tcp_receive_reset" => tuple_ok(&offsets.receive_reset),
        "tcp_send_reset" => tuple_ok(&offsets.send_reset),
        _ => offsets.sys_exit_ret != OFFSET_UNKNOWN,
    };
    (!ok).then(|| {
        format!(
            "tracepoint {}/{} or its fields are not available on this kernel",
            spec.category, spec.event
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_classic_tracepoints_without_sys_admin_are_refused_at_paranoid_3() {
        use AttachKind::*;
        for kind in [Classic, Raw, Btf] {
            for sys_admin in [false, true] {
                for paranoid in [None, Some(-1), Some(0), Some(1), Some(2)] {
                    assert!(!perf_event_refused(paranoid, sys_admin, kind));
                }
                for paranoid in [Some(3), Some(4)] {
                    assert_eq!(
                        perf_event_refused(paranoid, sys_admin, kind),
                        kind == Classic && !sys_admin,
                        "{paranoid:?} {sys_admin} {kind:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_perf_event_open_refusals_count() {
        let refusal = |errno: i32| {
            anyhow::Error::new(aya::programs::ProgramError::SyscallError(
                aya::sys::SyscallError {
                    call: "perf_event_open_trace_point",
                    io_error: std::io::Error::from_raw_os_error(errno),
                },
            ))
            .context("cannot attach to tracepoint sock/inet_sock_set_state")
        };
        assert!(is_perf_event_refusal(&refusal(libc::EACCES)));
        assert!(is_perf_event_refusal(&refusal(libc::EPERM)));
        assert!(!is_perf_event_refusal(&refusal(libc::ENOENT)));
        // An unreadable tracefs is EACCES too, but not this cause.
        let tracefs = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES))
            .context("cannot attach to tracepoint sock/inet_sock_set_state");
        assert!(!is_perf_event_refusal(&tracefs));
    }
    use agent_common::io_syscall;

    #[test]
    fn fd_exhaustion_probes_are_the_six_fd_syscall_exits() {
        let fd_probes: Vec<&str> = PROBES
            .iter()
            .filter(|spec| is_fd_exhaustion_probe(spec))
            .map(|spec| spec.program)
            .collect();
        assert_eq!(
            fd_probes,
            [
                "sys_exit_socket",
                "sys_exit_accept",
                "sys_exit_accept4",
                "sys_exit_open",
                "sys_exit_openat",
                "sys_exit_dup"
            ]
        );
    }

    #[test]
    fn syscall_kinds_and_directions_match_their_names() {
        for (index, name) in io_syscall::NAMES.iter().enumerate() {
            let expected = if name.ends_with('v') {
                io_syscall::KIND_IOVEC
            } else if name.ends_with("msg") {
                io_syscall::KIND_MSGHDR
            } else {
                io_syscall::KIND_BUFFER
            };
            assert_eq!(io_syscall::kind(index), expected, "{name}");
            assert_eq!(io_syscall::KIND[index], expected, "{name}");
            // The kernel tells a send from a receive by the index's parity.
            let is_send = name.starts_with("write") || name.starts_with("send");
            assert_eq!(index % 2 == 1, is_send, "{name}");
        }
    }

    #[test]
    fn capture_needs_config_registers_and_both_directions() {
        let mut offsets = ProbeOffsets::UNKNOWN;
        let mut status = BTreeMap::new();
        status.insert("sock_send_length", ProbeStatus::Attached);
        status.insert(
            "sock_recv_length",
            ProbeStatus::Failed("no such tracepoint".into()),
        );
        let reason = |s: ProbeStatus| match s {
            ProbeStatus::Unavailable(reason) => reason,
            other => panic!("expected unavailable, got {other:?}"),
        };
        assert!(reason(capture_status(0, &offsets, &status)).contains("off in the config"));
        assert_eq!(
            reason(capture_status(256, &offsets, &status)),
            "sock_recv_length not attached"
        );
        status.insert("sock_recv_length", ProbeStatus::Attached);
        assert!(reason(capture_status(256, &offsets, &status)).contains("pt_regs"));
        offsets.syscall_regs.number = 120;
        offsets.syscall_regs.second_arg = 104;
        offsets.syscall_regs.third_arg = 96;
        assert_eq!(
            capture_status(256, &offsets, &status),
            ProbeStatus::Attached
        );
    }
}
