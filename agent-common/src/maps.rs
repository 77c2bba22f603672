//! Key and value layouts of the maps both halves use: per-socket state, watched ports and
//! the kernel's loss counters.

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
    /// `tcp_sock.write_seq` when the peer closed (entering CLOSE_WAIT) and when this end left
    /// CLOSE_WAIT (LAST_ACK: the application closed; CLOSE: a reset or an abort). Their
    /// difference is what the application wrote after the peer had closed, whether or not a
    /// send program was attached to see it. Valid with [`sock_flags::SEQ_AT_PEER_CLOSE`] and
    /// [`sock_flags::SEQ_AT_LEAVE`].
    pub write_seq_at_peer_close: u32,
    pub write_seq_at_leave: u32,
}

const _: () = assert!(core::mem::size_of::<SockState>() == 56);

pub mod sock_flags {
    /// Payload capture is on for this socket's service.
    pub const CAPTURE: u64 = 1;
    /// [`super::SockState::write_seq_at_peer_close`] is set.
    pub const SEQ_AT_PEER_CLOSE: u64 = 2;
    /// [`super::SockState::write_seq_at_leave`] is set.
    pub const SEQ_AT_LEAVE: u64 = 4;
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
    /// The upper bits of a port's value are its service's slot in `SAMPLED_CALLS` (1..=63;
    /// 0: none, for services past the 63rd). Riding in the byte the send/receive programs
    /// already read, the slot costs them no extra lookup.
    pub const SLOT_SHIFT: u8 = 2;
    /// Service slots: what fits in the byte's upper six bits.
    pub const SLOTS: u32 = 1 << (8 - SLOT_SHIFT);

    /// The service slot in a port's value.
    #[inline(always)]
    pub const fn slot(bits: u8) -> u32 {
        (bits >> SLOT_SHIFT) as u32
    }

    /// The slot of the service at `position` in the config: 1..=63 for the first 63 services,
    /// 0 (not counted; the agent scales those by 2^shift) for the rest.
    pub const fn slot_of_position(position: usize) -> u32 {
        if position + 1 < SLOTS as usize {
            position as u32 + 1
        } else {
            0
        }
    }

    /// The `SAMPLED_CALLS` index of a service slot and role (the service is the local port:
    /// server; the remote one: client).
    #[inline(always)]
    pub const fn calls_index(slot: u32, client: bool) -> u32 {
        (slot << 1) | client as u32
    }
}

/// Per service slot and role (see [`watch::calls_index`]), per CPU: the send and receive calls
/// that moved bytes on healthy connections eligible for capture, and how many of them were on
/// connections the capture sample follows. The agent weights what it decodes by
/// `seen / followed` of the last interval (a ratio estimator) instead of 2^shift.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampledCalls {
    pub seen: u64,
    pub followed: u64,
}

/// Entries in `SAMPLED_CALLS`: every slot, both roles.
pub const SAMPLED_CALLS_ENTRIES: u32 = watch::SLOTS * 2;

const _: () = assert!(core::mem::size_of::<SampledCalls>() == 16);
const _: () = assert!(core::mem::offset_of!(SampledCalls, followed) == 8);
const _: () = assert!(watch::CAPTURE < 1 << watch::SLOT_SHIFT);

abi_enum! {
    /// Indices into the per-CPU `COUNTERS` array: things the kernel side could not record.
    pub enum KernelCounter: u32 {
        /// The ring buffer was full; an event was dropped.
        RingbufFull = 0,
        /// The socket map was full; a watched socket is not tracked.
        SocketMapFull = 1,
        /// The payload ring buffer was full; a capture was dropped (the decoder sees a gap).
        PayloadRingbufFull = 2,
        /// A send or receive on a captured socket came from a syscall capture cannot read
        /// (sendfile, sendmmsg, io_uring, a kernel thread): the decoder sees a gap.
        UncapturedSyscall = 3,
        /// A call's frames could not all be followed (per-call budget or step bound, or a line
        /// longer than the framing follows): the decoder resynchronises.
        CaptureIncomplete = 4,
        /// The frame-state map was full: a captured socket's call was not followed.
        FrameMapFull = 5,
    }
}
