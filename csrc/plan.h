// One step's batch description, in the layout of docs/INTERFACES.md §1.
// Plain vectors (and one shared buffer); py_scheduler hands them to numpy
// without copying.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "page_table_arena.h"

namespace ts {

struct PlanData {
  int64_t step = 0;
  int32_t num_decode = 0;  // rows [0, num_decode): one token each
  int32_t page_table_width = 0;  // P (a multiple of PageTableArena::kWidthAlign)
  double predicted_time_s = 0;   // cost model's estimate for this step
  std::vector<int64_t> rids;          // [B]
  std::vector<int32_t> input_ids;     // [T]; -(r+1): token of row r of the previous plan
  std::vector<int32_t> positions;     // [T]
  std::vector<int32_t> query_start;   // [B+1]
  std::vector<int32_t> prefix_lens;   // [B]
  std::vector<int32_t> seq_lens;      // [B]
  // [B, P] row-major, 0-padded: the first B rows of a shared arena buffer.
  std::shared_ptr<PageTableArena::Buffer> page_table;
  std::vector<int32_t> slot_mapping;  // [T]
  std::vector<int32_t> sample;        // [B]
  // [B]: draft tokens after the row's first token (verify rows follow the
  // plain decodes; their query tokens are the next token and its drafts)
  std::vector<int32_t> num_draft;
  int32_t total_drafts = 0;           // sum of num_draft
};

enum class EventKind : uint8_t { kRunning, kStop, kLength };

struct Event {
  int64_t rid;
  int32_t token;
  EventKind kind;
};

struct Stats {
  int64_t pages_total, pages_used, pages_cached, pages_free;
  int64_t requests_running, requests_waiting;
  int64_t prompt_tokens_total, prefix_cache_hit_tokens_total;
  int64_t generation_tokens_total, preemptions_total, steps_total;
  // speculative decoding: drafts verified, drafts accepted, verify rows
  int64_t spec_draft_tokens_total, spec_accepted_tokens_total, spec_verify_rows_total;
  int64_t pages_pinned;  // part of pages_used: held only by session pins
};

// Where one live request stands (for the dashboard).
struct RequestProgress {
  int64_t rid;
  const char* state;       // "queued" | "prefilling" | "decoding" | "preempted"
  int32_t context_tokens;  // prompt + committed generated tokens
  int32_t cached_tokens;   // prompt tokens the prefix cache supplied at first admission
  int32_t kv_tokens;       // tokens whose KV is written or being written
};

}  // namespace ts
