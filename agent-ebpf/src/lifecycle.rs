//! TCP state changes of watched sockets (`inet_sock_set_state`, classic and tp_btf): the
//! per-socket facts kept in SOCKETS and the STATE events.

use crate::maps::{
    bump, length_probes_detached, offsets, CLOSED_SOCKETS, FRAMES, NS_PER_JIFFY, SOCKETS,
};
use crate::ring::emit_with;
use crate::sock::{
    capture_flags, fill_tuple, read_kernel_field, read_sock_tuple, read_tp, read_watched_tuple,
    scalar_arg, Tuple,
};
use agent_common::{
    sock_flags, KernelCounter, SockEventKind, SockState, TcpState, IPPROTO_TCP, OFFSET_UNKNOWN,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, helpers::generated::bpf_jiffies64, macros::btf_tracepoint,
    macros::tracepoint, programs::BtfTracePointContext, programs::TracePointContext, EbpfContext,
};

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

/// A state change of a watched TCP socket, however it was read.
#[inline(always)]
fn set_state(tuple: &Tuple, old_state: u8, new_state: u8) -> Option<()> {
    let sk = tuple.sk;
    let now = unsafe { bpf_ktime_get_ns() };
    // A new socket at this address (a connect, or a listener's child): whatever an earlier one
    // left behind is not its history, neither its closed record nor a SOCKETS entry a racing
    // send re-learned after its close (whose `peer_closed_ns` would make this connection's
    // sends look like dead writes).
    let new_socket = old_state == TcpState::Close as u8 || old_state == TcpState::Listen as u8;
    if new_socket {
        let _ = CLOSED_SOCKETS.remove(sk);
    }
    let known = if new_socket {
        None
    } else {
        unsafe { SOCKETS.get(sk) }
    };
    let mut snapshot = match known {
        Some(state) => *state,
        None => SockState {
            flags: capture_flags(tuple.local_port, tuple.remote_port),
            ..SockState::default()
        },
    };
    if new_state == TcpState::CloseWait as u8 && snapshot.peer_closed_ns == 0 {
        snapshot.peer_closed_ns = now;
        if let Some(seq) = write_seq(sk) {
            snapshot.write_seq_at_peer_close = seq;
            snapshot.flags |= sock_flags::SEQ_AT_PEER_CLOSE;
        }
    }
    // Leaving CLOSE_WAIT (the application's close or shutdown, before its FIN is queued; or a
    // reset): what was written since the peer closed is now final, seen by the send programs
    // or not (they may be off, see `limits.socket_probes_on_demand`).
    if old_state == TcpState::CloseWait as u8 && snapshot.flags & sock_flags::SEQ_AT_PEER_CLOSE != 0
    {
        if let Some(seq) = write_seq(sk) {
            snapshot.write_seq_at_leave = seq;
            snapshot.flags |= sock_flags::SEQ_AT_LEAVE;
        }
    }
    if was_connected(old_state) {
        if let Some(last) = kernel_last_activity_ns(sk, now) {
            snapshot.last_activity_ns = core::cmp::max(snapshot.last_activity_ns, last);
        }
    }
    if new_state == TcpState::Established as u8 || new_state == TcpState::Close as u8 {
        // A stream starts or ends here: no frame position carries over to whatever socket
        // gets this address next.
        let _ = FRAMES.remove(sk);
    }
    if new_state == TcpState::Close as u8 {
        // Closed first, then out of SOCKETS: a send or receive on another CPU in between finds
        // the socket in one of the two maps, and so does not learn the dead socket again.
        let _ = CLOSED_SOCKETS.insert(sk, snapshot, 0);
        let _ = SOCKETS.remove(sk);
    } else if SOCKETS.insert(sk, snapshot, 0).is_err() {
        bump(KernelCounter::SocketMapFull);
    }
    // The peer closed (or reset) while the send/receive programs are off: the agent attaches
    // them on this event, so it must not wait for the ring's threshold or its timer.
    let urgent = (new_state == TcpState::CloseWait as u8
        || (new_state == TcpState::Close as u8 && snapshot.peer_closed_ns != 0))
        && length_probes_detached();
    emit_with(urgent, |event| {
        event.kind = SockEventKind::State as u8;
        event.old_state = old_state;
        event.new_state = new_state;
        fill_tuple(event, tuple);
        event.state = snapshot;
    });
    Some(())
}

/// `tcp_sock.write_seq`: the sequence number of the next byte the application writes.
#[inline(always)]
fn write_seq(sk: u64) -> Option<u32> {
    read_kernel_field(sk, offsets().tcp_write_seq)
}

/// States a socket leaves only after its handshake completed, so the kernel's data send and
/// receive stamps in `struct tcp_sock` are set (before, they are 0 or stale).
#[inline(always)]
fn was_connected(state: u8) -> bool {
    matches!(
        TcpState::try_from(state),
        Ok(TcpState::Established
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::CloseWait
            | TcpState::LastAck
            | TcpState::Closing)
    )
}

/// Whether last activity comes from `struct tcp_sock` (see [`kernel_last_activity_ns`]) rather
/// than from stamps taken on every send and receive.
#[inline(always)]
pub(crate) fn kernel_stamps_activity() -> bool {
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
pub(crate) fn peer_still_open(state: u8) -> bool {
    matches!(
        TcpState::try_from(state),
        Ok(TcpState::Established
            | TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::FinWait1
            | TcpState::FinWait2)
    )
}
