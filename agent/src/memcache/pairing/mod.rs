//! Matches decoded responses to outstanding requests and turns each finished request into
//! observations. Protocol-agnostic: the text, meta and binary parsers describe requests and
//! responses with [`RequestInfo`] and [`Response`]; this module knows which responses fit which
//! requests.
//!
//! Matching rule: a response belongs to the first outstanding request it fits (right command
//! family, same opaque, same key where the response carries one). Requests passed over on the
//! way are finished: quiet ones (binary GetQ/SetQ..., meta `q`) with the result their silence
//! implies, others as [`Status::Unknown`] (their response was lost). A gap marker stands where
//! requests were lost; while it is at the front, a response is accepted only if it fits the
//! first request after the marker, so responses to requests we never saw are reported as
//! unexpected instead of shifting every later pairing.

use std::collections::VecDeque;

mod exchange;
mod keys;
mod outcome;

pub(crate) use exchange::{
    family, value_len, Family, LineCode, MetaCode, QueueIntent, RequestInfo, RespKind, Response,
};

use super::model::{
    Command, DecodeErrorObservation, DecodeErrorReason, Decoded, Direction, Key, QueueOp,
    RequestObservation, Status, ValueHead,
};
use keys::{value_slot, KeyStore};
pub(crate) use outcome::is_lookup;
use outcome::{binary_status, implied_status, line_status, queue_op};

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Stands for requests we did not see (gap, truncated capture, overflow).
    marker: bool,
    command: Command,
    family: Family,
    opcode: u8,
    quiet: bool,
    /// [`RequestInfo::maybe_silent`].
    maybe_silent: bool,
    /// False when some of the request's keys could not be kept (overflow) or read (a line cut
    /// by the capture or the length limit).
    keys_complete: bool,
    nkeys: u16,
    /// Where to start looking for the slot of the next VALUE item (items come in key order).
    cursor: u16,
    ts_ns: u64,
    req_bytes: u64,
    /// Response bytes not attributed to one key (END line, errors, untracked items).
    resp_bytes: u64,
    first_resp_ts: Option<u64>,
    /// When the answer last made progress (a response of it, or response bytes while it was
    /// being answered or while the answers before it were still coming); the request's time
    /// until then. The timeout counts from
    /// here: a multi-get answered with megabytes of values can take longer than the timeout
    /// to arrive in full, and is not unanswered while its values keep coming.
    progress_ts: u64,
    /// How long the server may hold the answer back by request (a queue fetch's `t=<ms>`):
    /// until the answer starts, the timeout counts only after this wait.
    wait_ns: u64,
    /// VALUE items seen; for a marker, responses it rejected while requests waited behind it.
    items: u32,
    opaque: Option<u64>,
    queue: Option<QueueIntent>,
    seq: Option<u32>,
    /// The stored value's length, or a hit's when the answer is not per key.
    value_len: Option<u32>,
    value_head: Option<ValueHead>,
    /// Answered with this status by a line that announced a value (meta `VA`), but the value's
    /// first bytes come after that line: the entry stays at the front until they do.
    value_due: Option<Status>,
    /// A marker's lost requests are counted, as one [`Status::Unknown`] of the marker's
    /// `command` ([`Pairing::lose_requests`]).
    unread_counted: bool,
}

impl Pending {
    fn marker(ts_ns: u64) -> Pending {
        Pending {
            marker: true,
            command: Command::Other,
            family: Family::AnyLine,
            opcode: 0,
            quiet: false,
            maybe_silent: false,
            keys_complete: true,
            nkeys: 0,
            cursor: 0,
            ts_ns,
            req_bytes: 0,
            resp_bytes: 0,
            first_resp_ts: None,
            progress_ts: ts_ns,
            wait_ns: 0,
            items: 0,
            opaque: None,
            queue: None,
            seq: None,
            value_len: None,
            value_head: None,
            value_due: None,
            unread_counted: false,
        }
    }

    fn latency(&self) -> Option<u64> {
        self.first_resp_ts.map(|t| t.saturating_sub(self.ts_ns))
    }

    /// When the request times out unless its answer progresses: `timeout_ns` after its last
    /// progress, and before any answer also after the wait it asked the server for.
    fn deadline(&self, timeout_ns: u64) -> u64 {
        let wait = if self.first_resp_ts.is_none() {
            self.wait_ns
        } else {
            0
        };
        self.progress_ts
            .saturating_add(wait)
            .saturating_add(timeout_ns)
    }
}

/// How many unfitting responses a gap marker absorbs while requests wait behind it.
const MARKER_PATIENCE: u32 = 8;

#[derive(Debug, Clone, Copy)]
enum Fit {
    No,
    /// A VALUE item for a retrieval (the request continues), with the index of the key it
    /// answers among the request's keys when known.
    Item(Option<usize>),
    /// Part of a multi-line answer (the request continues).
    Part,
    /// The final response; the status applies to every key not resolved yet.
    Done(Status),
}

