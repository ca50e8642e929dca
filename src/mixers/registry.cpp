// The mixer registry and the validation every call goes through before a kernel runs.
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common.h"

namespace linmix {

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Reference: return "reference";
    case Mode::Parallel: return "parallel";
    case Mode::Recurrent: return "recurrent";
  }
  return "?";
}

Mode parse_mode(const std::string& s) {
  if (s == "reference") return Mode::Reference;
  if (s == "parallel") return Mode::Parallel;
  if (s == "recurrent") return Mode::Recurrent;
  throw Error("unknown mode '" + s + "' (expected reference, parallel or recurrent)");
}

const Tensor& Call::t(const std::string& name) const {
  auto it = in.find(name);
  LINMIX_CHECK(it != in.end(), "missing input tensor '" + name + "'");
  return it->second;
}

// Registration: each mechanism's file defines its spec function; the registry lists them in
// this order (the order of `linmix mixers`, the tests and the benchmarks).
MixerSpec softmax_spec();
MixerSpec linear_spec();
MixerSpec aft_full_spec();
MixerSpec aft_local_spec();
MixerSpec aft_simple_spec();
MixerSpec aft_conv_spec();
MixerSpec rwkv4_spec();
MixerSpec performer_spec();
MixerSpec flow_spec();
MixerSpec flash_spec();
MixerSpec norm_linear_spec();
MixerSpec block_softmax_spec();
MixerSpec s4d_spec();
MixerSpec mamba_spec();
MixerSpec fnet_spec();
MixerSpec retention_spec();
MixerSpec gla_spec();
MixerSpec deltanet_spec();
MixerSpec gated_deltanet_spec();
MixerSpec rwkv5_spec();
MixerSpec rwkv6_spec();
MixerSpec rwkv7_spec();
MixerSpec mamba2_spec();

const std::vector<MixerSpec>& mixers() {
  static const std::vector<MixerSpec> all = {
      softmax_spec(),   linear_spec(),      aft_full_spec(),      aft_local_spec(), aft_simple_spec(),
      aft_conv_spec(),  rwkv4_spec(),       performer_spec(),     flow_spec(),      flash_spec(),
      norm_linear_spec(), block_softmax_spec(), s4d_spec(),       mamba_spec(),     fnet_spec(),
      retention_spec(), gla_spec(),       deltanet_spec(),      gated_deltanet_spec(), rwkv5_spec(),
      rwkv6_spec(),     rwkv7_spec(),       mamba2_spec(),
  };
  return all;
}

const MixerSpec& find_mixer(const std::string& name) {
  std::string known;
  for (const auto& m : mixers()) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw Error("unknown mixer '" + name + "' (known: " + known + ")");
}

