//! torch's DDP engine, `c10d::Reducer`, over a [`ProcessGroup`] of [`crate::dist`].
//!
//! This is the C++ object `torch.nn.parallel.DistributedDataParallel` drives: it assigns the
//! parameters to buckets by size (`bucket_cap_mb`, a small first bucket), registers a post-hook on
//! every parameter's gradient accumulator, and all-reduces a bucket as soon as all its gradients
//! are ready — during the backward pass, overlapping it. At the end of the backward pass it waits
//! for the buckets and leaves the gradients averaged over the ranks (optionally as views into the
//! buckets, `gradient_as_bucket_view`). tch's `backward` runs the same autograd engine, so the
//! hooks fire there too; nothing on the Rust side touches the gradients.
//!
//! Driving it is [`Reducer::prepare`] before each backward pass (what DDP's `forward` does),
//! with `sync = false` for the micro-batches of an accumulation group that only accumulate locally
//! (`no_sync`), and [`Reducer::check_finalized`] after a synchronised one.

use crate::dist::{DistError, ProcessGroup};
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use tch::Tensor;

#[repr(C)]
struct RawReducer {
    _private: [u8; 0],
}

type TensorPtr = *mut torch_sys::C_tensor;

unsafe extern "C" {
    fn cnclip_reducer_bucket_assignment(
        tensors: *const TensorPtr,
        n: usize,
        limits: *const i64,
        n_limits: usize,
        bucket_of: *mut i64,
    ) -> *mut c_char;
    fn cnclip_reducer_new(
        group: *mut c_void,
        nccl: i32,
        params: *const TensorPtr,
        n: usize,
        first_limits: *const i64,
        n_first_limits: usize,
        bucket_bytes: i64,
        first_bucket_bytes: i64,
        find_unused: i32,
        grad_as_bucket_view: i32,
        hook: i32,
        out: *mut *mut RawReducer,
    ) -> *mut c_char;
    fn cnclip_reducer_sync_module_states(
        group: *mut c_void,
        nccl: i32,
        params: *const TensorPtr,
        n_params: usize,
        states: *const TensorPtr,
        n_states: usize,
        buffer_size: i64,
    ) -> *mut c_char;
    fn cnclip_reducer_free(reducer: *mut RawReducer);
    fn cnclip_reducer_prepare(
        reducer: *mut RawReducer,
        sync: i32,
        outputs: *const TensorPtr,
        n: usize,
    ) -> *mut c_char;
    fn cnclip_reducer_check_finalized(reducer: *mut RawReducer) -> *mut c_char;
    fn cnclip_reducer_buckets(
        reducer: *mut RawReducer,
        counts: *mut i64,
        bytes: *mut i64,
        cap: usize,
        n_out: *mut usize,
    ) -> *mut c_char;
}

/// torch's `bucket_cap_mb` default (25 MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;
/// torch's `dist._DEFAULT_FIRST_BUCKET_BYTES` (1 MiB): the cap of the first bucket of an
/// assignment — with `find_unused_parameters` the first-defined parameters (the last gradients
/// ready, so little communication is left once backward finishes), after a rebuild the first
/// gradients ready (so communication starts early).
pub const DEFAULT_FIRST_BUCKET_BYTES: usize = 1024 * 1024;

/// A DDP communication hook (`DistributedDataParallel.register_comm_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommHook {
    /// Plain all-reduce of the buckets in their dtype (DDP without a hook).
    #[default]
    None,
    /// torch's built-in `FP16_COMPRESS`: buckets cast to fp16, divided by the world size,
    /// all-reduced, cast back.
    Fp16,
    /// `bf16_compress_hook` (Python-only in torch; the same steps in C++ here) with bf16.
    Bf16,
}

impl CommHook {
    fn code(self) -> i32 {
        match self {
            CommHook::None => 0,
            CommHook::Fp16 => 1,
            CommHook::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CommHook::None => "none",
            CommHook::Fp16 => "fp16",
            CommHook::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for CommHook {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(CommHook::None),
            "fp16" => Ok(CommHook::Fp16),
            "bf16" => Ok(CommHook::Bf16),
            other => Err(DistError::Argument(format!(
                "unknown DDP communication hook {other:?}: expected none, fp16 or bf16"
            ))),
        }
    }
}

/// `DistributedDataParallel`'s constructor arguments that shape the reducer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReducerOptions {
    /// `bucket_cap_mb`, in bytes.
    pub bucket_bytes: usize,
    /// The first bucket's cap after the buckets are rebuilt.
    pub first_bucket_bytes: usize,
    /// `find_unused_parameters`: search the graph of the outputs passed to
    /// [`Reducer::prepare`] for parameters that will get no gradient, and reduce them as zeros
    /// (costs a graph traversal per step; needed only when some trainable parameter can go
    /// unused). Parameters that do not require grad are not in the reducer at all.
    pub find_unused_parameters: bool,
    /// `gradient_as_bucket_view`: the gradients become views into the buckets (no copy back, no
    /// second copy of the gradients in memory).
    pub gradient_as_bucket_view: bool,
    pub comm_hook: CommHook,
}

