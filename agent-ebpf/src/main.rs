//! Kernel side of cacheprobe: tiny tracepoint programs that record facts about TCP
//! sockets on watched service ports. No policy lives here; the agent interprets everything.
// The object is built for bpfel-unknown-none; on the host (`cargo clippy --workspace`) it is
// checked as an ordinary binary, so lints cover the kernel code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use agent_common::{
    capture_sample, counter, event_kind, fd_syscall,
    framing::{self, FrameState, SocketFrames},
    io_syscall, payload_flags, sock_flags, tcp_state, tcp_trouble, watch, PayloadHeader,
    ProbeOffsets, SegmentHeader, SockEvent, SockState, TupleLayout, AF_INET, AF_INET6,
    CAPTURE_MAX_STEPS, CAPTURE_PIECE, IPPROTO_TCP, OFFSET_UNKNOWN, PAYLOAD_HEADER_LEN,
    RECORD_DATA_MAX, SEGMENT_HEADER_LEN,
};
use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_jiffies64, bpf_loop,
            bpf_probe_read_user as probe_read_user_raw, bpf_ringbuf_output, bpf_sk_storage_get,
            bpf_skc_to_tcp_sock, bpf_task_pt_regs,
        },
    },
    macros::{btf_map, btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};

/// Filled in by the agent at load time (`EbpfLoader::override_global`).
#[no_mangle]
static OFFSETS: ProbeOffsets = ProbeOffsets::UNKNOWN;

// Sizes are defaults; the agent resizes them from its config before loading.

/// [`watch`] bits by port. An array, because its lookup is inlined into a bounds check and a
/// load: the send/receive probes consult it for every send and receive.
#[map]
static WATCHED_PORTS: Array<u8> = Array::with_max_entries(watch::PORTS, 0);

#[map]
static SOCKETS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// Sockets that just reached CLOSE. On loopback a late write's RST closes the socket *inside*
/// the send, before `sock_send_length` fires; this keeps the facts for that send to find.
#[map]
static CLOSED_SOCKETS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(4096, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Payload bytes captured from watched sockets. Separate from EVENTS so a flood of payloads can
/// never crowd out connection lifecycle events. Sized at load (`limits.payload_ring_buffer_bytes`).
#[map]
static PAYLOADS: RingBuf = RingBuf::with_byte_size(1 << 23, 0);

/// Per-CPU state of one call's capture: the record being built (its header, then twice its data
/// size, because the verifier bounds a copy's offset and length separately), and where the walk
/// through the call's buffers stands. The record goes to the ring with a bounded length.
#[repr(C)]
struct CaptureWalk {
    header: PayloadHeader,
    data: [u8; 2 * RECORD_DATA_MAX],
    frames: FrameState,
    total: u64,
    pos: u64,
    budget: u64,
    data_len: u64,
    /// Data offset of the open segment's header, or NO_SEGMENT.
    segment: u64,
    /// Call offset where the open segment ends: a piece starting there extends it.
    segment_end: u64,
    flags: u64,
    /// Record data offset of the piece being scanned, how far the scan is into it, its length.
    scan_at: u64,
    scan_pos: u64,
    scan_len: u64,
    iov: u64,
    iov_count: u64,
    iov_index: u64,
    iov_base: u64,
    iov_len: u64,
    iov_off: u64,
}

#[map]
static CAPTURE: PerCpuArray<CaptureWalk> = PerCpuArray::with_max_entries(1, 0);

/// Where each captured socket's send and receive stand in their frames, across calls. LRU, so
/// a socket that vanished without a close event costs nothing lasting; reset when a connection
/// starts or ends. Sized at load like SOCKETS.
#[map]
static FRAMES: LruHashMap<u64, SocketFrames> = LruHashMap::with_max_entries(65536, 0);

/// Most iovec entries followed in one call (the kernel's UIO_MAXIOV).
const IOV_MAX: u64 = 1024;

/// Payload capture's sample shift (see [`capture_sample`]), set by the agent while it runs:
/// above its decoding budget it follows one healthy connection in 2^shift.
#[map]
static CAPTURE_SAMPLE_SHIFT: Array<u32> = Array::with_max_entries(1, 0);

/// Header bytes capture may copy per send/receive (the per-call budget); 0 turns capture off.
#[no_mangle]
static CAPTURE_LEN: u32 = 0;

/// Length of a jiffy in ns (the kernel's tick, from the coarse clock's resolution), set by the
/// agent; 0 when unknown, which turns off reading last activity from `struct tcp_sock`.
#[no_mangle]
static NS_PER_JIFFY: u64 = 0;

/// Unread bytes in EVENTS / PAYLOADS past which a record wakes the reader (set by the agent from
/// the ring sizes). Below it records are submitted silently and the agent drains on a timer:
/// one wake-up per batch instead of one per record.
#[no_mangle]
static EVENTS_WAKEUP_BYTES: u64 = 1 << 18;
#[no_mangle]
static PAYLOADS_WAKEUP_BYTES: u64 = 1 << 20;

const EMFILE: i64 = 24;
const ENFILE: i64 = 23;

#[inline(always)]
fn offsets() -> &'static ProbeOffsets {
    // Volatile so the compiler cannot constant-fold the placeholder values.
    unsafe { core::ptr::read_volatile(&&OFFSETS) }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn read_tp<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[inline(always)]
fn read_kernel_field<T>(base: u64, offset: u16) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

#[inline(always)]
fn watch_bits(port: u16) -> u8 {
    WATCHED_PORTS.get(port as u32).copied().unwrap_or(0)
}

#[inline(always)]
fn is_watched(port: u16) -> bool {
    watch_bits(port) & watch::WATCHED != 0
}

#[inline(always)]
fn capture_flags(local_port: u16, remote_port: u16) -> u64 {
    // The service is whichever port is watched, the local one first (as a server).
    let bits = match watch_bits(local_port) {
        0 => watch_bits(remote_port),
        bits => bits,
    };
    if bits & watch::CAPTURE != 0 {
        sock_flags::CAPTURE
    } else {
        0
    }
}

/// Ring space a record of `len` bytes takes: an 8-byte header, rounded up to 8.
const fn ring_footprint(len: u64) -> u64 {
    (len + 8 + 7) & !7
}

/// Submit flags for a record of `len` bytes when `unread_before` bytes were waiting: wake the
/// reader only when this record takes the unread data across `threshold`. Crossing, not
/// "above": a reader that is already behind is busy reading, and forcing a wake-up (an
/// irq_work, a self-IPI under virtualisation) for every further record would cost the most
/// exactly when the machine is saturated. A crossing the reader misses is caught by its timer.
#[inline(always)]
fn wakeup_flags(unread_before: u64, len: u64, threshold: u64) -> u64 {
    if unread_before < threshold && unread_before + ring_footprint(len) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn emit(fill: impl FnOnce(&mut SockEvent)) {
    match EVENTS.reserve::<SockEvent>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            // SAFETY: the reservation is sizeof(SockEvent) bytes; zero it first so no stale
            // kernel memory reaches user space.
            unsafe {
                core::ptr::write_bytes(event, 0, 1);
                let event = &mut *event;
                event.ts_ns = bpf_ktime_get_ns();
                event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
                if let Ok(comm) = bpf_get_current_comm() {
                    event.comm = comm;
                }
                fill(event);
            }
            let threshold = unsafe { core::ptr::read_volatile(&EVENTS_WAKEUP_BYTES) };
            let len = core::mem::size_of::<SockEvent>() as u64;
            // The reservation already counts as unread.
            let unread = EVENTS
                .query(BPF_RB_AVAIL_DATA as u64)
                .saturating_sub(ring_footprint(len));
            entry.submit(wakeup_flags(unread, len, threshold));
        }
        None => bump(counter::RINGBUF_FULL),
    }
}

