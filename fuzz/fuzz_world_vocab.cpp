// An RWKV World vocabulary file -> a tokenizer, then a round trip of a fixed text.
#include "fuzz_util.h"
#include "linmix/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::as_file(data, size, ".txt");
  return fuzz::guarded([&] {
    linmix::WorldTokenizer tk(path);
    const std::string text = "Hello, world!\n\xff\x00 ok";
    if (tk.decode(tk.encode(text)) != text) __builtin_trap();  // every byte is a token: it must round-trip
  });
}
