#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace ts {
namespace {

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

bool contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& cfg)
    : cfg_((cfg.validate(), cfg)), pool_(cfg.num_pages), cache_(pool_, cfg.page_size) {}

RequestData& Scheduler::data_of(Entry& e) {
  return std::visit([](auto& s) -> RequestData& { return s.data(); }, e.state);
}
const RequestData& Scheduler::data_of(const Entry& e) {
  return std::visit([](const auto& s) -> const RequestData& { return s.data(); }, e.state);
}

const PageLease& Scheduler::lease_of(const Entry& e) {
  if (auto* p = std::get_if<Prefilling>(&e.state)) return p->lease();
  if (auto* d = std::get_if<Decoding>(&e.state)) return d->lease();
  if (auto* v = std::get_if<Verifying>(&e.state)) return v->lease();
  throw std::logic_error("lease_of: request holds no pages in this state");
}

// The step-time target. 5% headroom absorbs the cost model's fitting error
// (it is a linear fit of a machine that is not exactly linear). When even a
// lone decode cannot meet the floor (a slow machine, a tiny CPU model), no
// user can have it: the policy then just maximizes throughput (infinite
// target) instead of serializing requests for nothing.
double Scheduler::floor_step_time() const {
  constexpr double kHeadroom = 0.95;
  constexpr double kNone = std::numeric_limits<double>::infinity();
  if (cfg_.tps_floor <= 0) return kNone;
  double limit = kHeadroom / cfg_.tps_floor;
  StepFeatures lone;
  lone.decode_tokens = 1;
  return cost_.predict(lone) > limit ? kNone : limit;
}

// The floor is a rate: a user keeps it if its tokens come at least that fast on
// average, not in every single step. A step with prefill pays a fixed cost a
// plain decode step does not (on a GPU its kernels launch one by one, ~30 ms
// for an 8B model, where a decode step replays a graph in 5 ms); when that
// alone overshoots the target, a chunk every step would break the floor every
// step for a few tokens each. So the time decode steps run under the target is
// saved (at most kCreditSteps targets) and spent at once on one large chunk.
double Scheduler::max_floor_credit() const {
  constexpr double kCreditSteps = 4;
  return kCreditSteps * floor_step_time();
}

// Returns what it added to the credit (clamped), for settle_floor_credit.
double Scheduler::update_floor_credit(double predicted_s) {
  double limit = floor_step_time();
  double before = floor_credit_s_;
  if (!std::isfinite(limit)) {
    floor_credit_s_ = 0;
    return 0;
  }
  double most = max_floor_credit();
  floor_credit_s_ = std::clamp(floor_credit_s_ + limit - predicted_s, -most, most);
  return floor_credit_s_ - before;
}

// A step is charged its predicted time when planned (the next plan comes before
// it is measured); once measured, that charge is replaced by what it took. So
// the floor holds on what steps really took: the cost model is linear, a
// chunk's attention is not (its query-key pairs grow with the prefix under it),
// and over an agent's 16K-22K contexts 1,500-token chunks planned at 67.8 ms
// took 80-84 ms (8B, H200), each overdraft otherwise unpaid.
void Scheduler::settle_floor_credit(double charged_s, double measured_s) {
  double limit = floor_step_time();
  if (!(measured_s > 0) || !std::isfinite(measured_s) || !std::isfinite(limit)) return;
  double most = max_floor_credit();
  floor_credit_s_ = std::clamp(floor_credit_s_ - charged_s + limit - measured_s, -most, most);
}

// Given the step's decode rows, and the prefix under its first prefill chunk
// and the tokens that chunk may take (what is left of its prompt, the budget):
// smooth chunks that fit the target in every step where the cost model says a
// worthwhile one (min_prefill_chunk) does over that prefix; else decode-only
// steps until the credit is full, then one step that spends it; and if the
// decodes alone miss the target, the floor is lost for this step anyway and a
// prefill still progresses by min_prefill_chunk. The prefix counts: a chunk's
// attention reads it. Priced over none, 64-token chunks over an agent's 16K
// contexts went beside every decode step, predicted at 15.1 ms and measured
// at 15.7 against a 13.6 ms target (8B, FP8 cache, H100): that turn's user
// below the floor for the whole prefill, at 4K prefill tokens a second.
// A smooth step's target is also less what earlier steps overran it by (the
// credit, settled on measured times, when negative): a model that prices
// chunks short would otherwise overrun every smooth step unnoticed.
Scheduler::StepTarget Scheduler::step_target(const StepFeatures& decodes, int32_t prefix,
                                              int32_t tokens) const {
  constexpr double kNone = std::numeric_limits<double>::infinity();
  double limit = floor_step_time();
  if (!std::isfinite(limit) || decodes.decode_tokens == 0) return {kNone, true};
  const auto& c = cost_.coeffs();
  const double m = cfg_.min_prefill_chunk;
  double alone = cost_.predict(decodes);
  // what any chunk adds to the step: an eager (or padded) step's f, the prefix's KV read
  double fixed = cost_.eager_jump(decodes) + c[3] * prefix;
  double with_chunk = alone + fixed + (c[2] + c[3]) * m +
                      c[CostModel::kPairs] * CostModel::pairs(prefix, m);
  double smooth = limit + std::min(floor_credit_s_, 0.0);
  const bool fits = with_chunk <= smooth;
  if (fits && smooth_keeps_pace(alone, fixed, smooth, prefix, tokens)) return {smooth, true};
  // Decodes alone that miss the target lose the floor anyway, so the prefill
  // goes on beside them; but only once plain steps were measured. A fresh
  // process has seen only its first prompts' prefill, whose fit put a plain
  // 8B decode step at over 20 ms (it takes 5-7 on an H100 or H200): every
  // step then took a 64-token chunk beside the first user's decodes, 20-22 ms
  // a step, that user's whole first turn at 45-54 TPS (the floor 70), and no
  // plain step came to correct the fit. Here a few come first.
  constexpr double kPlainStepsTrusted = 8;
  if (alone >= limit && cost_.plain_weight() >= kPlainStepsTrusted) return {limit, true};
  if (floor_credit_s_ >= max_floor_credit()) return {limit + floor_credit_s_, true};
  return {smooth, false, fits};  // a chunk that fits but is outpaced waits for the credit
}

