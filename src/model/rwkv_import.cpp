// RWKV-4/5/6/7 checkpoints as their users have them: BlinkDL's names (the .pth files of
// RWKV-LM / ChatRWKV / rwkv.cpp, converted to safetensors by scripts/convert_rwkv.py) or Hugging
// Face's (RwkvForCausalLM, RWKV/v5-*, RWKV/v6-*: rwkv.blocks.N.attention.*). The version comes
// from the tensors (docs/RWKV.md), every size from their shapes; the model is linmix's Model
// with the rwkv4 or rwkv5/6/7 layers, whose parameter names are BlinkDL's. Every v5 layout is
// stored as 5.2's (per-channel decay and bonus, time_faaaa); a missing, extra or mis-shaped
// tensor is refused by name with the version.
#include <algorithm>
#include <cmath>
#include <regex>

#include "import_util.h"
#include "linmix/model.h"
#include "linmix/train.h"

namespace linmix {

namespace {

// Hugging Face name -> BlinkDL name ("" when the tensor is not part of the model).
std::string from_hf(const std::string& n) {
  static const std::vector<std::pair<std::regex, std::string>> rules = {
      {std::regex(R"(^rwkv\.embeddings\.weight$)"), "emb.weight"},
      {std::regex(R"(^rwkv\.blocks\.0\.pre_ln\.(weight|bias)$)"), "blocks.0.ln0.$1"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.(ln1|ln2)\.(weight|bias)$)"), "blocks.$1.$2.$3"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.attention\.time_(decay|first)$)"), "blocks.$1.att.time_$2"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.attention\.time_mix_key$)"), "blocks.$1.att.time_mix_k"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.attention\.time_mix_value$)"), "blocks.$1.att.time_mix_v"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.attention\.time_mix_receptance$)"), "blocks.$1.att.time_mix_r"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.attention\.(key|value|receptance|output)\.weight$)"),
       "blocks.$1.att.$2.weight"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_key$)"), "blocks.$1.ffn.time_mix_k"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_receptance$)"), "blocks.$1.ffn.time_mix_r"},
      {std::regex(R"(^rwkv\.blocks\.(\d+)\.feed_forward\.(key|value|receptance)\.weight$)"),
       "blocks.$1.ffn.$2.weight"},
      {std::regex(R"(^rwkv\.ln_out\.(weight|bias)$)"), "ln_out.$1"},
      {std::regex(R"(^head\.weight$)"), "head.weight"},
  };
  for (const auto& [re, fmt] : rules)
    if (std::regex_match(n, re)) return std::regex_replace(n, re, fmt);
  // RWKV-5/6 (RWKV/v5-*, RWKV/v6-*): attention.* / feed_forward.* keep BlinkDL's tensor names
  // after the part, but for the mixes' long names
  static const std::regex part(R"(^rwkv\.blocks\.(\d+)\.(attention|feed_forward)\.(.+)$)");
  std::smatch m;
  if (std::regex_match(n, m, part)) {
    std::string rest = m[3];
    static const std::vector<std::pair<std::string, std::string>> longn = {
        {"time_mix_key", "time_mix_k"}, {"time_mix_value", "time_mix_v"}, {"time_mix_receptance", "time_mix_r"},
        {"time_mix_gate", "time_mix_g"}};
    for (const auto& [a, b] : longn)
      if (rest == a) rest = b;
    return "blocks." + std::string(m[1]) + (m[2] == "attention" ? ".att." : ".ffn.") + rest;
  }
  return "";
}

}  // namespace

bool looks_like_rwkv(const TensorMap& t) {
  return (t.count("emb.weight") && t.count("blocks.0.ln1.weight")) ||
         (t.count("rwkv.embeddings.weight") && t.count("rwkv.blocks.0.ln1.weight"));
}

std::string rwkv_version(const TensorMap& t) {  // docs/RWKV.md: the first tensor present decides
  if (t.count("blocks.0.att.k_k")) return "7.0";
  if (t.count("blocks.0.att.time_maa_x")) return "6.0";
  if (t.count("blocks.0.att.gate.weight") && t.count("blocks.0.att.ln_x.weight")) return "5.2";
  if (t.count("blocks.0.att.ln_x.weight")) return "5.1";
  return "4";
}

