// The key/value-cache state of softmax, block_softmax and aft_full in every form (row_cache.h).
#include "row_cache.h"

#include <algorithm>

#include "common.h"

namespace linmix {

namespace {

bool per_token(const std::string& dims) { return dims.rfind("B,T,", 0) == 0 || dims == "B,T"; }

// One call's plan: L cache rows (0 without a state) before its T rows, n = L + T, the final
// cache's keep rows, and the dims of the stateless call over the concatenation.
struct Plan {
  int64_t B = 0, L = 0, T = 0, n = 0, keep = 0;
  bool state = false;
  std::map<std::string, int64_t> dims;
};

Plan plan_of(const RowCache& rc, const Call& c) {
  Plan p;
  p.B = c.d("B"), p.T = c.d("T");
  p.state = c.has("state." + rc.rows.front().first);
  p.L = p.state ? c.d("L") : 0;
  p.n = p.L + p.T;
  p.keep = c.causal ? rc.keep(c, p.n) : 0;
  p.dims = c.dims;
  p.dims["T"] = p.n;
  p.dims.erase("L");
  return p;
}

// the state tensor that caches input `name` ("" if none)
std::string cache_of(const RowCache& rc, const std::string& name) {
  for (const auto& [s, i] : rc.rows)
    if (i == name) return s;
  return "";
}

// The inputs of the stateless call over the concatenation (per-token inputs with the cache rows
// before theirs, zeros where the cache holds none; the rest as given).
TensorMap cat_inputs(const std::vector<TensorSpec>& inputs, const RowCache& rc, const Call& c, const Plan& p) {
  TensorMap cat;
  for (const auto& ts : inputs) {
    if (!c.has(ts.name)) continue;
    const Tensor& t = c.t(ts.name);
    if (!per_token(ts.dims)) {
      cat[ts.name] = t;
      continue;
    }
    const std::string s = cache_of(rc, ts.name);
    const Tensor* st = s.empty() ? nullptr : &c.t("state." + s);
    std::vector<int64_t> shape = t.shape;
    shape[1] = p.n;
    Tensor x;
    x.shape = shape;
    x.data = cat_rows(st ? &st->data : nullptr, p.L, t.data, p.T, p.B, t.numel() / (p.B * p.T));
    cat[ts.name] = std::move(x);
  }
  return cat;
}

// The final cache: the last keep rows of each cached input's concatenation.
void add_final_state(const RowCache& rc, const TensorMap& cat, const Plan& p, TensorMap& out) {
  for (const auto& [s, i] : rc.rows) {
    const Tensor& x = cat.at(i);
    Tensor f;
    f.shape = x.shape;
    f.shape[1] = p.keep;
    f.data = slice_rows(x.data, p.B, p.n, p.n - p.keep, p.n);
    out["state." + s] = std::move(f);
  }
}

Tensor slice_tensor(const Tensor& x, const Plan& p, int64_t r0, int64_t r1) {
  Tensor out;
  out.shape = x.shape;
  out.shape[1] = r1 - r0;
  out.data = slice_rows(x.data, p.B, x.shape[1], r0, r1);
  return out;
}

using Forward = std::function<TensorMap(const Call&)>;
using Backward = std::function<TensorMap(const Call&, const Tensor&)>;
using Ref64 = std::function<std::map<std::string, std::vector<double>>(
    const Call&, const std::map<std::string, std::vector<double>>&, const std::vector<double>&)>;

Forward wrap_forward(const MixerSpec& spec, const RowCache& rc, Forward inner) {
  const std::vector<TensorSpec> inputs = spec.inputs;
  return [inputs, rc, inner](const Call& c) {
    if (!c.causal) return inner(c);
    const Plan p = plan_of(rc, c);
    if (!p.state) {  // no cache before: the call as it is
      TensorMap out = inner(c);
      if (c.final_state) {
        TensorMap own;
        for (const auto& [s, i] : rc.rows) own[i] = c.t(i);
        add_final_state(rc, own, p, out);
      }
      return out;
    }
    const TensorMap cat = cat_inputs(inputs, rc, c, p);
    Call ic{cat, p.dims, c.params, c.given, true, false};
    // the values left to the kernel: its concatenation's rows (the cache's, checked before, and the call's)
    ic.unchecked = c.unchecked, ic.unchecked_bad = c.unchecked_bad;
    TensorMap res = inner(ic);
    TensorMap out = moved_map("y", slice_tensor(res.at("y"), p, p.L, p.n));
    if (c.final_state) add_final_state(rc, cat, p, out);
    return out;
  };
}

Backward wrap_backward(const MixerSpec& spec, const RowCache& rc, Backward inner) {
  const std::vector<TensorSpec> inputs = spec.inputs;
  return [inputs, rc, inner](const Call& c, const Tensor& dy) {
    if (!c.causal) return inner(c, dy);
    const Plan p = plan_of(rc, c);
    TensorMap cat;
    if (p.state) cat = cat_inputs(inputs, rc, c, p);
    const Call ic{p.state ? cat : c.in, p.dims, c.params, c.given, true, false};
    Tensor dyc;
    dyc.shape = dy.shape;
    dyc.shape[1] = p.n;
    dyc.data = cat_rows<Storage>(nullptr, p.L, dy.data, p.T, p.B, dy.numel() / (p.B * p.T));
    TensorMap g = inner(ic, p.state ? dyc : dy);
    TensorMap out = moved_map("y", slice_tensor(g.at("y"), p, p.L, p.n));
    for (const auto& ts : inputs) {
      if (!c.has(ts.name)) continue;
      Tensor& d = g.at("d" + ts.name);
      if (!per_token(ts.dims)) {
        out["d" + ts.name] = std::move(d);
        continue;
      }
      const std::string s = cache_of(rc, ts.name);
      if (!s.empty() && c.has("dfinal." + s)) add_rows(d.data, c.t("dfinal." + s).data, p.B, p.n, p.n - p.keep, p.keep);
      if (!s.empty() && p.state) out["dstate." + s] = slice_tensor(d, p, 0, p.L);
      out["d" + ts.name] = p.state ? slice_tensor(d, p, p.L, p.n) : std::move(d);
    }
    if (c.final_state) {
      TensorMap own;
      for (const auto& [s, i] : rc.rows) own[i] = p.state ? cat.at(i) : c.t(i);
      add_final_state(rc, own, p, out);
    }
    return out;
  };
}

// The float64 reference on values (reference64_grad): the same concatenation of x, dout's dy
// padded, and the final state's gradient (dout after dy, in spec.state order) added to its rows.
Ref64 wrap_ref64(const MixerSpec& spec, const RowCache& rc, Ref64 inner) {
  const std::vector<TensorSpec> inputs = spec.inputs, state = spec.state;
  const std::string y_dims = spec.y_dims;
  return [inputs, state, y_dims, rc, inner](const Call& c, const std::map<std::string, std::vector<double>>& x,
                                            const std::vector<double>& dout) {
    if (!c.causal) return inner(c, x, dout);
    const Plan p = plan_of(rc, c);
    std::map<std::string, std::vector<double>> xc;
    std::map<std::string, int64_t> rows;  // per-token inputs: values per row
    for (const auto& ts : inputs) {
      if (!x.count(ts.name)) continue;
      const std::vector<double>& v = x.at(ts.name);
      if (!per_token(ts.dims)) {
        xc[ts.name] = v;
        continue;
      }
      rows[ts.name] = int64_t(v.size()) / (p.B * p.T);
      const std::string s = cache_of(rc, ts.name);
      const std::vector<double>* st = !s.empty() && p.state ? &x.at("state." + s) : nullptr;
      xc[ts.name] = cat_rows(st, p.L, v, p.T, p.B, rows[ts.name]);
    }
    static const TensorMap kNone;
    const Call ic{kNone, p.dims, c.params, c.given, true, false};
    const int64_t ny = numel_of(dims_shape(y_dims, c));
    std::vector<double> dc;
    if (!dout.empty()) {
      const std::vector<double> dy(dout.begin(), dout.begin() + ny);
      dc = cat_rows<std::vector<double>>(nullptr, p.L, dy, p.T, p.B, ny / (p.B * p.T));
    }
    auto res = inner(ic, xc, dc);
    std::map<std::string, std::vector<double>> out;
    out["y"] = slice_rows(res.at("y"), p.B, p.n, p.L, p.n);
    for (const auto& [s, i] : rc.rows) out["state." + s] = slice_rows(xc.at(i), p.B, p.n, p.n - p.keep, p.n);
    if (dout.empty()) return out;
    // the final states' gradients follow dy in dout, in spec.state order
    std::map<std::string, std::vector<double>> dfinal;
    size_t at = size_t(ny);
    for (const auto& ts : state) {
      const std::string i = [&] {
        for (const auto& [s, inp] : rc.rows)
          if (s == ts.name) return inp;
        return std::string();
      }();
      const size_t m = size_t(p.B * p.keep * (i.empty() ? 0 : rows.at(i)));
      if (dout.size() >= at + m) dfinal[ts.name].assign(dout.begin() + int64_t(at), dout.begin() + int64_t(at + m));
      at += m;
    }
    for (const auto& [n, v] : x) {
      if (n.rfind("state.", 0) == 0) continue;  // from its input's rows below
      std::vector<double> d = res.at("d" + n);
      if (!rows.count(n)) {
        out["d" + n] = std::move(d);
        continue;
      }
      const std::string s = cache_of(rc, n);
      if (!s.empty() && dfinal.count(s)) add_rows(d, dfinal.at(s), p.B, p.n, p.n - p.keep, p.keep);
      if (!s.empty() && p.state) out["dstate." + s] = slice_rows(d, p.B, p.n, 0, p.L);
      out["d" + n] = slice_rows(d, p.B, p.n, p.L, p.n);
    }
    return out;
  };
}

}  // namespace

void set_row_cache(MixerSpec& s, RowCache rc) {
  s.state_all_modes = true;
  s.final_dims = [rc](const Call& c) {
    const int64_t L = c.has("state." + rc.rows.front().first) ? c.d("L") : 0;
    return std::map<std::string, int64_t>{{"L", rc.keep(c, L + c.d("T"))}};
  };
  s.reference = wrap_forward(s, rc, s.reference);
  s.parallel = wrap_forward(s, rc, s.parallel);
  s.reference_grad = wrap_backward(s, rc, s.reference_grad);
  s.backward = wrap_backward(s, rc, s.backward);
  s.reference64_grad = wrap_ref64(s, rc, s.reference64_grad);
}

}  // namespace linmix