// Smooth chunks spend each step's slack as it comes; the credit spends the
// slack of several steps on one chunk. On a linear model both move a prefill
// equally fast, less the fixed cost each chunk pays (an eager or padded step's
// f, the prefix's KV read), which the credit pays once for many tokens. Smooth
// steps are kept (no step over the target) while they move the prefill at
// least kSmoothPace as fast as the credit's chunks would. On a model of an
// 8B's steps with 5 ms of fixed cost a chunk step (tests/csrc, "give way"), an
// 18K prompt beside a 16K decode took 2.10 s in 81 smooth chunks, 1.41 s in 12
// with this rule; a GPU profile saw the same shape (64-token chunks beside
// every decode step, 5.8 s TTFT p50 against 2.2 with the credit's ~1,100-token
// chunks), though there the chunks did not even fit (step_target's prefix).
bool Scheduler::smooth_keeps_pace(double alone, double fixed, double smooth, int32_t prefix,
                                  int32_t tokens) const {
  constexpr double kSmoothPace = 0.75;
  const double limit = floor_step_time();
  const double slack = limit - alone;
  if (!(slack > 0)) return true;
  const double credit = max_floor_credit();
  // a prompt's last tokens: a smooth step that takes them all is never outpaced
  const double smooth_rate =
      std::min<double>(chunk_fit(smooth - alone - fixed, prefix), tokens) / smooth;
  const double cycle = credit / slack * alone + limit + credit;  // save, then spend
  const double credit_rate =
      std::min<double>(chunk_fit(limit + credit - alone - fixed, prefix), tokens) / cycle;
  return smooth_rate >= kSmoothPace * credit_rate;
}

// ---------------------------------------------------------------- submit

void Scheduler::submit(int64_t rid, std::span<const int32_t> prompt,
                       int32_t max_new_tokens, std::span<const int32_t> stop_ids,
                       const std::string& session) {
  auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
  if (requests_.count(rid))
    fail("duplicate rid " + std::to_string(rid) + ": a request with this id is still live");
  if (prompt.empty()) fail("prompt is empty");
  if (max_new_tokens < 1) fail("max_new_tokens must be >= 1");
  int64_t total = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  if (total > cfg_.max_seq_len)
    fail("prompt (" + std::to_string(prompt.size()) + " tokens) + max_new_tokens (" +
         std::to_string(max_new_tokens) + ") exceeds max_seq_len " +
         std::to_string(cfg_.max_seq_len));
  if (pages_for(total) > cfg_.num_pages)
    fail("request needs " + std::to_string(pages_for(total)) +
         " KV pages but the pool has only " + std::to_string(cfg_.num_pages));
  for (int32_t t : prompt)
    if (t < 0) fail("prompt token ids must be >= 0");

  RequestData d;
  d.rid = rid;
  // Room for the first generated tokens up front: otherwise requests admitted
  // together all regrow (copy) their token vectors in the same step.
  d.tokens.reserve(prompt.size() + std::min(max_new_tokens, 1024));
  d.tokens.assign(prompt.begin(), prompt.end());
  d.prompt_len = static_cast<int32_t>(prompt.size());
  d.max_new_tokens = max_new_tokens;
  d.stop_ids.assign(stop_ids.begin(), stop_ids.end());
  d.session = session;
  auto e = std::make_unique<Entry>(Queued(std::move(d)));
  e->serial = next_serial_++;
  requests_.emplace(rid, std::move(e));
  waiting_.push_back(rid);
  if (!session.empty()) sessions_.hand_off(session, rid);
}

int32_t Scheduler::set_drafts(int64_t rid, std::span<const int32_t> drafts) {
  for (int32_t t : drafts)
    if (t < 0) throw std::invalid_argument("draft token ids must be >= 0");
  auto it = requests_.find(rid);
  if (it == requests_.end()) return 0;
  auto* dec = std::get_if<Decoding>(&it->second->state);
  if (!dec || dec->data().pending != 0) return 0;
  const RequestData& d = dec->data();
  auto k = static_cast<int32_t>(
      std::min<int64_t>(static_cast<int64_t>(drafts.size()), d.max_new_tokens - d.generated - 1));
  k = std::max(k, 0);
  dec->propose(std::vector<int32_t>(drafts.begin(), drafts.begin() + k));
  return k;
}

// ------------------------------------------------------------------ plan

