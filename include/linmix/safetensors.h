// safetensors I/O (https://github.com/huggingface/safetensors format):
//   [u64 little-endian header length N][N bytes JSON header][raw data]
// The JSON maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section) plus an optional "__metadata__" string map.
//
// Reading validates everything against the file size before any data is touched: header
// length, JSON syntax, dtype (F32; F16 and BF16 are widened to float32; I8 and U8 are kept as
// bytes, and so are F16 / BF16 in a file whose metadata has "linmix_packed": the engine's
// pre-converted weights, `linmix convert`), shape, offsets in range, byte count == numel *
// itemsize, and no two tensors overlapping.
// Writing is atomic: a temporary file in the same directory, fsync, then rename.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "linmix/tensor.h"

namespace linmix {

// A tensor kept as the file's values (row-major): one of the vectors, by dtype.
struct RawTensor {
  std::string dtype;  // "U8" | "I8" | "F16" | "BF16"
  std::vector<int64_t> shape;
  std::vector<uint8_t> u8;    // U8
  std::vector<int8_t> i8;     // I8
  std::vector<uint16_t> u16;  // F16, BF16: the bit patterns
  const char* data() const {
    return dtype == "U8" ? reinterpret_cast<const char*>(u8.data())
           : dtype == "I8" ? reinterpret_cast<const char*>(i8.data())
                           : reinterpret_cast<const char*>(u16.data());
  }
  size_t nbytes() const { return u8.size() + i8.size() + 2 * u16.size(); }
};

struct SafeTensors {
  TensorMap tensors;
  std::map<std::string, RawTensor> raw;
  std::map<std::string, std::string> metadata;
};

// Parses an in-memory file image; `what` names it in error messages.
SafeTensors parse_safetensors(const std::string& bytes, const std::string& what);
SafeTensors read_safetensors(const std::string& path);
// The same, the file mapped read-only: its F32 tensors are views of the mapping (no copy; the
// mapping lives as long as one of them), the rest read as above. For inputs that are only read
// (linmix mix: a write into one would fault); the file must not be truncated while they live.
SafeTensors map_safetensors(const std::string& path);
// Where only float tensors are read: an Error "<what>: tensor 'N' is I8: <why>" for the first
// tensor `s` keeps as bytes.
void check_floats(const SafeTensors& s, const std::string& what, const std::string& why);
std::string serialize_safetensors(const TensorMap& tensors,
                                  const std::map<std::string, std::string>& metadata = {});
void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata = {});
// The same with raw tensors beside the F32 ones (names must differ between the two maps).
// fsync = false: renamed into place without waiting for the disk (outputs a command can compute
// again, `linmix mix`'s: the fsync was 5-100 ms of a 40 ms run here); a crash still never leaves a
// partial file under the name, but a power loss may lose the new file.
void write_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, RawTensor>& raw,
                       const std::map<std::string, std::string>& metadata, bool fsync = true);

// Writes `bytes` to `path` atomically (temp file in the same directory + fsync + rename).
void write_file_atomic(const std::string& path, const std::string& bytes);
// The same for a file made of pieces written one after the other (no copy into one buffer).
void write_pieces_atomic(const std::string& path, const std::vector<std::pair<const char*, size_t>>& pieces,
                         bool fsync = true);

}  // namespace linmix
