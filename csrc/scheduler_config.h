// Scheduler configuration (plain values; validated once at construction).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ts {

struct SchedulerConfig {
  int32_t num_pages = 512;
  int32_t page_size = 16;
  int32_t max_batch_tokens = 2048;  // tokens per step, decodes + prefill
  int32_t max_running = 256;        // admitted (prefilling + decoding) requests
  double tps_floor = 70.0;          // decode tokens/s each running user keeps; 0 = off
  double session_ttl_s = 30.0;      // pin of a finished session turn's pages
  int32_t max_seq_len = 131072;     // prompt + max_new_tokens
  int32_t min_prefill_chunk = 64;   // prefill progress per step even at the floor

  void validate() const {
    auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
    if (num_pages <= 0) fail("num_pages must be > 0");
    if (page_size <= 0) fail("page_size must be > 0");
    if (max_batch_tokens <= 0) fail("max_batch_tokens must be > 0");
    if (max_running <= 0) fail("max_running must be > 0");
    if (!(tps_floor >= 0)) fail("tps_floor must be >= 0");
    if (!(session_ttl_s >= 0)) fail("session_ttl_s must be >= 0");
    if (max_seq_len <= 0) fail("max_seq_len must be > 0");
    if (min_prefill_chunk <= 0) fail("min_prefill_chunk must be > 0");
  }
};

}  // namespace ts