std::optional<PlanData> Scheduler::plan() {
  expire_sessions();
  std::vector<Row> rows;
  rows.reserve(running_.size() + 8);
  int32_t budget = cfg_.max_batch_tokens;

  plan_decodes(rows, budget);
  int32_t num_decode = 0;  // the plain decodes lead; verify rows follow them
  StepFeatures f;
  f.decode_tokens = static_cast<double>(rows.size());
  for (const Row& r : rows) {
    num_decode += r.sample == Sample::kDecode;
    f.draft_tokens += r.count - 1;
    f.kv_tokens_read += r.prefix + r.count;
  }
  StepTarget target{};  // set at the first prefill chunk (chunk_tokens)
  // Decodes filled the running set; the rest is needed only with prefill work.
  if (static_cast<int32_t>(rows.size()) < static_cast<int32_t>(running_.size()))
    plan_prefills(rows, budget, f, target);
  if (!waiting_.empty()) {
    double running_kv = 0;
    for (const Entry* e : running_) {
      const RequestData& d = data_of(*e);
      running_kv += static_cast<double>(d.tokens.size()) + d.pending;
    }
    plan_admissions(rows, budget, f, running_kv, target);
  }
  if (rows.empty()) return std::nullopt;
  PlanData p = materialize(rows, num_decode, f);
  if (f.decode_tokens > 0)
    inflight_.back().credit_charged_s = update_floor_credit(p.predicted_time_s);
  return p;
}

bool Scheduler::decodable(const RequestData& d) const {
  if (d.generated + d.pending >= d.max_new_tokens) return false;
  if (d.pending == 0) return true;
  // One pending token, sampled by the previous plan: use a placeholder.
  return d.pending == 1 && d.last_sample_step == next_step_ - 1;
}

void Scheduler::mark_sample(RequestData& d, size_t row) {
  ++d.pending;
  d.last_sample_step = next_step_;
  d.last_sample_row = static_cast<int32_t>(row);
}

// Decode-first: every decodable running request gets one token, oldest
// first; one with drafts also gets them verified in the same row (a verify
// row, placed after the plain decodes) as far as the budget the other
// decodes leave and pages taken without preempting anyone allow. Running
// requests are never held back for the TPS floor -- the floor is protected
// by what is *added* (prefill chunk size, admissions, the engine's drafts).
void Scheduler::plan_decodes(std::vector<Row>& rows, int32_t& budget) {
  int32_t decodes_left = 0;
  for (Entry* e : running_) {
    auto* dec = std::get_if<Decoding>(&e->state);
    decodes_left += dec != nullptr && decodable(dec->data());
  }
  std::vector<Row> verify;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Entry* e = running_[i];
    auto* dec = std::get_if<Decoding>(&e->state);
    if (!dec || !decodable(dec->data())) continue;
    --decodes_left;
    int32_t kv = dec->kv_len();
    int32_t need = pages_for(kv + 1) - static_cast<int32_t>(dec->lease().size());
    if (need > 0) {
      // May preempt requests admitted after this one: they sit after i.
      PageLease more = pool_.empty_lease();
      if (!obtain_pages(more, need, dec->data().admit_seq, Reclaim::kMayPreempt)) continue;
      dec->grow(std::move(more));
    }
    RequestData& d = dec->data();
    d.last_step = next_step_;  // in this plan: no longer a preemption victim
    if (int32_t k = verify_drafts(*dec, budget - 1 - decodes_left); k > 0) {
      d.pending += 1 + k;
      e->state = std::move(*dec).verify();  // replaces the consumed state
      verify.push_back(Row{e, kv, 1 + k, Sample::kVerify, 0});
      budget -= 1 + k;
      continue;
    }
    int32_t placeholder = d.pending ? -(d.last_sample_row + 1) : 0;
    rows.push_back(Row{e, kv, 1, Sample::kDecode, placeholder});
    mark_sample(d, rows.size() - 1);
    dec->advance(1);
    --budget;
  }
  for (const Row& r : verify) {
    rows.push_back(r);
    RequestData& d = data_of(*r.entry);
    d.last_sample_step = next_step_;
    d.last_sample_row = static_cast<int32_t>(rows.size() - 1);
  }
}

// How many of `dec`'s drafts this step verifies (0: a plain decode): drafts
// follow committed tokens only, stay within `allowed` tokens and
// max_new_tokens, and get pages only where no one is preempted for them. The
// drafts are trimmed to that many.
int32_t Scheduler::verify_drafts(Decoding& dec, int32_t allowed) {
  const RequestData& d = dec.data();
  int32_t k = 0;
  if (d.pending == 0)
    k = std::min({static_cast<int32_t>(dec.drafts().size()), allowed,
                  d.max_new_tokens - d.generated - 1});
  if (k > 0) {
    Chunk c = grow_chunk(static_cast<int32_t>(dec.lease().size()), dec.kv_len() + 1, k,
                         d.admit_seq, Reclaim::kIdleCacheOnly);
    dec.grow(std::move(c.pages));
    k = c.tokens;
  }
  k = std::max(k, 0);
  if (k != static_cast<int32_t>(dec.drafts().size()))
    dec.propose(std::vector<int32_t>(dec.drafts().begin(), dec.drafts().begin() + k));
  return k;
}

// The most tokens of a chunk after `prefix` ones whose variable cost fits
// `avail` seconds: k tokens cost k * (c + d) + g * pairs(prefix, k), the
// positive root of half_g k^2 + per_token k = avail, in the form that stays
// exact as g goes to 0 (infinite when chunks cost nothing a token).
double Scheduler::chunk_fit(double avail, int32_t prefix) const {
  if (avail < 0) return 0;
  const auto& c = cost_.coeffs();
  double per_token = c[2] + c[3] + c[CostModel::kPairs] * (prefix + 0.5);
  double half_g = c[CostModel::kPairs] / 2;
  double denominator = per_token + std::sqrt(per_token * per_token + 4 * half_g * avail);
  return denominator > 0 ? std::floor(2 * avail / denominator)
                         : std::numeric_limits<double>::infinity();
}

