// Typestate request FSM.
//
//   Queued --admit--> Prefilling --finish_prefill--> Decoding --finish--> Finished
//                        |  ^                         |  ^
//                 preempt|  |readmit           verify |  | settle
//                        v  |                         v  |
//                      Preempted <--preempt------- Verifying
//                          ^------------------------ Decoding (preempt)
//   any live state --abort--> Aborted;  Preempted --finish--> Finished
//   (a Preempted request may still receive the tokens of a step that was in
//   flight when it was preempted, and they can end it).
//
// Speculative slots: a Decoding request may hold draft tokens proposed for its
// next step. verify() plans the next token and the drafts in one step: the
// Verifying state's KV length counts the drafts' slots, written by a step that
// is not committed yet. settle(accepted) is the only way back: it keeps the
// accepted drafts' slots and hands out the pages that only rejected drafts
// used (Retired::pages), so they return in the commit that rejects them.
//
// Each state is its own type and owns only what is valid in it: Prefilling
// and Decoding own a PageLease; Queued, Preempted, Finished and Aborted have
// no lease member at all, so a transition into them must hand the pages out
// (as Retired::pages) or destroy them -- finishing releases pages by
// construction. A state that owns pages shows them only as a const view plus
// grow(): pages can be added while it runs but never dropped without a
// transition.
//
// What the compiler enforces (tests/csrc/test_compile_fail.py proves each):
//  * An invalid transition does not compile: a state has member functions
//    only for its legal transitions (Queued has no finish(), Finished has no
//    transitions and no lease()).
//  * States and leases cannot be copied (deleted copy constructor/assignment),
//    so two owners of one lease cannot exist.
//  * A running state's lease() is const: releasing, moving out, appending to
//    or splitting off its tail does not compile; grow() is the only way to
//    change it in place, so the pages of rejected drafts leave a Verifying
//    request only through settle().
//  * A Verifying request has no finish(): its accepted tokens are known only
//    once settle() has dropped the rejected slots.
//  * Every transition is an rvalue-qualified (&&) member function: calling one
//    on a named state (an lvalue) does not compile. The only way to transition
//    a state is to spell std::move(state) -- or to call it on a temporary,
//    which cannot be named again. Transitions are [[nodiscard]].
// What it cannot enforce: C++ has no affine types, so writing std::move(s)
// twice on the same object still compiles. The scheduler never keeps a
// moved-from state: it stores each request's state in a std::variant and
// replaces the variant in the same expression that consumes the old state
// (`slot = std::move(std::get<Queued>(slot)).admit(...)`), so no named
// moved-from state exists to be reused. Moved-from states are also left
// empty (no pages, no tokens), so a reuse cannot double-own pages.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "page_pool.h"

namespace ts {

enum class FinishReason { kStop, kLength };

// What a request carries through every state (no KV resources).
struct RequestData {
  int64_t rid = 0;
  std::vector<int32_t> tokens;  // prompt + committed generated tokens
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;
  std::vector<int32_t> stop_ids;
  std::string session;
  int32_t generated = 0;         // committed generated tokens
  int32_t pending = 0;           // sampled in a planned step, not committed
  int64_t last_sample_step = -1;  // step of the latest pending sample
  int32_t last_sample_row = -1;   // its row in that step
  int64_t last_step = -1;         // latest step with a row of this request
  uint64_t admit_seq = 0;        // admission order (newest = largest)
  // Names the page list for the page-table arena, which appends to a row with
  // an unchanged key: renewed on admission and whenever the list loses pages.
  uint64_t table_key = 0;
  bool admitted_once = false;
  int32_t cached_tokens = 0;     // prompt tokens the prefix cache gave at first admission
};

// The state a transition leads to, plus the pages the old state gave up.
template <class State>
struct [[nodiscard]] Retired {
  State state;
  PageLease pages;
};

class Prefilling;
class Decoding;
class Verifying;
class Preempted;
class Finished;
class Aborted;

// Shared shape of every state: move-only, carries RequestData.
class StateBase {
 public:
  const RequestData& data() const { return data_; }
  RequestData& data() { return data_; }
  int64_t rid() const { return data_.rid; }

 protected:
  explicit StateBase(RequestData data) : data_(std::move(data)) {}
  StateBase(StateBase&&) noexcept = default;
  StateBase& operator=(StateBase&&) noexcept = default;
  StateBase(const StateBase&) = delete;
  StateBase& operator=(const StateBase&) = delete;
  ~StateBase() = default;
  RequestData take_data() { return std::exchange(data_, RequestData{}); }

