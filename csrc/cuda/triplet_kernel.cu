// CUDA kernels: one launch forward (distances, hinge and the mean/sum), one launch backward.
//
// Thread mapping: a group of `group` threads (a power of 2) owns one row at a time, grid-striding over
// rows with a grid of one wave of resident blocks. Short rows get small groups (several rows per warp),
// rows of up to a few thousand elements a warp, and long rows the whole block when there are too few
// rows to fill the GPU. Rows are read with 16-byte vector loads when every row start is aligned, else
// element by element. The mean/sum is deterministic: per-block partials in fixed order, then the last
// block to finish (an atomic ticket) adds the partials in fixed order. No host synchronization.
//
// Launches and CUDA runtime calls go through cuda_compat.h, so that the host compiler also builds this file
// for the CPU emulator of CUDA (csrc/emu; the tests' _C_emu).
#include <algorithm>

#include "../tripletloss.h"
#include "cuda_compat.h"

#define TL_STR_(...) #__VA_ARGS__
#define TL_STR(...) TL_STR_(__VA_ARGS__)  // variadic: __CUDA_ARCH_LIST__ is "800,900,1000" for several

namespace tripletloss {

const char* cuda_arch_list() {
#if defined(TRIPLETLOSS_EMULATED)
  return "emulated";
#elif defined(__CUDA_ARCH_LIST__)
  return TL_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// __launch_bounds__'s minimum blocks per SM: 0 leaves ptxas its own occupancy target (L1, L2: memory-bound);
// for general p (pow, compute-bound) 1, since aiming at 4 blocks of 256 threads made ptxas spill the float64
// kernels at 64 registers (tools/sass_gate.py); for the cosine (six row sums, three divisions per row) 1 too:
// at ptxas's own target of 64 registers four of its kernels had a stack frame.
constexpr int min_blocks(Norm norm) { return norm == Norm::Lp || norm == Norm::Cos ? 1 : 0; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Sum over the threads of a group; every thread of the group gets the result. A group of more than a
// warp is the whole block (all its threads call this together); smem holds kThreads / kWarp values.
template <typename T>
__device__ T group_sum(T v, int group, T* smem) {
  const int lane = threadIdx.x % kWarp;
  const unsigned mask = group >= kWarp ? 0xffffffffu : ((1u << group) - 1u) << (lane & ~(group - 1));
  for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  if (group > kWarp) {
    __syncthreads();  // smem may still be read from the previous call
    if (lane == 0) smem[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = T(0);
    for (int w = 0; w < blockDim.x / kWarp; ++w) v += smem[w];
  }
  return v;
}

template <typename T, Norm NORM, bool SWAP, int VEC>
__global__ void __launch_bounds__(kThreads, min_blocks(NORM))
    forward_kernel(Rows<T> in, int group, opmath_t<T> margin, opmath_t<T> p, opmath_t<T> inv_p, opmath_t<T> eps,
                   int reduction, opmath_t<T> loss_scale, T* __restrict__ loss, opmath_t<T>* __restrict__ dist,
                   opmath_t<T>* __restrict__ partials, unsigned* __restrict__ ticket) {
  using acc_t = opmath_t<T>;
  using P = Pack<T, VEC>;
  __shared__ acc_t smem[kThreads / kWarp];
  __shared__ bool last_block;
  const int lane = threadIdx.x & (group - 1);
  const int rows_per_block = blockDim.x / group;
  const int64_t nvec = in.cols / VEC;
  acc_t local = 0;  // this thread's share of the mean/sum (lane 0 of each group)
  // General p calls pow (compute-bound): unrolling it gains nothing and adds register pressure.
  [[maybe_unused]] constexpr int kUnroll = NORM == Norm::Lp ? 1 : 4;  // read by nvcc's #pragma unroll
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / group; row < in.rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const T* a = in.a + row * in.sa;
    const T* pos = in.p + row * in.sp;
    const T* neg = in.n + row * in.sn;
    acc_t ap = 0, an = 0, pn = 0, aa = 0, pp = 0, nn = 0;  // aa, pp, nn: the cosine's squared norms
#pragma unroll(kUnroll)
    for (int64_t j = lane; j < nvec; j += group) {
      const P va = reinterpret_cast<const P*>(a)[j];
      const P vp = reinterpret_cast<const P*>(pos)[j];
      const P vn = reinterpret_cast<const P*>(neg)[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        accumulate<NORM, SWAP>(acc_t(va.v[k]), acc_t(vp.v[k]), acc_t(vn.v[k]), eps, p, ap, an, pn, aa, pp, nn);
    }
    for (int64_t j = nvec * VEC + lane; j < in.cols; j += group) {
      accumulate<NORM, SWAP>(acc_t(a[j]), acc_t(pos[j]), acc_t(neg[j]), eps, p, ap, an, pn, aa, pp, nn);
    }
    ap = group_sum(ap, group, smem);
    an = group_sum(an, group, smem);
    if constexpr (SWAP) pn = group_sum(pn, group, smem);
    if constexpr (NORM == Norm::Cos) {
      aa = group_sum(aa, group, smem);
      pp = group_sum(pp, group, smem);
      nn = group_sum(nn, group, smem);
    }
    if (lane == 0) {
      const acc_t l = finish_row<NORM, SWAP>(ap, an, pn, aa, pp, nn, inv_p, eps, margin, dist + dist_width(NORM) * row);
      if (reduction == 0) loss[row] = T(l);
      else local += l;
    }
  }
  if (reduction == 0) return;
  // Deterministic mean/sum: each block's partial, then the last block adds them in fixed order.
  local = group_sum(local, blockDim.x, smem);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = local;
    __threadfence();
    last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  acc_t total = 0;
  for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += __ldcg(partials + b);
  total = group_sum(total, blockDim.x, smem);
  if (threadIdx.x == 0) loss[0] = T(total * loss_scale);  // loss_scale: 1 / N for mean (no division here: spills)
}

template <typename T, Norm NORM, bool SWAP, int VEC>
__global__ void __launch_bounds__(kThreads, min_blocks(NORM))
    backward_kernel(Rows<T> in, int group, opmath_t<T> margin, opmath_t<T> p, opmath_t<T> eps, int distance,
                    const T* __restrict__ grad, int64_t grad_stride, opmath_t<T> grad_scale, bool grad_at_zero_hinge,
                    const opmath_t<T>* __restrict__ dist, T* __restrict__ ga, T* __restrict__ gp, T* __restrict__ gn) {
  using acc_t = opmath_t<T>;
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x & (group - 1);
  const int rows_per_block = blockDim.x / group;
  const int64_t nvec = in.cols / VEC;
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / group; row < in.rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const RowGrad<acc_t> r = row_grad_of<NORM, SWAP>(dist + dist_width(NORM) * row, margin, p, eps, distance,
                                                     acc_t(grad[row * grad_stride]) * grad_scale, grad_at_zero_hinge);
    const T* a = in.a + row * in.sa;
    const T* pos = in.p + row * in.sp;
    const T* neg = in.n + row * in.sn;
    T* oa = ga + row * in.cols;
    T* op = gp + row * in.cols;
    T* on = gn + row * in.cols;
#pragma unroll 2
    for (int64_t j = lane; j < nvec; j += group) {
      P va, vp, vn;
      if (r.zero) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) va.v[k] = vp.v[k] = vn.v[k] = T(0);
      } else {
        va = reinterpret_cast<const P*>(a)[j];
        vp = reinterpret_cast<const P*>(pos)[j];
        vn = reinterpret_cast<const P*>(neg)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t x, y, z;
          element_grad<NORM, SWAP>(acc_t(va.v[k]), acc_t(vp.v[k]), acc_t(vn.v[k]), eps, p, r, x, y, z);
          va.v[k] = T(x), vp.v[k] = T(y), vn.v[k] = T(z);
        }
      }
      reinterpret_cast<P*>(oa)[j] = va;
      reinterpret_cast<P*>(op)[j] = vp;
      reinterpret_cast<P*>(on)[j] = vn;
    }
    for (int64_t j = nvec * VEC + lane; j < in.cols; j += group) {
      acc_t x = 0, y = 0, z = 0;
      if (!r.zero) element_grad<NORM, SWAP>(acc_t(a[j]), acc_t(pos[j]), acc_t(neg[j]), eps, p, r, x, y, z);
      oa[j] = T(x), op[j] = T(y), on[j] = T(z);
    }
  }
}

