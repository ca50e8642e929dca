// Tensors and views.
//
// Tensor: an owning, contiguous, row-major float32 buffer with a shape (what crosses the
// safetensors wire). View<S>: a non-owning strided view used by kernels and tests; element
// counts and index arithmetic are int64_t throughout.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "linmix/error.h"

namespace linmix {

int64_t numel_of(const std::vector<int64_t>& shape);

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> s, float fill = 0.0f)
      : shape(std::move(s)), data(static_cast<size_t>(numel_of(shape)), fill) {}

  int64_t numel() const { return static_cast<int64_t>(data.size()); }
  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  int64_t dim(int64_t i) const { return shape.at(static_cast<size_t>(i)); }
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
};

// Ordered by name, which is also the order safetensors files are written in.
using TensorMap = std::map<std::string, Tensor>;

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
// Throws Error naming the tensor and the first non-finite element.
void check_finite(const std::string& name, const Tensor& t);

}  // namespace linmix
