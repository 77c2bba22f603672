//! What a server or proxy said in an error reply (`SERVER_ERROR out of memory storing object`,
//! twemproxy's `SERVER_ERROR Connection timed out`), kept so an incident report can quote it.
//!
//! The words come from the wire, so they are cut to what cannot carry application data: a
//! CLIENT_ERROR may echo part of the request (a key, a length). Only the leading words made of
//! letters are kept (an ASCII letter run, with `'` or `-` inside and one `:` `,` `.` `;` at the
//! end), up to [`ERROR_TEXT_LEN`] bytes; the first word with a digit, a separator or any other
//! byte ends the text (a key such as `user:42` or an address never passes), and a text cut
//! there or by the length ends in `...`. A key of letters only may still pass as a word; that
//! is why the text never becomes a metric label and the history keeps only a few per server.
//! Fixed size and `Copy`: the decoder allocates nothing per request.

use std::fmt;

/// Longest text kept, in bytes (the error keyword is not part of it: the status says it).
pub const ERROR_TEXT_LEN: usize = 46;

const CUT: &[u8] = b"...";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorText {
    len: u8,
    bytes: [u8; ERROR_TEXT_LEN],
}

impl ErrorText {
    /// The text of an error line's words after its keyword (`words`); `cut_short` when the
    /// capture ended inside the line, so its last word may be partial and is dropped.
    pub(crate) fn from_words(words: &[u8], cut_short: bool) -> ErrorText {
        let mut tokens = words
            .split(u8::is_ascii_whitespace)
            .filter(|t| !t.is_empty())
            .peekable();
        let mut text = ErrorText {
            len: 0,
            bytes: [0; ERROR_TEXT_LEN],
        };
        let mut cut = false;
        while let Some(token) = tokens.next() {
            let room = ERROR_TEXT_LEN - CUT.len() - 1;
            let partial = cut_short && tokens.peek().is_none();
            if partial || !is_word(token) || usize::from(text.len) + 1 + token.len() > room {
                cut = true;
                break;
            }
            if text.len > 0 {
                text.push(b" ");
            }
            text.push(token);
        }
        if cut {
            if text.len > 0 {
                text.push(b" ");
            }
            text.push(CUT);
        }
        text
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        let n = bytes.len().min(ERROR_TEXT_LEN - at);
        self.bytes[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n as u8;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters, `'`, `-`, punctuation, spaces and dots are ever pushed.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

/// Letters, with `'` or `-` between them, and at most one `:` `,` `.` `;` at the end.
fn is_word(token: &[u8]) -> bool {
    let body = match token.split_last() {
        Some((b':' | b',' | b'.' | b';', body)) => body,
        _ => token,
    };
    let (Some(first), Some(last)) = (body.first(), body.last()) else {
        return false;
    };
    first.is_ascii_alphabetic()
        && last.is_ascii_alphabetic()
        && body
            .iter()
            .all(|b| b.is_ascii_alphabetic() || matches!(b, b'\'' | b'-'))
}

impl fmt::Debug for ErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorText({:?})", self.as_str())
    }
}

impl fmt::Display for ErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(words: &str) -> String {
        ErrorText::from_words(words.as_bytes(), false)
            .as_str()
            .to_string()
    }

    #[test]
    fn servers_and_proxies_words_are_kept() {
        for words in [
            "Connection timed out",
            "Connection reset by peer",
            "out of memory storing object",
            "object too large for cache",
            "bad data chunk",
            "bad command line format",
            "Host is down",
            "",
        ] {
            assert_eq!(text(words), words);
        }
        assert_eq!(text("  bad   data chunk "), "bad data chunk");
        assert_eq!(text("remote error: Timeout."), "remote error: Timeout.");
    }

    #[test]
    fn anything_that_can_be_a_key_or_a_number_ends_the_text() {
        assert_eq!(text("bad key user:42 rejected"), "bad key ...");
        assert_eq!(text("Unknown error 523"), "Unknown error ...");
        assert_eq!(text("backend 10.0.0.2:11211 failed"), "backend ...");
        assert_eq!(text("session_abc too long"), "...");
        assert_eq!(text("caf\u{e9} closed"), "...");
        assert_eq!(text("x-"), "...");
    }

    #[test]
    fn long_and_cut_lines_end_in_dots() {
        let long = text("cannot increment or decrement non numeric value ever again");
        assert!(long.len() <= ERROR_TEXT_LEN, "{long}");
        assert_eq!(long, "cannot increment or decrement non numeric ...");
        let cut = ErrorText::from_words(b"Connection tim", true);
        assert_eq!(cut.as_str(), "Connection ...");
    }
}
