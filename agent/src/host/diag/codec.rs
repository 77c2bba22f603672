//! sock_diag messages as bytes: the dump requests, the inet_diag bytecode port filter, and the
//! decoding of reply datagrams into sockets. Pure functions, tested on captured replies.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{DiagError, DiagSocket, ListenerBacklog};

pub(super) const NLMSG_HDR_LEN: usize = 16;
pub(super) const INET_DIAG_REQ_V2_LEN: usize = 56;
pub(super) const INET_DIAG_MSG_LEN: usize = 72;
pub(super) const REQUEST_LEN: usize = NLMSG_HDR_LEN + INET_DIAG_REQ_V2_LEN;
/// include/uapi/linux/sock_diag.h
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const TCP_LISTEN: u32 = 10;
pub(super) const AF_INET: u8 = 2;
pub(super) const AF_INET6: u8 = 10;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const NLA_HDR_LEN: usize = 4;
/// include/uapi/linux/inet_diag.h: `enum { INET_DIAG_REQ_NONE, INET_DIAG_REQ_BYTECODE, ... }`.
pub(super) const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// The reply attribute with the socket's memory counters (`sock_diag_put_meminfo`), sent only
/// when bit `INET_DIAG_SKMEMINFO - 1` of the request's idiag_ext is set.
pub(super) const INET_DIAG_SKMEMINFO: u16 = 7;
/// idiag_ext asking for [`INET_DIAG_SKMEMINFO`].
pub(super) const EXT_MEMINFO: u8 = 1 << (INET_DIAG_SKMEMINFO - 1);
/// Index of sk_drops in the SK_MEMINFO array (include/uapi/linux/sock_diag.h).
pub(super) const SK_MEMINFO_DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
/// Attribute types carry NLA_F_NESTED and NLA_F_NET_BYTEORDER in their top bits.
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;
/// Bytecode op codes (include/uapi/linux/inet_diag.h). S_EQ/D_EQ exist since Linux 4.16.
pub(super) const INET_DIAG_BC_JMP: u8 = 1;
pub(super) const INET_DIAG_BC_S_EQ: u8 = 11;
pub(super) const INET_DIAG_BC_D_EQ: u8 = 12;
/// One port comparison: the op, then a second op whose `no` field holds the port.
pub(super) const PORT_CONDITION_LEN: usize = 8;
pub(super) const JMP_LEN: usize = 4;
/// Bytecode lengths travel in u16 fields (`no` jumps, the attribute length).
pub(super) const MAX_BYTECODE_LEN: usize = 60_000;

/// Bitmask of TCP states for `idiag_states` (bit n = state n).
pub fn state_mask(states: &[u8]) -> u32 {
    states
        .iter()
        .filter(|state| **state < 32)
        .fold(0, |mask, state| mask | (1u32 << state))
}

/// inet_diag bytecode accepting a socket whose local or remote port is one of `ports`, or None
/// when there is nothing to filter on or the program would not fit the u16 jump fields.
///
/// The kernel runs it as: for each op, on true jump `yes` bytes, on false jump `no` bytes; the
/// socket is accepted when execution lands exactly on the end and rejected when it jumps past
/// it. Its audit (inet_diag_bc_audit) follows only the `yes` chain, which must reach the end
/// exactly, and `yes` is a u8, so the layout is a chain of small blocks, one per comparison:
///
/// ```text
/// [EQ port: yes -> the JMP after it, no -> next block][JMP: always `no` -> end (accept)]
/// ```
///
/// and the last block's comparison jumps 4 bytes past the end (reject) when false.
pub fn port_filter_bytecode(ports: &[u16]) -> Option<Vec<u8>> {
    let mut distinct: Vec<u16> = ports.iter().copied().filter(|port| *port != 0).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.is_empty() {
        return None;
    }
    let block = PORT_CONDITION_LEN + JMP_LEN;
    let total = distinct.len() * 2 * block;
    if total > MAX_BYTECODE_LEN {
        return None;
    }
    let mut code = Vec::with_capacity(total);
    let conditions = distinct
        .iter()
        .flat_map(|port| [(INET_DIAG_BC_S_EQ, *port), (INET_DIAG_BC_D_EQ, *port)]);
    for (code_op, port) in conditions {
        let remaining = total - code.len();
        // False: the next block, or 4 bytes past the end (reject) for the last one.
        let no = if remaining == block {
            remaining + 4
        } else {
            block
        };
        push_op(&mut code, code_op, PORT_CONDITION_LEN as u8, no as u16);
        push_op(&mut code, 0, 0, port);
        // The JMP: `no` lands exactly on the end (accept); `yes` only guides the audit.
        let to_end = total - code.len();
        push_op(&mut code, INET_DIAG_BC_JMP, JMP_LEN as u8, to_end as u16);
    }
    Some(code)
}

fn push_op(code: &mut Vec<u8>, op: u8, yes: u8, no: u16) {
    code.push(op);
    code.push(yes);
    code.extend_from_slice(&no.to_ne_bytes());
}

