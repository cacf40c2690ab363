//! Writing pickles as CPython's C pickler writes them, for the opcodes our files need.

use crate::op;

/// CPython's `FRAME_SIZE_TARGET`: payloads of at least this size are written outside any frame.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// CPython's `FRAME_SIZE_MIN`: shorter frames get no `FRAME` header.
const FRAME_SIZE_MIN: usize = 4;
const FRAME_HEADER_SIZE: usize = 9;

/// A pickle being written, opcode by opcode, in the encodings CPython's C pickler chooses for the
/// protocol (the smallest integer opcode, `SHORT_BINUNICODE` from protocol 4, `MEMOIZE` or
/// `BINPUT`).
///
/// From protocol 4 it frames like `_Pickler_Write`, `_Pickler_CommitFrame` and
/// `_Pickler_write_bytes`: one frame, closed at [`finish`](Writer::finish), split only around a
/// payload of 64 KiB or more. (The C pickler also closes full frames between the items of lists,
/// dicts and sets; values written here with those must stay under 64 KiB to match byte for byte.)
#[derive(Debug, Clone)]
pub struct Writer {
    out: Vec<u8>,
    protocol: u8,
    framing: bool,
    frame_start: Option<usize>,
    memo_len: u32,
}

impl Writer {
    /// `PROTO protocol`; the protocol (2 to 5) decides the encodings.
    pub fn new(protocol: u8) -> Writer {
        Writer::with_capacity(protocol, 64)
    }

    pub fn with_capacity(protocol: u8, capacity: usize) -> Writer {
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&[op::PROTO, protocol]);
        Writer {
            out,
            protocol,
            framing: protocol >= 4,
            frame_start: None,
            memo_len: 0,
        }
    }

    /// `STOP`, and the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.write(&[op::STOP]);
        self.commit_frame();
        self.out
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.framing && self.frame_start.is_none() {
            self.frame_start = Some(self.out.len());
            self.out.extend_from_slice(&[0xfe; FRAME_HEADER_SIZE]);
        }
        self.out.extend_from_slice(bytes);
    }

    fn commit_frame(&mut self) {
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let frame_len = self.out.len() - start - FRAME_HEADER_SIZE;
        if frame_len >= FRAME_SIZE_MIN {
            self.out[start] = op::FRAME;
            self.out[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(frame_len as u64).to_le_bytes());
        } else {
            self.out.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// A header and a payload; large payloads bypass framing.
    fn write_bytes(&mut self, header: &[u8], payload: &[u8]) {
        if self.framing && payload.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            self.framing = false;
            self.write(header);
            self.write(payload);
            self.framing = true;
        } else {
            self.write(header);
            self.write(payload);
        }
    }

    pub fn mark(&mut self) {
        self.write(&[op::MARK]);
    }

    pub fn empty_dict(&mut self) {
        self.write(&[op::EMPTY_DICT]);
    }

    pub fn empty_tuple(&mut self) {
        self.write(&[op::EMPTY_TUPLE]);
    }

    pub fn setitems(&mut self) {
        self.write(&[op::SETITEMS]);
    }

    /// `TUPLE`: the items since the last [`mark`](Writer::mark).
    pub fn tuple_from_mark(&mut self) {
        self.write(&[op::TUPLE]);
    }

    /// The last `len` items as a tuple: `EMPTY_TUPLE`, `TUPLE1`–`TUPLE3`, or (more than three)
    /// `TUPLE` to a [`mark`](Writer::mark) written before them, as CPython's `save_tuple`.
    pub fn tuple(&mut self, len: usize) {
        match len {
            0 => self.empty_tuple(),
            1 => self.write(&[op::TUPLE1]),
            2 => self.write(&[op::TUPLE2]),
            3 => self.write(&[op::TUPLE3]),
            _ => self.tuple_from_mark(),
        }
    }

    pub fn reduce(&mut self) {
        self.write(&[op::REDUCE]);
    }

    pub fn binpersid(&mut self) {
        self.write(&[op::BINPERSID]);
    }

    /// Stores the top of the stack in the next memo slot (`MEMOIZE` from protocol 4, `BINPUT`
    /// or `LONG_BINPUT` before), as the pickler does after each str and tuple it writes.
    pub fn memoize(&mut self) {
        let key = self.memo_len;
        self.memo_len = self.memo_len.saturating_add(1);
        if self.protocol >= 4 {
            self.write(&[op::MEMOIZE]);
        } else if let Ok(k) = u8::try_from(key) {
            self.write(&[op::BINPUT, k]);
        } else {
            let mut b = vec![op::LONG_BINPUT];
            b.extend_from_slice(&key.to_le_bytes());
            self.write(&b);
        }
    }

    pub fn bool(&mut self, v: bool) {
        self.write(&[if v { op::NEWTRUE } else { op::NEWFALSE }]);
    }

    /// `BININT1`, `BININT2`, `BININT` or `LONG1`, whichever is smallest.
    pub fn int(&mut self, v: i64) {
        if let Ok(v32) = i32::try_from(v) {
            let b = v32.to_le_bytes();
            if b[2] != 0 || b[3] != 0 {
                self.write(&[op::BININT, b[0], b[1], b[2], b[3]]);
            } else if b[1] != 0 {
                self.write(&[op::BININT2, b[0], b[1]]);
            } else {
                self.write(&[op::BININT1, b[0]]);
            }
        } else {
            // LONG1: little-endian two's complement, as few bytes as keep the sign
            // (CPython computes `nbits / 8 + 1` and drops a redundant 0xff).
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (top, next) = (bytes[n - 1], bytes[n - 2]);
                if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.write(&[op::LONG1, n as u8]);
            self.write(&bytes[..n]);
        }
    }

    /// A str: `SHORT_BINUNICODE` (protocol 4 on, up to 255 bytes), `BINUNICODE` or
    /// `BINUNICODE8` (protocol 4 on). Not memoized: call [`memoize`](Writer::memoize).
    pub fn str(&mut self, s: &str) {
        let n = s.len();
        if self.protocol >= 4 && n <= 0xff {
            self.write_bytes(&[op::SHORT_BINUNICODE, n as u8], s.as_bytes());
        } else if let Ok(n32) = u32::try_from(n) {
            let mut header = vec![op::BINUNICODE];
            header.extend_from_slice(&n32.to_le_bytes());
            self.write_bytes(&header, s.as_bytes());
        } else if self.protocol >= 4 {
            let mut header = vec![op::BINUNICODE8];
            header.extend_from_slice(&(n as u64).to_le_bytes());
            self.write_bytes(&header, s.as_bytes());
        } else {
            // Protocols 2 and 3 cannot hold a str of 4 GiB (CPython raises); keys and names are
            // far below that: saturate rather than wrap if one is not.
            let mut header = vec![op::BINUNICODE];
            header.extend_from_slice(&u32::MAX.to_le_bytes());
            self.write_bytes(&header, s.as_bytes());
        }
    }

    /// `GLOBAL module\nname\n`, as protocols 2 and 3 name a class or function.
    pub fn global(&mut self, module: &str, name: &str) {
        let mut b = Vec::with_capacity(module.len() + name.len() + 3);
        b.push(op::GLOBAL);
        b.extend_from_slice(module.as_bytes());
        b.push(b'\n');
        b.extend_from_slice(name.as_bytes());
        b.push(b'\n');
        self.write(&b);
    }

    /// A tuple of ints (sizes and strides), with Python's short forms.
    pub fn int_tuple(&mut self, items: &[i64]) {
        if items.len() > 3 {
            self.mark();
        }
        for &i in items {
            self.int(i);
        }
        self.tuple(items.len());
    }
}
