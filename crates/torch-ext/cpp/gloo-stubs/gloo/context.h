// Stand-in for gloo/context.h: ProcessGroupGloo.hpp holds gloo::Context only through shared_ptr; the
// one member it names (in an inline override the shim never emits: the class's vtable lives in
// libtorch) needs a declaration. See ../README.md.
#pragma once

#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
