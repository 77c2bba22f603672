//! Payload capture: inside a send or receive on a captured socket, the running syscall's
//! user registers name the buffer; a bounded prefix of the bytes moved is copied from it. No
//! syscall tracepoint takes part (see `SyscallRegs`).

use crate::maps::{
    bump, offsets, CAPTURE, CAPTURE_LEN, CAPTURE_SAMPLE_SHIFT, FRAMES, PAYLOADS,
    PAYLOADS_WAKEUP_BYTES, SOCKETS,
};
use crate::ring::wakeup_flags;
use crate::send_recv::learn;
use crate::sock::{load_btf, read_kernel_field, SockPorts};
use crate::storage::SkWatch;
use agent_common::{
    capture_sample,
    framing::{self, FrameState, SocketFrames},
    io_syscall, payload_flags, watch, KernelCounter, PayloadHeader, SegmentHeader, AF_INET,
    AF_INET6, CAPTURE_MAX_STEPS, CAPTURE_PIECE, OFFSET_UNKNOWN, PAYLOAD_HEADER_LEN,
    RECORD_DATA_MAX, SEGMENT_HEADER_LEN,
};
use aya_ebpf::{
    bindings::BPF_RB_AVAIL_DATA, helpers::bpf_get_current_comm, helpers::bpf_get_current_pid_tgid,
    helpers::bpf_ktime_get_ns, helpers::bpf_probe_read_user,
    helpers::generated::bpf_get_current_task_btf, helpers::generated::bpf_loop,
    helpers::generated::bpf_probe_read_user as probe_read_user_raw,
    helpers::generated::bpf_ringbuf_output, helpers::generated::bpf_task_pt_regs,
};

/// Per-CPU state of one call's capture: the record being built (its header, then twice its data
/// size, because the verifier bounds a copy's offset and length separately, plus one word so
/// the scan's aligned word loads stay inside), and where the walk through the call's buffers
/// stands. The record goes to the ring with a bounded length.
#[repr(C)]
pub(crate) struct CaptureWalk {
    header: PayloadHeader,
    data: [u8; 2 * RECORD_DATA_MAX + 8],
    frames: FrameState,
    total: u64,
    pos: u64,
    budget: u64,
    data_len: u64,
    /// Data offset of the open segment's header, or NO_SEGMENT.
    segment: u64,
    /// Call offset where the open segment ends: a piece starting there extends it.
    segment_end: u64,
    flags: u64,
    /// Record data offset of the piece being scanned, how far the scan is into it, its length
    /// (cut back where a round declines a binary header the piece cuts), and whether the piece
    /// was cut short of the call's bytes in this buffer (1) or not (0).
    scan_at: u64,
    scan_pos: u64,
    scan_len: u64,
    scan_more: u64,
    iov: u64,
    iov_count: u64,
    iov_index: u64,
    iov_base: u64,
    iov_len: u64,
    iov_off: u64,
    /// iovec entries read ahead from user memory, `[base, len]` each: entries
    /// `iov_batch_start .. iov_batch_start + iov_batch_len` of the call's array. One user read
    /// per batch instead of one per entry (memcached replies with 3 entries per value, clients
    /// send a get in up to 4): a user read is the dearest step of a followed call.
    iov_batch: [[u64; 2]; IOV_BATCH as usize],
    iov_batch_start: u64,
    iov_batch_len: u64,
}

/// Most iovec entries followed in one call (the kernel's UIO_MAXIOV).
const IOV_MAX: u64 = 1024;
/// iovec entries read from user memory at once.
const IOV_BATCH: u64 = 8;

/// A record's place in the capture sample as its header carries it: (shift, depth, epoch).
pub(crate) type SampleTag = (u8, u8, u8);

/// `capture_payload`'s `sample` for a connection captured for its trouble, not as a sample.
pub(crate) const NOT_A_SAMPLE: SampleTag = (capture_sample::NOT_SAMPLED, 0, 0);

