//! Weighted averages of native checkpoints, key by key, streamed.
//!
//! [`plan`] checks the members against the first one — same config, same keys, same shapes,
//! float tensors float everywhere, integer and bool tensors of one dtype — and names the first
//! offending key. [`average`] then visits one tensor at a time: the members' bytes come from their
//! memory maps (`cnclip_model::weights::NativeReader`), are summed as `Σ wᵢ·xᵢ` in fp32 (fp64 when the output is fp64), left to right in
//! member order, each product rounded before the sum (exactly what `x₀*w₀ + x₁*w₁ + …` computes in
//! torch), and the result is handed to a [`Sink`] in the output dtype. Peak memory is one tensor
//! (plus the sink's own store: nothing for a file, one model for the sink module's `ModelSink`).
//!
//! Output dtype: the members' dtype when they agree, else the widest (fp64 over fp32 over the
//! 16-bit kinds; fp16 with bf16 gives fp32). Non-float tensors are not averaged: every member
//! must hold the same bytes, except BatchNorm's `num_batches_tracked` counters (int64), which
//! differ between runs by construction and take their maximum.

use crate::error::SoupError;
use cnclip_model::weights::{NativeReader, TensorEntry};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

/// Elements per parallel work item: small enough to stay in L2 with its decode buffer.
const CHUNK: usize = 1 << 14;

/// How a tensor is combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Weighted sum in fp32.
    Float32,
    /// Weighted sum in fp64.
    Float64,
    /// Integer or bool: identical in every member.
    Identical,
    /// A BatchNorm `num_batches_tracked` counter: the maximum.
    CounterMax,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub key: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub combine: Combine,
    /// Byte offset in the output's data section (tensors laid out in plan order).
    pub offset: usize,
    /// Index of the entry in each member, in member order.
    entries: Vec<usize>,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// What [`average`] will write, checked before any tensor is read.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: cnclip_model::ClipConfig,
    pub config_json: String,
    /// Output order: decreasing element size, then the first member's file order (the order
    /// `save_native` writes, so every tensor stays aligned).
    pub tensors: Vec<PlannedTensor>,
    weights: Vec<f64>,
}

impl Plan {
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
}

pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

fn float_rank(dtype: Dtype) -> u8 {
    match dtype {
        Dtype::F64 => 3,
        Dtype::F32 => 2,
        _ => 1,
    }
}

fn supported(dtype: Dtype) -> bool {
    is_float(dtype)
        || matches!(
            dtype,
            Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8 | Dtype::BOOL
        )
}

