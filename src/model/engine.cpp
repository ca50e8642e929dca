// Which engine runs a model (include/linmix/engine.h): RWKV-4 (rwkv4_engine.cpp), RWKV-5/6/7
// as BlinkDL's (rwkv_engine.cpp), Mamba as Hugging Face's (mamba_engine.cpp), Mamba-2 as mamba_ssm's
// (mamba2_engine.cpp).
#if __has_include(<malloc.h>)
#include <malloc.h>  // malloc_trim (glibc)
#endif
#include "linmix/engine.h"

#include "linmix/error.h"
#include "linmix/rwkv4.h"

namespace linmix {

std::unique_ptr<Engine> rwkv_engine(const Model& m, WType wtype, bool take);
std::unique_ptr<Engine> mamba_engine(const Model& m, WType wtype, bool take);
std::unique_ptr<Engine> mamba2_engine(const Model& m, WType wtype, bool take);

bool engine_supports(const ModelConfig& c, std::string* why) {
  auto no = [&](const std::string& s) {
    if (why) *why = s;
    return false;
  };
  const std::string& m = c.layers.empty() ? std::string() : c.layers[0].mixer;
  if (m == "rwkv4") return Rwkv4Engine::supports(c, why);
  if (m != "rwkv5" && m != "rwkv6" && m != "rwkv7" && m != "mamba" && m != "mamba2")
    return no("layer mixer '" + m + "' has no inference engine (rwkv4, rwkv5, rwkv6, rwkv7, mamba and mamba2 have)");
  for (const auto& l : c.layers)
    if (l.mixer != m) return no("the layers mix mechanisms ('" + m + "' and '" + l.mixer + "')");
  if (c.uses_pos_emb()) return no("the model has learned positions");
  if (m == "mamba" || m == "mamba2") {
    for (const auto& l : c.layers)
      if (l.params != c.layers[0].params) return no("the layers have different shapes");
    if (c.channel_mix != "none" || !c.rms() || c.ln0)
      return no(std::string(m == "mamba" ? "a Mamba model runs as Hugging Face's" : "a Mamba-2 model runs as mamba_ssm's") +
                ": RMSNorm, no channel mix, no ln0 (this one has channel mix '" + c.channel_mix + "', norm '" + c.norm + "')");
    return true;
  }
  const std::string cm = m == "rwkv5" ? "rwkv" : m;
  if (c.channel_mix != cm) return no("channel mix is '" + c.channel_mix + "', not " + m + "'s ('" + cm + "')");
  if (!c.ln0 || c.rms()) return no("the model has no ln0 or not LayerNorm (BlinkDL's models have both)");
  return true;
}

namespace {
std::unique_ptr<Engine> build(const Model& m, WType wtype, bool take) {
  std::string why;
  LINMIX_CHECK(engine_supports(m.config(), &why), "no inference engine runs this model: " + why);
  resolve_wtype(m, wtype_name(wtype));  // a converted model: only its own type
  const std::string& mixer = m.config().layers[0].mixer;
  if (mixer == "rwkv4") return std::make_unique<Rwkv4Engine>(m, wtype, take);
  if (mixer == "mamba") return mamba_engine(m, wtype, take);
  if (mixer == "mamba2") return mamba2_engine(m, wtype, take);
  return rwkv_engine(m, wtype, take);
}
}  // namespace

std::unique_ptr<Engine> make_engine(const Model& m, WType wtype) { return build(m, wtype, false); }

std::unique_ptr<Engine> make_engine(Model& m, WType wtype, bool take_weights) {
  auto e = build(m, wtype, take_weights);
  if (take_weights) {
    m.release_weights();
#ifdef __GLIBC__
    // the FP32 tensors freed during the conversion sit in malloc's heap (the smaller ones under
    // its mmap threshold): handed back to the system, so that only the engine's weights stay
    // resident (RWKV-4 169M, decode peak RSS in bench --model: bf16 481 -> 415 MiB, int8 420 -> 291 MiB,
    // 1.04x and 1.06x of the engine's weights + state + logits)
    malloc_trim(0);
#endif
  }
  return e;
}

}  // namespace linmix
