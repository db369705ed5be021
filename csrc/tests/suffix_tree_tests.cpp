// C++ tests of the suffix tree (csrc/suffix_tree.h), built under ASan/UBSan by
// scripts/test_csrc_sanitizers and registered with CTest. Random operations are checked against
// brute force over the raw sequences, with check_invariants() after every one.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "suffix_tree.h"

using namespace ts;
using Tokens = std::vector<int32_t>;

static DraftParams params(int32_t max_draft, float min_prob = 0.0f, float per_match = 100.0f) {
  return DraftParams{.max_draft = max_draft, .min_prob = min_prob, .tokens_per_match = per_match};
}

// Occurrences of `needle` followed by each next token, over start positions whose indexed
// suffix (max_depth tokens) covers the needle and the next token.
static std::map<int32_t, int> followers(const std::vector<Tokens>& seqs, const Tokens& needle,
                                        int32_t max_depth) {
  std::map<int32_t, int> out;
  if (static_cast<int32_t>(needle.size()) + 1 > max_depth) return out;
  for (const Tokens& s : seqs) {
    for (size_t i = 0; i + needle.size() < s.size(); ++i) {
      if (std::equal(needle.begin(), needle.end(), s.begin() + i)) ++out[s[i + needle.size()]];
    }
  }
  return out;
}

static bool occurs(const std::vector<Tokens>& seqs, const Tokens& needle) {
  for (const Tokens& s : seqs) {
    if (std::search(s.begin(), s.end(), needle.begin(), needle.end()) != s.end()) return true;
  }
  return false;
}

// The draft is a continuation that occurred, from the longest suffix of the context that has
// one, and its first token is a most frequent follower of that suffix.
static void check_draft(const std::vector<Tokens>& seqs, const Tokens& context, const Draft& d,
                        int32_t max_depth, int32_t max_draft) {
  const int32_t longest =
      std::min<int32_t>(static_cast<int32_t>(context.size()), std::max(1, max_depth - max_draft));
  auto tail = [&](int32_t p) { return Tokens(context.end() - p, context.end()); };
  int32_t expect = 0;
  for (int32_t p = 1; p <= longest; ++p) {
    if (!followers(seqs, tail(p), max_depth).empty()) expect = p;
  }
  if (expect == 0) {
    CHECK(d.tokens.empty() && d.match_len == 0);
    return;
  }
  CHECK(d.match_len == expect);
  CHECK(!d.tokens.empty());
  CHECK(static_cast<int32_t>(d.tokens.size()) <= max_draft);
  Tokens chain = tail(expect);
  chain.insert(chain.end(), d.tokens.begin(), d.tokens.end());
  CHECK(occurs(seqs, chain));
  auto f = followers(seqs, tail(expect), max_depth);
  int most = 0;
  for (const auto& [tok, n] : f) most = std::max(most, n);
  CHECK(f[d.tokens[0]] == most);
  for (size_t i = 1; i < d.probs.size(); ++i) CHECK(d.probs[i] <= d.probs[i - 1]);
}

static void test_copies_the_earlier_occurrence() {
  SuffixTree t(16);
  Tokens text = {5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 5, 6, 7};
  t.add(text);
  t.check_invariants();
  Draft d = t.propose(text, params(4));
  CHECK(d.match_len == 3);
  CHECK((d.tokens == Tokens{8, 9, 10, 11}));
  CHECK(d.probs[0] == 1.0f && d.score == 4.0f);
  // The adaptive cap: one token per matched token.
  d = t.propose(text, params(4, 0.0f, 1.0f));
  CHECK((d.tokens == Tokens{8, 9, 10}));
  // Nothing continues a token never seen before.
  Tokens unseen = {1, 2, 99};
  CHECK(t.propose(unseen, params(4)).tokens.empty());
  CHECK(t.propose(text, params(0)).tokens.empty());
}

static void test_most_frequent_then_most_recent() {
  SuffixTree t(16);
  t.add(Tokens{1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 4, 0, 1, 2});
  Draft d = t.propose(Tokens{9, 1, 2}, params(1));
  CHECK(d.match_len == 2 && (d.tokens == Tokens{3}));  // 3 follows "1 2" twice, 4 once
  CHECK(d.probs[0] > 0.66f && d.probs[0] < 0.67f);
  SuffixTree r(16);
  r.add(Tokens{7, 1, 2, 3, 7, 1, 2, 4, 7, 1, 2});
  CHECK((r.propose(Tokens{7, 1, 2}, params(1)).tokens == Tokens{4}));  // a tie: the latest
  // min_prob stops the chain where the estimate falls below it.
  CHECK(t.propose(Tokens{9, 1, 2}, params(4, 0.9f)).tokens.empty());
}

