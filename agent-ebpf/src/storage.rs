//! The socket-local-storage path (tp_btf; issue 19). Watched TCP sockets carry a small
//! SkWatch in their own storage, made when the connection is first seen: at a state change, or
//! by the `adopt_tcp` iterator the agent runs once at attach for connections that predate it.
//! The per-op programs first read the socket's ports and state by direct loads (no helper
//! call) and return when there is nothing to record: unwatched sockets, healthy watched ones
//! whose service is not captured, and healthy captured ones the capture sample does not follow.
//! Only followed or unhealthy connections look up their storage. The storage dies with the
//! socket, so nothing is evicted or stale.
//! Kernels without these hooks or helpers keep the raw/classic programs of `send_recv`.

use crate::capture::{key_addresses, Draw};
use crate::lifecycle::{kernel_stamps_activity, peer_still_open};
use crate::maps::{bump, count_sampled_call, offsets, SK_WATCH};
use crate::send_recv::length_on_watched;
use crate::sock::{
    capture_flag, is_watched, load_btf, read_kernel_field, read_sock_ports, scalar_arg,
    service_bits, watch_bits, SockPorts,
};
use agent_common::{
    framing::SocketFrames, watch, KernelCounter, TcpState, AF_INET, AF_INET6, IPPROTO_TCP,
    OFFSET_UNKNOWN,
};
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get,
    helpers::generated::bpf_skc_to_tcp_sock, macros::btf_tracepoint,
    programs::BtfTracePointContext, EbpfContext,
};

/// What a watched socket's storage holds: its ports (host order), so the per-op program can
/// ask WATCHED_PORTS whether it is still watched and captured (the config can change), and its
/// TCP state as of the last state change. (The per-op programs' first test reads both from the
/// socket itself; what follows it, for followed or unhealthy connections, uses these copies.)
/// Capture keeps where the send and receive stand in their frames here too (FRAMES on the other
/// paths), so a captured call does no hash lookup. The sample is no fact of the connection's:
/// it is drawn per call from the 4-tuple and the slot's epoch, which the agent rotates.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SkWatch {
    local_port: u16,
    remote_port: u16,
    state: u8,
    /// 1 once capture has met this connection since it was (re)established: the first meeting
    /// adopts a connection the agent does not know yet (FRAMES' missing entry on other paths).
    pub(crate) captured: u8,
    _reserved: [u8; 2],
    pub(crate) frames: SocketFrames,
}

/// What every watched socket carries: 8 bytes of facts and the 96 of its frames.
const _: () = assert!(core::mem::size_of::<SkWatch>() == 104);

impl SkWatch {
    /// A stream starts or ends: nothing of capture carries over (FRAMES' reset elsewhere).
    #[inline(always)]
    fn reset_capture(&mut self) {
        self.captured = 0;
        self.frames = SocketFrames::default();
    }
}

#[inline(always)]
fn sk_watch_map() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(SK_WATCH) as *mut core::ffi::c_void
}

/// The storage of `sk` (a BTF-typed socket pointer), if it has one; with `create`, made zeroed
/// when it has none.
#[inline(always)]
fn sk_watch(sk: *mut core::ffi::c_void, create: bool) -> *mut SkWatch {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: the helper checks `sk` against the kernel's socket BTF type; a NULL or foreign
    // socket yields NULL. A NULL value with F_CREATE makes a zeroed storage.
    unsafe { bpf_sk_storage_get(sk_watch_map(), sk, core::ptr::null_mut(), flags) }.cast()
}

