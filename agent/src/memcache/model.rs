//! The decoder's output vocabulary. Every enum here maps to a fixed, small set of label values
//! (`as_str`), so the agent can turn observations into metric labels without cardinality risk.

use std::fmt;

/// The longest key memcached accepts; also the most this crate ever keeps of a key.
pub const KEY_CAPACITY: usize = 250;

/// How many leading bytes of a value the capture keeps ([`ValueHead`]).
pub const VALUE_HEAD_LEN: usize = agent_common::framing::VALUE_HEAD as usize;

/// The first bytes of a value (all of it when shorter than [`VALUE_HEAD_LEN`]): with the
/// value's length, a fingerprint of it. Only a head whose every byte was seen is reported.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueHead {
    bytes: [u8; VALUE_HEAD_LEN],
    len: u8,
}

impl ValueHead {
    /// The head of a value that starts with `bytes` (cut at [`VALUE_HEAD_LEN`]).
    pub fn new(bytes: &[u8]) -> ValueHead {
        let mut head = ValueHead::default();
        head.extend(bytes);
        head
    }

    /// Appends bytes, up to [`VALUE_HEAD_LEN`] in all.
    #[inline]
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        // The usual case, a whole head in one piece: one fixed-size copy instead of a
        // variable-length one (a memcpy call per value item on the decoder's hot path).
        if at == 0 {
            if let Some(whole) = bytes.first_chunk::<VALUE_HEAD_LEN>() {
                self.bytes = *whole;
                self.len = VALUE_HEAD_LEN as u8;
                return;
            }
        }
        let n = bytes.len().min(VALUE_HEAD_LEN - at);
        self.bytes[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n as u8;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ValueHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ValueHead({:?})",
            String::from_utf8_lossy(self.as_bytes())
        )
    }
}

/// Which way a chunk of bytes travelled on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client_to_server",
            Direction::ServerToClient => "server_to_client",
        }
    }
}

/// Which of memcache's two wire encodings a connection speaks. Meta commands are part of the
/// text encoding (they can be mixed with classic commands on one connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireProtocol {
    Text,
    Binary,
}

impl WireProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            WireProtocol::Text => "text",
            WireProtocol::Binary => "binary",
        }
    }
}

/// The command family a [`Command`] belongs to, as a label value: "text", "meta" or "binary".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandProtocol {
    Text,
    Meta,
    Binary,
}

impl CommandProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandProtocol::Text => "text",
            CommandProtocol::Meta => "meta",
            CommandProtocol::Binary => "binary",
        }
    }
}

macro_rules! commands {
    (
        text { $($tv:ident => $tl:literal),* $(,)? }
        meta { $($mv:ident => $ml:literal),* $(,)? }
        binary { $($bv:ident = $bop:literal => $bl:literal),* $(,)? }
    ) => {
        /// A memcache command. Label scheme (`as_str`): classic text commands use their own
        /// name ("get", "flush_all"), meta commands their two-letter code ("mg", "ms"), binary
        /// opcodes "bin_" plus the opcode's name, quiet variants keeping their own name
        /// ("bin_get", "bin_getkq", "bin_setq"). Admin commands the decoder frames but does
        /// not model individually are "other" (text) and "bin_other" (binary).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Command {
            $($tv,)*
            $($mv,)*
            $($bv,)*
            BinOther,
        }

        impl Command {
            /// Every command, for pre-registering metric series.
            pub const ALL: &'static [Command] = &[$(Command::$tv,)* $(Command::$mv,)* $(Command::$bv,)* Command::BinOther];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Command::$tv => $tl,)*
                    $(Command::$mv => $ml,)*
                    $(Command::$bv => $bl,)*
                    Command::BinOther => "bin_other",
                }
            }

            pub fn protocol(self) -> CommandProtocol {
                match self {
                    $(Command::$tv => CommandProtocol::Text,)*
                    $(Command::$mv => CommandProtocol::Meta,)*
                    _ => CommandProtocol::Binary,
                }
            }

            /// The binary command for an opcode; unknown opcodes are [`Command::BinOther`].
            pub fn from_opcode(opcode: u8) -> Command {
                match opcode {
                    $($bop => Command::$bv,)*
                    _ => Command::BinOther,
                }
            }

            /// Whether the binary protocol knows this opcode (used to judge resync candidates).
            pub(crate) fn is_known_opcode(opcode: u8) -> bool {
                matches!(opcode, $($bop)|*)
            }
        }
    };
}

