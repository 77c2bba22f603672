//! The socket-table reader (sample steps 2 and 4): per network namespace, the watched sockets
//! from a sock_diag dump (or the /proc/<pid>/net/tcp text where sock_diag cannot be used) and the
//! namespace's TcpExt counters; the reuse of a namespace's last dump while its connections did
//! not change; and the backlog limits of listeners the tables did not give one for.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    ops::ControlFlow,
};

use super::{
    aggregate::ListenerQueue,
    diag,
    fd_walk::ListenerOwner,
    fd_walk::REWALK_AFTER_SAMPLES,
    found::{Found, ListenerCounts, WatchedSocket},
    parse::{self, ParseError, TcpRow, TcpState},
    scan::{classify, Failure},
    Namespace, Sampler, ScanErrors,
};
use crate::model::Role;

/// Where the socket tables of a namespace came from in one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSources {
    /// Namespaces read with a sock_diag dump (the normal case).
    pub sock_diag: usize,
    /// Namespaces read from /proc/<pid>/net/tcp{,6} text because sock_diag was unavailable,
    /// refused the port filter and the unfiltered dump, or (for another namespace) setns was
    /// not permitted. Costs CPU in proportion to every socket of the namespace.
    pub proc_text: usize,
    /// Namespaces of which only listeners were dumped: no TCP connection came or went in them
    /// since their last full dump, whose watched connections (and counts) were reused.
    pub reused_namespaces: usize,
}

/// TCP states the sock_diag dump asks for: listeners, plus every connection state
/// [`is_listed_connection_state`] keeps.
fn dumped_states() -> u32 {
    diag::state_mask(&[
        TcpState::Established as u8,
        TcpState::SynSent as u8,
        TcpState::FinWait1 as u8,
        TcpState::FinWait2 as u8,
        TcpState::Close as u8,
        TcpState::CloseWait as u8,
        TcpState::LastAck as u8,
        TcpState::Listen as u8,
        TcpState::Closing as u8,
    ])
}

/// One namespace's watched connections from its last full dump, reused by later samples while
/// no TCP connection opened, failed or closed in the namespace (its /proc/net/snmp counters,
/// see [`parse::TcpConnectionCounters`], are unchanged): on an idle host with many connections
/// the dump is most of a sample's cost. Listeners are always dumped afresh. What the counters
/// cannot tell (a socket passed to another process, a state change that keeps a connection
/// established) waits for the next full dump, at most
/// [`REWALK_AFTER_SAMPLES`](super::fd_walk::REWALK_AFTER_SAMPLES) later; which process holds
/// what still follows descriptor counts every sample.
///
/// The namespace's watched non-listening sockets with an inode are not copied here: they stay
/// in [`Sampler::watched_buffer`], tagged with `namespace`, and a sample that reuses the dump
/// keeps them from there (12 bytes a socket in all, where a copy per namespace doubled that).
#[derive(Debug, Clone)]
pub(super) struct NamespaceDump {
    pub(super) counters: parse::TcpConnectionCounters,
    /// Sample number of the dump.
    pub(super) sample: u64,
    /// [`WatchedSocket::namespace`] of its sockets in the last sample's list.
    pub(super) namespace: u32,
    /// Its listed connections per service (including those without an inode), without the
    /// sockets [`Found::finish`] dropped as repeated rows.
    pub(super) counts: Vec<u64>,
    pub(super) has_sockets: bool,
}

/// How many members of a namespace to try when the first ones exit during the read.
const REPRESENTATIVE_ATTEMPTS: usize = 4;

