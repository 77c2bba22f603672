//! Unit tests of the connection tracker: opens, closes, adoption, dead writes and bounds.

use super::*;
use crate::conn::dead_writes::OUTCOME_WINDOW_NS;
use crate::kernel::events::SocketFacts;
use agent_common::TcpState;

const SK: u64 = 0xffff_0000_0000_1000;
const SEC: u64 = 1_000_000_000;

fn tracker() -> Tracker {
    Tracker::new(
        SharedServices::watching(&[("memcached", 11211), ("kestrel", 22133)]),
        100,
    )
}

fn client_addrs() -> (SocketAddr, SocketAddr) {
    (
        "127.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:11211".parse().unwrap(),
    )
}

/// A state change from `old` to `new`; `last_activity` is the socket's last activity.
fn state(sk: u64, ts: u64, old: TcpState, new: TcpState, last_activity: u64) -> SockEventRecord {
    record(sk, ts, old as u8, new as u8, last_activity)
}

/// An event record with raw state bytes: the base the other event kinds are built from.
fn record(sk: u64, ts: u64, old: u8, new: u8, last_activity: u64) -> SockEventRecord {
    let (local, remote) = client_addrs();
    SockEventRecord {
        kind: EventKind::StateChange {
            old_state: old,
            new_state: new,
        },
        ts_ns: ts,
        sk,
        local: Some(local),
        remote: Some(remote),
        pid: 1,
        comm: "python3".into(),
        facts: SocketFacts {
            last_activity_ns: last_activity,
            bytes_sent: 0,
            bytes_received: 0,
            peer_closed_ns: 0,
            reset_received_ns: 0,
            written_after_peer_close: None,
        },
    }
}

fn run(tracker: &mut Tracker, events: &[SockEventRecord]) -> Vec<Observation> {
    let mut out = Vec::new();
    for event in events {
        tracker.handle(event, &mut out);
    }
    out
}

fn client_endpoint() -> Endpoint {
    Endpoint {
        service: 0,
        server: "127.0.0.1:11211".parse().unwrap(),
        role: Role::Client,
    }
}

/// The kernel reports Close->SynSent before it binds the client's source port: the flow
/// id comes from the next event, and the server's view of the same connection (the client
/// as its remote end) gives the same id.
#[test]
fn flow_id_is_learned_once_both_ports_are_known() {
    let mut tracker = tracker();
    let mut connect = state(SK, SEC, TcpState::Close, TcpState::SynSent, 0);
    connect.local = Some("127.0.0.1:0".parse().unwrap());
    run(&mut tracker, &[connect]);
    assert_eq!(tracker.endpoint_and_flow_of(SK).unwrap().1, None);
    run(
        &mut tracker,
        &[state(
            SK,
            SEC + 100,
            TcpState::SynSent,
            TcpState::Established,
            0,
        )],
    );
    let (endpoint, flow) = tracker.endpoint_and_flow_of(SK).unwrap();
    assert_eq!(endpoint, client_endpoint());
    let (client, server) = client_addrs();
    assert_eq!(flow, crate::model::flow_id(client, server));

    let mut accepted = state(SK + 1, SEC, TcpState::SynRecv, TcpState::Established, 0);
    (accepted.local, accepted.remote) = (Some(server), Some(client));
    run(&mut tracker, &[accepted]);
    let (endpoint, server_flow) = tracker.endpoint_and_flow_of(SK + 1).unwrap();
    assert_eq!(endpoint.role, Role::Server);
    assert_eq!(server_flow, flow);
}

#[test]
fn peer_closes_idle_client() {
    let mut tracker = tracker();
    let out = run(
        &mut tracker,
        &[
            state(SK, SEC, TcpState::Close, TcpState::SynSent, 0),
            state(SK, SEC + 100, TcpState::SynSent, TcpState::Established, 0),
            state(
                SK,
                10 * SEC,
                TcpState::Established,
                TcpState::CloseWait,
                2 * SEC,
            ),
            state(
                SK,
                11 * SEC,
                TcpState::CloseWait,
                TcpState::LastAck,
                2 * SEC,
            ),
            state(
                SK,
                11 * SEC + 5,
                TcpState::LastAck,
                TcpState::Close,
                2 * SEC,
            ),
        ],
    );
    assert_eq!(
        out,
        vec![
            Observation::SynSent { service: 0 },
            Observation::ConnectionOpened {
                endpoint: client_endpoint(),
                ts_ns: SEC + 100
            },
            Observation::ConnectionClosed {
                endpoint: client_endpoint(),
                closed_by: ClosedBy::Peer,
                ts_ns: 11 * SEC + 5,
                duration_ns: Some(10 * SEC - 95),
                idle_before_close_ns: Some(8 * SEC),
            }
        ]
    );
    assert_eq!(tracker.active_connections(), 0);
    assert!(
        tracker.idle_at_first_close.is_empty(),
        "the idle time leaves with its connection"
    );
}

