// The mixer interface: every mechanism of ../shared/MIXERS.md is a MixerSpec in one registry.
//
// A spec declares its input tensors with symbolic dimensions ("B,T,H,D"), its params with
// defaults and bounds, which of causal / non-causal it defines, its recurrent state tensors,
// and its complexity. run_mixer() validates a call against the spec (unknown mixer/param,
// missing/extra tensor, rank, shape, NaN, causal flag) and only then calls the mechanism's
// reference (float64), parallel or recurrent form. Errors are linmix::Error with one line.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "linmix/tensor.h"

namespace linmix {

enum class Mode { Reference, Parallel, Recurrent };
const char* mode_name(Mode m);
Mode parse_mode(const std::string& s);

struct TensorSpec {
  std::string name;
  std::string dims;  // comma-separated symbolic dims, e.g. "B,T,H,D"; letters bind across tensors
  bool optional = false;
};

struct ParamSpec {
  std::string name;
  double def;         // default value (ignored when def_text is set and the value is derived)
  bool integer;       // value must be integral
  double min;         // smallest allowed value
  std::string help;
  std::string def_text = "";  // shown instead of def when the default is derived (e.g. 1/sqrt(D))
};

// A validated call, as the mechanism sees it.
struct Call {
  const TensorMap& in;
  std::map<std::string, int64_t> dims;  // bound symbolic dims
  std::map<std::string, double> params;  // every declared param, defaults filled in
  std::map<std::string, bool> given;     // which params the user set explicitly
  bool causal = false;

  const Tensor& t(const std::string& name) const;
  bool has(const std::string& name) const { return in.count(name) != 0; }
  int64_t d(const std::string& dim) const { return dims.at(dim); }
  double p(const std::string& name) const { return params.at(name); }
  int64_t ip(const std::string& name) const { return static_cast<int64_t>(params.at(name)); }
};

struct MixerSpec {
  std::string name;
  std::string paper;
  std::string summary;
  bool causal_ok = true;
  bool noncausal_ok = true;
  std::vector<TensorSpec> inputs;
  std::vector<ParamSpec> params;
  std::vector<TensorSpec> state;  // recurrent state tensors, named without the "state." prefix
  std::string time, memory, state_size;
  // Demo/test inputs: example_params are the params to run with; example_fix maps N(0,1)
  // draws into the mechanism's domain (e.g. rwkv4's decay w > 0).
  std::map<std::string, std::string> example_params;
  std::function<void(TensorMap&)> example_fix;
  std::function<void(const Call&)> check;  // mechanism-specific checks beyond shapes (optional)
  std::string y_dims;  // symbolic shape of the output y, e.g. "B,T,H,E"
  std::function<TensorMap(const Call&)> reference;  // float64 inside; returns {"y"}
  std::function<TensorMap(const Call&)> parallel;   // returns {"y"}
  // Gradients of sum(y * dy) with respect to every input tensor present, named d<name>,
  // plus y. reference_grad: the float64 reference differentiated by a tape (src/ref/tape.h);
  // backward: the hand-written backward of the parallel form (absent where not written yet).
  std::function<TensorMap(const Call&, const Tensor& dy)> reference_grad;
  std::function<TensorMap(const Call&, const Tensor& dy)> backward;
  // The reference on float64 inputs (same names as the call's tensors), returning y: what
  // finite-difference checks perturb.
  std::function<std::vector<double>(const Call&, const std::map<std::string, std::vector<double>>&)> reference64;
  std::function<TensorMap(const Call&)> recurrent;  // reads state.* if present; returns y + state.*
  // The generation path (where written): stepper(call), given a validated recurrent call with
  // B = 1, T = 1 and no state, returns a step function that keeps the state itself; each step
  // reads the call's per-token input tensors (the caller overwrites their values in place
  // between steps; the other inputs stay fixed) and writes y (one token). No validation, no
  // tensor copies, no allocation per token (the softmax KV cache grows by amortised doubling).
  std::function<std::function<void(float* y)>(const Call&)> stepper;
};

const std::vector<MixerSpec>& mixers();
const MixerSpec& find_mixer(const std::string& name);

// Validates and runs one mixer call. raw_params are the user's KEY=VALUE strings. With
// grad, `in` must also hold dy (shaped like y) and the result adds d<name> for every input
// tensor (reference: float64 tape; parallel: the hand-written backward).
TensorMap run_mixer(const std::string& name, Mode mode, bool causal,
                    const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad = false);

// Validates like run_mixer and returns the bound call without running it (benchmarks time the
// spec's forms on it). The call refers to `in`, which must outlive it; tensors of `in` may be
// replaced by same-shaped ones (a recurrent state) between calls.
Call validate_call(const std::string& name, Mode mode, bool causal,
                   const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad = false);

// Validates like run_mixer, then evaluates the float64 reference on x64 (tensor name ->
// values, laid out like the same-named tensors of `in`, which give the shapes). Returns y.
std::vector<double> reference_f64(const std::string& name, bool causal,
                                  const std::map<std::string, std::string>& raw_params, const TensorMap& in,
                                  const std::map<std::string, std::vector<double>>& x64);

// The concrete shape of symbolic dims ("B,T,C") under a call's bound dims.
std::vector<int64_t> dims_shape(const std::string& dims, const Call& c);

// N(0,1) inputs for every input of `spec` (optional ones included), sized by `dims` (B, T, H, D, E,
// C, Tw, K, ...), passed through spec.example_fix. Deterministic in `seed`.
TensorMap example_inputs(const MixerSpec& spec, const std::map<std::string, int64_t>& dims, uint64_t seed);

// Human-readable listing of every mechanism (the `linmix mixers` command).
std::string describe_mixers();

}  // namespace linmix
