// Which build of linmix runs: the portable one (x86-64-v3: AVX2 + FMA) or, where the CPU has
// AVX-512, the x86-64-v4 one (the kernels' 16-float vectors one register instead of two halves).
// LINMIX_ARCH in the environment: unset or "auto" (the best this CPU runs), "x86-64-v3" or
// "x86-64-v4". Used by the launcher (tools/launcher.cpp) and by the full binary itself.
#pragma once
#include <cstdlib>
#include <cstring>

namespace linmix::cli {

// AVX-512 F, BW, CD, DQ and VL (libgcc's check includes the operating system's saving of the
// AVX-512 registers).
inline bool cpu_has_x86_64_v4() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

// "x86-64-v3" or "x86-64-v4"; nullptr when LINMIX_ARCH is malformed or asks for what this CPU
// cannot run, with *why the one-line reason.
inline const char* requested_arch(const char** why) {
  const char* env = std::getenv("LINMIX_ARCH");
  if (!env || std::strcmp(env, "auto") == 0) return cpu_has_x86_64_v4() ? "x86-64-v4" : "x86-64-v3";
  if (std::strcmp(env, "x86-64-v3") == 0) return "x86-64-v3";
  if (std::strcmp(env, "x86-64-v4") == 0) {
    if (cpu_has_x86_64_v4()) return "x86-64-v4";
    *why = "LINMIX_ARCH=x86-64-v4: this CPU has no AVX-512 (F, BW, CD, DQ, VL)";
    return nullptr;
  }
  *why = "LINMIX_ARCH: expected auto, x86-64-v3 or x86-64-v4";
  return nullptr;
}

}  // namespace linmix::cli
