//! The one home of everything the kernel programs and the agent exchange: map value layouts,
//! ring-buffer event layouts, load-time configuration and shared constants.
//!
//! Every type here is `#[repr(C)]` and plain data so both sides agree on the bytes. Field
//! offsets of kernel structures are *not* here: they are discovered at load time and passed in
//! [`ProbeOffsets`], because they differ between kernels.
#![no_std]

pub mod framing;

/// Sentinel for "this kernel does not have that field"; programs skip work that needs it.
pub const OFFSET_UNKNOWN: u16 = u16::MAX;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

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
    /// `struct sock` member `sk_txhash` (u32), from BTF: a random number the kernel draws for
    /// each connection (at connect, and for an accepted one from its request), so capture
    /// samples connections by it ([`capture_sample::key`]). The kernel draws it again only
    /// after a retransmission timeout.
    pub sock_txhash: u16,
    /// Keeps `syscall_regs` 8-byte aligned without padding (the struct is copied as bytes).
    pub _pad_txhash: [u16; 3],
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
const _: () = assert!(core::mem::size_of::<ProbeOffsets>() == 304);
const _: () = assert!(core::mem::offset_of!(ProbeOffsets, fd_syscalls) == 248);

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
        sock_txhash: OFFSET_UNKNOWN,
        _pad_txhash: [0; 3],
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

/// Per-socket facts kept in the `SOCKETS` hash map, keyed by the kernel socket address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// Monotonic ns of the last successful send or receive (0: none seen yet).
    pub last_activity_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Monotonic ns at which the peer closed (ESTABLISHED -> CLOSE_WAIT) or reset it; 0 while open.
    pub peer_closed_ns: u64,
    /// Monotonic ns of the last RST received on this socket (0: none).
    pub reset_received_ns: u64,
    /// [`sock_flags`] bits, set when the socket is first tracked.
    pub flags: u64,
}

/// Which connections payload capture follows once the agent has to sample (a healthy
/// connection is followed or not as a whole, so each followed stream decodes from its start to
/// its end). At sample shift `k` one connection in 2^k is followed; the connections followed at
/// `k + 1` are a subset of those at `k`, so raising the shift only drops streams and lowering it
/// only adds them.
///
/// The unit sampled is the connection. The socket address alone is not one: the kernel reuses
/// a freed `tcp_sock` for the next connection at once, so a client that reconnects (a pool
/// re-opened, short connections one after another) lands on the same few addresses, and a
/// sample by address followed all of them or none: a fixed choice rather than a random one (a
/// soak saw request counts scaled from 1/16 come out 37% low). Ports do not fix it: clients
/// on several source addresses reuse the same ports, and any client reuses them after
/// TIME_WAIT. The key therefore includes `sk_txhash`, which the kernel draws at random for
/// every connection.
pub mod capture_sample {
    /// Largest shift: one connection in 1024.
    pub const MAX_SHIFT: u32 = 10;
    /// [`super::PayloadHeader::sample_shift`] of a record captured because its connection is in
    /// trouble (or the kernel cannot tell healthy ones), not as a sample: it stands for itself.
    pub const NOT_SAMPLED: u8 = 0xff;

    /// The key a connection is sampled by: its socket address, its (local, remote) ports and
    /// the kernel's random per-connection `sk_txhash` (0 when its offset is unknown).
    #[inline(always)]
    pub fn key(sk: u64, local_port: u16, remote_port: u16, txhash: u32) -> u64 {
        mix(sk) ^ (u64::from(txhash) << 32 | u64::from(local_port) << 16 | u64::from(remote_port))
    }

    /// Mixes every bit of `key` into every bit of the result. Socket addresses are slab
    /// objects in arithmetic progression; a lone multiply maps such a run onto long runs of
    /// equal low bits (whole batches of connections followed or not). This is MurmurHash3's
    /// finaliser.
    #[inline(always)]
    fn mix(key: u64) -> u64 {
        let mut mixed = key;
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xff51_afd7_ed55_8ccd);
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        mixed ^= mixed >> 33;
        mixed
    }

    /// Whether the connection with `key` is followed at sample shift `shift`.
    #[inline(always)]
    pub fn is_followed(key: u64, shift: u32) -> bool {
        let mask = (1u64 << (shift & 15)) - 1;
        mix(key) & mask == 0
    }

    /// The largest shift at which the connection with `key` is still followed, at most
    /// [`MAX_SHIFT`]: `is_followed(key, k)` exactly when `k <= depth(key)`. (Counted with a
    /// fixed number of shifts, no trailing-zeros instruction: eBPF has none.)
    #[inline(always)]
    pub fn depth(key: u64) -> u32 {
        let mixed = mix(key) | 1 << MAX_SHIFT;
        let lowest = mixed & mixed.wrapping_neg();
        let mut depth = 0;
        let mut k = 1;
        while k <= MAX_SHIFT {
            depth += u32::from(lowest >> k != 0);
            k += 1;
        }
        depth
    }
}

