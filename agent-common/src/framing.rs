//! Where memcache frames start and end, followed byte by byte: the one state machine the kernel's
//! capture runs on every send/receive of a captured socket, and that the agent's tests run on
//! the host.
//!
//! It records facts only: which bytes are frame headers (text and meta lines, binary 24-byte
//! headers with their extras and key) and how many body bytes follow each. Headers are copied,
//! and so are the first [`VALUE_HEAD`] bytes of each body (a value's fingerprint, e.g. to match
//! a queue message's enqueue with its dequeue); the rest of a body is jumped over by its
//! declared length, so capture cost grows with the number of frames, never with value sizes.
//! Meaning (commands, statuses, pairing) is decided in user space.
//!
//! Text lines need no knowledge of the direction: the lines that announce a body are told apart
//! by their first word (`set`/`add`/`replace`/`append`/`prepend`/`cas` and `ms` from clients,
//! `VALUE` and `VA` from servers), and each names its length in a fixed token.
//!
//! [`FrameState::scan_round`] feeds a staged piece a word at a time: runs of bytes whose only
//! effect is on the line length (keys, flags, the rest of a line after its length token) are
//! passed over up to 32 at a time (four words) by finding the next space or newline with the
//! SWAR zero-byte trick, together with the space that ends their token; a line's first word and its space are
//! taken in one go; up to eight digits of the length token are parsed at once (SWAR: a digit
//! test per byte, then three multiplies); a line's closing "\r\n" is one round; and a binary
//! header whose 24 bytes are all in the piece is read at its fixed offsets. It ends in exactly the state [`FrameState::step`]
//! byte by byte would reach wherever it matters (mode, lengths, the body and key to come).

/// [`FrameState::mode`] values.
pub mod mode {
    /// At the first byte of a frame.
    pub const FRAME_START: u8 = 0;
    /// Inside a text line.
    pub const TEXT: u8 = 1;
    /// Inside a binary 24-byte header.
    pub const BINARY_HEADER: u8 = 2;
    /// `remaining` bytes of a binary frame's extras and key follow: they are captured.
    pub const KEEP: u8 = 3;
    /// `remaining` bytes of a value body follow: the first `head` are captured, the rest
    /// skipped.
    pub const SKIP: u8 = 4;
    /// Framing was lost (a line longer than [`super::MAX_LINE`]): nothing more is captured in
    /// this call, and the next call starts afresh at a frame start.
    pub const LOST: u8 = 5;
}

/// The longest text line followed: as much as one call's capture budget
/// (`CAPTURE_BUDGET_MAX`) can copy, and all that `line_len` (u16) counts with the byte that
/// overflows it. memcached accepts multi-key gets far longer than its 2 KiB line buffer: a
/// client's `get_many` of 2,000 keys of 18 bytes is a 38 KB line, which a 16 KiB limit cut
/// (the keys past the limit went unread and their misses uncounted). A longer line loses
/// framing until the next call.
pub const MAX_LINE: u32 = u16::MAX as u32 - 1;
/// Largest declared body followed (memcached's item ceiling is 1 GiB). A larger claim is
/// treated as no body: the line is passed to user space, which calls it garbage.
pub const MAX_BODY: u64 = 1 << 30;
/// Leading bytes of each value body that are captured: with the body's length, a fingerprint
/// of the value. Bounded and fixed, so the cost per frame stays constant.
pub const VALUE_HEAD: u16 = 8;