/// A TCP connection's identity as a tracepoint reports it.
struct Tuple {
    sk: u64,
    state: u8,
    family: u16,
    local_port: u16,
    remote_port: u16,
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
}

/// Reads ports first (cheap) and stops unless one of them is watched.
#[inline(always)]
fn read_watched_tuple(ctx: &TracePointContext, layout: &TupleLayout) -> Option<Tuple> {
    let mut tuple = Tuple {
        sk: 0,
        state: 0,
        family: 0,
        local_port: 0,
        remote_port: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if layout.sport != OFFSET_UNKNOWN {
        tuple.local_port = read_tp(ctx, layout.sport)?;
        tuple.remote_port = read_tp(ctx, layout.dport)?;
        if !is_watched(tuple.local_port) && !is_watched(tuple.remote_port) {
            return None;
        }
        tuple.family = read_tp(ctx, layout.family)?;
        if tuple.family == AF_INET {
            let saddr: [u8; 4] = read_tp(ctx, layout.saddr)?;
            let daddr: [u8; 4] = read_tp(ctx, layout.daddr)?;
            tuple.local_addr[..4].copy_from_slice(&saddr);
            tuple.remote_addr[..4].copy_from_slice(&daddr);
        } else if tuple.family == AF_INET6 {
            tuple.local_addr = read_tp(ctx, layout.saddr_v6)?;
            tuple.remote_addr = read_tp(ctx, layout.daddr_v6)?;
        }
    } else {
        // struct sockaddr_in / sockaddr_in6: family (host order), port (network order), address.
        let src: [u8; 28] = read_tp(ctx, layout.sockaddr_src)?;
        let dst: [u8; 28] = read_tp(ctx, layout.sockaddr_dst)?;
        tuple.local_port = u16::from_be_bytes([src[2], src[3]]);
        tuple.remote_port = u16::from_be_bytes([dst[2], dst[3]]);
        if !is_watched(tuple.local_port) && !is_watched(tuple.remote_port) {
            return None;
        }
        tuple.family = u16::from_ne_bytes([src[0], src[1]]);
        if tuple.family == AF_INET {
            tuple.local_addr[..4].copy_from_slice(&src[4..8]);
            tuple.remote_addr[..4].copy_from_slice(&dst[4..8]);
        } else if tuple.family == AF_INET6 {
            tuple.local_addr.copy_from_slice(&src[8..24]);
            tuple.remote_addr.copy_from_slice(&dst[8..24]);
        }
    }
    if layout.skaddr != OFFSET_UNKNOWN {
        tuple.sk = read_tp(ctx, layout.skaddr).unwrap_or(0);
    }
    if layout.state != OFFSET_UNKNOWN {
        tuple.state = read_tp::<i32>(ctx, layout.state).unwrap_or(0) as u8;
    }
    Some(tuple)
}

#[inline(always)]
fn fill_tuple(event: &mut SockEvent, tuple: &Tuple) {
    event.sk = tuple.sk;
    event.family = tuple.family;
    event.local_port = tuple.local_port;
    event.remote_port = tuple.remote_port;
    event.local_addr = tuple.local_addr;
    event.remote_addr = tuple.remote_addr;
}

/// The classic tracepoint: the fallback where kernel BTF cannot confirm the tp_btf program's
/// arguments (it attaches through perf_event_open, which Debian's perf_event_paranoid=3 refuses
/// without CAP_SYS_ADMIN).
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

fn try_set_state(ctx: &TracePointContext) -> Option<()> {
    let layout = &offsets().set_state;
    let protocol: u16 = read_tp(ctx, layout.protocol)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let tuple = read_watched_tuple(ctx, &layout.tuple)?;
    let old_state = read_tp::<i32>(ctx, layout.oldstate)? as u8;
    let new_state = read_tp::<i32>(ctx, layout.newstate)? as u8;
    set_state(&tuple, old_state, new_state)
}

/// The same hook through a bpf() link (tp_btf: `const struct sock *sk, int oldstate, int
/// newstate`), preferred wherever kernel BTF confirms those arguments: the connection's
/// identity is read from `struct sock_common` at offsets from BTF, as the classic tracepoint's
/// record would give it.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state_events(ctx: BtfTracePointContext) -> u32 {
    let sk = scalar_arg(ctx.as_ptr(), 0);
    let old_state = ctx.arg::<u64>(1) as u8;
    let new_state = ctx.arg::<u64>(2) as u8;
    let _ = try_btf_set_state(sk, old_state, new_state);
    0
}

#[inline(always)]
fn try_btf_set_state(sk: u64, old_state: u8, new_state: u8) -> Option<()> {
    let tuple = read_sock_tuple(sk, true)?;
    if read_kernel_field::<u16>(sk, offsets().sk_protocol)? != IPPROTO_TCP {
        return None;
    }
    set_state(&tuple, old_state, new_state)
}

/// A socket's identity read from `struct sock_common` (also the head of a `struct
/// request_sock`): ports first, and nothing more unless one of them is watched. A full socket
/// (`inet_sock`) gives its local port from `inet_sport`, which stays set while the socket
/// closes (see [`ProbeOffsets::inet_sport`]); a request socket from `skc_num`.
#[inline(always)]
fn read_sock_tuple(sk: u64, full_socket: bool) -> Option<Tuple> {
    if sk == 0 {
        return None;
    }
    let (mut ports, state) = read_sock_ports_and_state(sk)?;
    if full_socket {
        ports.local = u16::from_be(read_kernel_field::<u16>(sk, offsets().inet_sport)?);
    }
    if !is_watched(ports.local) && !is_watched(ports.remote) {
        return None;
    }
    let layout = &offsets().sock_common;
    let mut tuple = Tuple {
        sk,
        state,
        family: read_kernel_field(sk, layout.family)?,
        local_port: ports.local,
        remote_port: ports.remote,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = read_kernel_field(sk, layout.rcv_saddr)?;
        let daddr: [u8; 4] = read_kernel_field(sk, layout.daddr)?;
        tuple.local_addr[..4].copy_from_slice(&saddr);
        tuple.remote_addr[..4].copy_from_slice(&daddr);
    } else if tuple.family == AF_INET6 {
        tuple.local_addr = read_kernel_field(sk, layout.v6_rcv_saddr)?;
        tuple.remote_addr = read_kernel_field(sk, layout.v6_daddr)?;
    }
    Some(tuple)
}

