//! Accept-queue limits of listening sockets, from the kernel's sock_diag netlink interface.
//!
//! /proc/net/tcp prints the current accept-queue length of a listener (rx_queue) but not its
//! limit: its tx_queue column is `write_seq - snd_una`, always 0 for a listener (checked on Linux
//! 6.18 with a listen(2) socket; `ss -lnt` showed Send-Q 2 for the same socket). sock_diag reports
//! `idiag_rqueue = sk_ack_backlog` and `idiag_wqueue = sk_max_ack_backlog` for listeners, which is
//! what `ss` prints. A netlink socket answers for the network namespace it was created in, so
//! other namespaces are queried from a short-lived thread that has joined them with setns(2)
//! (needs CAP_SYS_ADMIN; only the calling thread changes namespace).
//!
//! The sampler also lists every watched socket through it (`dump_sockets`): one dump per address
//! family and namespace, with the watched ports checked by the kernel (an inet_diag bytecode
//! filter, see `port_filter_bytecode`), so the agent never formats or parses the text of every
//! socket on the host as /proc/net/tcp would make it.
//!
//! Message encoding and decoding are pure functions over bytes; `query_listeners` and
//! `dump_sockets` are the I/O.
//! When setns is not allowed (no CAP_SYS_ADMIN, or a seccomp/namespace-restricted service),
//! `backlog_via_owner` reads a listener's queue through the process that holds it.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

const NLMSG_HDR_LEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const REQUEST_LEN: usize = NLMSG_HDR_LEN + INET_DIAG_REQ_V2_LEN;
/// include/uapi/linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u32 = 10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const NLA_HDR_LEN: usize = 4;
/// include/uapi/linux/inet_diag.h: `enum { INET_DIAG_REQ_NONE, INET_DIAG_REQ_BYTECODE, ... }`.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// The reply attribute with the socket's memory counters (`sock_diag_put_meminfo`), sent only
/// when bit `INET_DIAG_SKMEMINFO - 1` of the request's idiag_ext is set.
const INET_DIAG_SKMEMINFO: u16 = 7;
/// idiag_ext asking for [`INET_DIAG_SKMEMINFO`].
const EXT_MEMINFO: u8 = 1 << (INET_DIAG_SKMEMINFO - 1);
/// Index of sk_drops in the SK_MEMINFO array (include/uapi/linux/sock_diag.h).
const SK_MEMINFO_DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
/// Attribute types carry NLA_F_NESTED and NLA_F_NET_BYTEORDER in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Bytecode op codes (include/uapi/linux/inet_diag.h). S_EQ/D_EQ exist since Linux 4.16.
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
const INET_DIAG_BC_D_EQ: u8 = 12;
/// One port comparison: the op, then a second op whose `no` field holds the port.
const PORT_CONDITION_LEN: usize = 8;
const JMP_LEN: usize = 4;
/// Bytecode lengths travel in u16 fields (`no` jumps, the attribute length).
const MAX_BYTECODE_LEN: usize = 60_000;

/// A listening socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerBacklog {
    pub local: SocketAddr,
    pub inode: u64,
    /// sk_ack_backlog: connections completed and waiting for accept().
    pub queue_len: u32,
    /// sk_max_ack_backlog: min(listen() backlog, net.core.somaxconn) at listen() time. The
    /// kernel drops when `queue_len > limit`, so limit + 1 connections fit.
    pub limit: u32,
    /// sk_drops (see [`DiagSocket::drops`]); None when the kernel did not report it.
    pub drops: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag I/O: {0}")]
    Io(#[from] io::Error),
    #[error("sock_diag answered with error {0}")]
    Kernel(i32),
    #[error("malformed sock_diag reply: {0}")]
    Malformed(&'static str),
    #[error("sock_diag dump exceeded {0} messages")]
    TooLarge(usize),
    #[error("the socket changed or closed while being read")]
    Changed,
    /// socket(AF_NETLINK, NETLINK_SOCK_DIAG) failed: no sock_diag in this kernel or sandbox.
    #[error("sock_diag unavailable: {0}")]
    Unavailable(io::Error),
    /// setns(2) into the namespace was refused (no CAP_SYS_ADMIN) or failed.
    #[error("cannot join the network namespace: {0}")]
    Setns(io::Error),
}

impl DiagError {
    /// The errno behind the failure, to classify permission problems.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DiagError::Io(err) | DiagError::Unavailable(err) | DiagError::Setns(err) => {
                err.raw_os_error()
            }
            DiagError::Kernel(errno) => Some(*errno),
            _ => None,
        }
    }
}

