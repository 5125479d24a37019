// CPU row launchers of the mining ops (mining.h): the row functions of mining_math.h, parallel over
// anchors with parallel_for. Each anchor writes only its own outputs, so results do not depend on the
// number of threads.
#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../mining.h"
#include "../mining_math.h"

namespace tripletloss {
namespace mining {
namespace {

// Anchors per parallel task: enough rows for about 32K distances (rows of m columns).
int64_t grain(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(m, 1)); }

template <typename F>
void for_each_anchor(int64_t n, int64_t m, F&& f) {
  parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f(i);
  });
}

// The anchors' labels, the references' labels and the excluded columns, as pointers.
struct Labels {
  const int64_t *y, *ry, *self;
  Labels(const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index)
      : y(labels.const_data_ptr<int64_t>()),
        ry(ref_labels.const_data_ptr<int64_t>()),
        self(self_index.const_data_ptr<int64_t>()) {}
  LabelRole role(int64_t i) const { return {ry, y[i], self[i]}; }
};

void batch_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                double margin, bool soft, Tensor& loss, Tensor& counts, Tensor& mined) {
  const Labels lab(labels, ref_labels, self_index);
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_hard_forward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    int64_t* mi = mined.mutable_data_ptr<int64_t>();
    const int64_t n = dist.size(0), m = dist.size(1);
    for_each_anchor(n, m, [&](int64_t i) {
      batch_hard_row<scalar_t>(d + i * m, m, lab.role(i), scalar_t(margin), soft, l + i, c + i * kCounts, mi + i * 2);
    });
  });
}

void batch_hard_grad(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                     Tensor& grad) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_hard_backward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t* mi = mined.const_data_ptr<int64_t>();
    const scalar_t s = scalar_t(*scale.const_data_ptr<double>());
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = dist.size(0), m = dist.size(1);
    for_each_anchor(n, m, [&](int64_t i) {
      batch_hard_grad_row<scalar_t>(d + i * m, m, mi + i * 2, scalar_t(margin), soft, s, g + i * m);
    });
  });
}

// Anchor i's positives sorted ascending into ps, their columns into pi: by (distance, column), NaN last
// (sorts_before: a strict weak order even with NaN distances, which std::sort requires). d: the anchor's row.
template <typename T>
void sort_positives(const T* d, const Labels& lab, int64_t m, int64_t i, std::vector<std::pair<T, int64_t>>& pairs,
                    std::vector<T>& ps, std::vector<int64_t>& pi) {
  pairs.clear();
  const int64_t yi = lab.y[i], excl = lab.self[i];
  for (int64_t j = 0; j < m; ++j)
    if (j != excl && lab.ry[j] == yi) pairs.emplace_back(d[j], j);
  std::sort(pairs.begin(), pairs.end(),
            [](const auto& a, const auto& b) { return sorts_before(a.first, a.second, b.first, b.second); });
  // +inf past the positives (count_below_short reads up to padded(n)): pi.size() is the positives' count.
  ps.assign(size_t(padded(int64_t(pairs.size()))), std::numeric_limits<T>::infinity());
  pi.resize(pairs.size());
  for (size_t t = 0; t < pairs.size(); ++t) std::tie(ps[t], pi[t]) = pairs[t];
}

void batch_all(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts) {
  const Labels lab(labels, ref_labels, self_index);
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_all_forward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    const int64_t n = dist.size(0), m = dist.size(1);
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      std::vector<std::pair<scalar_t, int64_t>> pairs;  // per-task scratch
      std::vector<scalar_t> ps;
      std::vector<int64_t> pi;
      std::vector<double> suffix;
      for (int64_t i = i0; i < i1; ++i) {
        sort_positives(d + i * m, lab, m, i, pairs, ps, pi);
        suffix.resize(pi.size() + 1);
        batch_all_row<scalar_t>(d + i * m, m, lab.role(i), ps.data(), int64_t(pi.size()), scalar_t(margin),
                                suffix.data(), l + i, c + i * kCounts);
      }
    });
  });
}

void batch_all_grad(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, const Tensor& scale, Tensor& grad) {
  const Labels lab(labels, ref_labels, self_index);
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_all_backward", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const scalar_t s = scalar_t(*scale.const_data_ptr<double>());
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = dist.size(0), m = dist.size(1);
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      std::vector<std::pair<scalar_t, int64_t>> pairs;
      std::vector<scalar_t> ps;
      std::vector<int64_t> pi;
      for (int64_t i = i0; i < i1; ++i) {
        sort_positives(d + i * m, lab, m, i, pairs, ps, pi);
        batch_all_grad_row<scalar_t>(d + i * m, m, lab.role(i), ps.data(), pi.data(), int64_t(pi.size()),
                                     scalar_t(margin), s, g + i * m);
      }
    });
  });
}

// semi_hard and semi_hard_grad: each anchor's positives sorted, then semi_hard_row / semi_hard_grad_row.
template <typename F>
void for_each_sorted_anchor(const Tensor& dist, const Labels& lab, F&& f) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "semi_hard", [&] {
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t n = dist.size(0), m = dist.size(1);
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      std::vector<std::pair<scalar_t, int64_t>> pairs;  // per-task scratch
      std::vector<scalar_t> ps, best_d;
      std::vector<int64_t> pi, best_k;
      for (int64_t i = i0; i < i1; ++i) {
        sort_positives(d + i * m, lab, m, i, pairs, ps, pi);
        best_d.resize(pi.size() + 1);
        best_k.resize(pi.size() + 1);
        f(i, d + i * m, ps.data(), pi.data(), int64_t(pi.size()), best_d.data(), best_k.data());
      }
    });
  });
}

void semi_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts) {
  const Labels lab(labels, ref_labels, self_index);
  double* l = loss.mutable_data_ptr<double>();
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  const int64_t m = dist.size(1);
  for_each_sorted_anchor(
      dist, lab,
      [&](int64_t i, const auto* d, const auto* ps, const int64_t* pi, int64_t n_pos, auto* best_d, int64_t* best_k) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(d)>>;
        semi_hard_row<T>(d, m, lab.role(i), ps, pi, n_pos, T(margin), best_d, best_k, l + i, c + i * kCounts);
      });
}

void semi_hard_grad(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, const Tensor& scale, Tensor& grad) {
  const Labels lab(labels, ref_labels, self_index);
  const double s = *scale.const_data_ptr<double>();
  const int64_t m = dist.size(1);
  for_each_sorted_anchor(
      dist, lab,
      [&](int64_t i, const auto* d, const auto* ps, const int64_t* pi, int64_t n_pos, auto* best_d, int64_t* best_k) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(d)>>;
        semi_hard_grad_row<T>(d, m, lab.role(i), ps, pi, n_pos, T(margin), best_d, best_k, T(s),
                              grad.mutable_data_ptr<T>() + i * m);
      });
}

}  // namespace

const Backend& cpu_backend() {
  static const Backend backend{batch_hard, batch_hard_grad, batch_all, batch_all_grad, semi_hard, semi_hard_grad};
  return backend;
}

}  // namespace mining
}  // namespace tripletloss
