//! Writes one fact into its second's bucket: the fact's strings are interned in the order
//! [`apply`] reads their ids, and each family's row is found or made within the row budget.

use super::*;

/// The strings of a fact, in the order `apply` reads their ids.
pub(super) fn fact_strings(fact: &Fact) -> Vec<Option<&str>> {
    fn opt(s: &Option<String>) -> Option<&str> {
        s.as_deref()
    }
    match fact {
        Fact::ConnectionOpened {
            service,
            server,
            comm,
            ..
        }
        | Fact::ConnectionClosed {
            service,
            server,
            comm,
            ..
        } => vec![Some(service), Some(server), opt(comm)],
        Fact::DeadWrite {
            service,
            server,
            comm,
            command,
            ..
        } => vec![Some(service), Some(server), Some(comm), opt(command)],
        Fact::Request {
            service,
            server,
            comm,
            command,
            ..
        }
        | Fact::RequestTimeout {
            service,
            server,
            comm,
            command,
            ..
        } => vec![Some(service), Some(server), opt(comm), Some(command)],
        Fact::Retransmit {
            service, server, ..
        }
        | Fact::Reset {
            service, server, ..
        }
        | Fact::ConnectFailure {
            service, server, ..
        } => vec![Some(service), Some(server)],
        Fact::Syns { service, .. } | Fact::ListenQueue { service, .. } => vec![Some(service)],
        Fact::HostListenDrops { .. } | Fact::EventsLost { .. } => vec![],
        Fact::ProcessFds { comm, .. } => vec![Some(comm)],
        Fact::ProcessConnections { comm, service, .. } => vec![Some(comm), Some(service)],
        Fact::EdgeConnections {
            service,
            server,
            comm,
            ..
        } => vec![Some(service), Some(server), Some(comm)],
        Fact::FdExhausted {
            comm,
            syscall,
            errno,
        } => vec![Some(comm), Some(syscall), Some(errno)],
        Fact::KeySplit {
            service,
            servers,
            comms,
            ..
        } => vec![
            Some(service),
            Some(&servers[0]),
            Some(&servers[1]),
            opt(&comms[0]),
            opt(&comms[1]),
        ],
    }
}

