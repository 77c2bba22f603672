//! The I/O layer against the real /proc of this test process: it owns a listener on an
//! ephemeral port and connections to it, treats that port as watched, and checks that a sample
//! finds exactly those sockets. Reading one's own /proc entries needs no privilege.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    found::*,
    parse::{TcpRow, TcpState},
    tables::*,
    testing::listen_loopback,
    *,
};

/// Held by tests that read or change this process's RLIMIT_NOFILE, which all tests share.
static NOFILE_LIMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sampler_for(port: u16, service: &str) -> Sampler {
    Sampler::new(SamplerConfig::new(
        BTreeMap::from([(port, service.to_string())]),
        16,
    ))
}

fn own_netns() -> u64 {
    ProcFs::new("/proc").netns_of(std::process::id()).unwrap()
}

fn own_comm() -> String {
    ProcFs::new("/proc").read_comm(std::process::id()).unwrap()
}

fn soft_nofile_now() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_cur
}

/// Samples until `ready` holds: the accept queue is updated when the handshake's last ACK is
/// processed, which on loopback is almost but not strictly before connect() returns.
fn sample_until(
    sampler: &mut Sampler,
    ready: impl Fn(&Snapshot) -> bool,
) -> (Snapshot, Vec<WatchedConnection>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (snapshot, connections) = sampler.sample_with_connections().unwrap();
        if ready(&snapshot) || Instant::now() > deadline {
            return (snapshot, connections);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn finds_own_listener_queue_process_and_connections() {
    let listener = listen_loopback(4);
    let port = listener.local_addr().unwrap().port();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    let (accepted, _) = listener.accept().unwrap();
    // Non-socket descriptors count towards the process's usage too.
    let extra_files: Vec<std::fs::File> = (0..40)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let mut sampler = sampler_for(port, "testsvc");
    let _limit_unchanged = NOFILE_LIMIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());

    // /proc/net/tcp is read 4 KiB at a time and other tests create sockets meanwhile, so one
    // read can miss a row; wait for a read that shows all six.
    let (snapshot, connections) = sample_until(&mut sampler, |snapshot| {
        snapshot.listeners.first().map(|l| l.queue_len) == Some(2)
            && snapshot.connections_by_service["testsvc"] == 6
    });

    // The listener: two connections waiting (three connected, one accepted), limit 4.
    let [queue] = snapshot.listeners.as_slice() else {
        panic!("one listener expected: {:?}", snapshot.listeners)
    };
    assert_eq!(queue.local, address);
    assert_eq!(queue.service, "testsvc");
    assert_eq!(queue.netns, own_netns());
    assert_eq!((queue.queue_len, queue.limit), (2, Some(4)));
    let summary = &snapshot.listen_queues["testsvc"];
    assert_eq!(
        (
            summary.listeners,
            summary.queue_len_sum,
            summary.queue_limit_sum
        ),
        (1, 2, 4)
    );
    assert_eq!(summary.max_fullness, Some(2.0 / 5.0));

    // This process: it holds the listener, the three client sockets and the accepted one.
    let me = snapshot
        .processes
        .iter()
        .find(|process| process.pid == std::process::id())
        .expect("the test process holds watched sockets");
    assert_eq!(snapshot.processes.len(), 1, "nobody else holds this port");
    assert_eq!(me.comm, own_comm());
    assert_eq!(me.netns, own_netns());
    assert_eq!(me.connections["testsvc"], 4);
    assert_eq!(me.listening_sockets["testsvc"], 1);
    assert_eq!(me.soft_nofile, soft_nofile_now());
    // Other tests in this binary open descriptors concurrently, so only a floor is exact:
    // stdio, the listener, 3 clients, the accepted socket and the 40 files.
    assert!(me.open_fds >= 3 + 5 + 40, "open fds {}", me.open_fds);
    assert!(me.open_fds <= soft_nofile_now());
    let comm = snapshot
        .comms
        .comms
        .iter()
        .find(|comm| comm.comm == me.comm)
        .expect("own comm aggregated");
    assert_eq!(comm.connections["testsvc"], 4);
    assert_eq!(snapshot.comms.folded_comms, 0);

    // Existing connections: 3 client ends and the accepted server end are ours; the two
    // server ends still in the accept queue have no inode and no owner yet.
    let ours: Vec<&WatchedConnection> = connections
        .iter()
        .filter(|c| c.local.port() == port || c.remote.port() == port)
        .collect();
    assert_eq!(ours.len(), 6, "{ours:#?}");
    assert_eq!(snapshot.connections_by_service["testsvc"], 6);
    let client_ends: Vec<_> = ours.iter().filter(|c| c.role == Role::Client).collect();
    assert_eq!(client_ends.len(), 3);
    for client in &client_ends {
        assert_eq!(client.state, TcpState::Established as u8);
        assert_eq!(client.remote, address);
        assert_eq!(
            client.owner.as_ref().map(|o| o.pid),
            Some(std::process::id())
        );
        assert!(clients
            .iter()
            .any(|stream| stream.local_addr().unwrap() == client.local));
    }
    let server_ends: Vec<_> = ours.iter().filter(|c| c.role == Role::Server).collect();
    let owned: Vec<_> = server_ends.iter().filter(|c| c.owner.is_some()).collect();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].remote, accepted.peer_addr().unwrap());
    assert!(server_ends
        .iter()
        .filter(|c| c.owner.is_none())
        .all(|c| c.inode == 0 && c.state == TcpState::Established as u8));

    assert!(snapshot.network_namespaces >= 1);
    assert!(snapshot.tcp_ext_by_netns.contains_key(&own_netns()));
    let handles = snapshot.file_handles.expect("file-nr is readable");
    assert!(handles.open > 0 && handles.max >= handles.open);
    drop(extra_files);
}

