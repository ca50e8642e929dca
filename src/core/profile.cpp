// linmix/profile.h: a path string for the current nesting, rows in a map by path.
#include "linmix/profile.h"

#include <omp.h>

#include <unordered_map>

namespace linmix::profile {

bool g_on = false;

namespace {
std::string g_path;                               // the current region's path
std::unordered_map<std::string, size_t> g_index;  // path -> row
std::vector<Row> g_rows;
}  // namespace

void set_enabled(bool on) { g_on = on; }
void reset() { g_path.clear(), g_index.clear(), g_rows.clear(); }
std::vector<Row> rows() { return g_rows; }

void Scope::enter(std::string_view name) {
  on_ = !omp_in_parallel();
  if (!on_) return;
  parent_len_ = g_path.size();
  if (!g_path.empty()) g_path += '/';
  g_path += name;
  auto [it, fresh] = g_index.try_emplace(g_path, g_rows.size());  // rows in first-entered order
  if (fresh) g_rows.push_back({g_path, 0.0, 0});
  row_ = it->second;
  t0_ = std::chrono::steady_clock::now();
}

void Scope::leave() {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  g_rows[row_].seconds += s;
  g_rows[row_].calls += 1;
  g_path.resize(parent_len_);
}

}  // namespace linmix::profile
