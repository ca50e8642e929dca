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
constexpr uint64_t kSlice = uint64_t(1) << 22;  // 16-bit values widened a slice at a time

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

// A file's layout, validated: every tensor's dtype, shape and byte range (relative to the data
// section, which starts at data_start), the metadata.
struct Entry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t b = 0, e = 0, numel = 0, item = 0;
  bool raw = false;  // kept as bytes (RawTensor)
};
struct Layout {
  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;
};

// The 8-byte header length of a file of `size` bytes whose first bytes are `first` (>= 8 of them).
uint64_t header_length(std::string_view first, uint64_t size, const std::string& what) {
  LINMIX_CHECK(size >= 8, what + ": truncated safetensors file (" + std::to_string(size) +
                              " bytes; the 8-byte header length is missing)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(first[static_cast<size_t>(i)]);
  LINMIX_CHECK(n <= size - 8, what + ": header length " + std::to_string(n) +
                                  " runs past the end of the file (" + std::to_string(size) +
                                  " bytes): truncated or not a safetensors file");
  LINMIX_CHECK(n <= kMaxHeader, what + ": header length " + std::to_string(n) + " exceeds the 100 MB limit");
  return n;
}

// Everything but the data checked: the JSON header (`header`, its n bytes) of a file of `size` bytes.
Layout parse_layout(std::string_view header, uint64_t size, const std::string& what) {
  const uint64_t n = header.size();
  // the header is JSON text, padded with spaces at most: a NUL (and whatever hides after it) is refused
  const auto nul = std::find(header.begin(), header.end(), '\0');
  LINMIX_CHECK(nul == header.end(), what + ": the header contains a NUL byte (at " +
                                        std::to_string(nul - header.begin()) + " of " + std::to_string(n) + ")");
  json h;
  try {
    h = json::parse(header.begin(), header.end());
  } catch (const json::exception& e) {
    throw Error(what + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  LINMIX_CHECK(h.is_object(), what + ": header JSON is not an object");
  const uint64_t data_size = size - 8 - n;
  Layout L;
  L.data_start = 8 + n;
  if (h.contains("__metadata__")) {  // first: it decides how 16-bit tensors are kept
    const json& e = h["__metadata__"];
    LINMIX_CHECK(e.is_object(), what + ": __metadata__ is not an object");
    for (auto m = e.begin(); m != e.end(); ++m) {
      LINMIX_CHECK(m.value().is_string(), what + ": __metadata__ value '" + m.key() + "' is not a string");
      L.metadata[m.key()] = m.value().get<std::string>();
    }
  }
  const bool packed = L.metadata.count("linmix_packed") > 0;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") continue;
    const std::string tn = what + ": tensor '" + name + "'";
    LINMIX_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
                 tn + ": entry must have dtype, shape and data_offsets");
    LINMIX_CHECK(e["dtype"].is_string(), tn + ": dtype is not a string");
    Entry en;
    en.name = name, en.dtype = e["dtype"].get<std::string>();
    if (en.dtype == "F32") en.item = 4;
    else if (en.dtype == "F16" || en.dtype == "BF16") en.item = 2;
    else if (en.dtype == "I8" || en.dtype == "U8") en.item = 1;
    else throw Error(tn + ": unsupported dtype " + en.dtype + " (expected F32, F16, BF16, I8 or U8)");
    en.raw = en.item == 1 || (en.item == 2 && packed);
    LINMIX_CHECK(e["shape"].is_array(), tn + ": shape is not an array");
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      LINMIX_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                   tn + ": shape entries must be non-negative integers");
      const uint64_t dv = d.get<uint64_t>();
      LINMIX_CHECK(dv < (1ull << 40) && (dv == 0 || numel <= (1ull << 40) / dv), tn + ": shape too large");
      numel *= dv;
      en.shape.push_back(static_cast<int64_t>(dv));
    }
    en.numel = numel;
    const json& off = e["data_offsets"];
    LINMIX_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                 tn + ": data_offsets must be two non-negative integers");
    en.b = off[0].get<uint64_t>(), en.e = off[1].get<uint64_t>();
    LINMIX_CHECK(en.b <= en.e && en.e <= data_size,
                 tn + ": data_offsets [" + std::to_string(en.b) + "," + std::to_string(en.e) +
                     "] out of range (data section is " + std::to_string(data_size) + " bytes)");
    LINMIX_CHECK(en.e - en.b == numel * en.item, tn + ": data_offsets cover " + std::to_string(en.e - en.b) +
                                                     " bytes but shape " + shape_str(en.shape) + " of " + en.dtype +
                                                     " needs " + std::to_string(numel * en.item));
    L.entries.push_back(std::move(en));
  }
  // As the reference implementation: the tensors tile the data section exactly, in offset
  // order, with no overlap, no gap and no trailing bytes.
  std::vector<const Entry*> by_offset;
  for (const Entry& en : L.entries) by_offset.push_back(&en);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->b < b->b || (a->b == b->b && a->e < b->e); });
  uint64_t end = 0;
  std::string prev = "the start of the data section";
  for (const Entry* r : by_offset) {
    LINMIX_CHECK(r->b >= end, what + ": tensors " + prev + " and '" + r->name + "' have overlapping data_offsets");
    LINMIX_CHECK(r->b == end, what + ": a gap of " + std::to_string(r->b - end) + " bytes between " + prev +
                                  " and tensor '" + r->name + "' (data_offsets must be contiguous)");
    end = r->e, prev = "'" + r->name + "'";
  }
  LINMIX_CHECK(end == data_size, what + ": " + std::to_string(data_size - end) +
                                     " bytes after the last tensor (the data section must end with it)");
  return L;
}

