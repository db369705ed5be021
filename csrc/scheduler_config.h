// Scheduler configuration (plain values; validated once at construction).
//
// The settings a user chooses have no default here: their one default lives in
// appliance/config.py (YAML `scheduler:` and `kv:`), and the engine passes every
// one. Build this struct with designated initializers naming every field; the
// build's -Werror=missing-field-initializers turns a forgotten one into a
// compile error (tests/csrc/test_compile_fail.py proves it). Knobs that are
// internal to the C++ policy carry their single default here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ts {

struct SchedulerConfig {
  // KV pool geometry: sized by the model runner from YAML `kv:`.
  int32_t num_pages;
  int32_t page_size;
  // Batch policy: YAML `scheduler:`.
  int32_t max_batch_tokens;  // tokens per step, decodes + prefill
  int32_t max_running;       // admitted (prefilling + decoding) requests
  double tps_floor;          // decode tokens/s each running user keeps; 0 = off
  double session_ttl_s;      // pin of a finished session turn's pages; 0 = no retention
  // Longest sequence (prompt + max_new_tokens): the model's context length.
  int32_t max_seq_len;
  // Internal knob: prefill progress per step even at the floor.
  static constexpr int32_t kDefaultMinPrefillChunk = 64;
  int32_t min_prefill_chunk = kDefaultMinPrefillChunk;

  void validate() const {
    auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
    if (num_pages <= 0) fail("num_pages must be > 0");
    if (page_size <= 0) fail("page_size must be > 0");
    if (max_batch_tokens <= 0) fail("max_batch_tokens must be > 0");
    if (max_running <= 0) fail("max_running must be > 0");
    if (!(tps_floor >= 0)) fail("tps_floor must be >= 0 (0 = off)");
    if (!(session_ttl_s >= 0)) fail("session_ttl_s must be >= 0 (0 = no retention)");
    if (max_seq_len <= 0) fail("max_seq_len must be > 0");
    if (min_prefill_chunk <= 0) fail("min_prefill_chunk must be > 0");
  }
};

}  // namespace ts