// Tokens of prefill the step can still take without breaking the floor.
int32_t Scheduler::chunk_tokens(int32_t remaining, int32_t prefix, int32_t budget,
                                const StepFeatures& f, bool first_prefill,
                                StepTarget& target) const {
  int32_t n = std::min(remaining, budget);
  if (first_prefill) target = step_target(f, prefix, n);  // f: the decodes alone
  if (first_prefill && target.hold) return 0;
  // No decodes to protect: prefill may use the whole step.
  if (!std::isfinite(target.time_s) || (f.decode_tokens == 0 && first_prefill)) return n;
  const auto& c = cost_.coeffs();
  double avail = target.time_s - cost_.predict(f) - cost_.eager_jump(f) - c[3] * prefix;
  int64_t allowed = static_cast<int64_t>(std::clamp<double>(chunk_fit(avail, prefix), 0, n));
  // The first prefill of a step gets a worthwhile chunk (min_prefill_chunk, or
  // what is left of the prompt) or none (step_target).
  int64_t worthwhile = std::min<int64_t>(cfg_.min_prefill_chunk, n);
  if (first_prefill && allowed < worthwhile) allowed = target.progress ? worthwhile : 0;
  return static_cast<int32_t>(std::min<int64_t>(allowed, n));
}

// The pages that extend a holding of `have` pages to cover cursor+n tokens;
// the chunk shrinks to what the pages allow.
Scheduler::Chunk Scheduler::grow_chunk(int32_t have, int32_t cursor, int32_t n,
                                       uint64_t seq, Reclaim reclaim) {
  Chunk c{pool_.empty_lease(), n};
  int32_t need_pages = pages_for(static_cast<int64_t>(cursor) + n) - have;
  if (need_pages <= 0 || obtain_pages(c.pages, need_pages, seq, reclaim)) return c;
  int32_t got = std::min(need_pages, pool_.num_free());
  pool_.allocate_into(c.pages, got);
  int64_t covered = static_cast<int64_t>(have + got) * cfg_.page_size - cursor;
  c.tokens = static_cast<int32_t>(std::clamp<int64_t>(covered, 0, n));
  return c;
}

void Scheduler::add_prefill_row(std::vector<Row>& rows, Entry* e, int32_t n,
                                StepFeatures& f) {
  auto& p = std::get<Prefilling>(e->state);
  int32_t cursor = p.cursor();
  bool last = cursor + n >= p.target();
  rows.push_back(Row{e, cursor, n, last ? Sample::kAfterPrefill : Sample::kNone, 0});
  p.data().last_step = next_step_;  // in this plan: no longer a preemption victim
  p.advance(n);
  f.prefill_tokens += n;
  f.kv_tokens_read += cursor + n;
  f.prefill_pairs += CostModel::pairs(cursor, n);
  if (!last) return;
  mark_sample(p.data(), rows.size() - 1);
  e->state = std::move(p).finish_prefill();  // replaces the consumed state
}

void Scheduler::plan_prefills(std::vector<Row>& rows, int32_t& budget, StepFeatures& f,
                              StepTarget& target) {
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Entry* e = running_[i];
    auto* p = std::get_if<Prefilling>(&e->state);
    if (!p) continue;
    int32_t n = chunk_tokens(p->remaining(), p->cursor(), budget, f, f.prefill_tokens == 0,
                             target);
    if (n <= 0) return;  // the step's time is spent
    // Only the oldest prefill may preempt (newer requests) for its pages.
    Reclaim reclaim = i == 0 ? Reclaim::kMayPreempt : Reclaim::kIdlePins;
    Chunk c = grow_chunk(static_cast<int32_t>(p->lease().size()), p->cursor(), n,
                         p->data().admit_seq, reclaim);
    p->grow(std::move(c.pages));
    n = c.tokens;
    if (n <= 0) continue;
    add_prefill_row(rows, e, n, f);
    budget -= n;
  }
}

// A new request waits unless the decode step with it added (its whole prompt
// in KV) still meets the floor; it is always admitted into an idle system.
bool Scheduler::admission_keeps_floor(const RequestData& d, double running_kv) const {
  double limit = floor_step_time();
  if (!std::isfinite(limit) || running_.empty()) return true;
  StepFeatures g;
  g.decode_tokens = static_cast<double>(running_.size()) + 1;
  g.kv_tokens_read = running_kv + static_cast<double>(d.tokens.size());
  return cost_.predict(g) <= limit;
}

void Scheduler::plan_admissions(std::vector<Row>& rows, int32_t& budget,
                                StepFeatures& f, double running_kv,
                                StepTarget& target) {
  const int32_t ps = cfg_.page_size;
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < cfg_.max_running) {
    Entry* e = requests_.at(waiting_.front()).get();
    RequestData& d = data_of(*e);
    if (d.pending > 0) return;  // preempted with a token still in flight
    if (!admission_keeps_floor(d, running_kv)) return;
    int32_t len = static_cast<int32_t>(d.tokens.size());
    // Leave the last token uncached: its logits are needed.
    PageLease lease = cache_.match(d.tokens, static_cast<size_t>((len - 1) / ps));
    int32_t cached = static_cast<int32_t>(lease.size()) * ps;
    int32_t n = chunk_tokens(len - cached, cached, budget, f, f.prefill_tokens == 0, target);
    if (n <= 0) return;
    // Into an idle system a request may also drop pins handed to queued turns.
    Chunk c = grow_chunk(static_cast<int32_t>(lease.size()), cached, n, next_admit_seq_,
                         running_.empty() ? Reclaim::kMayPreempt : Reclaim::kIdlePins);
    lease.append(std::move(c.pages));
    n = c.tokens;
    if (n <= 0) return;

    waiting_.pop_front();
    d.admit_seq = next_admit_seq_++;
    d.table_key = next_table_key_++;
    if (!d.admitted_once) {
      d.admitted_once = true;
      prompt_tokens_total_ += d.prompt_len;
      prefix_hit_tokens_total_ += cached;
      d.cached_tokens = cached;
    }
    if (!d.session.empty()) sessions_.release_handoff(d.session, d.rid);
    running_kv += len;
    if (auto* q = std::get_if<Queued>(&e->state))
      e->state = std::move(*q).admit(std::move(lease), cached);
    else
      e->state = std::move(std::get<Preempted>(e->state)).readmit(std::move(lease), cached);
    running_.push_back(e);
    add_prefill_row(rows, e, n, f);
    budget -= n;
  }
}

