#pragma once
// Stub: only what c10d/ProcessGroupGloo.hpp needs. Never define/instantiate gloo types.
#include <chrono>
#include <memory>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);  // defined in libtorch_cpu
};
namespace transport { class Device; class UnboundBuffer; }
}  // namespace gloo
