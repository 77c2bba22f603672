//! sock_diag against captured replies and this process's own sockets: request layouts, reply
//! decoding, the port filter's audit, and listener backlogs read directly and through the owner.

use std::net::Ipv6Addr;

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
    let datagram = hex_bytes(include_str!("../fixtures/sock_diag_listen_v4.hex"));
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