/// Every byte 0x01 / 0x80: the SWAR constants.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// 0x80 in each byte of `chunk` that equals `byte` (exact up to the first such byte; bytes
/// after it may be marked falsely, which [`first_marked`] never looks at).
#[inline(always)]
const fn bytes_equal(chunk: u64, byte: u8) -> u64 {
    let x = chunk ^ (ONES * byte as u64);
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Words of eight bytes one round of token or line bytes may span.
const RUN_WORDS: u64 = 4;

/// Where a run of token or line bytes at `pos` stops: at the first newline (and with `spaces`
/// space), looking at up to [`RUN_WORDS`] words while the bytes are `available`; `first` is
/// its index in the first word (8: not there). At least `available` or 8 * RUN_WORDS when
/// none was seen.
#[inline(always)]
fn run_stop(first: u64, pos: u64, available: u64, spaces: bool, word: &impl Fn(u64) -> u64) -> u64 {
    let mut stop = first;
    let mut k = 1;
    while k < RUN_WORDS {
        if stop != 8 * k || stop >= available {
            break;
        }
        let chunk = word(pos + stop);
        let mut mask = bytes_equal(chunk, b'\n');
        if spaces {
            mask |= bytes_equal(chunk, b' ');
        }
        stop += first_marked(mask);
        k += 1;
    }
    stop
}

/// Index (0..8) of the lowest byte marked in `mask` (as [`bytes_equal`] marks), 8 if none.
/// No loop: the lowest mark, shifted to a 1 at its byte, times a constant whose top byte then
/// holds that byte's index.
#[inline(always)]
const fn first_marked(mask: u64) -> u64 {
    if mask == 0 {
        return 8;
    }
    let lowest = mask & mask.wrapping_neg();
    (lowest >> 7).wrapping_mul(0x0001_0203_0405_0607) >> 56
}

const REQUEST_MAGIC: u8 = 0x80;
const RESPONSE_MAGIC: u8 = 0x81;
const BINARY_HEADER_LEN: u8 = 24;

/// Flag bits in [`FrameState::flags`].
const IN_TOKEN: u8 = 1;
const NUMBER_BAD: u8 = 2;
const WORD_LONG: u8 = 4;

/// One direction of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameState {
    /// Bytes still to keep ([`mode::KEEP`]) or skip ([`mode::SKIP`]).
    pub remaining: u64,
    /// A text line's first word, up to 8 bytes shifted in.
    pub word: u64,
    /// The declared body length being read from its token.
    pub number: u64,
    /// Bytes of the current text line so far (at most [`MAX_LINE`] + 1).
    pub line_len: u16,
    /// [`mode::SKIP`]: leading body bytes still to capture (at most [`VALUE_HEAD`]).
    pub head: u16,
    /// Binary: body bytes after the extras and key.
    pub binary_rest: u32,
    pub mode: u8,
    /// Text: index of the token being read.
    pub token: u8,
    /// Text: the token that holds the body length (0: the line announces no body).
    pub length_token: u8,
    pub flags: u8,
    /// Binary: header bytes seen.
    pub header_pos: u8,
    pub extras_len: u8,
    pub key_len: u16,
}

const _: () = assert!(core::mem::size_of::<FrameState>() == 40);

/// The send and the receive side of one socket, and where each side's next call should start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFrames {
    pub send: FrameState,
    pub recv: FrameState,
    /// TCP sequence number just past the last call followed, receive then send, valid where
    /// `seq_known` has the direction's bit ([`SocketFrames::resume`]).
    pub next_seq: [u32; 2],
    pub seq_known: u8,
    pub _pad: [u8; 7],
}

impl SocketFrames {
    /// Before following a call of `len` bytes whose first byte has sequence number `first`
    /// (None: unknown). True when the call does not start where this side's last followed call
    /// ended: calls went by unfollowed (capture was off, or the sample let the connection go),
    /// so both sides' frame states are stale. Both start afresh at a frame boundary, as for a
    /// connection met for the first time, and the other side's next call is taken as it comes
    /// (its calls went by too). A receive one byte late is not such a skip: `copied_seq` counts
    /// the peer's FIN once a read consumes it.
    #[inline(always)]
    pub fn resume(&mut self, is_send: bool, first: Option<u32>, len: u32) -> bool {
        let lane = is_send as usize;
        let bit = 1u8 << lane;
        let Some(first) = first else {
            self.seq_known &= !bit;
            return false;
        };
        let expected = self.next_seq[lane & 1];
        let skipped = self.seq_known & bit != 0
            && first != expected
            && (is_send || first != expected.wrapping_add(1));
        if skipped {
            self.send = FrameState::default();
            self.recv = FrameState::default();
            self.seq_known = 0;
        }
        self.next_seq[lane & 1] = first.wrapping_add(len);
        self.seq_known |= bit;
        skipped
    }
}

const fn word(bytes: &[u8]) -> u64 {
    let mut value = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        value = (value << 8) | bytes[i] as u64;
        i += 1;
    }
    value
}

/// The token holding the body length for a line whose first word is `first` (0: no body).
#[inline(always)]
fn length_token(first: u64) -> u8 {
    const SET: u64 = word(b"set");
    const ADD: u64 = word(b"add");
    const CAS: u64 = word(b"cas");
    const REPLACE: u64 = word(b"replace");
    const APPEND: u64 = word(b"append");
    const PREPEND: u64 = word(b"prepend");
    const MS: u64 = word(b"ms");
    const VALUE: u64 = word(b"VALUE");
    const VA: u64 = word(b"VA");
    match first {
        // <cmd> <key> <flags> <exptime> <bytes> ...
        SET | ADD | CAS | REPLACE | APPEND | PREPEND => 4,
        // VALUE <key> <flags> <bytes> [<cas>]
        VALUE => 3,
        // ms <key> <datalen> <flags>*
        MS => 2,
        // VA <size> <flags>*
        VA => 1,
        _ => 0,
    }
}

#[inline(always)]
const fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

