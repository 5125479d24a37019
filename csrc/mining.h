// Host side of the mining ops (csrc/mining.cpp): the per-device row launchers each backend provides
// (cpu/mining_kernel.cpp, cuda/mining_kernel.cu). The ops themselves are device-generic code around them on
// the stable ABI (stable.h): argument checks, outputs and the final reductions.
#pragma once

#include <tuple>

#include "stable.h"

namespace tripletloss {
namespace mining {

// Row launchers: run the row functions of mining_math.h for every anchor. Inputs are contiguous; dist
// is float32 or float64 (N, M) (anchors x references), labels int64 (N,), ref_labels int64 (M,), self_index
// int64 (N,) (the excluded reference column of each anchor, or -1); batch-all and semi-hard sort each
// anchor's positives (the CPU in per-task buffers, CUDA in shared-memory tiles); loss (N,) float64 and
// counts (N, kCounts) int64 are written per anchor (mining_math.h write_counts); scale is a 0-d float64 tensor (read on
// the device: no host synchronization).
struct Backend {
  void (*batch_hard)(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                     double margin, bool soft, Tensor& loss, Tensor& counts, Tensor& mined);
  void (*batch_hard_grad)(const Tensor& dist, const Tensor& mined, double margin, bool soft, const Tensor& scale,
                          Tensor& grad);
  void (*batch_all)(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, Tensor& loss, Tensor& counts);
  void (*batch_all_grad)(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                         double margin, const Tensor& scale, Tensor& grad);
  void (*semi_hard)(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                    double margin, Tensor& loss, Tensor& counts);
  void (*semi_hard_grad)(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                         double margin, const Tensor& scale, Tensor& grad);
};

const Backend& cpu_backend();

// CPU only (cpu/mining_kernel.cpp): semi_hard's forward launcher that also returns the (A, 3) int64 active
// triplets (anchor row, positive column, negative column), by anchor.
Tensor semi_hard_triplets(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index,
                          double margin, Tensor& loss, Tensor& counts);

const Backend& cuda_backend();  // defined in cuda/mining_kernel.cu (CUDA and emulated builds only)

}  // namespace mining
}  // namespace tripletloss
