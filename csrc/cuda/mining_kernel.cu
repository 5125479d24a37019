// CUDA row launchers of the mining ops (mining.h): cooperative kernels, a block per anchor (one warp for short
// rows, up to kMaxThreads for long ones), grid-striding over the anchors. The threads of a block read the
// anchor's row of the (N, M) distance matrix together (coalesced, 16-byte vector loads where the row is
// aligned: for_columns), and every pass over a row gives each column to the same thread.
//
// - batch-hard: each thread keeps its hardest positive and negative, then a warp butterfly and the warps in
//   order pick the block's, under the total orders of mining_math.h (lowest column among ties).
// - batch-all and semi-hard sort only the anchor's positives, in shared memory tiles of kTile: a block-wide
//   count gives each positive its ordinal, tile t holds ordinals [t * kTile, (t + 1) * kTile), bitonic-sorted
//   by (distance, column). Every negative is then placed among the tile's positives by binary search, in
//   parallel. Both losses decompose over tiles (batch-all: a triplet's hinge needs only its own positive;
//   semi-hard: a positive's nearest negative above it does not depend on the other positives), so an anchor
//   whose class holds most of the batch (more than kTile positives) re-reads its row from global memory once
//   per tile instead of keeping its positives anywhere: no extra device memory at all.
// - semi-hard places the nearest negative of each gap between sorted positives with integer atomicMin in
//   shared memory on (ordered distance bits, then column): an order-independent minimum.
// - the gradients of batch-all and semi-hard negatives are counts (of active positives), added as integers
//   and scaled once, so the order in which threads add them does not matter. The semi-hard backward mines
//   again rather than reading an (N, M) choice of negatives saved by the forward.
// Partial sums are combined in a fixed order (thread runs, warp butterflies, warps in order), with no float
// atomics: results are bitwise deterministic for any schedule. They equal the CPU's (cpu/mining_kernel.cpp,
// the same per-anchor math of mining_math.h) exactly for mined indices, counts and gradients, and to
// rounding for loss sums (another summation order). Launched on the current stream; the scale of the
// backward is read on the device (no host synchronization, CUDA-graph safe). Launches go through
// cuda_compat.h (also built for the CPU emulator of CUDA, csrc/emu).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../mining.h"
#include "../mining_math.h"
#include "cuda_compat.h"

namespace tripletloss {
namespace mining {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxThreads = 256, kMaxWarps = kMaxThreads / kWarp;
constexpr int kTile = 1024;  // positives per shared-memory tile
constexpr int32_t kNone = std::numeric_limits<int32_t>::max();

// Threads per block for rows of m columns: about 8 columns per thread, from one warp to kMaxThreads.
int threads_for(int64_t m) {
  int threads = kWarp;
  while (threads < kMaxThreads && int64_t(threads) * 8 < m) threads *= 2;
  return threads;
}

struct Labels {
  const int64_t *y, *ry, *self;
};

// Anchor i's label and excluded column: is reference column j a positive or a negative?
struct Anchor {
  int64_t y, excl;
  const int64_t* ry;
  __device__ Anchor(const Labels& lab, int64_t i) : y(lab.y[i]), excl(lab.self[i]), ry(lab.ry) {}
  __device__ bool positive(int64_t j) const { return j != excl && ry[j] == y; }
  __device__ bool negative(int64_t j) const { return j != excl && ry[j] != y; }
};

template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// Calls f(j, d[j]) for this thread's columns of the row d of m, ascending: 16-byte vectors where d is aligned
// (thread t takes vectors t, t + blockDim.x, ...), then the remaining columns one by one.
template <typename T, typename F>
__device__ __forceinline__ void for_columns(const T* d, int64_t m, F&& f) {
  constexpr int V = 16 / sizeof(T);
  int64_t tail = 0;
  if (reinterpret_cast<uintptr_t>(d) % 16 == 0) {
    const int64_t nv = m / V;
    for (int64_t c = threadIdx.x; c < nv; c += blockDim.x) {
      const Vec16<T> x = reinterpret_cast<const Vec16<T>*>(d)[c];
#pragma unroll
      for (int u = 0; u < V; ++u) f(c * V + u, x.v[u]);
    }
    tail = nv * V;
  }
  for (int64_t j = tail + threadIdx.x; j < m; j += blockDim.x) f(j, d[j]);
}

// --- block-wide primitives: every thread of the block calls them and gets the result -----------------------

// A sum over the block: a warp butterfly (commutative adds: every lane gets the same bits), then the warps'
// sums in warp order. smem: kMaxWarps values.
template <typename V>
__device__ V block_sum(V v, V* smem) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = V(0);
  for (int w = 0; w < int(blockDim.x) / kWarp; ++w) v += smem[w];
  __syncthreads();
  return v;
}

// The block's best (v, j) under the total order `better` (mining_math.h); j < 0: no element.
template <typename T, typename Better>
__device__ void block_best(T& v, int64_t& j, Better better, T* sv, int64_t* sj) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T ov = __shfl_xor_sync(kFull, v, o);
    const int64_t oj = __shfl_xor_sync(kFull, j, o);
    if (oj >= 0 && better(ov, oj, v, j)) v = ov, j = oj;
  }
  if (threadIdx.x % kWarp == 0) sv[threadIdx.x / kWarp] = v, sj[threadIdx.x / kWarp] = j;
  __syncthreads();
  j = -1;
  for (int w = 0; w < int(blockDim.x) / kWarp; ++w)
    if (sj[w] >= 0 && better(sv[w], sj[w], v, j)) v = sv[w], j = sj[w];
  __syncthreads();
}

