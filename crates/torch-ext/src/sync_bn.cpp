// Synchronised BatchNorm for training forwards: torch.nn.SyncBatchNorm's autograd function
// (torch/nn/modules/_functions.py `SyncBatchNorm`) written with portable ATen ops, so that it also
// runs on CPU tensors over Gloo (torch's own refuses CPU input: its statistics kernels
// batch_norm_stats/… are CUDA-only).
//
// Forward: every rank's per-channel [Σx, Σx², n] (from a local var_mean, combined in double) is
// summed over the process group; the input is normalised with the global mean and biased variance
// and the running statistics are updated with the global unbiased variance. Backward: the local
// Σdy and Σdy·(x−μ) are summed over the group (torch's batch_norm_backward_reduce + all_reduce),
// so the input gradient is the one a single process computes on the concatenated batch; weight
// and bias get the local sums, which data-parallel training then all-reduces like any gradient.
//
// The collective is a callback into Rust (torch-ext's `dist::ProcessGroup`), so this file needs
// no c10d types. The callback context is owned by the autograd graph (a Capsule in the node's
// saved data) and released through `release` when the last reference goes. Exceptions never cross
// into Rust: errors come back as malloc'd messages.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim_error.hpp"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Sums `tensor` in place over the process group behind `ctx`. Returns 0 on success, else writes a
// NUL-terminated message of at most `len` bytes to `message`.
typedef int (*cnclip_sync_bn_reduce_fn)(void* ctx, at::Tensor* tensor, char* message, size_t len);
typedef void (*cnclip_sync_bn_release_fn)(void* ctx);
}

namespace {

struct Comm : torch::CustomClassHolder {
  Comm(void* ctx, cnclip_sync_bn_reduce_fn reduce, cnclip_sync_bn_release_fn release)
      : ctx(ctx), reduce(reduce), release(release) {}
  ~Comm() override { release(ctx); }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  void all_reduce(at::Tensor& tensor) const {
    char message[1024] = {0};
    if (reduce(ctx, &tensor, message, sizeof(message)) != 0) {
      message[sizeof(message) - 1] = '\0';
      throw std::runtime_error(std::string("SyncBatchNorm all_reduce failed: ") + message);
    }
  }

  void* ctx;
  cnclip_sync_bn_reduce_fn reduce;
  cnclip_sync_bn_release_fn release;
};

// Half and bfloat16 inputs are normalised in float, as libtorch's batch_norm accumulates them.
at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

std::vector<int64_t> reduced_dims(const at::Tensor& x) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d != 1) dims.push_back(d);
  }
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, double momentum, double eps,
                            c10::intrusive_ptr<Comm> comm) {
    auto x = input.contiguous();
    const auto acc = acc_type(x.scalar_type());
    const int64_t channels = x.size(1);
    const auto dims = reduced_dims(x);
    const auto shape = channel_shape(x);
    auto xa = x.scalar_type() == acc ? x : x.to(acc);
    // Local moments (Welford in var_mean), combined over ranks in double: Σx = n·μ and
    // Σx² = n·(σ² + μ²) lose nothing that matters to the subtraction below at double precision.
    auto local = at::var_mean(xa, dims, /*correction=*/0, /*keepdim=*/false);
    auto var = std::get<0>(local).to(at::kDouble);
    auto mean = std::get<1>(local).to(at::kDouble);
    const double n = static_cast<double>(x.numel() / channels);
    auto stats = at::cat({mean * n, (var + mean * mean) * n,
                          at::full({1}, n, mean.options())});
    comm->all_reduce(stats);
    const double count = stats[2 * channels].item<double>();
    if (count < 2) {
      throw std::invalid_argument(
          "SyncBatchNorm: expected more than 1 value per channel in the global batch when training");
    }
    auto global_mean = stats.narrow(0, 0, channels) / count;
    auto global_var = (stats.narrow(0, channels, channels) / count - global_mean * global_mean)
                          .clamp_min(0.0);  // ≥ 0 in exact arithmetic; rounding can dip below
    auto invstd = (global_var + eps).rsqrt();
    if (running_mean.defined()) {
      running_mean.mul_(1.0 - momentum).add_(global_mean.to(running_mean.scalar_type()), momentum);
    }
    if (running_var.defined()) {
      auto unbiased = global_var * (count / (count - 1.0));
      running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
    }
    auto mean_a = global_mean.to(acc);
    auto invstd_a = invstd.to(acc);
    auto w = weight.to(acc);
    auto out = (xa - mean_a.view(shape)) * (invstd_a * w).view(shape) + bias.to(acc).view(shape);
    ctx->save_for_backward({x, weight, mean_a, invstd_a});
    ctx->saved_data["count"] = count;
    ctx->saved_data["comm"] = c10::IValue::make_capsule(comm);
    return out.to(x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto& mean = saved[2];
    const auto& invstd = saved[3];
    const double count = ctx->saved_data["count"].toDouble();
    auto comm = c10::static_intrusive_pointer_cast<Comm>(ctx->saved_data["comm"].toCapsule());
    const auto acc = mean.scalar_type();
    const int64_t channels = x.size(1);
    const auto dims = reduced_dims(x);
    const auto shape = channel_shape(x);
    auto dy = grad_outputs[0].contiguous().to(acc);
    auto xmu = x.to(acc) - mean.view(shape);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      auto combined = at::cat({sum_dy, sum_dy_xmu});
      comm->all_reduce(combined);
      auto mean_dy = combined.narrow(0, 0, channels) / count;
      auto mean_dy_xmu = combined.narrow(0, channels, channels) / count;
      grad_input = (dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)) *
                   (invstd * weight.to(acc)).view(shape);
      grad_input = grad_input.to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) grad_weight = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (ctx->needs_input_grad(2)) grad_bias = sum_dy.to(weight.scalar_type());
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),  at::Tensor()};
  }
};

using cnclip_shim::copy_message;

}  // namespace

extern "C" {

void cnclip_sync_bn_free_error(char* message) { std::free(message); }

// `weight`, `bias`, `running_mean`, `running_var`: [C] tensors (the statistics may be null). The
// callback context is released exactly once, whether or not this call succeeds.
char* cnclip_sync_batch_norm(at::Tensor* input, at::Tensor* weight, at::Tensor* bias,
                             at::Tensor* running_mean, at::Tensor* running_var, double momentum,
                             double eps, void* ctx, cnclip_sync_bn_reduce_fn reduce,
                             cnclip_sync_bn_release_fn release, at::Tensor** out) {
  c10::intrusive_ptr<Comm> comm;
  try {
    comm = c10::make_intrusive<Comm>(ctx, reduce, release);
  } catch (...) {
    release(ctx);
    return copy_message("SyncBatchNorm: out of memory");
  }
  return cnclip_shim::guarded("unknown C++ exception in SyncBatchNorm", [&] {
    if (input->dim() < 2) {
      throw std::invalid_argument("SyncBatchNorm: input needs a channel dimension (dim >= 2)");
    }
    at::Tensor rm = running_mean != nullptr ? *running_mean : at::Tensor();
    at::Tensor rv = running_var != nullptr ? *running_var : at::Tensor();
    auto result = SyncBatchNorm::apply(*input, *weight, *bias, rm, rv, momentum, eps,
                                       std::move(comm));
    *out = new at::Tensor(std::move(result));
  });
}

}  // extern "C"
