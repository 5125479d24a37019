// CPU kernels: one pass over the inputs forward, one backward, parallel over rows with at::parallel_for.
// The row loops vectorize (omp simd); the mean/sum adds per-block partials in a fixed order, so the
// result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../tripletloss.h"

namespace tripletloss {
namespace {

constexpr int64_t kBlockElems = 1 << 15;  // elements of one input per parallel task

int64_t rows_per_block(int64_t d) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(d, 1)); }

template <typename scalar_t, Norm NORM, bool SWAP>
void forward_rows(const Tensor& a, const Tensor& pos, const Tensor& neg, double margin, double p, double eps,
                  int64_t reduction, Tensor& loss, Tensor& dist) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.size(0), d = a.size(1);
  const int64_t sa = a.stride(0), sp = pos.stride(0), sn = neg.stride(0);
  const scalar_t* A = a.const_data_ptr<scalar_t>();
  const scalar_t* P = pos.const_data_ptr<scalar_t>();
  const scalar_t* N = neg.const_data_ptr<scalar_t>();
  scalar_t* out = loss.mutable_data_ptr<scalar_t>();
  acc_t* dst = dist.mutable_data_ptr<acc_t>();
  const acc_t m = margin, pw = p, e = eps;
  const int64_t rows = rows_per_block(d), blocks = (n + rows - 1) / rows;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0;
      for (int64_t i = b * rows; i < std::min(n, (b + 1) * rows); ++i) {
        const scalar_t *ai = A + i * sa, *pi = P + i * sp, *ni = N + i * sn;
        acc_t ap = 0, an = 0, pn = 0;
#pragma omp simd reduction(+ : ap, an, pn)
        for (int64_t j = 0; j < d; ++j) {
          accumulate<NORM, SWAP>(acc_t(ai[j]), acc_t(pi[j]), acc_t(ni[j]), e, pw, ap, an, pn);
        }
        const acc_t d_ap = norm_finish<NORM>(ap, pw), d_an = norm_finish<NORM>(an, pw);
        const acc_t d_pn = SWAP ? norm_finish<NORM>(pn, pw) : acc_t(0);
        dst[3 * i] = d_ap, dst[3 * i + 1] = d_an, dst[3 * i + 2] = d_pn;
        const acc_t l = hinge_loss(d_ap, d_an, d_pn, m, SWAP);
        if (reduction == 0) out[i] = scalar_t(l);
        else sum += l;
      }
      partial[b] = sum;
    }
  });
  if (reduction != 0) {
    double total = 0;
    for (double v : partial) total += v;
    out[0] = scalar_t(reduction == 1 ? total / double(n) : total);
  }
}

template <typename scalar_t, Norm NORM, bool SWAP>
void backward_rows(const Tensor& grad, const Tensor& a, const Tensor& pos, const Tensor& neg, const Tensor& dist,
                   double margin, double p, double eps, int64_t reduction, bool grad_at_zero_hinge, Tensor& ga,
                   Tensor& gp, Tensor& gn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.size(0), d = a.size(1);
  const int64_t sa = a.stride(0), sp = pos.stride(0), sn = neg.stride(0);
  const scalar_t* A = a.const_data_ptr<scalar_t>();
  const scalar_t* P = pos.const_data_ptr<scalar_t>();
  const scalar_t* N = neg.const_data_ptr<scalar_t>();
  const acc_t* dst = dist.const_data_ptr<acc_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  // grad is (N,) for reduction none, else a scalar shared by every row (divided by N for mean).
  const int64_t gs = reduction == 0 ? grad.stride(0) : 0;
  const acc_t gscale = reduction == 1 ? acc_t(1) / acc_t(n) : acc_t(1);
  scalar_t *GA = ga.mutable_data_ptr<scalar_t>(), *GP = gp.mutable_data_ptr<scalar_t>();
  scalar_t* GN = gn.mutable_data_ptr<scalar_t>();
  const acc_t m = margin, pw = p, e = eps;
  at::parallel_for(0, n, rows_per_block(d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const RowGrad<acc_t> r = row_grad<NORM>(dst[3 * i], dst[3 * i + 1], dst[3 * i + 2], m, pw, SWAP,
                                               acc_t(g[i * gs]) * gscale, grad_at_zero_hinge);
      scalar_t *gai = GA + i * d, *gpi = GP + i * d, *gni = GN + i * d;
      if (r.zero) {
        std::fill_n(gai, d, scalar_t(0)), std::fill_n(gpi, d, scalar_t(0)), std::fill_n(gni, d, scalar_t(0));
        continue;
      }
      const scalar_t *ai = A + i * sa, *pi = P + i * sp, *ni = N + i * sn;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        acc_t x, y, z;
        element_grad<NORM, SWAP>(acc_t(ai[j]), acc_t(pi[j]), acc_t(ni[j]), e, pw, r, x, y, z);
        gai[j] = scalar_t(x), gpi[j] = scalar_t(y), gni[j] = scalar_t(z);
      }
    }
  });
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& anchor, const Tensor& positive, const Tensor& negative,
                                       double margin, double p, double eps, bool swap, int64_t reduction) {
  check_inputs(anchor, positive, negative);
  auto [loss, dist] = empty_forward_outputs(anchor, reduction);
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "triplet_margin_forward_cpu", [&] {
    dispatch_norm_swap(p, swap, [&](auto norm, auto sw) {
      forward_rows<scalar_t, decltype(norm)::value, decltype(sw)::value>(a, pos, neg, margin, p, eps, reduction,
                                                                         loss, dist);
    });
  });
  return {loss, dist};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& anchor, const Tensor& positive,
                                                const Tensor& negative, const Tensor& dist, double margin, double p,
                                                double eps, bool swap, int64_t reduction, bool grad_at_zero_hinge) {
  check_inputs(anchor, positive, negative);
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  const auto [g, dst] = backward_operands(grad, dist, a, reduction);
  auto [ga, gp, gn] = empty_backward_outputs(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "triplet_margin_backward_cpu", [&] {
    dispatch_norm_swap(p, swap, [&](auto norm, auto sw) {
      backward_rows<scalar_t, decltype(norm)::value, decltype(sw)::value>(
          g, a, pos, neg, dst, margin, p, eps, reduction, grad_at_zero_hinge, ga, gp, gn);
    });
  });
  return {ga, gp, gn};
}

}  // namespace

TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) {
  m.impl("triplet_margin_forward", &forward_cpu);
  m.impl("triplet_margin_backward", &backward_cpu);
}

}  // namespace tripletloss
