//! This kernel's layouts as the programs get them at load time: tracepoint record offsets,
//! `struct sock` members from BTF and syscall registers, in one read-only global.

use crate::{capture::io_syscall, FdSyscall};

/// Sentinel for "this kernel does not have that field"; programs skip work that needs it.
pub const OFFSET_UNKNOWN: u16 = u16::MAX;

/// Where a tracepoint keeps a TCP connection's identity. Tracepoints differ between kernels
/// (e.g. `tcp_send_reset` carries ports and addresses up to 6.1 but 28-byte `sockaddr`s from
/// 6.10 on), so every field is located at load time; [`OFFSET_UNKNOWN`] marks an absent one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleLayout {
    pub skaddr: u16,
    /// `int state` of the socket, where the tracepoint has one.
    pub state: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// `__u8 saddr[28]` / `__u8 daddr[28]` holding a `struct sockaddr_in` or `sockaddr_in6`.
    pub sockaddr_src: u16,
    pub sockaddr_dst: u16,
}

impl TupleLayout {
    pub const UNKNOWN: TupleLayout = TupleLayout {
        skaddr: OFFSET_UNKNOWN,
        state: OFFSET_UNKNOWN,
        sport: OFFSET_UNKNOWN,
        dport: OFFSET_UNKNOWN,
        family: OFFSET_UNKNOWN,
        saddr: OFFSET_UNKNOWN,
        daddr: OFFSET_UNKNOWN,
        saddr_v6: OFFSET_UNKNOWN,
        daddr_v6: OFFSET_UNKNOWN,
        sockaddr_src: OFFSET_UNKNOWN,
        sockaddr_dst: OFFSET_UNKNOWN,
    };

    /// Ports can be read either directly or out of the sockaddr fields.
    pub fn has_ports(&self) -> bool {
        (self.sport != OFFSET_UNKNOWN && self.dport != OFFSET_UNKNOWN)
            || (self.sockaddr_src != OFFSET_UNKNOWN && self.sockaddr_dst != OFFSET_UNKNOWN)
    }
}

/// `sock/inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateLayout {
    pub tuple: TupleLayout,
    pub oldstate: u16,
    pub newstate: u16,
    pub protocol: u16,
}

/// `sock/sock_send_length` and `sock/sock_recv_length` (Linux 6.4+) share one layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthLayout {
    pub sk: u16,
    pub family: u16,
    pub protocol: u16,
    pub ret: u16,
}

/// `struct sock_common` members, from kernel BTF, to recognise sockets that existed before the
/// agent started.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockCommonLayout {
    pub daddr: u16,
    pub rcv_saddr: u16,
    pub dport: u16,
    pub num: u16,
    pub family: u16,
    pub state: u16,
    pub v6_daddr: u16,
    pub v6_rcv_saddr: u16,
}

/// Everything the kernel programs need to know about this kernel's layouts, discovered at load
/// time from tracefs `format` files and kernel BTF and passed in as a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOffsets {
    pub set_state: SetStateLayout,
    pub length: LengthLayout,
    pub retransmit_skb: TupleLayout,
    pub retransmit_synack: TupleLayout,
    pub receive_reset: TupleLayout,
    pub send_reset: TupleLayout,
    pub sock_common: SockCommonLayout,
    /// `long ret` of `syscalls/sys_exit_*` (the same in every syscall's exit).
    pub sys_exit_ret: u16,
    /// `struct sock` member `sk_protocol`, known only when the kernel's BTF also confirms the
    /// raw tracepoint arguments of sock_send_length / sock_recv_length (`struct sock *sk, int
    /// ret, int flags`): then the raw-tracepoint variants of those programs can run.
    pub sock_protocol: u16,
    /// `struct tcp_sock` members `lsndtime` and `inet_conn.icsk_ack.lrcvtime` (u32 jiffies of
    /// the last data sent / received), from BTF. With both, a socket's last activity is read
    /// from the kernel when its state changes instead of being stamped on every send/receive.
    pub tcp_lsndtime: u16,
    pub tcp_lrcvtime: u16,
    /// `struct tcp_sock` members `write_seq` and `copied_seq` (u32 TCP sequence numbers: the
    /// next byte the application will write, the next byte it will read), from BTF. Payload
    /// records carry the sequence number of their call's first byte, which both ends of a
    /// connection agree on: the request id of issue 18.
    pub tcp_write_seq: u16,
    pub tcp_copied_seq: u16,
    /// How to find the running syscall and its buffer in the task's saved user registers.
    pub syscall_regs: SyscallRegs,
    /// `struct sock` member `sk_protocol` from BTF, whatever the send/receive tracepoints: the
    /// tp_btf programs of the lifecycle and TCP-trouble probes read their socket's protocol
    /// here. ([`ProbeOffsets::sock_protocol`] is the same member, but set only when BTF also
    /// confirms the raw send/receive arguments, which it gates.)
    pub sk_protocol: u16,
    /// `struct sk_buff` members `head` (pointer), `network_header` and `transport_header` (u16
    /// offsets from head), from BTF: a reset sent for no socket (`tcp_send_reset` with `sk`
    /// NULL, 6.10+) is located by the segment it answers.
    pub skb_head: u16,
    pub skb_network_header: u16,
    pub skb_transport_header: u16,
    /// `struct inet_sock` member `inet_sport` (network order), from BTF: the tp_btf programs'
    /// local port of a full socket. `skc_num` will not do: a closing socket gives its port back
    /// (`inet_put_port` zeroes it) before the CLOSE state change is traced, and the classic
    /// record reads `inet_sport` too.
    pub inet_sport: u16,
    pub _pad: [u16; 3],
    /// How the raw `sys_exit` program tells the EMFILE/ENFILE syscalls apart.
    pub fd_syscalls: FdSyscalls,
}