// The tensors of a validated layout, each read straight into its own buffer by read(at, n, dst)
// (at: a byte offset in the file). Tensors are read in parallel, largest first: a fresh buffer's
// page faults are most of a load's cost (2.4 GB/s a thread on this machine), and two threads take
// them side by side.
using ReadAt = std::function<void(uint64_t at, uint64_t n, char* dst)>;  // never called with n = 0
// view_base: the file mapped (its first byte), kept alive by `keep`: F32 tensors at 4-byte
// aligned offsets become views of it instead of copies.
SafeTensors fill(Layout&& L, const ReadAt& read, char* view_base = nullptr, const std::shared_ptr<void>& keep = nullptr) {
  const int64_t N = int64_t(L.entries.size());
  std::vector<Tensor> tensors(static_cast<size_t>(N));
  std::vector<RawTensor> raws(static_cast<size_t>(N));
  std::vector<int64_t> order(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) order[size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return L.entries[size_t(a)].e - L.entries[size_t(a)].b > L.entries[size_t(b)].e - L.entries[size_t(b)].b;
  });
  std::vector<std::string> errors(static_cast<size_t>(N));
#pragma omp parallel for schedule(dynamic, 1) if (N > 1)
  for (int64_t k = 0; k < N; ++k) {
    const int64_t i = order[size_t(k)];
    const Entry& en = L.entries[size_t(i)];
    const uint64_t at = L.data_start + en.b;
    try {
      if (en.raw) {
        RawTensor& r = raws[size_t(i)];
        r.dtype = en.dtype, r.shape = en.shape;
        char* dst = en.dtype == "U8" ? (r.u8.resize(en.numel), reinterpret_cast<char*>(r.u8.data()))
                    : en.dtype == "I8" ? (r.i8.resize(en.numel), reinterpret_cast<char*>(r.i8.data()))
                                       : (r.u16.resize(en.numel), reinterpret_cast<char*>(r.u16.data()));
        if (en.e > en.b) read(at, en.e - en.b, dst);
        continue;
      }
      Tensor& t = tensors[size_t(i)];
      t.shape = en.shape;
      if (view_base && en.item == 4 && (uintptr_t(view_base) + at) % alignof(float) == 0) {
        if (en.numel > 0) t.data = Storage::view(reinterpret_cast<float*>(view_base + at), en.numel, keep);
        continue;
      }
      t.data.resize(en.numel);
      if (en.item == 4) {
        if (en.e > en.b) read(at, en.e - en.b, reinterpret_cast<char*>(t.data.data()));
        continue;
      }
      // F16 / BF16 widened, a slice at a time through a small buffer
      std::vector<uint16_t> buf(size_t(std::min<uint64_t>(en.numel, kSlice)));
      const bool f16 = en.dtype == "F16";
      for (uint64_t i0 = 0; i0 < en.numel; i0 += kSlice) {
        const uint64_t i1 = std::min(en.numel, i0 + kSlice);
        read(at + 2 * i0, 2 * (i1 - i0), reinterpret_cast<char*>(buf.data()));
        for (uint64_t j = i0; j < i1; ++j) t.data[j] = f16 ? half_to_float(buf[j - i0]) : bf16_to_float(buf[j - i0]);
      }
    } catch (const std::exception& ex) {
      errors[size_t(i)] = ex.what();
    }
  }
  for (const std::string& e : errors) LINMIX_CHECK(e.empty(), e);
  SafeTensors out;
  out.metadata = std::move(L.metadata);
  for (int64_t i = 0; i < N; ++i) {
    const Entry& en = L.entries[size_t(i)];  // (the header's JSON object: no name twice)
    if (en.raw) out.raw[en.name] = std::move(raws[size_t(i)]);
    else out.tensors[en.name] = std::move(tensors[size_t(i)]);
  }
  return out;
}

}  // namespace

void check_floats(const SafeTensors& s, const std::string& what, const std::string& why) {
  if (!s.raw.empty()) throw Error(what + ": tensor '" + s.raw.begin()->first + "' is " + s.raw.begin()->second.dtype + ": " + why);
}

