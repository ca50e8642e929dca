// Where a training step's time goes: wall time per region, summed over calls, regions nested by
// path ("mamba fwd/matmul"), each row inclusive of the regions inside it. Off by default (a
// region then costs one branch); `linmix train --profile` turns it on and prints the rows.
// Only serial code records: a region entered inside an OpenMP parallel region is ignored.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace linmix::profile {

void set_enabled(bool on);
void reset();

struct Row {
  std::string path;  // "a/b/c": the region c inside b inside a
  double seconds = 0;
  int64_t calls = 0;
};
std::vector<Row> rows();  // in the order each path was first entered

extern bool g_on;  // set_enabled's flag, read inline: a region costs one branch when off

class Scope {
 public:
  explicit Scope(std::string_view name) {
    if (g_on) enter(name);
  }
  ~Scope() {
    if (on_) leave();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void enter(std::string_view name);
  void leave();
  bool on_ = false;
  size_t parent_len_ = 0, row_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace linmix::profile
