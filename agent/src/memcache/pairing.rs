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

use super::model::{
    key_could_be, Command, DecodeErrorObservation, DecodeErrorReason, Direction, KestrelOptions,
    Key, Observation, QueueOp, QueueOpKind, RequestObservation, Status,
};

/// How a request is answered, which decides which responses fit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// `VALUE ...` items, then `END`.
    Retrieval,
    /// STORED / NOT_STORED / EXISTS / NOT_FOUND.
    Storage,
    /// DELETED / NOT_FOUND.
    Delete,
    /// A number / NOT_FOUND.
    Arith,
    /// TOUCHED / NOT_FOUND.
    Touch,
    /// Any lines, then END (or a single RESET / OK).
    Stats,
    Version,
    /// A single OK (flush_all, verbosity).
    OkLine,
    /// One line of any kind (admin commands modelled as "other").
    AnyLine,
    MetaGet,
    MetaSet,
    MetaDelete,
    MetaArith,
    MetaNoop,
    MetaDebug,
    /// A binary response with the request's opcode.
    Binary,
}

pub(crate) fn family(command: Command) -> Family {
    use Command::*;
    match command {
        Get | Gets | Gat | Gats => Family::Retrieval,
        Set | Add | Replace | Append | Prepend | Cas => Family::Storage,
        Delete => Family::Delete,
        Incr | Decr => Family::Arith,
        Touch => Family::Touch,
        Stats => Family::Stats,
        Version => Family::Version,
        Verbosity | FlushAll => Family::OkLine,
        Quit | Other => Family::AnyLine,
        MetaGet => Family::MetaGet,
        MetaSet => Family::MetaSet,
        MetaDelete => Family::MetaDelete,
        MetaArithmetic => Family::MetaArith,
        MetaNoop => Family::MetaNoop,
        MetaDebug => Family::MetaDebug,
        _ => Family::Binary,
    }
}