/// A state change of a watched TCP socket, however it was read.
#[inline(always)]
fn set_state(tuple: &Tuple, old_state: u8, new_state: u8) -> Option<()> {
    let sk = tuple.sk;
    let now = unsafe { bpf_ktime_get_ns() };
    if old_state == tcp_state::CLOSE || old_state == tcp_state::LISTEN {
        // A new socket at this address (a connect, or a listener's child): whatever an earlier
        // one left behind is not its history.
        let _ = CLOSED_SOCKETS.remove(sk);
    }
    let mut snapshot = match unsafe { SOCKETS.get(sk) } {
        Some(state) => *state,
        None => SockState {
            flags: capture_flags(tuple.local_port, tuple.remote_port),
            ..SockState::default()
        },
    };
    if new_state == tcp_state::CLOSE_WAIT && snapshot.peer_closed_ns == 0 {
        snapshot.peer_closed_ns = now;
    }
    if was_connected(old_state) {
        if let Some(last) = kernel_last_activity_ns(sk, now) {
            snapshot.last_activity_ns = core::cmp::max(snapshot.last_activity_ns, last);
        }
    }
    if new_state == tcp_state::ESTABLISHED || new_state == tcp_state::CLOSE {
        // A stream starts or ends here: no frame position carries over to whatever socket
        // gets this address next.
        let _ = FRAMES.remove(sk);
    }
    if new_state == tcp_state::CLOSE {
        let _ = SOCKETS.remove(sk);
        let _ = CLOSED_SOCKETS.insert(sk, snapshot, 0);
    } else if SOCKETS.insert(sk, snapshot, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }
    emit(|event| {
        event.kind = event_kind::STATE;
        event.old_state = old_state;
        event.new_state = new_state;
        fill_tuple(event, tuple);
        event.state = snapshot;
    });
    Some(())
}

/// States a socket leaves only after its handshake completed, so the kernel's data send and
/// receive stamps in `struct tcp_sock` are set (before, they are 0 or stale).
#[inline(always)]
fn was_connected(state: u8) -> bool {
    matches!(
        state,
        tcp_state::ESTABLISHED
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING
    )
}

/// Whether last activity comes from `struct tcp_sock` (see [`kernel_last_activity_ns`]) rather
/// than from stamps taken on every send and receive.
#[inline(always)]
fn kernel_stamps_activity() -> bool {
    let layout = offsets();
    layout.tcp_lsndtime != OFFSET_UNKNOWN
        && layout.tcp_lrcvtime != OFFSET_UNKNOWN
        && unsafe { core::ptr::read_volatile(&NS_PER_JIFFY) } != 0
}

/// Monotonic ns of the socket's last data sent or received, from the kernel's own jiffy stamps
/// (`lsndtime`, `icsk_ack.lrcvtime`): exact to a tick, and free on the send/receive path.
#[inline(always)]
fn kernel_last_activity_ns(sk: u64, now: u64) -> Option<u64> {
    if !kernel_stamps_activity() {
        return None;
    }
    let layout = offsets();
    let sent: u32 = read_kernel_field(sk, layout.tcp_lsndtime)?;
    let received: u32 = read_kernel_field(sk, layout.tcp_lrcvtime)?;
    let jiffies = unsafe { bpf_jiffies64() } as u32;
    // u32 jiffies wrap: the later stamp is the one fewer ticks ago.
    let ticks_ago = core::cmp::min(jiffies.wrapping_sub(sent), jiffies.wrapping_sub(received));
    // At most 2^32 ticks of at most 10 ms (the agent's bound): no overflow.
    let ago_ns = (ticks_ago as u64) * unsafe { core::ptr::read_volatile(&NS_PER_JIFFY) };
    if ago_ns >= now {
        return None;
    }
    Some(now - ago_ns)
}

/// Before the peer closes, a send or receive on a watched socket tells nothing the kernel does
/// not already keep (see [`kernel_last_activity_ns`]).
#[inline(always)]
fn peer_still_open(state: u8) -> bool {
    matches!(
        state,
        tcp_state::ESTABLISHED
            | tcp_state::SYN_SENT
            | tcp_state::SYN_RECV
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
    )
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    if let Some((protocol, sk, ret)) = read_length_fields(&ctx) {
        if protocol == IPPROTO_TCP {
            let _ = try_length(sk, ret, true, || Some(protocol));
        }
    }
    0
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    if let Some((protocol, sk, ret)) = read_length_fields(&ctx) {
        if protocol == IPPROTO_TCP {
            let _ = try_length(sk, ret, false, || Some(protocol));
        }
    }
    0
}

// The same two hooks as raw tracepoints, preferred where BTF confirms their arguments: the
// kernel hands over (sk, ret, flags) without first building the trace record, which is most of
// a classic tracepoint's cost on a path that runs for every TCP send and receive.

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn raw_sock_send_length(ctx: RawTracePointContext) -> u32 {
    raw_length(&ctx, true)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn raw_sock_recv_length(ctx: RawTracePointContext) -> u32 {
    raw_length(&ctx, false)
}

#[inline(always)]
fn raw_length(ctx: &RawTracePointContext, is_send: bool) -> u32 {
    let sk: u64 = ctx.arg(0);
    // An int argument, widened to u64 by the kernel: its low 32 bits are the value.
    let ret = ctx.arg::<u64>(1) as u32 as i32;
    // The protocol is read only when the socket turns out to matter (see try_length).
    let _ = try_length(sk, ret, is_send, || {
        read_kernel_field::<u16>(sk, offsets().sock_protocol)
    });
    0
}

/// The fields of sock_send_length / sock_recv_length this program needs: (protocol, sk, ret).
#[inline(always)]
fn read_length_fields(ctx: &TracePointContext) -> Option<(u16, u64, i32)> {
    let layout = &offsets().length;
    if layout.protocol == layout.sk + 10 && layout.ret == layout.sk + 12 {
        // The layout of every kernel so far (sk, family, protocol, ret): one read, not three.
        let block: [u8; 16] = read_tp(ctx, layout.sk)?;
        let [s0, s1, s2, s3, s4, s5, s6, s7, _, _, p0, p1, r0, r1, r2, r3] = block;
        return Some((
            u16::from_ne_bytes([p0, p1]),
            u64::from_ne_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            i32::from_ne_bytes([r0, r1, r2, r3]),
        ));
    }
    Some((
        read_tp(ctx, layout.protocol)?,
        read_tp(ctx, layout.sk)?,
        read_tp(ctx, layout.ret)?,
    ))
}

// ---- the socket-local-storage path (tp_btf; issue 19). Watched TCP sockets carry a small
// SkWatch in their own storage, made when the connection is first seen: at a state change, or
// by the `adopt_tcp` iterator the agent runs once at attach for connections that predate it.
// The per-op programs then do one storage lookup and return at the first NULL, with no port
// read and no hash lookup; the storage dies with the socket, so nothing is evicted or stale.
// Kernels without these hooks or helpers keep the raw/classic programs above.

/// What a watched socket's storage holds: its ports (host order), so the per-op program can
/// ask WATCHED_PORTS whether it is still watched and captured (the config can change), and its
/// TCP state as of the last state change (the per-op programs do not read `struct sock`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SkWatch {
    local_port: u16,
    remote_port: u16,
    state: u8,
    _reserved: [u8; 3],
}

#[btf_map]
static SK_WATCH: SkStorage<SkWatch> = SkStorage::new();

