//! Payload capture's shared terms: which connections are followed, the syscalls whose
//! buffers are read, the per-call bounds and the payload record layout.

use crate::COMM_LEN;

/// Which connections payload capture follows once the agent has to sample (a healthy
/// connection is followed or not as a whole between two epochs, so each followed stretch of a
/// stream decodes from a frame boundary on). At sample shift `k` one connection in 2^k is
/// followed; for one epoch, the connections followed at `k + 1` are a subset of those at `k`,
/// so raising the shift only drops streams and lowering it only adds them.
///
/// The unit sampled is the connection, keyed by its 4-tuple with the server's end first, so
/// both ends of one connection (a client host and a server host, or both on loopback) draw the
/// same: with the same shift and epoch they follow the same connections. (The socket address is
/// no key: the kernel reuses a freed `tcp_sock` for the next connection at once, and a sample
/// by address followed a reconnecting client always or never; a soak saw counts scaled from
/// 1/16 come out 37% low.) The key is made of direct loads on the tp_btf path, so a call the
/// sample does not follow returns before any helper call.
///
/// Rotation: the agent advances each slot's epoch; at epoch `e` a connection is followed when
/// the low `k` bits of its key equal those of `e`. Over 2^k consecutive epochs every connection
/// is followed exactly once, so a service with few connections is never blind for long, and
/// one connection alone over its share is followed in its turn. A followed connection is let
/// go at the next epoch (shift above 0): the agent knows that without asking the kernel.
pub mod capture_sample {
    /// Largest shift: one connection in 1024.
    pub const MAX_SHIFT: u32 = 10;
    /// The shift that follows (next to) no connection: [`is_followed`] masks the low 15 bits,
    /// so one connection in 32,768 per epoch, and its records (depth at most [`MAX_SHIFT`])
    /// belong to no sample. The agent sets it for the seconds a time-sampled slot follows
    /// nothing, with no change to the kernel's programs.
    pub const FOLLOW_NONE: u32 = 15;
    /// [`super::PayloadHeader::sample_shift`] of a record captured because its connection is in
    /// trouble (or the kernel cannot tell healthy ones), not as a sample: it stands for itself.
    pub const NOT_SAMPLED: u8 = 0xff;
    /// A CAPTURE_SAMPLE_SHIFT entry holds the slot's shift below this bit and its epoch above.
    pub const EPOCH_BIT: u32 = 16;

    /// The CAPTURE_SAMPLE_SHIFT entry of a slot sampled at `shift` in `epoch`.
    #[inline(always)]
    pub const fn entry(shift: u32, epoch: u32) -> u32 {
        (shift & ((1 << EPOCH_BIT) - 1)) | epoch << EPOCH_BIT
    }

    /// The shift of a CAPTURE_SAMPLE_SHIFT entry.
    #[inline(always)]
    pub const fn entry_shift(entry: u32) -> u32 {
        entry & ((1 << EPOCH_BIT) - 1)
    }

    /// The epoch of a CAPTURE_SAMPLE_SHIFT entry.
    #[inline(always)]
    pub const fn entry_epoch(entry: u32) -> u32 {
        entry >> EPOCH_BIT
    }

    /// The key a connection is sampled by: its server end (address, port) and its client end.
    /// Addresses as the kernel stores them (network order, loaded as native words); an IPv4
    /// address in word 0 with the others 0, and a v4-mapped IPv6 address given as its IPv4
    /// address, so a dual-stack server's socket keys like its IPv4 client's.
    #[inline(always)]
    pub fn key(server: [u32; 4], server_port: u16, client: [u32; 4], client_port: u16) -> u64 {
        let ports = u64::from(server_port) << 16 | u64::from(client_port);
        let word = |i: usize| u64::from(server[i]) << 32 | u64::from(client[i]);
        let mut key = mix(ports ^ word(0));
        // IPv4 (the usual case) is one round.
        let (w1, w2, w3) = (word(1), word(2), word(3));
        if w1 | w2 | w3 != 0 {
            key = mix(mix(mix(key ^ w1) ^ w2) ^ w3);
        }
        key
    }