PlanData Scheduler::materialize(const std::vector<Row>& rows, int32_t num_decode,
                                const StepFeatures& f) {
  const int32_t ps = cfg_.page_size;
  PlanData p;
  p.step = next_step_++;
  p.num_decode = num_decode;
  p.predicted_time_s = cost_.predict(f);
  size_t b = rows.size();
  size_t t = 0;
  int32_t width = 0;
  for (const Row& r : rows) {
    t += r.count;
    width = std::max(width, pages_for(r.prefix + r.count));
  }
  width = PageTableArena::aligned_width(width);
  p.page_table_width = width;
  p.page_table = page_tables_.acquire(b, width);
  p.rids.reserve(b);
  p.input_ids.reserve(t);
  p.positions.reserve(t);
  p.slot_mapping.reserve(t);
  p.query_start.reserve(b + 1);
  p.prefix_lens.reserve(b);
  p.seq_lens.reserve(b);
  p.sample.reserve(b);
  p.num_draft.reserve(b);
  p.query_start.push_back(0);

  InFlight fl;
  fl.step = p.step;
  fl.features = f;
  fl.rids.reserve(b);
  fl.serials.reserve(b);
  fl.sample.reserve(b);
  fl.num_draft.reserve(b);
  for (const Row& r : rows) {
    RequestData& d = data_of(*r.entry);
    const PageLease& lease = lease_of(*r.entry);
    const PageId* pages = lease.data();
    int32_t seq = r.prefix + r.count;
    const int32_t known_len = static_cast<int32_t>(d.tokens.size());
    const auto* verifying = std::get_if<Verifying>(&r.entry->state);
    const int32_t k = r.count - 1;
    if (r.sample == Sample::kVerify) {
      fl.drafts.insert(fl.drafts.end(), verifying->drafts().begin(), verifying->drafts().end());
      p.total_drafts += k;
    }
    for (int32_t pos = r.prefix; pos < seq; ++pos) {
      int32_t id = pos < known_len ? d.tokens[pos]
                   : verifying     ? verifying->drafts()[pos - known_len]
                                   : r.placeholder;
      p.input_ids.push_back(id);
      p.positions.push_back(pos);
      p.slot_mapping.push_back(pages[pos / ps] * ps + pos % ps);
    }
    PageTableArena::write_row(*p.page_table, p.rids.size(), d.table_key, pages,
                              pages_for(seq));
    p.rids.push_back(d.rid);
    p.query_start.push_back(static_cast<int32_t>(p.input_ids.size()));
    p.prefix_lens.push_back(r.prefix);
    p.seq_lens.push_back(seq);
    p.sample.push_back(r.sample != Sample::kNone);
    p.num_draft.push_back(r.sample == Sample::kVerify ? k : 0);
    d.last_step = p.step;
    fl.rids.push_back(d.rid);
    fl.serials.push_back(r.entry->serial);
    fl.sample.push_back(r.sample);
    fl.num_draft.push_back(r.sample == Sample::kVerify ? k : 0);
  }
  inflight_.push_back(std::move(fl));
  return p;
}

// ----------------------------------------------------------- page supply

// Frees pages for `lease` in order of harm: idle cache (LRU), waiting for
// pages a committing step will free; unless for draft slots, the pins of
// sessions between turns (the first to expire first: a pin keeps pages from
// the idle cache, never from running or admitted work); and -- with
// Reclaim::kMayPreempt (decodes, the oldest prefill, an admission into an idle
// system) -- preempting newer requests and, last, dropping the pins handed to
// a queued next turn.
bool Scheduler::obtain_pages(PageLease& lease, int32_t n, uint64_t seq, Reclaim reclaim) {
  const bool may_preempt = reclaim == Reclaim::kMayPreempt;
  const bool may_drop_pins = reclaim != Reclaim::kIdleCacheOnly;
  while (pool_.num_free() < n) {
    int32_t shortfall = n - pool_.num_free();
    if (cache_.evict(shortfall) > 0) continue;
    if (graveyard_pages_ >= shortfall) return false;  // freed at next commit
    if (may_drop_pins && sessions_.drop_one(false)) continue;
    if (may_preempt && preempt_newer_than(seq)) continue;
    if (may_preempt && sessions_.drop_one(true)) continue;
    return false;
  }
  return pool_.allocate_into(lease, n);
}

