//! Pure memcache protocol decoder: bytes in, typed observations out. No I/O, no knowledge of
//! probes, sockets or metrics, so it can be unit-tested, fuzzed and benchmarked on its own.
//!
//! One [`ConnectionDecoder`] per TCP connection is fed the connection's payloads in order, as
//! [`Chunk`]s that may hold only a prefix of each send/receive. It decodes the text protocol
//! (classic and meta commands) and the binary protocol, detected per connection, pairs
//! requests with responses (pipelining, `noreply`, binary quiet opcodes, meta `q`/`mn`,
//! multi-key gets) and reports each finished request as a [`Decoded`].
//!
//! Framing uses the full byte count of every payload: value blocks are skipped by their
//! declared length, never scanned, so a payload whose capture ends early is still framed
//! correctly as long as its command/response lines were captured. Where framing is lost
//! (garbage, lost events, a line cut by the capture) the decoder reports a
//! [`DecodeErrorReason`], resynchronises at the next plausible command/response start, and
//! keeps responses to unseen requests from being paired with later requests.
//!
//! Every buffer is bounded by [`DecoderConfig`]; nothing allocates per command once a
//! connection's queues have warmed up.
//!
//! How the caller drives it: [`ConnectionDecoder::feed`] for every payload in time order
//! (the two directions interleaved), [`ConnectionDecoder::note_gap`] when events of a
//! direction were lost, [`ConnectionDecoder::resume`] when the stream is followed again after
//! a stretch nobody followed, [`ConnectionDecoder::expire`] periodically, and
//! [`ConnectionDecoder::finish`] when the connection closes. Observations are appended to a
//! caller-owned vector; read them and `clear()` it to keep its capacity. Requests are reported
//! when they finish, so observations are in completion order, not send order.
//!
//! Pairing without identity (text and meta responses carry no request id unless the client
//! used meta `O`/`k`) relies on order and on which answers each command can get:
//! - A response belongs to the first outstanding request it fits; requests passed over are
//!   finished as implied (quiet) or [`Status::Unknown`] (their answer went missing).
//! - Where requests were lost (gap, truncated capture, garbage, overflow) a marker makes
//!   later responses prove they belong to a later request; errors prove nothing. A marker gives
//!   up after 8 rejected answers so a lost answer cannot block pairing for good.
//! - Quiet requests that succeed are never answered, so when the queue is full the oldest
//!   quiet one not yet answered gives way to the newer request (a mutation finishes with what
//!   its silence means, a get as [`Status::Unknown`]; both count as `pending_overflow`): a
//!   quiet batch longer than the queue cannot leave it full for good. A binary answer that
//!   fits none of the requests before a marker settles the quiet ones at the front too.
//! - Quiet meta mutations (`ms`/`md`/`ma` with `q`) answer only on failure, so an answer that
//!   also fits the next non-quiet request is given to that one. Quiet `mg` hits are given to
//!   the first quiet `mg` unless the answer carries its key (`k`) or opaque (`O`).
//! - When a payload ends in bytes that were not captured, exactly at a line boundary, and only
//!   one fixed answer of that length fits the next request (END, MN, a bare binary NoOp or
//!   success header), it is taken as that answer; otherwise the outstanding requests finish as
//!   [`Status::Unknown`] with a `truncated_capture` error.
//! - When a client payload ends in bytes that were not captured and they hold more than the
//!   request they cut, the requests lost there count as one [`Status::Unknown`] of the command
//!   read last (a batch the capture cut); answers of theirs that say what they are (`STORED`,
//!   a binary GetKQ hit, a meta `VA`) still count as such.
//!
//! Label scheme: [`Command::as_str`] (`command` label), [`Status::as_str`] (`status`),
//! [`QueueOpKind::as_str`] (queue `op`), [`DecodeErrorReason::as_str`] (`reason`); each enum has
//! an `ALL` list with every value.
//!
//! The one part that knows about connections is [`decoders`]: the per-socket table that feeds
//! captured payload records to a `ConnectionDecoder` each and ties what they decode to the
//! connection's endpoint ([`decoders::MemcacheEvent`]).

mod binary;
pub mod decoders;
mod error_text;
mod lines;
mod meta;
mod model;
mod pairing;
mod text;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use error_text::{ErrorText, ERROR_TEXT_LEN};
pub use model::{
    Command, CommandProtocol, DecodeErrorObservation, DecodeErrorReason, Decoded, Direction,
    KestrelOptions, Key, QueueOp, QueueOpKind, RequestObservation, Status, ValueHead, WireProtocol,
    KEY_CAPACITY, VALUE_HEAD_LEN,
};

