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

// The fused CPU mining on a Gram block (cpu/mining_gram_kernel.cpp; schemas.h TL_MINING_GRAM_SCHEMAS): contiguous
// inputs, checked by csrc/mining_gram.cpp; sq_x/sq_y undefined (nullptr) for the dot distance; keys int32.
struct __attribute__((visibility("hidden"))) GramBlock {
  Tensor gram;
  const Tensor *sq_x, *sq_y;
  Tensor keys_x, keys_y, self_index, pos_cols, pos_start, pos_end;
  int64_t distance;
};
struct __attribute__((visibility("hidden")))
Mined {  // the entries of dL/dgram the mined triplets make, by anchor (schemas.h)
  Tensor pairs, coef;
};
Mined batch_hard_gram(const GramBlock& g, double margin, bool soft, Tensor& loss, Tensor& counts);
Mined semi_hard_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts);
// Writes dL/dgram into g.gram and each anchor's number of nonzero entries into nonzero (N,) int64.
void batch_all_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts, Tensor& nonzero);
void symmetrize(Tensor& w);  // w + w^T in place (square, contiguous)
// The rows' gradients from entries of dL/dgram (coef (P,) at pairs (P, 2)); y nullptr: the references are x itself.
void mined_gram_backward(const Tensor& coef, const Tensor& pairs, const Tensor& x, const Tensor* y, int64_t distance,
                         Tensor& grad_x, Tensor& grad_y);

const Backend& cuda_backend();  // defined in cuda/mining_kernel.cu (CUDA and emulated builds only)

}  // namespace mining
}  // namespace tripletloss