commands! {
    text {
        Get => "get", Gets => "gets", Gat => "gat", Gats => "gats",
        Set => "set", Add => "add", Replace => "replace", Append => "append",
        Prepend => "prepend", Cas => "cas", Delete => "delete", Incr => "incr", Decr => "decr",
        Touch => "touch", Stats => "stats", Version => "version", Verbosity => "verbosity",
        FlushAll => "flush_all", Quit => "quit", Other => "other",
    }
    meta {
        MetaGet => "mg", MetaSet => "ms", MetaDelete => "md", MetaArithmetic => "ma",
        MetaNoop => "mn", MetaDebug => "me",
    }
    binary {
        BinGet = 0x00 => "bin_get", BinSet = 0x01 => "bin_set", BinAdd = 0x02 => "bin_add",
        BinReplace = 0x03 => "bin_replace", BinDelete = 0x04 => "bin_delete",
        BinIncrement = 0x05 => "bin_incr", BinDecrement = 0x06 => "bin_decr",
        BinQuit = 0x07 => "bin_quit", BinFlush = 0x08 => "bin_flush", BinGetQ = 0x09 => "bin_getq",
        BinNoop = 0x0a => "bin_noop", BinVersion = 0x0b => "bin_version",
        BinGetK = 0x0c => "bin_getk", BinGetKQ = 0x0d => "bin_getkq",
        BinAppend = 0x0e => "bin_append", BinPrepend = 0x0f => "bin_prepend",
        BinStat = 0x10 => "bin_stat", BinSetQ = 0x11 => "bin_setq", BinAddQ = 0x12 => "bin_addq",
        BinReplaceQ = 0x13 => "bin_replaceq", BinDeleteQ = 0x14 => "bin_deleteq",
        BinIncrementQ = 0x15 => "bin_incrq", BinDecrementQ = 0x16 => "bin_decrq",
        BinQuitQ = 0x17 => "bin_quitq", BinFlushQ = 0x18 => "bin_flushq",
        BinAppendQ = 0x19 => "bin_appendq", BinPrependQ = 0x1a => "bin_prependq",
        BinVerbosity = 0x1b => "bin_verbosity", BinTouch = 0x1c => "bin_touch",
        BinGat = 0x1d => "bin_gat", BinGatQ = 0x1e => "bin_gatq",
        BinSaslListMechs = 0x20 => "bin_sasl_list_mechs", BinSaslAuth = 0x21 => "bin_sasl_auth",
        BinSaslStep = 0x22 => "bin_sasl_step", BinGatK = 0x23 => "bin_gatk",
        BinGatKQ = 0x24 => "bin_gatkq",
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use crate::model::Status;

/// A key (or, in queue mode, a queue name) kept inline so the hot path never allocates for it.
/// At most `DecoderConfig::max_key_len` (<= [`KEY_CAPACITY`]) bytes are kept. `is_truncated`
/// is set when the key was longer than that or ran past the captured prefix of the payload.
/// Meta keys sent with the `b` flag are kept base64-decoded, like binary-protocol keys.
#[derive(Clone, Copy)]
pub struct Key {
    len: u8,
    truncated: bool,
    bytes: [u8; KEY_CAPACITY],
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.truncated == other.truncated && self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
        self.truncated.hash(state);
    }
}

impl Key {
    pub(crate) const EMPTY: Key = Key {
        len: 0,
        truncated: false,
        bytes: [0; KEY_CAPACITY],
    };

    pub(crate) fn new(src: &[u8], max_len: usize, truncated: bool) -> Key {
        let mut key = Key::EMPTY;
        key.assign(
            &src[..src.len().min(max_len)],
            truncated || src.len() > max_len,
        );
        key
    }

    /// Replaces the key in place (callers avoid moving the whole buffer around).
    pub(crate) fn assign(&mut self, src: &[u8], truncated: bool) {
        let keep = src.len().min(KEY_CAPACITY);
        self.bytes[..keep].copy_from_slice(&src[..keep]);
        self.len = keep as u8;
        self.truncated = truncated || keep < src.len();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Whether `other` can be the same key, allowing for either side having been cut short.
    pub fn could_be(&self, other: &[u8], other_truncated: bool) -> bool {
        key_could_be(self.as_bytes(), self.truncated, other, other_truncated)
    }
}

/// Whether two possibly cut keys can be the same key.
pub(crate) fn key_could_be(
    mine: &[u8],
    mine_truncated: bool,
    other: &[u8],
    other_truncated: bool,
) -> bool {
    match (mine_truncated, other_truncated) {
        (false, false) => mine == other,
        (true, false) => other.starts_with(mine),
        (false, true) => mine.starts_with(other),
        (true, true) => {
            let common = mine.len().min(other.len());
            mine[..common] == other[..common]
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(\"{}\"", self.as_bytes().escape_ascii())?;
        if self.truncated {
            f.write_str(", truncated")?;
        }
        f.write_str(")")
    }
}

/// What a queue-mode (Starling/Kestrel) request did to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueOpKind {
    /// `set <queue>`: an item was offered to the queue (see the status for the outcome).
    Enqueue,
    /// `get <queue>` that returned an item.
    Dequeue,
    /// `get <queue>` (with or without options) that found the queue empty.
    EmptyPoll,
    /// `get <queue>/peek` that returned an item without removing it.
    Peek,
    /// `get <queue>/open` that returned an item as a reliable (tentative) read.
    Open,
    /// `get <queue>/close` without `open`: acknowledges the previous reliable read.
    Close,
    /// `get <queue>/abort`: hands the previous reliable read back to the queue.
    Abort,
}

impl QueueOpKind {
    pub const ALL: &'static [QueueOpKind] = &[
        QueueOpKind::Enqueue,
        QueueOpKind::Dequeue,
        QueueOpKind::EmptyPoll,
        QueueOpKind::Peek,
        QueueOpKind::Open,
        QueueOpKind::Close,
        QueueOpKind::Abort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueOpKind::Enqueue => "enqueue",
            QueueOpKind::Dequeue => "dequeue",
            QueueOpKind::EmptyPoll => "empty_poll",
            QueueOpKind::Peek => "peek",
            QueueOpKind::Open => "open",
            QueueOpKind::Close => "close",
            QueueOpKind::Abort => "abort",
        }
    }
}

