// The mining ops: schemas, and their device-generic host code around the per-device row launchers of
// mining.h. Autograd, chunking and fake kernels: tripletloss_cuda/mining/ops.py. Semantics: mining_math.h and
// tripletloss_cuda/mining/api.py.
//
// The ops work on an (N, M) distance matrix between N anchors and M references: per-anchor sorted positives
// and partial results, reduced in a fixed order (no float atomics), so results are deterministic. The forward
// ops return the loss SUM (float64) and the stats; the loss's denominator (a stat) is applied by the caller,
// so that a batch mined in blocks of anchors reduces its blocks' sums and counts before dividing. The
// backward ops take the gradient of that sum.
#include <algorithm>
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
  TL_CHECK(dist.dim() == 2, "dist should be a 2D tensor (N, M), got shape ", shape(dist));
  TL_CHECK(dist.scalar_type() == ScalarType::Float || dist.scalar_type() == ScalarType::Double,
           "dist should be float32 or float64, got ", dist.scalar_type());
  TL_CHECK(dist.size(1) <= std::numeric_limits<int32_t>::max(), "dist should have fewer than 2^31 columns, got ",
           dist.size(1));
}

void check_vector(const Tensor& t, const char* name, int64_t n, const char* dim, const Tensor& dist) {
  TL_CHECK(t.dim() == 1 && t.size(0) == n, name, " should have shape (", n, ",) (dist's ", dim, "), got ", shape(t));
  TL_CHECK(t.scalar_type() == ScalarType::Long, name, " should be int64, got ", t.scalar_type());
  TL_CHECK(t.device() == dist.device(), name, " should be on the device of dist ", device_name(dist), ", got ",
           device_name(t));
}

void check_inputs(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  check_dist(dist);
  check_vector(labels, "labels", dist.size(0), "rows", dist);
  check_vector(ref_labels, "ref_labels", dist.size(1), "columns", dist);
  check_vector(self_index, "self_index", dist.size(0), "rows", dist);
  if (self_index.is_cpu() && self_index.numel() > 0) {  // on the GPU a check would synchronize; the kernels only
    const Tensor s = as_contiguous(self_index);         // compare it with column numbers, so any value is safe
    const int64_t* v = s.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(v, v + s.numel());
    TL_CHECK(*lo >= -1 && *hi < dist.size(1), "self_index should hold column numbers in [0, ", dist.size(1),
             ") or -1, got values in [", *lo, ", ", *hi, "]");
  }
}

void check_mined(const Tensor& mined, const Tensor& dist) {
  const int64_t sizes[2] = {dist.size(0), 2};
  const IntArrayRef expected(sizes, 2);
  TL_CHECK(mined.sizes().equals(expected) && mined.scalar_type() == ScalarType::Long, "mined should be the ",
           ScalarType::Long, " ", Shape{expected}, " tensor of the forward, got ", mined.scalar_type(), " ",
           shape(mined));
  TL_CHECK(mined.device() == dist.device(), "mined should be on the device of dist ", device_name(dist));
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
  return {zeros({n}, ScalarType::Double, dist.device()), zeros({n, kCounts}, ScalarType::Long, dist.device())};
}

// (loss sum as 0-d float64, stats = {valid, active, mined triplets, valid, active anchors}): the per-anchor
// counts hold the stats' columns (write_counts), so both are sums over the anchors.
std::tuple<Tensor, Tensor> finish(const Rows& rows) {
  const int64_t anchors[1] = {0};
  return {torch::stable::sum(rows.loss), torch::stable::sum(rows.counts, IntArrayRef(anchors, 1))};
}

// The gradient of the loss sum as a 0-d float64 tensor on the device.
Tensor grad_scale(const Tensor& grad, const Tensor& dist) {
  TL_CHECK(grad.numel() == 1, "grad should have one element (the loss sum is 0-d), got shape ", shape(grad));
  TL_CHECK(grad.device() == dist.device(), "grad should be on the device of dist ", device_name(dist));
  return as_contiguous(to_dtype(torch::stable::reshape(grad, {}), ScalarType::Double));
}

struct Inputs {
  Tensor dist, labels, ref_labels, self_index;
};

Inputs prepare(const Tensor& dist, const Tensor& labels, const Tensor& ref_labels, const Tensor& self_index) {
  check_inputs(dist, labels, ref_labels, self_index);
  return {as_contiguous(dist), as_contiguous(labels), as_contiguous(ref_labels), as_contiguous(self_index)};
}