#[test]
fn local_close_and_reset_are_distinguished() {
    let mut tracker = tracker();
    let out = run(
        &mut tracker,
        &[
            state(1, SEC, TcpState::SynSent, TcpState::Established, 0),
            state(1, 3 * SEC, TcpState::Established, TcpState::FinWait1, 0),
            state(1, 3 * SEC, TcpState::FinWait1, TcpState::FinWait2, 0),
            state(1, 4 * SEC, TcpState::FinWait2, TcpState::Close, 0),
            state(2, SEC, TcpState::SynSent, TcpState::Established, 0),
            state(2, 5 * SEC, TcpState::Established, TcpState::Close, 4 * SEC),
        ],
    );
    let closes: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Observation::ConnectionClosed {
                closed_by,
                idle_before_close_ns,
                ..
            } => Some((*closed_by, *idle_before_close_ns)),
            _ => None,
        })
        .collect();
    // With no activity seen, idle counts from the open.
    assert_eq!(
        closes,
        vec![
            (ClosedBy::Local, Some(2 * SEC)),
            (ClosedBy::Reset, Some(SEC))
        ]
    );
}

#[test]
fn server_role_uses_local_address_so_clients_aggregate() {
    let services = SharedServices::watching(&[("memcached", 11211)]);
    let services = services.load();
    let endpoint = services
        .endpoint(
            "10.0.0.1:11211".parse().unwrap(),
            "10.0.0.9:51234".parse().unwrap(),
        )
        .unwrap();
    assert_eq!(endpoint.role, Role::Server);
    assert_eq!(endpoint.server.to_string(), "10.0.0.1:11211");
    assert!(services
        .endpoint("10.0.0.1:1".parse().unwrap(), "10.0.0.9:2".parse().unwrap())
        .is_none());
}

#[test]
fn failed_connect_is_a_connect_failure_not_a_connection() {
    let mut tracker = tracker();
    let out = run(
        &mut tracker,
        &[
            state(SK, SEC, TcpState::Close, TcpState::SynSent, 0),
            state(SK, 2 * SEC, TcpState::SynSent, TcpState::Close, 0),
        ],
    );
    assert_eq!(
        out,
        vec![
            Observation::SynSent { service: 0 },
            Observation::ConnectFailed {
                endpoint: client_endpoint(),
                reason: ConnectFailureReason::Timeout
            }
        ]
    );
    let mut refused = state(SK, 3 * SEC, TcpState::SynSent, TcpState::Close, 0);
    refused.facts.reset_received_ns = 3 * SEC;
    let out = run(
        &mut tracker,
        &[
            state(SK, 3 * SEC, TcpState::Close, TcpState::SynSent, 0),
            refused,
        ],
    );
    assert_eq!(
        out[1],
        Observation::ConnectFailed {
            endpoint: client_endpoint(),
            reason: ConnectFailureReason::Refused
        }
    );
    assert_eq!(tracker.active_connections(), 0);
}

/// Dead writes among `out`.
fn dead_writes(out: &[Observation]) -> Vec<&DeadWrite> {
    out.iter()
        .filter_map(|o| match o {
            Observation::DeadSocketWrite(w) => Some(w),
            _ => None,
        })
        .collect()
}

/// An open connection whose peer closed at 4 s, then the event that leaves CLOSE_WAIT: to
/// `new` at 5 s, after `written` bytes by the kernel's count (None: unknown), with a reset or
/// not.
fn peer_closed_then_left(new: TcpState, written: Option<u32>, reset: bool) -> Vec<SockEventRecord> {
    let mut leave = state(SK, 5 * SEC, TcpState::CloseWait, new, 2 * SEC);
    leave.facts.peer_closed_ns = 4 * SEC;
    leave.facts.reset_received_ns = if reset { 5 * SEC } else { 0 };
    leave.facts.written_after_peer_close = written;
    vec![
        state(SK, SEC, TcpState::SynSent, TcpState::Established, 0),
        state(
            SK,
            4 * SEC,
            TcpState::Established,
            TcpState::CloseWait,
            2 * SEC,
        ),
        leave,
    ]
}

