//! The machine: CPython's unpickler restricted to data, with the callables and opcodes each user
//! allows.

use crate::PickleError;
use crate::op::{self, Opcodes};
use crate::value::{Global, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;

/// What a pickle may use besides the callables of its [`Globals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Opcodes outside this set are [`PickleError::Opcode`] where they stand.
    pub opcodes: Opcodes,
    /// `Some(p)`: the pickle must begin with `PROTO` of `p` to 5 (so `p` ≥ 2: protocols 0 and 1
    /// have no `PROTO`); `None`: any protocol up to 5, text protocols included.
    pub min_protocol: Option<u8>,
    /// `STOP` must leave nothing else on the stack and end the data. `pickle.loads` ignores both;
    /// a value read from a database should have neither.
    pub strict_stop: bool,
}

impl Default for Policy {
    /// What `pickle.loads` accepts, restricted only by the [`Globals`].
    fn default() -> Policy {
        Policy {
            opcodes: Opcodes::ALL,
            min_protocol: None,
            strict_stop: false,
        }
    }
}

/// Why a [`Globals`] callback refused; the machine adds the offset of the opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The callable or class is not on the allow-list.
    Global { module: String, name: String },
    /// An allowed callable with arguments it cannot take.
    Malformed(String),
}

impl Refusal {
    pub fn global(g: &Global) -> Refusal {
        Refusal::Global {
            module: g.module.clone(),
            name: g.name.clone(),
        }
    }
}

/// The allow-list of callables (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`) and persistent ids (`BINPERSID`).
/// `GLOBAL`/`STACK_GLOBAL` only name a callable; nothing runs unless it is called here.
pub trait Globals {
    /// What the allowed callables build beyond plain data.
    type Object: Clone + std::fmt::Debug;

    /// `global(*args)`; a global not on the list is [`Refusal::Global`]. [`builtin`] covers the
    /// standard library's containers.
    fn call_global(
        &mut self,
        global: &Global,
        args: Vec<Value<Self::Object>>,
    ) -> Result<Value<Self::Object>, Refusal>;

    /// `persistent_load(pid)`; by default persistent ids are refused.
    fn persistent_load(
        &mut self,
        pid: &Value<Self::Object>,
    ) -> Result<Value<Self::Object>, Refusal> {
        let _ = pid;
        Err(Refusal::Malformed("persistent ids are not allowed".into()))
    }
}

/// Plain data only: every callable is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGlobals;

impl Globals for NoGlobals {
    type Object = Infallible;

    fn call_global(&mut self, global: &Global, _: Vec<Value>) -> Result<Value, Refusal> {
        Err(Refusal::global(global))
    }
}

/// `callable(*args)` as `REDUCE` performs it: the callable must be a global, the arguments a
/// tuple (or list). For allow-lists whose callables take other callables (torch's
/// `_rebuild_from_type_v2`).
pub fn reduce<G: Globals + ?Sized>(
    globals: &mut G,
    callable: &Value<G::Object>,
    args: &Value<G::Object>,
) -> Result<Value<G::Object>, Refusal> {
    let Value::Global(g) = callable else {
        return Err(Refusal::Malformed(format!(
            "calls a {}, not a global",
            callable.type_name()
        )));
    };
    let args = args
        .items()
        .ok_or_else(|| Refusal::Malformed("call arguments are not a tuple".into()))?;
    globals.call_global(g, args)
}

