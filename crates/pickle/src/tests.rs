use super::*;

fn plain(data: &[u8]) -> Result<Value, PickleError> {
    load(data, &Policy::default(), &mut NoGlobals)
}

fn roundtrip_int(protocol: u8, v: i64) -> i64 {
    let mut w = Writer::new(protocol);
    w.int(v);
    plain(&w.finish()).unwrap().as_int().unwrap()
}

/// Every boundary of BININT1/BININT2/BININT/LONG1: ±2^k and one either side, both protocols.
#[test]
fn ints_round_trip_through_every_encoding() {
    let mut values = vec![0, i64::MAX, i64::MIN, i64::MIN + 1];
    for k in 0..63 {
        let p = 1i64 << k;
        values.extend([p - 1, p, p + 1, -p + 1, -p, -p - 1]);
    }
    for protocol in [2, 4] {
        for &v in &values {
            assert_eq!(roundtrip_int(protocol, v), v, "protocol {protocol}");
        }
    }
}

/// CPython 3.11: `pickle.dumps(v, protocol=p)` for the encodings `Writer` chooses.
#[test]
fn writer_matches_cpython() {
    let one = |protocol: u8, f: &dyn Fn(&mut Writer)| {
        let mut w = Writer::new(protocol);
        f(&mut w);
        w.finish()
    };
    // pickle.dumps(1) — a frame under 4 bytes gets no FRAME header.
    assert_eq!(one(4, &|w| w.int(1)), b"\x80\x04K\x01.");
    // pickle.dumps(-1, protocol=2), pickle.dumps(2**40, protocol=2)
    assert_eq!(one(2, &|w| w.int(-1)), b"\x80\x02J\xff\xff\xff\xff.");
    assert_eq!(
        one(2, &|w| w.int(1 << 40)),
        b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\x01."
    );
    // pickle.dumps(("ab",)) and pickle.dumps(("ab",), protocol=2)
    let tuple1 = |w: &mut Writer| {
        w.str("ab");
        w.memoize();
        w.tuple(1);
        w.memoize();
    };
    assert_eq!(
        one(4, &tuple1),
        b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8c\x02ab\x94\x85\x94."
    );
    assert_eq!(
        one(2, &tuple1),
        b"\x80\x02X\x02\x00\x00\x00abq\x00\x85q\x01."
    );
    // pickle.dumps("a" * 70000): the payload is written outside any frame.
    let long = "a".repeat(70000);
    let got = one(4, &|w| {
        w.str(&long);
        w.memoize();
    });
    let mut want = b"\x80\x04X\x70\x11\x01\x00".to_vec();
    want.extend_from_slice(long.as_bytes());
    want.extend_from_slice(b"\x94.");
    assert_eq!(got, want);
    // pickle.dumps((1, 2, 3, 4), protocol=2)
    let four = |w: &mut Writer| {
        w.int_tuple(&[1, 2, 3, 4]);
        w.memoize();
    };
    assert_eq!(one(2, &four), b"\x80\x02(K\x01K\x02K\x03K\x04tq\x00.");
}

