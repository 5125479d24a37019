// The seam between the CUDA sources and the two compilers that read them.
//
// Under nvcc this is CUDA itself: TL_LAUNCH is <<<...>>>, the functions below are the CUDA runtime and the
// stable ABI's device guard and current stream (aoti_torch_get_current_cuda_stream; setup.py defines USE_CUDA,
// which the shim's CUDA declarations sit behind). Built by the host compiler with -DTRIPLETLOSS_EMULATED (the test-only
// extension tripletloss_cuda._C_emu), the same kernels and launchers run on the CPU emulator of csrc/emu/emu.h, the
// functions answer for its fake device, and the ops register in the namespace tripletloss_cuda_emu on the
// CPU key. The kernels use only __global__/__device__/__shared__/__syncthreads/__shfl_*_sync/atomics and the
// built-in index variables; launchers call only what is declared here.
#pragma once

#include <atomic>
#include <cstddef>

#include "../stable.h"

#ifndef TRIPLETLOSS_EMULATED

#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

namespace tl_cuda {

using Stream = cudaStream_t;

// Makes the tensor's device current for the scope (as c10::cuda::CUDAGuard).
struct DeviceGuard {
  explicit DeviceGuard(const tripletloss::Tensor& t) : guard(t.get_device_index()) {}
  torch::stable::accelerator::DeviceGuard guard;
};

// The current stream of the current device (the guard's).
inline Stream current_stream() {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(torch::stable::accelerator::getCurrentDeviceIndex(), &stream));
  return static_cast<Stream>(stream);
}

// Resident blocks per SM of Kernel at `threads` threads per block (a multiple of 32, at most 1024; queried once
// per kernel and block size).
template <auto Kernel>
int max_blocks_per_sm(int threads) {
  static std::atomic<int> known[33];  // by threads / 32; 0: not queried yet
  std::atomic<int>& n = known[threads / 32];
  if (n.load(std::memory_order_relaxed) == 0) {
    int blocks = 0;
    STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, 0));
    n.store(blocks > 0 ? blocks : 1, std::memory_order_relaxed);
  }
  return n.load(std::memory_order_relaxed);
}

inline int sm_count(int device) {
  int sms = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

inline void memset_async(void* ptr, int value, size_t bytes, Stream stream) {
  STD_CUDA_CHECK(cudaMemsetAsync(ptr, value, bytes, stream));
}

}  // namespace tl_cuda

#define TL_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define TL_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()
#define TL_CUDA_LIBRARY_IMPL(m) STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m)

#else  // TRIPLETLOSS_EMULATED

#include "../emu/emu.h"

namespace tl_cuda {

struct Stream {};  // launches are synchronous
struct DeviceGuard {
  explicit DeviceGuard(const tripletloss::Tensor&) {}
};

inline Stream current_stream() { return {}; }

template <auto Kernel>
int max_blocks_per_sm(int threads) {  // asked every time: the tests change the fake device
  return tl_emu::blocks_per_sm(tl_emu::kernel_name<Kernel>(), threads);
}

inline int sm_count(int) { return tl_emu::sm_count(); }

inline void memset_async(void* ptr, int value, size_t bytes, Stream) { std::memset(ptr, value, bytes); }

}  // namespace tl_cuda

#define TL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::tl_emu::launch<kernel>(grid, block, smem, __VA_ARGS__))
#define TL_LAUNCH_CHECK() ((void)0)  // emulated launches throw
#define TL_CUDA_LIBRARY_IMPL(m) STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m)

#endif
