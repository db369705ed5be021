#include "prefix_cache.h"

#include <algorithm>
#include <stdexcept>

namespace ts {
namespace {

constexpr uint64_t kRootKey = 0x9e3779b97f4a7c15ULL;

// splitmix64 finalizer: cheap, well mixed; collisions are re-checked anyway.
inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

PrefixCache::PrefixCache(PagePool& pool, int32_t page_size)
    : pool_(pool), page_size_(page_size), nodes_(pool.num_pages()) {
  pool_.set_observer(this);
}

PrefixCache::~PrefixCache() { pool_.set_observer(nullptr); }

uint64_t PrefixCache::page_key(uint64_t parent_key,
                               std::span<const int32_t> page) const {
  uint64_t h = mix(parent_key);
  for (int32_t t : page) h = mix(h ^ static_cast<uint32_t>(t));
  return h;
}

PageId PrefixCache::find(uint64_t key, PageId parent,
                         std::span<const int32_t> page) const {
  auto [lo, hi] = by_key_.equal_range(key);
  for (auto it = lo; it != hi; ++it) {
    const Node& n = nodes_[it->second];
    if (n.parent == parent &&
        std::equal(page.begin(), page.end(), n.tokens.begin(), n.tokens.end()))
      return it->second;
  }
  return -1;
}

PageLease PrefixCache::match(std::span<const int32_t> tokens, size_t max_pages) {
  PageLease lease = pool_.empty_lease();
  uint64_t key = kRootKey;
  PageId parent = -1;
  size_t full = tokens.size() / page_size_;
  for (size_t i = 0; i < full && i < max_pages; ++i) {
    auto page = tokens.subspan(i * page_size_, page_size_);
    key = page_key(key, page);
    PageId p = find(key, parent, page);
    if (p < 0) break;
    pool_.retain_into(lease, p);  // busy now: leaves the LRU set
    touch(p);
    parent = p;
  }
  return lease;
}

void PrefixCache::insert(std::span<const int32_t> tokens,
                         std::span<const PageId> pages, bool past_duplicates) {
  uint64_t key = kRootKey;
  PageId parent = -1;
  size_t full = std::min(tokens.size() / page_size_, pages.size());
  for (size_t i = 0; i < full; ++i) {
    auto page = tokens.subspan(i * page_size_, page_size_);
    key = page_key(key, page);
    PageId p = find(key, parent, page);
    // Cached under another page: this sequence computed a duplicate (two
    // requests prefilled the same system prompt at once). Its later pages go on
    // under the cached one, whose content is the same: stopping here left every
    // page after an agent's shared system prompt out of the cache. The cached
    // page may be idle above this sequence's busy ones: it has children, so it
    // leaves the LRU set until they are evicted, after their holder lets go:
    // only for a holder about to let go (a running one could wait for pages
    // that only its own children keep from eviction).
    if (p >= 0 && p != pages[i] && !past_duplicates) return;
    if (p < 0) {
      p = pages[i];
      // A page already cached elsewhere cannot hold this content: stop.
      if (nodes_[p].live) return;
      Node& n = nodes_[p];
      n = Node{true, false, key, parent, 0, 0, {page.begin(), page.end()}};
      by_key_.emplace(key, p);
      pool_.set_cached(p, true);
      ++num_nodes_;
      if (parent >= 0 && nodes_[parent].children++ == 0) lru_remove(parent);
      if (idle(p)) ++num_idle_;  // (never: the caller's lease holds pages[i])
    }
    touch(p);
    parent = p;
  }
}

void PrefixCache::touch(PageId page) {
  Node& n = nodes_[page];
  bool was = n.in_lru;
  if (was) lru_remove(page);
  n.tick = ++clock_;
  if (was) lru_add(page);
}

void PrefixCache::lru_add(PageId page) {
  Node& n = nodes_[page];
  if (n.in_lru || n.children > 0 || !idle(page)) return;
  lru_.emplace(n.tick, page);
  n.in_lru = true;
}

void PrefixCache::lru_remove(PageId page) {
  Node& n = nodes_[page];
  if (!n.in_lru) return;
  lru_.erase({n.tick, page});
  n.in_lru = false;
}

void PrefixCache::on_idle(PageId page) {
  ++num_idle_;
  lru_add(page);
}

void PrefixCache::on_busy(PageId page) {
  --num_idle_;
  lru_remove(page);
}

void PrefixCache::remove_node(PageId page) {
  Node& n = nodes_[page];
  auto [lo, hi] = by_key_.equal_range(n.key);
  for (auto it = lo; it != hi; ++it) {
    if (it->second == page) {
      by_key_.erase(it);
      break;
    }
  }
  PageId parent = n.parent;
  n = Node{};
  --num_nodes_;
  --num_idle_;
  pool_.set_cached(page, false);  // idle, so it goes to the free list
  if (parent >= 0 && --nodes_[parent].children == 0) lru_add(parent);
}

int32_t PrefixCache::evict(int32_t n) {
  int32_t done = 0;
  while (done < n && !lru_.empty()) {
    PageId p = lru_.begin()->second;
    lru_remove(p);
    remove_node(p);
    ++done;
  }
  return done;
}

void PrefixCache::check_invariants() const {
  int32_t nodes = 0, idle_count = 0, lru_count = 0;
  std::vector<int32_t> children(nodes_.size(), 0);
  for (size_t p = 0; p < nodes_.size(); ++p) {
    const Node& n = nodes_[p];
    PageId page = static_cast<PageId>(p);
    if (n.live != pool_.is_cached(page))
      throw std::logic_error("cache node and pool cached mark disagree");
    if (!n.live) continue;
    ++nodes;
    if (idle(page)) ++idle_count;
    if (n.parent >= 0) {
      if (!nodes_[n.parent].live) throw std::logic_error("cache node orphaned");
      ++children[n.parent];
    }
    if (static_cast<int32_t>(n.tokens.size()) != page_size_)
      throw std::logic_error("cache node with a partial page");
  }
  for (size_t p = 0; p < nodes_.size(); ++p) {
    const Node& n = nodes_[p];
    if (!n.live) continue;
    if (children[p] != n.children) throw std::logic_error("child count wrong");
    bool should = n.children == 0 && idle(static_cast<PageId>(p));
    if (should != n.in_lru) throw std::logic_error("LRU set membership wrong");
    if (n.in_lru) ++lru_count;
  }
  if (nodes != num_nodes_) throw std::logic_error("cache node count wrong");
  if (idle_count != num_idle_) throw std::logic_error("idle count wrong");
  if (lru_count != static_cast<int32_t>(lru_.size()))
    throw std::logic_error("LRU set size wrong");
  if (by_key_.size() != static_cast<size_t>(nodes))
    throw std::logic_error("hash index size wrong");
}

}  // namespace ts