#[test]
fn errors_name_opcode_and_offset() {
    let err = plain(&[0x80, 2, b'i', b'\n']).unwrap_err();
    assert_eq!(
        err,
        PickleError::Opcode {
            name: "INST",
            code: b'i',
            offset: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "unsupported pickle opcode INST (0x69) at byte 2"
    );
    let err = plain(b"\x80\x02cos\nsystem\n)R.").unwrap_err();
    assert!(
        matches!(err, PickleError::Global { offset: 14, ref module, ref name } if module == "os" && name == "system"),
        "{err:?}"
    );
    let err = plain(&[0x80, 2, b'X', 9, 0, 0, 0, b'a']).unwrap_err();
    assert_eq!(
        err,
        PickleError::Truncated {
            offset: 2,
            at: 7,
            wanted: 9,
            remaining: 1
        }
    );
    assert_eq!(err.missing(), Some(8));
    assert!(matches!(
        plain(&[0x80, 2, b'0']).unwrap_err(),
        PickleError::Malformed { offset: 2, .. }
    ));
    assert!(matches!(
        plain(&[0x80, 6]).unwrap_err(),
        PickleError::Protocol {
            offset: 0,
            protocol: 6,
            ..
        }
    ));
    // A MARK hides what is below it.
    assert!(matches!(
        plain(b"\x80\x02K\x01(\x85.").unwrap_err(),
        PickleError::Malformed { offset: 5, .. }
    ));
    assert!(matches!(
        plain(b"\x80\x02K\x01(\x94.").unwrap_err(),
        PickleError::Malformed { offset: 5, .. }
    ));
}

#[test]
fn policy_restricts_opcodes_protocols_and_the_end() {
    let strict = Policy {
        opcodes: Opcodes::of(&[op::PROTO, op::BININT1, op::STOP]),
        min_protocol: Some(3),
        strict_stop: true,
    };
    let run = |data: &[u8]| load(data, &strict, &mut NoGlobals);
    assert_eq!(run(b"\x80\x03K\x07.").unwrap().as_int(), Some(7));
    // Allowed by the machine, not by the policy.
    assert_eq!(
        run(b"\x80\x03N.").unwrap_err(),
        PickleError::Opcode {
            name: "NONE",
            code: b'N',
            offset: 2
        }
    );
    assert!(matches!(
        run(b"\x80\x02K\x07.").unwrap_err(),
        PickleError::Protocol {
            protocol: 2,
            oldest: 3,
            ..
        }
    ));
    assert!(matches!(
        run(b"I7\n.").unwrap_err(),
        PickleError::Protocol { protocol: 0, .. }
    ));
    assert!(matches!(
        run(b"").unwrap_err(),
        PickleError::Truncated { .. }
    ));
    let left = run(b"\x80\x03K\x07K\x08.").unwrap_err();
    assert!(
        left.to_string().contains("values left on the stack"),
        "{left}"
    );
    let after = run(b"\x80\x03K\x07.K").unwrap_err();
    assert!(after.to_string().contains("bytes after STOP"), "{after}");
    // pickle.loads ignores both.
    assert_eq!(plain(b"\x80\x03K\x07K\x08.K").unwrap().as_int(), Some(8));
}

#[test]
fn text_protocol_memo_and_longs() {
    // pickle.dumps([1, 1.5, None, True], protocol=0)
    let v = plain(b"(lp0\nI1\naF1.5\naNaI01\na.").unwrap();
    let Value::List(items) = v else {
        panic!("{v:?}")
    };
    let items = items.borrow();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0].as_int(), Some(1));
    assert!(matches!(items[1], Value::Float(f) if f == 1.5));
    assert!(matches!(items[2], Value::None));
    assert!(matches!(items[3], Value::Bool(true)));
    // Redundant sign bytes are dropped; more than 64 bits is a BigInt.
    assert_eq!(
        plain(b"\x80\x02\x8a\x09\xff\xff\xff\xff\xff\xff\xff\x7f\x00.")
            .unwrap()
            .as_int(),
        Some(i64::MAX)
    );
    assert!(matches!(
        plain(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.").unwrap(),
        Value::BigInt
    ));
    // BINGET of a stored str; GET of one never stored.
    let t = plain(b"\x80\x02X\x01\x00\x00\x00aq\x05h\x05\x86.").unwrap();
    let items = t.items().unwrap();
    assert_eq!(
        (items[0].as_str(), items[1].as_str()),
        (Some("a"), Some("a"))
    );
    assert!(plain(b"\x80\x02h\x05.").is_err());
}

/// An allow-list that builds one kind of object from `m.Point(x, y)` and persistent ids.
struct Points;

#[derive(Debug, Clone, PartialEq)]
enum Obj {
    Point(i64, i64),
    Persistent(String),
}

impl Globals for Points {
    type Object = Obj;

    fn call_global(
        &mut self,
        global: &Global,
        args: Vec<Value<Obj>>,
    ) -> Result<Value<Obj>, Refusal> {
        if let Some(v) = builtin(global, &args) {
            return v;
        }
        match (
            global.module.as_str(),
            global.name.as_str(),
            args.as_slice(),
        ) {
            ("m", "Point", [x, y]) => match (x.as_int(), y.as_int()) {
                (Some(x), Some(y)) => Ok(Value::Object(Obj::Point(x, y))),
                _ => Err(Refusal::Malformed("Point takes two ints".into())),
            },
            _ => Err(Refusal::global(global)),
        }
    }

    fn persistent_load(&mut self, pid: &Value<Obj>) -> Result<Value<Obj>, Refusal> {
        pid.as_str()
            .map(|s| Value::Object(Obj::Persistent(s.into())))
            .ok_or_else(|| Refusal::Malformed("pid".into()))
    }
}

#[test]
fn globals_allow_list() {
    let run = |data: &[u8]| load(data, &Policy::default(), &mut Points);
    let mut w = Writer::new(2);
    w.global("collections", "OrderedDict");
    w.empty_tuple();
    w.reduce();
    w.mark();
    w.str("p");
    w.global("m", "Point");
    w.int_tuple(&[1, -2]);
    w.reduce();
    w.str("q");
    w.str("key");
    w.binpersid();
    w.setitems();
    let Value::Dict(d) = run(&w.finish()).unwrap() else {
        panic!()
    };
    let d = d.borrow();
    assert!(matches!(d[0].1, Value::Object(Obj::Point(1, -2))));
    assert!(matches!(&d[1].1, Value::Object(Obj::Persistent(k)) if k == "key"));

    let err = run(b"\x80\x02cm\nPoint\nK\x01N\x86R.").unwrap_err();
    assert!(err.to_string().contains("Point takes two ints"), "{err}");
    let err = run(b"\x80\x02c__builtin__\neval\n)R.").unwrap_err();
    assert!(
        matches!(err, PickleError::Global { ref module, ref name, .. } if module == "builtins" && name == "eval"),
        "{err:?}"
    );
    // A global is only named until it is called.
    assert!(matches!(
        run(b"\x80\x02cos\nsystem\n.").unwrap(),
        Value::Global(_)
    ));
    // No persistent ids without an allow-list for them.
    assert!(plain(b"\x80\x02X\x01\x00\x00\x00kQ.").is_err());
}