fn after_peer_close(kind: EventKind, ts: u64) -> SockEventRecord {
    let mut event = record(SK, ts, 0, 0, 0);
    event.kind = kind;
    event.local = None;
    event.remote = None;
    event
}

/// A send or receive after the peer's reset (at 5 s, as in `peer_closed_then_left`): the
/// kernel's snapshot of the socket carries it.
fn after_reset(kind: EventKind, ts: u64) -> SockEventRecord {
    let mut event = after_peer_close(kind, ts);
    event.facts.peer_closed_ns = 4 * SEC;
    event.facts.reset_received_ns = 5 * SEC;
    event
}

/// LAST_ACK (the application closed after its peer) to CLOSE at `ts`: on the peer's reset
/// (it had closed, so the writes after its FIN were dead), or on the ACK of this side's FIN (it
/// had only half-closed, and took them).
fn last_ack_closed(ts: u64, reset: bool) -> SockEventRecord {
    let mut close = state(SK, ts, TcpState::LastAck, TcpState::Close, 2 * SEC);
    close.facts.peer_closed_ns = 4 * SEC;
    close.facts.reset_received_ns = if reset { ts } else { 0 };
    close
}

/// The loopback sequence measured on 6.18: the peer closes (CloseWait), a late SET's RST
/// closes the socket inside the send, the send reports 16 bytes, the next read sees EOF.
#[test]
fn late_write_after_peer_close_is_a_dead_write_with_eof_outcome() {
    let mut tracker = tracker();
    let mut events = peer_closed_then_left(TcpState::Close, None, true);
    events.push(after_reset(
        EventKind::SendAfterPeerClose { ret: 16 },
        5 * SEC,
    ));
    events.push(after_reset(
        EventKind::RecvAfterPeerClose { ret: 0 },
        5 * SEC,
    ));
    let out = run(&mut tracker, &events);
    let writes = dead_writes(&out);
    assert_eq!(writes.len(), 1, "{out:?}");
    assert_eq!(writes[0].outcome, crate::model::DeadWriteOutcome::Eof);
    assert_eq!(writes[0].comm, "python3");
    assert_eq!(writes[0].endpoint, client_endpoint());
}

#[test]
fn retransmits_and_resets_are_attributed_to_the_endpoint() {
    let mut tracker = tracker();
    let mut syn = record(0, SEC, 0, 0, 0);
    syn.kind = EventKind::TcpTrouble {
        trouble: TcpTrouble::Retransmit,
        state: TcpState::SynSent as u8,
    };
    let mut data = syn.clone();
    data.kind = EventKind::TcpTrouble {
        trouble: TcpTrouble::Retransmit,
        state: TcpState::Established as u8,
    };
    let mut reset = syn.clone();
    reset.kind = EventKind::TcpTrouble {
        trouble: TcpTrouble::ResetSent,
        state: 0,
    };
    let out = run(&mut tracker, &[syn, data, reset]);
    assert_eq!(
        out,
        vec![
            Observation::Retransmit {
                endpoint: client_endpoint(),
                kind: RetransmitKind::Syn
            },
            Observation::Retransmit {
                endpoint: client_endpoint(),
                kind: RetransmitKind::Data
            },
            Observation::Reset {
                endpoint: client_endpoint(),
                direction: ResetDirection::Sent
            },
        ]
    );
}

#[test]
fn connection_from_before_start_is_adopted_on_its_first_state_change() {
    let mut tracker = tracker();
    let out = run(
        &mut tracker,
        &[
            state(
                SK,
                10 * SEC,
                TcpState::Established,
                TcpState::CloseWait,
                7 * SEC,
            ),
            state(SK, 11 * SEC, TcpState::CloseWait, TcpState::Close, 7 * SEC),
        ],
    );
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0],
        Observation::ConnectionAdopted {
            endpoint: client_endpoint()
        }
    );
    assert_eq!(
        out[1],
        Observation::ConnectionClosed {
            endpoint: client_endpoint(),
            closed_by: ClosedBy::Peer,
            ts_ns: 11 * SEC,
            duration_ns: None,
            idle_before_close_ns: Some(3 * SEC),
        }
    );
}