bool Scheduler::preempt_newer_than(uint64_t seq) {
  if (running_.empty()) return false;
  Entry* v = running_.back();
  const RequestData& vd = data_of(*v);
  // Never the requester or older, nor a request already in the plan being built.
  if (vd.admit_seq <= seq || vd.last_step == next_step_) return false;
  running_.pop_back();
  if (auto* dec = std::get_if<Decoding>(&v->state)) {
    int32_t kv = dec->kv_len();
    auto r = std::move(*dec).preempt();
    retire(r.state.data(), std::move(r.pages), kv);
    v->state = std::move(r.state);
  } else if (auto* ver = std::get_if<Verifying>(&v->state)) {
    int32_t kv = ver->kv_len();
    auto r = std::move(*ver).preempt();
    retire(r.state.data(), std::move(r.pages), kv);
    v->state = std::move(r.state);
  } else {
    auto& pre = std::get<Prefilling>(v->state);
    int32_t kv = pre.cursor();
    auto r = std::move(pre).preempt();
    retire(r.state.data(), std::move(r.pages), kv);
    v->state = std::move(r.state);
  }
  waiting_.push_front(data_of(*v).rid);
  ++preemptions_total_;
  return true;
}

bool Scheduler::in_flight(const RequestData& d) const {
  return !inflight_.empty() && d.last_step >= inflight_.front().step;
}

// Pages a request gives up: full pages with known tokens and written KV go to
// the prefix cache; the references are dropped now, or when the last
// uncommitted step that reads them commits.
void Scheduler::retire(RequestData& d, PageLease&& pages, int32_t kv_len) {
  size_t known = std::min<size_t>(static_cast<size_t>(kv_len), d.tokens.size());
  cache_.insert(std::span<const int32_t>(d.tokens.data(), known), pages.pages(), true);
  if (!in_flight(d)) {
    pages.release_all();
    return;
  }
  int32_t sole = 0;
  for (PageId p : pages.pages()) sole += pool_.refcount(p) == 1;
  InFlight& last = inflight_.back();
  last.graveyard.push_back(std::move(pages));
  last.graveyard_pages += sole;
  graveyard_pages_ += sole;
}

void Scheduler::pin_session(const RequestData& d) {
  if (d.session.empty() || cfg_.session_ttl_s <= 0) return;
  size_t n = d.tokens.size() - 1;  // the last token never has KV
  PageLease pin = cache_.match(std::span<const int32_t>(d.tokens.data(), n),
                               n / cfg_.page_size);
  sessions_.pin(d.session, std::move(pin), clock_.now() + cfg_.session_ttl_s);
}

// ---------------------------------------------------------------- commit

std::vector<Event> Scheduler::commit(int64_t step, std::span<const int32_t> tokens,
                                     std::span<const int32_t> counts, double step_time_s) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("commit: " + m); };
  if (inflight_.empty() || inflight_.front().step != step)
    throw std::invalid_argument(
        "commit(step=" + std::to_string(step) + ") out of order: expected " +
        (inflight_.empty() ? std::string("no step (none in flight)")
                           : "step " + std::to_string(inflight_.front().step)));
  InFlight& front = inflight_.front();
  const size_t rows = front.rids.size();
  const size_t expected = rows + front.drafts.size();
  if (tokens.size() != expected)
    fail("got " + std::to_string(tokens.size()) + " tokens for " + std::to_string(rows) +
         " rows with " + std::to_string(front.drafts.size()) + " drafts (expected " +
         std::to_string(expected) + ")");
  if (!counts.empty() && counts.size() != rows)
    fail("got " + std::to_string(counts.size()) + " counts for " + std::to_string(rows) +
         " rows");
  // Validate everything before changing anything.
  for (size_t i = 0, at = 0, draft = 0; i < rows; ++i) {
    const int32_t k = front.num_draft[i];
    const int32_t n = counts.empty() ? 1 : counts[i];
    if (front.sample[i] != Sample::kNone) {
      if (n < 1 || n > 1 + k)
        fail("row " + std::to_string(i) + " emits " + std::to_string(n) +
             " tokens; it can emit 1 to " + std::to_string(1 + k));
      for (int32_t j = 0; j < n; ++j)
        if (tokens[at + j] < 0) fail("sampled token ids must be >= 0");
      for (int32_t j = 0; j + 1 < n; ++j)
        if (tokens[at + j] != front.drafts[draft + j])
          fail("row " + std::to_string(i) + ": an accepted token differs from its draft");
    }
    at += 1 + k;
    draft += k;
  }

  InFlight done = std::move(front);
  inflight_.pop_front();
  std::vector<Event> events;
  events.reserve(rows);
  for (size_t i = 0, at = 0; i < rows; at += 1 + done.num_draft[i], ++i) {
    if (done.sample[i] == Sample::kNone) continue;
    auto it = requests_.find(done.rids[i]);
    if (it == requests_.end() || it->second->serial != done.serials[i]) continue;
    Entry& e = *it->second;
    const int32_t k = done.num_draft[i];
    const int32_t n = counts.empty() ? 1 : counts[i];
    if (done.sample[i] == Sample::kAfterPrefill) share_prompt(e);
    if (auto* v = std::get_if<Verifying>(&e.state)) {
      // Rejected drafts' slots go; pages only they used return now (no other
      // step reads them: a verifying request is in no later plan).
      auto settled = std::move(*v).settle(n - 1, cfg_.page_size);
      e.state = std::move(settled.state);
      if (!settled.pages.empty()) data_of(e).table_key = next_table_key_++;
    }
    if (k > 0) {
      spec_draft_tokens_total_ += k;
      spec_accepted_tokens_total_ += n - 1;
      ++spec_verify_rows_total_;
    }
    RequestData& d = data_of(e);
    d.pending -= 1 + k;
    for (int32_t j = 0; j < n; ++j) {
      int32_t tok = tokens[at + j];
      d.tokens.push_back(tok);
      ++d.generated;
      ++generation_tokens_total_;
      EventKind kind = contains(d.stop_ids, tok)            ? EventKind::kStop
                       : d.generated >= d.max_new_tokens    ? EventKind::kLength
                                                            : EventKind::kRunning;
      events.push_back(Event{d.rid, tok, kind});
      if (kind == EventKind::kRunning) continue;
      // The accepted run ends at a stop id: the tokens after it are dropped.
      finish_entry(e, kind == EventKind::kStop ? FinishReason::kStop : FinishReason::kLength);
      requests_.erase(it);
      break;
    }
  }
  if (done.features.decode_tokens > 0) settle_floor_credit(done.credit_charged_s, step_time_s);
  cost_.observe(done.features, step_time_s);
  graveyard_pages_ -= done.graveyard_pages;
  ++steps_total_;
  return events;  // `done` goes out of scope: its graveyard pages return
}

