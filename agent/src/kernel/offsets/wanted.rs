//! What the probes want from the kernel's layouts: the record fields and struct members each
//! needs, what the user loses without it, and this architecture's syscall numbers.

use super::*;

/// A field or member the programs read, the size they read it at, and what is lost without it.
pub(super) struct Wanted {
    pub(super) name: &'static str,
    pub(super) size: u32,
    pub(super) slot: Slot,
    pub(super) impact: &'static str,
}

pub(super) const fn wanted(
    name: &'static str,
    size: u32,
    slot: Slot,
    impact: &'static str,
) -> Wanted {
    Wanted {
        name,
        size,
        slot,
        impact,
    }
}

pub(super) const TCP_SEQUENCE_LOST: &str =
    "kernel BTF has no 4-byte tcp_sock write_seq and copied_seq: \
    requests carry no id, so client and server exemplars of one request cannot be joined, and \
    a write after the peer closed is seen only by a send program (on demand, one made before the \
    programs are back goes uncounted; without them, none is seen)";

pub(super) const LIFECYCLE_LOST: &str =
    "connection lifecycle (opened/closed, closed_by, durations) unavailable";

// The programs drop a state change whose addresses they cannot read.
pub(super) const IPV4_STATE_LOST: &str = "state changes of IPv4 connections are not reported";
pub(super) const IPV6_STATE_LOST: &str = "state changes of IPv6 connections are not reported";

pub(super) const SET_STATE_FIELDS: &[Wanted] = &[
    wanted(
        "skaddr",
        8,
        |o| &mut o.set_state.tuple.skaddr,
        LIFECYCLE_LOST,
    ),
    wanted("oldstate", 4, |o| &mut o.set_state.oldstate, LIFECYCLE_LOST),
    wanted("newstate", 4, |o| &mut o.set_state.newstate, LIFECYCLE_LOST),
    wanted("sport", 2, |o| &mut o.set_state.tuple.sport, LIFECYCLE_LOST),
    wanted("dport", 2, |o| &mut o.set_state.tuple.dport, LIFECYCLE_LOST),
    wanted(
        "family",
        2,
        |o| &mut o.set_state.tuple.family,
        LIFECYCLE_LOST,
    ),
    wanted("protocol", 2, |o| &mut o.set_state.protocol, LIFECYCLE_LOST),
    wanted(
        "saddr",
        4,
        |o| &mut o.set_state.tuple.saddr,
        IPV4_STATE_LOST,
    ),
    wanted(
        "daddr",
        4,
        |o| &mut o.set_state.tuple.daddr,
        IPV4_STATE_LOST,
    ),
    wanted(
        "saddr_v6",
        16,
        |o| &mut o.set_state.tuple.saddr_v6,
        IPV6_STATE_LOST,
    ),
    wanted(
        "daddr_v6",
        16,
        |o| &mut o.set_state.tuple.daddr_v6,
        IPV6_STATE_LOST,
    ),
];

pub(super) const LENGTH_LOST: &str = "last-activity stamps and byte counts unavailable";

pub(super) const LENGTH_FIELDS: &[Wanted] = &[
    wanted("sk", 8, |o| &mut o.length.sk, LENGTH_LOST),
    wanted("family", 2, |o| &mut o.length.family, LENGTH_LOST),
    wanted("protocol", 2, |o| &mut o.length.protocol, LENGTH_LOST),
    wanted("ret", 4, |o| &mut o.length.ret, LENGTH_LOST),
];

pub(super) const LEARNING_LOST: &str =
    "sockets opened before the agent started are only seen when they change state";
pub(super) const IPV6_LEARNING_LOST: &str =
    "IPv6 sockets opened before the agent started are only seen when they change state";

pub(super) const SOCK_COMMON_MEMBERS: &[Wanted] = &[
    wanted("skc_daddr", 4, |o| &mut o.sock_common.daddr, LEARNING_LOST),
    wanted(
        "skc_rcv_saddr",
        4,
        |o| &mut o.sock_common.rcv_saddr,
        LEARNING_LOST,
    ),
    wanted("skc_dport", 2, |o| &mut o.sock_common.dport, LEARNING_LOST),
    wanted("skc_num", 2, |o| &mut o.sock_common.num, LEARNING_LOST),
    wanted(
        "skc_family",
        2,
        |o| &mut o.sock_common.family,
        LEARNING_LOST,
    ),
    wanted("skc_state", 1, |o| &mut o.sock_common.state, LEARNING_LOST),
    wanted(
        "skc_v6_daddr",
        16,
        |o| &mut o.sock_common.v6_daddr,
        IPV6_LEARNING_LOST,
    ),
    wanted(
        "skc_v6_rcv_saddr",
        16,
        |o| &mut o.sock_common.v6_rcv_saddr,
        IPV6_LEARNING_LOST,
    ),
];