namespace {

std::vector<std::string> split_dims(const std::string& dims) {
  std::vector<std::string> out;
  std::stringstream ss(dims);
  std::string d;
  while (std::getline(ss, d, ',')) out.push_back(d);
  return out;
}

// A symbolic dim's literal size ("1": flow's pos) or, for a letter, nullopt.
std::optional<int64_t> literal_dim(const std::string& d) {
  if (d.empty() || !std::isdigit(static_cast<unsigned char>(d[0]))) return std::nullopt;
  return std::atoll(d.c_str());
}
// The shape of symbolic dims under bound dims (literal sizes as written).
std::vector<int64_t> shape_of_dims(const std::string& dims, const std::map<std::string, int64_t>& bound) {
  std::vector<int64_t> shape;
  for (const auto& d : split_dims(dims)) {
    shape.push_back(literal_dim(d).value_or(bound.count(d) ? bound.at(d) : -1));
    LINMIX_CHECK(shape.back() >= 0, "dim '" + d + "' of [" + dims + "] is not bound");
  }
  return shape;
}

// Binds the symbolic dims of `spec` against `t`, or throws naming the tensor.
void bind_dims(const std::string& name, const std::string& dims_text, const Tensor& t,
               std::map<std::string, int64_t>& dims) {
  const auto dims_v = split_dims(dims_text);
  auto expected = [&] {
    std::string s = "[" + dims_text + "]";
    std::vector<int64_t> known;
    bool all = true;
    for (const auto& d : dims_v) {
      if (dims.count(d)) known.push_back(dims.at(d));
      else all = false;
    }
    if (all) s += " = " + shape_str(known);
    return s;
  };
  LINMIX_CHECK(static_cast<int64_t>(dims_v.size()) == t.rank(),
               "tensor '" + name + "': expected rank " + std::to_string(dims_v.size()) + " " + expected() +
                   ", found rank " + std::to_string(t.rank()) + " " + shape_str(t.shape));
  for (size_t i = 0; i < dims_v.size(); ++i) {
    const std::string& d = dims_v[i];
    const std::optional<int64_t> lit = literal_dim(d);
    const bool literal = lit.has_value();
    const int64_t want = lit.value_or(dims.count(d) ? dims.at(d) : -1);
    if (want >= 0 && want != t.shape[i]) {
      throw Error("tensor '" + name + "': expected shape " + expected() + ", found " + shape_str(t.shape) +
                  " (dim " + std::to_string(i) + " '" + d + "' should be " + std::to_string(want) + ")");
    }
    LINMIX_CHECK(t.shape[i] >= 1 || d == "L",
                 "tensor '" + name + "': dim " + std::to_string(i) + " '" + d + "' is 0; it must be at least 1");
    if (!literal) dims[d] = t.shape[i];
  }
}

double parse_number(const std::string& key, const std::string& value) {
  LINMIX_CHECK(!value.empty(), "param '" + key + "': empty value");
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(value.c_str(), &end);
  LINMIX_CHECK(end && *end == '\0' && errno != ERANGE && std::isfinite(v),
               "param '" + key + "': malformed value '" + value + "' (expected a finite number)");
  return v;
}

}  // namespace

std::vector<int64_t> final_state_shape(const std::function<std::map<std::string, int64_t>(const Call&)>& final_dims,
                                       const Call& c, const std::string& dims) {
  if (!final_dims) return shape_of_dims(dims, c.dims);
  std::map<std::string, int64_t> d = c.dims;
  for (const auto& [n, v] : final_dims(c)) d[n] = v;
  return shape_of_dims(dims, d);
}

std::vector<int64_t> final_state_shape(const MixerSpec& spec, const Call& c, const TensorSpec& ts) {
  return final_state_shape(spec.final_dims, c, ts.dims);
}

std::vector<int64_t> dims_shape(const std::string& dims, const Call& c) {
  return shape_of_dims(dims, c.dims);
}

namespace {

// Every check a call goes through before a kernel runs; returns the bound call.
// A log decay's values: finite (named at the element) and <= 0. One vectorised pass for both
// checks (a count of positives: std::max's reduction stayed scalar, 3 ms for 2M values), threads
// sharing a long one; the offending value searched only if there is one.
void check_log_decay(const std::string& n, const Tensor& t) {
  const float* p = t.data.data();
  const int64_t m = t.numel();
  // on the bits (integer OR reductions vectorise): the sign bit clear and the value not +0 is
  // positive (NaN included, caught first by the finite check); an exponent of all ones is inf / NaN
  uint32_t positive = 0, nonfinite = 0;
#pragma omp parallel for simd reduction(| : positive, nonfinite) schedule(static) if (m >= (int64_t(1) << 18))
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t b = std::bit_cast<uint32_t>(p[i]);
    positive |= uint32_t((b >> 31) == 0u && b != 0u), nonfinite |= nonfinite_bits(p[i]);
  }
  if (nonfinite != 0) check_finite(n, t);  // it names the element
  if (positive == 0) return;
  for (float x : t.data)
    LINMIX_CHECK(x <= 0.0f, "tensor '" + n + "': log decays must be <= 0 (decay exp(" + n + ") in (0, 1]), found " +
                                std::to_string(x));
}

bool is_log_decay(const MixerSpec& spec, const std::string& n) {
  return std::find(spec.log_decays.begin(), spec.log_decays.end(), n) != spec.log_decays.end();
}

