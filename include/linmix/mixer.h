// The mixer interface: every mechanism of docs/MIXERS.md is a MixerSpec in one registry.
//
// A spec declares its input tensors with symbolic dimensions ("B,T,H,D"), its params with
// defaults and bounds, which of causal / non-causal it defines, its recurrent state tensors,
// and its complexity. run_mixer() validates a call against the spec (unknown mixer/param,
// missing/extra tensor, rank, shape, NaN, causal flag) and only then calls the mechanism's
// reference (float64), parallel or recurrent form. Errors are linmix::Error with one line.
#pragma once
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "linmix/tensor.h"

namespace linmix {

enum class Mode { Reference, Parallel, Recurrent };
const char* mode_name(Mode m);
Mode parse_mode(const std::string& s);

// Harness scales: tests of the forms (small, crossing every block), gradient tests (tiny:
// finite differences per element), the demo, and the benchmarks (d_model 512).
enum class Scale { Test, Grad, Demo, Bench };
Scale parse_scale(const std::string& s);  // "test", "grad", "demo", "bench"

struct TensorSpec {
  std::string name;
  std::string dims;  // comma-separated symbolic dims, e.g. "B,T,H,D"; letters bind across tensors
  bool optional = false;
  // An integer count (a state's position): read as a number, not differentiated (its d<name> is 0).
  bool count = false;
};

struct ParamSpec {
  std::string name;
  double def;         // default value (ignored when def_text is set and the value is derived)
  bool integer;       // value must be integral
  double min;         // smallest allowed value
  std::string help;
  std::string def_text = "";  // shown instead of def when the default is derived (e.g. 1/sqrt(D))
};

// What a parallel forward kept for its backward (Call::keep, Call::reuse), as fla's chunked ops keep
// their chunk states between the passes: the form's own type. A form that keeps nothing leaves it
// unset, and its backward recomputes the forward as it does without one.
struct RunSaved {
  virtual ~RunSaved() = default;
};

// A validated call, as the mechanism sees it.
struct Call {
  const TensorMap& in;
  std::map<std::string, int64_t> dims;  // bound symbolic dims
  std::map<std::string, double> params;  // every declared param, defaults filled in
  std::map<std::string, bool> given;     // which params the user set explicitly
  bool causal = false;
  // The caller wants the final state (state_all_modes mechanisms, causal). A model's layer does
  // not: a form whose final state costs work of its own (s4d) skips it when this is false.
  bool final_state = true;
  // Forward (parallel) only: where a form that can keep what its backward reads puts it. Backward
  // only: what the forward of these same inputs kept (null: recompute); a form takes it only when it
  // is its own type and fits the call's shape.
  std::shared_ptr<RunSaved>* keep = nullptr;
  const RunSaved* reuse = nullptr;
  // The per-token inputs whose values the kernel checks as it reads them
  // (MixerSpec::kernel_checks_values; run_mixer only), left unread by validation. The kernel sets
  // *unchecked_bad when a row holds a value that is not finite (or a log decay > 0), and run_mixer
  // then checks them as validation would have: the same one-line error, no output.
  // unchecked_bad is set (not null) exactly when unchecked is not empty: a kernel checks iff it is.
  struct Unchecked {
    std::string name;
    bool log_decay;  // also <= 0 (MixerSpec::log_decays)
  };
  std::vector<Unchecked> unchecked{};
  std::shared_ptr<std::atomic<uint32_t>> unchecked_bad{};

