//! The pickles in cn_clip's `pairs` LMDB: `pickle.dumps((image_id, text_id, text))`.
//!
//! [`dumps_pair`] writes the bytes CPython 3.8+'s C pickler writes with its default protocol 4
//! (framing, `MEMOIZE`, the smallest integer opcode), so an LMDB built here is byte-for-byte the one
//! `build_lmdb_dataset.py` builds. [`loads_pair`] reads protocols 2 to 5, which covers every
//! Python 3 interpreter's default (3 before 3.8, 4 after) and explicit choices, with the
//! workspace's pickle machine (`cnclip-pickle`) allowed only the opcodes such values use and no
//! globals. Anything else (a float id, a nested list, a class instance) is an error that says what
//! was found, never a guess.

use cnclip_pickle::{NoGlobals, Opcodes, Policy, Value, Writer, op};

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

/// What a pair value may use: the opcodes of ints, strs, None, bools, floats, tuples and the memo,
/// as protocols 2 to 5 write them; no globals, so nothing but data is ever built.
const PAIR_POLICY: Policy = Policy {
    opcodes: Opcodes::of(&[
        op::PROTO,
        op::FRAME,
        op::STOP,
        op::MARK,
        op::BININT,
        op::BININT1,
        op::BININT2,
        op::LONG1,
        op::LONG4,
        op::BINUNICODE,
        op::SHORT_BINUNICODE,
        op::BINUNICODE8,
        op::MEMOIZE,
        op::BINPUT,
        op::LONG_BINPUT,
        op::BINGET,
        op::LONG_BINGET,
        op::EMPTY_TUPLE,
        op::TUPLE,
        op::TUPLE1,
        op::TUPLE2,
        op::TUPLE3,
        op::NONE,
        op::NEWTRUE,
        op::NEWFALSE,
        op::BINFLOAT,
    ]),
    min_protocol: Some(2),
    strict_stop: true,
};

/// `pickle.dumps((image_id, text_id, text))` as CPython ≥ 3.8 writes it (protocol 4).
///
/// Byte-identical values make an LMDB built here indistinguishable from cn_clip's, and let tests
/// compare whole databases. The C pickler closes full frames only between the items of lists,
/// dicts and sets, never inside a tuple, so a pair's frame is split only around a text of 64 KiB
/// or more (the fixtures check both sizes).
pub fn dumps_pair(image_id: i64, text_id: i64, text: &str) -> Vec<u8> {
    let mut w = Writer::with_capacity(4, text.len() + 32);
    w.int(image_id);
    w.int(text_id);
    w.str(text);
    w.memoize();
    w.tuple(3);
    w.memoize();
    w.finish()
}

fn describe(v: &Value) -> String {
    match v {
        Value::Int(v) => format!("the int {v}"),
        Value::BigInt => "an int wider than 64 bits".into(),
        Value::Str(s) => format!("the str {s:?}"),
        Value::Tuple(items) => format!(
            "a tuple of {} ({})",
            items.len(),
            items.iter().map(kind).collect::<Vec<_>>().join(", ")
        ),
        Value::None => "None".into(),
        Value::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
        Value::Float(v) => format!("the float {v}"),
        other => format!("a {}", other.type_name()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::BigInt => "int wider than 64 bits",
        other => other.type_name(),
    }
}

fn pickle_error(e: cnclip_pickle::PickleError) -> PickleError {
    use cnclip_pickle::PickleError as E;
    match e {
        E::Truncated { at, .. } => PickleError::Truncated {
            offset: at,
            needed: e.missing().unwrap_or(0),
        },
        E::Protocol { protocol, .. } => PickleError::Protocol(protocol),
        E::Opcode { code, offset, .. } => PickleError::Opcode {
            opcode: code,
            offset,
        },
        E::Malformed { offset, reason } => PickleError::Malformed { offset, reason },
        // Unreachable with no GLOBAL/REDUCE opcodes allowed; reported all the same.
        E::Global {
            offset,
            module,
            name,
        } => PickleError::Malformed {
            offset,
            reason: format!("calls {module}.{name}"),
        },
    }
}

/// Reads a `pairs` value: a pickled `(image_id, text_id, text)` of protocol 2 to 5.
pub fn loads_pair(data: &[u8]) -> Result<PickledPair, PickleError> {
    let value = cnclip_pickle::load(data, &PAIR_POLICY, &mut NoGlobals).map_err(pickle_error)?;
    if let Value::Tuple(items) = &value
        && let [Value::Int(image_id), Value::Int(text_id), Value::Str(text)] = items.as_slice()
    {
        return Ok(PickledPair {
            image_id: *image_id,
            text_id: *text_id,
            text: text.to_string(),
        });
    }
    Err(PickleError::Shape {
        found: describe(&value),
    })
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
