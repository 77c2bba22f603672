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

use std::collections::{HashMap, VecDeque};

/// Enqueues remembered per queue.
const MAX_PENDING: usize = 10_000;
/// Remembered enqueues a dequeue may pass over to find its own (messages whose dequeue was
/// not seen, e.g. taken with `/open` and aborted).
const LOOKAHEAD: usize = 8;
/// Queue names per service with their own label; later ones are "other".
pub const MAX_QUEUES: usize = 64;
/// Sockets whose last enqueued queue is remembered.
const MAX_SOCKETS: usize = 65_536;

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<(u32, u64)>,
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
    last_queue: HashMap<u64, (usize, String)>,
    /// Enqueues not remembered because a queue's table was full.
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
        if state.pending.len() >= MAX_PENDING {
            self.overflow += 1;
            return;
        }
        state.pending.push_back((len, ts_ns));
    }

    /// A dequeue that returned an item of `len` bytes at `ts_ns`, seen on the server's side.
    pub fn dequeued(&mut self, service: usize, queue: &str, len: u32, ts_ns: u64) -> Dequeued {
        let label = self.label(service, queue);
        let Some(state) = self.queues.get_mut(&(service, label)) else {
            return Dequeued::Unmatched;
        };
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
        self.last_queue.insert(sk, (service, label));
    }

    /// The queue the socket last enqueued to.
    pub fn queue_of(&self, sk: u64) -> Option<&str> {
        self.last_queue.get(&sk).map(|(_, q)| q.as_str())
    }

    pub fn closed(&mut self, sk: u64) {
        self.last_queue.remove(&sk);
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
    }

    #[test]
    fn the_queue_of_an_enqueue_is_read_from_its_line() {
        assert_eq!(enqueue_target(b"set jobs 0 0 5\r\nhello"), Some(&b"jobs"[..]));
        assert_eq!(enqueue_target(b"set jobs/t=10 0 0 5\r\n"), Some(&b"jobs"[..]));
        assert_eq!(enqueue_target(b"get jobs\r\n"), None);
        assert_eq!(enqueue_target(b"set "), None);
    }
}