impl Sampler {
    /// Step 2 for every namespace: its watched sockets and TcpExt counters. A namespace whose
    /// last full dump is reused is read for its listeners only; a fresh full dump is kept for
    /// reuse by the next samples.
    pub(super) fn read_tables(
        &mut self,
        namespaces: &mut BTreeMap<u64, Namespace>,
        list_connections: bool,
        errors: &mut ScanErrors,
    ) -> Found {
        let plans = self.reuse_plans(namespaces, list_connections);
        let mut watched = std::mem::take(&mut self.watched_buffer);
        keep_reused_connections(
            &mut watched,
            plans.iter().map(|(_, reusable)| reusable.as_ref()),
        );
        let servers = self.servers.carry(&mut watched);
        let mut found = Found::new(self.service_names.len(), list_connections, watched, servers);
        let own_netns = self.procfs.own_netns().ok();
        for (position, ((&netns, namespace), (counters, reusable))) in
            namespaces.iter_mut().zip(plans).enumerate()
        {
            // Each namespace has a process in it: far fewer than 2^32.
            found.namespace = u32::try_from(position).unwrap_or(u32::MAX);
            let first = found.watched.len();
            // Only a fresh dump needs the counts before it, to tell its own.
            let counts_before = reusable
                .is_none()
                .then(|| found.connections_by_service.clone());
            let diag_before = found.sources.sock_diag;
            // A reusable namespace is read for its listeners only.
            found.listeners_only = reusable.is_some();
            self.read_namespace(
                netns,
                own_netns == Some(netns),
                namespace,
                &mut found,
                errors,
            );
            found.listeners_only = false;
            if let Some(mut last) = reusable {
                for (total, count) in found.connections_by_service.iter_mut().zip(&last.counts) {
                    *total += count;
                }
                namespace.has_watched_sockets |= last.has_sockets;
                found.sources.reused_namespaces += 1;
                last.namespace = found.namespace;
                self.namespace_dumps.insert(netns, last);
                continue;
            }
            if let Some(counters) = counters.filter(|_| found.sources.sock_diag > diag_before) {
                let dump = fresh_dump(
                    counters,
                    self.samples,
                    &found,
                    first,
                    &counts_before.unwrap_or_default(),
                );
                self.namespace_dumps.insert(netns, dump);
            }
        }
        self.namespace_dumps
            .retain(|netns, _| namespaces.contains_key(netns));
        found.finish();
        uncount_repeated_rows(
            &mut self.namespace_dumps,
            namespaces.keys().copied(),
            &found.repeated_connections,
        );
        found
    }

    /// Which namespaces reuse their last full dump: no TCP connection opened or closed in
    /// them since (and that is recent), so their watched connections still hold and only
    /// listeners are dumped. Decided for every namespace before any is read, so the last
    /// sample's list can be cut down to their connections in one pass. One entry per
    /// namespace, in order: its connection counters now and the dump to reuse.
    fn reuse_plans(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        list_connections: bool,
    ) -> Vec<(Option<parse::TcpConnectionCounters>, Option<NamespaceDump>)> {
        let mut plans = Vec::with_capacity(namespaces.len());
        for (&netns, namespace) in namespaces {
            let counters = self.connection_counters(namespace);
            let reusable = self.namespace_dumps.remove(&netns).filter(|last| {
                !list_connections
                    && counters == Some(last.counters)
                    && self.samples - last.sample < REWALK_AFTER_SAMPLES
            });
            plans.push((counters, reusable));
        }
        plans
    }

