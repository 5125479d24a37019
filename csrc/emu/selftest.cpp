// Kernels that break CUDA's rules on purpose, for the tests of the emulator itself
// (tests/test_emulated.py::test_emulator_rules, and the sanitizer demonstration of `make sanitize`).
#include <cstdlib>
#include <string>

#include "../stable.h"  // TL_CHECK
#include "emu.h"

namespace {

struct alignas(16) Vec4 {
  float v[4];
};

// A block-wide sum through shared memory: the valid kernel.
__global__ void block_sum(long* out) {
  __shared__ long partial[32];
  long v = long(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    long total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    atomicAdd(reinterpret_cast<unsigned long long*>(out), static_cast<unsigned long long>(total));
  }
}

__global__ void barrier_after_exit() {
  if (threadIdx.x >= 16) return;
  __syncthreads();
}

__global__ void shfl_without_own_lane() {
  if (threadIdx.x == 1) (void)__shfl_xor_sync(0x1u, 1.0f, 1);
}

__global__ void shfl_outside_mask() {
  if (threadIdx.x < 2) (void)__shfl_xor_sync(0x3u, 1.0f, 2);
}

__global__ void shfl_with_exited_lane() {
  if (threadIdx.x == 1) return;
  (void)__shfl_xor_sync(0x3u, 1.0f, 1);
}

__global__ void shfl_with_lane_at_barrier() {
  if (threadIdx.x == 0) (void)__shfl_xor_sync(0x3u, 1.0f, 1);
  else __syncthreads();
}

__global__ void throws() { TL_CHECK(threadIdx.x != 5, "thread 5 throws"); }

__global__ void read_past_the_end(const float* x, int n, float* out) { out[threadIdx.x] = x[n]; }

__global__ void misaligned_vector_load(const float* x, float* out) {
  const Vec4 v = *reinterpret_cast<const Vec4*>(x + 1);
  out[threadIdx.x] = v.v[0];
}

}  // namespace

namespace tl_emu {

long selftest(const std::string& name) {
  const dim3 one(1), block(64);
  if (name == "block_sum") {
    long out = 0;
    tl_emu::launch<block_sum>(dim3(3), block, 0, &out);
    return out;
  }
  if (name == "barrier_after_exit") tl_emu::launch<barrier_after_exit>(one, block, 0);
  else if (name == "shfl_without_own_lane") tl_emu::launch<shfl_without_own_lane>(one, block, 0);
  else if (name == "shfl_outside_mask") tl_emu::launch<shfl_outside_mask>(one, block, 0);
  else if (name == "shfl_with_exited_lane") tl_emu::launch<shfl_with_exited_lane>(one, dim3(2), 0);
  else if (name == "shfl_with_lane_at_barrier") tl_emu::launch<shfl_with_lane_at_barrier>(one, dim3(2), 0);
  else if (name == "throws") tl_emu::launch<throws>(one, block, 0);
  else if (name == "invalid_configuration") tl_emu::launch<throws>(dim3(0), block, 0);
  else if (name == "read_past_the_end" || name == "misaligned_vector_load") {
    auto* x = static_cast<float*>(std::malloc(8 * sizeof(float)));  // malloc: 16-byte aligned
    float out[64] = {};
    for (int i = 0; i < 8; ++i) x[i] = float(i);
    if (name == "read_past_the_end") tl_emu::launch<read_past_the_end>(one, block, 0, x, 8, out);
    else tl_emu::launch<misaligned_vector_load>(one, block, 0, x, out);
    std::free(x);
    return long(out[0]);
  } else TL_CHECK(false, "no self-test named ", name);
  return 0;
}

}  // namespace tl_emu
