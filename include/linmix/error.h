// linmix errors: every failure the user can cause is a linmix::Error carrying one line
// that names the thing at fault (tensor, param, file) and, for shapes, expected vs found.
// The CLI turns it into "linmix: <message>" on stderr and exit code 2.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace linmix {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// "[2,7,3,4]"
std::string shape_str(const std::vector<int64_t>& shape);

// Throws Error(msg) when cond is false. Message is built only on failure.
#define LINMIX_CHECK(cond, msg)                              \
  do {                                                       \
    if (!(cond)) throw ::linmix::Error(std::string() + msg); \
  } while (0)

}  // namespace linmix
