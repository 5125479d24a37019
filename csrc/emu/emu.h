// A CPU emulator of the part of CUDA our kernels use, so that the kernel source of csrc/cuda/*.cu runs in CI
// without a GPU (the extension tripletloss_cuda._C_emu, built with -DTRIPLETLOSS_EMULATED; see
// csrc/cuda/cuda_compat.h for the seam and README "The CUDA emulator" for what it proves).
//
// Execution model, faithful where the kernels depend on it:
// - every thread of a block is a fiber with its own stack; the blocks of a launch run one after the other, in
//   an order shuffled with a per-launch seed; inside a block the warps run in a shuffled order, each warp as
//   far as it can (to its next __syncthreads) before the next one starts, so a missing barrier shows up as a
//   wrong value rather than going unnoticed;
// - __syncthreads() is a real barrier of all the block's threads; a thread that exits while others wait at
//   a barrier, a lane waiting at a shuffle that can never complete (a lane of its mask has exited, waits at a
//   barrier or at a shuffle that cannot complete), and lanes of one mask calling different shuffles, are
//   errors (never a hang);
// - warp shuffles exchange values only among the lanes of their mask, in lock step: a lane calling with a
//   mask that lacks its own bit, or reading a lane outside the mask, is an error;
// - __shared__ variables are thread_local: one per OS thread, which runs one block at a time;
// - atomics are std::atomic_ref, __threadfence a sequentially consistent fence, __ldcg/__ldg plain loads.
// Errors are thrown as std::runtime_error (Python: RuntimeError) naming the kernel, the block, the thread and the rule.
// Not modelled: concurrency between blocks (a block spinning on another block would never finish), the weak
// memory model, streams (launches are synchronous), timings.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

namespace tl_emu {

// The built-in variables of the running fiber (set by the scheduler at every switch).
extern thread_local uint3 thread_idx, block_idx;
extern thread_local dim3 block_dim, grid_dim;

enum class Shfl { Idx, Up, Down, Xor, Sync };
// Blocks the calling lane until every lane of `mask` has called the same shuffle; `value` (bytes long)
// is replaced by the value of the source lane. Throws on a broken rule.
void shuffle(Shfl kind, unsigned mask, void* value, int bytes, int arg, int width);
void syncthreads();

// Runs body(ctx) as the kernel `name` on grid x block threads. Throws std::runtime_error on a broken rule.
void run(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx);
// The fake device: its number of SMs, and the resident blocks per SM of the kernel `name` at `threads`
// threads per block (set by the tests, else 2048 / threads).
int sm_count();
int blocks_per_sm(const char* name, int threads);

// "ns::forward_kernel<float, ...>" for the function K.
template <auto K>
const char* kernel_name() {
  static const std::string name = [](std::string_view s) {  // "... [with auto K = <name>]"
    const auto begin = s.find("K = ") + 4;
    return std::string(s.substr(begin, s.rfind(']') - begin));
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <auto K, typename... Args>
void launch(dim3 grid, dim3 block, size_t /*smem*/, Args... args) {
  auto call = [&] { K(args...); };
  run(kernel_name<K>(), grid, block, [](void* f) { (*static_cast<decltype(call)*>(f))(); }, &call);
}

template <typename T>
T shfl(Shfl kind, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of an unsupported type");
  shuffle(kind, mask, &v, int(sizeof(T)), arg, width);
  return v;
}

}  // namespace tl_emu

// CUDA's names, as the kernels use them.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::tl_emu::thread_idx)
#define blockIdx (::tl_emu::block_idx)
#define blockDim (::tl_emu::block_dim)
#define gridDim (::tl_emu::grid_dim)

inline void __syncthreads() { ::tl_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  char none = 0;
  ::tl_emu::shuffle(::tl_emu::Shfl::Sync, mask, &none, 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::tl_emu::shfl(::tl_emu::Shfl::Idx, mask, v, src, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::tl_emu::shfl(::tl_emu::Shfl::Up, mask, v, int(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::tl_emu::shfl(::tl_emu::Shfl::Down, mask, v, int(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::tl_emu::shfl(::tl_emu::Shfl::Xor, mask, v, lane_mask, width);
}

template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}
template <typename T>
T atomicMin(T* address, T v) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// CUDA's device min/max for the integer and floating types (the kernels call them unqualified).
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
constexpr T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
constexpr T max(T a, T b) {
  return a < b ? b : a;
}

// Control of the emulator by the tests (tripletloss_cuda._C_emu, csrc/emu/module.cpp).
namespace tl_emu {

struct LaunchRecord {
  std::string kernel;
  unsigned grid, block;
  unsigned long long barriers;  // __syncthreads() released, over all blocks
  unsigned masks[64];           // distinct shuffle masks, the first 64 (sorted by first use)
  int n_masks;
};
void set_seed(unsigned long long seed);  // the block orders of the following launches
void set_device(int sms);
void set_occupancy(const std::string& kernel_substring, int blocks_per_sm);  // < 1: remove
void clear_occupancy();
// The most recent launches (up to 4096), oldest first; clear_launches() empties the log.
std::vector<LaunchRecord> launches();
void clear_launches();

}  // namespace tl_emu
