// CUDA row launchers of the mining ops (mining.h): one thread per anchor runs the row functions of
// mining_math.h, exactly as the CPU does. Simple rather than fast: the per-anchor work is a few passes over
// one row of the (N, N) matrices (the sorts are at::sort in mining.cpp), each anchor writes only its own
// outputs (no atomics), so results are deterministic. Launched on the current stream; the scale of the
// backward is read on the device (no host synchronization, CUDA-graph safe).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

template <typename T>
__global__ void batch_hard_kernel(const T* d, const int64_t* y, int64_t n, T margin, bool soft, double* l,
                                  int64_t* c, int64_t* m) {
  const int64_t i = anchor(n);
  if (i >= 0) batch_hard_row<T>(d + i * n, y, n, i, margin, soft, l + i, c + i * kCounts, m + i * 2);
}

template <typename T>
__global__ void batch_hard_grad_kernel(const T* d, const int64_t* m, int64_t n, T margin, bool soft,
                                       const double* scale, T* g) {
  const int64_t i = anchor(n);
  if (i >= 0) batch_hard_grad_row<T>(d + i * n, n, m + i * 2, margin, soft, T(*scale), g + i * n);
}

template <typename T>
__global__ void batch_all_kernel(const T* ps, const int64_t* np, const T* ns, const int64_t* nn, int64_t n, T margin,
                                 double* l, int64_t* c) {
  const int64_t i = anchor(n);
  if (i >= 0) batch_all_row<T>(ps + i * n, np[i], ns + i * n, nn[i], margin, l + i, c + i * kCounts);
}

template <typename T>
__global__ void batch_all_grad_kernel(const T* ps, const int64_t* pi, const int64_t* np, const T* ns,
                                      const int64_t* ni, const int64_t* nn, int64_t n, T margin, const double* scale,
                                      T* g) {
  const int64_t i = anchor(n);
  if (i < 0) return;
  const int64_t o = i * n;
  batch_all_grad_row<T>(n, ps + o, pi + o, np[i], ns + o, ni + o, nn[i], margin, T(*scale), g + o);
}

template <typename T>
__global__ void semi_hard_kernel(const T* d, const int64_t* y, const T* ns, const int64_t* ni, const int64_t* nn,
                                 int64_t n, T margin, double* l, int64_t* c, int32_t* m) {
  const int64_t i = anchor(n);
  if (i < 0) return;
  const int64_t o = i * n;
  semi_hard_row<T>(d + o, y, n, i, ns + o, ni + o, nn[i], margin, l + i, c + i * kCounts, m + o);
}

template <typename T>
__global__ void semi_hard_grad_kernel(const T* d, const int32_t* m, int64_t n, T margin, const double* scale, T* g) {
  const int64_t i = anchor(n);
  if (i >= 0) semi_hard_grad_row<T>(d + i * n, n, m + i * n, margin, T(*scale), g + i * n);
}

// Runs launch(blocks, stream) on the device of t with one thread per anchor.
template <typename F>
void launch_rows(const Tensor& t, F&& launch) {
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t n = t.size(0);
  const unsigned blocks = unsigned((n + kThreads - 1) / kThreads);
  launch(blocks, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void batch_hard(const Tensor& dist, const Tensor& labels, double margin, bool soft, Tensor& loss, Tensor& counts,
                Tensor& mined) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_forward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_hard_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), dist.size(0), scalar_t(margin), soft,
          loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(), mined.mutable_data_ptr<int64_t>());
    });
  });
}

void batch_hard_grad(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                     Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_hard_backward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      batch_hard_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), mined.const_data_ptr<int64_t>(), dist.size(0), scalar_t(margin), soft,
          scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
    });
  });
}

void batch_all(const Tensor& pos_sorted, const Tensor& n_pos, const Tensor& neg_sorted, const Tensor& n_neg,
               double margin, Tensor& loss, Tensor& counts) {
  AT_DISPATCH_FLOATING_TYPES(pos_sorted.scalar_type(), "batch_all_forward", [&] {
    launch_rows(pos_sorted, [&](unsigned blocks, cudaStream_t stream) {
      batch_all_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          pos_sorted.const_data_ptr<scalar_t>(), n_pos.const_data_ptr<int64_t>(), neg_sorted.const_data_ptr<scalar_t>(),
          n_neg.const_data_ptr<int64_t>(), pos_sorted.size(0), scalar_t(margin), loss.mutable_data_ptr<double>(),
          counts.mutable_data_ptr<int64_t>());
    });
  });
}

void batch_all_grad(const Tensor& pos_sorted, const Tensor& pos_index, const Tensor& n_pos, const Tensor& neg_sorted,
                    const Tensor& neg_index, const Tensor& n_neg, double margin, const Tensor& scale, Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(pos_sorted.scalar_type(), "batch_all_backward", [&] {
    launch_rows(pos_sorted, [&](unsigned blocks, cudaStream_t stream) {
      batch_all_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          pos_sorted.const_data_ptr<scalar_t>(), pos_index.const_data_ptr<int64_t>(), n_pos.const_data_ptr<int64_t>(),
          neg_sorted.const_data_ptr<scalar_t>(), neg_index.const_data_ptr<int64_t>(), n_neg.const_data_ptr<int64_t>(),
          pos_sorted.size(0), scalar_t(margin), scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
    });
  });
}

void semi_hard(const Tensor& dist, const Tensor& labels, const Tensor& neg_sorted, const Tensor& neg_index,
               const Tensor& n_neg, double margin, Tensor& loss, Tensor& counts, Tensor& mined) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_forward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      semi_hard_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), neg_sorted.const_data_ptr<scalar_t>(),
          neg_index.const_data_ptr<int64_t>(), n_neg.const_data_ptr<int64_t>(), dist.size(0), scalar_t(margin),
          loss.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(), mined.mutable_data_ptr<int32_t>());
    });
  });
}

void semi_hard_grad(const Tensor& dist, const Tensor& mined, double margin, const Tensor& scale, Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_backward", [&] {
    launch_rows(dist, [&](unsigned blocks, cudaStream_t stream) {
      semi_hard_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          dist.const_data_ptr<scalar_t>(), mined.const_data_ptr<int32_t>(), dist.size(0), scalar_t(margin),
          scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>());
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
