// Host side of the distance epilogue (csrc/epilogue.cpp): the per-device launchers each backend provides
// (cpu/epilogue_kernel.cpp, cuda/epilogue_kernel.cu) around mining_math.h gram_distance.
#pragma once

#include "stable.h"

namespace tripletloss {
namespace epilogue {

// Inputs checked and contiguous: gram (B, M) float32/float64, overwritten in place; sq_x (B,), sq_y (M,) of gram's
// dtype, or nullptr for distance 2 (dot); keys_x (B,), keys_y (M,) int64; distance 0, 1 or 2 (OP_CODES). B * M > 0.
struct Backend {
  void (*gram_distances)(Tensor& gram, const Tensor* sq_x, const Tensor* sq_y, const Tensor& keys_x,
                         const Tensor& keys_y, int64_t distance);
};

const Backend& cpu_backend();
const Backend& cuda_backend();  // defined in cuda/epilogue_kernel.cu (CUDA builds only)

}  // namespace epilogue
}  // namespace tripletloss
