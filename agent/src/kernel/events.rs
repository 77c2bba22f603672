//! Turns raw ring-buffer records into typed events. The kernel's layout is `SockEvent` from
//! agent-common; everything downstream works on these safe types instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{
    sock_flags, FdSyscall, SockEvent, SockEventKind, SockState, AF_INET, AF_INET6, COMM_LEN,
};

// The kernel half of the trouble code is the user half too.
pub use agent_common::TcpTrouble;

// Re-exported for the capture path, which names it from here.
pub use crate::model::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    pub last_activity_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub peer_closed_ns: u64,
    pub reset_received_ns: u64,
    /// Bytes the application wrote after its peer closed, known once the socket leaves
    /// CLOSE_WAIT (from the kernel's own sequence numbers, so also what no send program saw).
    pub written_after_peer_close: Option<u32>,
}

impl SocketFacts {
    /// Whether the peer reset the connection (as of this event).
    pub fn reset_received(&self) -> bool {
        self.reset_received_ns != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    StateChange {
        old_state: u8,
        new_state: u8,
    },
    /// A connection that existed before the agent started, first seen in a send/receive.
    Learned {
        state: u8,
    },
    SendAfterPeerClose {
        ret: i64,
    },
    RecvAfterPeerClose {
        ret: i64,
    },
    /// Retransmit or reset on a watched port; `state` is the socket's TCP state where known (0).
    TcpTrouble {
        trouble: TcpTrouble,
        state: u8,
    },
    /// A syscall failed with EMFILE/ENFILE; `errno` is positive.
    FdExhausted {
        syscall: &'static str,
        errno: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockEventRecord {
    pub kind: EventKind,
    pub ts_ns: u64,
    pub sk: u64,
    /// Present for state changes and learned sockets.
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub pid: u32,
    pub comm: String,
    pub facts: SocketFacts,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {0} bytes, expected {expected}", expected = std::mem::size_of::<SockEvent>())]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown TCP trouble kind {0}")]
    Trouble(u8),
    #[error("unknown syscall index {0}")]
    Syscall(u8),
}

/// What names a record's process from its pid (tgid), thread name and timestamp: see
/// [`crate::ingest::process_names`]. [`thread_name`] keeps the thread's.
pub type NameProcess<'a> = &'a mut dyn FnMut(u32, &[u8; COMM_LEN], u64) -> String;

/// Names a record by the thread the kernel saw.
pub fn thread_name(_pid: u32, comm: &[u8; COMM_LEN], _ts_ns: u64) -> String {
    comm_to_string(comm)
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], name: NameProcess) -> Result<SockEventRecord, DecodeError> {
    if bytes.len() != std::mem::size_of::<SockEvent>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length matches, SockEvent is repr(C) plain old data valid for any bit pattern,
    // and read_unaligned does not require the ring buffer's alignment.
    let raw: SockEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_raw(&raw, name)
}

pub fn from_raw(raw: &SockEvent, name: NameProcess) -> Result<SockEventRecord, DecodeError> {
    let kind = SockEventKind::try_from(raw.kind).map_err(|_| DecodeError::Kind(raw.kind))?;
    let kind = match kind {
        SockEventKind::State => EventKind::StateChange {
            old_state: raw.old_state,
            new_state: raw.new_state,
        },
        SockEventKind::Learned => EventKind::Learned {
            state: raw.new_state,
        },
        SockEventKind::SendAfterPeerClose => EventKind::SendAfterPeerClose { ret: raw.ret },
        SockEventKind::RecvAfterPeerClose => EventKind::RecvAfterPeerClose { ret: raw.ret },
        SockEventKind::TcpTrouble => EventKind::TcpTrouble {
            trouble: TcpTrouble::try_from(raw.trouble)
                .map_err(|_| DecodeError::Trouble(raw.trouble))?,
            state: raw.old_state,
        },
        SockEventKind::FdExhausted => EventKind::FdExhausted {
            syscall: FdSyscall::try_from(raw.fd_syscall)
                .map_err(|_| DecodeError::Syscall(raw.fd_syscall))?
                .name(),
            errno: -raw.ret,
        },
    };
    let has_addresses = matches!(
        kind,
        EventKind::StateChange { .. } | EventKind::Learned { .. } | EventKind::TcpTrouble { .. }
    );
    let (local, remote) = if has_addresses {
        (
            socket_addr(raw.family, &raw.local_addr, raw.local_port),
            socket_addr(raw.family, &raw.remote_addr, raw.remote_port),
        )
    } else {
        (None, None)
    };
    Ok(SockEventRecord {
        kind,
        ts_ns: raw.ts_ns,
        sk: raw.sk,
        local,
        remote,
        pid: raw.pid,
        comm: name(raw.pid, &raw.comm, raw.ts_ns),
        facts: SocketFacts {
            last_activity_ns: raw.state.last_activity_ns,
            bytes_sent: raw.state.bytes_sent,
            bytes_received: raw.state.bytes_received,
            peer_closed_ns: raw.state.peer_closed_ns,
            reset_received_ns: raw.state.reset_received_ns,
            written_after_peer_close: written_after_peer_close(&raw.state),
        },
    })
}