/// A socket adopted from a send that raced its own close stays in the table after it: the next
/// connection at its address is still born, its SYN and open counted, and its close counted
/// once.
#[test]
fn a_stale_entry_does_not_swallow_the_next_connection_at_its_address() {
    let mut tracker = tracker();
    let mut learned = state(
        SK,
        5 * SEC,
        TcpState::Established,
        TcpState::Established,
        4 * SEC,
    );
    learned.kind = EventKind::Learned {
        state: TcpState::Established as u8,
    };
    let out = run(
        &mut tracker,
        &[
            state(SK, SEC, TcpState::Close, TcpState::SynSent, 0),
            state(SK, SEC + 1, TcpState::SynSent, TcpState::Established, 0),
            state(SK, 4 * SEC, TcpState::Established, TcpState::Close, 4 * SEC),
            // The race: learned after its close.
            learned,
            state(SK, 6 * SEC, TcpState::Close, TcpState::SynSent, 0),
            state(SK, 6 * SEC + 1, TcpState::SynSent, TcpState::Established, 0),
            state(
                SK,
                7 * SEC,
                TcpState::Established,
                TcpState::FinWait1,
                7 * SEC,
            ),
            state(SK, 8 * SEC, TcpState::FinWait1, TcpState::Close, 7 * SEC),
        ],
    );
    let count = |f: &dyn Fn(&Observation) -> bool| out.iter().filter(|o| f(o)).count();
    assert_eq!(
        count(&|o| matches!(o, Observation::SynSent { .. })),
        2,
        "{out:?}"
    );
    assert_eq!(
        count(&|o| matches!(o, Observation::ConnectionOpened { .. })),
        2
    );
    assert_eq!(
        count(&|o| matches!(o, Observation::ConnectionClosed { .. })),
        2
    );
    assert!(tracker.connections.is_empty());
}

#[test]
fn seeded_connection_is_matched_not_double_counted() {
    let mut tracker = tracker();
    let (local, remote) = client_addrs();
    let mut out = Vec::new();
    tracker.seed(local, remote, TcpState::Established as u8, &mut out);
    assert_eq!(tracker.active_connections(), 1);
    let mut learned = record(SK, 5 * SEC, 0, 0, 5 * SEC);
    learned.kind = EventKind::Learned {
        state: TcpState::Established as u8,
    };
    tracker.handle(&learned, &mut out);
    assert_eq!(
        out.len(),
        1,
        "learning a seeded socket adds nothing: {out:?}"
    );
    assert_eq!(tracker.active_connections(), 1);
    tracker.handle(
        &state(
            SK,
            6 * SEC,
            TcpState::Established,
            TcpState::FinWait1,
            5 * SEC,
        ),
        &mut out,
    );
    tracker.handle(
        &state(SK, 7 * SEC, TcpState::FinWait2, TcpState::Close, 5 * SEC),
        &mut out,
    );
    assert!(matches!(
        out.last(),
        Some(Observation::ConnectionClosed {
            closed_by: ClosedBy::Local,
            idle_before_close_ns: Some(idle),
            ..
        }) if *idle == SEC
    ));
    assert_eq!(tracker.active_connections(), 0);
}

#[test]
fn listeners_and_unwatched_ports_are_ignored() {
    let mut tracker = tracker();
    let mut listen = state(SK, SEC, TcpState::Close, TcpState::Listen, 0);
    listen.local = Some("0.0.0.0:11211".parse().unwrap());
    let mut other = state(SK + 1, SEC, TcpState::SynSent, TcpState::Established, 0);
    other.remote = Some("127.0.0.1:80".parse().unwrap());
    assert!(run(&mut tracker, &[listen, other]).is_empty());
}

#[test]
fn a_child_cloned_from_a_watched_listener_is_a_completed_handshake() {
    let mut tracker = tracker();
    // At clone time the child still has the listener's addresses: no peer yet.
    let mut child = state(SK, SEC, TcpState::Listen, TcpState::SynRecv, 0);
    child.local = Some("0.0.0.0:11211".parse().unwrap());
    child.remote = Some("0.0.0.0:0".parse().unwrap());
    let mut unwatched = child.clone();
    unwatched.sk = SK + 1;
    unwatched.local = Some("0.0.0.0:80".parse().unwrap());
    assert_eq!(
        run(&mut tracker, &[child, unwatched]),
        [Observation::HandshakeCompleted { service: 0 }]
    );
    // Only the clone counts; the child's own handshake states are a connection's.
    assert!(tracker.connections.is_empty());
}

/// The table holds one entry per watched socket; at 100k connections every byte here is
/// 100-200 kB of resident memory (the map keeps up to twice the slots it uses).
#[test]
fn connection_entry_is_compact() {
    // 32 bytes at f93327c; the flow id (issue 18) made it 40; the endpoint as an index into
    // `Endpoints` instead of a 22-byte packed copy brings it to 24 (a 32-byte table slot).
    const _: () = assert!(std::mem::size_of::<Connection>() == 24);
    const _: () = assert!(std::mem::size_of::<(u64, Connection)>() == 32);
    assert_eq!(std::mem::size_of::<(u64, Connection)>(), 32);
}

