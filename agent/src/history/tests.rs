//! Unit tests of the history: recording facts, second buckets, limits and snapshots.

use std::collections::BTreeMap;

use super::*;

const T0: u64 = 1_700_000_000;

fn request(server: &str, comm: &str, command: &str, status: Status, us: u32) -> Fact {
    Fact::Request {
        service: "memcached".into(),
        server: server.into(),
        role: Role::Client,
        comm: Some(comm.into()),
        command: command.into(),
        status,
        latency_us: Some(us),
    }
}

fn total_requests(snapshot: &HistorySnapshot) -> u64 {
    snapshot
        .seconds
        .iter()
        .flat_map(|s| &s.requests)
        .map(|r| r.count as u64)
        .sum()
}

#[test]
fn aggregates_requests_and_latency_per_second() {
    let mut history = History::new(900, HistoryLimits::default());
    for i in 0..100 {
        history.record(
            T0,
            request("10.0.0.1:11211", "php", "get", Status::Hit, 100 + i),
        );
    }
    history.record(
        T0,
        request("10.0.0.1:11211", "php", "get", Status::Miss, 150),
    );
    history.record(
        T0 + 1,
        request("10.0.0.2:11211", "php", "set", Status::Stored, 300),
    );
    let snapshot = history.snapshot(0);
    assert_eq!((snapshot.start_s, snapshot.end_s), (T0, T0 + 1));
    assert_eq!(snapshot.seconds.len(), 2);
    let first = &snapshot.seconds[0];
    assert_eq!(first.requests.len(), 2, "hit and miss rows");
    let hits = first
        .requests
        .iter()
        .find(|r| r.status == Status::Hit)
        .unwrap();
    assert_eq!(hits.count, 100);
    assert_eq!(snapshot.label(hits.server), "10.0.0.1:11211");
    assert_eq!(snapshot.label(hits.comm), "php");
    assert_eq!(snapshot.label(hits.command), "get");
    assert_eq!(
        first.latency.len(),
        1,
        "one histogram per edge, not per status"
    );
    let hist = first.latency[0].histogram();
    assert_eq!(hist.count(), 101);
    let p50 = hist.quantile_us(0.5).unwrap();
    assert!((120.0..=180.0).contains(&p50), "p50 {p50}");
}

#[test]
fn keeps_every_fact_kind() {
    let mut history = History::new(900, HistoryLimits::default());
    let facts = vec![
        Fact::ConnectionOpened {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: Some("php".into()),
        },
        Fact::ConnectionClosed {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: None,
            closed_by: ClosedBy::Peer,
            idle_before_close_s: Some(60.25),
            duration_s: Some(0.5),
        },
        Fact::DeadWrite {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: "php".into(),
            command: Some("set".into()),
            outcome: DeadWriteOutcome::Unnoticed,
        },
        Fact::RequestTimeout {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: Some("php".into()),
            command: "get".into(),
        },
        Fact::Retransmit {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            kind: RetransmitKind::Data,
        },
        Fact::Reset {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            direction: ResetDirection::Received,
        },
        Fact::ConnectFailure {
            service: "memcached".into(),
            server: "10.0.0.9:11211".into(),
            reason: ConnectFailureReason::Refused,
        },
        Fact::Syns {
            service: "memcached".into(),
            direction: SynDirection::In,
            count: 7,
        },
        Fact::ListenQueue {
            service: "memcached".into(),
            listener: "0.0.0.0:11211".into(),
            length: 3,
            limit: 128,
        },
        Fact::ListenQueue {
            service: "memcached".into(),
            listener: "0.0.0.0:11211".into(),
            length: 128,
            limit: 128,
        },
        Fact::HostListenDrops {
            overflows: 5,
            drops: 6,
            syncookies_sent: 1,
        },
        Fact::ProcessFds {
            comm: "php".into(),
            pid: 10,
            open_fds: 100,
            limit: 1024,
        },
        Fact::ProcessFds {
            comm: "php".into(),
            pid: 11,
            open_fds: 1000,
            limit: 1024,
        },
        Fact::ProcessConnections {
            comm: "php".into(),
            pid: 11,
            service: "memcached".into(),
            distinct_servers: 40,
            connections: 41,
        },
        Fact::EdgeConnections {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: "php".into(),
            open: 4,
        },
        Fact::FdExhausted {
            comm: "php".into(),
            syscall: "socket".into(),
            errno: "EMFILE".into(),
        },
        Fact::KeySplit {
            service: "memcached".into(),
            key_hash: 0xfeed,
            new_key: true,
            servers: ["10.0.0.1:11211".into(), "10.0.0.2:11211".into()],
            comms: [Some("php".into()), Some("ruby".into())],
            one_process: false,
        },
        Fact::EventsLost { count: 3 },
    ];
    for fact in facts {
        history.record(T0, fact);
    }
    let snapshot = history.snapshot(T0);
    let s = &snapshot.seconds[0];
    assert_eq!(s.opened[0].count, 1);
    assert_eq!(s.closed[0].idle_ms, vec![60_250]);
    assert_eq!(s.closed[0].short_lived, 1);
    assert_eq!(snapshot.label(s.closed[0].comm), "", "unknown process");
    assert_eq!(s.dead_writes[0].outcome, DeadWriteOutcome::Unnoticed);
    assert_eq!(snapshot.label(s.dead_writes[0].command), "set");
    assert_eq!(s.requests[0].status, Status::Timeout);
    assert_eq!(s.tcp.len(), 3);
    assert!(s.tcp.iter().any(
        |r| r.event == TcpEvent::ConnectRefused && snapshot.label(r.server) == "10.0.0.9:11211"
    ));
    assert_eq!(s.syns[0].count, 7);
    assert_eq!(
        (s.listen_queues[0].length, s.listen_queues[0].limit),
        (128, 128)
    );
    assert_eq!(snapshot.label(s.listen_queues[0].listener), "0.0.0.0:11211");
    assert_eq!(s.host_listen.overflows, 5);
    assert_eq!(
        (s.fds[0].pid, s.fds[0].open_fds),
        (11, 1000),
        "fullest process kept"
    );
    assert_eq!(s.process_connections[0].distinct_servers, 40);
    assert_eq!(s.edge_connections[0].open, 4);
    assert_eq!(snapshot.label(s.fd_errors[0].errno), "EMFILE");
    assert_eq!(s.key_splits[0].examples, vec![0xfeed]);
    assert_eq!(snapshot.label(s.key_splits[0].comms[1]), "ruby");
    assert_eq!(s.events_lost, 3);
    assert_eq!(snapshot.stats.events_lost, 3);

    let json = serde_json::to_string(&snapshot).unwrap();
    let back: HistorySnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snapshot);
}