/// A healthy captured call's draw in the capture sample ([`capture_sample`]): the
/// SAMPLED_CALLS index of its service's slot and role, the slot's CAPTURE_SAMPLE_SHIFT entry
/// (shift and epoch from one lookup) and the connection's key.
pub(crate) struct Draw {
    pub(crate) calls: u32,
    entry: u32,
    key: u64,
}

impl Draw {
    /// The service is the local port when it is watched (the server role), else the remote one
    /// (client role), as in `capture_flags`; its slot picks its own sample. The key puts the
    /// server's end first, so both ends of a connection draw alike. `addresses` gives the
    /// connection's (local, remote) addresses as [`key_addresses`] makes them.
    #[inline(always)]
    pub(crate) fn new(
        local_bits: u8,
        remote_bits: u8,
        ports: &SockPorts,
        addresses: impl FnOnce() -> ([u32; 4], [u32; 4]),
    ) -> Draw {
        let (local, remote) = addresses();
        let (slot, client, key) = if local_bits & watch::WATCHED != 0 {
            let key = capture_sample::key(local, ports.local, remote, ports.remote);
            (watch::slot(local_bits), false, key)
        } else {
            let key = capture_sample::key(remote, ports.remote, local, ports.local);
            (watch::slot(remote_bits), true, key)
        };
        Draw {
            calls: watch::calls_index(slot, client),
            entry: CAPTURE_SAMPLE_SHIFT.get(slot).copied().unwrap_or(0),
            key,
        }
    }

    #[inline(always)]
    pub(crate) fn followed(&self) -> bool {
        let entry = self.entry;
        capture_sample::is_followed(
            self.key,
            capture_sample::entry_shift(entry),
            capture_sample::entry_epoch(entry),
        )
    }

    /// The tag of a followed call's records; the depth is worked out only here, for them.
    #[inline(always)]
    pub(crate) fn tag(&self) -> SampleTag {
        let epoch = capture_sample::entry_epoch(self.entry);
        (
            capture_sample::entry_shift(self.entry) as u8,
            capture_sample::depth(self.key, epoch) as u8,
            epoch as u8,
        )
    }
}

/// A connection's (local, remote) addresses as the sample key takes them, from its `family`:
/// `v4` gives the IPv4 pair (local, remote), `v6` the IPv6 one, each read only for its family.
/// A v4-mapped IPv6 address counts as its IPv4 address, so a dual-stack server's socket keys
/// like its IPv4 client's; another family keys by ports alone.
#[inline(always)]
pub(crate) fn key_addresses(
    family: u16,
    v4: impl FnOnce() -> (u32, u32),
    v6: impl FnOnce() -> ([u32; 4], [u32; 4]),
) -> ([u32; 4], [u32; 4]) {
    if family == AF_INET {
        let (local, remote) = v4();
        ([local, 0, 0, 0], [remote, 0, 0, 0])
    } else if family == AF_INET6 {
        let (local, remote) = v6();
        (
            capture_sample::unmapped(local),
            capture_sample::unmapped(remote),
        )
    } else {
        ([0; 4], [0; 4])
    }
}

/// A saved user register of the current task, at `offset` in the BTF-typed `struct pt_regs`
/// that `bpf_task_pt_regs` returns ([`load_btf`]: a direct load, not one of three
/// `bpf_probe_read_kernel` calls per followed call).
#[inline(always)]
fn load_reg(regs: *const u8, offset: u16) -> Option<u64> {
    (offset != OFFSET_UNKNOWN).then(|| load_btf(regs, offset))
}

/// The [`io_syscall`] index of the syscall whose number is `number`.
#[inline(always)]
fn io_syscall_index(numbers: &[u64; io_syscall::COUNT], number: u64) -> Option<usize> {
    (0..io_syscall::COUNT).find(|&index| numbers[index] == number)
}

