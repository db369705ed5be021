// Agent-aware retention: pins of finished session turns.
//
// An agent's next turn usually arrives after a tool call of seconds to
// minutes. When a turn of session S finishes, the pages of its cached chain
// are pinned by a lease held here (so LRU cannot evict them) until
// session_ttl_s later. When the next request of S is submitted the pin is
// handed to it and kept until that request is admitted (it then holds the
// pages itself) or aborted -- so the pages cannot be lost while it queues.
// A pin only outranks the idle cache: work that is short of pages drops idle
// pins before it preempts anyone (Scheduler::obtain_pages).
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>

#include "page_pool.h"

namespace ts {

class SessionTable {
 public:
  // Replaces any earlier pin of `session`.
  void pin(const std::string& session, PageLease&& lease, double expiry_s) {
    pins_[session] = Pin{std::move(lease), expiry_s, std::nullopt};
  }
  // A new request of `session` arrived: keep its pin until `rid` admits.
  void hand_off(const std::string& session, int64_t rid) {
    auto it = pins_.find(session);
    if (it != pins_.end()) it->second.handoff_rid = rid;
  }
  // `rid` was admitted or aborted: its session pin has done its job.
  void release_handoff(const std::string& session, int64_t rid) {
    auto it = pins_.find(session);
    if (it != pins_.end() && it->second.handoff_rid == rid) pins_.erase(it);
  }
  void expire(double now_s) {
    for (auto it = pins_.begin(); it != pins_.end();) {
      if (!it->second.handoff_rid && it->second.expiry_s <= now_s)
        it = pins_.erase(it);
      else
        ++it;
    }
  }
  // Under page pressure: drops the idle pin (no next turn waiting on it) that
  // expires first; with `handed_off_too`, a handed-off pin once no idle one is
  // left. False when there is none to drop.
  bool drop_one(bool handed_off_too) {
    auto victim = pins_.end();
    for (auto it = pins_.begin(); it != pins_.end(); ++it) {
      if (victim == pins_.end() || rank(it->second) < rank(victim->second)) victim = it;
    }
    if (victim == pins_.end() || (victim->second.handoff_rid && !handed_off_too)) return false;
    pins_.erase(victim);
    return true;
  }
  size_t size() const { return pins_.size(); }
  template <class F>
  void for_each_lease(F&& f) const {
    for (const auto& [name, p] : pins_) f(p.lease);
  }

 private:
  struct Pin {
    PageLease lease;
    double expiry_s;
    std::optional<int64_t> handoff_rid;
  };
  static double rank(const Pin& p) {
    return p.handoff_rid ? std::numeric_limits<double>::infinity() : p.expiry_s;
  }
  std::map<std::string, Pin> pins_;
};

}  // namespace ts
