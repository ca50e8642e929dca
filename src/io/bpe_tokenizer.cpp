// Byte-level BPE from a Hugging Face tokenizer.json (see include/linmix/tokenizer.h).
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "linmix/error.h"
#include "linmix/tokenizer.h"

namespace linmix {

namespace {

using json = nlohmann::json;

// GPT-2's reversible map from bytes to printable code points: the printable Latin-1 bytes
// (33-126, 161-172, 174-255) stand for themselves, the other 68 bytes for 256, 257, ... in order.
std::vector<char32_t> byte_to_cp() {
  std::vector<char32_t> m(256);
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    m[b] = printable ? char32_t(b) : next++;
  }
  return m;
}

// Decodes UTF-8; false at the first invalid sequence (its byte offset in *bad).
bool utf8_decode(const std::string& s, std::vector<char32_t>& out, std::vector<int32_t>* offsets, size_t* bad) {
  out.clear();
  if (offsets) offsets->clear();
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  int32_t i = 0;
  const int32_t n = int32_t(s.size());
  while (i < n) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(p, i, n, c);
    if (c < 0) {
      if (bad) *bad = size_t(start);
      return false;
    }
    out.push_back(char32_t(c));
    if (offsets) offsets->push_back(start);
  }
  if (offsets) offsets->push_back(n);
  return true;
}

bool is_letter(char32_t c) { return (U_GET_GC_MASK(UChar32(c)) & U_GC_L_MASK) != 0; }
bool is_number(char32_t c) { return (U_GET_GC_MASK(UChar32(c)) & U_GC_N_MASK) != 0; }
bool is_space(char32_t c) { return u_isUWhiteSpace(UChar32(c)); }

// The GPT-2 pre-tokenizer pattern, alternative by alternative, at each position (the regex
// engine's leftmost-first semantics): returns the [begin, end) code-point ranges.
std::vector<std::pair<size_t, size_t>> gpt2_split(const std::vector<char32_t>& c) {
  std::vector<std::pair<size_t, size_t>> out;
  const size_t n = c.size();
  size_t i = 0;
  auto run = [&](size_t j, auto pred) {
    while (j < n && pred(c[j])) ++j;
    return j;
  };
  auto other = [](char32_t x) { return !is_space(x) && !is_letter(x) && !is_number(x); };
  while (i < n) {
    size_t e = i;
    // 's 't 're 've 'm 'll 'd
    if (c[i] == U'\'' && i + 1 < n) {
      const char32_t a = c[i + 1], b = i + 2 < n ? c[i + 2] : 0;
      if (a == U's' || a == U't' || a == U'm' || a == U'd') e = i + 2;
      else if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) e = i + 3;
    }
    const size_t s = (e == i && c[i] == U' ' && i + 1 < n) ? i + 1 : i;  // the optional leading space
    if (e == i && is_letter(c[s])) e = run(s, is_letter);                 //  ?\p{L}+
    if (e == i && is_number(c[s])) e = run(s, is_number);                 //  ?\p{N}+
    if (e == i && other(c[s])) e = run(s, other);                         //  ?[^\s\p{L}\p{N}]+
    if (e == i && is_space(c[i])) {                                       // \s+(?!\S) | \s+
      const size_t j = run(i, is_space);
      e = (j == n || j - i == 1) ? j : j - 1;  // leave the last space to prefix the next word
    }
    if (e == i) e = i + 1;  // unreachable: every code point is a letter, number, space or other
    out.emplace_back(i, e);
    i = e;
  }
  return out;
}

}  // namespace

