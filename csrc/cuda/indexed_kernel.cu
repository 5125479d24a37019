// CUDA launchers of the loss over index triplets (indexed.h): one thread per triplet forward, one thread per
// destination row backward, each running the functions of indexed_math.h exactly as the CPU does. Simple
// rather than fast (a thread walks whole rows: uncoalesced for large D); each thread writes only its own
// outputs and each row adds its contributions in the fixed CSR order, so results are deterministic without
// atomics. Launched on the current stream, no host synchronization. Out-of-range indices are checked per
// triplet on the device (see indexed.cpp).
#include "../indexed.h"
#include "../indexed_math.h"
#include "cuda_compat.h"

namespace tripletloss {
namespace indexed {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t item(int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  return i < count ? i : -1;
}

template <typename T, typename acc_t>
__global__ void forward_kernel(const T* x, const T* r, int64_t d, int64_t n_rows, int64_t m_rows, const int64_t* a,
                               const int64_t* p, const int64_t* n, int64_t count, int distance, acc_t margin, bool swap,
                               bool soft, acc_t* saved) {
  const int64_t t = item(count);
  if (t >= 0)
    triplet_forward<T, acc_t>(x, r, d, n_rows, m_rows, a[t], p[t], n[t], distance, margin, swap, soft,
                              saved + t * kSaved);
}

template <typename T, typename acc_t>
__global__ void backward_kernel(const T* x, const T* r, int64_t d, int64_t n_rows, int64_t m_rows, const int64_t* a,
                                const int64_t* p, const int64_t* n, int64_t count, const acc_t* saved, const acc_t* w,
                                const int64_t* entries, const int64_t* offsets, int64_t rows, int distance,
                                acc_t margin, bool swap, bool soft, acc_t* grad_x, acc_t* grad_r) {
  const int64_t k = item(rows);
  if (k < 0) return;
  acc_t* out = k < n_rows ? grad_x + k * d : grad_r + (k - n_rows) * d;
  row_backward<T, acc_t>(x, r, d, n_rows, m_rows, a, p, n, saved, w, entries, offsets[k], offsets[k + 1], count,
                         distance, margin, swap, soft, out);
}

int blocks_for(int64_t count) { return int((count + kThreads - 1) / kThreads); }

void forward(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
             int64_t distance, double margin, bool swap, bool soft, Tensor& saved) {
  const tl_cuda::DeviceGuard guard(x);
  const tl_cuda::Stream stream = tl_cuda::current_stream();
  const int64_t count = anchors.size(0);
  TL_DISPATCH_FLOATING_AND_HALF(x.scalar_type(), "indexed_triplet_forward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr auto kernel = forward_kernel<scalar_t, acc_t>;  // one macro argument
    TL_LAUNCH(kernel, blocks_for(count), kThreads, 0, stream, x.const_data_ptr<scalar_t>(),
              r.const_data_ptr<scalar_t>(), x.size(1), x.size(0), r.size(0), anchors.const_data_ptr<int64_t>(),
              positives.const_data_ptr<int64_t>(), negatives.const_data_ptr<int64_t>(), count, int(distance),
              acc_t(margin), swap, soft, saved.mutable_data_ptr<acc_t>());
    TL_LAUNCH_CHECK();
  });
}

void backward(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
              const Tensor& saved, const Tensor& w, const Tensor& entries, const Tensor& offsets, int64_t distance,
              double margin, bool swap, bool soft, Tensor& grad_x, Tensor& grad_r) {
  const tl_cuda::DeviceGuard guard(x);
  const tl_cuda::Stream stream = tl_cuda::current_stream();
  const int64_t rows = offsets.size(0) - 1;
  TL_DISPATCH_FLOATING_AND_HALF(x.scalar_type(), "indexed_triplet_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr auto kernel = backward_kernel<scalar_t, acc_t>;  // one macro argument
    TL_LAUNCH(kernel, blocks_for(rows), kThreads, 0, stream, x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
              x.size(1), x.size(0), r.size(0), anchors.const_data_ptr<int64_t>(), positives.const_data_ptr<int64_t>(),
              negatives.const_data_ptr<int64_t>(), anchors.size(0), saved.const_data_ptr<acc_t>(),
              w.const_data_ptr<acc_t>(), entries.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), rows,
              int(distance), acc_t(margin), swap, soft, grad_x.mutable_data_ptr<acc_t>(),
              grad_r.mutable_data_ptr<acc_t>());
    TL_LAUNCH_CHECK();
  });
}

}  // namespace

const Backend& cuda_backend() {
  static const Backend backend{forward, backward};
  return backend;
}

}  // namespace indexed
}  // namespace tripletloss
