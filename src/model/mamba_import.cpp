// Mamba and Mamba-2 checkpoints as Hugging Face and mamba_ssm publish them:
// - Mamba (MambaForCausalLM safetensors: state-spaces/mamba-*-hf): backbone.embeddings,
//   backbone.layers.N.norm (RMSNorm), backbone.layers.N.mixer.{in_proj, conv1d, x_proj, dt_proj,
//   A_log [E,N], D, out_proj}, backbone.norm_f, lm_head (or tied to the embeddings);
// - Mamba-2 (mamba_ssm's MambaLMHeadModel with Mamba2 layers: state-spaces/mamba2-*, and Hugging
//   Face's Mamba2ForCausalLM): the same but the mixer's {in_proj (packed z, x, B, C, dt), conv1d
//   (over x, B, C, with bias), dt_bias, A_log [H], D [H], norm (the gated RMSNorm), out_proj};
// mamba_ssm's own files name the embedding backbone.embedding. They become linmix's Model with
// mamba / mamba2 layers (mamba_layer.cpp, mamba2_layer.cpp), RMSNorm and no channel mix; every
// size comes from the shapes but Mamba-2's groups (the shapes hold groups x state only: the file's
// metadata "n_groups", else 1 as every state-spaces/mamba2 release); a missing, extra or
// mis-shaped tensor is refused by name.
#include <cstdlib>
#include <regex>

#include "import_util.h"
#include "linmix/model.h"
#include "linmix/train.h"

namespace linmix {

bool looks_like_mamba(const TensorMap& t) {
  return (t.count("backbone.embeddings.weight") || t.count("backbone.embedding.weight")) &&
         t.count("backbone.layers.0.mixer.A_log");
}

std::unique_ptr<Model> import_mamba(TensorMap tensors, const std::string& what, const std::string& n_groups,
                                    std::string* version) {
  const bool v2 = tensors.count("backbone.layers.0.mixer.dt_bias") > 0;
  if (version) *version = v2 ? "2" : "1";
  const std::string tag = what + (v2 ? ": Mamba-2 checkpoint: " : ": Mamba checkpoint: ");
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
  ModelConfig cfg;
  cfg.vocab = V, cfg.d_model = C, cfg.n_layer = L, cfg.n_head = 1, cfg.ctx = 1, cfg.pos_emb = 0, cfg.ln0 = false;
  cfg.channel_mix = "none", cfg.norm = "rmsnorm";
  if (!v2) {
    const Tensor &alog = need("backbone.layers.0.mixer.A_log"), &dtw = need("backbone.layers.0.mixer.dt_proj.weight");
    LINMIX_CHECK(alog.rank() == 2 && dtw.rank() == 2,
                 tag + "tensors 'A_log' [E,N] and 'dt_proj.weight' [E,R] of layer 0 have shapes " +
                     shape_str(alog.shape) + " and " + shape_str(dtw.shape));
    const int64_t E = alog.dim(0), N = alog.dim(1), R = dtw.dim(1);
    LINMIX_CHECK(E % C == 0, tag + "its inner width E = " + std::to_string(E) + " is not a multiple of C = " +
                                 std::to_string(C) + " (linmix's mamba layer has E = expand C)");
    cfg.expand = E / C, cfg.state = N;
    cfg.layers.assign(size_t(L), LayerConfig{"mamba", {{"dt_rank", std::to_string(R)}}});
  } else {
    const std::string p = "backbone.layers.0.mixer.";
    const Tensor &alog = need(p + "A_log"), &conv = need(p + "conv1d.weight"), &inp = need(p + "in_proj.weight"),
                 &nw = need(p + "norm.weight"), &D = need(p + "D");
    LINMIX_CHECK(alog.rank() == 1 && nw.rank() == 1,
                 tag + "tensors 'A_log' [H] and 'norm.weight' [E] of layer 0 have shapes " + shape_str(alog.shape) +
                     " and " + shape_str(nw.shape));
    const int64_t H = alog.dim(0), E = nw.dim(0);
    LINMIX_CHECK(conv.rank() == 3 && conv.dim(1) == 1 && conv.dim(2) == 4 && conv.dim(0) > E,
                 tag + "tensor '" + p + "conv1d.weight': expected [E + 2 G N, 1, 4] with E = " + std::to_string(E) +
                     " (linmix's convolution has kernel 4), found " + shape_str(conv.shape));
    const int64_t Wc = conv.dim(0);
    LINMIX_CHECK(inp.rank() == 2 && inp.dim(0) == E + Wc + H,
                 tag + "tensor '" + p + "in_proj.weight': expected " + std::to_string(E + Wc + H) +
                     " rows (z, x, B, C, dt), found " + shape_str(inp.shape) +
                     (inp.rank() == 2 && inp.dim(0) > E + Wc + H ? " (a gated MLP beside the SSM, d_ssm < d_inner, is not supported)" : ""));
    LINMIX_CHECK(!(D.numel() == E && E != H), tag + "tensor '" + p + "D' has one value per channel (mamba_ssm's D_has_hdim), "
                                                  "linmix's Mamba-2 block one per head");
    int64_t G = 1;
    if (!n_groups.empty()) {
      char* end = nullptr;
      const long long g = std::strtoll(n_groups.c_str(), &end, 10);
      LINMIX_CHECK(*end == '\0' && g >= 1 && g <= 1024,
                   tag + "metadata 'n_groups' must be an integer in [1, 1024], found '" + n_groups + "'");
      G = g;
    }
    LINMIX_CHECK((Wc - E) % (2 * G) == 0 && H % G == 0,
                 tag + "its conv width " + std::to_string(Wc) + " = E + 2 G N with E = " + std::to_string(E) +
                     " and H = " + std::to_string(H) + " heads does not fit " + std::to_string(G) + " groups");
    LINMIX_CHECK(E % C == 0 && E % H == 0, tag + "its inner width E = " + std::to_string(E) +
                                              " is not a multiple of C = " + std::to_string(C) + " and of H = " +
                                              std::to_string(H) + " heads (linmix's mamba2 layer has E = expand C)");
    cfg.n_head = H, cfg.expand = E / C, cfg.state = (Wc - E) / (2 * G);
    LayerConfig lc{"mamba2", {}};
    if (G > 1) lc.params["groups"] = std::to_string(G);
    cfg.layers.assign(size_t(L), lc);
  }
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
  return model_from_tensors(cfg, renamed, tag, conv, [&](const std::string&) {
    return std::string(" (a bias linmix's Mamba") + (v2 ? "-2" : "") + " block has not?)";
  });
}

}  // namespace linmix