impl FrameState {
    /// Whether the bytes at the current position are copied (everything but value bodies past
    /// their first [`VALUE_HEAD`] bytes).
    #[inline(always)]
    pub fn captures(&self) -> bool {
        match self.mode {
            mode::SKIP => self.head > 0,
            mode::LOST => false,
            _ => true,
        }
    }

    /// Enters [`mode::SKIP`] for a body of `len` bytes (`extra` more belong to the frame, such
    /// as a text body's "\r\n"): its head is captured first.
    #[inline(always)]
    fn start_body(&mut self, len: u64, extra: u64) {
        self.mode = mode::SKIP;
        self.remaining = len + extra;
        self.head = if len < VALUE_HEAD as u64 {
            len as u16
        } else {
            VALUE_HEAD
        };
    }

    /// After a call that lost framing, the next call is assumed to start a frame.
    #[inline(always)]
    pub fn start_call(&mut self) {
        if self.mode == mode::LOST {
            *self = FrameState::default();
        }
    }

    /// Passes over up to `available` bytes of a body or binary key without looking at them;
    /// returns how many. Only meaningful in [`mode::SKIP`] and [`mode::KEEP`].
    #[inline(always)]
    pub fn pass(&mut self, available: u64) -> u64 {
        let n = if self.remaining < available {
            self.remaining
        } else {
            available
        };
        self.remaining -= n;
        if self.mode == mode::SKIP {
            self.head = if (self.head as u64) < n {
                0
            } else {
                self.head - n as u16
            };
        }
        if self.remaining == 0 {
            if self.mode == mode::KEEP && self.binary_rest > 0 {
                self.start_body(self.binary_rest as u64, 0);
            } else {
                self.mode = mode::FRAME_START;
            }
            self.binary_rest = 0;
        }
        n
    }

    /// Feeds one header byte ([`mode::FRAME_START`], [`mode::TEXT`] or
    /// [`mode::BINARY_HEADER`]). Afterwards the mode says what follows.
    #[inline(always)]
    pub fn step(&mut self, byte: u8) {
        match self.mode {
            mode::FRAME_START => {
                if byte == REQUEST_MAGIC || byte == RESPONSE_MAGIC {
                    self.mode = mode::BINARY_HEADER;
                    self.header_pos = 1;
                    self.key_len = 0;
                    self.extras_len = 0;
                    self.binary_rest = 0;
                } else {
                    self.mode = mode::TEXT;
                    self.token = 0;
                    self.length_token = 0;
                    self.flags = 0;
                    self.word = 0;
                    self.number = 0;
                    self.line_len = 0;
                    self.text_byte(byte);
                }
            }
            mode::TEXT => self.text_byte(byte),
            mode::BINARY_HEADER => self.binary_byte(byte),
            _ => {}
        }
    }

    /// One round of the word-at-a-time scan of a staged piece of `len` bytes at `pos` (in
    /// [`mode::FRAME_START`], [`mode::TEXT`] or [`mode::BINARY_HEADER`]): `word(i)` is the
    /// piece's 8 bytes at `i`, little-endian (bytes past `len` may be anything). A round is one
    /// of: a whole binary header; a first word (and its space), a run of token or line bytes
    /// (and the space ending the token) or up to eight length digits (and their space); or one
    /// byte, or a line's "\r\n", fed to [`FrameState::step`] (alternatives, not a sequence, so
    /// the verifier walks each once). Returns how many bytes it consumed, at least one when
    /// `pos < len`, with one exception: 0 at a binary header cut by the end of a piece that was
    /// cut short (`more`: the call has bytes past it in the same buffer), where the caller ends
    /// the piece so that the next one starts at the header and reads it whole (one round, not
    /// up to 23). Afterwards the mode says what follows, as after [`FrameState::step`] on each
    /// of those bytes.
    #[inline(always)]
    pub fn scan_round(&mut self, pos: u64, len: u64, more: bool, word: impl Fn(u64) -> u64) -> u64 {
        if pos >= len {
            return 0;
        }
        let available = len - pos;
        let chunk = word(pos);
        let first = chunk as u8;
        if self.mode == mode::FRAME_START && (first == REQUEST_MAGIC || first == RESPONSE_MAGIC) {
            if available >= BINARY_HEADER_LEN as u64 {
                return self.binary_header(chunk, word(pos + 8));
            }
            if more && pos > 0 {
                return 0;
            }
        }
        let skipped = self.skip_run(pos, chunk, available, &word);
        if skipped > 0 {
            return skipped;
        }
        // A line's closing "\r\n" in one round: the '\r' only counts into the line length
        // (short of MAX_LINE, where it would lose framing), then the newline is stepped.
        let mut taken = 1;
        let mut byte = first;
        if self.mode == mode::TEXT
            && first == b'\r'
            && available >= 2
            && (chunk >> 8) as u8 == b'\n'
            && (self.line_len as u32) < MAX_LINE
        {
            self.line_len += 1;
            taken = 2;
            byte = b'\n';
        }
        self.step(byte);
        taken
    }

