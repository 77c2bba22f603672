//! Payload records of the capture ring: parsing them without a copy (`PayloadView`), and
//! building them as the kernel does, for tests and benches (`encode_payload_record`,
//! `kernel_capture`). Decoding their bytes is `memcache::decoders`' job.

use agent_common::{
    capture_sample,
    framing::{self, FrameState},
    payload_flags, CAPTURE_PIECE, COMM_LEN, RECORD_DATA_MAX, SEGMENT_HEADER_LEN,
};

/// A payload record borrowed from the ring buffer: no copy of the data. It covers
/// `[span_start, span_end)` of one send or receive; its segments hold the frame headers the
/// kernel copied, and the bytes between them are value bodies it skipped.
#[derive(Debug, Clone, Copy)]
pub struct PayloadView<'a> {
    pub ts_ns: u64,
    pub sk: u64,
    pub total_len: u64,
    pub span_start: u64,
    pub span_end: u64,
    pub pid: u32,
    pub is_send: bool,
    /// The kernel stopped following frames before the end of the call.
    pub incomplete: bool,
    /// The call does not start where the kernel last followed the connection (calls went by
    /// unfollowed): framing starts afresh here, for both directions.
    pub resumed: bool,
    /// TCP sequence number of the call's first byte, when the kernel could read it: a byte at
    /// call offset `o` has sequence number `seq + o` at both ends of the connection.
    pub seq: Option<u32>,
    /// The sample shift the kernel captured this call under as a sample of healthy
    /// connections (the call stands for 2^shift), or None: captured for the connection's
    /// trouble, it stands for itself.
    pub sample_shift: Option<u32>,
    /// The highest shift at which the connection stays followed in `sample_epoch`
    /// ([`capture_sample::depth`]).
    pub sample_depth: u32,
    /// The low 8 bits of the slot's sample epoch the call was captured in (0 when not
    /// sampled): a record of an epoch the agent has turned from is dropped.
    pub sample_epoch: u8,
    pub comm: &'a [u8; COMM_LEN],
    /// The segment area, validated by [`parse_payload`].
    segments: &'a [u8],
}

/// One run of captured bytes and where it lies in its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
}

impl<'a> PayloadView<'a> {
    /// The captured segments, in call order.
    pub fn segments(&self) -> impl Iterator<Item = Segment<'a>> + 'a {
        let area = self.segments;
        let mut at = 0usize;
        std::iter::from_fn(move || {
            let (offset, len, next) = segment_at(area, at)?;
            let bytes = &area[at + SEGMENT_HEADER_LEN..at + SEGMENT_HEADER_LEN + len];
            at = next;
            Some(Segment {
                offset: offset as u64,
                bytes,
            })
        })
    }

    /// The bytes at the start of this record's span when they were captured (the start of a
    /// request on a send), else nothing.
    pub fn leading_bytes(&self) -> &'a [u8] {
        match self.segments().next() {
            Some(segment) if segment.offset == self.span_start => segment.bytes,
            _ => &[],
        }
    }

    /// The decoder's view: one chunk per segment, each followed by the skipped bytes up to the
    /// next, after a leading chunk of skipped bytes when the span starts inside a body.
    pub fn chunks(&self) -> impl Iterator<Item = (&'a [u8], usize)> + 'a {
        let span_end = self.span_end;
        let incomplete = self.incomplete;
        let mut cursor = self.span_start;
        let mut segments = self.segments().peekable();
        std::iter::from_fn(move || {
            if cursor >= span_end {
                return None;
            }
            match segments.peek().copied() {
                Some(segment) if segment.offset > cursor => {
                    let gap = (segment.offset - cursor) as usize;
                    cursor = segment.offset;
                    Some((&[][..], gap))
                }
                Some(segment) => {
                    segments.next();
                    // After an incomplete capture's last segment nothing was followed: those
                    // bytes are not a skipped body, and the caller reports the gap.
                    let last_end = if incomplete {
                        segment.offset + segment.bytes.len() as u64
                    } else {
                        span_end
                    };
                    let end = segments.peek().map_or(last_end, |next| next.offset);
                    let total = (end - segment.offset) as usize;
                    cursor = end;
                    Some((segment.bytes, total))
                }
                None if incomplete => None,
                None => {
                    let gap = (span_end - cursor) as usize;
                    cursor = span_end;
                    Some((&[][..], gap))
                }
            }
        })
    }
}

