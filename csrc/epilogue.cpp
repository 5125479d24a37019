// The distance epilogue of distances.block (schemas.h TL_EPILOGUE_SCHEMAS): the matrix product gram = x_b y^T turned
// into distances in place, one pass over the (B, M) block (mining_math.h gram_distance: the entries of block()'s
// six torch passes, bitwise). About 8 bytes moved per float32 entry (read and write gram; the M-long sq_y and keys_y
// stay in cache) instead of about 50 for the passes. Argument checks once here, then a launcher per device
// (epilogue.h). The fake kernel and the caller: tripletloss_cuda/distances.py.
#include <optional>

#include "epilogue.h"
#include "mining_math.h"
#include "schemas.h"

namespace tripletloss {
namespace epilogue {
namespace {

using mining::kDot;
using mining::kEuclidean;

// The same messages as the fake kernel (tripletloss_cuda/distances.py `_check_epilogue_inputs`).
void check_vector(const Tensor& t, const char* name, int64_t n, const char* dim, ScalarType dtype, const Tensor& gram) {
  TL_CHECK(t.dim() == 1 && t.size(0) == n, name, " should have shape (", n, ",) (gram's ", dim, "), got ", shape(t));
  TL_CHECK(t.scalar_type() == dtype, name, " should be ", dtype, ", got ", t.scalar_type());
  TL_CHECK(t.device() == gram.device(), name, " should be on gram's device ", device_name(gram), ", got ",
           device_name(t));
}

void check_inputs(const Tensor& gram, const std::optional<Tensor>& sq_x, const std::optional<Tensor>& sq_y,
                  const Tensor& keys_x, const Tensor& keys_y, int64_t distance) {
  TL_CHECK(gram.dim() == 2, "gram should be a 2D tensor (B, M), got shape ", shape(gram));
  TL_CHECK(gram.scalar_type() == ScalarType::Float || gram.scalar_type() == ScalarType::Double,
           "gram should be float32 or float64, got ", gram.scalar_type());
  TL_CHECK(gram.is_contiguous(), "gram should be contiguous (it is overwritten in place), got strides ",
           Shape{gram.strides()});
  TL_CHECK(distance >= kEuclidean && distance <= kDot,
           "distance should be 0 (euclidean), 1 (squared euclidean) or 2 (dot), got ", distance);
  const bool dot = distance == kDot;
  TL_CHECK(sq_x.has_value() != dot && sq_y.has_value() != dot,
           dot ? "sq_x and sq_y should be None for distance 2 (dot)" : "sq_x and sq_y should be given for distance ",
           dot ? "" : (distance == kEuclidean ? "0 (euclidean)" : "1 (squared euclidean)"));
  const int64_t b = gram.size(0), m = gram.size(1);
  if (!dot) {
    check_vector(*sq_x, "sq_x", b, "rows", gram.scalar_type(), gram);
    check_vector(*sq_y, "sq_y", m, "columns", gram.scalar_type(), gram);
  }
  check_vector(keys_x, "keys_x", b, "rows", ScalarType::Long, gram);
  check_vector(keys_y, "keys_y", m, "columns", ScalarType::Long, gram);
}

const Backend& backend_for(const Tensor& gram) {
#ifdef TRIPLETLOSS_EMULATED
  (void)gram;
  return cuda_backend();  // the emulated CUDA launcher, on CPU tensors
#else
#ifdef TRIPLETLOSS_WITH_CUDA
  if (gram.is_cuda()) return cuda_backend();
#endif
  return cpu_backend();
#endif
}

void gram_distances(Tensor gram, const std::optional<Tensor>& sq_x_, const std::optional<Tensor>& sq_y_,
                    const Tensor& keys_x_, const Tensor& keys_y_, int64_t distance) {
  check_inputs(gram, sq_x_, sq_y_, keys_x_, keys_y_, distance);
  if (gram.numel() == 0) return;
  const std::optional<Tensor> sq_x = sq_x_ ? std::optional<Tensor>(as_contiguous(*sq_x_)) : std::nullopt;
  const std::optional<Tensor> sq_y = sq_y_ ? std::optional<Tensor>(as_contiguous(*sq_y_)) : std::nullopt;
  const Tensor keys_x = as_contiguous(keys_x_), keys_y = as_contiguous(keys_y_);
  backend_for(gram).gram_distances(gram, sq_x ? &*sq_x : nullptr, sq_y ? &*sq_y : nullptr, keys_x, keys_y, distance);
}

}  // namespace
}  // namespace epilogue
}  // namespace tripletloss

#define TL_EPILOGUE_IMPLS(m) m.impl("gram_distances_", TORCH_BOX(&tripletloss::epilogue::gram_distances))

// The same device-generic code for both: only the launchers (backend_for) differ.
#ifndef TRIPLETLOSS_EMULATED
STABLE_TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_EPILOGUE_SCHEMAS(m); }
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) { TL_EPILOGUE_IMPLS(m); }
#ifdef TRIPLETLOSS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m) { TL_EPILOGUE_IMPLS(m); }
#endif
#else
// The emulated CUDA build (_C_emu): CPU tensors through the CUDA launcher on the emulator; the schema is defined in
// emu/module.cpp.
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m) { TL_EPILOGUE_IMPLS(m); }
#endif