// A prompt just finished prefilling (its step is committed, so its KV is
// written): its full pages join the prefix cache now, so requests sharing the
// prompt (agent fan-out) reuse them while this one is still decoding.
void Scheduler::share_prompt(Entry& e) {
  if (auto* dec = std::get_if<Decoding>(&e.state))
    cache_.insert(dec->data().tokens, dec->lease().pages());
}

void Scheduler::finish_entry(Entry& e, FinishReason reason) {
  if (auto* dec = std::get_if<Decoding>(&e.state)) {
    int32_t kv = dec->kv_len();
    remove_running(&e);
    auto r = std::move(*dec).finish(reason);
    retire(r.state.data(), std::move(r.pages), kv);
    pin_session(r.state.data());
  } else if (auto* pre = std::get_if<Preempted>(&e.state)) {
    remove_waiting(pre->rid());
    Finished fin = std::move(*pre).finish(reason);
    pin_session(fin.data());
  } else {
    throw std::logic_error("finish of a request that is neither decoding nor preempted");
  }
}

// ----------------------------------------------------------------- abort

bool Scheduler::abort(int64_t rid) {
  auto it = requests_.find(rid);
  if (it == requests_.end()) return false;
  Entry& e = *it->second;
  std::visit(Overloaded{
                 [&](Queued& q) {
                   remove_waiting(rid);
                   Aborted a = std::move(q).abort();
                   if (!a.data().session.empty())
                     sessions_.release_handoff(a.data().session, rid);
                 },
                 [&](Preempted& p) {
                   remove_waiting(rid);
                   Aborted a = std::move(p).abort();
                 },
                 [&](Prefilling& p) {
                   int32_t kv = p.cursor();
                   remove_running(&e);
                   auto r = std::move(p).abort();
                   retire(r.state.data(), std::move(r.pages), kv);
                 },
                 [&](Decoding& d) {
                   int32_t kv = d.kv_len();
                   remove_running(&e);
                   auto r = std::move(d).abort();
                   retire(r.state.data(), std::move(r.pages), kv);
                 },
                 [&](Verifying& v) {
                   int32_t kv = v.kv_len();
                   remove_running(&e);
                   auto r = std::move(v).abort();
                   retire(r.state.data(), std::move(r.pages), kv);
                 },
             },
             e.state);
  requests_.erase(it);
  return true;
}

void Scheduler::remove_running(Entry* e) {
  auto it = std::find(running_.begin(), running_.end(), e);
  if (it != running_.end()) running_.erase(it);
}

void Scheduler::remove_waiting(int64_t rid) {
  auto it = std::find(waiting_.begin(), waiting_.end(), rid);
  if (it != waiting_.end()) waiting_.erase(it);
}

// ----------------------------------------------------------------- stats

Stats Scheduler::stats() const {
  Stats s{};
  s.pages_total = pool_.num_pages();
  s.pages_free = pool_.num_free();
  s.pages_cached = cache_.num_idle();
  s.pages_used = s.pages_total - s.pages_free - s.pages_cached;
  s.requests_running = static_cast<int64_t>(running_.size());
  s.requests_waiting = static_cast<int64_t>(waiting_.size());
  s.prompt_tokens_total = prompt_tokens_total_;
  s.prefix_cache_hit_tokens_total = prefix_hit_tokens_total_;
  s.generation_tokens_total = generation_tokens_total_;
  s.preemptions_total = preemptions_total_;
  s.steps_total = steps_total_;
  s.spec_draft_tokens_total = spec_draft_tokens_total_;
  s.spec_accepted_tokens_total = spec_accepted_tokens_total_;
  s.spec_verify_rows_total = spec_verify_rows_total_;
  s.pages_pinned = pinned_only_pages();
  return s;
}

std::optional<int32_t> Scheduler::cached_tokens(int64_t rid) const {
  auto it = requests_.find(rid);
  if (it == requests_.end()) return std::nullopt;
  const RequestData& d = data_of(*it->second);
  if (!d.admitted_once) return std::nullopt;
  return d.cached_tokens;
}

// Pages whose every reference is a session pin's: what retention costs right now.
int64_t Scheduler::pinned_only_pages() const {
  std::unordered_map<PageId, int32_t> pin_refs;
  sessions_.for_each_lease([&](const PageLease& lease) {
    for (PageId p : lease.pages()) ++pin_refs[p];
  });
  int64_t n = 0;
  for (const auto& [page, refs] : pin_refs) n += refs == pool_.refcount(page);
  return n;
}

