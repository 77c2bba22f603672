//! The classic text protocol: request and response lines, plus the sinks that connect the
//! line framer to pairing for both directions. Meta commands share the framing and are
//! parsed in `meta.rs`.

use super::lines::{LineOutcome, LineSink};
use super::meta;
use super::model::{
    Command, DecodeErrorReason, Decoded, Direction, KestrelOptions, ValueHead, KEY_CAPACITY,
};
use super::pairing::{
    push_error, value_len, Family, LineCode, MetaCode, Pairing, QueueIntent, RequestInfo, RespKind,
    Response,
};
use super::{DecoderConfig, ErrorText};

/// Space-separated tokens, as memcached splits them.
pub(crate) fn tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b' ').filter(|t| !t.is_empty())
}

pub(crate) fn parse_u64(token: &[u8]) -> Option<u64> {
    if token.is_empty() || token.len() > 20 {
        return None;
    }
    let mut value = 0u64;
    for &b in token {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Admin commands that are framed as one line answered by one line, reported as "other".
const OTHER_COMMANDS: &[&[u8]] = &[
    b"slabs",
    b"lru",
    b"lru_crawler",
    b"cache_memlimit",
    b"shutdown",
    b"misbehave",
    b"debugtime",
    b"extstore",
    b"watch",
    // Kestrel/Starling queue administration.
    b"flush",
    b"reload",
    b"dump_stats",
    b"confirm",
];

const REQUEST_WORDS: &[&[u8]] = &[
    b"get",
    b"gets",
    b"gat",
    b"gats",
    b"set",
    b"add",
    b"replace",
    b"append",
    b"prepend",
    b"cas",
    b"delete",
    b"incr",
    b"decr",
    b"touch",
    b"stats",
    b"version",
    b"verbosity",
    b"flush_all",
    b"quit",
    b"mg",
    b"ms",
    b"md",
    b"ma",
    b"mn",
    b"me",
];

const RESPONSE_WORDS: &[&[u8]] = &[
    b"VALUE",
    b"END",
    b"STORED",
    b"NOT_STORED",
    b"EXISTS",
    b"NOT_FOUND",
    b"DELETED",
    b"TOUCHED",
    b"OK",
    b"ERROR",
    b"CLIENT_ERROR",
    b"SERVER_ERROR",
    b"STAT",
    b"VERSION",
    b"RESET",
    b"HD",
    b"VA",
    b"EN",
    b"NF",
    b"NS",
    b"EX",
    b"MN",
    b"ME",
];

/// Whether `bytes` begins with an incr/decr answer: digits, optional padding spaces, "\r\n".
fn starts_with_number_line(bytes: &[u8]) -> bool {
    let digits = bytes
        .iter()
        .take(21)
        .take_while(|b| b.is_ascii_digit())
        .count();
    let rest = &bytes[digits..];
    let spaces = rest.iter().take(21).take_while(|&&b| b == b' ').count();
    digits > 0 && rest[spaces..].starts_with(b"\r\n")
}

/// Whether `bytes` begins with one of `words` followed by a separator (which must be visible).
fn starts_with_word(bytes: &[u8], words: &[&[u8]]) -> bool {
    let end = bytes
        .iter()
        .take(16)
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n');
    match end {
        Some(end) => words.contains(&&bytes[..end]),
        None => false,
    }
}

/// Kestrel's `<queue>/opt/opt` key syntax: the queue name and the parsed options.
pub(crate) fn split_queue_key(key: &[u8]) -> (&[u8], KestrelOptions) {
    let mut parts = key.split(|&b| b == b'/');
    let name = parts.next().unwrap_or(key);
    let mut options = KestrelOptions::default();
    for part in parts {
        match part {
            b"open" => options.open = true,
            b"close" => options.close = true,
            b"abort" => options.abort = true,
            b"peek" => options.peek = true,
            _ => match part.strip_prefix(b"t=").and_then(parse_u64) {
                Some(ms) => options.timeout_ms = Some(u32::try_from(ms).unwrap_or(u32::MAX)),
                None => options.unknown_option = true,
            },
        }
    }
    (name, options)
}

/// Whether the last token of a possibly cut line is complete.
fn last_token_complete(line: &[u8], truncated: bool) -> bool {
    !truncated || line.ends_with(b" ")
}

/// Whether `token` (a subslice of `line`) is the line's last token.
fn is_last_token(line: &[u8], token: &[u8]) -> bool {
    let line_end = line.as_ptr() as usize + line.len();
    token.as_ptr() as usize + token.len() == line_end
}

/// Feeds the client's byte stream (requests) into pairing.
pub(crate) struct RequestSink<'a> {
    pub pairing: &'a mut Pairing,
    /// A storage request waiting for the end of its data block.
    pub inflight: &'a mut Option<RequestInfo>,
    pub config: &'a DecoderConfig,
    pub out: &'a mut Vec<Decoded>,
    /// TCP sequence number of stream offset 0, when known.
    pub seq_base: Option<u32>,
    /// TCP sequence number of the current line's first byte.
    pub seq: Option<u32>,
    /// Of the bytes past a cut request line, how many the cut request itself may still hold
    /// (the rest of its line, a storage command's data block): more than that were requests
    /// after it, lost with the capture.
    pub cut_claim: u64,
}

/// What may follow the cut in a cut request line: the rest of a key and a few more tokens.
const CUT_LINE_ROOM: u64 = KEY_CAPACITY as u64 + 64;

/// How a request line was understood.
enum Parsed {
    /// Submitted (or, for storage commands, parked until its data block ends).
    Done(LineOutcome),
    /// Not a command.
    NotACommand,
}

impl RequestSink<'_> {
    fn error(&mut self, reason: DecodeErrorReason, ts: u64) {
        push_error(self.out, reason, Direction::ClientToServer, ts);
    }

    /// Parses one request line. `truncated` means the line was cut (capture or length limit):
    /// the last token may be incomplete and framing after it is the caller's concern;
    /// `unread`: bytes of the line past `line` that went unread (`u64::MAX`: unknown how many);
    /// a get may have had keys among them.
    fn parse(
        &mut self,
        line: &[u8],
        wire_len: u64,
        ts: u64,
        truncated: bool,
        unread: u64,
    ) -> Parsed {
        let mut words = tokens(line);
        let Some(word) = words.next() else {
            return Parsed::NotACommand;
        };
        if truncated && line.len() == word.len() {
            // Only part of the command word is known.
            return Parsed::NotACommand;
        }
        let complete_tail = last_token_complete(line, truncated);
        let command = match word {
            b"get" => Command::Get,
            b"gets" => Command::Gets,
            b"gat" => Command::Gat,
            b"gats" => Command::Gats,
            b"set" => Command::Set,
            b"add" => Command::Add,
            b"replace" => Command::Replace,
            b"append" => Command::Append,
            b"prepend" => Command::Prepend,
            b"cas" => Command::Cas,
            b"delete" => Command::Delete,
            b"incr" => Command::Incr,
            b"decr" => Command::Decr,
            b"touch" => Command::Touch,
            b"stats" => Command::Stats,
            b"version" => Command::Version,
            b"verbosity" => Command::Verbosity,
            b"flush_all" => Command::FlushAll,
            b"quit" => Command::Quit,
            b"mg" | b"ms" | b"md" | b"ma" | b"mn" | b"me" => {
                return self.parse_meta(word, words, wire_len, ts, complete_tail, truncated);
            }
            _ if OTHER_COMMANDS.contains(&word) => Command::Other,
            _ => return Parsed::NotACommand,
        };
        let mut req = RequestInfo::new(command, ts, wire_len);
        req.seq = self.seq;
        match command {
            Command::Get | Command::Gets | Command::Gat | Command::Gats => {
                if matches!(command, Command::Gat | Command::Gats) {
                    words.next(); // exptime
                }
                let mut first_options = None;
                let mut keys = words.peekable();
                // What the unread bytes may hold besides further keys: the terminator, and
                // the rest of a key the cut went through.
                let mut tail_room = 2;
                while let Some(key) = keys.next() {
                    let cut = keys.peek().is_none() && !complete_tail;
                    if cut {
                        tail_room += KEY_CAPACITY.saturating_sub(key.len()) as u64;
                    }
                    if self.config.queue_mode {
                        let (name, options) = split_queue_key(key);
                        first_options.get_or_insert(options);
                        self.pairing
                            .stage_key(name, cut && name.len() == key.len(), ts, self.out);
                    } else {
                        self.pairing.stage_key(key, cut, ts, self.out);
                    }
                }
                if unread > tail_room {
                    self.pairing.stage_cut();
                }
                self.cut_claim = tail_room;
                if self.config.queue_mode {
                    req.queue = Some(QueueIntent::Fetch(first_options.unwrap_or_default()));
                }
            }
            Command::Set
            | Command::Add
            | Command::Replace
            | Command::Append
            | Command::Prepend
            | Command::Cas => {
                let mut args: [&[u8]; 6] = [&[]; 6];
                let mut count = 0;
                for token in words.by_ref().take(6) {
                    args[count] = token;
                    count += 1;
                }
                let key = args[0];
                if count > 0 {
                    self.pairing
                        .stage_key(key, count == 1 && !complete_tail, ts, self.out);
                }
                if self.config.queue_mode && command == Command::Set {
                    req.queue = Some(QueueIntent::Enqueue);
                }
                let base = if command == Command::Cas { 5 } else { 4 };
                req.noreply = count > base && args[base] == b"noreply";
                // Cut before its `noreply` would have been complete.
                req.maybe_silent = truncated
                    && !req.noreply
                    && (count <= base || (count == base + 1 && !complete_tail));
                let data_len = if count >= base && (count > 4 || complete_tail) {
                    parse_u64(args[3]).filter(|&n| n <= self.config.max_value_len)
                } else {
                    None
                };
                req.value_len = data_len.and_then(value_len);
                // A line cut before its length: its value is taken to be small, as in the
                // batches of sets the capture cuts.
                self.cut_claim = CUT_LINE_ROOM + data_len.map_or(0, |n| n + 2);
                match data_len {
                    Some(n) if !truncated => {
                        req.bytes = wire_len + n + 2;
                        *self.inflight = Some(req);
                        return Parsed::Done(LineOutcome::Data(n + 2));
                    }
                    Some(_) => {}
                    None if truncated => {}
                    None => {
                        // The server will reject it, but where its data block ends is unknown.
                        self.error(DecodeErrorReason::Malformed, ts);
                    }
                }
            }
            Command::Delete | Command::Incr | Command::Decr | Command::Touch => {
                let mut last = None;
                let mut count = 0;
                for token in words {
                    if count == 0 {
                        self.pairing.stage_key(
                            token,
                            !complete_tail && is_last_token(line, token),
                            ts,
                            self.out,
                        );
                    }
                    last = Some(token);
                    count += 1;
                }
                req.noreply = count > 1 && last == Some(b"noreply".as_slice());
            }
            Command::Verbosity | Command::FlushAll | Command::Other => {
                req.noreply = words.last() == Some(b"noreply".as_slice());
            }
            // The server closes the connection without answering.
            Command::Quit => req.noreply = true,
            _ => {}
        }
        self.pairing.submit(req, self.out);
        Parsed::Done(LineOutcome::Continue)
    }

    fn parse_meta<'l>(
        &mut self,
        word: &[u8],
        words: impl Iterator<Item = &'l [u8]>,
        wire_len: u64,
        ts: u64,
        complete_tail: bool,
        truncated: bool,
    ) -> Parsed {
        let request = meta::parse_request(word, words, complete_tail);
        let mut req = RequestInfo::new(request.command, ts, wire_len);
        req.seq = self.seq;
        req.quiet = request.quiet;
        req.opaque = request.opaque;
        if let Some(key) = request.key {
            self.pairing
                .stage_key(key.as_bytes(), key.is_truncated(), ts, self.out);
        }
        if request.command == Command::MetaSet {
            req.value_len = request.data_len.and_then(value_len);
            self.cut_claim = CUT_LINE_ROOM + request.data_len.map_or(0, |n| n + 2);
            match request.data_len.filter(|&n| n <= self.config.max_value_len) {
                Some(n) if !truncated => {
                    req.bytes = wire_len + n + 2;
                    *self.inflight = Some(req);
                    return Parsed::Done(LineOutcome::Data(n + 2));
                }
                None if !truncated => self.error(DecodeErrorReason::Malformed, ts),
                _ => {}
            }
        }
        self.pairing.submit(req, self.out);
        Parsed::Done(LineOutcome::Continue)
    }

    /// A request line we could only partly see: decode it, then mark the unknown remainder.
    /// `unread`: the line's bytes past `prefix` (`u64::MAX`: unknown how many).
    fn cut_line(&mut self, prefix: &[u8], wire_len: u64, ts: u64, unread: u64) {
        self.cut_claim = CUT_LINE_ROOM;
        let line = prefix.strip_suffix(b"\r").unwrap_or(prefix);
        if let Parsed::NotACommand = self.parse(line, wire_len, ts, true, unread) {
            self.pairing.unstage();
        }
    }
}