/// Checks that the members can be averaged and decides every output tensor's dtype.
pub fn plan(members: &[(&NativeReader, f64)]) -> Result<Plan, SoupError> {
    let Some(&(first, _)) = members.first() else {
        return Err(SoupError::Invalid(
            "a soup needs at least one member".into(),
        ));
    };
    for (m, w) in members {
        if !w.is_finite() {
            return Err(SoupError::Invalid(format!(
                "{}: weight {w} is not a finite number",
                m.path().display()
            )));
        }
    }
    for &(m, _) in &members[1..] {
        if m.config() != first.config() {
            return Err(SoupError::ConfigMismatch {
                first: first.path().to_path_buf(),
                path: m.path().to_path_buf(),
                first_config: first.config().to_json(),
                config: m.config().to_json(),
            });
        }
        // Keys of `m` that `first` lacks, reported in `m`'s file order.
        if let Some(extra) = m.entries().iter().find(|e| first.entry(&e.key).is_none()) {
            return Err(SoupError::UnexpectedKey {
                first: first.path().to_path_buf(),
                path: m.path().to_path_buf(),
                key: extra.key.clone(),
            });
        }
    }
    let mut tensors = Vec::with_capacity(first.entries().len());
    for (i0, e0) in first.entries().iter().enumerate() {
        if !supported(e0.dtype) {
            return Err(SoupError::UnsupportedDtype {
                path: first.path().to_path_buf(),
                key: e0.key.clone(),
                dtype: format!("{:?}", e0.dtype),
            });
        }
        let mut entries = vec![i0];
        let mut dtype = e0.dtype;
        for &(m, _) in &members[1..] {
            let j = m.index_of(&e0.key).ok_or_else(|| SoupError::MissingKey {
                first: first.path().to_path_buf(),
                path: m.path().to_path_buf(),
                key: e0.key.clone(),
            })?;
            let e = &m.entries()[j];
            if e.shape != e0.shape {
                return Err(SoupError::ShapeMismatch {
                    first: first.path().to_path_buf(),
                    path: m.path().to_path_buf(),
                    key: e0.key.clone(),
                    expected: e0.shape.clone(),
                    found: e.shape.clone(),
                });
            }
            let compatible = if is_float(e0.dtype) {
                is_float(e.dtype)
            } else {
                e.dtype == e0.dtype
            };
            if !compatible {
                return Err(SoupError::DtypeMismatch {
                    first: first.path().to_path_buf(),
                    path: m.path().to_path_buf(),
                    key: e0.key.clone(),
                    expected: format!("{:?}", e0.dtype),
                    found: format!("{:?}", e.dtype),
                });
            }
            if e.dtype != dtype {
                dtype = match float_rank(e.dtype).cmp(&float_rank(dtype)) {
                    std::cmp::Ordering::Greater => e.dtype,
                    std::cmp::Ordering::Less => dtype,
                    // fp16 with bf16: neither holds the other.
                    std::cmp::Ordering::Equal => Dtype::F32,
                };
            }
            entries.push(j);
        }
        let combine = match dtype {
            Dtype::F64 => Combine::Float64,
            d if is_float(d) => Combine::Float32,
            Dtype::I64 if e0.key.ends_with("num_batches_tracked") => Combine::CounterMax,
            _ => Combine::Identical,
        };
        tensors.push(PlannedTensor {
            key: e0.key.clone(),
            shape: e0.shape.clone(),
            dtype,
            combine,
            offset: 0,
            entries,
        });
    }
    // Stable: within one element size the first member's file order is kept.
    tensors.sort_by_key(|t| std::cmp::Reverse(t.dtype.bitsize()));
    let mut offset = 0;
    for t in &mut tensors {
        t.offset = offset;
        offset += t.nbytes();
    }
    Ok(Plan {
        config: first.config().clone(),
        config_json: first.config_json().to_string(),
        tensors,
        weights: members.iter().map(|&(_, w)| w).collect(),
    })
}

/// Where averaged tensors go, in [`Plan::tensors`] order.
pub trait Sink {
    fn begin(&mut self, plan: &Plan) -> Result<(), SoupError>;
    /// A whole tensor: `bytes` in `tensor.dtype`, little-endian, row-major. Not called for the
    /// float tensors of a sink that takes [`Sink::chunks`].
    fn tensor(&mut self, tensor: &PlannedTensor, bytes: &[u8]) -> Result<(), SoupError>;
    /// A sink that can take pieces of a tensor from several threads at once (a file written at
    /// offsets) returns itself here; float tensors then never exist whole in memory.
    fn chunks(&self) -> Option<&dyn ChunkSink> {
        None
    }
    fn finish(&mut self, plan: &Plan) -> Result<(), SoupError>;
}

/// Bytes `[offset, offset + bytes.len())` of a tensor, from any thread, in any order.
pub trait ChunkSink: Sync {
    fn write_chunk(
        &self,
        tensor: &PlannedTensor,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), SoupError>;
}

/// One member's view of one tensor.
#[derive(Clone, Copy)]
struct Src<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
    weight: f64,
}