#[test]
fn accept_queue_overflow_is_visible_in_queue_and_counters() {
    let listener = listen_loopback(1);
    let port = listener.local_addr().unwrap().port();
    let mut sampler = sampler_for(port, "tiny");
    let before = sampler.sample().unwrap().tcp_ext;
    // listen(1) holds two; the third SYN arrives at a full queue and is dropped, counting a
    // ListenOverflow.
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let _clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    // The queue is full now: this SYN is dropped and retried, so do not wait for it.
    let _ = TcpStream::connect_timeout(&address, Duration::from_millis(300));
    let (snapshot, _) = sample_until(&mut sampler, |snapshot| {
        snapshot.listeners.first().map(|l| l.queue_len) == Some(2)
            && snapshot.tcp_ext.listen_overflows > before.listen_overflows
    });
    let queue = &snapshot.listeners[0];
    assert_eq!((queue.queue_len, queue.limit), (2, Some(1)));
    assert!(queue.is_full());
    assert_eq!(snapshot.listen_queues["tiny"].full_listeners, 1);
    assert!(snapshot.tcp_ext.listen_overflows > before.listen_overflows);
    assert!(snapshot.tcp_ext.listen_drops > before.listen_drops);
    drop(listener);
}

#[test]
fn lowered_soft_limit_shows_up_in_the_next_sample() {
    let listener = listen_loopback(8);
    let port = listener.local_addr().unwrap().port();
    let mut sampler = sampler_for(port, "svc");
    let _exclusive = NOFILE_LIMIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let original = soft_nofile_now();
    let lowered = original - 1;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on structs we own; lowering the soft limit needs no privilege.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = lowered as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let snapshot = sampler.sample();
    // SAFETY: as above; restore before asserting so a failure leaves the process as it was.
    unsafe {
        limit.rlim_cur = original as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let snapshot = snapshot.unwrap();
    let me = snapshot
        .processes
        .iter()
        .find(|process| process.pid == std::process::id())
        .unwrap();
    assert_eq!(me.soft_nofile, lowered);
    assert_eq!(me.listening_sockets["svc"], 1);
    assert!(me.connections.is_empty());
}

#[test]
fn unwatched_ports_produce_no_processes_or_listeners() {
    let listener = listen_loopback(8);
    let port = listener.local_addr().unwrap().port();
    // Port 1 is privileged and unused by these tests: nothing should match.
    let mut sampler = sampler_for(1, "nothing");
    let snapshot = sampler.sample().unwrap();
    assert!(snapshot.listeners.iter().all(|l| l.local.port() != port));
    assert!(snapshot.processes.is_empty());
    assert_eq!(snapshot.listen_queues["nothing"].listeners, 0);
    assert!(snapshot.processes_seen >= 1);
}

#[test]
fn exited_process_reads_as_vanished() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let procfs = ProcFs::new("/proc");
    let err = procfs.netns_of(pid).unwrap_err();
    assert_eq!(classify(&err), Failure::Vanished);
    let err = procfs.scan_fds(pid, |_| true, |_| {}).unwrap_err();
    assert_eq!(classify(&err), Failure::Vanished);
    let err = procfs
        .read_tcp_table(pid, "tcp", |_, _| true, |_| {})
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Vanished);
}

