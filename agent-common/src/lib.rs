//! The one home of everything the kernel programs and the agent exchange: map value layouts,
//! ring-buffer event layouts, load-time configuration and shared constants.
//!
//! Every type here is `#[repr(C)]` and plain data so both sides agree on the bytes. Field
//! offsets of kernel structures are *not* here: they are discovered at load time and passed in
//! [`ProbeOffsets`], because they differ between kernels.
#![no_std]

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

/// Byte offsets of tracepoint fields and `struct sock_common` members, discovered at load time
/// from tracefs `format` files and kernel BTF. [`OFFSET_UNKNOWN`] marks a missing field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOffsets {
    // sock/inet_sock_set_state
    pub state_skaddr: u16,
    pub state_oldstate: u16,
    pub state_newstate: u16,
    pub state_sport: u16,
    pub state_dport: u16,
    pub state_family: u16,
    pub state_protocol: u16,
    pub state_saddr: u16,
    pub state_daddr: u16,
    pub state_saddr_v6: u16,
    pub state_daddr_v6: u16,
    // sock/sock_send_length and sock/sock_recv_length share one layout.
    pub len_sk: u16,
    pub len_family: u16,
    pub len_protocol: u16,
    pub len_ret: u16,
    // struct sock_common, used to recognise sockets that existed before the agent started.
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_family: u16,
    pub skc_state: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
}

impl ProbeOffsets {
    pub const UNKNOWN: ProbeOffsets = ProbeOffsets {
        state_skaddr: OFFSET_UNKNOWN,
        state_oldstate: OFFSET_UNKNOWN,
        state_newstate: OFFSET_UNKNOWN,
        state_sport: OFFSET_UNKNOWN,
        state_dport: OFFSET_UNKNOWN,
        state_family: OFFSET_UNKNOWN,
        state_protocol: OFFSET_UNKNOWN,
        state_saddr: OFFSET_UNKNOWN,
        state_daddr: OFFSET_UNKNOWN,
        state_saddr_v6: OFFSET_UNKNOWN,
        state_daddr_v6: OFFSET_UNKNOWN,
        len_sk: OFFSET_UNKNOWN,
        len_family: OFFSET_UNKNOWN,
        len_protocol: OFFSET_UNKNOWN,
        len_ret: OFFSET_UNKNOWN,
        skc_daddr: OFFSET_UNKNOWN,
        skc_rcv_saddr: OFFSET_UNKNOWN,
        skc_dport: OFFSET_UNKNOWN,
        skc_num: OFFSET_UNKNOWN,
        skc_family: OFFSET_UNKNOWN,
        skc_state: OFFSET_UNKNOWN,
        skc_v6_daddr: OFFSET_UNKNOWN,
        skc_v6_rcv_saddr: OFFSET_UNKNOWN,
    };

    /// Whether the programs can read enough of `struct sock_common` to adopt a socket they first
    /// meet in a send or receive.
    pub fn can_learn_sockets(&self) -> bool {
        self.skc_num != OFFSET_UNKNOWN
            && self.skc_dport != OFFSET_UNKNOWN
            && self.skc_family != OFFSET_UNKNOWN
            && self.skc_state != OFFSET_UNKNOWN
            && self.skc_daddr != OFFSET_UNKNOWN
            && self.skc_rcv_saddr != OFFSET_UNKNOWN
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
}

/// Event kinds in [`SockEvent::kind`].
pub mod event_kind {
    /// A TCP state transition on a watched socket.
    pub const STATE: u8 = 1;
    /// A watched socket first seen through a send/receive (it existed before the agent).
    pub const LEARNED: u8 = 2;
    /// A send on a socket whose peer had already closed.
    pub const SEND_AFTER_PEER_CLOSE: u8 = 3;
    /// A receive on a socket whose peer had already closed.
    pub const RECV_AFTER_PEER_CLOSE: u8 = 4;
}

pub const COMM_LEN: usize = 16;

/// One ring-buffer record. Fixed size keeps the reader free of framing logic.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockEvent {
    pub kind: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub _pad0: u8,
    pub family: u16,
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    pub _pad1: u16,
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

/// Indices into the per-CPU `COUNTERS` array: things the kernel side could not record.
pub mod counter {
    /// The ring buffer was full; an event was dropped.
    pub const RINGBUF_FULL: u32 = 0;
    /// The socket map was full; a watched socket is not tracked.
    pub const SOCKET_MAP_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Value in the `WATCHED_PORTS` map: which configured service a port belongs to.
pub type ServiceIndex = u32;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with no pointers and no invalid bit patterns.
    unsafe impl aya::Pod for ProbeOffsets {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for SockEvent {}
}