#[test]
fn endpoints_are_stored_once_and_round_trip() {
    let mut endpoints = Endpoints::default();
    for (server, role) in [
        ("127.0.0.1:11211", Role::Client),
        ("10.1.2.3:22133", Role::Server),
        ("[::1]:11211", Role::Server),
        ("[2001:db8::7]:65535", Role::Client),
        ("[::ffff:10.0.0.1]:1", Role::Client),
    ] {
        let endpoint = Endpoint {
            service: 70_000,
            server: server.parse().unwrap(),
            role,
        };
        let id = endpoints.intern(endpoint).unwrap();
        assert_eq!(endpoints.intern(endpoint), Some(id), "interned once");
        assert_eq!(endpoints.get(id), endpoint);
    }
    assert_eq!(endpoints.len(), 5);
}

/// Endpoints of closed connections are dropped at a tick once there are many, and the live
/// connections keep theirs (renumbered): the table is bounded by the live endpoints.
#[test]
fn endpoints_nobody_holds_are_dropped() {
    let mut tracker = Tracker::new(SharedServices::watching(&[("memcached", 11211)]), 100_000);
    let mut out = Vec::new();
    // Adopted server-role connections to 200 distinct listening addresses, all but one closed.
    for i in 0..200u32 {
        let local: SocketAddr = format!("10.0.{}.{}:11211", i / 256, i % 256)
            .parse()
            .unwrap();
        let remote: SocketAddr = "10.9.9.9:40000".parse().unwrap();
        tracker.seed(local, remote, TcpState::Established as u8, &mut out);
    }
    assert_eq!(tracker.endpoints.len(), 200);
    let kept_local: SocketAddr = "10.0.0.7:11211".parse().unwrap();
    let kept_remote: SocketAddr = "10.9.9.9:40000".parse().unwrap();
    let kept = tracker.seeded[&(kept_local, kept_remote)].clone();
    let kept_endpoint = tracker.endpoints.get(kept.endpoint);
    tracker.seeded.retain(|(local, _), _| *local == kept_local);
    tracker.tick(SEC, &mut out);
    assert_eq!(tracker.endpoints.len(), 1);
    let after = &tracker.seeded[&(kept_local, kept_remote)];
    assert_eq!(tracker.endpoints.get(after.endpoint), kept_endpoint);
    assert_eq!(kept_endpoint.server, kept_local);
    assert_eq!(after.flow(), kept.flow());
    // A later connection to a known endpoint reuses its slot.
    let remote2: SocketAddr = "10.9.9.9:40001".parse().unwrap();
    tracker.seed(kept_local, remote2, TcpState::Established as u8, &mut out);
    assert_eq!(tracker.endpoints.len(), 1);
}

#[test]
fn table_memory_is_released_after_a_burst() {
    let mut tracker = Tracker::new(SharedServices::watching(&[("memcached", 11211)]), 100_000);
    let burst = 20_000;
    let mut out = Vec::new();
    for sk in 0..burst {
        tracker.handle(
            &state(sk, SEC, TcpState::SynSent, TcpState::Established, 0),
            &mut out,
        );
    }
    assert_eq!(tracker.active_connections(), burst as usize);
    let grown = tracker.connections.capacity();
    // Nothing to release while the sockets are open.
    tracker.tick(2 * SEC, &mut out);
    assert_eq!(tracker.connections.capacity(), grown);
    for sk in 10..burst {
        tracker.handle(
            &state(sk, 3 * SEC, TcpState::Established, TcpState::Close, 0),
            &mut out,
        );
    }
    tracker.tick(4 * SEC, &mut out);
    assert_eq!(tracker.active_connections(), 10);
    assert!(
        tracker.connections.capacity() <= 2 * RETAINED_CAPACITY,
        "{} slots kept for 10 sockets",
        tracker.connections.capacity()
    );
    // The survivors are intact.
    let closed = run(
        &mut tracker,
        &[state(3, 5 * SEC, TcpState::Established, TcpState::Close, 0)],
    );
    assert!(matches!(
        closed[..],
        [Observation::ConnectionClosed { duration_ns: Some(d), .. }] if d == 4 * SEC
    ));
}