std::unique_ptr<Model> import_rwkv(TensorMap tensors, const std::string& what, const std::string& gn_eps,
                                   std::string* version) {
  if (tensors.count("rwkv.embeddings.weight")) {  // Hugging Face names
    TensorMap renamed;
    for (auto& [n, t] : tensors) {
      const std::string b = from_hf(n);
      LINMIX_CHECK(!b.empty(), what + ": Hugging Face RWKV checkpoint with an unknown tensor '" + n + "'");
      renamed[b] = std::move(t);
    }
    tensors = std::move(renamed);
  }
  const std::string ver = rwkv_version(tensors);
  if (version) *version = ver;
  const std::string tag = what + ": RWKV-" + ver + " checkpoint: ";
  auto need = [&](const std::string& n) -> Tensor& {
    auto it = tensors.find(n);
    LINMIX_CHECK(it != tensors.end(), tag + "no tensor '" + n + "'");
    return it->second;
  };
  const Tensor& emb = need("emb.weight");
  LINMIX_CHECK(emb.rank() == 2, tag + "tensor 'emb.weight': expected rank 2 [V,C], found " + shape_str(emb.shape));
  const int64_t V = emb.dim(0), C = emb.dim(1);
  LINMIX_CHECK(V >= 2 && C >= 1, tag + "tensor 'emb.weight': expected [V,C] with V >= 2 and C >= 1, found " +
                                     shape_str(emb.shape));
  int64_t L = 0;
  while (tensors.count("blocks." + std::to_string(L) + ".ln1.weight")) ++L;
  LINMIX_CHECK(L >= 1, tag + "no blocks (no 'blocks.0.ln1.weight')");
  const Tensor& fk = need("blocks.0.ffn.key.weight");
  LINMIX_CHECK(fk.rank() == 2 && fk.dim(1) == C && fk.dim(0) >= 1,
               tag + "tensor 'blocks.0.ffn.key.weight': expected [F," + std::to_string(C) + "], found " +
                   shape_str(fk.shape));
  ModelConfig cfg;
  cfg.vocab = V, cfg.d_model = C, cfg.n_layer = L, cfg.n_head = 1, cfg.ctx = 1;
  cfg.ffn_dim = fk.dim(0), cfg.ln0 = true, cfg.pos_emb = 0;
  if (ver == "4") {
    cfg.channel_mix = "rwkv";
    cfg.layers.assign(size_t(L), LayerConfig{"rwkv4", {}});
  } else {
    // heads: v5 time_decay [H] or [H,N]; v6 time_faaaa [H,N]; v7 r_k [H,N]
    const std::string hname = ver[0] == '5' ? "time_decay" : ver == "6.0" ? "time_faaaa" : "r_k";
    const Tensor& ht = need("blocks.0.att." + hname);
    LINMIX_CHECK(ver[0] == '5' ? (ht.rank() == 1 || ht.rank() == 2) : ht.rank() == 2,
                 tag + "tensor 'blocks.0.att." + hname + "': expected [H,N]" + (ver[0] == '5' ? " or [H]" : "") +
                     ", found " + shape_str(ht.shape));
    const int64_t H = ht.dim(0);
    LINMIX_CHECK(H >= 1 && C % H == 0, tag + "its " + std::to_string(H) + " heads (the first dimension of the "
                                           "head tensor) do not divide C = " + std::to_string(C));
    const int64_t N = C / H;
    cfg.n_head = H;
    LayerConfig lc{ver[0] == '5' ? "rwkv5" : ver == "6.0" ? "rwkv6" : "rwkv7", {}};
    cfg.channel_mix = ver[0] == '5' ? "rwkv" : ver == "6.0" ? "rwkv6" : "rwkv7";
    if (ver == "5.1") lc.params["gate"] = "0";
    if (!gn_eps.empty()) lc.params["gn_eps"] = gn_eps;
    auto width = [&](const char* n, int d) {
      const Tensor& t = need(std::string("blocks.0.att.") + n);
      LINMIX_CHECK(t.rank() >= 2, tag + "tensor 'blocks.0.att." + n + "': expected a matrix, found " + shape_str(t.shape));
      return std::to_string(t.dim(d));
    };
    if (ver == "6.0") {
      const Tensor& w2 = need("blocks.0.att.time_maa_w2");
      LINMIX_CHECK(w2.rank() == 3 && w2.dim(0) == 5, tag + "tensor 'blocks.0.att.time_maa_w2': expected [5,D_mix," +
                                                         std::to_string(C) + "], found " + shape_str(w2.shape));
      lc.params["d_mix"] = std::to_string(w2.dim(1)), lc.params["d_decay"] = width("time_decay_w1", 1);
    }
    if (ver == "7.0") {
      lc.params["d_w"] = width("w1", 1), lc.params["d_a"] = width("a1", 1), lc.params["d_g"] = width("g1", 1);
      lc.params["d_v"] = "32";  // (unused with one layer)
      if (L > 1) {
        const Tensor& v1 = need("blocks.1.att.v1");
        LINMIX_CHECK(v1.rank() == 2, tag + "tensor 'blocks.1.att.v1': expected [C,D_v], found " + shape_str(v1.shape));
        lc.params["d_v"] = std::to_string(v1.dim(1));
      }
      for (const char* n : {"v0", "v1", "v2"})  // layer 0's value-residual LoRA: trained code makes it, unused
        tensors.erase(std::string("blocks.0.att.") + n);
    }
    cfg.layers.assign(size_t(L), lc);
    if (ver[0] == '5')  // every v5 layout as 5.2's: per-head decay and bonus broadcast, time_first -> e^time_first
      for (int64_t l = 0; l < L; ++l) {
        const std::string p = "blocks." + std::to_string(l) + ".att.";
        auto to_hn = [&](Tensor& t, const std::string& n, bool exp_of) {
          LINMIX_CHECK(t.numel() == H || t.numel() == C,
                       tag + "tensor '" + n + "': expected [" + std::to_string(H) + "] or [" + std::to_string(H) + "," +
                           std::to_string(N) + "], found " + shape_str(t.shape));
          check_finite(n, t);
          Tensor o({H, N});
          for (int64_t i = 0; i < C; ++i) {
            const float x = t.numel() == H ? t.data[size_t(i / N)] : t.data[size_t(i)];
            o.data[size_t(i)] = exp_of ? std::exp(x) : x;
          }
          t = std::move(o);
        };
        to_hn(need(p + "time_decay"), p + "time_decay", false);
        const bool first = tensors.count(p + "time_first") > 0;
        LINMIX_CHECK(first != (tensors.count(p + "time_faaaa") > 0),
                     tag + "layer " + std::to_string(l) + " needs exactly one bonus tensor, '" + p + "time_first' or '" +
                         p + "time_faaaa'");
        Tensor& b = need(p + (first ? "time_first" : "time_faaaa"));
        to_hn(b, p + (first ? "time_first" : "time_faaaa"), first);
        if (first) tensors[p + "time_faaaa"] = std::move(b), tensors.erase(p + "time_first");
      }
  }
  // BlinkDL stores vectors as [1,1,C] (time_decay/first of RWKV-4 as [C] or [1,1,C]): any shape
  // with the same elements in the same order is the same vector
  auto vector_like = [](const std::string&, const Tensor& a, const Tensor& b) {
    auto ones = [](const Tensor& x) { return std::count_if(x.shape.begin(), x.shape.end(), [](int64_t d) { return d != 1; }); };
    return numel_of(a.shape) == numel_of(b.shape) && ones(a) <= 1 && ones(b) <= 1;
  };
  return model_from_tensors(cfg, tensors, tag, vector_like, [](const std::string& n) {
    return n.find("time_state") != std::string::npos ? std::string(" (a state-tuned initial state: not supported)") : "";
  });
}

}  // namespace linmix
