// A Hugging Face tokenizer.json -> a byte-level BPE tokenizer, then a round trip of a fixed text.
#include "fuzz_util.h"
#include "linmix/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::as_file(data, size, ".json");
  return fuzz::guarded([&] {
    linmix::BpeTokenizer tk(path);
    const std::string text = "Hello, world! It's 2026 — déjà vu <|endoftext|>\n  x";
    if (tk.decode(tk.encode(text)) != text) __builtin_trap();  // a tokenizer that loads must round-trip
  });
}