    /// A whole binary header, its first 16 bytes in `chunk` and `second`: key length at 2 and
    /// body length at 8, big-endian.
    #[inline(always)]
    fn binary_header(&mut self, chunk: u64, second: u64) -> u64 {
        self.key_len = ((chunk >> 8) as u16 & 0xff00) | ((chunk >> 24) as u16 & 0xff);
        self.extras_len = (chunk >> 32) as u8;
        self.binary_rest = (second as u32).swap_bytes();
        self.header_pos = BINARY_HEADER_LEN;
        self.binary_header_done();
        BINARY_HEADER_LEN as u64
    }

    /// The leading bytes of `chunk` (at most `available`) that [`FrameState::step`] would only
    /// count into the line length, or take as a line's first word: passed over (first word:
    /// taken) at once. 0 where the next byte needs `step` (a delimiter, the length token's
    /// digits, a binary header).
    #[inline(always)]
    fn skip_run(
        &mut self,
        pos: u64,
        chunk: u64,
        available: u64,
        word: &impl Fn(u64) -> u64,
    ) -> u64 {
        let first = chunk as u8;
        let newline = bytes_equal(chunk, b'\n');
        let space = bytes_equal(chunk, b' ');
        if self.mode == mode::FRAME_START {
            if first == REQUEST_MAGIC || first == RESPONSE_MAGIC {
                return 0;
            }
            // A line's first word, up to its first space, '\r' or newline (8 bytes at most,
            // so never too long for `word`).
            let n = min(
                first_marked(newline | space | bytes_equal(chunk, b'\r')),
                available,
            );
            if n == 0 {
                return 0;
            }
            self.mode = mode::TEXT;
            self.token = 0;
            self.length_token = 0;
            self.flags = IN_TOKEN;
            self.word = chunk.swap_bytes() >> (64 - 8 * n);
            self.number = 0;
            self.line_len = n as u16;
            // The space that ends the word, when it is in the chunk: the word is complete
            // (seven bytes at most, so never too long) and says which token is the length.
            if n < 8 && n < available && (chunk >> (8 * n)) as u8 == b' ' {
                self.line_len += 1;
                self.flags = 0;
                self.token = 1;
                self.length_token = length_token(self.word);
                return n + 1;
            }
            return n;
        }
        if self.mode != mode::TEXT || self.token == 0 {
            return 0;
        }
        if self.length_token == 0 || self.token > self.length_token {
            // Only the line's end matters now.
            let stop = run_stop(first_marked(newline), pos, available, false, word);
            return self.count_run(stop, available);
        }
        if self.token < self.length_token {
            if self.flags & IN_TOKEN == 0 && (first == b' ' || first == b'\n' || first == b'\r') {
                return 0;
            }
            // Inside (or at the first byte of) a token before the length: up to its end.
            self.flags |= IN_TOKEN;
            let stop = run_stop(first_marked(newline | space), pos, available, true, word);
            let n = self.count_run(stop, available);
            return n + self.token_end(n, stop, available, word(pos + stop) as u8);
        }
        // The length token's digits, up to eight at once, while the length is still one that
        // `step` would take (a larger one is no body either way).
        if self.flags & NUMBER_BAD != 0 || self.number > MAX_BODY {
            return 0;
        }
        let digits = chunk ^ (ONES * b'0' as u64);
        // 0x80 in each byte that is not a digit: 10 or more, in its low seven bits or its top.
        let not_digit = (((digits & !HIGHS) + ONES * (0x80 - 10)) | digits) & HIGHS;
        let stop = first_marked(not_digit);
        let n = self.count_run(stop, available);
        if n == 0 || self.mode == mode::LOST {
            return n;
        }
        // The n digits (1..=8) as the top of eight, behind zeros, then summed in pairs, fours
        // and eights by multiplies (the first byte is the most significant digit).
        let mut eight = digits << (8 * (8 - n));
        eight = eight.wrapping_mul(10).wrapping_add(eight >> 8);
        eight = ((eight & 0x0000_00ff_0000_00ff)
            .wrapping_mul(100 + (1_000_000 << 32))
            .wrapping_add(
                ((eight >> 16) & 0x0000_00ff_0000_00ff).wrapping_mul(1 + (10_000 << 32)),
            ))
            >> 32;
        let mut scale = 1;
        let mut i = 0;
        while i < 8 {
            if i < n {
                scale *= 10;
            }
            i += 1;
        }
        self.number = self.number * scale + eight;
        self.flags |= IN_TOKEN;
        n + self.token_end(
            n,
            stop,
            available,
            chunk.wrapping_shr(8 * stop as u32) as u8,
        )
    }

