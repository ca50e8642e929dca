#!/usr/bin/python3
"""Data-parallel training under MPI (docs/distributed.md), on loopback with OpenMPI's mpirun:
`mpirun -np N linmix train` equals one process with the same global batch (every step's loss,
the evaluations, the final parameters and AdamW moments), for N = 2 and for N = 3 with a batch
that 3 does not divide (handled exactly: rows split 2/1/1, each rank's gradient weighted by its
share of the scored positions), on the corpus and on a synthetic task (recall: only the values
after queried keys are scored), an encoder classifier (task order: accuracy evaluated over the
ranks), with --accum; --resume with another N continues the same run; rank 0
alone writes; more ranks than sequences are refused; without its MPI module (linmix-mpi.so)
several ranks are refused by name; a rank killed or stopped ends the job
with a message instead of a hang.

Tolerances. The ranks' gradients are summed by MPI_Allreduce in another order than one process
sums the same rows inside its GEMMs: float32 rounding (~1e-7 relative per gradient), which AdamW
carries into the parameters as a relative change of about 1e-7 per step on each update of size
lr. Losses: relative 1e-5; parameters and moments after 8 steps: max |difference| <= 1e-5 x
max(1, |value|) (measured: ~1e-7).

Usage: distributed_test.py PATH/TO/linmix"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_checks  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-dist-")
DATA = os.path.join(ROOT, "data", "tinyshakespeare.txt")
check = checkpoint_checks.Checks()
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
MPIRUN = shutil.which("mpirun")
CFG = os.path.join(TMP, "cfg.json")
with open(CFG, "w") as f:  # two mixers: a scan (rwkv4) and a chunked one (gla) with its own params
    json.dump({"vocab": 256, "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64, "channel_mix": "rwkv",
               "layers": [{"mixer": "rwkv4"}, {"mixer": "gla"}]}, f)


ENC = os.path.join(TMP, "enc.json")
with open(ENC, "w") as f:  # the encoder classifier (non-causal linear attention) of the order task
    json.dump({"vocab": 13, "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 32, "causal": False, "classes": 2,
               "layers": [{"mixer": "linear"}, {"mixer": "aft_conv"}]}, f)


def train(ranks, out, *extra, steps=8, batch=4, task=None, timeout=300, cfg=CFG):
    """linmix train with `ranks` processes (1: no mpirun); (returncode, stdout + stderr)."""
    src = ["--task", task] if task else ["--data", DATA]
    args = [LINMIX, "train", *src, "--config", cfg, "--steps", str(steps), "--batch", str(batch), "--seq", "32",
            "--eval-every", "4", "--out", os.path.join(TMP, out), *extra]
    if ranks > 1:
        args = [MPIRUN, "--oversubscribe", "-np", str(ranks), *args]
    else:
        args += ["--threads", "1"]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def log(out):
    with open(os.path.join(TMP, out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt(out):
    return st.load(os.path.join(TMP, out, "ckpt.safetensors"))


def same_run(name, a, b):
    """Runs a and b: same steps, losses, evaluations, parameters and moments."""
    la, lb = log(a), log(b)
    check(f"{name}: same steps", [r["step"] for r in la] == [r["step"] for r in lb], f"{len(la)} vs {len(lb)} records")
    worst = 0.0
    for ra, rb in zip(la, lb):
        for k in ("loss", "val_loss", "val_acc", "grad_norm"):
            if k in ra or k in rb:
                if k not in ra or k not in rb:
                    worst = float("inf")
                    continue
                worst = max(worst, abs(ra[k] - rb[k]) / max(1.0, abs(ra[k])))
    check(f"{name}: losses, evaluations, gradient norms", worst <= 1e-5, f"max relative difference {worst:.1e}")
    ca, cb = ckpt(a), ckpt(b)
    check(f"{name}: same tensors", sorted(ca) == sorted(cb))
    worst = max(float(np.max(np.abs(ca[n] - cb[n]) / np.maximum(1.0, np.abs(ca[n])))) for n in ca if n in cb)
    check(f"{name}: parameters and AdamW moments", worst <= 1e-5, f"max difference {worst:.1e}")


def main():
    if MPIRUN is None:
        check("mpirun found (scripts/setup.sh installs openmpi-bin)", False)
        return check.summary()
    info = subprocess.run([LINMIX, "train", "--help"], capture_output=True, text=True)
    check("linmix train --help", info.returncode == 0)

    rc, out = train(1, "one")
    check("one process trains", rc == 0, out[-300:] if rc else "")
    rc, out = train(2, "two")
    check("mpirun -np 2 trains", rc == 0, out[-600:] if rc else "")
    ok = out.count("trained 8 steps") == 1 and "2 ranks: gradient allreduce" in out
    check("rank 0 alone prints the summary", ok, "" if ok else out[-400:])
    check("rank 0 alone writes the run", sorted(os.listdir(os.path.join(TMP, "two"))) == ["ckpt.safetensors", "log.jsonl"])
    check("the log records the allreduce time", all("allreduce_s" in r for r in log("two")))
    same_run("-np 2 = one process", "one", "two")

    rc, out = train(3, "three")
    check("mpirun -np 3, batch 4 (rows 2/1/1)", rc == 0, out[-600:] if rc else "")
    same_run("-np 3 with a batch 3 does not divide = one process", "one", "three")

    rc1, _ = train(1, "one_accum", "--accum", "2", batch=3)
    rc2, out = train(2, "two_accum", "--accum", "2", batch=3)
    check("--accum 2, batch 3 on 2 ranks", rc1 == 0 and rc2 == 0, out[-600:] if rc2 else "")
    same_run("--accum 2, batch 3: -np 2 = one process", "one_accum", "two_accum")

    rc1, _ = train(1, "one_task", task="recall", batch=5)
    rc2, out = train(2, "two_task", task="recall", batch=5)
    check("task recall on 2 ranks", rc1 == 0 and rc2 == 0, out[-600:] if rc2 else "")
    same_run("task recall (rows scoring different counts), batch 5: -np 2 = one process", "one_task", "two_task")

    rc1, _ = train(1, "one_enc", task="order", batch=5, cfg=ENC)
    rc2, out = train(3, "three_enc", task="order", batch=5, cfg=ENC)
    check("an encoder classifier (task order) on 3 ranks", rc1 == 0 and rc2 == 0, out[-600:] if rc2 else "")
    same_run("encoder classifier, batch 5 on 3 ranks (rows 1/2/2) = one process", "one_enc", "three_enc")

    # --resume with another number of ranks continues the same run
    rc_a, _ = train(1, "resume_one", steps=4)
    rc_b, _ = train(1, "resume_one", "--resume", steps=8)
    rc_c, _ = train(2, "resume_mix", steps=4)
    rc_d, out = train(3, "resume_mix", "--resume", steps=8)
    check("--resume: 2 ranks then 3", all(r == 0 for r in (rc_a, rc_b, rc_c, rc_d)), out[-600:] if rc_d else "")
    same_run("4 steps on 2 ranks + 4 on 3 = 4 + 4 in one process", "resume_one", "resume_mix")

    rc, out = train(5, "five")
    ok = rc != 0 and "smaller than the 5 ranks" in out
    check("more ranks than sequences refused", ok, "" if ok else out[-300:])
    check("refused before writing", not os.path.exists(os.path.join(TMP, "five", "log.jsonl")))

    # MPI is a module beside the executable (linmix-mpi.so), loaded only under mpirun: a copy of the
    # executables without it refuses a job of several ranks with one line, and still runs alone
    lone = os.path.join(TMP, "lone")
    os.makedirs(lone)
    here = os.path.dirname(LINMIX)
    for n in os.listdir(here):
        if n.startswith(os.path.basename(LINMIX)) and not n.endswith(".so") and os.path.isfile(os.path.join(here, n)):
            shutil.copy2(os.path.join(here, n), lone)
    lone_bin = os.path.join(lone, os.path.basename(LINMIX))
    r = subprocess.run([MPIRUN, "-np", "2", lone_bin, "train", "--data", DATA, "--config", CFG, "--steps", "2",
                        "--batch", "4", "--seq", "32", "--out", os.path.join(TMP, "lone_out")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    ok = r.returncode != 0 and "MPI could not be loaded" in r.stderr and "linmix-mpi.so" in r.stderr
    check("without linmix-mpi.so: several ranks refused by name", ok, "" if ok else (r.stdout + r.stderr)[-400:])
    r = subprocess.run([lone_bin, "--version"], capture_output=True, text=True, env=ENV, timeout=60)
    check("without linmix-mpi.so: one process runs", r.returncode == 0, r.stderr[-300:])

    # a rank killed mid-run: mpirun ends the job (no hang)
    for how, sig, env in (("killed", signal.SIGKILL, {}), ("stopped", signal.SIGSTOP, {"LINMIX_MPI_TIMEOUT": "3"})):
        args = [MPIRUN, "-np", "2", *sum((["-x", k] for k in env), []), LINMIX, "train", "--data", DATA, "--config", CFG,
                "--steps", "100000", "--batch", "4", "--seq", "32", "--out", os.path.join(TMP, how)]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**ENV, **env})
        logp = os.path.join(TMP, how, "log.jsonl")
        t0 = time.time()
        while time.time() - t0 < 60 and (not os.path.exists(logp) or os.path.getsize(logp) < 2000):
            time.sleep(0.1)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(kids[-1]), sig)
        t0 = time.time()
        try:
            text, _ = p.communicate(timeout=60)
            waited = time.time() - t0
            ok = p.returncode != 0
        except subprocess.TimeoutExpired:
            p.kill()
            text, waited, ok = "(hung)", 60.0, False
        detail = f"exit {p.returncode} after {waited:.1f} s" + ("" if ok else ": " + text[-300:])
        check(f"a rank {how}: the job ends with an error", ok, detail)
        if how == "stopped":
            ok = "no answer from the other ranks" in text
            check("a rank stopped: the others say so", ok, "" if ok else text[-300:])
        left = subprocess.run(["pgrep", "-f", os.path.join(TMP, how)], capture_output=True, text=True).stdout.split()
        for pid in left:  # zombies of the aborted job are reaped by init; live ones are a failure
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] == "Z":
                        continue
            except OSError:
                continue
            check(f"a rank {how}: no rank left running", False, f"pid {pid}")
    shutil.rmtree(TMP, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
