//! Dead-socket writes: sends onto a connection whose peer had already closed it. Such a write
//! can never be answered; old memcache clients lost SETs this way without noticing. Each write is
//! reported once its fate is known: the application's next read saw EOF, an error (reset), or
//! nothing happened within [`OUTCOME_WINDOW_NS`] (unnoticed).

use foldhash::{HashMap, HashMapExt};

use crate::{conn::tracking::Endpoint, model::DeadWriteOutcome};

pub const OUTCOME_WINDOW_NS: u64 = 5_000_000_000;

const EAGAIN: i64 = 11;
const EINTR: i64 = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct DeadWrite {
    /// Kernel socket address, to find the command the decoder saw in this write.
    pub sk: u64,
    pub endpoint: Endpoint,
    pub comm: String,
    pub pid: u32,
    pub ts_ns: u64,
    pub bytes: u64,
    /// The memcache command written, read from the write's own captured bytes.
    pub command: Option<&'static str>,
    /// The queue the write enqueued to (memcache-queue services), read from the same bytes.
    pub queue: Option<String>,
    pub outcome: DeadWriteOutcome,
}

#[derive(Debug)]
struct Pending {
    endpoint: Endpoint,
    writes: Vec<DeadWrite>,
    /// When a new socket took the address (0: not yet): writes stamped before were made on the
    /// old one, and the new socket's sends do not name them.
    reused_ns: u64,
}

/// Pending dead writes per socket, bounded in sockets and in writes per socket.
#[derive(Debug)]
pub struct DeadWriteTracker {
    pending: HashMap<u64, Pending>,
    max_sockets: usize,
    max_writes_per_socket: usize,
    pub dropped: u64,
}

impl DeadWriteTracker {
    pub fn new(max_sockets: usize) -> Self {
        DeadWriteTracker {
            pending: HashMap::new(),
            max_sockets,
            max_writes_per_socket: 64,
            dropped: 0,
        }
    }

    /// A send returned `ret` on socket `sk` after its peer closed. Successful sends start a
    /// pending dead write; a failed send tells the application of the failure.
    #[allow(clippy::too_many_arguments)]
    pub fn on_send(
        &mut self,
        sk: u64,
        endpoint: Endpoint,
        ts_ns: u64,
        ret: i64,
        comm: &str,
        pid: u32,
        out: &mut Vec<DeadWrite>,
    ) {
        if ret > 0 {
            if !self.pending.contains_key(&sk) && self.pending.len() >= self.max_sockets {
                self.dropped += 1;
                return;
            }
            let pending = self.pending.entry(sk).or_insert_with(|| Pending {
                endpoint,
                writes: Vec::new(),
                reused_ns: 0,
            });
            if pending.writes.len() >= self.max_writes_per_socket {
                self.dropped += 1;
                return;
            }
            pending.writes.push(DeadWrite {
                sk,
                endpoint,
                comm: comm.to_string(),
                pid,
                ts_ns,
                bytes: ret as u64,
                command: None,
                queue: None,
                outcome: DeadWriteOutcome::Unnoticed,
            });
        } else if ret < 0 && -ret != EAGAIN && -ret != EINTR {
            self.resolve(sk, DeadWriteOutcome::Reset, out);
        }
    }

    /// A receive returned `ret` on a socket whose peer had closed.
    pub fn on_recv(&mut self, sk: u64, ret: i64, out: &mut Vec<DeadWrite>) {
        match ret {
            0 => self.resolve(sk, DeadWriteOutcome::Eof, out),
            r if r < 0 && -r != EAGAIN && -r != EINTR => {
                self.resolve(sk, DeadWriteOutcome::Reset, out)
            }
            // Data still buffered from before the close, or nothing yet: keep waiting.
            _ => {}
        }
    }

    /// Whether `sk` has dead writes waiting to be named or resolved: only then is a send's
    /// command worth sniffing for [`DeadWriteTracker::name`] (almost never, per captured send).
    pub fn has_pending(&self, sk: u64) -> bool {
        self.pending.contains_key(&sk)
    }

    /// The bytes a send on `sk` stamped `ts_ns` started with name what it carried: the kernel
    /// reports a dead write before that same send's payload, so the latest pending write on
    /// the socket at or before `ts_ns`, not named yet, is that send. Named here, while the
    /// socket address still means this socket (a new socket may take it once it closes).
    pub fn name(
        &mut self,
        sk: u64,
        ts_ns: u64,
        command: Option<&'static str>,
        queue: Option<&[u8]>,
    ) {
        let Some(pending) = self.pending.get_mut(&sk) else {
            return;
        };
        let reused_ns = pending.reused_ns;
        let Some(write) = pending.writes.iter_mut().rev().find(|w| w.ts_ns <= ts_ns) else {
            return;
        };
        // A write of the socket that had the address before: its own payload never named it
        // (not captured), and the new socket's first request is not what it carried.
        if write.ts_ns < reused_ns {
            return;
        }
        if write.command.is_none() {
            write.command = command;
            write.queue = queue.map(|q| String::from_utf8_lossy(q).into_owned());
        }
    }