    /// Reads one namespace's sockets, with sock_diag when possible and from its /proc text
    /// otherwise, and its TcpExt counters, recording its watched sockets in `found`.
    pub(super) fn read_namespace(
        &mut self,
        netns: u64,
        own: bool,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) {
        if self.read_namespace_diag(netns, own, namespace, found, errors) {
            found.sources.sock_diag += 1;
            for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
                match self.procfs.read_netstat(pid) {
                    Ok(Ok(counters)) => found.netstat_readings.push((netns, counters)),
                    Ok(Err(err)) => errors.parse(&format!("netns {netns} net/netstat"), &err),
                    Err(err) if classify(&err) == Failure::Vanished => continue,
                    Err(err) => errors.io(&format!("netns {netns} net/netstat"), &err),
                }
                namespace.representative.get_or_insert(pid);
                return;
            }
            return;
        }
        found.sources.proc_text += 1;
        self.read_namespace_text(netns, namespace, found, errors);
    }

    /// The sock_diag path: one filtered dump per address family. False when the namespace must
    /// be read from /proc text instead (the reason is logged once and remembered).
    fn read_namespace_diag(
        &mut self,
        netns: u64,
        own: bool,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) -> bool {
        if self.sock_diag_unavailable || (!own && self.setns_refused) {
            return false;
        }
        let handle = if own {
            None
        } else {
            match self.open_member_netns(netns, namespace, errors) {
                ControlFlow::Continue(handle) => Some(handle),
                ControlFlow::Break(done) => return done,
            }
        };
        let states = if found.listeners_only {
            diag::state_mask(&[TcpState::Listen as u8])
        } else {
            dumped_states()
        };
        loop {
            let filter = if self.port_filter_refused {
                None
            } else {
                self.port_filter.as_deref()
            };
            let mark = found.mark();
            match self.dump_namespace(netns, handle.as_ref(), states, filter, found) {
                Ok(()) => {
                    found.commit_namespace(namespace);
                    return true;
                }
                Err(err) => {
                    found.rollback(mark);
                    let filtered = filter.is_some();
                    if !self.dump_failed(&err, netns, own, filtered, errors) {
                        return false;
                    }
                }
            }
        }
    }

    /// Opens another namespace through one of its first members: the handle, or what
    /// [`Sampler::read_namespace_diag`] returns without one (true when every member tried has
    /// exited, false, counted, when the open failed).
    fn open_member_netns(
        &self,
        netns: u64,
        namespace: &mut Namespace,
        errors: &mut ScanErrors,
    ) -> ControlFlow<bool, File> {
        for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
            match self.procfs.open_netns(pid) {
                Ok(handle) => {
                    namespace.representative = Some(pid);
                    return ControlFlow::Continue(handle);
                }
                Err(err) if classify(&err) == Failure::Vanished => continue,
                Err(err) => {
                    errors.io(&format!("netns {netns} open"), &err);
                    return ControlFlow::Break(false);
                }
            }
        }
        // Every member tried has exited: the namespace is going away.
        ControlFlow::Break(true)
    }

    /// One sock_diag dump of the namespace (ours when `handle` is `None`), recording the
    /// watched sockets in `found`.
    fn dump_namespace(
        &self,
        netns: u64,
        handle: Option<&File>,
        states: u32,
        filter: Option<&[u8]>,
        found: &mut Found,
    ) -> Result<(), diag::DiagError> {
        let ports = &self.ports;
        let names = &self.service_names;
        let mut visit = |socket: diag::DiagSocket| {
            let row = TcpRow {
                local: socket.local,
                remote: socket.remote,
                state: socket.state,
                tx_queue: socket.wqueue,
                rx_queue: socket.rqueue,
                inode: socket.inode,
            };
            if let Some((service, role)) = service_of(ports, &row) {
                // sock_diag reports a listener's accept-queue limit as its wqueue.
                let counts = ListenerCounts {
                    limit: (row.state == TcpState::Listen as u8).then_some(socket.wqueue),
                    drops: socket.drops,
                };
                found.record(names, netns, row, service, role, counts);
            }
        };
        diag::dump_sockets(handle, states, filter, &mut visit)
    }

    /// Notes why a dump failed: true when it is worth retrying at once (the kernel refused the
    /// port filter, so the next dump goes without it), false when the namespace is read from
    /// /proc text instead (the reason logged once and remembered, or counted).
    fn dump_failed(
        &mut self,
        err: &diag::DiagError,
        netns: u64,
        own: bool,
        filtered: bool,
        errors: &mut ScanErrors,
    ) -> bool {
        match err {
            diag::DiagError::Kernel(errno) if *errno == libc::EINVAL && filtered => {
                tracing::warn!(%err, "sock_diag refused the port filter; dumping all TCP sockets and filtering here");
                self.port_filter_refused = true;
                return true;
            }
            diag::DiagError::Unavailable(_) => {
                tracing::warn!(%err, "sock_diag unavailable; reading /proc/<pid>/net/tcp text instead (costs CPU per socket on the host)");
                self.sock_diag_unavailable = true;
            }
            diag::DiagError::Setns(io)
                if !own && matches!(io.raw_os_error(), Some(libc::EPERM)) =>
            {
                tracing::info!("setns refused (no CAP_SYS_ADMIN): other network namespaces are read from /proc text");
                self.setns_refused = true;
            }
            _ => errors.diag(&format!("netns {netns} sock_diag"), err),
        }
        false
    }

    /// The /proc text path: the namespace's tables and counters through its first member that
    /// stays alive long enough.
    fn read_namespace_text(
        &self,
        netns: u64,
        namespace: &mut Namespace,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) {
        for &pid in namespace.members.iter().take(REPRESENTATIVE_ATTEMPTS) {
            // Rows are recorded as they are read (no list of them: on a host with many watched
            // sockets it would be tens of MB) and undone if the member exits half-way.
            let mark = found.mark();
            match self.read_namespace_tables(netns, pid, found, errors) {
                Ok(()) => {}
                Err(err) if classify(&err) == Failure::Vanished => {
                    found.rollback(mark);
                    errors.vanished += 1;
                    continue;
                }
                Err(err) => {
                    found.rollback(mark);
                    errors.io(&format!("netns {netns} via pid {pid} net/tcp"), &err);
                    return;
                }
            }
            namespace.representative = Some(pid);
            match self.procfs.read_netstat(pid) {
                Ok(Ok(counters)) => found.netstat_readings.push((netns, counters)),
                Ok(Err(err)) => errors.parse(&format!("netns {netns} net/netstat"), &err),
                Err(err) => errors.io(&format!("netns {netns} net/netstat"), &err),
            }
            found.commit_namespace(namespace);
            return;
        }
    }

    /// Records the watched rows of tcp and tcp6 as seen through `pid`. A missing tcp6 on a
    /// live process means IPv6 is disabled, not that the process exited.
    fn read_namespace_tables(
        &self,
        netns: u64,
        pid: u32,
        found: &mut Found,
        errors: &mut ScanErrors,
    ) -> io::Result<()> {
        let mut visit = |row: Result<TcpRow, ParseError>| match row {
            Ok(row) => {
                if let Some((service, role)) = service_of(&self.ports, &row) {
                    found.record(
                        &self.service_names,
                        netns,
                        row,
                        service,
                        role,
                        ListenerCounts::default(),
                    );
                }
            }
            Err(err) => errors.parse(&format!("pid {pid} net/tcp row"), &err),
        };
        let wanted = |local: u16, remote: u16| {
            self.ports.contains_key(&local) || self.ports.contains_key(&remote)
        };
        self.procfs.read_tcp_table(pid, "tcp", wanted, &mut visit)?;
        match self.procfs.read_tcp_table(pid, "tcp6", wanted, &mut visit) {
            Err(err) if classify(&err) == Failure::Vanished => {
                if self.procfs.netns_of(pid).is_err() {
                    return Err(err);
                }
                Ok(())
            }
            other => other,
        }
    }

    /// The namespace's connection counters (see [`parse::TcpConnectionCounters`]) through its
    /// first member that answers; None when none did.
    pub(super) fn connection_counters(
        &self,
        namespace: &Namespace,
    ) -> Option<parse::TcpConnectionCounters> {
        namespace
            .members
            .iter()
            .take(REPRESENTATIVE_ATTEMPTS)
            .find_map(|&pid| self.procfs.read_snmp_tcp(pid).ok()?.ok())
    }

    /// Backlog limits of listeners the socket tables did not give one for (the /proc text
    /// path): one sock_diag dump per such namespace (joining the namespace when it is not
    /// ours); listeners still without a limit, because setns is not allowed or the dump missed
    /// them, are read through their owning process.
    pub(super) fn fill_backlog_limits(
        &mut self,
        namespaces: &BTreeMap<u64, Namespace>,
        listener_owners: &HashMap<u64, ListenerOwner>,
        listeners: &mut [ListenerQueue],
        errors: &mut ScanErrors,
    ) {
        if listeners.iter().all(|listener| listener.limit.is_some()) {
            return;
        }
        let own_netns = self.procfs.own_netns().ok();
        for (&netns, namespace) in namespaces {
            if !namespace.has_watched_listeners
                || self.sock_diag_unavailable
                || listeners
                    .iter()
                    .filter(|listener| listener.netns == netns)
                    .all(|listener| listener.limit.is_some())
            {
                continue;
            }
            let Some(representative) = namespace.representative else {
                continue;
            };
            let dump = if own_netns == Some(netns) {
                diag::query_listeners(None)
            } else if self.setns_refused {
                continue;
            } else {
                match self.procfs.open_netns(representative) {
                    Ok(handle) => diag::query_listeners(Some(&handle)),
                    Err(err) => {
                        errors.io(&format!("netns {netns} open"), &err);
                        continue;
                    }
                }
            };
            match dump {
                Ok(dump) => {
                    let found: HashMap<u64, &diag::ListenerBacklog> = dump
                        .iter()
                        .map(|listener| (listener.inode, listener))
                        .collect();
                    for listener in listeners.iter_mut().filter(|l| l.netns == netns) {
                        let backlog = found.get(&listener.inode);
                        listener.limit = backlog.map(|backlog| backlog.limit);
                        listener.drops = backlog.and_then(|backlog| backlog.drops);
                    }
                }
                // Expected where setns is not permitted: the owners are asked below instead, and
                // only a listener that stays without a limit is reported.
                Err(err) if own_netns != Some(netns) && err.errno() == Some(libc::EPERM) => {
                    self.setns_refused = true;
                }
                Err(err) => errors.diag(&format!("netns {netns} sock_diag"), &err),
            }
        }
        for listener in listeners.iter_mut().filter(|l| l.limit.is_none()) {
            let Some(owner) = listener_owners.get(&listener.inode) else {
                continue;
            };
            match diag::backlog_via_owner(owner.pid, owner.fd, listener.inode) {
                Ok(backlog) => {
                    listener.limit = Some(backlog.limit);
                    listener.drops = backlog.drops;
                }
                Err(diag::DiagError::Changed) => errors.vanished += 1,
                Err(err) => errors.diag(&format!("pid {} listener backlog", owner.pid), &err),
            }
        }
    }
}

