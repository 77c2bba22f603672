//! TCP trouble on watched ports: retransmits, SYN-ACK retransmits, resets received and sent
//! (tp_btf, with classic tracepoints as the fallback).

use crate::maps::{offsets, SOCKETS};
use crate::ring::emit;
use crate::sock::{
    fill_tuple, is_watched, read_kernel_field, read_sock_tuple, read_watched_tuple, scalar_arg,
    Tuple,
};
use agent_common::{SockEventKind, TcpTrouble, TupleLayout, AF_INET, AF_INET6};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, helpers::bpf_probe_read_kernel, macros::btf_tracepoint,
    macros::tracepoint, programs::BtfTracePointContext, programs::TracePointContext, EbpfContext,
};

#[inline(always)]
fn trouble(ctx: &TracePointContext, layout: &TupleLayout, kind: TcpTrouble) -> Option<()> {
    let tuple = read_watched_tuple(ctx, layout)?;
    trouble_event(&tuple, kind)
}

#[inline(always)]
fn trouble_event(tuple: &Tuple, kind: TcpTrouble) -> Option<()> {
    if kind == TcpTrouble::ResetReceived && tuple.sk != 0 {
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
        event.kind = SockEventKind::TcpTrouble as u8;
        event.trouble = kind as u8;
        event.old_state = tuple.state;
        fill_tuple(event, tuple);
    });
    Some(())
}

/// TCP trouble through bpf() links (tp_btf), preferred wherever kernel BTF confirms the
/// arguments; the classic tracepoints below are the fallback. The socket's identity comes from
/// `struct sock_common`. Only TCP sockets reach these hooks.
#[inline(always)]
fn btf_trouble(sk: u64, kind: TcpTrouble) -> Option<()> {
    let tuple = read_sock_tuple(sk, true)?;
    trouble_event(&tuple, kind)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn btf_tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let _ = btf_trouble(scalar_arg(ctx.as_ptr(), 0), TcpTrouble::Retransmit);
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
        let _ = trouble_event(&tuple, TcpTrouble::RetransmitSynAck);
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    let _ = btf_trouble(scalar_arg(ctx.as_ptr(), 0), TcpTrouble::ResetReceived);
    0
}

/// `(const struct sock *sk, const struct sk_buff *skb, ...)`. From 6.10 on it also fires with
/// `sk` NULL, for a reset answering a segment no socket took (e.g. a SYN to a closed port):
/// then, as in the classic record, the addresses are the segment's, reversed.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    let sk = scalar_arg(ctx.as_ptr(), 0);
    if sk != 0 {
        let _ = btf_trouble(sk, TcpTrouble::ResetSent);
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
    trouble_event(&tuple, TcpTrouble::ResetSent)
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().retransmit_skb, TcpTrouble::Retransmit);
    0
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let _ = trouble(
        &ctx,
        &offsets().retransmit_synack,
        TcpTrouble::RetransmitSynAck,
    );
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().receive_reset, TcpTrouble::ResetReceived);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = trouble(&ctx, &offsets().send_reset, TcpTrouble::ResetSent);
    0
}
