// safetensors reader/writer: round trip, F16/BF16 widening, and every malformed-file case
// rejected with a message naming the problem before any data is touched.
#include <fstream>

#include "linmix/safetensors.h"
#include "test_util.h"

using namespace linmix;

namespace {

std::string file_bytes(const std::string& header_json, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header_json.size();
  for (int i = 0; i < 8; ++i) out[i] = char((n >> (8 * i)) & 0xff);
  return out + header_json + data;
}

std::string f32_bytes(std::initializer_list<float> xs) {
  std::string s;
  for (float x : xs) s.append(reinterpret_cast<const char*>(&x), 4);
  return s;
}

void expect_error(const std::string& bytes, const std::string& needle) {
  try {
    parse_safetensors(bytes, "f.safetensors");
    FAIL() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line: " << e.what();
  }
}

}  // namespace

TEST(Safetensors, RoundTripWithMetadata) {
  TensorMap m;
  m["a"] = Tensor({2, 3});
  for (int i = 0; i < 6; ++i) m["a"].data[i] = 0.5f * i - 1.0f;
  m["b"] = Tensor({1}, 7.0f);
  m["empty"] = Tensor({0, 4});
  const std::string bytes = serialize_safetensors(m, {{"k", "v"}});
  // the data section starts 8-byte aligned
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const SafeTensors r = parse_safetensors(bytes, "mem");
  ASSERT_EQ(r.tensors.size(), 3u);
  EXPECT_EQ(r.tensors.at("a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r.tensors.at("a").data, m["a"].data);
  EXPECT_EQ(r.tensors.at("b").data, m["b"].data);
  EXPECT_EQ(r.tensors.at("empty").numel(), 0);
  EXPECT_EQ(r.metadata.at("k"), "v");
}

TEST(Safetensors, ReadsF16AndBF16) {
  // F16: 1.0 = 0x3c00, -2.0 = 0xc000, 2^-24 (smallest subnormal) = 0x0001, 65504 = 0x7bff.
  // BF16: 1.0 = 0x3f80, -0.5 = 0xbf00 (upper halves of the float32 patterns).
  const unsigned char f16[] = {0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00, 0xff, 0x7b};
  const unsigned char bf16[] = {0x80, 0x3f, 0x00, 0xbf};
  const std::string data = std::string(reinterpret_cast<const char*>(f16), 8) +
                           std::string(reinterpret_cast<const char*>(bf16), 4);
  const auto r = parse_safetensors(
      file_bytes(R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},)"
                 R"("g":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}})",
                 data),
      "mem");
  EXPECT_EQ(r.tensors.at("h").data, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24), 65504.0f}));
  EXPECT_EQ(r.tensors.at("g").data, (std::vector<float>{1.0f, -0.5f}));
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string ok_data = f32_bytes({1, 2, 3, 4});
  expect_error("abc", "truncated");
  expect_error(std::string("\xff\x00\x00\x00\x00\x00\x00\x00", 8) + "{}", "runs past the end");
  expect_error(file_bytes("{not json", ""), "not valid JSON");
  expect_error(file_bytes("[1,2]", ""), "not an object");
  expect_error(file_bytes(R"({"x":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}})", ok_data), "unsupported dtype I32");
  expect_error(file_bytes(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}})", ok_data), "out of range");
  expect_error(file_bytes(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", ok_data), "needs 12");
  expect_error(file_bytes(R"({"x":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", ok_data), "non-negative");
  expect_error(file_bytes(R"({"x":{"dtype":"F32","shape":[4]}})", ok_data), "data_offsets");
  expect_error(file_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                          ok_data),
               "overlapping");
  // A file cut short in its data section: offsets now run past the end.
  const std::string full = file_bytes(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", ok_data);
  expect_error(full.substr(0, full.size() - 3), "out of range");
  EXPECT_NO_THROW(parse_safetensors(full, "mem"));
}

TEST(Safetensors, WritesAtomically) {
  const std::string dir = test::tmp_dir();
  const std::string path = dir + "/t.safetensors";
  TensorMap m;
  m["a"] = Tensor({3}, 1.5f);
  write_safetensors(path, m);
  EXPECT_EQ(read_safetensors(path).tensors.at("a").data, m["a"].data);
  size_t files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) files += (void(e), 1);
  EXPECT_EQ(files, 1u) << "no temporary file is left behind";
  // A write that cannot complete leaves nothing at the target path.
  EXPECT_THROW(write_safetensors(dir + "/no/such/dir/t.safetensors", m), Error);
  EXPECT_FALSE(std::filesystem::exists(dir + "/no/such/dir/t.safetensors"));
  // Reading a missing file names it.
  try {
    read_safetensors(dir + "/missing.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.safetensors"), std::string::npos);
  }
}

