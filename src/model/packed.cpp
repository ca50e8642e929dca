// `linmix convert`: a checkpoint written with the inference engine's matrices already in BF16,
// INT8 or Q4, so that loading reads them as they are (no FP32 copy, no quantisation at load).
//
// The file is a linmix checkpoint (safetensors; metadata "linmix": "checkpoint", "config",
// "tokenizer") with "linmix_packed": the type. Every parameter the engine reads as a matrix is
// stored by its own name in that type, the rest as F32:
//   bf16: NAME          BF16 [rows, cols]
//   int8: NAME          I8   [rows, cols]   w = NAME.scale[r] * q
//         NAME.scale    F32  [rows]
//   q4:   NAME          U8   [row_blocks, groups, 512]  tiles of 16 rows by a group of 64 values
//                                                     (row_blocks = ceil(rows / 16)): row n of the
//                                                     tile, value k of the group in byte
//                                                     64 ((k % 32) / 4) + 4 n + k % 4, its low
//                                                     nibble for k < 32, its high one else
//         NAME.q4_d     F16  [row_blocks, groups, 16]  the tile's 16 rows' steps d  (w = d q + m)
//         NAME.q4_m     F16  [row_blocks, groups, 16]  their offsets m
// (kernels/gemv.h's QMatrix, byte for byte.)
#include "packed.h"

#include <cmath>
#include <cstring>
#include <filesystem>

#include "linmix/engine.h"
#include "linmix/error.h"
#include "linmix/train.h"

