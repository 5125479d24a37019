// CPU row launchers of the fused mining on a Gram block (mining.h GramBlock; issue 18): each anchor's row of the
// matrix product x_b y^T is read once, turned into distances (mining_math.h gram_distance) and mined with the row
// functions of mining_math.h, in parallel over anchors. The positives of a row come from the references sorted by label
// (pos_cols), so no label is compared per entry: a per-task mask of M roles holds the row's positives and excluded
// column, and is cleared after the row. Each anchor writes only its own outputs, in anchor order: results do not depend
// on the number of threads.
#include <math.h>

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

// parallel_for over [begin, end), each task's range run by run_range (stable.h: compiled for the CPU's vector units).
template <typename F>
void parallel_clones(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(begin, end, grain, [&](int64_t i0, int64_t i1) { run_range(f, i0, i1); });
}

// Anchors per parallel task: enough rows for about 32K entries.
int64_t grain(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(m, 1)); }

struct MaskRole {
  const uint8_t* role;
  int operator()(int64_t k) const { return role[k]; }
};

// Triplets found per anchor (positive and negative column, dL/dgram at (a, p) and (a, n)), gathered in anchor order.
template <typename T>
struct Found {
  int64_t j, k;
  T cp, cn;
};

// One task's scratch and the row set-up shared by the three losses.
template <typename T>
struct Rows {
  const GramBlock& g;
  const T *gram, *sq_x, *sq_y;
  const int32_t *keys_x, *keys_y;
  const int64_t *self, *cols, *start, *end;
  int64_t m;
  std::vector<uint8_t> role;  // kNegative but for the current row's positives and excluded column
  std::vector<std::pair<T, int64_t>> pairs;
  std::vector<T> ps;  // the row's positive distances, ascending, padded with +inf (count_below_short)
  std::vector<int64_t> pi;
  std::vector<uint64_t> packed;  // sort_packed's keys
  const T* row_d = nullptr;      // the distances of the row begin() sorts the positives of

  explicit Rows(const GramBlock& block)
      : g(block),
        gram(block.gram.const_data_ptr<T>()),
        sq_x(block.sq_x ? block.sq_x->const_data_ptr<T>() : nullptr),
        sq_y(block.sq_y ? block.sq_y->const_data_ptr<T>() : nullptr),
        keys_x(block.keys_x.const_data_ptr<int32_t>()),
        keys_y(block.keys_y.const_data_ptr<int32_t>()),
        self(block.self_index.const_data_ptr<int64_t>()),
        cols(block.pos_cols.const_data_ptr<int64_t>()),
        start(block.pos_start.const_data_ptr<int64_t>()),
        end(block.pos_end.const_data_ptr<int64_t>()),
        m(block.gram.size(1)),
        role(size_t(m), uint8_t(kNegative)) {}

