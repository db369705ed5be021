// Online step-time model: t = a + b*decode_tokens + c*prefill_tokens
//                             + d*kv_tokens_read + e*draft_tokens + f*eager
//                             + g*prefill_pairs,
// where `eager` marks a step that is not plain decode (it has prefill or drafts).
//
// g, prefill attention: a chunk of n new tokens after a prefix of P attends
// n*(P + (n+1)/2) query-key pairs, quadratic where the rest is linear. Without
// it, d (one KV read per token, for a decode row) took that cost too: fitted to
// 2K-token chunks over 16K prefixes, it came out several times a decode row's KV
// read, and the intercept went to 0 to pay for it, so a plain step's prediction
// fell with its context (an agentic run on an H200: 0.03 ms predicted for the
// 4 ms steps of a short request after long ones; a CPU simulation of it with
// an H100's fit: 0.6 ms for 5.9). Prior 0: where no prefill varies it, the
// ridge keeps it there.
//
// f, the extra fixed cost of such a step: a plain decode step replays a captured
// CUDA graph on a GPU, any other launches its kernels one by one (tens a layer).
// With one fixed cost for both, the long prefill steps pulled the plain steps'
// predictions to 3x what they measured (8B on an H200: 15 ms predicted for a
// 4.8 ms batch-1 step), and the TPS floor then held every waiting request back
// while one user decoded. Its prior is 0 (a CPU has no graphs): where the data
// cannot tell f from the per-token costs, the ridge keeps the one-intercept fit.
// A GQA model's steps of up to 2,048 tokens replay extend graphs too
// (appliance/model/extend_graph.py): f is then mostly their padding and the
// extend kernels' cost over the decode kernels', fitted like the rest.
//
// A speculative verify row counts as one decode token plus its draft tokens:
// its drafts cost far less than prefill tokens while a step is memory-bound
// and approach their cost once it is compute-bound, so they get their own
// coefficient, fitted on real step times like the others.
//
// Fitted by exponentially weighted least squares: the normal equations
// (X'WX, X'Wy) are kept as running sums with a forgetting factor, so an
// update is O(1) and the fit follows a drifting machine. Steps with and
// without prefill are kept in two groups, each forgotten only when a step of
// its own kind arrives: a long decode-only stretch must not erase what was
// learned about prefill cost (it would drift back to the prior). A ridge term pulls
// each coefficient toward its prior, which keeps the fit sane before data
// arrive and when a feature never varies. Coefficients are constrained
// non-negative by an active-set solve (clamp the most negative to 0, refit).
// A stall (a GC pause, a kernel compiled on first use, a profiler) is not what
// a step costs: an observation counts for at most kMaxRatio times the
// prediction, from the first step on (the first prefill of a fresh process
// compiles kernels: uncapped, its 0.9 s stayed in the prefill group for good). A
// machine slower than the prior still moves the fit, by up to that factor a step.
// A plain step counts for up to kMaxRatio times the recent plain steps' mean
// too, if that is more: plain steps are alike, and a fit can extrapolate far
// below them. On an H200 (8B, agentic bench) a fit learned on 16K-token
// contexts, whose intercept had gone to the KV term, predicted 0.03 ms for the
// 4 ms steps of a lone short request after them; capped at 4x that, the real
// steps took ~170 steps to move it.
#pragma once

#include <array>
#include <cstdint>

namespace ts {

struct StepFeatures {
  double decode_tokens = 0;
  double prefill_tokens = 0;
  double kv_tokens_read = 0;
  double draft_tokens = 0;  // verify rows' tokens after their first
  double prefill_pairs = 0;  // sum over prefill rows of n * (prefix + (n + 1) / 2)

  // Launched kernel by kernel (not a plain decode step, which may replay a graph).
  bool eager() const { return prefill_tokens > 0 || draft_tokens > 0; }
};

class CostModel {
 public:
  static constexpr int kN = 7;
  static constexpr int kEager = 5;  // index of f
  static constexpr int kPairs = 6;  // index of g
  static constexpr double kMaxRatio = 4.0;
  using Vec = std::array<double, kN>;

  // prior: {a seconds, b s/decode token, c s/prefill token, d s/kv token,
  //         e s/draft token, f seconds more for an eager step,
  //         g s/prefill query-key pair}.
  explicit CostModel(Vec prior = default_prior(), double forget = 0.98,
                     double prior_weight = 0.5);
  static Vec default_prior() { return {2e-3, 5e-5, 1e-4, 2e-8, 5e-5, 0.0, 0.0}; }
  // The query-key pairs of a prefill chunk of n tokens after `prefix` ones.
  static double pairs(double prefix, double n) { return n * (prefix + (n + 1) / 2); }

  void observe(const StepFeatures& f, double step_time_s);
  double predict(const StepFeatures& f) const;
  // The fixed cost a first prefill chunk adds to a step of features f (f's
  // eager term, unless the step is eager already).
  double eager_jump(const StepFeatures& f) const { return f.eager() ? 0 : coeffs()[kEager]; }
  const Vec& coeffs() const;
  // How many plain steps (no prefill) the fit has seen, forgetting counted:
  // with few, a prediction for one is mostly extrapolated from steps with prefill.
  double plain_weight() const { return xtx_[0][0][0]; }

 private:
  static Vec features(const StepFeatures& f);
  void solve() const;

  Vec prior_;
  Vec scale2_;  // ridge weight per coefficient (feature scale squared)
  double forget_;
  double prior_weight_;
  // [0]: decode-only steps, [1]: steps with prefill tokens.
  std::array<std::array<std::array<double, kN>, kN>, 2> xtx_{};
  std::array<Vec, 2> xty_{};
  double recent_plain_s_ = 0;  // exponentially weighted mean of plain steps' (capped) times
  mutable Vec coef_;
  mutable bool dirty_ = false;
};

}  // namespace ts
