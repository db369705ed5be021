#include "suffix_tree.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ts {

// ---------------------------------------------------------------------------------------------
// ChildMap

ChildMap::ChildMap() : slots_(16, Slot{kEmpty, -1}), mask_(15) {}

uint64_t ChildMap::key(int32_t parent, int32_t token) {
  return (uint64_t{static_cast<uint32_t>(parent)} << 32) | static_cast<uint32_t>(token);
}

size_t ChildMap::home(uint64_t k) const {
  // splitmix64's finalizer: parents and tokens are small dense integers.
  k ^= k >> 30;
  k *= 0xbf58476d1ce4e5b9ULL;
  k ^= k >> 27;
  k *= 0x94d049bb133111ebULL;
  k ^= k >> 31;
  return static_cast<size_t>(k) & mask_;
}

size_t ChildMap::slot_of(uint64_t k) const {
  size_t i = home(k);
  while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask_;
  return i;
}

int32_t ChildMap::find(int32_t parent, int32_t token) const {
  const Slot& s = slots_[slot_of(key(parent, token))];
  return s.key == kEmpty ? -1 : s.value;
}

void ChildMap::set(int32_t parent, int32_t token, int32_t child) {
  if (2 * (size_ + 1) > slots_.size()) grow();  // load factor <= 1/2
  const uint64_t k = key(parent, token);
  Slot& s = slots_[slot_of(k)];
  if (s.key == kEmpty) {
    s.key = k;
    ++size_;
  }
  s.value = child;
}

void ChildMap::erase(int32_t parent, int32_t token) {
  size_t i = slot_of(key(parent, token));
  if (slots_[i].key == kEmpty) throw std::logic_error("ChildMap::erase: no such key");
  // Backward shift: pull later keys of the probe run into the hole when the hole lies
  // (cyclically) between their home slot and where they sit.
  for (size_t j = i;;) {
    j = (j + 1) & mask_;
    if (slots_[j].key == kEmpty) break;
    const size_t h = home(slots_[j].key);
    const bool movable = j > i ? (h <= i || h > j) : (h <= i && h > j);
    if (movable) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i] = Slot{kEmpty, -1};
  --size_;
}

void ChildMap::grow() {
  std::vector<Slot> old(slots_.size() * 2, Slot{kEmpty, -1});
  old.swap(slots_);
  mask_ = slots_.size() - 1;
  for (const Slot& s : old) {
    if (s.key != kEmpty) slots_[slot_of(s.key)] = s;
  }
}

size_t ChildMap::memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

// ---------------------------------------------------------------------------------------------
// SuffixTree: bookkeeping

SuffixTree::SuffixTree(int32_t max_depth, int64_t max_tokens)
    : max_depth_(max_depth), max_tokens_(max_tokens) {
  if (max_depth < 2) throw std::invalid_argument("SuffixTree: max_depth must be >= 2");
  if (max_tokens < 0) throw std::invalid_argument("SuffixTree: max_tokens must be >= 0");
  nodes_.emplace_back();  // the root
}

int32_t SuffixTree::label(int32_t node, int32_t i) const {
  const Node& n = nodes_[node];
  return seq(n.seq)[n.end - n.length + i];
}

// Only children of branching nodes are in the map; of those, the best one is the likely one
// and checking it first saves a probe.
int32_t SuffixTree::find_child(int32_t u, int32_t token) const {
  const int32_t first = nodes_[u].first_child;
  if (first < 0) return -1;
  if (nodes_[first].next_sibling < 0) return nodes_[first].token == token ? first : -1;
  const int32_t best = nodes_[u].best_child;
  if (best >= 0 && nodes_[best].token == token) return best;
  return children_.find(u, token);
}

// Where the node's edge starts in its reference, the newest occurrence: among siblings, the
// later start is the more recent continuation.
uint64_t SuffixTree::recency(int32_t node) const {
  const Node& n = nodes_[node];
  return (uint64_t{n.seq - first_seq_} << 32) | static_cast<uint32_t>(n.end - n.length);
}

bool SuffixTree::better(int32_t a, int32_t b) const {
  const int32_t ca = nodes_[a].count, cb = nodes_[b].count;
  return ca > cb || (ca == cb && recency(a) > recency(b));
}

int64_t SuffixTree::open_length() const {
  return open_ ? static_cast<int64_t>(seqs_.back().size()) : 0;
}

