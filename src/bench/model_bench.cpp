// linmix bench --model: the RWKV-4 inference engine on the 169M shape with random weights.
//   decode: ms per token in each weight type, as a fraction of the bandwidth bound
//           (bytes of weights read per token / measured triad bandwidth);
//   prefill: sequence mode over prefill_tokens, GFLOP/s as a fraction of the measured sgemm.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "linmix/bench.h"
#include "linmix/error.h"
#include "linmix/rwkv4.h"
#include "linmix/safetensors.h"
#include "linmix/train.h"

namespace linmix {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

int bench_model(const ModelBenchOptions& o) {
  set_threads(o.threads);
  nlohmann::json rep;
  rep["threads"] = o.threads;
  std::printf("linmix bench --model: RWKV-4 L=%lld C=%lld V=%lld F=%lld, random weights, %d threads\n",
              (long long)o.n_layer, (long long)o.d_model, (long long)o.vocab, (long long)(o.ffn_mult * o.d_model),
              o.threads);
  const double bw = measure_triad_gbs(int64_t(1) << 25, 5);
  const double gf = measure_sgemm_gflops(2048, 3);
  std::printf("limits: triad bandwidth %.1f GB/s, sgemm (2048^3) %.1f GFLOP/s\n", bw, gf);
  rep["triad_gbs"] = bw, rep["sgemm_gflops"] = gf;

  ModelConfig cfg = ModelConfig::from_json(
      "{\"vocab\": " + std::to_string(o.vocab) + ", \"d_model\": " + std::to_string(o.d_model) +
      ", \"n_layer\": " + std::to_string(o.n_layer) + ", \"ffn_mult\": " + std::to_string(o.ffn_mult) +
      ", \"mixer\": \"rwkv4\", \"channel_mix\": \"rwkv\", \"ln0\": true}");
  Model model(cfg);
  model.init(1);
  std::printf("%lld parameters\n\n", (long long)model.num_params());
  rep["params"] = model.num_params();

  std::vector<int32_t> toks(std::max(o.prefill_tokens, o.decode_tokens + 4));
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = int32_t((i * 7919 + 13) % o.vocab);
  std::vector<float> lg(o.vocab);
  std::printf("%-6s %10s %12s %10s %10s %12s %10s %10s %10s %10s\n", "dtype", "MB/token", "decode ms", "GB/s",
              "of bound", "prefill tok/s", "GFLOP/s", "of sgemm", "all-logits", "of sgemm");
  std::printf("%-6s %10s %12s %10s %10s %12s %10s %10s %10s %10s\n", "", "", "", "", "", "", "", "", "GFLOP/s", "");
  double f32_ms = 0;
  for (const std::string& dt : o.dtypes) {
    Rwkv4Engine eng(model, parse_wtype(dt));
    nlohmann::json r;
    // decode: 4 warm-up tokens, then the mean over decode_tokens
    Model::State st = eng.new_state();
    for (int i = 0; i < 4; ++i) eng.step(toks[i], st, lg.data());
    const double t0 = now_s();
    for (int64_t i = 0; i < o.decode_tokens; ++i) eng.step(toks[4 + i], st, lg.data());
    const double ms = (now_s() - t0) * 1e3 / double(o.decode_tokens);
    const double bytes = eng.step_bytes(), gbs = bytes / (ms * 1e-3) / 1e9;
    if (dt == "f32") f32_ms = ms;
    // prefill: best of 3 runs of prefill_tokens from a zero state, logits of the last token
    double best = 1e30;
    for (int rep_i = 0; rep_i < 3; ++rep_i) {
      Model::State s2 = eng.new_state();
      const double p0 = now_s();
      eng.sequence(toks.data(), o.prefill_tokens, s2, lg.data());
      best = std::min(best, now_s() - p0);
    }
    const double flops = eng.flops_per_token(false) * double(o.prefill_tokens) + 2.0 * double(o.vocab * o.d_model);
    const double pgf = flops / best / 1e9;
    // sequence mode with the logits of every token (scoring a text: eval, perplexity)
    double best_all = 1e30;
    {
      std::vector<float> all(size_t(o.prefill_tokens) * size_t(o.vocab));
      for (int rep_i = 0; rep_i < 2; ++rep_i) {
        Model::State s2 = eng.new_state();
        const double p0 = now_s();
        eng.sequence(toks.data(), o.prefill_tokens, s2, all.data(), true);
        best_all = std::min(best_all, now_s() - p0);
      }
    }
    const double agf = eng.flops_per_token(true) * double(o.prefill_tokens) / best_all / 1e9;
    r["all_logits_s"] = best_all, r["all_logits_gflops"] = agf, r["all_logits_of_sgemm"] = agf / gf;
    std::printf("%-6s %10.1f %12.2f %10.1f %9.0f%% %12.0f %10.1f %9.0f%% %10.1f %9.0f%%\n", dt.c_str(), bytes / 1e6, ms,
                gbs, 100.0 * gbs / bw, double(o.prefill_tokens) / best, pgf, 100.0 * pgf / gf, agf, 100.0 * agf / gf);
    r["bytes_per_token"] = bytes, r["decode_ms"] = ms, r["decode_gbs"] = gbs, r["decode_of_bandwidth"] = gbs / bw;
    r["prefill_tokens"] = o.prefill_tokens, r["prefill_s"] = best, r["prefill_gflops"] = pgf;
    r["prefill_of_sgemm"] = pgf / gf;
    if (f32_ms > 0) r["decode_speedup_vs_f32"] = f32_ms / ms;
    rep["dtypes"][dt] = r;
  }
  if (f32_ms > 0)
    for (const std::string& dt : o.dtypes)
      if (dt != "f32")
        std::printf("%s decode is %.2fx the f32 decode\n", dt.c_str(), rep["dtypes"][dt]["decode_speedup_vs_f32"].get<double>());

  if (!o.checkpoint.empty()) {  // quality of the rounded weights on a trained model
    Checkpoint ck = load_checkpoint(o.checkpoint);
    std::ifstream f(o.data, std::ios::binary);
    LINMIX_CHECK(f.good(), o.data + ": cannot open");
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::printf("\nperplexity of %s on %s (%lld windows of %lld):\n", o.checkpoint.c_str(), o.data.c_str(),
                (long long)o.eval_windows, (long long)o.eval_seq);
    double base = 0;
    for (const std::string& dt : o.dtypes) {
      Rwkv4Engine eng(*ck.model, parse_wtype(dt));
      const double loss = evaluate_split(eng, bytes, o.eval_seq, o.eval_windows), ppl = std::exp(loss);
      if (dt == "f32") base = ppl;
      std::printf("  %-5s loss %.6f nats/token, perplexity %.5f", dt.c_str(), loss, ppl);
      if (base > 0 && dt != "f32") std::printf(" (%+.3f%% vs f32)", 100.0 * (ppl / base - 1.0));
      std::printf("\n");
      rep["quality"][dt] = {{"loss", loss}, {"perplexity", ppl}};
    }
  }
  if (!o.out.empty()) write_file_atomic(o.out, rep.dump(2) + "\n");
  return 0;
}

}  // namespace linmix