std::vector<RequestProgress> Scheduler::progress() const {
  std::vector<RequestProgress> out;
  out.reserve(requests_.size());
  for (const auto& [rid, e] : requests_) {
    const RequestData& d = data_of(*e);
    RequestProgress r{rid, "", static_cast<int32_t>(d.tokens.size()), d.cached_tokens, 0};
    std::visit(Overloaded{
                   [&](const Queued&) { r.state = "queued"; },
                   [&](const Prefilling& p) {
                     r.state = "prefilling";
                     r.kv_tokens = p.cursor();
                   },
                   [&](const Decoding& dc) {
                     r.state = "decoding";
                     r.kv_tokens = dc.kv_len();
                   },
                   [&](const Verifying& v) {  // drafts' slots are not the request's KV yet
                     r.state = "decoding";
                     r.kv_tokens = v.kv_len() - static_cast<int32_t>(v.drafts().size());
                   },
                   [&](const Preempted&) { r.state = "preempted"; },
               },
               e->state);
    out.push_back(r);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.rid < b.rid; });
  return out;
}

std::string Scheduler::state_name(int64_t rid) const {
  auto it = requests_.find(rid);
  if (it == requests_.end()) return "";
  return std::visit(Overloaded{
                        [](const Queued&) { return std::string("queued"); },
                        [](const Prefilling&) { return std::string("prefilling"); },
                        [](const Decoding&) { return std::string("decoding"); },
                        [](const Verifying&) { return std::string("verifying"); },
                        [](const Preempted&) { return std::string("preempted"); },
                    },
                    it->second->state);
}

int32_t Scheduler::evict_cache() {
  return cache_.evict(std::numeric_limits<int32_t>::max());
}

// ------------------------------------------------------------ invariants

void Scheduler::check_invariants() const {
  auto fail = [](const std::string& m) { throw std::logic_error("invariant: " + m); };
  const int32_t n = pool_.num_pages();
  std::vector<int32_t> refs(n, 0);
  std::vector<int32_t> seen(n, -1);
  int32_t lease_id = 0;
  auto count = [&](const PageLease& l) {
    for (PageId p : l.pages()) {
      if (p < 0 || p >= n) fail("page id out of range");
      if (seen[p] == lease_id) fail("page listed twice in one lease");
      seen[p] = lease_id;
      ++refs[p];
    }
    ++lease_id;
  };
  size_t running = 0, waiting = 0;
  for (const auto& [rid, e] : requests_) {
    const RequestData& d = data_of(*e);
    if (d.rid != rid) fail("request keyed under the wrong rid");
    // A running state holds the pages of its KV; a decoding one's next token (and drafts)
    // are its pending tokens.
    auto running_state = [&](const LeasedState& st, int32_t kv, const std::string& what,
                             bool decoding) {
      ++running;
      count(st.lease());
      if (static_cast<int32_t>(st.lease().size()) < pages_for(kv))
        fail(what + " request has too few pages");
      if (decoding && kv + 1 != static_cast<int32_t>(d.tokens.size()) + d.pending)
        fail(what + " kv_len disagrees with its tokens");
    };
    if (auto* p = std::get_if<Prefilling>(&e->state)) {
      running_state(*p, p->cursor(), "prefilling", false);
    } else if (auto* dc = std::get_if<Decoding>(&e->state)) {
      running_state(*dc, dc->kv_len(), "decoding", true);
    } else if (auto* v = std::get_if<Verifying>(&e->state)) {
      running_state(*v, v->kv_len(), "verifying", true);
      if (d.pending != 1 + static_cast<int32_t>(v->drafts().size()) || v->drafts().empty())
        fail("verifying request's pending tokens are not its next token and drafts");
      if (!in_flight(d)) fail("verifying request in no uncommitted step");
    } else {
      ++waiting;
    }
    if (d.pending < 0 || d.generated > d.max_new_tokens) fail("token counts out of range");
  }
  if (running != running_.size()) fail("running list disagrees with request states");
  if (waiting != waiting_.size()) fail("waiting queue disagrees with request states");
  for (const Entry* e : running_)
    if (!std::holds_alternative<Prefilling>(e->state) &&
        !std::holds_alternative<Decoding>(e->state) &&
        !std::holds_alternative<Verifying>(e->state))
      fail("running list holds a request that is not running");
  sessions_.for_each_lease(count);
  int32_t graveyard = 0;
  for (const InFlight& f : inflight_) {
    for (const PageLease& l : f.graveyard) count(l);
    graveyard += f.graveyard_pages;
  }
  if (graveyard != graveyard_pages_) fail("graveyard page count drifted");

  std::vector<uint8_t> is_free(n, 0);
  for (PageId p : pool_.free_list()) {
    if (is_free[p]) fail("page twice in the free list");
    is_free[p] = 1;
  }
  int32_t used = 0, idle_cached = 0;
  for (PageId p = 0; p < n; ++p) {
    if (refs[p] != pool_.refcount(p)) fail("refcount of page " + std::to_string(p) + " is " +
                                           std::to_string(pool_.refcount(p)) + ", leases hold " +
                                           std::to_string(refs[p]));
    if (refs[p] > 1 && !pool_.is_cached(p)) fail("uncached page owned twice");
    if (is_free[p] && (refs[p] != 0 || pool_.is_cached(p))) fail("free page in use");
    if (!is_free[p] && refs[p] == 0 && !pool_.is_cached(p)) fail("page leaked");
    used += refs[p] > 0;
    idle_cached += refs[p] == 0 && pool_.is_cached(p);
  }
  if (used + idle_cached + pool_.num_free() != n) fail("page accounting does not add up");
  cache_.check_invariants();
}

}  // namespace ts
