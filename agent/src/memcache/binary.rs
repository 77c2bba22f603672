//! The binary protocol: 24-byte headers (magic 0x80 request / 0x81 response), bodies framed
//! by their declared length, quiet opcodes and opaque values for pairing.

use super::model::{
    Command, DecodeErrorReason, Decoded, Direction, ValueHead, KEY_CAPACITY, VALUE_HEAD_LEN,
};
use super::pairing::{
    is_lookup, push_error, value_len, Family, Pairing, RequestInfo, RespKind, Response,
};

pub(crate) const HEADER_LEN: usize = 24;
pub(crate) const REQUEST_MAGIC: u8 = 0x80;
pub(crate) const RESPONSE_MAGIC: u8 = 0x81;

/// Extras, key and the headroom that large values still fit in.
const BODY_OVERHEAD: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub magic: u8,
    pub opcode: u8,
    pub key_len: u16,
    pub extras_len: u8,
    pub data_type: u8,
    /// vbucket id in requests, status in responses.
    pub status: u16,
    pub body_len: u32,
    pub opaque: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            magic: b[0],
            opcode: b[1],
            key_len: u16::from_be_bytes([b[2], b[3]]),
            extras_len: b[4],
            data_type: b[5],
            status: u16::from_be_bytes([b[6], b[7]]),
            body_len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            opaque: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// The body after extras and key: the value, for frames that carry one.
    pub fn value_len(&self) -> u64 {
        u64::from(self.body_len)
            .saturating_sub(u64::from(self.extras_len) + u64::from(self.key_len))
    }

    fn key_range(&self) -> (u64, u64) {
        let start = u64::from(self.extras_len);
        (start, start + u64::from(self.key_len))
    }

    /// Where the value's head lies in the body: (start, end).
    fn head_range(&self) -> (u64, u64) {
        let start = u64::from(self.extras_len) + u64::from(self.key_len);
        let len = self.value_len().min(VALUE_HEAD_LEN as u64);
        (start, start + len)
    }

    /// Good enough to frame by: the right magic and a consistent, bounded body.
    fn is_valid(&self, magic: u8, max_value_len: u64) -> bool {
        self.magic == magic
            && u64::from(self.extras_len) + u64::from(self.key_len) <= u64::from(self.body_len)
            && u64::from(self.body_len) <= max_value_len.saturating_add(BODY_OVERHEAD)
    }

    /// Strict enough that random bytes rarely pass: used to find a header after garbage.
    fn is_plausible(&self, magic: u8, max_value_len: u64) -> bool {
        if !self.is_valid(magic, max_value_len)
            || !Command::is_known_opcode(self.opcode)
            || self.data_type != 0
            || usize::from(self.key_len) > KEY_CAPACITY
        {
            return false;
        }
        if magic == RESPONSE_MAGIC {
            return matches!(self.extras_len, 0 | 4)
                && matches!(
                    self.status,
                    0x00..=0x08 | 0x20 | 0x21 | 0x81..=0x86
                );
        }
        let extras_ok = match self.opcode {
            0x01..=0x03 | 0x11..=0x13 => self.extras_len == 8,
            0x05 | 0x06 | 0x15 | 0x16 => self.extras_len == 20,
            0x1c | 0x1d | 0x1e | 0x23 | 0x24 | 0x1b => self.extras_len == 4,
            0x08 | 0x18 => matches!(self.extras_len, 0 | 4),
            _ => self.extras_len == 0,
        };
        let key_ok = match self.opcode {
            // Commands on an item need its key; noop/version/quit/flush have none.
            0x00..=0x06
            | 0x09
            | 0x0c..=0x0f
            | 0x11..=0x16
            | 0x19
            | 0x1a
            | 0x1c..=0x1e
            | 0x23
            | 0x24 => self.key_len > 0,
            0x07 | 0x08 | 0x0a | 0x0b | 0x17 | 0x18 | 0x1b => self.key_len == 0,
            _ => true,
        };
        extras_ok && key_ok
    }
}