pub(crate) struct Pairing {
    pending: VecDeque<Pending>,
    /// Keys of pending requests, in request order, followed by the keys staged for the
    /// request being parsed. Requests always finish from the front, so this is a FIFO too.
    slots: KeyStore,
    staged: usize,
    staged_dropped: bool,
    /// The request being parsed has keys past what could be read.
    staged_cut: bool,
    max_pending: usize,
    max_slots: usize,
    max_key_len: usize,
    /// Where the value of the last response goes, until its body's head arrives: a text
    /// response names its value's length in a line that comes before the value itself.
    last_value: Option<ValueTarget>,
    /// Whether observations report sizes ([`super::DecoderConfig::sizes`]).
    sizes: bool,
    /// False since an answer fitted no request, until one fits again: while answers fit, the
    /// server's bytes are the outstanding requests' answers, in order.
    answers_fit: bool,
    /// The command of the last request submitted, unless its own unread rest is already
    /// counted (a multi-key get cut by the capture): what requests lost right after it most
    /// likely were ([`Pairing::lose_requests`]).
    last_command: Option<Command>,
}

/// The holder of a hit's value: a key slot (by index), or the head entry itself.
#[derive(Debug, Clone, Copy)]
enum ValueTarget {
    Slot(usize),
    Entry,
}

impl std::fmt::Debug for Pairing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pairing")
            .field("pending", &self.pending.len())
            .field("slots", &self.slots.len())
            .finish()
    }
}

pub(crate) fn push_error(
    out: &mut Vec<Decoded>,
    reason: DecodeErrorReason,
    direction: Direction,
    ts_ns: u64,
) {
    out.push(Decoded::DecodeError(DecodeErrorObservation {
        reason,
        direction,
        ts_ns,
    }));
}

impl Pairing {
    pub fn new(max_pending: usize, max_slots: usize, max_key_len: usize, sizes: bool) -> Pairing {
        Pairing {
            pending: VecDeque::new(),
            slots: KeyStore::default(),
            staged: 0,
            staged_dropped: false,
            staged_cut: false,
            max_pending,
            max_slots,
            max_key_len,
            last_value: None,
            sizes,
            answers_fit: true,
            last_command: None,
        }
    }

    /// The first bytes of the value announced by the last response (see [`ValueHead`]).
    pub fn value_head(&mut self, head: ValueHead, out: &mut Vec<Decoded>) {
        // `last_value` first: it is the common case (every VALUE item of a get), and it and a
        // due value never coexist (`respond` releases any due value and clears `last_value`
        // before it sets either), so the order does not change the outcome.
        match self.last_value.take() {
            Some(ValueTarget::Slot(i)) => {
                if let Some(slot) = self.slots.slots.get_mut(i) {
                    slot.value_head = Some(head);
                }
                return;
            }
            Some(ValueTarget::Entry) => {
                if let Some(entry) = self.pending.front_mut() {
                    entry.value_head = Some(head);
                }
                return;
            }
            None => {}
        }
        if let Some(entry) = self.pending.front_mut().filter(|p| p.value_due.is_some()) {
            entry.value_head = Some(head);
            self.release_due(out);
        }
    }

    /// The value announced by the last response has been passed (its head seen or not).
    pub fn value_done(&mut self, out: &mut Vec<Decoded>) {
        self.release_due(out);
    }

    /// Finishes the front entry if it only waited for its value's first bytes.
    fn release_due(&mut self, out: &mut Vec<Decoded>) {
        if let Some(status) = self.pending.front().and_then(|p| p.value_due) {
            if let Some(done) = self.pending.pop_front() {
                let latency = done.latency();
                self.finish_entry(done, status, latency, out);
            }
        }
    }