  RequestData data_;
};

class Queued : public StateBase {
 public:
  explicit Queued(RequestData data) : StateBase(std::move(data)) {}
  Queued(Queued&&) noexcept = default;
  Queued& operator=(Queued&&) noexcept = default;

  // `prefix` holds the cached pages covering the first `cached_tokens`.
  [[nodiscard]] Prefilling admit(PageLease&& prefix, int32_t cached_tokens) &&;
  [[nodiscard]] Aborted abort() &&;
};

// A state that owns pages (Prefilling, Decoding). Outside a transition its
// lease can only be read or grown: no page leaves it except through a
// transition that hands the lease out (Retired::pages) or on to the next state.
class LeasedState : public StateBase {
 public:
  const PageLease& lease() const { return lease_; }
  // More pages at the end of the sequence (same pool): what a running request
  // needs as it advances.
  void grow(PageLease&& more) { lease_.append(std::move(more)); }

 protected:
  LeasedState(RequestData data, PageLease&& lease)
      : StateBase(std::move(data)), lease_(std::move(lease)) {}
  LeasedState(LeasedState&&) noexcept = default;
  LeasedState& operator=(LeasedState&&) noexcept = default;
  ~LeasedState() = default;

  PageLease lease_;
};

// Owns the pages of the prompt prefix computed so far; `cursor` counts
// tokens whose KV is written (or is being written by a planned step).
class Prefilling : public LeasedState {
 public:
  Prefilling(RequestData data, PageLease&& lease, int32_t cursor)
      : LeasedState(std::move(data), std::move(lease)), cursor_(cursor) {}
  Prefilling(Prefilling&&) noexcept = default;
  Prefilling& operator=(Prefilling&&) noexcept = default;

  int32_t cursor() const { return cursor_; }
  int32_t target() const { return static_cast<int32_t>(data_.tokens.size()); }
  int32_t remaining() const { return target() - cursor_; }
  bool done() const { return cursor_ >= target(); }
  // In-state progress: a chunk of n tokens was planned.
  void advance(int32_t n) { cursor_ += n; }

  // Precondition done(): the whole prompt is (being) written.
  [[nodiscard]] Decoding finish_prefill() &&;
  [[nodiscard]] Retired<Preempted> preempt() &&;
  [[nodiscard]] Retired<Aborted> abort() &&;

 private:
  int32_t cursor_;
};

// Owns the pages of its whole sequence; kv_len tokens have KV.
class Decoding : public LeasedState {
 public:
  Decoding(RequestData data, PageLease&& lease, int32_t kv_len)
      : LeasedState(std::move(data), std::move(lease)), kv_len_(kv_len) {}
  Decoding(Decoding&&) noexcept = default;
  Decoding& operator=(Decoding&&) noexcept = default;

  int32_t kv_len() const { return kv_len_; }
  void advance(int32_t n) { kv_len_ += n; }
  // Draft tokens proposed to follow the next token (replaced by each proposal;
  // dropped by every transition but verify()).
  const std::vector<int32_t>& drafts() const { return drafts_; }
  void propose(std::vector<int32_t> drafts) { drafts_ = std::move(drafts); }

  // Precondition: drafts() is not empty and the lease covers kv_len + 1 +
  // drafts().size() tokens. Plans the next token and the drafts in one step.
  [[nodiscard]] Verifying verify() &&;
  [[nodiscard]] Retired<Finished> finish(FinishReason reason) &&;
  [[nodiscard]] Retired<Preempted> preempt() &&;
  [[nodiscard]] Retired<Aborted> abort() &&;

 private:
  int32_t kv_len_;
  std::vector<int32_t> drafts_;
};

// A decoding request whose next token and draft chain are in an uncommitted
// step: kv_len counts the drafts' (speculative) slots.
class Verifying : public LeasedState {
 public:
  Verifying(RequestData data, PageLease&& lease, int32_t kv_len, std::vector<int32_t> drafts)
      : LeasedState(std::move(data), std::move(lease)),
        kv_len_(kv_len),
        drafts_(std::move(drafts)) {}
  Verifying(Verifying&&) noexcept = default;
  Verifying& operator=(Verifying&&) noexcept = default;

  int32_t kv_len() const { return kv_len_; }
  // The chain being verified; its slots are the last drafts().size() of kv_len.
  const std::vector<int32_t>& drafts() const { return drafts_; }

