// Bad input through the `linmix mix` command: each case is a one-line error naming the
// problem, exit code 2, no crash, and an existing output file is left untouched.
#include <fstream>
#include <sstream>

#include "linmix/mixer.h"
#include "linmix/safetensors.h"
#include "test_util.h"

using namespace linmix;

namespace {

struct Result {
  int code;
  std::string err;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

Result run_linmix(const std::string& args, const std::string& dir, const std::string& env = "") {
  const std::string err_path = dir + "/stderr.txt";
  const std::string cmd = env + " " + std::string(LINMIX_BIN) + " " + args + " > " + dir + "/stdout.txt 2> " + err_path;
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(err_path)};
}

class MixCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = test::tmp_dir();
    in_path = dir + "/in.safetensors";
    out_path = dir + "/out.safetensors";
    good = example_inputs(find_mixer("linear"), {{"B", 2}, {"T", 5}, {"H", 2}, {"D", 3}, {"E", 4}}, 1);
    std::ofstream(out_path) << "previous output";
  }
  // Runs `linmix mix` on `in_bytes` and expects exit 2, a single-line error containing
  // `needle`, and the earlier output file unchanged.
  void expect_rejected(const std::string& in_bytes, const std::string& flags, const std::string& needle) {
    std::ofstream(in_path, std::ios::binary) << in_bytes;
    const Result r = run_linmix("mix " + flags + " --in " + in_path + " --out " + out_path, dir);
    EXPECT_EQ(r.code, 2) << flags << ": " << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
    EXPECT_EQ(r.err.rfind("linmix: ", 0), 0u) << r.err;
    EXPECT_EQ(slurp(out_path), "previous output") << "output file touched by a failed run";
  }
  std::string dir, in_path, out_path;
  TensorMap good;
};

