// Mamba checkpoints as Hugging Face publishes them (MambaForCausalLM safetensors: state-spaces/
// mamba-*-hf; mamba_ssm's own files differ only in backbone.embedding): backbone.embeddings, backbone.layers.N.norm (RMSNorm), backbone.layers.N.mixer.
// {in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj}, backbone.norm_f, lm_head (or tied to
// the embeddings). They become linmix's Model with mamba layers, RMSNorm and no channel mix;
// E, N, R, V, C, L come from the shapes; a missing, extra or mis-shaped tensor is refused by name.
#include <regex>

#include "import_util.h"
#include "linmix/model.h"
#include "linmix/train.h"

namespace linmix {

bool looks_like_mamba(const TensorMap& t) {
  return (t.count("backbone.embeddings.weight") || t.count("backbone.embedding.weight")) &&
         t.count("backbone.layers.0.mixer.A_log");
}

std::unique_ptr<Model> import_mamba(TensorMap tensors, const std::string& what) {
  const std::string tag = what + ": Mamba checkpoint: ";
  if (!tensors.count("backbone.embeddings.weight") && tensors.count("backbone.embedding.weight")) {
    // mamba_ssm's own names (state-spaces/mamba-*): the same but for the embedding's
    tensors["backbone.embeddings.weight"] = std::move(tensors.at("backbone.embedding.weight"));
    tensors.erase("backbone.embedding.weight");
  }
  auto need = [&](const std::string& n) -> Tensor& {
    auto it = tensors.find(n);
    LINMIX_CHECK(it != tensors.end(), tag + "no tensor '" + n + "'");
    return it->second;
  };
  const Tensor& emb = need("backbone.embeddings.weight");
  LINMIX_CHECK(emb.rank() == 2 && emb.dim(0) >= 2 && emb.dim(1) >= 1,
               tag + "tensor 'backbone.embeddings.weight': expected [V,C], found " + shape_str(emb.shape));
  const int64_t V = emb.dim(0), C = emb.dim(1);
  int64_t L = 0;
  while (tensors.count("backbone.layers." + std::to_string(L) + ".norm.weight")) ++L;
  LINMIX_CHECK(L >= 1, tag + "no layers (no 'backbone.layers.0.norm.weight')");
  const Tensor &alog = need("backbone.layers.0.mixer.A_log"), &dtw = need("backbone.layers.0.mixer.dt_proj.weight");
  LINMIX_CHECK(alog.rank() == 2 && dtw.rank() == 2,
               tag + "tensors 'A_log' [E,N] and 'dt_proj.weight' [E,R] of layer 0 have shapes " +
                   shape_str(alog.shape) + " and " + shape_str(dtw.shape));
  const int64_t E = alog.dim(0), N = alog.dim(1), R = dtw.dim(1);
  LINMIX_CHECK(E % C == 0, tag + "its inner width E = " + std::to_string(E) + " is not a multiple of C = " +
                               std::to_string(C) + " (linmix's mamba layer has E = expand C)");
  ModelConfig cfg;
  cfg.vocab = V, cfg.d_model = C, cfg.n_layer = L, cfg.n_head = 1, cfg.ctx = 1, cfg.pos_emb = 0, cfg.ln0 = false;
  cfg.channel_mix = "none", cfg.norm = "rmsnorm", cfg.expand = E / C, cfg.state = N;
  cfg.layers.assign(size_t(L), LayerConfig{"mamba", {{"dt_rank", std::to_string(R)}}});
  // names: HF -> linmix (the conv weight [E,1,K] is read as [E,K]; a missing lm_head is tied)
  TensorMap renamed;
  static const std::regex layer(R"(^backbone\.layers\.(\d+)\.(norm|mixer)\.(.+)$)");
  for (auto& [n, t] : tensors) {
    std::smatch m;
    std::string to;
    if (n == "backbone.embeddings.weight") to = "emb.weight";
    else if (n == "backbone.norm_f.weight") to = "ln_out.weight";
    else if (n == "lm_head.weight") to = "head.weight";
    else if (std::regex_match(n, m, layer)) {
      const std::string b = "blocks." + std::string(m[1]) + ".", part = m[2], rest = m[3];
      if (part == "norm" && rest == "weight") to = b + "ln1.weight";
      else if (part == "mixer" && rest == "conv1d.weight") to = b + "att.conv.weight";
      else if (part == "mixer" && rest == "conv1d.bias") to = b + "att.conv.bias";
      else if (part == "mixer") to = b + "att." + rest;
    }
    LINMIX_CHECK(!to.empty(), tag + "unexpected tensor '" + n + "'");
    renamed[to] = std::move(t);
  }
  if (!renamed.count("head.weight")) renamed["head.weight"] = renamed.at("emb.weight");  // tied
  // the conv weight [E,1,K] is linmix's [E,K]
  auto conv = [](const std::string& n, const Tensor& t, const Tensor& p) {
    return n.size() > 15 && n.compare(n.size() - 15, 15, "att.conv.weight") == 0 && t.rank() == 3 &&
           t.dim(0) == p.dim(0) && t.dim(1) == 1 && t.dim(2) == p.dim(1);
  };
  return model_from_tensors(cfg, renamed, tag, conv,
                            [](const std::string&) { return std::string(" (a bias linmix's Mamba block has not?)"); });
}

}  // namespace linmix