use binary::BinFramer;
use lines::TextFramer;
use pairing::{push_error, Pairing, RequestInfo};

/// A captured part of one send or receive on the connection.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub direction: Direction,
    pub ts_ns: u64,
    /// The first bytes of the payload (all of it when `captured.len() == total_len`).
    pub captured: &'a [u8],
    /// The payload's full length. Bytes past `captured` were sent but not captured.
    pub total_len: usize,
    /// TCP sequence number of the chunk's first byte, when known. Both ends of a connection
    /// number its bytes alike, so requests carry the number of their first byte
    /// ([`RequestObservation::seq`]): the client's and the server's view of one request meet on
    /// it.
    pub seq: Option<u32>,
}

/// Which encoding to expect; `Auto` decides per connection from the first captured byte
/// (0x80 from the client or 0x81 from the server means binary, anything else text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolHint {
    #[default]
    Auto,
    Text,
    Binary,
}

/// Bounds and modes for one connection's decoder. Values out of range are clamped by
/// [`ConnectionDecoder::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderConfig {
    pub protocol_hint: ProtocolHint,
    /// Starling/Kestrel semantics: `set` enqueues, `get` dequeues; keys are queue names with
    /// optional Kestrel options (`<queue>/t=500/open`).
    pub queue_mode: bool,
    /// How many bytes of each key to keep (at most [`KEY_CAPACITY`]).
    pub max_key_len: usize,
    /// Outstanding requests kept for pairing; more are dropped (or, when the oldest is quiet,
    /// it is finished early) and counted as `pending_overflow`.
    pub max_pending: usize,
    /// Keys of outstanding requests kept (multi-key gets hold one per key).
    pub max_pending_keys: usize,
    /// Longest command/response line decoded; also the most buffered for a line that spans
    /// chunks. Longer lines are decoded from their prefix and counted as `line_too_long`.
    pub max_line_len: usize,
    /// Largest declared value length accepted when framing (memcached's ceiling is 1 GiB).
    pub max_value_len: u64,
    /// Report each value's first bytes ([`RequestObservation::value_head`]). Off only to
    /// measure what it costs.
    pub value_heads: bool,
    /// Report value sizes and keys per request ([`RequestObservation::value_len`],
    /// [`RequestObservation::keys_in_request`]). Off only to measure what they cost: lengths
    /// are still parsed, since framing needs them, but observations carry none.
    pub sizes: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            protocol_hint: ProtocolHint::Auto,
            queue_mode: false,
            max_key_len: KEY_CAPACITY,
            // Real clients' bulk calls put one request per key in flight at once (dalli's
            // get_multi, pymemcache's set_many, bmemcached's setq batches: 300-1000 is
            // ordinary); 128 lost most of such a batch, and its misses with it.
            max_pending: 4096,
            max_pending_keys: 4096,
            // What the kernel follows (`framing::MAX_LINE`): a multi-key get of a few hundred
            // keys is longer than memcached's own 2 KiB line buffer, which it reads past.
            max_line_len: agent_common::framing::MAX_LINE as usize,
            max_value_len: 1 << 30,
            value_heads: true,
            sizes: true,
        }
    }
}

/// Bytes the decoder could not decode, per direction (skipped while resynchronising or
/// unframeable after a truncated capture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecoderStats {
    pub undecoded_client_bytes: u64,
    pub undecoded_server_bytes: u64,
}

/// Decodes one TCP connection. Not thread-safe by design: one owner per connection.
#[derive(Debug)]
pub struct ConnectionDecoder {
    config: DecoderConfig,
    wire: Option<WireProtocol>,
    client_text: TextFramer,
    server_text: TextFramer,
    client_binary: BinFramer,
    server_binary: BinFramer,
    /// A text storage request whose data block has not fully arrived.
    inflight: Option<RequestInfo>,
    pairing: Pairing,
    last_ts: u64,
    stats: DecoderStats,
    /// TCP sequence number of the client's byte at stream offset 0 as the client framers count
    /// (wrapping), from the last client chunk that carried one; None after lost bytes until
    /// the next.
    client_seq_base: Option<u32>,
}

/// The four framers of a stream that starts at a frame boundary (client and server, text and
/// binary): a new connection's, and a stream's followed again after a stretch nobody followed.
fn fresh_framers(config: &DecoderConfig) -> (TextFramer, TextFramer, BinFramer, BinFramer) {
    (
        TextFramer::new(config.max_line_len, config.value_heads),
        TextFramer::new(config.max_line_len, config.value_heads),
        BinFramer::new(
            binary::REQUEST_MAGIC,
            config.max_value_len,
            config.value_heads,
        ),
        BinFramer::new(
            binary::RESPONSE_MAGIC,
            config.max_value_len,
            config.value_heads,
        ),
    )
}

