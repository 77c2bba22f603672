//! What a response (or a quiet request's silence) means for a command: its [`Status`], and for
//! queue commands the queue operation it was.

use super::super::model::{Command, KestrelOptions, QueueOp, QueueOpKind, Status};
use super::{LineCode, QueueIntent};

pub(super) fn line_status(code: LineCode) -> Status {
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
pub(super) fn binary_status(command: Command, status: u16) -> Status {
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

/// Whether the command looks a key up and is answered per key, hit or miss (meta and binary
/// gets; a text get's keys share one answer).
pub(crate) fn is_lookup(command: Command) -> bool {
    implied_status(command) == Status::Miss
}

/// The result a quiet request's silence stands for.
pub(super) fn implied_status(command: Command) -> Status {
    match command {
        Command::MetaGet => Status::Miss,
        Command::MetaSet => Status::Stored,
        Command::MetaDelete => Status::Deleted,
        Command::MetaArithmetic => Status::Ok,
        _ if is_binary_retrieval(command) => Status::Miss,
        _ => binary_success(command),
    }
}

pub(super) fn queue_op(intent: Option<QueueIntent>, status: Status) -> Option<QueueOp> {
    let intent = intent?;
    let (op, options) = match intent {
        QueueIntent::Enqueue => (QueueOpKind::Enqueue, KestrelOptions::default()),
        QueueIntent::Fetch(o) => {
            let fetches = o.fetches();
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
