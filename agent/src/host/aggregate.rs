//! Pure aggregation of what one scan found: per-service listen queues, per-comm fd usage with a
//! bounded number of comm values, and namespace-summed TcpExt counters that stay monotonic.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use super::parse::TcpExtCounters;

/// The comm value that stands for every process folded past `max_comms`.
pub const OTHER_COMM: &str = "other";

/// One listening socket on a watched port.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerQueue {
    pub service: String,
    /// Inode of the network namespace the listener lives in.
    pub netns: u64,
    pub local: SocketAddr,
    pub inode: u64,
    /// Connections waiting for accept() (rx_queue of the LISTEN row).
    pub queue_len: u32,
    /// The accept backlog limit from sock_diag; None when it could not be read (another
    /// namespace without CAP_SYS_ADMIN, or the query failed).
    pub limit: Option<u32>,
    /// The listener's sk_drops (wrapping u32): SYNs and handshakes it refused because a queue
    /// was full. None when it could not be read.
    pub drops: Option<u32>,
}

impl ListenerQueue {
    /// Queue length over the queue's real capacity. The kernel admits a new connection while
    /// `queue_len <= limit` (sk_acceptq_is_full is `>`), so capacity is `limit + 1` and 1.0 means
    /// "the next handshake is dropped".
    pub fn fullness(&self) -> Option<f64> {
        self.limit
            .map(|limit| f64::from(self.queue_len) / (f64::from(limit) + 1.0))
    }

    pub fn is_full(&self) -> bool {
        self.limit.is_some_and(|limit| self.queue_len > limit)
    }
}

/// Turns each listener's cumulative drop count into what it dropped since the previous sample,
/// per service. State is one entry per listener present in the last sample.
#[derive(Debug, Default)]
pub struct ListenerDrops {
    /// Last reading per (netns, inode); None for a listener seen without a readable count.
    last: HashMap<(u64, u64), Option<u32>>,
    /// A sample has been taken: listeners that appear later are new, and all they dropped
    /// happened since. In the first sample they are only a baseline (their drops may be old).
    primed: bool,
}

impl ListenerDrops {
    /// Drops per service since the previous call; services without any are left out.
    pub fn update(&mut self, listeners: &[ListenerQueue]) -> BTreeMap<String, u64> {
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut current = HashMap::with_capacity(listeners.len());
        for listener in listeners {
            let key = (listener.netns, listener.inode);
            let before = self.last.get(&key).copied();
            let since = match (before, listener.drops) {
                // sk_drops is an atomic_t read as u32: it wraps.
                (Some(Some(before)), Some(now)) => now.wrapping_sub(before),
                (None, Some(now)) if self.primed => now,
                _ => 0,
            };
            if since > 0 {
                *dropped.entry(listener.service.clone()).or_default() += u64::from(since);
            }
            // A listener whose count is unreadable this time keeps its last reading.
            let reading = listener.drops.or(before.flatten());
            current.insert(key, reading);
        }
        self.last = current;
        self.primed = true;
        dropped
    }
}

/// Listen queues of one service across all its listeners (SO_REUSEPORT groups, one per
/// namespace, IPv4 and IPv6). Sums give total capacity and backlog; `max_fullness` and
/// `full_listeners` keep one saturated listener from hiding behind idle ones in the sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListenQueueSummary {
    pub listeners: u64,
    pub queue_len_sum: u64,
    /// Sum of limits over the listeners whose limit is known.
    pub queue_limit_sum: u64,
    pub limit_unknown: u64,
    pub full_listeners: u64,
    /// Max of [`ListenerQueue::fullness`]; None when no listener has a known limit.
    pub max_fullness: Option<f64>,
}

/// Per-service summaries; every name in `services` gets an entry, so a service with no listener
/// reads as zero listeners rather than being absent.
pub fn summarize_listen_queues(
    services: &[String],
    listeners: &[ListenerQueue],
) -> BTreeMap<String, ListenQueueSummary> {
    let mut summaries: BTreeMap<String, ListenQueueSummary> = services
        .iter()
        .map(|name| (name.clone(), ListenQueueSummary::default()))
        .collect();
    for listener in listeners {
        let summary = summaries.entry(listener.service.clone()).or_default();
        summary.listeners += 1;
        summary.queue_len_sum += u64::from(listener.queue_len);
        match listener.limit {
            Some(limit) => summary.queue_limit_sum += u64::from(limit),
            None => summary.limit_unknown += 1,
        }
        if listener.is_full() {
            summary.full_listeners += 1;
        }
        if let Some(fullness) = listener.fullness() {
            summary.max_fullness = Some(
                summary
                    .max_fullness
                    .map_or(fullness, |max| max.max(fullness)),
            );
        }
    }
    summaries
}