impl Default for ReducerOptions {
    fn default() -> Self {
        Self {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            first_bucket_bytes: DEFAULT_FIRST_BUCKET_BYTES,
            find_unused_parameters: false,
            gradient_as_bucket_view: true,
            comm_hook: CommHook::None,
        }
    }
}

fn ptrs(tensors: &[&Tensor]) -> Vec<TensorPtr> {
    tensors.iter().map(|t| t.as_ptr().cast_mut()).collect()
}

fn limits_i64(limits: &[usize]) -> Vec<i64> {
    limits
        .iter()
        .map(|&l| i64::try_from(l).unwrap_or(i64::MAX))
        .collect()
}

/// torch's bucket assignment (`dist._compute_bucket_assignment_by_size`): the bucket index of each
/// tensor. Buckets hold consecutive tensors of one dtype and device; bucket `i` closes once it
/// reaches `limits[i]` bytes (the last limit for all later buckets).
pub fn bucket_assignment(tensors: &[&Tensor], limits: &[usize]) -> Result<Vec<usize>, DistError> {
    if limits.is_empty() {
        return Err(DistError::Argument(
            "bucket assignment needs at least one size limit".into(),
        ));
    }
    let p = ptrs(tensors);
    let l = limits_i64(limits);
    let mut out = vec![-1i64; tensors.len()];
    // SAFETY: live tensors borrowed for the call; `out` has one slot per tensor.
    let error = unsafe {
        cnclip_reducer_bucket_assignment(p.as_ptr(), p.len(), l.as_ptr(), l.len(), out.as_mut_ptr())
    };
    if let Some(message) = crate::dist::take_error(error) {
        return Err(DistError::Argument(format!(
            "bucket assignment failed: {message}"
        )));
    }
    Ok(out.into_iter().map(|b| b.max(0) as usize).collect())
}

/// torch DDP's `broadcast_bucket_size` (250 MiB) for the start-up broadcast.
pub const BROADCAST_BUCKET_BYTES: usize = 250 * 1024 * 1024;

/// What `DistributedDataParallel`'s constructor does before it builds the reducer:
/// `verify_params_across_processes` on `params` (same count, shapes and dtypes on every rank, else
/// an error saying which differs), then rank 0's `states` (parameters and buffers) broadcast to
/// every rank in coalesced chunks of [`BROADCAST_BUCKET_BYTES`] (`_sync_module_states`).
pub fn sync_module_states(
    group: &ProcessGroup,
    params: &[&Tensor],
    states: &[&Tensor],
) -> Result<(), DistError> {
    let p = ptrs(params);
    let s = ptrs(states);
    let nccl = i32::from(group.backend() == crate::dist::Backend::Nccl);
    // SAFETY: live group handle and tensors borrowed for the call.
    let error = unsafe {
        cnclip_reducer_sync_module_states(
            group.raw_handle(),
            nccl,
            p.as_ptr(),
            p.len(),
            s.as_ptr(),
            s.len(),
            BROADCAST_BUCKET_BYTES as i64,
        )
    };
    group.result("synchronising the model at start", error)
}

/// One rank's `c10d::Reducer` over `params`.
pub struct Reducer {
    raw: *mut RawReducer,
    group: Arc<ProcessGroup>,
    options: ReducerOptions,
    params: usize,
}

// SAFETY: the Reducer guards its state with its own mutex (its hooks run on autograd threads);
// the handle is only freed in Drop.
unsafe impl Send for Reducer {}
unsafe impl Sync for Reducer {}

impl std::fmt::Debug for Reducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reducer")
            .field("group", &self.group)
            .field("options", &self.options)
            .field("params", &self.params)
            .finish()
    }
}