impl LineSink for RequestSink<'_> {
    fn line_starts_at(&mut self, stream_offset: u64) {
        self.seq = self
            .seq_base
            .map(|base| base.wrapping_add(stream_offset as u32));
    }

    fn line(&mut self, line: &[u8], wire_len: usize, _start_ts: u64, end_ts: u64) -> LineOutcome {
        match self.parse(line, wire_len as u64, end_ts, false, 0) {
            Parsed::Done(outcome) => outcome,
            Parsed::NotACommand => {
                self.pairing.unstage();
                LineOutcome::Garbage
            }
        }
    }

    fn truncated_line(&mut self, prefix: &[u8], rest: u64, _start_ts: u64, end_ts: u64) -> bool {
        // The uncaptured rest belongs to this line as far as it can (one command per send is
        // the norm); the marker guards against it having held further commands, and more than
        // the cut request can hold did.
        self.cut_line(prefix, prefix.len() as u64 + rest, end_ts, rest);
        if rest > self.cut_claim {
            self.pairing.lose_requests(end_ts, None, self.out);
        } else {
            self.pairing.push_marker(end_ts);
        }
        self.error(DecodeErrorReason::TruncatedCapture, end_ts);
        false
    }

    fn oversized_line(&mut self, prefix: &[u8], _start_ts: u64, end_ts: u64) {
        self.cut_line(prefix, prefix.len() as u64, end_ts, u64::MAX);
        self.error(DecodeErrorReason::LineTooLong, end_ts);
    }

    fn unknown_tail(&mut self, _len: u64, ts: u64) -> bool {
        self.lost(ts);
        false
    }

    fn lost(&mut self, ts: u64) {
        self.pairing.lose_requests(ts, None, self.out);
        self.error(DecodeErrorReason::TruncatedCapture, ts);
    }

    fn data_head(&mut self, head: ValueHead) {
        if let Some(req) = self.inflight.as_mut() {
            req.value_head = Some(head);
        }
    }

    fn data_done(&mut self, ts: u64) {
        if let Some(mut req) = self.inflight.take() {
            req.ts_ns = ts;
            self.pairing.submit(req, self.out);
        }
    }

    fn garbage(&mut self, ts: u64) {
        // The garbage may have been a request we could not read; its answer must not be
        // paired with the next request.
        self.pairing.push_marker(ts);
        self.error(DecodeErrorReason::Garbage, ts);
    }

    fn is_resync_point(bytes: &[u8]) -> bool {
        starts_with_word(bytes, REQUEST_WORDS)
    }
}