/// Adds a fact to its bucket; false when there was no room for it.
pub(super) fn apply(
    bucket: &mut Bucket,
    limits: &HistoryLimits,
    fact: Fact,
    ids: &[LabelId],
) -> bool {
    let id = |i: usize| ids.get(i).copied().unwrap_or(OTHER);
    fn budget<'a>(used: &'a mut u32, limits: &HistoryLimits) -> RowBudget<'a> {
        RowBudget {
            used,
            cap: limits.max_rows_per_second,
            reserve: limits.fold_reserve,
        }
    }
    let edge = |role: Role| EdgeKey {
        service: id(0),
        server: id(1),
        comm: id(2),
        role,
    };
    match fact {
        Fact::Request {
            role,
            status,
            latency_us,
            ..
        } => request(bucket, limits, id, role, status, latency_us),
        Fact::RequestTimeout { role, .. } => {
            request(bucket, limits, id, role, Status::Timeout, None)
        }
        Fact::HostListenDrops {
            overflows,
            drops,
            syncookies_sent,
        } => {
            let host = &mut rare(bucket).host_listen;
            host.overflows = host.overflows.saturating_add(overflows);
            host.drops = host.drops.saturating_add(drops);
            host.syncookies_sent = host.syncookies_sent.saturating_add(syncookies_sent);
            true
        }
        Fact::EventsLost { count } => {
            let lost = &mut rare(bucket).events_lost;
            *lost = lost.saturating_add(count);
            true
        }
        fact => {
            let rows = &mut bucket.rows;
            let rare = bucket.rare.get_or_insert_with(Default::default);
            match fact {
                Fact::ConnectionOpened { role, .. } => {
                    bump(rare.opened.row(edge(role), budget(rows, limits)), 1)
                }
                Fact::ConnectionClosed {
                    role,
                    closed_by,
                    idle_before_close_s,
                    duration_s,
                    ..
                } => {
                    let key = CloseKey {
                        edge: edge(role),
                        closed_by,
                    };
                    let Some(agg) = rare.closed.row(key, budget(rows, limits)) else {
                        return false;
                    };
                    agg.count = agg.count.saturating_add(1);
                    if duration_s.is_some_and(|d| d < SHORT_LIVED_S) {
                        agg.short_lived = agg.short_lived.saturating_add(1);
                    }
                    if let Some(idle) = idle_before_close_s.filter(|i| i.is_finite() && *i >= 0.0) {
                        if (agg.idle_len as usize) < IDLE_SAMPLES {
                            agg.idle_ms[agg.idle_len as usize] =
                                (idle * 1000.0).round().min(u32::MAX as f64) as u32;
                            agg.idle_len += 1;
                        }
                    }
                    true
                }
                Fact::DeadWrite { role, outcome, .. } => {
                    let key = DeadWriteKey {
                        edge: edge(role),
                        command: id(3),
                        outcome,
                    };
                    bump(rare.dead_writes.row(key, budget(rows, limits)), 1)
                }
                Fact::Retransmit { role, kind, .. } => {
                    let event = match kind {
                        RetransmitKind::Data => TcpEvent::RetransmitData,
                        RetransmitKind::Syn => TcpEvent::RetransmitSyn,
                        RetransmitKind::SynAck => TcpEvent::RetransmitSynack,
                    };
                    tcp(rare, rows, limits, id, role, event)
                }
                Fact::Reset {
                    role, direction, ..
                } => {
                    let event = match direction {
                        ResetDirection::Sent => TcpEvent::ResetSent,
                        ResetDirection::Received => TcpEvent::ResetReceived,
                    };
                    tcp(rare, rows, limits, id, role, event)
                }
                Fact::ConnectFailure { reason, .. } => {
                    let event = match reason {
                        ConnectFailureReason::Refused => TcpEvent::ConnectRefused,
                        ConnectFailureReason::Timeout => TcpEvent::ConnectTimeout,
                        ConnectFailureReason::Reset => TcpEvent::ConnectReset,
                    };
                    tcp(rare, rows, limits, id, Role::Client, event)
                }
                Fact::Syns {
                    direction, count, ..
                } => {
                    let key = LabelsKey {
                        labels: [id(0), UNKNOWN, UNKNOWN],
                        tag: match direction {
                            SynDirection::Out => TAG_SYN_OUT,
                            SynDirection::In => TAG_SYN_IN,
                        },
                    };
                    bump(rare.syns.row(key, budget(rows, limits)), count)
                }
                Fact::ListenQueue { length, limit, .. } => {
                    let key = LabelsKey {
                        labels: [id(0), UNKNOWN, UNKNOWN],
                        tag: 0,
                    };
                    gauge(
                        rare.listen_queues.row(key, budget(rows, limits)),
                        length as u64,
                        length,
                        limit,
                        0,
                    )
                }
                Fact::ProcessFds {
                    pid,
                    open_fds,
                    limit,
                    ..
                } => {
                    let key = LabelsKey {
                        labels: [id(0), UNKNOWN, UNKNOWN],
                        tag: 0,
                    };
                    let ppm = if limit == 0 {
                        0
                    } else {
                        open_fds as u64 * 1_000_000 / limit as u64
                    };
                    gauge(
                        rare.fds.row(key, budget(rows, limits)),
                        ppm,
                        pid,
                        open_fds,
                        limit,
                    )
                }
                Fact::ProcessConnections {
                    pid,
                    distinct_servers,
                    connections,
                    ..
                } => {
                    let key = LabelsKey {
                        labels: [id(0), id(1), UNKNOWN],
                        tag: 0,
                    };
                    gauge(
                        rare.process_connections.row(key, budget(rows, limits)),
                        distinct_servers as u64,
                        pid,
                        distinct_servers,
                        connections,
                    )
                }
                Fact::EdgeConnections { role, open, .. } => gauge(
                    rare.edge_connections.row(edge(role), budget(rows, limits)),
                    open as u64,
                    open,
                    0,
                    0,
                ),
                Fact::FdExhausted { .. } => {
                    let key = LabelsKey {
                        labels: [id(0), id(1), id(2)],
                        tag: 0,
                    };
                    bump(rare.fd_errors.row(key, budget(rows, limits)), 1)
                }
                Fact::KeySplit {
                    key_hash, new_key, ..
                } => {
                    let key = KeySplitKey {
                        service: id(0),
                        servers: [id(1), id(2)],
                        comms: [id(3), id(4)],
                    };
                    let Some(agg) = rare.key_splits.row(key, budget(rows, limits)) else {
                        return false;
                    };
                    agg.count = agg.count.saturating_add(1);
                    agg.keys = agg.keys.saturating_add(u32::from(new_key));
                    if (agg.examples_len as usize) < KEY_SPLIT_EXAMPLES
                        && !agg.examples[..agg.examples_len as usize].contains(&key_hash)
                    {
                        agg.examples[agg.examples_len as usize] = key_hash;
                        agg.examples_len += 1;
                    }
                    true
                }
                Fact::Request { .. }
                | Fact::RequestTimeout { .. }
                | Fact::HostListenDrops { .. }
                | Fact::EventsLost { .. } => unreachable!("handled above"),
            }
        }
    }
}

