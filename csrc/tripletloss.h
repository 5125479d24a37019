// Host-side pieces shared by the CPU and CUDA entry points: input checks, outputs, dispatch on p/swap.
#pragma once

#include <tuple>
#include <type_traits>

#include "stable.h"
#include "triplet_math.h"

namespace tripletloss {

// Checks the op's contract; the Python fake kernels (tripletloss_cuda/ops.py) give the same messages.
inline void check_inputs(const Tensor& anchor, const Tensor& positive, const Tensor& negative) {
  TL_CHECK(anchor.dim() == 2, "anchor should be a 2D tensor, got ", anchor.dim(), "D");
  const IntArrayRef sizes = anchor.sizes();  // each query is a call into the shim: once each
  const ScalarType dtype = anchor.scalar_type();
  const Device device = anchor.device();
  const std::pair<const char*, const Tensor*> others[] = {{"positive", &positive}, {"negative", &negative}};
  for (const auto& [name, x] : others) {
    TL_CHECK(x->sizes().equals(sizes), name, " should have the shape of anchor ", Shape{sizes}, ", got ", shape(*x));
    TL_CHECK(x->scalar_type() == dtype, name, " should have the dtype of anchor ", dtype, ", got ", x->scalar_type());
    TL_CHECK(x->device() == device, name, " should be on the device of anchor ", device_name(anchor), ", got ",
             device_name(*x));
  }
  TL_CHECK(is_floating(dtype), "anchor should be a floating tensor, got ", dtype);
}

// The three (N, D) inputs as the CPU and CUDA kernels read them: unit-stride columns, any row stride (elements).
template <typename T>
struct Rows {
  const T *a, *p, *n;
  int64_t sa, sp, sn, rows, cols;
};

template <typename T>
Rows<T> rows_of(const Tensor& a, const Tensor& p, const Tensor& n) {
  return {a.const_data_ptr<T>(),
          p.const_data_ptr<T>(),
          n.const_data_ptr<T>(),
          a.stride(0),
          p.stride(0),
          n.stride(0),
          a.size(0),
          a.size(1)};
}

// The kernels take any row stride (0 for broadcast rows included) but unit-stride columns.
inline Tensor unit_stride_columns(const Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : torch::stable::contiguous(x);
}

inline void check_distance(int64_t distance) {
  TL_CHECK(distance >= kPairwise && distance <= kNormalizedAtEps,
           "distance should be 0 (pairwise), 1 (cosine), 2 or 3 (normalized cosine), got ", distance);
}

// The width of the saved distances for a distance code (triplet_math.h dist_width).
inline int64_t dist_columns(int64_t distance) {
  check_distance(distance);
  return dist_width(distance == kPairwise ? Norm::L2 : Norm::Cos);
}

// loss: (N,) for reduction none (0), () for mean (1) and sum (2); dist: (N, 3) d(a,p), d(a,n), d(p,n), or for the
// cosine (N, 6) with |a|, |p|, |n| after them.
inline std::tuple<Tensor, Tensor> empty_forward_outputs(const Tensor& anchor, int64_t reduction, int64_t distance) {
  TL_CHECK(reduction >= 0 && reduction <= 2, "reduction should be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const int64_t width = dist_columns(distance);
  const int64_t n = anchor.size(0);
  const ScalarType dtype = anchor.scalar_type();
  const Device device = anchor.device();
  Tensor loss = reduction == 0 ? empty({n}, dtype, device) : empty({}, dtype, device);
  return {loss, empty({n, width}, acc_dtype(dtype), device)};
}

// grad and dist of the backward op as the kernels read them: grad in the inputs' dtype, (N,) for
// reduction none, else one element; dist contiguous (N, 3) (N, 6 for the cosine).
inline std::tuple<Tensor, Tensor> backward_operands(const Tensor& grad, const Tensor& dist, const Tensor& anchor,
                                                    int64_t reduction, int64_t distance) {
  const int64_t n = anchor.size(0), width = dist_columns(distance);
  TL_CHECK(reduction == 0 ? (grad.dim() == 1 && grad.size(0) == n) : grad.numel() == 1,
           "grad should have the shape of the loss, got ", shape(grad));
  TL_CHECK(dist.dim() == 2 && dist.size(0) == n && dist.size(1) == width, "dist should have shape (", n, ", ", width,
           "), got ", shape(dist));
  TL_CHECK(grad.device() == anchor.device() && dist.device() == anchor.device(),
           "grad and dist should be on the device of anchor ", device_name(anchor));
  return {to_dtype(grad, anchor.scalar_type()), as_contiguous(to_dtype(dist, acc_dtype(anchor.scalar_type())))};
}

inline std::tuple<Tensor, Tensor, Tensor> empty_backward_outputs(const Tensor& anchor) {
  const ScalarType dtype = anchor.scalar_type();
  const Device device = anchor.device();
  return {empty(anchor.sizes(), dtype, device), empty(anchor.sizes(), dtype, device),
          empty(anchor.sizes(), dtype, device)};
}

// The value of reduction over zero rows, as PyTorch gives it: mean nan, sum 0.
inline double empty_reduction_value(int64_t reduction) { return reduction == 1 ? NAN : 0.0; }

// Calls f(norm, swap) with compile-time constants for the distance (p = 1, 2 or other; the cosine) and swap.
template <typename F>
void dispatch_norm_swap(int64_t distance, double p, bool swap, F&& f) {
  check_distance(distance);
  TL_CHECK(distance != kPairwise || (p > 0 && p < INFINITY),
           "p should be finite and positive for the fused kernels, got ", p);
  auto with_swap = [&](auto norm) {
    if (swap) f(norm, std::true_type{});
    else f(norm, std::false_type{});
  };
  if (distance != kPairwise) with_swap(std::integral_constant<Norm, Norm::Cos>{});
  else if (p == 1.0) with_swap(std::integral_constant<Norm, Norm::L1>{});
  else if (p == 2.0) with_swap(std::integral_constant<Norm, Norm::L2>{});
  else with_swap(std::integral_constant<Norm, Norm::Lp>{});
}

}  // namespace tripletloss