/// The segment whose header is at `at`: (call offset, length, where the next header is).
fn segment_at(area: &[u8], at: usize) -> Option<(u32, usize, usize)> {
    let header = area.get(at..at + SEGMENT_HEADER_LEN)?;
    let offset = u32::from_ne_bytes(header[0..4].try_into().ok()?);
    let len = u32::from_ne_bytes(header[4..8].try_into().ok()?) as usize;
    let end = at + SEGMENT_HEADER_LEN + len;
    if end > area.len() {
        return None;
    }
    Some((offset, len, (end + 7) & !7))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload record of {0} bytes, shorter than its header or its data")]
    Size(usize),
    #[error("payload record claims {0} data bytes")]
    DataLen(u16),
    #[error("payload record's span {0}..{1} does not fit a call of {2} bytes")]
    Span(u64, u64, u64),
    #[error("payload record's segments overlap, leave their span or overrun the data")]
    Segments,
}

const HEADER: usize = agent_common::PAYLOAD_HEADER_LEN;

/// The timestamp of a payload record, for ordering it among socket events.
pub fn payload_ts(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?))
}

/// Parses a ring-buffer payload record without copying its data. Every segment is checked
/// once here, so iterating them later cannot fail.
pub fn parse_payload(bytes: &[u8]) -> Result<PayloadView<'_>, PayloadError> {
    if bytes.len() < HEADER {
        return Err(PayloadError::Size(bytes.len()));
    }
    let u64_at =
        |offset: usize| u64::from_ne_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let u32_at =
        |offset: usize| u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    let data_len = u16::from_ne_bytes([bytes[36], bytes[37]]);
    if data_len as usize > RECORD_DATA_MAX {
        return Err(PayloadError::DataLen(data_len));
    }
    if bytes.len() < HEADER + data_len as usize {
        return Err(PayloadError::Size(bytes.len()));
    }
    let total_len = u64_at(16);
    let span_start = u32_at(24) as u64;
    let span_end = u32_at(28) as u64;
    if span_start > span_end || span_end > total_len {
        return Err(PayloadError::Span(span_start, span_end, total_len));
    }
    let segments = &bytes[HEADER..HEADER + data_len as usize];
    let mut at = 0usize;
    let mut cursor = span_start;
    while at < segments.len() {
        let (offset, len, next) = segment_at(segments, at).ok_or(PayloadError::Segments)?;
        let offset = offset as u64;
        if offset < cursor || offset + len as u64 > span_end {
            return Err(PayloadError::Segments);
        }
        cursor = offset + len as u64;
        at = next;
    }
    Ok(PayloadView {
        ts_ns: u64_at(0),
        sk: u64_at(8),
        total_len,
        span_start,
        span_end,
        pid: u32_at(32),
        is_send: bytes[38] != 0,
        incomplete: bytes[40] & payload_flags::INCOMPLETE != 0,
        resumed: bytes[40] & payload_flags::RESUMED != 0,
        seq: (bytes[40] & payload_flags::SEQ != 0).then(|| u32_at(44)),
        sample_shift: (bytes[41] != capture_sample::NOT_SAMPLED).then_some(u32::from(bytes[41])),
        sample_depth: u32::from(bytes[42]),
        sample_epoch: bytes[43],
        comm: bytes[48..HEADER].try_into().expect("16 bytes"),
        segments,
    })
}

