// PyTorch's own c10d for Rust: TCPStore rendezvous, the Gloo process group (always) and the NCCL
// one (with -DCNCLIP_NCCL, i.e. the `nccl` cargo feature), and the four collectives training needs.
//
// Every entry point catches C++ exceptions and returns them as a malloc'd message (null on
// success) that Rust frees with cnclip_c10d_free_error; nothing throws across the FFI boundary.
// A `tch::Tensor`'s pointer is a `torch::Tensor*` here.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <ATen/ATen.h>

#include "shim_error.hpp"

#ifdef CNCLIP_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The stand-in gloo headers (cpp/gloo-stubs) must not change the layout of what we allocate: these
// are the sizes libtorch 2.11.0's own code allocates for these classes (from its disassembly).
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8,
              "ProcessGroupGloo layout differs from libtorch 2.11.0's: check the gloo stand-in headers");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 0xb0,
              "ProcessGroupGloo::Options layout differs from libtorch 2.11.0's");

// c10d's flight recorder (a per-process ring of recent collectives, for debugging hangs) is on by
// default in libtorch 2.11 and its `recordWithResetEnabled` inserts a process group's first status
// into a std::map *before* taking its mutex (FlightRecorderDetail.hpp:93-99). Two process groups of
// one process starting collectives at once (ranks as threads: the workspace's tests, or a user's
// in-process ranks) race on that map and crash (seen: SIGSEGV in _Rb_tree_insert_and_rebalance
// under ProcessGroupGloo::enqueue, ~1 run in 10 of torch-ext's tests on a loaded 2-core machine).
// So it is off unless the user asks for it by either of its variables. This runs while the shim's
// object is loaded, before main and before any thread exists, so setenv races with nothing.
namespace {
const bool kFlightRecorderDefault = [] {
  if (std::getenv("TORCH_FR_BUFFER_SIZE") == nullptr &&
      std::getenv("TORCH_NCCL_TRACE_BUFFER_SIZE") == nullptr) {
    setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
  }
  return true;
}();
}  // namespace

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

using cnclip_shim::copy_message;
using cnclip_shim::tensors_of;

template <typename F>
char* guarded(F&& f) {
  return cnclip_shim::guarded("unknown C++ exception in c10d", std::forward<F>(f));
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("collective did not complete within the timeout");
  }
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::AVG);
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 3:
      return c10d::ReduceOp(c10d::ReduceOp::MIN);
    default:
      throw std::invalid_argument("unknown reduce op");
  }
}

}  // namespace

// For reducer.cpp: the backend behind a group handle (C++ linkage, not part of the C API).
c10::intrusive_ptr<c10d::Backend> cnclip_c10d_backend_of(void* group) {
  return static_cast<Group*>(group)->backend;
}

extern "C" {

void cnclip_c10d_free_error(char* message) { std::free(message); }

int cnclip_c10d_has_nccl() {
#ifdef CNCLIP_NCCL
  return 1;
#else
  return 0;
#endif
}

// A TCPStore client (or, with is_server, the server plus a client) at host:port. The server waits
// up to timeout_ms for world_size - 1 other clients; a client retries connecting for timeout_ms.
char* cnclip_c10d_tcp_store(const char* host, uint16_t port, int64_t world_size, int is_server,
                            int64_t timeout_ms, Store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new Store{tcp};
  });
}

void cnclip_c10d_store_free(Store* store) { delete store; }

// A Gloo process group over `store` (keys under `prefix`). `hostname` is the address this rank's
// Gloo device binds to, `interface` a network interface name; both empty picks libtorch's default
// (this host's resolved name, else loopback), as torch.distributed does.
char* cnclip_c10d_gloo(Store* store, const char* prefix, int rank, int size, int64_t timeout_ms,
                       const char* hostname, const char* interface, Group** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (interface != nullptr && interface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(interface));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
    *out = new Group{backend, timeout};
  });
}

// An NCCL process group; tensors must be on the current CUDA device of this rank.
char* cnclip_c10d_nccl(Store* store, const char* prefix, int rank, int size, int64_t timeout_ms,
                       Group** out) {
#ifdef CNCLIP_NCCL
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, opts);
    *out = new Group{backend, timeout};
  });
#else
  (void)store;
  (void)prefix;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  (void)out;
  return copy_message("this build has no NCCL: rebuild with the `nccl` cargo feature of torch-ext");
#endif
}

void cnclip_c10d_group_free(Group* group) { delete group; }

// In-place all-reduce of `n` tensors (one collective over all of them).
char* cnclip_c10d_all_reduce(Group* group, at::Tensor** tensors, size_t n, int op) {
  return guarded([&] {
    auto list = tensors_of(tensors, n);
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    opts.timeout = group->timeout;
    for (auto& t : list) {
      std::vector<at::Tensor> one{t};
      wait(group->backend->allreduce(one, opts), group->timeout);
    }
  });
}

// In-place broadcast of each tensor from `root`.
char* cnclip_c10d_broadcast(Group* group, at::Tensor** tensors, size_t n, int64_t root) {
  return guarded([&] {
    auto list = tensors_of(tensors, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    for (auto& t : list) {
      std::vector<at::Tensor> one{t};
      wait(group->backend->broadcast(one, opts), group->timeout);
    }
  });
}

// Gathers `input` of every rank into `outputs[0..size)` (preallocated, same shape and dtype).
char* cnclip_c10d_all_gather(Group* group, at::Tensor** outputs, size_t n, at::Tensor* input) {
  return guarded([&] {
    std::vector<std::vector<at::Tensor>> out{tensors_of(outputs, n)};
    std::vector<at::Tensor> in{*input};
    c10d::AllgatherOptions opts;
    opts.timeout = group->timeout;
    wait(group->backend->allgather(out, in, opts), group->timeout);
  });
}

char* cnclip_c10d_barrier(Group* group) {
  return guarded([&] {
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait(group->backend->barrier(opts), group->timeout);
  });
}

}  // extern "C"