    /// Counts a run of `stop` bytes (capped at `available`) into the line length, never past
    /// the byte that makes the line too long, where `step` loses framing too; returns its
    /// length.
    #[inline(always)]
    fn count_run(&mut self, stop: u64, available: u64) -> u64 {
        let n = min(
            min(stop, available),
            MAX_LINE as u64 + 1 - self.line_len as u64,
        );
        self.line_len += n as u16;
        if self.line_len as u32 > MAX_LINE {
            self.mode = mode::LOST;
        }
        n
    }

    /// After a run of `n` bytes of a token (not the first) that stopped at `stop`: when the
    /// byte there is the space ending the token, it is taken too (1), as `step` would take it:
    /// the token is complete. 0 when the run stopped for another reason.
    #[inline(always)]
    fn token_end(&mut self, n: u64, stop: u64, available: u64, at_stop: u8) -> u64 {
        if n != stop
            || n >= available
            || self.mode != mode::TEXT
            || at_stop != b' '
            || self.line_len as u32 >= MAX_LINE
        {
            return 0;
        }
        self.line_len += 1;
        self.flags &= !IN_TOKEN;
        self.token += 1;
        1
    }

    #[inline(always)]
    fn text_byte(&mut self, byte: u8) {
        self.line_len += 1;
        if byte == b'\n' {
            self.end_token();
            let announces_body = self.length_token != 0
                && self.token > self.length_token
                && self.flags & NUMBER_BAD == 0
                && self.number <= MAX_BODY;
            if announces_body {
                // The body's own "\r\n" belongs to the frame.
                self.start_body(self.number, 2);
            } else {
                self.mode = mode::FRAME_START;
            }
            return;
        }
        if self.line_len as u32 > MAX_LINE {
            self.mode = mode::LOST;
            return;
        }
        if byte == b' ' {
            self.end_token();
            return;
        }
        if byte == b'\r' {
            return;
        }
        if self.flags & IN_TOKEN == 0 {
            self.flags |= IN_TOKEN;
        }
        if self.token == 0 {
            if self.word >> 56 != 0 {
                self.flags |= WORD_LONG;
            }
            self.word = (self.word << 8) | byte as u64;
        } else if self.token == self.length_token {
            if byte.is_ascii_digit() && self.number <= MAX_BODY {
                self.number = self.number * 10 + (byte - b'0') as u64;
            } else {
                self.flags |= NUMBER_BAD;
            }
        }
    }

    /// A space or the line end: the token being read, if any, is complete.
    #[inline(always)]
    fn end_token(&mut self) {
        if self.flags & IN_TOKEN == 0 {
            return;
        }
        self.flags &= !IN_TOKEN;
        if self.token == 0 && self.flags & WORD_LONG == 0 {
            self.length_token = length_token(self.word);
        }
        self.token = self.token.saturating_add(1);
    }

    #[inline(always)]
    fn binary_byte(&mut self, byte: u8) {
        match self.header_pos {
            2 => self.key_len = (byte as u16) << 8,
            3 => self.key_len |= byte as u16,
            4 => self.extras_len = byte,
            8..=11 => self.binary_rest = (self.binary_rest << 8) | byte as u32,
            _ => {}
        }
        self.header_pos += 1;
        if self.header_pos < BINARY_HEADER_LEN {
            return;
        }
        self.binary_header_done();
    }

