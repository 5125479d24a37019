// Host side of the loss over index triplets (csrc/indexed.cpp): the per-device launchers each backend provides
// (cpu/indexed_kernel.cpp, cuda/indexed_kernel.cu) around the per-triplet math of indexed_math.h.
#pragma once

#include "stable.h"

namespace tripletloss {
namespace indexed {

// Inputs contiguous: x (N, D), r (M, D) of one floating dtype (r is x without a reference set); anchors,
// positives, negatives (T,) int64. saved (T, kSaved) and the gradient accumulators are in the accumulation
// type (float32 for 16-bit inputs, float64 for float64).
struct Backend {
  // saved[t] = triplet_forward(t) for every triplet.
  void (*forward)(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives,
                  const Tensor& negatives, int64_t distance, double margin, bool swap, bool soft, Tensor& saved);
  // Destination row k < N is row k of grad_x, row k - N of grad_r otherwise (with a reference set); its
  // contributions are entries[offsets[k], offsets[k + 1]), each role * T + t, in that order. w (T,): the
  // upstream gradient of each triplet's loss.
  void (*backward)(const Tensor& x, const Tensor& r, const Tensor& anchors, const Tensor& positives,
                   const Tensor& negatives, const Tensor& saved, const Tensor& w, const Tensor& entries,
                   const Tensor& offsets, int64_t distance, double margin, bool swap, bool soft, Tensor& grad_x,
                   Tensor& grad_r);
};

const Backend& cpu_backend();
const Backend& cuda_backend();  // defined in cuda/indexed_kernel.cu (CUDA builds only)

}  // namespace indexed
}  // namespace tripletloss
