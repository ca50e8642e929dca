#!/usr/bin/python3
"""The backward of every linear-time mechanism uses memory linear in T.

For each mechanism of the registry (`linmix mixers --json`; those that are quadratic in time or
whose inputs are T x T are listed with the reason they are not measured), its example inputs
(`linmix example --dy`) at a small layer's sizes go through `linmix mix --grad --mode parallel` runs at T = 4096 and T = 16384 (and a
tiny T for the process baseline); linmix reports its own peak resident set (--stats). Linear memory grows the T-dependent part 4x; a single T x T float buffer at 16384
would add 1 GiB. The test asserts growth <= 5x, and prints the figures.

Usage: memory_test.py PATH/TO/linmix
"""
import json
import os
import subprocess
import sys
import tempfile


LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-mem-")
SPECS = json.loads(subprocess.run([LINMIX, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)
# the sizes of a small model layer: 2 heads of 32, 64 channels, 32 features / shared width, N 16
DIMS = {"H": 2, "D": 32, "E": 32, "C": 64, "M": 32, "S": 32, "N": 16, "K": 7}


def skip_reason(spec):
    """Why a mechanism is not measured here (None: it is). Every registry mechanism gets a row."""
    if not spec["backward"]:
        return "no parallel backward"
    if spec["quadratic"]:
        return "time O(T^2): T = 16384 is out of a test's budget"
    if any("Tw" in t["dims"] for t in spec["inputs"]):
        return "its input w is (Tw, Tw): the inputs themselves grow as T^2"
    return None


def peak_rss_mib(spec, T):
    name, causal = spec["name"], spec["causal"]
    inp, out = os.path.join(TMP, "in.safetensors"), os.path.join(TMP, "out.safetensors")
    cmd = [LINMIX, "example", "--mixer", name, "--T", str(T), "--seed", "1", "--dy", "--out", inp]
    cmd += sum((["--dim", f"{k}={v}"] for k, v in DIMS.items()), []) + (["--causal"] if causal else [])
    subprocess.run(cmd, check=True, capture_output=True)
    cmd = [LINMIX, "mix", "--mixer", name, "--grad", "--stats", "--in", inp, "--out", out]
    cmd += ["--causal"] if causal else []
    for k, v in spec["example_params"].items():
        cmd += ["--param", f"{k}={v}"]
    # linmix reports its own VmHWM: a child's rusage would include the forking Python's pages
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
    return float(r.stderr.split("peak_rss_mib=")[1].split()[0])


def main():
    passed = failed = 0
    print(f"{'mixer':14s} {'T=16':>9s} {'T=4096':>9s} {'T=16384':>9s}  growth of the T part (linear: 4x)")
    for spec in SPECS:
        mixer = spec["name"]
        why = skip_reason(spec)
        if why:
            print(f"{mixer:14s} not measured: {why}")
            continue
        base, a, b = (peak_rss_mib(spec, T) for T in (16, 4096, 16384))
        growth = (b - base) / max(a - base, 1e-9)
        ok = growth <= 5.0
        passed += ok
        failed += not ok
        print(f"{mixer:14s} {base:8.1f}M {a:8.1f}M {b:8.1f}M  {growth:5.2f}x {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