/// The raw `sys_exit` tracepoint passes `(struct pt_regs *regs, long ret)`: the syscall's number
/// is read from the registers and looked up among the [`FdSyscall`]s'.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdSyscalls {
    /// `struct pt_regs` member holding the syscall number (x86-64 `orig_ax`).
    pub number: u16,
    pub _pad: [u16; 3],
    /// This architecture's number of each [`FdSyscall`], by index; u64::MAX when it has none
    /// (arm64 has no open(2)).
    pub numbers: [u64; FdSyscall::COUNT],
}

// No implicit padding: the whole struct is copied into the object's read-only data.
const _: () = assert!(core::mem::size_of::<ProbeOffsets>() == 296);
const _: () = assert!(core::mem::offset_of!(ProbeOffsets, fd_syscalls) == 240);

impl FdSyscalls {
    pub fn is_known(&self) -> bool {
        self.number != OFFSET_UNKNOWN
    }
}

/// Payload capture reads the user buffer of the syscall that is sending or receiving from the
/// task's saved user registers (`struct pt_regs`, from `bpf_task_pt_regs`) inside the
/// send/receive probes, so no syscall tracepoint is needed: attaching any of those would put
/// every syscall of every process on the kernel's slow tracing path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallRegs {
    /// `struct pt_regs` member holding the syscall number (x86-64 `orig_ax`).
    pub number: u16,
    /// `struct pt_regs` member holding the second syscall argument (x86-64 `si`): the buffer,
    /// iovec array or msghdr of every [`io_syscall`].
    pub second_arg: u16,
    /// `struct pt_regs` member holding the third syscall argument (x86-64 `dx`): the iovec
    /// count of readv/writev.
    pub third_arg: u16,
    pub _pad: u16,
    /// This architecture's number of each [`io_syscall`], by index; u64::MAX when unknown.
    pub numbers: [u64; io_syscall::COUNT],
}

impl SyscallRegs {
    pub fn is_known(&self) -> bool {
        self.number != OFFSET_UNKNOWN
            && self.second_arg != OFFSET_UNKNOWN
            && self.third_arg != OFFSET_UNKNOWN
    }
}

impl ProbeOffsets {
    pub const UNKNOWN: ProbeOffsets = ProbeOffsets {
        set_state: SetStateLayout {
            tuple: TupleLayout::UNKNOWN,
            oldstate: OFFSET_UNKNOWN,
            newstate: OFFSET_UNKNOWN,
            protocol: OFFSET_UNKNOWN,
        },
        length: LengthLayout {
            sk: OFFSET_UNKNOWN,
            family: OFFSET_UNKNOWN,
            protocol: OFFSET_UNKNOWN,
            ret: OFFSET_UNKNOWN,
        },
        retransmit_skb: TupleLayout::UNKNOWN,
        retransmit_synack: TupleLayout::UNKNOWN,
        receive_reset: TupleLayout::UNKNOWN,
        send_reset: TupleLayout::UNKNOWN,
        sock_common: SockCommonLayout {
            daddr: OFFSET_UNKNOWN,
            rcv_saddr: OFFSET_UNKNOWN,
            dport: OFFSET_UNKNOWN,
            num: OFFSET_UNKNOWN,
            family: OFFSET_UNKNOWN,
            state: OFFSET_UNKNOWN,
            v6_daddr: OFFSET_UNKNOWN,
            v6_rcv_saddr: OFFSET_UNKNOWN,
        },
        sys_exit_ret: OFFSET_UNKNOWN,
        sock_protocol: OFFSET_UNKNOWN,
        tcp_lsndtime: OFFSET_UNKNOWN,
        tcp_lrcvtime: OFFSET_UNKNOWN,
        tcp_write_seq: OFFSET_UNKNOWN,
        tcp_copied_seq: OFFSET_UNKNOWN,
        syscall_regs: SyscallRegs {
            number: OFFSET_UNKNOWN,
            second_arg: OFFSET_UNKNOWN,
            third_arg: OFFSET_UNKNOWN,
            _pad: 0,
            numbers: [u64::MAX; io_syscall::COUNT],
        },
        sk_protocol: OFFSET_UNKNOWN,
        skb_head: OFFSET_UNKNOWN,
        skb_network_header: OFFSET_UNKNOWN,
        skb_transport_header: OFFSET_UNKNOWN,
        inet_sport: OFFSET_UNKNOWN,
        _pad: [0; 3],
        fd_syscalls: FdSyscalls {
            number: OFFSET_UNKNOWN,
            _pad: [0; 3],
            numbers: [u64::MAX; FdSyscall::COUNT],
        },
    };

    /// Whether the programs can read enough of `struct sock_common` to adopt a socket they first
    /// meet in a send or receive.
    pub fn can_learn_sockets(&self) -> bool {
        let s = &self.sock_common;
        [s.num, s.dport, s.family, s.state, s.daddr, s.rcv_saddr]
            .iter()
            .all(|&offset| offset != OFFSET_UNKNOWN)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    #[test]
    fn probe_offsets_have_no_padding() {
        // The struct is copied into the kernel object as bytes (aya::Pod): padding would be
        // uninitialised memory.
        let regs = core::mem::offset_of!(super::ProbeOffsets, syscall_regs);
        assert_eq!(regs % 8, 0);
        assert_eq!(
            core::mem::offset_of!(super::ProbeOffsets, tcp_copied_seq) + 2,
            regs,
            "padding before syscall_regs"
        );
    }
}
