#include "cost_model.h"

#include <algorithm>
#include <cmath>

namespace ts {
namespace {

// Typical feature magnitudes; the ridge term of coefficient i is
// prior_weight * scale_i^2, i.e. "prior_weight pseudo-steps of this size".
constexpr CostModel::Vec kScale = {1.0, 16.0, 128.0, 4096.0, 32.0, 1.0, 1048576.0};

// Solves A x = b restricted to the `active` coefficients (others are 0), by
// Gaussian elimination with partial pivoting. A is SPD so this is stable.
template <int N>
std::array<double, N> solve_active(std::array<std::array<double, N>, N> a,
                                   std::array<double, N> b,
                                   const std::array<bool, N>& active) {
  for (int i = 0; i < N; ++i) {
    if (active[i]) continue;
    for (int j = 0; j < N; ++j) a[i][j] = a[j][i] = 0;
    a[i][i] = 1;
    b[i] = 0;
  }
  for (int col = 0; col < N; ++col) {
    int piv = col;
    for (int r = col + 1; r < N; ++r)
      if (std::fabs(a[r][col]) > std::fabs(a[piv][col])) piv = r;
    std::swap(a[col], a[piv]);
    std::swap(b[col], b[piv]);
    double d = a[col][col];
    if (std::fabs(d) < 1e-300) continue;
    for (int r = col + 1; r < N; ++r) {
      double f = a[r][col] / d;
      for (int c = col; c < N; ++c) a[r][c] -= f * a[col][c];
      b[r] -= f * b[col];
    }
  }
  std::array<double, N> x{};
  for (int r = N - 1; r >= 0; --r) {
    double s = b[r];
    for (int c = r + 1; c < N; ++c) s -= a[r][c] * x[c];
    x[r] = std::fabs(a[r][r]) < 1e-300 ? 0 : s / a[r][r];
  }
  return x;
}

}  // namespace

CostModel::CostModel(Vec prior, double forget, double prior_weight)
    : prior_(prior), forget_(forget), prior_weight_(prior_weight), coef_(prior) {
  for (int i = 0; i < kN; ++i) scale2_[i] = kScale[i] * kScale[i];
}

CostModel::Vec CostModel::features(const StepFeatures& f) {
  return {1.0, f.decode_tokens, f.prefill_tokens, f.kv_tokens_read, f.draft_tokens,
          f.eager() ? 1.0 : 0.0, f.prefill_pairs};
}

void CostModel::observe(const StepFeatures& f, double step_time_s) {
  // 0 (the binding's default) means "not measured": no information.
  if (!(step_time_s > 0) || !std::isfinite(step_time_s)) return;
  const bool plain = f.prefill_tokens <= 0;
  double cap = kMaxRatio * std::max(predict(f), plain ? recent_plain_s_ : 0.0);
  if (cap > 0) step_time_s = std::min(step_time_s, cap);
  if (plain)
    recent_plain_s_ = recent_plain_s_ > 0
                          ? forget_ * recent_plain_s_ + (1 - forget_) * step_time_s
                          : step_time_s;
  Vec x = features(f);
  auto& a = xtx_[plain ? 0 : 1];
  auto& b = xty_[plain ? 0 : 1];
  for (int i = 0; i < kN; ++i) {
    for (int j = 0; j < kN; ++j) a[i][j] = forget_ * a[i][j] + x[i] * x[j];
    b[i] = forget_ * b[i] + x[i] * step_time_s;
  }
  dirty_ = true;
}

void CostModel::solve() const {
  auto a = xtx_[0];
  Vec b = xty_[0];
  for (int i = 0; i < kN; ++i) {
    for (int j = 0; j < kN; ++j) a[i][j] += xtx_[1][i][j];
    b[i] += xty_[1][i];
  }
  for (int i = 0; i < kN; ++i) {
    double r = prior_weight_ * scale2_[i];
    a[i][i] += r;
    b[i] += r * prior_[i];
  }
  std::array<bool, kN> active;
  active.fill(true);
  Vec x{};
  // At most kN rounds: each clamps one more coefficient to zero.
  for (int round = 0; round <= kN; ++round) {
    x = solve_active<kN>(a, b, active);
    int worst = -1;
    for (int i = 0; i < kN; ++i)
      if (active[i] && x[i] < 0 && (worst < 0 || x[i] < x[worst])) worst = i;
    if (worst < 0) break;
    active[worst] = false;
  }
  for (double& v : x) v = v < 0 ? 0 : v;
  coef_ = x;
  dirty_ = false;
}

const CostModel::Vec& CostModel::coeffs() const {
  if (dirty_) solve();
  return coef_;
}

double CostModel::predict(const StepFeatures& f) const {
  const Vec& c = coeffs();
  Vec x = features(f);
  double t = 0;
  for (int i = 0; i < kN; ++i) t += c[i] * x[i];
  return t;
}

}  // namespace ts
