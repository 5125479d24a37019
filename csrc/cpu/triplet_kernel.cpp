// CPU kernels: one pass over the inputs forward, one backward, parallel over rows with parallel_for.
// The row loops vectorize (omp simd); the mean/sum adds per-block partials in a fixed order, so the
// result does not depend on the number of threads.
#include <algorithm>
#include <bit>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#include "../tripletloss.h"

namespace tripletloss {
namespace {

// The row loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time by the CPU (stable.h
// TL_CPU_CLONES).

// Element loads and stores of the row loops. c10's 16-bit conversions do not vectorize (a NaN branch,
// or a call); these give the same values (round to nearest even, NaN kept) and do.
template <typename T>
inline opmath_t<T> load(T x) {
  return x;
}
inline float load(c10::BFloat16 x) { return std::bit_cast<float>(uint32_t(x.x) << 16); }
inline float load(c10::Half x) { return float(std::bit_cast<_Float16>(x.x)); }

template <typename T>
inline T store(opmath_t<T> v) {
  return T(v);
}
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint16_t bits = v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}
template <>
inline c10::Half store<c10::Half>(float v) {
  return c10::Half(std::bit_cast<uint16_t>(_Float16(v)), c10::Half::from_bits());
}

constexpr int64_t kBlockElems = 1 << 15;  // elements of one input per parallel task

int64_t rows_per_block(int64_t d) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(d, 1)); }

template <typename T>
struct Params {  // margin, p, eps in the accumulation type, 1 / p, and the distance code (triplet_math.h)
  T margin, p, eps, inv_p;
  int distance;
};

// Rows [i0, i1): distances into dist, per-row loss into out (reduction none); returns the rows' loss sum.
template <typename scalar_t, Norm NORM, bool SWAP, typename acc_t = opmath_t<scalar_t>>
TL_CPU_CLONES double forward_range(const Rows<scalar_t>& in, int64_t i0, int64_t i1, Params<acc_t> k, bool per_row,
                                   scalar_t* out, acc_t* dist) {
  constexpr int W = dist_width(NORM);
  double sum = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t *a = in.a + i * in.sa, *p = in.p + i * in.sp, *n = in.n + i * in.sn;
    acc_t ap = 0, an = 0, pn = 0, aa = 0, pp = 0, nn = 0;
#pragma omp simd reduction(+ : ap, an, pn, aa, pp, nn)
    for (int64_t j = 0; j < in.cols; ++j) {
      accumulate<NORM, SWAP>(load(a[j]), load(p[j]), load(n[j]), k.eps, k.p, ap, an, pn, aa, pp, nn);
    }
    const acc_t l = finish_row<NORM, SWAP>(ap, an, pn, aa, pp, nn, k.inv_p, k.eps, k.margin, dist + W * i);
    if (per_row) out[i] = scalar_t(l);
    else sum += l;
  }
  return sum;
}

// Rows [i0, i1) of the three gradients (contiguous), from the upstream gradient g[i * gs] * gscale.
template <typename scalar_t, Norm NORM, bool SWAP, typename acc_t = opmath_t<scalar_t>>
TL_CPU_CLONES void backward_range(const Rows<scalar_t>& in, int64_t i0, int64_t i1, Params<acc_t> k, const scalar_t* g,
                                  int64_t gs, acc_t gscale, bool grad_at_zero_hinge, const acc_t* dist, scalar_t* ga,
                                  scalar_t* gp, scalar_t* gn) {
  const int64_t d = in.cols;
  for (int64_t i = i0; i < i1; ++i) {
    const RowGrad<acc_t> r = row_grad_of<NORM, SWAP>(dist + dist_width(NORM) * i, k.margin, k.p, k.eps, k.distance,
                                                     acc_t(g[i * gs]) * gscale, grad_at_zero_hinge);
    scalar_t *gai = ga + i * d, *gpi = gp + i * d, *gni = gn + i * d;
    if (r.zero) {
      std::fill_n(gai, d, scalar_t(0)), std::fill_n(gpi, d, scalar_t(0)), std::fill_n(gni, d, scalar_t(0));
      continue;
    }
    const scalar_t *a = in.a + i * in.sa, *p = in.p + i * in.sp, *n = in.n + i * in.sn;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      acc_t x, y, z;
      element_grad<NORM, SWAP>(load(a[j]), load(p[j]), load(n[j]), k.eps, k.p, r, x, y, z);
      gai[j] = store<scalar_t>(x), gpi[j] = store<scalar_t>(y), gni[j] = store<scalar_t>(z);
    }
  }
}

// A large fresh gradient buffer is a fresh mapping (glibc maps anything from 32 MiB, and smaller sizes
// until a free raises its threshold): a page fault per 4 KiB page at its first write, which costs more
// than the backward's arithmetic (and huge pages on madvise can stall in compaction). So freed buffers
// of 4 MiB and more are kept, up to TRIPLETLOSS_GRAD_CACHE_MB (default 1024; 0 turns it off), and
// the next backward of the same shape writes into pages that are already there.
class GradBufferCache {
 public:
  static GradBufferCache& get() {
    static auto* cache = new GradBufferCache();  // never destroyed: buffers may be freed at exit
    return *cache;
  }

