//! The agent's shared vocabulary, defined once: tracking, the decoder, metrics, history and
//! diagnose all speak these types. Each word has one spelling, `as_str`, used for metric labels
//! and (through serde) in history and diagnose JSON. Pure: no I/O, so the decoder may use it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a field-less enum with serde's snake_case names, an `ALL` list in declaration order
/// and `as_str` returning exactly the serde name, so a label and its JSON never disagree.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$variant_meta])* #[serde(rename = $label)] $variant, )+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The value a label spells, None for any other text.
            pub fn from_label(label: &str) -> Option<$name> {
                match label {
                    $($label => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// Which side of the connection this host is.
    pub enum Role {
        Client => "client",
        Server => "server",
    }
}

vocabulary! {
    /// Which side closed a connection first.
    pub enum ClosedBy {
        /// This side sent FIN first.
        Local => "local",
        /// The other side closed first (ESTABLISHED -> CLOSE_WAIT).
        Peer => "peer",
        /// The connection ended with a reset, without an orderly close first.
        Reset => "reset",
    }
}

vocabulary! {
    /// What the application saw after writing onto a connection its peer had closed.
    pub enum DeadWriteOutcome {
        /// The next read returned end-of-file.
        Eof => "eof",
        /// The next read or write failed (ECONNRESET, EPIPE, ...).
        Reset => "reset",
        /// Nothing within the window: the application never found out.
        Unnoticed => "unnoticed",
        /// Not knowable here: a kernel without the send/receive tracepoints (before 6.4) tells
        /// the bytes written after the peer closed, from TCP's sequence numbers when the socket
        /// leaves CLOSE_WAIT, but not the application's next read. One per connection, however
        /// many writes made those bytes.
        Unknown => "unknown",
    }
}

vocabulary! {
    pub enum RetransmitKind {
        Data => "data",
        /// A client's SYN was retransmitted (no answer to the connection attempt yet).
        Syn => "syn",
        /// A listener's SYN-ACK was retransmitted (the client's final ACK did not arrive).
        SynAck => "synack",
    }
}

vocabulary! {
    pub enum ResetDirection {
        Sent => "sent",
        Received => "received",
    }
}

vocabulary! {
    /// Why a client connect never reached ESTABLISHED.
    pub enum ConnectFailureReason {
        /// The SYN was answered with a reset (nothing listening, or a REJECT rule).
        Refused => "refused",
        /// No answer: the kernel gave up retrying the SYN, or the application stopped waiting.
        Timeout => "timeout",
        /// Reset during the handshake. The tracker reports a reset SYN as `Refused`; history
        /// from elsewhere (or an older agent) may still carry this word.
        Reset => "reset",
    }
}

vocabulary! {
    pub enum SynDirection {
        /// Connection attempts from this host.
        Out => "out",
        /// Connection attempts at a local watched listener: handshakes it completed, and SYNs
        /// and handshakes it refused because a queue was full.
        In => "in",
    }
}

vocabulary! {
    /// The outcome of one memcache request (one key of a multi-key get).
    pub enum Status {
        /// A retrieval found the item (text VALUE, meta VA/HD for mg, binary get success, ME).
        Hit => "hit",
        /// A retrieval did not find the item (absent from the VALUE list, EN, binary
        /// KEY_ENOENT).
        Miss => "miss",
        Stored => "stored",
        NotStored => "not_stored",
        Exists => "exists",
        NotFound => "not_found",
        Deleted => "deleted",
        Touched => "touched",
        /// Success for commands without a more specific word (incr/decr, stats, version, mn).
        Ok => "ok",
        /// The server did not know the command (ERROR, binary UNKNOWN_COMMAND / NOT_SUPPORTED).
        Error => "error",
        ClientError => "client_error",
        ServerError => "server_error",
        /// The request asked for no reply (text `noreply`, `quit`, binary QuitQ); outcome
        /// unknown.
        Noreply => "noreply",
        /// No response arrived within the caller's timeout (see `ConnectionDecoder::expire`).
        Timeout => "timeout",
        /// The response was lost to a capture gap or truncation, or was skipped over when a
        /// later response proved the stream had moved on; the outcome is not known.
        Unknown => "unknown",
        /// The connection ended (`ConnectionDecoder::finish`) before the response arrived.
        Unanswered => "unanswered",
    }
}

impl Status {
    /// Whether the server reported a failure of the request itself (not a miss or a conflict).
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Status::Error | Status::ClientError | Status::ServerError
        )
    }

    /// A lookup that found or missed its key: the denominator of the hit ratio.
    pub fn is_lookup(self) -> bool {
        matches!(self, Status::Hit | Status::Miss)
    }

    /// The server never answered: what a hung or unreachable server looks like.
    pub fn is_no_answer(self) -> bool {
        matches!(self, Status::Timeout | Status::Unanswered)
    }

    /// The request failed (server error or no answer); client errors are the client's bug and
    /// count too, since the application saw a failure.
    pub fn is_failure(self) -> bool {
        self.is_no_answer() || self.is_error()
    }

    /// The server produced a response (anything but no answer, noreply or unknown).
    pub fn is_answer(self) -> bool {
        !self.is_no_answer() && !matches!(self, Status::Noreply | Status::Unknown)
    }
}

