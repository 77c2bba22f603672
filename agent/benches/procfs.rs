//! The sampler's own /proc and sock_diag readers against the maintained crates on the periodic
//! hot paths, side by side in one run: walking a process's fd directory for socket inodes
//! (`procfs`), reading the /proc/net/tcp text (the fallback when sock_diag is unavailable) for
//! the rows of one watched port (`procfs`), and decoding a sock_diag dump datagram
//! (`netlink-packet-sock-diag`). The bench process itself holds the sockets: 16,000 TCP listeners on 127.0.0.1 (the
//! RLIMIT_NOFILE here is 20,000), so there are 16,000 socket fds and 16,000+ table rows. 1 in 100
//! socket inodes is "watched", as a host where most sockets are not memcache ones.
//!
//! Run: `cargo bench -p cacheprobe --bench procfs`

use std::{collections::HashSet, hint::black_box, net::TcpListener, os::fd::AsRawFd};

use cacheprobe::host::{diag::decode_dump_datagram, scan::ProcFs};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use netlink_packet_core::ParseableParametrized;
use netlink_packet_sock_diag::SockDiagMessage;
use procfs::process::{FDTarget, Process};

const SOCKETS: usize = 16_000;

fn listeners() -> Vec<TcpListener> {
    (0..SOCKETS)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a loopback listener"))
        .collect()
}

/// Inode of a socket fd of this process.
fn inode_of(fd: i32) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let link = link.to_string_lossy();
    link.trim_start_matches("socket:[")
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let sockets = listeners();
    let watched: HashSet<u64> = sockets
        .iter()
        .step_by(100)
        .map(|l| inode_of(l.as_raw_fd()))
        .collect();
    let watched_port = sockets[SOCKETS / 2].local_addr().unwrap().port();
    let pid = std::process::id();
    let own = ProcFs::new("/proc");
    let process = Process::myself().unwrap();

    let mut group = c.benchmark_group("fd_scan");
    group.throughput(Throughput::Elements(SOCKETS as u64));
    group.sample_size(30);
    group.bench_function("agent_scan_fds", |b| {
        b.iter(|| {
            let mut found = 0usize;
            let open = own
                .scan_fds(pid, |inode| watched.contains(&inode), |_| found += 1)
                .unwrap();
            assert_eq!(found, watched.len());
            black_box(open)
        })
    });
    group.bench_function("procfs_fd", |b| {
        b.iter(|| {
            let mut found = 0usize;
            let mut open = 0u64;
            for fd in process.fd().unwrap() {
                let Ok(fd) = fd else { continue };
                open += 1;
                if let FDTarget::Socket(inode) = fd.target {
                    if watched.contains(&inode) {
                        found += 1;
                    }
                }
            }
            assert_eq!(found, watched.len());
            black_box(open)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("tcp_table");
    group.throughput(Throughput::Elements(SOCKETS as u64));
    group.sample_size(30);
    group.bench_function("agent_read_tcp_table", |b| {
        b.iter(|| {
            let mut rows = 0usize;
            own.read_tcp_table(
                pid,
                "tcp",
                |local, remote| local == watched_port || remote == watched_port,
                |row| rows += usize::from(row.is_ok()),
            )
            .unwrap();
            assert_eq!(rows, 1);
            black_box(rows)
        })
    });
    group.bench_function("procfs_tcp", |b| {
        b.iter(|| {
            let rows = process
                .tcp()
                .unwrap()
                .into_iter()
                .filter(|row| {
                    row.local_address.port() == watched_port
                        || row.remote_address.port() == watched_port
                })
                .count();
            assert_eq!(rows, 1);
            black_box(rows)
        })
    });
    group.finish();
    drop(sockets);

    let (datagram, messages) = dump_datagram();
    let mut group = c.benchmark_group("sock_diag_decode");
    group.throughput(Throughput::Elements(messages as u64));
    group.bench_function("agent_decode_dump_datagram", |b| {
        b.iter(|| {
            let mut sockets = 0usize;
            let mut inodes = 0u64;
            decode_dump_datagram(black_box(&datagram), &mut |socket| {
                sockets += 1;
                inodes += socket.inode;
            })
            .unwrap();
            assert_eq!(sockets, messages);
            black_box(inodes)
        })
    });
    group.bench_function("netlink_packet_sock_diag", |b| {
        b.iter(|| {
            let mut sockets = 0usize;
            let mut inodes = 0u64;
            let mut bytes = black_box(datagram.as_slice());
            while bytes.len() >= 16 {
                let length = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(bytes[4..6].try_into().unwrap());
                let message = SockDiagMessage::parse_with_param(&bytes[16..length], kind).unwrap();
                if let SockDiagMessage::InetResponse(response) = message {
                    sockets += 1;
                    inodes += u64::from(response.header.inode);
                }
                bytes = &bytes[(length + 3) & !3..];
            }
            assert_eq!(sockets, messages);
            black_box(inodes)
        })
    });
    group.finish();
}

/// One 64 KiB datagram of a dump reply as the kernel fills it: established IPv4 sockets, each a
/// netlink header and a `struct inet_diag_msg` with no attributes (the connection dumps ask for
/// none).
fn dump_datagram() -> (Vec<u8>, usize) {
    const MESSAGE: usize = 16 + 72;
    let mut bytes = Vec::with_capacity(64 * 1024);
    let mut count = 0u32;
    while bytes.len() + MESSAGE <= 64 * 1024 {
        bytes.extend_from_slice(&(MESSAGE as u32).to_ne_bytes());
        bytes.extend_from_slice(&20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        bytes.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        bytes.extend_from_slice(&7u32.to_ne_bytes()); // sequence
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id
        bytes.extend_from_slice(&[2, 1, 0, 0]); // AF_INET, ESTABLISHED, timer, retrans
        bytes.extend_from_slice(&(40_000 + count as u16 % 20_000).to_be_bytes()); // sport
        bytes.extend_from_slice(&11211u16.to_be_bytes()); // dport
        bytes.extend_from_slice(&[127, 0, 0, 2]);
        bytes.extend_from_slice(&[0; 12]);
        bytes.extend_from_slice(&[127, 0, 0, 1]);
        bytes.extend_from_slice(&[0; 12]);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // interface
        bytes.extend_from_slice(&[0; 8]); // cookie
        for value in [0u32, 0, 0, 0, 100_000 + count] {
            // expires, rqueue, wqueue, uid, inode
            bytes.extend_from_slice(&value.to_ne_bytes());
        }
        count += 1;
    }
    (bytes, count as usize)
}

criterion_group!(benches, bench);
criterion_main!(benches);
