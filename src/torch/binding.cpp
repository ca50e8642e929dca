// linmix._C: the PyTorch extension over the linmix library (python/linmix/ is the package around
// it). Three calls, everything else is Python:
//   mixers_json()                  the registry (linmix mixers --json)
//   run(name, mode, causal, params, tensors, grad, threads)
//                                  a float32 call of the mechanism's parallel / recurrent form
//                                  (with grad: its hand-written backward; tensors then hold dy
//                                  and optionally dfinal.<state>); returns y, state.*, d<name>
//   run64(name, causal, params, tensors, dout, threads)
//                                  the float64 reference on float64 tensors, and with dout
//                                  (dy, dfinal.<state>) its gradients from the float64 tape
//   init_model(config, seed)      a model's parameters as linmix train initialises them
//   load_checkpoint(path)          a linmix / RWKV / Mamba checkpoint: config, kind, tokenizer, tensors
//   save_checkpoint(path, config, tensors, tokenizer)   one linmix generate / logits / train reads
// Tensors are CPU and contiguous (the Python side makes them so); inputs are read where they are
// (linmix views), outputs handed to torch without a copy.
// linmix::Error becomes ValueError (one line, naming the tensor); the GIL is released while
// the mechanism runs.
#include <cblas.h>
#include <torch/extension.h>

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "kernels/blas.h"
#include "linmix/bench.h"
#include "linmix/error.h"
#include "linmix/mixer.h"
#include "linmix/model.h"
#include "linmix/train.h"

namespace py = pybind11;