/// Text response lines that stand alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineCode {
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    Reset,
    Number,
    Version,
    Error,
    ClientError,
    ServerError,
    /// A line starting with a word this decoder does not model (stats sub-listings, BUSY...).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaCode {
    Hd,
    Va,
    En,
    Nf,
    Ns,
    Ex,
    Mn,
    Me,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RespKind {
    /// A text `VALUE` item (line and data block).
    Value,
    End,
    Stat,
    Line(LineCode),
    Meta(MetaCode),
    /// `more` is set for binary Stat responses that carry a stat (the list ends with an empty
    /// key).
    Binary {
        opcode: u8,
        status: u16,
        more: bool,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Response<'a> {
    pub kind: RespKind,
    /// Timestamp of the chunk holding the response's first byte.
    pub ts_ns: u64,
    pub bytes: u64,
    pub key: Option<&'a [u8]>,
    pub key_truncated: bool,
    /// Binary opaque, or a hash of the meta `O` token.
    pub opaque: Option<u64>,
    /// Length of the value this response carries (a hit), if any.
    pub value_len: Option<u32>,
}

/// What a queue-mode request asked of its queue; the outcome is decided by the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueIntent {
    Enqueue,
    Fetch(KestrelOptions),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestInfo {
    pub command: Command,
    /// Binary opcode (responses echo it); 0 for text.
    pub opcode: u8,
    /// The server answers only some outcomes (binary quiet opcodes, meta `q`).
    pub quiet: bool,
    /// The server answers nothing (text `noreply`, `quit`, binary QuitQ).
    pub noreply: bool,
    pub ts_ns: u64,
    pub bytes: u64,
    pub opaque: Option<u64>,
    pub queue: Option<QueueIntent>,
    /// TCP sequence number of the request's first byte, when known.
    pub seq: Option<u32>,
    /// Length of the value a storage command sends.
    pub value_len: Option<u32>,
}

impl RequestInfo {
    pub fn new(command: Command, ts_ns: u64, bytes: u64) -> RequestInfo {
        RequestInfo {
            command,
            opcode: 0,
            quiet: false,
            noreply: false,
            ts_ns,
            bytes,
            opaque: None,
            queue: None,
            seq: None,
            value_len: None,
        }
    }
}

/// A value length as kept per request: values beyond 4 GiB cannot be framed anyway.
pub(crate) fn value_len(n: u64) -> Option<u32> {
    u32::try_from(n).ok()
}

/// A key of an outstanding request; its bytes live in [`KeyStore::bytes`].
#[derive(Debug, Clone, Copy)]
struct KeySlot {
    start: usize,
    len: u8,
    truncated: bool,
    status: Option<Status>,
    resp_bytes: u64,
    value_len: Option<u32>,
}

/// Keys of outstanding requests, in request order. Small slots point into one byte arena so
/// the hot path moves a few bytes per key instead of whole fixed-size key buffers. Requests
/// finish from the front, so dead bytes accumulate at the arena's start: it is cleared when
/// no key is outstanding and compacted when dead bytes outnumber live ones, which bounds it
/// to twice the live keys.
#[derive(Debug, Default)]
struct KeyStore {
    slots: VecDeque<KeySlot>,
    bytes: Vec<u8>,
}

const ARENA_COMPACT_MIN: usize = 16 * 1024;

impl KeyStore {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn push(&mut self, key: &[u8], truncated: bool) {
        self.slots.push_back(KeySlot {
            start: self.bytes.len(),
            len: key.len().min(usize::from(u8::MAX)) as u8,
            truncated,
            status: None,
            resp_bytes: 0,
            value_len: None,
        });
        self.bytes
            .extend_from_slice(&key[..key.len().min(usize::from(u8::MAX))]);
    }

    fn bytes_of(&self, slot: &KeySlot) -> &[u8] {
        self.bytes
            .get(slot.start..slot.start + usize::from(slot.len))
            .unwrap_or_default()
    }

    /// Whether the key at `index` is unanswered (when `unanswered_only`) and could be `other`.
    fn could_be(
        &self,
        index: usize,
        other: &[u8],
        other_truncated: bool,
        unanswered_only: bool,
    ) -> bool {
        self.slots.get(index).is_some_and(|slot| {
            (!unanswered_only || slot.status.is_none())
                && key_could_be(self.bytes_of(slot), slot.truncated, other, other_truncated)
        })
    }

    /// Drops the last slots so that `keep` remain.
    fn truncate(&mut self, keep: usize) {
        if let Some(first_dropped) = self.slots.get(keep) {
            self.bytes.truncate(first_dropped.start);
        }
        self.slots.truncate(keep);
        self.reclaim();
    }

    fn reclaim(&mut self) {
        match self.slots.front() {
            None => self.bytes.clear(),
            Some(front)
                if self.bytes.len() >= ARENA_COMPACT_MIN && front.start > self.bytes.len() / 2 =>
            {
                let dead = front.start;
                self.bytes.drain(..dead);
                for slot in &mut self.slots {
                    slot.start -= dead;
                }
            }
            Some(_) => {}
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Stands for requests we did not see (gap, truncated capture, overflow).
    marker: bool,
    command: Command,
    family: Family,
    opcode: u8,
    quiet: bool,
    /// False when some of the request's keys could not be kept (overflow, oversized line).
    keys_complete: bool,
    nkeys: u16,
    /// Where to start looking for the slot of the next VALUE item (items come in key order).
    cursor: u16,
    ts_ns: u64,
    req_bytes: u64,
    /// Response bytes not attributed to one key (END line, errors, untracked items).
    resp_bytes: u64,
    first_resp_ts: Option<u64>,
    /// VALUE items seen; for a marker, responses it rejected while requests waited behind it.
    items: u32,
    opaque: Option<u64>,
    queue: Option<QueueIntent>,
    seq: Option<u32>,
    /// The stored value's length, or a hit's when the answer is not per key.
    value_len: Option<u32>,
}

impl Pending {
    fn marker(ts_ns: u64) -> Pending {
        Pending {
            marker: true,
            command: Command::Other,
            family: Family::AnyLine,
            opcode: 0,
            quiet: false,
            keys_complete: true,
            nkeys: 0,
            cursor: 0,
            ts_ns,
            req_bytes: 0,
            resp_bytes: 0,
            first_resp_ts: None,
            items: 0,
            opaque: None,
            queue: None,
            seq: None,
            value_len: None,
        }
    }

    fn latency(&self) -> Option<u64> {
        self.first_resp_ts.map(|t| t.saturating_sub(self.ts_ns))
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
    max_pending: usize,
    max_slots: usize,
    max_key_len: usize,
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
    out: &mut Vec<Observation>,
    reason: DecodeErrorReason,
    direction: Direction,
    ts_ns: u64,
) {
    out.push(Observation::DecodeError(DecodeErrorObservation {
        reason,
        direction,
        ts_ns,
    }));
}

impl Pairing {
    pub fn new(max_pending: usize, max_slots: usize, max_key_len: usize) -> Pairing {
        Pairing {
            pending: VecDeque::new(),
            slots: KeyStore::default(),
            staged: 0,
            staged_dropped: false,
            max_pending,
            max_slots,
            max_key_len,
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.iter().filter(|p| !p.marker).count()
    }

    /// Records one key of the request being parsed; `submit` or `unstage` consumes them.
    pub fn stage_key(&mut self, key: &[u8], truncated: bool) {
        if self.slots.len() >= self.max_slots {
            self.staged_dropped = true;
            return;
        }
        let keep = key.len().min(self.max_key_len);
        self.slots.push(&key[..keep], truncated || keep < key.len());
        self.staged += 1;
    }

    /// Forgets the staged keys of a request that turned out not to be one.
    pub fn unstage(&mut self) {
        let keep = self.slots.len() - self.staged;
        self.slots.truncate(keep);
        self.staged = 0;
        self.staged_dropped = false;
    }

    /// Adds a complete request (with the keys staged for it) to the outstanding queue, or
    /// reports it at once when no response will come.
    pub fn submit(&mut self, req: RequestInfo, out: &mut Vec<Observation>) {
        let nkeys = self.staged;
        let keys_complete = !self.staged_dropped;
        self.staged = 0;
        self.staged_dropped = false;
        if !keys_complete {
            push_error(
                out,
                DecodeErrorReason::PendingOverflow,
                Direction::ClientToServer,
                req.ts_ns,
            );
        }
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
                    Sizes {
                        value_len: req.value_len,
                        keys: 0,
                    },
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
                    Sizes {
                        value_len: req.value_len.filter(|_| nkeys == 1),
                        keys: if i == 0 { nkeys as u16 } else { 0 },
                    },
                );
            }
            self.slots.truncate(start);
            return;
        }
        if self.pending.len() >= self.max_pending {
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
            keys_complete,
            nkeys: nkeys as u16,
            cursor: 0,
            ts_ns: req.ts_ns,
            req_bytes: req.bytes,
            resp_bytes: 0,
            first_resp_ts: None,
            items: 0,
            opaque: req.opaque,
            queue: req.queue,
            seq: req.seq,
            value_len: req.value_len,
        });
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

    /// The request the next response should answer (quiet requests that may be skipped
    /// silently are passed over): its family, binary opcode and opaque. None if unknown.
    pub fn next_answer(&self) -> Option<(Family, u8, Option<u64>)> {
        for p in &self.pending {
            if p.marker {
                return None;
            }
            if !p.quiet {
                return Some((p.family, p.opcode, p.opaque));
            }
        }
        None
    }

    pub fn respond(&mut self, resp: &Response<'_>, out: &mut Vec<Observation>) {
        let mut offset = 0usize;
        let mut found = None;
        for i in 0..self.pending.len() {
            let entry = &self.pending[i];
            if entry.marker {
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
                    // A marker that keeps rejecting answers while requests wait behind it has
                    // most likely outlived its lost responses (or the next request's answer
                    // was lost too): give up on it rather than block pairing for good.
                    let marker = &mut self.pending[i];
                    marker.items += 1;
                    if marker.items >= MARKER_PATIENCE {
                        self.pending.remove(i);
                    }
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
            push_error(
                out,
                DecodeErrorReason::UnexpectedResponse,
                Direction::ServerToClient,
                resp.ts_ns,
            );
            return;
        };
        for _ in 0..index {
            let Some(skipped) = self.pending.pop_front() else {
                break;
            };
            if skipped.quiet {
                let latency = resp.ts_ns.saturating_sub(skipped.ts_ns);
                self.finish_entry(skipped, implied_status(skipped.command), Some(latency), out);
            } else {
                let latency = skipped.latency();
                self.finish_entry(skipped, Status::Unknown, latency, out);
            }
        }
        let Some(head) = self.pending.front_mut() else {
            return;
        };
        head.first_resp_ts.get_or_insert(resp.ts_ns);
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
                        head.cursor = (i + 1) as u16;
                    }
                    None => {
                        head.resp_bytes += resp.bytes;
                        head.value_len = resp.value_len.or(head.value_len);
                    }
                }
            }
            Fit::Part => head.resp_bytes += resp.bytes,
            Fit::Done(status) => {
                head.resp_bytes += resp.bytes;
                if resp.value_len.is_some() {
                    head.value_len = resp.value_len;
                }
                if let Some(done) = self.pending.pop_front() {
                    let latency = done.latency();
                    self.finish_entry(done, status, latency, out);
                }
            }
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
    pub fn lose_responses(&mut self, ts_ns: u64, out: &mut Vec<Observation>) {
        while let Some(entry) = self.pending.pop_front() {
            let latency = entry.latency();
            self.finish_entry(entry, Status::Unknown, latency, out);
        }
        self.push_marker(ts_ns);
    }

    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<Observation>) {
        while let Some(front) = self.pending.front() {
            if front.ts_ns.saturating_add(timeout_ns) > now_ns {
                break;
            }
            let Some(entry) = self.pending.pop_front() else {
                break;
            };
            if entry.quiet {
                // A quiet request that failed would have been answered by now.
                self.finish_entry(entry, implied_status(entry.command), None, out);
            } else {
                let latency = entry.latency();
                self.finish_entry(entry, Status::Timeout, latency, out);
            }
        }
    }

    pub fn finish(&mut self, out: &mut Vec<Observation>) {
        while let Some(entry) = self.pending.pop_front() {
            if entry.quiet {
                self.finish_entry(entry, implied_status(entry.command), None, out);
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
        out: &mut Vec<Observation>,
    ) {
        if entry.marker {
            return;
        }
        let nkeys = usize::from(entry.nkeys);
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
                Sizes {
                    value_len: entry.value_len,
                    keys: 0,
                },
            );
            return;
        }
        for i in 0..nkeys {
            let Some(slot) = self.slots.slots.pop_front() else {
                break;
            };
            let status = slot.status.unwrap_or(unresolved);
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
                Sizes {
                    value_len: slot.value_len.or(entry.value_len.filter(|_| nkeys == 1)),
                    keys: if i == 0 { entry.nkeys } else { 0 },
                },
            );
        }
        self.slots.reclaim();
    }
}

