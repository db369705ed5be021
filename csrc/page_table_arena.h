// Reusable page-table buffers for the plan's [B, P] page_table.
//
// Rebuilding the table from scratch costs O(B*P) per step (0.5 MB at 256
// requests x 8K tokens), yet between decode steps a row changes only by one
// appended page every page_size steps. So buffers are kept in a small ring and
// a buffer that nobody references any more (its numpy array was freed) is
// updated in place: a row whose owner is unchanged gets only its new pages
// appended; a row that changed owner is rewritten. P is rounded up to a
// multiple of kWidthAlign pages (padding is 0, as the contract allows) so the
// width -- and with it the layout -- changes rarely.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "page_pool.h"

namespace ts {

class PageTableArena {
 public:
  static constexpr int32_t kWidthAlign = 16;
  static constexpr size_t kRing = 4;

  struct Buffer {
    std::vector<int32_t> data;       // rows x width, row-major
    int32_t width = 0;               // P
    std::vector<uint64_t> row_key;   // owner of each row (admission id; 0 = none)
    std::vector<int32_t> row_pages;  // pages written in each row; the rest are 0
    uint64_t last_used = 0;
  };

  static int32_t aligned_width(int32_t pages) {
    return (pages + kWidthAlign - 1) / kWidthAlign * kWidthAlign;
  }
  // A buffer of at least `rows` rows and exactly `width` columns that no one
  // else references (so it may be written).
  std::shared_ptr<Buffer> acquire(size_t rows, int32_t width);
  // Makes row `row` hold pages[0:n] followed by zeros; `key` identifies the
  // owner's page list, which only ever grows at the end while its key stays
  // the same (a list that loses pages gets a new key).
  static void write_row(Buffer& b, size_t row, uint64_t key, const PageId* pages, int32_t n);

 private:
  std::vector<std::shared_ptr<Buffer>> ring_;
  uint64_t clock_ = 0;
};

}  // namespace ts