// Every check a call goes through before a kernel runs; returns the bound call. With defer (run_mixer,
// whose caller checks Call::unchecked after the kernel), a kernel_checks_values mechanism's
// per-token (B,T,H,...) inputs are left to its causal parallel forward.
Call validate(const MixerSpec& spec, Mode mode, bool causal, const std::map<std::string, std::string>& raw_params,
              const TensorMap& in, bool grad, bool check_values = true, bool defer = false) {
  const std::string& name = spec.name;
  if (grad && mode == Mode::Recurrent)
    throw Error("--grad differentiates the parallel or reference form; use --mode parallel or reference");
  if (causal && !spec.causal_ok) throw Error("mixer '" + name + "' has no causal form; drop --causal");
  if (!causal && !spec.noncausal_ok) throw Error("mixer '" + name + "' is causal only; pass --causal");
  if (mode == Mode::Recurrent && !causal) throw Error("the recurrent form is defined only with --causal");

  Call call{in, {}, {}, {}, causal};
  for (const auto& p : spec.params) {
    call.params[p.name] = p.def;
    call.given[p.name] = false;
  }
  for (const auto& [key_, value] : raw_params) {
    const std::string& key = key_;  // (a structured binding cannot be captured before C++20's clang 16)
    auto it = std::find_if(spec.params.begin(), spec.params.end(), [&](const ParamSpec& p) { return p.name == key; });
    if (it == spec.params.end()) {
      std::string known;
      for (const auto& p : spec.params) known += (known.empty() ? "" : ", ") + p.name;
      throw Error("unknown param '" + key + "' for mixer '" + name + "' (known: " + (known.empty() ? "none" : known) + ")");
    }
    const double v = parse_number(key, value);
    LINMIX_CHECK(!it->integer || v == std::floor(v), "param '" + key + "': expected an integer, found '" + value + "'");
    LINMIX_CHECK(v >= it->min, "param '" + key + "': must be >= " + std::to_string(it->min) + ", found " + value);
    call.params[key] = v;
    call.given[key] = true;
  }

  std::set<std::string> allowed;
  for (const auto& ts : spec.inputs) {
    allowed.insert(ts.name);
    auto it = in.find(ts.name);
    if (it == in.end()) {
      LINMIX_CHECK(ts.optional, "missing input tensor '" + ts.name + "' (expected [" + ts.dims + "])");
      continue;
    }
    bind_dims(ts.name, ts.dims, it->second, call.dims);
  }
  // State tensors: only in recurrent mode, and all or none of them.
  int n_state = 0;
  for (const auto& ts : spec.state) {
    const std::string sn = "state." + ts.name;
    allowed.insert(sn);
    if (in.count(sn)) ++n_state;
  }
  if (n_state > 0) {
    LINMIX_CHECK(mode == Mode::Recurrent || spec.state_all_modes,
                 "state tensors are accepted only with --mode recurrent (mixer '" + name + "')");
    LINMIX_CHECK(causal, "state tensors are accepted only by the causal form (--causal; mixer '" + name + "')");
    for (const auto& ts : spec.state) {
      const std::string sn = "state." + ts.name;
      LINMIX_CHECK(in.count(sn), "missing state tensor '" + sn + "' (state tensors must be given together)");
      bind_dims(sn, ts.dims, in.at(sn), call.dims);
    }
  }
  if (grad) {
    allowed.insert("dy");
    LINMIX_CHECK(in.count("dy"), "--grad needs the tensor 'dy' (the gradient of the loss with respect to y, shaped like y)");
    bind_dims("dy", spec.y_dims, in.at("dy"), call.dims);
    if (spec.state_all_modes && causal)  // optional: the gradient of the final state (fla's dht), shaped like it
      for (const auto& ts : spec.state) {
        const std::string dn = "dfinal." + ts.name;
        allowed.insert(dn);
        if (!in.count(dn)) continue;
        if (!spec.final_dims) {
          bind_dims(dn, ts.dims, in.at(dn), call.dims);
          continue;
        }
        const std::vector<int64_t> want = final_state_shape(spec, call, ts);  // a cache: its final length
        LINMIX_CHECK(in.at(dn).shape == want, "tensor '" + dn + "': expected shape " + shape_str(want) +
                                                  " (the final state's), found " + shape_str(in.at(dn).shape));
      }
  }
  const bool deferring = check_values && defer && spec.kernel_checks_values && causal && mode == Mode::Parallel && !grad;
  for (const auto& [tn, t] : in) {
    LINMIX_CHECK(allowed.count(tn), "unexpected tensor '" + tn + "' for mixer '" + name + "'" +
                                        (tn == "dy" ? " (dy is read only with --grad)" : ""));
    if (!check_values || spec.read_runs.count(tn)) continue;  // read_runs: after spec.check
    if (deferring) {  // an input laid out (B,T,H,...), (B,T,G,...) with G | H, or (B,T,C): the kernel's to check
      const std::string& input = tn;  // (clang 14 captures no structured binding)
      const auto it =
          std::find_if(spec.inputs.begin(), spec.inputs.end(), [&](const TensorSpec& s) { return s.name == input; });
      const bool groups = it != spec.inputs.end() && it->dims.rfind("B,T,G,", 0) == 0 && call.dims.count("G") &&
                          call.dims.count("H") && call.dims.at("G") > 0 && call.dims.at("H") % call.dims.at("G") == 0;
      if (it != spec.inputs.end() && (it->dims == "B,T,H" || it->dims.rfind("B,T,H,", 0) == 0 || it->dims == "B,T,C" ||
                                      groups || (spec.kernel_checks_all_rows && it->dims.rfind("B,T,", 0) == 0))) {
        call.unchecked.push_back({tn, is_log_decay(spec, tn)});
        continue;
      }
    }
    if (is_log_decay(spec, tn)) check_log_decay(tn, t);
    else check_finite(tn, t);
  }
  if (!call.unchecked.empty()) call.unchecked_bad = std::make_shared<std::atomic<uint32_t>>(0u);
  if (spec.check) spec.check(call);
  if (check_values)
    for (const auto& [tn, runs] : spec.read_runs) {
      if (!in.count(tn)) continue;
      LINMIX_CHECK(!is_log_decay(spec, tn), "mixer '" + name + "': a log decay read in part is not supported");
      for (const auto& [off, n] : runs(call)) check_finite(tn, in.at(tn), off, n);
    }
  return call;
}

}  // namespace