/// RLIMIT_NOFILE's "no limit" (`RLIM_INFINITY` on Linux), as /proc and the sampler report it.
pub const UNLIMITED: u64 = u64::MAX;

/// How much of a descriptor limit is used, the one rule behind the exported
/// `process_fd_usage_ratio`, the history and diagnose, and the EMFILE probe arming:
/// - no limit ([`UNLIMITED`]) cannot run out: 0;
/// - nothing open: 0;
/// - a zero limit with descriptors open is full (1): not one more can be opened;
/// - otherwise open / limit, above 1 when a limit was lowered below what is already open.
///
/// Always finite, so it exports as a plain gauge value.
pub fn fd_usage_ratio(open: u64, limit: u64) -> f64 {
    match (open, limit) {
        (_, UNLIMITED) | (0, _) => 0.0,
        (_, 0) => 1.0,
        (open, limit) => open as f64 / limit as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_usage_ratio_at_zero_unlimited_and_normal_limits() {
        assert_eq!(UNLIMITED, libc::RLIM_INFINITY);
        assert_eq!(fd_usage_ratio(0, 0), 0.0);
        assert_eq!(fd_usage_ratio(5, 0), 1.0);
        assert_eq!(fd_usage_ratio(0, UNLIMITED), 0.0);
        assert_eq!(fd_usage_ratio(1_000_000, UNLIMITED), 0.0);
        assert_eq!(fd_usage_ratio(512, 1024), 0.5);
        assert_eq!(fd_usage_ratio(1024, 1024), 1.0);
        assert_eq!(fd_usage_ratio(1500, 1000), 1.5);
        assert_eq!(fd_usage_ratio(0, 1024), 0.0);
        // The largest finite limit is a limit, not "unlimited".
        assert!(fd_usage_ratio(1, UNLIMITED - 1) > 0.0);
    }

    /// The label and the JSON word of every value are the same string, and `ALL` lists each
    /// value once.
    fn labels_are_the_json_words<T>(all: &[T])
    where
        T: Serialize + for<'de> Deserialize<'de> + Copy + PartialEq + fmt::Debug + fmt::Display,
    {
        let mut seen = std::collections::HashSet::new();
        for &value in all {
            let label = value.to_string();
            assert!(seen.insert(label.clone()), "{label} twice");
            assert_eq!(
                serde_json::to_string(&value).unwrap(),
                format!("\"{label}\"")
            );
            assert_eq!(
                serde_json::from_str::<T>(&format!("\"{label}\"")).unwrap(),
                value
            );
        }
    }

    #[test]
    fn every_word_is_one_string_in_labels_and_json() {
        labels_are_the_json_words(Role::ALL);
        labels_are_the_json_words(ClosedBy::ALL);
        labels_are_the_json_words(DeadWriteOutcome::ALL);
        labels_are_the_json_words(RetransmitKind::ALL);
        labels_are_the_json_words(ResetDirection::ALL);
        labels_are_the_json_words(ConnectFailureReason::ALL);
        labels_are_the_json_words(SynDirection::ALL);
        labels_are_the_json_words(Status::ALL);
        assert_eq!(Status::ALL.len(), 16);
    }

    /// Each label reads back as its value; any other text is no value.
    #[test]
    fn labels_read_back_as_their_values() {
        macro_rules! round_trip {
            ($($word:ident),+) => {$(
                for &value in $word::ALL {
                    assert_eq!($word::from_label(value.as_str()), Some(value));
                }
                assert_eq!($word::from_label("moon"), None);
                assert_eq!($word::from_label(""), None);
            )+};
        }
        round_trip!(
            Role,
            ClosedBy,
            DeadWriteOutcome,
            RetransmitKind,
            ResetDirection,
            ConnectFailureReason,
            SynDirection,
            Status
        );
        assert_eq!(Role::from_label("Client"), None, "labels are lower case");
    }

    /// The words the metric contract, the history JSON and docs/diagnose-schema.json spell.
    #[test]
    fn words_are_the_published_ones() {
        let words = |all: &[&str]| all.join(",");
        assert_eq!(
            words(&Status::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
            "hit,miss,stored,not_stored,exists,not_found,deleted,touched,ok,error,\
             client_error,server_error,noreply,timeout,unknown,unanswered"
        );
        assert_eq!(RetransmitKind::SynAck.as_str(), "synack");
        assert_eq!(DeadWriteOutcome::Unnoticed.as_str(), "unnoticed");
        assert_eq!(ConnectFailureReason::Refused.as_str(), "refused");
        assert_eq!(SynDirection::In.as_str(), "in");
    }

    #[test]
    fn status_classes() {
        assert!(Status::Hit.is_lookup() && Status::Miss.is_lookup());
        assert!(Status::Timeout.is_failure() && Status::ClientError.is_failure());
        assert!(!Status::Miss.is_failure());
        assert!(!Status::Noreply.is_answer() && Status::NotFound.is_answer());
        assert!(Status::ServerError.is_error() && !Status::Timeout.is_error());
    }
}

/// FNV-1a 64 offset basis and prime: the ids below must not depend on the host, version or
/// architecture that computed them, so no std hasher (randomly seeded) will do.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// IPv4-mapped IPv6 and IPv4 name the same endpoint: both are hashed as IPv6.
fn fnv_addr(hash: u64, addr: std::net::SocketAddr) -> u64 {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    fnv1a(fnv1a(hash, &ip.octets()), &addr.port().to_be_bytes())
}

/// A connection's id from its 4-tuple, in client/server order (not local/remote), so the
/// client's agent and the server's agent compute the same number for one connection: FNV-1a 64
/// over the server's address and port, then the client's. Port 0 (not yet bound: the
/// CLOSE->SYN_SENT state change comes before the kernel picks the source port) gives None.
/// NAT and proxies (twemproxy) change the tuple between the boxes: their ends do not agree.
pub fn flow_id(client: std::net::SocketAddr, server: std::net::SocketAddr) -> Option<u64> {
    if client.port() == 0 || server.port() == 0 {
        return None;
    }
    Some(fnv_addr(fnv_addr(FNV_OFFSET, server), client))
}

/// One request's id, the same in the client's agent and in the server's (issue 18): the
/// connection's [`flow_id`] continued (FNV-1a 64) over the TCP sequence number of the request's
/// first byte, which both ends number alike.
pub fn request_id(flow: u64, seq: u32) -> u64 {
    fnv1a(flow, &seq.to_be_bytes())
}

/// Whether a request belongs to the fixed 1-in-`one_in` slice of request ids that both ends
/// keep as exemplars whatever their latency (0: no slice). The id is mixed first (the
/// splitmix64 finaliser) because FNV's low bits follow the last byte hashed too closely for a
/// modulus.
pub fn in_exemplar_slice(request_id: u64, one_in: u32) -> bool {
    in_narrowed_exemplar_slice(request_id, one_in, 0)
}

/// The slice narrowed to 1 in `one_in << shift`. Narrower slices are subsets of wider ones
/// (multiples of `one_in << k` are multiples of `one_in`), so two ends that narrowed by
/// different steps still share every id the narrower one keeps.
pub fn in_narrowed_exemplar_slice(request_id: u64, one_in: u32, shift: u32) -> bool {
    if one_in == 0 || shift >= 32 {
        return false;
    }
    mix(request_id).is_multiple_of(u64::from(one_in) << shift)
}

/// Which requests a latency bucket keeps as its exemplar, the same order at both ends: higher
/// ranks first. An id in a narrower slice ([`in_narrowed_exemplar_slice`]) ranks above every id
/// only in wider ones (and ids outside the configured slice, exemplars only for being slow, rank
/// lowest), so where the two ends narrowed differently each prefers the ids the other most
/// likely kept too; within one slice the mixed id decides. The server's choice among all its
/// clients' requests is then also that client's choice among its own (issue 18).
pub fn exemplar_rank(request_id: u64, one_in: u32) -> u64 {
    let z = mix(request_id);
    let level = if one_in == 0 || !z.is_multiple_of(u64::from(one_in)) {
        0
    } else {
        // In 1 in `one_in << s` for every s up to the trailing zeros of z / one_in: at most 64.
        1 + u64::from((z / u64::from(one_in)).trailing_zeros())
    };
    (level << 57) | (!z >> 7)
}

/// The splitmix64 finaliser: FNV's low bits follow the last byte hashed too closely for a
/// modulus.
fn mix(request_id: u64) -> u64 {
    let mut z = request_id;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod request_id_tests {
    use super::{
        exemplar_rank, flow_id, in_exemplar_slice, in_narrowed_exemplar_slice, request_id,
    };
    use std::net::SocketAddr;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Both ends name the connection alike (IPv4 or IPv4-mapped IPv6); another client port,
    /// client address, server port or byte gives another id.
    #[test]
    fn both_ends_agree() {
        let (client, server) = (addr("10.0.0.1:40000"), addr("10.0.0.2:11211"));
        let flow = flow_id(client, server).unwrap();
        let mapped = flow_id(
            addr("[::ffff:10.0.0.1]:40000"),
            addr("[::ffff:10.0.0.2]:11211"),
        );
        assert_eq!(Some(flow), mapped);
        let id = request_id(flow, 123_456);
        assert_ne!(id, request_id(flow, 123_457));
        for (other_client, other_server) in [
            ("10.0.0.1:40001", "10.0.0.2:11211"),
            ("10.0.0.3:40000", "10.0.0.2:11211"),
            ("10.0.0.1:40000", "10.0.0.2:11212"),
        ] {
            let other = flow_id(addr(other_client), addr(other_server)).unwrap();
            assert_ne!(
                id,
                request_id(other, 123_456),
                "{other_client} {other_server}"
            );
        }
        // Client and server are not interchangeable: the order is by role, not by address.
        assert_ne!(Some(flow), flow_id(server, client));
        // Pinned: another build or host must compute the same number.
        assert_eq!(id, PINNED);
    }

    // Computed independently (Python, the same bytes) when the 4-tuple replaced the server
    // address alone.
    const PINNED: u64 = 0x6747_d6eb_feca_6893;

    #[test]
    fn an_unbound_port_has_no_flow() {
        assert_eq!(flow_id(addr("10.0.0.1:0"), addr("10.0.0.2:11211")), None);
        assert_eq!(flow_id(addr("10.0.0.1:40000"), addr("10.0.0.2:0")), None);
    }

    /// The slice is a fixed fraction of ids (so both ends pick the same requests), about
    /// 1/one_in of consecutive requests on one connection, and empty when off.
    #[test]
    fn the_exemplar_slice_is_about_one_in_n() {
        let flow = flow_id(addr("10.0.0.1:40000"), addr("10.0.0.2:11211")).unwrap();
        let ids: Vec<u64> = (0..100_000u32)
            .map(|i| request_id(flow, 1_000_000u32.wrapping_add(i * 7)))
            .collect();
        let picked = ids.iter().filter(|id| in_exemplar_slice(**id, 100)).count();
        assert!((800..=1200).contains(&picked), "{picked} of 100000");
        assert!(ids.iter().all(|id| in_exemplar_slice(*id, 1)));
        assert!(!ids.iter().any(|id| in_exemplar_slice(*id, 0)));
    }

    /// The rank orders ids by the narrowest slice they belong to, as both ends narrow: an id
    /// in 1 in `one_in << s` outranks every id that is only in wider slices, and ids outside
    /// the configured slice rank below all of its ids. Off (0): the mixed id alone.
    #[test]
    fn exemplar_rank_follows_the_narrowed_slices() {
        let flow = flow_id(addr("10.0.0.1:40000"), addr("10.0.0.2:11211")).unwrap();
        let ids: Vec<u64> = (0..50_000u32).map(|i| request_id(flow, i * 13)).collect();
        for one_in in [1u32, 3, 10, 1000] {
            // The narrowest shift each id is in (None: not in the slice at all).
            let narrowest = |id: u64| {
                (0..32)
                    .rev()
                    .find(|s| in_narrowed_exemplar_slice(id, one_in, *s))
            };
            let mut seen_levels = std::collections::BTreeSet::new();
            for pair in ids.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let (ra, rb) = (exemplar_rank(a, one_in), exemplar_rank(b, one_in));
                assert_ne!(ra, rb);
                seen_levels.insert(narrowest(a));
                if narrowest(a) != narrowest(b) {
                    assert_eq!(ra > rb, narrowest(a) > narrowest(b), "{one_in} {a:x} {b:x}");
                }
            }
            assert!(seen_levels.len() >= 3, "{one_in}: {seen_levels:?}");
        }
        assert_ne!(exemplar_rank(ids[0], 0), exemplar_rank(ids[1], 0));
    }
}
