//! torch's multi-tensor AdamW update (what `torch.optim.AdamW` runs for CUDA parameters by
//! default), which tch does not expose: one pass of fused kernels over every tensor of a parameter
//! group, instead of several kernel launches per tensor. On a GPU the per-tensor path spends a
//! noticeable share of a training step launching kernels.

use std::ffi::c_void;
use tch::Tensor;

unsafe extern "C" {
    fn cnclip_adamw_foreach(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        bias_correction1: f64,
        bias_correction2_sqrt: f64,
    ) -> i32;
    fn cnclip_adamw_single(
        param: *mut c_void,
        grad: *mut c_void,
        exp_avg: *mut c_void,
        exp_avg_sq: *mut c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        bias_correction1: f64,
        bias_correction2_sqrt: f64,
    ) -> i32;
}

/// One AdamW step's constants for a parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `1 − β1^t`.
    pub bias_correction1: f64,
    /// `sqrt(1 − β2^t)`.
    pub bias_correction2_sqrt: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForeachError {
    #[error("foreach AdamW needs equally many params, grads and moments (got {0:?})")]
    Lengths([usize; 4]),
    #[error("libtorch rejected the foreach AdamW update (mixed devices or dtypes in one group?)")]
    Torch,
}

/// Updates one parameter and its moments in place from `grad`, as torch's `_single_tensor_adam`
/// (torch.optim.AdamW's default for CPU parameters) with decoupled weight decay. Unlike a sequence
/// of tch calls, `addcmul_`/`addcdiv_` get their scalar `value`, so fp16/bf16 tensors (cn_clip's
/// `--precision fp16`) are rounded exactly where torch rounds them.
pub fn adamw_single(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    step: AdamWStep,
) -> Result<(), ForeachError> {
    let handle = |t: &Tensor| t.as_ptr() as *mut c_void;
    // SAFETY: four valid `torch::Tensor*` that live across the call; the shim only reads through
    // them (updates go to the shared storage) and catches every C++ exception.
    let status = unsafe {
        cnclip_adamw_single(
            handle(param),
            handle(grad),
            handle(exp_avg),
            handle(exp_avg_sq),
            step.lr,
            step.beta1,
            step.beta2,
            step.eps,
            step.weight_decay,
            step.bias_correction1,
            step.bias_correction2_sqrt,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(ForeachError::Torch)
    }
}

/// Updates `params`, `exp_avgs` and `exp_avg_sqs` in place from `grads`, as torch's
/// `_multi_tensor_adam` with decoupled weight decay.
pub fn adamw_foreach(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: AdamWStep,
) -> Result<(), ForeachError> {
    let lengths = [params.len(), grads.len(), exp_avgs.len(), exp_avg_sqs.len()];
    if lengths.iter().any(|&l| l != params.len()) {
        return Err(ForeachError::Lengths(lengths));
    }
    // tch's C tensor handle is a `torch::Tensor*`; the shim only reads through these pointers
    // (updates go to the shared tensor storage), and every handle outlives the call.
    let handles = |ts: &[Tensor]| {
        ts.iter()
            .map(|t| t.as_ptr() as *mut c_void)
            .collect::<Vec<_>>()
    };
    let (mut p, mut g, mut m, mut v) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
    );
    // SAFETY: four arrays of `params.len()` valid `torch::Tensor*` that live across the call; the
    // shim catches every C++ exception.
    let status = unsafe {
        cnclip_adamw_foreach(
            p.as_mut_ptr(),
            g.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            params.len(),
            step.lr,
            step.beta1,
            step.beta2,
            step.eps,
            step.weight_decay,
            step.bias_correction1,
            step.bias_correction2_sqrt,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(ForeachError::Torch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The single-tensor update is torch's per-parameter path; on the CPU the foreach kernels fall
    /// back to the same per-tensor ops, so both must agree bit for bit, in fp32 and in fp16 (where
    /// the scalar `value` of addcmul_/addcdiv_ is applied in fp32 before the one rounding).
    #[test]
    fn single_equals_foreach_in_fp32_and_fp16() {
        for kind in [Kind::Float, Kind::Half] {
            tch::manual_seed(1);
            let make = || Tensor::randn([7, 5], (Kind::Float, Device::Cpu)).to_kind(kind);
            let (param, grad, m, v) = (make(), make() * 1e-3, make() * 1e-4, make().abs() * 1e-7);
            let (p2, m2, v2, before) = (param.copy(), m.copy(), v.copy(), param.copy());
            let step = AdamWStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.1,
                bias_correction1: 1.0 - 0.9f64.powf(2.0),
                bias_correction2_sqrt: (1.0 - 0.98f64.powf(2.0)).sqrt(),
            };
            adamw_single(&param, &grad, &m, &v, step).unwrap();
            adamw_foreach(
                &[p2.shallow_clone()],
                &[grad.shallow_clone()],
                &[m2.shallow_clone()],
                &[v2.shallow_clone()],
                step,
            )
            .unwrap();
            assert_eq!(param.kind(), kind);
            assert!(param.equal(&p2) && m.equal(&m2) && v.equal(&v2), "{kind:?}");
            assert!(!param.equal(&before), "nothing moved");
        }
    }

    /// On the CPU the foreach kernels fall back to per-tensor ops with the same arithmetic, so the
    /// result must equal a hand-written single-tensor update exactly.
    #[test]
    fn foreach_equals_the_per_tensor_update() {
        tch::manual_seed(0);
        let shapes: [&[i64]; 3] = [&[5], &[3, 4], &[2, 2, 2]];
        let make = || {
            shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect::<Vec<_>>()
        };
        let (params, grads, m, v) = (
            make(),
            make(),
            make(),
            make().into_iter().map(|t| t.abs()).collect::<Vec<_>>(),
        );
        let copies = |ts: &[Tensor]| ts.iter().map(|t| t.copy()).collect::<Vec<_>>();
        let (p2, m2, v2) = (copies(&params), copies(&m), copies(&v));
        let step = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
            bias_correction1: 1.0 - 0.9f64.powf(3.0),
            bias_correction2_sqrt: (1.0 - 0.98f64.powf(3.0)).sqrt(),
        };
        adamw_foreach(&params, &grads, &m, &v, step).unwrap();
        for i in 0..3 {
            let (mut p, mut mi, mut vi) = (
                p2[i].shallow_clone(),
                m2[i].shallow_clone(),
                v2[i].shallow_clone(),
            );
            let g = &grads[i];
            let _ = p.g_mul_scalar_(1.0 - step.lr * step.weight_decay);
            let _ = mi.lerp_(g, 1.0 - step.beta1);
            let _ = vi
                .g_mul_scalar_(step.beta2)
                .addcmul_(&(g * (1.0 - step.beta2)), g);
            let denom = vi.sqrt() / step.bias_correction2_sqrt + step.eps;
            let _ = p.addcdiv_(&(&mi * -(step.lr / step.bias_correction1)), &denom);
            assert!(params[i].equal(&p), "param {i}");
            assert!(m[i].equal(&mi) && v[i].equal(&vi), "moments {i}");
        }
        assert_eq!(
            adamw_foreach(&params[..2], &grads, &m, &v, step),
            Err(ForeachError::Lengths([2, 3, 3, 3]))
        );
    }
}
