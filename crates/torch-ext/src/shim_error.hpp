// Error marshalling shared by the C++ shims (c10d.cpp, reducer.cpp, sync_bn.cpp): no C++
// exception crosses the FFI boundary; an entry point returns null on success or a malloc'd,
// NUL-terminated message that Rust frees with the shim's free_error function (std::free).

#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

namespace cnclip_shim {

// A malloc'd copy of `what` (null if out of memory).
inline char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

// Runs `f`; returns null if it returned, else the message of what it threw (`unknown` for
// anything that is not a std::exception).
template <typename F>
char* guarded(const char* unknown, F&& f) {
  try {
    std::forward<F>(f)();
    return nullptr;
  } catch (const c10::Error& e) {
    // what() of a c10::Error carries a C++ backtrace; the message alone is what users need.
    return copy_message(e.msg().c_str());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message(unknown);
  }
}

// The tensors behind an array of `n` `tch::Tensor` pointers (each a `torch::Tensor*` here).
inline std::vector<at::Tensor> tensors_of(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

}  // namespace cnclip_shim