impl Reducer {
    /// The reducer `DistributedDataParallel(module, ...)` builds: `params` are the module's
    /// parameters that require grad, in the module's order, without duplicates (every rank must
    /// pass the same list). The first iteration's buckets are torch's: one per dtype (no size
    /// limit) unless `find_unused_parameters`, whose buckets are `[first, bucket_bytes]`-capped
    /// from the start; after the first synchronised backward the buckets are rebuilt once in the
    /// order the gradients became ready (and agreed on by a broadcast from rank 0).
    pub fn new(
        group: Arc<ProcessGroup>,
        params: &[Tensor],
        options: ReducerOptions,
    ) -> Result<Self, DistError> {
        if params.is_empty() {
            return Err(DistError::Argument(
                "the reducer needs at least one parameter that requires grad".into(),
            ));
        }
        if let Some(p) = params.iter().find(|p| !p.requires_grad()) {
            return Err(DistError::Argument(format!(
                "a parameter of shape {:?} does not require grad: leave it out of the reducer",
                p.size()
            )));
        }
        let first_limits = if options.find_unused_parameters {
            vec![options.first_bucket_bytes, options.bucket_bytes]
        } else {
            vec![usize::MAX >> 1]
        };
        let borrowed: Vec<&Tensor> = params.iter().collect();
        let p = ptrs(&borrowed);
        let l = limits_i64(&first_limits);
        let mut raw = std::ptr::null_mut();
        let nccl = i32::from(group.backend() == crate::dist::Backend::Nccl);
        // SAFETY: live group handle and tensors; out-pointer to a local; the shim catches all
        // exceptions.
        let error = unsafe {
            cnclip_reducer_new(
                group.raw_handle(),
                nccl,
                p.as_ptr(),
                p.len(),
                l.as_ptr(),
                l.len(),
                i64::try_from(options.bucket_bytes).unwrap_or(i64::MAX),
                i64::try_from(options.first_bucket_bytes).unwrap_or(i64::MAX),
                i32::from(options.find_unused_parameters),
                i32::from(options.gradient_as_bucket_view),
                options.comm_hook.code(),
                &mut raw,
            )
        };
        group.result("creating the reducer", error)?;
        Ok(Self {
            raw,
            group,
            options,
            params: params.len(),
        })
    }

    pub fn options(&self) -> ReducerOptions {
        self.options
    }

    /// Before a backward pass that produces parameter gradients. `sync`: this backward pass
    /// all-reduces (the last micro-batch of an accumulation group); otherwise the gradients only
    /// accumulate locally, as under torch's `no_sync()`. `outputs`: the tensors the backward
    /// pass starts from, searched for unused parameters when `find_unused_parameters` is on.
    /// Fails when the previous synchronised backward did not finish its reduction.
    pub fn prepare(&self, sync: bool, outputs: &[&Tensor]) -> Result<(), DistError> {
        let p = ptrs(outputs);
        // SAFETY: live reducer; the outputs are live tensors borrowed for the call.
        let error =
            unsafe { cnclip_reducer_prepare(self.raw, i32::from(sync), p.as_ptr(), p.len()) };
        self.group.result("preparing the reducer", error)
    }

    /// After a synchronised backward pass: fails unless every bucket was reduced and its
    /// averaged gradients written back (a parameter that got no gradient without
    /// `find_unused_parameters`, or a backward pass that never ran).
    pub fn check_finalized(&self) -> Result<(), DistError> {
        // SAFETY: live reducer.
        let error = unsafe { cnclip_reducer_check_finalized(self.raw) };
        self.group.result("the gradient reduction", error)
    }

