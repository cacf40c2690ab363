// Stand-in for gloo/rendezvous/store.h. ProcessGroupGloo::GlooStore derives from this class and marks
// four methods `override`, so they must exist and be virtual; the shim never instantiates GlooStore
// (libtorch's own code does, with the real class), so only the declarations matter. See ../../README.md.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {

class Store {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::seconds(30);

  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};

} // namespace rendezvous
} // namespace gloo
