//! Message flow through memcache-protocol queues (Starling, Kestrel): time in queue from
//! matching each dequeue with its enqueue, a relative depth, and messages lost by writes onto
//! closed connections (named from the write's own bytes, see `conn::dead_writes`).
//!
//! Matching: each enqueue is remembered with a short fingerprint, the message's length and its
//! first bytes ([`ValueHead`], which the capture copies from every value body); a dequeue
//! takes the oldest remembered enqueue with the same fingerprint among the first
//! [`LOOKAHEAD`]. Queues are FIFO, so among equal fingerprints the order decides; the content
//! decides when messages of one length leave in another order than they came (queues sharing
//! the overflow label, Kestrel aborts) and keeps messages that were in the queue before the
//! agent started (no enqueue seen) from taking a later message's enqueue. A fingerprint whose
//! head was not captured matches on its length alone. Enqueues passed over [`LOOKAHEAD`]
//! times were dequeued unseen and are forgotten. Bounded per queue and in queues; what does
//! not fit is counted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::memcache::ValueHead;

/// Enqueues remembered per queue.
const MAX_PENDING: usize = 10_000;
/// Remembered enqueues a dequeue may pass over to find its own (messages whose dequeue was
/// not seen, e.g. taken with `/open` and aborted).
const LOOKAHEAD: usize = 8;
/// Queue names per service with their own label; later ones are "other".
pub const MAX_QUEUES: usize = 64;
/// (queue, producer process, outcome) rows of lost messages kept for diagnose.
const MAX_LOST_ROWS: usize = 1024;

/// A message's fingerprint: its length and, when captured, its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u32,
    pub head: Option<ValueHead>,
}

impl Fingerprint {
    /// Both heads known and equal (and the lengths).
    fn same(&self, other: &Fingerprint) -> bool {
        self.len == other.len && self.head.is_some() && self.head == other.head
    }

    /// Equal lengths, and a head is missing on one side: the length is all there is to go by.
    fn may_be(&self, other: &Fingerprint) -> bool {
        self.len == other.len && (self.head.is_none() || other.head.is_none())
    }
}