namespace {

using linmix::Tensor;
using linmix::TensorMap;

std::vector<int64_t> shape_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

void check_cpu(const std::string& name, const at::Tensor& t, at::ScalarType want) {
  if (t.device().type() != at::kCPU) throw linmix::Error("tensor '" + name + "' is on " + t.device().str() + ", linmix runs on the CPU");
  if (t.scalar_type() != want)
    throw linmix::Error("tensor '" + name + "' is " + std::string(c10::toString(t.scalar_type())) + ", expected " +
                        c10::toString(want));
}

// Threads for one call: linmix's OpenMP loops and its BLAS (kernels/blas.h). When its BLAS is
// not an OpenMP build (the OpenMP OpenBLAS could not be loaded beside torch's pthread one, see
// use_openmp_blas), BLAS runs in its caller's thread: a pthread OpenBLAS's own threads would spin
// against linmix's OpenMP threads and serialise the GEMMs called from inside its parallel loops
// (measured 30x slower backward for the linear family).
void call_threads(int n) {
  if (n <= 0) return;
  linmix::set_threads(n);
  if (linmix::blas::library().get_parallel() != 2) linmix::blas::library().set_num_threads(1);
}

// torch loads Debian's pthread OpenBLAS before this module, and it shares the OpenMP build's
// SONAME, so the module's BLAS calls bind to it: linmix's top-level GEMMs then ran on one thread
// (gla at T = 4096: 16.4 ms through linmix.ops against 11.2 ms in `linmix bench`). The OpenMP build
// beside it (LINMIX_BLAS=PATH, else openblas-openmp/ next to the loaded build's folder) serves
// linmix's calls; torch keeps its own. Returns what linmix's BLAS is, for linmix.ops' info.
std::string use_openmp_blas() {
  namespace fs = std::filesystem;
  if (linmix::blas::library().get_parallel() == 2) return "OpenMP OpenBLAS (the process's)";
  std::string path;
  if (const char* e = std::getenv("LINMIX_BLAS")) {
    path = e;
  } else {
    Dl_info info{};  // the file of the OpenBLAS the process bound (.../openblas-pthread/libopenblasp-*.so)
    void* f = ::dlsym(RTLD_DEFAULT, "openblas_get_parallel");
    std::error_code ec;  // (dli_fname may be the alternatives link, /lib/<triplet>/libopenblas.so.0)
    const fs::path real = f && ::dladdr(f, &info) && info.dli_fname ? fs::canonical(info.dli_fname, ec) : fs::path();
    if (!real.empty() && !ec) path = (real.parent_path().parent_path() / "openblas-openmp" / "libopenblas.so.0").string();
  }
  // the OpenMP build's kernels are chosen as it loads: the AVX-512 ones where the loaded build
  // fell back to SSE3 (kernels/blas.h avx512_core_wanted; torch's build keeps its own)
  if (const char* core = linmix::blas::avx512_core_wanted()) ::setenv("OPENBLAS_CORETYPE", core, 1);
  if (!path.empty() && fs::exists(path) && linmix::blas::use_blas_library(path) &&
      linmix::blas::library().get_parallel() == 2)
    return "OpenMP OpenBLAS " + path;
  return "the process's BLAS, one thread a call (no OpenMP OpenBLAS found)";
}

// The tensor as linmix's, without a copy: a view of its float32 contiguous values (converted
// first when it is not that) which holds the torch tensor alive. The mixers only read their
// inputs (tests/torch_ops_test.py checks every one leaves them as they were).
Tensor to_linmix(const at::Tensor& t) {
  const at::Tensor c = t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  Tensor out;
  out.shape = shape_of(c);
  if (c.numel() > 0)
    out.data = linmix::Storage::view(c.data_ptr<float>(), size_t(c.numel()), std::make_shared<at::Tensor>(c));
  return out;
}

at::Tensor to_torch(const Tensor& t) {
  at::Tensor out = at::empty(t.shape, at::kFloat);
  std::memcpy(out.data_ptr<float>(), t.data.data(), sizeof(float) * size_t(t.numel()));
  return out;
}
// The same without a copy: the tensor's buffer moves into the torch tensor, which frees it.
at::Tensor into_torch(Tensor&& t) {
  if (t.data.owns_buffer()) {  // a buffer of its own (Tensor::uninitialized): the torch tensor keeps it
    std::shared_ptr<void> keep = t.data.keeper();
    return at::from_blob(t.data.data(), t.shape, [keep](void*) {}, at::TensorOptions().dtype(at::kFloat));
  }
  auto* buf = new std::vector<float>(std::move(t.data).take());
  return at::from_blob(buf->data(), t.shape, [buf](void*) { delete buf; }, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor to_torch64(const std::vector<double>& v, const std::vector<int64_t>& shape) {
  at::Tensor out = at::empty(shape, at::kDouble);
  TORCH_CHECK(out.numel() == int64_t(v.size()), "linmix: output size mismatch");
  std::memcpy(out.data_ptr<double>(), v.data(), sizeof(double) * v.size());
  return out;
}

// What a float32 forward kept for its backward (linmix::RunSaved): made empty by linmix.ops before
// the forward, which fills it (the forms that keep their chunk states), handed to the backward.
struct Saved {
  std::shared_ptr<linmix::RunSaved> kept;
};

std::map<std::string, at::Tensor> run(const std::string& name, const std::string& mode, bool causal,
                                      const std::map<std::string, std::string>& params,
                                      const std::map<std::string, at::Tensor>& tensors, bool grad, int threads,
                                      bool final_state, bool check_values, std::shared_ptr<Saved> saved,
                                      bool grad_y) {
  call_threads(threads);
  TensorMap in;
  for (const auto& [n, t] : tensors) {
    check_cpu(n, t, at::kFloat);
    in[n] = to_linmix(t);
  }
  TensorMap out;
  {
    py::gil_scoped_release nogil;
    out = linmix::run_mixer(name, linmix::parse_mode(mode), causal, params, in, grad, final_state, check_values,
                            saved && !grad ? &saved->kept : nullptr, saved && grad ? saved->kept.get() : nullptr);
  }
  if (grad && !grad_y) out.erase("y");  // not wanted: not copied into a torch tensor
  std::map<std::string, at::Tensor> res;
  for (auto& [n, t] : out) res[n] = into_torch(std::move(t));
  return res;
}

// Seconds of one call of the kernels `linmix bench` times (src/bench/mixer_bench.cpp): the
// mechanism's parallel forward or, with dy among the tensors, its backward (the final state not
// asked for in either), on a call validated beforehand (not timed). bench/torch_ops.py alternates it with
// linmix.ops calls in one process, so the binding's overhead is not the machine's drift between
// two processes.
// With keep (dy given): the forward keeping what its backward reads, then that backward on it, the
// two timed together (what a linmix.ops forward+backward runs); the forms that keep nothing run
// their forward and then the backward that recomputes it.
double kernel_seconds(const std::string& name, bool causal, const std::map<std::string, std::string>& params,
                      const std::map<std::string, at::Tensor>& tensors, int threads, bool keep) {
  call_threads(threads);
  TensorMap in;
  for (const auto& [n, t] : tensors) {
    check_cpu(n, t, at::kFloat);
    in[n] = to_linmix(t);
  }
  const linmix::MixerSpec& spec = linmix::find_mixer(name);
  const bool grad = in.count("dy") > 0;
  if (grad && !spec.backward) throw linmix::Error(name + ": the parallel form has no backward");
  linmix::Call call = linmix::validate_call(name, linmix::Mode::Parallel, causal, params, in, grad);
  // no final state: as a model's layer runs the forms, as linmix bench times them, and as
  // linmix.ops runs them without output_final_state
  call.final_state = false;
  py::gil_scoped_release nogil;
  const auto t0 = std::chrono::steady_clock::now();
  if (grad && keep) {
    std::shared_ptr<linmix::RunSaved> kept;
    linmix::Call fwd = call;
    fwd.keep = &kept;
    { TensorMap out = spec.parallel(fwd); }
    call.reuse = kept.get();
    { TensorMap out = spec.backward(call, in.at("dy")); }
  } else {
    TensorMap out = grad ? spec.backward(call, in.at("dy")) : spec.parallel(call);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::map<std::string, at::Tensor> run64(const std::string& name, bool causal, const std::map<std::string, std::string>& params,
                                        const std::map<std::string, at::Tensor>& tensors,
                                        const std::optional<std::map<std::string, at::Tensor>>& dout, int threads) {
  TensorMap in;  // float32 views give the call its shapes and its checks
  std::map<std::string, std::vector<double>> x64, d64;
  std::map<std::string, std::vector<int64_t>> shapes;
  auto doubles = [](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    const double* p = c.data_ptr<double>();
    return std::vector<double>(p, p + c.numel());
  };
  for (const auto& [n, t] : tensors) {
    check_cpu(n, t, at::kDouble);
    in[n] = to_linmix(t);
    x64[n] = doubles(t);
    shapes[n] = shape_of(t);
  }
  if (dout)
    for (const auto& [n, t] : *dout) {
      check_cpu(n, t, at::kDouble);
      d64[n] = doubles(t);
    }
  std::map<std::string, std::vector<double>> out;
  linmix::Call call = linmix::validate_call(name, linmix::Mode::Reference, causal, params, in);
  {
    py::gil_scoped_release nogil;
    call_threads(threads);
    out = linmix::reference_f64_all(name, causal, params, in, x64, dout ? &d64 : nullptr);
  }
  const linmix::MixerSpec& spec = linmix::find_mixer(name);
  std::map<std::string, at::Tensor> res;
  for (const auto& [n, v] : out) {
    std::vector<int64_t> shape;
    if (n == "y") shape = linmix::dims_shape(spec.y_dims, call);
    else if (n.rfind("state.", 0) == 0) {
      for (const auto& ts : spec.state)
        if ("state." + ts.name == n) shape = linmix::final_state_shape(spec, call, ts);
    } else {
      shape = shapes.at(n.substr(1));  // d<name>
    }
    res[n] = to_torch64(v, shape);
  }
  return res;
}

// The mechanism's example inputs (linmix example): N(0,1) draws sized for a harness scale at
// length T (dims overrides them), mapped into its domain, with stress its stability inputs, and
// with state a random initial state (the mechanisms whose parallel form takes one, causal).
std::map<std::string, at::Tensor> example(const std::string& name, bool causal, int64_t T, uint64_t seed,
                                          const std::string& scale, const std::map<std::string, int64_t>& dims,
                                          int stress, bool state) {
  const linmix::MixerSpec& spec = linmix::find_mixer(name);
  LINMIX_CHECK(causal ? spec.causal_ok : spec.noncausal_ok,
               "mixer '" + name + "' has no " + (causal ? "causal" : "non-causal") + " form");
  LINMIX_CHECK(stress >= 0 && stress <= 2, "stress must be 0, 1 or 2");
  auto d = linmix::example_dims(spec, linmix::parse_scale(scale), T, causal);
  for (const auto& [k, v] : dims) d[k] = v;
  TensorMap in = linmix::example_inputs(spec, d, seed);
  if (stress) linmix::stress_inputs(spec, in, stress == 2);
  if (state && spec.state_all_modes && causal) {
    const linmix::Call call = linmix::validate_call(name, linmix::Mode::Parallel, causal, spec.example_params, in);
    auto sd = call.dims;
    for (const auto& [k, v] : d) sd.emplace(k, v);  // dims only a state has (a cache's L)
    for (auto& [n, t] : linmix::example_state(spec, sd, seed + 7)) in[n] = std::move(t);
  }
  std::map<std::string, at::Tensor> res;
  for (const auto& [n, t] : in) res[n] = to_torch(t);
  return res;
}

std::map<std::string, at::Tensor> torch_params(const linmix::Model& model) {
  std::map<std::string, at::Tensor> res;
  for (const auto& [n, t] : model.params()) res[n] = to_torch(t);
  return res;
}

py::tuple init_model(const std::string& config_json, uint64_t seed) {
  linmix::Model model(linmix::ModelConfig::from_json(config_json));
  model.init(seed);
  return py::make_tuple(model.config().to_json(), torch_params(model));
}

py::dict load_checkpoint(const std::string& path) {
  linmix::Checkpoint ck = linmix::load_checkpoint(path);
  LINMIX_CHECK(!ck.model->packed(), path + ": its weights are stored converted for the inference engine (linmix "
                                           "convert): load the FP32 checkpoint it came from");
  py::dict d;
  d["config"] = ck.model->config().to_json();
  d["kind"] = ck.kind;
  d["tokenizer"] = ck.tokenizer;
  d["step"] = ck.step;
  d["tensors"] = torch_params(*ck.model);
  return d;
}

// A checkpoint of the model `config` holding `tensors` (every parameter, by name and shape; no
// optimizer state: training resumed from it starts AdamW afresh), written atomically.
void save_checkpoint(const std::string& path, const std::string& config_json,
                     const std::map<std::string, at::Tensor>& tensors, const std::string& tokenizer) {
  linmix::Model model(linmix::ModelConfig::from_json(config_json));
  for (auto& [n, p] : model.params()) {
    auto it = tensors.find(n);
    LINMIX_CHECK(it != tensors.end(), "save_checkpoint: no tensor '" + n + "'");
    check_cpu(n, it->second, at::kFloat);
    Tensor t = to_linmix(it->second);
    LINMIX_CHECK(t.shape == p.shape, "save_checkpoint: tensor '" + n + "' has shape " + linmix::shape_str(t.shape) +
                                         ", the model's is " + linmix::shape_str(p.shape));
    linmix::check_finite(n, t);
    p = std::move(t);
  }
  for (const auto& [n, t] : tensors)
    LINMIX_CHECK(model.params().count(n), "save_checkpoint: unexpected tensor '" + n + "'");
  linmix::save_checkpoint(path, model, linmix::AdamW{}, 0, "{}", tokenizer);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {  // _C, or _C_v4 for the x86-64-v4 build
  // The kernels allocate their buffers per call (tens of MB at T = 4096): with glibc's defaults
  // they are mmapped and unmapped each time and every call page-faults them in again (measured:
  // gla at T = 4096, 19 ms instead of 12). Keep freed memory in the heap for the next call, as
  // `linmix bench` does (keep_freed_memory); LINMIX_KEEP_MEMORY=0 leaves glibc's defaults.
  if (const char* k = std::getenv("LINMIX_KEEP_MEMORY"); !(k && std::string(k) == "0")) linmix::keep_freed_memory();
  static const std::string blas = use_openmp_blas();
  m.attr("BLAS") = blas;
  m.attr("ARCH") = LINMIX_ARCH_BUILT;  // the -march of the build (x86-64-v3: AVX2 kernels; native)
  m.doc() = "linmix: linear-time token mixers on the CPU (the C++ library under linmix.ops)";
  py::register_exception<linmix::Error>(m, "LinmixError", PyExc_ValueError);
  py::class_<Saved, std::shared_ptr<Saved>>(m, "Saved", "what a float32 forward keeps for its backward")
      .def(py::init<>())
      .def_property_readonly("kept", [](const Saved& s) { return bool(s.kept); },
                             "whether the forward kept anything (the forms on the gated chunked kernels)")
      .def("drop", [](Saved& s) { s.kept.reset(); }, "frees what was kept");
  m.def("mixers_json", &linmix::mixers_json, "the registry as JSON (linmix mixers --json)");
  m.def("run", &run, py::arg("name"), py::arg("mode"), py::arg("causal"), py::arg("params"), py::arg("tensors"),
        py::arg("grad") = false, py::arg("threads") = 0, py::arg("final_state") = true, py::arg("check_values") = true,
        py::arg("saved") = nullptr, py::arg("grad_y") = true,
        "a float32 call: the parallel or recurrent form, or with grad the hand-written backward "
        "(final_state: whether the final state is wanted; check_values = False: names and shapes "
        "checked, not the values; saved: a Saved the parallel forward fills with what its backward "
        "reads, given to that backward; grad_y = False: the backward's y left out)");
  m.def("kernel_seconds", &kernel_seconds, py::arg("name"), py::arg("causal"), py::arg("params"), py::arg("tensors"),
        py::arg("threads") = 0, py::arg("keep") = false,
        "seconds of one call of the kernel linmix bench times (the forward; the backward when dy is given; "
        "with keep the forward keeping its chunk states and then the backward on them)");
  m.def("example", &example, py::arg("name"), py::arg("causal"), py::arg("T"), py::arg("seed") = 0,
        py::arg("scale") = "test", py::arg("dims") = std::map<std::string, int64_t>{}, py::arg("stress") = 0,
        py::arg("state") = false, "the mechanism's example inputs in its domain (linmix example)");
  m.def("init_model", &init_model, py::arg("config"), py::arg("seed") = 0);
  m.def("load_checkpoint", &load_checkpoint, py::arg("path"));
  m.def("save_checkpoint", &save_checkpoint, py::arg("path"), py::arg("config"), py::arg("tensors"),
        py::arg("tokenizer") = "bytes");
  m.def("run64", &run64, py::arg("name"), py::arg("causal"), py::arg("params"), py::arg("tensors"),
        py::arg("dout") = py::none(), py::arg("threads") = 0,
        "the float64 reference, and with dout its float64 gradients");
}
