#include "linmix/safetensors.h"

#include <cstdint>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string_view>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace linmix {
namespace {

using json = nlohmann::json;

// Upper bound on the JSON header, as in the reference implementation (100 MB).
constexpr uint64_t kMaxHeader = 100u * 1000u * 1000u;
constexpr uint64_t kSlice = uint64_t(1) << 22;  // values copied between two drops of the mapping's pages

float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);  // zero / subnormal
  } else if (exp == 31) {
    v = man ? std::nanf("") : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// parse_safetensors over any bytes; done(p, n) is told each tensor's bytes once they are copied
// (read_safetensors drops those pages of its file mapping: the file is never resident whole
// beside the tensors).
SafeTensors parse_view(std::string_view bytes, const std::string& what,
                       const std::function<void(const char*, size_t)>& done);

}  // namespace

SafeTensors parse_safetensors(const std::string& bytes, const std::string& what) {
  return parse_view(bytes, what, nullptr);
}

namespace {
SafeTensors parse_view(std::string_view bytes, const std::string& what,
                       const std::function<void(const char*, size_t)>& done) {
  const uint64_t size = bytes.size();
  LINMIX_CHECK(size >= 8, what + ": truncated safetensors file (" + std::to_string(size) +
                              " bytes; the 8-byte header length is missing)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  LINMIX_CHECK(n <= size - 8, what + ": header length " + std::to_string(n) +
                                  " runs past the end of the file (" + std::to_string(size) +
                                  " bytes): truncated or not a safetensors file");
  LINMIX_CHECK(n <= kMaxHeader, what + ": header length " + std::to_string(n) + " exceeds the 100 MB limit");
  // the header is JSON text, padded with spaces at most: a NUL (and whatever hides after it) is refused
  const auto hb = bytes.begin() + 8, he = hb + static_cast<std::ptrdiff_t>(n);
  LINMIX_CHECK(std::find(hb, he, '\0') == he, what + ": the header contains a NUL byte (at " +
                                                  std::to_string(std::find(hb, he, '\0') - hb) + " of " +
                                                  std::to_string(n) + ")");
  json h;
  try {
    h = json::parse(hb, he);
  } catch (const json::exception& e) {
    throw Error(what + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  LINMIX_CHECK(h.is_object(), what + ": header JSON is not an object");
  const uint64_t data_size = size - 8 - n;
  const char* data = bytes.data() + 8 + n;

  SafeTensors out;
  if (h.contains("__metadata__")) {  // first: it decides how 16-bit tensors are kept
    const json& e = h["__metadata__"];
    LINMIX_CHECK(e.is_object(), what + ": __metadata__ is not an object");
    for (auto m = e.begin(); m != e.end(); ++m) {
      LINMIX_CHECK(m.value().is_string(), what + ": __metadata__ value '" + m.key() + "' is not a string");
      out.metadata[m.key()] = m.value().get<std::string>();
    }
  }
  const bool packed = out.metadata.count("linmix_packed") > 0;
  struct Range {
    uint64_t b, e;
    std::string name;
  };
  std::vector<Range> ranges;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") continue;
    const std::string tn = what + ": tensor '" + name + "'";
    LINMIX_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
                 tn + ": entry must have dtype, shape and data_offsets");
    LINMIX_CHECK(e["dtype"].is_string(), tn + ": dtype is not a string");
    const std::string dtype = e["dtype"].get<std::string>();
    size_t item = 0;
    if (dtype == "F32") item = 4;
    else if (dtype == "F16" || dtype == "BF16") item = 2;
    else if (dtype == "I8" || dtype == "U8") item = 1;
    else throw Error(tn + ": unsupported dtype " + dtype + " (expected F32, F16, BF16, I8 or U8)");
    LINMIX_CHECK(e["shape"].is_array(), tn + ": shape is not an array");
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      LINMIX_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                   tn + ": shape entries must be non-negative integers");
      const uint64_t dv = d.get<uint64_t>();
      LINMIX_CHECK(dv < (1ull << 40) && (dv == 0 || numel <= (1ull << 40) / dv), tn + ": shape too large");
      numel *= dv;
      shape.push_back(static_cast<int64_t>(dv));
    }
    const json& off = e["data_offsets"];
    LINMIX_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                 tn + ": data_offsets must be two non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    LINMIX_CHECK(b <= en && en <= data_size,
                 tn + ": data_offsets [" + std::to_string(b) + "," + std::to_string(en) +
                     "] out of range (data section is " + std::to_string(data_size) + " bytes)");
    LINMIX_CHECK(en - b == numel * item, tn + ": data_offsets cover " + std::to_string(en - b) +
                                             " bytes but shape " + shape_str(shape) + " of " + dtype +
                                             " needs " + std::to_string(numel * item));
    ranges.push_back({b, en, name});
    LINMIX_CHECK(!out.tensors.count(name) && !out.raw.count(name), tn + ": named twice");
    if (item == 1 || (item == 2 && packed)) {  // kept as bytes, one copy
      RawTensor r{dtype, shape, std::vector<uint8_t>(size_t(en - b))};
      for (uint64_t i0 = 0; i0 < en - b; i0 += 4 * kSlice) {
        const uint64_t i1 = std::min(en - b, i0 + 4 * kSlice);
        std::memcpy(r.bytes.data() + i0, data + b + i0, size_t(i1 - i0));
        if (done) done(data + b + i0, size_t(i1 - i0));
      }
      out.raw[name] = std::move(r);
      continue;
    }
    Tensor t;
    t.shape = shape;
    t.data.reserve(numel);  // filled by appending: no zero-fill pass before the copy
    const char* p = data + b;
    const bool f16 = dtype == "F16";
    // in slices of 4M values, each slice's source bytes handed to done() once copied
    for (uint64_t i0 = 0; i0 < numel; i0 += kSlice) {
      const uint64_t i1 = std::min(numel, i0 + kSlice);
      if (item == 4 && reinterpret_cast<uintptr_t>(p) % alignof(float) == 0) {
        const float* f = reinterpret_cast<const float*>(p);
        t.data.insert(t.data.end(), f + i0, f + i1);
      } else {
        for (uint64_t i = i0; i < i1; ++i) {
          if (item == 4) {
            float v;
            std::memcpy(&v, p + 4 * i, 4);
            t.data.push_back(v);
            continue;
          }
          uint16_t v;
          std::memcpy(&v, p + 2 * i, 2);
          t.data.push_back(f16 ? half_to_float(v) : bf16_to_float(v));
        }
      }
      if (done) done(p + item * i0, size_t((i1 - i0) * item));
    }
    out.tensors[name] = std::move(t);
  }
  // As the reference implementation: the tensors tile the data section exactly, in offset
  // order, with no overlap, no gap and no trailing bytes.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.b < b.b || (a.b == b.b && a.e < b.e); });
  uint64_t end = 0;
  std::string prev = "the start of the data section";
  for (const Range& r : ranges) {
    LINMIX_CHECK(r.b >= end, what + ": tensors " + prev + " and '" + r.name + "' have overlapping data_offsets");
    LINMIX_CHECK(r.b == end, what + ": a gap of " + std::to_string(r.b - end) + " bytes between " + prev +
                                 " and tensor '" + r.name + "' (data_offsets must be contiguous)");
    end = r.e, prev = "'" + r.name + "'";
  }
  LINMIX_CHECK(end == data_size, what + ": " + std::to_string(data_size - end) +
                                     " bytes after the last tensor (the data section must end with it)");
  return out;
}

}  // namespace