  // Row i's distances into d (which may be the Gram row itself): one pass, the distance code a constant.
  // Returns whether the row holds a NaN.
  template <int Distance>
  bool distances_into(int64_t i, const T* row, T* d) const {
    return gram_distance_row<Distance>(row, sq_x ? sq_x[i] : T(0), sq_y ? sq_y : row, keys_x[i], keys_y, m, d);
  }
  bool distances(int64_t i, const T* row, T* d) const {
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
    row_d = d;
    pairs.clear();
    for (int64_t e = start[i]; e < end[i]; ++e) {
      const int64_t j = cols[e];
      if (j == excl) continue;
      role[size_t(j)] = kPositive;
      pairs.emplace_back(d[j], j);
    }
    if (excl >= 0 && excl < m) role[size_t(excl)] = kExcluded;
    if (!sort_packed())
      std::sort(pairs.begin(), pairs.end(),
                [](const auto& a, const auto& b) { return sorts_before(a.first, a.second, b.first, b.second); });
    ps.assign(size_t(padded(int64_t(pairs.size()))), std::numeric_limits<T>::infinity());
    pi.resize(pairs.size());
    for (size_t t = 0; t < pairs.size(); ++t) std::tie(ps[t], pi[t]) = pairs[t];
    return {role.data()};
  }
  // float rows without NaN: pairs sorted as integers (the distance's order-preserving bits, then the column), the
  // order of sorts_before (-0 and +0, equal as floats, both keyed as +0); false when it does not apply.
  bool sort_packed() {
    if constexpr (std::is_same_v<T, float>) {
      packed.clear();
      for (const auto& [v, j] : pairs) {
        if (v != v) return false;
        packed.push_back(uint64_t(ordered_bits(v)) << 32 | uint64_t(j));
      }
      std::sort(packed.begin(), packed.end());
      for (size_t t = 0; t < packed.size(); ++t) {
        const int64_t j = int64_t(packed[t] & 0xFFFFFFFFu);
        pairs[t] = {row_d[j], j};
      }
      return true;
    }
    return false;
  }
  void clear(int64_t i) {
    for (int64_t e = start[i]; e < end[i]; ++e) role[size_t(cols[e])] = kNegative;
    const int64_t excl = self[i];
    if (excl >= 0 && excl < m) role[size_t(excl)] = kNegative;
  }
  int64_t n_pos() const { return int64_t(pi.size()); }
  // The table of the row's thresholds s (its positives, or batch-all's margin + positives) when usable (Cells).
  bool table(const T* s, bool nan) {
    if (nan || !Cells<T>::usable(s, n_pos())) return false;
    cell_scratch.resize(size_t(Cells<T>::cells_for(n_pos()) + 3));
    cells.build(s, n_pos(), cell_scratch.data());
    return true;
  }
  Cells<T> cells;
  std::vector<int32_t> cell_scratch;
  // A mined triplet's dL/dgram at (a, j) and (a, k) for its dL/dd(a, j) = w (and -w at (a, k)).
  Found<T> mined(int64_t i, int64_t j, int64_t k, T dj, T dk, T w) const {
    return {j, k, gram_grad(w, dj, keys_x[i] == keys_y[j], int(g.distance)),
            gram_grad(-w, dk, keys_x[i] == keys_y[k], int(g.distance))};
  }
  int64_t n_neg(int64_t i) const {
    const int64_t excl = self[i];
    return m - n_pos() - (excl >= 0 && excl < m ? 1 : 0);
  }
  // Sets the row's positives and excluded column of d to v (a value that never wins a scan), and back.
  void hide(int64_t i, T* d, T v) const {
    for (const int64_t j : pi) d[j] = v;
    if (self[i] >= 0 && self[i] < m) d[self[i]] = v;
  }
  void unhide(T* d) const {
    for (size_t t = 0; t < pi.size(); ++t) d[pi[t]] = ps[t];
  }
};

template <typename T>
constexpr ScalarType dtype_of = std::is_same_v<T, double> ? ScalarType::Double : ScalarType::Float;

template <typename T>
Mined gather(const std::vector<std::vector<Found<T>>>& found, const Device& device) {
  int64_t total = 0;
  for (const auto& f : found) total += 2 * int64_t(f.size());
  Mined out{empty({total, 2}, ScalarType::Long, device), empty({total}, dtype_of<T>, device)};
  int64_t* p = out.pairs.mutable_data_ptr<int64_t>();
  T* c = out.coef.mutable_data_ptr<T>();
  for (size_t i = 0; i < found.size(); ++i)
    for (const Found<T>& f : found[i]) {
      p[0] = int64_t(i), p[1] = f.j, p[2] = int64_t(i), p[3] = f.k, c[0] = f.cp, c[1] = f.cn;
      p += 4, c += 2;
    }
  return out;
}

}  // namespace

namespace {

// The frame of batch_hard_gram and semi_hard_gram: each anchor's row of distances into the task's buffer d, its roles
// set, then row(rows, i, d, role, out) mines it (writing the anchor's loss and counts, and its triplets into out);
// the triplets are gathered in anchor order. Row's scratch lives in a per-task Scratch.
template <typename T, typename Scratch, typename Row>
Mined mine_rows(const GramBlock& g, Row&& row) {
  const int64_t n = g.gram.size(0), m = g.gram.size(1);
  std::vector<std::vector<Found<T>>> found(static_cast<size_t>(n));
  parallel_clones(0, n, grain(m), [&](int64_t i0, int64_t i1) {
    Rows<T> rows(g);
    std::vector<T> d(static_cast<size_t>(m));
    Scratch scratch;
    for (int64_t i = i0; i < i1; ++i) {
      rows.distances(i, rows.gram + i * m, d.data());
      const MaskRole role = rows.begin(i, d.data());
      row(rows, i, d.data(), role, scratch, found[size_t(i)]);
      rows.clear(i);
    }
  });
  return gather(found, g.gram.device());
}

struct NoScratch {};

template <typename T>
struct SemiHardScratch {
  std::vector<T> best_d;
  std::vector<int64_t> best_k;
  std::vector<int32_t> cell;  // each column's cell in the row's table
};

}  // namespace