/// A process holding at least one watched socket. `pid` is for logs and the connection
/// listing, never for metric labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessUsage {
    pub pid: u32,
    pub comm: String,
    pub netns: u64,
    /// Entries in `/proc/<pid>/fd` when it was scanned.
    pub open_fds: u64,
    /// Soft RLIMIT_NOFILE read from `/proc/<pid>/limits` at the same scan, so prlimit(1) changes
    /// show up; `u64::MAX` when unlimited.
    pub soft_nofile: u64,
    /// Watched connections (any non-listening socket) held, per service.
    pub connections: BTreeMap<String, u64>,
    /// Watched listening sockets held, per service.
    pub listening_sockets: BTreeMap<String, u64>,
    /// Client-role connections held, per service: to how many servers.
    pub client_spread: BTreeMap<String, ClientSpread>,
}

/// One process's client connections to one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientSpread {
    /// Distinct servers of the service it is connected to.
    pub servers: u64,
    pub connections: u64,
}

/// Open client connections from the processes named `comm` to one server of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEdge {
    pub service: String,
    pub server: std::net::SocketAddr,
    pub comm: String,
    pub open: u64,
}

impl ProcessUsage {
    pub fn fd_usage_ratio(&self) -> f64 {
        crate::model::fd_usage_ratio(self.open_fds, self.soft_nofile)
    }
}

/// Processes with the same comm, summed, except `max_fd_usage_ratio` and `open_fds_max` which
/// are maxima: a pool of workers is in trouble when any one of them reaches its own limit, and
/// a sum of ratios means nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct CommUsage {
    pub comm: String,
    pub processes: u64,
    pub open_fds_sum: u64,
    pub open_fds_max: u64,
    pub max_fd_usage_ratio: f64,
    pub connections: BTreeMap<String, u64>,
    pub listening_sockets: BTreeMap<String, u64>,
}

impl CommUsage {
    fn new(comm: String) -> Self {
        CommUsage {
            comm,
            processes: 0,
            open_fds_sum: 0,
            open_fds_max: 0,
            max_fd_usage_ratio: 0.0,
            connections: BTreeMap::new(),
            listening_sockets: BTreeMap::new(),
        }
    }

    fn add_process(&mut self, process: &ProcessUsage) {
        self.processes += 1;
        self.open_fds_sum += process.open_fds;
        self.open_fds_max = self.open_fds_max.max(process.open_fds);
        self.max_fd_usage_ratio = self.max_fd_usage_ratio.max(process.fd_usage_ratio());
        merge_counts(&mut self.connections, &process.connections);
        merge_counts(&mut self.listening_sockets, &process.listening_sockets);
    }

    fn absorb(&mut self, other: &CommUsage) {
        self.processes += other.processes;
        self.open_fds_sum += other.open_fds_sum;
        self.open_fds_max = self.open_fds_max.max(other.open_fds_max);
        self.max_fd_usage_ratio = self.max_fd_usage_ratio.max(other.max_fd_usage_ratio);
        merge_counts(&mut self.connections, &other.connections);
        merge_counts(&mut self.listening_sockets, &other.listening_sockets);
    }

    fn total_connections(&self) -> u64 {
        self.connections.values().sum()
    }
}

fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (service, count) in from {
        *into.entry(service.clone()).or_default() += count;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommAggregate {
    /// At most `max_comms` named entries, then one [`OTHER_COMM`] entry if anything was folded.
    pub comms: Vec<CommUsage>,
    /// How many distinct comm values went into [`OTHER_COMM`].
    pub folded_comms: usize,
}

/// Groups processes by comm and keeps the `max_comms` comms holding the most watched
/// connections (ties: higher fd usage ratio, then name, so the choice is stable between samples).
/// A real process named "other" shares the overflow bucket; that costs nothing in cardinality.
pub fn aggregate_by_comm(processes: &[ProcessUsage], max_comms: usize) -> CommAggregate {
    let mut by_comm: HashMap<&str, CommUsage> = HashMap::new();
    for process in processes {
        by_comm
            .entry(process.comm.as_str())
            .or_insert_with(|| CommUsage::new(process.comm.clone()))
            .add_process(process);
    }
    let mut ranked: Vec<CommUsage> = by_comm.into_values().collect();
    ranked.sort_by(|a, b| {
        b.total_connections()
            .cmp(&a.total_connections())
            .then_with(|| {
                b.max_fd_usage_ratio
                    .partial_cmp(&a.max_fd_usage_ratio)
                    .unwrap_or(Ordering::Equal)
            })
            .then_with(|| a.comm.cmp(&b.comm))
    });
    if ranked.len() <= max_comms {
        return CommAggregate {
            comms: ranked,
            folded_comms: 0,
        };
    }
    let folded = ranked.split_off(max_comms);
    let mut other = CommUsage::new(OTHER_COMM.to_string());
    for comm in &folded {
        other.absorb(comm);
    }
    // A kept comm literally named "other" merges with the bucket rather than duplicating a label.
    if let Some(index) = ranked.iter().position(|comm| comm.comm == OTHER_COMM) {
        let kept = ranked.remove(index);
        other.absorb(&kept);
    }
    ranked.push(other);
    CommAggregate {
        comms: ranked,
        folded_comms: folded.len(),
    }
}

/// Sums TcpExt counters over network namespaces while staying monotonic. The kernel keeps these
/// counters per namespace; a plain sum would drop when a namespace (a container) goes away, which
/// Prometheus reads as a counter reset. This keeps each namespace's last value and adds only
/// increases, so a vanished namespace's events stay counted. A namespace seen for the first
/// time contributes its whole value (its counters started at zero when it was created), and so
/// does one whose counters went down (its inode was reused by a new namespace).
#[derive(Debug, Clone, Default)]
pub struct CounterAccumulator {
    last: HashMap<u64, TcpExtCounters>,
    total: TcpExtCounters,
}

impl CounterAccumulator {
    /// `readings` are this sample's per-namespace values; `alive` is every namespace seen in
    /// this sample, including those whose netstat could not be read this time (their last value
    /// is kept, so a transient read failure does not count their history twice).
    pub fn update(
        &mut self,
        readings: &[(u64, TcpExtCounters)],
        alive: &BTreeSet<u64>,
    ) -> TcpExtCounters {
        for (netns, current) in readings {
            let previous = self.last.get(netns).copied().unwrap_or_default();
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            self.total.listen_overflows = self
                .total
                .listen_overflows
                .saturating_add(delta(current.listen_overflows, previous.listen_overflows));
            self.total.listen_drops = self
                .total
                .listen_drops
                .saturating_add(delta(current.listen_drops, previous.listen_drops));
            self.total.syncookies_sent = self
                .total
                .syncookies_sent
                .saturating_add(delta(current.syncookies_sent, previous.syncookies_sent));
            self.last.insert(*netns, *current);
        }
        self.last.retain(|netns, _| alive.contains(netns));
        self.total
    }

    pub fn total(&self) -> TcpExtCounters {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(
        pid: u32,
        comm: &str,
        open_fds: u64,
        soft_nofile: u64,
        connections: u64,
    ) -> ProcessUsage {
        ProcessUsage {
            pid,
            comm: comm.to_string(),
            netns: 1,
            open_fds,
            soft_nofile,
            connections: BTreeMap::from([("memcached".to_string(), connections)]),
            listening_sockets: BTreeMap::new(),
            client_spread: BTreeMap::new(),
        }
    }

    #[test]
    fn comm_groups_sum_fds_and_connections_and_take_max_ratio() {
        let processes = [
            process(10, "php-fpm", 100, 1000, 3),
            process(11, "php-fpm", 900, 1024, 4),
            process(12, "php-fpm", 50, 100, 1),
        ];
        let aggregate = aggregate_by_comm(&processes, 8);
        assert_eq!(aggregate.folded_comms, 0);
        let [php] = aggregate.comms.as_slice() else {
            panic!("one comm expected: {:?}", aggregate.comms)
        };
        assert_eq!(php.processes, 3);
        assert_eq!(php.open_fds_sum, 1050);
        assert_eq!(php.open_fds_max, 900);
        // 900/1024 = 0.879 beats 50/100 = 0.5: the ratio is per process, not of the sums.
        assert!((php.max_fd_usage_ratio - 900.0 / 1024.0).abs() < 1e-12);
        assert_eq!(php.connections["memcached"], 8);
    }

    #[test]
    fn comms_beyond_the_cap_fold_into_other() {
        let processes = [
            process(1, "big", 10, 100, 50),
            process(2, "mid", 10, 100, 20),
            process(3, "small", 95, 100, 1),
            process(4, "tiny", 10, 100, 1),
            process(5, "tiny", 10, 20, 1),
        ];
        let aggregate = aggregate_by_comm(&processes, 2);
        let names: Vec<&str> = aggregate.comms.iter().map(|c| c.comm.as_str()).collect();
        assert_eq!(names, ["big", "mid", OTHER_COMM]);
        assert_eq!(aggregate.folded_comms, 2, "small and tiny were folded");
        let other = &aggregate.comms[2];
        assert_eq!(other.processes, 3);
        assert_eq!(other.open_fds_sum, 115);
        assert_eq!(other.connections["memcached"], 3);
        // The folded process closest to its limit still shows: 95/100.
        assert!((other.max_fd_usage_ratio - 0.95).abs() < 1e-12);
    }

    #[test]
    fn ties_are_broken_by_ratio_then_name_for_stable_labels() {
        let processes = [
            process(1, "b", 10, 100, 5),
            process(2, "a", 10, 100, 5),
            process(3, "c", 90, 100, 5),
        ];
        let aggregate = aggregate_by_comm(&processes, 2);
        let names: Vec<&str> = aggregate.comms.iter().map(|c| c.comm.as_str()).collect();
        assert_eq!(names, ["c", "a", OTHER_COMM]);
        assert_eq!(aggregate.folded_comms, 1);
    }

    #[test]
    fn zero_cap_folds_everything_and_a_real_other_merges() {
        let processes = [process(1, "a", 1, 10, 1), process(2, "b", 2, 10, 1)];
        let aggregate = aggregate_by_comm(&processes, 0);
        assert_eq!(aggregate.comms.len(), 1);
        assert_eq!(aggregate.comms[0].comm, OTHER_COMM);
        assert_eq!(aggregate.comms[0].processes, 2);
        assert_eq!(aggregate.folded_comms, 2);

        let processes = [
            process(1, OTHER_COMM, 1, 10, 9),
            process(2, "b", 2, 10, 1),
            process(3, "c", 2, 10, 0),
        ];
        let aggregate = aggregate_by_comm(&processes, 2);
        let names: Vec<&str> = aggregate.comms.iter().map(|c| c.comm.as_str()).collect();
        assert_eq!(names, ["b", OTHER_COMM], "no duplicate 'other' label");
        assert_eq!(aggregate.comms[1].processes, 2);
    }

    fn queue(service: &str, queue_len: u32, limit: Option<u32>) -> ListenerQueue {
        ListenerQueue {
            drops: None,
            service: service.to_string(),
            netns: 1,
            local: "127.0.0.1:11211".parse().unwrap(),
            inode: 1,
            queue_len,
            limit,
        }
    }

    #[test]
    fn listen_queue_summary_sums_and_flags_the_full_listener() {
        let services = ["memcached".to_string(), "kestrel".to_string()];
        let listeners = [
            queue("memcached", 0, Some(1024)),
            queue("memcached", 3, Some(2)),
            queue("memcached", 7, None),
        ];
        let summaries = summarize_listen_queues(&services, &listeners);
        let memcached = &summaries["memcached"];
        assert_eq!(memcached.listeners, 3);
        assert_eq!(memcached.queue_len_sum, 10);
        assert_eq!(memcached.queue_limit_sum, 1026);
        assert_eq!(memcached.limit_unknown, 1);
        assert_eq!(memcached.full_listeners, 1);
        // 3 queued with listen(2): capacity 3, exactly full.
        assert_eq!(memcached.max_fullness, Some(1.0));
        assert_eq!(summaries["kestrel"], ListenQueueSummary::default());
        assert!(!queue("x", 2, Some(2)).is_full());
        assert!(!queue("x", 9, None).is_full());
    }

    fn counters(listen_overflows: u64, listen_drops: u64, syncookies_sent: u64) -> TcpExtCounters {
        TcpExtCounters {
            listen_overflows,
            listen_drops,
            syncookies_sent,
        }
    }

    #[test]
    fn namespace_sum_stays_monotonic_when_a_namespace_vanishes() {
        let mut accumulator = CounterAccumulator::default();
        let both = BTreeSet::from([1, 2]);
        let total = accumulator.update(&[(1, counters(10, 12, 1)), (2, counters(5, 5, 0))], &both);
        assert_eq!(total, counters(15, 17, 1), "first sample: the plain sum");
        let total = accumulator.update(&[(1, counters(11, 13, 1)), (2, counters(7, 7, 0))], &both);
        assert_eq!(total, counters(18, 20, 1));
        // Namespace 2 (a container) is gone: its 7 overflows stay counted.
        let total = accumulator.update(&[(1, counters(11, 13, 1))], &BTreeSet::from([1]));
        assert_eq!(total, counters(18, 20, 1));
        // A new namespace reusing inode 2 starts from zero: its whole value is new.
        let total = accumulator.update(&[(1, counters(11, 13, 1)), (2, counters(2, 2, 0))], &both);
        assert_eq!(total, counters(20, 22, 1));
    }

    #[test]
    fn unreadable_namespace_is_not_counted_twice() {
        let mut accumulator = CounterAccumulator::default();
        let both = BTreeSet::from([1, 2]);
        accumulator.update(&[(1, counters(1, 1, 0)), (2, counters(100, 100, 0))], &both);
        // Namespace 2 still exists but its netstat read failed this time.
        accumulator.update(&[(1, counters(1, 1, 0))], &both);
        let total =
            accumulator.update(&[(1, counters(1, 1, 0)), (2, counters(101, 101, 0))], &both);
        assert_eq!(total, counters(102, 102, 0));
        assert_eq!(accumulator.total(), total);
    }

    fn listener(service: &str, inode: u64, drops: Option<u32>) -> ListenerQueue {
        ListenerQueue {
            inode,
            drops,
            ..queue(service, 0, Some(128))
        }
    }

    #[test]
    fn listener_drops_count_what_happened_between_samples() {
        let mut drops = ListenerDrops::default();
        // First sample: a baseline, whatever the listeners dropped before the agent started.
        assert!(drops
            .update(&[
                listener("memcached", 1, Some(500)),
                listener("kestrel", 2, Some(7))
            ])
            .is_empty());
        let dropped = drops.update(&[
            listener("memcached", 1, Some(530)),
            listener("kestrel", 2, Some(7)),
            // Opened since the last sample: everything it dropped is new.
            listener("memcached", 3, Some(4)),
        ]);
        assert_eq!(dropped, BTreeMap::from([("memcached".to_string(), 34)]));
        // Unreadable this time: nothing counted, and the old reading is kept for the next.
        let dropped = drops.update(&[
            listener("memcached", 1, None),
            listener("memcached", 3, Some(4)),
        ]);
        assert!(dropped.is_empty());
        let dropped = drops.update(&[
            listener("memcached", 1, Some(540)),
            listener("memcached", 3, Some(4)),
        ]);
        assert_eq!(dropped, BTreeMap::from([("memcached".to_string(), 10)]));
        // The u32 counter wraps.
        drops.update(&[listener("memcached", 1, Some(u32::MAX - 1))]);
        let dropped = drops.update(&[listener("memcached", 1, Some(3))]);
        assert_eq!(dropped, BTreeMap::from([("memcached".to_string(), 5)]));
        // A listener that closed is forgotten: state stays bounded by the listeners present.
        drops.update(&[]);
        assert!(drops.last.is_empty());
    }

    #[test]
    fn a_listener_first_seen_without_a_count_is_a_baseline_when_it_gets_one() {
        let mut drops = ListenerDrops::default();
        drops.update(&[]);
        assert!(drops.update(&[listener("memcached", 9, None)]).is_empty());
        // Its count may include drops from before it was first seen: not counted.
        assert!(drops
            .update(&[listener("memcached", 9, Some(80))])
            .is_empty());
        let dropped = drops.update(&[listener("memcached", 9, Some(81))]);
        assert_eq!(dropped, BTreeMap::from([("memcached".to_string(), 1)]));
    }
}