/// Feeds the server's byte stream (responses) into pairing.
pub(crate) struct ResponseSink<'a> {
    pub pairing: &'a mut Pairing,
    pub out: &'a mut Vec<Decoded>,
    /// Whether the framer reports values' first bytes ([`DecoderConfig::value_heads`]).
    pub value_heads: bool,
}

impl ResponseSink<'_> {
    fn error(&mut self, reason: DecodeErrorReason, ts: u64) {
        push_error(self.out, reason, Direction::ServerToClient, ts);
    }

    fn respond(&mut self, kind: RespKind, ts: u64, bytes: u64) {
        self.answer(kind, ts, bytes, None);
    }

    fn answer(&mut self, kind: RespKind, ts: u64, bytes: u64, error_text: Option<ErrorText>) {
        let resp = Response {
            kind,
            ts_ns: ts,
            bytes,
            key: None,
            key_truncated: false,
            opaque: None,
            value_len: None,
            value_head: None,
            head_follows: false,
            error_text,
        };
        self.pairing.respond(&resp, self.out);
    }

    /// Decodes one response line; `rest` is the number of uncaptured bytes after a cut line.
    fn parse(&mut self, line: &[u8], wire_len: u64, ts: u64, truncated: bool) -> LineOutcome {
        let mut words = tokens(line);
        let Some(word) = words.next() else {
            return LineOutcome::Garbage;
        };
        if truncated && line.len() == word.len() {
            return LineOutcome::Garbage;
        }
        let code = match word {
            b"VALUE" => {
                let complete_tail = last_token_complete(line, truncated);
                let Some(key) = words.next() else {
                    return LineOutcome::Garbage;
                };
                let key_cut = !complete_tail && is_last_token(line, key);
                let _flags = words.next();
                let data_len = words.next().and_then(parse_u64);
                let (bytes, outcome) = match data_len {
                    Some(n) if !truncated => (wire_len + n + 2, LineOutcome::Data(n + 2)),
                    None if !truncated => return LineOutcome::Garbage,
                    _ => (wire_len, LineOutcome::Continue),
                };
                let resp = Response {
                    kind: RespKind::Value,
                    ts_ns: ts,
                    bytes,
                    key: Some(key),
                    key_truncated: key_cut,
                    opaque: None,
                    value_len: data_len.and_then(value_len),
                    // The item stays open until END: its head is attached when it comes.
                    value_head: None,
                    head_follows: false,
                    error_text: None,
                };
                self.pairing.respond(&resp, self.out);
                return outcome;
            }
            b"END" => {
                self.respond(RespKind::End, ts, wire_len);
                return LineOutcome::Continue;
            }
            b"STAT" => {
                self.respond(RespKind::Stat, ts, wire_len);
                return LineOutcome::Continue;
            }
            b"STORED" => LineCode::Stored,
            b"NOT_STORED" => LineCode::NotStored,
            b"EXISTS" => LineCode::Exists,
            b"NOT_FOUND" => LineCode::NotFound,
            b"DELETED" => LineCode::Deleted,
            b"TOUCHED" => LineCode::Touched,
            b"OK" => LineCode::Ok,
            b"RESET" => LineCode::Reset,
            b"VERSION" => LineCode::Version,
            b"ERROR" => LineCode::Error,
            b"CLIENT_ERROR" => LineCode::ClientError,
            b"SERVER_ERROR" => LineCode::ServerError,
            [b'0'..=b'9', ..] if word.iter().all(u8::is_ascii_digit) => LineCode::Number,
            b"HD" | b"VA" | b"EN" | b"NF" | b"NS" | b"EX" | b"MN" | b"ME" => {
                let tail_cut = !last_token_complete(line, truncated);
                let Some(parsed) = meta::parse_response(word, words, tail_cut) else {
                    return LineOutcome::Garbage;
                };
                let mut decoded = [0u8; KEY_CAPACITY];
                let key = parsed.key(&mut decoded);
                let data_len = parsed.data_len.filter(|_| !truncated);
                let resp = Response {
                    kind: RespKind::Meta(parsed.code),
                    ts_ns: ts,
                    bytes: wire_len + data_len.map_or(0, |n| n + 2),
                    key: key.map(|(k, _)| k),
                    key_truncated: key.is_some_and(|(_, cut)| cut),
                    opaque: parsed.opaque,
                    value_len: parsed.data_len.and_then(value_len),
                    value_head: None,
                    // The answer is complete, but its value's first bytes come next.
                    head_follows: self.value_heads && data_len.is_some(),
                    error_text: None,
                };
                self.pairing.respond(&resp, self.out);
                return match data_len {
                    Some(n) => LineOutcome::Data(n + 2),
                    None => LineOutcome::Continue,
                };
            }
            _ => return self.unknown_word(word, ts, wire_len),
        };
        let error_text = matches!(
            code,
            LineCode::Error | LineCode::ClientError | LineCode::ServerError
        )
        .then(|| {
            let at = line.iter().position(|&b| b != b' ').unwrap_or(0) + word.len();
            ErrorText::from_words(line.get(at..).unwrap_or_default(), truncated)
        });
        self.answer(RespKind::Line(code), ts, wire_len, error_text);
        LineOutcome::Continue
    }

    fn unknown_word(&mut self, word: &[u8], ts: u64, wire_len: u64) -> LineOutcome {
        // Stats sub-listings and admin answers use other words; binary junk is garbage.
        if word.iter().all(|b| b.is_ascii_graphic()) {
            self.respond(RespKind::Line(LineCode::Unknown), ts, wire_len);
            LineOutcome::Continue
        } else {
            LineOutcome::Garbage
        }
    }
}