#[inline(always)]
fn sk_watch_map() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(SK_WATCH) as *mut core::ffi::c_void
}

/// The storage of `sk` (a BTF-typed socket pointer), created from `init` when given.
#[inline(always)]
fn sk_watch(sk: *mut core::ffi::c_void, init: Option<&mut SkWatch>) -> *mut SkWatch {
    let (value, flags) = match init {
        Some(init) => (
            (init as *mut SkWatch).cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: the helper checks `sk` against the kernel's socket BTF type; a NULL or foreign
    // socket yields NULL.
    unsafe { bpf_sk_storage_get(sk_watch_map(), sk, value, flags) }.cast()
}

/// The n-th argument slot of a BTF context as a plain number. The verifier types a tp_btf
/// argument as a kernel pointer and forbids arithmetic on it (hashing, offsets), so the
/// programs read the slot again through a helper, which yields a scalar.
#[inline(always)]
fn scalar_arg(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    // SAFETY: a read of the context's n-th 8-byte slot, which the program was given.
    unsafe { bpf_probe_read_kernel((ctx as *const u64).wrapping_add(n)) }.unwrap_or(0)
}

/// Creates the storage of a watched TCP socket found at `sk_scalar` (`sk`, the same socket
/// BTF-typed), unless it is listening or gone.
#[inline(always)]
fn watch_socket(sk: *mut core::ffi::c_void, sk_scalar: u64, state: u8) -> Option<()> {
    if matches!(
        state,
        tcp_state::LISTEN | tcp_state::CLOSE | tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV
    ) {
        return None;
    }
    if read_kernel_field::<u16>(sk_scalar, offsets().sock_protocol)? != IPPROTO_TCP {
        return None;
    }
    let ports = read_sock_ports(sk_scalar)?;
    if !is_watched(ports.local) && !is_watched(ports.remote) {
        return None;
    }
    let mut init = SkWatch {
        local_port: ports.local,
        remote_port: ports.remote,
        state,
        _reserved: [0; 3],
    };
    if sk_watch(sk, Some(&mut init)).is_null() {
        bump(counter::SOCKET_MAP_FULL);
    }
    Some(())
}

/// Keeps the storage's TCP state current and makes the storage of a watched connection when
/// it is first seen. Runs beside the classic `inet_sock_set_state`, which still emits events.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let new_state = ctx.arg::<u64>(2) as u8;
    let watch = sk_watch(sk, None);
    if !watch.is_null() {
        // SAFETY: this socket's storage, valid for this program run.
        unsafe { (*watch).state = new_state };
        return 0;
    }
    let _ = watch_socket(sk, scalar_arg(ctx.as_ptr(), 0), new_state);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn btf_sock_send_length(ctx: BtfTracePointContext) -> u32 {
    btf_length(&ctx, true)
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn btf_sock_recv_length(ctx: BtfTracePointContext) -> u32 {
    btf_length(&ctx, false)
}

#[inline(always)]
fn btf_length(ctx: &BtfTracePointContext, is_send: bool) -> u32 {
    let watch = sk_watch(ctx.arg(0), None);
    if watch.is_null() {
        // Not a watched TCP connection: the common case on a busy host, one lookup.
        return 0;
    }
    // SAFETY: this socket's storage, valid for this program run.
    let watch = unsafe { *watch };
    if !is_watched(watch.local_port) && !is_watched(watch.remote_port) {
        return 0;
    }
    let capture = capture_flags(watch.local_port, watch.remote_port);
    if capture == 0 && peer_still_open(watch.state) && kernel_stamps_activity() {
        return 0;
    }
    let sk = scalar_arg(ctx.as_ptr(), 0);
    // An int argument, widened to u64 by the kernel: its low 32 bits are the value.
    let ret = ctx.arg::<u64>(1) as u32 as i32;
    let ports = SockPorts {
        local: watch.local_port,
        remote: watch.remote_port,
    };
    // Storage exists only on TCP sockets.
    let _ = length_on_watched(sk, ret, is_send, &ports, watch.state, capture, || {
        Some(IPPROTO_TCP)
    });
    0
}

/// Adoption for the storage path: run once by the agent after `btf_inet_sock_set_state` is
/// attached (and again when the watched ports change), it gives every established watched TCP
/// connection that predates it its storage. Connections opened later get theirs at their
/// first state change.
#[no_mangle]
#[link_section = "iter/tcp"]
pub fn adopt_tcp(ctx: *mut core::ffi::c_void) -> i32 {
    // struct bpf_iter__tcp: meta, then sk_common, 8-byte slots.
    // SAFETY: the context the kernel hands an iter/tcp program.
    let sk_common = unsafe { *(ctx as *const *mut core::ffi::c_void).wrapping_add(1) };
    if sk_common.is_null() {
        return 0;
    }
    // Full TCP sockets only (not time-wait or request sockets), typed as the helper wants.
    // SAFETY: the helper checks its argument's type.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk_common) } as *mut core::ffi::c_void;
    if tcp.is_null() {
        return 0;
    }
    let sk_scalar = scalar_arg(ctx, 1);
    if let Some(state) = read_kernel_field::<u8>(sk_scalar, offsets().sock_common.state) {
        let _ = watch_socket(tcp, sk_scalar, state);
    }
    0
}

/// `protocol` gives the socket's protocol, which costs a read on the raw path: it is asked
/// only once the socket turns out to be watched and to need more than nothing.
#[inline(always)]
fn try_length(
    sk: u64,
    ret: i32,
    is_send: bool,
    protocol: impl FnOnce() -> Option<u16>,
) -> Option<()> {
    if sk == 0 {
        return None;
    }
    // Most sends on a busy host are on unwatched sockets: their ports are checked first (one
    // read, two inlined array lookups) before any map is touched. (Every socket type embeds
    // sock_common, so the read is valid before the protocol is known.)
    let (ports, tcp_state_now) = read_sock_ports_and_state(sk)?;
    if !is_watched(ports.local) && !is_watched(ports.remote) {
        return None;
    }
    let capture = capture_flags(ports.local, ports.remote);
    length_on_watched(sk, ret, is_send, &ports, tcp_state_now, capture, protocol)
}

/// A send or receive on a watched socket, its ports, TCP state and capture flag known (from
/// `struct sock_common`, or from socket-local storage on the tp_btf path).
#[inline(always)]
fn length_on_watched(
    sk: u64,
    ret: i32,
    is_send: bool,
    ports: &SockPorts,
    tcp_state_now: u8,
    capture: u64,
    protocol: impl FnOnce() -> Option<u16>,
) -> Option<()> {
    let healthy = peer_still_open(tcp_state_now) && kernel_stamps_activity();
    if healthy && capture == 0 {
        // The common case on a healthy connection without capture: whatever the protocol,
        // there is nothing to record.
        return Some(());
    }
    if protocol()? != IPPROTO_TCP {
        return None;
    }
    if healthy {
        // No hash lookup, no clock read: only the capture itself, of the connections followed.
        // (A connection in trouble is always captured below, whatever the sample.)
        // Sampled by connection (address and ports), not by address: see capture_sample.
        let shift = CAPTURE_SAMPLE_SHIFT.get(0).copied().unwrap_or(0);
        // (An unknown offset reads as no txhash: address and ports alone.)
        let txhash = read_kernel_field::<u32>(sk, offsets().sock_txhash).unwrap_or(0);
        let key = capture_sample::key(sk, ports.local, ports.remote, txhash);
        if capture_sample::is_followed(key, shift) {
            let sample = (shift as u8, capture_sample::depth(key) as u8);
            capture_payload(sk, ret, is_send, Some(ports), sample);
        }
        return Some(());
    }
    let now = unsafe { bpf_ktime_get_ns() };

    let state_ptr = match SOCKETS.get_ptr_mut(sk) {
        Some(ptr) => ptr,
        None => {
            if let Some(closed) = unsafe { CLOSED_SOCKETS.get(sk) } {
                // The address may already belong to a new socket: only a socket that is still
                // closed is the one we remember.
                if closed.peer_closed_ns != 0 && is_closed(sk) {
                    let snapshot = *closed;
                    emit_after_peer_close(sk, ret, is_send, &snapshot);
                    // After the event: the agent names a dead write's command from the first
                    // send stamped at or after it.
                    if snapshot.flags & sock_flags::CAPTURE != 0 {
                        capture_payload(sk, ret, is_send, None, NOT_A_SAMPLE);
                    }
                    return Some(());
                }
            }
            return learn(sk, ports, ret, is_send, now);
        }
    };
    // SAFETY: pointer into a map value that stays valid for this program run. Concurrent
    // updates of one socket from two CPUs can lose an increment; the timestamps stay right.
    let state = unsafe { &mut *state_ptr };
    if ret > 0 {
        state.last_activity_ns = now;
        if is_send {
            state.bytes_sent += ret as u64;
        } else {
            state.bytes_received += ret as u64;
        }
    }
    if state.peer_closed_ns != 0 {
        let snapshot = *state;
        emit_after_peer_close(sk, ret, is_send, &snapshot);
    }
    // After any event, as above.
    if state.flags & sock_flags::CAPTURE != 0 {
        capture_payload(sk, ret, is_send, None, NOT_A_SAMPLE);
    }
    Some(())
}

/// A socket's ports, host order, read from `struct sock_common`.
/// `capture_payload`'s `sample` for a connection captured for its trouble, not as a sample.
const NOT_A_SAMPLE: (u8, u8) = (capture_sample::NOT_SAMPLED, 0);

struct SockPorts {
    local: u16,
    remote: u16,
}

impl SockPorts {
    /// From `skc_portpair`: skc_dport (network order), then skc_num (host order).
    #[inline(always)]
    fn from_portpair([d0, d1, n0, n1]: [u8; 4]) -> SockPorts {
        SockPorts {
            local: u16::from_ne_bytes([n0, n1]),
            remote: u16::from_be_bytes([d0, d1]),
        }
    }
}

#[inline(always)]
fn read_sock_ports(sk: u64) -> Option<SockPorts> {
    let layout = &offsets().sock_common;
    if layout.num == layout.dport + 2 {
        // skc_dport and skc_num share the 32-bit skc_portpair: one read instead of two.
        return Some(SockPorts::from_portpair(read_kernel_field(
            sk,
            layout.dport,
        )?));
    }
    Some(SockPorts {
        local: read_kernel_field(sk, layout.num)?,
        remote: u16::from_be(read_kernel_field::<u16>(sk, layout.dport)?),
    })
}

/// The socket's ports and TCP state. skc_portpair, skc_family and skc_state are neighbours in
/// every kernel so far: then one read covers all three.
#[inline(always)]
fn read_sock_ports_and_state(sk: u64) -> Option<(SockPorts, u8)> {
    let layout = &offsets().sock_common;
    if layout.num == layout.dport + 2 && layout.state == layout.dport + 6 {
        let [d0, d1, n0, n1, _, _, state, _]: [u8; 8] = read_kernel_field(sk, layout.dport)?;
        return Some((SockPorts::from_portpair([d0, d1, n0, n1]), state));
    }
    // Unknown state (no offset) reads as 0, which sends every call down the full path.
    Some((
        read_sock_ports(sk)?,
        read_kernel_field(sk, layout.state).unwrap_or(0),
    ))
}

#[inline(always)]
fn is_closed(sk: u64) -> bool {
    read_kernel_field::<u8>(sk, offsets().sock_common.state) == Some(tcp_state::CLOSE)
}

#[inline(always)]
fn emit_after_peer_close(sk: u64, ret: i32, is_send: bool, snapshot: &SockState) {
    emit(|event| {
        event.kind = if is_send {
            event_kind::SEND_AFTER_PEER_CLOSE
        } else {
            event_kind::RECV_AFTER_PEER_CLOSE
        };
        event.sk = sk;
        event.ret = ret as i64;
        event.state = *snapshot;
    });
}

/// Adopts a watched socket opened before the agent started, from its first send or receive.
/// Reads `struct sock_common` at offsets found in kernel BTF.
fn learn(sk: u64, ports: &SockPorts, ret: i32, is_send: bool, now: u64) -> Option<()> {
    let layout = &offsets().sock_common;
    let local_port = ports.local;
    let remote_port = ports.remote;
    let tcp_state_now: u8 = read_kernel_field(sk, layout.state)?;
    if tcp_state_now == tcp_state::LISTEN || tcp_state_now == tcp_state::CLOSE {
        return None;
    }
    // A socket whose move to CLOSE was seen and which no new socket has taken over since: the
    // tracepoint runs before the kernel stores the new state, so a send or receive on another
    // CPU can still read the old one here. Learned now, it would come after its own close and
    // stay in the agent's table, where the next connection at this address is taken for it
    // (a soak missed 1 of 924,365 connection opens, the close counted for the stale entry).
    if unsafe { CLOSED_SOCKETS.get(sk) }.is_some() {
        return None;
    }
    let family: u16 = read_kernel_field(sk, layout.family)?;
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let saddr: [u8; 4] = read_kernel_field(sk, layout.rcv_saddr)?;
        let daddr: [u8; 4] = read_kernel_field(sk, layout.daddr)?;
        local_addr[..4].copy_from_slice(&saddr);
        remote_addr[..4].copy_from_slice(&daddr);
    } else if family == AF_INET6 {
        local_addr = read_kernel_field(sk, layout.v6_rcv_saddr)?;
        remote_addr = read_kernel_field(sk, layout.v6_daddr)?;
    } else {
        return None;
    }
    let mut state = SockState {
        flags: capture_flags(local_port, remote_port),
        ..SockState::default()
    };
    if ret > 0 {
        state.last_activity_ns = now;
        if is_send {
            state.bytes_sent = ret as u64;
        } else {
            state.bytes_received = ret as u64;
        }
    }
    if tcp_state_now == tcp_state::CLOSE_WAIT {
        // The peer closed before we met the socket; when is unknown, so date it now.
        state.peer_closed_ns = now;
    }
    if SOCKETS.insert(sk, state, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
        return None;
    }
    emit(|event| {
        event.kind = event_kind::LEARNED;
        event.new_state = tcp_state_now;
        event.family = family;
        event.local_port = local_port;
        event.remote_port = remote_port;
        event.sk = sk;
        event.local_addr = local_addr;
        event.remote_addr = remote_addr;
        event.state = state;
        event.ret = ret as i64;
    });
    Some(())
}

#[inline(always)]
fn trouble(ctx: &TracePointContext, layout: &TupleLayout, kind: u8) -> Option<()> {
    let tuple = read_watched_tuple(ctx, layout)?;
    trouble_event(&tuple, kind)
}

#[inline(always)]
fn trouble_event(tuple: &Tuple, kind: u8) -> Option<()> {
    if kind == tcp_trouble::RESET_RECEIVED && tuple.sk != 0 {
        // Fires before the kernel moves the socket to CLOSE, so the close sees the reset.
        if let Some(state) = SOCKETS.get_ptr_mut(tuple.sk) {
            let now = unsafe { bpf_ktime_get_ns() };
            unsafe {
                (*state).reset_received_ns = now;
                if (*state).peer_closed_ns == 0 {
                    (*state).peer_closed_ns = now;
                }
            }
        }
    }
    emit(|event| {
        event.kind = event_kind::TCP_TROUBLE;
        event.new_state = kind;
        event.old_state = tuple.state;
        fill_tuple(event, tuple);
    });
    Some(())
}

/// TCP trouble through bpf() links (tp_btf), preferred wherever kernel BTF confirms the
/// arguments; the classic tracepoints below are the fallback. The socket's identity comes from
/// `struct sock_common`. Only TCP sockets reach these hooks.
#[inline(always)]
fn btf_trouble(sk: u64, kind: u8) -> Option<()> {
    let tuple = read_sock_tuple(sk, true)?;
    trouble_event(&tuple, kind)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn btf_tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let _ = btf_trouble(scalar_arg(ctx.as_ptr(), 0), tcp_trouble::RETRANSMIT);
    0
}

/// `(const struct sock *sk, const struct request_sock *req)`: the listener and the request,
/// whose `sock_common` head holds the connection's addresses (the classic record's too).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn btf_tcp_retransmit_synack(ctx: BtfTracePointContext) -> u32 {
    if let Some(mut tuple) = read_sock_tuple(scalar_arg(ctx.as_ptr(), 1), false) {
        tuple.sk = scalar_arg(ctx.as_ptr(), 0);
        // The classic record has no state; a request's (NEW_SYN_RECV) says nothing more.
        tuple.state = 0;
        let _ = trouble_event(&tuple, tcp_trouble::RETRANSMIT_SYNACK);
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    let _ = btf_trouble(scalar_arg(ctx.as_ptr(), 0), tcp_trouble::RESET_RECEIVED);
    0
}

/// `(const struct sock *sk, const struct sk_buff *skb, ...)`. From 6.10 on it also fires with
/// `sk` NULL, for a reset answering a segment no socket took (e.g. a SYN to a closed port):
/// then, as in the classic record, the addresses are the segment's, reversed.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    let sk = scalar_arg(ctx.as_ptr(), 0);
    if sk != 0 {
        let _ = btf_trouble(sk, tcp_trouble::RESET_SENT);
    } else {
        let _ = reset_for_segment(scalar_arg(ctx.as_ptr(), 1));
    }
    0
}

/// Where a transport or network header offset is not set (`skb->transport_header` etc.).
const SKB_HEADER_UNSET: u16 = 0xffff;

#[inline(always)]
fn reset_for_segment(skb: u64) -> Option<()> {
    let layout = offsets();
    if skb == 0 {
        return None;
    }
    let head: u64 = read_kernel_field(skb, layout.skb_head)?;
    let network: u16 = read_kernel_field(skb, layout.skb_network_header)?;
    let transport: u16 = read_kernel_field(skb, layout.skb_transport_header)?;
    if head == 0 || network == SKB_HEADER_UNSET || transport == SKB_HEADER_UNSET {
        return None;
    }
    // struct tcphdr: source, then dest port (network order). The segment came from the remote.
    let [s0, s1, d0, d1]: [u8; 4] =
        unsafe { bpf_probe_read_kernel((head + transport as u64) as *const [u8; 4]) }.ok()?;
    let mut tuple = Tuple {
        sk: 0,
        state: 0,
        family: 0,
        local_port: u16::from_be_bytes([d0, d1]),
        remote_port: u16::from_be_bytes([s0, s1]),
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if !is_watched(tuple.local_port) && !is_watched(tuple.remote_port) {
        return None;
    }
    let ip = head + network as u64;
    let version = unsafe { bpf_probe_read_kernel(ip as *const u8) }.ok()? >> 4;
    if version == 4 {
        // struct iphdr: saddr at 12, daddr at 16.
        let addrs: [u8; 8] = unsafe { bpf_probe_read_kernel((ip + 12) as *const [u8; 8]) }.ok()?;
        tuple.family = AF_INET;
        tuple.remote_addr[..4].copy_from_slice(&addrs[..4]);
        tuple.local_addr[..4].copy_from_slice(&addrs[4..]);
    } else if version == 6 {
        // struct ipv6hdr: saddr at 8, daddr at 24.
        tuple.family = AF_INET6;
        tuple.remote_addr = unsafe { bpf_probe_read_kernel((ip + 8) as *const [u8; 16]) }.ok()?;
        tuple.local_addr = unsafe { bpf_probe_read_kernel((ip + 24) as *const [u8; 16]) }.ok()?;
    } else {
        return None;
    }
    trouble_event(&tuple, tcp_trouble::RESET_SENT)
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().retransmit_skb, tcp_trouble::RETRANSMIT);
    0
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let _ = trouble(
        &ctx,
        &offsets().retransmit_synack,
        tcp_trouble::RETRANSMIT_SYNACK,
    );
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().receive_reset, tcp_trouble::RESET_RECEIVED);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().send_reset, tcp_trouble::RESET_SENT);
    0
}

