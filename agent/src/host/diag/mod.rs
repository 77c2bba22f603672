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
//! Message encoding and decoding are pure functions over bytes (`codec`); `query_listeners` and
//! `dump_sockets` here are the I/O.
//! When setns is not allowed (no CAP_SYS_ADMIN, or a seccomp/namespace-restricted service),
//! `backlog_via_owner` reads a listener's queue through the process that holds it.

mod codec;
#[cfg(test)]
mod tests;

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use codec::*;
pub use codec::{
    decode_dump_datagram, decode_dump_reply, encode_dump_request, encode_listen_dump_request,
    port_filter_bytecode, state_mask, DiagBatch,
};

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
    /// Kernel TCP state number ([`agent_common::TcpState`]).
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
