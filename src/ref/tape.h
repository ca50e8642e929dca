// A minimal reverse-mode automatic differentiation scalar for the float64 references.
//
// The references (src/ref/) are templates on the scalar; instantiated with ad::Var they
// record every operation on a tape, and backward() sweeps it once to give the gradient of a
// scalar with respect to every input. This is how linmix gets the *reference* backward of
// all mechanisms (tests compare it with finite differences and with the hand-written
// backward of the parallel forms, which use no tape). Tapes grow with every operation
// (O(T^2 D) for a T x T reference): meant for the small shapes of tests.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace linmix::ad {

struct Node {
  int32_t a, b;  // parents (-1: none)
  double da, db;  // d(node)/d(parent)
};

struct Tape {
  std::vector<Node> nodes;
  static Tape*& active() {
    thread_local Tape* t = nullptr;
    return t;
  }
};

// Sets the thread's active tape for its lifetime.
struct TapeScope {
  Tape tape;
  Tape* prev;
  TapeScope() : prev(Tape::active()) { Tape::active() = &tape; }
  ~TapeScope() { Tape::active() = prev; }
};

struct Var {
  double v = 0;
  int32_t i = -1;  // tape index; -1 for a constant
  Var() = default;
  Var(double x) : v(x) {}  // NOLINT: constants convert implicitly, as doubles do
  Var(int x) : v(x) {}     // NOLINT
  Var(int64_t x) : v(double(x)) {}  // NOLINT
  static Var leaf(double x) { return record(x, -1, 0, -1, 0, true); }
  static Var record(double x, int32_t a, double da, int32_t b, double db, bool force = false) {
    Var r(x);
    if (a < 0 && b < 0 && !force) return r;  // constant folding: no tape entry
    auto& n = Tape::active()->nodes;
    r.i = static_cast<int32_t>(n.size());
    n.push_back({a, b, da, db});
    return r;
  }
  Var& operator+=(const Var& o) { return *this = *this + o; }
  Var& operator-=(const Var& o) { return *this = *this - o; }
  Var& operator*=(const Var& o) { return *this = *this * o; }
  Var& operator/=(const Var& o) { return *this = *this / o; }
  friend Var operator+(const Var& x, const Var& y) { return record(x.v + y.v, x.i, 1, y.i, 1); }
  friend Var operator-(const Var& x, const Var& y) { return record(x.v - y.v, x.i, 1, y.i, -1); }
  friend Var operator*(const Var& x, const Var& y) { return record(x.v * y.v, x.i, y.v, y.i, x.v); }
  friend Var operator/(const Var& x, const Var& y) {
    return record(x.v / y.v, x.i, 1 / y.v, y.i, -x.v / (y.v * y.v));
  }
  friend Var operator-(const Var& x) { return record(-x.v, x.i, -1, -1, 0); }
  friend bool operator<(const Var& x, const Var& y) { return x.v < y.v; }
  friend bool operator>(const Var& x, const Var& y) { return x.v > y.v; }
  friend bool operator<=(const Var& x, const Var& y) { return x.v <= y.v; }
  friend bool operator>=(const Var& x, const Var& y) { return x.v >= y.v; }
  friend bool operator==(const Var& x, const Var& y) { return x.v == y.v; }
  friend bool operator!=(const Var& x, const Var& y) { return x.v != y.v; }
};

inline Var exp(const Var& x) {
  const double e = std::exp(x.v);
  return Var::record(e, x.i, e, -1, 0);
}
inline Var log(const Var& x) { return Var::record(std::log(x.v), x.i, 1 / x.v, -1, 0); }
inline Var log1p(const Var& x) { return Var::record(std::log1p(x.v), x.i, 1 / (1 + x.v), -1, 0); }
inline Var sqrt(const Var& x) {
  const double s = std::sqrt(x.v);
  return Var::record(s, x.i, 0.5 / s, -1, 0);
}
inline Var cos(const Var& x) { return Var::record(std::cos(x.v), x.i, -std::sin(x.v), -1, 0); }
inline Var sin(const Var& x) { return Var::record(std::sin(x.v), x.i, std::cos(x.v), -1, 0); }
inline double value(const Var& x) { return x.v; }
inline double value(double x) { return x; }

// Gradient of `out` with respect to every tape entry (index = Var::i).
inline std::vector<double> backward(const Tape& t, const Var& out) {
  std::vector<double> g(t.nodes.size(), 0.0);
  if (out.i < 0) return g;
  g[out.i] = 1;
  for (int64_t k = out.i; k >= 0; --k) {
    const Node& n = t.nodes[k];
    if (g[k] == 0) continue;
    if (n.a >= 0) g[n.a] += g[k] * n.da;
    if (n.b >= 0) g[n.b] += g[k] * n.db;
  }
  return g;
}

}  // namespace linmix::ad

template <>
struct std::numeric_limits<linmix::ad::Var> {
  static constexpr bool is_specialized = true;
  static linmix::ad::Var infinity() { return std::numeric_limits<double>::infinity(); }
};
