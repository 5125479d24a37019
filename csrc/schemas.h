// The op schemas, defined once here for the namespaces that register them: tripletloss_cuda (the package's
// _C: tripletloss.cpp, mining.cpp) and tripletloss_cuda_emu (the test-only emulated CUDA build _C_emu:
// emu/module.cpp).
#pragma once

// reduction: the codes of tripletloss_cuda/_library.py REDUCTIONS (0 none, 1 mean, 2 sum). distance: the codes of
// tripletloss_cuda/distances.py TRIPLET_CODES (0 pairwise: p and eps; 1 cosine, 2 and 3 normalized cosine: eps).
// dist: (N, 3) d(a,p), d(a,n), d(p,n), and for the cosine (N, 6) |a|, |p|, |n| after them, saved for the backward.
#define TL_TRIPLET_SCHEMAS(m)                                                                                 \
  m.def(                                                                                                      \
      "triplet_margin_forward(Tensor anchor, Tensor positive, Tensor negative, float margin, float p, "       \
      "float eps, bool swap, int reduction, int distance=0) -> (Tensor loss, Tensor dist)");                  \
  m.def(                                                                                                      \
      "triplet_margin_backward(Tensor grad, Tensor anchor, Tensor positive, Tensor negative, Tensor dist, "   \
      "float margin, float p, float eps, bool swap, int reduction, bool grad_at_zero_hinge, int distance=0) " \
      "-> (Tensor grad_anchor, Tensor grad_positive, Tensor grad_negative)")

// dist: (N, M) float32/float64 distances from N anchors to M references; labels: (N,) int64; ref_labels:
// (M,) int64; self_index: (N,) int64, the reference column excluded for each anchor (itself) or -1. loss:
// the 0-d float64 SUM over anchors; stats: int64 (5,) valid, active and mined triplets, valid and active
// anchors; grad: the gradient of the loss sum. semi_hard_forward_triplets (CPU kernels only): semi_hard_forward
// and its (A, 3) int64 active triplets (anchor row, positive column, negative column), for the sparse backward.
#define TL_MINING_SCHEMAS(m)                                                                                \
  m.def(                                                                                                    \
      "batch_hard_forward(Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, float margin, " \
      "bool soft) -> (Tensor loss, Tensor stats, Tensor mined)");                                           \
  m.def("batch_hard_backward(Tensor grad, Tensor dist, Tensor mined, float margin, bool soft) -> Tensor");  \
  m.def(                                                                                                    \
      "batch_all_forward(Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, float margin) "  \
      "-> (Tensor loss, Tensor stats)");                                                                    \
  m.def(                                                                                                    \
      "batch_all_backward(Tensor grad, Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, "  \
      "float margin) -> Tensor");                                                                           \
  m.def(                                                                                                    \
      "semi_hard_forward(Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, float margin) "  \
      "-> (Tensor loss, Tensor stats)");                                                                    \
  m.def(                                                                                                    \
      "semi_hard_backward(Tensor grad, Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, "  \
      "float margin) -> Tensor");                                                                           \
  m.def(                                                                                                    \
      "semi_hard_forward_triplets(Tensor dist, Tensor labels, Tensor ref_labels, Tensor self_index, "       \
      "float margin) -> (Tensor loss, Tensor stats, Tensor triplets)")

// distance: tripletloss_cuda/distances.py OP_CODES (0 euclidean, 1 squared euclidean, 2 dot: 1 - <x, y>, the
// cosine distance of normalized rows). saved: (T, 4)
// d(a,p), d(a,n), d(p,n), loss per triplet (the caller reduces the losses); w: (T,) the gradient of each
// triplet's loss; entries, offsets: the CSR of the backward (tripletloss_cuda/indexed/ops.py `destinations`).
#define TL_INDEXED_SCHEMAS(m)                                                                                 \
  m.def(                                                                                                      \
      "indexed_triplet_forward(Tensor embeddings, Tensor? ref_embeddings, Tensor anchors, Tensor positives, " \
      "Tensor negatives, int distance, float margin, bool swap, bool soft) -> Tensor saved");                 \
  m.def(                                                                                                      \
      "indexed_triplet_backward(Tensor w, Tensor embeddings, Tensor? ref_embeddings, Tensor anchors, "        \
      "Tensor positives, Tensor negatives, Tensor saved, Tensor entries, Tensor offsets, int distance, "      \
      "float margin, bool swap, bool soft) -> (Tensor grad_embeddings, Tensor grad_ref_embeddings)")