struct Launch {
  int group;   // threads per row
  int blocks;  // grid size
};

// One wave of resident blocks of Kernel, each row to a group of threads.
template <auto Kernel>
Launch launch_config(int64_t rows, int64_t cols, int vec, int device) {
  const int blocks_per_sm = std::max(tl_cuda::max_blocks_per_sm<Kernel>(kThreads), 1);
  const int64_t resident_blocks = int64_t(tl_cuda::sm_count(device)) * blocks_per_sm;
  const int64_t nvec = (cols + vec - 1) / vec;
  int group = 1;
  while (group < kWarp && group < nvec) group *= 2;
  // Long rows, and too few of them to give every SM several warps: one row per block.
  if (group == kWarp && nvec >= 8 * kWarp && rows < resident_blocks * 2) group = kThreads;
  const int64_t rows_per_block = kThreads / group;
  const int64_t blocks = std::max<int64_t>(1, std::min((rows + rows_per_block - 1) / rows_per_block, resident_blocks));
  return {group, int(blocks)};
}

// 16-byte loads need every row start of every input (and, for the backward's stores, of the contiguous
// outputs: cols % VEC == 0) aligned.
template <typename T>
bool can_vectorize(const Rows<T>& in) {
  constexpr int vec = 16 / sizeof(T);
  auto aligned = [](const T* ptr, int64_t stride) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride % vec == 0;
  };
  return in.cols % vec == 0 && aligned(in.a, in.sa) && aligned(in.p, in.sp) && aligned(in.n, in.sn);
}

// Calls f(vec) with the vector width (a compile-time constant) that the inputs allow.
template <typename T, typename F>
void dispatch_vec(const Rows<T>& in, F&& f) {
  if (can_vectorize(in)) f(std::integral_constant<int, 16 / sizeof(T)>{});
  else f(std::integral_constant<int, 1>{});
}