TEST_F(MixCli, GoodInputRuns) {
  write_safetensors(in_path, good);
  const Result r = run_linmix("mix --mixer linear --causal --mode recurrent --in " + in_path + " --out " + out_path, dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto out = read_safetensors(out_path);
  EXPECT_EQ(out.tensors.at("y").shape, (std::vector<int64_t>{2, 5, 2, 4}));
  EXPECT_TRUE(out.tensors.count("state.S") && out.tensors.count("state.z"));
  EXPECT_EQ(out.metadata.at("mixer"), "linear");
}

TEST_F(MixCli, NoStateWritesTheSameYAlone) {
  write_safetensors(in_path, good);
  const std::string with = dir + "/with.safetensors";
  for (const char* mode : {"parallel", "recurrent"}) {
    const std::string flags = std::string("mix --mixer linear --causal --mode ") + mode + " --in " + in_path;
    ASSERT_EQ(run_linmix(flags + " --out " + with, dir).code, 0);
    const Result r = run_linmix(flags + " --no-state --out " + out_path, dir);
    ASSERT_EQ(r.code, 0) << r.err;
    const auto a = read_safetensors(with), b = read_safetensors(out_path);
    EXPECT_TRUE(a.tensors.count("state.S")) << mode;
    ASSERT_EQ(b.tensors.size(), 1u) << mode << ": y alone";
    EXPECT_EQ(b.tensors.at("y").data, a.tensors.at("y").data) << mode;
  }
}

TEST_F(MixCli, RejectsBadTensors) {
  TensorMap m = good;
  m.erase("k");
  expect_rejected(serialize_safetensors(m), "--mixer linear", "missing input tensor 'k'");
  m = good;
  m["k"] = Tensor({2, 5, 2});
  expect_rejected(serialize_safetensors(m), "--mixer linear", "tensor 'k': expected rank 4");
  m = good;
  m["v"] = Tensor({2, 6, 2, 4});
  expect_rejected(serialize_safetensors(m), "--mixer linear", "tensor 'v': expected shape");
  m = good;
  m["q"].data[7] = std::nanf("");
  expect_rejected(serialize_safetensors(m), "--mixer linear", "tensor 'q': element 7 is NaN");
  m = good;
  m["extra"] = Tensor({1});
  expect_rejected(serialize_safetensors(m), "--mixer linear", "unexpected tensor 'extra'");
  m = good;  // linear's parallel form takes a state, in the causal form only
  m["state.S"] = Tensor({2, 2, 3, 4});
  m["state.z"] = Tensor({2, 2, 3});
  expect_rejected(serialize_safetensors(m), "--mixer linear", "accepted only by the causal form");
  m.erase("state.z");
  expect_rejected(serialize_safetensors(m), "--mixer linear --causal --mode recurrent", "missing state tensor 'state.z'");
  m = good;  // softmax's KV cache (every causal form): no longer than its window - 1
  m["state.k"] = Tensor({2, 3, 2, 3});
  m["state.v"] = Tensor({2, 3, 2, 4});
  expect_rejected(serialize_safetensors(m), "--mixer softmax --causal --param window=3", "holds at most 2 positions");
}

TEST_F(MixCli, RejectsBadArguments) {
  const std::string bytes = serialize_safetensors(good);
  expect_rejected(bytes, "--mixer nosuch", "unknown mixer 'nosuch'");
  expect_rejected(bytes, "--mixer linear --param bogus=1", "unknown param 'bogus'");
  expect_rejected(bytes, "--mixer linear --param eps=abc", "param 'eps': malformed value 'abc'");
  expect_rejected(bytes, "--mixer linear --param eps", "malformed --param 'eps'");
  expect_rejected(bytes, "--mixer linear --param eps=-1", "param 'eps': must be >=");
  expect_rejected(bytes, "--mixer softmax --param window=2.5", "expected an integer");
  expect_rejected(bytes, "--mixer linear --mode sideways", "unknown mode 'sideways'");
  expect_rejected(bytes, "--mixer linear --mode recurrent", "only with --causal");
  expect_rejected(bytes, "--mixer linear --no-such-flag", "no-such-flag");
  TensorMap r = example_inputs(find_mixer("rwkv4"), {{"B", 1}, {"T", 3}, {"C", 4}}, 1);
  expect_rejected(serialize_safetensors(r), "--mixer rwkv4", "causal only; pass --causal");
  r["w"].data[2] = -0.5f;
  expect_rejected(serialize_safetensors(r), "--mixer rwkv4 --causal", "tensor 'w': the decay rate must be > 0");
  TensorMap a = example_inputs(find_mixer("aft_conv"), {{"B", 1}, {"T", 3}, {"C", 4}, {"H", 2}, {"K", 4}}, 1);
  expect_rejected(serialize_safetensors(a), "--mixer aft_conv", "odd kernel size");
  a = example_inputs(find_mixer("aft_full"), {{"B", 1}, {"T", 6}, {"C", 4}, {"Tw", 5}}, 1);
  expect_rejected(serialize_safetensors(a), "--mixer aft_full", "Tw = 5 is smaller");
  expect_rejected(serialize_safetensors(a), "--mixer aft_local --param window=2", "Tw = 5 is smaller");
}

TEST_F(MixCli, RejectsOutOfDomainInputs) {
  TensorMap x = example_inputs(find_mixer("fnet"), {{"B", 1}, {"T", 4}, {"C", 3}}, 1);
  expect_rejected(serialize_safetensors(x), "--mixer fnet --causal", "has no causal form; drop --causal");
  TensorMap s = example_inputs(find_mixer("s4d"), {{"B", 1}, {"T", 4}, {"C", 3}, {"N", 2}}, 1);
  expect_rejected(serialize_safetensors(s), "--mixer s4d", "causal only; pass --causal");
  s["A_re"].data[1] = 0.25f;
  expect_rejected(serialize_safetensors(s), "--mixer s4d --causal", "tensor 'A_re': must be < 0");
  TensorMap m = example_inputs(find_mixer("mamba"), {{"B", 1}, {"T", 4}, {"C", 3}, {"N", 2}}, 1);
  expect_rejected(serialize_safetensors(m), "--mixer mamba --causal --param delta_softplus=2", "must be 0 or 1");
  m["A"].data[0] = 1.0f;
  expect_rejected(serialize_safetensors(m), "--mixer mamba --causal", "tensor 'A': must be <= 0");
  m = example_inputs(find_mixer("mamba"), {{"B", 1}, {"T", 4}, {"C", 3}, {"N", 2}}, 1);
  m["z"] = Tensor({1, 4, 2});
  expect_rejected(serialize_safetensors(m), "--mixer mamba --causal", "tensor 'z': expected shape");
  TensorMap p = example_inputs(find_mixer("performer"), {{"B", 1}, {"T", 4}, {"H", 1}, {"D", 3}, {"E", 2}, {"M", 5}}, 1);
  p["proj"] = Tensor({5, 4});
  expect_rejected(serialize_safetensors(p), "--mixer performer", "tensor 'proj': expected shape");
  TensorMap f = example_inputs(find_mixer("flash"), {{"B", 1}, {"T", 4}, {"S", 3}, {"E", 2}}, 1);
  expect_rejected(serialize_safetensors(f), "--mixer flash --param group=0", "param 'group': must be >=");
}

TEST_F(MixCli, GradWritesEveryInputGradient) {
  TensorMap m = good;
  m["dy"] = Tensor({2, 5, 2, 4}, 0.5f);
  write_safetensors(in_path, m);
  const Result r = run_linmix("mix --mixer linear --causal --grad --in " + in_path + " --out " + out_path, dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto out = read_safetensors(out_path);
  for (const char* n : {"y", "dq", "dk", "dv"}) EXPECT_TRUE(out.tensors.count(n)) << n;
  EXPECT_EQ(out.tensors.at("dq").shape, good.at("q").shape);
}

TEST_F(MixCli, RejectsBadGradInput) {
  expect_rejected(serialize_safetensors(good), "--mixer linear --grad", "--grad needs the tensor 'dy'");
  TensorMap m = good;
  m["dy"] = Tensor({2, 5, 2, 3});
  expect_rejected(serialize_safetensors(m), "--mixer linear --grad", "tensor 'dy': expected shape");
  m["dy"] = Tensor({2, 5, 2, 4});
  expect_rejected(serialize_safetensors(m), "--mixer linear", "dy is read only with --grad");
  expect_rejected(serialize_safetensors(m), "--mixer linear --causal --mode recurrent --grad",
                  "use --mode parallel or reference");
  m["dy"].data[3] = std::nanf("");
  expect_rejected(serialize_safetensors(m), "--mixer linear --grad", "tensor 'dy': element 3 is NaN");
}

TEST(Cli, FeaturesWritesProj) {
  const std::string dir = test::tmp_dir();
  const Result r = run_linmix("features --M 10 --D 4 --seed 3 --out " + dir + "/p.safetensors", dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto st = read_safetensors(dir + "/p.safetensors");
  EXPECT_EQ(st.tensors.at("proj").shape, (std::vector<int64_t>{10, 4}));
  const Result bad = run_linmix("features --M 0 --D 4 --out " + dir + "/q.safetensors", dir);
  EXPECT_EQ(bad.code, 2);
  EXPECT_FALSE(std::filesystem::exists(dir + "/q.safetensors"));
}

TEST_F(MixCli, RejectsBadFiles) {
  const std::string bytes = serialize_safetensors(good);
  expect_rejected(bytes.substr(0, 5), "--mixer linear", "truncated");
  expect_rejected(bytes.substr(0, bytes.size() - 10), "--mixer linear", "out of range");
  std::string huge = bytes;
  huge[5] = '\x7f';  // header length far past the end of the file
  expect_rejected(huge, "--mixer linear", "runs past the end");
  std::string garbled = bytes;
  garbled[8] = '#';
  expect_rejected(garbled, "--mixer linear", "not valid JSON");
  // Rewrite the header by hand for dtype and offset faults.
  auto with_header = [&](const std::string& json, size_t data_bytes) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = char((json.size() >> (8 * i)) & 0xff);
    return out + json + std::string(data_bytes, '\0');
  };
  expect_rejected(with_header(R"({"q":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4), "--mixer linear",
                  "unsupported dtype I32");
  expect_rejected(with_header(R"({"q":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8), "--mixer linear",
                  "unsupported dtype F64");
  expect_rejected(with_header(R"({"q":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                              R"("k":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                              12),
                  "--mixer linear", "overlapping");
  expect_rejected(with_header(R"({"q":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8), "--mixer linear",
                  "out of range");
  // Missing input file.
  const Result r = run_linmix("mix --mixer linear --in " + dir + "/nope.safetensors --out " + out_path, dir);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("nope.safetensors"), std::string::npos) << r.err;
}

// linmix bench refuses bad arguments before it measures anything (each of these would otherwise
// run a benchmark of a minute first): one line, exit 2, and no report file written.
TEST(Cli, BenchRejectsBadArgumentsFirst) {
  const std::string dir = test::tmp_dir(), out = dir + "/report.json";
  const std::string ck = dir + "/not_a_checkpoint.safetensors";
  std::ofstream(ck) << "not a checkpoint";
  const std::pair<std::string, std::string> cases[] = {
      {"bench --mixers nosuch --out " + out, "unknown mixer 'nosuch'"},
      {"bench --T 0 --out " + out, "--T"},
      {"bench --model --dtypes fp8 --out " + out, "unknown weight type 'fp8'"},
      {"bench --model --checkpoint " + ck + " --out " + out, "--checkpoint and --data go together"},
      {"bench --model --checkpoint " + ck + " --data " + dir + "/missing.txt --out " + out, ck},
      {"bench --model --checkpoint " + dir + "/missing.safetensors --data " + ck + " --out " + out, "missing"},
  };
  for (const auto& [args, needle] : cases) {
    const Result r = run_linmix(args, dir);
    EXPECT_EQ(r.code, 2) << args << ": " << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
    EXPECT_FALSE(std::ifstream(out).good()) << args << ": wrote a report";
    EXPECT_EQ(slurp(dir + "/stdout.txt").find("limits"), std::string::npos) << args << ": measured before refusing";
  }
}

// LINMIX_ARCH picks the build: the portable one (x86-64-v3) runs its AVX-512 sibling
// (linmix-x86-64-v4, built beside it) where the CPU has AVX-512, unless pinned; both compute the
// same outputs; a bad value is a one-line error.
TEST(Cli, ArchPicksTheBuildAndBothAgree) {
  const std::string dir = test::tmp_dir();
  for (const std::string bad : {"LINMIX_ARCH=avx512", "LINMIX_ARCH="}) {
    const Result r = run_linmix("--version", dir, bad);
    EXPECT_EQ(r.code, 2) << bad;
    EXPECT_EQ(r.err.rfind("linmix: LINMIX_ARCH", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  __builtin_cpu_init();
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  const bool sibling = std::ifstream(std::string(LINMIX_BIN) + "-x86-64-v4").good();
  ASSERT_EQ(run_linmix("--version", dir, "LINMIX_ARCH=x86-64-v3").code, 0);
  EXPECT_EQ(slurp(dir + "/stdout.txt").find("x86-64-v4"), std::string::npos) << "pinned to x86-64-v3";
  ASSERT_EQ(run_linmix("--version", dir).code, 0);
  const std::string version = slurp(dir + "/stdout.txt");
  if (v4 && sibling) EXPECT_NE(version.find("(x86-64-v4)"), std::string::npos) << version;
  if (!v4) EXPECT_EQ(run_linmix("--version", dir, "LINMIX_ARCH=x86-64-v4").code, 2);
  if (!(v4 && sibling)) GTEST_SKIP() << "no AVX-512 build to compare here";
  // the same call through both builds: every mechanism's outputs within float32 rounding
  for (const auto& spec : mixers()) {
    const bool causal = spec.causal_ok;  // the form past every block and chunk boundary of the kernels
    std::map<std::string, int64_t> dims = crossing_dims(spec, Scale::Test, causal);
    if (dims.empty()) dims = example_dims(spec, Scale::Test, 70, causal);
    const TensorMap in = example_inputs(spec, dims, 3);
    const std::string in_path = dir + "/" + spec.name + ".safetensors";
    write_safetensors(in_path, in);
    TensorMap outs[2];
    for (int a = 0; a < 2; ++a) {
      const std::string out = dir + "/" + spec.name + "_" + std::to_string(a) + ".safetensors";
      std::string params;
      for (const auto& [key, value] : spec.example_params) params += " --param " + key + "=" + value;
      const Result r = run_linmix("mix --mixer " + spec.name + (causal ? " --causal" : "") + params + " --in " + in_path +
                                      " --out " + out,
                                  dir, a == 0 ? "LINMIX_ARCH=x86-64-v3" : "LINMIX_ARCH=x86-64-v4");
      ASSERT_EQ(r.code, 0) << spec.name << ": " << r.err;
      outs[a] = read_safetensors(out).tensors;
    }
    const Storage &y3 = outs[0].at("y").data, &y4 = outs[1].at("y").data;
    ASSERT_EQ(y3.size(), y4.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < y3.size(); ++i) num += double(y3[i] - y4[i]) * (y3[i] - y4[i]), den += double(y3[i]) * y3[i];
    EXPECT_LE(std::sqrt(num / std::max(den, 1e-300)), 1e-5) << spec.name;
    EXPECT_GT(den, 0.0) << spec.name;
  }
}

TEST(Cli, MixersListsEveryMechanism) {
  const std::string dir = test::tmp_dir();
  const Result r = run_linmix("mixers", dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string out = slurp(dir + "/stdout.txt");
  for (const auto& spec : mixers()) {
    EXPECT_NE(out.find(spec.name + " — "), std::string::npos) << spec.name;
  }
  EXPECT_NE(out.find("O(T C)"), std::string::npos);
}

}  // namespace

// `linmix mixers --json` lists every mechanism of the registry with its spec; `linmix example`
// writes a mechanism's example inputs (what the Python tests and peers read) and refuses bad
// arguments with a one-line error and exit 2.
TEST(RegistryCli, JsonListsEveryMechanismAndExampleWritesItsInputs) {
  const std::string dir = test::tmp_dir();
  ASSERT_EQ(run_linmix("mixers --json", dir).code, 0);
  const std::string js = slurp(dir + "/stdout.txt");
  for (const auto& spec : mixers()) {
    EXPECT_NE(js.find("\"name\": \"" + spec.name + "\""), std::string::npos) << spec.name;
    for (bool causal : {false, true}) {
      if ((causal && !spec.causal_ok) || (!causal && !spec.noncausal_ok)) continue;
      const std::string out = dir + "/" + spec.name + ".safetensors";
      const Result r = run_linmix("example --mixer " + spec.name + (causal ? " --causal" : "") +
                                      " --T 9 --seed 4 --stress 1 --dy --out " + out, dir);
      ASSERT_EQ(r.code, 0) << spec.name << ": " << r.err;
      TensorMap want = example_inputs(spec, example_dims(spec, Scale::Test, 9, causal), 4);
      stress_inputs(spec, want, false);
      const TensorMap got = read_safetensors(out).tensors;
      // Equal up to rounding: std::normal_distribution is instantiated per translation unit and
      // the two executables may link differently contracted copies (the sanitizer build's draws
      // differed by 2e-6 relative); a different seed or size would differ by O(1).
      for (const auto& [n, t] : want) {
        ASSERT_EQ(got.at(n).shape, t.shape) << spec.name << " " << n;
        for (size_t i = 0; i < t.data.size(); ++i)
          ASSERT_NEAR(got.at(n).data[i], t.data[i], 1e-5f * std::max(1.0f, std::fabs(t.data[i]))) << spec.name << " " << n;
      }
      EXPECT_TRUE(got.count("dy")) << spec.name;
    }
  }
  for (const std::string bad : {"example --mixer nope --out x", "example --mixer fnet --causal --out x",
                                "example --mixer linear --scale huge --out x", "example --mixer linear --stress 3 --out x",
                                "example --mixer linear --dim D=0 --out x"}) {
    const Result r = run_linmix(bad, dir);
    EXPECT_EQ(r.code, 2) << bad << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << bad << ": " << r.err;
  }
}