/// Follows the frames of one send or receive on a captured socket (see
/// [`agent_common::framing`]): frame headers are copied into payload records, value bodies are
/// skipped by their declared length, across iovecs and across calls.
///
/// `ports` is given on the healthy fast path, which never looks the socket up: a socket first
/// captured there that the programs do not know yet existed before the agent and is adopted
/// here (the agent must know its endpoint before its payloads can be decoded).
/// `sample`: the tag of a record captured as a sample of healthy connections, or
/// [`NOT_A_SAMPLE`]. `storage`: the socket's storage on the tp_btf path, which holds its frame
/// positions (NULL: they are in FRAMES).
#[inline(always)]
pub(crate) fn capture_payload(
    sk: u64,
    ret: i32,
    is_send: bool,
    ports: Option<&SockPorts>,
    sample: SampleTag,
    storage: *mut SkWatch,
) {
    if ret <= 0 {
        return;
    }
    let budget = unsafe { core::ptr::read_volatile(&CAPTURE_LEN) } as u64;
    if budget == 0 {
        return;
    }
    let layout = &offsets().syscall_regs;
    // SAFETY: helpers on the current task, whose saved user registers stay valid while it runs
    // this syscall. A kernel thread has none and yields 0.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        bump(KernelCounter::UncapturedSyscall);
        return;
    }
    let Some(number) = load_reg(regs, layout.number) else {
        return;
    };
    let syscall = match io_syscall_index(&layout.numbers, number) {
        // The direction must agree too: a send inside a read is something else (and the
        // buffer would be wrong).
        Some(syscall) if (syscall % 2 == 1) == is_send => syscall,
        _ => {
            bump(KernelCounter::UncapturedSyscall);
            return;
        }
    };
    let Some(buffer) = load_reg(regs, layout.second_arg) else {
        return;
    };
    let frames = if !storage.is_null() {
        // SAFETY: this socket's storage, valid for this program run.
        let watch = unsafe { &mut *storage };
        if watch.captured == 0 {
            if let Some(ports) = ports {
                if unsafe { SOCKETS.get(sk) }.is_none() {
                    // Before the record: the adoption event's timestamp must come first.
                    learn(sk, ports, ret, is_send, unsafe { bpf_ktime_get_ns() });
                }
            }
            watch.captured = 1;
        }
        &mut watch.frames as *mut SocketFrames
    } else {
        match FRAMES.get_ptr_mut(sk) {
            Some(frames) => frames,
            None => {
                if let Some(ports) = ports {
                    if unsafe { SOCKETS.get(sk) }.is_none() {
                        // Before the record: the adoption event's timestamp must come first.
                        learn(sk, ports, ret, is_send, unsafe { bpf_ktime_get_ns() });
                    }
                }
                if FRAMES.insert(sk, SocketFrames::default(), 0).is_err() {
                    bump(KernelCounter::FrameMapFull);
                    return;
                }
                match FRAMES.get_ptr_mut(sk) {
                    Some(frames) => frames,
                    None => return,
                }
            }
        }
    };
    let Some(scratch) = CAPTURE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot (nothing else runs on this CPU during this program) and a
    // map value that stays valid for this program run.
    let (walk, frames) = unsafe { (&mut *scratch, &mut *frames) };
    // The call has already moved the socket's sequence number past its bytes: step back to
    // its first byte, the number both ends of the connection know it by.
    let seq_offset = if is_send {
        offsets().tcp_write_seq
    } else {
        offsets().tcp_copied_seq
    };
    let first_seq =
        read_kernel_field::<u32>(sk, seq_offset).map(|next| next.wrapping_sub(ret as u32));
    walk.flags = if first_seq.is_some() {
        payload_flags::SEQ as u64
    } else {
        0
    };
    if frames.resume(is_send, first_seq, ret as u32) {
        walk.flags |= payload_flags::RESUMED as u64;
    }
    let state = if is_send {
        &mut frames.send
    } else {
        &mut frames.recv
    };
    state.start_call();
    walk.frames = *state;
    walk.total = ret as u64;
    walk.pos = 0;
    walk.budget = budget;
    walk.data_len = 0;
    walk.segment = NO_SEGMENT;
    walk.segment_end = 0;
    match io_syscall::kind(syscall) {
        io_syscall::KIND_BUFFER => {
            walk.iov = 0;
            walk.iov_count = 0;
            walk.iov_base = buffer;
            walk.iov_len = ret as u64;
        }
        io_syscall::KIND_IOVEC | io_syscall::KIND_MSGHDR => {
            let (iov, count) = if io_syscall::kind(syscall) == io_syscall::KIND_IOVEC {
                let count = load_reg(regs, layout.third_arg).unwrap_or(0);
                (buffer, count)
            } else {
                // struct user_msghdr is user ABI: msg_iov at 16, msg_iovlen at 24 on 64-bit.
                let [iov, iovlen] =
                    unsafe { bpf_probe_read_user((buffer + 16) as *const [u64; 2]) }
                        .unwrap_or([0, 0]);
                (iov, iovlen)
            };
            walk.iov = iov;
            walk.iov_count = count;
            walk.iov_base = 0;
            walk.iov_len = 0;
        }
        _ => return,
    }
    walk.iov_index = 0;
    walk.iov_off = 0;
    walk.iov_batch_start = 0;
    walk.iov_batch_len = 0;
    let header = &mut walk.header;
    header.seq = first_seq.unwrap_or(0);
    header.ts_ns = unsafe { bpf_ktime_get_ns() };
    header.sk = sk;
    header.total_len = ret as u64;
    header.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    header.is_send = is_send as u8;
    header.syscall = syscall as u8;
    header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    header.span_start = 0;
    (
        header.sample_shift,
        header.sample_depth,
        header.sample_epoch,
    ) = sample;
    let mut loop_ctx = LoopCtx { walk: scratch };
    // SAFETY: the callback is a BPF subprogram taking (index, ctx); ctx is this frame's
    // LoopCtx, which outlives the loop.
    unsafe {
        bpf_loop(
            CAPTURE_MAX_STEPS,
            capture_step as *mut core::ffi::c_void,
            (&mut loop_ctx as *mut LoopCtx).cast(),
            0,
        );
    }
    // The scratch slot is still this CPU's: no second lookup.
    if walk.pos < walk.total {
        walk.flags |= payload_flags::INCOMPLETE as u64;
        walk.frames.mode = framing::mode::LOST;
        bump(KernelCounter::CaptureIncomplete);
    }
    *state = walk.frames;
    walk.pos = walk.total;
    flush_record(walk);
}

