// The per-triplet math of the loss over index triplets (csrc/indexed.cpp), written once for the CPU and CUDA
// kernels, which only map triplets (forward) and destination rows (backward) onto threads around it.
//
// Triplet t reads the rows a = X[anchors[t]], p = R[positives[t]], n = R[negatives[t]] (R = X without a
// reference set). Distances, by `Distance`:
//   kEuclidean ||x - y||, kSquared ||x - y||^2, kDot 1 - <x, y> (the cosine distance of rows the caller has
//   L2-normalized).
// h = margin + d(a,p) - d_neg with d_neg = swap ? min(d(a,n), d(p,n)) : d(a,n); the loss is max(h, 0) (NaN
// propagated) or, with soft, softplus(h) = log(1 + e^h). The gradient passes where h > 0 (ReLU's convention);
// a tie of the swap's minimum sends half to each side (torch.minimum's convention).
#pragma once

#include <math.h>
#include <stdint.h>

#include "mining_math.h"   // softplus, sigmoid
#include "triplet_math.h"  // TL_HD, tl_sqrt, min_nan

namespace tripletloss {
namespace indexed {

// The codes of tripletloss_cuda/distances.py OP_CODES (tests/test_layers.py checks that they agree).
enum Distance : int { kEuclidean = 0, kSquared = 1, kDot = 2 };
enum Role : int { kAnchor = 0, kPositive = 1, kNegative = 2 };
constexpr int kSaved = 4;  // per-triplet saved values: d(a,p), d(a,n), d(p,n) (0 without swap), loss

// One component's contribution to the accumulated distance between x and y.
template <typename T>
TL_HD T pair_term(int distance, T x, T y) {
  if (distance == kDot) return x * y;
  const T s = x - y;
  return s * s;
}

template <typename T>
TL_HD T pair_finish(int distance, T acc) {
  if (distance == kEuclidean) return tl_sqrt(acc);
  if (distance == kSquared) return acc;
  return T(1) - acc;
}

template <typename T>
TL_HD T triplet_loss(T d_ap, T d_an, T d_pn, T margin, bool swap, bool soft) {
  const T h = margin + d_ap - (swap ? min_nan(d_an, d_pn) : d_an);
  if (soft) return mining::softplus(h);
  return (h > T(0) || h != h) ? h : T(0);
}

// The gradient of w * loss with respect to each distance, as the coefficient c of pair_grad below.
template <typename T>
struct Coefs {
  T ap, an, pn;
};

// w * dd(x, y)/dx = pair_grad(x, y, c): (x - y) c for euclidean (c = w / d, 0 at d == 0) and squared
// (c = 2 w), -y c for kDot (c = w). Every distance is symmetric: dd/dy = pair_grad(y, x, c).
template <typename T>
TL_HD T pair_coef(int distance, T d, T w) {
  if (distance == kEuclidean) return d == T(0) ? T(0) : w / d;
  if (distance == kSquared) return T(2) * w;
  return w;
}

template <typename T>
TL_HD T pair_grad(int distance, T x, T y, T c) {
  return distance == kDot ? -y * c : (x - y) * c;
}

template <typename T>
TL_HD Coefs<T> triplet_coefs(int distance, const T* saved, T margin, bool swap, bool soft, T w) {
  const T d_ap = saved[0], d_an = saved[1], d_pn = saved[2];
  const T h = margin + d_ap - (swap ? min_nan(d_an, d_pn) : d_an);
  const T g = soft ? w * mining::sigmoid(h) : (h > T(0) ? w : T(0));
  T alpha = T(1), beta = T(0);  // the shares of d(a,n) and d(p,n) in d_neg
  if (swap) {
    const bool tie = d_an == d_pn;
    alpha = tie ? T(0.5) : (d_an > d_pn ? T(0) : T(1));
    beta = tie ? T(0.5) : (d_an < d_pn ? T(0) : T(1));
  }
  return {pair_coef(distance, d_ap, g), pair_coef(distance, d_an, -g * alpha),
          swap ? pair_coef(distance, d_pn, -g * beta) : T(0)};
}

// One component of the gradient that triplet t sends to the row playing `role` (a, p, n: the triplet's rows).
template <typename T>
TL_HD T role_grad(int distance, int role, T a, T p, T n, const Coefs<T>& c, bool swap) {
  if (role == kAnchor) return pair_grad(distance, a, p, c.ap) + pair_grad(distance, a, n, c.an);
  if (role == kPositive) return pair_grad(distance, p, a, c.ap) + (swap ? pair_grad(distance, p, n, c.pn) : T(0));
  return pair_grad(distance, n, a, c.an) + (swap ? pair_grad(distance, n, p, c.pn) : T(0));
}

// Whether triplet t's indices are in range: anchors index the n_rows rows of X, the others the m_rows of R.
TL_HD bool valid_triplet(int64_t a, int64_t p, int64_t n, int64_t n_rows, int64_t m_rows) {
  return a >= 0 && a < n_rows && p >= 0 && p < m_rows && n >= 0 && n < m_rows;
}

// The forward of triplet t: its saved values (kSaved, see above; all NaN for out-of-range indices, whose rows
// are never read). x, r: row-major (·, d) rows of X and R.
template <typename T, typename acc_t>
TL_HD void triplet_forward(const T* x, const T* r, int64_t d, int64_t n_rows, int64_t m_rows, int64_t ia, int64_t ip,
                           int64_t in, int distance, acc_t margin, bool swap, bool soft, acc_t* saved) {
  if (!valid_triplet(ia, ip, in, n_rows, m_rows)) {
    for (int k = 0; k < kSaved; ++k) saved[k] = acc_t(NAN);
    return;
  }
  const T* a = x + ia * d;
  const T* p = r + ip * d;
  const T* n = r + in * d;
  acc_t ap = 0, an = 0, pn = 0;
  for (int64_t j = 0; j < d; ++j) {
    const acc_t va = acc_t(a[j]), vp = acc_t(p[j]), vn = acc_t(n[j]);
    ap += pair_term(distance, va, vp);
    an += pair_term(distance, va, vn);
    if (swap) pn += pair_term(distance, vp, vn);
  }
  saved[0] = pair_finish(distance, ap);
  saved[1] = pair_finish(distance, an);
  saved[2] = swap ? pair_finish(distance, pn) : acc_t(0);
  saved[3] = triplet_loss(saved[0], saved[1], saved[2], margin, swap, soft);
}

// The gradient of one destination row: the sum, in the fixed order of entries[e0, e1), of what each entry
// (role * n_triplets + t, sorted by destination) sends it; an out-of-range triplet sends nothing (its rows are
// never read, whatever the CSR). out: the row's d accumulators, overwritten.
template <typename T, typename acc_t>
TL_HD void row_backward(const T* x, const T* r, int64_t d, int64_t n_rows, int64_t m_rows, const int64_t* anchors,
                        const int64_t* positives, const int64_t* negatives, const acc_t* saved, const acc_t* w,
                        const int64_t* entries, int64_t e0, int64_t e1, int64_t n_triplets, int distance, acc_t margin,
                        bool swap, bool soft, acc_t* out) {
  for (int64_t j = 0; j < d; ++j) out[j] = acc_t(0);
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t entry = entries[e];
    const int role = int(entry / n_triplets);
    const int64_t t = entry % n_triplets;
    if (!valid_triplet(anchors[t], positives[t], negatives[t], n_rows, m_rows)) continue;
    const Coefs<acc_t> c = triplet_coefs(distance, saved + t * kSaved, margin, swap, soft, w[t]);
    const T* a = x + anchors[t] * d;
    const T* p = r + positives[t] * d;
    const T* n = r + negatives[t] * d;
    for (int64_t j = 0; j < d; ++j) out[j] += role_grad(distance, role, acc_t(a[j]), acc_t(p[j]), acc_t(n[j]), c, swap);
  }
}

}  // namespace indexed
}  // namespace tripletloss