/// Builds one ring-buffer payload record as the kernel writes it, for tests and benches: its
/// span is the whole call of `total_len` bytes and `data` its one captured segment at offset 0
/// (cut at the record's capacity). Bytes of the call past `data` count as skipped.
pub fn encode_payload_record(
    ts_ns: u64,
    sk: u64,
    total_len: u64,
    is_send: bool,
    comm: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let data = &data[..data.len().min(RECORD_DATA_MAX - SEGMENT_HEADER_LEN)];
    let segments: &[(u64, &[u8])] = if data.is_empty() { &[] } else { &[(0, data)] };
    encode_record(
        RecordHeader {
            ts_ns,
            sk,
            total_len,
            span: (0, total_len),
            is_send,
            incomplete: false,
            comm,
        },
        segments,
    )
}

/// The header fields of a record built on the host.
struct RecordHeader<'a> {
    ts_ns: u64,
    sk: u64,
    total_len: u64,
    span: (u64, u64),
    is_send: bool,
    incomplete: bool,
    comm: &'a [u8],
}

fn encode_record(header: RecordHeader<'_>, segments: &[(u64, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (offset, bytes) in segments {
        data.resize((data.len() + 7) & !7, 0);
        data.extend_from_slice(&(*offset as u32).to_ne_bytes());
        data.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        data.extend_from_slice(bytes);
    }
    let mut record = vec![0u8; HEADER];
    let comm = &header.comm[..header.comm.len().min(COMM_LEN)];
    record[0..8].copy_from_slice(&header.ts_ns.to_ne_bytes());
    record[8..16].copy_from_slice(&header.sk.to_ne_bytes());
    record[16..24].copy_from_slice(&header.total_len.to_ne_bytes());
    record[24..28].copy_from_slice(&(header.span.0 as u32).to_ne_bytes());
    record[28..32].copy_from_slice(&(header.span.1 as u32).to_ne_bytes());
    record[32..36].copy_from_slice(&7u32.to_ne_bytes());
    record[36..38].copy_from_slice(&(data.len() as u16).to_ne_bytes());
    record[38] = header.is_send as u8;
    record[40] = if header.incomplete {
        payload_flags::INCOMPLETE
    } else {
        0
    };
    record[48..48 + comm.len()].copy_from_slice(comm);
    record.extend_from_slice(&data);
    record
}

/// Marks a record built by [`encode_payload_record`] as the kernel marks a call it captured as
/// a sample at `shift` of a connection of `depth`, or (None) for the connection's trouble.
pub fn mark_sample(record: &mut [u8], sample: Option<(u8, u8)>) {
    let (shift, depth) = sample.unwrap_or((capture_sample::NOT_SAMPLED, 0));
    record[41] = shift;
    record[42] = depth;
}

/// Marks a record built by [`encode_payload_record`] as captured in the sample epoch whose low
/// 8 bits are `epoch` (after [`mark_sample`]; unmarked records carry epoch 0).
pub fn mark_sample_epoch(record: &mut [u8], epoch: u8) {
    record[43] = epoch;
}