// The file is mapped read-only and each tensor copied straight from the mapping into its own
// buffer, the pages it came from dropped as soon as it is copied: the peak is the tensors plus a
// tensor's pages, not the file read into a buffer (and copied) beside them.
SafeTensors read_safetensors(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LINMIX_CHECK(fd >= 0, path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat sb {};
  const bool stated = ::fstat(fd, &sb) == 0;
  if (!stated || !S_ISREG(sb.st_mode)) {
    const int err = errno;
    ::close(fd);
    throw Error(path + ": cannot open (" + (stated ? "not a regular file" : std::strerror(err)) + ")");
  }
  const size_t size = size_t(sb.st_size);
  if (size == 0) {
    ::close(fd);
    return parse_view(std::string_view(), path, nullptr);  // refused there: truncated
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  LINMIX_CHECK(map != MAP_FAILED, path + ": cannot map (" + std::strerror(err) + ")");
  ::madvise(map, size, MADV_SEQUENTIAL);
  const long page = ::sysconf(_SC_PAGESIZE);
  const auto drop = [&](const char* p, size_t n) {  // the whole pages inside [p, p + n)
    const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + uintptr_t(page) - 1) / uintptr_t(page) * uintptr_t(page);
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + n) / uintptr_t(page) * uintptr_t(page);
    if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
  };
  try {
    SafeTensors out = parse_view(std::string_view(static_cast<const char*>(map), size), path, drop);
    ::munmap(map, size);
    return out;
  } catch (...) {
    ::munmap(map, size);
    throw;
  }
}

