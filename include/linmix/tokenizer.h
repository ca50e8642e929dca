// Tokenizers: bytes (linmix's own models), the RWKV "World" vocabulary (greedy longest match
// over bytes, rwkv_vocab_v20230424.txt) and byte-level BPE from a Hugging Face tokenizer.json
// (GPT-2 / GPT-NeoX, e.g. 20B_tokenizer.json of the RWKV-4 Pile models). Tokenizer::load
// detects the type from the file.
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
  std::vector<bool> seen_;           // ids given by the file
  std::vector<std::string> tokens_;  // id -> bytes
  // A byte trie of the tokens: (node << 8 | byte) -> child node (the root is node 0), and the
  // token id that ends at each node (-1: none). Encoding walks it once per token.
  static uint64_t edge(int32_t node, unsigned char c) { return uint64_t(uint32_t(node)) << 8 | c; }
  std::unordered_map<uint64_t, int32_t> trie_;
  std::vector<int32_t> node_token_{-1};
  int64_t vocab_ = 0;
};

// Byte-level BPE (Radford et al. 2019; Hugging Face `tokenizers` JSON, model type "BPE"):
//   1. added tokens are cut out first (leftmost-longest; those marked "normalized" are matched
//      after normalisation), each is one id;
//   2. the normalizer (none or NFC, by ICU) runs on the rest;
//   3. the ByteLevel pre-tokenizer splits it with the GPT-2 pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (Unicode categories and White_Space from ICU);
//   4. each piece's UTF-8 bytes are merged by rank (the lowest-ranked adjacent pair first,
//      leftmost among equals) until no merge applies.
// decode concatenates the tokens' bytes. Input must be valid UTF-8.
class BpeTokenizer : public Tokenizer {
 public:
  explicit BpeTokenizer(const std::string& path);
  ~BpeTokenizer() override;
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string name() const override { return "byte-level-bpe"; }

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
  int64_t vocab_ = 0;
};

}  // namespace linmix
