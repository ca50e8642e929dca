// Shared by the libFuzzer harnesses: every parser of outside bytes must give a result or a
// linmix::Error (a one-line refusal), nothing else: no other exception, no signal, no sanitizer
// report. Parsers that read a path get the input through a temporary file.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "linmix/error.h"

namespace fuzz {

inline std::string bytes(const uint8_t* data, size_t size) { return std::string(reinterpret_cast<const char*>(data), size); }

// A per-process temporary file holding the input; the same path every call.
inline std::string as_file(const uint8_t* data, size_t size, const char* ext) {
  static const std::string path = "/tmp/linmix-fuzz-" + std::to_string(::getpid()) + ext;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) __builtin_trap();
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return path;
}

// Runs f; a linmix::Error is the clean refusal, anything else escapes and aborts (a finding).
template <class F>
int guarded(F&& f) {
  try {
    f();
  } catch (const linmix::Error&) {
  }
  return 0;
}

}  // namespace fuzz