    /// An address as [`key`] takes it, from its 16 bytes as the kernel stores an IPv6 one
    /// (loaded as native words): a v4-mapped address (::ffff:a.b.c.d) becomes its IPv4 address
    /// in word 0, any other stays as it is.
    #[inline(always)]
    pub fn unmapped(address: [u32; 4]) -> [u32; 4] {
        const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if address[0] | address[1] == 0 && address[2] == V4_MAPPED {
            [address[3], 0, 0, 0]
        } else {
            address
        }
    }

    /// Mixes every bit of `key` into every bit of the result: addresses and ports come in
    /// arithmetic progressions, which a lone multiply maps onto long runs of equal low bits
    /// (whole batches of connections followed or not). This is MurmurHash3's finaliser.
    #[inline(always)]
    fn mix(key: u64) -> u64 {
        let mut mixed = key;
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xff51_afd7_ed55_8ccd);
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        mixed ^= mixed >> 33;
        mixed
    }

    /// Whether the connection with `key` is followed at sample shift `shift` in `epoch`.
    #[inline(always)]
    pub fn is_followed(key: u64, shift: u32, epoch: u32) -> bool {
        let mask = (1u64 << (shift & 15)) - 1;
        (key ^ u64::from(epoch)) & mask == 0
    }

    /// The largest shift at which the connection with `key` is followed in `epoch`, at most
    /// [`MAX_SHIFT`]: `is_followed(key, k, epoch)` exactly when `k <= depth(key, epoch)`.
    /// (Counted with a fixed number of shifts, no trailing-zeros instruction: eBPF has none.)
    #[inline(always)]
    pub fn depth(key: u64, epoch: u32) -> u32 {
        let mixed = (key ^ u64::from(epoch)) | 1 << MAX_SHIFT;
        let lowest = mixed & mixed.wrapping_neg();
        let mut depth = 0;
        let mut k = 1;
        while k <= MAX_SHIFT {
            depth += u32::from(lowest >> k != 0);
            k += 1;
        }
        depth
    }
}