// The sum of v over the threads before this one (thread order); *total: over all threads.
__device__ int64_t block_exclusive_scan(int64_t v, int64_t* total, int64_t* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int64_t x = v;
  for (int o = 1; o < kWarp; o *= 2) {
    const int64_t y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == kWarp - 1) smem[warp] = x;
  __syncthreads();
  int64_t before = 0, sum = 0;
  for (int w = 0; w < int(blockDim.x) / kWarp; ++w) {
    if (w < warp) before += smem[w];
    sum += smem[w];
  }
  __syncthreads();
  *total = sum;
  return before + x - v;
}

// In-place inclusive scan of a[0, n) (shared memory) under the associative and commutative op; reverse: from
// the end (a suffix scan). Each thread scans a contiguous run, then thread 0 the runs' totals in order: the
// same operations in the same order for any schedule. part: kMaxThreads values.
template <typename V, typename Op>
__device__ void block_scan(V* a, int n, bool reverse, Op op, V* part) {
  const int len = (n + int(blockDim.x) - 1) / int(blockDim.x);
  const int lo = min(n, int(threadIdx.x) * len), hi = min(n, lo + len);
  auto at = [&](int u) -> V& { return reverse ? a[n - 1 - u] : a[u]; };
  for (int u = lo + 1; u < hi; ++u) at(u) = op(at(u - 1), at(u));
  if (hi > lo) part[threadIdx.x] = at(hi - 1);
  __syncthreads();
  if (threadIdx.x == 0 && n > 0)
    for (int t = 1; t * len < n; ++t) part[t] = op(part[t - 1], part[t]);
  __syncthreads();
  if (threadIdx.x > 0)
    for (int u = lo; u < hi; ++u) at(u) = op(part[threadIdx.x - 1], at(u));
  __syncthreads();
}

// --- the anchor's positives, a tile at a time --------------------------------------------------------------

