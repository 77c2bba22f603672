//! Test helpers shared by the host tests and other modules' tests: loopback listeners with an
//! exact backlog on ports no other socket on the host uses.

use std::{
    net::TcpListener,
    os::fd::{FromRawFd, OwnedFd},
};

/// A port below the ephemeral range (10000-19999, clear of the integration tests'
/// 20000-31999): no client socket on the host can have it as its local port, so tests that
/// watch it see only their own sockets even while other work holds many connections.
fn next_test_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let step = NEXT.fetch_add(1, Ordering::Relaxed);
    (10_000 + (std::process::id().wrapping_mul(37).wrapping_add(step)) % 10_000) as u16
}

/// A listener on 127.0.0.1 with an exact backlog (std picks its own).
pub fn listen_loopback(backlog: i32) -> TcpListener {
    for _ in 0..10_000 {
        if let Some(listener) = try_listen_loopback(next_test_port(), backlog) {
            return listener;
        }
    }
    panic!("no free test port in 10000-19999");
}

fn try_listen_loopback(port: u16, backlog: i32) -> Option<TcpListener> {
    // SAFETY: plain socket calls on a descriptor we own; results are checked.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(raw);
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(
            raw,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if bound != 0 {
            return None;
        }
        assert_eq!(
            libc::listen(raw, backlog),
            0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        Some(TcpListener::from(fd))
    }
}