/// The service a socket belongs to and our side of it: Server when the local port is watched.
/// Listeners only match on their local port.
fn service_of(ports: &HashMap<u16, u16>, row: &TcpRow) -> Option<(u16, Role)> {
    if let Some(&service) = ports.get(&row.local.port()) {
        return Some((service, Role::Server));
    }
    if row.state == TcpState::Listen as u8 {
        return None;
    }
    ports
        .get(&row.remote.port())
        .map(|&service| (service, Role::Client))
}

/// Cuts the last sample's watched list down to the connections of the namespaces whose dump
/// is reused, in place, retagged with the namespaces' positions in this sample.
/// `reused_dumps` has one entry per namespace of this sample, in order.
pub(super) fn keep_reused_connections<'a>(
    watched: &mut Vec<WatchedSocket>,
    reused_dumps: impl Iterator<Item = Option<&'a NamespaceDump>>,
) {
    const DROPPED: u32 = u32::MAX;
    // Indexed by the position a namespace had in the last sample.
    let mut new_position: Vec<u32> = Vec::new();
    for (position, dump) in reused_dumps.enumerate() {
        // Positions are below the last sample's namespace count (each has a process in it);
        // u32::MAX only marks one that did not fit, whose sockets cannot be told apart.
        let Some(dump) = dump.filter(|dump| dump.namespace != u32::MAX) else {
            continue;
        };
        let old = dump.namespace as usize;
        if new_position.len() <= old {
            new_position.resize(old + 1, DROPPED);
        }
        new_position[old] = u32::try_from(position).unwrap_or(DROPPED);
    }
    watched.retain_mut(|socket| {
        let position = new_position
            .get(socket.namespace as usize)
            .copied()
            .unwrap_or(DROPPED);
        if socket.listening() || position == DROPPED {
            return false;
        }
        socket.namespace = position;
        true
    });
}