#[inline(always)]
fn fd_exit(ctx: &TracePointContext, syscall: u8) -> u32 {
    let Some(ret) = read_tp::<i64>(ctx, offsets().sys_exit_ret) else {
        return 0;
    };
    if ret == -EMFILE || ret == -ENFILE {
        emit(|event| {
            event.kind = event_kind::FD_EXHAUSTED;
            event.new_state = syscall;
            event.ret = ret;
        });
    }
    0
}

/// The EMFILE/ENFILE probes through one bpf() link: the raw `sys_exit` tracepoint, `(struct
/// pt_regs *regs, long ret)`. Per-syscall exit events are no raw tracepoints, so this fires for
/// every syscall exit while attached; it is attached only under descriptor pressure (see the
/// agent's fd arming) and leaves at the first compare for every return but -EMFILE/-ENFILE.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_fd(ctx: RawTracePointContext) -> u32 {
    let ret = ctx.arg::<u64>(1) as i64;
    if ret != -EMFILE && ret != -ENFILE {
        return 0;
    }
    let layout = &offsets().fd_syscalls;
    let Some(number) = read_kernel_field::<u64>(ctx.arg::<u64>(0), layout.number) else {
        return 0;
    };
    if let Some(syscall) = (0..fd_syscall::COUNT).find(|&index| layout.numbers[index] == number) {
        emit(|event| {
            event.kind = event_kind::FD_EXHAUSTED;
            event.new_state = syscall as u8;
            event.ret = ret;
        });
    }
    0
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::SOCKET)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::ACCEPT)
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::ACCEPT4)
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::OPEN)
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::OPENAT)
}