/// Runs `plan` over `members` (the same members, in the same order, as [`plan`] was given) into
/// `sink`; `progress` is called after each tensor with the output bytes done so far.
pub fn average(
    members: &[(&NativeReader, f64)],
    plan: &Plan,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(usize),
) -> Result<(), SoupError> {
    if members.len() != plan.weights.len() {
        return Err(SoupError::Invalid(format!(
            "the plan was made for {} members, not {}",
            plan.weights.len(),
            members.len()
        )));
    }
    for (m, _) in members {
        m.advise_sequential();
    }
    sink.begin(plan)?;
    let mut out: Vec<u8> = Vec::new();
    let mut done = 0usize;
    for t in &plan.tensors {
        let sources: Vec<Src<'_>> = members
            .iter()
            .zip(&t.entries)
            .map(|(&(m, weight), &i)| {
                let e: &TensorEntry = &m.entries()[i];
                Src {
                    bytes: m.bytes(e),
                    dtype: e.dtype,
                    weight,
                }
            })
            .collect();
        let width = t.dtype.bitsize() / 8;
        match t.combine {
            Combine::Float32 | Combine::Float64 => match sink.chunks() {
                Some(chunks) => {
                    // Each worker computes a slice into its own small buffer and writes it at
                    // its offset: nothing tensor-sized is allocated.
                    (0..t.numel().div_ceil(CHUNK))
                        .into_par_iter()
                        .try_for_each_init(Scratch::default, |scratch, c| {
                            let start = c * CHUNK;
                            let n = CHUNK.min(t.numel() - start);
                            let mut buf = std::mem::take(&mut scratch.out);
                            buf.clear();
                            buf.resize(n * width, 0);
                            fill(t, &sources, start, &mut buf, scratch);
                            let written = chunks.write_chunk(t, start * width, &buf);
                            scratch.out = buf;
                            written
                        })?;
                }
                None => {
                    out.clear();
                    out.resize(t.nbytes(), 0);
                    out.par_chunks_mut(CHUNK * width)
                        .enumerate()
                        .for_each_init(Scratch::default, |scratch, (c, o)| {
                            fill(t, &sources, c * CHUNK, o, scratch)
                        });
                    sink.tensor(t, &out)?;
                }
            },
            Combine::Identical | Combine::CounterMax => {
                out.clear();
                out.resize(t.nbytes(), 0);
                exact(members, t, &sources, &mut out)?;
                match sink.chunks() {
                    Some(chunks) => chunks.write_chunk(t, 0, &out)?,
                    None => sink.tensor(t, &out)?,
                }
            }
        }
        done += t.nbytes();
        progress(done);
    }
    sink.finish(plan)
}

/// Per-worker buffers.
#[derive(Default)]
struct Scratch {
    acc32: Vec<f32>,
    x32: Vec<f32>,
    acc64: Vec<f64>,
    x64: Vec<f64>,
    out: Vec<u8>,
}

/// The output bytes of elements `[start, start + out.len() / width)` of a float tensor.
fn fill(t: &PlannedTensor, sources: &[Src<'_>], start: usize, out: &mut [u8], s: &mut Scratch) {
    let n = out.len() / (t.dtype.bitsize() / 8);
    match t.combine {
        Combine::Float64 => {
            s.acc64.clear();
            s.acc64.resize(n, 0.0);
            s.x64.resize(n, 0.0);
            for (k, src) in sources.iter().enumerate() {
                decode_f64(src.bytes, src.dtype, start, &mut s.x64);
                accumulate(&mut s.acc64, &s.x64, src.weight, k == 0);
            }
            for (o, v) in out.chunks_exact_mut(8).zip(&s.acc64) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            // Fast path: fp32 members into an fp32 output, read and written in place.
            let all_f32 = t.dtype == Dtype::F32 && sources.iter().all(|s| s.dtype == Dtype::F32);
            if all_f32 && let Ok(acc) = bytemuck::try_cast_slice_mut::<u8, f32>(out) {
                let xs: Option<Vec<&[f32]>> = sources
                    .iter()
                    .map(|src| {
                        bytemuck::try_cast_slice::<u8, f32>(&src.bytes[4 * start..4 * (start + n)])
                            .ok()
                    })
                    .collect();
                if let Some(xs) = xs.filter(|_| cfg!(target_endian = "little")) {
                    for (k, (x, src)) in xs.iter().zip(sources).enumerate() {
                        accumulate(acc, x, src.weight, k == 0);
                    }
                    return;
                }
            }
            s.acc32.clear();
            s.acc32.resize(n, 0.0);
            s.x32.resize(n, 0.0);
            for (k, src) in sources.iter().enumerate() {
                decode_f32(src.bytes, src.dtype, start, &mut s.x32);
                accumulate(&mut s.acc32, &s.x32, src.weight, k == 0);
            }
            encode_f32(&s.acc32, t.dtype, out);
        }
    }
}

/// `acc = x·w` (first member) or `acc += x·w`, the product rounded before the sum.
fn accumulate<T>(acc: &mut [T], x: &[T], w: f64, first: bool)
where
    T: Copy + std::ops::Mul<Output = T> + std::ops::Add<Output = T> + FromF64,
{
    let w = T::from_f64(w);
    if first {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a = x * w;
        }
    } else {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a = *a + x * w;
        }
    }
}

