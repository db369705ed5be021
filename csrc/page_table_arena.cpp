#include "page_table_arena.h"

#include <algorithm>
#include <cstring>

namespace ts {

std::shared_ptr<PageTableArena::Buffer> PageTableArena::acquire(size_t rows, int32_t width) {
  // Prefer the free buffer written most recently: it needs the fewest updates.
  std::shared_ptr<Buffer>* pick = nullptr;
  for (auto& b : ring_)
    if (b.use_count() == 1 && (!pick || b->last_used > (*pick)->last_used)) pick = &b;
  if (!pick) {
    if (ring_.size() < kRing) {
      ring_.push_back(std::make_shared<Buffer>());
      pick = &ring_.back();
    } else {  // all held by Python: replace the stalest; its owner keeps it alive
      pick = &*std::min_element(ring_.begin(), ring_.end(), [](const auto& a, const auto& b) {
        return a->last_used < b->last_used;
      });
      *pick = std::make_shared<Buffer>();
    }
  }
  Buffer& b = **pick;
  if (b.width != width || b.row_key.size() < rows) {
    size_t cap = std::max(rows, b.row_key.size());
    b.width = width;
    b.data.assign(cap * static_cast<size_t>(width), 0);
    b.row_key.assign(cap, 0);
    b.row_pages.assign(cap, 0);
  }
  b.last_used = ++clock_;
  return *pick;
}

void PageTableArena::write_row(Buffer& b, size_t row, uint64_t key, const PageId* pages,
                               int32_t n) {
  int32_t* r = b.data.data() + row * static_cast<size_t>(b.width);
  int32_t have = b.row_pages[row];
  int32_t from = b.row_key[row] == key ? std::min(have, n) : 0;
  if (n > from) std::memcpy(r + from, pages + from, sizeof(int32_t) * (n - from));
  if (have > n) std::memset(r + n, 0, sizeof(int32_t) * (have - n));
  b.row_key[row] = key;
  b.row_pages[row] = n;
}

}  // namespace ts
