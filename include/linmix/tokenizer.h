// Tokenizers: bytes (linmix's own models) and the RWKV "World" vocabulary (greedy longest
// match over bytes, rwkv_vocab_v20230424.txt). Tokenizer::load detects the type from the file.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace linmix {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::string name() const = 0;
  // "bytes" -> the byte tokenizer; otherwise a file, its type detected from its content.
  static std::unique_ptr<Tokenizer> load(const std::string& path);
};

class ByteTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return 256; }
  std::string name() const override { return "bytes"; }
};

// RWKV World: lines "ID LITERAL LENGTH" with LITERAL a Python str or bytes literal; encoding is
// the greedy longest match of the remaining bytes.
class WorldTokenizer : public Tokenizer {
 public:
  explicit WorldTokenizer(const std::string& path);
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string name() const override { return "rwkv-world"; }

 private:
  std::vector<std::string> tokens_;  // id -> bytes
  std::unordered_map<std::string, int32_t> ids_;
  int64_t max_len_ = 0, vocab_ = 0;
};

}  // namespace linmix
