//! Base64 as cn_clip reads and writes it.
//!
//! cn_clip stores an image as the base64 *text* of its file and decodes it per sample with
//! `base64.urlsafe_b64decode(value.decode("utf8", errors="ignore"))`. That decoder is lenient in
//! ways a strict decoder is not, and MUGE-style TSVs rely on it (line-wrapped base64, the URL-safe
//! alphabet, stray bytes), so [`decode_cn_clip`] reproduces it step by step instead of using a
//! strict RFC 4648 decoder:
//!
//! 1. bytes that are not valid UTF-8 are dropped (`errors="ignore"`);
//! 2. any remaining non-ASCII character is an error (`_bytes_from_decode_data` encodes to ASCII);
//! 3. `-` and `_` mean `+` and `/`, so both alphabets decode;
//! 4. CPython's non-strict `binascii.a2b_base64`: characters outside the alphabet are skipped,
//!    `=` ends the data once a quad has at least two characters and enough padding, and a final
//!    partial quad is an error ("Incorrect padding" or "1 more than a multiple of 4").

/// Why a base64 value did not decode; the messages follow CPython's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    /// A valid UTF-8 character outside ASCII (Python: "string argument should contain only ASCII
    /// characters").
    #[error("it contains the non-ASCII character {ch:?} at byte {offset}")]
    NonAscii { ch: char, offset: usize },
    /// The data ends inside a quad of 2 or 3 characters without its `=` padding.
    #[error("incorrect padding: {data_chars} data characters end inside a 4-character group")]
    IncorrectPadding { data_chars: usize },
    /// One character too many: no encoder produces `4k + 1` data characters.
    #[error(
        "invalid length: the number of data characters ({data_chars}) is 1 more than a multiple of 4"
    )]
    InvalidLength { data_chars: usize },
}

const INVALID: u8 = 0xff;

/// Decoding table after the URL-safe translation: `A-Z a-z 0-9 + /` and also `- _`.
static DECODE: [u8; 256] = {
    let mut t = [INVALID; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        t[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    t[b'-' as usize] = 62;
    t[b'_' as usize] = 63;
    t
};

const ENCODE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Decodes an LMDB image value (or TSV base64 field) exactly as cn_clip's `LMDBDataset` does.
pub fn decode_cn_clip(value: &[u8]) -> Result<Vec<u8>, Base64Error> {
    let mut out = Vec::with_capacity(value.len() / 4 * 3 + 3);
    let mut state = A2b::default();
    if value.is_ascii() {
        state.feed(value, &mut out);
    } else {
        // `decode("utf8", errors="ignore")` then `.encode("ascii")`: invalid sequences vanish,
        // valid non-ASCII characters are an error.
        let mut offset = 0;
        for chunk in value.utf8_chunks() {
            let valid = chunk.valid();
            if let Some((i, ch)) = valid.char_indices().find(|(_, c)| !c.is_ascii()) {
                return Err(Base64Error::NonAscii {
                    ch,
                    offset: offset + i,
                });
            }
            // Python checks the whole text for non-ASCII before decoding, so keep scanning even
            // after padding has ended the data.
            state.feed(valid.as_bytes(), &mut out);
            offset += valid.len() + chunk.invalid().len();
        }
    }
    state.finish(out)
}

/// CPython's `binascii.a2b_base64(strict_mode=False)` state machine.
#[derive(Default)]
struct A2b {
    quad_pos: u8,
    left: u8,
    pads: u8,
    done: bool,
    data_chars: usize,
}

impl A2b {
    /// Feeds bytes; returns true once padding ended the data (the rest of the input is ignored).
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> bool {
        if self.done {
            return true;
        }
        for &b in bytes {
            if b == b'=' {
                if self.quad_pos >= 2 {
                    self.pads += 1;
                    if self.quad_pos + self.pads >= 4 {
                        self.done = true;
                        return true;
                    }
                }
                continue;
            }
            let v = DECODE[b as usize];
            if v == INVALID {
                continue;
            }
            self.pads = 0;
            self.data_chars += 1;
            match self.quad_pos {
                0 => {
                    self.quad_pos = 1;
                    self.left = v;
                }
                1 => {
                    self.quad_pos = 2;
                    out.push((self.left << 2) | (v >> 4));
                    self.left = v & 0x0f;
                }
                2 => {
                    self.quad_pos = 3;
                    out.push((self.left << 4) | (v >> 2));
                    self.left = v & 0x03;
                }
                _ => {
                    self.quad_pos = 0;
                    out.push((self.left << 6) | v);
                    self.left = 0;
                }
            }
        }
        false
    }

    fn finish(self, out: Vec<u8>) -> Result<Vec<u8>, Base64Error> {
        match (self.done, self.quad_pos) {
            (true, _) | (false, 0) => Ok(out),
            (false, 1) => Err(Base64Error::InvalidLength {
                data_chars: self.data_chars,
            }),
            (false, _) => Err(Base64Error::IncorrectPadding {
                data_chars: self.data_chars,
            }),
        }
    }
}

/// Standard base64 with padding, as `base64.b64encode(bytes).decode()` writes a TSV field.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ENCODE[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_lengths() {
        let data: Vec<u8> = (0..=255u8).collect();
        for n in 0..data.len() {
            let text = encode(&data[..n]);
            assert_eq!(text.len() % 4, 0);
            assert_eq!(
                decode_cn_clip(text.as_bytes()).unwrap(),
                &data[..n],
                "n={n}"
            );
        }
    }

    #[test]
    fn known_vectors() {
        // RFC 4648 section 10.
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode_cn_clip(coded.as_bytes()).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn lenient_like_cpython() {
        // URL-safe alphabet and the standard one mix.
        assert_eq!(decode_cn_clip(b"-_-_").unwrap(), vec![0xfb, 0xff, 0xbf]);
        assert_eq!(decode_cn_clip(b"+/+/").unwrap(), vec![0xfb, 0xff, 0xbf]);
        // Line breaks and junk are skipped.
        assert_eq!(decode_cn_clip(b"Zm9v\nYmFy\r\n").unwrap(), b"foobar");
        assert_eq!(decode_cn_clip(b"Z!m*9v").unwrap(), b"foo");
        // Data after complete padding is ignored.
        assert_eq!(decode_cn_clip(b"Zg==Zm9v").unwrap(), b"f");
        // '=' before the second character of a quad is skipped.
        assert_eq!(decode_cn_clip(b"=Zm9v").unwrap(), b"foo");
        // Invalid UTF-8 bytes are dropped before decoding.
        assert_eq!(decode_cn_clip(b"Zm\xff9v").unwrap(), b"foo");
    }

    #[test]
    fn errors_like_cpython() {
        assert_eq!(
            decode_cn_clip(b"Zm9vY").unwrap_err(),
            Base64Error::InvalidLength { data_chars: 5 }
        );
        assert_eq!(
            decode_cn_clip(b"Zm9vYg").unwrap_err(),
            Base64Error::IncorrectPadding { data_chars: 6 }
        );
        assert_eq!(
            decode_cn_clip(b"Zg=").unwrap_err(),
            Base64Error::IncorrectPadding { data_chars: 2 }
        );
        assert!(matches!(
            decode_cn_clip("Zm9v商".as_bytes()).unwrap_err(),
            Base64Error::NonAscii {
                ch: '商',
                offset: 4
            }
        ));
    }
}
