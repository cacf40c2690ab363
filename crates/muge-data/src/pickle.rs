//! The pickles in cn_clip's `pairs` LMDB: `pickle.dumps((image_id, text_id, text))`.
//!
//! [`dumps_pair`] writes the bytes CPython 3.8+'s C pickler writes with its default protocol 4
//! (framing, `MEMOIZE`, the smallest integer opcode), so an LMDB built here is byte-for-byte the one
//! `build_lmdb_dataset.py` builds. [`loads_pair`] reads protocols 2 to 5, which covers every
//! Python 3 interpreter's default (3 before 3.8, 4 after) and explicit choices, with a small stack
//! machine over the opcodes such values use. Anything else (a float id, a nested list, a class
//! instance) is an error that says what was found, never a guess.

/// Why a pair value is not a `(int, int, str)` pickle we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("the pickle ends early at byte {offset} (needed {needed} more bytes)")]
    Truncated { offset: usize, needed: usize },
    #[error("unsupported pickle protocol {0} (expected 2 to 5)")]
    Protocol(u8),
    #[error(
        "pickle opcode 0x{opcode:02x} at byte {offset} is not one a (int, int, str) tuple uses"
    )]
    Opcode { opcode: u8, offset: usize },
    #[error("malformed pickle at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error(
        "the pickled value is {found}, expected a tuple (image_id: int, text_id: int, text: str)"
    )]
    Shape { found: String },
}

/// A decoded `pairs` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledPair {
    pub image_id: i64,
    pub text_id: i64,
    pub text: String,
}

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINUNICODE: u8 = b'X';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const MEMOIZE: u8 = 0x94;
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BINFLOAT: u8 = b'G';

/// CPython's `FRAME_SIZE_TARGET`: payloads of at least this size are written outside any frame.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// CPython's `FRAME_SIZE_MIN`: shorter frames get no `FRAME` header.
const FRAME_SIZE_MIN: usize = 4;
const FRAME_HEADER_SIZE: usize = 9;

/// A protocol-4 output buffer that frames like CPython's C pickler (`_Pickler_Write`,
/// `_Pickler_CommitFrame`, `_Pickler_write_bytes`). The C pickler closes full frames only between
/// the items of lists, dicts and sets (`_Pickler_OpcodeBoundary`), never inside a tuple, so a
/// pair's frame is split only around a text of 64 KiB or more (the fixtures check both sizes).
struct Framer {
    out: Vec<u8>,
    framing: bool,
    frame_start: Option<usize>,
}

impl Framer {
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
            self.out[start] = FRAME;
            self.out[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(frame_len as u64).to_le_bytes());
        } else {
            self.out.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// A header and a payload; large payloads bypass framing.
    fn write_bytes(&mut self, header: &[u8], payload: &[u8]) {
        if payload.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            let framing = std::mem::replace(&mut self.framing, false);
            self.write(header);
            self.write(payload);
            self.framing = framing;
        } else {
            self.write(header);
            self.write(payload);
        }
    }

    fn int(&mut self, v: i64) {
        if let Ok(v32) = i32::try_from(v) {
            let b = v32.to_le_bytes();
            if b[2] != 0 || b[3] != 0 {
                self.write(&[BININT, b[0], b[1], b[2], b[3]]);
            } else if b[1] != 0 {
                self.write(&[BININT2, b[0], b[1]]);
            } else {
                self.write(&[BININT1, b[0]]);
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
            self.write(&[LONG1, n as u8]);
            self.write(&bytes[..n]);
        }
    }

    fn str(&mut self, s: &str) {
        let n = s.len();
        if n <= 0xff {
            self.write_bytes(&[SHORT_BINUNICODE, n as u8], s.as_bytes());
        } else if let Ok(n32) = u32::try_from(n) {
            let mut header = vec![BINUNICODE];
            header.extend_from_slice(&n32.to_le_bytes());
            self.write_bytes(&header, s.as_bytes());
        } else {
            let mut header = vec![BINUNICODE8];
            header.extend_from_slice(&(n as u64).to_le_bytes());
            self.write_bytes(&header, s.as_bytes());
        }
        self.write(&[MEMOIZE]);
    }
}

/// `pickle.dumps((image_id, text_id, text))` as CPython ≥ 3.8 writes it (protocol 4).
///
/// Byte-identical values make an LMDB built here indistinguishable from cn_clip's, and let tests
/// compare whole databases.
pub fn dumps_pair(image_id: i64, text_id: i64, text: &str) -> Vec<u8> {
    let mut f = Framer {
        out: Vec::with_capacity(text.len() + 32),
        framing: false,
        frame_start: None,
    };
    f.write(&[PROTO, 4]);
    f.framing = true;
    f.int(image_id);
    f.int(text_id);
    f.str(text);
    f.write(&[TUPLE3, MEMOIZE]);
    f.write(&[STOP]);
    f.commit_frame();
    f.out
}