Mined batch_hard_gram(const GramBlock& g, double margin, bool soft, Tensor& loss, Tensor& counts) {
  double* l = loss.mutable_data_ptr<double>();
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  const int64_t m = g.gram.size(1);
  Mined out;
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "batch_hard_gram", [&] {
    using T = scalar_t;
    out = mine_rows<T, NoScratch>(g, [&](Rows<T>& rows, int64_t i, T* d, const MaskRole& role, NoScratch&,
                                         std::vector<Found<T>>& found) {
      // The hardest positive among the few positives, the hardest negative by a vectorized scan of the row with the
      // others hidden; a row with a NaN or no finite negative takes the exact scan of batch_hard_row.
      const int64_t n_pos = rows.n_pos(), n_neg = rows.n_neg(i);
      int64_t p = -1;
      T dp = 0;
      for (int64_t t = 0; t < n_pos; ++t)
        if (harder_positive(rows.ps[t], rows.pi[t], dp, p)) dp = rows.ps[t], p = rows.pi[t];
      rows.hide(i, d, T(INFINITY));
      const int64_t q = n_neg > 0 ? first_min(d, m) : -1;
      int64_t mined[2];
      if (n_neg > 0 && q < 0) {
        rows.distances(i, rows.gram + i * m, d);
        batch_hard_row<T>(d, m, role, T(margin), soft, l + i, c + i * kCounts, mined);
        dp = mined[0] >= 0 ? d[mined[0]] : T(0);
      } else {
        batch_hard_values(dp, q >= 0 ? d[q] : T(0), p, q, n_pos, n_neg, T(margin), soft, l + i, c + i * kCounts, mined);
      }
      if (mined[0] < 0) return;
      const T dn = d[mined[1]], w = hard_weight(dp - dn, T(margin), soft);
      if (w != T(0)) found.push_back(rows.mined(i, mined[0], mined[1], dp, dn, w));
    });
  });
  return out;
}

Mined semi_hard_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts) {
  double* l = loss.mutable_data_ptr<double>();
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  const int64_t m = g.gram.size(1);
  Mined out;
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "semi_hard_gram", [&] {
    using T = scalar_t;
    out = mine_rows<T, SemiHardScratch<T>>(g, [&](Rows<T>& rows, int64_t i, T* d, const MaskRole& role,
                                                  SemiHardScratch<T>& s, std::vector<Found<T>>& found) {
      const int64_t n_pos = rows.n_pos();
      s.best_d.resize(size_t(n_pos + 1));
      s.best_k.resize(size_t(n_pos + 1));
      s.cell.resize(size_t(m));
      // The farthest negative by a vectorized scan with the others hidden (a row with a NaN or no finite negative:
      // the exact scan of semi_hard_buckets), then the negatives' buckets (by the row's table of cells where usable)
      // and the choice.
      rows.hide(i, d, T(-INFINITY));
      int64_t largest = rows.n_neg(i) > 0 ? first_max(d, m) : -1;
      const bool exact = rows.n_neg(i) > 0 && largest < 0;
      if (exact) rows.distances(i, rows.gram + i * m, d);
      rows.unhide(d);
      const T* ps = rows.ps.data();
      const bool table = rows.table(ps, exact);
      if (table) rows.cells.cells_of(d, m, s.cell.data());
      const auto by_table = [&](int64_t k, T v) {
        return rows.cells.count_in(s.cell[size_t(k)], ps, [v](T x) { return x < v; });
      };
      const auto by_search = [&](int64_t, T v) {
        return n_pos <= kShortPositives ? count_below_short(ps, n_pos, v) : count_below(ps, n_pos, v);
      };
      const int64_t n_neg =
          table ? semi_hard_buckets(d, m, role, n_pos, by_table, s.best_d.data(), s.best_k.data(), exact, &largest)
                : semi_hard_buckets(d, m, role, n_pos, by_search, s.best_d.data(), s.best_k.data(), exact, &largest);
      int64_t active = 0;
      double li = 0;
      semi_hard_choose(d, ps, rows.pi.data(), n_pos, T(margin), s.best_k.data(), n_neg, largest,
                       [&](int64_t j, int64_t k, T h) {
                         if (!(h > T(0))) return;
                         li += double(h), ++active;
                         found.push_back(rows.mined(i, j, k, d[j], d[k], T(1)));
                       });
      l[i] = li;
      write_counts(c + i * kCounts, n_pos * n_neg, active, n_neg > 0 ? n_pos : 0);
    });
  });
  return out;
}

