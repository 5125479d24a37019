// CPU row launchers of the fused mining on a Gram block (mining.h GramBlock; issue 18): each anchor's row of the
// matrix product x_b y^T is read once, turned into distances (mining_math.h gram_distance: distances.block's entries
// bitwise) and mined with the row functions of mining_math.h, in parallel over anchors. The positives of a row come
// from the references sorted by label (pos_cols), so no label is compared per entry: a per-task mask of M roles
// holds the row's positives and excluded column, and is cleared after the row. Each anchor writes only its own
// outputs, in anchor order: results do not depend on the number of threads.
#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../mining.h"
#include "../mining_math.h"

namespace tripletloss {
namespace mining {
namespace {

// Anchors per parallel task: enough rows for about 32K entries.
int64_t grain(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(m, 1)); }

struct MaskRole {
  const uint8_t* role;
  int operator()(int64_t k) const { return role[k]; }
};

// One task's scratch and the row set-up shared by the three losses.
template <typename T>
struct Rows {
  const GramBlock& g;
  const T *gram, *sq_x, *sq_y;
  const int64_t *keys_x, *keys_y, *self, *cols, *start, *end;
  int64_t m;
  std::vector<uint8_t> role;  // kNegative but for the current row's positives and excluded column
  std::vector<std::pair<T, int64_t>> pairs;
  std::vector<T> ps;  // the row's positive distances, ascending, padded with +inf (count_below_short)
  std::vector<int64_t> pi;

  explicit Rows(const GramBlock& block)
      : g(block),
        gram(block.gram.const_data_ptr<T>()),
        sq_x(block.sq_x ? block.sq_x->const_data_ptr<T>() : nullptr),
        sq_y(block.sq_y ? block.sq_y->const_data_ptr<T>() : nullptr),
        keys_x(block.keys_x.const_data_ptr<int64_t>()),
        keys_y(block.keys_y.const_data_ptr<int64_t>()),
        self(block.self_index.const_data_ptr<int64_t>()),
        cols(block.pos_cols.const_data_ptr<int64_t>()),
        start(block.pos_start.const_data_ptr<int64_t>()),
        end(block.pos_end.const_data_ptr<int64_t>()),
        m(block.gram.size(1)),
        role(size_t(m), uint8_t(kNegative)) {}

  // Row i's distances into d (which may be the Gram row itself): one pass, the distance code a constant.
  template <int Distance>
  void distances_into(int64_t i, const T* row, T* d) const {
    const T sq_i = sq_x ? sq_x[i] : T(0);
    const int64_t key = keys_x[i];
    for (int64_t k = 0; k < m; ++k)
      d[k] = gram_distance(row[k], sq_i, sq_y ? sq_y[k] : T(0), key == keys_y[k], Distance);
  }
  void distances(int64_t i, const T* row, T* d) const {
    switch (g.distance) {
      case kEuclidean: return distances_into<kEuclidean>(i, row, d);
      case kSquaredEuclidean: return distances_into<kSquaredEuclidean>(i, row, d);
      default: return distances_into<kDot>(i, row, d);
    }
  }

