//! Feeds arbitrary bytes to the memcache decoder as a sequence of chunks with arbitrary
//! directions, capture limits, gaps and expiries. The decoder must never panic and must keep
//! its pending queue within its bound.
#![no_main]

use cacheprobe::memcache::{Chunk, ConnectionDecoder, DecoderConfig, Direction, ProtocolHint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let config = DecoderConfig {
        protocol_hint: match control % 3 {
            0 => ProtocolHint::Auto,
            1 => ProtocolHint::Text,
            _ => ProtocolHint::Binary,
        },
        queue_mode: control & 0x04 != 0,
        max_pending: 4 + usize::from(control >> 5),
        max_pending_keys: 32,
        max_line_len: 256,
        ..DecoderConfig::default()
    };
    let max_pending = config.max_pending;
    let mut decoder = ConnectionDecoder::new(config);
    let mut out = Vec::new();
    let mut ts = 0u64;
    // Each chunk: a header byte (direction, action) and a length byte, then the bytes.
    while let [header, len, tail @ ..] = rest {
        let direction = if header & 1 == 0 {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        };
        let len = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        ts += u64::from(*header);
        match header >> 5 {
            0 => decoder.note_gap(direction, &mut out),
            1 => decoder.expire(ts, 50, &mut out),
            action => {
                // Half the time only a prefix is captured of a longer payload.
                let captured_len = if action >= 5 { len / 2 } else { len };
                let extra = if action == 7 {
                    usize::from(*header) * 16
                } else {
                    0
                };
                decoder.feed(
                    Chunk {
                        direction,
                        ts_ns: ts,
                        captured: &payload[..captured_len],
                        total_len: len + extra,
                        // Some chunks carry a TCP sequence number (arbitrary, wrapping).
                        seq: (header & 2 != 0).then(|| (ts as u32).wrapping_mul(0x9e37_79b9)),
                    },
                    &mut out,
                );
            }
        }
        assert!(decoder.pending() <= max_pending);
        out.clear();
    }
    decoder.finish(&mut out);
    assert_eq!(decoder.pending(), 0);
});
