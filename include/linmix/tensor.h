// Tensors and views.
//
// Tensor: an owning, contiguous, row-major float32 buffer with a shape (what crosses the
// safetensors wire). View<S>: a non-owning strided view used by kernels and tests; element
// counts and index arithmetic are int64_t throughout.
#pragma once
#include <bit>
#include <cstdint>
#include <algorithm>
#include <initializer_list>
#include <map>
#include <memory>
#include <new>
#include <utility>
#include <string>
#include <vector>

#include "linmix/error.h"

namespace linmix {

int64_t numel_of(const std::vector<int64_t>& shape);

// 1 when f is an infinity or a NaN (its exponent all ones), else 0; on the bits, so that an OR of
// it over a row vectorises (the value checks inside the kernels' reads, all_finite).
inline uint32_t nonfinite_bits(float f) { return uint32_t((std::bit_cast<uint32_t>(f) & 0x7f800000u) == 0x7f800000u); }

// Large buffers on transparent huge pages: at 2 MiB or more, 2 MiB aligned and advised
// MADV_HUGEPAGE (where the kernel's THP mode is "madvise", as Debian's default: one page fault per
// 2 MiB instead of 512, the faults of a fresh process's buffers being most of a `linmix mix` call
// beside its kernel), 64-byte aligned below. huge_free takes the same byte count.
void* huge_alloc(size_t bytes);
void huge_free(void* p, size_t bytes) noexcept;
// 64-byte aligned, on ordinary pages (no huge-page advice: a fresh buffer's first touch never waits
// on the kernel compacting memory for a huge page); freed by huge_free too.
void* plain_alloc(size_t bytes);
// A std::vector allocator on huge_alloc whose resize leaves the new elements unset (buffers a
// kernel writes whole before reading: no zeroing pass over fresh pages).
template <class T>
struct HugeAllocator {
  using value_type = T;
  HugeAllocator() = default;
  template <class U>
  HugeAllocator(const HugeAllocator<U>&) noexcept {}  // NOLINT
  T* allocate(size_t n) { return static_cast<T*>(huge_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { huge_free(p, n * sizeof(T)); }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    if constexpr (sizeof...(A) == 0) ::new (static_cast<void*>(p)) U;  // default-init: unset
    else ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  template <class U>
  bool operator==(const HugeAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const HugeAllocator<U>&) const noexcept { return false; }
};
template <class T>
using scratch_vector = std::vector<T, HugeAllocator<T>>;

// A tensor's floats: owned (a std::vector<float>), or a view of memory that someone else keeps
// alive (a torch tensor, a file's pages: `keep` holds it while any copy of the view lives).
// Reads and writes go through data(); anything that changes the size first makes it owned (a
// copy); copying a Storage copies the values (a view's too), moving keeps what it is.
class Storage {
 public:
  Storage() = default;
  explicit Storage(size_t n) : v_(n) {}
  Storage(size_t n, float fill) : v_(n, fill) {}
  Storage(std::vector<float> v) : v_(std::move(v)) {}  // NOLINT: a vector is a Storage
  Storage(std::initializer_list<float> l) : v_(l) {}
  template <class It, class = decltype(*std::declval<It>())>
  Storage(It a, It b) : v_(a, b) {}
  // n floats at p, not owned; `keep` (may be null) is held as long as the view is
  static Storage view(float* p, size_t n, std::shared_ptr<void> keep) {
    Storage s;
    s.p_ = p, s.n_ = n, s.keep_ = std::move(keep);
    return s;
  }
  // n floats left unset, in a buffer of its own (Tensor::uninitialized): read and written like a
  // view; owns_buffer() says the buffer is the storage's alone, to hand on (the torch extension's
  // outputs) instead of copying
  // (huge_pages = false: plain_alloc's ordinary pages)
  static Storage uninitialized(size_t n, bool huge_pages = true) {  // 64-byte aligned: rows of cache lines (streaming stores)
    void* mem = huge_pages ? huge_alloc(n * sizeof(float)) : plain_alloc(n * sizeof(float));
    std::shared_ptr<float> buf(static_cast<float*>(mem), [n](float* q) { huge_free(q, n * sizeof(float)); });
    float* p = buf.get();  // before buf is moved (the arguments' order is unspecified)
    Storage s = view(p, n, std::move(buf));
    s.own_buffer_ = true;
    return s;
  }
  bool owns_buffer() const { return p_ && own_buffer_; }
  const std::shared_ptr<void>& keeper() const { return keep_; }
  Storage(const Storage& o) : v_(o.begin(), o.end()) {}
  Storage& operator=(const Storage& o) {
    if (this != &o) *this = Storage(o);
    return *this;
  }
  Storage(Storage&& o) noexcept
      : v_(std::move(o.v_)), p_(o.p_), n_(o.n_), keep_(std::move(o.keep_)), own_buffer_(o.own_buffer_) {
    o.p_ = nullptr, o.n_ = 0, o.own_buffer_ = false;
  }
  Storage& operator=(Storage&& o) noexcept {
    v_ = std::move(o.v_), p_ = o.p_, n_ = o.n_, keep_ = std::move(o.keep_), own_buffer_ = o.own_buffer_;
    o.p_ = nullptr, o.n_ = 0, o.own_buffer_ = false;
    return *this;
  }

  bool is_view() const { return p_ != nullptr; }
  float* data() { return p_ ? p_ : v_.data(); }
  const float* data() const { return p_ ? p_ : v_.data(); }
  size_t size() const { return p_ ? n_ : v_.size(); }
  bool empty() const { return size() == 0; }
  float& operator[](size_t i) { return data()[i]; }
  const float& operator[](size_t i) const { return data()[i]; }
  float* begin() { return data(); }
  float* end() { return data() + size(); }
  const float* begin() const { return data(); }
  const float* end() const { return data() + size(); }

  void resize(size_t n, float fill = 0.0f) { own().resize(n, fill); }
  void assign(size_t n, float x) { drop_view(), v_.assign(n, x); }
  template <class It, class = decltype(*std::declval<It>())>
  void assign(It a, It b) {
    std::vector<float> v(a, b);
    drop_view(), v_ = std::move(v);
  }
  void reserve(size_t n) { own().reserve(n); }
  void push_back(float x) { own().push_back(x); }
  template <class It>
  void insert(float* at, It a, It b) {
    const size_t i = size_t(at - data());
    std::vector<float>& v = own();
    v.insert(v.begin() + std::ptrdiff_t(i), a, b);
  }
  void clear() { drop_view(), v_.clear(); }
  // frees the values (the capacity too)
  void release() { drop_view(), std::vector<float>().swap(v_); }
  // the values as a vector: moved out when owned, copied from a view
  std::vector<float> take() && {
    if (p_) return std::vector<float>(begin(), end());
    return std::move(v_);
  }
  // as a vector (a copy; moved out of an owned rvalue)
  explicit operator std::vector<float>() const& { return std::vector<float>(begin(), end()); }
  operator std::vector<float>() && { return std::move(*this).take(); }
  bool operator==(const Storage& o) const { return size() == o.size() && std::equal(begin(), end(), o.begin()); }
  bool operator==(const std::vector<float>& o) const { return size() == o.size() && std::equal(begin(), end(), o.begin()); }

 private:
  std::vector<float>& own() {
    if (p_) {
      v_.assign(p_, p_ + n_);
      drop_view();
    }
    return v_;
  }
  void drop_view() { p_ = nullptr, n_ = 0, keep_.reset(), own_buffer_ = false; }
  std::vector<float> v_;
  float* p_ = nullptr;  // a view's values (v_ unused)
  size_t n_ = 0;
  std::shared_ptr<void> keep_;
  bool own_buffer_ = false;
};

struct Tensor {
  std::vector<int64_t> shape;
  Storage data;

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> s, float fill = 0.0f)
      : shape(std::move(s)), data(static_cast<size_t>(numel_of(shape)), fill) {}
  // Its values left unset, for an output a kernel writes whole: no serial pass over the memory
  // first (at T = 4096, d_model 512, 8 MB, about a tenth of a chunked forward on 2 threads).
  static Tensor uninitialized(std::vector<int64_t> s, bool huge_pages = true) {
    Tensor t;
    t.shape = std::move(s);
    t.data = Storage::uninitialized(static_cast<size_t>(numel_of(t.shape)), huge_pages);
    return t;
  }

  int64_t numel() const { return static_cast<int64_t>(data.size()); }
  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  int64_t dim(int64_t i) const { return shape.at(static_cast<size_t>(i)); }
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
};

// Ordered by name, which is also the order safetensors files are written in.
using TensorMap = std::map<std::string, Tensor>;

// A TensorMap of (name, tensor) arguments, the tensors moved in: TensorMap{{"y", std::move(y)}}
// copies every tensor (an initializer list's elements are const), and a view's copy is a copy
// of its values (rwkv4's forward at T = 4096, C = 512: 2.0 -> 1.05 ms without the copy of y
// and the zeroing of a y the scan writes whole).
inline void put_moved(TensorMap&) {}
template <class... Rest>
void put_moved(TensorMap& m, const char* name, Tensor&& t, Rest&&... rest) {
  m.insert_or_assign(name, std::move(t));
  put_moved(m, std::forward<Rest>(rest)...);
}
template <class... Args>
TensorMap moved_map(Args&&... args) {
  TensorMap m;
  put_moved(m, std::forward<Args>(args)...);
  return m;
}

// A strided view over up to 6 dimensions. Strides are in elements.
template <class S>
struct View {
  S* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;

