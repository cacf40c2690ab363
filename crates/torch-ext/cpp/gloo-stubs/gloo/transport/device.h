// Stand-in for gloo/transport/device.h: devices and unbound buffers appear in ProcessGroupGloo.hpp
// only behind shared_ptr/unique_ptr members of classes the shim never instantiates. See ../../README.md.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