  // The verify step committed with the first `accepted` drafts confirmed:
  // back to Decoding without the rejected slots; pages past the kept KV
  // (page_size tokens each) are handed out.
  [[nodiscard]] Retired<Decoding> settle(int32_t accepted, int32_t page_size) &&;
  [[nodiscard]] Retired<Preempted> preempt() &&;
  [[nodiscard]] Retired<Aborted> abort() &&;

 private:
  int32_t kv_len_;
  std::vector<int32_t> drafts_;
};

// Gave its pages back; will recompute tokens (prompt + generated) on readmit.
class Preempted : public StateBase {
 public:
  explicit Preempted(RequestData data) : StateBase(std::move(data)) {}
  Preempted(Preempted&&) noexcept = default;
  Preempted& operator=(Preempted&&) noexcept = default;

  [[nodiscard]] Prefilling readmit(PageLease&& prefix, int32_t cached_tokens) &&;
  [[nodiscard]] Finished finish(FinishReason reason) &&;
  [[nodiscard]] Aborted abort() &&;
};

// Terminal. No lease member, no transitions.
class Finished : public StateBase {
 public:
  Finished(RequestData data, FinishReason reason)
      : StateBase(std::move(data)), reason_(reason) {}
  Finished(Finished&&) noexcept = default;
  Finished& operator=(Finished&&) noexcept = default;
  FinishReason reason() const { return reason_; }

 private:
  FinishReason reason_;
};

// Terminal. No lease member, no transitions.
class Aborted : public StateBase {
 public:
  explicit Aborted(RequestData data) : StateBase(std::move(data)) {}
  Aborted(Aborted&&) noexcept = default;
  Aborted& operator=(Aborted&&) noexcept = default;
};

// ---- transitions (inline: the compile-fail tests include only this header)

inline Prefilling Queued::admit(PageLease&& prefix, int32_t cached_tokens) && {
  return Prefilling(take_data(), std::move(prefix), cached_tokens);
}
inline Aborted Queued::abort() && { return Aborted(take_data()); }

inline Decoding Prefilling::finish_prefill() && {
  if (!done()) throw std::logic_error("finish_prefill before the prompt is done");
  return Decoding(take_data(), std::move(lease_), cursor_);
}
inline Retired<Preempted> Prefilling::preempt() && {
  return {Preempted(take_data()), std::move(lease_)};
}
inline Retired<Aborted> Prefilling::abort() && {
  return {Aborted(take_data()), std::move(lease_)};
}

inline Verifying Decoding::verify() && {
  if (drafts_.empty()) throw std::logic_error("verify without drafts");
  auto k = static_cast<int32_t>(drafts_.size());
  return Verifying(take_data(), std::move(lease_), kv_len_ + 1 + k, std::exchange(drafts_, {}));
}
inline Retired<Finished> Decoding::finish(FinishReason reason) && {
  drafts_.clear();
  return {Finished(take_data(), reason), std::move(lease_)};
}
inline Retired<Preempted> Decoding::preempt() && {
  drafts_.clear();
  return {Preempted(take_data()), std::move(lease_)};
}
inline Retired<Aborted> Decoding::abort() && {
  drafts_.clear();
  return {Aborted(take_data()), std::move(lease_)};
}

inline Retired<Decoding> Verifying::settle(int32_t accepted, int32_t page_size) && {
  auto k = static_cast<int32_t>(drafts_.size());
  if (accepted < 0 || accepted > k) throw std::logic_error("settle: accepted out of range");
  int32_t kv = kv_len_ - (k - accepted);
  PageLease rejected = lease_.take_tail(static_cast<size_t>((kv + page_size - 1) / page_size));
  drafts_.clear();
  return {Decoding(take_data(), std::move(lease_), kv), std::move(rejected)};
}
inline Retired<Preempted> Verifying::preempt() && {
  drafts_.clear();
  return {Preempted(take_data()), std::move(lease_)};
}
inline Retired<Aborted> Verifying::abort() && {
  drafts_.clear();
  return {Aborted(take_data()), std::move(lease_)};
}

inline Prefilling Preempted::readmit(PageLease&& prefix, int32_t cached_tokens) && {
  return Prefilling(take_data(), std::move(prefix), cached_tokens);
}
inline Finished Preempted::finish(FinishReason reason) && {
  return Finished(take_data(), reason);
}
inline Aborted Preempted::abort() && { return Aborted(take_data()); }

}  // namespace ts
