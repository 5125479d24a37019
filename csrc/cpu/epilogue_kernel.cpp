// CPU launcher of the distance epilogue (epilogue.h): gram_distance over each row of the block, in parallel over rows
// with parallel_for; the distance code is a template argument, so that the row loop vectorizes. Every entry is
// written from its own inputs alone: the result does not depend on the number of threads.
//
// Built for the baseline x86-64 target only (no target_clones as in triplet_kernel.cpp): the host compiler may
// contract g * -2 + sq into an FMA where the target has one (GCC's default -ffp-contract=fast for C++), which would
// differ from torch's separate mul_/add_ passes where g * -2 overflows.
#include <algorithm>

#include "../epilogue.h"
#include "../mining_math.h"

namespace tripletloss {
namespace epilogue {
namespace {

// Rows per parallel task: about 32K entries.
int64_t grain(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(m, 1)); }

template <typename T, int Distance>
void rows(T* gram, const T* sq_x, const T* sq_y, const int64_t* keys_x, const int64_t* keys_y, int64_t b, int64_t m) {
  parallel_for(0, b, grain(m), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = gram + i * m;
      const T sq_i = sq_x ? sq_x[i] : T(0);
      const T* sq = sq_y ? sq_y : row;  // read but unused for dot (no null check in the loop: it vectorizes)
      const int64_t key = keys_x[i];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) row[j] = mining::gram_distance(row[j], sq_i, sq[j], key == keys_y[j], Distance);
    }
  });
}

void gram_distances(Tensor& gram, const Tensor* sq_x, const Tensor* sq_y, const Tensor& keys_x, const Tensor& keys_y,
                    int64_t distance) {
  TL_DISPATCH_FLOATING(gram.scalar_type(), "gram_distances_", [&] {
    const auto run = [&]<int Distance>() {
      rows<scalar_t, Distance>(gram.mutable_data_ptr<scalar_t>(), sq_x ? sq_x->const_data_ptr<scalar_t>() : nullptr,
                               sq_y ? sq_y->const_data_ptr<scalar_t>() : nullptr, keys_x.const_data_ptr<int64_t>(),
                               keys_y.const_data_ptr<int64_t>(), gram.size(0), gram.size(1));
    };
    if (distance == mining::kEuclidean) run.template operator()<mining::kEuclidean>();
    else if (distance == mining::kSquaredEuclidean) run.template operator()<mining::kSquaredEuclidean>();
    else run.template operator()<mining::kDot>();
  });
}

}  // namespace

const Backend& cpu_backend() {
  static const Backend backend{gram_distances};
  return backend;
}

}  // namespace epilogue
}  // namespace tripletloss