  const Tensor& t(const std::string& name) const;
  bool has(const std::string& name) const { return in.count(name) != 0; }
  int64_t d(const std::string& dim) const { return dims.at(dim); }
  double p(const std::string& name) const { return params.at(name); }
  int64_t ip(const std::string& name) const { return static_cast<int64_t>(params.at(name)); }
};

// The recurrent step of one sequence (MixerSpec::stepper).
struct Stepper {
  std::function<void(float* y)> step;
  std::function<TensorMap()> save;
  std::function<void(const TensorMap&)> load;
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
  // The reference and parallel forms too take state.* (the state before token 0) and return the
  // final state (a chunked prefill from any state); with --grad the gradient includes d(state.*).
  // Otherwise state.* is accepted only by the recurrent form.
  bool state_all_modes = false;
  // Where the final state's dims differ from the initial one's (a key/value cache grows: its L),
  // the final state's dims for a call (unset: the call's own).
  std::function<std::map<std::string, int64_t>(const Call&)> final_dims;
  // Inputs whose every value must be <= 0 (log decays): refused otherwise, by the registry.
  std::vector<std::string> log_decays;
  // The causal parallel forward checks its (B,T,H,...) and (B,T,C) inputs' values as it reads them
  // (gated_heads, mixers/decay_forms.h, chunk by chunk: the rows just read, in cache; the scans, in
  // their loops) in place of validation's pass over them before it (Call::unchecked).
  bool kernel_checks_values = false;
  // ... and every per-token (B,T,...) input, whatever its layout (flash's (B,T,S) and (B,T,E)):
  // for a kernel that does not go through gated_heads' rows
  bool kernel_checks_all_rows = false;
  // Inputs of which the forms read a part only, by name: the runs [offset, offset + length) of
  // elements a call reads (aft_local's w: the band |t - s| < window on the rows the call reaches).
  // Validation checks the values of these runs alone (a NaN where no form reads changes nothing),
  // after `check` has checked the dims they depend on.
  std::map<std::string, std::function<std::vector<std::pair<int64_t, int64_t>>(const Call&)>> read_runs;
  std::string time, memory, state_size;
  // Demo/test inputs: example_params are the params to run with; example_fix maps N(0,1)
  // draws into the mechanism's domain (e.g. rwkv4's decay w > 0).
  std::map<std::string, std::string> example_params;
  std::function<void(TensorMap&)> example_fix;
  // Maps the N(0,1) draws of example_state into the state's domain (e.g. linear's normaliser z,
  // a sum of positive features, > 0); unset: any value is a state.
  std::function<void(TensorMap&)> state_fix;
  std::function<void(const Call&)> check;  // mechanism-specific checks beyond shapes (optional)
  std::string y_dims;  // symbolic shape of the output y, e.g. "B,T,H,E"
  std::function<TensorMap(const Call&)> reference;  // float64 inside; returns {"y"}
  std::function<TensorMap(const Call&)> parallel;   // returns {"y"}
  // Gradients of sum(y * dy) with respect to every input tensor present, named d<name>,
  // plus y. reference_grad: the float64 reference differentiated by a tape (src/ref/tape.h);
  // backward: the hand-written backward of the parallel form (absent where not written yet).
  std::function<TensorMap(const Call&, const Tensor& dy)> reference_grad;
  std::function<TensorMap(const Call&, const Tensor& dy)> backward;
  // The reference on float64 values x (same names and layouts as the call's tensors: what
  // finite-difference checks perturb), returning y and the final state.* (where
  // state_all_modes); with dout (the gradient of the loss with respect to y followed by the
  // final states, in spec.state order) also d<name> of every tensor of x, in float64 (the tape).
  std::function<std::map<std::string, std::vector<double>>(const Call&, const std::map<std::string, std::vector<double>>&,
                                                           const std::vector<double>& dout)>
      reference64_grad;
  // The recurrent form, one token at a time (where defined): stepper(call), given a validated
  // recurrent call with B = 1 and T = 1, returns a Stepper that keeps the state of one sequence
  // itself. step(y) reads the call's per-token input tensors (the caller overwrites their values
  // in place between steps; the other inputs stay fixed) and writes y of one token: no
  // validation, no tensor copies, no allocation per token (the softmax KV cache grows by
  // amortised doubling). save() returns the state as the spec's state tensors ("state.<name>",
  // B = 1); load() sets it from such tensors (validated by the caller). This is the only
  // recurrent code of a mechanism: `--mode recurrent` is recurrent_by_steps over it, and
  // generation calls it directly.
  std::function<Stepper(const Call&)> stepper;