  Tensor empty(const Tensor& like) {
    const size_t bytes = size_t(like.numel()) * like.element_size();
    if (bytes < kMinBytes || limit_ == 0) return tripletloss::empty(like.sizes(), like.scalar_type(), like.device());
    void* data = take(bytes);
    if (data == nullptr) data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TL_CHECK(data != nullptr, "out of memory allocating a ", bytes, "-byte gradient");
    const int64_t strides[2] = {like.size(1), 1};  // contiguous (N, D)
    return torch::stable::from_blob(data, like.sizes(), IntArrayRef(strides, 2), like.device(), like.scalar_type(),
                                    [this, bytes](void* p) { give(p, bytes); });
  }

 private:
  static constexpr size_t kMinBytes = size_t(4) << 20;
  GradBufferCache() {
    const char* env = std::getenv("TRIPLETLOSS_GRAD_CACHE_MB");
    limit_ = size_t(env ? std::max(0L, std::atol(env)) : 1024) << 20;
  }
  void* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    held_ -= bytes;
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // by size
  size_t held_ = 0, limit_ = 0;
};

template <typename scalar_t, Norm NORM, bool SWAP>
void forward_rows(const Rows<scalar_t>& in, Params<opmath_t<scalar_t>> k, int64_t reduction, Tensor& loss,
                  Tensor& dist) {
  using acc_t = opmath_t<scalar_t>;
  scalar_t* out = loss.mutable_data_ptr<scalar_t>();
  acc_t* dst = dist.mutable_data_ptr<acc_t>();
  // Fixed blocks of rows, whatever the thread count: the partial sums, and so the result, are the same.
  const int64_t rows = rows_per_block(in.cols), blocks = (in.rows + rows - 1) / rows;
  std::vector<double> partial(blocks, 0.0);
  parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      partial[b] = forward_range<scalar_t, NORM, SWAP>(in, b * rows, std::min(in.rows, (b + 1) * rows), k,
                                                       reduction == 0, out, dst);
    }
  });
  if (reduction != 0) {
    double total = 0;
    for (double v : partial) total += v;
    out[0] = scalar_t(reduction == 1 ? total / double(in.rows) : total);
  }
}

template <typename scalar_t, Norm NORM, bool SWAP>
void backward_rows(const Rows<scalar_t>& in, Params<opmath_t<scalar_t>> k, const Tensor& grad, const Tensor& dist,
                   int64_t reduction, bool grad_at_zero_hinge, Tensor& ga, Tensor& gp, Tensor& gn) {
  using acc_t = opmath_t<scalar_t>;
  // grad is (N,) for reduction none, else one value for every row (divided by N for mean).
  const int64_t gs = reduction == 0 ? grad.stride(0) : 0;
  const acc_t gscale = reduction == 1 ? acc_t(1) / acc_t(in.rows) : acc_t(1);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const acc_t* d = dist.const_data_ptr<acc_t>();
  scalar_t *pa = ga.mutable_data_ptr<scalar_t>(), *pp = gp.mutable_data_ptr<scalar_t>();
  scalar_t* pn = gn.mutable_data_ptr<scalar_t>();
  parallel_for(0, in.rows, rows_per_block(in.cols), [&](int64_t i0, int64_t i1) {
    backward_range<scalar_t, NORM, SWAP>(in, i0, i1, k, g, gs, gscale, grad_at_zero_hinge, d, pa, pp, pn);
  });
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& anchor, const Tensor& positive, const Tensor& negative,
                                       double margin, double p, double eps, bool swap, int64_t reduction,
                                       int64_t distance) {
  check_inputs(anchor, positive, negative);
  auto [loss, dist] = empty_forward_outputs(anchor, reduction, distance);
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  TL_DISPATCH_FLOATING_AND_HALF(a.scalar_type(), "triplet_margin_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    dispatch_norm_swap(distance, p, swap, [&](auto norm, auto sw) {
      forward_rows<scalar_t, decltype(norm)::value, decltype(sw)::value>(
          rows_of<scalar_t>(a, pos, neg), {acc_t(margin), acc_t(p), acc_t(eps), acc_t(1) / acc_t(p), int(distance)},
          reduction, loss, dist);
    });
  });
  return {loss, dist};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& anchor, const Tensor& positive,
                                                const Tensor& negative, const Tensor& dist, double margin, double p,
                                                double eps, bool swap, int64_t reduction, bool grad_at_zero_hinge,
                                                int64_t distance) {
  check_inputs(anchor, positive, negative);
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  const auto [g, dst] = backward_operands(grad, dist, a, reduction, distance);
  auto& cache = GradBufferCache::get();
  Tensor ga = cache.empty(a), gp = cache.empty(a), gn = cache.empty(a);
  TL_DISPATCH_FLOATING_AND_HALF(a.scalar_type(), "triplet_margin_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    dispatch_norm_swap(distance, p, swap, [&](auto norm, auto sw) {
      backward_rows<scalar_t, decltype(norm)::value, decltype(sw)::value>(
          rows_of<scalar_t>(a, pos, neg), {acc_t(margin), acc_t(p), acc_t(eps), acc_t(1) / acc_t(p), int(distance)}, g,
          dst, reduction, grad_at_zero_hinge, ga, gp, gn);
    });
  });
  return {ga, gp, gn};
}

}  // namespace

}  // namespace tripletloss

STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) {
  m.impl("triplet_margin_forward", TORCH_BOX(&tripletloss::forward_cpu));
  m.impl("triplet_margin_backward", TORCH_BOX(&tripletloss::backward_cpu));
}
