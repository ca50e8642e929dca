#include "linmix/tensor.h"

#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <new>

namespace linmix {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {
constexpr size_t kHuge = size_t(2) << 20;
}

void* huge_alloc(size_t bytes) {
  const size_t align = bytes >= kHuge ? kHuge : 64;
  const size_t size = (std::max<size_t>(bytes, 1) + align - 1) / align * align;  // aligned_alloc: a multiple
  void* p = std::aligned_alloc(align, size);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) ::madvise(p, size, MADV_HUGEPAGE);  // advice only: where refused, 4 KiB pages
#endif
  return p;
}

void huge_free(void* p, size_t) noexcept { std::free(p); }

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void check_shape(const std::string& name, const Tensor& t, const std::vector<int64_t>& expected) {
  LINMIX_CHECK(t.shape == expected, "tensor '" + name + "': expected shape " +
                                        shape_str(expected) + ", found " + shape_str(t.shape));
}

bool all_finite(const float* p, int64_t n) {
  // x * 0 is 0 for a finite x and NaN otherwise: one vectorised pass (measured 3 -> 0.5 ms for
  // four 2M-float inputs); threads share a long one: one core does not draw the machine's
  // bandwidth (4 inputs of 8 MB (gla at T = 4096), warm: 1.17 -> 0.58 ms on 2 threads)
  float acc = 0.0f;
#pragma omp parallel for simd reduction(+ : acc) schedule(static) if (n >= (int64_t(1) << 20))
  for (int64_t i = 0; i < n; ++i) acc += p[i] * 0.0f;
  return acc == 0.0f;
}

void check_finite(const std::string& name, const Tensor& t) {
  if (all_finite(t.data.data(), t.numel())) return;  // the element searched only when there is one
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (!std::isfinite(t.data[static_cast<size_t>(i)])) {
      throw Error("tensor '" + name + "': element " + std::to_string(i) + " is " +
                  (std::isnan(t.data[static_cast<size_t>(i)]) ? "NaN" : "infinite") +
                  "; inputs must be finite");
    }
  }
}

}  // namespace linmix
