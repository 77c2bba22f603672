//! Message flow through memcache-protocol queues (Starling, Kestrel): time in queue from
//! matching each dequeue with its enqueue, a relative depth, and which queue a write onto a
//! closed connection was enqueuing to (a lost message).
//!
//! Matching: queues are FIFO, so on the server's host the n-th enqueue of a queue is the n-th
//! dequeue. Each enqueue is remembered with a short fingerprint (its length; value bodies are
//! not captured, so no content bytes); a dequeue takes the oldest remembered enqueue with the
//! same fingerprint among the first [`LOOKAHEAD`], so messages that were in the queue before
//! the agent started (no enqueue seen) do not shift later matches. Bounded per queue and in
//! queues; what does not fit is counted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Enqueues remembered per queue.
const MAX_PENDING: usize = 10_000;
/// Remembered enqueues a dequeue may pass over to find its own (messages whose dequeue was
/// not seen, e.g. taken with `/open` and aborted).
const LOOKAHEAD: usize = 8;
/// Queue names per service with their own label; later ones are "other".
pub const MAX_QUEUES: usize = 64;
/// Sockets whose last enqueued queue is remembered.
const MAX_SOCKETS: usize = 65_536;
/// (queue, producer process, outcome) rows of lost messages kept for diagnose.
const MAX_LOST_ROWS: usize = 1024;

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<(u32, u64)>,
    /// Acknowledged enqueues and dequeues that returned an item, since the agent started.
    enqueued: u64,
    dequeued: u64,
}

/// Messages one producer process lost on one queue, by what it saw next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostMessages {
    pub process: String,
    /// `eof` or `reset` (the producer could have retried) or `unnoticed`.
    pub outcome: String,
    pub count: u64,
}

/// One queue as published to history for `diagnose`: totals since the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueReport {
    pub service: String,
    pub queue: String,
    /// Enqueues the server acknowledged and dequeues that returned an item (server side).
    pub enqueued: u64,
    pub dequeued: u64,
    /// How long the oldest enqueue seen and not yet matched by a dequeue has waited, when
    /// the report was made.
    pub oldest_waiting_s: Option<f64>,
    /// Enqueues written onto connections the server had already closed (client side).
    pub lost: Vec<LostMessages>,
}

/// What one dequeue matched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dequeued {
    /// Seconds the message spent in the queue.
    Waited(f64),
    /// No remembered enqueue fits (the message predates the agent, or its enqueue was lost).
    Unmatched,
}

#[derive(Debug, Default)]
pub struct QueueFlow {
    queues: HashMap<(usize, String), Queue>,
    /// Per client socket: the queue it last enqueued to, and whether its last send (that
    /// started a request) was that enqueue. Kept after the socket closes: a write onto a dead
    /// connection is judged after the close.
    last_queue: HashMap<u64, (usize, String, bool)>,
    /// Lost messages by (service, queue label, producer process, outcome).
    lost: BTreeMap<(usize, String, String, &'static str), u64>,
    /// Enqueues not remembered because a queue's table was full, and lost-message rows not
    /// kept because [`MAX_LOST_ROWS`] were.
    pub overflow: u64,
}

impl QueueFlow {
    /// The queue's label: its name, or "other" past [`MAX_QUEUES`] names in the service.
    pub fn label(&self, service: usize, name: &str) -> String {
        let known = self.queues.contains_key(&(service, name.to_string()));
        let count = self.queues.keys().filter(|(s, _)| *s == service).count();
        if known || count < MAX_QUEUES {
            name.to_string()
        } else {
            crate::export::metrics::OVERFLOW_LABEL.to_string()
        }
    }

    /// An enqueue the server acknowledged, seen on the server's side.
    pub fn enqueued(&mut self, service: usize, queue: &str, len: u32, ts_ns: u64) {
        let label = self.label(service, queue);
        let state = self.queues.entry((service, label)).or_default();
        state.enqueued += 1;
        if state.pending.len() >= MAX_PENDING {
            self.overflow += 1;
            return;
        }
        state.pending.push_back((len, ts_ns));
    }

