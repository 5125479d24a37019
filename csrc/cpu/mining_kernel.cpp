// CPU row launchers of the mining ops (mining.h): the row functions of mining_math.h, parallel over
// anchors with at::parallel_for. Each anchor writes only its own outputs, so results do not depend on the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../mining.h"
#include "../mining_math.h"

namespace tripletloss {
namespace mining {
namespace {

// Anchors per parallel task: enough rows for about 32K distances.
int64_t grain(int64_t n) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(n, 1)); }

template <typename F>
void for_each_anchor(int64_t n, F&& f) {
  at::parallel_for(0, n, grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f(i);
  });
}

void batch_hard(const Tensor& dist, const Tensor& labels, double margin, bool soft, Tensor& loss, Tensor& counts,
                Tensor& mined) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_forward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    int64_t* m = mined.mutable_data_ptr<int64_t>();
    const int64_t n = dist.size(0);
    for_each_anchor(n, [&](int64_t i) {
      batch_hard_row<scalar_t>(d + i * n, y, n, i, scalar_t(margin), soft, l + i, c + i * kCounts, m + i * 2);
    });
  });
}

void batch_hard_grad(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                     Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_backward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t* m = mined.const_data_ptr<int64_t>();
    const scalar_t s = scalar_t(*scale.const_data_ptr<double>());
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = dist.size(0);
    for_each_anchor(n, [&](int64_t i) {
      batch_hard_grad_row<scalar_t>(d + i * n, n, m + i * 2, scalar_t(margin), soft, s, g + i * n);
    });
  });
}

void batch_all(const Tensor& pos_sorted, const Tensor& n_pos, const Tensor& neg_sorted, const Tensor& n_neg,
               double margin, Tensor& loss, Tensor& counts) {
  AT_DISPATCH_FLOATING_TYPES(pos_sorted.scalar_type(), "batch_all_forward", [&] {
    const scalar_t* ps = pos_sorted.const_data_ptr<scalar_t>();
    const scalar_t* ns = neg_sorted.const_data_ptr<scalar_t>();
    const int64_t* np = n_pos.const_data_ptr<int64_t>();
    const int64_t* nn = n_neg.const_data_ptr<int64_t>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    const int64_t n = pos_sorted.size(0);
    for_each_anchor(n, [&](int64_t i) {
      batch_all_row<scalar_t>(ps + i * n, np[i], ns + i * n, nn[i], scalar_t(margin), l + i, c + i * kCounts);
    });
  });
}

void batch_all_grad(const Tensor& pos_sorted, const Tensor& pos_index, const Tensor& n_pos, const Tensor& neg_sorted,
                    const Tensor& neg_index, const Tensor& n_neg, double margin, const Tensor& scale, Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(pos_sorted.scalar_type(), "batch_all_backward", [&] {
    const scalar_t* ps = pos_sorted.const_data_ptr<scalar_t>();
    const scalar_t* ns = neg_sorted.const_data_ptr<scalar_t>();
    const int64_t* pi = pos_index.const_data_ptr<int64_t>();
    const int64_t* ni = neg_index.const_data_ptr<int64_t>();
    const int64_t* np = n_pos.const_data_ptr<int64_t>();
    const int64_t* nn = n_neg.const_data_ptr<int64_t>();
    const scalar_t s = scalar_t(*scale.const_data_ptr<double>());
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = pos_sorted.size(0);
    for_each_anchor(n, [&](int64_t i) {
      const int64_t o = i * n;
      batch_all_grad_row<scalar_t>(n, ps + o, pi + o, np[i], ns + o, ni + o, nn[i], scalar_t(margin), s, g + o);
    });
  });
}

void semi_hard(const Tensor& dist, const Tensor& labels, const Tensor& neg_sorted, const Tensor& neg_index,
               const Tensor& n_neg, double margin, Tensor& loss, Tensor& counts, Tensor& mined) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_forward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const scalar_t* ns = neg_sorted.const_data_ptr<scalar_t>();
    const int64_t* ni = neg_index.const_data_ptr<int64_t>();
    const int64_t* nn = n_neg.const_data_ptr<int64_t>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    int32_t* m = mined.mutable_data_ptr<int32_t>();
    const int64_t n = dist.size(0);
    for_each_anchor(n, [&](int64_t i) {
      const int64_t o = i * n;
      semi_hard_row<scalar_t>(d + o, y, n, i, ns + o, ni + o, nn[i], scalar_t(margin), l + i, c + i * kCounts, m + o);
    });
  });
}

void semi_hard_grad(const Tensor& dist, const Tensor& mined, double margin, const Tensor& scale, Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_backward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int32_t* m = mined.const_data_ptr<int32_t>();
    const scalar_t s = scalar_t(*scale.const_data_ptr<double>());
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = dist.size(0);
    for_each_anchor(n, [&](int64_t i) {
      semi_hard_grad_row<scalar_t>(d + i * n, n, m + i * n, scalar_t(margin), s, g + i * n);
    });
  });
}

}  // namespace

const Backend& cpu_backend() {
  static const Backend backend{batch_hard, batch_hard_grad, batch_all, batch_all_grad, semi_hard, semi_hard_grad};
  return backend;
}

}  // namespace mining
}  // namespace tripletloss