namespace linmix {

namespace {

std::vector<int64_t> q4_shape(int64_t rows, int64_t cols, bool bytes) {  // the nibbles' or the steps'
  const int64_t G = (cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group, RB = (rows + QMatrix::kQ4Rows - 1) / QMatrix::kQ4Rows;
  return {RB, G, bytes ? QMatrix::kQ4Tile : QMatrix::kQ4Rows};
}

}  // namespace

std::shared_ptr<PackedWeights> take_packed(SafeTensors& st, const Model& m, const std::string& path) {
  auto pk = std::make_shared<PackedWeights>();
  const std::string& tn = st.metadata.at(kPackedKey);
  pk->type = parse_wtype(tn);
  LINMIX_CHECK(pk->type != WType::F32, path + ": " + kPackedKey + " is f32 (a converted file holds bf16, int8 or q4)");
  const std::string tag = path + " (" + tn + " weights): tensor '";
  // the raw piece `n` of a matrix: its dtype and shape checked, moved out of the file's map
  auto piece = [&](const std::string& n, const char* dtype, const std::vector<int64_t>& shape) {
    auto it = st.raw.find(n);
    LINMIX_CHECK(it != st.raw.end(), tag + n + "' is missing (" + dtype + " " + shape_str(shape) + ")");
    LINMIX_CHECK(it->second.dtype == dtype && it->second.shape == shape,
                 tag + n + "': expected " + dtype + " " + shape_str(shape) + ", found " + it->second.dtype + " " +
                     shape_str(it->second.shape));
    RawTensor r = std::move(it->second);
    st.raw.erase(it);
    return r;
  };
  // 16-bit floats (bf16: exponent 0x7f80, fp16: 0x7c00) finite, and >= 0 when nonneg: one
  // branch-free pass (it vectorises), the first offender looked for only when there is one
  auto finite16 = [&](const std::string& n, const std::vector<uint16_t>& v, bool bf16, bool nonneg) {
    const uint16_t e = bf16 ? 0x7f80u : 0x7c00u;
    const int64_t N = int64_t(v.size());
    unsigned bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (N > (1 << 20))
    for (int64_t i = 0; i < N; ++i)
      bad |= unsigned((v[size_t(i)] & e) == e) | unsigned(nonneg && v[size_t(i)] > 0x8000u);
    if (!bad) return;
    for (size_t i = 0; i < v.size(); ++i) {
      LINMIX_CHECK((v[i] & e) != e, tag + n + "': a non-finite value at " + std::to_string(i));
      LINMIX_CHECK(!nonneg || v[i] <= 0x8000u, tag + n + "': a negative step at " + std::to_string(i));
    }
  };
  for (const auto& [n, p] : m.params()) {
    if (!st.raw.count(n)) continue;  // an F32 parameter
    LINMIX_CHECK(p.shape.size() == 2, tag + n + "' is stored converted, but the model's '" + n + "' is " +
                                          shape_str(p.shape) + ", not a matrix");
    const int64_t rows = p.shape[0], cols = p.shape[1];
    QMatrix q;
    q.rows = rows, q.cols = cols, q.type = pk->type;
    if (pk->type == WType::BF16) {
      q.bf16 = std::move(piece(n, "BF16", p.shape).u16);
      finite16(n, q.bf16, true, false);
    } else if (pk->type == WType::I8) {
      q.i8 = std::move(piece(n, "I8", p.shape).i8);
      auto s = st.tensors.find(n + ".scale");
      LINMIX_CHECK(s != st.tensors.end(), tag + n + ".scale' is missing (F32 " + shape_str({rows}) + ")");
      check_shape(n + ".scale", s->second, {rows});
      for (float v : s->second.data)
        LINMIX_CHECK(std::isfinite(v) && v > 0.0f, tag + n + ".scale': a scale that is not finite and > 0 (" + std::to_string(v) + ")");
      q.scale = std::move(s->second.data).take();
      st.tensors.erase(s);
    } else {
      q.q4 = std::move(piece(n, "U8", q4_shape(rows, cols, true)).u8);
      q.q4d = std::move(piece(n + ".q4_d", "F16", q4_shape(rows, cols, false)).u16);
      q.q4m = std::move(piece(n + ".q4_m", "F16", q4_shape(rows, cols, false)).u16);
      finite16(n + ".q4_d", q.q4d, false, true), finite16(n + ".q4_m", q.q4m, false, false);
    }
    pk->mats[n] = std::move(q);
  }
  for (const auto& [n, r] : st.raw)
    throw Error(tag + n + "' (" + r.dtype + ") is no parameter of the model, nor a piece of one");
  for (const auto& [n, t] : st.tensors)  // a piece left over: its matrix is not stored converted
    LINMIX_CHECK(m.params().count(n) || n.rfind("opt.", 0) == 0,
                 tag + n + "' is no parameter of the model, nor a piece of a converted one");
  LINMIX_CHECK(!pk->mats.empty(), path + ": marked " + kPackedKey + " but holds no converted matrix");
  return pk;
}

WType resolve_wtype(const Model& m, const std::string& dtype) {
  if (dtype.empty()) return m.packed() ? m.packed()->type : WType::F32;
  const WType t = parse_wtype(dtype);
  LINMIX_CHECK(!m.packed() || m.packed()->type == t,
               std::string("the model's weights are stored as ") + wtype_name(m.packed()->type) +
                   " (linmix convert): run it with --dtype " + wtype_name(m.packed()->type) + " (or without --dtype), not " +
                   dtype);
  return t;
}

void convert_checkpoint(const std::string& in, const std::string& out, WType t, bool force) {
  LINMIX_CHECK(force || !std::filesystem::exists(out), out + " exists: pass --force to replace it");
  {  // the output must not be the input (it is replaced only after it is read, but say so plainly)
    std::error_code ec;
    LINMIX_CHECK(!std::filesystem::equivalent(in, out, ec), "convert: the output is the input file " + in);
  }
  Checkpoint ck = load_checkpoint(in);
  Model& m = *ck.model;
  LINMIX_CHECK(!m.packed(), in + ": already converted (" + wtype_name(m.packed() ? m.packed()->type : WType::F32) +
                                "): convert its FP32 checkpoint instead");
  std::string why;
  LINMIX_CHECK(engine_supports(m.config(), &why), in + ": no inference engine runs this model (" + why +
                                                      "): there is nothing to convert for");
  std::map<std::string, std::string> meta = {{"linmix", "checkpoint"},
                                             {"config", m.config().to_json()},
                                             {"tokenizer", ck.tokenizer},
                                             {"step", std::to_string(ck.step)},
                                             {"converted_from", ck.kind + " " + std::filesystem::path(in).filename().string()}};
  if (t == WType::F32) {  // the FP32 model under linmix's names (an imported RWKV / Mamba file, or a checkpoint without its optimizer)
    write_safetensors(out, m.params(), meta);
    return;
  }
  // the engine built once on the model with a recorder: every matrix it converts, as it converts it
  auto rec = std::make_shared<PackedWeights>();
  rec->type = t, rec->recording = true;
  m.set_packed(rec);
  make_engine(m, t);
  m.set_packed(nullptr);
  TensorMap plain;
  std::map<std::string, RawTensor> raw;
  for (const auto& [n, p] : m.params()) {
    auto it = rec->mats.find(n);
    if (it == rec->mats.end()) {
      plain[n] = p;
      continue;
    }
    const QMatrix& q = it->second;
    for (const char* suffix : {".scale", ".q4_d", ".q4_m"})
      LINMIX_CHECK(!m.params().count(n + suffix), "convert: the model has a parameter '" + n + suffix +
                                                      "', the name of a converted matrix's piece");
    if (t == WType::BF16) {
      raw[n] = RawTensor{"BF16", p.shape, {}, {}, q.bf16};
    } else if (t == WType::I8) {
      raw[n] = RawTensor{"I8", p.shape, {}, q.i8, {}};
      plain[n + ".scale"] = Tensor({q.rows});
      plain[n + ".scale"].data = q.scale;
    } else {
      raw[n] = RawTensor{"U8", q4_shape(q.rows, q.cols, true), q.q4, {}, {}};
      raw[n + ".q4_d"] = RawTensor{"F16", q4_shape(q.rows, q.cols, false), {}, {}, q.q4d};
      raw[n + ".q4_m"] = RawTensor{"F16", q4_shape(q.rows, q.cols, false), {}, {}, q.q4m};
    }
  }
  meta[kPackedKey] = wtype_name(t);
  write_safetensors(out, plain, raw, meta);
}

}  // namespace linmix