// w + w^T in place, a pair of square tiles (I, J), (J, I) at a time (I <= J, one task each: every entry is written
// once, as the same sum on both sides). Each tile is copied out row by row first: reading a column of w directly
// would stride by whole rows, which for power-of-two widths all fall in one cache set.
template <typename T>
void symmetrize_tiles(T* w, int64_t n) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (n + kTile - 1) / kTile;
  parallel_clones(0, tiles * (tiles + 1) / 2, 4, [&](int64_t p0, int64_t p1) {
    T a[kTile][kTile], b[kTile][kTile];
    int64_t bi = 0, first = 0;  // the pair p is (bi, bj) in row-major order of the upper triangle
    while (first + (tiles - bi) <= p0) first += tiles - bi, ++bi;
    for (int64_t p = p0; p < p1; ++p) {
      if (p - first >= tiles - bi) first += tiles - bi, ++bi;
      const int64_t bj = bi + (p - first);
      const int64_t i0 = bi * kTile, j0 = bj * kTile;
      const int64_t ni = std::min(kTile, n - i0), nj = std::min(kTile, n - j0);
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) a[i][j] = w[(i0 + i) * n + j0 + j];
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = 0; i < ni; ++i) b[j][i] = w[(j0 + j) * n + i0 + i];
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) a[i][j] = a[i][j] + b[j][i];
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) w[(i0 + i) * n + j0 + j] = a[i][j];
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = 0; i < ni; ++i) w[(j0 + j) * n + i0 + i] = a[i][j];
    }
  });
}

void batch_all_gram(const GramBlock& g, double margin, Tensor& loss, Tensor& counts, Tensor& nonzero) {
  const int64_t n = g.gram.size(0), m = g.gram.size(1);
  TL_DISPATCH_FLOATING(g.gram.scalar_type(), "batch_all_gram_", [&] {
    using T = scalar_t;
    T* gram = g.gram.mutable_data_ptr<T>();
    double* l = loss.mutable_data_ptr<double>();
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    int64_t* nz = nonzero.mutable_data_ptr<int64_t>();
    parallel_clones(0, n, grain(m), [&](int64_t i0, int64_t i1) {
      Rows<T> rows(g);
      std::vector<double> suffix;
      std::vector<int64_t> hist;
      std::vector<T> th;
      std::vector<int32_t> cell(static_cast<size_t>(m));
      for (int64_t i = i0; i < i1; ++i) {
        T* row = gram + i * m;
        const bool nan = rows.distances(i, row, row);  // in place: the row's distances, then its gradient
        const MaskRole role = rows.begin(i, row);
        const int64_t n_pos = rows.n_pos(), distance = g.distance;
        const int32_t key = rows.keys_x[i];
        const T* ps = rows.ps.data();
        const T mg = T(margin);
        // The thresholds margin + ps[t] (first_active's), +inf past n_pos as ps.
        th.resize(rows.ps.size());
        for (size_t t = 0; t < th.size(); ++t) th[t] = mg + ps[t];
        const bool table = rows.table(th.data(), nan);
        if (table) rows.cells.cells_of(row, m, cell.data());
        const bool short_row = short_active(ps, n_pos);
        const auto first = [&](int64_t k, T v) {
          if (table) return rows.cells.count_in(cell[size_t(k)], th.data(), [v](T x) { return !(v < x); });
          return first_active_row(ps, n_pos, mg, v, short_row);
        };
        suffix.resize(size_t(n_pos + 1));
        hist.resize(size_t(4 * (n_pos + 1)));
        int64_t count = 0;
        batch_all_row_grad(row, m, role, ps, rows.pi.data(), n_pos, mg, first, suffix.data(), hist.data(), l + i,
                           c + i * kCounts, [&](int64_t k, T coef) {
                             row[k] = gram_grad(coef, row[k], key == rows.keys_y[k], int(distance));
                             count += row[k] != T(0);
                           });
        const int64_t excl = rows.self[i];
        if (excl >= 0 && excl < m) row[excl] = T(0);
        nz[i] = count;
        rows.clear(i);
      }
    });
  });
}