#[test]
fn missing_proc_root_is_the_only_fatal_error() {
    let mut sampler = Sampler::new(SamplerConfig {
        proc_root: "/nonexistent-proc".into(),
        watched_ports: BTreeMap::from([(11211, "memcached".to_string())]),
        max_comms: 4,
    });
    assert!(matches!(
        sampler.sample(),
        Err(SamplerError::ListProcesses { .. })
    ));
}

/// Another network namespace: a listener and clients inside `unshare --net`, found through the
/// child's /proc entries, with the backlog limit read by joining the namespace.
#[test]
#[ignore = "host test: needs root (unshare --net, setns); cargo xtask test runs it"]
fn host_finds_listener_in_another_network_namespace() {
    let port = 40123u16;
    let script = format!(
        "import socket,time\n\
         l=socket.socket(); l.bind(('127.0.0.1',{port})); l.listen(5)\n\
         c=[socket.create_connection(('127.0.0.1',{port})) for _ in range(3)]\n\
         print('ready',flush=True); time.sleep(60)\n"
    );
    let mut child = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec python3 -c \"$0\"",
        ])
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare and python3 are installed");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let child_pid = child.id();
    let result = std::panic::catch_unwind(|| {
        assert_eq!(ready.trim(), "ready");
        let mut sampler = sampler_for(port, "nssvc");
        let (snapshot, connections) = sampler.sample_with_connections().unwrap();
        let [queue] = snapshot.listeners.as_slice() else {
            panic!("one listener expected: {:?}", snapshot.listeners)
        };
        assert_ne!(queue.netns, own_netns());
        assert_eq!((queue.queue_len, queue.limit), (3, Some(5)));
        assert!(snapshot.network_namespaces >= 2);
        assert_eq!(
            snapshot.table_sources.proc_text, 0,
            "sock_diag reads every namespace"
        );
        assert!(snapshot.table_sources.sock_diag >= 2);
        assert!(snapshot.tcp_ext_by_netns.contains_key(&queue.netns));
        let python = snapshot
            .processes
            .iter()
            .find(|process| process.pid == child_pid)
            .expect("the namespaced python process");
        assert_eq!(python.netns, queue.netns);
        assert_eq!(python.connections["nssvc"], 3);
        assert_eq!(python.listening_sockets["nssvc"], 1);
        let owned = connections
            .iter()
            .filter(|c| c.owner.as_ref().is_some_and(|o| o.pid == child_pid))
            .count();
        assert_eq!(owned, 3);

        // Without CAP_SYS_ADMIN (the packaged service's case) setns is refused and the limit
        // comes through the owning process instead. Capabilities are per thread, so drop it in
        // a thread of our own.
        let netns = queue.netns;
        std::thread::spawn(move || {
            drop_effective_cap_sys_admin();
            let handle = ProcFs::new("/proc").open_netns(child_pid).unwrap();
            let refused = diag::query_listeners(Some(&handle)).unwrap_err();
            assert_eq!(refused.errno(), Some(libc::EPERM));
            let mut sampler = sampler_for(port, "nssvc");
            // The second sample no longer tries setns.
            for _ in 0..2 {
                let snapshot = sampler.sample().unwrap();
                let [queue] = snapshot.listeners.as_slice() else {
                    panic!("one listener expected: {:?}", snapshot.listeners)
                };
                assert_eq!(queue.netns, netns);
                assert_eq!((queue.queue_len, queue.limit), (3, Some(5)));
                assert_eq!(snapshot.errors.other, 0, "{:?}", snapshot.errors);
                // Our own namespace still through sock_diag, the other one from its text.
                assert!(snapshot.table_sources.proc_text >= 1);
                assert!(snapshot.table_sources.sock_diag >= 1);
                let python = snapshot
                    .processes
                    .iter()
                    .find(|process| process.pid == child_pid)
                    .expect("the namespaced python process, found through the text path");
                assert_eq!(python.connections["nssvc"], 3);
            }
            assert!(sampler.setns_refused);
        })
        .join()
        .unwrap();
    });
    child.kill().unwrap();
    child.wait().unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn config_services_become_watched_ports() {
    let config = SamplerConfig::from_services(&crate::config::Config::default().services, 7);
    assert_eq!(config.watched_ports[&11211], "memcached");
    assert_eq!(config.watched_ports[&22133], "kestrel");
    assert_eq!(config.max_comms, 7);
    assert_eq!(config.proc_root, std::path::Path::new("/proc"));
}

