// CPU launchers of the loss over index triplets (indexed.h): the functions of indexed_math.h, parallel over
// triplets (forward) and destination rows (backward) with parallel_for. Each task writes only its own
// outputs, and each row adds its contributions in the fixed CSR order, so results do not depend on the number
// of threads.
#include <algorithm>

#include "../indexed.h"
#include "../indexed_math.h"

namespace tripletloss {
namespace indexed {
namespace {

// Items per parallel task: about 32K elements read.
int64_t grain(int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(3 * d, 1)); }

// row_backward of indexed_math.h with the role and distance decided once per entry rather than per component,
// so that the component loop vectorizes: each entry adds (self - o1) c1 + (self - o2) c2 (dot: -o1 c1 - o2 c2),
// the same expression in the same order as role_grad (a missing swap term adds 0), so the same values.
template <typename T, typename acc_t>
void row_backward_cpu(const T* x, const T* r, int64_t d, int64_t n_rows, int64_t m_rows, const int64_t* anchors,
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
    const T *self = a, *o1 = p, *o2 = n;
    acc_t c1 = c.ap, c2 = c.an;
    if (role == kPositive) self = p, o1 = a, o2 = n, c1 = c.ap, c2 = c.pn;
    if (role == kNegative) self = n, o1 = a, o2 = p, c1 = c.an, c2 = c.pn;
    const bool two = role == kAnchor || swap;
    if (distance == kDot) {
      if (two) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) out[j] += -acc_t(o1[j]) * c1 + -acc_t(o2[j]) * c2;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) out[j] += -acc_t(o1[j]) * c1;
      }
    } else if (two) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j)
        out[j] += (acc_t(self[j]) - acc_t(o1[j])) * c1 + (acc_t(self[j]) - acc_t(o2[j])) * c2;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] += (acc_t(self[j]) - acc_t(o1[j])) * c1;
    }
  }
}

void forward(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
             int64_t distance, double margin, bool swap, bool soft, Tensor& saved) {
  TL_DISPATCH_FLOATING_AND_HALF(x.scalar_type(), "indexed_triplet_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = r.const_data_ptr<scalar_t>();
    const int64_t *a = anchors.const_data_ptr<int64_t>(), *p = positives.const_data_ptr<int64_t>(),
                  *n = negatives.const_data_ptr<int64_t>();
    acc_t* s = saved.mutable_data_ptr<acc_t>();
    const int64_t d = x.size(1), n_rows = x.size(0), m_rows = r.size(0);
    parallel_for(0, anchors.size(0), grain(d), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        triplet_forward<scalar_t, acc_t>(px, pr, d, n_rows, m_rows, a[t], p[t], n[t], int(distance), acc_t(margin),
                                         swap, soft, s + t * kSaved);
    });
  });
}

void backward(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
              const Tensor& saved, const Tensor& w, const Tensor& entries, const Tensor& offsets, int64_t distance,
              double margin, bool swap, bool soft, Tensor& grad_x, Tensor& grad_r) {
  TL_DISPATCH_FLOATING_AND_HALF(x.scalar_type(), "indexed_triplet_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = r.const_data_ptr<scalar_t>();
    const int64_t *a = anchors.const_data_ptr<int64_t>(), *p = positives.const_data_ptr<int64_t>(),
                  *n = negatives.const_data_ptr<int64_t>();
    const int64_t *e = entries.const_data_ptr<int64_t>(), *o = offsets.const_data_ptr<int64_t>();
    const acc_t *s = saved.const_data_ptr<acc_t>(), *pw = w.const_data_ptr<acc_t>();
    acc_t *gx = grad_x.mutable_data_ptr<acc_t>(), *gr = grad_r.mutable_data_ptr<acc_t>();
    const int64_t d = x.size(1), n_rows = x.size(0), m_rows = r.size(0), t = anchors.size(0);
    const int64_t rows = offsets.size(0) - 1;
    parallel_for(0, rows, grain(d), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t* out = k < n_rows ? gx + k * d : gr + (k - n_rows) * d;
        row_backward_cpu<scalar_t, acc_t>(px, pr, d, n_rows, m_rows, a, p, n, s, pw, e, o[k], o[k + 1], t,
                                          int(distance), acc_t(margin), swap, soft, out);
      }
    });
  });
}

}  // namespace

const Backend& cpu_backend() {
  static const Backend backend{forward, backward};
  return backend;
}

}  // namespace indexed
}  // namespace tripletloss