/// The key (index among the entry's keys) a VALUE item for `key` answers: the first key not
/// yet answered that could be `key`, looking from the entry's cursor first because servers
/// answer in request order. Queue servers may echo the queue name with or without Kestrel
/// options, so the part of the key before the first '/' is tried too.
fn value_slot(
    slots: &KeyStore,
    entry: &Pending,
    offset: usize,
    key: &[u8],
    key_truncated: bool,
) -> Option<usize> {
    let n = usize::from(entry.nkeys);
    let cursor = usize::from(entry.cursor).min(n);
    let queue_name = key
        .iter()
        .position(|&b| b == b'/')
        .map(|slash| &key[..slash]);
    for candidate in [Some(key), queue_name].into_iter().flatten() {
        let truncated = key_truncated && candidate.len() == key.len();
        if let Some(i) = (cursor..n)
            .chain(0..cursor)
            .find(|&i| slots.could_be(offset + i, candidate, truncated, true))
        {
            return Some(i);
        }
    }
    None
}

/// What an observation says about sizes (see [`RequestObservation::value_len`]).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    value_len: Option<u32>,
    keys: u16,
}

/// Appends a request observation. The key is copied straight into the observation in the
/// output vector: building it elsewhere and moving it in costs several copies of the whole
/// fixed-size key buffer, which dominated the hot path.
#[allow(clippy::too_many_arguments)]
fn push_request(
    out: &mut Vec<Observation>,
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
    out.push(Observation::Request(RequestObservation {
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
        keys_in_request: sizes.keys,
    }));
    if let (Some((bytes, truncated)), Some(Observation::Request(request))) = (key, out.last_mut()) {
        request.key.insert(Key::EMPTY).assign(bytes, truncated);
    }
}