pub(crate) trait PacketSink {
    /// One complete packet. `key` is what was captured of the key (`key_truncated` if not all
    /// of it); `value_head` the first bytes of the body after extras and key, when every one
    /// was captured (and heads are wanted); `start_ts`/`end_ts` are the timestamps of its
    /// first and last bytes' chunks.
    fn packet(
        &mut self,
        header: &Header,
        key: &[u8],
        key_truncated: bool,
        value_head: Option<ValueHead>,
        start_ts: u64,
        end_ts: u64,
    );
    /// The chunk ends with `rest` uncaptured bytes after `header_prefix` (the captured start
    /// of a header). Returns true when the sink can account for them exactly.
    fn unknown_tail(&mut self, header_prefix: &[u8], rest: u64, ts: u64) -> bool;
    /// A header could not be read because it was not captured: framing is lost.
    fn lost(&mut self, ts: u64);
    fn garbage(&mut self, ts: u64);
    /// The packet handed over next starts at this offset of the direction's byte stream
    /// ([`BinFramer::fed`] counts it).
    fn packet_starts_at(&mut self, _stream_offset: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Body,
    Resync,
}

#[derive(Debug)]
pub(crate) struct BinFramer {
    magic: u8,
    max_value_len: u64,
    state: State,
    header_buf: [u8; HEADER_LEN],
    header_have: usize,
    header_ts: u64,
    /// Stream offset of the current header's first byte.
    header_start: u64,
    /// Bytes of the stream fed before the current chunk.
    fed: u64,
    header: Option<Header>,
    body_pos: u64,
    key: [u8; KEY_CAPACITY],
    key_have: usize,
    key_truncated: bool,
    /// The value's first bytes as far as seen, and false once one of them was not captured.
    head: ValueHead,
    head_seen: bool,
    value_heads: bool,
}

impl BinFramer {
    pub fn new(magic: u8, max_value_len: u64, value_heads: bool) -> BinFramer {
        BinFramer {
            magic,
            max_value_len,
            state: State::Header,
            header_buf: [0; HEADER_LEN],
            header_have: 0,
            header_ts: 0,
            header_start: 0,
            fed: 0,
            header: None,
            body_pos: 0,
            key: [0; KEY_CAPACITY],
            key_have: 0,
            key_truncated: false,
            head: ValueHead::default(),
            head_seen: true,
            value_heads,
        }
    }

    /// Bytes of the stream fed so far (every chunk's full length, captured or not).
    pub fn fed(&self) -> u64 {
        self.fed
    }

    pub fn reset_to_resync(&mut self) {
        self.header_have = 0;
        self.header = None;
        self.state = State::Resync;
    }

    fn find_header(&self, captured: &[u8], from: usize) -> Option<usize> {
        let last = captured.len().checked_sub(HEADER_LEN)?;
        (from..=last).find(|&p| {
            captured[p] == self.magic
                && captured[p..p + HEADER_LEN]
                    .try_into()
                    .is_ok_and(|h: &[u8; HEADER_LEN]| {
                        Header::parse(h).is_plausible(self.magic, self.max_value_len)
                    })
        })
    }

    /// Feeds one chunk; returns how many bytes could not be decoded.
    pub fn feed<S: PacketSink>(
        &mut self,
        captured: &[u8],
        total: usize,
        ts: u64,
        sink: &mut S,
    ) -> u64 {
        let skipped = self.feed_chunk(captured, total, ts, sink);
        self.fed += total as u64;
        skipped
    }

    fn feed_chunk<S: PacketSink>(
        &mut self,
        captured: &[u8],
        total: usize,
        ts: u64,
        sink: &mut S,
    ) -> u64 {
        let cap = captured.len().min(total);
        let captured = &captured[..cap];
        let mut skipped = 0u64;
        let mut pos = 0usize;
        while pos < total {
            match self.state {
                State::Header => {
                    if pos >= cap {
                        let rest = (total - pos) as u64;
                        let prefix = &self.header_buf[..self.header_have];
                        if !sink.unknown_tail(prefix, rest, ts) {
                            sink.lost(ts);
                            skipped += rest;
                            self.state = State::Resync;
                        }
                        self.header_have = 0;
                        pos = total;
                        continue;
                    }
                    if self.header_have == 0 {
                        self.header_ts = ts;
                        self.header_start = self.fed + pos as u64;
                    }
                    let header_start = pos;
                    let take = (HEADER_LEN - self.header_have).min(cap - pos);
                    self.header_buf[self.header_have..self.header_have + take]
                        .copy_from_slice(&captured[pos..pos + take]);
                    self.header_have += take;
                    pos += take;
                    if self.header_have < HEADER_LEN {
                        continue;
                    }
                    self.header_have = 0;
                    let header = Header::parse(&self.header_buf);
                    if !header.is_valid(self.magic, self.max_value_len) {
                        sink.garbage(ts);
                        self.state = State::Resync;
                        // Look again just past the bad header's first byte if it was here.
                        if take == HEADER_LEN {
                            pos = header_start + 1;
                        }
                        continue;
                    }
                    self.header = Some(header);
                    self.body_pos = 0;
                    self.key_have = 0;
                    self.key_truncated = false;
                    self.head = ValueHead::default();
                    self.head_seen = true;
                    self.state = State::Body;
                    if header.body_len == 0 {
                        self.finish_packet(ts, sink);
                    }
                }
                State::Body => {
                    let Some(header) = self.header else {
                        self.state = State::Resync;
                        continue;
                    };
                    let body_len = u64::from(header.body_len);
                    let n = (body_len - self.body_pos).min((total - pos) as u64);
                    let (key_start, key_end) = header.key_range();
                    // The part of this chunk's body bytes that holds the key.
                    let from = self.body_pos.max(key_start);
                    let to = (self.body_pos + n).min(key_end);
                    if from < to {
                        let chunk_from = pos + (from - self.body_pos) as usize;
                        let chunk_to = pos + (to - self.body_pos) as usize;
                        let visible_to = chunk_to.min(cap);
                        if chunk_from < visible_to {
                            let piece = &captured[chunk_from..visible_to];
                            let room = KEY_CAPACITY - self.key_have;
                            let keep = piece.len().min(room);
                            self.key[self.key_have..self.key_have + keep]
                                .copy_from_slice(&piece[..keep]);
                            self.key_have += keep;
                        }
                        if visible_to < chunk_to {
                            self.key_truncated = true;
                        }
                    }
                    if self.value_heads {
                        self.collect_head(&header, captured, pos, n);
                    }
                    self.body_pos += n;
                    pos += n as usize;
                    if self.body_pos == body_len {
                        self.finish_packet(ts, sink);
                    }
                }
                State::Resync => match self.find_header(captured, pos) {
                    Some(start) => {
                        skipped += (start - pos) as u64;
                        pos = start;
                        self.header_have = 0;
                        self.state = State::Header;
                    }
                    None => {
                        skipped += (total - pos) as u64;
                        pos = total;
                    }
                },
            }
        }
        skipped
    }