#[test]
fn duplicate_table_rows_are_dropped_but_reuseport_listeners_kept() {
    let fixture = include_str!("fixtures/net_tcp.txt");
    let mut rows: Vec<TcpRow> = fixture
        .lines()
        .filter_map(|line| parse::parse_tcp_line(line).unwrap())
        .collect();
    let names = vec!["svc".to_string()];
    let record_all = |rows: &[TcpRow]| {
        let mut found = Found::new(1, true, Vec::new(), ServerTable::default());
        let mut namespace = Namespace::default();
        let _ = found.mark();
        for row in rows {
            found.record(&names, 1, *row, 0, Role::Server, ListenerCounts::default());
        }
        found.commit_namespace(&mut namespace);
        found.finish();
        found
    };
    let clean = record_all(&rows);
    // The walk printed an inode-0 child, a connection with a file and a listener twice.
    let child = *rows
        .iter()
        .find(|row| row.inode == 0 && row.state == TcpState::Established as u8)
        .unwrap();
    let owned = *rows
        .iter()
        .find(|row| row.inode != 0 && row.state == TcpState::CloseWait as u8)
        .unwrap();
    let listener = *rows
        .iter()
        .find(|row| row.state == TcpState::Listen as u8)
        .unwrap();
    rows.push(child);
    rows.push(owned);
    rows.insert(0, listener);
    // A second SO_REUSEPORT listener on the same address is a different socket.
    let mut sibling = listener;
    sibling.inode += 1_000_000;
    rows.push(sibling);
    let found = record_all(&rows);
    assert_eq!(found.listeners.len(), clean.listeners.len() + 1);
    assert_eq!(found.connections_by_service, clean.connections_by_service);
    assert_eq!(found.watched.len(), clean.watched.len() + 1);
    assert!(found
        .watched
        .windows(2)
        .all(|pair| pair[0].inode < pair[1].inode));
    // The repeated connection is removed from the listing at the end of the sample, and
    // noted so a dump reused later is not counted with it.
    assert_eq!(found.duplicate_connections.len(), 1);
    assert_eq!(found.repeated_connections, [(0, 0)]);
    assert_eq!(found.connection_of.len(), clean.connection_of.len());
    assert!(found
        .connection_of
        .windows(2)
        .all(|pair| pair[0].0 < pair[1].0));
    assert_eq!(
        found.connections.len() - found.duplicate_connections.len(),
        clean.connections.len()
    );
}

/// Clears CAP_SYS_ADMIN from the calling thread's effective set (capset(2) acts per thread).
fn drop_effective_cap_sys_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_ADMIN: u32 = 21;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and the two data words v3 expects.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << CAP_SYS_ADMIN);
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
    }
}