/// The standard library's containers as `torch.load(weights_only=True)` allows them:
/// `collections.OrderedDict` and `dict` (a dict), `set`/`frozenset`/`list` (a list), `tuple`,
/// `bytes`/`bytearray`, and `_codecs.encode(text, "latin1")` (how protocol 2 writes `bytes`).
/// `None` if `global` is none of them.
pub fn builtin<X: Clone>(global: &Global, args: &[Value<X>]) -> Option<Result<Value<X>, Refusal>> {
    let malformed = |reason: &str| Err(Refusal::Malformed(reason.into()));
    let sequence = |what: &str| -> Result<Vec<Value<X>>, Refusal> {
        match args.first() {
            Some(v) => v
                .items()
                .ok_or_else(|| Refusal::Malformed(format!("{what} argument is not a sequence"))),
            None => Ok(Vec::new()),
        }
    };
    Some(match (global.module.as_str(), global.name.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") => {
            let mut pairs = Vec::new();
            match args.first() {
                None => {}
                Some(Value::Dict(d)) => pairs.extend(d.borrow().iter().cloned()),
                Some(other) => {
                    let Some(items) = other.items() else {
                        return Some(malformed("OrderedDict argument"));
                    };
                    for item in items {
                        match item.items().as_deref() {
                            Some([k, v]) => pairs.push((k.clone(), v.clone())),
                            _ => return Some(malformed("OrderedDict item is not a pair")),
                        }
                    }
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(pairs))))
        }
        // Sets are kept as lists (their items need not be hashable here); a tuple too, as
        // torch's restricted unpickler builds them.
        ("builtins", "set" | "frozenset" | "list" | "tuple") => {
            sequence("set").map(|items| Value::List(Rc::new(RefCell::new(items))))
        }
        ("_codecs", "encode") => match args.first() {
            Some(Value::Str(s)) => {
                let bytes: Option<Vec<u8>> =
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                match bytes {
                    Some(b) => Ok(Value::Bytes(Rc::from(b))),
                    None => malformed("_codecs.encode of non-latin1 text"),
                }
            }
            _ => malformed("_codecs.encode without text"),
        },
        ("builtins", "bytearray" | "bytes") => match args.first() {
            Some(v @ Value::Bytes(_)) => Ok(v.clone()),
            None => Ok(Value::Bytes(Rc::from(Vec::new()))),
            _ => Err(Refusal::global(global)),
        },
        _ => return None,
    })
}

/// Runs a pickle under `policy`, calling only what `globals` allows, and returns what it builds.
pub fn load<G: Globals>(
    data: &[u8],
    policy: &Policy,
    globals: &mut G,
) -> Result<Value<G::Object>, PickleError> {
    Machine {
        data,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        policy,
        globals,
    }
    .run()
}

/// A dict item.
type Item<X> = (Value<X>, Value<X>);

struct Machine<'a, G: Globals> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    op_start: usize,
    stack: Vec<Value<G::Object>>,
    /// Stack heights at each open `MARK` (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, Value<G::Object>>,
    policy: &'a Policy,
    globals: &'a mut G,
}