// Anchor a's positives of ordinals [t0, t0 + nt) (a positive's ordinal: its rank in (thread, column) order,
// base being this thread's first) into tv/tj, sorted by (distance, column) (sorts_before: NaN last).
// Bitonic sort over the next power of two, padded with entries that sort after every positive.
template <typename T>
__device__ void load_sorted_tile(const T* d, int64_t m, const Anchor& a, int64_t base, int64_t t0, int nt, T* tv,
                                 int32_t* tj) {
  int64_t o = base;
  for_columns(d, m, [&](int64_t j, T v) {
    if (!a.positive(j)) return;
    if (o >= t0 && o < t0 + nt) tv[o - t0] = v, tj[o - t0] = int32_t(j);
    ++o;
  });
  int size = 1;
  while (size < nt) size *= 2;
  for (int u = nt + threadIdx.x; u < size; u += blockDim.x) tv[u] = T(NAN), tj[u] = kNone;
  __syncthreads();
  for (int k = 2; k <= size; k *= 2) {
    for (int s = k / 2; s > 0; s /= 2) {
      for (int t = threadIdx.x; t < size / 2; t += blockDim.x) {
        const int lo = (t / s) * 2 * s + t % s, hi = lo + s;
        const bool ascending = (lo & k) == 0;
        if (sorts_before(tv[hi], tj[hi], tv[lo], tj[lo]) == ascending) {
          const T v = tv[lo];
          const int32_t j = tj[lo];
          tv[lo] = tv[hi], tj[lo] = tj[hi];
          tv[hi] = v, tj[hi] = j;
        }
      }
      __syncthreads();
    }
  }
}

// The per-anchor counts of the positives and negatives, and this thread's first positive ordinal.
struct RowCounts {
  int64_t n_pos, n_neg, base;
};

template <typename T>
__device__ RowCounts count_row(const T* d, int64_t m, const Anchor& a, int64_t* smem) {
  int64_t pos = 0, neg = 0;
  for_columns(d, m, [&](int64_t j, T) {
    pos += a.positive(j);
    neg += a.negative(j);
  });
  RowCounts c;
  c.base = block_exclusive_scan(pos, &c.n_pos, smem);
  c.n_neg = block_sum(neg, smem);
  return c;
}

// Runs f(nt) on every tile of anchor a's positives (sorted in tv/tj, nt of them), when it has negatives.
template <typename T, typename F>
__device__ void for_each_tile(const T* d, int64_t m, const Anchor& a, const RowCounts& c, T* tv, int32_t* tj, F&& f) {
  for (int64_t t0 = 0; c.n_neg > 0 && t0 < c.n_pos; t0 += kTile) {
    const int nt = int(min(int64_t(kTile), c.n_pos - t0));
    load_sorted_tile(d, m, a, c.base, t0, nt, tv, tj);
    f(nt);
    __syncthreads();  // the next tile overwrites the tile and what f kept in shared memory
  }
}

// --- kernels ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    batch_hard_kernel(const T* dist, Labels lab, int64_t n, int64_t m, T margin, bool soft, double* loss,
                      int64_t* counts, int64_t* mined) {
  __shared__ T sv[kMaxWarps];
  __shared__ int64_t sj[kMaxWarps];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* d = dist + i * m;
    const Anchor a(lab, i);
    int64_t n_pos = 0, n_neg = 0, p = -1, q = -1;
    T pv = 0, qv = 0;
    for_columns(d, m, [&](int64_t j, T v) {
      if (j == a.excl) return;
      if (a.ry[j] == a.y) {
        ++n_pos;
        if (harder_positive(v, j, pv, p)) pv = v, p = j;
      } else {
        ++n_neg;
        if (harder_negative(v, j, qv, q)) qv = v, q = j;
      }
    });
    block_best(pv, p, [](T v, int64_t j, T bv, int64_t b) { return harder_positive(v, j, bv, b); }, sv, sj);
    block_best(qv, q, [](T v, int64_t j, T bv, int64_t b) { return harder_negative(v, j, bv, b); }, sv, sj);
    n_pos = block_sum(n_pos, sj);
    n_neg = block_sum(n_neg, sj);
    if (threadIdx.x == 0)
      batch_hard_result(d, p, q, n_pos, n_neg, margin, soft, loss + i, counts + i * kCounts, mined + i * 2);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    batch_hard_grad_kernel(const T* dist, const int64_t* mined, int64_t n, int64_t m, T margin, bool soft,
                           const double* scale, T* grad) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* d = dist + i * m;
    const int64_t* mi = mined + i * 2;
    const T w = batch_hard_weight(d, m, mi, margin, soft, T(*scale));
    const int64_t p = w != T(0) ? mi[0] : -1, q = w != T(0) ? mi[1] : -1;
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) grad[i * m + j] = j == p ? w : (j == q ? -w : T(0));
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    batch_all_kernel(const T* dist, Labels lab, int64_t n, int64_t m, T margin, double* loss, int64_t* counts) {
  __shared__ T tv[kTile];
  __shared__ int32_t tj[kTile];
  __shared__ double suffix[kTile + 1];
  __shared__ double part[kMaxThreads];
  __shared__ int64_t ismem[kMaxWarps];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* d = dist + i * m;
    const Anchor a(lab, i);
    const RowCounts c = count_row(d, m, a, ismem);
    double l = 0;
    int64_t active = 0;
    for_each_tile(d, m, a, c, tv, tj, [&](int nt) {
      for (int u = threadIdx.x; u <= nt; u += blockDim.x) suffix[u] = u < nt ? double(margin + tv[u]) : 0.0;
      __syncthreads();
      block_scan(suffix, nt, /*reverse=*/true, [](double x, double y) { return x + y; }, part);
      // batch_all_row of mining_math.h, restricted to this tile's positives.
      for_columns(d, m, [&](int64_t k, T v) {
        if (!a.negative(k)) return;
        const int64_t t = first_active(tv, int64_t(nt), margin, v);
        active += nt - t;
        l += suffix[t] - double(nt - t) * double(v);
      });
    });
    l = block_sum(l, part);
    active = block_sum(active, ismem);
    if (threadIdx.x == 0) {
      loss[i] = l;
      write_counts(counts + i * kCounts, c.n_pos * c.n_neg, active, c.n_pos * c.n_neg);
    }
  }
}

