#include "linmix/generate.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <random>

#include "linmix/quant.h"
#include "linmix/engine.h"
#include "linmix/safetensors.h"
#include "linmix/tokenizer.h"

namespace linmix {

GenerateResult generate(Model& m, const GenerateOptions& o, const std::function<void(const std::string&)>& emit) {
  const int64_t V = m.config().vocab;
  LINMIX_CHECK(!m.config().classifier(), "the model is a classifier (" + std::to_string(m.config().classes) +
                                             " classes): it does not generate text (linmix eval --model M scores it)");
  LINMIX_CHECK(!o.prompt.empty(), "--prompt must not be empty");
  LINMIX_CHECK(o.tokens >= 0, "--tokens must be >= 0");
  o.sample.validate();
  Model::State st = m.new_state();
  if (!o.state_in.empty()) {
    SafeTensors s = read_safetensors(o.state_in);
    check_floats(s, o.state_in, "a state's tensors are floats (F32, F16 or BF16)");
    // compared as models, not as text: a state saved before a config field existed (norm,
    // ffn_dim) has the same model with the field at its default, F = ffn_mult C
    auto canon = [](ModelConfig c) {
      c.ffn_dim = c.ffn_width(), c.ffn_mult = 1;
      return c.to_json();
    };
    LINMIX_CHECK(s.metadata.count("config") && canon(ModelConfig::from_json(s.metadata.at("config"))) == canon(m.config()),
                 o.state_in + ": the state was saved by a model with another config");
    st = m.state_from_tensors(s.tensors);
  }
  const auto tk = Tokenizer::load(o.tokenizer);
  LINMIX_CHECK(o.tokenizer != "bytes" || V <= 256, "this model has " + std::to_string(V) +
                                                      " tokens, not bytes: pass its --tokenizer (a tokenizer.json or an "
                                                      "RWKV World vocabulary)");
  // a byte-level model may have fewer than 256 tokens (ASCII, a synthetic task's): its prompt's
  // bytes must be among them; what it samples always is
  LINMIX_CHECK(tk->vocab_size() <= V || o.tokenizer == "bytes", "tokenizer " + tk->name() + " has " +
                                                                    std::to_string(tk->vocab_size()) +
                                                                    " tokens, the model only " + std::to_string(V));
  const WType wt = resolve_wtype(m, o.dtype);
  std::unique_ptr<Engine> eng;
  if (engine_supports(m.config())) eng = make_engine(m, wt, true);  // one copy of the weights: the engine's
  else LINMIX_CHECK(wt == WType::F32, "--dtype " + o.dtype + " needs an RWKV model (the inference engine)");
  const std::vector<int32_t> pids = tk->encode(o.prompt);
  LINMIX_CHECK(!pids.empty(), "the prompt encodes to no tokens");
  for (int32_t id : pids)
    LINMIX_CHECK(id < V, "the prompt holds byte " + std::to_string(id) + ", past this model's " + std::to_string(V) +
                             " tokens");
  std::vector<float> lg(static_cast<size_t>(V));
  // A model whose parameters cover ctx positions (learned positions, AFT's bias) continues past
  // them as nanoGPT does: the context is cropped to its last ctx/2 tokens, which are fed again
  // from a fresh state (a saved --state-in is then left behind).
  const int64_t limit = eng ? 0 : m.config().context_limit();
  std::vector<int32_t> history;
  auto feed = [&](int32_t t) {
    if (limit > 0 && st.pos >= limit) {
      const size_t keep = size_t(std::max<int64_t>(limit / 2, 1)) - 1;
      const std::vector<int32_t> tail(history.end() - std::min(keep, history.size()), history.end());
      st = m.new_state();
      history = tail;
      for (int32_t h : tail) m.step(h, st, lg.data());
    }
    m.step(t, st, lg.data());
    history.push_back(t);
  };
  if (eng) eng->sequence(pids.data(), int64_t(pids.size()), st, lg.data());
  else
    for (int32_t id : pids) feed(id);
  emit(o.prompt);
  std::mt19937_64 rng(o.sample.seed);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.tokens; ++i) {
    int32_t t = sample_token(lg.data(), V, o.sample, rng);
    if (t >= tk->vocab_size()) t = 0;  // a model row past the tokenizer: stop sampling it
    emit(tk->decode({t}));
    if (eng) eng->step(t, st, lg.data());
    else feed(t);
  }
  GenerateResult r;
  r.prompt_tokens = int64_t(pids.size()), r.generated = o.tokens;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ms_per_token = 1e3 * r.seconds / double(std::max<int64_t>(o.tokens, 1));
  if (!o.state_out.empty()) write_safetensors(o.state_out, m.state_tensors(st), {{"config", m.config().to_json()}});
  return r;
}