  // Marks row i's positives and excluded column, and sorts the positives (distances d) into ps/pi by (distance,
  // column), NaN last. Returns the role functor; clear(i) undoes the marks.
  MaskRole begin(int64_t i, const T* d) {
    const int64_t excl = self[i];
    pairs.clear();
    for (int64_t e = start[i]; e < end[i]; ++e) {
      const int64_t j = cols[e];
      if (j == excl) continue;
      role[size_t(j)] = kPositive;
      pairs.emplace_back(d[j], j);
    }
    if (excl >= 0 && excl < m) role[size_t(excl)] = kExcluded;
    std::sort(pairs.begin(), pairs.end(),
              [](const auto& a, const auto& b) { return sorts_before(a.first, a.second, b.first, b.second); });
    ps.assign(size_t(padded(int64_t(pairs.size()))), std::numeric_limits<T>::infinity());
    pi.resize(pairs.size());
    for (size_t t = 0; t < pairs.size(); ++t) std::tie(ps[t], pi[t]) = pairs[t];
    return {role.data()};
  }
  void clear(int64_t i) {
    for (int64_t e = start[i]; e < end[i]; ++e) role[size_t(cols[e])] = kNegative;
    const int64_t excl = self[i];
    if (excl >= 0 && excl < m) role[size_t(excl)] = kNegative;
  }
  int64_t n_pos() const { return int64_t(pi.size()); }
};

// Triplets found per anchor (block row, positive, negative, d(a, p), d(a, n), weight), gathered in anchor order.
template <typename T>
struct Found {
  int64_t j, k;
  T dp, dn, w;
};

template <typename T>
Mined gather(const std::vector<std::vector<Found<T>>>& found, const Device& device) {
  int64_t total = 0;
  for (const auto& f : found) total += int64_t(f.size());
  constexpr ScalarType dtype = std::is_same_v<T, double> ? ScalarType::Double : ScalarType::Float;
  Mined out{empty({total, 3}, ScalarType::Long, device), empty({total, 2}, dtype, device),
            empty({total}, dtype, device)};
  int64_t* t = out.triplets.mutable_data_ptr<int64_t>();
  T* p = out.pair.mutable_data_ptr<T>();
  T* w = out.weight.mutable_data_ptr<T>();
  for (size_t i = 0; i < found.size(); ++i)
    for (const Found<T>& f : found[i]) {
      t[0] = int64_t(i), t[1] = f.j, t[2] = f.k, p[0] = f.dp, p[1] = f.dn, *w = f.w;
      t += 3, p += 2, ++w;
    }
  return out;
}

}  // namespace

Mined batch_hard_gram(const GramBlock& g, double margin, bool soft, Tensor& loss, Tensor& counts) {
  const int64_t n = g.gram.size(0), m = g.gram.size(1);
  Mined out;
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "batch_hard_gram", [&] {
    using T = scalar_t;
    std::vector<std::vector<Found<T>>> found(static_cast<size_t>(n));
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      Rows<T> rows(g);
      std::vector<T> d(static_cast<size_t>(m));
      for (int64_t i = i0; i < i1; ++i) {
        rows.distances(i, rows.gram + i * m, d.data());
        const MaskRole role = rows.begin(i, d.data());
        int64_t mined[2];
        batch_hard_row<T>(d.data(), m, role, T(margin), soft, l + i, c + i * kCounts, mined);
        rows.clear(i);
        if (mined[0] < 0) continue;
        const T dp = d[size_t(mined[0])], dn = d[size_t(mined[1])], w = hard_weight(dp - dn, T(margin), soft);
        if (w != T(0)) found[size_t(i)].push_back({mined[0], mined[1], dp, dn, w});
      }
    });
    out = gather(found, g.gram.device());
  });
  return out;
}

Mined semi_hard_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts) {
  const int64_t n = g.gram.size(0), m = g.gram.size(1);
  Mined out;
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "semi_hard_gram", [&] {
    using T = scalar_t;
    std::vector<std::vector<Found<T>>> found(static_cast<size_t>(n));
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      Rows<T> rows(g);
      std::vector<T> d(static_cast<size_t>(m)), best_d;
      std::vector<int64_t> best_k;
      for (int64_t i = i0; i < i1; ++i) {
        rows.distances(i, rows.gram + i * m, d.data());
        const MaskRole role = rows.begin(i, d.data());
        const int64_t n_pos = rows.n_pos();
        best_d.resize(size_t(n_pos + 1));
        best_k.resize(size_t(n_pos + 1));
        int64_t active = 0;
        double li = 0;
        std::vector<Found<T>>& out = found[size_t(i)];
        const int64_t n_neg = semi_hard_pairs(d.data(), m, role, rows.ps.data(), rows.pi.data(), n_pos, T(margin),
                                              best_d.data(), best_k.data(), [&](int64_t j, int64_t k, T h) {
                                                if (!(h > T(0))) return;
                                                li += double(h), ++active;
                                                out.push_back({j, k, d[size_t(j)], d[size_t(k)], T(1)});
                                              });
        rows.clear(i);
        l[i] = li;
        write_counts(c + i * kCounts, n_pos * n_neg, active, n_neg > 0 ? n_pos : 0);
      }
    });
    out = gather(found, g.gram.device());
  });
  return out;
}

void batch_all_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts) {
  const int64_t n = g.gram.size(0), m = g.gram.size(1);
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "batch_all_gram_", [&] {
    using T = scalar_t;
    T* gram = g.gram.mutable_data_ptr<T>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    parallel_for(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      Rows<T> rows(g);
      std::vector<double> suffix;
      std::vector<int64_t> hist;
      for (int64_t i = i0; i < i1; ++i) {
        T* row = gram + i * m;
        rows.distances(i, row, row);  // in place: the row's distances, then its gradient
        const MaskRole role = rows.begin(i, row);
        const int64_t n_pos = rows.n_pos(), key = rows.keys_x[i], distance = g.distance;
        suffix.resize(size_t(n_pos + 1));
        hist.resize(size_t(4 * (n_pos + 1)));
        batch_all_row_grad(row, m, role, rows.ps.data(), rows.pi.data(), n_pos, T(margin), suffix.data(), hist.data(),
                           l + i, c + i * kCounts, [&](int64_t k, T coef) {
                             row[k] = gram_grad(coef, row[k], key == rows.keys_y[k], int(distance));
                           });
        const int64_t excl = rows.self[i];
        if (excl >= 0 && excl < m) row[excl] = T(0);
        rows.clear(i);
      }
    });
  });
}

}  // namespace mining
}  // namespace tripletloss
