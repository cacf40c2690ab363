//! `torch.save`'s allow-list over the workspace's pickle machine (`cnclip-pickle`).
//!
//! Like `torch.load(weights_only=True)` it only constructs plain containers, scalars, strings and
//! tensors; any other callable is refused by name. Tensors are not read here: a tensor is a
//! [`TensorRef`] (storage key, dtype, offset, size, stride) that the archive reader materialises
//! only if it is wanted.

use cnclip_pickle::{Global, Globals, PickleError, Policy, Refusal, builtin, reduce};
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

/// What torch's allow-listed callables build beyond plain data.
#[derive(Debug, Clone)]
pub(crate) enum Torch {
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

pub(crate) type Value = cnclip_pickle::Value<Torch>;

/// Runs a `data.pkl` and returns the object it builds.
pub(crate) fn load(data: &[u8]) -> Result<Value, PickleError> {
    cnclip_pickle::load(data, &Policy::default(), &mut TorchGlobals::default())
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

fn malformed(reason: impl Into<String>) -> Refusal {
    Refusal::Malformed(reason.into())
}

/// torch's rebuilders and storages; the storages seen so far, so that tensors sharing one share it.
#[derive(Default)]
struct TorchGlobals {
    storages: HashMap<String, Rc<StorageRef>>,
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<i64>, Refusal> {
    v.items()
        .and_then(|items| items.iter().map(Value::as_int).collect::<Option<Vec<_>>>())
        .ok_or_else(|| malformed(format!("tensor {what} is not a tuple of ints")))
}

impl Globals for TorchGlobals {
    type Object = Torch;

    fn call_global(&mut self, g: &Global, args: Vec<Value>) -> Result<Value, Refusal> {
        if let Some(v) = builtin(g, &args) {
            return v;
        }
        match (g.module.as_str(), g.name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let [storage, offset, size, stride, ..] = args.as_slice() else {
                    return Err(malformed(format!("{} takes at least 4 arguments", g.name)));
                };
                let Value::Object(Torch::Storage(storage)) = storage else {
                    return Err(malformed("tensor storage is not a persistent storage"));
                };
                let offset = offset
                    .as_int()
                    .ok_or_else(|| malformed("tensor storage offset is not an int"))?;
                let size = int_tuple(size, "size")?;
                let stride = int_tuple(stride, "stride")?;
                if size.len() != stride.len() {
                    return Err(malformed(format!(
                        "tensor size {size:?} and stride {stride:?} differ in length"
                    )));
                }
                Ok(Value::Object(Torch::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset,
                    size,
                    stride,
                }))))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => args
                .first()
                .cloned()
                .ok_or_else(|| malformed("_rebuild_parameter without data")),
            ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
                [func, _new_type, inner, ..] => reduce(self, func, inner),
                _ => Err(malformed("_rebuild_from_type_v2 takes 4 arguments")),
            },
            ("torch", "Size") => {
                let items = match args.first() {
                    Some(v) => v
                        .items()
                        .ok_or_else(|| malformed("torch.Size argument is not a tuple"))?,
                    None => Vec::new(),
                };
                Ok(Value::Tuple(Rc::new(items)))
            }
            ("torch", "device") => Ok(args.first().cloned().unwrap_or(Value::None)),
            _ => Err(Refusal::global(g)),
        }
    }

    fn persistent_load(&mut self, pid: &Value) -> Result<Value, Refusal> {
        let items = match pid {
            Value::Tuple(t) => t.clone(),
            other => {
                return Err(malformed(format!(
                    "persistent id is a {}, not a tuple",
                    other.type_name()
                )));
            }
        };
        let [
            Value::Str(tag),
            Value::Global(g),
            key,
            _location,
            Value::Int(numel),
        ] = items.as_slice()
        else {
            return Err(malformed(
                "persistent id is not ('storage', type, key, location, numel)",
            ));
        };
        if &**tag != "storage" {
            return Err(malformed(
                "persistent id is not ('storage', type, key, location, numel)",
            ));
        }
        let (module, name) = (&g.module, &g.name);
        let kind = storage_kind(module, name).map_err(|()| Refusal::global(g))?;
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(malformed(format!("storage key is a {}", other.type_name()))),
        };
        let numel = u64::try_from(*numel)
            .map_err(|_| malformed(format!("storage {key} has {numel} elements")))?;
        if let Some(existing) = self.storages.get(&key) {
            if existing.kind != kind || existing.numel != numel {
                return Err(malformed(format!(
                    "storage {key} is described twice, as {} × {} and {name} × {numel}",
                    existing.type_name, existing.numel
                )));
            }
            return Ok(Value::Object(Torch::Storage(existing.clone())));
        }
        let storage = Rc::new(StorageRef {
            key: key.clone(),
            type_name: format!("{module}.{name}"),
            kind,
            numel,
        });
        self.storages.insert(key, storage.clone());
        Ok(Value::Object(Torch::Storage(storage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading real torch.save files is tests/weights.rs's; here, what the allow-list refuses.
    #[test]
    fn torch_allow_list_refuses_other_globals() {
        let err = load(b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00lstR.").unwrap_err();
        assert!(
            matches!(err, PickleError::Global { ref module, ref name, .. } if module == "os" && name == "system"),
            "{err:?}"
        );
        // A storage of a class that is not torch's.
        let err = load(
            b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nK\x00X\x03\x00\x00\x00cpuK\x01tQ.",
        )
        .unwrap_err();
        assert!(
            matches!(err, PickleError::Global { ref module, .. } if module == "os"),
            "{err:?}"
        );
    }
}