trait FromF64 {
    fn from_f64(v: f64) -> Self;
}

impl FromF64 for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl FromF64 for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Integer and bool tensors: identical in every member, or a counter's maximum.
fn exact(
    members: &[(&NativeReader, f64)],
    t: &PlannedTensor,
    sources: &[Src<'_>],
    out: &mut [u8],
) -> Result<(), SoupError> {
    if t.combine == Combine::CounterMax {
        for (i, o) in out.chunks_exact_mut(8).enumerate() {
            let max = sources
                .iter()
                .map(|s| i64_at(s.bytes, i))
                .max()
                .unwrap_or(0);
            o.copy_from_slice(&max.to_le_bytes());
        }
        return Ok(());
    }
    let b0 = sources[0].bytes;
    if let Some(k) = (1..sources.len()).find(|&k| sources[k].bytes != b0) {
        return Err(SoupError::NonFloatDiffers {
            first: members[0].0.path().to_path_buf(),
            path: members[k].0.path().to_path_buf(),
            key: t.key.clone(),
            dtype: format!("{:?}", t.dtype),
        });
    }
    out.copy_from_slice(b0);
    Ok(())
}

fn i64_at(b: &[u8], i: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[8 * i..8 * i + 8]);
    i64::from_le_bytes(a)
}

/// Decodes elements `[start, start + out.len())` of a float tensor's bytes to f32.
fn decode_f32(bytes: &[u8], dtype: Dtype, start: usize, out: &mut [f32]) {
    let n = out.len();
    match dtype {
        Dtype::F32 => {
            for (o, b) in out
                .iter_mut()
                .zip(bytes[4 * start..4 * (start + n)].chunks_exact(4))
            {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (o, b) in out
                .iter_mut()
                .zip(bytes[2 * start..2 * (start + n)].chunks_exact(2))
            {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, b) in out
                .iter_mut()
                .zip(bytes[2 * start..2 * (start + n)].chunks_exact(2))
            {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        // An fp64 member of an fp32 output cannot occur (fp64 wins the output dtype).
        _ => {
            for (o, b) in out
                .iter_mut()
                .zip(bytes[8 * start..8 * (start + n)].chunks_exact(8))
            {
                *o = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32;
            }
        }
    }
}

fn decode_f64(bytes: &[u8], dtype: Dtype, start: usize, out: &mut [f64]) {
    let n = out.len();
    if dtype == Dtype::F64 {
        for (o, b) in out
            .iter_mut()
            .zip(bytes[8 * start..8 * (start + n)].chunks_exact(8))
        {
            *o = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
    } else {
        let mut tmp = vec![0f32; n];
        decode_f32(bytes, dtype, start, &mut tmp);
        for (o, v) in out.iter_mut().zip(tmp) {
            *o = f64::from(v);
        }
    }
}

/// f32 values to the output dtype's bytes (round to nearest even for the 16-bit kinds, as torch).
fn encode_f32(acc: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(acc) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(acc) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        _ => {
            for (o, v) in out.chunks_exact_mut(4).zip(acc) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}
