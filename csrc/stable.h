// The host code's whole view of PyTorch: the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) and
// nothing else, so that one build of _C loads under every torch release from 2.11 on. setup.py builds with
// TORCH_TARGET_VERSION = 2.11, so anything newer than the 2.11 stable surface fails to compile, and
// tests/test_stable_abi.py checks the built library imports no C++ symbol of libtorch or libc10.
//
// What the 2.11 surface lacks is added here by hand, on its C shim (aoti_torch_*, torch_*):
// - check macros that throw the standard exception behind each Python error type (below);
// - empty(): aoti_torch_empty_strided, with no trip through the boxed dispatcher (torch::stable::empty takes one);
// - parallel_for(): inline for a one-task range;
// - the printing of shapes and devices in messages, opmath_t (at::opmath_type), the floating dispatch macros.
// Composite ATen code the host side used to run (at::sort/searchsorted/cat/where/arange for the indexed op's
// backward, its reductions, at::aminmax) is now done in Python before or after the op call, or by hand in the
// launchers; each place says which.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <type_traits>

namespace tripletloss {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

namespace detail {
template <typename Error, typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw Error(message.str());
}
}  // namespace detail

// Checks whose exception carries the message alone (STD_TORCH_CHECK prefixes the function, file and line). The
// exception type picks what Python raises from torch.ops: std::runtime_error a RuntimeError, std::out_of_range
// an IndexError (every torch release), std::invalid_argument a ValueError on torch 2.11 to 2.14 but a
// RuntimeError on 2.15 (only out_of_range keeps its type there). So wherever users must get a ValueError, the
// Python layer checks before the op, as the fake kernels do.
#define TL_CHECK_AS(error, cond, ...)                  \
  do {                                                 \
    if (!(cond)) [[unlikely]]                          \
      ::tripletloss::detail::fail<error>(__VA_ARGS__); \
  } while (false)
#define TL_CHECK(cond, ...) TL_CHECK_AS(std::runtime_error, cond, __VA_ARGS__)
#define TL_CHECK_INDEX(cond, ...) TL_CHECK_AS(std::out_of_range, cond, __VA_ARGS__)
#define TL_CHECK_VALUE(cond, ...) TL_CHECK_AS(std::invalid_argument, cond, __VA_ARGS__)

// Shapes and devices in messages, printed as c10 prints them: [3, 4], cpu, cuda:0.
struct Shape {
  IntArrayRef sizes;
};
inline std::ostream& operator<<(std::ostream& out, Shape s) {
  out << '[';
  for (size_t i = 0; i < s.sizes.size(); ++i) out << (i ? ", " : "") << s.sizes[i];
  return out << ']';
}
inline Shape shape(const Tensor& t) { return {t.sizes()}; }

struct DeviceName {  // not a Device member: torch::stable's types have hidden visibility
  const char* type;
  int index;  // -1: none
};
inline std::ostream& operator<<(std::ostream& out, DeviceName d) {
  out << d.type;
  if (d.index >= 0) out << ':' << d.index;
  return out;
}
inline DeviceName device_name(const Tensor& t) {
  const Device device = t.device();
  if (device.is_cpu()) return {"cpu", -1};
  return {device.is_cuda() ? "cuda" : "device", device.has_index() ? int(device.index()) : -1};
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// float32 accumulation for 16-bit types (at::opmath_type), the type itself otherwise.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, float, T>;

// The accumulation dtype of the per-row outputs: float64 for float64 inputs, else float32.
inline ScalarType acc_dtype(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// A new contiguous tensor of `sizes` on `device`, straight through the C shim.
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, Device device) {
  TL_CHECK(sizes.size() <= 8, "empty: at most 8 dimensions, got ", sizes.size());
  int64_t strides[8];
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) strides[i] = stride, stride *= sizes[i] > 1 ? sizes[i] : 1;
  AtenTensorHandle handle = nullptr;
  const int32_t shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const int32_t shim_device = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device.type()));
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(int64_t(sizes.size()), sizes.data(), strides, shim_dtype, shim_device,
                                                  device.index(), &handle));
  return Tensor(handle);
}
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, Device device) {
  return empty(IntArrayRef(sizes), dtype, device);
}

inline Tensor zeros(std::initializer_list<int64_t> sizes, ScalarType dtype, Device device) {
  Tensor t = empty(sizes, dtype, device);
  TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(t.get()));
  return t;
}

// x itself when it already has `dtype` (no dispatcher call), else a converted copy.
inline Tensor to_dtype(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}

// torch::stable::parallel_for, run inline when the range is one task: the shim's call costs more than a small
// row loop (about a thousand instructions), and at::parallel_for also runs such a range on the calling thread.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end - begin <= grain) {
    if (begin < end) f(begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, grain, f);
}

inline Tensor as_contiguous(const Tensor& x) { return x.is_contiguous() ? x : torch::stable::contiguous(x); }

// CPU loops compiled for AVX-512, AVX2 and baseline x86-64, picked at load time by the CPU (GCC's target_clones).
// run_range(f, i0, i1) runs f(i0, i1) so compiled, every call inside it inlined (flatten), so that the helpers it
// calls get the clone's instructions too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define TL_CPU_CLONES_FLAT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define TL_CPU_CLONES
#define TL_CPU_CLONES_FLAT
#endif
template <typename F>
TL_CPU_CLONES_FLAT void run_range(const F& f, int64_t i0, int64_t i1) {
  f(i0, i1);
}

}  // namespace tripletloss

// AT_DISPATCH_FLOATING_TYPES(_AND2(kHalf, kBFloat16, ...)) on the stable surface: the body (a lambda) sees
// `scalar_t`. (headeronly's THO_DISPATCH_V2 re-expands its body argument, so a body with a comma outside
// parentheses does not survive it.)
#define TL_DISPATCH_CASE(enum_type, type, ...) \
  case ::tripletloss::ScalarType::enum_type: { \
    using scalar_t [[maybe_unused]] = type;    \
    __VA_ARGS__();                             \
    break;                                     \
  }
#define TL_DISPATCH_DEFAULT(type, name) \
  default: TL_CHECK(false, '"', name, "\" not implemented for '", type, "'")
#define TL_DISPATCH_FLOATING(type, name, ...)       \
  [&] {                                             \
    switch (type) {                                 \
      TL_DISPATCH_CASE(Double, double, __VA_ARGS__) \
      TL_DISPATCH_CASE(Float, float, __VA_ARGS__)   \
      TL_DISPATCH_DEFAULT(type, name);              \
    }                                               \
  }()
#define TL_DISPATCH_FLOATING_AND_HALF(type, name, ...)       \
  [&] {                                                      \
    switch (type) {                                          \
      TL_DISPATCH_CASE(Double, double, __VA_ARGS__)          \
      TL_DISPATCH_CASE(Float, float, __VA_ARGS__)            \
      TL_DISPATCH_CASE(Half, c10::Half, __VA_ARGS__)         \
      TL_DISPATCH_CASE(BFloat16, c10::BFloat16, __VA_ARGS__) \
      TL_DISPATCH_DEFAULT(type, name);                       \
    }                                                        \
  }()
