#include "page_pool.h"

#include <stdexcept>
#include <utility>

namespace ts {

PagePool::PagePool(int32_t num_pages) {
  if (num_pages <= 0) throw std::invalid_argument("num_pages must be > 0");
  ref_.assign(num_pages, 0);
  cached_.assign(num_pages, 0);
  free_.reserve(num_pages);
  // Pushed in reverse so allocation hands out low page ids first (readable).
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

PageLease PagePool::empty_lease() { return PageLease(this); }

bool PagePool::allocate_into(PageLease& lease, int32_t n) {
  if (n < 0 || n > num_free()) return false;
  if (lease.pool_ == nullptr) lease.pool_ = this;
  if (lease.pool_ != this) throw std::logic_error("lease of another pool");
  lease.pages_.reserve(lease.pages_.size() + n);
  for (int32_t i = 0; i < n; ++i) {
    PageId p = free_.back();
    free_.pop_back();
    ref_[p] = 1;
    lease.pages_.push_back(p);
  }
  return true;
}

void PagePool::retain_into(PageLease& lease, PageId page) {
  if (lease.pool_ == nullptr) lease.pool_ = this;
  if (lease.pool_ != this) throw std::logic_error("lease of another pool");
  // Only live pages or idle cached pages may be shared; a free page is not.
  if (ref_[page] == 0 && !cached_[page])
    throw std::logic_error("retain of a free page");
  if (ref_[page]++ == 0 && observer_) observer_->on_busy(page);
  lease.pages_.push_back(page);
}

void PagePool::set_cached(PageId page, bool cached) {
  bool was = cached_[page] != 0;
  cached_[page] = cached ? 1 : 0;
  if (was && !cached && ref_[page] == 0) free_.push_back(page);
}

void PagePool::release(PageId page) {
  if (ref_[page] <= 0) throw std::logic_error("double release of a page");
  if (--ref_[page] > 0) return;
  if (cached_[page]) {
    if (observer_) observer_->on_idle(page);
  } else {
    free_.push_back(page);
  }
}

PageLease::PageLease(PageLease&& other) noexcept
    : pool_(other.pool_), pages_(std::move(other.pages_)) {
  other.pages_.clear();
}

PageLease& PageLease::operator=(PageLease&& other) noexcept {
  if (this != &other) {
    release_all();
    pool_ = other.pool_;
    pages_ = std::move(other.pages_);
    other.pages_.clear();
  }
  return *this;
}

void PageLease::release_all() {
  // Release in reverse so the tail of a sequence (the least shared pages)
  // reaches the cache's idle list before the shared head.
  for (auto it = pages_.rbegin(); it != pages_.rend(); ++it) pool_->release(*it);
  pages_.clear();
}

void PageLease::append(PageLease&& other) {
  if (other.pages_.empty()) return;
  if (pool_ == nullptr) pool_ = other.pool_;
  if (pool_ != other.pool_) throw std::logic_error("lease of another pool");
  pages_.insert(pages_.end(), other.pages_.begin(), other.pages_.end());
  other.pages_.clear();
}

PageLease PageLease::take_tail(size_t keep) {
  PageLease tail(pool_);
  if (keep < pages_.size()) {
    tail.pages_.assign(pages_.begin() + static_cast<std::ptrdiff_t>(keep), pages_.end());
    pages_.resize(keep);
  }
  return tail;
}

}  // namespace ts