pub mod sock_flags {
    /// Payload capture is on for this socket's service.
    pub const CAPTURE: u64 = 1;
}

/// Value bits in `WATCHED_PORTS`, an array indexed by port (an inlined array lookup is far
/// cheaper than a hash lookup on paths that run for every packet or send).
pub mod watch {
    /// The port belongs to a configured service.
    pub const WATCHED: u8 = 1;
    /// Capture payloads of this service's sockets.
    pub const CAPTURE: u8 = 2;
    /// Entries in `WATCHED_PORTS`: one per possible port.
    pub const PORTS: u32 = 1 << 16;
}

/// The syscalls that move memcache bytes, in the order the capture programs number them (odd:
/// sends). The buffer, always the second argument, is a plain buffer, an iovec array or a msghdr
/// depending on the syscall.
pub mod io_syscall {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const READV: usize = 2;
    pub const WRITEV: usize = 3;
    pub const RECVFROM: usize = 4;
    pub const SENDTO: usize = 5;
    pub const RECVMSG: usize = 6;
    pub const SENDMSG: usize = 7;
    pub const COUNT: usize = 8;
    pub const NAMES: [&str; COUNT] = [
        "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    ];

    pub const KIND_BUFFER: u8 = 0;
    pub const KIND_IOVEC: u8 = 1;
    pub const KIND_MSGHDR: u8 = 2;
    pub const KIND: [u8; COUNT] = [
        kind(READ),
        kind(WRITE),
        kind(READV),
        kind(WRITEV),
        kind(RECVFROM),
        kind(SENDTO),
        kind(RECVMSG),
        kind(SENDMSG),
    ];

    /// The buffer argument's kind, computed rather than looked up: the 6.1 verifier loses the
    /// bound of an index into a table (it rejected `KIND[syscall]` as a possible read at 255).
    pub const fn kind(syscall: usize) -> u8 {
        match syscall {
            READV | WRITEV => KIND_IOVEC,
            RECVMSG | SENDMSG => KIND_MSGHDR,
            _ => KIND_BUFFER,
        }
    }
}

/// Default and largest per-call capture budget: header bytes (lines, binary headers with extras
/// and key) copied from one send or receive. Value bodies are never copied, so this bounds the
/// frames followed per call, not the value sizes.
pub const CAPTURE_BUDGET_DEFAULT: u32 = 16384;
pub const CAPTURE_BUDGET_MAX: u32 = 65536;
/// Data bytes one payload record carries; a call whose headers need more is split over several
/// records.
pub const RECORD_DATA_MAX: usize = 4096;
/// Bytes copied from user memory at a time while following frames.
pub const CAPTURE_PIECE: usize = 64;
/// Steps (one copied piece, one skipped body stretch, or one iovec entry read) one call may
/// take; a call that needs more is marked [`payload_flags::INCOMPLETE`].
pub const CAPTURE_MAX_STEPS: u32 = 4096;

/// [`PayloadHeader::flags`] bits.
pub mod payload_flags {
    /// Capture of this call stopped before its end (budget, step bound or a line too long to
    /// follow): the bytes after the last segment were not looked at, and the next call starts
    /// afresh at a frame boundary.
    pub const INCOMPLETE: u8 = 1;
    /// [`super::PayloadHeader::seq`] holds the TCP sequence number of the call's first byte.
    pub const SEQ: u8 = 2;
}

/// One payload record: this header, then `data_len` bytes of segments. A segment is a
/// [`SegmentHeader`] (8-byte aligned within the data) followed by the `len` bytes of the call
/// found at `offset`. Bytes of `[span_start, span_end)` outside every segment are value bodies
/// the kernel skipped by their declared length (or, with [`payload_flags::INCOMPLETE`], bytes
/// after the capture stopped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PayloadHeader {
    pub ts_ns: u64,
    pub sk: u64,
    /// Bytes the whole send or receive transferred.
    pub total_len: u64,
    /// The part of the call this record covers (a call with many frames may need several
    /// records, in order).
    pub span_start: u32,
    pub span_end: u32,
    pub pid: u32,
    pub data_len: u16,
    pub is_send: u8,
    pub syscall: u8,
    pub flags: u8,
    /// The sample shift the kernel captured this record under as a sample of healthy
    /// connections (it stands for 2^shift records), or [`capture_sample::NOT_SAMPLED`].
    pub sample_shift: u8,
    /// [`capture_sample::depth`] of the connection's key (0 when not sampled): the agent
    /// knows from it which streams a higher shift lets go.
    pub sample_depth: u8,
    pub _pad: u8,
    /// TCP sequence number of the call's first byte (`write_seq` after a send, `copied_seq`
    /// after a receive, minus the bytes the call moved), valid with [`payload_flags::SEQ`].
    pub seq: u32,
    pub comm: [u8; COMM_LEN],
}

