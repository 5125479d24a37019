// The per-element and per-row math of the triplet margin loss, written once for the CPU and CUDA
// kernels, which only map threads onto rows around it.
//
// With s = x - y + eps (eps added to every component, as torch.pairwise_distance does):
//   d(x, y) = ||s||_p,  d_neg = swap ? min(d(a,n), d(p,n)) : d(a,n),  loss = max(d(a,p) - d_neg + margin, 0)
// Gradient conventions follow PyTorch's autograd (derivatives.yaml, FunctionsManual.cpp norm_backward):
//   dd/ds = sgn(s) |s|^(p-1) / d^(p-1), 0 where d == 0 (p = 2: s / d; p = 1: sgn(s));
//   minimum() splits a tie evenly; clamp_min passes the gradient where the hinge is > 0 (>= 0 in
//   releases before mid-2026: grad_at_zero_hinge).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define TL_HD __host__ __device__ __forceinline__
#else
#define TL_HD inline
#endif

namespace tripletloss {

enum class Norm { L1, L2, Lp };  // p == 1, p == 2, any other finite p > 0

TL_HD float tl_abs(float x) { return fabsf(x); }
TL_HD double tl_abs(double x) { return fabs(x); }
TL_HD float tl_sqrt(float x) { return sqrtf(x); }
TL_HD double tl_sqrt(double x) { return sqrt(x); }
TL_HD float tl_pow(float x, float y) { return powf(x, y); }
TL_HD double tl_pow(double x, double y) {
#if defined(__CUDA_ARCH__)
  // CUDA's double pow() calls an out-of-line slow path, and the kernels spilled registers around those calls
  // (tools/sass_gate.py). Here x >= 0 or NaN and y != 0 (|s|^p, d^(1/p), d^(1-p), |s|^(p-1)), where
  // exp(y log x) is pow to within a few ulp, with the same 0, inf and NaN cases.
  return exp(y * log(x));
#else
  return pow(x, y);
#endif
}
template <typename T>
TL_HD T tl_sgn(T x) {
  return T((x > T(0)) - (x < T(0)));
}

// Contribution of one component s to the accumulated norm (a sum for every p).
template <Norm N, typename T>
TL_HD T norm_term(T s, T p) {
  if constexpr (N == Norm::L1) return tl_abs(s);
  else if constexpr (N == Norm::L2) return s * s;
  else return tl_pow(tl_abs(s), p);
}

// The norm from the accumulated sum; inv_p = T(1) / p, divided once per launch by the caller (a division per
// row cost the CUDA kernels register spills around its out-of-line slow path).
template <Norm N, typename T>
TL_HD T norm_finish(T acc, T inv_p) {
  if constexpr (N == Norm::L1) return acc;
  else if constexpr (N == Norm::L2) return tl_sqrt(acc);
  else return tl_pow(acc, inv_p);
}

// The per-row factor of dd/ds, times the upstream gradient w of d: w / d^(p-1), 0 where d == 0.
template <Norm N, typename T>
TL_HD T norm_grad_scale(T d, T p, T w) {
  if constexpr (N == Norm::L1) return w;
  else if constexpr (N == Norm::L2) return d == T(0) ? T(0) : w / d;
  else return d == T(0) ? T(0) : w * tl_pow(d, T(1) - p);
}

// w * dd/ds for one component, given scale = norm_grad_scale(d, p, w). A zero component's factor is 0 (|s|^(p-1)
// is inf there for p < 1), still multiplied by scale: a NaN scale (a NaN distance) gives NaN, as in PyTorch.
template <Norm N, typename T>
TL_HD T norm_grad(T s, T p, T scale) {
  if constexpr (N == Norm::L1) return tl_sgn(s) * scale;
  else if constexpr (N == Norm::L2) return s * scale;
  else return (s == T(0) ? T(0) : tl_sgn(s) * tl_pow(tl_abs(s), p - T(1))) * scale;
}

// Accumulates the three distance sums of one component (d(p,n) only with swap).
template <Norm N, bool SWAP, typename T>
TL_HD void accumulate(T a, T pos, T neg, T eps, T p, T& ap, T& an, T& pn) {
  ap += norm_term<N>(a - pos + eps, p);
  an += norm_term<N>(a - neg + eps, p);
  if constexpr (SWAP) pn += norm_term<N>(pos - neg + eps, p);
}

// torch.minimum: NaN propagates.
template <typename T>
TL_HD T min_nan(T x, T y) {
  return (x < y || x != x) ? x : y;
}

// clamp_min(margin + d_ap - d_neg, 0): NaN propagates.
template <typename T>
TL_HD T hinge_loss(T d_ap, T d_an, T d_pn, T margin, bool swap) {
  const T h = margin + d_ap - (swap ? min_nan(d_an, d_pn) : d_an);
  return (h > T(0) || h != h) ? h : T(0);
}

// Per-row gradient scales: the loss gradient w.r.t. each distance, folded with norm_grad_scale.
template <typename T>
struct RowGrad {
  T ap, an, pn;  // scales for s_ap, s_an, s_pn
  bool zero;     // every component's gradient is exactly zero (inactive hinge, finite distances)
};

template <Norm N, typename T>
TL_HD RowGrad<T> row_grad(T d_ap, T d_an, T d_pn, T margin, T p, bool swap, T g, bool grad_at_zero_hinge) {
  const T h = margin + d_ap - (swap ? min_nan(d_an, d_pn) : d_an);
  const T w = (h > T(0) || (grad_at_zero_hinge && h == T(0))) ? g : T(0);
  // minimum() backward: a tie sends half to each side; otherwise all to the smaller (both when NaN).
  T alpha = T(1), beta = T(0);
  if (swap) {
    const bool tie = d_an == d_pn;
    alpha = tie ? T(0.5) : (d_an > d_pn ? T(0) : T(1));
    beta = tie ? T(0.5) : (d_an < d_pn ? T(0) : T(1));
  }
  RowGrad<T> r;
  r.ap = norm_grad_scale<N>(d_ap, p, w);
  r.an = norm_grad_scale<N>(d_an, p, -w * alpha);
  r.pn = norm_grad_scale<N>(d_pn, p, -w * beta);
  const bool finite = tl_abs(d_ap) < INFINITY && tl_abs(d_an) < INFINITY && (!swap || tl_abs(d_pn) < INFINITY);
  r.zero = w == T(0) && finite;
  return r;
}

// Gradients of one component: s_ap = a - p + eps feeds +a -p, s_an feeds +a -n, s_pn feeds +p -n.
template <Norm N, bool SWAP, typename T>
TL_HD void element_grad(T a, T pos, T neg, T eps, T p, const RowGrad<T>& r, T& ga, T& gp, T& gn) {
  const T qap = norm_grad<N>(a - pos + eps, p, r.ap);
  const T qan = norm_grad<N>(a - neg + eps, p, r.an);
  ga = qap + qan;
  gp = -qap;
  gn = -qan;
  if constexpr (SWAP) {
    const T qpn = norm_grad<N>(pos - neg + eps, p, r.pn);
    gp += qpn;
    gn -= qpn;
  }
}

}  // namespace tripletloss