/// Fixed response lines by the family of request they answer, for recognising a chunk's
/// uncaptured last line by its length (and whatever of it was captured).
fn fixed_answers(family: Family) -> &'static [(&'static [u8], RespKind)] {
    use LineCode as L;
    use MetaCode as M;
    const END: (&[u8], RespKind) = (b"END\r\n", RespKind::End);
    const NOT_FOUND: (&[u8], RespKind) = (b"NOT_FOUND\r\n", RespKind::Line(L::NotFound));
    const HD: (&[u8], RespKind) = (b"HD\r\n", RespKind::Meta(M::Hd));
    const NF: (&[u8], RespKind) = (b"NF\r\n", RespKind::Meta(M::Nf));
    const NS: (&[u8], RespKind) = (b"NS\r\n", RespKind::Meta(M::Ns));
    const EX: (&[u8], RespKind) = (b"EX\r\n", RespKind::Meta(M::Ex));
    match family {
        Family::Retrieval | Family::Stats => &[END],
        Family::Storage => &[
            (b"STORED\r\n", RespKind::Line(L::Stored)),
            (b"NOT_STORED\r\n", RespKind::Line(L::NotStored)),
            (b"EXISTS\r\n", RespKind::Line(L::Exists)),
            NOT_FOUND,
        ],
        Family::Delete => &[(b"DELETED\r\n", RespKind::Line(L::Deleted)), NOT_FOUND],
        Family::Touch => &[(b"TOUCHED\r\n", RespKind::Line(L::Touched)), NOT_FOUND],
        Family::Arith => &[NOT_FOUND],
        Family::OkLine => &[(b"OK\r\n", RespKind::Line(L::Ok))],
        Family::MetaGet | Family::MetaDebug => &[HD, (b"EN\r\n", RespKind::Meta(M::En))],
        Family::MetaSet => &[HD, NS, EX, NF],
        Family::MetaDelete => &[HD, NF, EX],
        Family::MetaArith => &[HD, NF, NS, EX],
        Family::MetaNoop => &[(b"MN\r\n", RespKind::Meta(M::Mn))],
        _ => &[],
    }
}

