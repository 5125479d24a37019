// The loss over index triplets: schemas, input checks, and device-generic code on the stable ABI (stable.h)
// around the per-device launchers of indexed.h. Autograd, fake kernels, the reductions and the destination-row
// grouping of the backward: tripletloss_cuda/indexed/ops.py. Semantics: indexed_math.h.
//
// Forward: one launch computes every triplet's distances and loss (T, kSaved), reading rows by index (no
// gathered (T, D) copy). The mean/sum over the (T,) losses is done in Python after the op (the 2.11 stable
// surface has no division), in float64.
// Backward: the 3T (triplet, role) contributions grouped by destination row (a CSR: entries sorted stably by
// destination, offsets of each row's run) are computed in Python before the op with integer ops only (the
// stable surface has no sort or searchsorted); then one launch has each destination row add its contributions
// in that fixed order, so gradients are deterministic without atomics.
//
// Index range: on the CPU an out-of-range index raises IndexError before anything is read. On CUDA that
// check would need a host synchronization, so the kernels check each triplet instead: an out-of-range triplet
// reads nothing, its loss is NaN (so is a mean or sum over it) and it sends no gradient. The Python API checks
// the range eagerly where that costs no synchronization (CPU tensors).
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
                  const Tensor& negatives, int64_t distance) {
  TL_CHECK(x.dim() == 2, "embeddings should be a 2D tensor (N, D), got ", x.dim(), "D");
  TL_CHECK(is_floating(x.scalar_type()), "embeddings should be a floating tensor, got ", x.scalar_type());
  if (ref.has_value()) {
    TL_CHECK(ref->dim() == 2 && ref->size(1) == x.size(1), "ref_embeddings should be a 2D tensor (M, ", x.size(1),
             "), got shape ", shape(*ref));
    TL_CHECK(ref->scalar_type() == x.scalar_type(), "ref_embeddings should have the dtype of embeddings ",
             x.scalar_type(), ", got ", ref->scalar_type());
    TL_CHECK(ref->device() == x.device(), "ref_embeddings should be on the device of embeddings ", device_name(x),
             ", got ", device_name(*ref));
  }
  const std::pair<const char*, const Tensor*> indices[] = {
      {"anchors", &anchors}, {"positives", &positives}, {"negatives", &negatives}};
  for (const auto& [name, idx] : indices) {
    TL_CHECK_INDEX(idx->scalar_type() == ScalarType::Long, name, " should be an int64 tensor, got ",
                   idx->scalar_type());
    TL_CHECK_VALUE(idx->dim() == 1 && idx->size(0) == anchors.size(0), name, " should be a 1D tensor of ",
                   anchors.size(0), " indices (one per triplet), got shape ", shape(*idx));
    TL_CHECK(idx->device() == x.device(), name, " should be on the device of embeddings ", device_name(x), ", got ",
             device_name(*idx));
  }
  TL_CHECK(distance >= 0 && distance <= 2, "distance should be 0 (euclidean), 1 (squared) or 2 (dot), got ", distance);
}

// CPU only (free there): IndexError naming the first out-of-range index, before anything is read.
[[maybe_unused]] void check_range_cpu(const Tensor& idx, const char* name, int64_t rows, const char* table) {
  if (!idx.is_cpu() || idx.numel() == 0) return;
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < idx.numel(); ++t)
    TL_CHECK_INDEX(p[t] >= 0 && p[t] < rows, name, "[", t, "] = ", p[t], " is out of range for ", table, " with ", rows,
                   " rows");
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

struct Inputs {
  Tensor x, r, anchors, positives, negatives;
};

Inputs prepare(const Tensor& x, const std::optional<Tensor>& ref, const Tensor& anchors, const Tensor& positives,
               const Tensor& negatives, int64_t distance) {
  check_inputs(x, ref, anchors, positives, negatives, distance);
  const char* table = ref.has_value() ? "ref_embeddings" : "embeddings";
  const int64_t m = ref.has_value() ? ref->size(0) : x.size(0);
#ifndef TRIPLETLOSS_EMULATED  // the emulated CUDA build takes the CUDA path: the kernels check each triplet
  check_range_cpu(anchors, "anchors", x.size(0), "embeddings");
  check_range_cpu(positives, "positives", m, table);
  check_range_cpu(negatives, "negatives", m, table);
#else
  (void)table, (void)m;
#endif
  const Tensor xc = as_contiguous(x);
  return {xc, ref.has_value() ? as_contiguous(*ref) : xc, as_contiguous(anchors), as_contiguous(positives),
          as_contiguous(negatives)};
}

Tensor forward(const Tensor& x_, const std::optional<Tensor>& ref, const Tensor& anchors_, const Tensor& positives_,
               const Tensor& negatives_, int64_t distance, double margin, bool swap, bool soft) {
  const Inputs in = prepare(x_, ref, anchors_, positives_, negatives_, distance);
  const int64_t t = in.anchors.size(0);
  Tensor saved = empty({t, kSaved}, acc_dtype(in.x.scalar_type()), in.x.device());
  if (t > 0)
    backend_for(in.x).forward(in.x, in.r, in.anchors, in.positives, in.negatives, distance, margin, swap, soft, saved);
  return saved;
}