// batch_all_grad_row of mining_math.h a tile at a time: a negative's gradient is -scale times its number of
// active positives (added over the tiles as exact integers in its own slot, then scaled); a positive's is
// scale times the number of negatives it is active with, a prefix sum of the tile's histogram of
// first_active positions.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    batch_all_grad_kernel(const T* dist, Labels lab, int64_t n, int64_t m, T margin, const double* scale, T* grad) {
  __shared__ T tv[kTile];
  __shared__ int32_t tj[kTile];
  __shared__ int32_t hist[kTile + 1];
  __shared__ int32_t part[kMaxThreads];
  __shared__ int64_t ismem[kMaxWarps];
  const T s = T(*scale);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* d = dist + i * m;
    T* g = grad + i * m;
    const Anchor a(lab, i);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) g[j] = T(0);
    const RowCounts c = count_row(d, m, a, ismem);  // its barriers order the zeros before the writes below
    for_each_tile(d, m, a, c, tv, tj, [&](int nt) {
      for (int u = threadIdx.x; u <= nt; u += blockDim.x) hist[u] = 0;
      __syncthreads();
      for_columns(d, m, [&](int64_t k, T v) {
        if (!a.negative(k)) return;
        const int64_t t = first_active(tv, int64_t(nt), margin, v);
        atomicAdd(&hist[t], 1);
        g[k] += T(nt - t);
      });
      __syncthreads();
      block_scan(hist, nt, /*reverse=*/false, [](int32_t x, int32_t y) { return x + y; }, part);
      for (int u = threadIdx.x; u < nt; u += blockDim.x) g[tj[u]] = s * T(hist[u]);
    });
    if (c.n_neg > 0 && c.n_pos > 0)
      for_columns(d, m, [&](int64_t k, T) {
        if (a.negative(k)) g[k] = -s * g[k];
      });
  }
}

// The nearest negative of a gap between sorted positives: its distance as ordered bits, then its column.
struct Nearest {
  unsigned long long key;
  int32_t k;
};

__device__ bool nearer(const Nearest& x, const Nearest& y) { return x.key != y.key ? x.key < y.key : x.k < y.k; }

template <typename T>
struct SemiHardShared {
  T tv[kTile];
  int32_t tj[kTile];
  Nearest gap[kTile + 1];
  Nearest part[kMaxThreads];
  T sv[kMaxWarps];
  int64_t sj[kMaxWarps];
};

