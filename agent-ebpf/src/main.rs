//! Kernel side of cacheprobe: tiny tracepoint (and one tc) programs that record facts about TCP
//! sockets on watched service ports. No policy lives here; the agent interprets everything.
#![no_std]
#![no_main]

use agent_common::{
    counter, event_kind, fd_syscall, tcp_state, tcp_trouble, ProbeOffsets, ServiceIndex, SockEvent,
    SockState, TupleLayout, AF_INET, AF_INET6, IPPROTO_TCP, OFFSET_UNKNOWN,
};
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{classifier, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, TracePointContext},
};

/// Filled in by the agent at load time (`EbpfLoader::override_global`).
#[no_mangle]
static OFFSETS: ProbeOffsets = ProbeOffsets::UNKNOWN;

// Sizes are defaults; the agent resizes them from its config before loading.
#[map]
static WATCHED_PORTS: HashMap<u16, ServiceIndex> = HashMap::with_max_entries(64, 0);

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

/// SYN segments (without ACK) seen arriving, by destination port.
#[map]
static SYN_IN: PerCpuHashMap<u16, u64> = PerCpuHashMap::with_max_entries(64, 0);

const EMFILE: i64 = 24;
const ENFILE: i64 = 23;

#[inline(always)]
fn offsets() -> &'static ProbeOffsets {
    // Volatile so the compiler cannot constant-fold the placeholder values.
    unsafe { &*core::ptr::read_volatile(&&OFFSETS) }
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
fn read_sk<T>(sk: u64, offset: u16) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    unsafe { bpf_probe_read_kernel((sk + offset as u64) as *const T) }.ok()
}

#[inline(always)]
fn is_watched(port: u16) -> bool {
    unsafe { WATCHED_PORTS.get(&port) }.is_some()
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
            entry.submit(0);
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
    let sk = tuple.sk;
    let old_state = read_tp::<i32>(ctx, layout.oldstate)? as u8;
    let new_state = read_tp::<i32>(ctx, layout.newstate)? as u8;

    let now = unsafe { bpf_ktime_get_ns() };
    if old_state == tcp_state::CLOSE {
        // A new socket at this address: whatever an earlier one left behind is not its history.
        let _ = CLOSED_SOCKETS.remove(&sk);
    }
    let mut snapshot = match unsafe { SOCKETS.get(&sk) } {
        Some(state) => *state,
        None => SockState::default(),
    };
    if new_state == tcp_state::CLOSE_WAIT && snapshot.peer_closed_ns == 0 {
        snapshot.peer_closed_ns = now;
    }
    if new_state == tcp_state::CLOSE {
        let _ = SOCKETS.remove(&sk);
        let _ = CLOSED_SOCKETS.insert(&sk, &snapshot, 0);
    } else if SOCKETS.insert(&sk, &snapshot, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }
    emit(|event| {
        event.kind = event_kind::STATE;
        event.old_state = old_state;
        event.new_state = new_state;
        fill_tuple(event, &tuple);
        event.state = snapshot;
    });
    Some(())
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let _ = try_length(&ctx, true);
    0
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let _ = try_length(&ctx, false);
    0
}

fn try_length(ctx: &TracePointContext, is_send: bool) -> Option<()> {
    let layout = &offsets().length;
    let protocol: u16 = read_tp(ctx, layout.protocol)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let sk: u64 = read_tp(ctx, layout.sk)?;
    let ret: i32 = read_tp(ctx, layout.ret)?;
    let now = unsafe { bpf_ktime_get_ns() };

    let state_ptr = match SOCKETS.get_ptr_mut(&sk) {
        Some(ptr) => ptr,
        None => {
            if let Some(closed) = unsafe { CLOSED_SOCKETS.get(&sk) } {
                // The address may already belong to a new, unwatched socket (those never pass
                // through our set_state filter to clear the entry): only a socket that is still
                // closed and still on a watched port is the one we remember.
                if closed.peer_closed_ns != 0 && is_same_closed_socket(sk) {
                    let snapshot = *closed;
                    emit_after_peer_close(sk, ret, is_send, &snapshot);
                    return Some(());
                }
            }
            return learn(sk, ret, is_send, now);
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
    Some(())
}

#[inline(always)]
fn is_same_closed_socket(sk: u64) -> bool {
    let layout = &offsets().sock_common;
    let Some(state) = read_sk::<u8>(sk, layout.state) else {
        return false;
    };
    let (Some(local_port), Some(remote_port)) = (
        read_sk::<u16>(sk, layout.num),
        read_sk::<u16>(sk, layout.dport),
    ) else {
        return false;
    };
    state == tcp_state::CLOSE && (is_watched(local_port) || is_watched(u16::from_be(remote_port)))
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
fn learn(sk: u64, ret: i32, is_send: bool, now: u64) -> Option<()> {
    let layout = &offsets().sock_common;
    let local_port: u16 = read_sk(sk, layout.num)?;
    let remote_port = u16::from_be(read_sk::<u16>(sk, layout.dport)?);
    if !is_watched(local_port) && !is_watched(remote_port) {
        return None;
    }
    let tcp_state_now: u8 = read_sk(sk, layout.state)?;
    if tcp_state_now == tcp_state::LISTEN || tcp_state_now == tcp_state::CLOSE {
        return None;
    }
    let family: u16 = read_sk(sk, layout.family)?;
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let saddr: [u8; 4] = read_sk(sk, layout.rcv_saddr)?;
        let daddr: [u8; 4] = read_sk(sk, layout.daddr)?;
        local_addr[..4].copy_from_slice(&saddr);
        remote_addr[..4].copy_from_slice(&daddr);
    } else if family == AF_INET6 {
        local_addr = read_sk(sk, layout.v6_rcv_saddr)?;
        remote_addr = read_sk(sk, layout.v6_daddr)?;
    } else {
        return None;
    }
    let mut state = SockState::default();
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
    if SOCKETS.insert(&sk, &state, 0).is_err() {
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
    if kind == tcp_trouble::RESET_RECEIVED && tuple.sk != 0 {
        // Fires before the kernel moves the socket to CLOSE, so the close sees the reset.
        if let Some(state) = SOCKETS.get_ptr_mut(&tuple.sk) {
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
        fill_tuple(event, &tuple);
    });
    Some(())
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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// tc ingress on Ethernet-framed interfaces (incl. loopback): counts SYNs to watched ports,
/// including those a full listen queue drops before any socket state changes.
#[classifier]
pub fn count_syn_in(ctx: TcContext) -> i32 {
    let _ = try_count_syn(&ctx);
    TC_ACT_UNSPEC
}

fn try_count_syn(ctx: &TcContext) -> Option<()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let tcp_offset = if ethertype == ETH_P_IP {
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if protocol != IPPROTO_TCP as u8 {
            return None;
        }
        ETH_HLEN + ((version_ihl & 0x0f) as usize) * 4
    } else if ethertype == ETH_P_IPV6 {
        let next_header: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        if next_header != IPPROTO_TCP as u8 {
            return None;
        }
        ETH_HLEN + 40
    } else {
        return None;
    };
    let flags: u8 = ctx.load(tcp_offset + 13).ok()?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return None;
    }
    let dport = u16::from_be(ctx.load::<u16>(tcp_offset + 2).ok()?);
    if !is_watched(dport) {
        return None;
    }
    match SYN_IN.get_ptr_mut(&dport) {
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = SYN_IN.insert(&dport, &1, 0);
        }
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
