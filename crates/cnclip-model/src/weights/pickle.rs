//! A restricted pickle machine (protocols 2–5, plus the text forms of ints, floats and memo ops)
//! for `torch.save` archives, and the few opcodes needed to write one.
//!
//! Like `torch.load(weights_only=True)` it only constructs plain containers, scalars, strings and
//! tensors; any other callable is refused by name. Tensors are not read here: a tensor is a
//! [`TensorRef`] (storage key, dtype, offset, size, stride) that the archive reader materialises
//! only if it is wanted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

/// A storage as the archive's persistent id describes it.
#[derive(Debug)]
pub(crate) struct StorageRef {
    pub key: String,
    /// `torch.FloatStorage`, … as named in the pickle.
    pub type_name: String,
    /// `None` for storage types we cannot hold (complex, quantized, float8).
    pub kind: Option<Kind>,
    /// Number of elements of `kind`.
    pub numel: u64,
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`.
#[derive(Debug)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

pub(crate) type List = Rc<RefCell<Vec<Value>>>;
pub(crate) type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

#[derive(Debug, Clone)]
// Payloads are kept for `Debug` output in error messages even where nothing reads them.
#[allow(dead_code)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in 64 bits (kept opaque).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(List),
    Dict(Dict),
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The items of a tuple or list (cloned handles).
    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

/// What went wrong inside the pickle; the archive reader adds the file and entry names.
#[derive(Debug)]
pub(crate) enum PickleError {
    Opcode {
        name: &'static str,
        code: u8,
        offset: usize,
    },
    Malformed {
        offset: usize,
        reason: String,
    },
    UnknownGlobal {
        module: String,
        name: String,
    },
}

fn opcode_name(code: u8) -> &'static str {
    match code {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "<unknown>",
    }
}

/// The element kind of a `torch.*Storage` class, `Err(())` if it is not a storage class.
fn storage_kind(module: &str, name: &str) -> Result<Option<Kind>, ()> {
    if module != "torch" || !name.ends_with("Storage") {
        return Err(());
    }
    Ok(match name {
        "FloatStorage" => Some(Kind::Float),
        "DoubleStorage" => Some(Kind::Double),
        "HalfStorage" => Some(Kind::Half),
        "BFloat16Storage" => Some(Kind::BFloat16),
        "LongStorage" => Some(Kind::Int64),
        "IntStorage" => Some(Kind::Int),
        "ShortStorage" => Some(Kind::Int16),
        "CharStorage" => Some(Kind::Int8),
        "ByteStorage" | "UntypedStorage" => Some(Kind::Uint8),
        "BoolStorage" => Some(Kind::Bool),
        _ => None,
    })
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    storages: HashMap<String, Rc<StorageRef>>,
}

/// Runs a pickle and returns the object it builds.
pub(crate) fn load(data: &[u8]) -> Result<Value, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
    };
    vm.run()
}

impl<'a> Vm<'a> {
    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_start,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "needs {n} bytes but only {} remain",
                    self.data.len() - self.pos
                ))
            })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
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

    fn len_u64(&self, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| self.malformed(format!("length {n} is too large")))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("unterminated text argument"))?;
        let line = &rest[..n];
        self.pos += n + 1;
        std::str::from_utf8(line).map_err(|_| self.malformed("text argument is not UTF-8"))
    }

    fn string(&self, bytes: &[u8]) -> Result<Value, PickleError> {
        let s =
            std::str::from_utf8(bytes).map_err(|_| self.malformed("string is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.malformed("pops across a MARK"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.malformed("reads across a MARK"));
        }
        let offset = self.op_start;
        self.stack.last_mut().ok_or_else(|| PickleError::Malformed {
            offset,
            reason: "stack underflow".into(),
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.malformed("MARK above the top of the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, key: u64) -> Result<Value, PickleError> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.malformed(format!("memo key {key} was never stored")))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_start = self.pos;
            let code = self.u8()?;
            match code {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(
                            self.malformed(format!("pickle protocol {proto} is newer than 5"))
                        );
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a | 0x8b => {
                    let n = if code == 0x8a {
                        usize::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.array()?);
                        usize::try_from(n).map_err(|_| self.malformed("negative LONG4 length"))?
                    };
                    let bytes = self.take(n)?;
                    self.push(decode_long(bytes));
                }
                b'I' => {
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
                b'L' => {
                    let line = self.line()?;
                    let v = line
                        .trim_end_matches('L')
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::BigInt);
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| self.malformed(format!("bad FLOAT {line:?}")))?;
                    self.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match code {
                        b'X' => u64::from(self.u32()?),
                        0x8c => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_u64(n)?;
                    let bytes = self.take(n)?;
                    let v = self.string(bytes)?;
                    self.push(v);
                }
                b'T' | b'U' => {
                    // Python 2 `str`: torch.load decodes it as UTF-8 (its default `encoding`).
                    let n = if code == b'U' {
                        usize::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.array()?);
                        usize::try_from(n)
                            .map_err(|_| self.malformed("negative BINSTRING length"))?
                    };
                    let bytes = self.take(n)?;
                    self.push(Value::Str(Rc::from(
                        String::from_utf8_lossy(bytes).as_ref(),
                    )));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match code {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_u64(n)?;
                    let bytes = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(bytes)));
                }
                b')' => self.push(Value::Tuple(Rc::new(Vec::new()))),
                0x85..=0x87 => {
                    let n = usize::from(code - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m + n > self.stack.len())
                    {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                0x8f => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?;
                }
                b'q' => {
                    let k = u64::from(self.u8()?);
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u64::from(self.u32()?);
                    self.memo_put(k)?;
                }
                b'p' => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| self.malformed(format!("bad PUT key {line:?}")))?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = u64::from(self.u8()?);
                    let v = self.memo_get(k)?;
                    self.push(v);
                }
                b'j' => {
                    let k = u64::from(self.u32()?);
                    let v = self.memo_get(k)?;
                    self.push(v);
                }
                b'g' => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| self.malformed(format!("bad GET key {line:?}")))?;
                    let v = self.memo_get(k)?;
                    self.push(v);
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let g = global(m.to_string(), n.to_string());
                            self.push(g);
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(&callable, &args)?;
                    self.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(&cls, &args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(&cls, &args)?;
                    self.push(v);
                }
                b'b' => {
                    // Attribute state, e.g. a state dict's `_metadata` (module versions): not needed.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v);
                }
                _ => {
                    return Err(PickleError::Opcode {
                        name: opcode_name(code),
                        code,
                        offset: self.op_start,
                    });
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
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

    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
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

    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> Result<(), PickleError> {
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

    fn persistent_load(&mut self, pid: &Value) -> Result<Value, PickleError> {
        let items = match pid {
            Value::Tuple(t) => t.clone(),
            other => {
                return Err(self.malformed(format!(
                    "persistent id is a {}, not a tuple",
                    other.type_name()
                )));
            }
        };
        match items.as_slice() {
            [
                Value::Str(tag),
                Value::Global(g),
                key,
                _location,
                Value::Int(numel),
            ] if &**tag == "storage" => {
                let (module, name) = (&g.0, &g.1);
                let kind = storage_kind(module, name).map_err(|()| PickleError::UnknownGlobal {
                    module: module.clone(),
                    name: name.clone(),
                })?;
                let key = match key {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    other => {
                        return Err(
                            self.malformed(format!("storage key is a {}", other.type_name()))
                        );
                    }
                };
                let numel = u64::try_from(*numel)
                    .map_err(|_| self.malformed(format!("storage {key} has {numel} elements")))?;
                if let Some(existing) = self.storages.get(&key) {
                    if existing.kind != kind || existing.numel != numel {
                        return Err(self.malformed(format!(
                            "storage {key} is described twice, as {} × {} and {name} × {numel}",
                            existing.type_name, existing.numel
                        )));
                    }
                    return Ok(Value::Storage(existing.clone()));
                }
                let storage = Rc::new(StorageRef {
                    key: key.clone(),
                    type_name: format!("{module}.{name}"),
                    kind,
                    numel,
                });
                self.storages.insert(key, storage.clone());
                Ok(Value::Storage(storage))
            }
            _ => {
                Err(self.malformed("persistent id is not ('storage', type, key, location, numel)"))
            }
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<i64>, PickleError> {
        v.items()
            .and_then(|items| items.iter().map(Value::as_int).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.malformed(format!("tensor {what} is not a tuple of ints")))
    }

    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value, PickleError> {
        let Value::Global(g) = callable else {
            return Err(self.malformed(format!("calls a {}, not a global", callable.type_name())));
        };
        let args = args
            .items()
            .ok_or_else(|| self.malformed("call arguments are not a tuple"))?;
        let unknown = || PickleError::UnknownGlobal {
            module: g.0.clone(),
            name: g.1.clone(),
        };
        match (g.0.as_str(), g.1.as_str()) {
            ("collections", "OrderedDict") | ("builtins", "dict") => {
                let mut pairs = Vec::new();
                if let Some(init) = args.first() {
                    match init {
                        Value::Dict(d) => pairs.extend(d.borrow().iter().cloned()),
                        other => {
                            for item in other
                                .items()
                                .ok_or_else(|| self.malformed("OrderedDict argument"))?
                            {
                                match item.items().as_deref() {
                                    Some([k, v]) => pairs.push((k.clone(), v.clone())),
                                    _ => {
                                        return Err(
                                            self.malformed("OrderedDict item is not a pair")
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(pairs))))
            }
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let [storage, offset, size, stride, ..] = args.as_slice() else {
                    return Err(self.malformed(format!("{} takes at least 4 arguments", g.1)));
                };
                let Value::Storage(storage) = storage else {
                    return Err(self.malformed("tensor storage is not a persistent storage"));
                };
                let offset = offset
                    .as_int()
                    .ok_or_else(|| self.malformed("tensor storage offset is not an int"))?;
                let size = self.int_tuple(size, "size")?;
                let stride = self.int_tuple(stride, "stride")?;
                if size.len() != stride.len() {
                    return Err(self.malformed(format!(
                        "tensor size {size:?} and stride {stride:?} differ in length"
                    )));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset,
                    size,
                    stride,
                })))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => args
                .first()
                .cloned()
                .ok_or_else(|| self.malformed("_rebuild_parameter without data")),
            ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
                [func, _new_type, inner, ..] => self.call(func, inner),
                _ => Err(self.malformed("_rebuild_from_type_v2 takes 4 arguments")),
            },
            ("builtins", "set")
            | ("builtins", "frozenset")
            | ("builtins", "list")
            | ("builtins", "tuple") => {
                let items = match args.first() {
                    Some(v) => v
                        .items()
                        .ok_or_else(|| self.malformed("set argument is not a sequence"))?,
                    None => Vec::new(),
                };
                Ok(Value::List(Rc::new(RefCell::new(items))))
            }
            ("torch", "Size") => {
                let items = match args.first() {
                    Some(v) => v
                        .items()
                        .ok_or_else(|| self.malformed("torch.Size argument is not a tuple"))?,
                    None => Vec::new(),
                };
                Ok(Value::Tuple(Rc::new(items)))
            }
            ("torch", "device") => Ok(args.first().cloned().unwrap_or(Value::None)),
            ("_codecs", "encode") => match args.first() {
                // Protocol 2 writes `bytes` as `_codecs.encode(latin1 text, "latin1")`.
                Some(Value::Str(s)) => {
                    let bytes: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                    let bytes =
                        bytes.ok_or_else(|| self.malformed("_codecs.encode of non-latin1 text"))?;
                    Ok(Value::Bytes(Rc::from(bytes)))
                }
                _ => Err(self.malformed("_codecs.encode without text")),
            },
            ("builtins", "bytearray") | ("builtins", "bytes") => match args.first() {
                Some(v @ Value::Bytes(_)) => Ok(v.clone()),
                None => Ok(Value::Bytes(Rc::from(Vec::new()))),
                _ => Err(unknown()),
            },
            _ => Err(unknown()),
        }
    }
}

fn global(module: String, name: String) -> Value {
    let module = match module.as_str() {
        "__builtin__" => "builtins".to_string(),
        _ => module,
    };
    Value::Global(Rc::new((module, name)))
}

fn decode_long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

/// Writes protocol-2 pickles the way Python's pickler does for the few types we emit.
pub(crate) struct PickleWriter {
    buf: Vec<u8>,
}

impl PickleWriter {
    pub fn new() -> Self {
        Self { buf: vec![0x80, 2] }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(b'.');
        self.buf
    }

    pub fn mark(&mut self) {
        self.buf.push(b'(');
    }

    pub fn empty_dict(&mut self) {
        self.buf.push(b'}');
    }

    pub fn empty_tuple(&mut self) {
        self.buf.push(b')');
    }

    pub fn setitems(&mut self) {
        self.buf.push(b'u');
    }

    pub fn tuple_from_mark(&mut self) {
        self.buf.push(b't');
    }

    pub fn reduce(&mut self) {
        self.buf.push(b'R');
    }

    pub fn binpersid(&mut self) {
        self.buf.push(b'Q');
    }

    pub fn bool(&mut self, v: bool) {
        self.buf.push(if v { 0x88 } else { 0x89 });
    }

    pub fn str(&mut self, s: &str) {
        self.buf.push(b'X');
        // Keys and names are far below 4 GiB; saturate rather than wrap if one is not.
        self.buf
            .extend(u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.buf.extend(s.as_bytes());
    }

    pub fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.buf.push(b'K');
            self.buf.push(v as u8);
        } else if (0..=0xffff).contains(&v) {
            self.buf.push(b'M');
            self.buf.extend((v as u16).to_le_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.buf.push(b'J');
            self.buf.extend(v.to_le_bytes());
        } else {
            // LONG1 with the shortest two's-complement encoding.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (last, prev) = (bytes[n - 1], bytes[n - 2]);
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.buf.push(0x8a);
            self.buf.push(n as u8);
            self.buf.extend(&bytes[..n]);
        }
    }

    pub fn global(&mut self, module: &str, name: &str) {
        self.buf.push(b'c');
        self.buf.extend(module.as_bytes());
        self.buf.push(b'\n');
        self.buf.extend(name.as_bytes());
        self.buf.push(b'\n');
    }

    /// A tuple of ints (sizes and strides), with Python's short forms.
    pub fn int_tuple(&mut self, items: &[i64]) {
        if items.is_empty() {
            self.empty_tuple();
            return;
        }
        if items.len() > 3 {
            self.mark();
        }
        for &i in items {
            self.int(i);
        }
        match items.len() {
            1 => self.buf.push(0x85),
            2 => self.buf.push(0x86),
            3 => self.buf.push(0x87),
            _ => self.tuple_from_mark(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_int(v: i64) -> i64 {
        let mut w = PickleWriter::new();
        w.int(v);
        load(&w.finish()).unwrap().as_int().unwrap()
    }

    #[test]
    fn ints_round_trip_through_every_encoding() {
        for v in [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -129,
            i32::MAX as i64,
            i32::MIN as i64,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(roundtrip_int(v), v);
        }
    }

    #[test]
    fn errors_name_opcode_and_offset() {
        let err = load(&[0x80, 2, b'i', b'\n']).unwrap_err();
        assert!(
            matches!(
                err,
                PickleError::Opcode {
                    name: "INST",
                    code: b'i',
                    offset: 2
                }
            ),
            "{err:?}"
        );
        let err = load(&[
            0x80, 2, b'c', b'o', b's', b'\n', b's', b'y', b's', b't', b'e', b'm', b'\n', b')',
            b'R', b'.',
        ])
        .unwrap_err();
        assert!(
            matches!(err, PickleError::UnknownGlobal { ref module, ref name } if module == "os" && name == "system")
        );
        assert!(matches!(
            load(&[0x80, 2, b'X', 9, 0, 0, 0, b'a']).unwrap_err(),
            PickleError::Malformed { offset: 2, .. }
        ));
        assert!(matches!(
            load(&[0x80, 2, b'0']).unwrap_err(),
            PickleError::Malformed { .. }
        ));
    }
}
