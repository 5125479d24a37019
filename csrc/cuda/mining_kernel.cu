// CUDA row launchers of the mining ops (mining.h): one thread per anchor runs the row functions of
// mining_math.h, exactly as the CPU does. Simple rather than fast: the per-anchor work is a few passes over
// one row of the (N, M) matrices (the sorts are at::sort: sorted_rows in mining.cpp), each anchor writes
// only its own outputs (no atomics), so results are deterministic. Launched on the current stream; the scale of the
// backward is read on the device (no host synchronization, CUDA-graph safe).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>

#include <tuple>

#include "../mining.h"
#include "../mining_math.h"

namespace tripletloss {
namespace mining {
namespace {

constexpr int kThreads = 128;

// The anchor of this thread, or -1 past the last one.
__device__ __forceinline__ int64_t anchor(int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  return i < n ? i : -1;
}

// Per-anchor pointers into the labels: the anchor's label and excluded column.
struct Labels {
  const int64_t *y, *ry, *self;
};

Labels labels_of(const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  return {labels.const_data_ptr<int64_t>(), ref_labels.const_data_ptr<int64_t>(),
          self_index.const_data_ptr<int64_t>()};
}

template <typename T>
__global__ void batch_hard_kernel(const T* d, Labels lab, int64_t n, int64_t m, T margin, bool soft, double* l,
                                  int64_t* c, int64_t* mi) {
  const int64_t i = anchor(n);
  if (i >= 0)
    batch_hard_row<T>(d + i * m, lab.ry, m, lab.y[i], lab.self[i], margin, soft, l + i, c + i * kCounts, mi + i * 2);
}

template <typename T>
__global__ void batch_hard_grad_kernel(const T* d, const int64_t* mi, int64_t n, int64_t m, T margin, bool soft,
                                       const double* scale, T* g) {
  const int64_t i = anchor(n);
  if (i >= 0) batch_hard_grad_row<T>(d + i * m, m, mi + i * 2, margin, soft, T(*scale), g + i * m);
}

template <typename T>
__global__ void batch_all_kernel(const T* d, Labels lab, const T* ps, const int64_t* np, int64_t n, int64_t m,
                                 T margin, double* suffix, double* l, int64_t* c) {
  const int64_t i = anchor(n);
  if (i < 0) return;
  batch_all_row<T>(d + i * m, lab.ry, m, lab.y[i], lab.self[i], ps + i * m, np[i], margin, suffix + i * (m + 1),
                   l + i, c + i * kCounts);
}

template <typename T>
__global__ void batch_all_grad_kernel(const T* d, Labels lab, const T* ps, const int64_t* pi, const int64_t* np,
                                      int64_t n, int64_t m, T margin, const double* scale, T* g) {
  const int64_t i = anchor(n);
  if (i >= 0)
    batch_all_grad_row<T>(d + i * m, lab.ry, m, lab.y[i], lab.self[i], ps + i * m, pi + i * m, np[i], margin,
                          T(*scale), g + i * m);
}

template <typename T>
__global__ void semi_hard_kernel(const T* d, Labels lab, const T* ps, const int64_t* pi, const int64_t* np, int64_t n,
                                 int64_t m, T margin, T* best_d, int64_t* best_k, double* l, int64_t* c,
                                 int32_t* mi) {
  const int64_t i = anchor(n);
  if (i < 0) return;
  const int64_t o = i * m, s = i * (m + 1);
  semi_hard_row<T>(d + o, lab.ry, m, lab.y[i], lab.self[i], ps + o, pi + o, np[i], margin, best_d + s, best_k + s,
                   l + i, c + i * kCounts, mi + o);
}

template <typename T>
__global__ void semi_hard_grad_kernel(const T* d, const int32_t* mi, int64_t n, int64_t m, T margin,
                                      const double* scale, T* g) {
  const int64_t i = anchor(n);
  if (i >= 0) semi_hard_grad_row<T>(d + i * m, m, mi + i * m, margin, T(*scale), g + i * m);
}

// Runs launch(blocks, stream) on the device of t with one thread per anchor (row of t).
template <typename F>
void launch_rows(const Tensor& t, F&& launch) {
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t n = t.size(0);
  const unsigned blocks = unsigned((n + kThreads - 1) / kThreads);
  launch(blocks, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void batch_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                double margin, bool soft, Tensor& loss, Tensor& counts, Tensor& mined) {
  const Labels lab = labels_of(labels, ref_labels, self_index);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_forward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_hard_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), lab, dist.size(0), dist.size(1), scalar_t(margin), soft,
          loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(), mined.mutable_data_ptr<int64_t>());
    });
  });
}