#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, fd_syscall::DUP)
}

// ---- payload capture: inside a send or receive on a captured socket, the running syscall's
// user registers name the buffer; a bounded prefix of the bytes moved is copied from it. No
// syscall tracepoint takes part (see `SyscallRegs`).

/// The [`io_syscall`] index of the syscall whose number is `number`.
#[inline(always)]
fn io_syscall_index(numbers: &[u64; io_syscall::COUNT], number: u64) -> Option<usize> {
    (0..io_syscall::COUNT).find(|&index| numbers[index] == number)
}

/// Follows the frames of one send or receive on a captured socket (see
/// [`agent_common::framing`]): frame headers are copied into payload records, value bodies are
/// skipped by their declared length, across iovecs and across calls.
///
/// `ports` is given on the healthy fast path, which never looks the socket up: a socket first
/// captured there that the programs do not know yet existed before the agent and is adopted
/// here (the agent must know its endpoint before its payloads can be decoded).
#[inline(always)]
/// `sample`: (shift, depth) of a record captured as a sample of healthy connections, or
/// [`NOT_A_SAMPLE`].
fn capture_payload(sk: u64, ret: i32, is_send: bool, ports: Option<&SockPorts>, sample: (u8, u8)) {
    if ret <= 0 {
        return;
    }
    let budget = unsafe { core::ptr::read_volatile(&CAPTURE_LEN) } as u64;
    if budget == 0 {
        return;
    }
    let layout = &offsets().syscall_regs;
    // SAFETY: helpers on the current task, whose saved user registers stay valid while it runs
    // this syscall. A kernel thread has none and yields 0.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        bump(counter::UNCAPTURED_SYSCALL);
        return;
    }
    let Some(number) = read_kernel_field::<u64>(regs, layout.number) else {
        return;
    };
    let syscall = match io_syscall_index(&layout.numbers, number) {
        // The direction must agree too: a send inside a read is something else (and the
        // buffer would be wrong).
        Some(syscall) if (syscall % 2 == 1) == is_send => syscall,
        _ => {
            bump(counter::UNCAPTURED_SYSCALL);
            return;
        }
    };
    let Some(buffer) = read_kernel_field::<u64>(regs, layout.second_arg) else {
        return;
    };
    let frames = match FRAMES.get_ptr_mut(sk) {
        Some(frames) => frames,
        None => {
            if let Some(ports) = ports {
                if unsafe { SOCKETS.get(sk) }.is_none() {
                    // Before the record: the adoption event's timestamp must come first.
                    learn(sk, ports, ret, is_send, unsafe { bpf_ktime_get_ns() });
                }
            }
            if FRAMES.insert(sk, SocketFrames::default(), 0).is_err() {
                bump(counter::FRAME_MAP_FULL);
                return;
            }
            match FRAMES.get_ptr_mut(sk) {
                Some(frames) => frames,
                None => return,
            }
        }
    };
    let Some(scratch) = CAPTURE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot (nothing else runs on this CPU during this program) and a
    // map value that stays valid for this program run.
    let (walk, frames) = unsafe { (&mut *scratch, &mut *frames) };
    let state = if is_send {
        &mut frames.send
    } else {
        &mut frames.recv
    };
    state.start_call();
    walk.frames = *state;
    walk.total = ret as u64;
    walk.pos = 0;
    walk.budget = budget;
    walk.data_len = 0;
    walk.segment = NO_SEGMENT;
    walk.segment_end = 0;
    walk.flags = 0;
    match io_syscall::kind(syscall) {
        io_syscall::KIND_BUFFER => {
            walk.iov = 0;
            walk.iov_count = 0;
            walk.iov_base = buffer;
            walk.iov_len = ret as u64;
        }
        io_syscall::KIND_IOVEC | io_syscall::KIND_MSGHDR => {
            let (iov, count) = if io_syscall::kind(syscall) == io_syscall::KIND_IOVEC {
                let count = read_kernel_field::<u64>(regs, layout.third_arg).unwrap_or(0);
                (buffer, count)
            } else {
                // struct user_msghdr is user ABI: msg_iov at 16, msg_iovlen at 24 on 64-bit.
                let [iov, iovlen] =
                    unsafe { bpf_probe_read_user((buffer + 16) as *const [u64; 2]) }
                        .unwrap_or([0, 0]);
                (iov, iovlen)
            };
            walk.iov = iov;
            walk.iov_count = count;
            walk.iov_base = 0;
            walk.iov_len = 0;
        }
        _ => return,
    }
    walk.iov_index = 0;
    walk.iov_off = 0;
    // The call has already moved the socket's sequence number past its bytes: step back to
    // its first byte, the number both ends of the connection know it by.
    let seq_offset = if is_send {
        offsets().tcp_write_seq
    } else {
        offsets().tcp_copied_seq
    };
    let seq = match read_kernel_field::<u32>(sk, seq_offset) {
        Some(next) => {
            walk.flags |= payload_flags::SEQ as u64;
            next.wrapping_sub(ret as u32)
        }
        None => 0,
    };
    let header = &mut walk.header;
    header.seq = seq;
    header.ts_ns = unsafe { bpf_ktime_get_ns() };
    header.sk = sk;
    header.total_len = ret as u64;
    header.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    header.is_send = is_send as u8;
    header.syscall = syscall as u8;
    header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    header.span_start = 0;
    (header.sample_shift, header.sample_depth) = sample;
    let mut loop_ctx = LoopCtx { walk: scratch };
    // SAFETY: the callback is a BPF subprogram taking (index, ctx); ctx is this frame's
    // LoopCtx, which outlives the loop.
    unsafe {
        bpf_loop(
            CAPTURE_MAX_STEPS,
            capture_step as *mut core::ffi::c_void,
            (&mut loop_ctx as *mut LoopCtx).cast(),
            0,
        );
    }
    // The scratch slot is still this CPU's: no second lookup.
    if walk.pos < walk.total {
        walk.flags |= payload_flags::INCOMPLETE as u64;
        walk.frames.mode = framing::mode::LOST;
        bump(counter::CAPTURE_INCOMPLETE);
    }
    *state = walk.frames;
    walk.pos = walk.total;
    flush_record(walk);
}