// The CSR's shape and, on the CPU (free there), its values: entries numbers of the 3T contributions (role * T +
// t), offsets non-decreasing from 0 to at most 3T, so that the launchers read only what exists.
void check_csr(const Tensor& entries, const Tensor& offsets, int64_t t, int64_t rows, const Tensor& x) {
  TL_CHECK(entries.dim() == 1 && entries.size(0) == 3 * t && entries.scalar_type() == ScalarType::Long,
           "entries should be the int64 (", 3 * t, ",) destination order of the 3T contributions, got ",
           entries.scalar_type(), " ", shape(entries));
  TL_CHECK(offsets.dim() == 1 && offsets.size(0) == rows + 1 && offsets.scalar_type() == ScalarType::Long,
           "offsets should be the int64 (", rows + 1, ",) row offsets into entries, got ", offsets.scalar_type(), " ",
           shape(offsets));
  TL_CHECK(entries.device() == x.device() && offsets.device() == x.device(),
           "entries and offsets should be on the device of embeddings ", device_name(x));
  if (!x.is_cpu()) return;
  const int64_t* e = entries.const_data_ptr<int64_t>();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < 3 * t; ++k)
    TL_CHECK(e[k] >= 0 && e[k] < 3 * t, "entries[", k, "] = ", e[k], " is not a contribution number in [0, ", 3 * t,
             ")");
  for (int64_t k = 0; k <= rows; ++k)
    TL_CHECK(o[k] >= (k ? o[k - 1] : 0) && o[k] <= 3 * t, "offsets should be non-decreasing in [0, ", 3 * t,
             "], got offsets[", k, "] = ", o[k]);
}

// w (T,): the upstream gradient of each triplet's loss, in the accumulation dtype.
std::tuple<Tensor, Tensor> backward(const Tensor& w_, const Tensor& x_, const std::optional<Tensor>& ref,
                                    const Tensor& anchors_, const Tensor& positives_, const Tensor& negatives_,
                                    const Tensor& saved_, const Tensor& entries_, const Tensor& offsets_,
                                    int64_t distance, double margin, bool swap, bool soft) {
  const Inputs in = prepare(x_, ref, anchors_, positives_, negatives_, distance);
  const int64_t t = in.anchors.size(0), n = in.x.size(0), m = ref.has_value() ? in.r.size(0) : 0;
  const ScalarType acc = acc_dtype(in.x.scalar_type());
  TL_CHECK(saved_.dim() == 2 && saved_.size(0) == t && saved_.size(1) == kSaved && saved_.scalar_type() == acc,
           "saved should be the (", t, ", ", kSaved, ") ", acc, " tensor of the forward, got ", saved_.scalar_type(),
           " ", shape(saved_));
  TL_CHECK(w_.dim() == 1 && w_.size(0) == t, "w should have shape (", t, ",), got ", shape(w_));
  TL_CHECK(w_.device() == in.x.device(), "w should be on the device of embeddings ", device_name(in.x));
  const Tensor saved = as_contiguous(saved_), w = as_contiguous(to_dtype(w_, acc));
  const Tensor entries = as_contiguous(entries_), offsets = as_contiguous(offsets_);
  // Destination rows: anchors are rows [0, N) of grad_x; positives and negatives the rows of grad_r after them
  // (or of grad_x without a reference set).
  check_csr(entries, offsets, t, n + m, in.x);
  Tensor grad_x = zeros({n, in.x.size(1)}, acc, in.x.device());
  Tensor grad_r = zeros({m, in.x.size(1)}, acc, in.x.device());
  if (t > 0 && in.x.size(1) > 0)
    backend_for(in.x).backward(in.x, in.r, in.anchors, in.positives, in.negatives, saved, w, entries, offsets, distance,
                               margin, swap, soft, grad_x, grad_r);
  return {to_dtype(grad_x, in.x.scalar_type()), to_dtype(grad_r, in.x.scalar_type())};
}

}  // namespace
}  // namespace indexed
}  // namespace tripletloss

#define TL_INDEXED_IMPLS(m)                                                     \
  m.impl("indexed_triplet_forward", TORCH_BOX(&tripletloss::indexed::forward)); \
  m.impl("indexed_triplet_backward", TORCH_BOX(&tripletloss::indexed::backward))

// The same device-generic code for both: only the launchers (backend_for) differ.
#ifndef TRIPLETLOSS_EMULATED
STABLE_TORCH_LIBRARY_FRAGMENT(tripletloss_cuda, m) { TL_INDEXED_SCHEMAS(m); }
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CPU, m) { TL_INDEXED_IMPLS(m); }
#ifdef TRIPLETLOSS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda, CUDA, m) { TL_INDEXED_IMPLS(m); }
#endif
#else
// The emulated CUDA build (_C_emu): CPU tensors through the CUDA launchers on the emulator; the schemas are
// defined in emu/module.cpp.
STABLE_TORCH_LIBRARY_IMPL(tripletloss_cuda_emu, CPU, m) { TL_INDEXED_IMPLS(m); }
#endif
