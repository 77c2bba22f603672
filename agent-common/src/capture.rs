//! Payload capture's shared terms: which connections are followed, the syscalls whose
//! buffers are read, the per-call bounds and the payload record layout.

use crate::COMM_LEN;

/// Which connections payload capture follows once the agent has to sample (a healthy
/// connection is followed or not as a whole, so each followed stream decodes from its start to
/// its end). At sample shift `k` one connection in 2^k is followed; the connections followed at
/// `k + 1` are a subset of those at `k`, so raising the shift only drops streams and lowering it
/// only adds them.
///
/// The unit sampled is the connection. The socket address alone is not one: the kernel reuses
/// a freed `tcp_sock` for the next connection at once, so a client that reconnects (a pool
/// re-opened, short connections one after another) lands on the same few addresses, and a
/// sample by address followed all of them or none: a fixed choice rather than a random one (a
/// soak saw request counts scaled from 1/16 come out 37% low). Ports do not fix it: clients
/// on several source addresses reuse the same ports, and any client reuses them after
/// TIME_WAIT. The key therefore includes `sk_txhash`, which the kernel draws at random for
/// every connection.
pub mod capture_sample {
    /// Largest shift: one connection in 1024.
    pub const MAX_SHIFT: u32 = 10;
    /// [`super::PayloadHeader::sample_shift`] of a record captured because its connection is in
    /// trouble (or the kernel cannot tell healthy ones), not as a sample: it stands for itself.
    pub const NOT_SAMPLED: u8 = 0xff;

    /// The key a connection is sampled by: its socket address, its (local, remote) ports and
    /// the kernel's random per-connection `sk_txhash` (0 when its offset is unknown).
    #[inline(always)]
    pub fn key(sk: u64, local_port: u16, remote_port: u16, txhash: u32) -> u64 {
        mix(sk) ^ (u64::from(txhash) << 32 | u64::from(local_port) << 16 | u64::from(remote_port))
    }

    /// Mixes every bit of `key` into every bit of the result. Socket addresses are slab
    /// objects in arithmetic progression; a lone multiply maps such a run onto long runs of
    /// equal low bits (whole batches of connections followed or not). This is MurmurHash3's
    /// finaliser.
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

    /// Whether the connection with `key` is followed at sample shift `shift`.
    #[inline(always)]
    pub fn is_followed(key: u64, shift: u32) -> bool {
        let mask = (1u64 << (shift & 15)) - 1;
        mix(key) & mask == 0
    }

    /// The largest shift at which the connection with `key` is still followed, at most
    /// [`MAX_SHIFT`]: `is_followed(key, k)` exactly when `k <= depth(key)`. (Counted with a
    /// fixed number of shifts, no trailing-zeros instruction: eBPF has none.)
    #[inline(always)]
    pub fn depth(key: u64) -> u32 {
        let mixed = mix(key) | 1 << MAX_SHIFT;
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
/// frames followed per call, not the value sizes.
pub const CAPTURE_BUDGET_DEFAULT: u32 = 16384;
pub const CAPTURE_BUDGET_MAX: u32 = 65536;
/// Data bytes one payload record carries; a call whose headers need more is split over several
/// records.
pub const RECORD_DATA_MAX: usize = 4096;
/// Bytes copied from user memory at a time while following frames.
pub const CAPTURE_PIECE: usize = 64;
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
    /// [`capture_sample::depth`] of the connection's key (0 when not sampled): the agent
    /// knows from it which streams a higher shift lets go.
    pub sample_depth: u8,
    pub _pad: u8,
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
    use super::capture_sample::{depth, is_followed, key, MAX_SHIFT};
    use std::vec::Vec;

    #[test]
    fn sampled_sockets_nest_and_come_in_the_right_proportion() {
        // tcp_sock objects are ~2.3 KiB apart in their slab.
        let sockets: Vec<u64> = (0..40_000u64)
            .map(|i| 0xffff_8880_0000_0000 + i * 2368)
            .collect();
        for shift in 0..=MAX_SHIFT {
            let followed = sockets.iter().filter(|&&sk| is_followed(sk, shift)).count();
            let expected = sockets.len() >> shift;
            // Four standard deviations of a fair coin per socket.
            let tolerance = 4 * (expected as f64).sqrt() as usize + 2;
            assert!(
                followed.abs_diff(expected) <= tolerance,
                "shift {shift}: {followed} followed, expected ~{expected}"
            );
            for &sk in &sockets {
                if is_followed(sk, shift + 1) {
                    assert!(
                        is_followed(sk, shift),
                        "shift {shift} does not contain {sk:#x}"
                    );
                }
                assert_eq!(
                    is_followed(sk, shift),
                    shift <= depth(sk),
                    "depth disagrees at shift {shift} for {sk:#x}"
                );
            }
        }
        assert!(sockets.iter().all(|&sk| is_followed(sk, 0)));
        assert!(sockets.iter().all(|&sk| depth(sk) <= MAX_SHIFT));
        // Any run of 256 consecutive slab objects gets its fair share at one in 8.
        for run in sockets.chunks_exact(256) {
            let followed = run.iter().filter(|&&sk| is_followed(sk, 3)).count();
            assert!(
                (16..=48).contains(&followed),
                "{followed} of 256 followed at 1/8"
            );
        }
    }

    #[test]
    fn connections_reusing_one_socket_address_are_fresh_draws() {
        // A client reconnecting one connection at a time: the kernel hands it the same freed
        // tcp_sock every time, with the next ephemeral port and a random txhash.
        let sk = 0xffff_8880_1234_5000u64;
        let txhash = |i: u32| i.wrapping_mul(0x9e37_79b9).rotate_left(13);
        let connections = 32_768u32;
        for shift in [1, 4, 8] {
            let followed = (0..connections)
                .filter(|i| {
                    let port = 32_768 + (*i % 28_000) as u16;
                    is_followed(key(sk, port, 11211, txhash(*i)), shift)
                })
                .count();
            let expected = (connections >> shift) as usize;
            let tolerance = 4 * (expected as f64).sqrt() as usize + 2;
            assert!(
                followed.abs_diff(expected) <= tolerance,
                "shift {shift}: {followed} of {connections} followed, expected ~{expected}"
            );
        }
        // The server's end of the same connections, on a kernel without the txhash offset:
        // local port fixed, remote port varying.
        let followed = (0..connections)
            .filter(|i| is_followed(key(sk, 11211, 40_000 + (*i % 20_000) as u16, 0), 4))
            .count();
        assert!(
            followed.abs_diff(2048) <= 4 * 45 + 2,
            "{followed} of 32768 at 1/16"
        );
    }
}