#[test]
fn evicts_old_seconds_and_counts_late_facts() {
    let mut history = History::new(60, HistoryLimits::default());
    for t in 0..200 {
        history.record(T0 + t, request("a:1", "php", "get", Status::Hit, 100));
    }
    let snapshot = history.snapshot(0);
    assert_eq!(snapshot.start_s, T0 + 140);
    assert_eq!(snapshot.end_s, T0 + 199);
    assert_eq!(snapshot.seconds.len(), 60);
    assert_eq!(total_requests(&snapshot), 60);
    history.record(T0 + 10, request("a:1", "php", "get", Status::Hit, 100));
    assert_eq!(history.stats().late_facts, 1);
    let recent = history.snapshot(T0 + 190);
    assert_eq!(recent.seconds.len(), 10);
}

#[test]
fn late_facts_reopen_frozen_seconds() {
    let mut history = History::new(900, HistoryLimits::default());
    history.record(T0, request("a:1", "php", "get", Status::Hit, 100));
    history.advance_to(T0 + 30);
    assert!(history.buckets[0].frozen);
    history.record(T0, request("a:1", "php", "get", Status::Hit, 100));
    history.record(T0, request("a:1", "php", "get", Status::Miss, 100));
    let snapshot = history.snapshot(0);
    assert_eq!(snapshot.seconds.len(), 1);
    assert_eq!(total_requests(&snapshot), 3);
    assert_eq!(snapshot.seconds[0].latency[0].histogram().count(), 3);
    assert_eq!(snapshot.end_s, T0 + 30, "advance_to marks seconds observed");
}

#[test]
fn advance_marks_idle_seconds_as_observed() {
    let mut history = History::new(900, HistoryLimits::default());
    history.advance_to(T0);
    history.advance_to(T0 + 5);
    let snapshot = history.snapshot(0);
    assert_eq!((snapshot.start_s, snapshot.end_s), (T0, T0 + 5));
    assert!(snapshot.seconds.is_empty());
    assert_eq!(
        History::new(9, HistoryLimits::default())
            .snapshot(5)
            .seconds
            .len(),
        0
    );
}

