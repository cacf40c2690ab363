// torch's own DDP engine for Rust: c10d::Reducer (torch/csrc/distributed/c10d/reducer.hpp), the
// object torch.nn.parallel.DistributedDataParallel drives from Python, over a process group the
// c10d shim (c10d.cpp) built. The Reducer registers post-hooks on every parameter's gradient
// accumulator; tch's backward runs the same autograd engine, so the hooks fire during backward
// and each bucket's all-reduce starts as soon as its gradients are ready.
//
// As in c10d.cpp, every entry point catches C++ exceptions and returns them as a malloc'd message
// (null on success) that Rust frees with cnclip_c10d_free_error.

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/default_comm_hooks.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <ATen/ATen.h>

#include "shim_error.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

// Defined in c10d.cpp: the backend behind a group handle and whether it is NCCL.
c10::intrusive_ptr<c10d::Backend> cnclip_c10d_backend_of(void* group);

namespace {

using cnclip_shim::copy_message;
using cnclip_shim::tensors_of;

template <typename F>
char* guarded(F&& f) {
  return cnclip_shim::guarded("unknown C++ exception in the c10d reducer", std::forward<F>(f));
}

// What torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook does (that
// hook exists in Python only; its fp16 sibling is the built-in FP16_COMPRESS): cast the bucket to
// bf16, divide by the world size, all-reduce (sum), and write the result back into the bucket.
class Bf16CompressHook
    : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  explicit Bf16CompressHook(const c10::intrusive_ptr<c10d::ProcessGroup>& state)
      : c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>>(state) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    at::Tensor buffer = bucket.getBufferRef();
    at::Tensor compressed = buffer.to(at::kBFloat16).div_(state_->getSize());
    std::vector<at::Tensor> tensors = {compressed};
    auto fut = state_->allreduce(tensors)->getFuture();
    auto decompress = [buffer](c10::ivalue::Future& done) {
      const auto& value = done.value();
      at::Tensor reduced =
          value.isTensor() ? value.toTensor() : value.toTensorVector().at(0);
      buffer.copy_(reduced);
      return c10::IValue(buffer);
    };
    return fut->then(decompress, c10::TensorType::get());
  }
};

// A c10d::ProcessGroup (what the Reducer and comm.hpp take) around the shim group's backend.
c10::intrusive_ptr<c10d::ProcessGroup> process_group_of(void* group, int nccl) {
  auto backend = cnclip_c10d_backend_of(group);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(backend->getRank(), backend->getSize());
  auto type = nccl != 0 ? c10d::ProcessGroup::BackendType::NCCL
                        : c10d::ProcessGroup::BackendType::GLOO;
  pg->setBackend(nccl != 0 ? c10::DeviceType::CUDA : c10::DeviceType::CPU, type, backend);
  pg->setDefaultBackend(type);
  return pg;
}

}  // namespace

struct CnclipReducer {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  std::unique_ptr<c10d::Reducer> reducer;
};

