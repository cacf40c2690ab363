//! What a pickle builds.

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

/// A list (also what sets and frozensets become): shared, because the memo and `APPEND` alias it.
pub type List<X> = Rc<RefCell<Vec<Value<X>>>>;
/// A dict as its items in insertion order (keys need not be hashable here; later items win on lookup).
pub type Dict<X> = Rc<RefCell<Vec<(Value<X>, Value<X>)>>>;

/// `module.name` as a `GLOBAL`/`STACK_GLOBAL` names it (`__builtin__` read as `builtins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub module: String,
    pub name: String,
}

impl Global {
    pub fn new(module: impl Into<String>, name: impl Into<String>) -> Global {
        let module = module.into();
        let module = if module == "__builtin__" {
            "builtins".to_string()
        } else {
            module
        };
        Global {
            module,
            name: name.into(),
        }
    }
}

/// A value on the machine's stack. `X` holds what an allow-listed global or persistent id builds
/// beyond plain data ([`Globals::Object`](crate::Globals::Object)); plain data needs none.
#[derive(Debug, Clone)]
pub enum Value<X = Infallible> {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in 64 bits (kept opaque).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value<X>>>),
    List(List<X>),
    Dict(Dict<X>),
    Global(Rc<Global>),
    Object(X),
}

impl<X: Clone> Value<X> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An int, or a bool as Python's `int(b)`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// Python's type name (`"object"` for an [`Object`](Value::Object)).
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
            Value::Object(_) => "object",
        }
    }

    /// The items of a tuple or list (cloned handles).
    pub fn items(&self) -> Option<Vec<Value<X>>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}