    /// A key as much of it as requests keep ([`Pairing::stage_key`]), and whether it was cut.
    fn kept_key<'k>(&self, key: &'k [u8], truncated: bool) -> (&'k [u8], bool) {
        let keep = key.len().min(self.max_key_len);
        (&key[..keep], truncated || keep < key.len())
    }

    /// Sizes as observations report them: none when sizes are off.
    fn sized(&self, sizes: Sizes) -> Sizes {
        if self.sizes {
            sizes
        } else {
            Sizes {
                value_len: None,
                keys: 0,
                ..sizes
            }
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.iter().filter(|p| !p.marker).count()
    }

    /// Records one key of the request being parsed (sent at `ts_ns`); `submit` or `unstage`
    /// consumes them.
    pub fn stage_key(&mut self, key: &[u8], truncated: bool, ts_ns: u64, out: &mut Vec<Decoded>) {
        // A quiet request without keys (FlushQ) gives way without freeing a slot.
        while self.slots.len() >= self.max_slots {
            if !self.evict_silent(ts_ns, out) {
                self.staged_dropped = true;
                return;
            }
        }
        let keep = key.len().min(self.max_key_len);
        self.slots.push(&key[..keep], truncated || keep < key.len());
        self.staged += 1;
    }

    /// The request being parsed has more keys than were read (its line was cut by the capture
    /// or the line limit).
    pub fn stage_cut(&mut self) {
        self.staged_cut = true;
    }

    /// Forgets the staged keys of a request that turned out not to be one.
    pub fn unstage(&mut self) {
        let keep = self.slots.len() - self.staged;
        self.slots.truncate(keep);
        self.staged = 0;
        self.staged_dropped = false;
        self.staged_cut = false;
    }

    /// Adds a complete request (with the keys staged for it) to the outstanding queue, or
    /// reports it at once when no response will come.
    pub fn submit(&mut self, req: RequestInfo, out: &mut Vec<Decoded>) {
        let nkeys = self.staged;
        let keys_complete = !self.staged_dropped && !self.staged_cut;
        self.last_command =
            (!self.staged_cut || family(req.command) != Family::Retrieval).then_some(req.command);
        if self.staged_dropped {
            push_error(
                out,
                DecodeErrorReason::PendingOverflow,
                Direction::ClientToServer,
                req.ts_ns,
            );
        }
        self.staged = 0;
        self.staged_dropped = false;
        self.staged_cut = false;
        let start = self.slots.len() - nkeys;
        if req.noreply {
            let queue = queue_op(req.queue, Status::Noreply);
            if nkeys == 0 {
                push_request(
                    out,
                    req.command,
                    Status::Noreply,
                    None,
                    None,
                    req.ts_ns,
                    req.bytes,
                    0,
                    queue,
                    req.seq,
                    self.sized(Sizes {
                        value_len: req.value_len,
                        value_head: req.value_head,
                        keys: 0,
                    }),
                );
            }
            for i in 0..nkeys {
                let key = self
                    .slots
                    .slots
                    .get(start + i)
                    .map(|slot| (self.slots.bytes_of(slot), slot.truncated));
                push_request(
                    out,
                    req.command,
                    Status::Noreply,
                    key,
                    None,
                    req.ts_ns,
                    if i == 0 { req.bytes } else { 0 },
                    0,
                    queue,
                    req.seq,
                    self.sized(Sizes {
                        value_len: req.value_len.filter(|_| nkeys == 1),
                        value_head: req.value_head.filter(|_| nkeys == 1),
                        keys: if i == 0 { nkeys as u16 } else { 0 },
                    }),
                );
            }
            self.slots.truncate(start);
            return;
        }
        if self.pending.len() >= self.max_pending && !self.evict_silent(req.ts_ns, out) {
            self.slots.truncate(start);
            push_error(
                out,
                DecodeErrorReason::PendingOverflow,
                Direction::ClientToServer,
                req.ts_ns,
            );
            // Its response will still come: let it meet a marker instead of the next request.
            self.push_marker(req.ts_ns);
            return;
        }
        self.pending.push_back(Pending {
            marker: false,
            command: req.command,
            family: family(req.command),
            opcode: req.opcode,
            quiet: req.quiet,
            maybe_silent: req.maybe_silent,
            keys_complete,
            nkeys: nkeys as u16,
            cursor: 0,
            ts_ns: req.ts_ns,
            req_bytes: req.bytes,
            resp_bytes: 0,
            first_resp_ts: None,
            progress_ts: req.ts_ns,
            wait_ns: blocking_wait_ns(req.queue),
            items: 0,
            opaque: req.opaque,
            queue: req.queue,
            seq: req.seq,
            value_len: req.value_len,
            value_head: req.value_head,
            value_due: None,
            unread_counted: false,
        });
    }

    /// Makes room for a newer request by finishing the oldest outstanding one early, if that
    /// one is quiet and nothing of its answer has come: a quiet request that succeeds is never
    /// answered, so a batch of more quiet requests than the queue holds (a client's
    /// `set_multi` of thousands of SetQ) would otherwise fill it until the batch's closing
    /// NoOp, which could then not be queued, and every later request would overflow behind a
    /// marker that no answer clears. A quiet mutation finishes with what its silence almost
    /// always means; a quiet get as unknown, since hits of a batch are common. Its outcome is
    /// assumed rather than seen, so it counts as an overflow. Whether one was finished.
    fn evict_silent(&mut self, ts_ns: u64, out: &mut Vec<Decoded>) -> bool {
        // Markers hold no keys, so the first request's keys still lead the key store.
        let Some(index) = self.pending.iter().position(|p| !p.marker) else {
            return false;
        };
        let entry = &self.pending[index];
        if !entry.quiet || entry.first_resp_ts.is_some() || entry.value_due.is_some() {
            return false;
        }
        let Some(entry) = self.pending.remove(index) else {
            return false;
        };
        let status = match implied_status(entry.command) {
            Status::Miss => Status::Unknown,
            status => status,
        };
        self.finish_entry(entry, status, None, out);
        push_error(
            out,
            DecodeErrorReason::PendingOverflow,
            Direction::ClientToServer,
            ts_ns,
        );
        true
    }

    /// Notes that requests were lost here: their responses must not be paired with later
    /// requests. Consecutive markers are merged (one marker bounds any number of lost requests),
    /// which also keeps the queue within `max_pending + 1`.
    pub fn push_marker(&mut self, ts_ns: u64) {
        if self.pending.back().is_some_and(|p| p.marker) {
            return;
        }
        self.pending.push_back(Pending::marker(ts_ns));
    }

    /// Requests were lost here (their bytes not captured: the capture stopped before the end
    /// of the call that held them): a marker stands for them, and one [`Status::Unknown`]
    /// observation for however many there were (how many is not known; a noreply batch gets
    /// no answer that could tell), so the unread part of a batch is counted rather than gone.
    /// Its command is the one whose header was cut (`cut`: its opcode read, its key not),
    /// else the last one read before them: what the capture cuts is a batch of one command
    /// (pymemcache's `set_many`, bmemcached's SetQ run, a meta `mg ... q` batch). None when
    /// that was a multi-key get whose own unread keys are counted already. Lookups among them
    /// stay out of the hit ratio; their hits still come, as answers of their own
    /// ([`Pairing::unread_request_hit`]).
    pub fn lose_requests(&mut self, ts_ns: u64, cut: Option<Command>, out: &mut Vec<Decoded>) {
        self.push_marker(ts_ns);
        if let Some(command) = cut.or(self.last_command) {
            self.count_unread(self.pending.len() - 1, command, ts_ns, out);
        }
    }

    /// Counts the requests lost behind the marker at `index` as one unknown of `command`,
    /// once per marker.
    fn count_unread(&mut self, index: usize, command: Command, ts_ns: u64, out: &mut Vec<Decoded>) {
        let Some(marker) = self.pending.get_mut(index).filter(|p| p.marker) else {
            return;
        };
        if std::mem::replace(&mut marker.unread_counted, true) {
            return;
        }
        marker.command = command;
        push_request(
            out,
            command,
            Status::Unknown,
            None,
            None,
            ts_ns,
            0,
            0,
            None,
            None,
            self.sized(Sizes {
                value_len: None,
                value_head: None,
                keys: 0,
            }),
        );
    }

    /// The request the next response should answer (quiet requests that may be skipped
    /// silently are passed over): its family, binary opcode and opaque. None if unknown.
    pub fn next_answer(&self) -> Option<(Family, u8, Option<u64>)> {
        for p in &self.pending {
            if p.marker {
                return None;
            }
            if !p.quiet && p.value_due.is_none() {
                return Some((p.family, p.opcode, p.opaque));
            }
        }
        None
    }

    pub fn respond(&mut self, resp: &Response<'_>, out: &mut Vec<Decoded>) {
        // A value still due was cut short: its answer stands without a head.
        self.release_due(out);
        self.last_value = None;
        let mut offset = 0usize;
        let mut found = None;
        let mut met_marker = false;
        // A marker that rejected the answer while requests wait behind it.
        let mut rejected_at = None;
        for i in 0..self.pending.len() {
            let entry = &self.pending[i];
            if entry.marker {
                met_marker = true;
                // An error proves nothing: it is what unreadable requests get back.
                let is_error = matches!(
                    resp.kind,
                    RespKind::Line(LineCode::Error | LineCode::ClientError | LineCode::ServerError)
                );
                if let Some(next) = self.pending.get(i + 1).filter(|_| !is_error) {
                    let fit = self.fit(next, offset, resp);
                    if !matches!(fit, Fit::No) {
                        found = Some((i + 1, fit));
                    }
                }
                if found.is_none() && i + 1 < self.pending.len() {
                    rejected_at = Some(i);
                }
                break;
            }
            let fit = self.fit(entry, offset, resp);
            if !matches!(fit, Fit::No) {
                found = Some(self.prefer_nominal_answer(i, offset, fit, resp));
                break;
            }
            offset += usize::from(entry.nkeys);
        }
        let Some((index, fit)) = found else {
            self.answers_fit = false;
            // An answer of the lost requests themselves is no rejection.
            if met_marker && self.unread_line_answer(resp, out) {
                return;
            }
            if let Some(i) = rejected_at {
                // A marker that keeps rejecting answers while requests wait behind it has
                // most likely outlived its lost responses (or the next request's answer
                // was lost too): give up on it rather than block pairing for good.
                let marker = &mut self.pending[i];
                marker.items += 1;
                if marker.items >= MARKER_PATIENCE {
                    self.pending.remove(i);
                }
            }
            if met_marker && matches!(resp.kind, RespKind::Binary { .. }) {
                self.pass_silent_front(resp.ts_ns, out);
                if self.unread_request_hit(resp, out) {
                    return;
                }
            }
            push_error(
                out,
                DecodeErrorReason::UnexpectedResponse,
                Direction::ServerToClient,
                resp.ts_ns,
            );
            return;
        };
        let lookups_lost = self
            .pending
            .iter()
            .take(index)
            .any(|p| p.marker && p.unread_counted && is_lookup(p.command));
        for _ in 0..index {
            let Some(skipped) = self.pending.pop_front() else {
                break;
            };
            if skipped.quiet {
                let latency = resp.ts_ns.saturating_sub(skipped.ts_ns);
                let status = silent_status(skipped.command, lookups_lost);
                self.finish_entry(skipped, status, Some(latency), out);
            } else {
                let latency = skipped.latency();
                self.finish_entry(skipped, Status::Unknown, latency, out);
            }
        }
        self.answers_fit = true;
        let Some(head) = self.pending.front_mut() else {
            return;
        };
        head.first_resp_ts.get_or_insert(resp.ts_ns);
        head.progress_ts = head.progress_ts.max(resp.ts_ns);
        match fit {
            Fit::No => {}
            Fit::Item(slot) => {
                head.items = head.items.saturating_add(1);
                // The head's keys start the store, so its relative index is absolute.
                match slot.and_then(|i| Some((i, self.slots.slots.get_mut(i)?))) {
                    Some((i, slot)) => {
                        slot.status = Some(Status::Hit);
                        slot.resp_bytes += resp.bytes;
                        slot.value_len = resp.value_len;
                        slot.value_head = resp.value_head;
                        head.cursor = (i + 1) as u16;
                        self.last_value = Some(ValueTarget::Slot(i));
                    }
                    None if head.family == Family::Retrieval && !head.keys_complete => {
                        // A key past those read (the line was cut): its hit is seen all the
                        // same and counts now, as the entry keeps no slot for it.
                        let (command, ts_ns, latency, seq, queue) = (
                            head.command,
                            head.ts_ns,
                            head.latency(),
                            head.seq,
                            head.queue,
                        );
                        push_request(
                            out,
                            command,
                            Status::Hit,
                            resp.key.map(|key| self.kept_key(key, resp.key_truncated)),
                            latency,
                            ts_ns,
                            0,
                            resp.bytes,
                            queue_op(queue, Status::Hit),
                            seq,
                            self.sized(Sizes {
                                value_len: resp.value_len,
                                value_head: None,
                                keys: 0,
                            }),
                        );
                    }
                    None => {
                        head.resp_bytes += resp.bytes;
                        if resp.value_len.is_some() {
                            head.value_len = resp.value_len;
                            head.value_head = resp.value_head;
                            self.last_value = Some(ValueTarget::Entry);
                        }
                    }
                }
            }
            Fit::Part => head.resp_bytes += resp.bytes,
            Fit::Done(status) => {
                head.resp_bytes += resp.bytes;
                if resp.value_len.is_some() {
                    head.value_len = resp.value_len;
                    head.value_head = resp.value_head;
                    if resp.head_follows {
                        head.value_due = Some(status);
                        return;
                    }
                }
                if let Some(done) = self.pending.pop_front() {
                    let latency = done.latency();
                    let first = out.len();
                    self.finish_entry(done, status, latency, out);
                    if let Some(text) = resp.error_text {
                        // One error line answers every key of the request.
                        for decoded in out.get_mut(first..).unwrap_or_default() {
                            if let Decoded::Request(request) = decoded {
                                request.error_text = Some(text);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A binary hit that names its key and command (GetK, GetKQ, GatK...) and fits no request
    /// we read answers one we did not (lost behind the marker): it is counted as the hit it
    /// is, so a batch cut by the capture does not lose its hits. The misses among the unread
    /// requests have no answer: unless the cut already did, it proves lookups were lost, and
    /// they count as one unknown ([`Pairing::lose_requests`]). Whether it was one.
    fn unread_request_hit(&mut self, resp: &Response<'_>, out: &mut Vec<Decoded>) -> bool {
        let RespKind::Binary {
            opcode,
            status: 0,
            more: false,
        } = resp.kind
        else {
            return false;
        };
        let command = Command::from_opcode(opcode);
        let Some(key) = resp.key.filter(|k| !k.is_empty()) else {
            return false;
        };
        if binary_status(command, 0) != Status::Hit {
            return false;
        }
        push_request(
            out,
            command,
            Status::Hit,
            Some(self.kept_key(key, resp.key_truncated)),
            None,
            resp.ts_ns,
            0,
            resp.bytes,
            None,
            None,
            self.sized(Sizes {
                value_len: resp.value_len,
                value_head: resp.value_head,
                keys: 0,
            }),
        );
        if let Some(marker) = self.pending.iter().position(|p| p.marker) {
            self.count_unread(marker, command, resp.ts_ns, out);
        }
        true
    }

    /// A text or meta answer that fits none of the requests before a marker, which stands for
    /// lost requests counted as one unknown of their command ([`Pairing::lose_requests`]):
    /// the answer of one of them, when it is one that command gets. It counts as what it
    /// says (a `STORED` of an unread set, a hit of an unread `mg`), so a batch cut by the
    /// capture keeps every answered outcome; the `MN` closing a meta batch settles the quiet
    /// requests before the marker and the marker itself. Errors prove nothing (they are what
    /// unreadable requests get back), nor do multi-line answers. Whether it was one.
    fn unread_line_answer(&mut self, resp: &Response<'_>, out: &mut Vec<Decoded>) -> bool {
        let Some(marker) = self
            .pending
            .iter()
            .position(|p| p.marker)
            .filter(|&i| self.pending[i].unread_counted)
        else {
            return false;
        };
        let lost = self.pending[marker].command;
        match resp.kind {
            RespKind::Meta(MetaCode::Mn) => {
                let lookups_lost = is_lookup(lost);
                for _ in 0..marker {
                    let Some(entry) = self.pending.pop_front() else {
                        break;
                    };
                    let latency = entry.latency();
                    let status = if entry.quiet {
                        silent_status(entry.command, lookups_lost)
                    } else {
                        Status::Unknown
                    };
                    self.finish_entry(entry, status, latency, out);
                }
                self.pending.pop_front();
                true
            }
            RespKind::Line(LineCode::Error | LineCode::ClientError | LineCode::ServerError) => {
                false
            }
            RespKind::Line(_) | RespKind::Meta(_) => {
                let single_line = matches!(
                    family(lost),
                    Family::Storage
                        | Family::Delete
                        | Family::Arith
                        | Family::Touch
                        | Family::MetaGet
                        | Family::MetaSet
                        | Family::MetaDelete
                        | Family::MetaArith
                );
                if !single_line {
                    return false;
                }
                // As the lost request's own answer: no keys to match, not quiet.
                let mut probe = Pending::marker(resp.ts_ns);
                probe.marker = false;
                probe.command = lost;
                probe.family = family(lost);
                let Fit::Done(status) = self.fit(&probe, 0, resp) else {
                    return false;
                };
                push_request(
                    out,
                    lost,
                    status,
                    resp.key.map(|key| self.kept_key(key, resp.key_truncated)),
                    None,
                    resp.ts_ns,
                    0,
                    resp.bytes,
                    None,
                    None,
                    self.sized(Sizes {
                        value_len: resp.value_len,
                        value_head: None,
                        keys: 0,
                    }),
                );
                true
            }
            _ => false,
        }
    }

    /// A binary answer that fits none of the requests before a marker answers one sent after
    /// them (a lost one, such as the NoOp closing a quiet batch that overflowed or fell in a
    /// gap), and the server answers in order: the quiet requests at the front had their
    /// chance to fail and did not. They finish with what their silence means instead of
    /// holding their slots until a later answer fits or they time out. Text and meta answers
    /// prove less (an error is what unreadable requests get back), so they do not do this.
    fn pass_silent_front(&mut self, ts_ns: u64, out: &mut Vec<Decoded>) {
        while let Some(front) = self.pending.front() {
            if front.marker || !front.quiet || front.first_resp_ts.is_some() {
                break;
            }
            let Some(entry) = self.pending.pop_front() else {
                break;
            };
            let latency = ts_ns.saturating_sub(entry.ts_ns);
            self.finish_entry(entry, implied_status(entry.command), Some(latency), out);
        }
    }

    /// A quiet meta mutation (`ms`/`md`/`ma` with `q`) answers only when it fails, which is
    /// rare; a request that is not quiet always answers. When an answer without opaque or key
    /// fits both, it is far more likely the latter's, the quiet one having succeeded silently.
    fn prefer_nominal_answer(
        &self,
        index: usize,
        offset: usize,
        fit: Fit,
        resp: &Response<'_>,
    ) -> (usize, Fit) {
        let entry = &self.pending[index];
        let quiet_mutation = entry.quiet
            && matches!(
                entry.command,
                Command::MetaSet | Command::MetaDelete | Command::MetaArithmetic
            );
        if !quiet_mutation || resp.opaque.is_some() || resp.key.is_some() {
            return (index, fit);
        }
        let mut later_offset = offset + usize::from(entry.nkeys);
        for later in index + 1..self.pending.len() {
            let candidate = &self.pending[later];
            if candidate.marker {
                break;
            }
            if !candidate.quiet {
                let later_fit = self.fit(candidate, later_offset, resp);
                if !matches!(later_fit, Fit::No) {
                    return (later, later_fit);
                }
                break;
            }
            later_offset += usize::from(candidate.nkeys);
        }
        (index, fit)
    }

    /// The responses to everything outstanding may have been lost: report it all as unknown
    /// and make later responses prove they belong to a later request.
    pub fn lose_responses(&mut self, ts_ns: u64, out: &mut Vec<Decoded>) {
        self.lose_responses_before(None, out);
        self.push_marker(ts_ns);
    }

    /// The answers to the requests sent before `before_ns` (all of them with None) went by
    /// unseen while nobody followed the stream: those finish as unknown, later ones keep
    /// waiting. No marker: the stream goes on from a frame boundary. Whether any was cut.
    pub fn lose_responses_before(
        &mut self,
        before_ns: Option<u64>,
        out: &mut Vec<Decoded>,
    ) -> bool {
        self.release_due(out);
        let mut cut = false;
        while let Some(front) = self.pending.front() {
            if before_ns.is_some_and(|before| front.ts_ns >= before) {
                break;
            }
            let Some(entry) = self.pending.pop_front() else {
                break;
            };
            cut |= !entry.marker;
            let latency = entry.latency();
            self.finish_entry(entry, Status::Unknown, latency, out);
        }
        cut
    }

    /// Response bytes arrived at `ts_ns` (e.g. a value body between two VALUE lines), `framed`
    /// when some of them were framed as answers rather than skipped: the request being
    /// answered is making progress, whatever the bytes complete. While answers fit, framed
    /// bytes count for the first request waiting even before a response of its own has
    /// been paired: they are either its answer on the way (a binary answer is paired only
    /// once its whole body is in) or the end of the answer before it (the rest of a meta
    /// `VA` value), which it waits behind.
    pub fn response_progress(&mut self, ts_ns: u64, framed: bool) {
        let answers_fit = framed && self.answers_fit;
        if let Some(front) = self
            .pending
            .front_mut()
            .filter(|p| answers_fit || p.first_resp_ts.is_some())
        {
            front.progress_ts = front.progress_ts.max(ts_ns);
        }
    }

    /// Finishes requests whose answer has not started or not progressed for `timeout_ns`
    /// (a blocking queue fetch's answer may start up to its wait later).
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<Decoded>) {
        self.release_due(out);
        while let Some(front) = self.pending.front() {
            if front.deadline(timeout_ns) > now_ns {
                break;
            }
            let Some(entry) = self.pending.pop_front() else {
                break;
            };
            if entry.quiet {
                // A quiet request that failed would have been answered by now.
                self.finish_entry(entry, implied_status(entry.command), None, out);
            } else if entry.maybe_silent {
                self.finish_entry(entry, Status::Unknown, None, out);
            } else {
                let latency = entry.latency();
                self.finish_entry(entry, Status::Timeout, latency, out);
            }
        }
    }

    pub fn finish(&mut self, out: &mut Vec<Decoded>) {
        self.release_due(out);
        while let Some(entry) = self.pending.pop_front() {
            if entry.quiet {
                self.finish_entry(entry, implied_status(entry.command), None, out);
            } else if entry.command == Command::BinQuit {
                // The server ends the connection after answering a quit, and clients that
                // sent it need not read the answer (libmemcached closes at once): the close
                // is the quit done, the normal end of a connection, not a request left
                // without its answer.
                let latency = entry.latency();
                self.finish_entry(entry, Status::Ok, latency, out);
            } else if entry.maybe_silent {
                self.finish_entry(entry, Status::Unknown, None, out);
            } else {
                let latency = entry.latency();
                self.finish_entry(entry, Status::Unanswered, latency, out);
            }
        }
    }

    fn fit(&self, entry: &Pending, offset: usize, resp: &Response<'_>) -> Fit {
        if let Some(opaque) = resp.opaque {
            if entry.opaque != Some(opaque) {
                return Fit::No;
            }
        }
        let single_key = entry.nkeys == 1 && entry.keys_complete;
        if let RespKind::Binary {
            opcode,
            status,
            more,
        } = resp.kind
        {
            if entry.family != Family::Binary || entry.opcode != opcode {
                return Fit::No;
            }
            if let Some(key) = resp.key.filter(|k| single_key && !k.is_empty()) {
                if !self.slots.could_be(offset, key, resp.key_truncated, false) {
                    return Fit::No;
                }
            }
            return if more {
                Fit::Part
            } else {
                Fit::Done(binary_status(entry.command, status))
            };
        }
        if entry.family == Family::Binary {
            return Fit::No;
        }
        if let RespKind::Line(
            code @ (LineCode::Error | LineCode::ClientError | LineCode::ServerError),
        ) = resp.kind
        {
            // Errors are always sent, even for noreply/quiet requests, and to any command.
            return Fit::Done(line_status(code));
        }
        if let (true, Some(key), RespKind::Meta(_)) = (single_key, resp.key, resp.kind) {
            if !self.slots.could_be(offset, key, resp.key_truncated, false) {
                return Fit::No;
            }
        }
        use LineCode as L;
        use MetaCode as M;
        let quiet = entry.quiet;
        match (entry.family, resp.kind) {
            (Family::Retrieval, RespKind::Value) => match resp.key {
                Some(key) => {
                    match value_slot(&self.slots, entry, offset, key, resp.key_truncated) {
                        Some(i) => Fit::Item(Some(i)),
                        // Keys we could not keep may be the one answered.
                        None if !entry.keys_complete || entry.nkeys == 0 => Fit::Item(None),
                        None => Fit::No,
                    }
                }
                None => Fit::Item(None),
            },
            (Family::Retrieval, RespKind::End) => Fit::Done(Status::Miss),
            (
                Family::Storage,
                RespKind::Line(c @ (L::Stored | L::NotStored | L::Exists | L::NotFound)),
            ) => Fit::Done(line_status(c)),
            (Family::Delete, RespKind::Line(c @ (L::Deleted | L::NotFound))) => {
                Fit::Done(line_status(c))
            }
            (Family::Arith, RespKind::Line(L::Number)) => Fit::Done(Status::Ok),
            (Family::Arith, RespKind::Line(L::NotFound)) => Fit::Done(Status::NotFound),
            (Family::Touch, RespKind::Line(c @ (L::Touched | L::NotFound))) => {
                Fit::Done(line_status(c))
            }
            (Family::Stats, RespKind::Stat | RespKind::Value | RespKind::Line(L::Unknown)) => {
                Fit::Part
            }
            (Family::Stats, RespKind::End | RespKind::Line(L::Reset | L::Ok)) => {
                Fit::Done(Status::Ok)
            }
            (Family::Version, RespKind::Line(L::Version)) => Fit::Done(Status::Ok),
            (Family::OkLine, RespKind::Line(L::Ok)) => Fit::Done(Status::Ok),
            (Family::AnyLine, RespKind::Line(c)) => Fit::Done(line_status(c)),
            (Family::AnyLine, RespKind::End | RespKind::Stat) => Fit::Done(Status::Ok),
            (Family::MetaGet, RespKind::Meta(M::Va | M::Hd)) => Fit::Done(Status::Hit),
            (Family::MetaGet, RespKind::Meta(M::En)) if !quiet => Fit::Done(Status::Miss),
            (Family::MetaSet, RespKind::Meta(M::Hd)) if !quiet => Fit::Done(Status::Stored),
            (Family::MetaSet, RespKind::Meta(M::Ns)) => Fit::Done(Status::NotStored),
            (Family::MetaSet | Family::MetaDelete | Family::MetaArith, RespKind::Meta(M::Ex)) => {
                Fit::Done(Status::Exists)
            }
            (Family::MetaSet | Family::MetaDelete | Family::MetaArith, RespKind::Meta(M::Nf)) => {
                Fit::Done(Status::NotFound)
            }
            (Family::MetaDelete, RespKind::Meta(M::Hd)) if !quiet => Fit::Done(Status::Deleted),
            (Family::MetaArith, RespKind::Meta(M::Hd | M::Va)) if !quiet => Fit::Done(Status::Ok),
            (Family::MetaArith, RespKind::Meta(M::Ns)) => Fit::Done(Status::NotStored),
            (Family::MetaNoop, RespKind::Meta(M::Mn)) => Fit::Done(Status::Ok),
            (Family::MetaDebug, RespKind::Meta(M::Me)) => Fit::Done(Status::Hit),
            (Family::MetaDebug, RespKind::Meta(M::En)) => Fit::Done(Status::Miss),
            _ => Fit::No,
        }
    }

    /// Removes a finished request's keys and reports one observation per key (one without a
    /// key for keyless commands).
    fn finish_entry(
        &mut self,
        entry: Pending,
        unresolved: Status,
        latency: Option<u64>,
        out: &mut Vec<Decoded>,
    ) {
        // Slot indexes shift when an entry's keys go.
        self.last_value = None;
        if entry.marker {
            return;
        }
        let nkeys = usize::from(entry.nkeys);
        // A get whose line was cut: the keys read finish below, its hits past them counted
        // when they came, and the rest is one observation of what cannot be told.
        let unread = entry.family == Family::Retrieval && !entry.keys_complete;
        if unread && nkeys == 0 {
            self.finish_unread(&entry, unresolved, latency, true, out);
            return;
        }
        if nkeys == 0 {
            let status = if entry.family == Family::Retrieval
                && unresolved == Status::Miss
                && entry.items > 0
            {
                Status::Hit
            } else {
                unresolved
            };
            push_request(
                out,
                entry.command,
                status,
                None,
                latency,
                entry.ts_ns,
                entry.req_bytes,
                entry.resp_bytes,
                queue_op(entry.queue, status),
                entry.seq,
                self.sized(Sizes {
                    value_len: entry.value_len,
                    value_head: entry.value_head,
                    keys: 0,
                }),
            );
            return;
        }
        for i in 0..nkeys {
            let Some(slot) = self.slots.slots.pop_front() else {
                break;
            };
            let status = slot.status.unwrap_or(unresolved);
            // A hit's value, or (one key) the value the request itself sent.
            let (value_len, value_head) = if slot.value_len.is_some() {
                (slot.value_len, slot.value_head)
            } else if nkeys == 1 {
                (entry.value_len, entry.value_head)
            } else {
                (None, None)
            };
            let (req_bytes, resp_bytes) = if i == 0 {
                (entry.req_bytes, entry.resp_bytes + slot.resp_bytes)
            } else {
                (0, slot.resp_bytes)
            };
            push_request(
                out,
                entry.command,
                status,
                Some((self.slots.bytes_of(&slot), slot.truncated)),
                latency,
                entry.ts_ns,
                req_bytes,
                resp_bytes,
                queue_op(entry.queue, status),
                entry.seq,
                self.sized(Sizes {
                    value_len,
                    value_head,
                    keys: if i == 0 { entry.nkeys } else { 0 },
                }),
            );
        }
        self.slots.reclaim();
        if unread {
            self.finish_unread(&entry, unresolved, latency, false, out);
        }
    }

    /// The unread keys of a get whose line was cut: [`Status::Unknown`] where the answer
    /// resolved the keys read (a miss among them cannot be told from no key), else what
    /// became of the whole request (timeout, unanswered). `alone`: no key was read, so it
    /// carries the request's bytes.
    fn finish_unread(
        &self,
        entry: &Pending,
        unresolved: Status,
        latency: Option<u64>,
        alone: bool,
        out: &mut Vec<Decoded>,
    ) {
        let status = if unresolved.is_lookup() {
            Status::Unknown
        } else {
            unresolved
        };
        push_request(
            out,
            entry.command,
            status,
            None,
            latency,
            entry.ts_ns,
            if alone { entry.req_bytes } else { 0 },
            if alone { entry.resp_bytes } else { 0 },
            queue_op(entry.queue, status),
            entry.seq,
            self.sized(Sizes {
                value_len: None,
                value_head: None,
                keys: 0,
            }),
        );
    }
}

/// What a quiet request's silence means once the answer after it came: its implied result,
/// unless lookups were lost between it and that answer (`lookups_lost`) and it is a meta
/// `mg`, whose hits need not name their key: a hit taken for its own may then have been
/// a lost lookup's, and its silence says nothing.
fn silent_status(command: Command, lookups_lost: bool) -> Status {
    if lookups_lost && command == Command::MetaGet {
        Status::Unknown
    } else {
        implied_status(command)
    }
}

/// What an observation says about sizes (see [`RequestObservation::value_len`]).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    value_len: Option<u32>,
    value_head: Option<ValueHead>,
    keys: u16,
}

/// The wait a blocking queue fetch lets the server take before answering, in ns.
fn blocking_wait_ns(queue: Option<QueueIntent>) -> u64 {
    match queue {
        Some(QueueIntent::Fetch(options)) => options
            .blocking_wait_ms()
            .map_or(0, |ms| u64::from(ms) * 1_000_000),
        _ => 0,
    }
}

/// Appends a request observation. The key is copied straight into the observation in the
/// output vector: building it elsewhere and moving it in costs several copies of the whole
/// fixed-size key buffer, which dominated the hot path.
#[allow(clippy::too_many_arguments)]
fn push_request(
    out: &mut Vec<Decoded>,
    command: Command,
    status: Status,
    key: Option<(&[u8], bool)>,
    latency_ns: Option<u64>,
    request_ts_ns: u64,
    request_bytes: u64,
    response_bytes: u64,
    queue: Option<QueueOp>,
    seq: Option<u32>,
    sizes: Sizes,
) {
    out.push(Decoded::Request(RequestObservation {
        command,
        status,
        key: None,
        latency_ns,
        request_ts_ns,
        request_bytes,
        response_bytes,
        queue,
        seq,
        request_id: None,
        value_len: sizes.value_len,
        value_head: sizes.value_head,
        keys_in_request: sizes.keys,
        error_text: None,
    }));
    if let (Some((bytes, truncated)), Some(Decoded::Request(request))) = (key, out.last_mut()) {
        request.key.insert(Key::EMPTY).assign(bytes, truncated);
    }
}