#[derive(Debug, Clone)]
enum Value {
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    None,
    Bool(bool),
    Float(f64),
    Mark,
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::Int(v) => format!("the int {v}"),
            Value::Str(s) => format!("the str {s:?}"),
            Value::Tuple(items) => format!(
                "a tuple of {} ({})",
                items.len(),
                items.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
            ),
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
            Value::Float(v) => format!("the float {v}"),
            Value::Mark => "a bare MARK".into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Float(_) => "float",
            Value::Mark => "mark",
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(PickleError::Truncated {
                offset: self.pos,
                needed: n - (self.data.len() - self.pos),
            });
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn len_u64(&mut self, offset: usize, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| PickleError::Malformed {
            offset,
            reason: format!("length {n} does not fit in memory"),
        })
    }
}

fn signed_le(bytes: &[u8], offset: usize) -> Result<i64, PickleError> {
    if bytes.is_empty() {
        return Ok(0);
    }
    // Strip redundant sign bytes, then sign-extend into i64.
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut n = bytes.len();
    while n > 1 {
        let (top, next) = (bytes[n - 1], bytes[n - 2]);
        if (!negative && top == 0 && next & 0x80 == 0)
            || (negative && top == 0xff && next & 0x80 != 0)
        {
            n -= 1;
        } else {
            break;
        }
    }
    if n > 8 {
        return Err(PickleError::Malformed {
            offset,
            reason: format!("integer of {} bytes does not fit in 64 bits", bytes.len()),
        });
    }
    let mut b = [if negative { 0xff } else { 0 }; 8];
    b[..n].copy_from_slice(&bytes[..n]);
    Ok(i64::from_le_bytes(b))
}