void symmetrize(Tensor& w) {
  TL_DISPATCH_FLOATING(w.scalar_type(), "symmetrize_",
                       [&] { symmetrize_tiles(w.mutable_data_ptr<scalar_t>(), w.size(0)); });
}

// Counting sort: order[0, n) of the items by key[e] in [0, k) (stable: ascending e within a key), offsets[0, k].
template <typename Key>
void group(int64_t n, int64_t k, const Key& key, std::vector<int64_t>& order, std::vector<int64_t>& offsets) {
  offsets.assign(size_t(k + 1), 0);
  for (int64_t e = 0; e < n; ++e) ++offsets[size_t(key(e) + 1)];
  for (int64_t c = 0; c < k; ++c) offsets[size_t(c + 1)] += offsets[size_t(c)];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  order.resize(size_t(n));
  for (int64_t e = 0; e < n; ++e) order[size_t(next[size_t(key(e))]++)] = e;
}

template <typename T>
void mined_rows_backward(const T* c, const int64_t* pr, const T* px, const T* py, bool refs, int64_t n, int64_t m,
                         int64_t d, bool dot, const std::vector<int64_t>& by_anchor,
                         const std::vector<int64_t>& anchor_offsets, const std::vector<int64_t>& by_column,
                         const std::vector<int64_t>& column_offsets, T* gx, T* gy) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 12) / std::max<int64_t>(d, 1));
  // dL/dx_i = sum_j w_ij y_j - [not dot] (sum_j w_ij) x_i over the anchor's entries (mining_math.h gram_grad).
  parallel_clones(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* out = gx + i * d;
      for (int64_t k = 0; k < d; ++k) out[k] = T(0);
      T sum = 0;
      for (int64_t e = anchor_offsets[size_t(i)]; e < anchor_offsets[size_t(i + 1)]; ++e) {
        const int64_t q = by_anchor[size_t(e)];
        const T w = c[q];
        const T* yj = py + pr[2 * q + 1] * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] += w * yj[k];
        sum += w;
      }
      if (!dot) {
        const T* xi = px + i * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] -= sum * xi[k];
      }
    }
  });
  // dL/dy_j = sum_i w_ij x_i - [not dot] (sum_i w_ij) y_j over the column's entries, added to the anchors' part when
  // the references are the anchors themselves (gy == gx).
  parallel_clones(0, m, grain, [&](int64_t j0, int64_t j1) {
    std::vector<T> acc(static_cast<size_t>(d));
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), T(0));
      T* a = acc.data();
      T sum = 0;
      for (int64_t e = column_offsets[size_t(j)]; e < column_offsets[size_t(j + 1)]; ++e) {
        const int64_t q = by_column[size_t(e)];
        const T w = c[q];
        const T* xa = px + pr[2 * q] * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) a[k] += w * xa[k];
        sum += w;
      }
      T* out = gy + j * d;
      const T* yj = py + j * d;
      const T s = dot ? T(0) : sum;
      if (refs) {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] = a[k] - s * yj[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] += a[k] - s * yj[k];
      }
    }
  });
}

void mined_gram_backward(const Tensor& coef, const Tensor& pairs, const Tensor& x, const Tensor* y, int64_t distance,
                         Tensor& grad_x, Tensor& grad_y) {
  const int64_t n = x.size(0), d = x.size(1), count = pairs.size(0);
  const int64_t m = y ? y->size(0) : n;
  const int64_t* pr = pairs.const_data_ptr<int64_t>();
  // The entries grouped by row and by column, each group in entry order: the sums below run in a fixed order.
  std::vector<int64_t> by_anchor, anchor_offsets, by_column, column_offsets;
  group(count, n, [&](int64_t q) { return pr[2 * q]; }, by_anchor, anchor_offsets);
  group(count, m, [&](int64_t q) { return pr[2 * q + 1]; }, by_column, column_offsets);
  TL_DISPATCH_FLOATING(x.scalar_type(), "mined_gram_backward", [&] {
    using T = scalar_t;
    const T* px = x.const_data_ptr<T>();
    T* gx = grad_x.mutable_data_ptr<T>();
    mined_rows_backward<T>(coef.const_data_ptr<T>(), pr, px, y ? y->const_data_ptr<T>() : px, y != nullptr, n, m, d,
                           distance == kDot, by_anchor, anchor_offsets, by_column, column_offsets, gx,
                           y ? grad_y.mutable_data_ptr<T>() : gx);
  });
}

}  // namespace mining
}  // namespace tripletloss