std::tuple<Tensor, Tensor, Tensor> batch_hard_forward(const Tensor& dist_, const Tensor& labels_,
                                                      const Tensor& ref_labels_, const Tensor& self_index_,
                                                      double margin, bool soft) {
  const auto in = prepare(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  Tensor mined = torch::stable::full({in.dist.size(0), 2}, -1, ScalarType::Long, std::nullopt, in.dist.device());
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_hard(in.dist, in.labels, in.ref_labels, in.self_index, margin, soft, rows.loss,
                                    rows.counts, mined);
  auto [loss, stats] = finish(rows);
  return {loss, stats, mined};
}

Tensor batch_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& mined, double margin, bool soft) {
  check_dist(dist_);
  const Tensor dist = as_contiguous(dist_);
  check_mined(mined, dist);
  Tensor grad_dist = empty(dist.sizes(), dist.scalar_type(), dist.device());
  if (dist.numel() > 0)
    backend_for(dist).batch_hard_grad(dist, as_contiguous(mined), margin, soft, grad_scale(grad, dist), grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor> batch_all_forward(const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                                             const Tensor& self_index_, double margin) {
  const auto in = prepare(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_all(in.dist, in.labels, in.ref_labels, in.self_index, margin, rows.loss, rows.counts);
  return finish(rows);
}

Tensor batch_all_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                          const Tensor& self_index_, double margin) {
  const auto in = prepare(dist_, labels_, ref_labels_, self_index_);
  Tensor grad_dist = empty(in.dist.sizes(), in.dist.scalar_type(), in.dist.device());
  if (in.dist.numel() > 0)
    backend_for(in.dist).batch_all_grad(in.dist, in.labels, in.ref_labels, in.self_index, margin,
                                        grad_scale(grad, in.dist), grad_dist);
  return grad_dist;
}

std::tuple<Tensor, Tensor> semi_hard_forward(const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                                             const Tensor& self_index_, double margin) {
  const auto in = prepare(dist_, labels_, ref_labels_, self_index_);
  Rows rows = empty_rows(in.dist);
  if (in.dist.numel() > 0)
    backend_for(in.dist).semi_hard(in.dist, in.labels, in.ref_labels, in.self_index, margin, rows.loss, rows.counts);
  return finish(rows);
}

// Mines again (the forward stores no (N, M) choice of negatives).
Tensor semi_hard_backward(const Tensor& grad, const Tensor& dist_, const Tensor& labels_, const Tensor& ref_labels_,
                          const Tensor& self_index_, double margin) {
  const auto in = prepare(dist_, labels_, ref_labels_, self_index_);
  Tensor grad_dist = empty(in.dist.sizes(), in.dist.scalar_type(), in.dist.device());
  if (in.dist.numel() > 0)
    backend_for(in.dist).semi_hard_grad(in.dist, in.labels, in.ref_labels, in.self_index, margin,
                                        grad_scale(grad, in.dist), grad_dist);
  return grad_dist;
}

}  // namespace

}  // namespace mining
}  // namespace tripletloss

#define TL_MINING_IMPLS(m)                                                             \
  m.impl("batch_hard_forward", TORCH_BOX(&tripletloss::mining::batch_hard_forward));   \
  m.impl("batch_hard_backward", TORCH_BOX(&tripletloss::mining::batch_hard_backward)); \
  m.impl("batch_all_forward", TORCH_BOX(&tripletloss::mining::batch_all_forward));     \
  m.impl("batch_all_backward", TORCH_BOX(&tripletloss::mining::batch_all_backward));   \
  m.impl("semi_hard_forward", TORCH_BOX(&tripletloss::mining::semi_hard_forward));     \
  m.impl("semi_hard_backward", TORCH_BOX(&tripletloss::mining::semi_hard_backward))

// The same device-generic code for both: only the row launchers (backend_for) differ.
#ifndef TRIPLETLOSS_EMULATED
STABLE_TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_MINING_SCHEMAS(m); }
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) { TL_MINING_IMPLS(m); }
#ifdef TRIPLETLOSS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m) { TL_MINING_IMPLS(m); }
#endif
#else
// The emulated CUDA build (_C_emu): CPU tensors through the CUDA launchers on the emulator; the schemas are
// defined in emu/module.cpp.
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m) { TL_MINING_IMPLS(m); }
#endif