TEST(TensorView, StridesAndShapeChecks) {
  std::vector<float> buf(24);
  for (int i = 0; i < 24; ++i) buf[i] = float(i);
  View<float> v(buf.data(), {2, 3, 4});
  EXPECT_EQ(v(1, 2, 3), 23.0f);
  EXPECT_EQ(v(0, 1, 0), 4.0f);
  EXPECT_NO_THROW(v.check_shape("x", {2, 3, 4}));
  try {
    v.check_shape("x", {2, 4, 3});
    FAIL();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'x'"), std::string::npos);
    EXPECT_NE(msg.find("[2,4,3]"), std::string::npos);
    EXPECT_NE(msg.find("[2,3,4]"), std::string::npos);
  }
  Tensor t({2}, 0.0f);
  t.data[1] = std::nanf("");
  EXPECT_THROW(check_finite("t", t), Error);
}

// The format as the reference implementation reads it: the tensors tile the data section
// exactly (no gap, no trailing bytes), and the header is JSON text (a NUL inside it is refused,
// whatever follows the NUL).
TEST(Safetensors, StrictLayout) {
  const std::string data = f32_bytes({1, 2, 3, 4});
  const std::string x = R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  EXPECT_NO_THROW(parse_safetensors(file_bytes("{" + x + R"(,"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data), "ok"));
  EXPECT_NO_THROW(parse_safetensors(file_bytes("{" + x + "}    ", data.substr(0, 8)), "space padding"));
  expect_error(file_bytes("{" + x + R"(,"y":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", data), "gap of 4 bytes");
  expect_error(file_bytes(R"({"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data), "gap of 8 bytes");
  expect_error(file_bytes("{" + x + "}", data), "8 bytes after the last tensor");
  expect_error(file_bytes("{}", "junk"), "4 bytes after the last tensor");
  expect_error(file_bytes("{" + x + std::string("}\0garbage", 9), data.substr(0, 8)), "NUL byte");
  expect_error(file_bytes(std::string("{}\0", 3), ""), "NUL byte");
}

// map_safetensors (linmix mix's inputs): the same tensors as read_safetensors, the F32 ones views of
// the mapping that keep it alive after the map of tensors is gone; F16 and raw ones read as usual;
// a copy of a view is owned; what read_safetensors refuses, it refuses.
TEST(Safetensors, MappedTensorsEqualReadOnesAndKeepTheMapping) {
  const std::string dir = test::tmp_dir();
  const std::string path = dir + "/m.safetensors";
  TensorMap m;
  m["a"] = Tensor({2, 3});
  m["b"] = Tensor({5});
  for (size_t i = 0; i < 6; ++i) m["a"].data[i] = float(i) - 2.5f;
  for (size_t i = 0; i < 5; ++i) m["b"].data[i] = 1.0f / float(i + 1);
  RawTensor r{"U8", {3}, {7, 8, 9}, {}, {}};
  write_safetensors(path, m, {{"c", r}}, {{"k", "v"}});
  const SafeTensors want = read_safetensors(path);
  Tensor kept;
  {
    SafeTensors got = map_safetensors(path);
    EXPECT_EQ(got.metadata, want.metadata);
    ASSERT_EQ(got.tensors.size(), 2u);
    for (const auto& [n, t] : want.tensors) {
      EXPECT_TRUE(got.tensors.at(n).data.is_view()) << n;
      EXPECT_EQ(got.tensors.at(n).shape, t.shape) << n;
      EXPECT_EQ(got.tensors.at(n).data, t.data) << n;
    }
    EXPECT_EQ(got.raw.at("c").u8, r.u8);
    const Tensor copy = got.tensors.at("a");
    EXPECT_FALSE(copy.data.is_view());
    kept = std::move(got.tensors.at("b"));
  }
  EXPECT_TRUE(kept.data.is_view());
  EXPECT_EQ(kept.data, want.tensors.at("b").data) << "the mapping outlives the map of tensors";
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  write_file_atomic(dir + "/cut.safetensors", bytes.substr(0, bytes.size() - 4));
  EXPECT_THROW(map_safetensors(dir + "/cut.safetensors"), Error);
  write_file_atomic(dir + "/tiny.safetensors", "abc");
  EXPECT_THROW(map_safetensors(dir + "/tiny.safetensors"), Error);
  EXPECT_THROW(map_safetensors(dir + "/missing.safetensors"), Error);
}