/// The syscalls that move memcache bytes, in the order the capture programs number them (odd:
/// sends). The buffer, always the second argument, is a plain buffer, an iovec array or a msghdr
/// depending on the syscall.
pub mod io_syscall {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const READV: usize = 2;
    pub const WRITEV: usize = 3;
    pub const RECVFROM: usize = 4;
    pub const SENDTO: usize = 5;
    pub const RECVMSG: usize = 6;
    pub const SENDMSG: usize = 7;
    pub const COUNT: usize = 8;
    pub const NAMES: [&str; COUNT] = [
        "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    ];

    pub const KIND_BUFFER: u8 = 0;
    pub const KIND_IOVEC: u8 = 1;
    pub const KIND_MSGHDR: u8 = 2;
    pub const KIND: [u8; COUNT] = [
        kind(READ),
        kind(WRITE),
        kind(READV),
        kind(WRITEV),
        kind(RECVFROM),
        kind(SENDTO),
        kind(RECVMSG),
        kind(SENDMSG),
    ];

    /// The buffer argument's kind, computed rather than looked up: the 6.1 verifier loses the
    /// bound of an index into a table (it rejected `KIND[syscall]` as a possible read at 255).
    pub const fn kind(syscall: usize) -> u8 {
        match syscall {
            READV | WRITEV => KIND_IOVEC,
            RECVMSG | SENDMSG => KIND_MSGHDR,
            _ => KIND_BUFFER,
        }
    }
}

/// Default and largest per-call capture budget: header bytes (lines, binary headers with extras
/// and key) copied from one send or receive. Value bodies are never copied, so this bounds the
/// frames followed per call, not the value sizes. The default is the largest: pymemcache's
/// set_many of 1000 keys writes 30 KB of set lines in one call, and a call with fewer header
/// bytes costs the same whatever the budget.
pub const CAPTURE_BUDGET_DEFAULT: u32 = 65536;
pub const CAPTURE_BUDGET_MAX: u32 = 65536;
/// Data bytes one payload record carries; a call whose headers need more is split over several
/// records.
pub const RECORD_DATA_MAX: usize = 4096;
/// Bytes copied from user memory at a time while following frames.
pub const CAPTURE_PIECE: usize = 128;
/// Steps (one copied piece, one skipped body stretch, or one iovec entry read) one call may
/// take; a call that needs more is marked [`payload_flags::INCOMPLETE`].
pub const CAPTURE_MAX_STEPS: u32 = 4096;

/// [`PayloadHeader::flags`] bits.
pub mod payload_flags {
    /// Capture of this call stopped before its end (budget, step bound or a line too long to
    /// follow): the bytes after the last segment were not looked at, and the next call starts
    /// afresh at a frame boundary.
    pub const INCOMPLETE: u8 = 1;
    /// [`super::PayloadHeader::seq`] holds the TCP sequence number of the call's first byte.
    pub const SEQ: u8 = 2;
    /// The call does not start where the kernel last followed this connection: calls went by
    /// unfollowed (capture off, or outside the sample), and framing starts afresh here for both
    /// directions ([`crate::framing::SocketFrames::resume`]). Only on a call's first record.
    pub const RESUMED: u8 = 4;
}

/// One payload record: this header, then `data_len` bytes of segments. A segment is a
/// [`SegmentHeader`] (8-byte aligned within the data) followed by the `len` bytes of the call
/// found at `offset`. Bytes of `[span_start, span_end)` outside every segment are value bodies
/// the kernel skipped by their declared length (or, with [`payload_flags::INCOMPLETE`], bytes
/// after the capture stopped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PayloadHeader {
    pub ts_ns: u64,
    pub sk: u64,
    /// Bytes the whole send or receive transferred.
    pub total_len: u64,
    /// The part of the call this record covers (a call with many frames may need several
    /// records, in order).
    pub span_start: u32,
    pub span_end: u32,
    pub pid: u32,
    pub data_len: u16,
    pub is_send: u8,
    pub syscall: u8,
    pub flags: u8,
    /// The sample shift the kernel captured this record under as a sample of healthy
    /// connections (it stands for 2^shift records), or [`capture_sample::NOT_SAMPLED`].
    pub sample_shift: u8,
    /// [`capture_sample::depth`] of the connection's key in `sample_epoch` (0 when not
    /// sampled): the agent knows from it which streams a higher shift lets go.
    pub sample_depth: u8,
    /// The low 8 bits of the slot's epoch the record was captured in (0 when not sampled):
    /// a record read after the agent advanced the epoch still counts under its own.
    pub sample_epoch: u8,
    /// TCP sequence number of the call's first byte (`write_seq` after a send, `copied_seq`
    /// after a receive, minus the bytes the call moved), valid with [`payload_flags::SEQ`].
    pub seq: u32,
    pub comm: [u8; COMM_LEN],
}

/// Bytes of [`PayloadHeader`]: the smallest valid payload record.
pub const PAYLOAD_HEADER_LEN: usize = 64;
const _: () = assert!(core::mem::size_of::<PayloadHeader>() == PAYLOAD_HEADER_LEN);
const _: () = assert!(core::mem::offset_of!(PayloadHeader, seq) == 44);

