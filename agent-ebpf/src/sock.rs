//! Reading a connection's identity: from a classic tracepoint's record, or from `struct sock`
//! at offsets found in kernel BTF; and whether its ports are watched.

use crate::capture::key_addresses;
use crate::maps::{offsets, WATCHED_PORTS};
use agent_common::{
    sock_flags, watch, SockEvent, TcpState, TupleLayout, AF_INET, AF_INET6, OFFSET_UNKNOWN,
};
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};

#[inline(always)]
pub(crate) fn read_tp<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[inline(always)]
pub(crate) fn read_kernel_field<T>(base: u64, offset: u16) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// A member of the kernel object behind a BTF-typed pointer (a tp_btf `struct sock *`, the
/// `struct pt_regs` of `bpf_task_pt_regs`), by a direct load: no helper call, unlike
/// [`read_kernel_field`]. The verifier allows such a load only at a constant offset. OFFSETS
/// lives in `.rodata`, which aya creates BPF_F_RDONLY_PROG and freezes before any program is
/// loaded, so the verifier reads the offsets there as known constants (a kernel that did not
/// would reject the program, and the agent would fall back to the raw path, which `check`
/// reports). One load per member, of the member's size: the verifier rejects a load that spans
/// two members.
#[inline(always)]
pub(crate) fn load_btf<T: Copy>(base: *const u8, offset: u16) -> T {
    // SAFETY: the kernel turns a load through a BTF-typed pointer into a fault-safe one (a bad
    // or NULL pointer reads 0), and the verifier checks it against the member at `offset`.
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// The n-th argument slot of a BTF context as a plain number. The verifier types a tp_btf
/// argument as a kernel pointer and forbids arithmetic on it (hashing, offsets), so the
/// programs read the slot again through a helper, which yields a scalar.
#[inline(always)]
pub(crate) fn scalar_arg(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    // SAFETY: a read of the context's n-th 8-byte slot, which the program was given.
    unsafe { bpf_probe_read_kernel((ctx as *const u64).wrapping_add(n)) }.unwrap_or(0)
}

#[inline(always)]
pub(crate) fn watch_bits(port: u16) -> u8 {
    WATCHED_PORTS.get(port as u32).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn is_watched(port: u16) -> bool {
    watch_bits(port) & watch::WATCHED != 0
}

#[inline(always)]
pub(crate) fn capture_flags(local_port: u16, remote_port: u16) -> u64 {
    // The remote port's bits are looked up only when the local one is not watched.
    let bits = match watch_bits(local_port) {
        0 => watch_bits(remote_port),
        bits => bits,
    };
    capture_flag(bits)
}

/// The watch bits of a connection's service, from its two ports' bits: whichever port is
/// watched, the local one first (as a server).
#[inline(always)]
pub(crate) fn service_bits(local_bits: u8, remote_bits: u8) -> u8 {
    if local_bits != 0 {
        local_bits
    } else {
        remote_bits
    }
}

/// `sock_flags::CAPTURE` when the service (its watch bits) is captured.
#[inline(always)]
pub(crate) fn capture_flag(service_bits: u8) -> u64 {
    if service_bits & watch::CAPTURE != 0 {
        sock_flags::CAPTURE
    } else {
        0
    }
}

/// A TCP connection's identity as a tracepoint reports it.
pub(crate) struct Tuple {
    pub(crate) sk: u64,
    pub(crate) state: u8,
    pub(crate) family: u16,
    pub(crate) local_port: u16,
    pub(crate) remote_port: u16,
    pub(crate) local_addr: [u8; 16],
    pub(crate) remote_addr: [u8; 16],
}

/// Reads ports first (cheap) and stops unless one of them is watched.
#[inline(always)]
pub(crate) fn read_watched_tuple(ctx: &TracePointContext, layout: &TupleLayout) -> Option<Tuple> {
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
pub(crate) fn fill_tuple(event: &mut SockEvent, tuple: &Tuple) {
    event.sk = tuple.sk;
    event.family = tuple.family;
    event.local_port = tuple.local_port;
    event.remote_port = tuple.remote_port;
    event.local_addr = tuple.local_addr;
    event.remote_addr = tuple.remote_addr;
}

/// A socket's identity read from `struct sock_common` (also the head of a `struct
/// request_sock`): ports first, and nothing more unless one of them is watched. A full socket
/// (`inet_sock`) gives its local port from `inet_sport`, which stays set while the socket
/// closes (see [`ProbeOffsets::inet_sport`]); a request socket from `skc_num`.
#[inline(always)]
pub(crate) fn read_sock_tuple(sk: u64, full_socket: bool) -> Option<Tuple> {
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

/// A socket's ports, host order, read from `struct sock_common`.
pub(crate) struct SockPorts {
    pub(crate) local: u16,
    pub(crate) remote: u16,
}

impl SockPorts {
    /// From `skc_portpair`: skc_dport (network order), then skc_num (host order).
    #[inline(always)]
    pub(crate) fn from_portpair([d0, d1, n0, n1]: [u8; 4]) -> SockPorts {
        SockPorts {
            local: u16::from_ne_bytes([n0, n1]),
            remote: u16::from_be_bytes([d0, d1]),
        }
    }
}

#[inline(always)]
pub(crate) fn read_sock_ports(sk: u64) -> Option<SockPorts> {
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
pub(crate) fn read_sock_ports_and_state(sk: u64) -> Option<(SockPorts, u8)> {
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

/// The socket's (local, remote) addresses as the capture sample's key takes them
/// ([`key_addresses`]), read from `struct sock_common`; an unknown offset reads as 0.
#[inline(always)]
pub(crate) fn read_key_addresses(sk: u64) -> ([u32; 4], [u32; 4]) {
    let layout = &offsets().sock_common;
    let family = read_kernel_field::<u16>(sk, layout.family).unwrap_or(0);
    let v4 = || {
        if layout.rcv_saddr == layout.daddr + 4 {
            // skc_daddr and skc_rcv_saddr share the 64-bit skc_addrpair: one read.
            let [remote, local] = read_kernel_field::<[u32; 2]>(sk, layout.daddr).unwrap_or([0; 2]);
            return (local, remote);
        }
        (
            read_kernel_field(sk, layout.rcv_saddr).unwrap_or(0),
            read_kernel_field(sk, layout.daddr).unwrap_or(0),
        )
    };
    let v6 = || {
        (
            read_kernel_field(sk, layout.v6_rcv_saddr).unwrap_or([0; 4]),
            read_kernel_field(sk, layout.v6_daddr).unwrap_or([0; 4]),
        )
    };
    key_addresses(family, v4, v6)
}

#[inline(always)]
pub(crate) fn is_closed(sk: u64) -> bool {
    read_kernel_field::<u8>(sk, offsets().sock_common.state) == Some(TcpState::Close as u8)
}