/// Kestrel's `get` key suffixes (`<queue>/t=500/open`), as parsed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KestrelOptions {
    /// `t=<ms>`: how long the server may block waiting for an item.
    pub timeout_ms: Option<u32>,
    pub open: bool,
    pub close: bool,
    pub abort: bool,
    pub peek: bool,
    /// A suffix this decoder does not know was present (it is otherwise ignored).
    pub unknown_option: bool,
}

impl KestrelOptions {
    /// Whether the request asks for an item: `close` or `abort` alone only end a reliable
    /// read; beside `open` or `peek` they fetch too.
    pub fn fetches(&self) -> bool {
        self.open || self.peek || !(self.close || self.abort)
    }

    /// How long a fetch lets the server wait for an item (`t=<ms>`, more than 0): until then
    /// its silence is the client's choice, not the server's slowness.
    pub fn blocking_wait_ms(&self) -> Option<u32> {
        self.timeout_ms.filter(|&ms| ms > 0 && self.fetches())
    }
}

/// The queue side of a request, present only when the decoder runs in queue mode.
/// The queue's name is the observation's `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueOp {
    pub op: QueueOpKind,
    pub options: KestrelOptions,
}

/// Why the decoder could not decode part of a stream, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorReason {
    /// Bytes that are not the protocol at a place where a command or response must start; the
    /// decoder skipped ahead to the next plausible command/response start.
    Garbage,
    /// A command or response line (or binary header) ran past the captured prefix of a
    /// payload, so the rest of that payload could not be framed.
    TruncatedCapture,
    /// The caller reported lost events (`ConnectionDecoder::note_gap`).
    Gap,
    /// A response that fits no outstanding request.
    UnexpectedResponse,
    /// A request was dropped because too many were outstanding, or a multi-key request had
    /// more keys than the decoder keeps track of.
    PendingOverflow,
    /// A known command whose arguments could not be parsed where framing depends on them
    /// (e.g. a storage command without a valid byte count).
    Malformed,
    /// A command line longer than `DecoderConfig::max_line_len`.
    LineTooLong,
}

impl DecodeErrorReason {
    pub const ALL: &'static [DecodeErrorReason] = &[
        DecodeErrorReason::Garbage,
        DecodeErrorReason::TruncatedCapture,
        DecodeErrorReason::Gap,
        DecodeErrorReason::UnexpectedResponse,
        DecodeErrorReason::PendingOverflow,
        DecodeErrorReason::Malformed,
        DecodeErrorReason::LineTooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorReason::Garbage => "garbage",
            DecodeErrorReason::TruncatedCapture => "truncated_capture",
            DecodeErrorReason::Gap => "gap",
            DecodeErrorReason::UnexpectedResponse => "unexpected_response",
            DecodeErrorReason::PendingOverflow => "pending_overflow",
            DecodeErrorReason::Malformed => "malformed",
            DecodeErrorReason::LineTooLong => "line_too_long",
        }
    }
}