/// Bytes of [`PayloadHeader`]: the smallest valid payload record.
pub const PAYLOAD_HEADER_LEN: usize = 64;
const _: () = assert!(core::mem::size_of::<PayloadHeader>() == PAYLOAD_HEADER_LEN);
const _: () = assert!(core::mem::offset_of!(PayloadHeader, seq) == 44);

/// Where one segment of captured bytes lies in its call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SegmentHeader {
    pub offset: u32,
    pub len: u32,
}
pub const SEGMENT_HEADER_LEN: usize = 8;
const _: () = assert!(core::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_LEN);

/// An ABI enum: `#[repr(u8)]` (or the given repr), its wire value written by the kernel half
/// with `as`, read back by the user half with `TryFrom`, where a byte naming no variant is an
/// [`UnknownValue`] (the agent counts the record as undecodable; it never panics on it).
/// Records keep the plain integer: an enum field read from kernel bytes could hold an invalid
/// value.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Number of variants.
            pub const COUNT: usize = [$($value),+].len();
            /// Every variant, in wire-value order.
            pub const ALL: [$name; Self::COUNT] = [$($name::$variant),+];
        }

        impl TryFrom<$repr> for $name {
            type Error = UnknownValue;
            fn try_from(value: $repr) -> Result<Self, UnknownValue> {
                match value {
                    $($value => Ok($name::$variant),)+
                    _ => Err(UnknownValue(value as u64)),
                }
            }
        }
    };
}

/// A value from the kernel that names no variant of an ABI enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue(pub u64);

abi_enum! {
    /// What a [`SockEvent`] reports, in [`SockEvent::kind`].
    pub enum SockEventKind: u8 {
        /// A TCP state transition on a watched socket ([`SockEvent::old_state`] to
        /// [`SockEvent::new_state`]).
        State = 1,
        /// A watched socket first seen through a send/receive (it existed before the agent);
        /// [`SockEvent::new_state`] is its state when seen.
        Learned = 2,
        /// A send on a socket whose peer had already closed.
        SendAfterPeerClose = 3,
        /// A receive on a socket whose peer had already closed.
        RecvAfterPeerClose = 4,
        /// TCP trouble on a watched port: [`SockEvent::trouble`] says which, and
        /// [`SockEvent::old_state`] is the socket state where the tracepoint has it.
        TcpTrouble = 5,
        /// A syscall returned EMFILE or ENFILE: [`SockEvent::fd_syscall`] says which, and
        /// [`SockEvent::ret`] holds the negative errno.
        FdExhausted = 6,
    }
}

abi_enum! {
    /// Which TCP trouble a [`SockEventKind::TcpTrouble`] event reports, in [`SockEvent::trouble`].
    pub enum TcpTrouble: u8 {
        /// A data segment was retransmitted (`tcp_retransmit_skb`).
        Retransmit = 1,
        /// A listener retransmitted a SYN-ACK (`tcp_retransmit_synack`).
        RetransmitSynAck = 2,
        /// A reset arrived (`tcp_receive_reset`).
        ResetReceived = 3,
        /// A reset was sent (`tcp_send_reset`).
        ResetSent = 4,
    }
}

abi_enum! {
    /// Syscalls whose EMFILE/ENFILE failures are recorded, in the order the programs number them
    /// ([`FdSyscalls::numbers`]), in [`SockEvent::fd_syscall`].
    pub enum FdSyscall: u8 {
        Socket = 0,
        Accept = 1,
        Accept4 = 2,
        Open = 3,
        Openat = 4,
        Dup = 5,
    }
}