    /// Keeps what the `n` body bytes at `pos` of this chunk hold of the value's head.
    fn collect_head(&mut self, header: &Header, captured: &[u8], pos: usize, n: u64) {
        let (head_start, head_end) = header.head_range();
        let from = self.body_pos.max(head_start);
        let to = (self.body_pos + n).min(head_end);
        if from >= to {
            return;
        }
        let chunk_from = pos + (from - self.body_pos) as usize;
        let chunk_to = pos + (to - self.body_pos) as usize;
        match captured.get(chunk_from..chunk_to) {
            Some(piece) if self.head_seen => self.head.extend(piece),
            _ => self.head_seen = false,
        }
    }

    fn finish_packet<S: PacketSink>(&mut self, ts: u64, sink: &mut S) {
        self.state = State::Header;
        if let Some(header) = self.header.take() {
            let truncated = self.key_truncated || usize::from(header.key_len) > self.key_have;
            let (head_start, head_end) = header.head_range();
            let value_head = (self.value_heads
                && self.head_seen
                && self.head.as_bytes().len() as u64 == head_end - head_start)
                .then_some(self.head);
            sink.packet_starts_at(self.header_start);
            sink.packet(
                &header,
                &self.key[..self.key_have],
                truncated,
                value_head,
                self.header_ts,
                ts,
            );
        }
    }
}

pub(crate) fn is_quiet(opcode: u8) -> bool {
    matches!(opcode, 0x09 | 0x0d | 0x11..=0x16 | 0x18..=0x1a | 0x1e | 0x24)
}

/// Whether the opcode's key names a cache item (Stat's key names a stats group instead).
fn has_item_key(opcode: u8) -> bool {
    matches!(
        opcode,
        0x00..=0x06 | 0x09 | 0x0c..=0x0f | 0x11..=0x16 | 0x19 | 0x1a | 0x1c..=0x1e | 0x23 | 0x24
    )
}

/// Storage opcodes (set/add/replace/append/prepend and quiet forms): the body after extras and
/// key is the value.
fn carries_value(opcode: u8) -> bool {
    matches!(opcode, 0x01..=0x03 | 0x0e | 0x0f | 0x11..=0x13 | 0x19 | 0x1a)
}

/// Get and get-and-touch opcodes, whose successful answers carry the value.
fn is_retrieval_opcode(opcode: u8) -> bool {
    matches!(
        opcode,
        0x00 | 0x09 | 0x0c | 0x0d | 0x1d | 0x1e | 0x23 | 0x24
    )
}

pub(crate) struct RequestSink<'a> {
    pub pairing: &'a mut Pairing,
    pub out: &'a mut Vec<Decoded>,
    /// TCP sequence number of stream offset 0, when known.
    pub seq_base: Option<u32>,
    /// TCP sequence number of the next packet's first byte.
    pub seq: Option<u32>,
    /// The lookup whose header the capture cut (its opcode read, the rest not).
    pub cut_lookup: Option<Command>,
}

