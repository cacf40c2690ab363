//! Synchronised BatchNorm (`torch.nn.SyncBatchNorm`, which cn_clip's `--use-bn-sync` converts the
//! ResNet's BatchNorms to) for training forwards on any device and c10d backend.
//!
//! [`sync_batch_norm`] normalises with the mean and variance of the *global* batch (every rank of
//! the [`ProcessGroup`]), updates the running statistics with the global unbiased variance, and
//! its backward sums the gradient moments `Σdy` and `Σdy·(x−μ)` over the group, so that every
//! rank's input gradient is the one a single process gets on the concatenated batch. The weight
//! and bias gradients are the local terms (the data-parallel all-reduce of gradients averages them
//! with every other parameter's, as torch's DDP does). The autograd function is C++
//! (`sync_bn.cpp`, the math of torch/nn/modules/_functions.py with portable ATen ops: torch's own
//! statistics kernels are CUDA-only); its collectives call back into [`ProcessGroup::all_reduce`].
//!
//! Every rank must call it (and run the backward) in the same order, like any collective.

use crate::dist::{ProcessGroup, ReduceOp};
use std::ffi::{CStr, c_char, c_void};
use std::mem::ManuallyDrop;
use std::sync::Arc;
use tch::Tensor;

type TensorPtr = *mut torch_sys::C_tensor;
type ReduceFn = extern "C" fn(*mut c_void, TensorPtr, *mut c_char, usize) -> i32;
type ReleaseFn = extern "C" fn(*mut c_void);

unsafe extern "C" {
    fn cnclip_sync_bn_free_error(message: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn cnclip_sync_batch_norm(
        input: TensorPtr,
        weight: TensorPtr,
        bias: TensorPtr,
        running_mean: TensorPtr,
        running_var: TensorPtr,
        momentum: f64,
        eps: f64,
        ctx: *mut c_void,
        reduce: ReduceFn,
        release: ReleaseFn,
        out: *mut TensorPtr,
    ) -> *mut c_char;
}

#[derive(Debug, thiserror::Error)]
#[error("synchronised BatchNorm on rank {rank} of {size} failed: {message}")]
pub struct SyncBnError {
    pub rank: usize,
    pub size: usize,
    pub message: String,
}

/// The running statistics a training forward updates in place (`nn.BatchNorm`'s buffers).
#[derive(Debug, Clone, Copy)]
pub struct RunningStats<'a> {
    pub mean: &'a Tensor,
    pub var: &'a Tensor,
    /// torch's `momentum` (0.1 by default): `running = (1 − m)·running + m·batch`.
    pub momentum: f64,
}

/// `torch.nn.SyncBatchNorm`'s training forward of `input` (`[N, C, …]`) with the affine `weight`
/// and `bias` (`[C]`) over `group`; `eps` as `nn.BatchNorm`'s. The result is differentiable in
/// `input`, `weight` and `bias`; the running statistics, if given, are updated in place.
pub fn sync_batch_norm(
    input: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<RunningStats<'_>>,
    eps: f64,
    group: &Arc<ProcessGroup>,
) -> Result<Tensor, SyncBnError> {
    let error = |message: String| SyncBnError {
        rank: group.rank(),
        size: group.size(),
        message,
    };
    let ptr = |t: &Tensor| t.as_ptr().cast_mut();
    let (rm, rv, momentum) = match running {
        Some(r) => (ptr(r.mean), ptr(r.var), r.momentum),
        None => (std::ptr::null_mut(), std::ptr::null_mut(), 0.0),
    };
    // The graph's node owns this reference until it is freed (`release`).
    let ctx = Arc::into_raw(Arc::clone(group)).cast_mut().cast::<c_void>();
    let mut out: TensorPtr = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call; `ctx` is an `Arc<ProcessGroup>` reference that
    // the shim hands to `release` exactly once; `out` is a local out-pointer.
    let raw = unsafe {
        cnclip_sync_batch_norm(
            ptr(input),
            ptr(weight),
            ptr(bias),
            rm,
            rv,
            momentum,
            eps,
            ctx,
            reduce,
            release,
            &mut out,
        )
    };
    if !raw.is_null() {
        // SAFETY: a NUL-terminated message the shim malloc'd; copied, then freed once.
        let message = unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned();
        unsafe { cnclip_sync_bn_free_error(raw) };
        return Err(error(message));
    }
    if out.is_null() {
        return Err(error("the shim returned no tensor".into()));
    }
    // SAFETY: a fresh `at::Tensor*` the shim allocated for us; the Tensor owns it from here.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// The collective the C++ function calls: an in-place sum over the group.
extern "C" fn reduce(ctx: *mut c_void, tensor: TensorPtr, message: *mut c_char, len: usize) -> i32 {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the `Arc<ProcessGroup>` reference of `sync_batch_norm`, alive until
        // `release`; `tensor` is a live `at::Tensor*` the shim keeps owning (hence ManuallyDrop).
        let group = unsafe { &*ctx.cast_const().cast::<ProcessGroup>() };
        let tensor = ManuallyDrop::new(unsafe { Tensor::from_ptr(tensor) });
        group
            .all_reduce(&[&tensor], ReduceOp::Sum)
            .map_err(|e| e.to_string())
    });
    let text = match result {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => e,
        Err(_) => "panic in the all_reduce callback".to_string(),
    };
    if !message.is_null() && len > 0 {
        let bytes = text.as_bytes();
        let n = bytes.len().min(len - 1);
        // SAFETY: the shim's buffer holds `len` bytes; we write n < len of them and a NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), message, n);
            *message.add(n) = 0;
        }
    }
    1
}

extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: the reference `sync_batch_norm` leaked with Arc::into_raw, released once.
    drop(unsafe { Arc::from_raw(ctx.cast_const().cast::<ProcessGroup>()) });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::test_support::two_ranks;
    use tch::{Device, Kind};

    struct Side {
        out: Tensor,
        rm: Tensor,
        rv: Tensor,
        gx: Tensor,
        gw: Tensor,
        gb: Tensor,
    }

    /// BatchNorm of `x` (double) with the given loss weights `probe`: plain (`group` None) or
    /// synchronised.
    fn run(x: &Tensor, probe: &Tensor, group: Option<&Arc<ProcessGroup>>) -> Side {
        let c = x.size()[1];
        // A fresh leaf: set_requires_grad on the caller's tensor would change it in place.
        let x = x.detach().set_requires_grad(true);
        let w =
            (Tensor::arange(c, (Kind::Double, Device::Cpu)) * 0.25 + 0.5).set_requires_grad(true);
        let b = (Tensor::arange(c, (Kind::Double, Device::Cpu)) * -0.1).set_requires_grad(true);
        let rm = Tensor::zeros([c], (Kind::Double, Device::Cpu));
        let rv = Tensor::ones([c], (Kind::Double, Device::Cpu));
        let out = match group {
            None => Tensor::batch_norm(
                &x,
                Some(&w),
                Some(&b),
                Some(&rm),
                Some(&rv),
                true,
                0.1,
                1e-5,
                false,
            ),
            Some(g) => {
                let running = RunningStats {
                    mean: &rm,
                    var: &rv,
                    momentum: 0.1,
                };
                sync_batch_norm(&x, &w, &b, Some(running), 1e-5, g).unwrap()
            }
        };
        (&out * probe).sum(Kind::Double).backward();
        Side {
            out: out.detach(),
            rm,
            rv,
            gx: x.grad(),
            gw: w.grad(),
            gb: b.grad(),
        }
    }

    /// Two ranks (threads) × 3 rows each against plain BatchNorm on the 6 rows, in double: the
    /// two differ by summation order only, ~1e-15 relative, so 1e-12 is a bound with margin that
    /// still catches any missing term (a local instead of a global moment changes values by O(1)).
    #[test]
    fn two_ranks_equal_one_process_on_the_concatenated_batch() {
        // Deterministic data without torch's global RNG (shared by this binary's tests); each
        // rank thread rebuilds it and takes its 3 rows.
        let data = || {
            let ramp = Tensor::arange(144, (Kind::Double, Device::Cpu)).reshape([6, 4, 3, 2]);
            let x = (&ramp * 0.37).sin() * 2.0 + (&ramp * 0.011).cos();
            let probe = (&ramp * 0.73).cos();
            (x, probe)
        };
        let (x, probe) = data();
        let whole = run(&x, &probe, None);
        let (a, b) = two_ranks("bn", move |rank, pg| {
            let (x, probe) = data();
            let (xr, pr) = (
                x.narrow(0, 3 * rank as i64, 3).copy(),
                probe.narrow(0, 3 * rank as i64, 3).copy(),
            );
            let side = run(&xr, &pr, Some(&pg));
            (side.out, side.rm, side.rv, side.gx, side.gw, side.gb)
        });
        let close = |what: &str, got: &Tensor, want: &Tensor| {
            let diff = (got - want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]).max(1.0);
            assert!(diff <= 1e-12 * scale, "{what}: off by {diff:e}");
        };
        close("output", &Tensor::cat(&[&a.0, &b.0], 0), &whole.out);
        for (rank, side) in [(0, &a), (1, &b)] {
            close(&format!("running_mean {rank}"), &side.1, &whole.rm);
            close(&format!("running_var {rank}"), &side.2, &whole.rv);
        }
        close("input gradient", &Tensor::cat(&[&a.3, &b.3], 0), &whole.gx);
        // Weight and bias gradients are the local terms; their sum over ranks is the whole's.
        close("weight gradient", &(&a.4 + &b.4), &whole.gw);
        close("bias gradient", &(&a.5 + &b.5), &whole.gb);
        // The check can fail: one rank's plain BatchNorm is far from the global one.
        let local = run(&x.narrow(0, 0, 3), &probe.narrow(0, 0, 3), None);
        let diff = (&local.out - whole.out.narrow(0, 0, 3))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff > 1e-3,
            "local statistics happen to equal global ones ({diff:e})"
        );
    }
}
