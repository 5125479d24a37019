// The per-element and per-row math of the triplet margin loss, written once for the CPU and CUDA
// kernels, which only map threads onto rows around it.
//
// With s = x - y + eps (eps added to every component, as torch.pairwise_distance does):
//   d(x, y) = ||s||_p,  d_neg = swap ? min(d(a,n), d(p,n)) : d(a,n),  loss = max(d(a,p) - d_neg + margin, 0)
// Gradient conventions follow PyTorch's autograd (derivatives.yaml, FunctionsManual.cpp norm_backward):
//   dd/ds = sgn(s) |s|^(p-1) / d^(p-1), 0 where d == 0 (p = 2: s / d; p = 1: sgn(s));
//   minimum() splits a tie evenly; clamp_min passes the gradient where the hinge is > 0 (>= 0 in
//   releases before mid-2026: grad_at_zero_hinge).
// Or the cosine distance (Norm::Cos, below the p-norms): d(x, y) = 1 - x.y / (max(|x|, eps) max(|y|, eps)).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define TL_HD __host__ __device__ __forceinline__
#else
#define TL_HD inline
#endif

namespace tripletloss {

enum class Norm { L1, L2, Lp, Cos };  // p == 1, p == 2, any other finite p > 0; the cosine distance (no p)

// The distance codes of the ops (tripletloss_cuda/distances.py TRIPLET_CODES): how the cosine distance's
// gradient passes the clamp of a norm at eps (the value is the same).
enum Distance : int {
  kPairwise = 0,         // ||x - y + eps||_p
  kCosine = 1,           // F.cosine_similarity: the clamp is invisible to the gradient (ATen clamps under no_grad)
  kNormalized = 2,       // F.normalize's clamp_min: no gradient through a norm below eps, nor at eps
  kNormalizedAtEps = 3,  // the same, but passing it at a norm of exactly eps (clamp_min before mid-2026)
};

// Distances saved per row for the backward: d(a,p), d(a,n), d(p,n); the cosine adds |a|, |p|, |n|.
constexpr int dist_width(Norm n) { return n == Norm::Cos ? 6 : 3; }

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

// Accumulates the row sums of one component: the three distance sums (d(p,n) only with swap); for the cosine
// the dot products a.p, a.n, p.n in ap, an, pn and the squared norms in aa, pp, nn (unused by the p-norms).
template <Norm N, bool SWAP, typename T>
TL_HD void accumulate(T a, T pos, T neg, T eps, T p, T& ap, T& an, T& pn, T& aa, T& pp, T& nn) {
  if constexpr (N == Norm::Cos) {
    ap += a * pos, an += a * neg, aa += a * a, pp += pos * pos, nn += neg * neg;
    if constexpr (SWAP) pn += pos * neg;
  } else {
    ap += norm_term<N>(a - pos + eps, p);
    an += norm_term<N>(a - neg + eps, p);
    if constexpr (SWAP) pn += norm_term<N>(pos - neg + eps, p);
  }
}

// max(norm, eps) as clamp_min gives it: NaN propagates.
template <typename T>
TL_HD T clamp_norm(T norm, T eps) {
  return norm < eps ? eps : norm;
}

// 1 - x.y / (max(|x|, eps) max(|y|, eps)) from the row's dot product and the two norms.
template <typename T>
TL_HD T cosine_distance(T dot, T nx, T ny, T eps) {
  return T(1) - dot / (clamp_norm(nx, eps) * clamp_norm(ny, eps));
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

// The row's distances from its sums (into d[0 .. dist_width)), and its loss.
template <Norm N, bool SWAP, typename T>
TL_HD T finish_row(T ap, T an, T pn, T aa, T pp, T nn, T inv_p, T eps, T margin, T* d) {
  if constexpr (N == Norm::Cos) {
    const T na = tl_sqrt(aa), np = tl_sqrt(pp), nn_ = tl_sqrt(nn);
    d[0] = cosine_distance(ap, na, np, eps), d[1] = cosine_distance(an, na, nn_, eps);
    d[2] = SWAP ? cosine_distance(pn, np, nn_, eps) : T(0);
    d[3] = na, d[4] = np, d[5] = nn_;
  } else {
    d[0] = norm_finish<N>(ap, inv_p), d[1] = norm_finish<N>(an, inv_p);
    d[2] = SWAP ? norm_finish<N>(pn, inv_p) : T(0);
  }
  return hinge_loss(d[0], d[1], d[2], margin, SWAP);
}

// Per-row gradient scales: the loss gradient w.r.t. each distance, folded with norm_grad_scale. The cosine
// distance's gradients are linear in the rows: grad_a = aa a + ap p + an n, grad_p = ap a + pp p + pn n,
// grad_n = an a + pn p + nn n (the coefficients below).
template <typename T>
struct RowGrad {
  T ap, an, pn;  // scales for s_ap, s_an, s_pn
  T aa, pp, nn;  // the cosine's diagonal coefficients (unused by the p-norms)
  bool zero;     // every component's gradient is exactly zero (inactive hinge, finite distances)
};

// The loss gradient w.r.t. each distance, from the upstream gradient g: clamp_min's (w where the hinge is > 0, also
// at 0 with grad_at_zero_hinge), and minimum()'s with swap: a tie sends half to each side; otherwise all to the
// smaller (both when NaN). Shared by the p-norms and the cosine.
template <typename T>
struct DistGrad {
  T ap, an, pn;  // dL/dd(a,p) (w itself), dL/dd(a,n), dL/dd(p,n)
};

template <typename T>
TL_HD DistGrad<T> dist_grad(T d_ap, T d_an, T d_pn, T margin, bool swap, T g, bool grad_at_zero_hinge) {
  const T h = margin + d_ap - (swap ? min_nan(d_an, d_pn) : d_an);
  const T w = (h > T(0) || (grad_at_zero_hinge && h == T(0))) ? g : T(0);
  T alpha = T(1), beta = T(0);
  if (swap) {
    const bool tie = d_an == d_pn;
    alpha = tie ? T(0.5) : (d_an > d_pn ? T(0) : T(1));
    beta = tie ? T(0.5) : (d_an < d_pn ? T(0) : T(1));
  }
  return {w, -w * alpha, -w * beta};
}

template <Norm N, typename T>
TL_HD RowGrad<T> row_grad(T d_ap, T d_an, T d_pn, T margin, T p, bool swap, T g, bool grad_at_zero_hinge) {
  const DistGrad<T> w = dist_grad(d_ap, d_an, d_pn, margin, swap, g, grad_at_zero_hinge);
  RowGrad<T> r{};
  r.ap = norm_grad_scale<N>(d_ap, p, w.ap);
  r.an = norm_grad_scale<N>(d_an, p, w.an);
  r.pn = norm_grad_scale<N>(d_pn, p, w.pn);
  const bool finite = tl_abs(d_ap) < INFINITY && tl_abs(d_an) < INFINITY && (!swap || tl_abs(d_pn) < INFINITY);
  r.zero = w.ap == T(0) && finite;
  return r;
}

// The cosine distance's part of one pair (x, y) with d = 1 - c, c = x.y / (cx cy), cx = max(|x|, eps), given
// w = dL/dd: dL/dx = -w (y / (cx cy) - kx c x / (cx |x|)) and likewise for y, where kx is the clamp's gradient
// (1 for F.cosine_similarity, [|x| > eps] for F.normalize, [|x| >= eps] for clamp_min before mid-2026) and the
// x term is 0 where |x| == 0 (the norm's gradient, as PyTorch masks it). Adds -w / (cx cy) to the pair's
// coefficient, and the diagonal terms to kx_out and ky_out.
template <typename T>
TL_HD void cosine_pair_grad(T d, T nx, T ny, T eps, int distance, T w, T& pair, T& dx, T& dy) {
  const T cx = clamp_norm(nx, eps), cy = clamp_norm(ny, eps), c = T(1) - d;
  auto passes = [&](T n) { return distance == kCosine || n > eps || (distance == kNormalizedAtEps && n == eps); };
  const T a = -w / (cx * cy);
  pair += a;
  dx += nx == T(0) || !passes(nx) ? T(0) : -a * c * cy / nx;
  dy += ny == T(0) || !passes(ny) ? T(0) : -a * c * cx / ny;
}

// The cosine's row coefficients from the saved d(a,p), d(a,n), d(p,n), |a|, |p|, |n|.
template <typename T>
TL_HD RowGrad<T> cosine_row_grad(const T* d, T margin, T eps, int distance, bool swap, T g, bool grad_at_zero_hinge) {
  const DistGrad<T> w = dist_grad(d[0], d[1], d[2], margin, swap, g, grad_at_zero_hinge);
  RowGrad<T> r{};
  cosine_pair_grad(d[0], d[3], d[4], eps, distance, w.ap, r.ap, r.aa, r.pp);
  cosine_pair_grad(d[1], d[3], d[5], eps, distance, w.an, r.an, r.aa, r.nn);
  if (swap) cosine_pair_grad(d[2], d[4], d[5], eps, distance, w.pn, r.pn, r.pp, r.nn);
  bool finite = true;
  for (int k = 0; k < 6; ++k) finite = finite && tl_abs(d[k]) < INFINITY;
  r.zero = w.ap == T(0) && finite;
  return r;
}

// The row's gradient scales from its saved distances d (dist_width(N) of them).
template <Norm N, bool SWAP, typename T>
TL_HD RowGrad<T> row_grad_of(const T* d, T margin, T p, T eps, int distance, T g, bool grad_at_zero_hinge) {
  if constexpr (N == Norm::Cos) return cosine_row_grad(d, margin, eps, distance, SWAP, g, grad_at_zero_hinge);
  else return row_grad<N>(d[0], d[1], d[2], margin, p, SWAP, g, grad_at_zero_hinge);
}

// Gradients of one component: s_ap = a - p + eps feeds +a -p, s_an feeds +a -n, s_pn feeds +p -n; for the
// cosine, the row's linear combination of a, p, n.
template <Norm N, bool SWAP, typename T>
TL_HD void element_grad(T a, T pos, T neg, T eps, T p, const RowGrad<T>& r, T& ga, T& gp, T& gn) {
  if constexpr (N == Norm::Cos) {
    ga = r.aa * a + r.ap * pos + r.an * neg;
    gp = r.ap * a + r.pp * pos;
    gn = r.an * a + r.nn * neg;
    if constexpr (SWAP) gp += r.pn * neg, gn += r.pn * pos;
    return;
  }
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
