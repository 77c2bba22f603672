//! Facts from one /proc sample (the sampler's `Snapshot`):
//! fd usage and connections per process, open connections per process and server, accept
//! queues of local listeners, and the host's listen overflow/drop counters as deltas; and,
//! with their own timestamps, the SYNs and handshakes local listeners dropped.

use std::{collections::BTreeMap, net::SocketAddr};

use super::Fact;

use crate::host::{parse::TcpExtCounters, Snapshot};
use crate::model::{Role, SynDirection};

/// Converts one sample. `last_tcp_ext` holds the previous sample's counters (None on the
/// first sample, which only sets the baseline).
pub fn facts_from_sample(
    snapshot: &Snapshot,
    last_tcp_ext: &mut Option<TcpExtCounters>,
) -> Vec<Fact> {
    let mut facts = Vec::new();
    process_fds(snapshot, &mut facts);
    process_connections(snapshot, &mut facts);
    listen_queues(snapshot, &mut facts);
    facts.extend(host_listen_drops(snapshot.tcp_ext, last_tcp_ext));
    facts
}

/// Each process's descriptors and limit.
fn process_fds(snapshot: &Snapshot, facts: &mut Vec<Fact>) {
    for process in &snapshot.processes {
        // Unlimited descriptors cannot run out (their ratio is 0): nothing to remember.
        if process.soft_nofile != crate::model::UNLIMITED {
            facts.push(Fact::ProcessFds {
                comm: process.comm.clone(),
                pid: process.pid,
                open_fds: clamp(process.open_fds),
                limit: clamp(process.soft_nofile),
            });
        }
    }
}

/// Per (pid, service): distinct servers and connections; per (service, server, comm): open
/// connections. Client side only.
fn process_connections(snapshot: &Snapshot, facts: &mut Vec<Fact>) {
    for process in &snapshot.processes {
        for (service, spread) in &process.client_spread {
            facts.push(Fact::ProcessConnections {
                comm: process.comm.clone(),
                pid: process.pid,
                service: service.clone(),
                distinct_servers: clamp(spread.servers),
                connections: clamp(spread.connections),
            });
        }
    }
    for edge in &snapshot.client_edges {
        facts.push(Fact::EdgeConnections {
            service: edge.service.clone(),
            server: edge.server.to_string(),
            role: Role::Client,
            comm: edge.comm.clone(),
            open: clamp(edge.open),
        });
    }
}

/// The fullest listener per service: that is the one refusing connections.
fn listen_queues(snapshot: &Snapshot, facts: &mut Vec<Fact>) {
    let mut queues: BTreeMap<&str, (u32, u32, SocketAddr)> = BTreeMap::new();
    for listener in &snapshot.listeners {
        let Some(limit) = listener.limit.filter(|l| *l > 0) else {
            continue;
        };
        let entry = queues
            .entry(listener.service.as_str())
            .or_insert((0, limit, listener.local));
        if listener.queue_len as u64 * entry.1 as u64 >= entry.0 as u64 * limit as u64 {
            *entry = (listener.queue_len, limit, listener.local);
        }
    }
    for (service, (length, limit, local)) in queues {
        facts.push(Fact::ListenQueue {
            service: service.to_string(),
            listener: local.to_string(),
            length,
            limit,
        });
    }
}

/// The host's listen overflows, drops and SYN cookies since the previous sample; None on the
/// first sample (which sets the baseline) and when nothing happened.
fn host_listen_drops(
    now: TcpExtCounters,
    last_tcp_ext: &mut Option<TcpExtCounters>,
) -> Option<Fact> {
    let last = last_tcp_ext.replace(now)?;
    let delta = |now: u64, last: u64| now.saturating_sub(last);
    let (overflows, drops, syncookies_sent) = (
        delta(now.listen_overflows, last.listen_overflows),
        delta(now.listen_drops, last.listen_drops),
        delta(now.syncookies_sent, last.syncookies_sent),
    );
    (overflows + drops + syncookies_sent > 0).then_some(Fact::HostListenDrops {
        overflows,
        drops,
        syncookies_sent,
    })
}

/// The SYNs and handshakes each service's listeners dropped since the previous sample, as
/// incoming-SYN facts spread evenly over the `seconds` up to `now` that the sample covers: the
/// count is a total over that interval, and one lump in its last second would read as a burst
/// at `seconds` times the real rate.
pub fn listener_drop_facts(snapshot: &Snapshot, now: u64, seconds: u64) -> Vec<(u64, Fact)> {
    let seconds = seconds.clamp(1, now.max(1));
    let mut facts = Vec::new();
    for (service, &dropped) in &snapshot.listener_drops {
        let (share, rest) = (dropped / seconds, dropped % seconds);
        for offset in 0..seconds {
            // The remainder goes to the latest seconds.
            let count = share + u64::from(seconds - offset <= rest);
            if count == 0 {
                continue;
            }
            facts.push((
                now + 1 + offset - seconds,
                Fact::Syns {
                    service: service.clone(),
                    direction: SynDirection::In,
                    count: clamp(count),
                },
            ));
        }
    }
    facts
}