const NO_SEGMENT: u64 = u64::MAX;

/// What the capture loops' callbacks share: the walk, found once per call instead of by a
/// per-CPU lookup in every callback. Lives on the caller's stack (bpf_loop's context must).
#[repr(C)]
struct LoopCtx {
    walk: *mut CaptureWalk,
}

/// The walk behind a loop callback's context.
#[inline(always)]
unsafe fn walk_of<'a>(ctx: *mut core::ffi::c_void) -> Option<&'a mut CaptureWalk> {
    let ctx = ctx as *mut LoopCtx;
    if ctx.is_null() {
        return None;
    }
    let walk = (*ctx).walk;
    if walk.is_null() {
        return None;
    }
    Some(&mut *walk)
}

/// One step of following a call's frames: read the next iovec entry, skip a stretch of value
/// body, or copy and scan one piece of headers. Returns 1 to stop.
#[inline(never)]
unsafe extern "C" fn capture_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some(walk) = walk_of(ctx) else {
        return 1;
    };
    if walk.pos >= walk.total || walk.frames.mode == framing::mode::LOST {
        return 1;
    }
    if walk.iov_off >= walk.iov_len {
        // The current buffer is used up: the next iovec entry.
        if walk.iov_index >= walk.iov_count || walk.iov_index >= IOV_MAX {
            return 1;
        }
        let mut slot = walk.iov_index.wrapping_sub(walk.iov_batch_start);
        if slot >= walk.iov_batch_len {
            // Past the entries read ahead: the next batch, no further than the array's end
            // (the syscall itself read that far, so those bytes are there).
            let entries = min(min(walk.iov_count, IOV_MAX) - walk.iov_index, IOV_BATCH);
            if entries == 0 || entries > IOV_BATCH {
                return 1;
            }
            if probe_read_user_raw(
                walk.iov_batch.as_mut_ptr().cast(),
                (entries * 16) as u32,
                (walk.iov + walk.iov_index * 16) as *const core::ffi::c_void,
            ) != 0
            {
                return 1;
            }
            walk.iov_batch_start = walk.iov_index;
            walk.iov_batch_len = entries;
            slot = 0;
        }
        let [base, len] = walk.iov_batch[(slot & (IOV_BATCH - 1)) as usize];
        walk.iov_index += 1;
        walk.iov_base = base;
        walk.iov_len = len;
        walk.iov_off = 0;
        return 0;
    }
    let in_buffer = min(walk.iov_len - walk.iov_off, walk.total - walk.pos);
    if !walk.frames.captures() {
        let n = walk.frames.pass(in_buffer);
        walk.pos += n;
        walk.iov_off += n;
        return 0;
    }
    if walk.budget == 0 {
        walk.frames.mode = framing::mode::LOST;
        return 1;
    }
    if walk.data_len + (SEGMENT_HEADER_LEN + CAPTURE_PIECE) as u64 > RECORD_DATA_MAX as u64 {
        flush_record(walk);
        walk.header.span_start = walk.pos as u32;
        return 0;
    }
    let mut piece = min(min(in_buffer, CAPTURE_PIECE as u64), walk.budget);
    if walk.frames.mode == framing::mode::SKIP {
        // A value body's head (its fingerprint): only its own bytes, at most VALUE_HEAD.
        piece = min(piece, walk.frames.head as u64);
    }
    // Bytes past the piece in this buffer, within the budget: a binary header the piece cuts
    // can be read whole by the next one.
    walk.scan_more = (piece < in_buffer && piece < walk.budget) as u64;
    if walk.segment == NO_SEGMENT || walk.segment_end != walk.pos {
        // A new segment, 8-byte aligned.
        let at = ((walk.data_len + 7) & !7) & (RECORD_DATA_MAX as u64 - 1);
        let segment = walk.data.as_mut_ptr().add(at as usize) as *mut SegmentHeader;
        (*segment).offset = walk.pos as u32;
        (*segment).len = 0;
        walk.segment = at;
        walk.data_len = at + SEGMENT_HEADER_LEN as u64;
    }
    let at = walk.data_len & (RECORD_DATA_MAX as u64 - 1);
    let piece = piece & (CAPTURE_PIECE as u64 * 2 - 1);
    let destination = walk.data.as_mut_ptr().add(at as usize);
    let source = walk.iov_base + walk.iov_off;
    if piece == 0
        || probe_read_user_raw(
            destination.cast(),
            piece as u32,
            source as *const core::ffi::c_void,
        ) != 0
    {
        walk.frames.mode = framing::mode::LOST;
        return 1;
    }
    // Scan the piece: header bytes a word at a time, bodies and binary keys inside the piece
    // passed over at once. Every round consumes at least one byte or ends the piece, so
    // CAPTURE_PIECE rounds always finish it.
    walk.scan_at = at;
    walk.scan_pos = 0;
    walk.scan_len = piece;
    let mut loop_ctx = LoopCtx {
        walk: walk as *mut CaptureWalk,
    };
    bpf_loop(
        CAPTURE_PIECE as u32,
        scan_round as *mut core::ffi::c_void,
        (&mut loop_ctx as *mut LoopCtx).cast(),
        0,
    );
    // The piece as scanned: shorter when it ended at a binary header it cut (the bytes past
    // it are copied again as the start of the next piece).
    let piece = walk.scan_len & (CAPTURE_PIECE as u64 * 2 - 1);
    let segment = walk
        .data
        .as_mut_ptr()
        .add((walk.segment & (RECORD_DATA_MAX as u64 - 1)) as usize)
        as *mut SegmentHeader;
    (*segment).len += piece as u32;
    walk.data_len += piece;
    walk.budget -= piece;
    walk.pos += piece;
    walk.iov_off += piece;
    walk.segment_end = walk.pos;
    0
}

