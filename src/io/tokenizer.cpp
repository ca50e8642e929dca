#include "linmix/tokenizer.h"

#include <algorithm>

#include <fstream>
#include <sstream>

#include "linmix/error.h"

namespace linmix {

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  out.reserve(text.size());
  for (unsigned char c : text) out.push_back(c);
  return out;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t i : ids) {
    LINMIX_CHECK(i >= 0 && i < 256, "token " + std::to_string(i) + " is not a byte");
    s.push_back(char(i));
  }
  return s;
}

namespace {

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else if (cp < 0x800) {
    s.push_back(char(0xC0 | (cp >> 6))), s.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    s.push_back(char(0xE0 | (cp >> 12))), s.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(char(0xF0 | (cp >> 18))), s.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3F))), s.push_back(char(0x80 | (cp & 0x3F)));
  }
}

// Decodes a Python str literal ('...' or "...", UTF-8 text, with \\ \' \" \n \t \r \xHH
// \uHHHH \UHHHHHHHH escapes; \xHH in a str is a code point) or bytes literal (b'...', \xHH a byte).
std::string python_literal(const std::string& lit, const std::string& where) {
  const bool bytes = !lit.empty() && lit[0] == 'b';
  const size_t q0 = bytes ? 1 : 0;
  LINMIX_CHECK(lit.size() >= q0 + 2 && (lit[q0] == '\'' || lit[q0] == '"') && lit.back() == lit[q0],
               where + ": not a Python string literal: " + lit);
  std::string out;
  auto hex = [&](size_t at, size_t n) {
    LINMIX_CHECK(at + n <= lit.size() - 1, where + ": truncated escape in " + lit);
    uint32_t v = 0;
    for (size_t k = at; k < at + n; ++k) {
      const char c = lit[k];
      const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      LINMIX_CHECK(d >= 0, where + ": bad hex digit in the escape of " + lit);
      v = v * 16 + uint32_t(d);
    }
    LINMIX_CHECK(v <= 0x10FFFF, where + ": escape beyond Unicode in " + lit);
    return v;
  };
  for (size_t i = q0 + 1; i + 1 < lit.size(); ++i) {
    if (lit[i] != '\\') {
      out.push_back(lit[i]);
      continue;
    }
    LINMIX_CHECK(i + 2 < lit.size(), where + ": dangling backslash in " + lit);
    const char e = lit[++i];
    switch (e) {
      case '\\': out.push_back('\\'); break;
      case '\'': out.push_back('\''); break;
      case '"': out.push_back('"'); break;
      case 'n': out.push_back('\n'); break;
      case 't': out.push_back('\t'); break;
      case 'r': out.push_back('\r'); break;
      case 'x': {
        const uint32_t v = hex(i + 1, 2);
        if (bytes) out.push_back(char(v));
        else append_utf8(out, v);
        i += 2;
        break;
      }
      case 'u': append_utf8(out, hex(i + 1, 4)), i += 4; break;
      case 'U': append_utf8(out, hex(i + 1, 8)), i += 8; break;
      default: throw Error(where + ": unsupported escape \\" + std::string(1, e) + " in " + lit);
    }
  }
  return out;
}

}  // namespace

WorldTokenizer::WorldTokenizer(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LINMIX_CHECK(f.good(), path + ": cannot open the tokenizer file");
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.empty()) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    const size_t a = line.find(' '), b = line.rfind(' ');
    LINMIX_CHECK(a != std::string::npos && b > a, where + ": expected 'ID LITERAL LENGTH'");
    // ID and LENGTH: plain decimal integers (no sign, no trailing characters)
    auto decimal = [&](const std::string& t) {
      LINMIX_CHECK(!t.empty() && t.size() <= 9 && std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; }),
                   where + ": expected 'ID LITERAL LENGTH', found '" + t + "' for a number");
      return std::stoll(t);
    };
    const int64_t id = decimal(line.substr(0, a)), len = decimal(line.substr(b + 1));
    const std::string tok = python_literal(line.substr(a + 1, b - a - 1), where);
    LINMIX_CHECK(static_cast<int64_t>(tok.size()) == len,
                 where + ": token is " + std::to_string(tok.size()) + " bytes, the file says " + std::to_string(len));
    // ids up to 2^20 (a model's largest vocabulary): a sparse huge id cannot blow up memory
    LINMIX_CHECK(id >= 1 && id < (1 << 20), where + ": token id " + std::to_string(id) + " outside [1, 2^20)");
    if (static_cast<int64_t>(tokens_.size()) <= id) tokens_.resize(id + 1), seen_.resize(id + 1, false);
    LINMIX_CHECK(!seen_[size_t(id)], where + ": token id " + std::to_string(id) + " is given twice");
    LINMIX_CHECK(!tok.empty(), where + ": empty token");
    tokens_[id] = tok, seen_[size_t(id)] = true;
    int32_t node = 0;  // the token's path in the trie, created as needed
    for (unsigned char c : tok) {
      auto [it, added] = trie_.try_emplace(edge(node, c), int32_t(node_token_.size()));
      if (added) node_token_.push_back(-1);
      node = it->second;
    }
    LINMIX_CHECK(node_token_[size_t(node)] < 0, where + ": duplicate token");
    node_token_[size_t(node)] = int32_t(id);
  }
  vocab_ = static_cast<int64_t>(tokens_.size());
  for (int b = 0; b < 256; ++b) {
    const auto it = trie_.find(edge(0, static_cast<unsigned char>(b)));
    LINMIX_CHECK(it != trie_.end() && node_token_[size_t(it->second)] >= 0,
                 path + ": every single byte must be a token (byte " + std::to_string(b) + " is missing)");
  }
}

std::vector<int32_t> WorldTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  size_t i = 0;
  while (i < text.size()) {  // greedy: the longest token that matches here, one walk down the trie
    int32_t node = 0, best = -1;
    size_t len = 0;
    for (size_t j = i; j < text.size(); ++j) {
      const auto it = trie_.find(edge(node, static_cast<unsigned char>(text[j])));
      if (it == trie_.end()) break;
      node = it->second;
      if (node_token_[size_t(node)] >= 0) best = node_token_[size_t(node)], len = j - i + 1;
    }
    out.push_back(best);  // every byte is a token (checked at load): len >= 1
    i += len;
  }
  return out;
}

std::string WorldTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t i : ids) {
    LINMIX_CHECK(i >= 1 && i < vocab_ && !tokens_[i].empty(), "token " + std::to_string(i) + " is not in the vocabulary");
    s += tokens_[i];
  }
  return s;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  if (path == "bytes") return std::make_unique<ByteTokenizer>();
  std::ifstream f(path, std::ios::binary);
  LINMIX_CHECK(f.good(), path + ": cannot open the tokenizer file");
  std::string head(64, '\0');
  f.read(head.data(), 64);
  head.resize(static_cast<size_t>(f.gcount()));
  const size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{') return std::make_unique<BpeTokenizer>(path);
  if (first != std::string::npos && std::isdigit(static_cast<unsigned char>(head[first])))
    return std::make_unique<WorldTokenizer>(path);
  throw Error(path + ": unrecognised tokenizer file (expected an RWKV World vocabulary or a tokenizer.json)");
}

}  // namespace linmix