Tensor sequence_logits(Model& m, const std::vector<int32_t>& toks, const std::string& mode, int64_t chunk,
                       const std::string& dtype) {
  const int64_t T = static_cast<int64_t>(toks.size()), V = m.config().vocab;
  LINMIX_CHECK(mode == "parallel" || mode == "recurrent" || mode == "sequence" || mode == "decode",
               "--mode must be parallel, recurrent, sequence or decode");
  LINMIX_CHECK(chunk >= 1, "--chunk must be >= 1");
  LINMIX_CHECK(dtype.empty() || dtype == "f32" || mode == "sequence" || mode == "decode",
               "--dtype applies to the sequence and decode modes only");
  const WType wt = resolve_wtype(m, mode == "sequence" || mode == "decode" ? dtype : "");
  Tensor out({T, V});
  if (mode == "parallel") {
    out.data = m.logits(toks.data(), 1, T);
  } else if (mode == "recurrent") {
    Model::State st = m.new_state();
    for (int64_t t = 0; t < T; ++t) m.step(toks[t], st, out.ptr() + t * V);
  } else {
    const auto eng = make_engine(m, wt, true);
    Model::State st = m.new_state();
    if (mode == "decode")
      for (int64_t t = 0; t < T; ++t) eng->step(toks[t], st, out.ptr() + t * V);
    else
      for (int64_t t0 = 0; t0 < T; t0 += chunk)
        eng->sequence(toks.data() + t0, std::min(chunk, T - t0), st, out.ptr() + t0 * V, true);
  }
  return out;
}

EvalResult evaluate_file(Model& m, const std::vector<uint8_t>& bytes, const std::string& tokenizer,
                         const std::string& mode, const std::string& dtype, int64_t seq, int64_t windows) {
  LINMIX_CHECK(mode == "parallel" || mode == "recurrent" || mode == "sequence",
               "--mode must be parallel, recurrent or sequence");
  LINMIX_CHECK(seq >= 2 && windows >= 1, "--seq must be >= 2 and --windows >= 1");
  const int64_t V = m.config().vocab;
  LINMIX_CHECK(tokenizer != "bytes" || V <= 256, "this model has " + std::to_string(V) +
                                                     " tokens, not bytes: pass its --tokenizer (a tokenizer.json or "
                                                     "an RWKV World vocabulary)");
  const auto tk = Tokenizer::load(tokenizer);
  LINMIX_CHECK(tk->vocab_size() <= V, "tokenizer " + tk->name() + " has " + std::to_string(tk->vocab_size()) +
                                          " tokens, the model only " + std::to_string(V));
  const std::vector<int32_t> ids = tk->encode(std::string(bytes.begin(), bytes.end()));
  const auto [nw, stride] = eval_windows(int64_t(ids.size()), seq, windows);
  LINMIX_CHECK(nw >= 1, "the file has " + std::to_string(ids.size()) + " tokens, fewer than one window of " +
                            std::to_string(seq) + " + 1");
  EvalResult r;
  r.windows = nw, r.tokens = nw * seq;
  for (int64_t w = 0; w < nw; ++w)  // the bytes of the scored targets
    for (int64_t t = 1; t <= seq; ++t) r.bytes += int64_t(tk->decode({ids[size_t(w * stride + t)]}).size());
  if (mode == "sequence") {
    const auto eng = make_engine(m, resolve_wtype(m, dtype), true);
    r.loss = evaluate_split(*eng, ids, seq, windows);
  } else {
    LINMIX_CHECK(dtype.empty() || dtype == "f32", "--dtype applies to --mode sequence only");
    r.loss = evaluate_split(m, ids, seq, windows, mode == "recurrent");
  }
  r.bits_per_byte = r.loss * double(r.tokens) / double(std::max<int64_t>(r.bytes, 1)) / std::log(2.0);
  return r;
}

}  // namespace linmix