    /// The current buckets, in the order they are all-reduced: (parameters, bytes) of each.
    pub fn buckets(&self) -> Result<Vec<(usize, usize)>, DistError> {
        let cap = self.params;
        let (mut counts, mut bytes) = (vec![0i64; cap], vec![0i64; cap]);
        let mut n = 0usize;
        // SAFETY: live reducer; both arrays have `cap` slots, and there are at most as many
        // buckets as parameters.
        let error = unsafe {
            cnclip_reducer_buckets(
                self.raw,
                counts.as_mut_ptr(),
                bytes.as_mut_ptr(),
                cap,
                &mut n,
            )
        };
        self.group.result("listing the reducer's buckets", error)?;
        Ok(counts
            .into_iter()
            .zip(bytes)
            .take(n.min(cap))
            .map(|(c, b)| (c.max(0) as usize, b.max(0) as usize))
            .collect())
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is freed once; this removes the autograd hooks.
        unsafe { cnclip_reducer_free(self.raw) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::test_support::two_ranks;
    use tch::{Device, Kind};

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap()
    }

    /// Rank r's loss `(r+1)·(Σ a + Σ b²)`: gradients (r+1) and 2b(r+1), averaged 1.5 and 3b.
    fn loss(rank: usize, a: &Tensor, b: &Tensor) -> Tensor {
        (a.sum(Kind::Float) + (b * b).sum(Kind::Float)) * (rank as f64 + 1.0)
    }

    #[test]
    fn gradients_are_averaged_by_the_backward_pass_and_no_sync_accumulates() {
        let (mine, theirs) = two_ranks("reducer", |rank, pg| {
            let a = param(&[1.0, 2.0, 3.0, 4.0, 5.0]);
            let b = param(&[0.5, -1.0, 2.0]);
            let options = ReducerOptions {
                first_bucket_bytes: 8,
                bucket_bytes: 16,
                ..ReducerOptions::default()
            };
            let params = [a.shallow_clone(), b.shallow_clone()];
            let reducer = Reducer::new(pg, &params, options).unwrap();
            // First iteration: one unbounded bucket, as torch's DDP before the rebuild.
            let before = reducer.buckets().unwrap();
            let mut out = Vec::new();
            for step in 0..3 {
                for p in &params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                // Step 2: rank 1 alone accumulates a no_sync micro-batch first. Were it to
                // communicate, rank 0 would have no matching collective and the step would fail.
                if step == 2 && rank == 1 {
                    let l = loss(rank, &a, &b);
                    reducer.prepare(false, &[&l]).unwrap();
                    l.backward();
                }
                let l = loss(rank, &a, &b);
                reducer.prepare(true, &[&l]).unwrap();
                l.backward();
                reducer.check_finalized().unwrap();
                out.push((values(&a.grad()), values(&b.grad())));
            }
            (before, reducer.buckets().unwrap(), out)
        });
        for (before, after, out) in [&mine, &theirs] {
            assert_eq!(before, &vec![(2, 32)]);
            // Rebuilt in gradient-ready order with the caps: b (12 bytes) alone fills the 8-byte
            // first bucket; a (20 bytes) starts the next.
            assert_eq!(after.len(), 2, "{after:?}");
            assert_eq!(after.iter().map(|b| b.1).sum::<usize>(), 32);
            for (step, (ga, gb)) in out.iter().enumerate() {
                // Step 2: rank 0 holds 1·(1, 2b), rank 1 2·2·(1, 2b): the mean is 2.5·(1, 2b).
                let k = if step == 2 { 2.5 / 1.5 } else { 1.0 };
                assert_eq!(ga, &vec![1.5 * k as f32; 5], "step {step}");
                let b = [0.5f32, -1.0, 2.0];
                let want: Vec<f32> = b.iter().map(|b| 3.0 * k as f32 * b).collect();
                assert_eq!(gb, &want, "step {step}");
            }
        }
        assert_eq!(mine, theirs);
    }

    #[test]
    fn unused_parameters_need_find_unused_parameters() {
        let (mine, theirs) = two_ranks("reducer", |rank, pg| {
            let a = param(&[1.0, 2.0]);
            let b = param(&[3.0]);
            let unused = param(&[7.0, 8.0]);
            let params = [a.shallow_clone(), b.shallow_clone(), unused.shallow_clone()];
            let found = Reducer::new(
                pg.clone(),
                &params,
                ReducerOptions {
                    find_unused_parameters: true,
                    ..ReducerOptions::default()
                },
            )
            .unwrap();
            let mut grads = Vec::new();
            for _ in 0..2 {
                let l = loss(rank, &a, &b);
                found.prepare(true, &[&l]).unwrap();
                l.backward();
                found.check_finalized().unwrap();
                grads.push((values(&a.grad()), values(&b.grad())));
                let _ = a.grad().zero_();
                let _ = b.grad().zero_();
            }
            let unused_grad = unused.grad();
            let unused_zero = !unused_grad.defined() || values(&unused_grad) == vec![0.0, 0.0];
            drop(found);
            // Without the search the reducer waits for the unused parameter forever: the step
            // is reported unfinished instead of applying half-reduced gradients.
            let blind = Reducer::new(pg, &params, ReducerOptions::default()).unwrap();
            let l = loss(rank, &a, &b);
            blind.prepare(true, &[&l]).unwrap();
            l.backward();
            let err = blind
                .check_finalized()
                .expect_err("unused parameter")
                .to_string();
            (grads, unused_zero, err)
        });
        for (grads, unused_zero, err) in [&mine, &theirs] {
            for (ga, gb) in grads {
                assert_eq!(ga, &vec![1.5, 1.5]);
                assert_eq!(gb, &vec![9.0]);
            }
            assert!(unused_zero);
            assert!(err.contains("finish") || err.contains("reduction"), "{err}");
        }
    }

    /// The compression hooks round each rank's gradient to fp16/bf16, divide by the world size
    /// in that dtype and sum in it: exactly what this test recomputes with tch.
    #[test]
    fn compression_hooks_reduce_in_half_precision() {
        for (hook, kind) in [
            (CommHook::Fp16, Kind::Half),
            (CommHook::Bf16, Kind::BFloat16),
        ] {
            let (mine, theirs) = two_ranks("reducer", move |rank, pg| {
                let a = param(&[1.0, 1.0, 1.0]);
                let b = param(&[0.1]);
                let params = [a.shallow_clone(), b.shallow_clone()];
                let options = ReducerOptions {
                    comm_hook: hook,
                    ..ReducerOptions::default()
                };
                let reducer = Reducer::new(pg, &params, options).unwrap();
                // Gradients (r+1)/3·a-coefficient: not representable in fp16/bf16.
                let x = Tensor::from_slice(&[1.0f32, 1.0e-3, 7.7]) / 3.0 * (rank as f64 + 1.0);
                let l = (&a * &x).sum(Kind::Float) + &b * 0.0;
                reducer.prepare(true, &[&l]).unwrap();
                l.sum(Kind::Float).backward();
                reducer.check_finalized().unwrap();
                values(&a.grad())
            });
            assert_eq!(mine, theirs);
            let local = |r: f64| Tensor::from_slice(&[1.0f32, 1.0e-3, 7.7]) / 3.0 * (r + 1.0);
            let half = |r: f64| local(r).to_kind(kind) / 2.0;
            let want = values(&(half(0.0) + half(1.0)).to_kind(Kind::Float));
            let exact = values(&((local(0.0) + local(1.0)) / 2.0));
            assert_eq!(mine, want, "{hook:?}");
            assert_ne!(mine, exact, "{hook:?} did not compress");
        }
    }

    #[test]
    fn module_states_come_from_rank_0_and_shapes_must_agree() {
        let (mine, theirs) = two_ranks("reducer", |rank, pg| {
            let w = Tensor::full([3], rank as f64 + 1.0, (Kind::Float, Device::Cpu));
            let running = Tensor::full([2], rank as f64 * 10.0, (Kind::Double, Device::Cpu));
            sync_module_states(&pg, &[&w], &[&w, &running]).unwrap();
            // Rank 1 claims a parameter of another shape: both ranks get an error.
            let odd = Tensor::zeros([3 + rank as i64], (Kind::Float, Device::Cpu));
            let err = sync_module_states(&pg, &[&odd], &[&odd]).map_err(|e| e.to_string());
            (values(&w), values(&running), err.is_err())
        });
        for (w, running, failed) in [&mine, &theirs] {
            assert_eq!(w, &vec![1.0; 3]);
            assert_eq!(running, &vec![0.0; 2]);
            assert!(failed);
        }
    }

    #[test]
    fn bucket_assignment_is_torchs() {
        let t = |n: i64, kind: Kind| Tensor::zeros([n], (kind, Device::Cpu));
        let ts = [
            t(100, Kind::Float),
            t(100, Kind::Float),
            t(300, Kind::Float),
            t(10, Kind::Double),
            t(50, Kind::Float),
        ];
        let borrowed: Vec<&Tensor> = ts.iter().collect();
        // A bucket closes once it holds at least its limit; each dtype walks the limits on its
        // own. torch 2.11's `dist._compute_bucket_assignment_by_size(ts, [400, 1200])` on these
        // tensors gives [[0], [1, 2], [3], [4]].
        let got = bucket_assignment(&borrowed, &[400, 1200]).unwrap();
        assert_eq!(got, vec![0, 1, 1, 2, 3]);
        assert!(bucket_assignment(&borrowed, &[]).is_err());
        assert!("fp8".parse::<CommHook>().is_err());
        assert_eq!("bf16".parse::<CommHook>().unwrap(), CommHook::Bf16);
    }
}
