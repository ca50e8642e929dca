// linmix bench --model: the RWKV-4 inference engine on the 169M shape with random weights.
//   decode: ms per token in each weight type, as a fraction of the bandwidth bound
//           (bytes of weights read per token / triad bandwidth measured beside it);
//   prefill: sequence mode over prefill_tokens, GFLOP/s as a fraction of the measured sgemm.
//   memory: the peak resident set of decode (the high-water mark reset before it) against the
//           engine's resident weights + state + logits; each type's engine takes a fresh model's
//           weights, so no FP32 copy stays beside a BF16 / INT8 one.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "linmix/bench.h"
#include "linmix/profile.h"
#include "linmix/error.h"
#include "linmix/engine.h"
#include "linmix/safetensors.h"
#include "linmix/train.h"

namespace linmix {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
constexpr double kMiB = 1024.0 * 1024.0;
}  // namespace

int bench_model(const ModelBenchOptions& opt) {
  ModelBenchOptions o = opt;
  const bool mamba2 = o.version == "mamba2", mamba = o.version == "mamba" || mamba2;
  LINMIX_CHECK(o.version == "4" || o.version == "5" || o.version == "6" || o.version == "7" || mamba,
               "--version must be 4, 5, 6, 7, mamba or mamba2, found '" + o.version + "'");
  if (!o.size.empty()) {  // the released models' shapes (BlinkDL: L12 C768, L24 C1024, L24 C2048;
                          // state-spaces/mamba and mamba2: L24 C768 (130m), L48 C1024 (370m), L48 C2048
                          // (1.4b / 1.3b); Mamba-2 with state 128, heads of 64, one group)
    LINMIX_CHECK(o.size == "0.1B" || o.size == "0.4B" || o.size == "1.5B", "--size must be 0.1B, 0.4B or 1.5B, found '" + o.size + "'");
    o.n_layer = o.size == "0.1B" ? 12 : 24, o.d_model = o.size == "0.1B" ? 768 : o.size == "0.4B" ? 1024 : 2048;
    o.vocab = o.version == "4" ? 50277 : 65536;
    if (mamba) o.n_layer *= 2, o.vocab = 50280;
  }
  LINMIX_CHECK(o.version == "4" || (mamba && !mamba2) || o.d_model % 64 == 0,
               "--d-model must be a multiple of the head size 64 for " + std::string(mamba2 ? "Mamba-2" : "RWKV-" + o.version));
  // the optional quality check's inputs are read first: a bad path fails before any timing
  std::optional<Checkpoint> ck;
  std::vector<uint8_t> text;  // --data, for the perplexity of --checkpoint
  if (!o.checkpoint.empty()) {
    ck = load_checkpoint(o.checkpoint);
    std::string why;
    LINMIX_CHECK(engine_supports(ck->model->config(), &why), o.checkpoint + ": no inference engine runs it: " + why);
    std::ifstream f(o.data, std::ios::binary);
    LINMIX_CHECK(f.good(), o.data + ": cannot open");
    text.assign((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  }
  set_threads(o.threads);
  nlohmann::json rep;
  rep["threads"] = o.threads;
  const int64_t F = mamba ? 0 : o.version == "5" || o.version == "6" ? int64_t(3.5 * double(o.d_model)) / 32 * 32 : o.ffn_mult * o.d_model;
  std::printf("linmix bench --model: %s%s L=%lld C=%lld V=%lld F=%lld, random weights, %d threads\n",
              mamba ? "" : "RWKV-", mamba2 ? "Mamba-2" : mamba ? "Mamba" : o.version.c_str(), (long long)o.n_layer, (long long)o.d_model, (long long)o.vocab, (long long)F, o.threads);
  rep["version"] = o.version, rep["n_layer"] = o.n_layer, rep["d_model"] = o.d_model, rep["vocab"] = o.vocab;
  // The machine is shared: its bandwidth drifts by tens of percent within a minute. Each limit is
  // therefore measured again right beside what is compared with it (decode rounds interleave
  // triad, read stream and decode; prefill follows its own sgemm), and ratios are per round.
  // The read stream over 3x the last-level cache (at least 512 MiB, at most 1 GiB): this VM reports
  // 480 MiB of L3, and over 256 MiB the stream ran partly from it (decode's ratios went past 100%)
  const long l3 = ::sysconf(_SC_LEVEL3_CACHE_SIZE);
  const int64_t evict_floats = std::min<int64_t>(int64_t(1) << 30, std::max<int64_t>(int64_t(1) << 29, 3 * int64_t(std::max(l3, 0L)))) / 4;
  const double bw0 = measure_triad_gbs(int64_t(1) << 25, 5), rd0 = measure_read_gbs(evict_floats, 3);
  const double gf0 = measure_sgemm_gflops(2048, 3);
  std::printf("limits at start: triad %.1f GB/s, read stream %.1f GB/s, sgemm (2048^3) %.1f GFLOP/s\n", bw0, rd0, gf0);
  rep["triad_gbs"] = bw0, rep["read_gbs"] = rd0, rep["sgemm_gflops"] = gf0;

  const std::string mixer = mamba ? o.version : "rwkv" + o.version,
                    cm = mamba ? "none" : o.version == "4" || o.version == "5" ? "rwkv" : mixer;
  ModelConfig cfg = ModelConfig::from_json(
      "{\"vocab\": " + std::to_string(o.vocab) + ", \"d_model\": " + std::to_string(o.d_model) +
      ", \"n_layer\": " + std::to_string(o.n_layer) + ", \"ffn_dim\": " + std::to_string(F) +
      ", \"n_head\": " + std::to_string(mamba2 ? 2 * o.d_model / 64 : o.version == "4" || mamba ? 1 : o.d_model / 64) +
      ", \"mixer\": \"" + mixer + "\", \"channel_mix\": \"" + cm + "\", \"ln0\": " +
      (mamba ? "false, \"norm\": \"rmsnorm\", \"state\": " + std::string(mamba2 ? "128" : "16") : "true") + "}");
  const double rss0 = rss_bytes() / kMiB;  // the process before any model: code, libraries, buffers
  {
    const Model model(cfg);
    std::printf("%lld parameters\n\n", (long long)model.num_params());
    rep["params"] = model.num_params();
  }
  const Model shell(cfg, false);  // the config's state layout, no weights

  std::vector<int32_t> toks(std::max(o.prefill_tokens, o.decode_tokens + 4));
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = int32_t((i * 7919 + 13) % o.vocab);
  std::vector<float> lg(o.vocab);
  std::printf("decode: median of %d rounds of %lld tokens, each beside a triad and a read-stream measurement;\n"
              "'of triad' = (bytes of weights per token / decode time) / triad GB/s of the same round; 'of read' the\n"
              "same against the round's read stream over 3x the last-level cache (from memory: a decode whose\n"
              "weights stay in the cache between tokens can pass it)\n\n",
              o.rounds, (long long)o.decode_tokens);
  std::printf("%-6s %9s %10s %8s %9s %8s %8s %12s %9s %9s %10s %9s\n", "dtype", "MB/token", "decode ms", "GB/s",
              "of triad", "of read", "triad", "prefill tok/s", "GFLOP/s", "of sgemm", "all-logits", "of sgemm");
  std::printf("%-6s %9s %10s %8s %9s %8s %8s %12s %9s %9s %10s %9s\n", "", "", "", "", "", "", "GB/s", "", "", "",
              "GFLOP/s", "");
  double f32_ms = 0;
  std::vector<std::string> mem_lines, flush_lines;
  // decode with the weights out of the caches: before each timed token a pass over a buffer of 3x
  // the last-level cache (at least 512 MiB; this machine reports 480 MiB of L3, where an INT8
  // 169M model would otherwise stay)
  std::vector<float> evict_buf;  // held only while the flushed tokens run (not in decode's peak RSS)
  auto evict = [&] {
    if (evict_buf.empty()) evict_buf.assign(size_t(evict_floats), 1.0f);
    float s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (int64_t i = 0; i < evict_floats; i += 16) s += evict_buf[size_t(i)];
    volatile float keep = s;
    (void)keep;
  };
  for (const std::string& dt : o.dtypes) {
    std::unique_ptr<Engine> engp;
    {  // the same random weights for every type (seed 1); the engine takes them, the model goes
      Model model(cfg);
      model.init(1);
      engp = make_engine(model, parse_wtype(dt), true);
    }
    Engine& eng = *engp;
    nlohmann::json r;
    // memory of decode: the high-water mark reset, a state and decode_tokens tokens
    {
      reset_peak_rss();
      Model::State sm = eng.new_state();
      for (int64_t i = 0; i < o.decode_tokens; ++i) eng.step(toks[i % toks.size()], sm, lg.data());
      const double peak = peak_rss_bytes() / kMiB;
      double state_b = 0;
      for (const auto& [n, t] : shell.state_tensors(sm)) state_b += 4.0 * double(t.numel());
      // resident weights: what a token reads, plus the embedding rows it does not (FP32)
      const double weights_b = eng.step_bytes() + 4.0 * double(o.vocab - 1) * double(o.d_model);
      const double bound = (weights_b + state_b + 4.0 * double(o.vocab)) / kMiB;
      r["decode_peak_rss_mib"] = peak, r["decode_rss_bound_mib"] = bound, r["process_base_rss_mib"] = rss0;
      char line[200];
      std::snprintf(line, sizeof line, "%-6s %12.1f %14.1f %9.2fx %18.2fx", dt.c_str(), peak, bound, peak / bound,
                    (peak - rss0) / bound);
      mem_lines.push_back(line);
    }
    // decode: 4 warm-up tokens, then rounds of (limits, decode_tokens tokens)
    Model::State st = eng.new_state();
    for (int i = 0; i < 4; ++i) eng.step(toks[i], st, lg.data());
    const double bytes = eng.step_bytes();
    std::vector<double> ms_r, tri_r, rd_r, of_tri, of_rd;
    for (int round = 0; round < o.rounds; ++round) {
      const double tri = measure_triad_gbs(int64_t(1) << 25, 3), rd = measure_read_gbs(evict_floats, 2);
      const double t0 = now_s();
      for (int64_t i = 0; i < o.decode_tokens; ++i) eng.step(toks[(4 + i) % toks.size()], st, lg.data());
      const double m = (now_s() - t0) * 1e3 / double(o.decode_tokens);
      ms_r.push_back(m), tri_r.push_back(tri), rd_r.push_back(rd);
      of_tri.push_back(bytes / (m * 1e-3) / 1e9 / tri), of_rd.push_back(bytes / (m * 1e-3) / 1e9 / rd);
    }
    if (o.profile) {  // the same tokens once more, their regions timed
      profile::reset(), profile::set_enabled(true);
      for (int64_t i = 0; i < o.decode_tokens; ++i) {
        const profile::Scope all("decode");
        eng.step(toks[(4 + i) % toks.size()], st, lg.data());
      }
      profile::set_enabled(false);
      std::printf("%s decode, ms per token by region (a row includes the rows under it):\n", dt.c_str());
      for (const auto& row : profile::rows())
        std::printf("  %-40s %9.3f ms %8.1f calls a token\n", row.path.c_str(), row.seconds * 1e3 / double(o.decode_tokens),
                    double(row.calls) / double(o.decode_tokens));
    }
    {  // the same tokens, each after the caches were flushed
      std::vector<double> fl;
      for (int64_t i = 0; i < std::min<int64_t>(o.decode_tokens, 16); ++i) {
        evict();
        const double t0 = now_s();
        eng.step(toks[(4 + i) % toks.size()], st, lg.data());
        fl.push_back((now_s() - t0) * 1e3);
      }
      std::vector<float>().swap(evict_buf);
      const double fm = median(fl), rd = median(rd_r);
      char line[200];
      std::snprintf(line, sizeof line, "%-6s %10.2f %10.1f %9.0f%%", dt.c_str(), fm, bytes / (fm * 1e-3) / 1e9,
                    100.0 * bytes / (fm * 1e-3) / 1e9 / rd);
      flush_lines.push_back(line);
      r["decode_flushed_ms"] = fm, r["decode_flushed_of_read"] = bytes / (fm * 1e-3) / 1e9 / rd;
    }
    const double ms = median(ms_r), gbs = bytes / (ms * 1e-3) / 1e9, bw = median(tri_r);
    if (dt == "f32") f32_ms = ms;
    r["decode_rounds_ms"] = ms_r, r["decode_rounds_triad_gbs"] = tri_r, r["decode_rounds_read_gbs"] = rd_r;
    // prefill: best of 3 runs of prefill_tokens from a zero state, logits of the last token
    double best = 1e30;
    for (int rep_i = 0; rep_i < 3; ++rep_i) {
      Model::State s2 = eng.new_state();
      const double p0 = now_s();
      eng.sequence(toks.data(), o.prefill_tokens, s2, lg.data());
      best = std::min(best, now_s() - p0);
    }
    if (o.profile) {  // one more prefill, its regions timed
      Model::State s2 = eng.new_state();
      profile::reset(), profile::set_enabled(true);
      {
        const profile::Scope all("prefill");
        eng.sequence(toks.data(), o.prefill_tokens, s2, lg.data());
      }
      profile::set_enabled(false);
      std::printf("%s prefill of %lld tokens, ms by region (a row includes the rows under it):\n", dt.c_str(),
                  (long long)o.prefill_tokens);
      for (const auto& row : profile::rows())
        std::printf("  %-40s %9.2f ms %6lld calls\n", row.path.c_str(), row.seconds * 1e3, (long long)row.calls);
    }
    const double flops = eng.flops_per_token(false) * double(o.prefill_tokens) + 2.0 * double(o.vocab * o.d_model);
    const double pgf = flops / best / 1e9, gf = measure_sgemm_gflops(2048, 3);
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
    const double gf2 = measure_sgemm_gflops(2048, 3);
    r["all_logits_s"] = best_all, r["all_logits_gflops"] = agf, r["all_logits_of_sgemm"] = agf / gf2;
    std::printf("%-6s %9.1f %10.2f %8.1f %8.0f%% %7.0f%% %8.1f %12.0f %9.1f %8.0f%% %10.1f %8.0f%%\n", dt.c_str(),
                bytes / 1e6, ms, gbs, 100.0 * median(of_tri), 100.0 * median(of_rd), bw, double(o.prefill_tokens) / best,
                pgf, 100.0 * pgf / gf, agf, 100.0 * agf / gf2);
    r["bytes_per_token"] = bytes, r["decode_ms"] = ms, r["decode_gbs"] = gbs, r["decode_triad_gbs"] = bw;
    r["decode_of_bandwidth"] = median(of_tri), r["decode_of_read"] = median(of_rd);
    r["prefill_sgemm_gflops"] = gf, r["all_logits_sgemm_gflops"] = gf2;
    r["prefill_tokens"] = o.prefill_tokens, r["prefill_s"] = best, r["prefill_gflops"] = pgf;
    r["prefill_of_sgemm"] = pgf / gf;
    if (f32_ms > 0) r["decode_speedup_vs_f32"] = f32_ms / ms;
    rep["dtypes"][dt] = r;
  }
  if (f32_ms > 0)
    for (const std::string& dt : o.dtypes)
      if (dt != "f32")
        std::printf("%s decode is %.2fx the f32 decode\n", dt.c_str(), rep["dtypes"][dt]["decode_speedup_vs_f32"].get<double>());
  std::printf("\ndecode with the caches flushed: median of %lld tokens, each after a pass over %.0f MiB (3x the\n"
              "last-level cache, at least 512 MiB); 'of read' against the median read stream of the rounds above\n",
              (long long)std::min<int64_t>(o.decode_tokens, 16), double(evict_floats) * 4.0 / kMiB);
  std::printf("%-6s %10s %10s %10s\n", "dtype", "decode ms", "GB/s", "of read");
  for (const std::string& l : flush_lines) std::printf("%s\n", l.c_str());
  std::printf("\nmemory of decode (MiB): peak RSS over %lld tokens from a fresh state; bound = the engine's weights\n"
              "(the FP32 embedding included) + state + logits; the process held %.1f MiB before any model\n",
              (long long)o.decode_tokens, rss0);
  std::printf("%-6s %12s %14s %10s %19s\n", "dtype", "peak RSS", "bound", "of bound", "above base, of bound");
  for (const std::string& l : mem_lines) std::printf("%s\n", l.c_str());

  if (o.load) {  // start-up: these weights as a checkpoint file (in the page cache), loaded into each type's engine
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("linmix-bench-load-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    struct Remove {
      fs::path d;
      ~Remove() {
        std::error_code ec;
        fs::remove_all(d, ec);
      }
    } remove{dir};
    const std::string f32_file = (dir / "f32.safetensors").string();
    {
      Model model(cfg);
      model.init(1);
      save_checkpoint(f32_file, model, AdamW{}, 0, "{}");
    }
    // best of 3 of load_checkpoint + make_engine (the engine kept until the clock stops)
    auto time_load = [&](const std::string& file, WType t) {
      double best = 1e30;
      for (int i = 0; i < 3; ++i) {
        const double t0 = now_s();
        Checkpoint c = load_checkpoint(file);
        const auto e = make_engine(*c.model, t, true);
        best = std::min(best, now_s() - t0);
      }
      return best;
    };
    std::printf("\nload: a checkpoint file of these weights (in the page cache) into each type's engine, best of 3;\n"
                "'converted' = the file linmix convert writes for the type (read as stored), 'from f32' = the FP32\n"
                "checkpoint converted while loading\n");
    std::printf("%-6s %10s %12s %10s %14s\n", "dtype", "file MB", "converted s", "s per GB", "from f32 s");
    for (const std::string& dt : o.dtypes) {
      const WType t = parse_wtype(dt);
      std::string file = f32_file;
      if (t != WType::F32) {
        file = (dir / (dt + ".safetensors")).string();
        convert_checkpoint(f32_file, file, t, true);
      }
      const double mb = double(fs::file_size(file)) / 1e6, s = time_load(file, t);
      const double from = t == WType::F32 ? s : time_load(f32_file, t);
      std::printf("%-6s %10.1f %12.3f %10.2f %14.3f\n", dt.c_str(), mb, s, s / (mb / 1e3), from);
      rep["load"][dt] = {{"file_mb", mb}, {"load_s", s}, {"s_per_gb", s / (mb / 1e3)}, {"from_f32_s", from}};
      if (t != WType::F32) fs::remove(file);
    }
  }

  if (ck) {  // quality of the rounded weights on a trained model
    std::printf("\nperplexity of %s on %s (%lld windows of %lld):\n", o.checkpoint.c_str(), o.data.c_str(),
                (long long)o.eval_windows, (long long)o.eval_seq);
    double base = 0;
    for (const std::string& dt : o.dtypes) {
      const auto eng = make_engine(*ck->model, parse_wtype(dt));
      const double loss = evaluate_split(*eng, text, o.eval_seq, o.eval_windows), ppl = std::exp(loss);
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