std::tuple<Tensor, Tensor> forward_cuda(const Tensor& anchor, const Tensor& positive, const Tensor& negative,
                                        double margin, double p, double eps, bool swap, int64_t reduction,
                                        int64_t distance) {
  check_inputs(anchor, positive, negative);
  const tl_cuda::DeviceGuard guard(anchor);
  Tensor loss, dist;
  std::tie(loss, dist) = empty_forward_outputs(anchor, reduction, distance);
  if (anchor.size(0) == 0)
    return {reduction == 0 ? loss : torch::stable::fill_(loss, empty_reduction_value(reduction)), dist};
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  const tl_cuda::Stream stream = tl_cuda::current_stream();
  TL_DISPATCH_FLOATING_AND_HALF(a.scalar_type(), "triplet_margin_forward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const Rows<scalar_t> in = rows_of<scalar_t>(a, pos, neg);
    dispatch_vec(in, [&](auto vec) {
      dispatch_norm_swap(distance, p, swap, [&](auto norm, auto sw) {
        constexpr auto kernel =
            forward_kernel<scalar_t, decltype(norm)::value, decltype(sw)::value, decltype(vec)::value>;
        const Launch cfg = launch_config<kernel>(in.rows, in.cols, decltype(vec)::value, a.get_device());
        Tensor partials, ticket;
        if (reduction != 0) {
          partials = empty({cfg.blocks}, dist.scalar_type(), dist.device());
          ticket = empty({1}, ScalarType::Int, a.device());
          tl_cuda::memset_async(ticket.mutable_data_ptr(), 0, sizeof(int), stream);
        }
        TL_LAUNCH(kernel, cfg.blocks, kThreads, 0, stream, in, cfg.group, acc_t(margin), acc_t(p), acc_t(1) / acc_t(p),
                  acc_t(eps), int(reduction), reduction == 1 ? acc_t(1) / acc_t(in.rows) : acc_t(1),
                  loss.mutable_data_ptr<scalar_t>(), dist.mutable_data_ptr<acc_t>(),
                  reduction != 0 ? partials.mutable_data_ptr<acc_t>() : nullptr,
                  reduction != 0 ? static_cast<unsigned*>(ticket.mutable_data_ptr()) : nullptr);
        TL_LAUNCH_CHECK();
      });
    });
  });
  return {loss, dist};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad, const Tensor& anchor, const Tensor& positive,
                                                 const Tensor& negative, const Tensor& dist, double margin, double p,
                                                 double eps, bool swap, int64_t reduction, bool grad_at_zero_hinge,
                                                 int64_t distance) {
  check_inputs(anchor, positive, negative);
  const tl_cuda::DeviceGuard guard(anchor);
  const Tensor a = unit_stride_columns(anchor), pos = unit_stride_columns(positive);
  const Tensor neg = unit_stride_columns(negative);
  Tensor g, dst, ga, gp, gn;
  std::tie(g, dst) = backward_operands(grad, dist, a, reduction, distance);
  std::tie(ga, gp, gn) = empty_backward_outputs(a);
  if (a.numel() == 0) return {ga, gp, gn};
  const tl_cuda::Stream stream = tl_cuda::current_stream();
  TL_DISPATCH_FLOATING_AND_HALF(a.scalar_type(), "triplet_margin_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const Rows<scalar_t> in = rows_of<scalar_t>(a, pos, neg);
    // grad is (N,) for reduction none, else one value for every row (divided by N for mean).
    const int64_t grad_stride = reduction == 0 ? g.stride(0) : 0;
    const acc_t grad_scale = reduction == 1 ? acc_t(1) / acc_t(in.rows) : acc_t(1);
    dispatch_vec(in, [&](auto vec) {
      dispatch_norm_swap(distance, p, swap, [&](auto norm, auto sw) {
        constexpr auto kernel =
            backward_kernel<scalar_t, decltype(norm)::value, decltype(sw)::value, decltype(vec)::value>;
        const Launch cfg = launch_config<kernel>(in.rows, in.cols, decltype(vec)::value, a.get_device());
        TL_LAUNCH(kernel, cfg.blocks, kThreads, 0, stream, in, cfg.group, acc_t(margin), acc_t(p), acc_t(eps),
                  int(distance), g.const_data_ptr<scalar_t>(), grad_stride, grad_scale, grad_at_zero_hinge,
                  dst.const_data_ptr<acc_t>(), ga.mutable_data_ptr<scalar_t>(), gp.mutable_data_ptr<scalar_t>(),
                  gn.mutable_data_ptr<scalar_t>());
        TL_LAUNCH_CHECK();
      });
    });
  });
  return {ga, gp, gn};
}

}  // namespace

}  // namespace tripletloss

TL_CUDA_LIBRARY_IMPL(m) {
  m.impl("triplet_margin_forward", TORCH_BOX(&tripletloss::forward_cuda));
  m.impl("triplet_margin_backward", TORCH_BOX(&tripletloss::backward_cuda));
}
