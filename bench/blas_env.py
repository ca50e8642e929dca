"""The PyTorch peers on the same OpenBLAS kernels as linmix. Import before torch.

Debian 12's OpenBLAS 0.3.21 does not know CPUs newer than its tables (this machine's Intel family 6
model 207) and falls back to its Prescott (SSE3) kernels: a 2-thread 2048^3 torch.mm runs ~63
GFLOP/s, ~281 with OPENBLAS_CORETYPE=SkylakeX. The linmix executable and linmix._C set SkylakeX on
such a machine (src/kernels/blas.cpp, avx512_core_wanted); torch loads its OpenBLAS at `import
torch`, before linmix can, so without this the peers would run on SSE3 GEMMs beside linmix's
AVX-512 ones. Same rule as linmix's: only when OPENBLAS_CORETYPE is unset, the OpenBLAS that loads
says Prescott and the CPU has AVX-512 F, BW, DQ and VL. OpenBLAS reads the variable as it loads,
so this asks a child process for the core name and sets it in this one before torch is imported."""
import os
import subprocess
import sys

_PROBE = ("import ctypes, ctypes.util\n"
          "n = ctypes.util.find_library('openblas')\n"
          "f = ctypes.CDLL(n).openblas_get_corename if n else None\n"
          "if f: f.restype = ctypes.c_char_p; print(f().decode())\n")


def _avx512():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    except OSError:
        pass
    return False


def core_wanted():
    """'SkylakeX' where OpenBLAS would fall back to SSE3 on an AVX-512 CPU, else None."""
    if "OPENBLAS_CORETYPE" in os.environ or "torch" in sys.modules or not _avx512():
        return None
    try:
        core = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "SkylakeX" if core.lower() == "prescott" else None


CORE = core_wanted()
if CORE:
    os.environ["OPENBLAS_CORETYPE"] = CORE


def describe():
    """One sentence for a report: which OpenBLAS kernels the peers ran on, and why."""
    core = os.environ.get("OPENBLAS_CORETYPE")
    if CORE:
        return (f"OpenBLAS on its {CORE} kernels for the peers as for linmix: `OPENBLAS_CORETYPE={CORE}`, set by "
                "bench/blas_env.py, since this OpenBLAS does not know the CPU and falls back to SSE3")
    if core:
        return f"OpenBLAS: `OPENBLAS_CORETYPE={core}` (set by the user)"
    return "OpenBLAS: its own choice of kernels for this CPU"