#[test]
fn merge_newer_replaces_overlap_and_keeps_older_seconds() {
    let mut history = History::new(900, HistoryLimits::default());
    history.record(T0, request("a:1", "php", "get", Status::Hit, 100));
    history.record(T0 + 1, request("a:1", "php", "get", Status::Hit, 100));
    let older = history.snapshot(0);
    history.record(T0 + 1, request("b:1", "ruby", "set", Status::Stored, 100));
    history.record(T0 + 2, request("b:1", "ruby", "set", Status::Stored, 100));
    let newer = history.snapshot(T0 + 1);
    let merged = older.merge_newer(newer);
    assert_eq!((merged.start_s, merged.end_s), (T0, T0 + 2));
    assert_eq!(merged.seconds.len(), 3);
    assert_eq!(total_requests(&merged), 4);
    let second = &merged.seconds[1];
    assert!(second
        .requests
        .iter()
        .any(|r| merged.label(r.comm) == "ruby" && merged.label(r.server) == "b:1"));
}

#[test]
fn corrupt_label_indexes_read_as_other() {
    let snapshot = HistorySnapshot::empty(0, 0);
    assert_eq!(snapshot.label(9999), "other");
}

/// A flood of distinct labels (a port scan, a bug giving every request a new comm) must not
/// grow the history beyond its bound, and its counts must survive under "other".
#[test]
fn memory_stays_bounded_under_a_label_flood() {
    let limits = HistoryLimits {
        max_rows_per_second: 256,
        max_latency_series_per_second: 32,
        max_labels: 512,
        ..HistoryLimits::default()
    };
    let mut history = History::new(120, limits.clone());
    let mut recorded = 0u64;
    for t in 0..240u64 {
        for i in 0..2_000u64 {
            let n = t * 2_000 + i;
            history.record(
                T0 + t,
                request(
                    &format!("10.{}.{}.{}:11211", n % 251, n % 241, n % 239),
                    &format!("proc{n}"),
                    &format!("cmd{}", n % 97),
                    Status::Hit,
                    (n % 5000) as u32,
                ),
            );
            recorded += 1;
        }
        if t == 119 {
            let bytes = history.heap_bytes();
            assert!(
                bytes <= History::worst_case_bytes(&limits),
                "{bytes} above the computed bound"
            );
        }
    }
    let bytes = history.heap_bytes();
    let bound = History::worst_case_bytes(&limits);
    assert!(bytes <= bound, "{bytes} > {bound}");
    assert!(history.interner.slots() <= 512);
    let snapshot = history.snapshot(0);
    for second in &snapshot.seconds {
        assert!(second.requests.len() <= 256 + 64);
        assert!(second.latency.len() <= 32 + 64);
    }
    // Every second is capped, yet the folded rows keep all of its requests.
    let kept: u64 = total_requests(&snapshot);
    let stats = history.stats();
    assert_eq!(kept + stats.overflow_facts, 120 * 2_000);
    assert_eq!(stats.overflow_facts, 0, "folded rows absorb the flood");
    assert!(stats.folded_labels > 0);
    assert!(recorded > kept);
}

/// Measures the realistic footprint the module documentation quotes: 900 s of 10 servers x
/// 5 commands x 3 processes, each with hit/miss or stored statuses and a latency histogram.
#[test]
fn realistic_memory() {
    let mut history = History::new(900, HistoryLimits::default());
    let commands = ["get", "set", "delete", "gets", "incr"];
    let mut rng = 0x2545f4914f6cdd1du64;
    for t in 0..900u64 {
        for server in 0..10 {
            for comm in ["php-fpm", "ruby", "python3"] {
                for command in commands {
                    for status in [Status::Hit, Status::Miss] {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        history.record(
                            T0 + t,
                            request(
                                &format!("10.0.0.{server}:11211"),
                                comm,
                                command,
                                status,
                                80 + (rng % 2000) as u32,
                            ),
                        );
                    }
                }
            }
        }
    }
    history.advance_to(T0 + 900 + OPEN_SECONDS);
    let bytes = history.heap_bytes();
    let snapshot = history.snapshot(0);
    let json = serde_json::to_vec(&snapshot).unwrap();
    eprintln!(
        "realistic 900 s, 10 servers x 5 commands x 3 comms: {} heap bytes, {} JSON bytes, worst case {}",
        bytes,
        json.len(),
        History::worst_case_bytes(&HistoryLimits::default())
    );
    assert!(bytes < 8 << 20, "{bytes}");
    assert_eq!(snapshot.seconds[0].requests.len(), 300);
    assert_eq!(snapshot.seconds[0].latency.len(), 30);
}

