// The op schemas, defined once here for the namespaces that register them: tripletloss_cuda (the package's
// _C: tripletloss.cpp, mining.cpp) and tripletloss_cuda_emu (the test-only emulated CUDA build _C_emu:
// emu/module.cpp).
#pragma once

// reduction: 0 none, 1 mean, 2 sum. dist: (N, 3) d(a,p), d(a,n), d(p,n), saved for the backward.
#define TL_TRIPLET_SCHEMAS(m)                                                                            \
  m.def(                                                                                                 \
      "triplet_margin_forward(Tensor anchor, Tensor positive, Tensor negative, float margin, float p, "  \
      "float eps, bool swap, int reduction) -> (Tensor loss, Tensor dist)");                             \
  m.def(                                                                                                 \
      "triplet_margin_backward(Tensor grad, Tensor anchor, Tensor positive, Tensor negative, Tensor dist, " \
      "float margin, float p, float eps, bool swap, int reduction, bool grad_at_zero_hinge) "            \
      "-> (Tensor grad_anchor, Tensor grad_positive, Tensor grad_negative)")

// dist: (N, N) float32/float64 distances; labels: (N,) int64; stats: int64 (5,) valid, active and mined
// triplets, valid and active anchors. batch-all reduction: 0 mean_nonzero, 1 mean, 2 sum.
#define TL_MINING_SCHEMAS(m)                                                                                  \
  m.def(                                                                                                      \
      "batch_hard_forward(Tensor dist, Tensor labels, float margin, bool soft) "                              \
      "-> (Tensor loss, Tensor stats, Tensor mined)");                                                        \
  m.def(                                                                                                      \
      "batch_hard_backward(Tensor grad, Tensor dist, Tensor labels, Tensor stats, Tensor mined, float margin, " \
      "bool soft) -> Tensor");                                                                                \
  m.def(                                                                                                      \
      "batch_all_forward(Tensor dist, Tensor labels, float margin, int reduction) -> (Tensor loss, Tensor stats)"); \
  m.def(                                                                                                      \
      "batch_all_backward(Tensor grad, Tensor dist, Tensor labels, Tensor stats, float margin, int reduction) " \
      "-> Tensor");                                                                                           \
  m.def("semi_hard_forward(Tensor dist, Tensor labels, float margin) -> (Tensor loss, Tensor stats, Tensor mined)"); \
  m.def(                                                                                                      \
      "semi_hard_backward(Tensor grad, Tensor dist, Tensor labels, Tensor stats, Tensor mined, float margin) " \
      "-> Tensor")
