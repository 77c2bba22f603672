//! Sends and receives on watched sockets (`sock_send_length` / `sock_recv_length`, classic
//! and raw): activity, writes and reads after the peer closed, adoption of older sockets.

use crate::capture::{capture_payload, Draw, NOT_A_SAMPLE};
use crate::lifecycle::{kernel_stamps_activity, peer_still_open};
use crate::maps::{bump, count_sampled_call, offsets, CLOSED_SOCKETS, SOCKETS};
use crate::ring::emit;
use crate::sock::{
    capture_flags, is_closed, is_watched, read_kernel_field, read_key_addresses,
    read_sock_ports_and_state, read_tp, watch_bits, SockPorts,
};
use crate::storage::SkWatch;
use agent_common::{
    sock_flags, KernelCounter, SockEventKind, SockState, TcpState, AF_INET, AF_INET6, IPPROTO_TCP,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::raw_tracepoint, macros::tracepoint,
    programs::RawTracePointContext, programs::TracePointContext,
};

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
    length_on_watched(
        || sk,
        ret,
        is_send,
        &ports,
        tcp_state_now,
        capture,
        protocol,
        |ports: &SockPorts| {
            Draw::new(
                watch_bits(ports.local),
                watch_bits(ports.remote),
                ports,
                || read_key_addresses(sk),
            )
        },
        core::ptr::null_mut(),
    )
}

/// A send or receive on a watched socket, its ports, TCP state and capture flag known (from
/// `struct sock_common`, or from socket-local storage on the tp_btf path, when `storage` is
/// that socket's storage; NULL on the other paths). `sk` gives the socket's address as a
/// number, which costs a helper call on the tp_btf path: it is asked only where the address
/// is used. `draw` makes a healthy captured call's draw in the capture sample ([`Draw::new`];
/// on the tp_btf path the one made before the storage lookup), asked only for such a call.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn length_on_watched(
    sk: impl Fn() -> u64,
    ret: i32,
    is_send: bool,
    ports: &SockPorts,
    tcp_state_now: u8,
    capture: u64,
    protocol: impl FnOnce() -> Option<u16>,
    draw: impl FnOnce(&SockPorts) -> Draw,
    storage: *mut SkWatch,
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
        let draw = draw(ports);
        let followed = draw.followed();
        if ret > 0 {
            count_sampled_call(draw.calls, followed);
        }
        if followed {
            capture_payload(sk(), ret, is_send, Some(ports), draw.tag(), storage);
        }
        return Some(());
    }
    let sk = sk();
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
                        capture_payload(sk, ret, is_send, None, NOT_A_SAMPLE, storage);
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
        capture_payload(sk, ret, is_send, None, NOT_A_SAMPLE, storage);
    }
    Some(())
}

#[inline(always)]
fn emit_after_peer_close(sk: u64, ret: i32, is_send: bool, snapshot: &SockState) {
    emit(|event| {
        event.kind = if is_send {
            SockEventKind::SendAfterPeerClose as u8
        } else {
            SockEventKind::RecvAfterPeerClose as u8
        };
        event.sk = sk;
        event.ret = ret as i64;
        event.state = *snapshot;
    });
}

/// Adopts a watched socket opened before the agent started, from its first send or receive.
/// Reads `struct sock_common` at offsets found in kernel BTF.
pub(crate) fn learn(sk: u64, ports: &SockPorts, ret: i32, is_send: bool, now: u64) -> Option<()> {
    let layout = &offsets().sock_common;
    let local_port = ports.local;
    let remote_port = ports.remote;
    let tcp_state_now: u8 = read_kernel_field(sk, layout.state)?;
    if tcp_state_now == TcpState::Listen as u8 || tcp_state_now == TcpState::Close as u8 {
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
    if tcp_state_now == TcpState::CloseWait as u8 {
        // The peer closed before we met the socket; when is unknown, so date it now.
        state.peer_closed_ns = now;
    }
    if SOCKETS.insert(sk, state, 0).is_err() {
        bump(KernelCounter::SocketMapFull);
        return None;
    }
    emit(|event| {
        event.kind = SockEventKind::Learned as u8;
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
