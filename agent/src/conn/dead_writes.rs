//! Dead-socket writes: sends onto a connection whose peer had already closed it. Such a write
//! can never be answered; old memcache clients lost SETs this way without noticing. A write after
//! the peer's FIN is dead only once the peer answers it with a reset: a peer that only
//! half-closed (shutdown(SHUT_WR), `nc -N`) takes the bytes, and the connection then ends
//! without one. Each dead write is reported once its fate is known too: the application's next
//! read saw EOF, an error (reset), or nothing happened within [`OUTCOME_WINDOW_NS`] (unnoticed).

use foldhash::{HashMap, HashMapExt};

use crate::{conn::tracking::Endpoint, model::DeadWriteOutcome};

/// How long a write waits for its fate, and for the reset that makes it dead (one round trip).
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
    /// The request asked for no answer (text `noreply`, binary quiet opcodes, meta `q`): the
    /// error the application met next was not this request's, which it never heard of.
    pub noreply: bool,
    pub outcome: DeadWriteOutcome,
}

#[derive(Debug)]
struct Pending {
    endpoint: Endpoint,
    writes: Vec<DeadWrite>,
    /// When a new socket took the address (0: not yet): writes stamped before were made on the
    /// old one, and the new socket's sends do not name them.
    reused_ns: u64,
    /// The peer answered with a reset: the writes were not taken.
    dead: bool,
    /// This side retransmitted since: the peer is not acknowledging (gone without a word, or
    /// a middlebox dropping the flow). Dead unless the connection still ends without a reset.
    unanswered: bool,
    /// What the application saw next, once known.
    outcome: Option<DeadWriteOutcome>,
}

/// Pending dead writes per socket, bounded in sockets and in writes per socket.
#[derive(Debug)]
pub struct DeadWriteTracker {
    pending: HashMap<u64, Pending>,
    max_sockets: usize,
    max_writes_per_socket: usize,
    pub dropped: u64,
    /// Writes after a peer's FIN that the peer took: no reset came (it had only half-closed).
    pub delivered: u64,
}

impl DeadWriteTracker {
    pub fn new(max_sockets: usize) -> Self {
        DeadWriteTracker {
            pending: HashMap::new(),
            max_sockets,
            max_writes_per_socket: 64,
            dropped: 0,
            delivered: 0,
        }
    }

    /// A send returned `ret` on socket `sk` after its peer closed; `reset` when the peer's
    /// reset had already arrived (on loopback it does inside the send that drew it). A
    /// successful send starts a pending write; a failed one tells the application of the reset.
    #[allow(clippy::too_many_arguments)]
    pub fn on_send(
        &mut self,
        sk: u64,
        endpoint: Endpoint,
        ts_ns: u64,
        ret: i64,
        comm: &str,
        pid: u32,
        reset: bool,
        out: &mut Vec<DeadWrite>,
    ) {
        if ret > 0 {
            self.on_written(sk, endpoint, ts_ns, ret as u64, comm, pid, None, reset, out);
        } else if ret < 0 && -ret != EAGAIN && -ret != EINTR {
            // EPIPE or ECONNRESET: the reset came, and the application saw it.
            self.told(sk, DeadWriteOutcome::Reset, true, out);
        }
    }

    /// `bytes` written after the peer closed, with their fate already settled as `outcome` where
    /// no read will tell it (the sequence numbers' count without receive programs); `reset` as
    /// for [`DeadWriteTracker::on_send`].
    #[allow(clippy::too_many_arguments)]
    pub fn on_written(
        &mut self,
        sk: u64,
        endpoint: Endpoint,
        ts_ns: u64,
        bytes: u64,
        comm: &str,
        pid: u32,
        outcome: Option<DeadWriteOutcome>,
        reset: bool,
        out: &mut Vec<DeadWrite>,
    ) {
        if bytes == 0 {
            return;
        }
        if !self.pending.contains_key(&sk) && self.pending.len() >= self.max_sockets {
            self.dropped += 1;
            return;
        }
        let pending = self.pending.entry(sk).or_insert_with(|| Pending {
            endpoint,
            writes: Vec::new(),
            reused_ns: 0,
            dead: false,
            unanswered: false,
            outcome: None,
        });
        if pending.outcome.is_none() {
            pending.outcome = outcome;
        }
        if pending.writes.len() < self.max_writes_per_socket {
            pending.writes.push(DeadWrite {
                sk,
                endpoint,
                comm: comm.to_string(),
                pid,
                ts_ns,
                bytes,
                command: None,
                queue: None,
                noreply: false,
                outcome: DeadWriteOutcome::Unnoticed,
            });
        } else {
            // Not kept, but its reset still decides the kept ones' fate.
            self.dropped += 1;
        }
        if reset {
            self.reset_received(sk, out);
        }
    }