// semi_hard_pairs of mining_math.h a tile at a time: for the positive at sorted position p of a tile, the
// candidates are the negatives above it (count_below > p), the nearest of which is a suffix minimum over the
// gaps, each gap's nearest negative placed by atomicMin (distance bits first, then the lowest column among
// the negatives at that distance). Calls pair(j, k, h) for every positive j (on one of the block's threads)
// with its mined negative k and hinge h; returns the anchor's counts. Every thread calls it.
template <typename T, typename Pair>
__device__ RowCounts semi_hard_anchor(const T* d, int64_t m, const Anchor& a, T margin, SemiHardShared<T>& sh,
                                      Pair&& pair) {
  int64_t far = -1;  // the farthest negative, chosen by positives with no negative above them
  T far_v = 0;
  for_columns(d, m, [&](int64_t j, T v) {
    if (a.negative(j) && harder_positive(v, j, far_v, far)) far_v = v, far = j;
  });
  block_best(far_v, far, [](T v, int64_t j, T bv, int64_t b) { return harder_positive(v, j, bv, b); }, sh.sv, sh.sj);
  const RowCounts c = count_row(d, m, a, sh.sj);
  for_each_tile(d, m, a, c, sh.tv, sh.tj, [&](int nt) {
    for (int u = threadIdx.x; u <= nt; u += blockDim.x) sh.gap[u] = {~0ull, kNone};
    __syncthreads();
    for_columns(d, m, [&](int64_t k, T v) {
      if (a.negative(k)) atomicMin(&sh.gap[count_below(sh.tv, int64_t(nt), v)].key, ordered_bits(v));
    });
    __syncthreads();
    for_columns(d, m, [&](int64_t k, T v) {
      if (!a.negative(k)) return;
      Nearest& g = sh.gap[count_below(sh.tv, int64_t(nt), v)];
      if (g.key == ordered_bits(v)) atomicMin(&g.k, int32_t(k));
    });
    __syncthreads();
    block_scan(sh.gap, nt + 1, /*reverse=*/true, [](Nearest x, Nearest y) { return nearer(x, y) ? x : y; }, sh.part);
    for (int p = threadIdx.x; p < nt; p += blockDim.x) {
      const int64_t chosen = sh.gap[p + 1].k != kNone ? sh.gap[p + 1].k : far;
      pair(int64_t(sh.tj[p]), chosen, margin + sh.tv[p] - d[chosen]);
    }
  });
  return c;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    semi_hard_kernel(const T* dist, Labels lab, int64_t n, int64_t m, T margin, double* loss, int64_t* counts) {
  __shared__ SemiHardShared<T> sh;
  __shared__ double dsmem[kMaxWarps];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    double l = 0;
    int64_t active = 0;
    const RowCounts c = semi_hard_anchor(dist + i * m, m, Anchor(lab, i), margin, sh, [&](int64_t, int64_t, T h) {
      if (h > T(0)) l += double(h), ++active;
    });
    l = block_sum(l, dsmem);
    active = block_sum(active, sh.sj);
    if (threadIdx.x == 0) {
      loss[i] = l;
      write_counts(counts + i * kCounts, c.n_pos * c.n_neg, active, c.n_neg > 0 ? c.n_pos : 0);
    }
  }
}

// semi_hard_grad_row of mining_math.h: mines again, then an active positive's slot gets scale, and each
// negative's slot counts its active positives with integer atomics (an integer as wide as T, in the
// gradient row itself: order-independent), turned into its gradient at the end.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    semi_hard_grad_kernel(const T* dist, Labels lab, int64_t n, int64_t m, T margin, const double* scale, T* grad) {
  using Count = std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>;
  static_assert(sizeof(Count) == sizeof(T));
  __shared__ SemiHardShared<T> sh;
  const T s = T(*scale);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    T* g = grad + i * m;
    Count* count = reinterpret_cast<Count*>(g);
    const Anchor a(lab, i);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) count[j] = 0;  // also T(0)
    // (semi_hard_anchor's first barrier orders the zeros before the writes)
    const RowCounts c = semi_hard_anchor(dist + i * m, m, a, margin, sh, [&](int64_t j, int64_t k, T h) {
      if (h > T(0)) g[j] = s, atomicAdd(&count[k], Count(1));
    });
    __syncthreads();
    if (c.n_pos > 0 && c.n_neg > 0)
      for (int64_t k = threadIdx.x; k < m; k += blockDim.x)
        if (a.negative(k)) {
          const Count n_k = count[k];  // read before the slot becomes a gradient
          g[k] = semi_hard_negative_grad(T(n_k), s);
        }
  }
}

