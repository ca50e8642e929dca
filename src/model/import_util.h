// What the checkpoint imports (rwkv_import.cpp, mamba_import.cpp) share: the Model of a config
// filled from a file's tensors, already under linmix's names.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "linmix/model.h"

namespace linmix {

// A Model of `cfg` whose every parameter is the tensor of its name in `tensors`: missing,
// mis-shaped (unless same_data(name, stored, param) accepts the stored shape as the same numbers in
// the same order), non-finite or extra tensors are refused, each message starting with `tag`
// (extra ones followed by hint(name)); a config the Model refuses likewise.
// The tensors' values are moved into the model (tensors keeps the names and shapes).
inline std::unique_ptr<Model> model_from_tensors(const ModelConfig& cfg, TensorMap& tensors, const std::string& tag,
                                                 const std::function<bool(const std::string&, const Tensor&, const Tensor&)>& same_data,
                                                 const std::function<std::string(const std::string&)>& hint) {
  std::unique_ptr<Model> model;
  try {
    model = std::make_unique<Model>(cfg, false);
  } catch (const Error& e) {
    throw Error(tag + e.what());
  }
  for (auto& [n, p] : model->params()) {
    auto it = tensors.find(n);
    LINMIX_CHECK(it != tensors.end(), tag + "no tensor '" + n + "'");
    Tensor& t = it->second;
    LINMIX_CHECK(t.shape == p.shape || same_data(n, t, p),
                 tag + "tensor '" + n + "': expected shape " + shape_str(p.shape) + ", found " + shape_str(t.shape));
    check_finite(n, t);
    LINMIX_CHECK(int64_t(t.data.size()) == numel_of(p.shape), tag + "tensor '" + n + "': " +
                                                                 std::to_string(t.data.size()) + " values for shape " +
                                                                 shape_str(p.shape));
    p.data = std::move(t.data);
  }
  for (const auto& [n, t] : tensors)
    LINMIX_CHECK(model->params().count(n), tag + "unexpected tensor '" + n + "'" + hint(n));
  return model;
}

}  // namespace linmix