#[test]
fn quiet_tcp_reuses_the_connection_list_until_a_connection_opens() {
    let listener = listen_loopback(8);
    let port = listener.local_addr().unwrap().port();
    let mut sampler = sampler_for(port, "reuse");
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let _client = TcpStream::connect(address).unwrap();
    let (_accepted, _) = listener.accept().unwrap();
    // Other tests open and close connections and files meanwhile, in this process too; sample
    // until two samples in a row saw the same TCP counters and this process's descriptor count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (full, reused) = loop {
        let first = sampler.sample().unwrap();
        let second = sampler.sample().unwrap();
        let all_reused = second.table_sources.reused_namespaces == second.network_namespaces
            && (!sampler.fd_count_supported || second.fd_walk.processes_walked == 0);
        if all_reused || Instant::now() > deadline {
            break (first, second);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        reused.table_sources.reused_namespaces, reused.network_namespaces,
        "never reused"
    );
    assert_eq!(full.connections_by_service["reuse"], 2);
    assert_eq!(reused.connections_by_service, full.connections_by_service);
    if sampler.fd_count_supported {
        // Nothing suggested this process changed: its last walk is reused.
        assert_eq!(reused.fd_walk.processes_walked, 0);
    }
    let me = |snapshot: &Snapshot| {
        snapshot
            .processes
            .iter()
            .find(|process| process.pid == std::process::id())
            .map(|process| {
                (
                    process.connections.clone(),
                    process.listening_sockets.clone(),
                    process.client_spread.clone(),
                )
            })
    };
    assert_eq!(me(&reused), me(&full));
    // The reused sockets keep their servers: the spread and the edge table hold.
    let spread = |servers, connections| {
        BTreeMap::from([(
            "reuse".to_string(),
            aggregate::ClientSpread {
                servers,
                connections,
            },
        )])
    };
    assert_eq!(me(&full).unwrap().2, spread(1, 1));
    let edge = |open| aggregate::ClientEdge {
        service: "reuse".into(),
        server: address,
        comm: own_comm(),
        open,
    };
    assert_eq!(full.client_edges, [edge(1)]);
    assert_eq!(reused.client_edges, full.client_edges);
    assert_eq!(
        reused.listeners.iter().map(|l| l.inode).collect::<Vec<_>>(),
        full.listeners.iter().map(|l| l.inode).collect::<Vec<_>>()
    );

    // A new connection moves the namespace's TCP counters: a full dump again, which sees it,
    // and (its descriptor count changed) a walk of this process, which finds it.
    let _second_client = TcpStream::connect(address).unwrap();
    let (_second_accepted, _) = listener.accept().unwrap();
    let after = sampler.sample().unwrap();
    assert!(after.table_sources.reused_namespaces < after.network_namespaces);
    assert_eq!(after.connections_by_service["reuse"], 4);
    let (connections, listening, client) = me(&after).expect("this process holds watched sockets");
    assert_eq!((connections["reuse"], listening["reuse"]), (4, 1));
    assert_eq!(client, spread(1, 2), "two connections to one server");
    assert_eq!(after.client_edges, [edge(2)]);
}

/// The server table a sample hands the next one holds only the servers of the sockets kept,
/// renumbered; sockets keep pointing at their own server.
#[test]
fn the_server_table_carries_only_the_servers_of_kept_sockets() {
    let mut table = ServerTable::default();
    let servers: Vec<SocketAddr> = (1..=3)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 11211)))
        .collect();
    let indexes: Vec<u16> = servers.iter().map(|&s| table.intern(s)).collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert_eq!(table.intern(servers[1]), 1, "interned once");
    let mut kept = vec![watched_socket(7, 0, false), watched_socket(8, 0, false)];
    kept[0].server = indexes[2];
    kept[1].server = indexes[2];
    kept.push(watched_socket(9, 0, true));
    let next = table.carry(&mut kept);
    assert_eq!(
        kept.iter().map(|socket| socket.server).collect::<Vec<_>>(),
        [0, 0, ServerTable::LISTENER]
    );
    assert_eq!(next.get(0), Some(servers[2]));
    assert_eq!(next.get(1), None, "servers no socket kept are gone");
}

fn watched_socket(inode: u32, namespace: u32, listening: bool) -> WatchedSocket {
    WatchedSocket {
        inode,
        namespace,
        service: 0,
        server: if listening {
            ServerTable::LISTENER
        } else {
            ServerTable::NONE
        },
    }
}

fn dump_at(namespace: u32, counts: Vec<u64>) -> NamespaceDump {
    NamespaceDump {
        counters: parse::TcpConnectionCounters::default(),
        sample: 1,
        namespace,
        counts,
        has_sockets: true,
    }
}