  // ---- What the harnesses (tests, demo, benchmarks, Python tools) know of the mechanism ----
  // Sizes of the mechanism's own dim letters (Tw, K, M, S, N, L, ...) at a harness scale; the
  // harness sets B, T, H, D, E, C first (example_dims below) and this may also adjust them.
  std::function<void(std::map<std::string, int64_t>& dims, Scale scale, bool causal)> own_dims;
  // Further param sets every form and gradient test runs besides example_params (e.g. a window).
  std::vector<std::map<std::string, std::string>> more_params;
  // Params merged over example_params at the gradient tests' tiny sizes (so that several
  // groups / blocks / windows fit in T = 5).
  std::map<std::string, std::string> small_params;
  // The stability inputs: pushes the draws of example_inputs to the edge of float32's exp
  // range (for_grad: the milder version the float32 gradients are tested on). Unset: keys and
  // biases (k, w, u) scaled by 20 and clipped to +-60 (stress_inputs below).
  std::function<void(TensorMap& in, bool for_grad)> stress;
  // Benchmarks: params, FLOPs of the forward the parallel form runs (0 = not a FLOP-bound
  // kernel: judged in GB/s instead), and whether time grows as T^2.
  std::map<std::string, std::string> bench_params;
  std::function<double(const std::map<std::string, int64_t>& dims, bool causal)> flops;
  bool quadratic = false;
  // The blocking constants of its kernels, by the dim they block (channel blocks, time chunks,
  // tiles): the tests run sizes that cross every one (a new constant listed here cannot hide).
  std::vector<std::pair<std::string, int64_t>> blocking;
};

const std::vector<MixerSpec>& mixers();
const MixerSpec& find_mixer(const std::string& name);

// Validates and runs one mixer call. raw_params are the user's KEY=VALUE strings. With
// grad, `in` must also hold dy (shaped like y) and the result adds d<name> for every input
// tensor (reference: float64 tape; parallel: the hand-written backward).
// final_state = false: the final state may be left out of the result (see Call::final_state).
// check_values = false: names, shapes and params are checked, the values are not (no pass over
// the inputs for NaN or out-of-domain values): for an engine's own tensors made from weights that
// were checked when loaded, whose logits are checked again at the end.
// keep (a parallel forward) / reuse (its backward): Call::keep / Call::reuse; a backward given
// reuse returns the gradients (and final state) without y, which its forward returned.
TensorMap run_mixer(const std::string& name, Mode mode, bool causal,
                    const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad = false,
                    bool final_state = true, bool check_values = true, std::shared_ptr<RunSaved>* keep = nullptr,
                    const RunSaved* reuse = nullptr);

// Validates like run_mixer and returns the bound call without running it (benchmarks time the
// spec's forms on it). The call refers to `in`, which must outlive it; tensors of `in` may be
// replaced by same-shaped ones (a recurrent state) between calls.
Call validate_call(const std::string& name, Mode mode, bool causal,
                   const std::map<std::string, std::string>& raw_params, const TensorMap& in, bool grad = false);

// Validates like run_mixer, then evaluates the float64 reference on x64 (tensor name -> values,
// laid out like the same-named tensors of `in`, which give the shapes), returning every output in
// float64: "y", the final "state.<name>" (state_all_modes)
// and, when dout is given (name -> values: "dy" and optionally "dfinal.<name>", the gradient of
// the final state), "d<name>" of every tensor of x64 (the float64 tape). x64 holds every input
// tensor of the call (and its state.* when given); `in` gives the shapes and is validated.
std::map<std::string, std::vector<double>> reference_f64_all(const std::string& name, bool causal,
                                                             const std::map<std::string, std::string>& raw_params,
                                                             const TensorMap& in,
                                                             const std::map<std::string, std::vector<double>>& x64,
                                                             const std::map<std::string, std::vector<double>>* dout);
// The concrete shape of symbolic dims ("B,T,C") under a call's bound dims.
std::vector<int64_t> dims_shape(const std::string& dims, const Call& c);
// The shape of state tensor ts after a call (spec.final_dims over the call's dims); the same for
// symbolic dims and a final_dims function (unset: the call's own dims).
std::vector<int64_t> final_state_shape(const MixerSpec& spec, const Call& c, const TensorSpec& ts);
std::vector<int64_t> final_state_shape(const std::function<std::map<std::string, int64_t>(const Call&)>& final_dims,
                                       const Call& c, const std::string& dims);

// N(0,1) inputs for every input of `spec` (optional ones included), sized by `dims` (B, T, H, D, E,
// C, Tw, K, ...), passed through spec.example_fix. Deterministic in `seed`.
TensorMap example_inputs(const MixerSpec& spec, const std::map<std::string, int64_t>& dims, uint64_t seed);

// An initial state for every state tensor of a state_all_modes spec ("state.<name>", N(0,1)
// draws, deterministic in `seed`); empty for the others.
TensorMap example_state(const MixerSpec& spec, const std::map<std::string, int64_t>& dims, uint64_t seed);

// Every dim of `spec`'s inputs sized for a harness scale at length T: B, T, H, D, E, C from the
// scale's table, then spec.own_dims.
std::map<std::string, int64_t> example_dims(const MixerSpec& spec, Scale scale, int64_t T, bool causal);

// example_dims past every blocking constant of spec.blocking (T = 2 block + 3; C = H (block + 3),
// so that every head crosses a channel block too), for the tests that must cross them all;
// empty when the spec lists none.
std::map<std::string, int64_t> crossing_dims(const MixerSpec& spec, Scale scale, bool causal);

// Applies spec.stress (or the default: k, w, u times 20, clipped to +-60) to example inputs.
void stress_inputs(const MixerSpec& spec, TensorMap& in, bool for_grad);

// The recurrent form of a call with any B and T, state.* in and out, run through spec.stepper one
// sequence and one token at a time.
TensorMap recurrent_by_steps(const MixerSpec& spec, const Call& c);

// Human-readable listing of every mechanism (the `linmix mixers` command).
std::string describe_mixers();
// The registry as JSON (`linmix mixers --json`): per mechanism its inputs with symbolic dims,
// params with defaults and bounds, forms, causal flags, state tensors, complexity, and the
// harness data (example, more and small params; test dims at T = 7; bench params).
std::string mixers_json();

}  // namespace linmix