fn line_status(code: LineCode) -> Status {
    match code {
        LineCode::Stored => Status::Stored,
        LineCode::NotStored => Status::NotStored,
        LineCode::Exists => Status::Exists,
        LineCode::NotFound => Status::NotFound,
        LineCode::Deleted => Status::Deleted,
        LineCode::Touched => Status::Touched,
        LineCode::Error => Status::Error,
        LineCode::ClientError => Status::ClientError,
        LineCode::ServerError => Status::ServerError,
        LineCode::Ok
        | LineCode::Reset
        | LineCode::Number
        | LineCode::Version
        | LineCode::Unknown => Status::Ok,
    }
}

fn is_binary_retrieval(command: Command) -> bool {
    use Command::*;
    matches!(
        command,
        BinGet | BinGetQ | BinGetK | BinGetKQ | BinGat | BinGatQ | BinGatK | BinGatKQ
    )
}

fn binary_success(command: Command) -> Status {
    use Command::*;
    match command {
        _ if is_binary_retrieval(command) => Status::Hit,
        BinSet | BinAdd | BinReplace | BinAppend | BinPrepend | BinSetQ | BinAddQ | BinReplaceQ
        | BinAppendQ | BinPrependQ => Status::Stored,
        BinDelete | BinDeleteQ => Status::Deleted,
        BinTouch => Status::Touched,
        _ => Status::Ok,
    }
}

