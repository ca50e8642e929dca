// The commands of the `linmix` binary (tools/commands.cpp): each parses nothing, calls the
// library and prints; tools/linmix.cpp holds the option tables and dispatches.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "linmix/bench.h"
#include "linmix/generate.h"
#include "linmix/train.h"

namespace linmix::cli {

int cmd_mix(const std::string& mixer, bool causal, const std::string& mode, const std::vector<std::string>& params, bool grad, bool stats, bool final_state, const std::string& in_path, const std::string& out_path);
int cmd_demo(int64_t T, const std::string& dir, uint64_t seed);
int cmd_mixers(bool json);
int cmd_example(const std::string& mixer, bool causal, int64_t T, uint64_t seed, const std::string& scale, const std::vector<std::string>& dim_overrides, int stress, bool with_dy, const std::string& out);
int cmd_train(TrainOptions topt, const std::string& config_path, const std::string& mixer, int threads);
int cmd_generate(const std::string& model_path, GenerateOptions o, bool stats);
int cmd_eval(const std::string& model_path, const std::string& file, const std::string& split, const std::string& tokenizer, const std::string& mode, const std::string& dtype, int64_t seq, int64_t windows);
int cmd_eval_class(const std::string& model_path, const std::string& split, int64_t examples, bool json,
                   int64_t batch, int64_t seq = 0, int64_t pairs = 0);
int cmd_tokenize(const std::string& tokenizer, const std::string& text, const std::string& file, std::string decode);
int cmd_grad(const std::string& model_path, const std::string& tokens, const std::string& targets, const std::string& labels, const std::string& lengths, int64_t batch, const std::string& out_path);
int cmd_logits(const std::string& model_path, const std::string& tokens, const std::string& mode, int64_t chunk, const std::string& dtype, const std::string& out_path);
int cmd_info(const std::string& path);
int cmd_convert(const std::string& in, const std::string& out, const std::string& dtype, bool force);
int cmd_bench(bool model, const ModelBenchOptions& mbo, const MixerBenchOptions& xbo);
int cmd_features(int64_t M, int64_t D, uint64_t seed, const std::string& out);
int cmd_hippo(int64_t N);
int cmd_viz(const std::string& model_path, const std::string& data, int64_t offset, const std::string& prompt,
            int64_t T, const std::string& out, bool force);
void refuse_same(const std::string& out, const std::vector<std::string>& inputs, const std::string& what);
std::map<std::string, std::string> parse_params(const std::vector<std::string>& kvs);
double peak_rss_mib();

}  // namespace linmix::cli
