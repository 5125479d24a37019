// The mining ops: schemas, and their device-generic host code around the per-device row launchers of
// mining.h. Autograd, chunking and fake kernels: tripletloss_cuda/mining/ops.py. Semantics: mining_math.h and
// tripletloss_cuda/mining/api.py.
//
// The ops work on an (N, M) distance matrix between N anchors and M references: per-anchor sorted positives
// and partial results, reduced in a fixed order (no float atomics), so results are deterministic. The forward
// ops return the loss SUM (float64) and the stats; the loss's denominator (a stat) is applied by the caller,
// so that a batch mined in blocks of anchors reduces its blocks' sums and counts before dividing. The
// backward ops take the gradient of that sum.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "mining.h"
#include "mining_math.h"
#include "schemas.h"

namespace tripletloss {
namespace mining {
namespace {

// The same messages as the fake kernels (tripletloss_cuda/mining/ops.py `_check_op_inputs`).
void check_dist(const Tensor& dist) {
  TORCH_CHECK(dist.dim() == 2, "dist should be a 2D tensor (N, M), got shape ", dist.sizes());
  TORCH_CHECK(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
              "dist should be float32 or float64, got ", dist.scalar_type());
  TORCH_CHECK(dist.size(1) <= std::numeric_limits<int32_t>::max(), "dist should have fewer than 2^31 columns, got ",
              dist.size(1));
}

void check_vector(const Tensor& t, const char* name, int64_t n, const char* dim, const Tensor& dist) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " should have shape (", n, ",) (dist's ", dim, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " should be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == dist.device(), name, " should be on the device of dist ", dist.device(), ", got ",
              t.device());
}

void check_inputs(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  check_dist(dist);
  check_vector(labels, "labels", dist.size(0), "rows", dist);
  check_vector(ref_labels, "ref_labels", dist.size(1), "columns", dist);
  check_vector(self_index, "self_index", dist.size(0), "rows", dist);
  if (self_index.is_cpu() && self_index.numel() > 0) {  // on the GPU a check would synchronize; the kernels only
    const auto [lo, hi] = at::aminmax(self_index);       // compare it with column numbers, so any value is safe
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < dist.size(1),
                "self_index should hold column numbers in [0, ", dist.size(1), ") or -1, got values in [",
                lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

void check_mined(const Tensor& mined, const Tensor& dist, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(mined.sizes() == shape && mined.scalar_type() == dtype, "mined should be the ", dtype, " ", shape,
              " tensor of the forward, got ", mined.scalar_type(), " ", mined.sizes());
  TORCH_CHECK(mined.device() == dist.device(), "mined should be on the device of dist ", dist.device());
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

// (loss sum as 0-d float64, stats = {valid, active, mined triplets, valid, active anchors}).
std::tuple<Tensor, Tensor> finish(const Rows& rows) {
  const Tensor anchors =
      at::stack({rows.counts.select(1, kValid).gt(0).sum(), rows.counts.select(1, kActive).gt(0).sum()});
  return {rows.loss.sum(), at::cat({rows.counts.sum(0), anchors})};
}

// The gradient of the loss sum as a 0-d float64 tensor on the device.
Tensor grad_scale(const Tensor& grad, const Tensor& dist) {
  TORCH_CHECK(grad.numel() == 1, "grad should have one element (the loss sum is 0-d), got shape ", grad.sizes());
  TORCH_CHECK(grad.device() == dist.device(), "grad should be on the device of dist ", dist.device());
  return grad.reshape({}).to(at::kDouble).contiguous();
}

struct Inputs {
  Tensor dist, labels, ref_labels, self_index;
};

Inputs contiguous(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  check_inputs(dist, labels, ref_labels, self_index);
  return {dist.contiguous(), labels.contiguous(), ref_labels.contiguous(), self_index.contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> batch_hard_forward(const Tensor& dist_, const Tensor& labels_,
                                                      const Tensor& ref_labels_, const Tensor& self_index_,
                                                      double margin, bool soft) {
  const auto in = contiguous(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  Tensor mined = at::full({in.dist.size(0), 2}, -1, in.dist.options().dtype(at::kLong));
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_hard(in.dist, in.labels, in.ref_labels, in.self_index, margin, soft, rows.loss,
                                    rows.counts, mined);
  auto [loss, stats] = finish(rows);
  return {loss, stats, mined};
}

Tensor batch_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& mined, double margin, bool soft) {
  check_dist(dist_);
  const Tensor dist = dist_.contiguous();
  check_mined(mined, dist, {dist.size(0), 2}, at::kLong);
  Tensor grad_dist = at::empty_like(dist);
  if (dist.numel() > 0)
    backend_for(dist).batch_hard_grad(dist, mined.contiguous(), margin, soft, grad_scale(grad, dist), grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor> batch_all_forward(const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                                             const Tensor& self_index_, double margin) {
  const auto in = contiguous(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_all(in.dist, in.labels, in.ref_labels, in.self_index, margin, rows.loss, rows.counts);
  return finish(rows);
}

Tensor batch_all_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                          const Tensor& self_index_, double margin) {
  const auto in = contiguous(dist_, labels_, ref_labels_, self_index_);
  Tensor grad_dist = at::empty_like(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_all_grad(in.dist, in.labels, in.ref_labels, in.self_index, margin,
                                        grad_scale(grad, in.dist), grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor> semi_hard_forward(const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                                             const Tensor& self_index_, double margin) {
  const auto in = contiguous(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).semi_hard(in.dist, in.labels, in.ref_labels, in.self_index, margin, rows.loss, rows.counts);
  return finish(rows);
}

// Mines again (the forward stores no (N, M) choice of negatives).
Tensor semi_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                          const Tensor& self_index_, double margin) {
  const auto in = contiguous(dist_, labels_, ref_labels_, self_index_);
  Tensor grad_dist = at::empty_like(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).semi_hard_grad(in.dist, in.labels, in.ref_labels, in.self_index, margin,
                                        grad_scale(grad, in.dist), grad_dist);
  return grad_dist;
}

}  // namespace

}  // namespace mining
}  // namespace tripletloss

#define TL_MINING_IMPLS(m)                                                  \
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
