// The mining ops: schemas, and their device-generic host code around the per-device row launchers of
// mining.h. Autograd and fake kernels: tripletloss_cuda/mining_ops.py. Semantics: mining_math.h and
// tripletloss_cuda/mining.py.
//
// Every op is O(N^2) memory: per-anchor sorted positives and partial results,
// reduced in a fixed order (no float atomics), so results are deterministic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mining.h"
#include "mining_math.h"
#include "schemas.h"

namespace tripletloss {
namespace mining {
namespace {

// The same messages as the fake kernels (tripletloss_cuda/mining_ops.py `_check_op_inputs`).
void check_inputs(const Tensor& dist, const Tensor& labels) {
  TORCH_CHECK(dist.dim() == 2 && dist.size(0) == dist.size(1), "dist should be a square 2D tensor, got shape ",
              dist.sizes());
  TORCH_CHECK(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
              "dist should be float32 or float64, got ", dist.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == dist.size(0), "labels should have shape (", dist.size(0),
              ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels should be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == dist.device(), "labels should be on the device of dist ", dist.device(), ", got ",
              labels.device());
}

const Backend& backend_for(const Tensor& dist) {
#ifdef TRIPLETLOSS_EMULATED
  (void)dist;
  return cuda_backend();  // the emulated CUDA launchers, on CPU tensors
#else
#ifdef TRIPLETLOSS_WITH_CUDA
  if (dist.is_cuda()) return cuda_backend();
#endif
  return cpu_backend();
#endif
}

struct Rows {  // the per-anchor outputs of a forward launcher
  Tensor loss, counts;
};

Rows empty_rows(const Tensor& dist) {
  const int64_t n = dist.size(0);
  return {at::zeros({n}, dist.options().dtype(at::kDouble)), at::zeros({n, kCounts}, dist.options().dtype(at::kLong))};
}

// (loss, stats): the loss sum over anchors, divided by the stat `denominator` (clamped to 1: an empty
// batch gives 0, not NaN) unless it is -1; stats = {valid, active, mined triplets, valid, active anchors}.
std::tuple<Tensor, Tensor> finish(const Rows& rows, int64_t denominator, at::ScalarType dtype) {
  const Tensor anchors =
      at::stack({rows.counts.select(1, kValid).gt(0).sum(), rows.counts.select(1, kActive).gt(0).sum()});
  const Tensor stats = at::cat({rows.counts.sum(0), anchors});
  Tensor loss = rows.loss.sum();
  if (denominator >= 0) loss = loss / stats.select(0, denominator).clamp_min(1).to(at::kDouble);
  return {loss.to(dtype), stats};
}

// The upstream gradient over the loss's denominator, as a 0-d float64 tensor on the device.
Tensor grad_scale(const Tensor& grad, const Tensor& stats, int64_t denominator) {
  TORCH_CHECK(grad.numel() == 1, "grad should have one element (the loss is 0-d), got shape ", grad.sizes());
  TORCH_CHECK(stats.dim() == 1 && stats.size(0) == 5 && stats.scalar_type() == at::kLong,
              "stats should be the int64 (5,) tensor of the forward, got ", stats.scalar_type(), " ", stats.sizes());
  Tensor scale = grad.reshape({}).to(at::kDouble);
  if (denominator >= 0) scale = scale / stats.select(0, denominator).clamp_min(1).to(at::kDouble);
  return scale.contiguous();
}

int64_t batch_all_denominator(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction should be 0 (mean_nonzero), 1 (mean) or 2 (sum), got ",
              reduction);
  return reduction == 0 ? kActive : reduction == 1 ? kValid : -1;
}

std::tuple<Tensor, Tensor, Tensor> batch_hard_forward(const Tensor& dist_, const Tensor& labels_, double margin,
                                                      bool soft) {
  check_inputs(dist_, labels_);
  const Tensor dist = dist_.contiguous(), labels = labels_.contiguous();
  Rows rows = empty_rows(dist);
  Tensor mined = at::full({dist.size(0), 2}, -1, dist.options().dtype(at::kLong));
  if (dist.numel() > 0) backend_for(dist).batch_hard(dist, labels, margin, soft, rows.loss, rows.counts, mined);
  auto [loss, stats] = finish(rows, kMined, dist.scalar_type());
  return {loss, stats, mined};
}

Tensor batch_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels, const Tensor& stats,
                           const Tensor& mined, double margin, bool soft) {
  check_inputs(dist_, labels);
  const Tensor dist = dist_.contiguous();
  TORCH_CHECK(mined.sizes() == at::IntArrayRef({dist.size(0), 2}) && mined.scalar_type() == at::kLong,
              "mined should be the int64 (N, 2) tensor of the forward, got ", mined.sizes());
  Tensor grad_dist = at::empty_like(dist);
  if (dist.numel() > 0)
    backend_for(dist).batch_hard_grad(dist, mined.contiguous(), margin, soft, grad_scale(grad, stats, kMined),
                                      grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor> batch_all_forward(const Tensor& dist_, const Tensor& labels_, double margin,
                                             int64_t reduction) {
  check_inputs(dist_, labels_);
  const int64_t denominator = batch_all_denominator(reduction);
  const Tensor dist = dist_.contiguous(), labels = labels_.contiguous();
  Rows rows = empty_rows(dist);
  if (dist.numel() > 0) backend_for(dist).batch_all(dist, labels, margin, rows.loss, rows.counts);
  return finish(rows, denominator, dist.scalar_type());
}

Tensor batch_all_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels_, const Tensor& stats,
                          double margin, int64_t reduction) {
  check_inputs(dist_, labels_);
  const int64_t denominator = batch_all_denominator(reduction);
  const Tensor dist = dist_.contiguous(), labels = labels_.contiguous();
  Tensor grad_dist = at::empty_like(dist);
  if (dist.numel() > 0)
    backend_for(dist).batch_all_grad(dist, labels, margin, grad_scale(grad, stats, denominator), grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor, Tensor> semi_hard_forward(const Tensor& dist_, const Tensor& labels_, double margin) {
  check_inputs(dist_, labels_);
  const Tensor dist = dist_.contiguous(), labels = labels_.contiguous();
  Rows rows = empty_rows(dist);
  Tensor mined = at::full(dist.sizes(), -1, dist.options().dtype(at::kInt));
  if (dist.numel() > 0) backend_for(dist).semi_hard(dist, labels, margin, rows.loss, rows.counts, mined);
  auto [loss, stats] = finish(rows, kMined, dist.scalar_type());
  return {loss, stats, mined};
}

Tensor semi_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels, const Tensor& stats,
                          const Tensor& mined, double margin) {
  check_inputs(dist_, labels);
  const Tensor dist = dist_.contiguous();
  TORCH_CHECK(mined.sizes() == dist.sizes() && mined.scalar_type() == at::kInt,
              "mined should be the int32 (N, N) tensor of the forward, got ", mined.sizes());
  Tensor grad_dist = at::empty_like(dist);
  if (dist.numel() > 0)
    backend_for(dist).semi_hard_grad(dist, mined.contiguous(), margin, grad_scale(grad, stats, kMined), grad_dist);
  return grad_dist;
}

}  // namespace

std::tuple<Tensor, Tensor> sorted_rows(const Tensor& dist, const Tensor& excluded) {
  // std::optional: a plain `true` would bind to the overload sort(self, dim, descending).
  auto [values, index] = at::sort(dist.masked_fill(excluded, INFINITY), /*stable=*/std::optional<bool>(true),
                                  /*dim=*/1, /*descending=*/false);
  return {values.contiguous(), index.contiguous()};
}

Tensor not_positive(const Tensor& labels) {
  const Tensor eye = at::eye(labels.size(0), labels.options().dtype(at::kBool));
  return labels.unsqueeze(1).ne(labels.unsqueeze(0)).logical_or(eye);
}

}  // namespace mining
}  // namespace tripletloss

#define TL_MINING_IMPLS(m)                                             \
  m.impl("batch_hard_forward", &tripletloss::mining::batch_hard_forward);   \
  m.impl("batch_hard_backward", &tripletloss::mining::batch_hard_backward); \
  m.impl("batch_all_forward", &tripletloss::mining::batch_all_forward);     \
  m.impl("batch_all_backward", &tripletloss::mining::batch_all_backward);   \
  m.impl("semi_hard_forward", &tripletloss::mining::semi_hard_forward);     \
  m.impl("semi_hard_backward", &tripletloss::mining::semi_hard_backward)

// The same device-generic code for both: only the row launchers (backend_for) differ.
#ifndef TRIPLETLOSS_EMULATED
TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_MINING_SCHEMAS(m); }
TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) { TL_MINING_IMPLS(m); }
#ifdef TRIPLETLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m) { TL_MINING_IMPLS(m); }
#endif
#else
// The emulated CUDA build (_C_emu): CPU tensors through the CUDA launchers on the emulator; the schemas are
// defined in emu/module.cpp.
TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m) { TL_MINING_IMPLS(m); }
#endif