/// A dump request for TCP sockets of one address family in `states`, optionally filtered by
/// `bytecode` (see `port_filter_bytecode`), with each socket's memory counters (and so its
/// drop count) when `memory_info` is set.
pub fn encode_dump_request(
    family: u8,
    states: u32,
    memory_info: bool,
    bytecode: Option<&[u8]>,
    sequence: u32,
) -> Vec<u8> {
    let attribute_len = bytecode.map_or(0, |code| NLA_HDR_LEN + code.len());
    let total = REQUEST_LEN + ((attribute_len + 3) & !3);
    let mut message = vec![0u8; total];
    message[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    message[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // Port id 0 on both sides: the kernel fills in ours.
    let request = &mut message[NLMSG_HDR_LEN..REQUEST_LEN];
    request[0] = family;
    request[1] = IPPROTO_TCP;
    request[2] = if memory_info { EXT_MEMINFO } else { 0 };
    request[4..8].copy_from_slice(&states.to_ne_bytes());
    // The socket id (ports, addresses, interface, cookie) stays zero: it is ignored for dumps.
    if let Some(code) = bytecode {
        let attribute = &mut message[REQUEST_LEN..];
        attribute[0..2].copy_from_slice(&(attribute_len as u16).to_ne_bytes());
        attribute[2..4].copy_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        attribute[NLA_HDR_LEN..NLA_HDR_LEN + code.len()].copy_from_slice(code);
    }
    message
}

/// Decodes the netlink messages in one datagram of a dump reply, handing each socket to
/// `visit`. Returns true when the datagram ended the dump (NLMSG_DONE).
pub fn decode_dump_datagram(
    mut bytes: &[u8],
    visit: &mut dyn FnMut(DiagSocket),
) -> Result<bool, DiagError> {
    while bytes.len() >= NLMSG_HDR_LEN {
        let length = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(bytes[4..6].try_into().expect("2 bytes"));
        if length < NLMSG_HDR_LEN || length > bytes.len() {
            return Err(DiagError::Malformed("message length outside the datagram"));
        }
        let payload = &bytes[NLMSG_HDR_LEN..length];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map(|raw| i32::from_ne_bytes(raw.try_into().expect("4 bytes")))
                    .ok_or(DiagError::Malformed("short error message"))?;
                // The kernel sends negative errno values; 0 would be an ack, not expected here.
                return Err(DiagError::Kernel(errno.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => visit(decode_inet_diag_msg(payload)?),
            _ => {}
        }
        // Messages are padded to 4 bytes (NLMSG_ALIGN).
        let advance = (length + 3) & !3;
        bytes = bytes.get(advance..).unwrap_or(&[]);
    }
    Ok(false)
}

/// A dump request for TCP sockets in LISTEN state of one address family, with their memory
/// counters.
pub fn encode_listen_dump_request(family: u8, sequence: u32) -> Vec<u8> {
    encode_dump_request(family, 1 << TCP_LISTEN, true, None, sequence)
}

/// What one `recv` of a dump contained.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DiagBatch {
    pub listeners: Vec<ListenerBacklog>,
    /// The kernel sent NLMSG_DONE: the dump is complete.
    pub done: bool,
}

/// Decodes one datagram of a LISTEN dump reply.
pub fn decode_dump_reply(bytes: &[u8]) -> Result<DiagBatch, DiagError> {
    let mut batch = DiagBatch::default();
    batch.done = decode_dump_datagram(bytes, &mut |socket| {
        batch.listeners.push(ListenerBacklog {
            local: socket.local,
            inode: socket.inode,
            queue_len: socket.rqueue,
            limit: socket.wqueue,
            drops: socket.drops,
        })
    })?;
    Ok(batch)
}

fn decode_inet_diag_msg(payload: &[u8]) -> Result<DiagSocket, DiagError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(DiagError::Malformed("short inet_diag_msg"));
    }
    let u32_at = |offset: usize| {
        u32::from_ne_bytes(payload[offset..offset + 4].try_into().expect("4 bytes"))
    };
    let family = payload[0];
    // The socket id starts at offset 4: sport and dport are big-endian, then src[16], dst[16].
    let local_port = u16::from_be_bytes([payload[4], payload[5]]);
    let remote_port = u16::from_be_bytes([payload[6], payload[7]]);
    let address = |bytes: &[u8], port: u16| -> Result<SocketAddr, DiagError> {
        let mut raw = [0u8; 16];
        raw.copy_from_slice(bytes);
        match family {
            AF_INET => Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]),
                port,
            ))),
            AF_INET6 => Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(raw),
                port,
                0,
                0,
            ))),
            _ => Err(DiagError::Malformed("unknown address family")),
        }
    };
    // After the 48-byte id: expires, rqueue, wqueue, uid, inode.
    Ok(DiagSocket {
        state: payload[1],
        local: address(&payload[8..24], local_port)?,
        remote: address(&payload[24..40], remote_port)?,
        rqueue: u32_at(56),
        wqueue: u32_at(60),
        inode: u64::from(u32_at(68)),
        drops: meminfo_drops(&payload[INET_DIAG_MSG_LEN..]),
    })
}

/// sk_drops from the attributes after an inet_diag_msg, None when no memory info is among them
/// (not asked for, or a kernel whose array is too short to hold it) or the attributes are
/// malformed: the socket itself was decoded, and losing it over an optional count would cost
/// more than the count.
fn meminfo_drops(mut attributes: &[u8]) -> Option<u32> {
    while attributes.len() >= NLA_HDR_LEN {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        if length < NLA_HDR_LEN || length > attributes.len() {
            return None;
        }
        if kind == INET_DIAG_SKMEMINFO {
            let at = NLA_HDR_LEN + SK_MEMINFO_DROPS * 4;
            return attributes[..length]
                .get(at..at + 4)
                .map(|raw| u32::from_ne_bytes(raw.try_into().expect("4 bytes")));
        }
        // Attributes are padded to 4 bytes (NLA_ALIGN).
        attributes = attributes.get((length + 3) & !3..).unwrap_or(&[]);
    }
    None
}