    /// A receive returned `ret` on a socket whose peer had closed; `reset` as for
    /// [`DeadWriteTracker::on_send`].
    pub fn on_recv(&mut self, sk: u64, ret: i64, reset: bool, out: &mut Vec<DeadWrite>) {
        match ret {
            0 => self.told(sk, DeadWriteOutcome::Eof, reset, out),
            r if r < 0 && -r != EAGAIN && -r != EINTR => {
                self.told(sk, DeadWriteOutcome::Reset, true, out)
            }
            // Data still buffered from before the close, or nothing yet: keep waiting.
            _ => {
                if reset {
                    self.reset_received(sk, out);
                }
            }
        }
    }

    /// The peer reset the connection: its pending writes are dead.
    pub fn reset_received(&mut self, sk: u64, out: &mut Vec<DeadWrite>) {
        if let Some(pending) = self.pending.get_mut(&sk) {
            pending.dead = true;
        }
        self.settle(sk, out);
    }

    /// This side retransmitted on `sk`: pending writes are unanswered so far.
    pub fn retransmitted(&mut self, sk: u64) {
        if let Some(pending) = self.pending.get_mut(&sk) {
            pending.unanswered = true;
        }
    }

    /// The socket closed, with or without a reset. Without one the peer acknowledged this
    /// side's FIN, which follows the writes: it took them (it had only half-closed).
    pub fn closed(&mut self, sk: u64, reset: bool, out: &mut Vec<DeadWrite>) {
        if reset {
            self.reset_received(sk, out);
        } else if self.pending.get(&sk).is_some_and(|p| !p.dead) {
            self.forget_delivered(sk);
        }
    }

    fn told(&mut self, sk: u64, outcome: DeadWriteOutcome, reset: bool, out: &mut Vec<DeadWrite>) {
        if let Some(pending) = self.pending.get_mut(&sk) {
            pending.outcome.get_or_insert(outcome);
            pending.dead |= reset;
        }
        self.settle(sk, out);
    }

    /// Reports the socket's writes once they are dead and their fate is known.
    fn settle(&mut self, sk: u64, out: &mut Vec<DeadWrite>) {
        let Some(pending) = self.pending.get(&sk) else {
            return;
        };
        if let (true, Some(outcome)) = (pending.dead, pending.outcome) {
            self.report(sk, outcome, out);
        }
    }

    fn report(&mut self, sk: u64, outcome: DeadWriteOutcome, out: &mut Vec<DeadWrite>) {
        if let Some(pending) = self.pending.remove(&sk) {
            out.extend(pending.writes.into_iter().map(|mut write| {
                write.outcome = outcome;
                write
            }));
        }
    }

    fn forget_delivered(&mut self, sk: u64) {
        if let Some(pending) = self.pending.remove(&sk) {
            self.delivered += pending.writes.len() as u64;
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
        noreply: bool,
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
            write.noreply = noreply;
            write.queue = queue.map(|q| String::from_utf8_lossy(q).into_owned());
        }
    }

    /// The send on `sk` stamped `ts_ns` (see [`DeadWriteTracker::name`]) was a server's answer
    /// to a quit. The client closed as the quit said it would, and need not read the answer
    /// (libmemcached's binary clients close at once): the answer meeting a closed connection
    /// is how such connections end, not a reply a client gave up waiting for. It is dropped.
    pub fn forget_quit_answer(&mut self, sk: u64, ts_ns: u64) {
        let Some(pending) = self.pending.get_mut(&sk) else {
            return;
        };
        let reused_ns = pending.reused_ns;
        let Some(index) = pending.writes.iter().rposition(|w| w.ts_ns <= ts_ns) else {
            return;
        };
        if pending.writes[index].ts_ns < reused_ns {
            return;
        }
        pending.writes.remove(index);
        if pending.writes.is_empty() {
            self.pending.remove(&sk);
        }
    }

    /// A new socket took the address `sk` at `ts_ns`: writes still pending there belong to the
    /// old one, whose sends can no longer name them.
    pub fn socket_reused(&mut self, sk: u64, ts_ns: u64) {
        if let Some(pending) = self.pending.get_mut(&sk) {
            pending.reused_ns = ts_ns;
        }
    }