  View() = default;
  // Contiguous row-major view.
  View(S* d, std::vector<int64_t> s) : data(d), shape(std::move(s)), stride(shape.size()) {
    int64_t st = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      stride[i] = st;
      st *= shape[i];
    }
  }
  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  template <class... I>
  S& operator()(I... idx) const {
    const int64_t ix[] = {static_cast<int64_t>(idx)...};
    int64_t off = 0;
    for (size_t i = 0; i < sizeof...(I); ++i) off += ix[i] * stride[i];
    return data[off];
  }
  // Throws Error naming `what` unless the view has exactly `expected` shape.
  void check_shape(const std::string& what, const std::vector<int64_t>& expected) const {
    LINMIX_CHECK(shape == expected, "tensor '" + what + "': expected shape " +
                                        shape_str(expected) + ", found " + shape_str(shape));
  }
};

// Throws Error naming the tensor unless t has exactly `expected` shape.
void check_shape(const std::string& name, const Tensor& t, const std::vector<int64_t>& expected);
// Whether every one of the n values is finite (one vectorised pass, threads sharing a long one).
bool all_finite(const float* p, int64_t n);
// Throws Error naming the tensor and the first non-finite element.
void check_finite(const std::string& name, const Tensor& t);
// The same over the elements [off, off + n) of t (the error names the element's index in t).
void check_finite(const std::string& name, const Tensor& t, int64_t off, int64_t n);

}  // namespace linmix
