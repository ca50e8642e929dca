// linmix viz: every layer's effective attention from its mechanism's float64 reference (see
// linmix/viz.h), and a minimal PNG writer for the heat maps.
#include "linmix/viz.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>

#include "linmix/error.h"
#include "linmix/mixer.h"
#include "linmix/safetensors.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

// Columns [s0, s0 + S) of the weights: the reference on S copies of the call, copy j with the
// value input a unit impulse at position s0 + j (every unit of that row set to 1).
Tensor probe(const std::string& mixer, const std::map<std::string, std::string>& params, const TensorMap& in0,
             const std::string& vname, int64_t T, int64_t s0, int64_t S) {
  const MixerSpec& spec = find_mixer(mixer);
  TensorMap in;
  for (const auto& ts : spec.inputs) {
    auto it = in0.find(ts.name);
    if (it == in0.end()) continue;
    const Tensor& t = it->second;
    if (ts.dims.rfind("B,", 0) != 0) {  // shared across the batch (decays, kernels, A)
      in[ts.name] = t;
      continue;
    }
    LINMIX_CHECK(t.dim(0) == 1 && t.dim(1) == T, "viz: input '" + ts.name + "' is not one sequence of T");
    std::vector<int64_t> shape = t.shape;
    shape[0] = S;
    Tensor r(shape);
    const int64_t row = t.numel() / T;  // floats per position
    if (ts.name == vname) {
      for (int64_t j = 0; j < S; ++j) std::fill_n(r.data.begin() + (j * T + s0 + j) * row, row, 1.0f);
    } else {
      for (int64_t j = 0; j < S; ++j) std::copy(t.data.begin(), t.data.end(), r.data.begin() + j * t.numel());
    }
    in[ts.name] = std::move(r);
  }
  return run_mixer(mixer, Mode::Reference, true, params, in).at("y");
}

}  // namespace

std::string value_input(const std::string& mixer) {
  const MixerSpec& spec = find_mixer(mixer);
  for (const char* n : {"v", "u", "x"})
    for (const auto& t : spec.inputs)
      if (t.name == n && t.dims.rfind("B,T,", 0) == 0) return n;
  throw Error("viz: mixer '" + mixer + "' has no value input (v, u or x)");
}

std::vector<double> value_weights(const std::string& mixer, const std::map<std::string, std::string>& params,
                                  const TensorMap& in, int64_t* units) {
  const std::string vname = value_input(mixer);
  LINMIX_CHECK(in.count(vname), "viz: no input '" + vname + "'");
  const Tensor& v = in.at(vname);
  LINMIX_CHECK(v.rank() >= 3 && v.dim(0) == 1, "viz: one sequence (B = 1) at a time");
  const int64_t T = v.dim(1), U = v.numel() / T;
  std::vector<double> W(size_t(T * T * U), 0.0);
  const int64_t chunk = 16;
  for (int64_t s0 = 0; s0 < T; s0 += chunk) {
    const int64_t S = std::min(chunk, T - s0);
    const Tensor y = probe(mixer, params, in, vname, T, s0, S);
    LINMIX_CHECK(y.numel() == S * T * U, "viz: the output of " + mixer + " is not shaped like its values");
    for (int64_t j = 0; j < S; ++j)
      for (int64_t t = s0 + j; t < T; ++t)
        for (int64_t u = 0; u < U; ++u) W[size_t((t * T + s0 + j) * U + u)] = y.data[size_t((j * T + t) * U + u)];
  }
  if (units) *units = U;
  return W;
}