/// Binary status codes (memcached's protocol_binary.h plus the common extensions).
fn binary_status(command: Command, status: u16) -> Status {
    match status {
        0x00 => binary_success(command),
        0x01 if is_binary_retrieval(command) => Status::Miss,
        0x01 => Status::NotFound,
        0x02 => Status::Exists,
        0x05 => Status::NotStored,
        0x04 | 0x06 | 0x20 => Status::ClientError,
        0x21 => Status::Ok,
        0x81 | 0x83 => Status::Error,
        _ => Status::ServerError,
    }
}

/// The result a quiet request's silence stands for.
fn implied_status(command: Command) -> Status {
    match command {
        Command::MetaGet => Status::Miss,
        Command::MetaSet => Status::Stored,
        Command::MetaDelete => Status::Deleted,
        Command::MetaArithmetic => Status::Ok,
        _ if is_binary_retrieval(command) => Status::Miss,
        _ => binary_success(command),
    }
}

fn queue_op(intent: Option<QueueIntent>, status: Status) -> Option<QueueOp> {
    let intent = intent?;
    let (op, options) = match intent {
        QueueIntent::Enqueue => (QueueOpKind::Enqueue, KestrelOptions::default()),
        QueueIntent::Fetch(o) => {
            let fetches = o.open || o.peek || !(o.close || o.abort);
            let op = match status {
                Status::Hit if o.peek => QueueOpKind::Peek,
                Status::Hit if o.open => QueueOpKind::Open,
                Status::Hit => QueueOpKind::Dequeue,
                Status::Miss if fetches => QueueOpKind::EmptyPoll,
                // No item was asked for (close/abort alone), or the outcome is unknown: report
                // what the request meant to do.
                _ if o.peek => QueueOpKind::Peek,
                _ if o.open => QueueOpKind::Open,
                _ if o.abort => QueueOpKind::Abort,
                _ if o.close => QueueOpKind::Close,
                _ => QueueOpKind::Dequeue,
            };
            (op, o)
        }
    };
    Some(QueueOp { op, options })
}