impl fmt::Display for DecodeErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finished request, or one key of a multi-key retrieval.
///
/// Multi-key gets (`get a b c`, `gets`, `gat`, `gats`) produce one observation per key, each
/// with its own hit/miss status. Byte counts are split so that they sum to the wire bytes: the
/// first key's observation carries the request line and the response's END line, every key
/// carries its own VALUE item. All keys share the request's latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestObservation {
    pub command: Command,
    pub status: Status,
    pub key: Option<Key>,
    /// Time from the request's last byte being sent to the first byte of its response being
    /// seen (both as chunk timestamps). For quiet requests whose result was implied by a later
    /// response (binary GetQ misses, meta `q`), the time until that later response. None when
    /// no response was seen.
    pub latency_ns: Option<u64>,
    /// Timestamp of the chunk that completed the request.
    pub request_ts_ns: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub queue: Option<QueueOp>,
    /// TCP sequence number of the request's first byte, when the kernel reported it: the
    /// client's and the server's agent see the same number for one request.
    pub seq: Option<u32>,
    /// The request's id at both ends ([`crate::model::request_id`]), set where the connection's
    /// 4-tuple is known (the capture's per-connection state) when `seq` is.
    pub request_id: Option<u64>,
    /// The value's length in bytes (without its "\r\n"): what a storage command sent or a
    /// hit returned. None for commands without a value, misses and values not seen.
    pub value_len: Option<u32>,
    /// The value's first bytes ([`ValueHead`]), when every one of them was captured: text,
    /// meta and binary values alike, sent by a storage command or returned by a hit.
    pub value_head: Option<ValueHead>,
    /// How many keys the request named, on the first observation of a request that named
    /// any (multi-key gets report one observation per key); 0 on the others.
    pub keys_in_request: u16,
    /// What an error reply said after its keyword (text and meta protocol), cut to plain
    /// words ([`super::ErrorText`]); None for other statuses and binary errors.
    pub error_text: Option<super::ErrorText>,
}

impl RequestObservation {
    /// A queue fetch that let the server wait for an item (Kestrel's `get <queue>/t=<ms>`):
    /// its latency is mostly the wait the client asked for, an empty queue's answer coming
    /// when the wait ends, and even a hit's latency cannot be told apart from the wait before
    /// the item came. Latency histograms and the slow-server findings leave such requests
    /// out (they are counted as requests and as blocking fetches).
    pub fn is_blocking_fetch(&self) -> bool {
        self.queue
            .is_some_and(|queue| queue.options.blocking_wait_ms().is_some())
    }

    /// The latency that says how fast the server answered: none for a blocking fetch.
    pub fn server_latency_ns(&self) -> Option<u64> {
        self.latency_ns.filter(|_| !self.is_blocking_fetch())
    }

    /// What this request did to its queue, if anything: an enqueue the server took (stored,
    /// or sent noreply, which no answer confirms at either end), a fetch it answered with an
    /// item (dequeue, peek, open) or as empty (empty_poll), a close or abort it answered.
    /// None outside queue mode and for requests refused (not_stored, errors) or whose answer
    /// is not known (timeout, unanswered, unknown): those are requests, counted by status in
    /// `memcache_requests_total`, not operations on the queue.
    pub fn queue_operation(&self) -> Option<QueueOpKind> {
        let op = self.queue?.op;
        let done = match op {
            QueueOpKind::Enqueue => matches!(self.status, Status::Stored | Status::Noreply),
            // Fetches, closes and aborts are all `get`s, answered with an item or END.
            _ => self.status.is_lookup(),
        };
        done.then_some(op)
    }

    /// For tests: a stored 12-byte set sent at `ts_ns` and answered in 250 us, without key,
    /// queue or sequence number (struct update syntax changes what a test needs).
    #[cfg(test)]
    pub fn stored_set(ts_ns: u64) -> Self {
        RequestObservation {
            command: Command::Set,
            status: Status::Stored,
            key: None,
            latency_ns: Some(250_000),
            request_ts_ns: ts_ns,
            request_bytes: 30,
            response_bytes: 8,
            queue: None,
            seq: None,
            request_id: None,
            value_len: Some(12),
            value_head: None,
            keys_in_request: 1,
            error_text: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeErrorObservation {
    pub reason: DecodeErrorReason,
    pub direction: Direction,
    /// Timestamp of the chunk (or of the last chunk, for gaps) where the problem was found.
    pub ts_ns: u64,
}

/// What the pure decoder reports about one byte stream, knowing nothing of sockets or services
/// (the decoder table ties it to a connection as a [`crate::memcache::decoders::MemcacheEvent`]).
/// Requests are reported when they complete (response seen, no response expected, timed out,
/// or lost), not when they are sent.
// Boxing the large variant would cost an allocation per command on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Request(RequestObservation),
    DecodeError(DecodeErrorObservation),
}
