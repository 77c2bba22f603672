//! Reads one second's bucket into its snapshot form, with label ids mapped into the
//! snapshot's own label table.

use super::*;

pub(super) fn snapshot_second(bucket: &Bucket, table: &mut LabelTable<'_>) -> SecondSnapshot {
    let mut second = SecondSnapshot {
        t: bucket.second,
        overflow: bucket.overflow,
        ..Default::default()
    };
    requests(bucket, table, &mut second);
    let Some(rare) = bucket.rare.as_deref() else {
        return second;
    };
    connections(rare, table, &mut second);
    tcp(rare, table, &mut second);
    processes(rare, table, &mut second);
    key_splits(rare, table, &mut second);
    error_replies(rare, table, &mut second);
    second.host_listen = rare.host_listen;
    second.events_lost = rare.events_lost;
    second
}

/// Request counts and latency histograms: the families every busy second has.
fn requests(bucket: &Bucket, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, &count) in bucket.requests.iter() {
        second.requests.push(RequestRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            comm: table.id(k.comm),
            command: table.id(k.command),
            status: k.status,
            count,
        });
    }
    for (k, hist) in bucket.latency.iter() {
        second.latency.push(LatencyRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            comm: table.id(k.comm),
            cells: hist.cells(),
        });
    }
}

/// Connections opened and closed, and writes that went to dead connections.
fn connections(rare: &RareFamilies, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, &count) in rare.opened.iter() {
        second.opened.push(OpenedRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            comm: table.id(k.comm),
            count,
        });
    }
    for (k, agg) in rare.closed.iter() {
        second.closed.push(ClosedRow {
            service: table.id(k.edge.service),
            server: table.id(k.edge.server),
            role: k.edge.role,
            comm: table.id(k.edge.comm),
            closed_by: k.closed_by,
            count: agg.count,
            short_lived: agg.short_lived,
            idle_ms: agg.idle_ms[..agg.idle_len as usize].to_vec(),
        });
    }
    for (k, &count) in rare.dead_writes.iter() {
        second.dead_writes.push(DeadWriteRow {
            service: table.id(k.edge.service),
            server: table.id(k.edge.server),
            role: k.edge.role,
            comm: table.id(k.edge.comm),
            command: table.id(k.command),
            outcome: k.outcome,
            count,
        });
    }
}

/// TCP trouble, SYNs and accept queues.
fn tcp(rare: &RareFamilies, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, &count) in rare.tcp.iter() {
        second.tcp.push(TcpRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            event: k.event,
            count,
        });
    }
    for (k, &count) in rare.syns.iter() {
        second.syns.push(SynRow {
            service: table.id(k.labels[0]),
            direction: if k.tag == TAG_SYN_IN {
                SynDirection::In
            } else {
                SynDirection::Out
            },
            count,
        });
    }
    for (k, g) in rare.listen_queues.iter() {
        second.listen_queues.push(ListenQueueRow {
            service: table.id(k.labels[0]),
            listener: table.id(k.labels[1]),
            length: g.a,
            limit: g.b,
        });
    }
}

/// Per-process facts: fd usage, connections per service and server, failed fd calls.
fn processes(rare: &RareFamilies, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, g) in rare.fds.iter() {
        second.fds.push(FdRow {
            comm: table.id(k.labels[0]),
            pid: g.a,
            open_fds: g.b,
            limit: g.c,
        });
    }
    for (k, g) in rare.process_connections.iter() {
        second.process_connections.push(ProcessConnectionsRow {
            comm: table.id(k.labels[0]),
            service: table.id(k.labels[1]),
            pid: g.a,
            distinct_servers: g.b,
            connections: g.c,
        });
    }
    for (k, g) in rare.edge_connections.iter() {
        second.edge_connections.push(EdgeConnectionsRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            comm: table.id(k.comm),
            open: g.a,
        });
    }
    for (k, &count) in rare.fd_errors.iter() {
        second.fd_errors.push(FdErrorRow {
            comm: table.id(k.labels[0]),
            syscall: table.id(k.labels[1]),
            errno: table.id(k.labels[2]),
            count,
        });
    }
}

/// Keys one host sent to two servers.
fn key_splits(rare: &RareFamilies, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, agg) in rare.key_splits.iter() {
        second.key_splits.push(KeySplitRow {
            service: table.id(k.service),
            servers: [table.id(k.servers[0]), table.id(k.servers[1])],
            comms: [table.id(k.comms[0]), table.id(k.comms[1])],
            one_process: k.one_process,
            count: agg.count,
            keys: agg.keys,
            examples: agg.examples[..agg.examples_len as usize].to_vec(),
        });
    }
}

/// Error replies by what they said.
fn error_replies(rare: &RareFamilies, table: &mut LabelTable<'_>, second: &mut SecondSnapshot) {
    for (k, agg) in rare.error_replies.iter() {
        second.error_replies.push(ErrorReplyRow {
            service: table.id(k.service),
            server: table.id(k.server),
            role: k.role,
            status: k.status,
            text: table.text(k.text),
            count: agg.count,
            cells: agg.latency.cells(),
        });
    }
}
