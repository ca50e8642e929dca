// RWKV-4 checkpoints as their users have them: BlinkDL's names (as in the .pth files of
// ChatRWKV / rwkv.cpp, converted to safetensors by scripts/convert_rwkv4.py) or Hugging Face's
// RwkvForCausalLM names. Semantics: MIXERS.md "The RWKV-4 language model" (linmix's Model with
// rwkv4 time-mix, RWKV channel-mix and ln0), so both naming schemes map onto linmix's
// parameter names, which are BlinkDL's.
#include <regex>

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
  return "";
}

}  // namespace

bool looks_like_rwkv4(const TensorMap& t) {
  return (t.count("emb.weight") && t.count("blocks.0.att.time_decay")) ||
         (t.count("rwkv.embeddings.weight") && t.count("rwkv.blocks.0.attention.time_decay"));
}

std::unique_ptr<Model> import_rwkv4(TensorMap tensors, const std::string& what) {
  if (tensors.count("rwkv.embeddings.weight")) {  // Hugging Face names
    TensorMap renamed;
    for (auto& [n, t] : tensors) {
      const std::string b = from_hf(n);
      if (!b.empty()) renamed[b] = std::move(t);
    }
    tensors = std::move(renamed);
  }
  auto need = [&](const std::string& n) -> const Tensor& {
    auto it = tensors.find(n);
    LINMIX_CHECK(it != tensors.end(), what + ": RWKV-4 checkpoint without tensor '" + n + "'");
    return it->second;
  };
  const Tensor& emb = need("emb.weight");
  LINMIX_CHECK(emb.rank() == 2, what + ": tensor 'emb.weight': expected rank 2 [V,C], found " + shape_str(emb.shape));
  const int64_t V = emb.dim(0), C = emb.dim(1);
  LINMIX_CHECK(V >= 2 && C >= 1, what + ": tensor 'emb.weight': expected [V,C] with V >= 2 and C >= 1, found " +
                                     shape_str(emb.shape));
  int64_t L = 0;
  while (tensors.count("blocks." + std::to_string(L) + ".ln1.weight")) ++L;
  LINMIX_CHECK(L >= 1, what + ": RWKV-4 checkpoint without blocks (no 'blocks.0.ln1.weight')");
  const Tensor& fk = need("blocks.0.ffn.key.weight");
  LINMIX_CHECK(fk.rank() == 2 && fk.dim(1) == C && fk.dim(0) % C == 0,
               what + ": tensor 'blocks.0.ffn.key.weight': expected [F," + std::to_string(C) +
                   "] with F a multiple of C, found " + shape_str(fk.shape));
  ModelConfig cfg;
  cfg.vocab = V, cfg.d_model = C, cfg.n_layer = L, cfg.n_head = 1, cfg.ctx = 1;
  cfg.channel_mix = "rwkv", cfg.ffn_mult = fk.dim(0) / C, cfg.ln0 = true, cfg.pos_emb = 0;
  cfg.layers.assign(L, LayerConfig{"rwkv4", {}});
  auto model = std::make_unique<Model>(cfg);
  for (auto& [n, p] : model->params()) {
    const Tensor& t = need(n);
    // BlinkDL stores the mixes as (1,1,C) and time_decay/first as (C) or (1,1,C): any shape with
    // the same elements in the same order is the same vector.
    const bool vector_like = p.rank() == 1 && t.numel() == p.numel() &&
                             std::count_if(t.shape.begin(), t.shape.end(), [](int64_t d) { return d != 1; }) <= 1;
    LINMIX_CHECK(t.shape == p.shape || vector_like, what + ": tensor '" + n + "': expected shape " +
                                                        shape_str(p.shape) + ", found " + shape_str(t.shape));
    check_finite(n, t);
    p.data = t.data;
  }
  return model;
}

}  // namespace linmix