impl FdSyscall {
    /// The syscall's name, as the metrics and the history name it.
    pub const fn name(self) -> &'static str {
        match self {
            FdSyscall::Socket => "socket",
            FdSyscall::Accept => "accept",
            FdSyscall::Accept4 => "accept4",
            FdSyscall::Open => "open",
            FdSyscall::Openat => "openat",
            FdSyscall::Dup => "dup",
        }
    }
}

pub const COMM_LEN: usize = 16;

/// One ring-buffer record. Fixed size keeps the reader free of framing logic.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockEvent {
    /// A [`SockEventKind`].
    pub kind: u8,
    /// TCP states (include/net/tcp_states.h, [`tcp_state`]) where the kind has them.
    pub old_state: u8,
    pub new_state: u8,
    /// A [`TcpTrouble`] for [`SockEventKind::TcpTrouble`], else 0.
    pub trouble: u8,
    pub family: u16,
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// A [`FdSyscall`] for [`SockEventKind::FdExhausted`], else 0.
    pub fd_syscall: u8,
    pub _pad1: u8,
    /// Thread group id of the task that was running; only meaningful in syscall context.
    pub pid: u32,
    /// Monotonic (CLOCK_MONOTONIC) ns when the event happened.
    pub ts_ns: u64,
    pub sk: u64,
    /// IPv4 addresses use the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Snapshot of the socket's [`SockState`] at the time of the event.
    pub state: SockState,
    /// Return value of the send/recv for the *_AFTER_PEER_CLOSE kinds.
    pub ret: i64,
    pub comm: [u8; COMM_LEN],
}

// The ring record's size and the fields that carry a kind's detail are fixed: both halves
// must agree on every byte.
const _: () = assert!(core::mem::size_of::<SockEvent>() == 136);
const _: () = assert!(core::mem::offset_of!(SockEvent, trouble) == 3);
const _: () = assert!(core::mem::offset_of!(SockEvent, fd_syscall) == 10);
const _: () = assert!(core::mem::offset_of!(SockEvent, pid) == 12);

/// Indices into the per-CPU `COUNTERS` array: things the kernel side could not record.
pub mod counter {
    /// The ring buffer was full; an event was dropped.
    pub const RINGBUF_FULL: u32 = 0;
    /// The socket map was full; a watched socket is not tracked.
    pub const SOCKET_MAP_FULL: u32 = 1;
    /// The payload ring buffer was full; a capture was dropped (the decoder sees a gap).
    pub const PAYLOAD_RINGBUF_FULL: u32 = 2;
    /// A send or receive on a captured socket came from a syscall capture cannot read (sendfile,
    /// sendmmsg, io_uring, a kernel thread): the decoder sees a gap.
    pub const UNCAPTURED_SYSCALL: u32 = 3;
    /// A call's frames could not all be followed (per-call budget or step bound, or a line
    /// longer than the framing follows): the decoder resynchronises.
    pub const CAPTURE_INCOMPLETE: u32 = 4;
    /// The frame-state map was full: a captured socket's call was not followed.
    pub const FRAME_MAP_FULL: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Ring-buffer wake-up policy, shared so the agent's drain timer and the kernel's threshold are
/// chosen together. The kernel submits without waking the reader unless a record takes the
/// unread data past the threshold; the reader also drains on a timer, so a quiet ring is read
/// at most [`wakeup::DRAIN_INTERVAL_MS`] late.
pub mod wakeup {
    /// Fraction of a ring (as a right shift) whose filling wakes the reader early: 1/16.
    pub const THRESHOLD_SHIFT: u32 = 4;
    /// Longest a record waits in a ring before the agent reads it.
    pub const DRAIN_INTERVAL_MS: u64 = 20;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with no pointers and no invalid bit patterns.
    unsafe impl aya::Pod for ProbeOffsets {}
    unsafe impl aya::Pod for TupleLayout {}
    unsafe impl aya::Pod for PayloadHeader {}
    unsafe impl aya::Pod for framing::SocketFrames {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for SockEvent {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::capture_sample::{depth, is_followed, key, MAX_SHIFT};
    use std::vec::Vec;