/// One TCP socket as sock_diag reports it (`struct inet_diag_msg`), without attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// Kernel TCP state number (`agent_common::tcp_state`).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Listeners: sk_ack_backlog. Others: bytes received and not yet read.
    pub rqueue: u32,
    /// Listeners: sk_max_ack_backlog (the accept-queue limit). Others: bytes not yet acked.
    pub wqueue: u32,
    /// 0 for sockets without a file (children still in an accept queue, orphans).
    pub inode: u64,
    /// sk_drops, a wrapping u32, reported only where the request asked for memory info (the
    /// dumps do for listeners). On a listener it counts what `tcp_listendrop` refused: SYNs
    /// and handshake-completing ACKs dropped because its accept or SYN queue was full, plus
    /// segments a socket filter or policy rejected.
    pub drops: Option<u32>,
}

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

/// Upper bound on messages in one dump, so a host with an absurd number of listeners (or a
/// kernel bug) cannot make one sample allocate without bound.
const MAX_LISTENERS: usize = 1 << 20;

/// All TCP listeners (IPv4 and IPv6) in the network namespace `netns`, or in the calling
/// thread's own namespace when `netns` is None.
pub fn query_listeners(netns: Option<&File>) -> Result<Vec<ListenerBacklog>, DiagError> {
    in_namespace(netns, dump_listeners)
}

/// Runs `work` in the network namespace `netns` (a short-lived thread joined to it with setns,
/// which needs CAP_SYS_ADMIN), or on the calling thread when `netns` is None.
fn in_namespace<T: Send>(
    netns: Option<&File>,
    work: impl FnOnce() -> Result<T, DiagError> + Send,
) -> Result<T, DiagError> {
    match netns {
        None => work(),
        Some(netns) => std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("sock-diag-netns".into())
                .spawn_scoped(scope, || {
                    // SAFETY: setns only reads the descriptor, which `netns` keeps open; it
                    // affects this thread alone, and the thread ends right after the dump.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(DiagError::Setns(io::Error::last_os_error()));
                    }
                    work()
                })?;
            worker
                .join()
                .unwrap_or(Err(DiagError::Malformed("sock_diag thread panicked")))
        }),
    }
}

/// Upper bound on sockets in one dump, so a kernel bug cannot make a sample loop forever.
const MAX_DUMPED_SOCKETS: usize = 1 << 24;

/// Every TCP socket (IPv4 and IPv6) in one of `states` that `bytecode` accepts (all of them
/// when None), in the namespace `netns` (see `in_namespace`), handed to `visit` one at a time:
/// nothing is kept here, so the memory used does not grow with the number of sockets.
pub fn dump_sockets(
    netns: Option<&File>,
    states: u32,
    bytecode: Option<&[u8]>,
    visit: &mut (dyn FnMut(DiagSocket) + Send),
) -> Result<(), DiagError> {
    in_namespace(netns, move || {
        let socket = open_sock_diag()?;
        let mut buffer = vec![0u8; RECEIVE_BUFFER_LEN];
        let mut seen = 0usize;
        // Listeners are asked for their memory counters (their drop count) in a request of
        // their own: for every connection too they would add 40 bytes to each message.
        let listening = 1u32 << TCP_LISTEN;
        let requests = [AF_INET, AF_INET6].into_iter().flat_map(|family| {
            [
                (family, states & listening, true),
                (family, states & !listening, false),
            ]
        });
        for (sequence, (family, states, memory_info)) in
            (1..).zip(requests.filter(|(_, states, _)| *states != 0))
        {
            let request = encode_dump_request(family, states, memory_info, bytecode, sequence);
            send_request(&socket, &request)?;
            loop {
                let received = receive(&socket, &mut buffer)?;
                let mut count = 0usize;
                let done = decode_dump_datagram(&buffer[..received], &mut |found| {
                    count += 1;
                    visit(found)
                })?;
                seen += count;
                if seen > MAX_DUMPED_SOCKETS {
                    return Err(DiagError::TooLarge(MAX_DUMPED_SOCKETS));
                }
                if done {
                    break;
                }
            }
        }
        Ok(())
    })
}

