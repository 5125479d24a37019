// The fused CPU mining ops (issue 18; schemas.h TL_MINING_GRAM_SCHEMAS): the mining losses on a block of the matrix
// product x_b y^T, read once (distances, mining and batch-all's gradient in one pass; cpu/mining_gram_kernel.cpp).
// Argument checks and outputs here; autograd and the blocks of anchors: tripletloss_cuda/mining/ops.py
// FusedMiningFunction. CPU only (the package's _C; not in the emulated build).
#include <optional>
#include <tuple>
#include <vector>

#include "mining.h"
#include "mining_math.h"
#include "schemas.h"

namespace tripletloss {
namespace mining {
namespace {

void check_vector(const Tensor& t, const char* name, int64_t n, ScalarType dtype) {
  TL_CHECK(t.dim() == 1 && t.size(0) == n, name, " should have shape (", n, ",), got ", shape(t));
  TL_CHECK(t.scalar_type() == dtype, name, " should be ", dtype, ", got ", t.scalar_type());
  TL_CHECK(t.device().is_cpu(), name, " should be a CPU tensor, got ", device_name(t));
}

// Index ranges are checked in full (O(N + M)): the launchers write through them.
void check_range(const Tensor& t, const char* name, int64_t lo, int64_t hi) {
  const int64_t* v = t.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < t.numel(); ++e)
    TL_CHECK_INDEX(v[e] >= lo && v[e] < hi, name, " should hold values in [", lo, ", ", hi, "), got ", v[e]);
}

struct Owned {  // contiguous copies the block refers to
  Tensor gram, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end;
  std::optional<Tensor> sq_x, sq_y;
  int64_t distance;
  GramBlock block() const {
    return {gram,
            sq_x ? &*sq_x : nullptr,
            sq_y ? &*sq_y : nullptr,
            keys_x,
            keys_y,
            self_index,
            pos_cols,
            pos_start,
            pos_end,
            distance};
  }
};

Owned prepare(const Tensor& gram, const std::optional<Tensor>& sq_x, const std::optional<Tensor>& sq_y,
              const Tensor& keys_x, const Tensor& keys_y, const Tensor& self_index, const Tensor& pos_cols,
              const Tensor& pos_start, const Tensor& pos_end, int64_t distance, bool in_place) {
  TL_CHECK(gram.dim() == 2, "gram should be a 2D tensor (N, M), got shape ", shape(gram));
  TL_CHECK(gram.scalar_type() == ScalarType::Float || gram.scalar_type() == ScalarType::Double,
           "gram should be float32 or float64, got ", gram.scalar_type());
  TL_CHECK(gram.device().is_cpu(), "gram should be a CPU tensor (the fused mining has CPU kernels only), got ",
           device_name(gram));
  TL_CHECK(!in_place || gram.is_contiguous(), "gram should be contiguous (it is overwritten in place)");
  TL_CHECK(distance >= kEuclidean && distance <= kDot, "distance should be 0, 1 or 2, got ", distance);
  const int64_t n = gram.size(0), m = gram.size(1);
  const bool dot = distance == kDot;
  TL_CHECK(sq_x.has_value() != dot && sq_y.has_value() != dot, "sq_x and sq_y should be given for distance ", distance,
           dot ? " (none for 2, dot)" : "");
  if (!dot) {
    check_vector(*sq_x, "sq_x", n, gram.scalar_type());
    check_vector(*sq_y, "sq_y", m, gram.scalar_type());
  }
  check_vector(keys_x, "keys_x", n, ScalarType::Int);
  check_vector(keys_y, "keys_y", m, ScalarType::Int);
  check_vector(self_index, "self_index", n, ScalarType::Long);
  check_vector(pos_cols, "pos_cols", m, ScalarType::Long);
  check_vector(pos_start, "pos_start", n, ScalarType::Long);
  check_vector(pos_end, "pos_end", n, ScalarType::Long);
  Owned o{in_place ? gram : as_contiguous(gram),
          as_contiguous(keys_x),
          as_contiguous(keys_y),
          as_contiguous(self_index),
          as_contiguous(pos_cols),
          as_contiguous(pos_start),
          as_contiguous(pos_end),
          std::nullopt,
          std::nullopt,
          distance};
  if (!dot) o.sq_x = as_contiguous(*sq_x), o.sq_y = as_contiguous(*sq_y);
  check_range(o.self_index, "self_index", -1, m);  // only compared, but as the other mining ops
  check_range(o.pos_cols, "pos_cols", 0, m);
  std::vector<bool> seen(size_t(m), false);  // each column once (the launchers count the positives from it)
  const int64_t* cols = o.pos_cols.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < m; ++e) {
    TL_CHECK_INDEX(!seen[size_t(cols[e])], "pos_cols should hold each column once, got ", cols[e], " twice");
    seen[size_t(cols[e])] = true;
  }
  check_range(o.pos_start, "pos_start", 0, m + 1);
  check_range(o.pos_end, "pos_end", 0, m + 1);
  const int64_t *s = o.pos_start.const_data_ptr<int64_t>(), *e = o.pos_end.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TL_CHECK_INDEX(s[i] <= e[i], "pos_start should not exceed pos_end, got ", s[i], " > ", e[i], " at ", i);
  return o;
}

struct Sums {
  Tensor loss, counts;
};
Sums empty_sums(const Tensor& gram) {
  const int64_t n = gram.size(0);
  return {zeros({n}, ScalarType::Double, gram.device()), zeros({n, kCounts}, ScalarType::Long, gram.device())};
}
std::tuple<Tensor, Tensor> finish(const Sums& s) {
  const int64_t anchors[1] = {0};
  return {torch::stable::sum(s.loss), torch::stable::sum(s.counts, IntArrayRef(anchors, 1))};
}

using MinedResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

MinedResult batch_hard_gram_op(const Tensor& gram, const std::optional<Tensor>& sq_x, const std::optional<Tensor>& sq_y,
                               const Tensor& keys_x, const Tensor& keys_y, const Tensor& self_index,
                               const Tensor& pos_cols, const Tensor& pos_start, const Tensor& pos_end, int64_t distance,
                               double margin, bool soft) {
  const Owned o = prepare(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance, false);
  Sums s = empty_sums(o.gram);
  const Mined mined = batch_hard_gram(o.block(), margin, soft, s.loss, s.counts);
  auto [loss, stats] = finish(s);
  return {loss, stats, mined.pairs, mined.coef};
}

MinedResult semi_hard_gram_op(const Tensor& gram, const std::optional<Tensor>& sq_x, const std::optional<Tensor>& sq_y,
                              const Tensor& keys_x, const Tensor& keys_y, const Tensor& self_index,
                              const Tensor& pos_cols, const Tensor& pos_start, const Tensor& pos_end, int64_t distance,
                              double margin) {
  const Owned o = prepare(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance, false);
  Sums s = empty_sums(o.gram);
  const Mined mined = semi_hard_gram(o.block(), margin, s.loss, s.counts);
  auto [loss, stats] = finish(s);
  return {loss, stats, mined.pairs, mined.coef};
}

std::tuple<Tensor, Tensor, Tensor> batch_all_gram_op(Tensor gram, const std::optional<Tensor>& sq_x,
                                                     const std::optional<Tensor>& sq_y, const Tensor& keys_x,
                                                     const Tensor& keys_y, const Tensor& self_index,
                                                     const Tensor& pos_cols, const Tensor& pos_start,
                                                     const Tensor& pos_end, int64_t distance, double margin) {
  const Owned o = prepare(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance, true);
  Sums s = empty_sums(o.gram);
  Tensor nonzero = zeros({o.gram.size(0)}, ScalarType::Long, o.gram.device());
  if (o.gram.numel() > 0) batch_all_gram(o.block(), margin, s.loss, s.counts, nonzero);
  auto [loss, stats] = finish(s);
  return {loss, stats, torch::stable::sum(nonzero)};
}

void symmetrize_op(Tensor w) {
  TL_CHECK(w.dim() == 2 && w.size(0) == w.size(1), "w should be a square 2D tensor, got shape ", shape(w));
  TL_CHECK(w.scalar_type() == ScalarType::Float || w.scalar_type() == ScalarType::Double,
           "w should be float32 or float64, got ", w.scalar_type());
  TL_CHECK(w.device().is_cpu(), "w should be a CPU tensor, got ", device_name(w));
  TL_CHECK(w.is_contiguous(), "w should be contiguous (it is overwritten in place)");
  symmetrize(w);
}

std::tuple<Tensor, Tensor> mined_gram_backward_op(const Tensor& coef, const Tensor& pairs, const Tensor& x_,
                                                  const std::optional<Tensor>& y_, int64_t distance) {
  TL_CHECK(x_.dim() == 2, "x should be a 2D tensor (N, D), got shape ", shape(x_));
  TL_CHECK(x_.scalar_type() == ScalarType::Float || x_.scalar_type() == ScalarType::Double,
           "x should be float32 or float64, got ", x_.scalar_type());
  TL_CHECK(x_.device().is_cpu(), "x should be a CPU tensor, got ", device_name(x_));
  TL_CHECK(distance >= kEuclidean && distance <= kDot, "distance should be 0, 1 or 2, got ", distance);
  if (y_) {
    TL_CHECK(y_->dim() == 2 && y_->size(1) == x_.size(1), "y should be a 2D tensor (M, ", x_.size(1), "), got shape ",
             shape(*y_));
    TL_CHECK(y_->scalar_type() == x_.scalar_type(), "y should be ", x_.scalar_type(), ", got ", y_->scalar_type());
    TL_CHECK(y_->device().is_cpu(), "y should be a CPU tensor, got ", device_name(*y_));
  }
  const int64_t t = pairs.dim() == 2 ? pairs.size(0) : -1;
  TL_CHECK(t >= 0 && pairs.size(1) == 2 && pairs.scalar_type() == ScalarType::Long,
           "pairs should be an int64 (P, 2) tensor, got ", pairs.scalar_type(), " ", shape(pairs));
  TL_CHECK(coef.dim() == 1 && coef.size(0) == t && coef.scalar_type() == x_.scalar_type(), "coef should be a ",
           x_.scalar_type(), " (", t, ",) tensor, got ", coef.scalar_type(), " ", shape(coef));
  TL_CHECK(pairs.device().is_cpu() && coef.device().is_cpu(), "pairs and coef should be CPU tensors");
  const Tensor x = as_contiguous(x_), pr = as_contiguous(pairs), c = as_contiguous(coef);
  const std::optional<Tensor> y = y_ ? std::optional<Tensor>(as_contiguous(*y_)) : std::nullopt;
  const int64_t n = x.size(0), m = y ? y->size(0) : n;
  const int64_t* v = pr.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < t; ++e)
    TL_CHECK_INDEX(v[2 * e] >= 0 && v[2 * e] < n && v[2 * e + 1] >= 0 && v[2 * e + 1] < m,
                   "pairs should hold anchor rows in [0, ", n, ") and columns in [0, ", m, "), got (", v[2 * e], ", ",
                   v[2 * e + 1], ") at ", e);
  Tensor grad_x = empty(x.sizes(), x.scalar_type(), x.device());
  Tensor grad_y =
      y ? empty(y->sizes(), x.scalar_type(), x.device()) : empty({0, x.size(1)}, x.scalar_type(), x.device());
  if (x.numel() > 0 || (y && y->numel() > 0))
    mined_gram_backward(c, pr, x, y ? &*y : nullptr, distance, grad_x, grad_y);
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace mining
}  // namespace tripletloss

#ifndef TRIPLETLOSS_EMULATED
STABLE_TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_MINING_GRAM_SCHEMAS(m); }
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) {
  m.impl("batch_hard_gram", TORCH_BOX(&tripletloss::mining::batch_hard_gram_op));
  m.impl("semi_hard_gram", TORCH_BOX(&tripletloss::mining::semi_hard_gram_op));
  m.impl("batch_all_gram_", TORCH_BOX(&tripletloss::mining::batch_all_gram_op));
  m.impl("symmetrize_", TORCH_BOX(&tripletloss::mining::symmetrize_op));
  m.impl("mined_gram_backward", TORCH_BOX(&tripletloss::mining::mined_gram_backward_op));
}
#endif