    #[test]
    fn sampled_sockets_nest_and_come_in_the_right_proportion() {
        // tcp_sock objects are ~2.3 KiB apart in their slab.
        let sockets: Vec<u64> = (0..40_000u64)
            .map(|i| 0xffff_8880_0000_0000 + i * 2368)
            .collect();
        for shift in 0..=MAX_SHIFT {
            let followed = sockets.iter().filter(|&&sk| is_followed(sk, shift)).count();
            let expected = sockets.len() >> shift;
            // Four standard deviations of a fair coin per socket.
            let tolerance = 4 * (expected as f64).sqrt() as usize + 2;
            assert!(
                followed.abs_diff(expected) <= tolerance,
                "shift {shift}: {followed} followed, expected ~{expected}"
            );
            for &sk in &sockets {
                if is_followed(sk, shift + 1) {
                    assert!(
                        is_followed(sk, shift),
                        "shift {shift} does not contain {sk:#x}"
                    );
                }
                assert_eq!(
                    is_followed(sk, shift),
                    shift <= depth(sk),
                    "depth disagrees at shift {shift} for {sk:#x}"
                );
            }
        }
        assert!(sockets.iter().all(|&sk| is_followed(sk, 0)));
        assert!(sockets.iter().all(|&sk| depth(sk) <= MAX_SHIFT));
        // Any run of 256 consecutive slab objects gets its fair share at one in 8.
        for run in sockets.chunks_exact(256) {
            let followed = run.iter().filter(|&&sk| is_followed(sk, 3)).count();
            assert!(
                (16..=48).contains(&followed),
                "{followed} of 256 followed at 1/8"
            );
        }
    }

    #[test]
    fn abi_enums_read_back_every_value_they_write_and_reject_every_other_byte() {
        use super::{FdSyscall, SockEventKind, TcpTrouble, UnknownValue};
        fn check<E: Copy + PartialEq + core::fmt::Debug + TryFrom<u8, Error = UnknownValue>>(
            all: &[E],
            wire: impl Fn(E) -> u8,
        ) {
            for byte in 0..=u8::MAX {
                match all.iter().find(|&&variant| wire(variant) == byte) {
                    Some(&variant) => assert_eq!(E::try_from(byte), Ok(variant)),
                    None => assert_eq!(E::try_from(byte), Err(UnknownValue(byte.into()))),
                }
            }
        }
        check(&SockEventKind::ALL, |kind| kind as u8);
        check(&TcpTrouble::ALL, |trouble| trouble as u8);
        check(&FdSyscall::ALL, |syscall| syscall as u8);
        // The wire values are the ABI: the kernel object and older agents agree on them.
        assert_eq!(
            SockEventKind::ALL.map(|kind| kind as u8),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(TcpTrouble::ALL.map(|trouble| trouble as u8), [1, 2, 3, 4]);
        assert_eq!(
            FdSyscall::ALL.map(|syscall| syscall as u8),
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!(
            FdSyscall::ALL.map(FdSyscall::name),
            ["socket", "accept", "accept4", "open", "openat", "dup"]
        );
    }

    #[test]
    fn probe_offsets_have_no_padding() {
        // The struct is copied into the kernel object as bytes (aya::Pod): padding would be
        // uninitialised memory.
        let regs = core::mem::offset_of!(super::ProbeOffsets, syscall_regs);
        assert_eq!(regs % 8, 0);
        assert_eq!(
            core::mem::offset_of!(super::ProbeOffsets, _pad_txhash) + 6,
            regs,
            "padding before syscall_regs"
        );
    }

    #[test]
    fn connections_reusing_one_socket_address_are_fresh_draws() {
        // A client reconnecting one connection at a time: the kernel hands it the same freed
        // tcp_sock every time, with the next ephemeral port and a random txhash.
        let sk = 0xffff_8880_1234_5000u64;
        let txhash = |i: u32| i.wrapping_mul(0x9e37_79b9).rotate_left(13);
        let connections = 32_768u32;
        for shift in [1, 4, 8] {
            let followed = (0..connections)
                .filter(|i| {
                    let port = 32_768 + (*i % 28_000) as u16;
                    is_followed(key(sk, port, 11211, txhash(*i)), shift)
                })
                .count();
            let expected = (connections >> shift) as usize;
            let tolerance = 4 * (expected as f64).sqrt() as usize + 2;
            assert!(
                followed.abs_diff(expected) <= tolerance,
                "shift {shift}: {followed} of {connections} followed, expected ~{expected}"
            );
        }
        // The server's end of the same connections, on a kernel without the txhash offset:
        // local port fixed, remote port varying.
        let followed = (0..connections)
            .filter(|i| is_followed(key(sk, 11211, 40_000 + (*i % 20_000) as u16, 0), 4))
            .count();
        assert!(
            followed.abs_diff(2048) <= 4 * 45 + 2,
            "{followed} of 32768 at 1/16"
        );
    }
}
