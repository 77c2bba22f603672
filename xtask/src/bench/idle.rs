//! Many idle, open connections to memcached: the agent's per-socket cost.
//!
//! Without CAP_SYS_RESOURCE a process cannot raise its open-file hard limit (20000 here), so the
//! connections are spread over several memcached instances (one port each, all watched) and
//! held by several helper processes (`xtask bench-hold`, this same binary), each connecting from
//! its own loopback source address (127.0.0.2 onwards). A helper exits when its stdin closes,
//! i.e. when the bench drops it or dies.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::procs::{check_interrupted, ChildGuard};

pub fn source_address(index: usize) -> Ipv4Addr {
    // 127.0.0.2 onwards; 127.0.0.1 is the server and the active load's client.
    let n = 2 + index as u32;
    Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn check(result: libc::c_int, what: &str) -> anyhow::Result<()> {
    if result < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One blocking connect from `source` (port chosen by connect), bounded by a 5 s send timeout,
/// which Linux applies to connect().
pub fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> anyhow::Result<TcpStream> {
    // SAFETY: plain socket syscall; the fd is owned immediately after the check.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket()")?;
    // SAFETY: fd is fresh and valid; OwnedFd closes it on every error path below.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    let local = sockaddr(SocketAddrV4::new(source, 0));
    let remote = sockaddr(target);
    // SAFETY: every pointer refers to a live local of the size passed.
    unsafe {
        check(
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ),
            "setsockopt(IP_BIND_ADDRESS_NO_PORT)",
        )?;
        check(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ),
            "setsockopt(SO_SNDTIMEO)",
        )?;
        check(
            libc::bind(
                fd,
                (&local as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            "bind()",
        )?;
        check(
            libc::connect(
                fd,
                (&remote as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            "connect()",
        )?;
    }
    Ok(TcpStream::from(socket))
}

/// Opens `count` connections from `source` to `target`, failing if that takes over `limit`.
pub fn open(
    count: usize,
    source: Ipv4Addr,
    target: SocketAddrV4,
    limit: Duration,
) -> anyhow::Result<Vec<TcpStream>> {
    let started = Instant::now();
    let mut connections = Vec::with_capacity(count);
    for index in 0..count {
        if index % 1000 == 0 && started.elapsed() > limit {
            bail!(
                "opened only {index} of {count} connections in {} s",
                limit.as_secs()
            );
        }
        connections.push(
            connect_from(source, target)
                .with_context(|| format!("connection {index} from {source} to {target}"))?,
        );
    }
    Ok(connections)
}

/// The helper process: hold `count` connections until stdin closes.
pub fn hold(target: SocketAddrV4, count: usize, source: Ipv4Addr) -> anyhow::Result<()> {
    let connections = open(count, source, target, Duration::from_secs(120))?;
    println!("ready {}", connections.len());
    std::io::stdout().flush()?;
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).is_ok_and(|n| n > 0) {}
    drop(connections);
    Ok(())
}

/// Helper processes holding connections open; dropping this closes them all.
pub struct Holders {
    // Field order matters: stdin pipes close first so helpers exit on their own, then the
    // guards reap (or kill) them.
    stdins: Vec<ChildStdin>,
    guards: Vec<ChildGuard>,
}

impl Holders {
    /// Opens `per_target` connections to each target from one helper process per target.
    pub fn open(
        targets: &[SocketAddrV4],
        per_target: usize,
        limit: Duration,
    ) -> anyhow::Result<Holders> {
        let exe = std::env::current_exe().context("cannot find the xtask binary")?;
        let mut holders = Holders {
            stdins: Vec::new(),
            guards: Vec::new(),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (index, target) in targets.iter().enumerate() {
            let mut command = Command::new(&exe);
            command
                .args(["bench-hold", "--target", &target.to_string(), "--count"])
                .arg(per_target.to_string())
                .arg("--source")
                .arg(source_address(index).to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut guard = ChildGuard::spawn("connection holder", &mut command)?;
            let child = guard.child_mut().context("holder vanished")?;
            holders
                .stdins
                .push(child.stdin.take().context("no stdin pipe")?);
            let stdout = child.stdout.take().context("no stdout pipe")?;
            holders.guards.push(guard);
            let ready_tx = ready_tx.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = ready_tx.send((index, line));
            });
        }
        drop(ready_tx);
        let deadline = Instant::now() + limit;
        let mut ready = 0;
        while ready < targets.len() {
            check_interrupted()?;
            for guard in &mut holders.guards {
                guard.check_running()?;
            }
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok((index, line)) => {
                    if line.trim() != format!("ready {per_target}") {
                        bail!(
                            "connection holder {index} said {:?} instead of being ready",
                            line.trim()
                        );
                    }
                    ready += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("a connection holder exited before opening its connections")
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "connection holders were not ready within {} s",
                    limit.as_secs()
                );
            }
        }
        Ok(holders)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_address(300), Ipv4Addr::new(127, 0, 1, 46));
    }

    #[test]
    fn connects_from_a_second_loopback_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(target) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let source = source_address(1);
        let streams = open(3, source, target, Duration::from_secs(10)).unwrap();
        for stream in &streams {
            assert_eq!(
                stream.local_addr().unwrap().ip(),
                std::net::IpAddr::V4(source)
            );
        }
    }
}
