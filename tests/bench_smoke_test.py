#!/usr/bin/python3
"""Smoke test of the benchmark pipeline (bench/run.sh --quick): linmix bench, the PyTorch peers
and the report run end to end at T = 256, 512 on one thread, and what they write is complete:
every mechanism has a forward at each T, a forward+backward where it has a backward, a
recurrent step where it has one, limits that were measured, peers for every mechanism (each
checked against the float64 oracle inside peer.py), a markdown table with the targets and a
PNG plot, and `linmix mix` timed as a whole process beside its peer (bench/mix_process.py).  Speed is not judged here (benchmarks, not timed tests).
Usage: bench_smoke_test.py path/to/linmix"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    binary = os.path.abspath(sys.argv[1])
    specs = json.loads(subprocess.run([binary, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)
    mixers = [s["name"] for s in specs]
    causal = {s["name"] for s in specs if s["causal"] and "recurrent" in s["forms"]}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["bash", os.path.join(ROOT, "bench", "run.sh"), "--quick", "--bin", binary, "--dir", d],
                       check=True, cwd=ROOT)
        lin = json.load(open(os.path.join(d, "linmix.json")))
        peer = json.load(open(os.path.join(d, "peer.json")))
        lim = lin["limits"]["1"]
        assert lim["sgemm_gflops"] > 0 and lim["triad_gbs"] > 0, lim
        runs = {(r["mixer"], r["T"], r["form"]): r for r in lin["runs"]}
        names = sorted({r["mixer"] for r in lin["runs"]})
        missing = set(mixers) - set(names)
        assert not missing, f"linmix bench measured no run of {sorted(missing)}"
        assert names == sorted(mixers), (names, mixers)
        for m in names:
            for T in (256, 512):
                r = runs.get((m, T, "fwd"))
                assert r and r["seconds"] > 0 and r["tokens_per_s"] > 0, (m, T, r)
                assert "extra_bytes" in r, (m, T)
        # the backward of every mechanism and the step of every causal one with a recurrent form
        bwd = {m for (m, T, f) in runs if f == "fwdbwd"}
        steps = {m for (m, T, f) in runs if f == "step"}
        assert bwd == set(names), set(names) - bwd
        assert steps == causal, f"step missing or unexpected for {sorted(causal ^ steps)}"
        assert all(runs[(m, 256, "step")]["seconds"] > 0 for m in steps)
        # GFLOP/s for the chunked and attention forms, GB/s for the scans
        # (the spec says which: flops where the kernel is FLOP-bound, else bytes unless quadratic)
        for s in specs:
            r = runs[(s["name"], 512, "fwd")]
            assert r.get("gflops", 0) > 0 or r.get("gbs", 0) > 0 or s["quadratic"], (s["name"], r)
        pnames = {r["mixer"] for r in peer["runs"]}
        assert not set(names) - pnames, f"no PyTorch peer measured for {sorted(set(names) - pnames)}"
        assert pnames == set(names), set(names) ^ pnames
        assert all(e < 1e-3 for e in peer["check"].values()), peer["check"]
        md = open(os.path.join(d, "bench.md")).read()
        assert "## Targets" in md and "linmix / peer speed" in md, md[:500]
        for m in names:
            assert f"| {m} |" in md, m
        png = open(os.path.join(d, "bench.png"), "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000, len(png)
        # the speed ratio read beside the peer (peer.py --beside): the kernel timed just before and
        # after the peer, and the report's ratio and target taken from those times
        py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
        pb = os.path.join(d, "peer_beside.json")
        subprocess.run([py, os.path.join(ROOT, "bench", "peer.py"), "--bin", binary, "--mixers", "gla", "--T", "512",
                        "--threads", "1", "--beside", "512", "--out", pb], check=True, cwd=ROOT)
        bes = {r["form"]: r for r in json.load(open(pb))["runs"] if r["T"] == 512}
        for form in ("fwd", "fwdbwd"):
            ks = bes[form].get("kernel_seconds")
            assert ks and len(ks) == 2 and all(k > 0 for k in ks), (form, bes[form])
        bmd = os.path.join(d, "beside.md")
        subprocess.run([py, os.path.join(ROOT, "bench", "report.py"), "--bin", binary, "--linmix",
                        os.path.join(d, "linmix.json"), "--peer", pb, "--only", "gla", "--T", "512", "--md", bmd],
                       check=True, cwd=ROOT, capture_output=True)
        want = bes["fwd"]["seconds"] / min(bes["fwd"]["kernel_seconds"])
        sg = bes["fwd"]["kernel_of_sgemm"]  # gla has a FLOP count: the faster kernel run's sgemm share
        assert 0 < sg < 2, bes["fwd"]
        text = open(bmd).read()
        assert f"{want:.2f}x peer (kernel timed beside the peer), {100 * sg:.0f}% of sgemm |" in text, (want, sg, text)
        assert f"| {want:.2f}x * |" in text, text
        # linmix mix as a whole process against the peer (bench/mix_process.py)
        mp = json.load(open(os.path.join(d, "mix_process.json")))
        assert [r["mixer"] for r in mp["rows"]] == ["linear", "rwkv4"], mp
        assert all(r["kernel"] > 0 and r["process"] > r["kernel"] and r["peer"] > 0 for r in mp["rows"]), mp
        mmd = open(os.path.join(d, "mix_process.md")).read()
        assert "| linear |" in mmd and "| rwkv4 |" in mmd, mmd
    print("bench smoke test: ok")


if __name__ == "__main__":
    main()
