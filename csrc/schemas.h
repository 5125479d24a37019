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
// anchors; grad: the gradient of the loss sum.
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
      "float margin) -> Tensor")

// The fused CPU mining (package _C only; csrc/mining_gram.cpp): the mining losses on a block gram = x_b y^T (B, M)
// float32/float64 of the matrix product, read once. sq_x (B,), sq_y (M,): the rows' squared norms (None for
// distance 2, dot); keys_x (B,), keys_y (M,) int32: the rows' distances.row_keys numbered densely (one number per
// distinct key: equal numbers are identical rows, distance 0; int32 so that the CPU's distance loop vectorizes);
// self_index (B,) int64 as above; the positives of anchor i are pos_cols[pos_start[i]:pos_end[i]] (int64 columns
// of the references sorted by label, ascending within a label) other than self_index[i]; distance: OP_CODES below.
// batch_hard_gram / semi_hard_gram return the loss sum and stats of batch_hard_forward / semi_hard_forward and the
// entries of dL/dgram (of the loss sum) their mined triplets make, two a triplet with a nonzero gradient: pairs (P, 2)
// int64 (block row, column: (a, p), then (a, n)) and coef (P,) (mining_math.h gram_grad). batch_all_gram_ returns
// batch_all_forward's loss sum and stats and the number of nonzero entries it writes: it overwrites gram with
// dL/dgram. symmetrize_(w) adds a square w's transpose to it in place. mined_gram_backward turns entries of dL/dgram
// (coef already scaled) into the rows' gradients: x (N, D) the anchors, y (M, D) the references or None (x itself).
#define TL_MINING_GRAM_SCHEMAS(m)                                                                          \
  m.def(                                                                                                   \
      "batch_hard_gram(Tensor gram, Tensor? sq_x, Tensor? sq_y, Tensor keys_x, Tensor keys_y, "            \
      "Tensor self_index, Tensor pos_cols, Tensor pos_start, Tensor pos_end, int distance, float margin, " \
      "bool soft) -> (Tensor loss, Tensor stats, Tensor pairs, Tensor coef)");                             \
  m.def(                                                                                                   \
      "semi_hard_gram(Tensor gram, Tensor? sq_x, Tensor? sq_y, Tensor keys_x, Tensor keys_y, "             \
      "Tensor self_index, Tensor pos_cols, Tensor pos_start, Tensor pos_end, int distance, float margin) " \
      "-> (Tensor loss, Tensor stats, Tensor pairs, Tensor coef)");                                        \
  m.def(                                                                                                   \
      "batch_all_gram_(Tensor(a!) gram, Tensor? sq_x, Tensor? sq_y, Tensor keys_x, Tensor keys_y, "        \
      "Tensor self_index, Tensor pos_cols, Tensor pos_start, Tensor pos_end, int distance, float margin) " \
      "-> (Tensor loss, Tensor stats, Tensor nonzero)");                                                   \
  m.def("symmetrize_(Tensor(a!) w) -> ()");                                                                \
  m.def(                                                                                                   \
      "mined_gram_backward(Tensor coef, Tensor pairs, Tensor x, Tensor? y, int distance) "                 \
      "-> (Tensor grad_x, Tensor grad_y)")

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

// The distance epilogue of distances.block (epilogue.cpp): gram (B, M) contiguous float32/float64, the matrix product
// x_b y^T, overwritten in place with mining_math.h gram_distance(gram[i, j], sq_x[i], sq_y[j], keys_x[i] == keys_y[j],
// distance): the entries of block()'s torch passes, with a correctly rounded square root (distances.EPILOGUE_DEVICES).
// sq_x (B,), sq_y (M,): the rows' squared norms in gram's dtype (None for distance 2, dot); keys_x (B,), keys_y (M,):
// int64 distances.row_keys (equal keys: identical rows, distance 0); distance: OP_CODES (0 euclidean, 1 squared
// euclidean, 2 dot: 1 - g).
#define TL_EPILOGUE_SCHEMAS(m)                                                                                       \
  m.def(                                                                                                             \
      "gram_distances_(Tensor(a!) gram, Tensor? sq_x, Tensor? sq_y, Tensor keys_x, Tensor keys_y, int distance) -> " \
      "()")
