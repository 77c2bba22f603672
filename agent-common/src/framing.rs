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

/// The longest text line followed. memcached accepts multi-key gets far longer than its 2 KiB
/// line buffer, so this is generous; a longer line loses framing until the next call.
pub const MAX_LINE: u32 = 16384;
/// Largest declared body followed (memcached's item ceiling is 1 GiB). A larger claim is
/// treated as no body: the line is passed to user space, which calls it garbage.
pub const MAX_BODY: u64 = 1 << 30;
/// Leading bytes of each value body that are captured: with the body's length, a fingerprint
/// of the value. Bounded and fixed, so the cost per frame stays constant.
pub const VALUE_HEAD: u16 = 8;

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

/// The send and the receive side of one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFrames {
    pub send: FrameState,
    pub recv: FrameState,
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
        let mut state = FrameState::default();
        let mut kept = Vec::new();
        for call in stream.chunks(split) {
            state.start_call();
            let mut i = 0;
            while i < call.len() {
                match state.mode {
                    mode::SKIP | mode::KEEP => {
                        // As the kernel does: a body's head is copied (and passed) on its own.
                        let keep = state.captures();
                        let available = (call.len() - i) as u64;
                        let n = if state.mode == mode::SKIP && keep {
                            state.pass(available.min(state.head as u64))
                        } else {
                            state.pass(available)
                        } as usize;
                        kept.extend(core::iter::repeat_n(keep, n));
                        i += n;
                    }
                    mode::LOST => {
                        kept.extend(core::iter::repeat_n(false, call.len() - i));
                        i = call.len();
                    }
                    _ => {
                        state.step(call[i]);
                        kept.push(true);
                        i += 1;
                    }
                }
            }
        }
        kept
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