static void test_extend_needs_an_open_sequence() {
  SuffixTree t(8);
  bool threw = false;
  try {
    t.extend(Tokens{1});
  } catch (const std::logic_error&) {
    threw = true;
  }
  CHECK(threw);
  t.add(Tokens{1, 2, 3});
  t.extend(Tokens{1, 2});
  CHECK(t.open_length() == 5);
  CHECK((t.propose(Tokens{1, 2}, params(2)).tokens == Tokens{3, 1}));
  t.check_invariants();
}

// Random adds, extends and evictions against brute force.
static void test_random_against_brute_force() {
  std::mt19937 rng(1234);
  for (int round = 0; round < 60; ++round) {
    const int32_t depth = 2 + static_cast<int32_t>(rng() % 10);
    const int32_t vocab = 1 + static_cast<int32_t>(rng() % 4);
    const int64_t cap = rng() % 3 == 0 ? 0 : 20 + rng() % 60;
    SuffixTree t(depth, cap);
    std::vector<Tokens> live;  // what the tree should hold, oldest first
    auto random_tokens = [&](size_t n) {
      Tokens v(n);
      for (auto& x : v) x = static_cast<int32_t>(rng() % vocab);
      return v;
    };
    auto evict_like_the_tree = [&](int64_t incoming, size_t keep) {
      int64_t held = 0;
      for (const auto& s : live) held += static_cast<int64_t>(s.size());
      while (cap > 0 && live.size() > keep && held + incoming > cap) {
        held -= static_cast<int64_t>(live.front().size());
        live.erase(live.begin());
      }
    };
    for (int op = 0; op < 40; ++op) {
      const int kind = static_cast<int>(rng() % 3);
      if (kind == 0 || live.empty()) {
        Tokens s = random_tokens(rng() % 30);
        evict_like_the_tree(static_cast<int64_t>(s.size()), 0);
        t.add(s);
        live.push_back(s);
      } else if (kind == 1) {
        Tokens s = random_tokens(rng() % 8);
        evict_like_the_tree(static_cast<int64_t>(s.size()), 1);
        t.extend(s);
        live.back().insert(live.back().end(), s.begin(), s.end());
      } else {
        const int32_t k = 1 + static_cast<int32_t>(rng() % 6);
        Tokens context = random_tokens(rng() % 12);
        if (rng() % 2 && !live.back().empty()) {  // the open sequence's own tail, as drafting does
          context.assign(live.back().end() - std::min<size_t>(live.back().size(), 12),
                         live.back().end());
        }
        check_draft(live, context, t.propose(context, params(k)), depth, k);
      }
      t.check_invariants();
      int64_t held = 0;
      for (const auto& s : live) held += static_cast<int64_t>(s.size());
      CHECK(t.num_tokens() == held);
      CHECK(t.num_sequences() == static_cast<int32_t>(live.size()));
      CHECK(t.num_nodes() <= 2 * t.num_tokens() + 1);
    }
  }
}

// Dropping the oldest sequence leaves the tree a fresh one over the rest would be.
static void test_eviction_leaves_the_fresh_tree() {
  std::mt19937 rng(99);
  for (int round = 0; round < 30; ++round) {
    Tokens a(40 + rng() % 40), b(40 + rng() % 40);
    for (auto& x : a) x = static_cast<int32_t>(rng() % 3);
    for (auto& x : b) x = static_cast<int32_t>(rng() % 3);
    SuffixTree both(6, static_cast<int64_t>(b.size()));
    both.add(a);
    both.add(b);  // evicts a
    SuffixTree fresh(6);
    fresh.add(b);
    both.check_invariants();
    CHECK(both.num_sequences() == 1 && both.num_nodes() == fresh.num_nodes());
    for (int i = 0; i < 20; ++i) {
      Tokens context(1 + rng() % 5);
      for (auto& x : context) x = static_cast<int32_t>(rng() % 3);
      Draft x = both.propose(context, params(3)), y = fresh.propose(context, params(3));
      CHECK(x.tokens == y.tokens && x.match_len == y.match_len);
    }
  }
}

// Memory stays bounded when far more than max_tokens flows through.
static void test_bounded_memory() {
  std::mt19937 rng(7);
  SuffixTree t(32, 5000);
  size_t peak = 0;
  for (int i = 0; i < 400; ++i) {
    Tokens s(50 + rng() % 100);
    for (auto& x : s) x = static_cast<int32_t>(rng() % 1000);
    t.add(s);
    CHECK(t.num_tokens() <= 5000);
    CHECK(t.num_nodes() <= 2 * t.num_tokens() + 1);
    if (i == 100) peak = t.memory_bytes();
    if (i > 100) CHECK(t.memory_bytes() <= 2 * peak);
  }
  t.check_invariants();
}

int main() {
  test_copies_the_earlier_occurrence();
  test_most_frequent_then_most_recent();
  test_extend_needs_an_open_sequence();
  test_random_against_brute_force();
  test_eviction_leaves_the_fresh_tree();
  test_bounded_memory();
  std::puts("suffix_tree_tests: ok");
  return 0;
}
