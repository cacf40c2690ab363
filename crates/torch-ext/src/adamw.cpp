// torch's multi-tensor ("foreach") AdamW update, the path torch.optim.AdamW takes by default for
// CUDA parameters: a handful of fused kernels over all tensors instead of ~8 kernels per tensor.
// The sequence of operations follows torch/optim/adam.py `_multi_tensor_adam` (decoupled weight
// decay, not capturable, no amsgrad). Exceptions never cross into Rust.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_addcdiv.h>
#include <ATen/ops/_foreach_addcmul.h>
#include <ATen/ops/_foreach_div.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_sqrt.h>

#include <vector>

namespace {
std::vector<at::Tensor> gather(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}
}  // namespace

extern "C" int cnclip_adamw_foreach(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                                    at::Tensor** exp_avg_sqs, size_t n, double lr, double beta1,
                                    double beta2, double eps, double weight_decay,
                                    double bias_correction1, double bias_correction2_sqrt) {
  try {
    if (n == 0) return 0;
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    if (weight_decay != 0) at::_foreach_mul_(p, at::Scalar(1 - lr * weight_decay));
    at::_foreach_lerp_(m, g, at::Scalar(1 - beta1));
    at::_foreach_mul_(v, at::Scalar(beta2));
    at::_foreach_addcmul_(v, g, g, at::Scalar(1 - beta2));
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, at::Scalar(bias_correction2_sqrt));
    at::_foreach_add_(denom, at::Scalar(eps));
    at::_foreach_addcdiv_(p, m, denom, at::Scalar(-(lr / bias_correction1)));
    return 0;
  } catch (...) {
    return -1;
  }
}

// torch's single-tensor AdamW update, the path torch.optim.AdamW takes by default for CPU parameters:
// the operations of torch/optim/adam.py `_single_tensor_adam` (decoupled weight decay, not capturable,
// no amsgrad) on one parameter. `addcmul_`/`addcdiv_` take their `value` here, which tch cannot pass:
// for fp16 and bf16 tensors the kernels multiply by it in fp32 and round once, so pre-scaling a
// tensor instead would round one more time than torch does (for fp32 tensors both are the same).
extern "C" int cnclip_adamw_single(at::Tensor* param, at::Tensor* grad, at::Tensor* exp_avg,
                                   at::Tensor* exp_avg_sq, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, double bias_correction1,
                                   double bias_correction2_sqrt) {
  try {
    if (weight_decay != 0) param->mul_(at::Scalar(1 - lr * weight_decay));
    exp_avg->lerp_(*grad, at::Scalar(1 - beta1));
    exp_avg_sq->mul_(at::Scalar(beta2)).addcmul_(*grad, *grad, at::Scalar(1 - beta2));
    auto denom = exp_avg_sq->sqrt().div(at::Scalar(bias_correction2_sqrt)).add_(at::Scalar(eps));
    param->addcdiv_(*exp_avg, denom, at::Scalar(-(lr / bias_correction1)));
    return 0;
  } catch (...) {
    return -1;
  }
}