#[test]
fn reused_namespaces_keep_their_connections_from_the_last_list_in_place() {
    // Last sample: namespaces at positions 0, 1 and 2, sorted by inode as `finish` leaves them.
    let mut watched = vec![
        watched_socket(10, 1, false),
        watched_socket(11, 0, false),
        watched_socket(12, 1, true),
        watched_socket(13, 2, false),
        watched_socket(14, 1, false),
    ];
    let allocation = watched.as_ptr();
    // This sample: a new namespace comes first, then last sample's 1 (reused), then 2 and 0
    // (dumped afresh).
    let reused_one = dump_at(1, vec![2]);
    let plans = [None, Some(&reused_one), None, None];
    keep_reused_connections(&mut watched, plans.into_iter());
    // Only namespace 1's connections stay, in inode order, at its new position; its listener
    // is dumped again by this sample.
    assert_eq!(
        watched,
        [watched_socket(10, 1, false), watched_socket(14, 1, false)]
    );
    assert_eq!(watched.as_ptr(), allocation, "trimmed in place, not copied");

    keep_reused_connections(&mut watched, [None, None].into_iter());
    assert!(watched.is_empty());
}

#[test]
fn repeated_rows_are_taken_out_of_the_dump_that_will_be_reused() {
    let mut dumps = HashMap::from([
        (100, dump_at(0, vec![5, 3])),
        (200, dump_at(1, vec![4, 4])),
        // Left from an older sample at a position that is now another namespace's.
        (300, dump_at(1, vec![9, 9])),
    ]);
    let order = [100u64, 200, 400];
    uncount_repeated_rows(
        &mut dumps,
        order.into_iter(),
        &[(1, 1), (0, 0), (1, 1), (2, 0), (7, 0)],
    );
    assert_eq!(dumps[&100].counts, [4, 3]);
    assert_eq!(dumps[&200].counts, [4, 2]);
    assert_eq!(dumps[&300].counts, [9, 9]);
}

#[test]
fn shrink_after_spike_keeps_a_steady_buffer_and_gives_back_a_spike() {
    let mut steady: Vec<u64> = Vec::with_capacity(4096);
    steady.extend(0..3000);
    shrink_after_spike(&mut steady);
    assert_eq!(steady.capacity(), 4096, "within 2x of the need: kept");
    steady.truncate(1000);
    shrink_after_spike(&mut steady);
    assert!(steady.capacity() >= 1024 && steady.capacity() <= 2048);
    let mut burst: Vec<u64> = (0..100_000).collect();
    burst.truncate(10_000);
    shrink_after_spike(&mut burst);
    assert!(burst.capacity() >= 10_000 && burst.capacity() <= 12_500);
}

#[test]
fn socket_lists_are_refilled_in_place_and_shrink_after_a_spike() {
    let listener = listen_loopback(64);
    let port = listener.local_addr().unwrap().port();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut sampler = sampler_for(port, "buffers");
    let mut held = Vec::new();
    for _ in 0..20 {
        let client = TcpStream::connect(address).unwrap();
        let (server, _) = listener.accept().unwrap();
        held.push((client, server));
    }
    let me = std::process::id();
    let own_list = |sampler: &Sampler| {
        let sockets = &sampler
            .processes
            .get(&me)
            .expect("this process was walked")
            .sockets;
        (sockets.as_ptr(), sockets.capacity(), sockets.len())
    };
    // Walks are unbounded when listing connections, so this process is walked whatever else
    // runs on the host.
    let (first, _) = sampler.sample_with_connections().unwrap();
    assert_eq!(first.connections_by_service["buffers"], 40);
    assert_eq!(
        sampler.watched_buffer.len(),
        41,
        "40 connections and the listener"
    );
    let watched = (
        sampler.watched_buffer.as_ptr(),
        sampler.watched_buffer.capacity(),
    );
    let cached = own_list(&sampler);
    assert_eq!((cached.1, cached.2), (41, 41), "sized to its sockets");
    // Of those only the listener's descriptor is kept, to read its backlog through.
    // SAFETY: a zeroed stat is a valid value; fstat writes into it from an open descriptor.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(listener.as_raw_fd(), &mut status) }, 0);
    assert_eq!(
        sampler.processes[&me].listener_fds,
        [(status.st_ino as u32, listener.as_raw_fd())]
    );

    // The same sockets again, this process walked again as if its descriptors had changed:
    // both lists are refilled in their allocations.
    sampler.processes.get_mut(&me).unwrap().open_fds = u64::MAX;
    let (second, _) = sampler.sample_with_connections().unwrap();
    assert!(second.fd_walk.processes_walked >= 1);
    assert_eq!(second.connections_by_service, first.connections_by_service);
    assert_eq!(
        (
            sampler.watched_buffer.as_ptr(),
            sampler.watched_buffer.capacity()
        ),
        watched
    );
    assert_eq!(sampler.processes[&me].open_fds, first_open_fds(&second, me));
    assert_eq!(own_list(&sampler), cached);

    // Both lists oversized, as a connection storm leaves them: the next sample that fills
    // them gives the memory back.
    sampler.watched_buffer.reserve(100_000);
    let process = sampler.processes.get_mut(&me).unwrap();
    process.sockets.reserve(100_000);
    process.open_fds = u64::MAX;
    let (third, _) = sampler.sample_with_connections().unwrap();
    assert_eq!(third.connections_by_service, first.connections_by_service);
    assert_eq!(sampler.watched_buffer.len(), 41);
    assert!(
        sampler.watched_buffer.capacity() <= 2 * 1024,
        "{}",
        sampler.watched_buffer.capacity()
    );
    assert_eq!(
        own_list(&sampler).1,
        41,
        "the walk sized the list to its sockets"
    );
    drop(held);
}