/// Creates the storage of a watched TCP socket found at `sk_scalar` (`sk`, the same socket
/// BTF-typed), unless it is listening or gone; returns it.
#[inline(always)]
fn watch_socket(sk: *mut core::ffi::c_void, sk_scalar: u64, state: u8) -> Option<*mut SkWatch> {
    if matches!(
        TcpState::try_from(state),
        Ok(TcpState::Listen | TcpState::Close | TcpState::TimeWait | TcpState::NewSynRecv)
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
    // Created zeroed (no 104-byte initial value on the stack, which the per-op programs
    // cannot spare: they make storage for connections the agent has not met), then filled in.
    // A zeroed SkWatch is a fresh one (frames at FRAME_START, not captured): until its ports
    // are in, a reader on another CPU sees an unwatched socket and passes by.
    let watch = sk_watch(sk, true);
    if watch.is_null() {
        bump(KernelCounter::SocketMapFull);
        return None;
    }
    // SAFETY: this socket's storage, valid for this program run.
    unsafe {
        (*watch).local_port = ports.local;
        (*watch).remote_port = ports.remote;
        (*watch).state = state;
    }
    Some(watch)
}

/// Keeps the storage's TCP state current and makes the storage of a watched connection when
/// it is first seen. Runs beside the classic `inet_sock_set_state`, which still emits events.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let new_state = ctx.arg::<u64>(2) as u8;
    let watch = sk_watch(sk, false);
    if !watch.is_null() {
        // SAFETY: this socket's storage, valid for this program run.
        let watch = unsafe { &mut *watch };
        watch.state = new_state;
        if new_state == TcpState::Established as u8 {
            // A client's storage is made at SYN_SENT, before connect() gives an unbound
            // socket its port (skc_num 0 then): the ports as they now are. (The capture
            // sample's key is the 4-tuple: a stale port would draw this end apart from the
            // socket's own draw and from the other end's.)
            let ports = load_ports(sk as *const u8);
            watch.local_port = ports.local;
            watch.remote_port = ports.remote;
        }
        if new_state == TcpState::Established as u8 || new_state == TcpState::Close as u8 {
            watch.reset_capture();
        }
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

/// Whether a send or receive on `sk` has anything to record, from the socket itself: its
/// ports, and its state when one of them is watched (direct loads and the inlined
/// WATCHED_PORTS lookups, no helper call). This is every call on an unwatched socket, on a
/// healthy watched one whose service is not captured (sockets only, and every service without
/// capture), and on a healthy captured one that the sample does not follow: its draw takes the
/// addresses by direct loads too, and the call is counted here. Followed and unhealthy
/// connections go on to their storage; a followed one takes its draw along.
#[inline(always)]
fn first_look(sk: *const u8, ret: i32) -> Next {
    let layout = &offsets().sock_common;
    let ports = load_ports(sk);
    let (local_bits, remote_bits) = (watch_bits(ports.local), watch_bits(ports.remote));
    if (local_bits | remote_bits) & watch::WATCHED == 0 {
        // A full TCP socket's skc_num is cleared when it gives up its port at close, and a
        // write or read can still come after that (a dead write on a server's socket): then
        // only the storage, made while the socket was open, knows its ports.
        if ports.local != 0 {
            return Next::Nothing;
        }
        let family: u16 = load_btf(sk, layout.family);
        return if family != AF_INET && family != AF_INET6 {
            Next::Nothing
        } else {
            Next::Storage(None)
        };
    }
    if !(kernel_stamps_activity() && peer_still_open(load_btf(sk, layout.state))) {
        return Next::Storage(None);
    }
    if service_bits(local_bits, remote_bits) & watch::CAPTURE == 0 {
        return Next::Nothing;
    }
    let draw = Draw::new(local_bits, remote_bits, &ports, || load_key_addresses(sk));
    if draw.followed() {
        return Next::Storage(Some(draw));
    }
    if ret > 0 {
        count_sampled_call(draw.calls, false);
    }
    Next::Nothing
}

/// What [`first_look`] leaves a send or receive to do.
enum Next {
    Nothing,
    /// Go on to the socket's storage; with the draw of a followed call, drawn from the
    /// socket's own 4-tuple (the same draw decides it, not a second one from the storage's
    /// copies).
    Storage(Option<Draw>),
}

/// The socket's (local, remote) ports, by direct loads.
#[inline(always)]
fn load_ports(sk: *const u8) -> SockPorts {
    let layout = &offsets().sock_common;
    if layout.num == layout.dport + 2 {
        // skc_dport and skc_num share the 32-bit skc_portpair: one load.
        SockPorts::from_portpair(load_btf::<u32>(sk, layout.dport).to_ne_bytes())
    } else {
        SockPorts {
            local: load_btf(sk, layout.num),
            remote: u16::from_be(load_btf(sk, layout.dport)),
        }
    }
}

/// The socket's (local, remote) addresses as the capture sample's key takes them
/// ([`key_addresses`]), by direct loads. An IPv6 address is two 8-byte loads inside its
/// `struct in6_addr`.
#[inline(always)]
fn load_key_addresses(sk: *const u8) -> ([u32; 4], [u32; 4]) {
    let layout = &offsets().sock_common;
    let v4 = || {
        if layout.rcv_saddr == layout.daddr + 4 {
            // skc_daddr and skc_rcv_saddr share the 64-bit skc_addrpair: one load.
            let [r0, r1, r2, r3, l0, l1, l2, l3] = load_btf::<u64>(sk, layout.daddr).to_ne_bytes();
            return (
                u32::from_ne_bytes([l0, l1, l2, l3]),
                u32::from_ne_bytes([r0, r1, r2, r3]),
            );
        }
        (load_btf(sk, layout.rcv_saddr), load_btf(sk, layout.daddr))
    };
    let v6 = || {
        (
            load_in6(sk, layout.v6_rcv_saddr),
            load_in6(sk, layout.v6_daddr),
        )
    };
    key_addresses(load_btf(sk, layout.family), v4, v6)
}

/// A `struct in6_addr` member as four native words; 0 on a kernel without IPv6 (the verifier
/// drops the branch that would load at the unknown offset: OFFSETS is constant to it).
#[inline(always)]
fn load_in6(sk: *const u8, offset: u16) -> [u32; 4] {
    if offset == OFFSET_UNKNOWN {
        return [0; 4];
    }
    let [a0, a1, a2, a3, b0, b1, b2, b3] = load_btf::<u64>(sk, offset).to_ne_bytes();
    let [c0, c1, c2, c3, d0, d1, d2, d3] = load_btf::<u64>(sk, offset + 8).to_ne_bytes();
    [
        u32::from_ne_bytes([a0, a1, a2, a3]),
        u32::from_ne_bytes([b0, b1, b2, b3]),
        u32::from_ne_bytes([c0, c1, c2, c3]),
        u32::from_ne_bytes([d0, d1, d2, d3]),
    ]
}

#[inline(always)]
fn btf_length(ctx: &BtfTracePointContext, is_send: bool) -> u32 {
    // An int argument, widened to u64 by the kernel: its low 32 bits are the value.
    let ret = ctx.arg::<u64>(1) as u32 as i32;
    let Next::Storage(drawn) = first_look(ctx.arg(0), ret) else {
        return 0;
    };
    // Followed or unhealthy (or a socket whose ports are gone): the storage keeps what the
    // connection's capture and trouble need, and its own copy of the ports and TCP state.
    let mut storage = sk_watch(ctx.arg(0), false);
    if storage.is_null() {
        // A watched connection the agent has not met: `adopt_tcp` walks only the agent's own
        // network namespace, so a container's pooled connections opened before the agent
        // reach here first. Give it its storage now (once per connection; not a watched TCP
        // connection, or a closed one: none).
        let sk = ctx.arg::<*mut core::ffi::c_void>(0);
        let state: u8 = load_btf(sk as *const u8, offsets().sock_common.state);
        match watch_socket(sk, scalar_arg(ctx.as_ptr(), 0), state) {
            Some(watch) => storage = watch,
            None => return 0,
        }
    }
    // SAFETY: this socket's storage, valid for this program run.
    let (local_port, remote_port, state) = unsafe {
        (
            (*storage).local_port,
            (*storage).remote_port,
            (*storage).state,
        )
    };
    // Each port's bits read once: whether it is watched and whether it is captured.
    let (local_bits, remote_bits) = (watch_bits(local_port), watch_bits(remote_port));
    if (local_bits | remote_bits) & watch::WATCHED == 0 {
        return 0;
    }
    let capture = capture_flag(service_bits(local_bits, remote_bits));
    if capture == 0 && peer_still_open(state) && kernel_stamps_activity() {
        return 0;
    }
    // The socket's address as a number (a helper call), read only where it is used.
    let sk = || scalar_arg(ctx.as_ptr(), 0);
    let ports = SockPorts {
        local: local_port,
        remote: remote_port,
    };
    // Storage exists only on TCP sockets.
    let _ = length_on_watched(
        sk,
        ret,
        is_send,
        &ports,
        state,
        capture,
        || Some(IPPROTO_TCP),
        |ports: &SockPorts| {
            drawn.unwrap_or_else(|| {
                Draw::new(local_bits, remote_bits, ports, || {
                    load_key_addresses(ctx.arg(0))
                })
            })
        },
        storage,
    );
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