std::map<std::string, std::vector<double>> reference_f64_all(const std::string& name, bool causal,
                                                             const std::map<std::string, std::string>& raw_params,
                                                             const TensorMap& in,
                                                             const std::map<std::string, std::vector<double>>& x64,
                                                             const std::map<std::string, std::vector<double>>* dout) {
  const MixerSpec& spec = find_mixer(name);
  LINMIX_CHECK(spec.reference64_grad, "mixer '" + name + "' has no float64 reference");
  const Call call = validate(spec, Mode::Reference, causal, raw_params, in, false);
  for (const auto& [n, t] : in)
    LINMIX_CHECK(x64.count(n) && static_cast<int64_t>(x64.at(n).size()) == t.numel(),
                 "reference_f64_all: no float64 values for '" + n + "' of its size");
  std::vector<double> d;
  if (dout) {
    auto add = [&](const std::string& n, const std::vector<int64_t>& shape) {
      const int64_t m = numel_of(shape);
      auto it = dout->find(n);
      LINMIX_CHECK(it == dout->end() || static_cast<int64_t>(it->second.size()) == m,
                   "reference_f64_all: '" + n + "' should have " + std::to_string(m) + " values");
      if (it == dout->end()) d.insert(d.end(), size_t(m), 0.0);
      else d.insert(d.end(), it->second.begin(), it->second.end());
    };
    add("dy", dims_shape(spec.y_dims, call));
    if (spec.state_all_modes && causal)
      for (const auto& ts : spec.state) add("dfinal." + ts.name, final_state_shape(spec, call, ts));
  }
  return spec.reference64_grad(call, x64, d);
}

Call validate_call(const std::string& name, Mode mode, bool causal,
                   const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad) {
  return validate(find_mixer(name), mode, causal, raw_params, in, grad);
}