    /// A new socket took the address `sk` at `ts_ns`: writes still pending there belong to the
    /// old one, whose sends can no longer name them.
    pub fn socket_reused(&mut self, sk: u64, ts_ns: u64) {
        if let Some(pending) = self.pending.get_mut(&sk) {
            pending.reused_ns = ts_ns;
        }
    }

    fn resolve(&mut self, sk: u64, outcome: DeadWriteOutcome, out: &mut Vec<DeadWrite>) {
        if let Some(pending) = self.pending.remove(&sk) {
            out.extend(pending.writes.into_iter().map(|mut write| {
                write.outcome = outcome;
                write
            }));
        }
    }

    /// Reports writes whose window passed without the application noticing.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<DeadWrite>) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, pending)| {
                pending
                    .writes
                    .first()
                    .is_some_and(|w| now_ns.saturating_sub(w.ts_ns) >= OUTCOME_WINDOW_NS)
            })
            .map(|(&sk, _)| sk)
            .collect();
        for sk in expired {
            self.resolve(sk, DeadWriteOutcome::Unnoticed, out);
        }
    }

    pub fn pending_endpoint(&self, sk: u64) -> Option<Endpoint> {
        self.pending.get(&sk).map(|p| p.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    const SEC: u64 = 1_000_000_000;

    fn endpoint() -> Endpoint {
        Endpoint {
            service: 0,
            server: "127.0.0.1:11211".parse().unwrap(),
            role: Role::Client,
        }
    }

    #[test]
    fn write_then_eof_is_eof() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "python3", 7, &mut out);
        // A send stamped before the write is not its payload.
        tracker.name(1, SEC - 1, Some("get"), None);
        tracker.name(1, SEC + 5, Some("set"), Some(b"jobs"));
        tracker.name(1, SEC + 9, Some("get"), None);
        assert!(out.is_empty());
        tracker.on_recv(1, 0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, DeadWriteOutcome::Eof);
        assert_eq!(out[0].comm, "python3");
        assert_eq!(out[0].command, Some("set"));
        assert_eq!(out[0].queue.as_deref(), Some("jobs"));
        assert_eq!(out[0].bytes, 16);
    }

    /// An idle connection's dead write whose own bytes were never seen, still pending when a
    /// new socket takes the address and sends `gets`: it stays unnamed (it was named `gets` by
    /// the new socket's request).
    #[test]
    fn a_new_socket_at_the_address_does_not_name_the_old_sockets_write() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 9, "python3", 7, &mut out);
        tracker.socket_reused(1, SEC + 10);
        tracker.name(1, SEC + 20, Some("gets"), None);
        // The new socket's own dead write is still named by its bytes.
        tracker.on_send(1, endpoint(), SEC + 30, 12, "python3", 7, &mut out);
        tracker.name(1, SEC + 40, Some("gets"), None);
        tracker.on_recv(1, -104, &mut out);
        let commands: Vec<_> = out.iter().map(|w| w.command).collect();
        assert_eq!(commands, [None, Some("gets")]);
    }

    #[test]
    fn failed_next_write_or_read_is_reset_and_eagain_is_not_an_answer() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "ruby", 1, &mut out);
        tracker.on_recv(1, -EAGAIN, &mut out);
        tracker.on_recv(1, 5, &mut out);
        assert!(out.is_empty());
        tracker.on_send(1, endpoint(), SEC, -32, "ruby", 1, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, DeadWriteOutcome::Reset);

        tracker.on_send(2, endpoint(), SEC, 10, "ruby", 1, &mut out);
        tracker.on_recv(2, -104, &mut out);
        assert_eq!(out[1].outcome, DeadWriteOutcome::Reset);
    }

    #[test]
    fn failed_write_without_earlier_dead_write_counts_nothing() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, -32, "x", 1, &mut out);
        tracker.expire(100 * SEC, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn silence_for_the_window_is_unnoticed() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "x", 1, &mut out);
        tracker.on_send(1, endpoint(), 2 * SEC, 16, "x", 1, &mut out);
        tracker.expire(5 * SEC, &mut out);
        assert!(out.is_empty());
        tracker.expire(6 * SEC, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|w| w.outcome == DeadWriteOutcome::Unnoticed));
    }

    #[test]
    fn bounded() {
        let mut tracker = DeadWriteTracker::new(1);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 1, "x", 1, &mut out);
        tracker.on_send(2, endpoint(), SEC, 1, "x", 1, &mut out);
        assert_eq!(tracker.dropped, 1);
        for _ in 0..100 {
            tracker.on_send(1, endpoint(), SEC, 1, "x", 1, &mut out);
        }
        assert_eq!(tracker.dropped, 1 + 100 - 63);
    }
}