fn written_after_peer_close(state: &SockState) -> Option<u32> {
    let both = sock_flags::SEQ_AT_PEER_CLOSE | sock_flags::SEQ_AT_LEAVE;
    // Sequence numbers wrap at 2^32; a CLOSE_WAIT socket cannot write 4 GiB unseen by its peer's
    // window, so the wrapping difference is the byte count.
    (state.flags & both == both).then(|| {
        state
            .write_seq_at_leave
            .wrapping_sub(state.write_seq_at_peer_close)
    })
}

fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*addr);
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; show them as IPv4 so one
            // server has one label value however the client opened its socket.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

pub fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    comm_str(comm).into_owned()
}

/// The process name as text, borrowed from the record unless it is not UTF-8 (per payload
/// record, so it must not allocate).
pub fn comm_str(comm: &[u8; COMM_LEN]) -> std::borrow::Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    // Names are almost always valid UTF-8: the strict check is the cheap path, per record.
    match std::str::from_utf8(&comm[..end]) {
        Ok(name) => std::borrow::Cow::Borrowed(name),
        Err(_) => String::from_utf8_lossy(&comm[..end]),
    }
}

/// A socket event record as the kernel writes it into the ring, for tests.
#[cfg(test)]
pub(crate) fn record_bytes(event: &SockEvent) -> Vec<u8> {
    // SAFETY: reading a repr(C) POD value as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (event as *const SockEvent).cast::<u8>(),
            std::mem::size_of::<SockEvent>(),
        )
    }
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_state_event() -> SockEvent {
        let mut local_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut remote_addr = [0u8; 16];
        remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        SockEvent {
            kind: SockEventKind::State as u8,
            old_state: 1,
            new_state: 8,
            trouble: 0,
            family: AF_INET,
            local_port: 40000,
            remote_port: 11211,
            fd_syscall: 0,
            _pad1: 0,
            pid: 42,
            ts_ns: 5_000,
            sk: 0xffff_8880_1234_5678,
            local_addr,
            remote_addr,
            state: SockState {
                last_activity_ns: 1_000,
                bytes_sent: 10,
                bytes_received: 20,
                peer_closed_ns: 5_000,
                reset_received_ns: 0,
                flags: 0,
                write_seq_at_peer_close: 0,
                write_seq_at_leave: 0,
            },
            ret: 0,
            comm,
        }
    }

    use super::record_bytes as as_bytes;

    #[test]
    fn decodes_ipv4_state_change() {
        let record = decode(&as_bytes(&raw_state_event()), &mut thread_name).unwrap();
        assert_eq!(
            record.kind,
            EventKind::StateChange {
                old_state: 1,
                new_state: 8
            }
        );
        assert_eq!(record.local.unwrap().to_string(), "127.0.0.1:40000");
        assert_eq!(record.remote.unwrap().to_string(), "10.1.2.3:11211");
        assert_eq!(record.comm, "python3");
        assert_eq!(record.facts.bytes_received, 20);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_shown_as_ipv4_and_real_ipv6_is_bracketed() {
        let mut raw = raw_state_event();
        raw.family = AF_INET6;
        raw.remote_addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a01, 0x0203).octets();
        raw.local_addr = Ipv6Addr::LOCALHOST.octets();
        let record = from_raw(&raw, &mut thread_name).unwrap();
        assert_eq!(record.remote.unwrap().to_string(), "10.1.2.3:11211");
        assert_eq!(record.local.unwrap().to_string(), "[::1]:40000");
    }

    #[test]
    fn rejects_wrong_size_and_unknown_kind() {
        assert_eq!(
            decode(&[0u8; 7], &mut thread_name),
            Err(DecodeError::Size(7))
        );
        let mut raw = raw_state_event();
        raw.kind = 99;
        assert_eq!(
            decode(&as_bytes(&raw), &mut thread_name),
            Err(DecodeError::Kind(99))
        );
    }

    #[test]
    fn decodes_trouble_and_fd_exhaustion() {
        let mut raw = raw_state_event();
        raw.kind = SockEventKind::TcpTrouble as u8;
        raw.trouble = TcpTrouble::RetransmitSynAck as u8;
        raw.old_state = 3;
        let record = from_raw(&raw, &mut thread_name).unwrap();
        assert_eq!(
            record.kind,
            EventKind::TcpTrouble {
                trouble: TcpTrouble::RetransmitSynAck,
                state: 3
            }
        );
        assert_eq!(record.remote.unwrap().to_string(), "10.1.2.3:11211");
        raw.trouble = 77;
        assert_eq!(
            from_raw(&raw, &mut thread_name),
            Err(DecodeError::Trouble(77))
        );

        raw.kind = SockEventKind::FdExhausted as u8;
        raw.fd_syscall = FdSyscall::Accept4 as u8;
        raw.ret = -24;
        let record = from_raw(&raw, &mut thread_name).unwrap();
        assert_eq!(
            record.kind,
            EventKind::FdExhausted {
                syscall: "accept4",
                errno: 24
            }
        );
        assert_eq!(record.local, None);
        raw.fd_syscall = 200;
        assert_eq!(
            from_raw(&raw, &mut thread_name),
            Err(DecodeError::Syscall(200))
        );
    }

    #[test]
    fn comm_without_terminator_is_kept_whole() {
        assert_eq!(comm_to_string(b"0123456789abcdef"), "0123456789abcdef");
    }
}