/// One round of scanning the piece just copied (at `scan_at` in the record): pass over a body
/// or binary key, or take the next header bytes a word at a time
/// ([`FrameState::scan_round`]: a whole binary header, a run of key or line bytes, a first word
/// or a length's digits, each with the space after it, or one byte or a "\r\n" through the
/// state machine). Returns 1 when the piece is done. Feeding one byte per callback cost ~60
/// callbacks per get.
///
/// [`FrameState::scan_round`]: agent_common::framing::FrameState::scan_round
#[inline(never)]
unsafe extern "C" fn scan_round(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some(walk) = walk_of(ctx) else {
        return 1;
    };
    if walk.scan_pos >= walk.scan_len {
        return 1;
    }
    match walk.frames.mode {
        framing::mode::SKIP => {
            let rest = walk.scan_len - walk.scan_pos;
            let head = walk.frames.head as u64;
            if walk.frames.remaining > rest && head < rest {
                // A body that runs past the piece: the piece ends after its head, so the
                // body's bytes are neither kept in the record nor charged to the budget
                // (the next step skips them by length). Charged, a pipelined batch of sets
                // with 100-byte values spent 128 bytes of budget per set instead of ~40.
                walk.scan_pos += walk.frames.pass(head);
                walk.scan_len = walk.scan_pos;
                return 1;
            }
            walk.scan_pos += walk.frames.pass(rest);
        }
        framing::mode::KEEP => {
            walk.scan_pos += walk.frames.pass(walk.scan_len - walk.scan_pos);
        }
        framing::mode::LOST => return 1,
        _ => {
            let base = walk.scan_at;
            let data = &walk.data;
            let taken =
                walk.frames
                    .scan_round(walk.scan_pos, walk.scan_len, walk.scan_more != 0, |i| {
                        word_at(data, base + i)
                    });
            if taken == 0 {
                // A binary header cut by the piece's end: the piece ends before it.
                walk.scan_len = walk.scan_pos;
                return 1;
            }
            walk.scan_pos += taken;
        }
    }
    0
}