namespace {
// A regular file opened for reading (closed with this), and its size; anything else an Error.
struct OpenFile {
  int fd = -1;
  uint64_t size = 0;
  explicit OpenFile(const std::string& path) : fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    LINMIX_CHECK(fd >= 0, path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat sb {};
    const bool stated = ::fstat(fd, &sb) == 0;
    const std::string why = stated ? "not a regular file" : std::strerror(errno);
    if (!stated || !S_ISREG(sb.st_mode)) {
      ::close(fd);
      throw Error(path + ": cannot open (" + why + ")");
    }
    size = uint64_t(sb.st_size);
  }
  ~OpenFile() { ::close(fd); }
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
};
}  // namespace

SafeTensors parse_safetensors(const std::string& bytes, const std::string& what) {
  const uint64_t n = header_length(bytes, bytes.size(), what);
  Layout L = parse_layout(std::string_view(bytes).substr(8, size_t(n)), bytes.size(), what);
  return fill(std::move(L), [&](uint64_t at, uint64_t k, char* dst) { std::memcpy(dst, bytes.data() + at, size_t(k)); });
}

// The header is read first and validated whole; each tensor is then read (pread) straight into
// its own buffer: no mapping, no copy of the file, nothing resident but the tensors.
SafeTensors read_safetensors(const std::string& path) {
  const OpenFile file(path);
  const int fd = file.fd;
  const uint64_t size = file.size;
  const ReadAt read = [&](uint64_t at, uint64_t n, char* dst) {
    uint64_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(fd, dst + done, size_t(std::min<uint64_t>(n - done, uint64_t(1) << 30)), off_t(at + done));
      if (r < 0 && errno == EINTR) continue;
      LINMIX_CHECK(r > 0, path + ": read failed at byte " + std::to_string(at + done) + " (" +
                              (r < 0 ? std::strerror(errno) : "the file shrank while it was read") + ")");
      done += uint64_t(r);
    }
  };
  char first[8] = {};
  if (size >= 8) read(0, 8, first);
  const uint64_t n = header_length(std::string_view(first, 8), size, path);
  std::string header(size_t(n), '\0');
  read(8, n, header.data());
  return fill(parse_layout(header, size, path), read);
}

SafeTensors map_safetensors(const std::string& path) {
  const OpenFile file(path);
  const int fd = file.fd;
  const uint64_t size = file.size;
  if (size < 8) header_length(std::string_view(), size, path);  // refused there: truncated
  // read-only (writable private pages would be copied by the populate), the pages populated at
  // once: one call instead of a fault per 64 KiB
  void* map = ::mmap(nullptr, size_t(size), PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
  LINMIX_CHECK(map != MAP_FAILED, path + ": cannot map (" + std::strerror(errno) + ")");
  const size_t len = size_t(size);
  std::shared_ptr<void> keep(map, [len](void* p) { ::munmap(p, len); });
  char* base = static_cast<char*>(map);
  const uint64_t n = header_length(std::string_view(base, 8), size, path);
  return fill(parse_layout(std::string_view(base + 8, size_t(n)), size, path),
              [&](uint64_t at, uint64_t k, char* dst) { std::memcpy(dst, base + at, size_t(k)); }, base, keep);
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
    LINMIX_CHECK(r.nbytes() == uint64_t(numel_of(r.shape)) * item && (item == 1) == r.u16.empty(),
                 "tensor '" + name + "': " + std::to_string(r.nbytes()) + " bytes of " + r.dtype +
                     " do not match shape " + shape_str(r.shape));
    p.push_back({&name, r.data(), r.nbytes()});
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

void write_pieces_atomic(const std::string& path, const std::vector<std::pair<const char*, size_t>>& pieces, bool fsync) {
  remove_stale_tmp(path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  LINMIX_CHECK(fd >= 0, path + ": cannot create temporary file " + tmp + " (" + std::strerror(errno) + ")");
  // The file's blocks allocated before it is written (where the file system can: ext4, xfs, tmpfs;
  // else the writes allocate them as before): a file written with delayed allocation and renamed
  // over an existing one is flushed to disk by ext4 in the rename (auto_da_alloc), which took 1-8
  // ms more than a new file's ~3 ms for an 8 MB `linmix mix` output.
  off_t total = 0;
  for (const auto& piece : pieces) total += off_t(piece.second);
  if (total > 0) (void)::fallocate(fd, 0, 0, total);
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
  if ((fsync && ::fsync(fd) != 0) || ::close(fd) != 0) {
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
                       const std::map<std::string, std::string>& metadata, bool fsync) {
  // the header, then each tensor's bytes straight from its buffer (no copy of the whole file)
  const std::string header = safetensors_header(tensors, raw, metadata);
  std::vector<std::pair<const char*, size_t>> pieces = {{header.data(), header.size()}};
  for (const Piece& p : pieces_of(tensors, raw)) pieces.emplace_back(p.data, size_t(p.bytes));
  write_pieces_atomic(path, pieces, fsync);
}

}  // namespace linmix
