// A state that is the last rows of per-token inputs: a key/value cache (softmax, block_softmax,
// aft_full). Every form from such a state is the mechanism's stateless form over the
// concatenation [cache rows; the call's rows] (an input the cache does not hold, such as q, gets
// zero rows there), the outputs of the cache rows dropped; the final state is the last keep(n)
// rows of the concatenation (n = L + T). The backward is the stateless backward over the
// concatenation with dy = 0 on the cache rows: the final state's gradient joins the rows it
// copies, and the cache rows' gradient is the initial state's. The mechanism keeps one
// reference, one parallel form and one backward; the state costs a concatenation (only when a
// state is given) and the final rows' copy (only when the final state is wanted).
#pragma once
#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "linmix/mixer.h"

namespace linmix {

// Rows [r0, r1) of every batch of x (B, n, row).
template <class V>
V slice_rows(const V& x, int64_t B, int64_t n, int64_t r0, int64_t r1) {
  const int64_t row = B > 0 && n > 0 ? int64_t(x.size()) / (B * n) : 0;
  V out(size_t(B * (r1 - r0) * row));
  for (int64_t b = 0; b < B; ++b)
    std::copy(x.begin() + (b * n + r0) * row, x.begin() + (b * n + r1) * row, out.begin() + b * (r1 - r0) * row);
  return out;
}

// The concatenation along time of a (B, La, row; null: zeros) and b (B, Lb, row).
template <class V>
V cat_rows(const V* a, int64_t La, const V& b, int64_t Lb, int64_t B, int64_t row) {
  V out(size_t(B * (La + Lb) * row));
  for (int64_t i = 0; i < B; ++i) {
    if (a) std::copy(a->begin() + i * La * row, a->begin() + (i + 1) * La * row, out.begin() + i * (La + Lb) * row);
    std::copy(b.begin() + i * Lb * row, b.begin() + (i + 1) * Lb * row, out.begin() + (i * (La + Lb) + La) * row);
  }
  return out;
}

// x (B, n, row) rows [r0, r0 + m) += src (B, m, row).
template <class V, class W>
void add_rows(V& x, const W& src, int64_t B, int64_t n, int64_t r0, int64_t m) {
  const int64_t row = B > 0 && m > 0 ? int64_t(src.size()) / (B * m) : 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < m * row; ++i) x[size_t((b * n + r0) * row + i)] += src[size_t(b * m * row + i)];
}

// The same on tensors (B, rows, ...): `before`'s L rows (null: zeros) then t's; rows [r0, r1) of t.
inline Tensor join_rows(const Tensor* before, int64_t L, const Tensor& t) {
  const int64_t B = t.shape[0], T = t.shape[1];
  Tensor out;
  out.shape = t.shape;
  out.shape[1] = L + T;
  out.data = cat_rows(before ? &before->data : nullptr, L, t.data, T, B, B > 0 && T > 0 ? t.numel() / (B * T) : 0);
  return out;
}
inline Tensor rows_of(const Tensor& t, int64_t r0, int64_t r1) {
  Tensor out;
  out.shape = t.shape;
  out.shape[1] = r1 - r0;
  out.data = slice_rows(t.data, t.shape[0], t.shape[1], r0, r1);
  return out;
}

struct RowCache {
  std::vector<std::pair<std::string, std::string>> rows;  // state tensor (spec.state order) -> the input it caches
  std::function<int64_t(const Call&, int64_t n)> keep;     // rows of the final cache after n rows
};

// Installs on s, after its stateless forms (set_reference, parallel, backward): state_all_modes,
// final_dims ("L" of the final state), and the forms' wrappers described above.
void set_row_cache(MixerSpec& s, RowCache rc);

}  // namespace linmix