    /// Past the window: dead writes the application never noticed are reported as such, and so
    /// are writes the peer left unanswered (retransmitted, no reset: it is gone without a
    /// word); the rest were taken (no reset, nothing retransmitted).
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<DeadWrite>) {
        let expired: Vec<(u64, bool)> = self
            .pending
            .iter()
            .filter(|(_, pending)| {
                pending
                    .writes
                    .first()
                    .is_some_and(|w| now_ns.saturating_sub(w.ts_ns) >= OUTCOME_WINDOW_NS)
            })
            .map(|(&sk, pending)| (sk, pending.dead || pending.unanswered))
            .collect();
        for (sk, dead) in expired {
            if dead {
                let outcome = self.pending[&sk]
                    .outcome
                    .unwrap_or(DeadWriteOutcome::Unnoticed);
                self.report(sk, outcome, out);
            } else {
                self.forget_delivered(sk);
            }
        }
    }

    /// After a reload: pending writes take the endpoint `rebound` gives theirs (see
    /// [`crate::conn::tracking::Tracker::rebind`]); they are reported after it.
    pub fn rebind(&mut self, rebound: &impl Fn(Endpoint) -> Endpoint) {
        for pending in self.pending.values_mut() {
            pending.endpoint = rebound(pending.endpoint);
            for write in &mut pending.writes {
                write.endpoint = rebound(write.endpoint);
            }
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
        tracker.on_send(1, endpoint(), SEC, 16, "python3", 7, false, &mut out);
        // A send stamped before the write is not its payload.
        tracker.name(1, SEC - 1, Some("get"), false, None);
        tracker.name(1, SEC + 5, Some("set"), false, Some(b"jobs"));
        tracker.name(1, SEC + 9, Some("get"), false, None);
        assert!(out.is_empty());
        tracker.on_recv(1, 0, false, &mut out);
        assert!(out.is_empty(), "not dead before the peer's reset");
        tracker.closed(1, true, &mut out);
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
        tracker.on_send(1, endpoint(), SEC, 9, "python3", 7, false, &mut out);
        tracker.socket_reused(1, SEC + 10);
        tracker.name(1, SEC + 20, Some("gets"), false, None);
        // The new socket's own dead write is still named by its bytes.
        tracker.on_send(1, endpoint(), SEC + 30, 12, "python3", 7, false, &mut out);
        tracker.name(1, SEC + 40, Some("gets"), false, None);
        tracker.on_recv(1, -104, false, &mut out);
        let commands: Vec<_> = out.iter().map(|w| w.command).collect();
        assert_eq!(commands, [None, Some("gets")]);
    }

    /// Audit 2026-12-07: libmemcached's binary clients (pylibmc, PHP) send a Quit and close
    /// without reading the answer; memcached's answer then meets the closed connection, and
    /// diagnose said its clients gave up waiting (384 of 2,000 connections). Only that answer
    /// is forgotten; another write on the socket is still dead.
    #[test]
    fn a_servers_answer_to_a_quit_is_no_dead_write() {
        let server = Endpoint {
            role: Role::Server,
            ..endpoint()
        };
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, server, SEC, 24, "mc-worker", 7, true, &mut out);
        tracker.forget_quit_answer(1, SEC + 5);
        assert!(!tracker.has_pending(1));
        tracker.on_recv(1, 0, true, &mut out);
        tracker.closed(1, true, &mut out);
        tracker.expire(10 * SEC, &mut out);
        assert!(out.is_empty(), "{out:?}");

        tracker.on_send(2, server, SEC, 30, "mc-worker", 7, false, &mut out);
        tracker.on_send(2, server, 2 * SEC, 24, "mc-worker", 7, false, &mut out);
        tracker.forget_quit_answer(2, 2 * SEC + 5);
        tracker.closed(2, true, &mut out);
        tracker.expire(10 * SEC, &mut out);
        let bytes: Vec<_> = out.iter().map(|w| w.bytes).collect();
        assert_eq!(bytes, [30]);
    }

    #[test]
    fn failed_next_write_or_read_is_reset_and_eagain_is_not_an_answer() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "ruby", 1, false, &mut out);
        tracker.on_recv(1, -EAGAIN, false, &mut out);
        tracker.on_recv(1, 5, false, &mut out);
        assert!(out.is_empty());
        tracker.on_send(1, endpoint(), SEC, -32, "ruby", 1, false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, DeadWriteOutcome::Reset);

        tracker.on_send(2, endpoint(), SEC, 10, "ruby", 1, false, &mut out);
        tracker.on_recv(2, -104, false, &mut out);
        assert_eq!(out[1].outcome, DeadWriteOutcome::Reset);
    }

    #[test]
    fn failed_write_without_earlier_dead_write_counts_nothing() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, -32, "x", 1, false, &mut out);
        tracker.expire(100 * SEC, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn silence_for_the_window_is_unnoticed() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "x", 1, true, &mut out);
        tracker.on_send(1, endpoint(), 2 * SEC, 16, "x", 1, false, &mut out);
        tracker.expire(5 * SEC, &mut out);
        assert!(out.is_empty());
        tracker.expire(6 * SEC, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|w| w.outcome == DeadWriteOutcome::Unnoticed));
    }

    /// A peer that only half-closed (shutdown(SHUT_WR), `nc -N`) takes the writes: the
    /// connection ends without a reset, or no reset comes within the window. Not dead.
    #[test]
    fn writes_a_half_closed_peer_takes_are_not_dead() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 31, "memcached", 1, false, &mut out);
        tracker.on_recv(1, 0, false, &mut out);
        tracker.closed(1, false, &mut out);
        tracker.on_send(2, endpoint(), SEC, 8, "memcached", 1, false, &mut out);
        tracker.expire(7 * SEC, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(tracker.delivered, 2);
        assert!(!tracker.has_pending(1) && !tracker.has_pending(2));
    }

    /// The reset may come before the write's own event (loopback), with it, after the read,
    /// or as the close: any of them makes the pending writes dead.
    #[test]
    fn a_reset_however_it_arrives_makes_the_writes_dead() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "a", 1, true, &mut out);
        tracker.on_recv(1, 0, false, &mut out);
        tracker.on_send(2, endpoint(), SEC, 16, "b", 1, false, &mut out);
        tracker.on_recv(2, 0, false, &mut out);
        tracker.reset_received(2, &mut out);
        tracker.on_send(3, endpoint(), SEC, 16, "c", 1, false, &mut out);
        tracker.on_recv(3, 0, true, &mut out);
        let seen: Vec<_> = out.iter().map(|w| (w.comm.as_str(), w.outcome)).collect();
        assert_eq!(
            seen,
            [
                ("a", DeadWriteOutcome::Eof),
                ("b", DeadWriteOutcome::Eof),
                ("c", DeadWriteOutcome::Eof)
            ]
        );
        // Bytes counted from sequence numbers with a fate known in advance (no receive program).
        out.clear();
        tracker.on_written(
            4,
            endpoint(),
            SEC,
            24,
            "d",
            1,
            Some(DeadWriteOutcome::Unknown),
            false,
            &mut out,
        );
        assert!(out.is_empty());
        tracker.closed(4, true, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].bytes, out[0].outcome),
            (24, DeadWriteOutcome::Unknown)
        );
        tracker.on_written(5, endpoint(), SEC, 0, "e", 1, None, true, &mut out);
        assert!(!tracker.has_pending(5), "no bytes, no write");
    }

    /// A peer gone without a word (host down, a middlebox dropping the flow) sends no reset,
    /// but this side retransmits the writes: dead at the window's end, unless the connection
    /// still closes cleanly (its FIN acknowledged after all: the writes were taken).
    #[test]
    fn writes_retransmitted_without_an_answer_are_dead() {
        let mut tracker = DeadWriteTracker::new(10);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 16, "a", 1, false, &mut out);
        tracker.retransmitted(1);
        tracker.on_send(2, endpoint(), SEC, 16, "b", 1, false, &mut out);
        tracker.retransmitted(2);
        tracker.closed(2, false, &mut out);
        tracker.retransmitted(3);
        tracker.expire(7 * SEC, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].comm.as_str(), out[0].outcome),
            ("a", DeadWriteOutcome::Unnoticed)
        );
        assert_eq!(tracker.delivered, 1);
    }

    #[test]
    fn bounded() {
        let mut tracker = DeadWriteTracker::new(1);
        let mut out = Vec::new();
        tracker.on_send(1, endpoint(), SEC, 1, "x", 1, false, &mut out);
        tracker.on_send(2, endpoint(), SEC, 1, "x", 1, false, &mut out);
        assert_eq!(tracker.dropped, 1);
        for _ in 0..100 {
            tracker.on_send(1, endpoint(), SEC, 1, "x", 1, false, &mut out);
        }
        assert_eq!(tracker.dropped, 1 + 100 - 63);
    }
}
