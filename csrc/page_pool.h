// KV page pool and move-only page leases.
//
// The pool owns `num_pages` page ids and a reference count per page. Every
// reference is held by exactly one PageLease; a lease gives its references back
// in its destructor (RAII), so a page can only be leaked by leaking a lease.
// Leases cannot be copied (copying would double-own pages): the copy
// constructor and copy assignment are deleted, which tests/csrc prove with a
// compile-fail case.
//
// A page the prefix cache has marked `cached` is not freed when its count
// drops to 0: it becomes "idle" and the IdleObserver (the cache) decides when
// to evict it. Uncached pages go straight back to the free list.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace ts {

using PageId = int32_t;

// Told about cached pages changing between idle (no lease) and busy.
class IdleObserver {
 public:
  virtual ~IdleObserver() = default;
  virtual void on_idle(PageId page) = 0;  // refcount 1 -> 0 on a cached page
  virtual void on_busy(PageId page) = 0;  // refcount 0 -> 1 on a cached page
};

class PageLease;

class PagePool {
 public:
  explicit PagePool(int32_t num_pages);
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  int32_t num_pages() const { return static_cast<int32_t>(ref_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t refcount(PageId page) const { return ref_[page]; }
  bool is_cached(PageId page) const { return cached_[page] != 0; }
  std::span<const PageId> free_list() const { return free_; }

  // An empty lease bound to this pool, to grow with allocate_into/retain_into.
  PageLease empty_lease();
  // Appends n fresh pages to `lease`; all or nothing. False if too few free.
  bool allocate_into(PageLease& lease, int32_t n);
  // Adds one more reference to a page that is live or cached (sharing).
  void retain_into(PageLease& lease, PageId page);

  // Prefix-cache marks. Uncaching an idle page returns it to the free list.
  void set_cached(PageId page, bool cached);
  void set_observer(IdleObserver* observer) { observer_ = observer; }

 private:
  friend class PageLease;
  void release(PageId page);

  std::vector<int32_t> ref_;
  std::vector<uint8_t> cached_;
  std::vector<PageId> free_;
  IdleObserver* observer_ = nullptr;
};

// Owns one reference to each page it lists, in sequence order.
class PageLease {
 public:
  PageLease() = default;
  PageLease(const PageLease&) = delete;
  PageLease& operator=(const PageLease&) = delete;
  PageLease(PageLease&& other) noexcept;
  PageLease& operator=(PageLease&& other) noexcept;
  ~PageLease() { release_all(); }

  std::span<const PageId> pages() const { return pages_; }
  const PageId* data() const { return pages_.data(); }
  size_t size() const { return pages_.size(); }
  bool empty() const { return pages_.empty(); }
  PageId operator[](size_t i) const { return pages_[i]; }

  // Gives every reference back now (the destructor does the same).
  void release_all();
  // Moves the references of `other` (same pool) to the end of this lease.
  void append(PageLease&& other);
  // Moves the pages after the first `keep` into a new lease (same pool): the
  // tail a shortened sequence no longer needs.
  [[nodiscard]] PageLease take_tail(size_t keep);

 private:
  friend class PagePool;
  explicit PageLease(PagePool* pool) : pool_(pool) {}

  PagePool* pool_ = nullptr;
  std::vector<PageId> pages_;
};

}  // namespace ts