TensorMap run_mixer(const std::string& name, Mode mode, bool causal,
                    const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad,
                    bool final_state, bool check_values, std::shared_ptr<RunSaved>* keep, const RunSaved* reuse) {
  const MixerSpec& spec = find_mixer(name);
  Call call = validate(spec, mode, causal, raw_params, in, grad, check_values, true);
  call.final_state = final_state;
  if (mode == Mode::Parallel) call.keep = grad ? nullptr : keep, call.reuse = grad ? reuse : nullptr;
  if (grad) {
    const Tensor& dy = in.at("dy");
    if (mode == Mode::Reference) return spec.reference_grad(call, dy);
    LINMIX_CHECK(spec.backward, "mixer '" + name + "' has no backward for its parallel form yet (use --mode reference)");
    TensorMap out = spec.backward(call, dy);
    if (call.reuse) out.erase("y");  // the kept forward gave it (a form may not keep its rows)
    return out;
  }

  switch (mode) {
    case Mode::Reference: return spec.reference(call);
    case Mode::Parallel: {
      TensorMap out = spec.parallel(call);
      if (call.unchecked_bad && call.unchecked_bad->load() != 0)  // the kernel met a bad value: which, as validation says it
        for (const Call::Unchecked& u : call.unchecked)
          u.log_decay ? check_log_decay(u.name, in.at(u.name)) : check_finite(u.name, in.at(u.name));
      return out;
    }
    case Mode::Recurrent:
      LINMIX_CHECK(spec.stepper, "mixer '" + name + "' has no recurrent form");
      return recurrent_by_steps(spec, call);
  }
  throw Error("unreachable mode");
}

namespace {
bool per_token(const std::string& dims) { return dims.rfind("B,T,", 0) == 0 || dims == "B,T"; }
bool per_batch(const std::string& dims) { return dims.rfind("B,", 0) == 0 || dims == "B"; }
}  // namespace

TensorMap recurrent_by_steps(const MixerSpec& spec, const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T");
  // one sequence's tensors: per-token inputs as (1, 1, ...) rows overwritten at every step, the
  // rest (weights) as given; per-batch ones (B, ...) sliced
  TensorMap one;
  auto row_of = [](const Tensor& t, int64_t n) { return t.numel() / n; };
  for (const auto& ts : spec.inputs) {
    if (!c.has(ts.name)) continue;
    const Tensor& t = c.t(ts.name);
    if (per_token(ts.dims)) {
      std::vector<int64_t> shape = t.shape;
      shape[0] = shape[1] = 1;
      one[ts.name] = Tensor(shape);
    } else {
      LINMIX_CHECK(!per_batch(ts.dims), "recurrent_by_steps: per-batch input '" + ts.name + "' is not supported");
      one[ts.name] = t;
    }
  }
  auto dims1 = c.dims;
  dims1["B"] = 1, dims1["T"] = 1;
  const Call c1{one, dims1, c.params, c.given, true};
  std::vector<std::pair<const Tensor*, Tensor*>> rows;  // per-token inputs: source, one-token buffer
  for (const auto& ts : spec.inputs)
    if (c.has(ts.name) && per_token(ts.dims)) rows.emplace_back(&c.t(ts.name), &one.at(ts.name));
  Tensor y(dims_shape(spec.y_dims, c));
  const int64_t ny = row_of(y, B * T);
  const bool has_state = !spec.state.empty() && c.has("state." + spec.state.front().name);
  std::vector<TensorMap> finals(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    Stepper st = spec.stepper(c1);
    if (has_state) {
      TensorMap s1;
      for (const auto& ts : spec.state) {
        const Tensor& t = c.t("state." + ts.name);
        if (!per_batch(ts.dims)) {
          s1["state." + ts.name] = t;
          continue;
        }
        std::vector<int64_t> shape = t.shape;
        shape[0] = 1;
        Tensor part(shape);
        const int64_t n = row_of(t, B);
        std::copy(t.ptr() + b * n, t.ptr() + (b + 1) * n, part.ptr());
        s1["state." + ts.name] = std::move(part);
      }
      st.load(s1);
    }
    for (int64_t t = 0; t < T; ++t) {
      for (const auto& [src, dst] : rows) {
        const int64_t n = dst->numel();
        std::copy(src->ptr() + (b * T + t) * n, src->ptr() + (b * T + t + 1) * n, dst->ptr());
      }
      st.step(y.ptr() + (b * T + t) * ny);
    }
    finals[size_t(b)] = st.save();
  }
  TensorMap out = moved_map("y", std::move(y));
  for (const auto& ts : spec.state) {  // stacked over the batch (all sequences have the same length)
    const std::string n = "state." + ts.name;
    const Tensor& first = finals[0].at(n);
    if (!per_batch(ts.dims)) {
      out[n] = first;
      continue;
    }
    std::vector<int64_t> shape = first.shape;
    shape[0] = B;
    Tensor all(shape);
    for (int64_t b = 0; b < B; ++b) {
      const Tensor& part = finals[size_t(b)].at(n);
      LINMIX_CHECK(part.numel() == first.numel(), "recurrent_by_steps: state '" + n + "' differs in size across the batch");
      std::copy(part.data.begin(), part.data.end(), all.ptr() + b * first.numel());
    }
    out[n] = std::move(all);
  }
  return out;
}