const NO_SEGMENT: u64 = u64::MAX;

/// What the capture loops' callbacks share: the walk, found once per call instead of by a
/// per-CPU lookup in every callback. Lives on the caller's stack (bpf_loop's context must).
#[repr(C)]
struct LoopCtx {
    walk: *mut CaptureWalk,
}

/// Header bytes fed to the frame state per scan callback. A stride of 8 (the state machine
/// unrolled 8 times in the callback) made the verifier ~7x slower at load (13.2 s against
/// 1.9 s to probes attached, side by side on the loaded 2-core machine), far past the 1 s
/// attach goal, so it stays 1 until the state machine is cheaper to verify.
const SCAN_STRIDE: u64 = 1;

/// The walk behind a loop callback's context.
#[inline(always)]
unsafe fn walk_of<'a>(ctx: *mut core::ffi::c_void) -> Option<&'a mut CaptureWalk> {
    let ctx = ctx as *mut LoopCtx;
    if ctx.is_null() {
        return None;
    }
    let walk = (*ctx).walk;
    if walk.is_null() {
        return None;
    }
    Some(&mut *walk)
}

/// One step of following a call's frames: read the next iovec entry, skip a stretch of value
/// body, or copy and scan one piece of headers. Returns 1 to stop.
#[inline(never)]
unsafe extern "C" fn capture_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some(walk) = walk_of(ctx) else {
        return 1;
    };
    if walk.pos >= walk.total || walk.frames.mode == framing::mode::LOST {
        return 1;
    }
    if walk.iov_off >= walk.iov_len {
        // The current buffer is used up: the next iovec entry.
        if walk.iov_index >= walk.iov_count || walk.iov_index >= IOV_MAX {
            return 1;
        }
        let Ok([base, len]) =
            bpf_probe_read_user((walk.iov + walk.iov_index * 16) as *const [u64; 2])
        else {
            return 1;
        };
        walk.iov_index += 1;
        walk.iov_base = base;
        walk.iov_len = len;
        walk.iov_off = 0;
        return 0;
    }
    let in_buffer = min(walk.iov_len - walk.iov_off, walk.total - walk.pos);
    if !walk.frames.captures() {
        let n = walk.frames.pass(in_buffer);
        walk.pos += n;
        walk.iov_off += n;
        return 0;
    }
    if walk.budget == 0 {
        walk.frames.mode = framing::mode::LOST;
        return 1;
    }
    if walk.data_len + (SEGMENT_HEADER_LEN + CAPTURE_PIECE) as u64 > RECORD_DATA_MAX as u64 {
        flush_record(walk);
        walk.header.span_start = walk.pos as u32;
        return 0;
    }
    let mut piece = min(min(in_buffer, CAPTURE_PIECE as u64), walk.budget);
    if walk.frames.mode == framing::mode::SKIP {
        // A value body's head (its fingerprint): only its own bytes, at most VALUE_HEAD.
        piece = min(piece, walk.frames.head as u64);
    }
    if walk.segment == NO_SEGMENT || walk.segment_end != walk.pos {
        // A new segment, 8-byte aligned.
        let at = ((walk.data_len + 7) & !7) & (RECORD_DATA_MAX as u64 - 1);
        let segment = walk.data.as_mut_ptr().add(at as usize) as *mut SegmentHeader;
        (*segment).offset = walk.pos as u32;
        (*segment).len = 0;
        walk.segment = at;
        walk.data_len = at + SEGMENT_HEADER_LEN as u64;
    }
    let at = walk.data_len & (RECORD_DATA_MAX as u64 - 1);
    let piece = piece & (CAPTURE_PIECE as u64 * 2 - 1);
    let destination = walk.data.as_mut_ptr().add(at as usize);
    let source = walk.iov_base + walk.iov_off;
    if piece == 0
        || probe_read_user_raw(
            destination.cast(),
            piece as u32,
            source as *const core::ffi::c_void,
        ) != 0
    {
        walk.frames.mode = framing::mode::LOST;
        return 1;
    }
    // Scan the piece: header bytes one by one in a loop of their own (so the verifier checks
    // the state machine once), bodies and binary keys inside the piece passed over at once.
    // Every round consumes at least one byte, so CAPTURE_PIECE rounds always finish the piece.
    walk.scan_at = at;
    walk.scan_pos = 0;
    walk.scan_len = piece;
    let mut loop_ctx = LoopCtx {
        walk: walk as *mut CaptureWalk,
    };
    bpf_loop(
        CAPTURE_PIECE as u32,
        scan_round as *mut core::ffi::c_void,
        (&mut loop_ctx as *mut LoopCtx).cast(),
        0,
    );
    let segment = walk
        .data
        .as_mut_ptr()
        .add((walk.segment & (RECORD_DATA_MAX as u64 - 1)) as usize)
        as *mut SegmentHeader;
    (*segment).len += piece as u32;
    walk.data_len += piece;
    walk.budget -= piece;
    walk.pos += piece;
    walk.iov_off += piece;
    walk.segment_end = walk.pos;
    0
}

