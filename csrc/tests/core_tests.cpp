// C++ tests of the control plane without Python, built under ASan/UBSan by
// scripts/test_csrc_sanitizers (and registered with CTest). Plain checks: a
// failed CHECK prints where and exits non-zero.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check.h"
#include "page_pool.h"
#include "prefix_cache.h"
#include "request_state.h"
#include "scheduler.h"

using namespace ts;

template <class E, class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  }
  return false;
}

static std::vector<int32_t> seq(int32_t start, int32_t n) {
  std::vector<int32_t> v(n);
  for (int32_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

static void test_pool_and_leases() {
  PagePool pool(8);
  {
    PageLease a = pool.empty_lease();
    CHECK(pool.allocate_into(a, 5));
    CHECK(pool.num_free() == 3);
    CHECK(!pool.allocate_into(a, 4));  // all or nothing
    CHECK(a.size() == 5);
    PageLease b = std::move(a);  // moving transfers ownership
    CHECK(a.empty() && b.size() == 5);
    CHECK(pool.num_free() == 3);
    PageLease c = pool.empty_lease();
    CHECK(pool.allocate_into(c, 3));
    b.append(std::move(c));
    CHECK(b.size() == 8 && pool.num_free() == 0);
  }
  CHECK(pool.num_free() == 8);  // RAII: destructors returned every page
  std::set<PageId> ids;
  PageLease d = pool.empty_lease();
  CHECK(pool.allocate_into(d, 8));
  for (PageId p : d.pages()) ids.insert(p);
  CHECK(ids.size() == 8);
  PageLease e = pool.empty_lease();
  CHECK(throws<std::logic_error>([&] {
    pool.set_cached(0, false);
    PageLease f = pool.empty_lease();
    d.release_all();
    pool.retain_into(f, 0);  // sharing a free page is a bug
  }));
}

static void test_prefix_cache() {
  const int ps = 4;
  PagePool pool(6);
  PrefixCache cache(pool, ps);
  auto toks = seq(100, 10);  // 2 full pages + 2 tokens
  {
    PageLease l = pool.empty_lease();
    CHECK(pool.allocate_into(l, 3));
    cache.insert(toks, l.pages());
    CHECK(cache.num_cached() == 2);  // only full pages
  }
  CHECK(cache.num_idle() == 2 && pool.num_free() == 4);
  cache.check_invariants();
  {
    PageLease m = cache.match(toks, 10);
    CHECK(m.size() == 2 && cache.num_idle() == 0 && cache.num_evictable() == 0);
    auto other = toks;
    other[5] = 7;  // diverges in page 1
    PageLease m2 = cache.match(other, 10);
    CHECK(m2.size() == 1 && m2[0] == m[0]);
    cache.check_invariants();
  }
  CHECK(cache.evict(1) == 1);  // leaf first
  CHECK(cache.num_cached() == 1);
  PageLease m3 = cache.match(toks, 10);
  CHECK(m3.size() == 1);
  CHECK(cache.evict(5) == 0);  // busy pages are never evicted
  m3.release_all();
  CHECK(cache.evict(5) == 1 && pool.num_free() == 6);
  cache.check_invariants();
}

static void test_fsm() {
  PagePool pool(4);
  RequestData d;
  d.rid = 1;
  d.tokens = {1, 2, 3, 4, 5};
  PageLease l = pool.empty_lease();
  CHECK(pool.allocate_into(l, 2));
  Prefilling p = Queued(std::move(d)).admit(std::move(l), 0);
  CHECK(!p.done());
  CHECK(throws<std::logic_error>([&] {
    Prefilling tmp(RequestData{}, pool.empty_lease(), 0);
    tmp.data().tokens = {1};
    auto dd = std::move(tmp).finish_prefill();  // prompt not done
  }));
  p.advance(5);
  Decoding dec = std::move(p).finish_prefill();
  CHECK(dec.kv_len() == 5 && dec.lease().size() == 2 && p.lease().empty());
  auto pre = std::move(dec).preempt();
  CHECK(pre.pages.size() == 2 && dec.lease().empty());
  pre.pages.release_all();
  CHECK(pool.num_free() == 4);
  Finished f = std::move(pre.state).finish(FinishReason::kStop);
  CHECK(f.reason() == FinishReason::kStop && f.rid() == 1);
}

// Decoding --verify--> Verifying --settle--> Decoding: kv_len counts the
// drafts' slots until settle keeps the accepted ones and hands out the pages
// only rejected drafts used.
static void test_fsm_speculative_slots() {
  const int32_t ps = 4;
  PagePool pool(8);
  RequestData d;
  d.rid = 2;
  d.tokens = {1, 2, 3, 4, 5, 6};  // KV for 5, the 6th is the next input
  PageLease l = pool.empty_lease();
  CHECK(pool.allocate_into(l, 4));  // covers 16 slots: the next token + 10 drafts
  Decoding dec(std::move(d), std::move(l), 5);
  CHECK(throws<std::logic_error>([&] {
    Decoding empty(RequestData{}, pool.empty_lease(), 0);
    auto v = std::move(empty).verify();  // no drafts
  }));
  dec.propose(seq(40, 10));
  Verifying v = std::move(dec).verify();
  CHECK(v.kv_len() == 16 && v.drafts().size() == 10 && dec.drafts().empty());
  CHECK(throws<std::logic_error>([&] {
    Verifying tmp(RequestData{}, pool.empty_lease(), 3, {1});
    auto r = std::move(tmp).settle(2, ps);  // more accepted than drafted
  }));
  auto r = std::move(v).settle(2, ps);  // next token + 2 drafts keep KV: 8 slots, 2 pages
  CHECK(r.state.kv_len() == 8 && r.state.lease().size() == 2 && r.pages.size() == 2);
  CHECK(v.lease().empty() && v.drafts().empty());
  r.pages.release_all();
  CHECK(pool.num_free() == 6);
  PageLease tail = pool.empty_lease();
  CHECK(pool.allocate_into(tail, 3));
  PageLease none = tail.take_tail(5);  // keeps all: nothing past the end
  CHECK(none.empty() && tail.size() == 3);
}

struct Sim {
  Scheduler& s;
  std::mt19937 rng;
  std::set<int64_t> live;

  struct Sampled {
    std::vector<int32_t> tokens, counts;
  };
  std::deque<std::pair<PlanData, Sampled>> inflight;

  // Drafts for random live requests (refused unless decoding, all committed).
  void draft() {
    for (int64_t rid : live)
      if (rng() % 2) s.set_drafts(rid, seq(static_cast<int32_t>(rng() % 5), rng() % 6));
  }
  // One token per logits row; a verify row accepts a random prefix of its drafts.
  void plan_one() {
    auto p = s.plan();
    if (!p) return;
    Sampled out;
    for (size_t b = 0; b < p->rids.size(); ++b) {
      int32_t k = p->num_draft[b];
      auto accepted = static_cast<int32_t>(rng() % (k + 1));
      const int32_t* drafts = p->input_ids.data() + p->query_start[b] + 1;
      for (int32_t j = 0; j <= k; ++j)
        out.tokens.push_back(j < accepted ? drafts[j] : static_cast<int32_t>(rng() % 13));
      out.counts.push_back(accepted + 1);
    }
    inflight.emplace_back(std::move(*p), std::move(out));
  }
  void commit_one() {
    auto& [p, out] = inflight.front();
    for (const Event& e : s.commit(p.step, out.tokens, out.counts, 0.01)) {
      CHECK(live.count(e.rid));
      if (e.kind != EventKind::kRunning) live.erase(e.rid);
    }
    inflight.pop_front();
  }
};

static void test_scheduler_random(uint32_t seed) {
  const SchedulerConfig cfg{.num_pages = 24,
                            .page_size = 4,
                            .max_batch_tokens = 16,
                            .max_running = 6,
                            .tps_floor = seed % 2 ? 50.0 : 0.0,
                            .session_ttl_s = 5.0,
                            .max_seq_len = 64};
  Scheduler s(cfg);
  s.set_test_clock(0.0);
  Sim sim{s, std::mt19937(seed), {}, {}};
  double now = 0;
  std::vector<int32_t> stop = {3};
  const char* sessions[] = {"", "a", "b"};
  for (int op = 0; op < 400; ++op) {
    uint32_t r = sim.rng() % 10;
    if (r < 3) {
      int64_t rid = sim.rng() % 16;
      auto prompt = seq(static_cast<int32_t>(sim.rng() % 3) * 50, 1 + sim.rng() % 30);
      int32_t max_new = 1 + sim.rng() % 16;
      bool ok = !sim.live.count(rid);
      bool threw = throws<std::invalid_argument>(
          [&] { s.submit(rid, prompt, max_new, stop, sessions[sim.rng() % 3]); });
      CHECK(threw != ok);
      if (ok) sim.live.insert(rid);
    } else if (r < 6) {
      if (sim.inflight.size() < 2) sim.plan_one();
    } else if (r < 8) {
      if (!sim.inflight.empty()) sim.commit_one();
    } else if (r < 9) {
      if (sim.rng() % 2) {
        sim.draft();
        continue;
      }
      int64_t rid = sim.rng() % 16;
      CHECK(s.abort(rid) == (sim.live.count(rid) > 0));
      sim.live.erase(rid);
    } else {
      now += (sim.rng() % 100) / 10.0;
      s.set_test_clock(now);
    }
    s.check_invariants();
  }
  for (int i = 0; i < 5000 && (!sim.live.empty() || !sim.inflight.empty()); ++i) {
    size_t before = sim.inflight.size();
    if (before < 2) sim.plan_one();
    if (!sim.inflight.empty() && (sim.inflight.size() == before || sim.inflight.size() >= 2))
      sim.commit_one();
    s.check_invariants();
  }
  CHECK(sim.live.empty() && sim.inflight.empty());
  s.set_test_clock(now + 100);
  CHECK(!s.plan());
  Stats st = s.stats();
  CHECK(st.pages_used == 0 && st.requests_running == 0 && st.requests_waiting == 0);
  s.evict_cache();
  CHECK(s.stats().pages_free == cfg.num_pages);
}

static void test_scheduler_overlap_and_preemption() {
  const SchedulerConfig cfg{.num_pages = 12,
                            .page_size = 4,
                            .max_batch_tokens = 64,
                            .max_running = 4,
                            .tps_floor = 0,
                            .session_ttl_s = 0,
                            .max_seq_len = 40};
  Scheduler s(cfg);
  std::vector<int32_t> none;
  for (int64_t rid = 0; rid < 4; ++rid) s.submit(rid, seq(rid * 10, 9), 20, none, "");
  Sim sim{s, std::mt19937(7), {0, 1, 2, 3}, {}};
  for (int i = 0; i < 2000 && (!sim.live.empty() || !sim.inflight.empty()); ++i) {
    if (i % 3 == 0) {  // as the engine does while speculating: commit, then draft
      while (!sim.inflight.empty()) sim.commit_one();
      sim.draft();
    }
    size_t before = sim.inflight.size();
    if (before < 2) sim.plan_one();
    if (!sim.inflight.empty() && (sim.inflight.size() == before || sim.inflight.size() >= 2))
      sim.commit_one();
    s.check_invariants();
  }
  CHECK(sim.live.empty());
  CHECK(s.stats().preemptions_total > 0);
  CHECK(s.stats().spec_verify_rows_total > 0);
}

int main() {
  test_pool_and_leases();
  test_prefix_cache();
  test_fsm();
  test_fsm_speculative_slots();
  test_scheduler_overlap_and_preemption();
  for (uint32_t seed = 1; seed <= 40; ++seed) test_scheduler_random(seed);
  std::puts("core_tests: all passed");
  return 0;
}