impl ConnectionDecoder {
    pub fn new(config: DecoderConfig) -> ConnectionDecoder {
        let config = DecoderConfig {
            max_key_len: config.max_key_len.clamp(1, KEY_CAPACITY),
            max_pending: config.max_pending.max(1),
            max_pending_keys: config.max_pending_keys.max(1),
            // A line must at least hold a command word and a key.
            max_line_len: config.max_line_len.max(64),
            ..config
        };
        let wire = match config.protocol_hint {
            ProtocolHint::Auto => None,
            ProtocolHint::Text => Some(WireProtocol::Text),
            ProtocolHint::Binary => Some(WireProtocol::Binary),
        };
        let (client_text, server_text, client_binary, server_binary) = fresh_framers(&config);
        ConnectionDecoder {
            client_text,
            server_text,
            client_binary,
            server_binary,
            inflight: None,
            pairing: Pairing::new(
                config.max_pending,
                config.max_pending_keys,
                config.max_key_len,
                config.sizes,
            ),
            wire,
            last_ts: 0,
            stats: DecoderStats::default(),
            client_seq_base: None,
            config,
        }
    }

    /// The connection's encoding, once known.
    pub fn wire_protocol(&self) -> Option<WireProtocol> {
        self.wire
    }

    /// Requests waiting for a response.
    pub fn pending(&self) -> usize {
        self.pairing.pending_len()
    }

    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Bytes the two text line buffers hold room for: at most `max_line_len` each while a
    /// line is open, little between lines.
    pub fn line_buffer_capacity(&self) -> usize {
        self.client_text.buffer_capacity() + self.server_text.buffer_capacity()
    }

    /// Decodes one chunk, appending what finished to `out`.
    pub fn feed(&mut self, chunk: Chunk<'_>, out: &mut Vec<Decoded>) {
        let total = chunk.total_len;
        if total == 0 {
            return;
        }
        let captured = &chunk.captured[..chunk.captured.len().min(total)];
        let ts = chunk.ts_ns;
        self.last_ts = ts;
        let wire = match self.wire {
            Some(wire) => wire,
            None => match captured.first() {
                Some(&first) => {
                    let binary = match chunk.direction {
                        Direction::ClientToServer => first == binary::REQUEST_MAGIC,
                        Direction::ServerToClient => first == binary::RESPONSE_MAGIC,
                    };
                    let wire = if binary {
                        WireProtocol::Binary
                    } else {
                        WireProtocol::Text
                    };
                    self.wire = Some(wire);
                    wire
                }
                None => {
                    self.count_undecoded(chunk.direction, total as u64);
                    return;
                }
            },
        };
        if chunk.direction == Direction::ClientToServer {
            if let Some(seq) = chunk.seq {
                let fed = match wire {
                    WireProtocol::Text => self.client_text.fed(),
                    WireProtocol::Binary => self.client_binary.fed(),
                };
                self.client_seq_base = Some(seq.wrapping_sub(fed as u32));
            }
        }
        let seq_base = self.client_seq_base;
        let undecoded = match (wire, chunk.direction) {
            (WireProtocol::Text, Direction::ClientToServer) => {
                let mut sink = text::RequestSink {
                    pairing: &mut self.pairing,
                    inflight: &mut self.inflight,
                    config: &self.config,
                    out,
                    seq_base,
                    seq: None,
                    cut_claim: 0,
                };
                self.client_text.feed(captured, total, ts, &mut sink)
            }
            (WireProtocol::Text, Direction::ServerToClient) => {
                let mut sink = text::ResponseSink {
                    pairing: &mut self.pairing,
                    out,
                    value_heads: self.config.value_heads,
                };
                self.server_text.feed(captured, total, ts, &mut sink)
            }
            (WireProtocol::Binary, Direction::ClientToServer) => {
                let mut sink = binary::RequestSink {
                    pairing: &mut self.pairing,
                    out,
                    seq_base,
                    seq: None,
                    cut_lookup: None,
                };
                self.client_binary.feed(captured, total, ts, &mut sink)
            }
            (WireProtocol::Binary, Direction::ServerToClient) => {
                let mut sink = binary::ResponseSink {
                    pairing: &mut self.pairing,
                    out,
                };
                self.server_binary.feed(captured, total, ts, &mut sink)
            }
        };
        if chunk.direction == Direction::ServerToClient {
            self.pairing.response_progress(ts, undecoded < total as u64);
        }
        self.count_undecoded(chunk.direction, undecoded);
    }

