// Prefix cache over full KV pages, keyed by chained page hashes.
//
// The key of page i of a sequence hashes (key of page i-1, tokens of page i),
// so one hash lookup per page walks the longest cached prefix. Each node keeps
// its tokens and parent, so a hash collision can never hand out wrong KV.
// Nodes form a tree (a page's parent is the previous page of the sequence);
// only leaves are evicted, so every cached chain stays reachable from the root.
//
// Pages are shared through the pool's reference counts: a cached page with no
// lease is "idle"; idle leaves sit in an LRU set ordered by last use and are
// evicted from the oldest when the pool runs short.
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "page_pool.h"

namespace ts {

class PrefixCache final : public IdleObserver {
 public:
  PrefixCache(PagePool& pool, int32_t page_size);
  ~PrefixCache() override;
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Retains the longest cached chain of full pages that prefixes `tokens`, at
  // most `max_pages` of them, into a new lease (marking them recently used).
  PageLease match(std::span<const int32_t> tokens, size_t max_pages);
  // Records pages[i] as holding tokens[i*ps, (i+1)*ps) for every full page.
  // `pages` must be held by the caller. Where a position is already cached
  // under a different page (the caller's copy is a duplicate) it stops, unless
  // past_duplicates (the caller lets go of its pages now): then the later
  // pages are recorded under the cached one.
  void insert(std::span<const int32_t> tokens, std::span<const PageId> pages,
              bool past_duplicates = false);
  // Evicts up to n idle leaf pages, least recently used first.
  int32_t evict(int32_t n);

  int32_t num_cached() const { return num_nodes_; }
  int32_t num_idle() const { return num_idle_; }
  int32_t num_evictable() const { return static_cast<int32_t>(lru_.size()); }
  // Throws std::logic_error when the tree, LRU set and pool disagree.
  void check_invariants() const;

  void on_idle(PageId page) override;
  void on_busy(PageId page) override;

 private:
  struct Node {
    bool live = false;
    bool in_lru = false;
    uint64_t key = 0;
    PageId parent = -1;
    int32_t children = 0;
    uint64_t tick = 0;
    std::vector<int32_t> tokens;
  };
  using LruKey = std::pair<uint64_t, PageId>;

  uint64_t page_key(uint64_t parent_key, std::span<const int32_t> page) const;
  // The cached page for (parent, tokens), or -1.
  PageId find(uint64_t key, PageId parent, std::span<const int32_t> page) const;
  void touch(PageId page);
  void lru_add(PageId page);
  void lru_remove(PageId page);
  void remove_node(PageId page);
  bool idle(PageId page) const { return pool_.refcount(page) == 0; }

  PagePool& pool_;
  int32_t page_size_;
  std::vector<Node> nodes_;  // indexed by page id
  std::unordered_multimap<uint64_t, PageId> by_key_;
  std::set<LruKey> lru_;  // idle leaves by (last use, page)
  uint64_t clock_ = 0;
  int32_t num_nodes_ = 0;
  int32_t num_idle_ = 0;
};

}  // namespace ts
