// The per-anchor math of the mining losses, written once for the CPU and CUDA kernels, which only map
// anchors (rows of the (N, M) distance matrix d between anchors and references) onto threads around it.
// T is float or double.
//
// Anchor i with label yi and excluded reference column excl (the anchor itself, or -1: none); its row d of
// M reference distances with reference labels ry: positives j (ry_j == yi, j != excl), negatives k
// (ry_k != yi, k != excl). Mining a batch against itself is M = N, ry = labels, excl = i. excl is only
// compared, never dereferenced, so any value is memory-safe. Each forward row function writes
// the anchor's loss sum (double) and its counts (write_counts); the
// backward row functions write row i of dL/dd, scaled by `scale` (the upstream gradient over the loss's
// denominator). Ties go to the lowest index. The hinge tests are written alike forward and backward, so
// that a triplet counted as active in one is active in the other.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "triplet_math.h"  // TL_HD

namespace tripletloss {
namespace mining {

// Columns of the per-anchor counts: valid, active and mined triplets, then whether the anchor has a valid and an
// active triplet (0 or 1). Summed over the anchors, they are the stats vector (reference.STATS_FIELDS).
constexpr int kValid = 0, kActive = 1, kMined = 2, kValidAnchor = 3, kActiveAnchor = 4, kCounts = 5;

// The role of reference column k for an anchor: the row functions take it as a functor role(k), so that the same
// code serves rows described by labels (LabelRole: ry_k == yi, k != excl) and rows whose positives come from a
// per-row mask (the CPU's fused mining on a Gram block).
constexpr int kNegative = 0, kPositive = 1, kExcluded = 2;
struct LabelRole {
  const int64_t* ry;
  int64_t yi, excl;
  TL_HD int operator()(int64_t k) const { return k == excl ? kExcluded : ry[k] == yi ? kPositive : kNegative; }
};

TL_HD void write_counts(int64_t* counts, int64_t valid, int64_t active, int64_t mined) {
  counts[kValid] = valid;
  counts[kActive] = active;
  counts[kMined] = mined;
  counts[kValidAnchor] = valid > 0;
  counts[kActiveAnchor] = active > 0;
}

TL_HD float tl_exp(float x) { return expf(x); }
TL_HD double tl_exp(double x) { return exp(x); }
TL_HD float tl_log1p(float x) { return log1pf(x); }
TL_HD double tl_log1p(double x) { return log1p(x); }

// log(1 + e^x) without overflow, and its derivative.
template <typename T>
TL_HD T softplus(T x) {
  return x > T(0) ? x + tl_log1p(tl_exp(-x)) : tl_log1p(tl_exp(x));
}
template <typename T>
TL_HD T sigmoid(T x) {
  return T(1) / (T(1) + tl_exp(-x));
}

// The number of leading elements of the ascending s[0, n) that are < v.
template <typename T>
TL_HD int64_t count_below(const T* s, int64_t n, T v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (s[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// count_below for the short rows of positives the CPU mining sees most (a class of a few dozen samples): binary
// steps down to a run of 16, then a branch-free count of the run, which the compiler vectorizes; the same result,
// since the elements < v of an ascending s (NaN last) are a prefix. s must be readable up to padded(n) (16, 32 or
// 64 for a short row) and hold +inf past n (which no v exceeds; CPU callers pad their sorted positives so).
// prefix_count is the search, for any predicate true on a prefix of the padded row.
constexpr int64_t kShortPositives = 64;
TL_HD int64_t padded(int64_t n) { return n <= 16 ? 16 : n <= 32 ? 32 : n <= 64 ? 64 : n; }
template <typename T, typename Pred>
TL_HD int64_t prefix_count(const T* s, int64_t n, Pred&& pred) {
  int64_t c = 0;
  for (int64_t h = padded(n) / 2; h >= 16; h /= 2) c += pred(s[c + h - 1]) ? h : 0;
  int32_t k = 0;
#pragma omp simd reduction(+ : k)
  for (int32_t t = 0; t < 16; ++t) k += pred(s[c + t]) ? 1 : 0;
  return c + k;
}
template <typename T>
TL_HD int64_t count_below_short(const T* s, int64_t n, T v) {
  return prefix_count(s, n, [v](T x) { return x < v; });
}

// Counting a row's thresholds by table (the CPU's fused mining places every negative among its anchor's few positives:
// the inner loop of batch-all and semi-hard): q cells split [s[0], s[n-1]] of an ascending, finite s; cell(x) is
// monotone in x, so the thresholds below x's cell all come before x and those above it after: count_in(cell(x), s,
// pred) for a
// predicate true on a prefix of s (x < s[t]'s negation, s[t] < x) is the number of thresholds in lower cells plus a
// scan of x's own cell (usually empty). base: scratch of q + 3 counts. x may be infinite but not NaN; rows with a NaN
// (in s or among the values placed) or an infinite threshold take the searches above instead (usable()).
template <typename T>
struct Cells {
  T lo = 0, scale = 0;
  int32_t q = 0;
  int32_t* base = nullptr;  // base[c]: the thresholds in cells below c, for c in [0, q + 2]
  static TL_HD bool usable(const T* s, int64_t n) {
    return n > 0 && s[0] - s[0] == T(0) && s[n - 1] - s[n - 1] == T(0);  // finite (NaN sorts last)
  }
  static TL_HD int32_t cells_for(int64_t n) { return int32_t(n < 4 ? 64 : n > 64 ? 1024 : 16 * n); }
  // Cell 0 is below s[0], cells 1 to q split [s[0], s[n-1]] (s[n-1] in cell q or q - 1), cell q + 1 is above: values
  // outside the thresholds' range land in an empty cell. f >= 0 before the truncation, so it rounds down.
  TL_HD int32_t cell(T x) const {
    T f = (x - lo) * scale + T(1);
    f = f < T(0) ? T(0) : f;
    f = f > T(q + 1) ? T(q + 1) : f;
    return int32_t(f);
  }
  TL_HD void build(const T* s, int64_t n, int32_t* scratch) {
    q = cells_for(n), base = scratch, lo = s[0];
    scale = T(q - 1) / (s[n - 1] - s[0]);                        // any positive finite scale keeps cell() monotone:
    if (!(scale > T(0) && scale - scale == T(0))) scale = T(1);  // all thresholds (nearly) equal
    for (int32_t c = 0; c < q + 3; ++c) base[c] = 0;
    for (int64_t t = 0; t < n; ++t) ++base[cell(s[t]) + 1];
    for (int32_t c = 1; c < q + 3; ++c) base[c] += base[c - 1];
  }
  // The cells of x[0, m) into c (a loop the compiler vectorizes), for count_in.
  TL_HD void cells_of(const T* x, int64_t m, int32_t* c) const {
#pragma omp simd
    for (int64_t k = 0; k < m; ++k) c[k] = cell(x[k]);
  }
  template <typename Pred>
  TL_HD int64_t count_in(int32_t c, const T* s, Pred&& pred) const {
    int64_t t = base[c];
    const int64_t end = base[c + 1];
    while (t < end && pred(s[t])) ++t;
    return t;
  }
};

// Bits of v that order as v does (no NaN; -0 as +0, which compares equal to it): the CUDA semi-hard kernel's
// integer atomicMin key, and the CPU's integer sort keys of a row's positives.
template <typename T>
TL_HD unsigned long long ordered_bits(T v) {
  v = v + T(0);
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, unsigned long long>;
  U u;
  memcpy(&u, &v, sizeof(T));
  constexpr U sign = U(1) << (8 * sizeof(T) - 1);
  return (u & sign) ? ~u : (u | sign);
}

// Total orders on (distance, column), so that a scan in any order or a tree of partial results picks the same
// element (NaN, which compares false with everything, is ordered explicitly: it wins, so that it is not skipped).
// harder_positive: (v, j) is a harder positive than (b_v, b): larger distance, NaN the hardest, the lower column
// among ties; b < 0 is no element yet. harder_negative: smaller distance, NaN the hardest.
template <typename T>
TL_HD bool harder_positive(T v, int64_t j, T b_v, int64_t b) {
  if (b < 0) return true;
  const bool nan = v != v, b_nan = b_v != b_v;
  if (nan != b_nan) return nan;
  if (!nan && v != b_v) return v > b_v;
  return j < b;
}
template <typename T>
TL_HD bool harder_negative(T v, int64_t j, T b_v, int64_t b) {
  if (b < 0) return true;
  const bool nan = v != v, b_nan = b_v != b_v;
  if (nan != b_nan) return nan;
  if (!nan && v != b_v) return v < b_v;
  return j < b;
}
// The order of the sorted positives of batch-all and semi-hard: ascending distance, NaN last, the lower column
// among ties (a strict weak order even with NaN distances).
template <typename T>
TL_HD bool sorts_before(T a, int64_t a_j, T b, int64_t b_j) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a < b;
  return a_j < b_j;
}

// The loss of a triplet with hinge argument x = d_ij - d_ik (soft: log(1 + e^x)) and its derivative in x.
template <typename T>
TL_HD T hard_loss(T x, T margin, bool soft) {
  return soft ? softplus(x) : (margin + x > T(0) ? margin + x : T(0));
}
template <typename T>
TL_HD T hard_weight(T x, T margin, bool soft) {
  return soft ? sigmoid(x) : (margin + x > T(0) ? T(1) : T(0));
}

// Batch-hard: the hardest positive (largest d_ij) and negative (smallest d_ik), lowest index among ties.
// mined[0..1] = {j, k}, or {-1, -1} for an anchor without a positive or a negative. The result of a row whose
// hardest pair (p, q) and numbers of positives and negatives are known (the CUDA kernels find them in parallel):
template <typename T>
TL_HD void batch_hard_values(T dp, T dq, int64_t p, int64_t q, int64_t n_pos, int64_t n_neg, T margin, bool soft,
                             double* loss, int64_t* counts, int64_t* mined) {
  const bool valid = n_pos > 0 && n_neg > 0;
  const T l = valid ? hard_loss(dp - dq, margin, soft) : T(0);
  *loss = l;
  write_counts(counts, n_pos * n_neg, valid && l > T(0), valid);
  mined[0] = valid ? p : -1;
  mined[1] = valid ? q : -1;
}
template <typename T>
TL_HD void batch_hard_result(const T* d, int64_t p, int64_t q, int64_t n_pos, int64_t n_neg, T margin, bool soft,
                             double* loss, int64_t* counts, int64_t* mined) {
  const bool valid = n_pos > 0 && n_neg > 0;
  batch_hard_values(valid ? d[p] : T(0), valid ? d[q] : T(0), p, q, n_pos, n_neg, margin, soft, loss, counts, mined);
}

// The CPU's vectorized scans of a row whose non-candidates are set to a value that never wins (+inf for a minimum,
// -inf for a maximum): the first column holding the row's minimum (maximum), or -1 when the row holds a NaN or no
// finite extremum; the caller then takes the exact scan (harder_negative / harder_positive, which order NaN).
template <typename T>
TL_HD int64_t first_min(const T* d, int64_t m) {
  T lo = INFINITY;
  int nan = 0;
#pragma omp simd reduction(min : lo) reduction(| : nan)
  for (int64_t k = 0; k < m; ++k) lo = d[k] < lo ? d[k] : lo, nan |= d[k] != d[k];
  if (nan || !(lo < T(INFINITY))) return -1;
  int64_t k = 0;
  while (d[k] != lo) ++k;
  return k;
}
template <typename T>
TL_HD int64_t first_max(const T* d, int64_t m) {
  T hi = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : hi) reduction(| : nan)
  for (int64_t k = 0; k < m; ++k) hi = d[k] > hi ? d[k] : hi, nan |= d[k] != d[k];
  if (nan || !(hi > T(-INFINITY))) return -1;
  int64_t k = 0;
  while (d[k] != hi) ++k;
  return k;
}

template <typename T, typename Role>
TL_HD void batch_hard_row(const T* d, int64_t m, const Role& role, T margin, bool soft, double* loss, int64_t* counts,
                          int64_t* mined) {
  int64_t p = -1, q = -1, n_pos = 0, n_neg = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int r = role(j);
    if (r == kExcluded) continue;
    if (r == kPositive) {
      ++n_pos;
      if (harder_positive(d[j], j, p < 0 ? T(0) : d[p], p)) p = j;
    } else {
      ++n_neg;
      if (harder_negative(d[j], j, q < 0 ? T(0) : d[q], q)) q = j;
    }
  }
  batch_hard_result(d, p, q, n_pos, n_neg, margin, soft, loss, counts, mined);
}

// The gradient of the hardest triplet's loss: dL/dd = +w at the positive column mined[0], -w at the negative
// column mined[1], 0 elsewhere (w = 0 for an anchor without a triplet, or mined columns outside [0, m)).
template <typename T>
TL_HD T batch_hard_weight(const T* d, int64_t m, const int64_t* mined, T margin, bool soft, T scale) {
  const int64_t p = mined[0], q = mined[1];
  if (p < 0 || q < 0 || p >= m || q >= m) return T(0);
  return scale * hard_weight(d[p] - d[q], margin, soft);
}

template <typename T>
TL_HD void batch_hard_grad_row(const T* d, int64_t m, const int64_t* mined, T margin, bool soft, T scale, T* grad) {
  for (int64_t j = 0; j < m; ++j) grad[j] = T(0);
  const T w = batch_hard_weight(d, m, mined, margin, soft, scale);
  if (w == T(0)) return;
  grad[mined[0]] = w;
  grad[mined[1]] = -w;
}

// Batch-all. ps[0, n_pos): the anchor's positive distances sorted ascending, pi: their columns. Triplet
// (j, k) is active when d_ik < margin + d_ij; for a negative k the active positives are a suffix of ps,
// from t_k = first_active(k) on (binary search). So, with a_k = n_pos - t_k active positives of k,
//   sum_{j,k} [margin + d_ij - d_ik]_+ = sum_k (sum_{t >= t_k} (margin + ps[t]) - a_k d_ik),
//   dL/dd_ik = -a_k,   dL/dd_ij = c_j = #{k : t_k <= position of j}  (a prefix sum of the t_k histogram):
// O(n_neg log n_pos) per anchor after sorting its positives, without sorting the negatives.
template <typename T>
TL_HD int64_t first_active(const T* ps, int64_t n_pos, T margin, T d_neg) {
  int64_t lo = 0, hi = n_pos;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (d_neg < margin + ps[mid]) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// first_active by a branch-free count for short rows of positives (the CPU's, padded with +inf as for
// count_below_short): the positives before the first active one are those with !(d_neg < margin + ps[t]),
// a prefix when the sorted ps holds no NaN (short_active says whether it may be used: n_pos short and the
// last positive, where a NaN would sort, not NaN); the count is clamped to n_pos, since a NaN or infinite
// d_neg also counts the +inf padding.
template <typename T>
TL_HD bool short_active(const T* ps, int64_t n_pos) {
  return n_pos <= kShortPositives && (n_pos == 0 || ps[n_pos - 1] == ps[n_pos - 1]);
}
template <typename T>
TL_HD int64_t first_active_short(const T* ps, int64_t n_pos, T margin, T d_neg) {
  const int64_t c = prefix_count(ps, n_pos, [margin, d_neg](T x) { return !(d_neg < margin + x); });
  return c < n_pos ? c : n_pos;
}
template <typename T>
TL_HD int64_t first_active_row(const T* ps, int64_t n_pos, T margin, T d_neg, bool short_row) {
  return short_row ? first_active_short(ps, n_pos, margin, d_neg) : first_active(ps, n_pos, margin, d_neg);
}

// suffix[0, n_pos]: scratch for the suffix sums of the thresholds margin + ps[t] (batch_all_row and
// batch_all_grad_row: CPU only, ps padded with +inf, see count_below_short).
template <typename T, typename Role>
TL_HD void batch_all_row(const T* d, int64_t m, const Role& role, const T* ps, int64_t n_pos, T margin, double* suffix,
                         double* loss, int64_t* counts) {
  suffix[n_pos] = 0;
  for (int64_t t = n_pos - 1; t >= 0; --t) suffix[t] = suffix[t + 1] + double(margin + ps[t]);
  int64_t n_neg = 0, active = 0;
  double l = 0;
  const bool short_row = short_active(ps, n_pos);
  for (int64_t k = 0; k < m; ++k) {
    if (role(k) != kNegative) continue;
    ++n_neg;
    const int64_t t = first_active_row(ps, n_pos, margin, d[k], short_row);
    active += n_pos - t;
    l += suffix[t] - double(n_pos - t) * double(d[k]);
  }
  *loss = l;
  write_counts(counts, n_pos * n_neg, active, n_pos * n_neg);
}

// The histogram of t_k is kept in the positives' own gradient slots (counts below 2^24 are exact in float).
template <typename T, typename Role>
TL_HD void batch_all_grad_row(const T* d, int64_t m, const Role& role, const T* ps, const int64_t* pi, int64_t n_pos,
                              T margin, T scale, T* grad) {
  for (int64_t j = 0; j < m; ++j) grad[j] = T(0);
  const bool short_row = short_active(ps, n_pos);
  for (int64_t k = 0; k < m; ++k) {
    if (role(k) != kNegative) continue;
    const int64_t t = first_active_row(ps, n_pos, margin, d[k], short_row);
    grad[k] = -scale * T(n_pos - t);
    if (t < n_pos) grad[pi[t]] += T(1);
  }
  T active = 0;
  for (int64_t t = 0; t < n_pos; ++t) {
    active += grad[pi[t]];
    grad[pi[t]] = scale * active;
  }
}

// Semi-hard (TensorFlow Addons' TripletSemiHardLoss; the CPU's ps padded with +inf, see count_below_short): for each
// positive j, the negative with the smallest d_ik > d_ij, else the one with the largest d_ik; lowest index among ties.
// ps/pi: the anchor's positives sorted ascending and their columns. A negative k lies above the positives before b_k =
// #{t : ps[t] < d_ik} (binary search); keeping the nearest negative of each b in best_d/best_k[0, n_pos], the
// candidates of the positive at sorted position p are the negatives with b_k > p: a running minimum from the top. O(n
// log n_pos) per anchor, the negatives unsorted. Calls pair(j, k, h) for every positive j with its mined negative k and
// the hinge h = margin + d_ij - d_ik (none when the anchor has no negative); returns the number of negatives.
// The forward and the backward both mine (the backward again), so that no (N, M) choice is ever stored.
// semi_hard_pairs in two parts: semi_hard_buckets places the negatives (b_k = count_below_ps(k, d_ik); with
// track_largest it also finds the farthest, else *largest is left as it is: the CPU's fused mining finds it by a
// vectorized scan), semi_hard_choose picks each positive's.
template <typename T, typename Role, typename Below>
TL_HD int64_t semi_hard_buckets(const T* d, int64_t m, const Role& role, int64_t n_pos, Below&& count_below_ps,
                                T* best_d, int64_t* best_k, bool track_largest, int64_t* largest) {
  for (int64_t b = 0; b <= n_pos; ++b) best_k[b] = -1;
  int64_t n_neg = 0;
  for (int64_t k = 0; k < m; ++k) {  // ascending k: strict comparisons keep the lowest index among ties
    if (role(k) != kNegative) continue;
    ++n_neg;
    if (track_largest && harder_positive(d[k], k, *largest < 0 ? T(0) : d[*largest], *largest)) *largest = k;
    const int64_t b = count_below_ps(k, d[k]);
    if (best_k[b] < 0 || d[k] < best_d[b]) {
      best_d[b] = d[k];
      best_k[b] = k;
    }
  }
  return n_neg;
}

template <typename T, typename Pair>
TL_HD void semi_hard_choose(const T* d, const T* ps, const int64_t* pi, int64_t n_pos, T margin, const int64_t* best_k,
                            int64_t n_neg, int64_t largest, Pair&& pair) {
  int64_t nearest = -1;
  for (int64_t p = n_pos - 1; p >= 0 && n_neg > 0; --p) {
    const int64_t k = best_k[p + 1];
    if (k >= 0 && (nearest < 0 || d[k] < d[nearest] || (d[k] == d[nearest] && k < nearest))) nearest = k;
    const int64_t chosen = nearest >= 0 ? nearest : largest;
    pair(pi[p], chosen, margin + ps[p] - d[chosen]);
  }
}

template <typename T, typename Role, typename Pair>
TL_HD int64_t semi_hard_pairs(const T* d, int64_t m, const Role& role, const T* ps, const int64_t* pi, int64_t n_pos,
                              T margin, T* best_d, int64_t* best_k, Pair&& pair) {
  int64_t largest = -1;
  const auto below = [&](int64_t, T v) {
    return n_pos <= kShortPositives ? count_below_short(ps, n_pos, v) : count_below(ps, n_pos, v);
  };
  const int64_t n_neg = semi_hard_buckets(d, m, role, n_pos, below, best_d, best_k, true, &largest);
  semi_hard_choose(d, ps, pi, n_pos, margin, best_k, n_neg, largest, pair);
  return n_neg;
}

template <typename T, typename Role>
TL_HD void semi_hard_row(const T* d, int64_t m, const Role& role, const T* ps, const int64_t* pi, int64_t n_pos,
                         T margin, T* best_d, int64_t* best_k, double* loss, int64_t* counts) {
  int64_t active = 0;
  double l = 0;
  const int64_t n_neg = semi_hard_pairs(d, m, role, ps, pi, n_pos, margin, best_d, best_k, [&](int64_t, int64_t, T h) {
    if (h > T(0)) l += double(h), ++active;
  });
  *loss = l;
  write_counts(counts, n_pos * n_neg, active, n_neg > 0 ? n_pos : 0);
}

// dL/dd_ij = scale for a positive j whose triplet is active (h > 0); dL/dd_ik = -scale * (the number of active
// positives that mined negative k): counted first (exact integers, in the negatives' own gradient slots,
// which a positive never shares), then scaled once, so that the result does not depend on the order in
// which the counts add up (the CUDA kernel adds them with integer atomics). 0 elsewhere.
template <typename T>
TL_HD T semi_hard_negative_grad(T count, T scale) {
  return count != T(0) ? -scale * count : T(0);
}

template <typename T, typename Role>
TL_HD void semi_hard_grad_row(const T* d, int64_t m, const Role& role, const T* ps, const int64_t* pi, int64_t n_pos,
                              T margin, T* best_d, int64_t* best_k, T scale, T* grad) {
  for (int64_t j = 0; j < m; ++j) grad[j] = T(0);
  semi_hard_pairs(d, m, role, ps, pi, n_pos, margin, best_d, best_k, [&](int64_t j, int64_t k, T h) {
    if (h > T(0)) grad[j] = scale, grad[k] += T(1);
  });
  for (int64_t k = 0; k < m; ++k)
    if (role(k) == kNegative) grad[k] = semi_hard_negative_grad(grad[k], scale);
}

// ---------------------------------------------------------------- mining on a Gram block (issue 18)
// The fused CPU mining reads each block g = x_b y^T of the matrix product once: the distances, the mining and (for
// batch-all) the gradient are computed in the pass that reads the block. Distance codes: tripletloss_cuda/
// distances.py OP_CODES.
constexpr int kEuclidean = 0, kSquaredEuclidean = 1, kDot = 2;

// distances.block's entry: ((g * -2) + |x_i|^2) + |y_j|^2 clamped at 0 (NaN kept), bitwise, then its square root for
// euclidean (correctly rounded here; PyTorch's CPU sqrt_ on AVX-512 is 1 ulp off for about 20 % of float32 values,
// measured on torch 2.14.1, so euclidean distances may differ from the torch passes' by an ulp); 1 - g (= -g + 1) for
// dot; 0 for rows with equal keys (same: identical rows).
template <typename T>
TL_HD T gram_distance(T g, T sq_i, T sq_j, bool same, int distance) {
  // sq_i - (g + g) is bitwise (g * -2) + sq_i (g + g = 2g exactly), with no product a compiler could fuse into an FMA
  // (which would round once instead of twice); computed for dot too, and selected (no branch: the CPU loop vectorizes).
  T d2 = sq_i - (g + g);
  d2 = d2 + sq_j;
  d2 = d2 < T(0) ? T(0) : d2;
  const T d = distance == kDot ? T(1) - g : distance == kEuclidean ? tl_sqrt(d2) : d2;
  return same ? T(0) : d;
}

// gram_distance over a row of the block (host loops: the CPU's epilogue op and fused mining): d[k] from g[k] (d may be
// g itself), keys of any integer type (equal keys: identical rows); sq unused for dot (any readable row then: no null
// check in the loop, which vectorizes). Returns whether d holds a NaN.
template <int Distance, typename T, typename Key>
inline bool gram_distance_row(const T* g, T sq_i, const T* sq, Key key, const Key* keys, int64_t m, T* d) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t k = 0; k < m; ++k) {
    d[k] = gram_distance(g[k], sq_i, sq[k], key == keys[k], Distance);
    nan |= d[k] != d[k];
  }
  return nan;
}

// dL/dg of an entry from its dL/dd = c: 0 for identical rows (their distance is the constant 0) and at a euclidean
// distance of 0 (the convention of distances.block_grad); -2c (squared: d = |x|^2 + |y|^2 - 2g), -c (dot), -c / d
// (euclidean). The rows' gradients are then dL/dx_i = sum_j w_ij y_j - [not dot] (sum_j w_ij) x_i, and the
// references' alike (tripletloss_cuda/mining/ops.py gram_grad).
template <typename T>
TL_HD T gram_grad(T c, T d, bool same, int distance) {
  if (same || c == T(0)) return T(0);
  if (distance == kDot) return -c;
  if (distance == kSquaredEuclidean) return T(-2) * c;
  return d > T(0) ? -c / d : T(0);
}

// Batch-all's loss, counts and unscaled dL/dd of a row in one pass (batch_all_row and batch_all_grad_row fused;
// the same counts and positions, t_k = first_active_of(k, d_ik) as first_active_row): put(k, c) receives dL/dd_ik = c
// for every negative (-a_k) and positive (c_j), the negatives as they are met, then the positives. hist: scratch of 4
// (n_pos + 1) counts, four histograms of t_k interleaved by k (consecutive increments of one counter would wait on each
// other).
template <typename T, typename Role, typename First, typename Put>
TL_HD void batch_all_row_grad(const T* d, int64_t m, const Role& role, const T* ps, const int64_t* pi, int64_t n_pos,
                              T margin, First&& first_active_of, double* suffix, int64_t* hist, double* loss,
                              int64_t* counts, Put&& put) {
  suffix[n_pos] = 0;
  for (int64_t t = n_pos - 1; t >= 0; --t) suffix[t] = suffix[t + 1] + double(margin + ps[t]);
  const int64_t h = n_pos + 1;
  for (int64_t t = 0; t < 4 * h; ++t) hist[t] = 0;
  int64_t n_neg = 0, active = 0;
  double l = 0;
  for (int64_t k = 0; k < m; ++k) {
    if (role(k) != kNegative) continue;
    ++n_neg;
    const int64_t t = first_active_of(k, d[k]);
    active += n_pos - t;
    l += suffix[t] - double(n_pos - t) * double(d[k]);
    ++hist[(k & 3) * h + t];
    put(k, -T(n_pos - t));
  }
  int64_t c = 0;
  for (int64_t t = 0; t < n_pos; ++t) {
    c += hist[t] + hist[h + t] + hist[2 * h + t] + hist[3 * h + t];
    put(pi[t], T(c));
  }
  *loss = l;
  write_counts(counts, n_pos * n_neg, active, n_pos * n_neg);
}

}  // namespace mining
}  // namespace tripletloss