    /// Reports that events of one direction were lost between the last chunk and the next.
    /// Takes `out` because it can finish requests.
    /// Client side: requests may be missing, so responses must prove which request they
    /// answer. Server side: the responses to everything outstanding may be gone, so those
    /// requests finish as [`Status::Unknown`].
    pub fn note_gap(&mut self, direction: Direction, out: &mut Vec<Decoded>) {
        let ts = self.last_ts;
        push_error(out, DecodeErrorReason::Gap, direction, ts);
        match direction {
            Direction::ClientToServer => {
                self.client_text.reset_to_resync();
                self.client_binary.reset_to_resync();
                // The framers' offsets no longer count the client's bytes one for one.
                self.client_seq_base = None;
                // The server has the whole storage command even if we lost its tail.
                if let Some(req) = self.inflight.take() {
                    self.pairing.submit(req, out);
                }
                self.pairing.push_marker(ts);
            }
            Direction::ServerToClient => {
                self.server_text.reset_to_resync();
                self.server_binary.reset_to_resync();
                self.pairing.lose_responses(ts, out);
            }
        }
    }

    /// The capture of a client call stopped `unread` bytes before its end (the kernel's
    /// per-call budget: a batch of thousands of requests in one send). Those bytes are fed as
    /// not captured, as a prefix capture's are: a request line they cut decodes from what was
    /// read, and the requests after it count as one [`Status::Unknown`] rather than vanish
    /// (how many they were is not known). The kernel follows the next call afresh; the framer
    /// resynchronises there.
    pub fn lose_request_tail(
        &mut self,
        ts_ns: u64,
        seq: Option<u32>,
        unread: usize,
        out: &mut Vec<Decoded>,
    ) {
        self.feed(
            Chunk {
                direction: Direction::ClientToServer,
                ts_ns,
                captured: &[],
                total_len: unread,
                seq,
            },
            out,
        );
    }

    /// The stream went on unfollowed (capture was off, or the sample let the connection go)
    /// and is followed again from the next chunk, which the kernel starts at a frame boundary
    /// in both directions. Requests sent before `followed_again_ns` (all waiting ones when
    /// None: when the stretch ended is unknown) had their answers in the stretch nobody
    /// followed: they finish as [`Status::Unknown`] with one `gap` error, the one exchange the
    /// switch cut; later ones keep waiting (a client's next request can go out before the read
    /// that shows the skipped answer). When nothing was cut nothing is counted. The framers
    /// start afresh, as for a new connection.
    pub fn resume(&mut self, followed_again_ns: Option<u64>, out: &mut Vec<Decoded>) {
        if let Some(req) = self.inflight.take() {
            self.pairing.submit(req, out);
        }
        if self.pairing.lose_responses_before(followed_again_ns, out) {
            push_error(
                out,
                DecodeErrorReason::Gap,
                Direction::ServerToClient,
                self.last_ts,
            );
        }
        (
            self.client_text,
            self.server_text,
            self.client_binary,
            self.server_binary,
        ) = fresh_framers(&self.config);
        self.client_seq_base = None;
    }

    /// Whether a request waits for its answer (or for the rest of its data block).
    pub fn is_waiting(&self) -> bool {
        self.inflight.is_some() || self.pairing.pending_len() > 0
    }

    /// Finishes requests sent at least `timeout_ns` before `now_ns` without a response, or
    /// whose answer started but made no progress for `timeout_ns`:
    /// as [`Status::Timeout`], or for quiet requests with the result their silence implies.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<Decoded>) {
        self.pairing.expire(now_ns, timeout_ns, out);
    }

    /// The connection closed: everything outstanding finishes ([`Status::Unanswered`], the
    /// implied result for quiet requests, or [`Status::Ok`] for a binary quit, which the close
    /// answers).
    pub fn finish(&mut self, out: &mut Vec<Decoded>) {
        if let Some(req) = self.inflight.take() {
            self.pairing.submit(req, out);
        }
        self.pairing.finish(out);
    }

    fn count_undecoded(&mut self, direction: Direction, bytes: u64) {
        match direction {
            Direction::ClientToServer => self.stats.undecoded_client_bytes += bytes,
            Direction::ServerToClient => self.stats.undecoded_server_bytes += bytes,
        }
    }
}
