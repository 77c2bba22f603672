//! The socket-local-storage path (tp_btf; issue 19). Watched TCP sockets carry a small
//! SkWatch in their own storage, made when the connection is first seen: at a state change, or
//! by the `adopt_tcp` iterator the agent runs once at attach for connections that predate it.
//! The per-op programs then do one storage lookup and return at the first NULL, with no port
//! read and no hash lookup; the storage dies with the socket, so nothing is evicted or stale.
//! Kernels without these hooks or helpers keep the raw/classic programs of `send_recv`.

use crate::lifecycle::{kernel_stamps_activity, peer_still_open};
use crate::maps::{bump, offsets, SK_WATCH};
use crate::send_recv::length_on_watched;
use crate::sock::{
    capture_flags, is_watched, read_kernel_field, read_sock_ports, scalar_arg, SockPorts,
};
use agent_common::{counter, tcp_state, IPPROTO_TCP};
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get,
    helpers::generated::bpf_skc_to_tcp_sock, macros::btf_tracepoint,
    programs::BtfTracePointContext, EbpfContext,
};

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