/// Where one segment of captured bytes lies in its call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SegmentHeader {
    pub offset: u32,
    pub len: u32,
}
pub const SEGMENT_HEADER_LEN: usize = 8;
const _: () = assert!(core::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_LEN);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::capture_sample::{
        depth, entry, entry_epoch, entry_shift, is_followed, key, unmapped, MAX_SHIFT,
    };
    use std::vec::Vec;

    fn v4(addr: u32) -> [u32; 4] {
        [addr, 0, 0, 0]
    }

    /// Connections of 8 client hosts to one server, with ephemeral ports in sequence.
    fn connections(count: u32) -> Vec<u64> {
        (0..count)
            .map(|i| {
                let client = 0x0a00_0001u32.wrapping_add(i % 8).to_be();
                key(
                    v4(0x0a00_0064u32.to_be()),
                    11211,
                    v4(client),
                    32_768 + (i / 8) as u16,
                )
            })
            .collect()
    }

    #[test]
    fn sampled_connections_nest_and_come_in_the_right_proportion() {
        let keys = connections(40_000);
        for epoch in [0, 1, 77] {
            for shift in 0..=MAX_SHIFT {
                let followed = keys
                    .iter()
                    .filter(|&&k| is_followed(k, shift, epoch))
                    .count();
                let expected = keys.len() >> shift;
                // Four standard deviations of a fair coin per connection.
                let tolerance = 4 * (expected as f64).sqrt() as usize + 2;
                assert!(
                    followed.abs_diff(expected) <= tolerance,
                    "shift {shift}: {followed} followed, expected ~{expected}"
                );
                for &k in &keys {
                    if is_followed(k, shift + 1, epoch) {
                        assert!(is_followed(k, shift, epoch), "shift {shift} does not nest");
                    }
                    assert_eq!(is_followed(k, shift, epoch), shift <= depth(k, epoch));
                }
            }
        }
        assert!(keys.iter().all(|&k| is_followed(k, 0, 5)));
        assert!(keys.iter().all(|&k| depth(k, 3) <= MAX_SHIFT));
        // Any run of 256 consecutive connections gets its fair share at one in 8.
        for run in keys.chunks_exact(256) {
            let followed = run.iter().filter(|&&k| is_followed(k, 3, 0)).count();
            assert!(
                (16..=48).contains(&followed),
                "{followed} of 256 followed at 1/8"
            );
        }
    }

    #[test]
    fn every_connection_is_followed_once_in_a_rotation() {
        let keys = connections(64);
        for shift in [1, 3, 6] {
            for &k in &keys {
                let turns = (0..1u32 << shift)
                    .filter(|&epoch| is_followed(k, shift, 1000 + epoch))
                    .count();
                assert_eq!(turns, 1, "shift {shift}");
                // Never in two epochs running: the agent lets a stream go at each advance.
                assert!(!(is_followed(k, shift, 7) && is_followed(k, shift, 8)));
            }
        }
    }

    #[test]
    fn both_ends_and_both_families_key_alike_and_ports_matter() {
        let server = v4(0x7f00_0001u32.to_be());
        let a = key(server, 11211, server, 40_000);
        assert_eq!(a, key(server, 11211, server, 40_000));
        assert_ne!(a, key(server, 11211, server, 40_001));
        assert_ne!(a, key(server, 11212, server, 40_000));
        let v6 = [0x2001_0db8u32.to_be(), 0, 0, 1u32.to_be()];
        assert_ne!(
            key(v6, 11211, v6, 40_000),
            key(server, 11211, server, 40_000)
        );
        // A dual-stack server's socket holds its IPv4 client's address v4-mapped.
        let words = |bytes: [u8; 16]| {
            let word = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap());
            [word(0), word(4), word(8), word(12)]
        };
        let mapped = words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(unmapped(mapped), server);
        assert_eq!(key(unmapped(mapped), 11211, unmapped(mapped), 40_000), a);
        assert_eq!(unmapped(v6), v6);
        let compatible = words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 127, 0, 0, 1]);
        assert_eq!(
            unmapped(compatible),
            compatible,
            "only ::ffff:0:0/96 is mapped"
        );
    }

    #[test]
    fn an_entry_holds_shift_and_epoch() {
        for (shift, epoch) in [(0, 0), (10, 1), (3, 0xffff), (7, 12_345)] {
            let packed = entry(shift, epoch);
            assert_eq!((entry_shift(packed), entry_epoch(packed)), (shift, epoch));
        }
        assert_eq!(entry(4, 0), 4, "epoch 0 is the bare shift");
    }
}
