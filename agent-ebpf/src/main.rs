//! Kernel side of cacheprobe: tiny tracepoint programs that record facts about TCP sockets on
//! watched service ports. No policy lives here; the agent interprets everything.
#![no_std]
#![no_main]

use agent_common::{
    counter, event_kind, tcp_state, ProbeOffsets, ServiceIndex, SockEvent, SockState, AF_INET,
    AF_INET6, IPPROTO_TCP, OFFSET_UNKNOWN,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};

/// Filled in by the agent at load time (`EbpfLoader::set_global`).
#[no_mangle]
static OFFSETS: ProbeOffsets = ProbeOffsets::UNKNOWN;

/// Sizes are defaults; the agent resizes them from its config before loading.
#[map]
static WATCHED_PORTS: HashMap<u16, ServiceIndex> = HashMap::with_max_entries(64, 0);

#[map]
static SOCKETS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn offsets() -> ProbeOffsets {
    // Volatile so the compiler cannot constant-fold the placeholder values.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
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
            // SAFETY: the reservation is sizeof(SockEvent) bytes; zero it before use so no
            // stale kernel memory reaches user space.
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

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

fn try_set_state(ctx: &TracePointContext) -> Option<()> {
    let off = offsets();
    let protocol: u16 = read_tp(ctx, off.state_protocol)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let local_port: u16 = read_tp(ctx, off.state_sport)?;
    let remote_port: u16 = read_tp(ctx, off.state_dport)?;
    if !is_watched(local_port) && !is_watched(remote_port) {
        return None;
    }
    let sk: u64 = read_tp(ctx, off.state_skaddr)?;
    let old_state = read_tp::<i32>(ctx, off.state_oldstate)? as u8;
    let new_state = read_tp::<i32>(ctx, off.state_newstate)? as u8;
    let family: u16 = read_tp(ctx, off.state_family)?;

    let now = unsafe { bpf_ktime_get_ns() };
    let mut snapshot = match unsafe { SOCKETS.get(&sk) } {
        Some(state) => *state,
        None => SockState::default(),
    };
    if new_state == tcp_state::CLOSE_WAIT && snapshot.peer_closed_ns == 0 {
        snapshot.peer_closed_ns = now;
    }
    if new_state == tcp_state::CLOSE {
        let _ = SOCKETS.remove(&sk);
    } else if SOCKETS.insert(&sk, &snapshot, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }

    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let saddr: [u8; 4] = read_tp(ctx, off.state_saddr)?;
        let daddr: [u8; 4] = read_tp(ctx, off.state_daddr)?;
        local_addr[..4].copy_from_slice(&saddr);
        remote_addr[..4].copy_from_slice(&daddr);
    } else if family == AF_INET6 {
        local_addr = read_tp(ctx, off.state_saddr_v6)?;
        remote_addr = read_tp(ctx, off.state_daddr_v6)?;
    }
    emit(|event| {
        event.kind = event_kind::STATE;
        event.old_state = old_state;
        event.new_state = new_state;
        event.family = family;
        event.local_port = local_port;
        event.remote_port = remote_port;
        event.sk = sk;
        event.local_addr = local_addr;
        event.remote_addr = remote_addr;
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
    let off = offsets();
    let protocol: u16 = read_tp(ctx, off.len_protocol)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let sk: u64 = read_tp(ctx, off.len_sk)?;
    let ret: i32 = read_tp(ctx, off.len_ret)?;
    let now = unsafe { bpf_ktime_get_ns() };

    let state_ptr = match SOCKETS.get_ptr_mut(&sk) {
        Some(ptr) => ptr,
        None => return learn(ctx, &off, sk, ret, is_send, now),
    };
    // SAFETY: pointer into a map value owned by the kernel for the duration of this program.
    // Concurrent updates of one socket from two CPUs can lose an increment; both sides then
    // still agree on "activity happened", which is what the timestamps are for.
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
        emit(|event| {
            event.kind = if is_send {
                event_kind::SEND_AFTER_PEER_CLOSE
            } else {
                event_kind::RECV_AFTER_PEER_CLOSE
            };
            event.sk = sk;
            event.ret = ret as i64;
            event.state = snapshot;
        });
    }
    Some(())
}

/// Adopts a watched socket that was opened before the agent started, from its first send or
/// receive. Reads `struct sock_common` at offsets found in kernel BTF.
fn learn(
    _ctx: &TracePointContext,
    off: &ProbeOffsets,
    sk: u64,
    ret: i32,
    is_send: bool,
    now: u64,
) -> Option<()> {
    let local_port: u16 = read_sk(sk, off.skc_num)?;
    let remote_port = u16::from_be(read_sk::<u16>(sk, off.skc_dport)?);
    if !is_watched(local_port) && !is_watched(remote_port) {
        return None;
    }
    let tcp_state_now: u8 = read_sk(sk, off.skc_state)?;
    if tcp_state_now == tcp_state::LISTEN || tcp_state_now == tcp_state::CLOSE {
        return None;
    }
    let family: u16 = read_sk(sk, off.skc_family)?;
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let saddr: [u8; 4] = read_sk(sk, off.skc_rcv_saddr)?;
        let daddr: [u8; 4] = read_sk(sk, off.skc_daddr)?;
        local_addr[..4].copy_from_slice(&saddr);
        remote_addr[..4].copy_from_slice(&daddr);
    } else if family == AF_INET6 {
        local_addr = read_sk(sk, off.skc_v6_rcv_saddr)?;
        remote_addr = read_sk(sk, off.skc_v6_daddr)?;
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
