//! The socket-event ring record and the rings' wake-up policy.

use crate::SockState;

pub const COMM_LEN: usize = 16;

/// One ring-buffer record. Fixed size keeps the reader free of framing logic.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockEvent {
    /// A [`SockEventKind`].
    pub kind: u8,
    /// TCP states (include/net/tcp_states.h, [`TcpState`]) where the kind has them.
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
const _: () = assert!(core::mem::size_of::<SockEvent>() == 144);
const _: () = assert!(core::mem::offset_of!(SockEvent, trouble) == 3);
const _: () = assert!(core::mem::offset_of!(SockEvent, fd_syscall) == 10);
const _: () = assert!(core::mem::offset_of!(SockEvent, pid) == 12);

/// Ring-buffer wake-up policy, shared so the agent's drain timer and the kernel's threshold are
/// chosen together. The kernel submits without waking the reader unless a record takes the
/// unread data past the threshold; the reader also drains on a timer, so a quiet ring is read
/// at most [`wakeup::DRAIN_INTERVAL_MS`] late.
pub mod wakeup {
    /// Fraction of a ring (as a right shift) whose filling wakes the reader early: 1/16.
    pub const THRESHOLD_SHIFT: u32 = 4;
    /// Longest a record waits in a ring before the agent reads it. Every drain is a wake-up
    /// of the agent, which on a VM costs tens of µs whether or not anything arrived: at 20 ms
    /// the idle agent spent 5.5-6.4 ms of CPU per second, at 100 ms 2.2-2.3 (sockets only, no
    /// load). Nothing waits on it: records carry the kernel's timestamps, and a ring past its
    /// threshold wakes the agent at once.
    pub const DRAIN_INTERVAL_MS: u64 = 100;
}