#[test]
fn converts_tracking_observations() {
    use crate::conn::tracking::{Endpoint, Observation};
    let services = crate::services::SharedServices::watching(&[("memcached", 11211)]);
    let services = services.load();
    let endpoint = Endpoint {
        service: 0,
        server: "10.0.0.1:11211".parse().unwrap(),
        role: crate::model::Role::Client,
    };
    let fact = fact_from_observation(
        &Observation::ConnectionClosed {
            endpoint,
            closed_by: crate::model::ClosedBy::Peer,
            ts_ns: 5,
            duration_ns: Some(2_000_000_000),
            idle_before_close_ns: Some(60_000_000_000),
        },
        &services,
    )
    .unwrap();
    assert_eq!(
        fact,
        Fact::ConnectionClosed {
            service: "memcached".into(),
            server: "10.0.0.1:11211".into(),
            role: Role::Client,
            comm: None,
            closed_by: ClosedBy::Peer,
            idle_before_close_s: Some(60.0),
            duration_s: Some(2.0),
        }
    );
    assert!(fact_from_observation(&Observation::TrackingDropped, &services).is_none());
    assert!(fact_from_observation(&Observation::SynSent { service: 3 }, &services).is_none());
}

/// An error reply as the daemon records it.
fn error_reply(server: &str, status: Status, text: &str, us: u32) -> RequestRecord<'static> {
    RequestRecord {
        service: "twemproxy",
        server: Box::leak(server.to_string().into_boxed_str()),
        role: Role::Client,
        comm: Some("webapp"),
        command: "get",
        status,
        latency_us: Some(us),
        error_text: Some(Box::leak(text.to_string().into_boxed_str())),
    }
}

#[test]
fn error_replies_keep_a_few_texts_per_server_with_their_latency() {
    let mut history = History::new(900, HistoryLimits::default());
    let proxy = "127.0.0.1:22121";
    for _ in 0..30 {
        history.record_request(
            T0,
            &error_reply(proxy, Status::ServerError, "Connection timed out", 101_000),
        );
    }
    // Four more texts in one second: the fifth distinct one counts as "other".
    for text in [
        "Host is down",
        "Connection refused",
        "Broken pipe",
        "No route to host",
    ] {
        history.record_request(T0, &error_reply(proxy, Status::ServerError, text, 300));
    }
    // A status that is not an error keeps no text.
    history.record_request(
        T0,
        &RequestRecord {
            status: Status::Hit,
            ..error_reply(proxy, Status::Hit, "Connection timed out", 300)
        },
    );
    history.advance_to(T0 + 20);
    let snapshot = history.snapshot(0);
    let rows = &snapshot.seconds[0].error_replies;
    let said: BTreeMap<&str, u32> = rows
        .iter()
        .map(|r| (snapshot.label(r.text), r.count))
        .collect();
    assert_eq!(
        said,
        BTreeMap::from([
            ("Connection timed out", 30),
            ("Host is down", 1),
            ("Connection refused", 1),
            ("Broken pipe", 1),
            ("other", 1),
        ])
    );
    let timed_out = rows
        .iter()
        .find(|r| snapshot.label(r.text) == "Connection timed out")
        .unwrap();
    assert_eq!(snapshot.label(timed_out.server), proxy);
    let mut hist = latency::LatencyHistogram::default();
    hist.add_cells(&timed_out.cells);
    assert_eq!(hist.count(), 30);
    assert!((92_000.0..131_000.0).contains(&hist.quantile_us(0.5).unwrap()));
    // Texts live in their own small table, not among the labels.
    assert!(history.interner.get("Connection timed out").is_none());
    assert_eq!(total_requests(&snapshot), 35);
}

#[test]
fn error_texts_are_bounded_however_many_a_server_invents() {
    let mut history = History::new(900, HistoryLimits::default());
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    ];
    for second in 0..100u64 {
        for i in 0..4 {
            let text = format!(
                "{} {} {}",
                words[(second % 10) as usize],
                words[(second / 10 % 10) as usize],
                words[i]
            );
            history.record_request(
                T0 + second,
                &error_reply("10.0.0.9:11211", Status::ClientError, &text, 200),
            );
        }
    }
    assert!(history.error_texts.len() <= MAX_ERROR_TEXTS + 2);
    let snapshot = history.snapshot(0);
    let counted: u64 = snapshot
        .seconds
        .iter()
        .flat_map(|s| &s.error_replies)
        .map(|r| r.count as u64)
        .sum();
    assert_eq!(counted, 400, "texts past the table count as other");
    assert!(history.heap_bytes() <= History::worst_case_bytes(history.limits()));
}