void batch_hard_grad(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                     Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_backward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_hard_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), mined.const_data_ptr<int64_t>(), dist.size(0), dist.size(1),
          scalar_t(margin), soft, scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
    });
  });
}

// Each anchor's positives sorted ascending (at::sort of the masked rows), their columns and numbers.
std::tuple<Tensor, Tensor, Tensor> sorted_positives(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels,
                                                    const Tensor& self_index) {
  const Tensor excluded = not_positive(labels, ref_labels, self_index);
  auto [values, index] = sorted_rows(dist, excluded);
  return {values, index, excluded.logical_not().sum(1)};
}

void batch_all(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts) {
  const auto [ps, pi, np] = sorted_positives(dist, labels, ref_labels, self_index);
  const Labels lab = labels_of(labels, ref_labels, self_index);
  const int64_t n = dist.size(0), m = dist.size(1);
  Tensor suffix = at::empty({n, m + 1}, dist.options().dtype(at::kDouble));  // per-anchor scratch
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_all_forward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_all_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), lab, ps.const_data_ptr<scalar_t>(), np.const_data_ptr<int64_t>(), n, m,
          scalar_t(margin), suffix.mutable_data_ptr<double>(), loss.mutable_data_ptr<double>(),
          counts.mutable_data_ptr<int64_t>());
    });
  });
}

void batch_all_grad(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, const Tensor& scale, Tensor& grad) {
  const auto [ps, pi, np] = sorted_positives(dist, labels, ref_labels, self_index);
  const Labels lab = labels_of(labels, ref_labels, self_index);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_all_backward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_all_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), lab, ps.const_data_ptr<scalar_t>(), pi.const_data_ptr<int64_t>(),
          np.const_data_ptr<int64_t>(), dist.size(0), dist.size(1), scalar_t(margin), scale.const_data_ptr<double>(),
          grad.mutable_data_ptr<scalar_t>());
    });
  });
}

void semi_hard(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
               double margin, Tensor& loss, Tensor& counts, Tensor& mined) {
  const auto [ps, pi, np] = sorted_positives(dist, labels, ref_labels, self_index);
  const Labels lab = labels_of(labels, ref_labels, self_index);
  const int64_t n = dist.size(0), m = dist.size(1);
  Tensor best_d = at::empty({n, m + 1}, dist.options());  // per-anchor scratch
  Tensor best_k = at::empty({n, m + 1}, dist.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_forward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      semi_hard_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), lab, ps.const_data_ptr<scalar_t>(), pi.const_data_ptr<int64_t>(),
          np.const_data_ptr<int64_t>(), n, m, scalar_t(margin), best_d.mutable_data_ptr<scalar_t>(),
          best_k.mutable_data_ptr<int64_t>(), loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(),
          mined.mutable_data_ptr<int32_t>());
    });
  });
}

void semi_hard_grad(const Tensor& dist, const Tensor& mined, double margin, const Tensor& scale, Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_backward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      semi_hard_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), mined.const_data_ptr<int32_t>(), dist.size(0), dist.size(1),
          scalar_t(margin), scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
    });
  });
}

}  // namespace

const Backend& cuda_backend() {
  static const Backend backend{batch_hard, batch_hard_grad, batch_all, batch_all_grad, semi_hard, semi_hard_grad};
  return backend;
}

}  // namespace mining
}  // namespace tripletloss