pub(super) struct Tracepoint {
    pub(super) category: &'static str,
    pub(super) event: &'static str,
    /// Oldest mainline kernel that has it, for the "not present" message.
    pub(super) since: &'static str,
    pub(super) impact: &'static str,
}

pub(super) const SET_STATE: Tracepoint = Tracepoint {
    category: "sock",
    event: "inet_sock_set_state",
    since: "4.16",
    impact: LIFECYCLE_LOST,
};
pub(super) const SEND_LENGTH: Tracepoint = Tracepoint {
    category: "sock",
    event: "sock_send_length",
    since: "6.4",
    impact: LENGTH_LOST,
};
pub(super) const RECV_LENGTH: Tracepoint = Tracepoint {
    category: "sock",
    event: "sock_recv_length",
    since: "6.4",
    impact: LENGTH_LOST,
};

pub(super) type TupleSlot = fn(&mut ProbeOffsets) -> &mut TupleLayout;

/// The tcp tracepoints that carry a connection's identity, and where each one's layout goes.
pub(super) const TUPLE_TRACEPOINTS: &[(Tracepoint, TupleSlot)] = &[
    (
        Tracepoint {
            category: "tcp",
            event: "tcp_retransmit_skb",
            since: "4.15",
            impact: "data and SYN retransmits not counted",
        },
        |o| &mut o.retransmit_skb,
    ),
    (
        Tracepoint {
            category: "tcp",
            event: "tcp_retransmit_synack",
            since: "4.15",
            impact: "SYN-ACK retransmits not counted",
        },
        |o| &mut o.retransmit_synack,
    ),
    (
        Tracepoint {
            category: "tcp",
            event: "tcp_receive_reset",
            since: "4.15",
            impact: "received resets not counted; refused connects counted as timeouts",
        },
        |o| &mut o.receive_reset,
    ),
    (
        Tracepoint {
            category: "tcp",
            event: "tcp_send_reset",
            since: "4.15",
            impact: "sent resets not counted",
        },
        |o| &mut o.send_reset,
    ),
];

pub(super) const CAPTURE_LOST: &str = "payloads are not captured: memcache decoding is unavailable";

/// Where this architecture's `struct pt_regs` keeps the syscall number and the second syscall
/// argument, as BTF member paths, plus the bytes from the second path's start to the argument.
#[cfg(target_arch = "x86_64")]
pub(super) const SYSCALL_REGS: SyscallRegPaths = (&["orig_ax"], (&["si"], 0), (&["dx"], 0));
#[cfg(target_arch = "aarch64")]
pub(super) const SYSCALL_REGS: SyscallRegPaths = (&["syscallno"], (&["regs"], 8), (&["regs"], 16));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) const SYSCALL_REGS: SyscallRegPaths = (&[], (&[], 0), (&[], 0));

/// `struct pt_regs` members (and a byte offset into them) of the syscall number, the second
/// and the third argument.
pub(super) type SyscallRegPaths = (&'static [&'static str], RegPath, RegPath);
pub(super) type RegPath = (&'static [&'static str], u32);

/// This architecture's numbers of the [`io_syscall`]s, in their order.
pub(super) fn io_syscall_numbers() -> [u64; io_syscall::COUNT] {
    [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
    ]
    .map(|number| number as u64)
}

/// This architecture's numbers of the [`FdSyscall`]s, in their order; u64::MAX where it has
/// no such syscall.
pub(super) fn fd_syscall_numbers() -> [u64; FdSyscall::COUNT] {
    #[cfg(target_arch = "x86_64")]
    let open = libc::SYS_open as u64;
    #[cfg(not(target_arch = "x86_64"))]
    let open = u64::MAX;
    [
        libc::SYS_socket as u64,
        libc::SYS_accept as u64,
        libc::SYS_accept4 as u64,
        open,
        libc::SYS_openat as u64,
        libc::SYS_dup as u64,
    ]
}

pub(super) const SYS_EXIT: Tracepoint = Tracepoint {
    category: "syscalls",
    event: "sys_exit_socket",
    since: "2.6.37",
    impact: "EMFILE/ENFILE errors not counted",
};
