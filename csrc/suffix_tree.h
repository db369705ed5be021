// Depth-bounded suffix tree over token sequences: the index behind suffix-decoding drafts
// (SuffixDecoding, arXiv 2411.04975). Plain C++: token ids in, token ids out.
//
// Every suffix of every sequence is indexed up to `max_depth` tokens, as a path from the root
// of a compressed trie. A node counts the indexed suffixes that reach its bottom, so at any
// node the children's counts are the observed frequencies of the next token. Why this and not
// a suffix automaton (O(1) amortized per token): drafts need those frequencies, which no online
// structure keeps under O(depth) per token, and the global tree must drop old sequences, which
// an automaton cannot. Bounding the depth makes both cheap: appending a token moves the at
// most `max_depth` still-growing suffixes of the open sequence one token down (O(max_depth)),
// and dropping a sequence walks its suffixes once.
//
// Invariants (check_invariants() verifies all of them):
// - count(v) = ends(v) + sum of the children's counts, where ends(v) counts the suffixes that
//   end exactly at v's bottom; every suffix ends at a node's bottom, never inside an edge.
// - No redundant node: a node other than the root with one child has ends > 0.
// - A node's reference (seq, end) is an occurrence of its whole path, seqs[seq][end-depth, end),
//   and the newest one: every suffix that reaches a node sets it, and sequences only ever leave
//   in the order they came, so a node still referring to the oldest sequence is reached by
//   nothing else and is deleted with it.
// - best_child(v) (non-root) has the largest count among v's children (ties: the most recent).
//
// Only the last sequence is open (extendable); add() closes it. Not thread-safe: the Python
// adapter serializes calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

namespace ts {

// How far a draft goes. The draft follows the most frequent continuation of the longest
// matched suffix; it stops at `max_draft` tokens, at ceil(tokens_per_match * match_len) tokens
// (short matches are weak evidence), or when the estimated probability that the whole chain so
// far is accepted falls below `min_prob`.
struct DraftParams {
  int32_t max_draft;
  float min_prob;
  float tokens_per_match;
};

struct Draft {
  std::vector<int32_t> tokens;
  std::vector<float> probs;  // probs[i]: estimated probability that tokens[0..i] are all accepted
  int32_t match_len = 0;     // length of the matched suffix of the context
  float score = 0;           // sum of probs: the expected number of accepted tokens
};

// (parent node, token) -> child node, for the children of branching nodes (a lone child is
// its parent's first_child). Open addressing with linear probing and backward-shift deletion:
// one flat table for the whole tree instead of a map per node.
class ChildMap {
 public:
  ChildMap();
  int32_t find(int32_t parent, int32_t token) const;  // -1 if absent
  void set(int32_t parent, int32_t token, int32_t child);  // inserts or overwrites
  void erase(int32_t parent, int32_t token);               // the key must be present
  size_t size() const { return size_; }
  size_t memory_bytes() const;

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t key(int32_t parent, int32_t token);
  size_t home(uint64_t k) const;
  size_t slot_of(uint64_t k) const;  // the key's slot, or the empty slot where it would go
  void grow();

  struct Slot {
    uint64_t key;
    int32_t value;
  };
  std::vector<Slot> slots_;  // key and value side by side: one cache line per probe
  size_t size_ = 0;
  size_t mask_ = 0;
};

class SuffixTree {
 public:
  // max_depth >= 2: tokens of a suffix that are indexed. max_tokens > 0 bounds the tokens
  // held: add() and extend() drop the oldest closed sequences beyond it (0 = no bound).
  explicit SuffixTree(int32_t max_depth, int64_t max_tokens = 0);

  // Starts a new sequence (closing the open one) holding `tokens`.
  void add(std::span<const int32_t> tokens);
  // Appends to the open sequence; throws std::logic_error if there is none.
  void extend(std::span<const int32_t> tokens);

  // A draft continuing `context` (its last tokens matter; pass at least max_depth of them).
  Draft propose(std::span<const int32_t> context, const DraftParams& params) const;

  int32_t max_depth() const { return max_depth_; }
  int64_t max_tokens() const { return max_tokens_; }
  int64_t num_tokens() const { return num_tokens_; }
  int32_t num_sequences() const { return static_cast<int32_t>(seqs_.size()); }
  int64_t open_length() const;  // tokens of the open sequence (0 if none)
  int32_t num_nodes() const;    // live nodes, root included
  size_t memory_bytes() const;  // everything the tree holds, capacity included

  void check_invariants() const;  // throws std::logic_error naming the broken one

 private:
  struct Node {
    int32_t parent = -1;
    int32_t first_child = -1;
    int32_t next_sibling = -1;
    int32_t prev_sibling = -1;
    int32_t best_child = -1;  // kept for non-root nodes only
    int32_t count = 0;
    int32_t ends = 0;
    int32_t length = 0;  // tokens on the edge from the parent
    int32_t token = 0;   // the edge's first token (its key in the parent)
    uint32_t seq = 0;    // reference: seqs[seq][end - length, end) is the edge's label
    int32_t end = 0;
  };
  // A position on a path: `offset` tokens into `node`'s edge (offset == length: its bottom).
  struct Locus {
    int32_t node;
    int32_t offset;
  };
  static constexpr int32_t kRoot = 0;

  const std::vector<int32_t>& seq(uint32_t id) const { return seqs_[id - first_seq_]; }
  int32_t label(int32_t node, int32_t i) const;  // i-th token of the node's edge
  uint64_t recency(int32_t node) const;
  bool better(int32_t a, int32_t b) const;  // a beats b as the best child

  // Where the open sequence's newest token ends: a reference for the nodes its suffixes reach.
  struct Occurrence {
    uint32_t seq;
    int32_t end;
  };
  int32_t new_node(int32_t token, int32_t count, Occurrence at);  // a one-token edge, one end
  void free_node(int32_t n);
  void touch(int32_t n, Occurrence at);  // a suffix now ends at n's bottom: the newest one
  bool branching(int32_t node) const;  // two children or more: they are in children_
  void link_child(int32_t parent, int32_t child);
  void unlink_child(int32_t child);
  void rekey(int32_t child, int32_t old_token);  // after the child's first token changed
  void replace_child(int32_t old_child, int32_t new_child);  // new takes old's place
  void offer_best(int32_t parent, int32_t child);            // child grew or is newest
  void recompute_best(int32_t parent);

  void append(int32_t token);
  int32_t step(int32_t u, int32_t token);  // moves the suffix ending at u one token down
  int32_t find_child(int32_t u, int32_t token) const;
  void evict_oldest();
  void remove_suffix(const std::vector<int32_t>& s, size_t start);
  void delete_subtree_chain(int32_t n);
  void merge_if_redundant(int32_t n);
  void evict_over_budget();

  bool locate(std::span<const int32_t> pattern, Locus& out) const;
  bool continues(std::span<const int32_t> pattern, Locus& out) const;

  int32_t max_depth_;
  int64_t max_tokens_;
  int64_t num_tokens_ = 0;
  std::vector<Node> nodes_;
  std::vector<int32_t> free_;
  ChildMap children_;
  std::deque<std::vector<int32_t>> seqs_;  // seqs_[i] has id first_seq_ + i
  uint32_t first_seq_ = 0;
  bool open_ = false;                      // the last sequence takes extend()
  std::deque<int32_t> active_;             // open sequence's growing suffixes, deepest first
};

}  // namespace ts
