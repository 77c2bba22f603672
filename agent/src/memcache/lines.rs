//! Line framing for the text protocol (classic and meta commands), used for both directions.
//!
//! Framing follows the full byte counts of each payload even when only a prefix was captured:
//! data blocks are skipped by their declared length and never searched for terminators, so a
//! value that happens to contain "\r\nEND\r\n" cannot derail the decoder. Only a line itself
//! must be visible; when it is not, the rest of that payload is unknown and the framer
//! resynchronises on a later payload.
//!
//! The first bytes of each data block ([`VALUE_HEAD_LEN`], which the kernel's capture copies)
//! are handed to the sink as the value's [`ValueHead`], also when the block starts in a later
//! chunk than its line or is split over chunks; a head with any byte not captured is not.

use super::model::{ValueHead, VALUE_HEAD_LEN};

/// What the sink wants after a complete line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineOutcome {
    Continue,
    /// A data block of this many bytes (including its "\r\n") follows the line.
    Data(u64),
    /// The line is not the protocol: skip to the next plausible line start.
    Garbage,
}

pub(crate) trait LineSink {
    /// A complete line without its terminator; `wire_len` includes it. `start_ts` is the
    /// timestamp of the chunk holding the line's first byte, `end_ts` of its last byte.
    fn line(&mut self, line: &[u8], wire_len: usize, start_ts: u64, end_ts: u64) -> LineOutcome;
    /// A line whose end lies beyond the captured prefix of its payload, followed by `rest`
    /// uncaptured bytes. Returns true when the sink can account for them exactly (framing
    /// continues); otherwise it decodes what it can, reports the loss and returns false.
    fn truncated_line(&mut self, prefix: &[u8], rest: u64, start_ts: u64, end_ts: u64) -> bool;
    /// A line longer than the limit, decoded from its prefix; framing resumes after its end.
    fn oversized_line(&mut self, prefix: &[u8], start_ts: u64, end_ts: u64);
    /// `len` uncaptured bytes start at a line boundary. Returns true when the sink can account
    /// for them exactly (framing continues); otherwise it reports the loss and returns false.
    fn unknown_tail(&mut self, len: u64, ts: u64) -> bool;
    /// Framing was lost in the middle of a line that was already handled.
    fn lost(&mut self, ts: u64);
    /// The data block announced by the last `LineOutcome::Data` ended.
    fn data_done(&mut self, ts: u64);
    /// The first bytes of the data block announced by the last `LineOutcome::Data` (all of
    /// them when it is shorter than [`VALUE_HEAD_LEN`]), once all were seen.
    fn data_head(&mut self, _head: ValueHead) {}
    /// Entering resynchronisation because of garbage.
    fn garbage(&mut self, ts: u64);
    /// Whether `bytes` starts with a command (or response) this side may begin a line with.
    fn is_resync_point(bytes: &[u8]) -> bool;
    /// The line handed over next (complete, truncated or oversized) starts at this offset of
    /// the direction's byte stream ([`TextFramer::fed`] counts it).
    fn line_starts_at(&mut self, _stream_offset: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Line,
    Skip {
        remaining: u64,
    },
    /// Inside an oversized line whose prefix was already handled.
    DiscardLine,
    Resync,
}

/// Largest line buffer a stream keeps between lines: ordinary lines that a record boundary
/// splits fit, and reuse it without allocating.
const KEPT_LINE_CAPACITY: usize = 1024;

/// Longest line a stream holds across chunks unless it is a multi-key get. Only those grow long
/// (memcached itself closes a connection whose line passes 2 KiB for anything else): holding
/// every stream's unterminated bytes up to the whole limit would let garbage on a watched port
/// keep 64 KiB per direction of every connection.
const HELD_LINE_LIMIT: usize = 16 * 1024;

/// Whether a line starting with `head` may be held up to the whole line limit: the text
/// commands that carry many keys (`get`, `gets`, `gat`, `gats`).
fn may_grow_long(head: &[u8]) -> bool {
    let word_end = head.iter().position(|&b| b == b' ').unwrap_or(head.len());
    matches!(&head[..word_end], b"get" | b"gets" | b"gat" | b"gats") && word_end < head.len()
}

#[derive(Debug)]
pub(crate) struct TextFramer {
    state: State,
    /// A line that started in an earlier, fully captured chunk. Never longer than `max_line`.
    partial: Vec<u8>,
    partial_ts: u64,
    /// Stream offset of the held partial line's first byte.
    partial_start: u64,
    /// Bytes of the stream fed before the current chunk.
    fed: u64,
    max_line: usize,
    /// The head of the data block being skipped, and how many of its bytes are still wanted
    /// (0: complete and handed over, or given up because a byte was not captured).
    head: ValueHead,
    head_wanted: u8,
    value_heads: bool,
}

/// Position of the first '\n'. Protocol lines are short, and for short haystacks a plain scan
/// beats memchr's setup; memchr takes over for long stretches (oversized lines, garbage).
fn find_newline(window: &[u8]) -> Option<usize> {
    const SHORT: usize = 64;
    let head = &window[..window.len().min(SHORT)];
    match head.iter().position(|&b| b == b'\n') {
        Some(i) => Some(i),
        None if window.len() > SHORT => memchr::memchr(b'\n', &window[SHORT..]).map(|i| i + SHORT),
        None => None,
    }
}

fn strip_terminator(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The first place at or after `from` where a line starts (the chunk start counts, as sends
/// usually begin with a command) and `is_point` accepts the bytes.
fn find_resync(captured: &[u8], from: usize, is_point: fn(&[u8]) -> bool) -> Option<usize> {
    let rest = captured.get(from..)?;
    let starts_line = from == 0 || captured.get(from - 1) == Some(&b'\n');
    if starts_line && is_point(rest) {
        return Some(from);
    }
    memchr::memchr_iter(b'\n', rest)
        .map(|i| from + i + 1)
        .find(|&start| is_point(&captured[start..]))
}

impl TextFramer {
    pub fn new(max_line: usize, value_heads: bool) -> TextFramer {
        TextFramer {
            state: State::Line,
            partial: Vec::new(),
            partial_ts: 0,
            partial_start: 0,
            fed: 0,
            max_line,
            head: ValueHead::default(),
            head_wanted: 0,
            value_heads,
        }
    }

    /// A data block of `n` bytes (its "\r\n" included) follows the line just handed over.
    fn start_data<S: LineSink>(&mut self, n: u64, sink: &mut S) {
        self.state = State::Skip { remaining: n };
        if !self.value_heads {
            return;
        }
        self.head = ValueHead::default();
        self.head_wanted = n.saturating_sub(2).min(VALUE_HEAD_LEN as u64) as u8;
        if self.head_wanted == 0 {
            sink.data_head(self.head);
        }
    }

    /// Collects the data block's head from the bytes at `pos` of the chunk (`cap` of them
    /// captured, `total` in all).
    fn collect_head<S: LineSink>(
        &mut self,
        captured: &[u8],
        pos: usize,
        total: usize,
        sink: &mut S,
    ) {
        let want = usize::from(self.head_wanted).min(total - pos);
        let seen = captured.len().saturating_sub(pos).min(want);
        if seen < want {
            // A byte of the head was not captured: no fingerprint for this value.
            self.head_wanted = 0;
            return;
        }
        self.head.extend(&captured[pos..pos + want]);
        self.head_wanted -= want as u8;
        if self.head_wanted == 0 {
            sink.data_head(self.head);
        }
    }

    /// Bytes the line buffer holds room for (what a stream keeps between lines).
    pub fn buffer_capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Bytes of the stream fed so far (every chunk's full length, captured or not).
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Stream offset of the first byte of a line that continues at `pos` of the current chunk.
    fn line_start(&self, pos: usize) -> u64 {
        if self.partial.is_empty() {
            self.fed + pos as u64
        } else {
            self.partial_start
        }
    }

    /// After lost events nothing about the current position is known.
    pub fn reset_to_resync(&mut self) {
        let held = std::mem::take(&mut self.partial);
        self.keep_buffer(held);
        self.head_wanted = 0;
        self.state = State::Resync;
    }

    /// Feeds one chunk; returns how many bytes could not be decoded (skipped while
    /// resynchronising or lost after a truncated line).
    pub fn feed<S: LineSink>(
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

    fn feed_chunk<S: LineSink>(
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
                State::Skip { remaining } => {
                    if self.head_wanted > 0 {
                        self.collect_head(captured, pos, total, sink);
                    }
                    let available = (total - pos) as u64;
                    if remaining > available {
                        self.state = State::Skip {
                            remaining: remaining - available,
                        };
                        pos = total;
                        continue;
                    }
                    let end = pos + remaining as usize;
                    // The block's own "\r\n" is checked when it is visible: a mismatch means
                    // the declared length was wrong and framing is off.
                    let terminator_ok =
                        remaining < 2 || end > cap || &captured[end - 2..end] == b"\r\n";
                    self.state = State::Line;
                    pos = end;
                    sink.data_done(ts);
                    if !terminator_ok {
                        sink.garbage(ts);
                        self.state = State::Resync;
                        pos = end - 2;
                    }
                }
                State::Line => {
                    if pos >= cap {
                        let rest = (total - pos) as u64;
                        if !self.partial.is_empty() {
                            sink.line_starts_at(self.partial_start);
                            let prefix = std::mem::take(&mut self.partial);
                            let explained = sink.truncated_line(&prefix, rest, self.partial_ts, ts);
                            self.keep_buffer(prefix);
                            if !explained {
                                self.state = State::Resync;
                                skipped += rest;
                            }
                        } else if !sink.unknown_tail(rest, ts) {
                            self.state = State::Resync;
                            skipped += rest;
                        }
                        pos = total;
                        continue;
                    }
                    let window = &captured[pos..];
                    let line_start = self.line_start(pos);
                    match find_newline(window) {
                        Some(i) => {
                            sink.line_starts_at(line_start);
                            let held = self.partial.len();
                            let outcome = self.complete_line(&window[..=i], ts, sink);
                            pos += i + 1;
                            match outcome {
                                LineOutcome::Continue => {}
                                LineOutcome::Data(n) => self.start_data(n, sink),
                                LineOutcome::Garbage => {
                                    sink.garbage(ts);
                                    skipped += (held + i + 1) as u64;
                                    self.state = State::Resync;
                                }
                            }
                        }
                        None if cap == total => {
                            // The line continues in the next chunk.
                            // The line's first bytes, which a chunk boundary may split.
                            let mut head = [0u8; 8];
                            let held = self.partial.len().min(head.len());
                            head[..held].copy_from_slice(&self.partial[..held]);
                            let more = (head.len() - held).min(window.len());
                            head[held..held + more].copy_from_slice(&window[..more]);
                            let limit = if may_grow_long(&head[..held + more]) {
                                self.max_line
                            } else {
                                self.max_line.min(HELD_LINE_LIMIT)
                            };
                            if self.partial.len() + window.len() > limit {
                                sink.line_starts_at(line_start);
                                let start_ts = self.start_ts(ts);
                                let mut prefix = std::mem::take(&mut self.partial);
                                let room = limit - prefix.len();
                                prefix.extend_from_slice(&window[..room.min(window.len())]);
                                sink.oversized_line(&prefix, start_ts, ts);
                                self.keep_buffer(prefix);
                                self.state = State::DiscardLine;
                            } else {
                                if self.partial.is_empty() {
                                    self.partial_ts = ts;
                                    self.partial_start = line_start;
                                }
                                self.partial.extend_from_slice(window);
                            }
                            pos = total;
                        }
                        None => {
                            // The capture ends inside this line.
                            sink.line_starts_at(line_start);
                            let start_ts = self.start_ts(ts);
                            let mut prefix = std::mem::take(&mut self.partial);
                            let room = self.max_line - prefix.len();
                            prefix.extend_from_slice(&window[..room.min(window.len())]);
                            let rest = (total - cap) as u64;
                            let explained = sink.truncated_line(&prefix, rest, start_ts, ts);
                            self.keep_buffer(prefix);
                            if !explained {
                                self.state = State::Resync;
                                skipped += rest;
                            }
                            pos = total;
                        }
                    }
                }
                State::DiscardLine => {
                    if pos >= cap {
                        sink.lost(ts);
                        self.state = State::Resync;
                        skipped += (total - pos) as u64;
                        pos = total;
                        continue;
                    }
                    match memchr::memchr(b'\n', &captured[pos..]) {
                        Some(i) => {
                            pos += i + 1;
                            self.state = State::Line;
                        }
                        None => pos = cap,
                    }
                }
                State::Resync => match find_resync(captured, pos, S::is_resync_point) {
                    Some(start) => {
                        skipped += (start - pos) as u64;
                        pos = start;
                        self.state = State::Line;
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

    fn start_ts(&self, ts: u64) -> u64 {
        if self.partial.is_empty() {
            ts
        } else {
            self.partial_ts
        }
    }

    /// `piece` ends with the line's '\n'; it is the whole line unless a partial line is held.
    fn complete_line<S: LineSink>(&mut self, piece: &[u8], ts: u64, sink: &mut S) -> LineOutcome {
        if self.partial.is_empty() {
            if piece.len() > self.max_line {
                sink.oversized_line(&piece[..self.max_line], ts, ts);
                return LineOutcome::Continue;
            }
            return sink.line(strip_terminator(piece), piece.len(), ts, ts);
        }
        let wire_len = self.partial.len() + piece.len();
        let start_ts = self.partial_ts;
        let mut line = std::mem::take(&mut self.partial);
        let outcome = if wire_len > self.max_line {
            let room = self.max_line - line.len();
            line.extend_from_slice(&piece[..room.min(piece.len())]);
            sink.oversized_line(&line, start_ts, ts);
            LineOutcome::Continue
        } else {
            line.extend_from_slice(piece);
            sink.line(strip_terminator(&line), wire_len, start_ts, ts)
        };
        self.keep_buffer(line);
        outcome
    }

    /// Takes back the line buffer once its line was handed over, emptied. A buffer that grew
    /// past [`KEPT_LINE_CAPACITY`] (a multi-key get of thousands of keys) is freed: a stream
    /// holds a long line's memory only while the line is open, so idle connections cost no
    /// more than before the limit was raised.
    fn keep_buffer(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        if buffer.capacity() > KEPT_LINE_CAPACITY {
            buffer = Vec::new();
        }
        self.partial = buffer;
    }
}
