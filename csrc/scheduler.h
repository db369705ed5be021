// The batch scheduler: admission, chunked prefill, decode-first batching
// under a TPS floor, preemption by recompute, abort, one-step overlap, and
// speculative verify rows (a decode plus its draft tokens).
//
// Ownership: every KV page reference lives in exactly one PageLease, held by
// a Prefilling/Decoding request state, a session pin, or the "graveyard" of an
// in-flight step (pages of requests that left while a planned but uncommitted
// step still reads them; released when that step commits).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "clock.h"
#include "cost_model.h"
#include "page_pool.h"
#include "page_table_arena.h"
#include "plan.h"
#include "prefix_cache.h"
#include "request_state.h"
#include "scheduler_config.h"
#include "session_table.h"

namespace ts {

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& cfg);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Throws std::invalid_argument on bad input or a duplicate live rid.
  void submit(int64_t rid, std::span<const int32_t> prompt, int32_t max_new_tokens,
              std::span<const int32_t> stop_ids, const std::string& session);
  // Draft tokens to verify after `rid`'s next token in the next plan. Taken
  // only from a decoding request whose tokens are all committed, at most
  // max_new_tokens - generated - 1 of them; returns how many were kept (the
  // plan may verify fewer: budget, pages). Throws on a negative token id.
  int32_t set_drafts(int64_t rid, std::span<const int32_t> drafts);
  // The next step, or nullopt when nothing can run.
  std::optional<PlanData> plan();
  // Applies the oldest uncommitted step. `tokens` has one entry per logits
  // row: B + total_drafts, row b's 1 + num_draft[b] entries in row order.
  // `counts[b]` (empty: 1 each) is how many of row b's entries it emits: its
  // accepted drafts (which must equal the drafts) plus one more token.
  std::vector<Event> commit(int64_t step, std::span<const int32_t> tokens,
                            std::span<const int32_t> counts, double step_time_s);
  bool abort(int64_t rid);
  // Drops the session pins past their TTL (plan() does it too; an idle engine plans nothing).
  void expire_sessions() { sessions_.expire(clock_.now()); }
  Stats stats() const;
  // Prompt tokens the prefix cache supplied when `rid` was first admitted (what
  // prefix_cache_hit_tokens_total counted for it); nullopt while it is unknown
  // or still queued.
  std::optional<int32_t> cached_tokens(int64_t rid) const;
  std::vector<RequestProgress> progress() const;  // every live request, in rid order

  // Debug/test hooks.
  void check_invariants() const;  // throws std::logic_error
  int32_t evict_cache();          // evicts every evictable cached page
  void set_test_clock(double now_s) { clock_.set(now_s); }
  void clear_test_clock() { clock_.clear(); }
  const CostModel& cost_model() const { return cost_; }
  void set_cost_model(const CostModel& m) { cost_ = m; }
  size_t inflight_steps() const { return inflight_.size(); }
  std::string state_name(int64_t rid) const;
  const SchedulerConfig& config() const { return cfg_; }

 private:
  using State = std::variant<Queued, Prefilling, Decoding, Verifying, Preempted>;
  struct Entry {
    explicit Entry(State s) : state(std::move(s)) {}
    State state;
    uint64_t serial = 0;  // distinguishes a reused rid from its predecessor
  };
  // What a row's sampled token is for (commit treats the two kinds apart).
  enum class Sample : uint8_t {
    kNone,          // a non-final prefill chunk: nothing sampled
    kDecode,        // the next token of a decoding request
    kAfterPrefill,  // the first token, after the prompt's final chunk
    kVerify,        // the next token of a decoding request and its drafts
  };
  struct Row {  // one row of the plan being built
    Entry* entry;
    int32_t prefix;       // tokens already in KV
    int32_t count;        // new tokens this step (1 + drafts for kVerify)
    Sample sample;
    int32_t placeholder;  // input id for a still-pending token
  };
  struct InFlight {
    int64_t step;
    std::vector<int64_t> rids;
    std::vector<uint64_t> serials;
    std::vector<Sample> sample;
    std::vector<int32_t> num_draft;  // [B]
    std::vector<int32_t> drafts;     // every row's drafts, concatenated
    StepFeatures features;
    double credit_charged_s = 0;  // what planning it added to the floor credit
    std::vector<PageLease> graveyard;
    int32_t graveyard_pages = 0;  // sole-owner pages the graveyard will free
  };
  // How far obtain_pages may go when the pool is short.
  enum class Reclaim {
    kIdleCacheOnly,  // evict idle cached pages, else wait (draft slots)
    kIdlePins,       // also drop pins of sessions between turns (prefill chunks)
    kMayPreempt,     // also preempt newer requests, then drop pins handed to a queued turn
  };
  // Fresh pages for a prefill chunk and the tokens they let it run.
  struct Chunk {
    PageLease pages;
    int32_t tokens;
  };

  static RequestData& data_of(Entry& e);
  static const RequestData& data_of(const Entry& e);

  // How long the step being planned may take, and whether its first prefill
  // gets at least min_prefill_chunk (scheduler.cpp: the TPS floor). Decided
  // at the step's first prefill chunk, which it depends on (chunk_tokens).
  struct StepTarget {
    double time_s;
    bool progress;
    bool hold = false;  // no chunk this step: decode-only steps save for one (the credit)
  };

  // plan() phases
  void plan_decodes(std::vector<Row>& rows, int32_t& budget);
  int32_t verify_drafts(Decoding& dec, int32_t budget);
  void plan_prefills(std::vector<Row>& rows, int32_t& budget, StepFeatures& f,
                     StepTarget& target);
  void plan_admissions(std::vector<Row>& rows, int32_t& budget, StepFeatures& f,
                       double running_kv, StepTarget& target);
  void add_prefill_row(std::vector<Row>& rows, Entry* e, int32_t n, StepFeatures& f);
  void mark_sample(RequestData& d, size_t row);
  Chunk grow_chunk(int32_t have, int32_t cursor, int32_t n, uint64_t seq, Reclaim reclaim);
  int32_t pages_for(int64_t tokens) const {
    return static_cast<int32_t>((tokens + cfg_.page_size - 1) / cfg_.page_size);
  }
  static const PageLease& lease_of(const Entry& e);
  void pin_session(const RequestData& d);
  int64_t pinned_only_pages() const;
  StepTarget step_target(const StepFeatures& decodes, int32_t prefix, int32_t tokens) const;
  // alone: the decodes' predicted time; fixed: what any chunk adds (step_target)
  bool smooth_keeps_pace(double alone, double fixed, double smooth, int32_t prefix,
                         int32_t tokens) const;
  double chunk_fit(double avail, int32_t prefix) const;
  int32_t chunk_tokens(int32_t remaining, int32_t prefix, int32_t budget,
                       const StepFeatures& f, bool first_prefill, StepTarget& target) const;
  bool admission_keeps_floor(const RequestData& d, double running_kv) const;
  bool decodable(const RequestData& d) const;
  PlanData materialize(const std::vector<Row>& rows, int32_t num_decode,
                       const StepFeatures& f);

  // page supply
  bool obtain_pages(PageLease& lease, int32_t n, uint64_t requester_seq, Reclaim reclaim);
  bool preempt_newer_than(uint64_t requester_seq);
  void retire(RequestData& d, PageLease&& pages, int32_t kv_len);
  bool in_flight(const RequestData& d) const;

  void finish_entry(Entry& e, FinishReason reason);
  void share_prompt(Entry& e);
  void remove_running(Entry* e);
  void remove_waiting(int64_t rid);
  double floor_step_time() const;
  double max_floor_credit() const;
  double update_floor_credit(double predicted_s);
  void settle_floor_credit(double charged_s, double measured_s);

  SchedulerConfig cfg_;
  PagePool pool_;
  PrefixCache cache_;
  CostModel cost_;
  SessionTable sessions_;
  Clock clock_;
  PageTableArena page_tables_;

  std::unordered_map<int64_t, std::unique_ptr<Entry>> requests_;
  std::deque<int64_t> waiting_;  // front is next; preempted requests go first
  std::vector<Entry*> running_;  // admission order: oldest first
  std::deque<InFlight> inflight_;
  int32_t graveyard_pages_ = 0;

  // Seconds the decode rows have run ahead of the floor (steps faster than its
  // target), within +-max_floor_credit(): what a prefill step may spend at once.
  double floor_credit_s_ = 0;
  int64_t next_step_ = 0;
  uint64_t next_admit_seq_ = 1;
  uint64_t next_table_key_ = 1;
  uint64_t next_serial_ = 1;

  int64_t prompt_tokens_total_ = 0;
  int64_t prefix_hit_tokens_total_ = 0;
  int64_t generation_tokens_total_ = 0;
  int64_t preemptions_total_ = 0;
  int64_t steps_total_ = 0;
  int64_t spec_draft_tokens_total_ = 0;
  int64_t spec_accepted_tokens_total_ = 0;
  int64_t spec_verify_rows_total_ = 0;
};

}  // namespace ts