struct BpeTokenizer::Impl {
  std::vector<std::string> tokens;                  // id -> bytes
  std::unordered_map<std::string, int32_t> ids;     // bytes -> id
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged)
  int32_t byte_id[256];
  struct Added {
    std::string content;
    int32_t id;
    bool normalized;
  };
  std::vector<Added> added;  // longest first
  bool nfc = false;
  const icu::Normalizer2* norm = nullptr;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  // Cuts the added tokens (of the given kind) out of `text`: pieces with id -1 are plain text.
  void split_added(const std::string& text, bool normalized, std::vector<std::pair<std::string, int32_t>>& out) const {
    size_t start = 0, i = 0;
    while (i < text.size()) {
      const Added* hit = nullptr;
      for (const Added& a : added)  // longest first: the first match is the longest
        if (a.normalized == normalized && text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      if (!hit) {
        ++i;
        continue;
      }
      if (i > start) out.emplace_back(text.substr(start, i - start), -1);
      out.emplace_back(hit->content, hit->id);
      i += hit->content.size();
      start = i;
    }
    if (start < text.size()) out.emplace_back(text.substr(start), -1);
  }

  void bpe(const std::string& piece, std::vector<int32_t>& out) const {
    auto it = cache.find(piece);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
    // symbols in a linked list; a heap of candidate merges (rank, position), stale ones skipped
    const int n = int(piece.size());
    std::vector<int32_t> sym(n), prev(n), next(n);
    for (int i = 0; i < n; ++i) sym[i] = byte_id[uint8_t(piece[i])], prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    using Cand = std::tuple<int32_t, int, int32_t, int32_t>;  // rank, left position, left id, right id
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int i) {
      if (i < 0 || next[i] < 0) return;
      auto m = merges.find(uint64_t(uint32_t(sym[i])) << 32 | uint32_t(sym[next[i]]));
      if (m != merges.end()) heap.emplace(m->second.first, i, sym[i], sym[next[i]]);
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const auto [rank, i, l, r] = heap.top();
      heap.pop();
      if (sym[i] != l || next[i] < 0 || sym[next[i]] != r) continue;  // stale
      const int j = next[i];
      sym[i] = merges.at(uint64_t(uint32_t(l)) << 32 | uint32_t(r)).second;
      sym[j] = -1;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      push(prev[i]);
      push(i);
    }
    std::vector<int32_t> ids_out;
    for (int i = n ? 0 : -1; i >= 0; i = next[i]) ids_out.push_back(sym[i]);
    out.insert(out.end(), ids_out.begin(), ids_out.end());
    if (cache.size() < 100000) cache.emplace(piece, std::move(ids_out));
  }
};

BpeTokenizer::BpeTokenizer(const std::string& path) : p_(std::make_unique<Impl>()) {
  std::ifstream f(path, std::ios::binary);
  LINMIX_CHECK(f.good(), path + ": cannot open the tokenizer file");
  json j;
  try {
    j = json::parse(f);
  } catch (const std::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
  auto fail = [&](const std::string& what) { throw Error(path + ": " + what); };
  try {
    const json& m = j.at("model");
    if (m.value("type", std::string("BPE")) != "BPE") fail("model type '" + m.value("type", std::string()) + "' is not BPE");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"})
      if (m.contains(k) && !m[k].is_null() && !(m[k].is_string() && m[k].get<std::string>().empty()))
        fail(std::string("BPE option '") + k + "' is not supported");
    if (m.value("byte_fallback", false)) fail("BPE byte_fallback is not supported");
    const json& pre = j.at("pre_tokenizer");
    if (pre.is_null() || pre.value("type", std::string()) != "ByteLevel")
      fail("only the ByteLevel pre-tokenizer is supported (byte-level BPE)");
    if (pre.value("add_prefix_space", false)) fail("ByteLevel add_prefix_space = true is not supported");
    if (!pre.value("use_regex", true)) fail("ByteLevel use_regex = false is not supported");
    const json& nz = j.at("normalizer");
    if (!nz.is_null()) {
      if (nz.value("type", std::string()) != "NFC") fail("normalizer '" + nz.value("type", std::string()) + "' is not supported (NFC or none)");
      p_->nfc = true;
      UErrorCode st = U_ZERO_ERROR;
      p_->norm = icu::Normalizer2::getNFCInstance(st);
      if (U_FAILURE(st)) fail(std::string("ICU NFC normalizer unavailable: ") + u_errorName(st));
    }
    // byte-level strings -> bytes
    const std::vector<char32_t> b2c = byte_to_cp();
    std::unordered_map<char32_t, uint8_t> c2b;
    for (int b = 0; b < 256; ++b) c2b[b2c[b]] = uint8_t(b);
    std::vector<char32_t> cps;
    auto to_bytes = [&](const std::string& s) {
      size_t bad = 0;
      if (!utf8_decode(s, cps, nullptr, &bad)) fail("vocabulary entry is not valid UTF-8");
      std::string out;
      for (char32_t c : cps) {
        auto it = c2b.find(c);
        if (it == c2b.end()) fail("vocabulary entry '" + s + "' is not a byte-level string");
        out.push_back(char(it->second));
      }
      return out;
    };
    // token ids: integers in [0, 2^20) (no negative, fractional or huge id reaches an index)
    constexpr int64_t kMaxId = int64_t(1) << 20;  // a model's largest vocabulary
    auto token_id = [&](const json& v, const std::string& what) -> int64_t {
      if (!v.is_number_integer()) fail("token id of " + what + " is not an integer: " + v.dump());
      if (v.is_number_unsigned() ? v.get<uint64_t>() >= uint64_t(kMaxId) : (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId))
        fail("token id " + v.dump() + " of " + what + " is outside [0, " + std::to_string(kMaxId) + ")");
      return v.get<int64_t>();
    };
    int64_t V = 0;
    for (const auto& [k, v] : m.at("vocab").items()) V = std::max<int64_t>(V, token_id(v, "'" + k + "'") + 1);
    for (const json& a : j.value("added_tokens", json::array()))
      V = std::max<int64_t>(V, token_id(a.at("id"), "an added token") + 1);
    if (V <= 0) fail("empty vocabulary");
    p_->tokens.assign(size_t(V), std::string());
    std::vector<bool> seen(size_t(V), false);
    for (const auto& [k, v] : m.at("vocab").items()) {
      const int64_t id = token_id(v, "'" + k + "'");
      if (seen[size_t(id)]) fail("token id " + std::to_string(id) + " is given twice in the vocabulary");
      const std::string b = to_bytes(k);
      p_->tokens[size_t(id)] = b, seen[size_t(id)] = true;
      p_->ids.emplace(b, int32_t(id));
    }
    for (int b = 0; b < 256; ++b) {  // bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) may be absent
      auto it = p_->ids.find(std::string(1, char(b)));
      const bool in_utf8 = !(b == 0xC0 || b == 0xC1 || b >= 0xF5);
      if (it == p_->ids.end() && in_utf8) fail("the vocabulary lacks the single byte " + std::to_string(b));
      p_->byte_id[b] = it == p_->ids.end() ? -1 : it->second;
    }
    int32_t rank = 0;
    for (const json& mg : m.at("merges")) {
      std::string l, r;
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) fail("malformed merge '" + s + "'");
        l = s.substr(0, sp), r = s.substr(sp + 1);
      } else {
        if (!mg.is_array() || mg.size() != 2) fail("malformed merge " + mg.dump());
        l = mg[0].get<std::string>(), r = mg[1].get<std::string>();
      }
      const std::string lb = to_bytes(l), rb = to_bytes(r);
      auto li = p_->ids.find(lb), ri = p_->ids.find(rb), mi = p_->ids.find(lb + rb);
      if (li == p_->ids.end() || ri == p_->ids.end() || mi == p_->ids.end())
        fail("merge '" + l + " " + r + "' names a token that is not in the vocabulary");
      p_->merges.emplace(uint64_t(uint32_t(li->second)) << 32 | uint32_t(ri->second), std::make_pair(rank++, mi->second));
    }
    for (const json& a : j.value("added_tokens", json::array())) {
      const int32_t id = int32_t(token_id(a.at("id"), "an added token"));
      const std::string content = a.at("content").get<std::string>();
      if (content.empty()) fail("empty added token");
      if (a.value("single_word", false) || a.value("lstrip", false) || a.value("rstrip", false))
        fail("added token '" + content + "': single_word / lstrip / rstrip are not supported");
      p_->added.push_back({content, id, a.value("normalized", !a.value("special", false))});
      p_->tokens[size_t(id)] = content, seen[size_t(id)] = true;
    }
    std::stable_sort(p_->added.begin(), p_->added.end(),
                     [](const Impl::Added& x, const Impl::Added& y) { return x.content.size() > y.content.size(); });
    vocab_ = V;
  } catch (const json::exception& e) {
    throw Error(path + ": not a Hugging Face tokenizer.json (" + e.what() + ")");
  }
}

