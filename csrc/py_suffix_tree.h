// The Python-facing adapter of SuffixTree: int32 numpy in, plain lists out, GIL released
// around tree work. Kept apart from bindings.cpp so that file is only `.def`s.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <mutex>

#include "suffix_tree.h"

namespace ts {

namespace py = pybind11;

// Calls are serialized by `mu_`, taken after the GIL is dropped (never while holding it).
class PySuffixTree {
 public:
  using Tokens = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

  PySuffixTree(int32_t max_depth, int64_t max_tokens) : t_(max_depth, max_tokens) {}
  void add(const Tokens& tokens);
  void extend(const Tokens& tokens);
  Draft propose(const Tokens& context, int32_t max_draft, float min_prob,
                float tokens_per_match) const;
  int32_t max_depth() const { return t_.max_depth(); }
  int64_t max_tokens() const { return t_.max_tokens(); }
  int64_t num_tokens() const;
  int32_t num_sequences() const;
  int64_t open_length() const;
  int32_t num_nodes() const;
  int64_t memory_bytes() const;
  void check_invariants() const;

 private:
  mutable std::mutex mu_;
  SuffixTree t_;
};

}  // namespace ts