/// The 8 bytes of the record data at `at`, little-endian, from two aligned loads (an unaligned
/// u64 load would be split into byte loads).
#[inline(always)]
fn word_at(data: &[u8; 2 * RECORD_DATA_MAX + 8], at: u64) -> u64 {
    let at = at & (2 * RECORD_DATA_MAX as u64 - 1);
    let aligned = (at & !7) as usize;
    let shift = (at & 7) * 8;
    // SAFETY: `aligned` is a multiple of 8 below 2 * RECORD_DATA_MAX, so both words lie in
    // `data`, which starts 8-aligned in the walk (after the 64-byte header).
    let (low, high) = unsafe {
        let words = data.as_ptr().add(aligned) as *const u64;
        (words.read(), words.add(1).read())
    };
    // `high << 1 << (63 - shift)`: a shift by 64 is not defined.
    (low >> shift) | ((high << 1) << (63 - shift))
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

/// Sends the record built so far (covering the call up to `walk.pos`) and starts an empty one.
#[inline(always)]
fn flush_record(walk: &mut CaptureWalk) {
    let data_len = walk.data_len & (2 * RECORD_DATA_MAX as u64 - 1);
    walk.header.span_end = walk.pos as u32;
    walk.header.data_len = data_len as u16;
    walk.header.flags = walk.flags as u8;
    let len = PAYLOAD_HEADER_LEN as u64 + data_len;
    let threshold = unsafe { core::ptr::read_volatile(&PAYLOADS_WAKEUP_BYTES) };
    let unread = PAYLOADS.query(BPF_RB_AVAIL_DATA as u64);
    // SAFETY: `len` bytes from the start of the walk lie inside it (the header, then at most
    // 2 * RECORD_DATA_MAX of data room).
    let status = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(PAYLOADS) as *mut core::ffi::c_void,
            (walk as *mut CaptureWalk).cast(),
            len,
            wakeup_flags(unread, len, threshold),
        )
    };
    if status != 0 {
        bump(KernelCounter::PayloadRingbufFull);
    }
    walk.data_len = 0;
    walk.segment = NO_SEGMENT;
    // The call's later records continue it.
    walk.flags &= !(payload_flags::RESUMED as u64);
}