/// The kernel sizes dump datagrams after the reader's receive buffer, up to 32 KiB each; a
/// larger buffer never truncates one, and fewer, fuller datagrams mean fewer recv calls.
const RECEIVE_BUFFER_LEN: usize = 64 * 1024;

fn open_sock_diag() -> Result<OwnedFd, DiagError> {
    // SAFETY: plain socket(2); the result is checked before being wrapped in an OwnedFd.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(DiagError::Unavailable(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    set_receive_timeout(&socket, Duration::from_secs(2))?;
    Ok(socket)
}

fn send_request(socket: &OwnedFd, request: &[u8]) -> Result<(), DiagError> {
    // SAFETY: the buffer is valid for its length; the socket is open.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> Result<usize, DiagError> {
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err.into());
        }
        if received == 0 {
            return Err(DiagError::Malformed("socket closed before NLMSG_DONE"));
        }
        return Ok(received as usize);
    }
}

/// Queue length and limit of a listener read through its owner: pidfd_getfd(2) copies the
/// owner's descriptor into this process and TCP_INFO on a LISTEN socket reports
/// `tcpi_unacked = sk_ack_backlog` and `tcpi_sacked = sk_max_ack_backlog`. It works for any
/// namespace and needs only ptrace-attach rights over the owner (CAP_SYS_PTRACE for other users'
/// processes), where sock_diag in another namespace needs setns and CAP_SYS_ADMIN. The copy is
/// closed before returning; it keeps the socket open for that long only. SO_MEMINFO on the copy
/// gives the drop count.
pub fn backlog_via_owner(pid: u32, fd: i32, inode: u64) -> Result<OwnerBacklog, DiagError> {
    // SAFETY: raw syscalls with integer arguments; each result is checked before use and the
    // returned descriptors are owned by the OwnedFds that close them.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
    // The owner may have closed the listener and reused the number since the fd walk.
    // SAFETY: fstat writes into the zeroed struct we own.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(copy.as_raw_fd(), &mut status) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    if status.st_ino != inode {
        return Err(DiagError::Changed);
    }
    // SAFETY: getsockopt writes at most `length` bytes into `info`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let result = unsafe {
        libc::getsockopt(
            copy.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error().into());
    }
    if u32::from(info.tcpi_state) != TCP_LISTEN {
        return Err(DiagError::Changed);
    }
    Ok(OwnerBacklog {
        queue_len: info.tcpi_unacked,
        limit: info.tcpi_sacked,
        drops: socket_drops(&copy),
    })
}

/// What [`backlog_via_owner`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerBacklog {
    pub queue_len: u32,
    pub limit: u32,
    pub drops: Option<u32>,
}

/// sk_drops through SO_MEMINFO (Linux 4.12+); None where the option is refused.
fn socket_drops(socket: &OwnedFd) -> Option<u32> {
    let mut meminfo = [0u32; SK_MEMINFO_DROPS + 1];
    let mut length = std::mem::size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into the array we own.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut length,
        )
    };
    (result == 0 && length as usize == std::mem::size_of_val(&meminfo))
        .then_some(meminfo[SK_MEMINFO_DROPS])
}

fn dump_listeners() -> Result<Vec<ListenerBacklog>, DiagError> {
    let socket = open_sock_diag()?;
    let mut buffer = vec![0u8; RECEIVE_BUFFER_LEN];
    let mut listeners = Vec::new();
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        send_request(&socket, &encode_listen_dump_request(family, sequence))?;
        loop {
            let received = receive(&socket, &mut buffer)?;
            let batch = decode_dump_reply(&buffer[..received])?;
            listeners.extend(batch.listeners);
            if listeners.len() > MAX_LISTENERS {
                return Err(DiagError::TooLarge(MAX_LISTENERS));
            }
            if batch.done {
                break;
            }
        }
    }
    Ok(listeners)
}

