// The Python-facing adapter: numpy in/out, GIL released around C++ work.
// Kept apart from bindings.cpp so that file is only `.def`s.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <mutex>
#include <optional>
#include <string>

#include "scheduler.h"

namespace ts {

namespace py = pybind11;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// The GIL is released around scheduler calls, so the adapter serializes them
// itself: every method takes `mu_` (after dropping the GIL, never before, so a
// thread waiting for the lock never holds the GIL).
//
// A step's batch as numpy arrays (INTERFACES.md §1).
struct PyPlan {
  int64_t step = 0;
  int32_t num_decode = 0;
  double predicted_time_s = 0;
  py::array rids, input_ids, positions, query_start, prefix_lens, seq_lens;
  py::array page_table, slot_mapping, sample, num_draft;
  int32_t total_drafts = 0;
  int64_t num_rows() const { return rids.shape(0); }
  int64_t num_tokens() const { return input_ids.shape(0); }
  std::string repr() const;
};

class PyScheduler {
 public:
  explicit PyScheduler(const SchedulerConfig& cfg) : s_(cfg) {}
  void submit(int64_t rid, const I32Array& prompt, int32_t max_new_tokens,
              const I32Array& stop_ids, const std::string& session);
  int32_t set_drafts(int64_t rid, const I32Array& drafts);
  std::optional<PyPlan> plan();
  py::list commit(int64_t step, const I32Array& tokens, double step_time_s,
                  const std::optional<I32Array>& counts);
  bool abort(int64_t rid);
  void expire_sessions();
  py::dict stats() const;
  std::optional<int32_t> cached_tokens(int64_t rid) const;
  py::list progress() const;
  void check_invariants() const;
  int32_t evict_cache();
  void set_test_clock(double now_s);
  void clear_test_clock();
  py::tuple cost_coeffs() const;
  // f (the extra fixed cost of a step that is not plain decode) defaults to 0.
  void set_cost_prior(double a, double b, double c, double d, double e,
                      std::optional<double> f, std::optional<double> g);
  std::string state(int64_t rid) const;
  int64_t inflight_steps() const;
  const SchedulerConfig& config() const { return s_.config(); }

 private:
  mutable std::mutex mu_;
  Scheduler s_;
};

std::string config_repr(const SchedulerConfig& c);

}  // namespace ts
