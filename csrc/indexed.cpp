// The loss over index triplets: schemas, input checks, the reductions and the destination-row grouping of
// the backward, device-generic ATen code around the per-device launchers of indexed.h. Autograd, fake kernels
// and the Python API: tripletloss_cuda/indexed/. Semantics: indexed_math.h.
//
// Forward: one launch computes every triplet's distances and loss (T, kSaved), reading rows by index (no
// gathered (T, D) copy); the mean/sum is an ATen reduction of the (T,) losses in float64.
// Backward: the 3T (triplet, role) contributions are grouped by destination row with integer ops only (a
// stable sort of the destination keys and a searchsorted for the row offsets: a CSR), then one launch has each
// destination row add its contributions in that fixed order, so gradients are deterministic without atomics.
//
// Index range: on the CPU an out-of-range index raises IndexError before anything is read. On CUDA that
// check would need a host synchronization, so the kernels check each triplet instead: an out-of-range triplet
// reads nothing, its loss is NaN (so is a mean or sum over it) and it sends no gradient. The Python API checks
// the range eagerly where that costs no synchronization (CPU tensors).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "indexed.h"
#include "schemas.h"
#include "indexed_math.h"

namespace tripletloss {
namespace indexed {
namespace {

// The same messages as the fake kernels (tripletloss_cuda/indexed/ops.py `check_op_inputs`).
void check_inputs(const Tensor& x, const std::optional<Tensor>& ref, const Tensor& anchors, const Tensor& positives,
                  const Tensor& negatives, int64_t distance, int64_t reduction) {
  TORCH_CHECK(x.dim() == 2, "embeddings should be a 2D tensor (N, D), got ", x.dim(), "D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "embeddings should be a floating tensor, got ", x.scalar_type());
  if (ref.has_value()) {
    TORCH_CHECK(ref->dim() == 2 && ref->size(1) == x.size(1), "ref_embeddings should be a 2D tensor (M, ", x.size(1),
                "), got shape ", ref->sizes());
    TORCH_CHECK(ref->scalar_type() == x.scalar_type(), "ref_embeddings should have the dtype of embeddings ",
                x.scalar_type(), ", got ", ref->scalar_type());
    TORCH_CHECK(ref->device() == x.device(), "ref_embeddings should be on the device of embeddings ", x.device(),
                ", got ", ref->device());
  }
  const std::pair<const char*, const Tensor*> indices[] = {
      {"anchors", &anchors}, {"positives", &positives}, {"negatives", &negatives}};
  for (const auto& [name, idx] : indices) {
    TORCH_CHECK_INDEX(idx->scalar_type() == at::kLong, name, " should be an int64 tensor, got ", idx->scalar_type());
    TORCH_CHECK_VALUE(idx->dim() == 1 && idx->size(0) == anchors.size(0), name, " should be a 1D tensor of ",
                      anchors.size(0), " indices (one per triplet), got shape ", idx->sizes());
    TORCH_CHECK(idx->device() == x.device(), name, " should be on the device of embeddings ", x.device(), ", got ",
                idx->device());
  }
  TORCH_CHECK(distance >= 0 && distance <= 2, "distance should be 0 (euclidean), 1 (squared) or 2 (dot), got ",
              distance);
  TORCH_CHECK(reduction >= 0 && reduction <= 3,
              "reduction should be 0 (none), 1 (mean), 2 (sum) or 3 (mean_nonzero), got ", reduction);
}

// CPU only (free there): IndexError naming the first out-of-range index, before anything is read.
[[maybe_unused]] void check_range_cpu(const Tensor& idx, const char* name, int64_t rows, const char* table) {
  if (!idx.is_cpu() || idx.numel() == 0) return;
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < idx.numel(); ++t)
    TORCH_CHECK_INDEX(p[t] >= 0 && p[t] < rows, name, "[", t, "] = ", p[t], " is out of range for ", table, " with ",
                      rows, " rows");
}

const Backend& backend_for(const Tensor& x) {
#ifdef TRIPLETLOSS_EMULATED
  (void)x;
  return cuda_backend();  // the emulated CUDA launchers, on CPU tensors
#else
#ifdef TRIPLETLOSS_WITH_CUDA
  if (x.is_cuda()) return cuda_backend();
#endif
  return cpu_backend();
#endif
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  Tensor x, r, anchors, positives, negatives;
};

Inputs prepare(const Tensor& x, const std::optional<Tensor>& ref, const Tensor& anchors, const Tensor& positives,
               const Tensor& negatives, int64_t distance, int64_t reduction) {
  check_inputs(x, ref, anchors, positives, negatives, distance, reduction);
  const char* table = ref.has_value() ? "ref_embeddings" : "embeddings";
  const int64_t m = ref.has_value() ? ref->size(0) : x.size(0);
#ifndef TRIPLETLOSS_EMULATED  // the emulated CUDA build takes the CUDA path: the kernels check each triplet
  check_range_cpu(anchors, "anchors", x.size(0), "embeddings");
  check_range_cpu(positives, "positives", m, table);
  check_range_cpu(negatives, "negatives", m, table);
#else
  (void)table, (void)m;
#endif
  const Tensor xc = x.contiguous();
  return {xc, ref.has_value() ? ref->contiguous() : xc, anchors.contiguous(), positives.contiguous(),
          negatives.contiguous()};
}

// The per-triplet upstream gradient w (T,) in the accumulation type: grad itself for reduction none, else the
// one value over the reduction's denominator (T, or the number of positive losses, clamped to 1).
Tensor triplet_weights(const Tensor& grad, const Tensor& saved, int64_t reduction) {
  const int64_t t = saved.size(0);
  if (reduction == kNone) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == t, "grad should have shape (", t, ",), got ", grad.sizes());
    return grad.to(saved.scalar_type()).contiguous();
  }
  TORCH_CHECK(grad.numel() == 1, "grad should have one element (the loss is 0-d), got shape ", grad.sizes());
  Tensor scale = grad.reshape({}).to(saved.scalar_type());
  if (reduction == kMean) scale = scale / double(std::max<int64_t>(t, 1));
  if (reduction == kMeanNonzero) scale = scale / saved.select(1, 3).gt(0).sum().clamp_min(1).to(saved.scalar_type());
  return scale.expand({t}).contiguous();
}

std::tuple<Tensor, Tensor> forward(const Tensor& x_, const std::optional<Tensor>& ref, const Tensor& anchors_,
                                   const Tensor& positives_, const Tensor& negatives_, int64_t distance, double margin,
                                   bool swap, bool soft, int64_t reduction) {
  const Inputs in = prepare(x_, ref, anchors_, positives_, negatives_, distance, reduction);
  const int64_t t = in.anchors.size(0);
  Tensor saved = at::empty({t, kSaved}, in.x.options().dtype(acc_type(in.x.scalar_type())));
  if (t > 0)
    backend_for(in.x).forward(in.x, in.r, in.anchors, in.positives, in.negatives, distance, margin, swap, soft,
                              saved);
  const Tensor losses = saved.select(1, 3);
  if (reduction == kNone) return {losses.to(in.x.scalar_type(), /*non_blocking=*/false, /*copy=*/true), saved};
  // Over no triplet every reduction gives 0 (as the mining losses and pytorch-metric-learning do).
  Tensor total = losses.to(at::kDouble).sum();
  if (reduction == kMean) total = total / double(std::max<int64_t>(t, 1));
  if (reduction == kMeanNonzero) total = total / losses.gt(0).sum().clamp_min(1).to(at::kDouble);
  return {total.to(in.x.scalar_type()), saved};
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad, const Tensor& x_, const std::optional<Tensor>& ref,
                                    const Tensor& anchors_, const Tensor& positives_, const Tensor& negatives_,
                                    const Tensor& saved_, int64_t distance, double margin, bool swap, bool soft,
                                    int64_t reduction) {
  const Inputs in = prepare(x_, ref, anchors_, positives_, negatives_, distance, reduction);
  const int64_t t = in.anchors.size(0), n = in.x.size(0), m = ref.has_value() ? in.r.size(0) : 0;
  const at::ScalarType acc = acc_type(in.x.scalar_type());
  TORCH_CHECK(saved_.dim() == 2 && saved_.size(0) == t && saved_.size(1) == kSaved && saved_.scalar_type() == acc,
              "saved should be the (", t, ", ", kSaved, ") ", acc, " tensor of the forward, got ", saved_.scalar_type(),
              " ", saved_.sizes());
  const Tensor saved = saved_.contiguous();
  Tensor grad_x = at::zeros(in.x.sizes(), in.x.options().dtype(acc));
  Tensor grad_r = at::zeros({m, in.x.size(1)}, in.x.options().dtype(acc));
  if (t > 0 && in.x.size(1) > 0) {
    // Destination keys: anchors are rows [0, N) of grad_x; positives and negatives the rows of grad_r after
    // them (or of grad_x without a reference set). All three entries of an out-of-range triplet go to the
    // dropped key n + m.
    const int64_t off = ref.has_value() ? n : 0, rows = ref.has_value() ? n + m : n;
    const int64_t r_rows = ref.has_value() ? m : n;
    const Tensor valid = in.anchors.ge(0) & in.anchors.lt(n) & in.positives.ge(0) & in.positives.lt(r_rows) &
                         in.negatives.ge(0) & in.negatives.lt(r_rows);
    Tensor keys = at::cat({in.anchors, in.positives + off, in.negatives + off});
    keys = at::where(valid.repeat({3}), keys, at::full({}, rows, keys.options()));
    auto [sorted, entries] = at::sort(keys, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
    const Tensor offsets = at::searchsorted(sorted, at::arange(rows + 1, keys.options()));
    backend_for(in.x).backward(in.x, in.r, in.anchors, in.positives, in.negatives, saved,
                               triplet_weights(grad, saved, reduction), entries.contiguous(), offsets.contiguous(),
                               distance, margin, swap, soft, grad_x, grad_r);
  }
  return {grad_x.to(in.x.scalar_type()), grad_r.to(in.x.scalar_type())};
}

}  // namespace
}  // namespace indexed
}  // namespace tripletloss

#define TL_INDEXED_IMPLS(m)                                                 \
  m.impl("indexed_triplet_forward", &tripletloss::indexed::forward); \
  m.impl("indexed_triplet_backward", &tripletloss::indexed::backward)

// The same device-generic code for both: only the launchers (backend_for) differ.
#ifndef TRIPLETLOSS_EMULATED
TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_INDEXED_SCHEMAS(m); }
TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) { TL_INDEXED_IMPLS(m); }
#ifdef TRIPLETLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m) { TL_INDEXED_IMPLS(m); }
#endif
#else
// The emulated CUDA build (_C_emu): CPU tensors through the CUDA launchers on the emulator; the schemas are
// defined in emu/module.cpp.
TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m) { TL_INDEXED_IMPLS(m); }
#endif