impl<'a, G: Globals> Machine<'a, G> {
    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_start,
            reason: reason.into(),
        }
    }

    fn refused(&self, r: Refusal) -> PickleError {
        match r {
            Refusal::Global { module, name } => PickleError::Global {
                offset: self.op_start,
                module,
                name,
            },
            Refusal::Malformed(reason) => self.malformed(reason),
        }
    }

    fn protocol(&self, protocol: u8) -> PickleError {
        PickleError::Protocol {
            offset: self.op_start,
            protocol,
            oldest: self.policy.min_protocol.unwrap_or(0),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let remaining = self.data.len() - self.pos;
        if n > remaining {
            return Err(PickleError::Truncated {
                offset: self.op_start,
                at: self.pos,
                wanted: n,
                remaining,
            });
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length prefix of `LONG4`/`BINSTRING`: a signed 32-bit int.
    fn i32_len(&mut self, what: &str) -> Result<usize, PickleError> {
        let n = i32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.malformed(format!("negative {what} length")))
    }

    fn len_u64(&self, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| self.malformed(format!("length {n} does not fit in memory")))
    }

    /// The newline-terminated argument of a text-protocol opcode.
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("unterminated text argument"))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.malformed("text argument is not UTF-8"))
    }

    fn string(&self, bytes: &[u8]) -> Result<Value<G::Object>, PickleError> {
        // CPython decodes with 'surrogatepass'; Rust strings cannot hold surrogates, so such a
        // text is reported instead of altered.
        let s = std::str::from_utf8(bytes)
            .map_err(|e| self.malformed(format!("str is not valid UTF-8: {e}")))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn push(&mut self, v: Value<G::Object>) {
        self.stack.push(v);
    }

    /// Whether the top `n` items are above the innermost `MARK`.
    fn has(&self, n: usize) -> bool {
        let floor = self.marks.last().copied().unwrap_or(0);
        self.stack.len() >= floor + n
    }

    fn pop(&mut self) -> Result<Value<G::Object>, PickleError> {
        if !self.has(1) {
            return Err(self.malformed("stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value<G::Object>, PickleError> {
        if !self.has(1) {
            return Err(self.malformed("stack underflow"));
        }
        let offset = self.op_start;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            offset,
            reason: "stack underflow".into(),
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value<G::Object>>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.malformed("MARK above the top of the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.malformed(format!("memo key {key} was never stored")))?;
        self.push(v);
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn call(
        &mut self,
        callable: &Value<G::Object>,
        args: &Value<G::Object>,
    ) -> Result<(), PickleError> {
        let v = reduce(self.globals, callable, args).map_err(|r| self.refused(r))?;
        self.push(v);
        Ok(())
    }

    fn pairs(&self, items: Vec<Value<G::Object>>) -> Result<Vec<Item<G::Object>>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of items for a dict"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    fn append(&mut self, items: Vec<Value<G::Object>>) -> Result<(), PickleError> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => {
                let t = other.type_name();
                Err(self.malformed(format!("APPEND to a {t}")))
            }
        }
    }

    fn set_items(&mut self, pairs: Vec<Item<G::Object>>) -> Result<(), PickleError> {
        match self.top()? {
            Value::Dict(d) => {
                d.borrow_mut().extend(pairs);
                Ok(())
            }
            other => {
                let t = other.type_name();
                Err(self.malformed(format!("SETITEM on a {t}")))
            }
        }
    }

    fn run(mut self) -> Result<Value<G::Object>, PickleError> {
        if let Some(oldest) = self.policy.min_protocol {
            if self.u8()? != op::PROTO {
                return Err(self.protocol(0));
            }
            let p = self.u8()?;
            if !(oldest..=op::HIGHEST_PROTOCOL).contains(&p) {
                return Err(self.protocol(p));
            }
        }
        loop {
            self.op_start = self.pos;
            let code = self.u8()?;
            if !self.policy.opcodes.contains(code) {
                return Err(self.unsupported(code));
            }
            match code {
                op::PROTO => {
                    let p = self.u8()?;
                    if p > op::HIGHEST_PROTOCOL {
                        return Err(self.protocol(p));
                    }
                }
                op::FRAME => {
                    // Frames only group opcodes; their length is not needed to parse.
                    self.u64()?;
                }
                op::STOP => {
                    let v = self.pop()?;
                    if self.policy.strict_stop {
                        if !self.stack.is_empty() || !self.marks.is_empty() {
                            return Err(self.malformed("values left on the stack at STOP"));
                        }
                        if self.pos != self.data.len() {
                            return Err(self.malformed("bytes after STOP"));
                        }
                    }
                    return Ok(v);
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                op::NONE => self.push(Value::None),
                op::NEWTRUE => self.push(Value::Bool(true)),
                op::NEWFALSE => self.push(Value::Bool(false)),
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                op::LONG1 | op::LONG4 => {
                    let n = if code == op::LONG1 {
                        usize::from(self.u8()?)
                    } else {
                        self.i32_len("LONG4")?
                    };
                    let bytes = self.take(n)?;
                    self.push(decode_long(bytes));
                }
                op::INT => {
                    let line = self.line()?;
                    let v = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(
                            line.parse()
                                .map_err(|_| self.malformed(format!("bad INT {line:?}")))?,
                        ),
                    };
                    self.push(v);
                }
                op::LONG => {
                    let line = self.line()?;
                    let v = line
                        .trim_end_matches('L')
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::BigInt);
                    self.push(v);
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                op::FLOAT => {
                    let line = self.line()?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| self.malformed(format!("bad FLOAT {line:?}")))?;
                    self.push(Value::Float(v));
                }
                op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                    let n = match code {
                        op::BINUNICODE => u64::from(self.u32()?),
                        op::SHORT_BINUNICODE => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_u64(n)?;
                    let bytes = self.take(n)?;
                    let v = self.string(bytes)?;
                    self.push(v);
                }
                op::BINSTRING | op::SHORT_BINSTRING => {
                    // Python 2 `str`: decoded as UTF-8 (torch.load's default `encoding`).
                    let n = if code == op::SHORT_BINSTRING {
                        usize::from(self.u8()?)
                    } else {
                        self.i32_len("BINSTRING")?
                    };
                    let bytes = self.take(n)?;
                    self.push(Value::Str(Rc::from(
                        String::from_utf8_lossy(bytes).as_ref(),
                    )));
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = match code {
                        op::BINBYTES => u64::from(self.u32()?),
                        op::SHORT_BINBYTES => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_u64(n)?;
                    let bytes = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(bytes)));
                }
                op::EMPTY_TUPLE => self.push(Value::Tuple(Rc::new(Vec::new()))),
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(code - op::TUPLE1 + 1);
                    if !self.has(n) {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(Rc::new(items)));
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                op::EMPTY_LIST | op::EMPTY_SET => {
                    self.push(Value::List(Rc::new(RefCell::new(Vec::new()))));
                }
                op::LIST | op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                op::APPEND => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                op::APPENDS | op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                op::EMPTY_DICT => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?;
                }
                op::BINPUT => {
                    let k = u64::from(self.u8()?);
                    self.memo_put(k)?;
                }
                op::LONG_BINPUT => {
                    let k = u64::from(self.u32()?);
                    self.memo_put(k)?;
                }
                op::PUT => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| self.malformed(format!("bad PUT key {line:?}")))?;
                    self.memo_put(k)?;
                }
                op::MEMOIZE => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                op::BINGET => {
                    let k = u64::from(self.u8()?);
                    self.memo_get(k)?;
                }
                op::LONG_BINGET => {
                    let k = u64::from(self.u32()?);
                    self.memo_get(k)?;
                }
                op::GET => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| self.malformed(format!("bad GET key {line:?}")))?;
                    self.memo_get(k)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new(Global::new(module, name))));
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    let g = Global::new(m, n);
                    self.push(Value::Global(Rc::new(g)));
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(&callable, &args)?;
                }
                op::NEWOBJ_EX => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(&cls, &args)?;
                }
                op::BUILD => {
                    // Attribute state (e.g. a state dict's `_metadata`, module versions): dropped.
                    self.pop()?;
                    self.top()?;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self
                        .globals
                        .persistent_load(&pid)
                        .map_err(|r| self.refused(r))?;
                    self.push(v);
                }
                _ => return Err(self.unsupported(code)),
            }
        }
    }

    fn unsupported(&self, code: u8) -> PickleError {
        PickleError::Opcode {
            name: op::name(code),
            code,
            offset: self.op_start,
        }
    }
}

/// A little-endian two's complement integer (`LONG1`/`LONG4`); wider than 64 bits after
/// dropping redundant sign bytes is [`Value::BigInt`].
fn decode_long<X>(bytes: &[u8]) -> Value<X> {
    let Some(&last) = bytes.last() else {
        return Value::Int(0);
    };
    let negative = last & 0x80 != 0;
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
        return Value::BigInt;
    }
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..n].copy_from_slice(&bytes[..n]);
    Value::Int(i64::from_le_bytes(buf))
}