std::vector<LayerAttention> effective_attention(Model& m, const std::vector<int32_t>& tokens) {
  const ModelConfig& cfg = m.config();
  LINMIX_CHECK(!cfg.classifier() && cfg.causal, "viz: the model must be a causal language model");
  const int64_t T = static_cast<int64_t>(tokens.size());
  LINMIX_CHECK(T >= 2 && T <= 512, "viz: the sequence must have 2..512 tokens (it holds T x T weights per value unit), "
                                    "found " + std::to_string(T));
  const int64_t lim = cfg.context_limit();
  LINMIX_CHECK(lim == 0 || T <= lim, "viz: " + std::to_string(T) + " tokens are more than the model's context of " +
                                         std::to_string(lim));
  for (int32_t t : tokens)
    LINMIX_CHECK(t >= 0 && t < cfg.vocab, "viz: token " + std::to_string(t) + " outside the vocabulary");
  std::vector<CapturedCall> calls;
  set_mixer_capture(&calls);
  try {
    m.logits(tokens.data(), 1, T);
  } catch (...) {
    set_mixer_capture(nullptr);
    throw;
  }
  set_mixer_capture(nullptr);
  LINMIX_CHECK(static_cast<int64_t>(calls.size()) == cfg.n_layer,
               "viz: captured " + std::to_string(calls.size()) + " mixer calls for " + std::to_string(cfg.n_layer) +
                   " layers");
  std::vector<LayerAttention> out;
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    CapturedCall c = calls[size_t(l)];
    if (c.mixer == "norm_linear") c.mixer = "linear", c.params.clear();  // its weights before the output norm
    if (c.in.count("D")) std::fill(c.in["D"].data.begin(), c.in["D"].data.end(), 0.0f);  // the SSM's skip: not memory
    const Tensor& v = c.in.at(value_input(c.mixer));
    LayerAttention la;
    la.layer = l, la.mixer = calls[size_t(l)].mixer, la.T = T;
    if (v.rank() == 4) {
      la.unit = "head", la.groups = v.dim(2);
    } else {
      la.unit = "channel group";
      la.groups = v.dim(2) % cfg.n_head == 0 ? cfg.n_head : 1;
    }
    int64_t U = 0;
    std::vector<double> raw = value_weights(c.mixer, c.params, c.in, &U);
    for (double& x : raw) x = std::fabs(x);
    const int64_t G = la.groups, units = U / G;
    la.weights.assign(size_t(G * T * T), 0.0f);
    la.lookback.assign(size_t(G), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t u = 0; u < U; ++u) {
        double sum = 0;
        for (int64_t s = 0; s <= t; ++s) sum += raw[size_t((t * T + s) * U + u)];
        if (!(sum > 0) || !std::isfinite(sum)) continue;
        const int64_t g = u / units;
        for (int64_t s = 0; s <= t; ++s) {
          const double share = raw[size_t((t * T + s) * U + u)] / sum / double(units);
          la.weights[size_t((g * T + t) * T + s)] += float(share);
          la.lookback[size_t(g)] += share * double(t - s) / double(T);
        }
      }
    out.push_back(std::move(la));
  }
  return out;
}

void write_png(const std::string& path, int64_t width, int64_t height, const std::vector<uint8_t>& rgb) {
  LINMIX_CHECK(width > 0 && height > 0 && width <= (1 << 15) && height <= (1 << 15) &&
                   static_cast<int64_t>(rgb.size()) == width * height * 3,
               "png: bad image size");
  std::string raw;  // each row: filter byte 0, then RGB
  raw.reserve(size_t((width * 3 + 1) * height));
  for (int64_t y = 0; y < height; ++y) {
    raw.push_back('\0');
    raw.append(reinterpret_cast<const char*>(rgb.data() + y * width * 3), size_t(width * 3));
  }
  uLongf zn = compressBound(uLong(raw.size()));
  std::string z(zn, '\0');
  LINMIX_CHECK(compress2(reinterpret_cast<Bytef*>(z.data()), &zn, reinterpret_cast<const Bytef*>(raw.data()),
                         uLong(raw.size()), 6) == Z_OK,
               "png: zlib failed");
  z.resize(zn);
  auto be32 = [](std::string& s, uint32_t v) {
    for (int i = 3; i >= 0; --i) s.push_back(char((v >> (8 * i)) & 0xff));
  };
  std::string png("\x89PNG\r\n\x1a\n", 8);
  auto chunk = [&](const char* type, const std::string& data) {
    be32(png, uint32_t(data.size()));
    std::string td(type, 4);
    td += data;
    png += td;
    be32(png, uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(td.data()), uInt(td.size()))));
  };
  std::string ihdr;
  be32(ihdr, uint32_t(width));
  be32(ihdr, uint32_t(height));
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB, deflate, no filter, no interlace
  chunk("IHDR", ihdr);
  chunk("IDAT", z);
  chunk("IEND", "");
  write_file_atomic(path, png);
}

}  // namespace linmix