#[test]
fn table_is_bounded() {
    let mut tracker = Tracker::new(SharedServices::watching(&[("memcached", 11211)]), 2);
    let events: Vec<_> = (0..3)
        .map(|i| state(100 + i, SEC, TcpState::SynSent, TcpState::Established, 0))
        .collect();
    let out = run(&mut tracker, &events);
    assert_eq!(out.last(), Some(&Observation::TrackingDropped));
    assert_eq!(tracker.active_connections(), 2);
}

#[test]
fn endpoints_that_differ_in_any_field_hash_apart_and_equal_ones_alike() {
    use std::hash::BuildHasher;
    let hash = |endpoint: &Endpoint| foldhash::fast::FixedState::with_seed(7).hash_one(endpoint);
    let base = Endpoint {
        service: 0,
        server: "127.0.0.1:11211".parse().unwrap(),
        role: Role::Client,
    };
    let variants = [
        base,
        Endpoint { service: 1, ..base },
        Endpoint {
            role: Role::Server,
            ..base
        },
        Endpoint {
            server: "127.0.0.1:11212".parse().unwrap(),
            ..base
        },
        Endpoint {
            server: "127.0.0.2:11211".parse().unwrap(),
            ..base
        },
        Endpoint {
            server: "[::1]:11211".parse().unwrap(),
            ..base
        },
        Endpoint {
            server: "[::ffff:127.0.0.1]:11211".parse().unwrap(),
            ..base
        },
    ];
    for (i, a) in variants.iter().enumerate() {
        let equal: Endpoint = *a;
        assert_eq!(hash(a), hash(&equal), "{a:?}");
        for b in &variants[i + 1..] {
            assert_ne!(hash(a), hash(b), "{a:?} {b:?}");
        }
    }
}

/// With the send programs off (`socket_probes_on_demand`), a write in the moment after the
/// peer's FIN is not reported; the reset it drew closes the socket, and the kernel's sequence
/// numbers still count it: one dead write of its bytes, its fate from the next read.
#[test]
fn a_write_no_program_saw_is_counted_from_the_sequence_numbers() {
    let mut tracker = tracker();
    let mut events = peer_closed_then_left(TcpState::Close, Some(17), true);
    events.push(after_peer_close(
        EventKind::RecvAfterPeerClose { ret: 0 },
        5 * SEC + 1,
    ));
    let out = run(&mut tracker, &events);
    let writes = dead_writes(&out);
    assert_eq!(writes.len(), 1, "{out:?}");
    assert_eq!(writes[0].bytes, 17);
    assert_eq!(writes[0].outcome, crate::model::DeadWriteOutcome::Eof);
    // The reset ran in whatever task the kernel interrupted: not the writer's name.
    assert_eq!(writes[0].comm, UNKNOWN_WRITER);
    assert_eq!(writes[0].endpoint, client_endpoint());
}

/// On loopback the reset closes the socket inside the send that drew it, so the close comes
/// before that send's own event: the send claims its bytes, and nothing is counted twice.
#[test]
fn a_send_reported_after_the_reset_close_is_not_counted_twice() {
    let mut tracker = tracker();
    let mut events = peer_closed_then_left(TcpState::Close, Some(16), true);
    events.push(after_reset(
        EventKind::SendAfterPeerClose { ret: 16 },
        5 * SEC,
    ));
    events.push(after_reset(
        EventKind::RecvAfterPeerClose { ret: 0 },
        5 * SEC + 1,
    ));
    let mut out = run(&mut tracker, &events);
    tracker.tick(20 * SEC, &mut out);
    let writes = dead_writes(&out);
    assert_eq!(writes.len(), 1, "{out:?}");
    assert_eq!(writes[0].bytes, 16);
    assert_eq!(writes[0].comm, "python3");
}

/// Part seen, part not: only the rest is one more write.
#[test]
fn bytes_seen_before_the_close_are_not_counted_again() {
    let mut tracker = tracker();
    let mut events = peer_closed_then_left(TcpState::Close, Some(30), true);
    let leave = events.pop().unwrap();
    events.push(after_peer_close(
        EventKind::SendAfterPeerClose { ret: 10 },
        4 * SEC + 1,
    ));
    events.push(leave);
    let mut out = run(&mut tracker, &events);
    // No read follows: the rest settles after a second, then goes unnoticed.
    tracker.tick(5 * SEC + UNSEEN_SETTLE_NS, &mut out);
    tracker.tick(5 * SEC + OUTCOME_WINDOW_NS + UNSEEN_SETTLE_NS, &mut out);
    let mut bytes: Vec<_> = dead_writes(&out).iter().map(|w| w.bytes).collect();
    bytes.sort();
    assert_eq!(bytes, [10, 20], "{out:?}");
    assert!(dead_writes(&out)
        .iter()
        .all(|w| w.outcome == crate::model::DeadWriteOutcome::Unnoticed));
}