impl ResponseSink<'_> {
    /// The uncaptured end of a chunk (`prefix` captured, `rest` not) is taken to be the one
    /// fixed line that the next outstanding request can get with exactly that length, if
    /// there is exactly one such line. Chunks usually end where a response ends, and this
    /// covers the common cases: END after a large value, MN after quiet gets.
    fn infer_tail(&mut self, prefix: &[u8], rest: u64, ts: u64) -> bool {
        let Some((family, _, _)) = self.pairing.next_answer() else {
            return false;
        };
        let len = prefix.len() as u64 + rest;
        let mut candidates = fixed_answers(family)
            .iter()
            .filter(|(line, _)| line.len() as u64 == len && line.starts_with(prefix));
        match (candidates.next(), candidates.next()) {
            (Some(&(_, kind)), None) => {
                self.respond(kind, ts, len);
                true
            }
            _ => false,
        }
    }
}

impl LineSink for ResponseSink<'_> {
    fn line(&mut self, line: &[u8], wire_len: usize, start_ts: u64, _end_ts: u64) -> LineOutcome {
        self.parse(line, wire_len as u64, start_ts, false)
    }

    fn truncated_line(&mut self, prefix: &[u8], rest: u64, start_ts: u64, end_ts: u64) -> bool {
        if self.infer_tail(prefix, rest, start_ts) {
            return true;
        }
        let line = prefix.strip_suffix(b"\r").unwrap_or(prefix);
        // What the prefix says (a hit, an error) is still true; only the rest is unknown.
        self.parse(line, prefix.len() as u64 + rest, start_ts, true);
        self.lost(end_ts);
        false
    }

    fn oversized_line(&mut self, _prefix: &[u8], _start_ts: u64, end_ts: u64) {
        self.error(DecodeErrorReason::LineTooLong, end_ts);
    }

    fn unknown_tail(&mut self, len: u64, ts: u64) -> bool {
        if self.infer_tail(b"", len, ts) {
            return true;
        }
        self.lost(ts);
        false
    }

    fn lost(&mut self, ts: u64) {
        self.pairing.lose_responses(ts, self.out);
        self.error(DecodeErrorReason::TruncatedCapture, ts);
    }

    fn data_done(&mut self, _ts: u64) {
        self.pairing.value_done(self.out);
    }

    fn data_head(&mut self, head: ValueHead) {
        self.pairing.value_head(head, self.out);
    }

    fn garbage(&mut self, ts: u64) {
        self.error(DecodeErrorReason::Garbage, ts);
    }

    fn is_resync_point(bytes: &[u8]) -> bool {
        starts_with_word(bytes, RESPONSE_WORDS) || starts_with_number_line(bytes)
    }
}