namespace {
// The header of a safetensors file of `tensors` and `raw` (8-byte length, JSON padded so the data
// section is 8-byte aligned); the data section is the tensors' bytes in name order (both maps merged).
struct Piece {
  const std::string* name;
  const char* data;
  uint64_t bytes;
};
std::vector<Piece> pieces_of(const TensorMap& tensors, const std::map<std::string, RawTensor>& raw) {
  std::vector<Piece> p;
  for (const auto& [name, t] : tensors) {
    LINMIX_CHECK(static_cast<int64_t>(t.data.size()) == numel_of(t.shape),
                 "tensor '" + name + "': data size does not match shape " + shape_str(t.shape));
    LINMIX_CHECK(!raw.count(name), "tensor '" + name + "' given twice (float and raw)");
    p.push_back({&name, reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4});
  }
  for (const auto& [name, r] : raw) {
    const uint64_t item = r.dtype == "I8" || r.dtype == "U8" ? 1 : r.dtype == "F16" || r.dtype == "BF16" ? 2 : 0;
    LINMIX_CHECK(item > 0, "tensor '" + name + "': unsupported raw dtype " + r.dtype);
    LINMIX_CHECK(r.bytes.size() == uint64_t(numel_of(r.shape)) * item,
                 "tensor '" + name + "': " + std::to_string(r.bytes.size()) + " bytes do not match shape " + shape_str(r.shape));
    p.push_back({&name, reinterpret_cast<const char*>(r.bytes.data()), r.bytes.size()});
  }
  std::sort(p.begin(), p.end(), [](const Piece& a, const Piece& b) { return *a.name < *b.name; });
  return p;
}

std::string safetensors_header(const TensorMap& tensors, const std::map<std::string, RawTensor>& raw,
                               const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const Piece& p : pieces_of(tensors, raw)) {
    const auto r = raw.find(*p.name);
    h[*p.name] = {{"dtype", r == raw.end() ? std::string("F32") : r->second.dtype},
                  {"shape", r == raw.end() ? tensors.at(*p.name).shape : r->second.shape},
                  {"data_offsets", {off, off + p.bytes}}};
    off += p.bytes;
  }
  std::string hs = h.dump();
  while ((hs.size() + 8) % 8) hs.push_back(' ');  // keep the data section 8-byte aligned
  std::string out(8, '\0');
  const uint64_t n = hs.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + hs;
}
}  // namespace

std::string serialize_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  std::string out = safetensors_header(tensors, {}, metadata);
  size_t total = out.size();
  for (const auto& [name, t] : tensors) total += t.data.size() * 4;
  out.reserve(total);
  for (const auto& [name, t] : tensors) out.append(reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4);
  return out;
}

namespace {
// Temporary files of writers that died (a kill during a write) are removed by the next write of
// the same path: "<path>.tmp.<pid>" whose pid no longer runs.
void remove_stale_tmp(const std::string& path) {
  std::error_code ec;
  const std::filesystem::path p(path);
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
  const std::string prefix = p.filename().string() + ".tmp.";
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) != 0) continue;
    const std::string pid = n.substr(prefix.size());
    if (pid.empty() || pid.size() > 9 || !std::all_of(pid.begin(), pid.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    if (::kill(pid_t(std::stol(pid)), 0) != 0 && errno == ESRCH) std::filesystem::remove(e.path(), ec);
  }
}
}  // namespace

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_pieces_atomic(path, {{bytes.data(), bytes.size()}});
}

void write_pieces_atomic(const std::string& path, const std::vector<std::pair<const char*, size_t>>& pieces) {
  remove_stale_tmp(path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  LINMIX_CHECK(fd >= 0, path + ": cannot create temporary file " + tmp + " (" + std::strerror(errno) + ")");
  for (const auto& [data, size] : pieces) {
    size_t done = 0;
    while (done < size) {
      const ssize_t w = ::write(fd, data + done, size - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        const std::string err = std::strerror(errno);
        ::close(fd);
        ::unlink(tmp.c_str());
        throw Error(path + ": write failed (" + err + ")");
      }
      done += static_cast<size_t>(w);
    }
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const std::string err = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error(path + ": write failed (" + err + ")");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error(path + ": cannot rename temporary file into place (" + err + ")");
  }
}

void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_safetensors(path, tensors, {}, metadata);
}

void write_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, RawTensor>& raw,
                       const std::map<std::string, std::string>& metadata) {
  // the header, then each tensor's bytes straight from its buffer (no copy of the whole file)
  const std::string header = safetensors_header(tensors, raw, metadata);
  std::vector<std::pair<const char*, size_t>> pieces = {{header.data(), header.size()}};
  for (const Piece& p : pieces_of(tensors, raw)) pieces.emplace_back(p.data, size_t(p.bytes));
  write_pieces_atomic(path, pieces);
}

}  // namespace linmix