fn rare(bucket: &mut Bucket) -> &mut RareFamilies {
    bucket.rare.get_or_insert_with(Default::default)
}

fn bump(row: Option<&mut u32>, by: u32) -> bool {
    match row {
        Some(count) => {
            *count = count.saturating_add(by);
            true
        }
        None => false,
    }
}

fn gauge(row: Option<&mut Gauge>, rank: u64, a: u32, b: u32, c: u32) -> bool {
    match row {
        Some(gauge) => {
            gauge.offer(rank, a, b, c);
            true
        }
        None => false,
    }
}

fn tcp(
    rare: &mut RareFamilies,
    rows: &mut u32,
    limits: &HistoryLimits,
    id: impl Fn(usize) -> LabelId,
    role: Role,
    event: TcpEvent,
) -> bool {
    let key = TcpKey {
        service: id(0),
        server: id(1),
        role,
        event,
    };
    let budget = RowBudget {
        used: rows,
        cap: limits.max_rows_per_second,
        reserve: limits.fold_reserve,
    };
    bump(rare.tcp.row(key, budget), 1)
}

pub(super) fn request(
    bucket: &mut Bucket,
    limits: &HistoryLimits,
    id: impl Fn(usize) -> LabelId,
    role: Role,
    status: Status,
    latency_us: Option<u32>,
) -> bool {
    let key = RequestKey {
        service: id(0),
        server: id(1),
        comm: id(2),
        command: id(3),
        role,
        status,
    };
    let budget = RowBudget {
        used: &mut bucket.rows,
        cap: limits.max_rows_per_second,
        reserve: limits.fold_reserve,
    };
    if !bump(bucket.requests.row(key, budget), 1) {
        return false;
    }
    if let Some(latency_us) = latency_us {
        let key = EdgeKey {
            service: id(0),
            server: id(1),
            comm: id(2),
            role,
        };
        let budget = RowBudget {
            used: &mut bucket.latency_rows,
            cap: limits.max_latency_series_per_second,
            reserve: limits.fold_reserve,
        };
        match bucket.latency.row(key, budget) {
            Some(hist) => hist.record(latency_us),
            // The request itself is counted; only its latency is lost.
            None => bucket.overflow += 1,
        }
    }
    true
}
