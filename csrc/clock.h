// Monotonic seconds, with an override so tests can move time by hand.
#pragma once

#include <chrono>
#include <optional>

namespace ts {

class Clock {
 public:
  double now() const {
    if (fixed_) return *fixed_;
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
  }
  void set(double now_s) { fixed_ = now_s; }
  void clear() { fixed_.reset(); }

 private:
  std::optional<double> fixed_;
};

}  // namespace ts