    /// All 24 header bytes are in: what follows (extras and key to keep, a body to skip).
    #[inline(always)]
    fn binary_header_done(&mut self) {
        let keep = self.extras_len as u32 + self.key_len as u32;
        let body = self.binary_rest;
        if keep > body || body as u64 > MAX_BODY {
            // A header whose lengths cannot be: user space sees it and resynchronises.
            self.mode = mode::FRAME_START;
            self.binary_rest = 0;
            return;
        }
        self.binary_rest = body - keep;
        if keep > 0 {
            self.mode = mode::KEEP;
            self.remaining = keep as u64;
        } else if self.binary_rest > 0 {
            self.start_body(self.binary_rest as u64, 0);
            self.binary_rest = 0;
        } else {
            self.mode = mode::FRAME_START;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Which byte ranges of `stream` the state machine captures, fed in calls of `split` bytes.
    fn captured(stream: &[u8], split: usize) -> Vec<bool> {
        captured_by(stream, split, 0).0
    }

    /// The piece's 8 bytes at `i`, little-endian: `scan_round`'s `word`. Past the piece's end
    /// come newlines and spaces, the bytes that would mislead a scan that looked there.
    fn word_at(piece: &[u8], i: u64) -> u64 {
        let mut bytes = [0u8; 8];
        for (k, b) in bytes.iter_mut().enumerate() {
            let at = i as usize + k;
            *b = piece
                .get(at)
                .copied()
                .unwrap_or(if at.is_multiple_of(2) { b'\n' } else { b' ' });
        }
        u64::from_le_bytes(bytes)
    }

    /// How many bytes at `i` of a call a body or binary key passes (`available` of them at
    /// most), and whether they are captured.
    fn pass(state: &mut FrameState, available: usize) -> (usize, bool) {
        // As the kernel does: a body's head is copied (and passed) on its own.
        let keep = state.captures();
        let n = if state.mode == mode::SKIP && keep {
            state.pass((available as u64).min(state.head as u64))
        } else {
            state.pass(available as u64)
        };
        (n as usize, keep)
    }

    /// As `captured`, fed byte by byte (`piece` 0) or a word at a time as the kernel does:
    /// staged in pieces of `piece` bytes, each scanned in rounds (a piece ends early where a
    /// round declines a binary header it cuts); also the mode and the body or key bytes still
    /// to come after each call.
    fn captured_by(stream: &[u8], split: usize, piece: usize) -> (Vec<bool>, Vec<(u8, u64)>) {
        let mut state = FrameState::default();
        let mut kept = Vec::new();
        let mut modes = Vec::new();
        for call in stream.chunks(split) {
            state.start_call();
            let mut i = 0;
            while i < call.len() {
                if state.mode == mode::LOST {
                    kept.extend(core::iter::repeat_n(false, call.len() - i));
                    break;
                }
                if state.mode == mode::SKIP || state.mode == mode::KEEP || piece == 0 {
                    let (n, keep) = if state.mode == mode::SKIP || state.mode == mode::KEEP {
                        pass(&mut state, call.len() - i)
                    } else {
                        state.step(call[i]);
                        (1, true)
                    };
                    kept.extend(core::iter::repeat_n(keep, n));
                    i += n;
                    continue;
                }
                // One staged piece, scanned round by round (bodies and keys in it passed).
                let len = piece.min(call.len() - i);
                let more = len < call.len() - i;
                let staged = &call[i..i + len];
                let mut at = 0;
                while at < len && state.mode != mode::LOST {
                    let (n, keep) = if state.mode == mode::SKIP || state.mode == mode::KEEP {
                        pass(&mut state, len - at)
                    } else {
                        let n = state
                            .scan_round(at as u64, len as u64, more, |k| word_at(staged, k))
                            as usize;
                        assert!(n <= len - at, "round of {n}");
                        if n == 0 {
                            break;
                        }
                        (n, true)
                    };
                    kept.extend(core::iter::repeat_n(keep, n));
                    at += n;
                }
                assert!(at > 0, "a piece at {i} made no progress");
                i += at;
            }
            modes.push((state.mode, state.remaining));
        }
        (kept, modes)
    }

    /// The word-at-a-time scan captures exactly what byte-by-byte steps capture, and ends each
    /// call in the same mode with the same body or key to come, whatever the split: staged as
    /// the kernel does, in pieces of [`crate::CAPTURE_PIECE`] bytes, in smaller ones, and as
    /// one piece per call.
    fn assert_scan_agrees(stream: &[u8]) {
        for split in 1..=stream.len() {
            let bytewise = captured_by(stream, split, 0);
            for piece in [crate::CAPTURE_PIECE, 29, usize::MAX] {
                assert_eq!(
                    captured_by(stream, split, piece),
                    bytewise,
                    "split {split}, pieces of {piece}, of {:?}",
                    std::string::String::from_utf8_lossy(stream)
                );
            }
        }
    }

    fn binary(opcode: u8, magic: u8, extras: &[u8], key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut frame = std::vec![0u8; 24];
        frame[0] = magic;
        frame[1] = opcode;
        frame[2..4].copy_from_slice(&(key.len() as u16).to_be_bytes());
        frame[4] = extras.len() as u8;
        let body = (extras.len() + key.len() + value.len()) as u32;
        frame[8..12].copy_from_slice(&body.to_be_bytes());
        frame.extend_from_slice(extras);
        frame.extend_from_slice(key);
        frame.extend_from_slice(value);
        frame
    }

    /// A side's calls followed one after another continue its frames; a call that starts
    /// elsewhere (calls went by unfollowed) starts both sides afresh, once: the other side's
    /// next call is taken as it comes. A receive one byte late took the peer's FIN.
    #[test]
    fn a_call_past_unfollowed_ones_starts_both_sides_afresh() {
        let mut frames = SocketFrames::default();
        assert!(!frames.resume(true, Some(100), 7), "the first call");
        assert!(!frames.resume(false, Some(900), 21));
        assert!(!frames.resume(true, Some(107), 7), "continues");
        frames.recv.mode = mode::SKIP;
        frames.recv.remaining = 500;
        frames.send.mode = mode::TEXT;
        assert!(frames.resume(true, Some(300), 7), "sends went by");
        assert_eq!((frames.send, frames.recv), Default::default());
        assert!(
            !frames.resume(false, Some(5_000), 21),
            "the receive side is taken as it comes"
        );
        assert!(!frames.resume(true, Some(307), 7));
        assert!(
            !frames.resume(false, Some(5_022), 0),
            "one byte late: the FIN"
        );
        assert!(frames.resume(true, Some(320), 7), "sends went by");
        assert!(!frames.resume(true, None, 7), "unknown: nothing to compare");
        assert!(!frames.resume(true, Some(1), 7), "nor after an unknown");
    }

    #[test]
    fn the_word_at_a_time_scan_agrees_with_byte_steps() {
        let mut streams: Vec<Vec<u8>> = std::vec![
            b"set k 0 0 5\r\nhello\r\nget a b\r\nVALUE a 0 3\r\nEND\r\nVALUE b 1 2 77\r\nxy\r\nEND\r\nms k 4 T0\r\nabcd\r\nVA 2 f1\r\nhi\r\n".to_vec(),
            b"get key:0000000001 key:0000000002 key:0000000003\r\nVALUE key:0000000001 0 100 77\r\n".to_vec(),
            b"set  k\r  0 0   12 noreply\r\n0123456789ab\r\nset k 0 0 1x\r\nset\r\nVALUES k 0 5\r\n\r\n \r\nEND\r\n".to_vec(),
            b"set k 0 0 99999999999999\r\nappend averyveryverylongkeyname 0 0 3\r\nabc\r\nprependX k 0 0 3\r\n".to_vec(),
            b"cas k 0 0 2 77\r\nhi\r\nVA 0\r\n\r\nmn\r\nMN\r\nHD\r\nEN\r\n".to_vec(),
        ];
        let mut bin = binary(0x01, 0x80, &[0; 8], b"key", b"value-longer");
        bin.extend(binary(0x0a, 0x80, &[], &[], &[]));
        bin.extend(binary(0x00, 0x81, &[0, 0, 0, 1], b"", b"v"));
        bin.extend(binary(0x0d, 0x80, &[], b"k2", &[]));
        // A header whose lengths cannot be, then text.
        let mut bad = binary(0x00, 0x81, &[], &[0; 10], &[]);
        bad[11] = 4;
        bin.extend(bad);
        bin.extend_from_slice(b"END\r\n");
        streams.push(bin);
        // A getkq batch and its replies, as dalli sends them: headers fall across piece ends.
        let mut batch = Vec::new();
        let mut replies = Vec::new();
        for k in 0..10usize {
            let key = std::format!("key:{}", "x".repeat(k * 3));
            batch.extend(binary(0x0d, 0x80, &[], key.as_bytes(), &[]));
            replies.extend(binary(
                0x0c,
                0x81,
                &[0, 0, 0, 1],
                key.as_bytes(),
                &[b'v'; 11],
            ));
        }
        batch.extend(binary(0x0a, 0x80, &[], &[], &[]));
        replies.extend(binary(0x0a, 0x81, &[], &[], &[]));
        streams.push(batch);
        streams.push(replies);
        for stream in &streams {
            assert_scan_agrees(stream);
        }
        // Lines at and past the longest followed.
        for len in [
            MAX_LINE as usize - 9,
            MAX_LINE as usize - 1,
            MAX_LINE as usize + 3,
        ] {
            let mut line = b"get ".to_vec();
            line.resize(len, b'k');
            line.extend_from_slice(b"\r\nget z\r\n");
            for split in [1, 5, 64, 4096, line.len()] {
                for piece in [crate::CAPTURE_PIECE, usize::MAX] {
                    assert_eq!(
                        captured_by(&line, split, piece),
                        captured_by(&line, split, 0),
                        "{len} split {split} pieces of {piece}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_length_digits_parsed_eight_at_a_time_agree_with_byte_steps() {
        // Every digit count 1..=20, at every alignment in the chunk (the key's length moves
        // the token), with and without a token after it; and lengths around MAX_BODY.
        let pi = "31415926535897932384";
        let mut lengths: Vec<std::string::String> = (1..=pi.len())
            .flat_map(|n| [pi[..n].into(), std::format!("{:0>n$}", &pi[..n / 2])])
            .collect();
        for n in [
            MAX_BODY - 1,
            MAX_BODY,
            MAX_BODY + 1,
            99_999_999,
            100_000_000,
            10,
        ] {
            lengths.push(std::format!("{n}"));
        }
        for length in &lengths {
            for key in ["k", "kk", "key:0001", "key:00012"] {
                for tail in ["\r\n", " 77\r\n", "\r\r\n", "x\r\n", " \r\n"] {
                    let line =
                        std::format!("VALUE {key} 0 {length}{tail}set {key} 0 0 {length}{tail}");
                    assert_scan_agrees(line.as_bytes());
                }
            }
        }
    }

    #[test]
    fn the_word_at_a_time_scan_agrees_on_random_streams() {
        // Tokens that steer the state machine, glued at random (xorshift, fixed seed).
        let parts: [&[u8]; 27] = [
            b"1234567",
            b"00000000009",
            b"set k 0 0 ",
            b"set",
            b"VALUE",
            b"VA",
            b"ms",
            b"get",
            b"cas",
            b"END",
            b" ",
            b"  ",
            b"\r",
            b"\n",
            b"\r\n",
            b"0",
            b"5",
            b"12",
            b"3 ",
            b"key:000001",
            b"x",
            b"\x80",
            b"\x81",
            b"\0",
            b"\x18",
            b"appendprepend",
            b"\xff\x0a\x20",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..1500 {
            let mut stream = Vec::new();
            for _ in 0..(next() % 40) {
                stream.extend_from_slice(parts[(next() % parts.len() as u64) as usize]);
            }
            assert_scan_agrees(&stream);
        }
    }

    fn kept_text(stream: &[u8], split: usize) -> Vec<u8> {
        stream
            .iter()
            .zip(captured(stream, split))
            .filter(|(_, kept)| *kept)
            .map(|(&b, _)| b)
            .collect()
    }

    #[test]
    fn text_bodies_are_skipped_past_their_head_whatever_the_split() {
        let stream = b"set k 0 0 5\r\nhello\r\nget a b\r\nVALUE a 0 3\r\nEND\r\nVALUE b 1 2 77\r\nxy\r\nEND\r\nms k 4 T0\r\nabcd\r\nVA 2 f1\r\nhi\r\nset q 0 0 20\r\n0123456789abcdefghij\r\nVALUE q 0 0\r\n\r\nEND\r\n";
        for split in 1..stream.len() {
            assert_eq!(
                kept_text(stream, split),
                b"set k 0 0 5\r\nhelloget a b\r\nVALUE a 0 3\r\nENDVALUE b 1 2 77\r\nxyEND\r\nms k 4 T0\r\nabcdVA 2 f1\r\nhiset q 0 0 20\r\n01234567VALUE q 0 0\r\nEND\r\n",
                "split {split}"
            );
        }
    }

    #[test]
    fn lines_without_bodies_and_bad_lengths_are_kept_whole() {
        for line in [
            &b"get k\r\n"[..],
            b"incr k 5\r\n",
            b"set k 0 0\r\n",
            b"set k 0 0 x5\r\n",
            b"set k 0 0 99999999999999\r\n",
            b"VALUES k 0 5\r\n",
            b"\r\n",
        ] {
            let mut stream = line.to_vec();
            stream.extend_from_slice(b"get z\r\n");
            assert_eq!(kept_text(&stream, 3), stream, "{:?}", line);
        }
    }

    #[test]
    fn binary_keeps_header_extras_and_key() {
        // A set: extras 8, key "key", value "value-longer" (its first 8 bytes kept).
        let mut set = std::vec![0u8; 24];
        set[0] = 0x80;
        set[1] = 0x01;
        set[3] = 3;
        set[4] = 8;
        set[11] = 8 + 3 + 12;
        set.extend_from_slice(&[0; 8]);
        set.extend_from_slice(b"key");
        set.extend_from_slice(b"value-longer");
        let mut noop = std::vec![0u8; 24];
        noop[0] = 0x80;
        noop[1] = 0x0a;
        let mut stream = set.clone();
        stream.extend_from_slice(&noop);
        for split in 1..stream.len() {
            let kept = captured(&stream, split);
            let skipped: Vec<usize> = (0..stream.len()).filter(|&i| !kept[i]).collect();
            assert_eq!(skipped, (43..47).collect::<Vec<_>>(), "split {split}");
        }
    }

    #[test]
    fn impossible_binary_lengths_fall_back_to_frame_start() {
        let mut header = std::vec![0u8; 24];
        header[0] = 0x81;
        header[3] = 10; // key 10 > body 4
        header[11] = 4;
        let mut stream = header.clone();
        stream.extend_from_slice(b"END\r\n");
        assert!(captured(&stream, 7).iter().all(|&k| k));
    }

    #[test]
    fn an_endless_line_loses_framing_until_the_next_call() {
        let mut state = FrameState::default();
        for _ in 0..=MAX_LINE {
            state.step(b'a');
        }
        assert_eq!(state.mode, mode::LOST);
        assert!(!state.captures());
        state.start_call();
        assert_eq!(state, FrameState::default());
    }

    #[test]
    fn a_two_gigabyte_claim_is_not_followed() {
        assert_eq!(
            kept_text(b"VALUE k 0 2147483648\r\nEND\r\n", 5),
            b"VALUE k 0 2147483648\r\nEND\r\n"
        );
    }
}
