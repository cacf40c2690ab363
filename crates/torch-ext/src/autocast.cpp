// C entry points for libtorch's autocast state, which tch does not expose beyond CUDA fp16.
// Every function catches C++ exceptions: nothing may unwind into Rust.
#include <ATen/autocast_mode.h>

namespace {
c10::DeviceType device_type(int device) {
  return device == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}
c10::ScalarType scalar_type(int dtype) {
  return dtype == 1 ? c10::ScalarType::BFloat16 : c10::ScalarType::Half;
}
}  // namespace

extern "C" {

// Returns 0 on success, -1 if libtorch threw.
int cnclip_autocast_set(int device, int enabled, int dtype) {
  try {
    at::autocast::set_autocast_dtype(device_type(device), scalar_type(dtype));
    at::autocast::set_autocast_enabled(device_type(device), enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 enabled, 0 disabled, -1 error.
int cnclip_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// 0 half, 1 bfloat16, 2 other, -1 error.
int cnclip_autocast_dtype(int device) {
  try {
    auto t = at::autocast::get_autocast_dtype(device_type(device));
    if (t == c10::ScalarType::Half) return 0;
    if (t == c10::ScalarType::BFloat16) return 1;
    return 2;
  } catch (...) {
    return -1;
  }
}

int cnclip_autocast_increment_nesting() {
  try {
    return at::autocast::increment_nesting();
  } catch (...) {
    return -1;
  }
}

// Clears the cast-weight cache when the outermost autocast region ends, as Python's context does.
int cnclip_autocast_decrement_nesting() {
  try {
    int depth = at::autocast::decrement_nesting();
    if (depth == 0) at::autocast::clear_cache();
    return depth;
  } catch (...) {
    return -1;
  }
}
}
