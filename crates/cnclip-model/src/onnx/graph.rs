//! A small ONNX graph builder: named initializers from tch tensors, single-output nodes with
//! generated value names, and the composite pieces both towers use (linear maps, LayerNorm,
//! multi-head attention as plain MatMul/Softmax).

use super::OnnxError;
use super::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// A node attribute.
pub(crate) enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

pub(crate) struct Graph<'a> {
    weights: &'a BTreeMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
    /// Float initializers and activations in fp16 (`--fp16`), else fp32.
    half: bool,
}

impl<'a> Graph<'a> {
    pub(crate) fn new(weights: &'a BTreeMap<String, Tensor>, half: bool) -> Self {
        Self {
            weights,
            nodes: Vec::new(),
            initializers: Vec::new(),
            counter: 0,
            half,
        }
    }

    pub(crate) fn float_type(&self) -> i32 {
        if self.half {
            data_type::FLOAT16
        } else {
            data_type::FLOAT
        }
    }

    /// The model's tensor `key` (a cn_clip state-dict key).
    pub(crate) fn get(&self, key: &str) -> Result<&'a Tensor, OnnxError> {
        self.weights
            .get(key)
            .ok_or_else(|| OnnxError::MissingWeight {
                key: key.to_string(),
            })
    }

    /// Adds `t` (any float dtype) as an initializer in the graph's float type.
    pub(crate) fn constant(&mut self, name: &str, t: &Tensor) -> Result<String, OnnxError> {
        let kind = if self.half { Kind::Half } else { Kind::Float };
        let t = t.to_device(tch::Device::Cpu).to_kind(kind).contiguous();
        let numel = t.numel();
        let mut raw = vec![0u8; numel * kind.elt_size_in_bytes()];
        // ONNX raw_data is little-endian, which is the host order on every platform libtorch
        // runs on (x86-64, aarch64).
        t.f_copy_data_u8(&mut raw, numel)
            .map_err(|source| OnnxError::Tensor {
                key: name.to_string(),
                source,
            })?;
        self.push_initializer(name, t.size(), self.float_type(), raw);
        Ok(name.to_string())
    }

    /// The model's tensor `key` as an initializer of the same name.
    pub(crate) fn weight(&mut self, key: &str) -> Result<String, OnnxError> {
        let t = self.get(key)?;
        self.constant(key, t)
    }

    /// A `[out, in]` linear weight stored transposed (`[in, out]`) so that `x · W` is one MatMul.
    pub(crate) fn weight_transposed(&mut self, key: &str, t: &Tensor) -> Result<String, OnnxError> {
        self.constant(key, &t.tr())
    }

    pub(crate) fn ints(&mut self, values: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(&name, vec![values.len() as i64], data_type::INT64, raw);
        name
    }

    /// A scalar in the graph's float type.
    pub(crate) fn scalar(&mut self, value: f64) -> Result<String, OnnxError> {
        let name = self.fresh("scalar");
        self.constant(&name, &Tensor::from(value as f32))
    }

    fn push_initializer(&mut self, name: &str, dims: Vec<i64>, data_type: i32, raw: Vec<u8>) {
        self.initializers.push(TensorProto {
            dims,
            data_type,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        });
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("/{hint}_{}", self.counter)
    }

    /// Appends a node with one output and returns the output's name.
    pub(crate) fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(op);
        let attribute = attrs
            .iter()
            .map(|(name, value)| {
                let mut a = AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match value {
                    Attr::Int(i) => {
                        a.r#type = attribute_type::INT;
                        a.i = *i;
                    }
                    Attr::Float(f) => {
                        a.r#type = attribute_type::FLOAT;
                        a.f = *f;
                    }
                    Attr::Ints(v) => {
                        a.r#type = attribute_type::INTS;
                        a.ints = v.clone();
                    }
                }
                a
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.counter),
            op_type: op.to_string(),
            attribute,
        });
        out
    }

    /// `x · Wᵀ + b` for the `nn.Linear` at `prefix` (`{prefix}.weight`, `{prefix}.bias`).
    pub(crate) fn linear(&mut self, x: &str, prefix: &str) -> Result<String, OnnxError> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let w = self.weight_transposed(&format!("{prefix}.weight"), w)?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        let y = self.node("MatMul", &[x, &w], &[]);
        Ok(self.node("Add", &[&y, &b], &[]))
    }

    pub(crate) fn layer_norm(
        &mut self,
        x: &str,
        prefix: &str,
        eps: f64,
    ) -> Result<String, OnnxError> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        // stash_type 1 (the default): mean and variance in fp32 even for fp16 inputs.
        Ok(self.node(
            "LayerNormalization",
            &[x, &w, &b],
            &[
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(eps as f32)),
            ],
        ))
    }

    /// Multi-head attention on `[N, L, heads·head_dim]` projections: per head
    /// `softmax(q kᵀ / √head_dim + mask) v`, heads merged back to `[N, Lq, width]`.
    /// `mask` is additive and broadcasts over `[N, heads, Lq, Lk]`.
    pub(crate) fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        heads: i64,
        width: i64,
        mask: Option<&str>,
    ) -> Result<String, OnnxError> {
        let head_dim = width / heads;
        let split = self.ints(&[0, 0, heads, head_dim]);
        let q = self.node("Reshape", &[q, &split], &[]);
        let q = self.node(
            "Transpose",
            &[&q],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let k = self.node("Reshape", &[k, &split], &[]);
        let k = self.node(
            "Transpose",
            &[&k],
            &[("perm", Attr::Ints(vec![0, 2, 3, 1]))],
        );
        let v = self.node("Reshape", &[v, &split], &[]);
        let v = self.node(
            "Transpose",
            &[&v],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let scores = self.node("MatMul", &[&q, &k], &[]);
        let scale = self.scalar(1.0 / (head_dim as f64).sqrt())?;
        let mut scores = self.node("Mul", &[&scores, &scale], &[]);
        if let Some(mask) = mask {
            scores = self.node("Add", &[&scores, mask], &[]);
        }
        let probs = self.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
        let out = self.node("MatMul", &[&probs, &v], &[]);
        let out = self.node(
            "Transpose",
            &[&out],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let merge = self.ints(&[0, 0, width]);
        Ok(self.node("Reshape", &[&out, &merge], &[]))
    }

    /// Renames value `from` to `to` (a graph output's fixed name) by an Identity node.
    pub(crate) fn output(&mut self, from: &str, to: &str) {
        self.nodes.push(NodeProto {
            input: vec![from.to_string()],
            output: vec![to.to_string()],
            name: format!("Identity_{to}"),
            op_type: "Identity".into(),
            attribute: Vec::new(),
        });
    }

    pub(crate) fn finish(
        self,
        name: &str,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
    ) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.initializers,
            input: inputs,
            output: outputs,
        }
    }
}

/// A graph input/output description; `None` dims are the dynamic batch axis `N`... any `Some`
/// is fixed.
pub(crate) fn value_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => DimensionValue::DimValue(*v),
                None => DimensionValue::DimParam("batch".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}
