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
//! Message encoding and decoding are pure functions over bytes; `query_listeners` is the I/O.
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
}

impl DiagError {
    /// The errno behind the failure, to classify permission problems.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DiagError::Io(err) => err.raw_os_error(),
            DiagError::Kernel(errno) => Some(*errno),
            _ => None,
        }
    }
}

/// A dump request for TCP sockets in LISTEN state of one address family.
pub fn encode_listen_dump_request(family: u8, sequence: u32) -> [u8; REQUEST_LEN] {
    let mut message = [0u8; REQUEST_LEN];
    message[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    message[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // Port id 0 on both sides: the kernel fills in ours.
    let request = &mut message[NLMSG_HDR_LEN..];
    request[0] = family;
    request[1] = IPPROTO_TCP;
    // idiag_ext = 0: no extensions wanted; pad = 0.
    request[4..8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // The socket id (ports, addresses, interface, cookie) stays zero: it is ignored for dumps.
    message
}

/// What one `recv` of a dump contained.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DiagBatch {
    pub listeners: Vec<ListenerBacklog>,
    /// The kernel sent NLMSG_DONE: the dump is complete.
    pub done: bool,
}

/// Decodes the netlink messages in one datagram of a dump reply.
pub fn decode_dump_reply(mut bytes: &[u8]) -> Result<DiagBatch, DiagError> {
    let mut batch = DiagBatch::default();
    while bytes.len() >= NLMSG_HDR_LEN {
        let length = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(bytes[4..6].try_into().expect("2 bytes"));
        if length < NLMSG_HDR_LEN || length > bytes.len() {
            return Err(DiagError::Malformed("message length outside the datagram"));
        }
        let payload = &bytes[NLMSG_HDR_LEN..length];
        match kind {
            NLMSG_DONE => {
                batch.done = true;
                return Ok(batch);
            }
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map(|raw| i32::from_ne_bytes(raw.try_into().expect("4 bytes")))
                    .ok_or(DiagError::Malformed("short error message"))?;
                // The kernel sends negative errno values; 0 would be an ack, not expected here.
                return Err(DiagError::Kernel(errno.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => batch.listeners.push(decode_inet_diag_msg(payload)?),
            _ => {}
        }
        // Messages are padded to 4 bytes (NLMSG_ALIGN).
        let advance = (length + 3) & !3;
        bytes = bytes.get(advance..).unwrap_or(&[]);
    }
    Ok(batch)
}

fn decode_inet_diag_msg(payload: &[u8]) -> Result<ListenerBacklog, DiagError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(DiagError::Malformed("short inet_diag_msg"));
    }
    let u32_at = |offset: usize| {
        u32::from_ne_bytes(payload[offset..offset + 4].try_into().expect("4 bytes"))
    };
    let family = payload[0];
    // The socket id starts at offset 4: sport and dport are big-endian, then src[16], dst[16].
    let port = u16::from_be_bytes([payload[4], payload[5]]);
    let mut source = [0u8; 16];
    source.copy_from_slice(&payload[8..24]);
    let local = match family {
        AF_INET => SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(source[0], source[1], source[2], source[3]),
            port,
        )),
        AF_INET6 => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(source), port, 0, 0)),
        _ => return Err(DiagError::Malformed("unknown address family")),
    };
    // After the 48-byte id: expires, rqueue, wqueue, uid, inode.
    Ok(ListenerBacklog {
        local,
        queue_len: u32_at(56),
        limit: u32_at(60),
        inode: u64::from(u32_at(68)),
    })
}

/// Upper bound on messages in one dump, so a host with an absurd number of listeners (or a
/// kernel bug) cannot make one sample allocate without bound.
const MAX_LISTENERS: usize = 1 << 20;

/// All TCP listeners (IPv4 and IPv6) in the network namespace `netns`, or in the calling
/// thread's own namespace when `netns` is None.
pub fn query_listeners(netns: Option<&File>) -> Result<Vec<ListenerBacklog>, DiagError> {
    match netns {
        None => dump_listeners(),
        Some(netns) => std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("sock-diag-netns".into())
                .spawn_scoped(scope, || {
                    // SAFETY: setns only reads the descriptor, which `netns` keeps open; it
                    // affects this thread alone, and the thread ends right after the dump.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(DiagError::Io(io::Error::last_os_error()));
                    }
                    dump_listeners()
                })?;
            worker
                .join()
                .unwrap_or(Err(DiagError::Malformed("sock_diag thread panicked")))
        }),
    }
}

/// Queue length and limit of a listener read through its owner: pidfd_getfd(2) copies the
/// owner's descriptor into this process and TCP_INFO on a LISTEN socket reports
/// `tcpi_unacked = sk_ack_backlog` and `tcpi_sacked = sk_max_ack_backlog`. It works for any
/// namespace and needs only ptrace-attach rights over the owner (CAP_SYS_PTRACE for other users'
/// processes), where sock_diag in another namespace needs setns and CAP_SYS_ADMIN. The copy is
/// closed before returning; it keeps the socket open for that long only.
pub fn backlog_via_owner(pid: u32, fd: i32, inode: u64) -> Result<(u32, u32), DiagError> {
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
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

fn dump_listeners() -> Result<Vec<ListenerBacklog>, DiagError> {
    // SAFETY: plain socket(2); the result is checked before being wrapped in an OwnedFd.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    set_receive_timeout(&socket, Duration::from_secs(2))?;
    let mut listeners = Vec::new();
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let request = encode_listen_dump_request(family, sequence);
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
        receive_dump(&socket, &mut listeners)?;
    }
    Ok(listeners)
}

fn receive_dump(socket: &OwnedFd, listeners: &mut Vec<ListenerBacklog>) -> Result<(), DiagError> {
    let mut buffer = vec![0u8; 64 * 1024];
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
        let batch = decode_dump_reply(&buffer[..received as usize])?;
        listeners.extend(batch.listeners);
        if listeners.len() > MAX_LISTENERS {
            return Err(DiagError::TooLarge(MAX_LISTENERS));
        }
        if batch.done {
            return Ok(());
        }
    }
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
        let (queued, limit) = loop {
            let (queued, limit) = backlog_via_owner(pid, listener_fd, inode_of(&listener)).unwrap();
            if queued == 1 || std::time::Instant::now() > deadline {
                break (queued, limit);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!((queued, limit), (1, 6));
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

    fn hex_bytes(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks_exact(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }
}