TensorMap example_inputs(const MixerSpec& spec, const std::map<std::string, int64_t>& dims, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  TensorMap in;
  for (const auto& ts : spec.inputs) {
    std::vector<int64_t> shape;
    for (const auto& d : split_dims(ts.dims)) {
      LINMIX_CHECK(dims.count(d), "example_inputs: no size given for dim '" + d + "'");
      shape.push_back(dims.at(d));
    }
    Tensor t(shape);
    for (auto& x : t.data) x = normal(rng);
    in[ts.name] = std::move(t);
  }
  if (spec.example_fix) spec.example_fix(in);
  return in;
}

TensorMap example_state(const MixerSpec& spec, const std::map<std::string, int64_t>& dims, uint64_t seed) {
  TensorMap out;
  if (!spec.state_all_modes) return out;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const auto& ts : spec.state) {
    Tensor t(shape_of_dims(ts.dims, dims));
    for (auto& x : t.data) x = normal(rng);
    out["state." + ts.name] = std::move(t);
  }
  if (spec.state_fix) spec.state_fix(out);
  return out;
}

Scale parse_scale(const std::string& s) {
  if (s == "test") return Scale::Test;
  if (s == "grad") return Scale::Grad;
  if (s == "demo") return Scale::Demo;
  if (s == "bench") return Scale::Bench;
  throw Error("unknown scale '" + s + "' (expected test, grad, demo or bench)");
}

std::map<std::string, int64_t> example_dims(const MixerSpec& spec, Scale scale, int64_t T, bool causal) {
  std::map<std::string, int64_t> d;
  switch (scale) {  // multi-head sizes that cross nothing by accident: H, D, E all different
    case Scale::Test: d = {{"B", 2}, {"H", 3}, {"D", 5}, {"E", 4}, {"C", 6}}; break;
    case Scale::Grad: d = {{"B", 2}, {"H", 2}, {"D", 3}, {"E", 2}, {"C", 4}}; break;
    case Scale::Demo: d = {{"B", 2}, {"H", 4}, {"D", 16}, {"E", 16}, {"C", 64}}; break;
    case Scale::Bench: d = {{"B", 1}, {"H", 8}, {"D", 64}, {"E", 64}, {"C", 512}}; break;
  }
  d["T"] = T;
  d["L"] = 2;  // the rows of a key/value cache state (the window and block tests allow 2)
  if (spec.own_dims) spec.own_dims(d, scale, causal);
  return d;
}

std::map<std::string, int64_t> crossing_dims(const MixerSpec& spec, Scale scale, bool causal) {
  if (spec.blocking.empty()) return {};
  int64_t T = 9, bc = 0;
  for (const auto& [dim, b] : spec.blocking) {
    if (dim == "T") T = std::max(T, 2 * b + 3);
    if (dim == "C") bc = std::max(bc, b);
  }
  auto dims = example_dims(spec, scale, T, causal);
  if (bc) dims["C"] = dims.at("H") * (bc + 3);
  return dims;
}

