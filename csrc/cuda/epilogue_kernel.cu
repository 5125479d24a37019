// CUDA launcher of the distance epilogue (epilogue.h): one pass over the (B, M) block, gram_distance per entry.
// Threads stride over the flattened block (consecutive threads take consecutive entries of a row: coalesced
// whatever M is) with 64-bit indices; each thread finds its first (row, column) with one division and then steps
// through the block without dividing. A grid of one wave of resident blocks (at most one block per 256 entries);
// the distance code is a template argument. Every entry is written from its own inputs alone: bitwise the same result
// for any grid and block order. The current stream, no host synchronization.
//
// Bitwise equal to distances.block's torch passes: nvcc contracts a * b + c into an FMA by default, but for
// g * -2 + sq it emits 2g by an add and subtracts it (FADD/DADD, two roundings, as torch's mul_ and add_), with no
// FFMA/DFMA; the machine-code gate (tools/sass_gate.py) checks that the squared euclidean and dot instantiations
// issue none, so that a compiler that contracts it fails the build's gate rather than changing bits silently.
#include <algorithm>

#include "../epilogue.h"
#include "../mining_math.h"
#include "cuda_compat.h"

namespace tripletloss {
namespace epilogue {
namespace {

constexpr int kThreads = 256;

template <typename T, int Distance>
__global__ void __launch_bounds__(kThreads)
    gram_distances_kernel(T* gram, const T* sq_x, const T* sq_y, const int64_t* keys_x, const int64_t* keys_y,
                          int64_t b, int64_t m) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start >= b * m) return;
  // Entry e = i * m + j; a step of `stride` entries moves by step_i rows and step_j columns (with a carry).
  const int64_t step_i = stride / m, step_j = stride - step_i * m;
  int64_t i = start / m, j = start - i * m;
  for (; i < b; i += step_i, j += step_j) {
    if (j >= m) j -= m, ++i;
    if (i >= b) break;
    const T sq_i = Distance == mining::kDot ? T(0) : sq_x[i];
    const T sq_j = Distance == mining::kDot ? T(0) : sq_y[j];
    T* g = gram + i * m + j;
    *g = mining::gram_distance(*g, sq_i, sq_j, keys_x[i] == keys_y[j], Distance);
  }
}

template <typename T, int Distance>
void launch(Tensor& gram, const Tensor* sq_x, const Tensor* sq_y, const Tensor& keys_x, const Tensor& keys_y,
            tl_cuda::Stream stream) {
  constexpr auto kernel = gram_distances_kernel<T, Distance>;  // one macro argument
  const int64_t b = gram.size(0), m = gram.size(1);
  const int64_t wave =
      int64_t(tl_cuda::sm_count(gram.get_device_index())) * tl_cuda::max_blocks_per_sm<kernel>(kThreads);
  const int64_t blocks = std::min<int64_t>((b * m + kThreads - 1) / kThreads, wave);
  TL_LAUNCH(kernel, int(blocks), kThreads, 0, stream, gram.mutable_data_ptr<T>(),
            sq_x ? sq_x->const_data_ptr<T>() : nullptr, sq_y ? sq_y->const_data_ptr<T>() : nullptr,
            keys_x.const_data_ptr<int64_t>(), keys_y.const_data_ptr<int64_t>(), b, m);
  TL_LAUNCH_CHECK();
}

void gram_distances(Tensor& gram, const Tensor* sq_x, const Tensor* sq_y, const Tensor& keys_x, const Tensor& keys_y,
                    int64_t distance) {
  const tl_cuda::DeviceGuard guard(gram);
  const tl_cuda::Stream stream = tl_cuda::current_stream();
  TL_DISPATCH_FLOATING(gram.scalar_type(), "gram_distances_cuda", [&] {
    if (distance == mining::kEuclidean) launch<scalar_t, mining::kEuclidean>(gram, sq_x, sq_y, keys_x, keys_y, stream);
    else if (distance == mining::kSquaredEuclidean)
      launch<scalar_t, mining::kSquaredEuclidean>(gram, sq_x, sq_y, keys_x, keys_y, stream);
    else launch<scalar_t, mining::kDot>(gram, sq_x, sq_y, keys_x, keys_y, stream);
  });
}

}  // namespace

const Backend& cuda_backend() {
  static const Backend backend{gram_distances};
  return backend;
}

}  // namespace epilogue
}  // namespace tripletloss