impl PacketSink for RequestSink<'_> {
    fn packet_starts_at(&mut self, stream_offset: u64) {
        self.seq = self
            .seq_base
            .map(|base| base.wrapping_add(stream_offset as u32));
    }

    fn unknown_tail(&mut self, header_prefix: &[u8], _rest: u64, _ts: u64) -> bool {
        // A request is unread past here; when its opcode was captured it may say which.
        self.cut_lookup = header_prefix
            .get(1)
            .map(|&opcode| Command::from_opcode(opcode))
            .filter(|&command| is_lookup(command));
        false
    }

    fn packet(
        &mut self,
        header: &Header,
        key: &[u8],
        key_truncated: bool,
        value_head: Option<ValueHead>,
        _start_ts: u64,
        end_ts: u64,
    ) {
        let command = Command::from_opcode(header.opcode);
        if has_item_key(header.opcode) && header.key_len > 0 {
            self.pairing.stage_key(key, key_truncated, end_ts, self.out);
        }
        let mut req = RequestInfo::new(
            command,
            end_ts,
            HEADER_LEN as u64 + u64::from(header.body_len),
        );
        req.opcode = header.opcode;
        req.quiet = is_quiet(header.opcode);
        // QuitQ closes the connection without a word.
        req.noreply = header.opcode == 0x17;
        req.opaque = Some(u64::from(header.opaque));
        req.seq = self.seq.take();
        if carries_value(header.opcode) {
            req.value_len = value_len(header.value_len());
            req.value_head = value_head;
        }
        self.pairing.submit(req, self.out);
    }

    fn lost(&mut self, ts: u64) {
        self.pairing
            .lose_requests(ts, self.cut_lookup.take(), self.out);
        push_error(
            self.out,
            DecodeErrorReason::TruncatedCapture,
            Direction::ClientToServer,
            ts,
        );
    }

    fn garbage(&mut self, ts: u64) {
        self.pairing.push_marker(ts);
        push_error(
            self.out,
            DecodeErrorReason::Garbage,
            Direction::ClientToServer,
            ts,
        );
    }
}

pub(crate) struct ResponseSink<'a> {
    pub pairing: &'a mut Pairing,
    pub out: &'a mut Vec<Decoded>,
}

/// Opcodes whose success response is a bare header and whose failures carry a message, so a
/// body-less response to them can only be a success.
fn success_is_bare_header(opcode: u8) -> bool {
    matches!(
        opcode,
        0x01..=0x04 | 0x07 | 0x08 | 0x0a | 0x0e | 0x0f | 0x1b | 0x1c
    )
}

impl PacketSink for ResponseSink<'_> {
    /// A chunk ending in exactly one uncaptured bare header is taken to be the success answer
    /// of the next outstanding request when only a success could look like that (the NoOp
    /// closing a quiet multi-get whose hits filled the capture is the common case).
    fn unknown_tail(&mut self, header_prefix: &[u8], rest: u64, ts: u64) -> bool {
        let Some((Family::Binary, opcode, opaque)) = self.pairing.next_answer() else {
            return false;
        };
        let consistent = header_prefix.first().is_none_or(|&m| m == RESPONSE_MAGIC)
            && header_prefix.get(1).is_none_or(|&op| op == opcode);
        if header_prefix.len() as u64 + rest != HEADER_LEN as u64
            || !consistent
            || !success_is_bare_header(opcode)
        {
            return false;
        }
        let resp = Response {
            kind: RespKind::Binary {
                opcode,
                status: 0,
                more: false,
            },
            ts_ns: ts,
            bytes: HEADER_LEN as u64,
            key: None,
            key_truncated: false,
            opaque,
            value_len: None,
            value_head: None,
            head_follows: false,
            error_text: None,
        };
        self.pairing.respond(&resp, self.out);
        true
    }

    fn packet(
        &mut self,
        header: &Header,
        key: &[u8],
        key_truncated: bool,
        value_head: Option<ValueHead>,
        start_ts: u64,
        _end_ts: u64,
    ) {
        // Only a successful get carries a value; failures carry a message.
        let hit = header.status == 0 && is_retrieval_opcode(header.opcode);
        let resp = Response {
            kind: RespKind::Binary {
                opcode: header.opcode,
                status: header.status,
                more: header.opcode == 0x10 && header.key_len > 0,
            },
            ts_ns: start_ts,
            bytes: HEADER_LEN as u64 + u64::from(header.body_len),
            key: (header.key_len > 0).then_some(key),
            key_truncated,
            opaque: Some(u64::from(header.opaque)),
            value_len: hit.then(|| value_len(header.value_len())).flatten(),
            value_head: value_head.filter(|_| hit),
            head_follows: false,
            error_text: None,
        };
        self.pairing.respond(&resp, self.out);
    }

    fn lost(&mut self, ts: u64) {
        self.pairing.lose_responses(ts, self.out);
        push_error(
            self.out,
            DecodeErrorReason::TruncatedCapture,
            Direction::ServerToClient,
            ts,
        );
    }

    fn garbage(&mut self, ts: u64) {
        push_error(
            self.out,
            DecodeErrorReason::Garbage,
            Direction::ServerToClient,
            ts,
        );
    }
}