void stress_inputs(const MixerSpec& spec, TensorMap& in, bool for_grad) {
  if (spec.stress) return spec.stress(in, for_grad);
  // Keys and position biases pushed to +-60 (an N(0,1) draw times 20, clipped): exponents of
  // e^120 differences that overflow or underflow float32 without a max shift.
  for (const char* name : {"k", "w", "u"})
    if (in.count(name))
      for (float& x : in[name].data) x = std::clamp(20.0f * x, -60.0f, 60.0f);
}

std::string mixers_json() {
  using json = nlohmann::json;
  json all = json::array();
  for (const auto& m : mixers()) {
    json j{{"name", m.name},       {"paper", m.paper},         {"summary", m.summary},
           {"causal", m.causal_ok}, {"noncausal", m.noncausal_ok}, {"y", m.y_dims},
           {"time", m.time},       {"memory", m.memory},       {"state_size", m.state_size},
           {"quadratic", m.quadratic}};
    j["forms"] = json::array({"reference", "parallel"});
    if (m.stepper) j["forms"].push_back("recurrent");
    j["backward"] = bool(m.backward);
    j["state_all_modes"] = m.state_all_modes;
    j["kernel_checks_values"] = m.kernel_checks_values;  // the causal forward checks the per-token inputs itself
    j["log_decays"] = m.log_decays;
    j["inputs"] = json::array();
    for (const auto& t : m.inputs) j["inputs"].push_back({{"name", t.name}, {"dims", t.dims}, {"optional", t.optional}});
    j["state"] = json::array();
    for (const auto& t : m.state)
      j["state"].push_back({{"name", "state." + t.name}, {"dims", t.dims}, {"count", t.count}});
    j["params"] = json::array();
    for (const auto& p : m.params) {
      json pj{{"name", p.name}, {"default", p.def}, {"integer", p.integer}, {"min", p.min}, {"help", p.help}};
      if (!p.def_text.empty()) pj["default_text"] = p.def_text;
      j["params"].push_back(pj);
    }
    j["example_params"] = m.example_params;
    j["more_params"] = m.more_params;
    j["small_params"] = m.small_params;
    j["bench_params"] = m.bench_params;
    for (bool causal : {false, true}) {
      if ((causal && !m.causal_ok) || (!causal && !m.noncausal_ok)) continue;
      j["test_dims"][causal ? "causal" : "noncausal"] = example_dims(m, Scale::Test, 7, causal);
    }
    all.push_back(j);
  }
  return all.dump(1) + "\n";
}

std::string describe_mixers() {
  std::ostringstream o;
  // The summary table (the AFT paper's Table 1, extended to every mechanism), then details.
  o << "| mixer | causal | non-causal | forms | time | extra memory (parallel) | recurrent state |\n";
  o << "|---|---|---|---|---|---|---|\n";
  for (const auto& m : mixers()) {
    o << "| " << m.name << " | " << (m.causal_ok ? "yes" : "no") << " | " << (m.noncausal_ok ? "yes" : "no")
      << " | ref, par" << (m.stepper ? ", rec" : "") << " | " << m.time << " | " << m.memory << " | "
      << m.state_size << " |\n";
  }
  o << "\n";
  for (const auto& m : mixers()) {
    o << m.name << " — " << m.summary << "\n";
    o << "  paper:   " << m.paper << "\n";
    o << "  causal:  " << (m.causal_ok ? "yes" : "no") << "   non-causal: " << (m.noncausal_ok ? "yes" : "no") << "\n";
    o << "  forms:   reference (float64, T x T weights), parallel";
    if (m.stepper) o << ", recurrent";
    o << "\n  inputs: ";
    for (const auto& t : m.inputs) o << " " << t.name << "[" << t.dims << "]" << (t.optional ? "?" : "");
    o << "\n  params: ";
    if (m.params.empty()) o << " none";
    for (const auto& p : m.params) {
      o << " " << p.name << "=";
      if (!p.def_text.empty()) o << p.def_text;
      else o << p.def;
    }
    o << "\n  state:  ";
    if (m.state.empty()) o << " none";
    for (const auto& t : m.state) o << " state." << t.name << "[" << t.dims << "]";
    o << "  (" << m.state_size << ")\n";
    o << "  time:    " << m.time << "   extra memory: " << m.memory << "\n\n";
  }
  return o.str();
}

}  // namespace linmix