fn clamp(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{
        aggregate::{ClientEdge, ClientSpread, ProcessUsage},
        ListenerQueue,
    };

    fn process(pid: u32, comm: &str, open: u64, limit: u64) -> ProcessUsage {
        ProcessUsage {
            pid,
            comm: comm.into(),
            netns: 1,
            open_fds: open,
            soft_nofile: limit,
            connections: BTreeMap::new(),
            listening_sockets: BTreeMap::new(),
            client_spread: BTreeMap::new(),
        }
    }

    fn edge(comm: &str, server: &str, open: u64) -> ClientEdge {
        ClientEdge {
            service: "memcached".into(),
            server: server.parse().unwrap(),
            comm: comm.into(),
            open,
        }
    }

    #[test]
    fn converts_a_sample() {
        let mut worker = process(10, "worker", 1000, 1024);
        worker.client_spread.insert(
            "memcached".into(),
            ClientSpread {
                servers: 2,
                connections: 3,
            },
        );
        let snapshot = Snapshot {
            processes: vec![worker, process(11, "memcached", 50, u64::MAX)],
            client_edges: vec![
                edge("worker", "10.0.0.1:11211", 1),
                edge("worker", "10.0.0.2:11211", 2),
            ],
            listeners: vec![
                ListenerQueue {
                    service: "memcached".into(),
                    netns: 1,
                    local: "0.0.0.0:11211".parse().unwrap(),
                    inode: 1,
                    queue_len: 3,
                    limit: Some(1024),
                    drops: Some(0),
                },
                ListenerQueue {
                    service: "memcached".into(),
                    netns: 2,
                    local: "127.0.0.1:11211".parse().unwrap(),
                    inode: 2,
                    queue_len: 8,
                    limit: Some(8),
                    drops: None,
                },
            ],
            tcp_ext: TcpExtCounters {
                listen_overflows: 10,
                listen_drops: 12,
                syncookies_sent: 0,
            },
            ..Snapshot::default()
        };
        let mut last = None;
        let facts = facts_from_sample(&snapshot, &mut last);
        assert!(facts.contains(&Fact::ProcessFds {
            comm: "worker".into(),
            pid: 10,
            open_fds: 1000,
            limit: 1024
        }));
        assert!(
            !facts
                .iter()
                .any(|f| matches!(f, Fact::ProcessFds { comm, .. } if comm == "memcached")),
            "unlimited processes are skipped"
        );
        assert!(facts.contains(&Fact::ProcessConnections {
            comm: "worker".into(),
            pid: 10,
            service: "memcached".into(),
            distinct_servers: 2,
            connections: 3
        }));
        assert!(facts.contains(&Fact::EdgeConnections {
            service: "memcached".into(),
            server: "10.0.0.2:11211".into(),
            role: Role::Client,
            comm: "worker".into(),
            open: 2
        }));
        assert!(facts.contains(&Fact::ListenQueue {
            service: "memcached".into(),
            listener: "127.0.0.1:11211".into(),
            length: 8,
            limit: 8
        }));
        assert!(
            !facts
                .iter()
                .any(|f| matches!(f, Fact::HostListenDrops { .. })),
            "the first sample is the baseline"
        );
        let mut later = snapshot.clone();
        later.tcp_ext.listen_overflows = 15;
        later.tcp_ext.listen_drops = 18;
        let facts = facts_from_sample(&later, &mut last);
        assert!(facts.contains(&Fact::HostListenDrops {
            overflows: 5,
            drops: 6,
            syncookies_sent: 0
        }));
    }

    #[test]
    fn listener_drops_are_spread_over_the_seconds_they_cover() {
        let snapshot = Snapshot {
            listener_drops: BTreeMap::from([
                ("memcached".to_string(), 12),
                ("kestrel".to_string(), 2),
            ]),
            ..Snapshot::default()
        };
        let facts = listener_drop_facts(&snapshot, 1000, 5);
        let per_second = |service: &str| -> Vec<(u64, u32)> {
            facts
                .iter()
                .filter_map(|(t, fact)| match fact {
                    Fact::Syns {
                        service: s,
                        direction: SynDirection::In,
                        count,
                    } if s == service => Some((*t, *count)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            per_second("memcached"),
            [(996, 2), (997, 2), (998, 2), (999, 3), (1000, 3)]
        );
        // Fewer drops than seconds: whole drops in the latest seconds, no zero facts.
        assert_eq!(per_second("kestrel"), [(999, 1), (1000, 1)]);
        // A zero interval still records everything, in the current second.
        let facts = listener_drop_facts(&snapshot, 1000, 0);
        let total: u32 = facts
            .iter()
            .map(|(t, fact)| match fact {
                Fact::Syns { count, .. } if *t == 1000 => *count,
                _ => panic!("unexpected {t} {fact:?}"),
            })
            .sum();
        assert_eq!(total, 14);
    }
}