// Launches Kernel on the device of dist (N, M) with a block per anchor: threads_for(M) threads, as many blocks
// as are resident at once (at most N), grid-striding over the anchors.
template <auto Kernel, typename... Args>
void launch_anchors(const Tensor& dist, Args... args) {
  const tl_cuda::DeviceGuard guard(dist);
  const int threads = threads_for(dist.size(1));
  const int64_t resident = int64_t(tl_cuda::sm_count(dist.get_device())) * tl_cuda::max_blocks_per_sm<Kernel>(threads);
  const unsigned blocks = unsigned(std::clamp<int64_t>(resident, 1, dist.size(0)));
  TL_LAUNCH(Kernel, blocks, threads, 0, tl_cuda::current_stream(), args...);
  TL_LAUNCH_CHECK();
}

Labels labels_of(const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  return {labels.const_data_ptr<int64_t>(), ref_labels.const_data_ptr<int64_t>(), self_index.const_data_ptr<int64_t>()};
}

void batch_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                double margin, bool soft, Tensor& loss, Tensor& counts, Tensor& mined) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_hard_forward", [&] {
    launch_anchors<batch_hard_kernel<scalar_t>>(dist, dist.const_data_ptr<scalar_t>(),
                                                labels_of(labels, ref_labels, self_index), dist.size(0), dist.size(1),
                                                scalar_t(margin), soft, loss.mutable_data_ptr<double>(),
                                                counts.mutable_data_ptr<int64_t>(), mined.mutable_data_ptr<int64_t>());
  });
}

void batch_hard_grad(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                     Tensor& grad) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_hard_backward", [&] {
    launch_anchors<batch_hard_grad_kernel<scalar_t>>(
        dist, dist.const_data_ptr<scalar_t>(), mined.const_data_ptr<int64_t>(), dist.size(0), dist.size(1),
        scalar_t(margin), soft, scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
  });
}

void batch_all(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_all_forward", [&] {
    launch_anchors<batch_all_kernel<scalar_t>>(
        dist, dist.const_data_ptr<scalar_t>(), labels_of(labels, ref_labels, self_index), dist.size(0), dist.size(1),
        scalar_t(margin), loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>());
  });
}

void batch_all_grad(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, const Tensor& scale, Tensor& grad) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "batch_all_backward", [&] {
    launch_anchors<batch_all_grad_kernel<scalar_t>>(
        dist, dist.const_data_ptr<scalar_t>(), labels_of(labels, ref_labels, self_index), dist.size(0), dist.size(1),
        scalar_t(margin), scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
  });
}

void semi_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "semi_hard_forward", [&] {
    launch_anchors<semi_hard_kernel<scalar_t>>(
        dist, dist.const_data_ptr<scalar_t>(), labels_of(labels, ref_labels, self_index), dist.size(0), dist.size(1),
        scalar_t(margin), loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>());
  });
}

void semi_hard_grad(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, const Tensor& scale, Tensor& grad) {
  TL_DISPATCH_FLOATING(dist.scalar_type(), "semi_hard_backward", [&] {
    launch_anchors<semi_hard_grad_kernel<scalar_t>>(
        dist, dist.const_data_ptr<scalar_t>(), labels_of(labels, ref_labels, self_index), dist.size(0), dist.size(1),
        scalar_t(margin), scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

const Backend& cuda_backend() {
  static const Backend backend{batch_hard, batch_hard_grad, batch_all, batch_all_grad, semi_hard, semi_hard_grad};
  return backend;
}

}  // namespace mining
}  // namespace tripletloss