    /// A dequeue that returned an item of `len` bytes at `ts_ns`, seen on the server's side.
    pub fn dequeued(&mut self, service: usize, queue: &str, len: u32, ts_ns: u64) -> Dequeued {
        let label = self.label(service, queue);
        let state = self.queues.entry((service, label)).or_default();
        state.dequeued += 1;
        let Some(index) = state
            .pending
            .iter()
            .take(LOOKAHEAD)
            .position(|&(l, _)| l == len)
        else {
            return Dequeued::Unmatched;
        };
        // Enqueues passed over were dequeued unseen: forget them.
        state.pending.drain(..index);
        match state.pending.pop_front() {
            Some((_, enqueued)) => Dequeued::Waited(ts_ns.saturating_sub(enqueued) as f64 / 1e9),
            None => Dequeued::Unmatched,
        }
    }

    /// A client socket sent an enqueue to `queue` (remembered to name a lost message).
    pub fn sent_enqueue(&mut self, sk: u64, service: usize, queue: &[u8]) {
        if self.last_queue.len() >= MAX_SOCKETS && !self.last_queue.contains_key(&sk) {
            self.last_queue.clear();
        }
        let name = String::from_utf8_lossy(queue);
        let label = self.label(service, &name);
        self.last_queue.insert(sk, (service, label, true));
    }

    /// A client socket sent a request other than an enqueue.
    pub fn sent_other(&mut self, sk: u64) {
        if let Some(entry) = self.last_queue.get_mut(&sk) {
            entry.2 = false;
        }
    }

    /// The queue the socket last enqueued to.
    pub fn queue_of(&self, sk: u64) -> Option<&str> {
        self.last_queue.get(&sk).map(|(_, q, _)| q.as_str())
    }

    /// Whether the socket's last request sent was an enqueue (for a write onto a closed
    /// connection whose command the decoder no longer knows).
    pub fn last_send_enqueued(&self, sk: u64) -> bool {
        self.last_queue
            .get(&sk)
            .is_some_and(|&(_, _, enqueue)| enqueue)
    }

    /// A message `process` wrote to `queue` onto a closed connection; `outcome` is what it
    /// saw next. Returns the queue's label.
    pub fn lost(
        &mut self,
        service: usize,
        queue: &str,
        process: &str,
        outcome: &'static str,
    ) -> String {
        let label = self.label(service, queue);
        let key = (service, label.clone(), process.to_string(), outcome);
        let full = self.lost.len() >= MAX_LOST_ROWS;
        match self.lost.get_mut(&key) {
            Some(count) => *count += 1,
            None if !full => {
                self.lost.insert(key, 1);
            }
            None => self.overflow += 1,
        }
        label
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.lost.is_empty()
    }

