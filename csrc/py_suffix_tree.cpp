#include "py_suffix_tree.h"

#include <span>
#include <stdexcept>

namespace ts {
namespace {

std::span<const int32_t> tokens_of(const PySuffixTree::Tokens& a) {
  if (a.ndim() != 1) throw std::invalid_argument("expected a 1-D sequence of token ids");
  return {a.data(), static_cast<size_t>(a.shape(0))};
}

}  // namespace

void PySuffixTree::add(const Tokens& tokens) {
  auto t = tokens_of(tokens);
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  t_.add(t);
}

void PySuffixTree::extend(const Tokens& tokens) {
  auto t = tokens_of(tokens);
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  t_.extend(t);
}

Draft PySuffixTree::propose(const Tokens& context, int32_t max_draft, float min_prob,
                            float tokens_per_match) const {
  if (max_draft < 0) throw std::invalid_argument("propose: max_draft must be >= 0");
  if (!(min_prob >= 0.0f && min_prob <= 1.0f)) {
    throw std::invalid_argument("propose: min_prob must be in [0, 1]");
  }
  if (!(tokens_per_match > 0.0f)) {
    throw std::invalid_argument("propose: tokens_per_match must be > 0");
  }
  auto c = tokens_of(context);
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  return t_.propose(c, DraftParams{.max_draft = max_draft,
                                   .min_prob = min_prob,
                                   .tokens_per_match = tokens_per_match});
}

// Cheap reads: the lock without dropping the GIL (no Python call happens inside).
int64_t PySuffixTree::num_tokens() const {
  std::lock_guard lock(mu_);
  return t_.num_tokens();
}

int32_t PySuffixTree::num_sequences() const {
  std::lock_guard lock(mu_);
  return t_.num_sequences();
}

int64_t PySuffixTree::open_length() const {
  std::lock_guard lock(mu_);
  return t_.open_length();
}

int32_t PySuffixTree::num_nodes() const {
  std::lock_guard lock(mu_);
  return t_.num_nodes();
}

int64_t PySuffixTree::memory_bytes() const {
  std::lock_guard lock(mu_);
  return static_cast<int64_t>(t_.memory_bytes());
}

void PySuffixTree::check_invariants() const {
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  try {
    t_.check_invariants();
  } catch (const std::logic_error& e) {
    throw std::runtime_error(e.what());  // RuntimeError in Python
  }
}

}  // namespace ts
