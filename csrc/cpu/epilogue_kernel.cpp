// CPU launcher of the distance epilogue (epilogue.h): mining_math.h gram_distance_row over each row of the block, in
// parallel over rows with parallel_for; the distance code is a template argument, so that the row loop vectorizes.
// Every entry is written from its own inputs alone: the result does not depend on the number of threads. (It serves
// the tests and opcheck: distances.block keeps torch's passes on the CPU.)
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
      mining::gram_distance_row<Distance>(row, sq_x ? sq_x[i] : T(0), sq_y ? sq_y : row, keys_x[i], keys_y, m, row);
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