    /// Every queue seen, for `diagnose`, at monotonic time `now_ns`.
    pub fn reports(
        &self,
        now_ns: u64,
        service_name: impl Fn(usize) -> Option<String>,
    ) -> Vec<QueueReport> {
        let mut reports: BTreeMap<(usize, &str), QueueReport> = BTreeMap::new();
        let entry = |service: usize, queue: &str| {
            service_name(service).map(|name| QueueReport {
                service: name,
                queue: queue.to_string(),
                enqueued: 0,
                dequeued: 0,
                oldest_waiting_s: None,
                lost: Vec::new(),
            })
        };
        for ((service, queue), state) in &self.queues {
            let Some(mut report) = entry(*service, queue) else {
                continue;
            };
            report.enqueued = state.enqueued;
            report.dequeued = state.dequeued;
            report.oldest_waiting_s = state
                .pending
                .front()
                .map(|&(_, ts)| now_ns.saturating_sub(ts) as f64 / 1e9);
            reports.insert((*service, queue), report);
        }
        for ((service, queue, process, outcome), &count) in &self.lost {
            let report = match reports.get_mut(&(*service, queue.as_str())) {
                Some(report) => report,
                None => match entry(*service, queue) {
                    Some(report) => reports.entry((*service, queue.as_str())).or_insert(report),
                    None => continue,
                },
            };
            report.lost.push(LostMessages {
                process: process.clone(),
                outcome: outcome.to_string(),
                count,
            });
        }
        let mut reports: Vec<QueueReport> = reports.into_values().collect();
        reports.sort_by(|a, b| (&a.service, &a.queue).cmp(&(&b.service, &b.queue)));
        reports
    }
}

/// The queue name of a text `set <queue>[/options] ...` at the start of a send.
pub fn enqueue_target(leading: &[u8]) -> Option<&[u8]> {
    let rest = leading.strip_prefix(b"set ")?;
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'/' || b == b'\r')
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn dequeues_match_their_enqueues_in_order_by_length() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "jobs", 10, S);
        flow.enqueued(0, "jobs", 12, 2 * S);
        flow.enqueued(0, "jobs", 10, 3 * S);
        // A message from before the agent started: no remembered enqueue of that length.
        assert_eq!(flow.dequeued(0, "jobs", 99, 4 * S), Dequeued::Unmatched);
        assert_eq!(flow.dequeued(0, "jobs", 10, 5 * S), Dequeued::Waited(4.0));
        assert_eq!(flow.dequeued(0, "jobs", 12, 5 * S), Dequeued::Waited(3.0));
        assert_eq!(flow.dequeued(0, "jobs", 10, 9 * S), Dequeued::Waited(6.0));
        assert_eq!(flow.dequeued(0, "jobs", 10, 9 * S), Dequeued::Unmatched);
        assert_eq!(flow.dequeued(0, "other-q", 10, 9 * S), Dequeued::Unmatched);
    }

    #[test]
    fn bounded_in_queues_messages_and_sockets() {
        let mut flow = QueueFlow::default();
        for i in 0..200 {
            flow.enqueued(0, &format!("q{i}"), 1, S);
        }
        assert_eq!(flow.label(0, "q199"), "other");
        assert_eq!(flow.label(0, "q3"), "q3");
        assert_eq!(flow.label(1, "q199"), "q199");
        for _ in 0..MAX_PENDING + 5 {
            flow.enqueued(0, "q3", 1, S);
        }
        assert_eq!(flow.overflow, 6);
        for sk in 0..(MAX_SOCKETS as u64 + 10) {
            flow.sent_enqueue(sk, 0, b"q3");
        }
        assert!(flow.last_queue.len() <= MAX_SOCKETS);
        assert_eq!(flow.queue_of(MAX_SOCKETS as u64 + 9), Some("q3"));
        assert!(flow.last_send_enqueued(MAX_SOCKETS as u64 + 9));
        flow.sent_other(MAX_SOCKETS as u64 + 9);
        assert!(!flow.last_send_enqueued(MAX_SOCKETS as u64 + 9));
        assert_eq!(flow.queue_of(MAX_SOCKETS as u64 + 9), Some("q3"));
        assert!(!flow.last_send_enqueued(1 << 40));
    }

    #[test]
    fn reports_totals_oldest_waiting_and_lost_messages_per_queue() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "jobs", 10, S);
        flow.enqueued(0, "jobs", 11, 2 * S);
        flow.enqueued(0, "jobs", 12, 3 * S);
        assert_eq!(flow.dequeued(0, "jobs", 10, 4 * S), Dequeued::Waited(3.0));
        assert_eq!(flow.lost(0, "mail", "producer", "unnoticed"), "mail");
        flow.lost(0, "mail", "producer", "unnoticed");
        flow.lost(0, "mail", "cron", "eof");
        flow.lost(7, "mail", "cron", "eof");
        // Service 7 has no name (removed on reload): left out.
        let reports = flow.reports(10 * S, |s| (s == 0).then(|| "starling".to_string()));
        assert_eq!(reports.len(), 2, "{reports:?}");
        let jobs = &reports[0];
        assert_eq!(
            (jobs.queue.as_str(), jobs.enqueued, jobs.dequeued),
            ("jobs", 3, 1)
        );
        // The oldest not yet dequeued was enqueued at 2 s.
        assert_eq!(jobs.oldest_waiting_s, Some(8.0));
        assert!(jobs.lost.is_empty());
        let mail = &reports[1];
        assert_eq!((mail.enqueued, mail.oldest_waiting_s), (0, None));
        let lost: Vec<(&str, &str, u64)> = mail
            .lost
            .iter()
            .map(|l| (l.process.as_str(), l.outcome.as_str(), l.count))
            .collect();
        assert_eq!(lost, [("cron", "eof", 1), ("producer", "unnoticed", 2)]);
        for i in 0..MAX_LOST_ROWS + 3 {
            flow.lost(0, "mail", &format!("p{i}"), "eof");
        }
        assert!(flow.lost.len() <= MAX_LOST_ROWS);
        assert!(flow.overflow >= 3);
    }

    #[test]
    fn the_queue_of_an_enqueue_is_read_from_its_line() {
        assert_eq!(
            enqueue_target(b"set jobs 0 0 5\r\nhello"),
            Some(&b"jobs"[..])
        );
        assert_eq!(
            enqueue_target(b"set jobs/t=10 0 0 5\r\n"),
            Some(&b"jobs"[..])
        );
        assert_eq!(enqueue_target(b"get jobs\r\n"), None);
        assert_eq!(enqueue_target(b"set "), None);
    }
}
