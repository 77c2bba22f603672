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
        Fact::Syns { service, .. } => vec![Some(service)],
        Fact::ListenQueue {
            service, listener, ..
        } => vec![Some(service), Some(listener)],
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
            let mut rare = RareRow {
                families: bucket.rare.get_or_insert_with(Default::default),
                room: Room {
                    rows: &mut bucket.rows,
                    limits,
                },
                ids,
            };
            rare.apply(fact)
        }
    }
}

/// Where a fact of a rare family goes: the bucket's rare families and its row count under the
/// limits, with the fact's interned label ids.
struct RareRow<'a> {
    families: &'a mut RareFamilies,
    room: Room<'a>,
    ids: &'a [LabelId],
}

/// The bucket's row count and the limits it is held to.
struct Room<'a> {
    rows: &'a mut u32,
    limits: &'a HistoryLimits,
}

impl Room<'_> {
    fn budget(&mut self) -> RowBudget<'_> {
        RowBudget {
            used: self.rows,
            cap: self.limits.max_rows_per_second,
            reserve: self.limits.fold_reserve,
        }
    }
}

impl RareRow<'_> {
    fn id(&self, i: usize) -> LabelId {
        self.ids.get(i).copied().unwrap_or(OTHER)
    }

    fn edge(&self, role: Role) -> EdgeKey {
        EdgeKey {
            service: self.id(0),
            server: self.id(1),
            comm: self.id(2),
            role,
        }
    }

    /// The key of a family labelled by up to three of the fact's strings.
    fn labels(&self, count: usize, tag: u8) -> LabelsKey {
        let label = |i: usize| if i < count { self.id(i) } else { UNKNOWN };
        LabelsKey {
            labels: [label(0), label(1), label(2)],
            tag,
        }
    }

    /// One small step per fact kind; the kinds kept outside the rare families are not here.
    fn apply(&mut self, fact: Fact) -> bool {
        match fact {
            Fact::ConnectionOpened { role, .. } => {
                let key = self.edge(role);
                bump(self.families.opened.row(key, self.room.budget()), 1)
            }
            Fact::ConnectionClosed {
                role,
                closed_by,
                idle_before_close_s,
                duration_s,
                ..
            } => self.closed(role, closed_by, idle_before_close_s, duration_s),
            Fact::DeadWrite { role, outcome, .. } => self.dead_write(role, outcome),
            Fact::Retransmit { role, kind, .. } => self.tcp(role, retransmit_event(kind)),
            Fact::Reset {
                role, direction, ..
            } => self.tcp(role, reset_event(direction)),
            Fact::ConnectFailure { reason, .. } => self.tcp(Role::Client, connect_event(reason)),
            Fact::Syns {
                direction, count, ..
            } => self.syns(direction, count),
            Fact::ListenQueue { length, limit, .. } => {
                let key = self.labels(2, 0);
                let row = self.families.listen_queues.row(key, self.room.budget());
                gauge(row, length as u64, length, limit, 0)
            }
            Fact::ProcessFds {
                pid,
                open_fds,
                limit,
                ..
            } => self.process_fds(pid, open_fds, limit),
            Fact::ProcessConnections {
                pid,
                distinct_servers: servers,
                connections,
                ..
            } => {
                let key = self.labels(2, 0);
                let row = self
                    .families
                    .process_connections
                    .row(key, self.room.budget());
                gauge(row, servers as u64, pid, servers, connections)
            }
            Fact::EdgeConnections { role, open, .. } => {
                let key = self.edge(role);
                let row = self.families.edge_connections.row(key, self.room.budget());
                gauge(row, open as u64, open, 0, 0)
            }
            Fact::FdExhausted { .. } => {
                let key = self.labels(3, 0);
                bump(self.families.fd_errors.row(key, self.room.budget()), 1)
            }
            Fact::KeySplit {
                key_hash,
                new_key,
                one_process,
                ..
            } => self.key_split(key_hash, new_key, one_process),
            Fact::Request { .. }
            | Fact::RequestTimeout { .. }
            | Fact::HostListenDrops { .. }
            | Fact::EventsLost { .. } => unreachable!("handled by apply"),
        }
    }

    fn dead_write(&mut self, role: Role, outcome: DeadWriteOutcome) -> bool {
        let key = DeadWriteKey {
            edge: self.edge(role),
            command: self.id(3),
            outcome,
        };
        bump(self.families.dead_writes.row(key, self.room.budget()), 1)
    }

    fn syns(&mut self, direction: SynDirection, count: u32) -> bool {
        let tag = match direction {
            SynDirection::Out => TAG_SYN_OUT,
            SynDirection::In => TAG_SYN_IN,
        };
        let key = self.labels(1, tag);
        bump(self.families.syns.row(key, self.room.budget()), count)
    }

    fn closed(
        &mut self,
        role: Role,
        closed_by: ClosedBy,
        idle_before_close_s: Option<f64>,
        duration_s: Option<f64>,
    ) -> bool {
        let key = CloseKey {
            edge: self.edge(role),
            closed_by,
        };
        let Some(agg) = self.families.closed.row(key, self.room.budget()) else {
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

    fn process_fds(&mut self, pid: u32, open_fds: u32, limit: u32) -> bool {
        let key = self.labels(1, 0);
        let ppm = if limit == 0 {
            0
        } else {
            open_fds as u64 * 1_000_000 / limit as u64
        };
        let row = self.families.fds.row(key, self.room.budget());
        gauge(row, ppm, pid, open_fds, limit)
    }

    fn key_split(&mut self, key_hash: u64, new_key: bool, one_process: bool) -> bool {
        let key = KeySplitKey {
            service: self.id(0),
            servers: [self.id(1), self.id(2)],
            comms: [self.id(3), self.id(4)],
            one_process,
        };
        let Some(agg) = self.families.key_splits.row(key, self.room.budget()) else {
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

    fn tcp(&mut self, role: Role, event: TcpEvent) -> bool {
        let key = TcpKey {
            service: self.id(0),
            server: self.id(1),
            role,
            event,
        };
        bump(self.families.tcp.row(key, self.room.budget()), 1)
    }
}

fn retransmit_event(kind: RetransmitKind) -> TcpEvent {
    match kind {
        RetransmitKind::Data => TcpEvent::RetransmitData,
        RetransmitKind::Syn => TcpEvent::RetransmitSyn,
        RetransmitKind::SynAck => TcpEvent::RetransmitSynack,
    }
}

fn reset_event(direction: ResetDirection) -> TcpEvent {
    match direction {
        ResetDirection::Sent => TcpEvent::ResetSent,
        ResetDirection::Received => TcpEvent::ResetReceived,
    }
}

fn connect_event(reason: ConnectFailureReason) -> TcpEvent {
    match reason {
        ConnectFailureReason::Refused => TcpEvent::ConnectRefused,
        ConnectFailureReason::Timeout => TcpEvent::ConnectTimeout,
        ConnectFailureReason::Reset => TcpEvent::ConnectReset,
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

/// Counts an error reply under what it said: at most [`ERROR_TEXTS_PER_SERVER`] texts per
/// server and second (the rest count as "other"), within the second's error-row budget. The
/// request itself is already counted; without room only its text is lost.
pub(super) fn error_reply(bucket: &mut Bucket, mut key: ErrorReplyKey, latency_us: Option<u32>) {
    let Bucket {
        rare,
        error_rows,
        overflow,
        ..
    } = bucket;
    let series = &mut rare.get_or_insert_with(Default::default).error_replies;
    let known = series.iter().any(|(k, _)| *k == key);
    if !known
        && series.iter().filter(|(k, _)| k.same_server(&key)).count() >= ERROR_TEXTS_PER_SERVER
    {
        key.text = OTHER;
    }
    let budget = RowBudget {
        used: error_rows,
        cap: MAX_ERROR_ROWS_PER_SECOND,
        reserve: ERROR_ROWS_RESERVE,
    };
    match series.row(key, budget) {
        Some(agg) => {
            agg.count = agg.count.saturating_add(1);
            if let Some(latency_us) = latency_us {
                agg.latency.record(latency_us);
            }
        }
        None => *overflow += 1,
    }
}