int32_t SuffixTree::num_nodes() const {
  return static_cast<int32_t>(nodes_.size() - free_.size());
}

size_t SuffixTree::memory_bytes() const {
  size_t total = sizeof(*this) + nodes_.capacity() * sizeof(Node) +
                 free_.capacity() * sizeof(int32_t) + children_.memory_bytes() +
                 active_.size() * sizeof(int32_t);
  for (const auto& s : seqs_) total += s.capacity() * sizeof(int32_t);
  return total;
}

int32_t SuffixTree::new_node(int32_t token, int32_t count, Occurrence at) {
  int32_t n;
  if (!free_.empty()) {
    n = free_.back();
    free_.pop_back();
  } else {
    n = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& node = nodes_[n];
  node.length = 1;
  node.token = token;
  node.count = count;
  node.ends = 1;  // the suffix that made it ends here
  node.seq = at.seq;
  node.end = at.end;
  return n;
}

void SuffixTree::touch(int32_t n, Occurrence at) {
  nodes_[n].seq = at.seq;
  nodes_[n].end = at.end;
  offer_best(nodes_[n].parent, n);
}

void SuffixTree::free_node(int32_t n) {
  nodes_[n] = Node{};
  free_.push_back(n);
}

bool SuffixTree::branching(int32_t n) const {
  const int32_t first = nodes_[n].first_child;
  return first >= 0 && nodes_[first].next_sibling >= 0;
}

void SuffixTree::link_child(int32_t parent, int32_t child) {
  const int32_t first = nodes_[parent].first_child;
  if (first >= 0 && nodes_[first].next_sibling < 0) {  // the parent starts branching
    children_.set(parent, nodes_[first].token, first);
  }
  if (first >= 0) children_.set(parent, nodes_[child].token, child);
  Node& c = nodes_[child];
  c.parent = parent;
  c.prev_sibling = -1;
  c.next_sibling = first;
  if (first >= 0) nodes_[first].prev_sibling = child;
  nodes_[parent].first_child = child;
}

void SuffixTree::unlink_child(int32_t child) {
  Node& c = nodes_[child];
  const int32_t parent = c.parent;
  if (branching(parent)) children_.erase(parent, c.token);
  if (c.prev_sibling >= 0) {
    nodes_[c.prev_sibling].next_sibling = c.next_sibling;
  } else {
    nodes_[c.parent].first_child = c.next_sibling;
  }
  if (c.next_sibling >= 0) nodes_[c.next_sibling].prev_sibling = c.prev_sibling;
  c.parent = c.prev_sibling = c.next_sibling = -1;
  const int32_t first = nodes_[parent].first_child;
  if (first >= 0 && nodes_[first].next_sibling < 0) {  // the parent stops branching
    children_.erase(parent, nodes_[first].token);
  }
}

void SuffixTree::rekey(int32_t child, int32_t old_token) {
  const int32_t parent = nodes_[child].parent;
  if (!branching(parent)) return;
  children_.erase(parent, old_token);
  children_.set(parent, nodes_[child].token, child);
}

void SuffixTree::replace_child(int32_t old_child, int32_t new_child) {
  Node& o = nodes_[old_child];
  Node& n = nodes_[new_child];
  n.parent = o.parent;
  n.prev_sibling = o.prev_sibling;
  n.next_sibling = o.next_sibling;
  if (o.prev_sibling >= 0) {
    nodes_[o.prev_sibling].next_sibling = new_child;
  } else {
    nodes_[o.parent].first_child = new_child;
  }
  if (o.next_sibling >= 0) nodes_[o.next_sibling].prev_sibling = new_child;
  if (branching(o.parent)) children_.set(o.parent, o.token, new_child);
  if (nodes_[o.parent].best_child == old_child) nodes_[o.parent].best_child = new_child;
  o.parent = o.prev_sibling = o.next_sibling = -1;
}

void SuffixTree::offer_best(int32_t parent, int32_t child) {
  if (parent == kRoot) return;  // drafts never start at the root: skip its wide scan
  int32_t& best = nodes_[parent].best_child;
  if (best != child && (best < 0 || better(child, best))) best = child;
}

void SuffixTree::recompute_best(int32_t parent) {
  if (parent == kRoot) return;
  int32_t best = -1;
  for (int32_t c = nodes_[parent].first_child; c >= 0; c = nodes_[c].next_sibling) {
    if (best < 0 || better(c, best)) best = c;
  }
  nodes_[parent].best_child = best;
}

// ---------------------------------------------------------------------------------------------
// Growing

void SuffixTree::add(std::span<const int32_t> tokens) {
  open_ = false;
  active_.clear();
  if (max_tokens_ > 0) {
    while (!seqs_.empty() && num_tokens_ + static_cast<int64_t>(tokens.size()) > max_tokens_) {
      evict_oldest();
    }
  }
  seqs_.emplace_back();
  seqs_.back().reserve(tokens.size());
  open_ = true;
  for (int32_t t : tokens) append(t);
}

void SuffixTree::extend(std::span<const int32_t> tokens) {
  if (!open_) throw std::logic_error("SuffixTree::extend: no open sequence (call add first)");
  if (max_tokens_ > 0) {
    while (seqs_.size() > 1 && num_tokens_ + static_cast<int64_t>(tokens.size()) > max_tokens_) {
      evict_oldest();
    }
  }
  for (int32_t t : tokens) append(t);
}

void SuffixTree::append(int32_t token) {
  seqs_.back().push_back(token);
  ++num_tokens_;
  nodes_[kRoot].count += 1;  // the new, empty suffix
  nodes_[kRoot].ends += 1;
  active_.push_back(kRoot);
  for (int32_t& node : active_) node = step(node, token);
  // Depths are now 1..size: the deepest reached max_depth and stops growing.
  if (static_cast<int32_t>(active_.size()) >= max_depth_) active_.pop_front();
}

int32_t SuffixTree::step(int32_t u, int32_t token) {
  const Occurrence at{first_seq_ + static_cast<uint32_t>(seqs_.size() - 1),
                      static_cast<int32_t>(seqs_.back().size())};
  const int32_t c = find_child(u, token);
  if (c >= 0) {
    if (u != kRoot && nodes_[u].count == nodes_[c].count + 1) {
      // This suffix is the only one ending at u and everything else continues into c, so u
      // would be left redundant: fold it instead of going down.
      if (nodes_[c].length == 1) {  // c takes u's place, its edge now u's edge + token
        unlink_child(c);
        Node& cn = nodes_[c];
        cn.length = nodes_[u].length + 1;
        cn.token = nodes_[u].token;
        cn.count += 1;
        cn.ends += 1;
        replace_child(u, c);
        free_node(u);
        touch(c, at);
        return c;
      }
      // Slide the boundary: u's edge gains the token, c's edge loses it.
      nodes_[c].length -= 1;
      nodes_[c].token = label(c, 0);
      rekey(c, token);
      nodes_[u].length += 1;
      touch(u, at);
      return u;
    }
    if (nodes_[c].length == 1) {  // go down into c
      nodes_[u].ends -= 1;
      nodes_[c].count += 1;
      nodes_[c].ends += 1;
      touch(c, at);
      return c;
    }
    // Split c after its first token: w = [token] ending here, c keeps the rest below w.
    const int32_t w = new_node(token, nodes_[c].count + 1, at);
    replace_child(c, w);
    nodes_[c].length -= 1;
    nodes_[c].token = label(c, 0);
    link_child(w, c);
    nodes_[w].best_child = c;
    nodes_[u].ends -= 1;
    offer_best(u, w);
    return w;
  }
  if (u != kRoot && nodes_[u].count == 1) {  // a leaf only this suffix reaches: grow its edge
    nodes_[u].length += 1;
    touch(u, at);
    return u;
  }
  const int32_t x = new_node(token, 1, at);  // a new leaf
  link_child(u, x);
  nodes_[u].ends -= 1;
  offer_best(u, x);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Dropping the oldest sequence

void SuffixTree::evict_oldest() {
  const std::vector<int32_t>& s = seqs_.front();
  for (size_t start = 0; start < s.size(); ++start) remove_suffix(s, start);
  num_tokens_ -= static_cast<int64_t>(s.size());
  seqs_.pop_front();
  ++first_seq_;
  if (seqs_.empty()) {
    open_ = false;
    active_.clear();
  }
}

void SuffixTree::remove_suffix(const std::vector<int32_t>& s, size_t start) {
  const int32_t limit = static_cast<int32_t>(std::min<size_t>(max_depth_, s.size() - start));
  nodes_[kRoot].count -= 1;
  int32_t u = kRoot;
  for (int32_t depth = 0; depth < limit;) {
    const int32_t c = find_child(u, s[start + depth]);
    if (c < 0) throw std::logic_error("SuffixTree: an evicted suffix was not indexed");
    nodes_[c].count -= 1;
    depth += nodes_[c].length;
    if (nodes_[c].count == 0) {  // only this suffix went below u this way
      unlink_child(c);
      delete_subtree_chain(c);
      if (nodes_[u].best_child == c) recompute_best(u);
      merge_if_redundant(u);
      return;
    }
    if (nodes_[u].best_child == c) recompute_best(u);
    u = c;
  }
  nodes_[u].ends -= 1;
  merge_if_redundant(u);
}

void SuffixTree::delete_subtree_chain(int32_t n) {
  std::vector<int32_t> stack{n};
  while (!stack.empty()) {
    const int32_t x = stack.back();
    stack.pop_back();
    const bool in_map = branching(x);
    for (int32_t c = nodes_[x].first_child; c >= 0; c = nodes_[c].next_sibling) {
      if (in_map) children_.erase(x, nodes_[c].token);
      stack.push_back(c);
    }
    free_node(x);
  }
}

void SuffixTree::merge_if_redundant(int32_t v) {
  if (v == kRoot) return;
  const Node& vn = nodes_[v];
  if (vn.ends != 0 || vn.first_child < 0 || nodes_[vn.first_child].next_sibling >= 0) return;
  const int32_t c = vn.first_child;  // its only child, with the same count: absorb v into it
  unlink_child(c);
  nodes_[c].length += nodes_[v].length;
  nodes_[c].token = nodes_[v].token;
  replace_child(v, c);
  free_node(v);
}

// ---------------------------------------------------------------------------------------------
// Drafting

bool SuffixTree::locate(std::span<const int32_t> pattern, Locus& out) const {
  int32_t node = kRoot, offset = 0;
  for (int32_t token : pattern) {
    if (offset == nodes_[node].length) {
      const int32_t c = find_child(node, token);
      if (c < 0) return false;
      node = c;
      offset = 1;
    } else if (label(node, offset) == token) {
      ++offset;
    } else {
      return false;
    }
  }
  out = {node, offset};
  return true;
}

bool SuffixTree::continues(std::span<const int32_t> pattern, Locus& out) const {
  return locate(pattern, out) &&
         (out.offset < nodes_[out.node].length || nodes_[out.node].first_child >= 0);
}

Draft SuffixTree::propose(std::span<const int32_t> context, const DraftParams& params) const {
  Draft d;
  const int32_t k = params.max_draft;
  if (k <= 0 || context.empty()) return d;
  // Leave room below the match for a whole draft (the tree ends at max_depth).
  const int32_t longest =
      static_cast<int32_t>(std::min<size_t>(context.size(), std::max(1, max_depth_ - k)));
  auto tail = [&](int32_t p) { return context.subspan(context.size() - p); };
  // A suffix that continues somewhere has shorter suffixes that do too: binary search.
  Locus at{};
  if (!continues(tail(1), at)) return d;
  int32_t lo = 1, hi = longest;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (continues(tail(mid), at)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  locate(tail(lo), at);
  d.match_len = lo;
  const int32_t cap = std::min(
      k, std::max(1, static_cast<int32_t>(std::ceil(params.tokens_per_match * lo - 1e-6f))));
  float prob = 1.0f;
  int32_t node = at.node, offset = at.offset;
  while (static_cast<int32_t>(d.tokens.size()) < cap) {
    const Node& n = nodes_[node];
    if (offset == n.length) {
      // Suffixes that end here say nothing about what follows: the continuation's frequency
      // is among those that go on.
      if (n.best_child < 0) break;
      prob *= static_cast<float>(nodes_[n.best_child].count) / static_cast<float>(n.count - n.ends);
      if (prob < params.min_prob) break;
      node = n.best_child;
      offset = 0;
      continue;
    }
    d.tokens.push_back(label(node, offset++));
    d.probs.push_back(prob);
    d.score += prob;
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Invariants

void SuffixTree::check_invariants() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error("SuffixTree invariant broken: " + what);
  };
  // 1. The tree, walked from the root.
  std::vector<char> seen(nodes_.size(), 0);
  std::vector<std::pair<int32_t, int32_t>> stack{{kRoot, 0}};  // node, depth of its bottom
  int64_t live = 0, map_entries = 0;
  while (!stack.empty()) {
    const auto [v, depth] = stack.back();
    stack.pop_back();
    if (seen[v]) fail("a node is reached twice");
    seen[v] = 1;
    ++live;
    const Node& n = nodes_[v];
    if (v != kRoot) {
      if (n.length < 1 || n.count < 1) fail("an empty node");
      if (n.token != label(v, 0)) fail("a node's first token");
      if (depth > max_depth_) fail("a node deeper than max_depth");
      if (static_cast<uint32_t>(n.seq - first_seq_) >= seqs_.size()) {
        fail("a reference to a dropped sequence");
      }
      const std::vector<int32_t>& s = seq(n.seq);
      if (n.end > static_cast<int32_t>(s.size()) || n.end < depth) fail("a reference out of range");
      int32_t pos = n.end;
      for (int32_t x = v; x != kRoot; x = nodes_[x].parent) {
        for (int32_t i = nodes_[x].length - 1; i >= 0; --i) {
          if (label(x, i) != s[--pos]) fail("a reference that does not spell the node's path");
        }
      }
    }
    int64_t child_sum = 0;
    int32_t num_children = 0, top = -1, prev = -1;
    for (int32_t c = n.first_child; c >= 0; c = nodes_[c].next_sibling) {
      const Node& cn = nodes_[c];
      if (cn.parent != v || cn.prev_sibling != prev) fail("parent or sibling links");
      map_entries += branching(v) ? 1 : 0;
      if (branching(v) ? children_.find(v, cn.token) != c : children_.find(v, cn.token) != -1) {
        fail("the child map (it holds the children of branching nodes, only)");
      }
      prev = c;
      child_sum += cn.count;
      ++num_children;
      if (top < 0 || cn.count > nodes_[top].count) top = c;
      stack.emplace_back(c, depth + cn.length);
    }
    if (n.ends < 0 || n.count != n.ends + child_sum) fail("count != ends + children's counts");
    if (v == kRoot) continue;
    if (n.ends == 0 && num_children == 1) fail("a redundant node (one child, no suffix ends)");
    const bool best_ok = num_children == 0
                             ? n.best_child == -1
                             : n.best_child >= 0 && nodes_[n.best_child].parent == v &&
                                   nodes_[n.best_child].count == nodes_[top].count;
    if (!best_ok) fail("best_child is not a most frequent child");
  }
  if (live != num_nodes()) fail("live nodes != allocated - freed");
  if (static_cast<int64_t>(children_.size()) != map_entries) fail("child map size");

  // 2. Every suffix of every sequence, truncated at max_depth, is a path ending at a node's
  //    bottom, and the counts are exactly these suffixes.
  std::vector<int32_t> reach(nodes_.size(), 0), ends(nodes_.size(), 0);
  int64_t total = 0;
  auto walk = [&](const std::vector<int32_t>& s, size_t start) {
    const int32_t limit = static_cast<int32_t>(std::min<size_t>(max_depth_, s.size() - start));
    int32_t node = kRoot;
    for (int32_t depth = 0; depth < limit;) {
      const int32_t c = find_child(node, s[start + depth]);
      if (c < 0) fail("a suffix that is not indexed");
      if (depth + nodes_[c].length > limit) fail("a suffix that ends inside an edge");
      for (int32_t i = 0; i < nodes_[c].length; ++i) {
        if (label(c, i) != s[start + depth + i]) fail("a suffix that leaves its path");
      }
      depth += nodes_[c].length;
      node = c;
      ++reach[c];
    }
    return node;
  };
  for (const auto& s : seqs_) {
    total += static_cast<int64_t>(s.size());
    for (size_t start = 0; start < s.size(); ++start) ++ends[walk(s, start)];
  }
  reach[kRoot] = static_cast<int32_t>(total);
  if (total != num_tokens_) fail("num_tokens");
  for (size_t v = 0; v < nodes_.size(); ++v) {
    if (!seen[v]) continue;
    if (reach[v] != nodes_[v].count || ends[v] != nodes_[v].ends) {
      fail("counts do not match the indexed suffixes");
    }
  }

  // 3. The open sequence's growing suffixes, deepest first.
  if (!open_) {
    if (!active_.empty()) fail("growing suffixes without an open sequence");
    return;
  }
  const std::vector<int32_t>& s = seqs_.back();
  const size_t growing = std::min<size_t>(max_depth_ - 1, s.size());
  if (active_.size() != growing) fail("number of growing suffixes");
  for (size_t j = 0; j < growing; ++j) {
    if (active_[j] != walk(s, s.size() - growing + j)) fail("a growing suffix's node");
  }
}

}  // namespace ts
