//! How the text, meta and binary parsers describe requests and responses to the pairing: the
//! family of answers a command expects, response kinds and codes, and what a request carried.

use super::super::model::{Command, KestrelOptions, ValueHead};
use super::super::ErrorText;

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
    /// That value's first bytes, when they came with the response (binary).
    pub value_head: Option<ValueHead>,
    /// The value's first bytes follow the response line and arrive later, through
    /// [`super::Pairing::value_head`] or not at all ([`super::Pairing::value_done`]): the
    /// request is finished only then (meta `VA`).
    pub head_follows: bool,
    /// What an error line (ERROR, CLIENT_ERROR, SERVER_ERROR) said after its keyword.
    pub error_text: Option<ErrorText>,
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
    /// Whether the server answers is not known: a storage line cut by the capture before the
    /// place of its `noreply`. Unanswered, its outcome is unknown, not a timeout.
    pub maybe_silent: bool,
    pub ts_ns: u64,
    pub bytes: u64,
    pub opaque: Option<u64>,
    pub queue: Option<QueueIntent>,
    /// TCP sequence number of the request's first byte, when known.
    pub seq: Option<u32>,
    /// Length of the value a storage command sends.
    pub value_len: Option<u32>,
    /// That value's first bytes, when seen.
    pub value_head: Option<ValueHead>,
}

impl RequestInfo {
    pub fn new(command: Command, ts_ns: u64, bytes: u64) -> RequestInfo {
        RequestInfo {
            command,
            opcode: 0,
            quiet: false,
            noreply: false,
            maybe_silent: false,
            ts_ns,
            bytes,
            opaque: None,
            queue: None,
            seq: None,
            value_len: None,
            value_head: None,
        }
    }
}

/// A value length as kept per request: values beyond 4 GiB cannot be framed anyway.
pub(crate) fn value_len(n: u64) -> Option<u32> {
    u32::try_from(n).ok()
}