fn set_receive_timeout(socket: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `value` outlives the call and its size is passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&value as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let request = encode_listen_dump_request(AF_INET6, 7);
        assert_eq!(request.len(), 72);
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(request[4..6].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(request[6..8].try_into().unwrap()), 0x301);
        assert_eq!(u32::from_ne_bytes(request[8..12].try_into().unwrap()), 7);
        assert_eq!(&request[16..18], &[AF_INET6, IPPROTO_TCP]);
        // idiag_ext: INET_DIAG_SKMEMINFO (7) is bit 6.
        assert_eq!(request[18], 0x40);
        assert_eq!(
            u32::from_ne_bytes(request[20..24].try_into().unwrap()),
            1 << 10
        );
        assert!(request[24..].iter().all(|byte| *byte == 0));
    }

    #[test]
    fn decodes_reply_captured_on_this_machine() {
        // The IPv4 LISTEN dump from Linux 6.18 (x86_64), all datagrams concatenated: three
        // listeners (each message carrying the attributes the kernel adds unasked), among them
        // 127.0.0.1:11211 with listen(2) and 3 queued connections, then NLMSG_DONE. Captured by
        // sending the request `encode_listen_dump_request` builds from a Python netlink socket.
        let datagram = hex_bytes(include_str!("fixtures/sock_diag_listen_v4.hex"));
        let batch = decode_dump_reply(&datagram).unwrap();
        assert!(batch.done);
        assert_eq!(batch.listeners.len(), 3);
        let listener = batch
            .listeners
            .iter()
            .find(|listener| listener.local.port() == 11211)
            .expect("listener on 11211");
        assert_eq!(listener.local, "127.0.0.1:11211".parse().unwrap());
        assert_eq!((listener.queue_len, listener.limit), (3, 2));
        assert!(listener.inode > 0);
    }

    #[test]
    fn decodes_error_and_rejects_truncation() {
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        let err = decode_dump_reply(&error).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPERM));

        let mut short = vec![0u8; 20];
        short[0..4].copy_from_slice(&20u32.to_ne_bytes());
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(matches!(
            decode_dump_reply(&short),
            Err(DiagError::Malformed(_))
        ));

        let mut overlong = vec![0u8; 16];
        overlong[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(matches!(
            decode_dump_reply(&overlong),
            Err(DiagError::Malformed(_))
        ));

        let mut zero_length = vec![0u8; 16];
        zero_length[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(matches!(
            decode_dump_reply(&zero_length),
            Err(DiagError::Malformed(_))
        ));
    }

    #[test]
    fn own_namespace_query_sees_a_listener_limit() {
        let listener = super::super::testing::listen_loopback(3);
        let port = listener.local_addr().unwrap().port();
        let listeners = query_listeners(None).unwrap();
        let found = listeners
            .iter()
            .find(|entry| entry.local.port() == port)
            .expect("our listener is in the dump");
        assert_eq!((found.queue_len, found.limit), (0, 3));
    }

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        // SAFETY: fstat on an open descriptor into a struct we own.
        let mut status: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut status) }, 0);
        status.st_ino
    }

    #[test]
    fn backlog_through_the_owning_process() {
        let listener = super::super::testing::listen_loopback(6);
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let pid = std::process::id();
        let listener_fd = listener.as_raw_fd();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let backlog = loop {
            let backlog = backlog_via_owner(pid, listener_fd, inode_of(&listener)).unwrap();
            if backlog.queue_len == 1 || std::time::Instant::now() > deadline {
                break backlog;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            backlog,
            OwnerBacklog {
                queue_len: 1,
                limit: 6,
                drops: Some(0)
            }
        );
        // The descriptor number now names another socket than the one the fd walk saw.
        assert!(matches!(
            backlog_via_owner(pid, listener_fd, inode_of(&listener) + 1),
            Err(DiagError::Changed)
        ));
        // A connected socket is not a listener.
        assert!(matches!(
            backlog_via_owner(pid, client.as_raw_fd(), inode_of(&client)),
            Err(DiagError::Changed)
        ));
        assert!(backlog_via_owner(pid, -1, 0).is_err());
    }

    /// The kernel's bytecode audit (inet_diag_bc_audit, port ops, JMP) and interpreter
    /// (inet_diag_bc_run), restated to check the programs `port_filter_bytecode` builds.
    fn audit(code: &[u8]) -> bool {
        let op = |at: usize| {
            (
                code[at],
                code[at + 1] as usize,
                u16::from_ne_bytes([code[at + 2], code[at + 3]]) as usize,
            )
        };
        // valid_cc: `target` (remaining length) is an op boundary on the `yes` chain.
        let reachable = |target: usize| {
            let (mut at, mut len) = (0usize, code.len() as isize);
            while len >= 0 {
                if target as isize > len {
                    return false;
                }
                if target as isize == len {
                    return true;
                }
                let (_, yes, _) = op(at);
                if yes < 4 || yes % 4 != 0 {
                    return false;
                }
                len -= yes as isize;
                at += yes;
            }
            false
        };
        let (mut at, mut len) = (0usize, code.len());
        while len > 0 {
            let (kind, yes, no) = op(at);
            let min_len = match kind {
                INET_DIAG_BC_S_EQ | INET_DIAG_BC_D_EQ => {
                    if len < 8 {
                        return false;
                    }
                    8
                }
                INET_DIAG_BC_JMP => 4,
                _ => return false,
            };
            if no < min_len || no > len + 4 || no % 4 != 0 {
                return false;
            }
            if no < len && !reachable(len - no) {
                return false;
            }
            if yes < min_len || yes > len + 4 || yes % 4 != 0 {
                return false;
            }
            at += yes;
            len = match len.checked_sub(yes) {
                Some(left) => left,
                None => return false,
            };
        }
        len == 0
    }

    fn accepts(code: &[u8], local: u16, remote: u16) -> bool {
        let (mut at, mut len) = (0usize, code.len() as isize);
        while len > 0 {
            let kind = code[at];
            let yes = code[at + 1] as isize;
            let no = u16::from_ne_bytes([code[at + 2], code[at + 3]]) as isize;
            let port = || u16::from_ne_bytes([code[at + 6], code[at + 7]]);
            let taken = match kind {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_EQ => local == port(),
                INET_DIAG_BC_D_EQ => remote == port(),
                _ => panic!("unexpected op {kind}"),
            };
            let jump = if taken { yes } else { no };
            len -= jump;
            at = (at as isize + jump) as usize;
        }
        len == 0
    }

    #[test]
    fn port_filter_passes_the_audit_and_accepts_exactly_the_watched_ports() {
        assert_eq!(port_filter_bytecode(&[]), None);
        assert_eq!(port_filter_bytecode(&[0]), None);
        for ports in [
            vec![11211u16],
            vec![11211, 22133, 11211],
            (1..=300).collect(),
        ] {
            let code = port_filter_bytecode(&ports).unwrap();
            assert!(
                audit(&code),
                "audit refuses the filter for {} ports",
                ports.len()
            );
            for &port in &ports {
                assert!(accepts(&code, port, 40_000), "local {port}");
                assert!(accepts(&code, 40_000, port), "remote {port}");
                assert!(accepts(&code, port, 0), "listener on {port}");
            }
            assert!(!accepts(&code, 40_000, 40_001));
            assert!(!accepts(&code, 0, 0));
            assert!(!accepts(&code, 11212, 11210));
        }
        // 3000 ports would need jumps beyond the u16 fields: no filter, the caller filters.
        assert!(port_filter_bytecode(&(1..=3000).collect::<Vec<_>>()).is_none());
    }

    #[test]
    fn dump_request_carries_states_and_the_filter_attribute() {
        let code = port_filter_bytecode(&[11211]).unwrap();
        let states = state_mask(&[1, 10, 40]);
        assert_eq!(states, (1 << 1) | (1 << 10), "states past 31 are ignored");
        let request = encode_dump_request(AF_INET, states, false, Some(&code), 9);
        let attribute_len = 4 + code.len();
        assert_eq!(request.len(), 72 + ((attribute_len + 3) & !3));
        assert_eq!(
            u32::from_ne_bytes(request[0..4].try_into().unwrap()) as usize,
            request.len()
        );
        assert_eq!(u32::from_ne_bytes(request[8..12].try_into().unwrap()), 9);
        assert_eq!(&request[16..18], &[AF_INET, IPPROTO_TCP]);
        assert_eq!(request[18], 0, "no extensions asked for");
        assert_eq!(
            u32::from_ne_bytes(request[20..24].try_into().unwrap()),
            states
        );
        assert_eq!(
            u16::from_ne_bytes(request[72..74].try_into().unwrap()) as usize,
            attribute_len
        );
        assert_eq!(
            u16::from_ne_bytes(request[74..76].try_into().unwrap()),
            INET_DIAG_REQ_BYTECODE
        );
        assert_eq!(&request[76..76 + code.len()], code.as_slice());
        let unfiltered = encode_dump_request(AF_INET6, states, true, None, 1);
        assert_eq!(unfiltered.len(), 72);
        assert_eq!(
            unfiltered[..],
            encode_listen_dump_request_with(AF_INET6, states, 1)[..]
        );
    }

    fn encode_listen_dump_request_with(family: u8, states: u32, sequence: u32) -> Vec<u8> {
        let mut request = encode_listen_dump_request(family, sequence);
        request[20..24].copy_from_slice(&states.to_ne_bytes());
        request
    }

    #[test]
    fn decodes_a_connection_message_with_both_addresses() {
        // One inet_diag_msg for [::ffff:127.0.0.1]:40000 -> [::1]:11211, ESTABLISHED, then DONE.
        let mut message = vec![0u8; 16 + 72 + 8];
        message[0..4].copy_from_slice(&(16u32 + 72 + 8).to_ne_bytes());
        message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let payload = &mut message[16..];
        payload[0] = AF_INET6;
        payload[1] = 1;
        payload[4..6].copy_from_slice(&40000u16.to_be_bytes());
        payload[6..8].copy_from_slice(&11211u16.to_be_bytes());
        payload[8..24].copy_from_slice(&"::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        payload[24..40].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        payload[56..60].copy_from_slice(&5u32.to_ne_bytes());
        payload[60..64].copy_from_slice(&7u32.to_ne_bytes());
        payload[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        message.extend_from_slice(&done);
        let mut sockets = Vec::new();
        assert!(decode_dump_datagram(&message, &mut |socket| sockets.push(socket)).unwrap());
        assert_eq!(
            sockets,
            [DiagSocket {
                state: 1,
                local: "[::ffff:127.0.0.1]:40000".parse().unwrap(),
                remote: "[::1]:11211".parse().unwrap(),
                rqueue: 5,
                wqueue: 7,
                inode: 4242,
                drops: None,
            }]
        );
        // A message cut short inside the datagram is an error, not a panic.
        assert!(decode_dump_datagram(&message[..50], &mut |_| {}).is_err());
    }

    /// One inet_diag_msg for a listener on 127.0.0.1:11211 followed by `attributes`.
    fn listener_message(attributes: &[u8]) -> Vec<u8> {
        let length = 16 + 72 + attributes.len();
        let mut message = vec![0u8; 16 + 72];
        message[0..4].copy_from_slice(&(length as u32).to_ne_bytes());
        message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let payload = &mut message[16..];
        payload[0] = AF_INET;
        payload[1] = 10;
        payload[4..6].copy_from_slice(&11211u16.to_be_bytes());
        payload[8..12].copy_from_slice(&[127, 0, 0, 1]);
        message.extend_from_slice(attributes);
        message
    }

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize((bytes.len() + 3) & !3, 0);
        bytes
    }

    fn meminfo(values: usize, drops: u32) -> Vec<u8> {
        (0..values)
            .flat_map(|index| {
                let value = if index == SK_MEMINFO_DROPS {
                    drops
                } else {
                    1000 + index as u32
                };
                value.to_ne_bytes()
            })
            .collect()
    }

    fn decoded_drops(message: &[u8]) -> Result<Option<u32>, DiagError> {
        let mut found = Vec::new();
        decode_dump_datagram(message, &mut |socket| found.push(socket))?;
        assert_eq!(found.len(), 1);
        Ok(found[0].drops)
    }

    #[test]
    fn decodes_the_drop_count_among_other_attributes() {
        // INET_DIAG_SHUTDOWN (8, one byte, padded) first, as the kernel sends it unasked.
        let mut attributes = attribute(8, &[0]);
        attributes.extend(attribute(INET_DIAG_SKMEMINFO, &meminfo(9, 17)));
        assert_eq!(
            decoded_drops(&listener_message(&attributes)).unwrap(),
            Some(17)
        );
        // The nested flag does not hide the type.
        let nested = attribute(INET_DIAG_SKMEMINFO | 0x8000, &meminfo(9, 3));
        assert_eq!(decoded_drops(&listener_message(&nested)).unwrap(), Some(3));
        // Not asked for, or an array too short to reach sk_drops: unknown, not zero.
        assert_eq!(
            decoded_drops(&listener_message(&attribute(8, &[0]))).unwrap(),
            None
        );
        let short = attribute(INET_DIAG_SKMEMINFO, &meminfo(8, 0));
        assert_eq!(decoded_drops(&listener_message(&short)).unwrap(), None);
        // An attribute claiming more bytes than the message has: the socket without a count.
        let mut overlong = attribute(INET_DIAG_SKMEMINFO, &meminfo(9, 1));
        overlong[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(decoded_drops(&listener_message(&overlong)).unwrap(), None);
        let zero_length = [0u8; 8];
        assert_eq!(
            decoded_drops(&listener_message(&zero_length)).unwrap(),
            None
        );
    }

    #[test]
    fn a_full_accept_queue_shows_as_drops_in_every_reading() {
        // Backlog 0 admits one connection; the next handshakes are refused and counted.
        let listener = super::super::testing::listen_loopback(0);
        let address = listener.local_addr().unwrap();
        // The refused ones time out: their SYNs were dropped on arrival.
        let _clients: Vec<_> = (0..4)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&address, Duration::from_millis(50)).ok()
            })
            .collect();
        let inode = inode_of(&listener);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (dumped, queried, owned) = loop {
            let mut dumped = None;
            dump_sockets(None, state_mask(&[10]), None, &mut |socket| {
                if socket.inode == inode {
                    dumped = socket.drops;
                }
            })
            .unwrap();
            let queried = query_listeners(None)
                .unwrap()
                .into_iter()
                .find(|found| found.inode == inode)
                .and_then(|found| found.drops);
            let owned = backlog_via_owner(std::process::id(), listener.as_raw_fd(), inode)
                .unwrap()
                .drops;
            let all_seen = [dumped, queried, owned]
                .iter()
                .all(|drops| drops > &Some(0));
            if all_seen || std::time::Instant::now() > deadline {
                break (dumped, queried, owned);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (reading, drops) in [("dump", dumped), ("query", queried), ("owner", owned)] {
            assert!(drops > Some(0), "{reading}: {drops:?}");
        }
    }

    #[test]
    fn own_namespace_dump_returns_only_watched_ports() {
        let listener = super::super::testing::listen_loopback(3);
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let other = super::super::testing::listen_loopback(3);
        let code = port_filter_bytecode(&[port]).unwrap();
        let states = state_mask(&[1, 10]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut sockets = Vec::new();
            dump_sockets(None, states, Some(&code), &mut |socket| {
                sockets.push(socket)
            })
            .unwrap();
            assert!(sockets
                .iter()
                .all(|socket| socket.local.port() == port || socket.remote.port() == port));
            assert!(!sockets
                .iter()
                .any(|socket| socket.local == other.local_addr().unwrap()));
            let listening = sockets.iter().find(|socket| socket.state == 10);
            let client_end = sockets
                .iter()
                .find(|socket| socket.local == client.local_addr().unwrap());
            // The server end waits in the accept queue without an inode; it may lag on loopback.
            if sockets.len() == 3 || std::time::Instant::now() > deadline {
                assert_eq!(listening.map(|l| (l.rqueue, l.wqueue)), Some((1, 3)));
                assert_eq!(listening.map(|l| l.inode), Some(inode_of(&listener)));
                assert_eq!(client_end.map(|c| c.inode), Some(inode_of(&client)));
                assert_eq!(sockets.len(), 3, "{sockets:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn hex_bytes(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks_exact(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }
}