/// What the kernel's capture sends for one call of `call` bytes on a direction whose frames
/// stand at `state`: the same walk as agent-ebpf's `capture_step` (pieces of
/// [`CAPTURE_PIECE`] bytes, segments coalesced, records split at [`RECORD_DATA_MAX`], the
/// per-call `budget`), for tests and benches that need the kernel's exact output without a
/// kernel. Iovec boundaries are left out: they change where pieces are cut, not which bytes are
/// captured.
pub fn kernel_capture(
    ts_ns: u64,
    sk: u64,
    is_send: bool,
    call: &[u8],
    state: &mut FrameState,
    budget: u64,
) -> Vec<Vec<u8>> {
    let total = call.len() as u64;
    let mut records = Vec::new();
    let mut segments: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut data_len = 0u64;
    let mut span_start = 0u64;
    let mut pos = 0u64;
    let mut budget = budget;
    state.start_call();
    let header = |span: (u64, u64), incomplete: bool| RecordHeader {
        ts_ns,
        sk,
        total_len: total,
        span,
        is_send,
        incomplete,
        comm: b"python3",
    };
    let flush = |segments: &mut Vec<(u64, Vec<u8>)>, span: (u64, u64), incomplete: bool| {
        let borrowed: Vec<(u64, &[u8])> = segments.iter().map(|(o, b)| (*o, &b[..])).collect();
        let record = encode_record(header(span, incomplete), &borrowed);
        segments.clear();
        record
    };
    for _ in 0..agent_common::CAPTURE_MAX_STEPS {
        if pos >= total || state.mode == framing::mode::LOST {
            break;
        }
        if !state.captures() {
            pos += state.pass(total - pos);
            continue;
        }
        if budget == 0 {
            state.mode = framing::mode::LOST;
            break;
        }
        if data_len + (SEGMENT_HEADER_LEN + CAPTURE_PIECE) as u64 > RECORD_DATA_MAX as u64 {
            records.push(flush(&mut segments, (span_start, pos), false));
            data_len = 0;
            span_start = pos;
            continue;
        }
        let mut piece = (total - pos).min(CAPTURE_PIECE as u64).min(budget);
        if state.mode == framing::mode::SKIP {
            // A body's head: only its own bytes.
            piece = piece.min(state.head as u64);
        }
        let more = piece < total - pos && piece < budget;
        let staged = &call[pos as usize..(pos + piece) as usize];
        // The kernel's scan: word-at-a-time rounds over the piece (bytes past it read as 0).
        let word = |at: u64| {
            let mut le = [0u8; 8];
            for (k, b) in le.iter_mut().enumerate() {
                *b = staged.get(at as usize + k).copied().unwrap_or(0);
            }
            u64::from_le_bytes(le)
        };
        let mut i = 0u64;
        while i < piece {
            match state.mode {
                // A body running past the piece: the piece ends after the body's head.
                framing::mode::SKIP
                    if state.remaining > piece - i && (state.head as u64) < piece - i =>
                {
                    i += state.pass(state.head as u64);
                    piece = i;
                }
                framing::mode::SKIP | framing::mode::KEEP => i += state.pass(piece - i),
                framing::mode::LOST => break,
                _ => match state.scan_round(i, piece, more, word) {
                    // A binary header cut by the piece's end: the next piece starts at it.
                    0 => piece = i,
                    taken => i += taken,
                },
            }
        }
        let bytes = &call[pos as usize..(pos + piece) as usize];
        match segments.last_mut() {
            Some((offset, run)) if *offset + run.len() as u64 == pos => {
                run.extend_from_slice(bytes)
            }
            _ => {
                data_len = ((data_len + 7) & !7) + SEGMENT_HEADER_LEN as u64;
                segments.push((pos, bytes.to_vec()));
            }
        }
        data_len += piece;
        budget -= piece;
        pos += piece;
    }
    let incomplete = pos < total;
    if incomplete {
        state.mode = framing::mode::LOST;
    }
    records.push(flush(&mut segments, (span_start, total), incomplete));
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::PayloadHeader;

    fn record(ts: u64, sk: u64, is_send: bool, data: &[u8], total: u64) -> Vec<u8> {
        encode_payload_record(ts, sk, total, is_send, b"python3", data)
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::offset_of!(PayloadHeader, span_start), 24);
        assert_eq!(std::mem::offset_of!(PayloadHeader, span_end), 28);
        assert_eq!(std::mem::offset_of!(PayloadHeader, pid), 32);
        assert_eq!(std::mem::offset_of!(PayloadHeader, data_len), 36);
        assert_eq!(std::mem::offset_of!(PayloadHeader, is_send), 38);
        assert_eq!(std::mem::offset_of!(PayloadHeader, flags), 40);
        assert_eq!(std::mem::offset_of!(PayloadHeader, seq), 44);
        assert_eq!(std::mem::offset_of!(PayloadHeader, comm), 48);
        let mut bytes = record(1, 2, true, b"get k\r\n", 7);
        assert_eq!(parse_payload(&bytes).unwrap().seq, None);
        bytes[40] |= payload_flags::SEQ;
        bytes[44..48].copy_from_slice(&0xfffffff0u32.to_ne_bytes());
        assert_eq!(parse_payload(&bytes).unwrap().seq, Some(0xfffffff0));
    }

    #[test]
    fn malformed_records_are_rejected() {
        assert_eq!(parse_payload(&[0u8; 3]).unwrap_err(), PayloadError::Size(3));
        let mut bytes = record(1, 1, true, b"x", 1);
        bytes[36..38].copy_from_slice(&9999u16.to_ne_bytes());
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::DataLen(9999)
        );
        // A span past the call.
        let mut bytes = record(1, 1, true, b"abc", 3);
        bytes[28..32].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::Span(0, 4, 3)
        );
        // A segment longer than the span.
        let bytes = record(1, 1, true, b"abc", 2);
        assert_eq!(parse_payload(&bytes).unwrap_err(), PayloadError::Segments);
        // A segment overrunning the data.
        let mut bytes = record(1, 1, true, b"abcd", 4);
        bytes[HEADER + 4..HEADER + 8].copy_from_slice(&40u32.to_ne_bytes());
        assert_eq!(parse_payload(&bytes).unwrap_err(), PayloadError::Segments);
        // A record cut short of its data (the kernel never writes one).
        let mut bytes = record(1, 1, true, b"abcd", 4);
        bytes.truncate(HEADER + 2);
        assert_eq!(
            parse_payload(&bytes).unwrap_err(),
            PayloadError::Size(HEADER + 2)
        );
        // A prefix capture: the rest of the call counts as skipped.
        let bytes = record(1, 1, true, b"xy", 10);
        let view = parse_payload(&bytes).unwrap();
        assert_eq!(view.chunks().collect::<Vec<_>>(), vec![(&b"xy"[..], 10)]);
    }

    /// A pipelined batch of sets with 100-byte values (pymemcache's `set_many`): a piece that
    /// a value runs past ends after the value's head, so the record and the per-call budget
    /// hold each set's line and head (53 bytes here), not the whole 128-byte piece.
    #[test]
    fn a_batch_of_sets_spends_the_budget_on_headers() {
        let mut call = Vec::new();
        for i in 0..400 {
            call.extend(format!("set storekey_{i:06} 0 0 100 noreply\r\n").into_bytes());
            call.extend([b'v'; 100]);
            call.extend(b"\r\n");
        }
        let mut state = FrameState::default();
        let records = kernel_capture(1, 1, true, &call, &mut state, 65536);
        let captured: usize = records
            .iter()
            .map(|r| {
                let view = parse_payload(r).unwrap();
                assert!(!view.incomplete);
                view.segments().map(|s| s.bytes.len()).sum::<usize>()
            })
            .sum();
        assert_eq!(captured, 400 * (37 + 8));
    }

    #[test]
    fn capture_cost_follows_frames_not_value_sizes() {
        let mut state = FrameState::default();
        for size in [100usize, 10_000, 500_000] {
            let mut call = format!("VALUE k 0 {size}\r\n").into_bytes();
            call.extend(std::iter::repeat_n(b'v', size));
            call.extend_from_slice(b"\r\nEND\r\n");
            let records = kernel_capture(1, 1, false, &call, &mut state, 65536);
            let captured: usize = records.iter().map(|r| r.len()).sum();
            // The header line, the END line and at most one piece of the value.
            assert!(
                captured <= HEADER + 2 * 8 + 2 * CAPTURE_PIECE,
                "{size}: {captured}"
            );
            assert_eq!(state.mode, framing::mode::FRAME_START);
        }
    }
}