/// The descriptor count a snapshot reports for `pid`.
fn first_open_fds(snapshot: &Snapshot, pid: u32) -> u64 {
    snapshot
        .processes
        .iter()
        .find(|process| process.pid == pid)
        .map(|process| process.open_fds)
        .expect("the process holds watched sockets")
}

/// The edge counts stay within their bound however many (process name, server) pairs a host
/// has; what does not fit is counted, and the counts resolve to names and addresses.
#[test]
fn client_edge_counts_are_bounded() {
    let mut table = ServerTable::default();
    let server = table.intern(SocketAddr::from(([10, 0, 0, 1], 11211)));
    let mut edges = fd_walk::ClientEdgeCounts::default();
    for i in 0..fd_walk::ClientEdgeCounts::MAX {
        edges.add(0, server, &format!("worker{i}"), 1);
    }
    edges.add(0, server, "worker0", 2);
    edges.add(0, server, "latecomer", 3);
    assert_eq!(edges.dropped, 3);
    let resolved = edges.resolve(&["memcached".to_string()], &table);
    assert_eq!(resolved.len(), fd_walk::ClientEdgeCounts::MAX);
    let first = resolved.iter().find(|edge| edge.comm == "worker0").unwrap();
    assert_eq!(
        (first.service.as_str(), first.server, first.open),
        ("memcached", SocketAddr::from(([10, 0, 0, 1], 11211)), 3)
    );
}

/// A client connection a forked process also holds (here a child handed it as stdin) is in
/// both processes' spread, but the edge table counts it once, for its first owner, as the
/// start-up listing does: CONNS is the connections open on that edge, not their holders.
#[test]
fn a_connection_shared_with_a_child_is_one_connection_on_its_edge() {
    let listener = listen_loopback(8);
    let port = listener.local_addr().unwrap().port();
    let mut sampler = sampler_for(port, "shared");
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let client = TcpStream::connect(address).unwrap();
    let (_accepted, _) = listener.accept().unwrap();
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            client.try_clone().unwrap(),
        )))
        .spawn()
        .unwrap();
    let child_pid = child.id();
    // The child may still be between fork and exec: sample until it is `sleep`.
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let snapshot = sampler.sample().unwrap();
        let held_by_sleep = snapshot
            .processes
            .iter()
            .any(|process| process.pid == child_pid && process.comm == "sleep");
        if held_by_sleep || Instant::now() > deadline {
            break snapshot;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let spread_of = |pid: u32| {
        snapshot
            .processes
            .iter()
            .find(|process| process.pid == pid)
            .map(|process| process.client_spread.get("shared").copied())
    };
    let one = Some(Some(aggregate::ClientSpread {
        servers: 1,
        connections: 1,
    }));
    assert_eq!(spread_of(child_pid), one, "the child holds it");
    assert_eq!(spread_of(std::process::id()), one, "so does this process");
    // The lower pid is its first owner (pids grow, barring a wrap between the two).
    let comm = if std::process::id() < child_pid {
        own_comm()
    } else {
        "sleep".to_string()
    };
    assert_eq!(
        snapshot.client_edges,
        [aggregate::ClientEdge {
            service: "shared".into(),
            server: address,
            comm,
            open: 1,
        }]
    );
}
