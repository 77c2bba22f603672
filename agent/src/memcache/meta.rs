//! Meta commands (`mg`, `ms`, `md`, `ma`, `mn`, `me`) and their two-letter response codes.
//! Only the flags that matter for framing and pairing are interpreted: `q` (quiet: the
//! nominal answer is suppressed), `O` (opaque, echoed back), `k` (key echoed back), `b` (key is
//! base64) and, for `ms`, the data length.

use super::model::{Command, Key, KEY_CAPACITY};
use super::pairing::MetaCode;
use super::text::parse_u64;

#[derive(Debug)]
pub(crate) struct MetaRequest {
    pub command: Command,
    pub key: Option<Key>,
    pub quiet: bool,
    pub opaque: Option<u64>,
    /// `ms` only: length of the data block, without its "\r\n".
    pub data_len: Option<u64>,
}

/// Opaque tokens are up to 32 bytes; a hash is enough to match a response to its request.
pub(crate) fn opaque_hash(token: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &b in token {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn base64_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// Decodes base64 (standard or URL alphabet, padding optional) into `out`. Returns the decoded
/// length and whether it did not fit, or None if `input` is not base64.
pub(crate) fn decode_base64(input: &[u8], out: &mut [u8; KEY_CAPACITY]) -> Option<(usize, bool)> {
    let input = input
        .strip_suffix(b"==")
        .or_else(|| input.strip_suffix(b"="))
        .unwrap_or(input);
    let mut len = 0;
    let mut overflow = false;
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in input {
        acc = (acc << 6) | u32::from(base64_value(b)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            let byte = (acc >> bits) as u8;
            acc &= (1 << bits) - 1;
            if len < KEY_CAPACITY {
                out[len] = byte;
                len += 1;
            } else {
                overflow = true;
            }
        }
    }
    Some((len, overflow))
}

/// Parses a meta request after its command word. `complete_tail` is false when the line was
/// cut, so its last token may be incomplete.
pub(crate) fn parse_request<'l>(
    word: &[u8],
    words: impl Iterator<Item = &'l [u8]>,
    complete_tail: bool,
) -> MetaRequest {
    let command = match word {
        b"mg" => Command::MetaGet,
        b"ms" => Command::MetaSet,
        b"md" => Command::MetaDelete,
        b"ma" => Command::MetaArithmetic,
        b"me" => Command::MetaDebug,
        _ => Command::MetaNoop,
    };
    let mut request = MetaRequest {
        command,
        key: None,
        quiet: false,
        opaque: None,
        data_len: None,
    };
    if command == Command::MetaNoop {
        return request;
    }
    let mut words = words.peekable();
    let Some(key_token) = words.next() else {
        return request;
    };
    let key_cut = words.peek().is_none() && !complete_tail;
    let mut base64 = false;
    if command == Command::MetaSet {
        if let Some(len) = words.peek().and_then(|t| parse_u64(t)) {
            words.next();
            let cut = words.peek().is_none() && !complete_tail;
            if !cut {
                request.data_len = Some(len);
            }
        }
    }
    while let Some(flag) = words.next() {
        let cut = words.peek().is_none() && !complete_tail;
        match flag.first() {
            Some(b'q') => request.quiet = true,
            Some(b'b') => base64 = true,
            Some(b'O') if !cut => request.opaque = Some(opaque_hash(&flag[1..])),
            // Before memcached 1.6.2 `ms` carried its length as an S flag.
            Some(b'S') if command == Command::MetaSet && request.data_len.is_none() && !cut => {
                request.data_len = parse_u64(&flag[1..]);
            }
            _ => {}
        }
    }
    let mut decoded = [0u8; KEY_CAPACITY];
    request.key = Some(
        match base64.then(|| decode_base64(key_token, &mut decoded)) {
            Some(Some((len, overflow))) if !key_cut => {
                Key::new(&decoded[..len], KEY_CAPACITY, overflow)
            }
            _ => Key::new(key_token, KEY_CAPACITY, key_cut),
        },
    );
    request
}

#[derive(Debug)]
pub(crate) struct MetaResponse<'l> {
    pub code: MetaCode,
    /// `VA` only: length of the data block, without its "\r\n".
    pub data_len: Option<u64>,
    pub opaque: Option<u64>,
    key_token: Option<&'l [u8]>,
    key_cut: bool,
    key_base64: bool,
}

impl<'l> MetaResponse<'l> {
    /// The key echoed by a `k` flag, base64-decoded into `buf` when the response says so.
    pub fn key<'s>(&'s self, buf: &'s mut [u8; KEY_CAPACITY]) -> Option<(&'s [u8], bool)>
    where
        'l: 's,
    {
        let token = self.key_token?;
        if self.key_base64 && !self.key_cut {
            if let Some((len, overflow)) = decode_base64(token, buf) {
                return Some((&buf[..len], overflow));
            }
        }
        Some((token, self.key_cut))
    }
}

/// Parses a meta response line after its code word. Returns None for a word that is not a
/// meta code, or a `VA` without a usable length (its data block could not be framed).
/// `tail_cut` means the line was cut inside its last token.
pub(crate) fn parse_response<'l>(
    word: &[u8],
    words: impl Iterator<Item = &'l [u8]>,
    tail_cut: bool,
) -> Option<MetaResponse<'l>> {
    let code = match word {
        b"HD" => MetaCode::Hd,
        b"VA" => MetaCode::Va,
        b"EN" => MetaCode::En,
        b"NF" => MetaCode::Nf,
        b"NS" => MetaCode::Ns,
        b"EX" => MetaCode::Ex,
        b"MN" => MetaCode::Mn,
        b"ME" => MetaCode::Me,
        _ => return None,
    };
    let mut response = MetaResponse {
        code,
        data_len: None,
        opaque: None,
        key_token: None,
        key_cut: false,
        key_base64: false,
    };
    // ME's flags are k=v debug pairs, not meta flags.
    if code == MetaCode::Me {
        return Some(response);
    }
    let mut words = words.peekable();
    if code == MetaCode::Va {
        let len = words.next().and_then(parse_u64);
        let len_cut = tail_cut && words.peek().is_none();
        match len {
            Some(len) if !len_cut => response.data_len = Some(len),
            _ if len_cut => {}
            _ => return None,
        }
    }
    while let Some(flag) = words.next() {
        let cut = tail_cut && words.peek().is_none();
        match flag.first() {
            Some(b'k') => {
                response.key_token = Some(&flag[1..]);
                response.key_cut = cut;
            }
            Some(b'O') if !cut => response.opaque = Some(opaque_hash(&flag[1..])),
            Some(b'b') => response.key_base64 = true,
            _ => {}
        }
    }
    Some(response)
}
