// `linmix` where the build made both x86-64-v3 and x86-64-v4 binaries: runs the one for this
// CPU (tools/arch.h), built beside it as linmix-<arch>, in its place (exec: the same process,
// arguments and environment). libc alone, linked statically: choosing costs ~1 ms, where the full
// binary running its sibling cost a second start with all its libraries (~5 ms, measured).
#include <unistd.h>

#include <climits>
#include <cstdio>

#include "arch.h"

int main(int, char** argv) {
  const char* why = "";
  const char* arch = linmix::cli::requested_arch(&why);
  if (!arch) {
    std::fprintf(stderr, "linmix: %s\n", why);
    return 2;
  }
  char self[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) {
    std::fprintf(stderr, "linmix: cannot find this executable's path (/proc/self/exe)\n");
    return 2;
  }
  self[n] = '\0';
  char target[PATH_MAX + 16];
  std::snprintf(target, sizeof target, "%s-%s", self, arch);
  ::execv(target, argv);
  std::fprintf(stderr, "linmix: cannot run %s (the %s build, expected beside this launcher)\n", target, arch);
  return 2;
}