extern "C" {

// torch's bucket assignment (dist._compute_bucket_assignment_by_size): consecutive tensors of one
// dtype and device, a new bucket once the current one reaches the current limit (limits[i] for the
// i-th bucket, the last one for all later). Writes each tensor's bucket index into `bucket_of`.
char* cnclip_reducer_bucket_assignment(at::Tensor** tensors, size_t n, const int64_t* limits,
                                       size_t n_limits, int64_t* bucket_of) {
  return guarded([&] {
    std::vector<size_t> sizes;
    for (size_t i = 0; i < n_limits; ++i) {
      sizes.push_back(static_cast<size_t>(limits[i]));
    }
    auto buckets = std::get<0>(c10d::compute_bucket_assignment_by_size(tensors_of(tensors, n), sizes));
    for (size_t b = 0; b < buckets.size(); ++b) {
      for (size_t index : buckets[b]) {
        bucket_of[index] = static_cast<int64_t>(b);
      }
    }
  });
}

// What DistributedDataParallel's constructor does before building its reducer:
// verify_params_across_processes (every rank has the same number of parameters with the same
// shapes and dtypes, else an error naming the mismatch), then _sync_module_states: rank 0's
// parameters and buffers broadcast in coalesced chunks of `buffer_size` bytes (torch: 250 MiB).
char* cnclip_reducer_sync_module_states(void* group, int nccl, at::Tensor** params, size_t n_params,
                                        at::Tensor** states, size_t n_states,
                                        int64_t buffer_size) {
  return guarded([&] {
    // The parameters are leaves that require grad: overwrite them outside autograd.
    at::NoGradGuard no_grad;
    auto pg = process_group_of(group, nccl);
    c10d::verify_params_across_processes(pg, tensors_of(params, n_params), std::nullopt);
    auto list = tensors_of(states, n_states);
    if (!list.empty()) {
      c10d::broadcast_coalesced(pg, list, static_cast<size_t>(buffer_size), 0);
    }
  });
}

// A Reducer over `params` (leaves requiring grad, in model order) as DistributedDataParallel's
// constructor builds it: `first_limits` is the bucket assignment of the first iteration (torch: one
// unbounded bucket, or [first_bucket_bytes, bucket_bytes] with find_unused_parameters), buckets in
// reverse order; later iterations rebuild with [first_bucket_bytes, bucket_bytes] in the order the
// gradients became ready. hook: 0 none (all-reduce sum, divided by the world size while copying
// into the bucket), 1 fp16 (built-in FP16_COMPRESS), 2 bf16 (Bf16CompressHook above).
char* cnclip_reducer_new(void* group, int nccl, at::Tensor** params, size_t n,
                         const int64_t* first_limits, size_t n_first_limits, int64_t bucket_bytes,
                         int64_t first_bucket_bytes, int find_unused, int grad_as_bucket_view,
                         int hook, CnclipReducer** out) {
  return guarded([&] {
    auto pg = process_group_of(group, nccl);
    auto list = tensors_of(params, n);
    std::vector<size_t> limits;
    for (size_t i = 0; i < n_first_limits; ++i) {
      limits.push_back(static_cast<size_t>(first_limits[i]));
    }
    auto buckets = std::get<0>(c10d::compute_bucket_assignment_by_size(list, limits));
    std::reverse(buckets.begin(), buckets.end());
    std::unordered_map<size_t, std::string> names;
    auto state = std::make_unique<CnclipReducer>();
    state->group = pg;
    state->reducer = std::make_unique<c10d::Reducer>(
        list, buckets, pg, std::vector<bool>(n, false), bucket_bytes, find_unused != 0,
        grad_as_bucket_view != 0, names, first_bucket_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::vector<int64_t>{});
    switch (hook) {
      case 0:
        break;
      case 1:
        state->reducer->register_builtin_comm_hook(c10d::BuiltinCommHookType::FP16_COMPRESS);
        break;
      case 2:
        state->reducer->register_comm_hook(std::make_unique<Bf16CompressHook>(pg));
        break;
      default:
        throw std::invalid_argument("unknown comm hook");
    }
    *out = state.release();
  });
}

void cnclip_reducer_free(CnclipReducer* reducer) {
  // ~Reducer removes its autograd hooks; it may throw (noexcept(false)) only on a broken
  // invariant, which must not cross the FFI boundary.
  try {
    delete reducer;
  } catch (...) {
  }
}

// What DistributedDataParallel.forward does around the module's forward, for a backward that is
// about to run: rebuild the buckets once after the first synchronised iteration (every
// backward with grad, as torch's _pre_forward), and, when this backward synchronises (not under
// no_sync), prepare_for_forward + prepare_for_backward(outputs) (outputs: the tensors whose graph
// is searched for unused parameters when find_unused_parameters is on).
char* cnclip_reducer_prepare(CnclipReducer* r, int sync, at::Tensor** outputs, size_t n) {
  return guarded([&] {
    if (sync != 0) {
      r->reducer->prepare_for_forward();
    }
    r->reducer->rebuild_buckets();
    if (sync != 0) {
      r->reducer->prepare_for_backward(tensors_of(outputs, n));
    }
  });
}

// Fails unless the reduction of the last synchronised backward has finished (every bucket
// all-reduced and copied back), e.g. because a parameter got no gradient without
// find_unused_parameters.
char* cnclip_reducer_check_finalized(CnclipReducer* r) {
  return guarded([&] { r->reducer->check_finalized(); });
}

// The current buckets in the order they are all-reduced: each one's number of parameters and
// bytes, into `counts`/`bytes` (room for `cap`); `n_out` receives the number of buckets.
char* cnclip_reducer_buckets(CnclipReducer* r, int64_t* counts, int64_t* bytes, size_t cap,
                             size_t* n_out) {
  return guarded([&] {
    auto buckets = r->reducer->get_grad_buckets(/*return_zero_tensors=*/true);
    *n_out = buckets.size();
    for (size_t b = 0; b < buckets.size() && b < cap; ++b) {
      const auto& buffer = buckets[b].getBuffer();
      counts[b] = static_cast<int64_t>(buckets[b].getParameters().size());
      bytes[b] = static_cast<int64_t>(buffer.numel() * buffer.element_size());
    }
  });
}

}  // extern "C"