#[derive(Debug, Clone, Copy)]
struct Enqueued {
    fingerprint: Fingerprint,
    ts_ns: u64,
    /// Dequeues that matched an enqueue behind this one.
    passed: u8,
}

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<Enqueued>,
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
    pub fn enqueued(&mut self, service: usize, queue: &str, fingerprint: Fingerprint, ts_ns: u64) {
        let label = self.label(service, queue);
        let state = self.queues.entry((service, label)).or_default();
        state.enqueued += 1;
        if state.pending.len() >= MAX_PENDING {
            self.overflow += 1;
            return;
        }
        state.pending.push_back(Enqueued {
            fingerprint,
            ts_ns,
            passed: 0,
        });
    }

    /// A dequeue that returned an item with `fingerprint` at `ts_ns`, seen on the server's
    /// side.
    pub fn dequeued(
        &mut self,
        service: usize,
        queue: &str,
        fingerprint: Fingerprint,
        ts_ns: u64,
    ) -> Dequeued {
        let label = self.label(service, queue);
        let state = self.queues.entry((service, label)).or_default();
        state.dequeued += 1;
        let window = || state.pending.iter().take(LOOKAHEAD);
        let Some(index) = window()
            .position(|e| e.fingerprint.same(&fingerprint))
            .or_else(|| window().position(|e| e.fingerprint.may_be(&fingerprint)))
        else {
            return Dequeued::Unmatched;
        };
        let Some(matched) = state.pending.remove(index) else {
            return Dequeued::Unmatched;
        };
        // Enqueues passed over again and again were dequeued unseen: forget them.
        for earlier in state.pending.range_mut(..index) {
            earlier.passed = earlier.passed.saturating_add(1);
        }
        while state
            .pending
            .front()
            .is_some_and(|e| usize::from(e.passed) >= LOOKAHEAD)
        {
            state.pending.pop_front();
        }
        Dequeued::Waited(ts_ns.saturating_sub(matched.ts_ns) as f64 / 1e9)
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
                .map(|e| now_ns.saturating_sub(e.ts_ns) as f64 / 1e9);
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

    /// A fingerprint whose head was not captured: the length alone.
    fn fp(len: u32) -> Fingerprint {
        Fingerprint { len, head: None }
    }

    fn with_head(head: &[u8], len: u32) -> Fingerprint {
        Fingerprint {
            len,
            head: Some(ValueHead::new(head)),
        }
    }

    #[test]
    fn dequeues_match_their_enqueues_in_order_by_length() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "jobs", fp(10), S);
        flow.enqueued(0, "jobs", fp(12), 2 * S);
        flow.enqueued(0, "jobs", fp(10), 3 * S);
        // A message from before the agent started: no remembered enqueue of that length.
        assert_eq!(flow.dequeued(0, "jobs", fp(99), 4 * S), Dequeued::Unmatched);
        assert_eq!(
            flow.dequeued(0, "jobs", fp(10), 5 * S),
            Dequeued::Waited(4.0)
        );
        assert_eq!(
            flow.dequeued(0, "jobs", fp(12), 5 * S),
            Dequeued::Waited(3.0)
        );
        assert_eq!(
            flow.dequeued(0, "jobs", fp(10), 9 * S),
            Dequeued::Waited(6.0)
        );
        assert_eq!(flow.dequeued(0, "jobs", fp(10), 9 * S), Dequeued::Unmatched);
        assert_eq!(
            flow.dequeued(0, "other-q", fp(10), 9 * S),
            Dequeued::Unmatched
        );
    }

    /// Messages of one length that leave in another order than they came (here: queues past
    /// the label bound share the overflow label's list) are told apart by their first bytes.
    #[test]
    fn equal_lengths_consumed_out_of_order_match_by_their_first_bytes() {
        let mut flow = QueueFlow::default();
        for i in 0..MAX_QUEUES {
            flow.enqueued(0, &format!("q{i}"), fp(1), 0);
        }
        flow.enqueued(0, "late-a", with_head(b"aaaaaaaa", 100), S);
        flow.enqueued(0, "late-b", with_head(b"bbbbbbbb", 100), 3 * S);
        assert_eq!(flow.label(0, "late-b"), "other");
        // b leaves first: by length alone it would take a's enqueue (4 s instead of 2 s).
        assert_eq!(
            flow.dequeued(0, "late-b", with_head(b"bbbbbbbb", 100), 5 * S),
            Dequeued::Waited(2.0)
        );
        assert_eq!(
            flow.dequeued(0, "late-a", with_head(b"aaaaaaaa", 100), 6 * S),
            Dequeued::Waited(5.0)
        );
        assert_eq!(
            flow.dequeued(0, "late-a", with_head(b"aaaaaaaa", 100), 6 * S),
            Dequeued::Unmatched
        );
    }

    /// Equal fingerprints go first in, first out; a message from before the agent (its
    /// enqueue never seen) does not take a later message's enqueue.
    #[test]
    fn equal_fingerprints_are_fifo_and_unseen_messages_stay_unmatched() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "jobs", with_head(b"job:0001", 20), S);
        flow.enqueued(0, "jobs", with_head(b"job:0001", 20), 2 * S);
        // Same length, other content: enqueued before the agent started.
        assert_eq!(
            flow.dequeued(0, "jobs", with_head(b"old:0000", 20), 3 * S),
            Dequeued::Unmatched
        );
        assert_eq!(
            flow.dequeued(0, "jobs", with_head(b"job:0001", 20), 4 * S),
            Dequeued::Waited(3.0)
        );
        assert_eq!(
            flow.dequeued(0, "jobs", with_head(b"job:0001", 20), 4 * S),
            Dequeued::Waited(2.0)
        );
    }

    /// A body shorter than the head is all head: its length still takes part; a head not
    /// captured on one side leaves the length alone to decide.
    #[test]
    fn short_bodies_and_missing_heads() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "q", with_head(b"ab", 2), S);
        flow.enqueued(0, "q", with_head(b"ab", 3), 2 * S);
        flow.enqueued(0, "q", with_head(b"", 0), 3 * S);
        flow.enqueued(0, "q", fp(9), 4 * S);
        assert_eq!(
            flow.dequeued(0, "q", with_head(b"", 0), 5 * S),
            Dequeued::Waited(2.0)
        );
        // "ab" of 3 bytes is not "ab" of 2 bytes.
        assert_eq!(
            flow.dequeued(0, "q", with_head(b"ab", 3), 5 * S),
            Dequeued::Waited(3.0)
        );
        assert_eq!(
            flow.dequeued(0, "q", with_head(b"ab", 2), 5 * S),
            Dequeued::Waited(4.0)
        );
        assert_eq!(
            flow.dequeued(0, "q", with_head(b"whatever", 9), 5 * S),
            Dequeued::Waited(1.0)
        );
    }

    /// An enqueue whose dequeue was never seen is passed over by later matches, and forgotten
    /// after [`LOOKAHEAD`] of them, so it cannot block matching for good.
    #[test]
    fn enqueues_dequeued_unseen_are_forgotten() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "q", with_head(b"unseen", 6), 0);
        for i in 0..(2 * LOOKAHEAD as u64) {
            flow.enqueued(0, "q", with_head(b"seen", 4), i * S);
            assert_eq!(
                flow.dequeued(0, "q", with_head(b"seen", 4), i * S + S / 2),
                Dequeued::Waited(0.5),
                "{i}"
            );
        }
        let queue = &flow.queues[&(0, "q".to_string())];
        assert!(queue.pending.is_empty(), "{:?}", queue.pending);
    }

    #[test]
    fn bounded_in_queues_and_messages() {
        let mut flow = QueueFlow::default();
        for i in 0..200 {
            flow.enqueued(0, &format!("q{i}"), fp(1), S);
        }
        assert_eq!(flow.label(0, "q199"), "other");
        assert_eq!(flow.label(0, "q3"), "q3");
        assert_eq!(flow.label(1, "q199"), "q199");
        for _ in 0..MAX_PENDING + 5 {
            flow.enqueued(0, "q3", fp(1), S);
        }
        assert_eq!(flow.overflow, 6);
    }

    #[test]
    fn reports_totals_oldest_waiting_and_lost_messages_per_queue() {
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "jobs", fp(10), S);
        flow.enqueued(0, "jobs", fp(11), 2 * S);
        flow.enqueued(0, "jobs", fp(12), 3 * S);
        assert_eq!(
            flow.dequeued(0, "jobs", fp(10), 4 * S),
            Dequeued::Waited(3.0)
        );
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