/// One round of scanning the piece just copied: pass over a body or binary key, or scan
/// header bytes until one starts. Returns 1 when the piece is done.
#[inline(never)]
unsafe extern "C" fn scan_round(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some(walk) = walk_of(ctx) else {
        return 1;
    };
    if walk.scan_pos >= walk.scan_len {
        return 1;
    }
    match walk.frames.mode {
        framing::mode::SKIP | framing::mode::KEEP => {
            walk.scan_pos += walk.frames.pass(walk.scan_len - walk.scan_pos);
        }
        framing::mode::LOST => return 1,
        _ => {
            let rounds = (walk.scan_len - walk.scan_pos).div_ceil(SCAN_STRIDE);
            let mut loop_ctx = LoopCtx {
                walk: walk as *mut CaptureWalk,
            };
            bpf_loop(
                rounds as u32,
                scan_bytes as *mut core::ffi::c_void,
                (&mut loop_ctx as *mut LoopCtx).cast(),
                0,
            );
        }
    }
    0
}

/// Feeds the next [`SCAN_STRIDE`] header bytes of the piece just copied (at `scan_at` in the
/// record) to the frame state; stops where a body or binary key starts.
#[inline(never)]
unsafe extern "C" fn scan_bytes(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some(walk) = walk_of(ctx) else {
        return 1;
    };
    let mut i = 0;
    while i < SCAN_STRIDE {
        if walk.scan_pos >= walk.scan_len {
            return 1;
        }
        let at = (walk.scan_at + walk.scan_pos) as usize & (2 * RECORD_DATA_MAX - 1);
        walk.frames.step(walk.data[at]);
        walk.scan_pos += 1;
        match walk.frames.mode {
            framing::mode::SKIP | framing::mode::KEEP | framing::mode::LOST => return 1,
            _ => {}
        }
        i += 1;
    }
    0
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

/// Sends the record built so far (covering the call up to `walk.pos`) and starts an empty one.
#[inline(always)]
fn flush_record(walk: &mut CaptureWalk) {
    let data_len = walk.data_len & (2 * RECORD_DATA_MAX as u64 - 1);
    walk.header.span_end = walk.pos as u32;
    walk.header.data_len = data_len as u16;
    walk.header.flags = walk.flags as u8;
    let len = PAYLOAD_HEADER_LEN as u64 + data_len;
    let threshold = unsafe { core::ptr::read_volatile(&PAYLOADS_WAKEUP_BYTES) };
    let unread = PAYLOADS.query(BPF_RB_AVAIL_DATA as u64);
    // SAFETY: `len` bytes from the start of the walk lie inside it (the header, then at most
    // 2 * RECORD_DATA_MAX of data room).
    let status = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(PAYLOADS) as *mut core::ffi::c_void,
            (walk as *mut CaptureWalk).cast(),
            len,
            wakeup_flags(unread, len, threshold),
        )
    };
    if status != 0 {
        bump(counter::PAYLOAD_RINGBUF_FULL);
    }
    walk.data_len = 0;
    walk.segment = NO_SEGMENT;
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