/// The application wrote, unseen, then closed: its own close names it, the peer's reset
/// makes it dead, and with no read to follow the write went unnoticed. A peer that only
/// half-closed acknowledges the FIN instead: it took the bytes, no dead write.
#[test]
fn an_unseen_write_before_the_applications_close_is_its_own() {
    for reset in [true, false] {
        let mut tracker = tracker();
        let mut events = peer_closed_then_left(TcpState::LastAck, Some(9), false);
        events.push(last_ack_closed(5 * SEC + 1, reset));
        let mut out = run(&mut tracker, &events);
        tracker.tick(5 * SEC + OUTCOME_WINDOW_NS, &mut out);
        let writes = dead_writes(&out);
        if !reset {
            assert!(writes.is_empty(), "{out:?}");
            assert_eq!(tracker.dead_writes().delivered, 1);
            continue;
        }
        assert_eq!(writes.len(), 1, "{out:?}");
        assert_eq!((writes[0].bytes, writes[0].comm.as_str()), (9, "python3"));
        assert_eq!(writes[0].outcome, crate::model::DeadWriteOutcome::Unnoticed);
    }
}

/// A server replying to a client that half-closed (`printf 'stats\r\n' | nc -N`): the reply
/// goes out after the client's FIN, the server reads EOF and closes, the client takes the
/// reply and acknowledges the FIN. No dead write (the reply was delivered).
#[test]
fn a_reply_to_a_half_closed_client_is_no_dead_write() {
    let mut tracker = tracker();
    let mut events = peer_closed_then_left(TcpState::LastAck, Some(31), false);
    let leave = events.pop().unwrap();
    events.push(after_peer_close(
        EventKind::SendAfterPeerClose { ret: 31 },
        4 * SEC + 1,
    ));
    events.push(after_peer_close(
        EventKind::RecvAfterPeerClose { ret: 0 },
        4 * SEC + 2,
    ));
    events.push(leave);
    events.push(last_ack_closed(5 * SEC + 1, false));
    let mut out = run(&mut tracker, &events);
    tracker.tick(30 * SEC, &mut out);
    assert!(dead_writes(&out).is_empty(), "{out:?}");
    assert_eq!(tracker.dead_writes().delivered, 1);
}

/// Without send/receive programs (6.1) the kernel's count is the only dead write: bytes exact,
/// fate unknown (no read will tell it), reported once the peer's reset makes it dead: at once
/// when the reset ended CLOSE_WAIT ("unknown" writer: the task the reset interrupted), at the
/// LAST_ACK's end after the application's own close (its name). A peer that acknowledges that
/// close's FIN took the bytes: nothing. Nothing written: nothing.
#[test]
fn without_the_send_programs_a_write_is_counted_from_sequence_numbers_of_unknown_fate() {
    for (new, reset, then, comm) in [
        (TcpState::Close, true, None, Some(UNKNOWN_WRITER)),
        (TcpState::LastAck, false, Some(true), Some("python3")),
        (TcpState::LastAck, false, Some(false), None),
    ] {
        let mut tracker = tracker();
        tracker.without_send_receive_probes();
        let mut events = peer_closed_then_left(new, Some(24), reset);
        events.extend(then.map(|reset| last_ack_closed(5 * SEC + 1, reset)));
        let mut out = run(&mut tracker, &events);
        let writes = dead_writes(&out);
        let Some(comm) = comm else {
            assert!(writes.is_empty(), "{out:?}");
            out.clear();
            tracker.tick(30 * SEC, &mut out);
            assert!(dead_writes(&out).is_empty(), "{out:?}");
            continue;
        };
        assert_eq!(writes.len(), 1, "at once, not after a window: {out:?}");
        assert_eq!(writes[0].outcome, crate::model::DeadWriteOutcome::Unknown);
        assert_eq!(writes[0].bytes, 24);
        assert_eq!(writes[0].comm, comm);
        assert_eq!(writes[0].endpoint, client_endpoint());
        assert_eq!(writes[0].ts_ns, 5 * SEC);
        out.clear();
        tracker.tick(30 * SEC, &mut out);
        assert!(dead_writes(&out).is_empty(), "counted twice: {out:?}");
    }
    for written in [Some(0), None] {
        let mut tracker = tracker();
        tracker.without_send_receive_probes();
        let mut events = peer_closed_then_left(TcpState::LastAck, written, false);
        events.push(last_ack_closed(5 * SEC + 1, true));
        let mut out = run(&mut tracker, &events);
        tracker.tick(30 * SEC, &mut out);
        assert!(dead_writes(&out).is_empty(), "{out:?}");
    }
}