BpeTokenizer::~BpeTokenizer() = default;

std::vector<int32_t> BpeTokenizer::encode(const std::string& text) const {
  const Impl& I = *p_;
  size_t bad = 0;
  std::vector<char32_t> cps;
  LINMIX_CHECK(utf8_decode(text, cps, nullptr, &bad), "text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  std::vector<int32_t> out;
  std::vector<std::pair<std::string, int32_t>> raw, pieces;
  I.split_added(text, false, raw);
  for (auto& [s, id] : raw) {
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    std::string t = s;
    if (I.nfc) {
      UErrorCode st = U_ZERO_ERROR;
      const icu::UnicodeString u = I.norm->normalize(icu::UnicodeString::fromUTF8(s), st);
      LINMIX_CHECK(U_SUCCESS(st), std::string("NFC normalisation failed: ") + u_errorName(st));
      t.clear();
      u.toUTF8String(t);
    }
    pieces.clear();
    I.split_added(t, true, pieces);
    for (auto& [ps, pid] : pieces) {
      if (pid >= 0) {
        out.push_back(pid);
        continue;
      }
      std::vector<int32_t> off;
      utf8_decode(ps, cps, &off, nullptr);
      for (auto [b, e] : gpt2_split(cps)) I.bpe(ps.substr(size_t(off[b]), size_t(off[e] - off[b])), out);
    }
  }
  return out;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t i : ids) {
    LINMIX_CHECK(i >= 0 && i < vocab_ && !(p_->tokens[size_t(i)].empty()),
                 "token " + std::to_string(i) + " is not in the vocabulary");
    s += p_->tokens[size_t(i)];
  }
  return s;
}

}  // namespace linmix