/// The next sample reuses a dump's sockets as [`Found::finish`] left them, without the repeated
/// rows it dropped (see `repeated`): the dump's counts must not include those either.
/// `netns_by_position` lists this sample's namespaces in order.
pub(super) fn uncount_repeated_rows(
    dumps: &mut HashMap<u64, NamespaceDump>,
    mut netns_by_position: impl Iterator<Item = u64>,
    repeated: &[(u32, u16)],
) {
    if repeated.is_empty() {
        return;
    }
    let mut repeated = repeated.to_vec();
    repeated.sort_unstable();
    let mut position = 0u32;
    let mut netns = netns_by_position.next();
    for (namespace, service) in repeated {
        while position < namespace {
            position += 1;
            netns = netns_by_position.next();
        }
        let dump = netns
            .and_then(|netns| dumps.get_mut(&netns))
            .filter(|dump| dump.namespace == namespace);
        if let Some(count) = dump.and_then(|dump| dump.counts.get_mut(usize::from(service))) {
            *count = count.saturating_sub(1);
        }
    }
}

/// The dump just read for the namespace at `found.namespace`, whose watched sockets start at
/// `first` in `found.watched`; `counts_before` are the per-service counts before it was read.
fn fresh_dump(
    counters: parse::TcpConnectionCounters,
    sample: u64,
    found: &Found,
    first: usize,
    counts_before: &[u64],
) -> NamespaceDump {
    let counts = found
        .connections_by_service
        .iter()
        .zip(counts_before)
        .map(|(after, before)| after - before)
        .collect();
    NamespaceDump {
        counters,
        sample,
        namespace: found.namespace,
        has_sockets: found.watched[first..]
            .iter()
            .any(|socket| !socket.listening()),
        counts,
    }
}
