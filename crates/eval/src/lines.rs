//! Streaming line reader with Python's text-mode rules.
//!
//! cn_clip iterates `open(path, encoding="utf-8")`. That splits on `\n`, `\r\n` and a lone `\r`
//! (universal newlines), and it decodes the file in chunks of 8192 bytes, failing on invalid UTF-8
//! when the chunk holding it is read, which can be before the lines ahead of it in that chunk are
//! looked at. Reading the same way gives the same lines, the same first error and the same line
//! numbers in our messages.

use std::io::Read;

/// `TextIOWrapper._CHUNK_SIZE`: bytes decoded per read.
const CHUNK: usize = 8192;

/// One line: its 1-based number and its bytes without the terminator.
pub(crate) struct RawLine {
    pub number: usize,
    pub bytes: Vec<u8>,
}

/// Why a line could not be produced.
pub(crate) enum LineError {
    Io(std::io::Error),
    /// Invalid UTF-8 was decoded while reading line `line`, at byte `offset` of the file.
    Utf8 {
        line: usize,
        offset: u64,
    },
}

pub(crate) struct UniversalLines<R> {
    reader: R,
    /// Decoded, not yet consumed bytes.
    buf: Vec<u8>,
    /// Start of the unconsumed part of `buf`.
    pos: usize,
    /// Bytes read from the file so far.
    loaded: u64,
    /// An incomplete UTF-8 sequence at the end of the last chunk, waiting for the next one.
    tail: Vec<u8>,
    eof: bool,
    number: usize,
}

impl<R: Read> UniversalLines<R> {
    pub(crate) fn new(reader: R) -> Self {
        Self {
            reader,
            buf: Vec::new(),
            pos: 0,
            loaded: 0,
            tail: Vec::new(),
            eof: false,
            number: 0,
        }
    }

    /// Reads and validates one chunk; `Err(offset)` on invalid UTF-8.
    fn load(&mut self) -> Result<Result<(), u64>, std::io::Error> {
        let mut chunk = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            match self.reader.read(&mut chunk[n..]) {
                Ok(0) => break,
                Ok(m) => n += m,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        chunk.truncate(n);
        if n == 0 {
            self.eof = true;
        }
        let start = self.loaded - self.tail.len() as u64;
        self.loaded += n as u64;
        let mut check = std::mem::take(&mut self.tail);
        check.extend_from_slice(&chunk);
        if let Err(e) = std::str::from_utf8(&check) {
            let valid = e.valid_up_to();
            if e.error_len().is_some() || self.eof {
                return Ok(Err(start + valid as u64));
            }
            self.tail = check[valid..].to_vec();
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(&chunk);
        Ok(Ok(()))
    }

    pub(crate) fn next_line(&mut self) -> Result<Option<RawLine>, LineError> {
        let mut from = self.pos;
        loop {
            let rest = &self.buf[from..];
            let found = rest.iter().position(|&b| b == b'\n' || b == b'\r');
            if let Some(i) = found {
                let at = from + i;
                // A `\r` at the end of what was decoded waits for the next chunk, to see whether
                // a `\n` follows (Python's newline decoder holds it back the same way).
                if !(self.buf[at] == b'\r' && at + 1 == self.buf.len() && !self.eof) {
                    let end = if self.buf[at] == b'\r' && self.buf.get(at + 1) == Some(&b'\n') {
                        at + 2
                    } else {
                        at + 1
                    };
                    let bytes = self.buf[self.pos..at].to_vec();
                    self.pos = end;
                    self.number += 1;
                    return Ok(Some(RawLine {
                        number: self.number,
                        bytes,
                    }));
                }
            } else if self.eof {
                if self.pos == self.buf.len() {
                    return Ok(None);
                }
                let bytes = self.buf[self.pos..].to_vec();
                self.pos = self.buf.len();
                self.number += 1;
                return Ok(Some(RawLine {
                    number: self.number,
                    bytes,
                }));
            }
            // Need more input: search again from where this search stopped.
            let searched = self.buf.len() - self.pos;
            match self.load().map_err(LineError::Io)? {
                Ok(()) => from = self.pos + searched.saturating_sub(1),
                Err(offset) => {
                    return Err(LineError::Utf8 {
                        line: self.number + 1,
                        offset,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = UniversalLines::new(input);
        let mut out = Vec::new();
        while let Ok(Some(line)) = lines.next_line() {
            out.push(line.bytes);
        }
        out
    }

    #[test]
    fn splits_like_python_universal_newlines() {
        // `io.StringIO("a\r\nb\rc\n\nd").readlines()` → ['a\n', 'b\n', 'c\n', '\n', 'd']
        assert_eq!(
            split(b"a\r\nb\rc\n\nd"),
            vec![
                b"a".to_vec(),
                b"b".to_vec(),
                b"c".to_vec(),
                b"".to_vec(),
                b"d".to_vec()
            ]
        );
        assert_eq!(split(b"a\n"), vec![b"a".to_vec()]);
        assert_eq!(split(b"a\r"), vec![b"a".to_vec()]);
        assert_eq!(split(b"a\r\r\n"), vec![b"a".to_vec(), b"".to_vec()]);
        assert!(split(b"").is_empty());
    }
}