/// Nothing written after the peer's close, or no sequence numbers from this kernel: nothing.
#[test]
fn no_write_after_the_peer_closed_is_no_dead_write() {
    for (written, reset) in [(0, false), (0, true)] {
        let mut tracker = tracker();
        let mut out = run(
            &mut tracker,
            &peer_closed_then_left(TcpState::Close, Some(written), reset),
        );
        tracker.tick(30 * SEC, &mut out);
        assert!(dead_writes(&out).is_empty(), "{out:?}");
    }
    let mut tracker = tracker();
    let events = peer_closed_then_left(TcpState::LastAck, None, false);
    let mut out = run(&mut tracker, &events);
    tracker.tick(30 * SEC, &mut out);
    assert!(dead_writes(&out).is_empty(), "{out:?}");
}

/// Socket SK's client connection reaching ESTABLISHED at 1 s.
fn opened_at_sk() -> SockEventRecord {
    state(SK, SEC, TcpState::SynSent, TcpState::Established, SEC)
}

/// A reload drops memcached's port: the kernel reports nothing more of its connections, so
/// they are forgotten at once (active, no close), the open and the seeded one alike, and one
/// whose peer had closed no longer keeps the send/receive programs wanted.
#[test]
fn a_reload_that_drops_a_port_forgets_its_connections() {
    let mut tracker = tracker();
    run(&mut tracker, &[opened_at_sk()]);
    let mut out = Vec::new();
    tracker.seed(
        "127.0.0.1:40001".parse().unwrap(),
        "127.0.0.1:11211".parse().unwrap(),
        TcpState::CloseWait as u8,
        &mut out,
    );
    assert_eq!(tracker.active_connections(), 2);
    assert!(tracker.any_peer_closed());
    let mut out = Vec::new();
    // Renamed: the port is still watched, so its connections still report.
    let kept = SharedServices::watching(&[("renamed", 11211)]);
    tracker.forget_unwatched(|endpoint| kept.load().still_watches(endpoint), &mut out);
    assert!(out.is_empty(), "still watched: {out:?}");
    assert_eq!(tracker.active_connections(), 2);

    let gone = SharedServices::watching(&[("kestrel", 22133)]);
    tracker.forget_unwatched(|endpoint| gone.load().still_watches(endpoint), &mut out);
    assert_eq!(
        out,
        vec![
            Observation::ConnectionForgotten {
                endpoint: client_endpoint()
            };
            2
        ]
    );
    assert_eq!(tracker.active_connections(), 0);
    assert!(!tracker.any_peer_closed());
}

/// A connection opened between the probes' attach and the start-up /proc scan is reported by
/// both: the scan must not count it again (it stayed active after its close).
#[test]
fn the_start_up_scan_does_not_count_a_reported_connection_again() {
    let mut tracker = tracker();
    let opened = run(&mut tracker, &[opened_at_sk()]);
    assert_eq!(tracker.active_connections(), 1, "{opened:?}");
    let (local, remote) = client_addrs();
    let mut out = Vec::new();
    tracker.seed_all(
        [
            (local, remote, TcpState::Established as u8),
            // The server's end of the same loopback connection is another socket.
            (remote, local, TcpState::Established as u8),
            (
                "127.0.0.1:40001".parse().unwrap(),
                remote,
                TcpState::Established as u8,
            ),
        ],
        &mut out,
    );
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(tracker.active_connections(), 3);
}

/// The other order: the scan read a connection whose open event was still in the ring. The
/// open then takes the scan's entry's place: one active connection, opened once.
#[test]
fn an_open_event_handled_after_the_start_up_scan_replaces_its_entry() {
    let mut tracker = tracker();
    let (local, remote) = client_addrs();
    let mut out = Vec::new();
    tracker.seed_all([(local, remote, TcpState::Established as u8)], &mut out);
    assert_eq!(tracker.active_connections(), 1);
    out.extend(run(&mut tracker, &[opened_at_sk()]));
    assert_eq!(tracker.active_connections(), 1);
    let net: i64 = out
        .iter()
        .map(|o| match o {
            Observation::ConnectionAdopted { .. } | Observation::ConnectionOpened { .. } => 1,
            Observation::ConnectionForgotten { .. } => -1,
            _ => 0,
        })
        .sum();
    assert_eq!(net, 1, "{out:?}");
}
