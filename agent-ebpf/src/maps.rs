//! Every map and load-time global the programs share, in one place (sizes are defaults the
//! agent overrides), with the accessors the programs reach them through.

use crate::capture::CaptureWalk;
use crate::storage::SkWatch;
use agent_common::{
    framing::SocketFrames, watch, KernelCounter, ProbeOffsets, SampledCalls, SockState,
    SAMPLED_CALLS_ENTRIES,
};
use aya_ebpf::{
    btf_maps::SkStorage, macros::btf_map, macros::map, maps::Array, maps::HashMap,
    maps::LruHashMap, maps::PerCpuArray, maps::RingBuf,
};

// Sizes are defaults; the agent resizes them from its config before loading.

/// [`watch`] bits by port. An array, because its lookup is inlined into a bounds check and a
/// load: the send/receive probes consult it for every send and receive.
#[map]
pub(crate) static WATCHED_PORTS: Array<u8> = Array::with_max_entries(watch::PORTS, 0);

#[map]
pub(crate) static SOCKETS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// Sockets that just reached CLOSE. On loopback a late write's RST closes the socket *inside*
/// the send, before `sock_send_length` fires; this keeps the facts for that send to find.
#[map]
pub(crate) static CLOSED_SOCKETS: LruHashMap<u64, SockState> =
    LruHashMap::with_max_entries(4096, 0);

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KernelCounter::COUNT as u32, 0);

/// Payload bytes captured from watched sockets. Separate from EVENTS so a flood of payloads can
/// never crowd out connection lifecycle events. Sized at load (`limits.payload_ring_buffer_bytes`).
#[map]
pub(crate) static PAYLOADS: RingBuf = RingBuf::with_byte_size(1 << 23, 0);

#[map]
pub(crate) static CAPTURE: PerCpuArray<CaptureWalk> = PerCpuArray::with_max_entries(1, 0);

/// Where each captured socket's send and receive stand in their frames, across calls. LRU, so
/// a socket that vanished without a close event costs nothing lasting; reset when a connection
/// starts or ends. Sized at load like SOCKETS.
#[map]
pub(crate) static FRAMES: LruHashMap<u64, SocketFrames> = LruHashMap::with_max_entries(65536, 0);

/// Payload capture's sample shift (see [`capture_sample`]) per service slot (the slot in the
/// upper bits of `WATCHED_PORTS`; entry 0 for services past the 63rd), set by the agent while
/// it runs: above its share of the decoding budget a service follows one healthy connection
/// in 2^shift, so a quiet service is decoded whole beside a busy one.
#[map]
pub(crate) static CAPTURE_SAMPLE_SHIFT: Array<u32> = Array::with_max_entries(watch::SLOTS, 0);

/// [`SampledCalls`] per service slot and role: what the agent scales sampled counts by.
#[map]
pub(crate) static SAMPLED_CALLS: PerCpuArray<SampledCalls> =
    PerCpuArray::with_max_entries(SAMPLED_CALLS_ENTRIES, 0);

/// 1 while the agent has the send/receive programs detached (`limits.socket_probes_on_demand`):
/// a watched connection's peer closing must then wake the agent at once, so it attaches them
/// before a dead write follows. Set by the agent.
#[map]
pub(crate) static LENGTH_PROBES_DETACHED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn length_probes_detached() -> bool {
    LENGTH_PROBES_DETACHED.get(0).is_some_and(|&flag| flag != 0)
}

/// Filled in by the agent at load time (`EbpfLoader::override_global`).
#[no_mangle]
static OFFSETS: ProbeOffsets = ProbeOffsets::UNKNOWN;

/// Header bytes capture may copy per send/receive (the per-call budget); 0 turns capture off.
#[no_mangle]
pub(crate) static CAPTURE_LEN: u32 = 0;

/// Length of a jiffy in ns (the kernel's tick, from the coarse clock's resolution), set by the
/// agent; 0 when unknown, which turns off reading last activity from `struct tcp_sock`.
#[no_mangle]
pub(crate) static NS_PER_JIFFY: u64 = 0;

/// Unread bytes in EVENTS / PAYLOADS past which a record wakes the reader (set by the agent from
/// the ring sizes). Below it records are submitted silently and the agent drains on a timer:
/// one wake-up per batch instead of one per record.
#[no_mangle]
pub(crate) static EVENTS_WAKEUP_BYTES: u64 = 1 << 18;
#[no_mangle]
pub(crate) static PAYLOADS_WAKEUP_BYTES: u64 = 1 << 20;

#[inline(always)]
pub(crate) fn offsets() -> &'static ProbeOffsets {
    // Volatile so the compiler cannot constant-fold the placeholder values.
    unsafe { core::ptr::read_volatile(&&OFFSETS) }
}

#[inline(always)]
pub(crate) fn bump(counter: KernelCounter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
}

/// Counts a healthy capture-eligible call that moved bytes, followed by the sample or not.
#[inline(always)]
pub(crate) fn count_sampled_call(index: u32, followed: bool) {
    if let Some(calls) = SAMPLED_CALLS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run.
        unsafe {
            (*calls).seen += 1;
            (*calls).followed += followed as u64;
        }
    }
}

#[btf_map]
pub(crate) static SK_WATCH: SkStorage<SkWatch> = SkStorage::new();