fn load(data: &[u8]) -> Result<Value, PickleError> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Value> = std::collections::HashMap::new();
    let malformed = |offset: usize, reason: &str| PickleError::Malformed {
        offset,
        reason: reason.to_string(),
    };
    let string = |bytes: &[u8], offset: usize| {
        // CPython decodes with 'surrogatepass'; Rust strings cannot hold surrogates, so such a
        // text is reported instead of altered.
        String::from_utf8(bytes.to_vec())
            .map(Value::Str)
            .map_err(|e| PickleError::Malformed {
                offset,
                reason: format!("str is not valid UTF-8: {e}"),
            })
    };
    let first = r.u8()?;
    if first != PROTO {
        return Err(PickleError::Protocol(0));
    }
    let proto = r.u8()?;
    if !(2..=5).contains(&proto) {
        return Err(PickleError::Protocol(proto));
    }
    loop {
        let offset = r.pos;
        let op = r.u8()?;
        match op {
            STOP => {
                let value = stack
                    .pop()
                    .ok_or_else(|| malformed(offset, "STOP on an empty stack"))?;
                if !stack.is_empty() {
                    return Err(malformed(offset, "values left on the stack at STOP"));
                }
                if r.pos != data.len() {
                    return Err(malformed(offset, "bytes after STOP"));
                }
                return Ok(value);
            }
            PROTO => {
                r.u8()?;
            }
            FRAME => {
                // Frames only group opcodes; their length is not needed to parse.
                r.le::<8>()?;
            }
            MARK => stack.push(Value::Mark),
            BININT => stack.push(Value::Int(i64::from(i32::from_le_bytes(r.le::<4>()?)))),
            BININT1 => stack.push(Value::Int(i64::from(r.u8()?))),
            BININT2 => stack.push(Value::Int(i64::from(u16::from_le_bytes(r.le::<2>()?)))),
            LONG1 => {
                let n = usize::from(r.u8()?);
                let bytes = r.take(n)?;
                stack.push(Value::Int(signed_le(bytes, offset)?));
            }
            LONG4 => {
                let n = i32::from_le_bytes(r.le::<4>()?);
                let n =
                    usize::try_from(n).map_err(|_| malformed(offset, "negative LONG4 length"))?;
                let bytes = r.take(n)?;
                stack.push(Value::Int(signed_le(bytes, offset)?));
            }
            SHORT_BINUNICODE => {
                let n = usize::from(r.u8()?);
                stack.push(string(r.take(n)?, offset)?);
            }
            BINUNICODE => {
                let len = u64::from(u32::from_le_bytes(r.le::<4>()?));
                let n = r.len_u64(offset, len)?;
                stack.push(string(r.take(n)?, offset)?);
            }
            BINUNICODE8 => {
                let len = u64::from_le_bytes(r.le::<8>()?);
                let n = r.len_u64(offset, len)?;
                stack.push(string(r.take(n)?, offset)?);
            }
            NONE => stack.push(Value::None),
            NEWTRUE => stack.push(Value::Bool(true)),
            NEWFALSE => stack.push(Value::Bool(false)),
            BINFLOAT => stack.push(Value::Float(f64::from_be_bytes(r.le::<8>()?))),
            EMPTY_TUPLE => stack.push(Value::Tuple(Vec::new())),
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1 + 1);
                if stack.len() < n
                    || stack[stack.len() - n..]
                        .iter()
                        .any(|v| matches!(v, Value::Mark))
                {
                    return Err(malformed(offset, "tuple opcode without enough values"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            TUPLE => {
                let mark = stack
                    .iter()
                    .rposition(|v| matches!(v, Value::Mark))
                    .ok_or_else(|| malformed(offset, "TUPLE without MARK"))?;
                let items = stack.split_off(mark + 1);
                stack.pop();
                stack.push(Value::Tuple(items));
            }
            MEMOIZE | BINPUT | LONG_BINPUT => {
                let key = match op {
                    MEMOIZE => memo.len() as u64,
                    BINPUT => u64::from(r.u8()?),
                    _ => u64::from(u32::from_le_bytes(r.le::<4>()?)),
                };
                let top = stack
                    .last()
                    .ok_or_else(|| malformed(offset, "memo store on an empty stack"))?;
                memo.insert(key, top.clone());
            }
            BINGET | LONG_BINGET => {
                let key = if op == BINGET {
                    u64::from(r.u8()?)
                } else {
                    u64::from(u32::from_le_bytes(r.le::<4>()?))
                };
                let value = memo.get(&key).ok_or_else(|| {
                    malformed(offset, &format!("memo key {key} was never stored"))
                })?;
                stack.push(value.clone());
            }
            opcode => return Err(PickleError::Opcode { opcode, offset }),
        }
    }
}

/// Reads a `pairs` value: a pickled `(image_id, text_id, text)` of protocol 2 to 5.
pub fn loads_pair(data: &[u8]) -> Result<PickledPair, PickleError> {
    match load(data)? {
        Value::Tuple(items) => match <[Value; 3]>::try_from(items) {
            Ok([Value::Int(image_id), Value::Int(text_id), Value::Str(text)]) => Ok(PickledPair {
                image_id,
                text_id,
                text,
            }),
            Ok(items) => Err(PickleError::Shape {
                found: Value::Tuple(items.to_vec()).describe(),
            }),
            Err(items) => Err(PickleError::Shape {
                found: Value::Tuple(items).describe(),
            }),
        },
        other => Err(PickleError::Shape {
            found: other.describe(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two examples of the specification (§5.2), written by CPython 3.11.
    #[test]
    fn spec_examples() {
        let text = "高级感托特包斜挎";
        let mut p4 = vec![
            0x80, 4, 0x95, 0x26, 0, 0, 0, 0, 0, 0, 0, 0x4a, 0x79, 0x6c, 0x10, 0,
        ];
        p4.extend_from_slice(&[0x4d, 0xec, 0x20, 0x8c, 0x18]);
        p4.extend_from_slice(text.as_bytes());
        p4.extend_from_slice(&[0x94, 0x87, 0x94, 0x2e]);
        assert_eq!(dumps_pair(1076345, 8428, text), p4);
        let mut p3 = vec![
            0x80, 3, 0x4a, 0x79, 0x6c, 0x10, 0, 0x4d, 0xec, 0x20, 0x58, 0x18, 0, 0, 0,
        ];
        p3.extend_from_slice(text.as_bytes());
        p3.extend_from_slice(&[0x71, 0, 0x87, 0x71, 1, 0x2e]);
        let want = PickledPair {
            image_id: 1076345,
            text_id: 8428,
            text: text.into(),
        };
        assert_eq!(loads_pair(&p4).unwrap(), want);
        assert_eq!(loads_pair(&p3).unwrap(), want);
    }

    #[test]
    fn ints_round_trip() {
        for v in [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -128,
            -129,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
            i64::from(i32::MAX) + 1,
            i64::from(i32::MIN) - 1,
            7454547004,
            1 << 39,
            -(1 << 39),
            (1 << 39) - 1,
            i64::MAX,
            i64::MIN,
        ] {
            let other = v.wrapping_neg().wrapping_sub(1);
            let p = dumps_pair(v, other, "");
            let got = loads_pair(&p).unwrap();
            assert_eq!((got.image_id, got.text_id), (v, other), "{v}");
        }
    }

    #[test]
    fn wrong_shapes_are_named() {
        // pickle.dumps((1.5, 2, "x"), protocol=2)
        let p = [
            0x80, 2, b'G', 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, b'K', 2, b'X', 1, 0, 0, 0, b'x', b'q', 0,
            0x87, b'q', 1, b'.',
        ];
        let e = loads_pair(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pickled value is a tuple of 3 (float, int, str), expected a tuple (image_id: int, text_id: int, text: str)"
        );
        assert!(matches!(
            loads_pair(&[0x80, 4, 0x95]),
            Err(PickleError::Truncated { .. })
        ));
        assert!(matches!(
            loads_pair(&[0x80, 1]),
            Err(PickleError::Protocol(1))
        ));
        assert!(matches!(
            loads_pair(b"(lp0\n."),
            Err(PickleError::Protocol(0))
        ));
        assert!(matches!(
            loads_pair(&[0x80, 4, b']', b'.']),
            Err(PickleError::Opcode {
                opcode: b']',
                offset: 2
            })
        ));
    }
}
