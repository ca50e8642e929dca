"""What the checkpoint tests (rwkv_test.py, mamba_test.py) share: a pass/fail count, running
linmix, writing a weight dict as safetensors and reading back `linmix logits`, the tolerance of the
rounded weight types (rwkv4_test.py too)."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import st  # noqa: E402


def tolerance(dt, mode):
    """The relative error allowed between the engine's logits and the float64 reference run on the
    weights rounded to dt. INT8 decode on AVX-512 and Q4 decode everywhere round x to int16 for their
    integer products (src/kernels/gemv.h: a step of max|x| / 32767, Q4's / 32639): measured at most
    3.4e-4 (INT8) and 2.6e-4 (Q4) of the logits' scale in these tests, 100-1000x below what the
    rounding of the weights itself moves them. Sequence mode runs its GEMMs in FP32 but a one-row
    chunk and the last row's logits through the same products (INT8 and Q4 sequence: at most
    4.5e-5); every other type runs x in FP32."""
    return 1e-3 if dt in ("int8", "q4") and mode == "decode" else 1e-4


class Checks:
    """check(name, ok, detail) prints one line and counts; summary() prints the count and gives
    the exit status."""

    def __init__(self):
        self.passed = self.failed = 0

    def __call__(self, name, ok, detail=""):
        self.passed += bool(ok)
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)

    def summary(self):
        print(f"{self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1


class Linmix:
    """The linmix binary and a scratch folder."""

    def __init__(self, binary, tmp):
        self.binary, self.tmp = os.path.abspath(binary), tmp

    def __call__(self, *args):
        return subprocess.run([self.binary, *args], capture_output=True, text=True)

    def save(self, w, name, meta=None):
        """w (name -> torch tensor) as float32 safetensors in the scratch folder; its path."""
        path = os.path.join(self.tmp, name)
        st.save(path, {n: t.float().numpy() for n, t in w.items()}, metadata=meta)
        return path

    def logits(self, path, tokens, mode, extra=()):
        """(logits [T, V], "") of `linmix logits`, or (None, its error)."""
        out = os.path.join(self.tmp, "logits.safetensors")
        r = self("logits", "--model", path, "--tokens", ",".join(map(str, tokens)), "--mode", mode, *extra, "--out", out)
        return (st.load(out)["logits"], "") if r.returncode == 0 else (None, r.stderr.strip())
