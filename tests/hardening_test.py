#!/usr/bin/python3
"""Bad input through the real binary (issue 12): each case found by hand or by fuzzing, each a
clean refusal (exit 2, one line "linmix: ...") or the right answer, never a signal, a wrong
answer or exit 3. Usage: hardening_test.py PATH/TO/linmix"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import rwkv4_ref  # noqa: E402
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-hard-")
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def linmix(*args):
    return subprocess.run([LINMIX, *args], capture_output=True, text=True, errors="replace", timeout=300)


def refused(name, args, needle=""):
    r = linmix(*args)
    lines = r.stderr.strip().split("\n")
    ok = r.returncode == 2 and len(lines) == 1 and lines[0].startswith("linmix: ") and needle in r.stderr
    check(f"{name}: refused", ok, f"(exit {r.returncode}) {r.stderr.strip()[:200]}")


def path(name):
    return os.path.join(TMP, name)


def tokenizer_json(vocab_ids, added):
    """A tiny byte-level BPE tokenizer.json: every byte a token, no merges."""
    b2c = {}
    n = 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            b2c[b] = chr(b)
        else:
            b2c[b] = chr(256 + n)
            n += 1
    vocab = {b2c[b]: b for b in range(256)}
    vocab.update(vocab_ids)
    return {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "normalizer": None}


def write(p, text):
    with open(p, "w") as f:
        f.write(text)
    return p


def log_records(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def lost_work(corpus, model):
    """Nothing a user saved is lost or silently mixed."""
    run = path("lw")
    args = ["train", "--data", corpus, "--mixer", "linear", "--batch", "2", "--seq", "16", "--warmup", "1",
            "--lr", "1e-3", "--out", run]
    r = linmix(*args, "--steps", "4")
    check("a run of 4 steps", r.returncode == 0, r.stderr.strip()[-200:])
    before = open(os.path.join(run, "ckpt.safetensors"), "rb").read()
    refused("train into an --out holding a run", [*args, "--steps", "4"], "--resume")
    check("the refused run left the checkpoint as it was", open(os.path.join(run, "ckpt.safetensors"), "rb").read() == before)
    refused("--resume with another --batch", ["train", "--resume", "--out", run, "--batch", "3", "--steps", "6"], "batch")
    refused("--resume with another --lr", ["train", "--resume", "--out", run, "--lr", "2e-3", "--steps", "6"], "lr")
    refused("--resume with another model", ["train", "--resume", "--out", run, "--mixer", "softmax", "--steps", "6"],
            "config")
    refused("--resume with another --tokenizer", ["train", "--resume", "--out", run, "--tokenizer",
                                                  os.path.join(ROOT, "data", "rwkv_vocab_v20230424.txt"), "--steps", "6"],
            "tokenizer")
    refused("train --tokenizer that is not there", [*args[:-1], path("lw-tk"), "--tokenizer", path("no-such-vocab.txt"),
                                                    "--steps", "1"], "no-such-vocab")
    refused("train --tokenizer with a task", ["train", "--task", "copy", "--tokenizer", "bytes", "--steps", "1",
                                              "--out", path("lw-task")], "--tokenizer is for a text")
    # a log that ran past the checkpoint (a kill between the two): one record per step after resuming
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "loss": 9}) + "\n" + '{"step": 6, "lo')
    stale = os.path.join(run, "ckpt.safetensors.tmp.999999999")
    write(stale, "left by a writer that was killed")
    r = linmix("train", "--resume", "--out", run, "--steps", "8")
    check("--resume with only --steps continues with the run's arguments", r.returncode == 0, r.stderr.strip()[-200:])
    recs = log_records(run)
    check("the log has one record per step after a resume", [x["step"] for x in recs] == list(range(1, 9)),
          str([x["step"] for x in recs]))
    # the schedule is the run's (4 steps: from step 5 on, the floor lr * 0.1), not re-stretched to 8
    check("a longer --steps keeps the run's cosine schedule", all(abs(x["lr"] - 1e-4) < 1e-12 for x in recs[4:]),
          str([x["lr"] for x in recs]))
    check("a dead writer's temporary file is removed by the next write", not os.path.exists(stale))
    r = linmix(*args, "--steps", "2", "--force")
    check("--force starts a new run there", r.returncode == 0 and [x["step"] for x in log_records(run)] == [1, 2],
          r.stderr.strip()[-200:])
    # outputs that are inputs, --out and --data that are not what they must be
    refused("generate --state-out = --model", ["generate", "--model", model, "--tokens", "1", "--state-out", model],
            "overwritten")
    refused("logits --out = --model", ["logits", "--model", model, "--tokens", "1", "--out", model], "overwritten")
    refused("grad --out = --model", ["grad", "--model", model, "--tokens", "1", "--targets", "2", "--out", model],
            "overwritten")
    x = path("x.safetensors")
    st.save(x, {"q": np.ones((1, 2, 1, 2)), "k": np.ones((1, 2, 1, 2)), "v": np.ones((1, 2, 1, 2))})
    refused("mix --out = --in", ["mix", "--mixer", "linear", "--in", x, "--out", x], "overwritten")
    refused("train --out on a file", ["train", "--data", corpus, "--out", corpus, "--steps", "1"], "directory")
    refused("train --batch 1e9", ["train", "--data", corpus, "--batch", "1000000000", "--out", path("r3"), "--steps",
                                  "1"], "--accum")
    refused("train --data on a directory", ["train", "--data", TMP, "--out", path("r2"), "--steps", "1"], "--data")


def cli(corpus, model):
    """A CLI people know how to use."""
    r = linmix("help")
    check("linmix help lists the commands", r.returncode == 0 and all(c in r.stdout for c in ("train", "generate", "info")),
          r.stdout[:200])
    refused("an unknown command", ["frobnicate"], "commands: mix")
    r = linmix("--version")
    check("linmix --version", r.returncode == 0 and r.stdout.startswith("linmix "), r.stdout.strip())
    r = linmix("info", model)
    check("linmix info: config, parameters, tokenizer, step", r.returncode == 0 and all(
        k in r.stdout for k in ("parameters:", "tokenizer:  bytes", "step:       2", '"mixer":"linear"')), r.stdout)
    refused("linmix info on a corpus file", ["info", corpus])
    r = linmix("generate", "--model", model, "--tokens", "5", "--threads", "1")
    check("generate --threads 1, tokens/s at the end", r.returncode == 0 and "tokens/s" in r.stderr, r.stderr.strip())
    refused("generate --threads 0", ["generate", "--model", model, "--threads", "0"])
    n = len(open(corpus, "rb").read())
    r = linmix("eval", "--model", model, "--data", corpus, "--seq", "16", "--windows", "100000")
    want = (n - int(n * 0.9) - 1) // 16
    got = r.stdout.split(" windows")[0].split()[-1] if r.returncode == 0 else "?"
    check("eval scores the validation split by default", "(val)" in r.stdout and got == str(want), f"{got} vs {want}")
    r = linmix("eval", "--model", model, "--data", corpus, "--seq", "16", "--windows", "100000", "--split", "all")
    got = r.stdout.split(" windows")[0].split()[-1] if r.returncode == 0 else "?"
    check("eval --split all scores the whole file", got == str((n - 1) // 16), got)
    # eval's modes agree (an RWKV-4 model: the model's parallel and recurrent forms, the engine)
    rw = path("rw")
    linmix("train", "--data", corpus, "--mixer", "rwkv4", "--steps", "2", "--batch", "2", "--seq", "16", "--out", rw)
    losses = {}
    for mode in ("parallel", "recurrent", "sequence"):
        r = linmix("eval", "--model", os.path.join(rw, "ckpt.safetensors"), "--data", corpus, "--seq", "32",
                   "--windows", "3", "--mode", mode)
        losses[mode] = float(r.stdout.split("loss ")[1].split()[0]) if r.returncode == 0 else math.nan
    check("eval: parallel, recurrent and sequence modes agree",
          max(losses.values()) - min(losses.values()) < 1e-4 * max(losses.values()), str(losses))
    # linmix convert: an int8 file runs in the engine in its type, the same as converting at load
    rwck, conv = os.path.join(rw, "ckpt.safetensors"), path("rw.int8.safetensors")
    r = linmix("convert", rwck, "--dtype", "int8", "--out", conv)
    check("convert --dtype int8", r.returncode == 0 and "int8 weights" in r.stdout, r.stderr.strip())
    a, b = path("la.safetensors"), path("lb.safetensors")
    ra = linmix("logits", "--model", conv, "--tokens", "1,2,3,4", "--mode", "decode", "--out", a)
    rb = linmix("logits", "--model", rwck, "--tokens", "1,2,3,4", "--mode", "decode", "--dtype", "int8", "--out", b)
    check("the int8 file's logits are the FP32 file's at --dtype int8", ra.returncode == 0 and rb.returncode == 0 and
          open(a, "rb").read() == open(b, "rb").read(), ra.stderr.strip() + rb.stderr.strip())
    refused("convert over an existing file", ["convert", rwck, "--dtype", "q4", "--out", conv], "--force")
    refused("convert --dtype q5", ["convert", rwck, "--dtype", "q5", "--out", path("q5.safetensors")], "unknown weight type")
    refused("convert a model no engine runs", ["convert", model, "--dtype", "int8", "--out", path("lin8.safetensors")],
            "no inference engine")
    refused("convert into its own input", ["convert", rwck, "--dtype", "int8", "--out", rwck, "--force"], "overwritten")
    refused("an int8 file at --dtype q4", ["logits", "--model", conv, "--tokens", "1", "--mode", "decode", "--dtype", "q4",
                                           "--out", a], "--dtype int8")
    refused("an int8 file in the training model's parallel form", ["logits", "--model", conv, "--tokens", "1", "--out", a],
            "linmix convert")
    refused("train --init from an int8 file", ["train", "--init", conv, "--data", corpus, "--steps", "1", "--out",
                                               path("ft8")], "FP32 checkpoint")
    # a file holding an I8 tensor where floats are read: refused by name
    raw = path("raw_i8.safetensors")
    h = json.dumps({"q": {"dtype": "I8", "shape": [1, 2, 3], "data_offsets": [0, 6]}}).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(raw, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(6))
    refused("mix of an I8 tensor", ["mix", "--mixer", "linear", "--causal", "--in", raw, "--out", a], "tensor 'q' is I8")
    refused("generate --state-in of an I8 tensor", ["generate", "--model", rwck, "--state-in", raw, "--tokens", "1"],
            "tensor 'q' is I8")
    with open(conv, "rb") as f:
        data = f.read()
    cut = path("cut.safetensors")
    with open(cut, "wb") as f:
        f.write(data[:len(data) - 100])
    refused("a truncated int8 file", ["logits", "--model", cut, "--tokens", "1", "--mode", "decode", "--out", a], "bytes")
    r = linmix("demo", "--T", "20", "--dir", path("demo"))
    check("linmix demo: every form matches the reference", r.returncode == 0 and "OK: every form" in r.stdout,
          r.stdout.strip()[-200:])
    # generation of a model with learned positions past its ctx: the context is cropped
    cfgp = write(path("short.json"), json.dumps({"mixer": "softmax", "d_model": 16, "n_layer": 1, "n_head": 2,
                                                 "ctx": 16}))
    run = path("short")
    r = linmix("train", "--data", corpus, "--config", cfgp, "--steps", "1", "--batch", "1", "--seq", "16", "--out", run)
    short = os.path.join(run, "ckpt.safetensors")
    r = linmix("generate", "--model", short, "--tokens", "50", "--temperature", "0", "--prompt", "abc")
    check("generate 50 tokens from a model of ctx 16 (cropped context)", r.returncode == 0, r.stderr.strip()[-200:])
    # a model whose numbers overflow float32: refused, not sampled
    ck = st.load(short)
    with open(short, "rb") as f:
        (hn,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(hn))["__metadata__"]
    ck["head.weight"] = ck["head.weight"] * 0 + 3e38
    huge = path("huge.safetensors")
    st.save(huge, ck, metadata=meta)
    refused("generate from a model with overflowing logits", ["generate", "--model", huge, "--tokens", "3"], "finite")


def classifiers(corpus, lm):
    """The encoder classifier and its tasks (issue 17): refusals by name, the commands that do not
    apply to a classifier, and eval's answers."""
    refused("train --task listops --mixer rwkv4 with \"causal\": false",
            ["train", "--task", "listops", "--config", write(path("enc_rwkv.json"), json.dumps(
                {"mixer": "rwkv4", "causal": False, "classes": 10, "vocab": 16})), "--out", path("enc0")],
            "no non-causal form")
    refused("a language model of fnet", ["train", "--data", corpus, "--mixer", "fnet", "--out", path("enc1")],
            "no causal form")
    refused("a non-causal language model", ["train", "--data", corpus, "--config", write(path("nc.json"), json.dumps(
        {"mixer": "linear", "causal": False})), "--out", path("enc2")], "must be a classifier")
    refused("an unknown task", ["train", "--task", "lisops", "--mixer", "fnet", "--out", path("enc3")], "unknown task")
    refused("listops --seq 4", ["train", "--task", "listops", "--mixer", "fnet", "--seq", "4", "--out", path("enc4")],
            "--seq")
    refused("fmnist --seq 100", ["train", "--task", "fmnist", "--mixer", "fnet", "--seq", "100", "--out", path("enc5")],
            "784")
    refused("a classifier of the wrong classes", ["train", "--task", "order", "--config", write(path("k3.json"), json.dumps(
        {"mixer": "linear", "causal": False, "classes": 3, "vocab": 16})), "--out", path("enc6")], "2 classes")
    refused("a language model on a classification task",
            ["train", "--task", "order", "--config", write(path("lmc.json"), json.dumps({"mixer": "linear"})),
             "--out", path("enc7")], "classifier")
    run = path("order")
    r = linmix("train", "--task", "order", "--mixer", "fnet", "--seq", "24", "--steps", "2", "--batch", "4",
               "--out", run)
    check("train --task order --mixer fnet", r.returncode == 0 and "encoder classifier" in r.stderr, r.stderr[-300:])
    ck = os.path.join(run, "ckpt.safetensors")
    r = linmix("eval", "--model", ck, "--examples", "40", "--json")
    try:
        j = json.loads(r.stdout)
        ok = j["split"] == "test" and j["examples"] == 40 and j["seq"] == 24 and len(j["lengths"]) == 40 and \
            abs(j["accuracy"] - sum(j["right"]) / 40) < 1e-12 and all(12 <= n <= 24 for n in j["lengths"])
    except (ValueError, KeyError):
        ok = False
    check("eval of a classifier: the test split at the run's --seq, per-example outcomes", ok, r.stdout[:200] + r.stderr)
    refused("eval of a classifier with --data", ["eval", "--model", ck, "--data", corpus], "classifier")
    refused("eval of a language model without --data", ["eval", "--model", lm], "language model")
    refused("eval --split nonsense", ["eval", "--model", ck, "--split", "dev"], "--split")
    refused("eval --examples past the split", ["eval", "--model", ck, "--examples", "2001"], "2000 examples")
    refused("generate from a classifier", ["generate", "--model", ck, "--tokens", "3"], "classifier")
    refused("logits of a classifier", ["logits", "--model", ck, "--tokens", "1,2", "--out", path("lg.safetensors")],
            "classifier")
    refused("grad of a classifier with --targets", ["grad", "--model", ck, "--tokens", "1,2", "--targets", "1,2",
                                                    "--out", path("g.safetensors")], "--labels")
    refused("grad of a classifier with a label past its classes",
            ["grad", "--model", ck, "--tokens", "1,2", "--labels", "2", "--out", path("g.safetensors")], "--labels")
    refused("a classifier resumed with another mixer",
            ["train", "--task", "order", "--mixer", "linear", "--seq", "24", "--steps", "3", "--batch", "4",
             "--out", run, "--resume"], "mixer")
    r = linmix("train", "--task", "order", "--seq", "24", "--steps", "3", "--batch", "4", "--out", run, "--resume")
    check("a classifier resumes with the run's arguments", r.returncode == 0 and "trained 3 steps" in r.stdout,
          r.stdout + r.stderr[-300:])


def viz_and_recall(corpus, lm):
    """linmix viz (issue 18): its refusals, its files (PNG readable by matplotlib, every row of
    the weights a distribution), no silent overwrite; the recall task's --pairs and its eval."""
    out = path("viz")
    refused("viz without text", ["viz", "--model", lm, "--out", out], "--data")
    refused("viz with --data and --prompt", ["viz", "--model", lm, "--data", corpus, "--prompt", "hi", "--out", out],
            "one of them")
    refused("viz --tokens 1", ["viz", "--model", lm, "--prompt", "hi", "--tokens", "1", "--out", out])
    refused("viz past the model's positions", ["viz", "--model", lm, "--data", corpus, "--tokens", "300",
                                               "--out", out], "context")
    refused("viz of a missing checkpoint", ["viz", "--model", path("nope.safetensors"), "--prompt", "hi", "--out", out])
    r = linmix("viz", "--model", lm, "--prompt", "the quick brown fox jumps", "--tokens", "20", "--out", out)
    ok = r.returncode == 0
    try:
        import matplotlib.image
        j = json.load(open(os.path.join(out, "viz.json")))
        img = matplotlib.image.imread(os.path.join(out, "layer0.png"))
        w = st.load(os.path.join(out, "weights.safetensors"))["layer.0"]
        ok = ok and j["tokens"] == 20 and len(j["layers"]) >= 1 and img.ndim == 3 and img.shape[2] == 3 and \
            w.shape[1:] == (20, 20) and abs(w.sum(axis=2) - 1).max() < 1e-4 and abs(np.triu(w[0], 1)).max() == 0
    except Exception as e:  # noqa: BLE001
        ok = False
        r.stderr += repr(e)
    check("viz: viz.json, a readable PNG, rows of shares over the past", ok, r.stderr[-300:])
    refused("viz into an earlier viz's --out", ["viz", "--model", lm, "--prompt", "hello", "--out", out], "--force")
    r = linmix("viz", "--model", lm, "--prompt", "hello there", "--out", out, "--force")
    check("viz --force replaces it", r.returncode == 0 and json.load(open(os.path.join(out, "viz.json")))["tokens"] == 11,
          r.stderr[-200:])
    refused("recall with more pairs than keys", ["train", "--task", "recall", "--pairs", "200", "--seq", "512",
                                                 "--steps", "1", "--out", path("rc0")], "do not fit")
    refused("recall pairs past the sequence", ["train", "--task", "recall", "--pairs", "-40", "--seq", "64",
                                               "--steps", "1", "--out", path("rc1")], "do not fit")
    refused("--pairs on the copy task", ["train", "--task", "copy", "--pairs", "3", "--steps", "1",
                                         "--out", path("rc2")], "recall")
    run = path("rc3")
    r = linmix("train", "--task", "recall", "--mixer", "gla", "--pairs", "-6", "--seq", "32", "--steps", "2",
               "--batch", "2", "--out", run)
    check("train --task recall --pairs -6", r.returncode == 0, r.stderr[-300:])
    ck = os.path.join(run, "ckpt.safetensors")
    r = linmix("eval", "--model", ck, "--pairs", "4", "--seq", "16", "--examples", "32", "--json")
    try:
        j = json.loads(r.stdout)
        ok = j["task"] == "recall" and j["pairs"] == 4 and j["seq"] == 16 and 0 <= j["accuracy"] <= 1
    except (ValueError, KeyError):
        ok = False
    check("eval of a recall model at another --pairs and --seq", ok, r.stdout + r.stderr[-200:])
    refused("eval of a recall model with pairs past its --seq", ["eval", "--model", ck, "--pairs", "9", "--seq", "16"],
            "do not fit")


def main():
    corpus = write(path("corpus.txt"), "the quick brown fox jumps over the lazy dog. " * 300)
    run = path("run")
    r = linmix("train", "--data", corpus, "--mixer", "linear", "--steps", "2", "--batch", "2", "--seq", "16",
               "--out", run)
    check("a tiny linmix model trains", r.returncode == 0, r.stderr.strip()[-200:])
    model = os.path.join(run, "ckpt.safetensors")

    # tokenizer.json: ids that are negative, huge, fractional or overflowing refuse cleanly
    for label, vocab_ids, added in [
            ("added token id -1", {}, [{"id": -1, "content": "<x>", "special": True}]),
            ("added token id -1000000", {}, [{"id": -1000000, "content": "<x>", "special": True}]),
            ("added token id 1e300", {}, [{"id": 1e300, "content": "<x>", "special": True}]),
            ("vocab id 2^63-1", {"ab": 9223372036854775807}, []),
            ("vocab id 2^64-1", {"ab": 18446744073709551615}, []),
            ("vocab id 2.5", {"ab": 2.5}, []),
            ("duplicate vocab id", {"ab": 65}, [])]:
        p = write(path("tok.json"), json.dumps(tokenizer_json(vocab_ids, added)))
        refused(f"tokenizer.json with {label}", ["tokenize", "--tokenizer", p, "--text", "hi"])
    ok_tok = write(path("ok.json"), json.dumps(tokenizer_json({}, [])))
    r = linmix("tokenize", "--tokenizer", ok_tok, "--text", "hi")
    check("the same tokenizer.json without the bad id works", r.returncode == 0 and r.stdout.strip() == "104,105",
          r.stdout.strip() + r.stderr.strip())

    # World vocabulary: duplicate ids, huge ids, bad numbers and bad escapes
    base = "".join(f"{b + 1} b'\\x{b:02x}' 1\n" for b in range(256))
    for label, extra in [("duplicate id", "5 'zz' 2\n"), ("id 16777215", "16777215 'zz' 2\n"),
                         ("id 3abc", "3abc 'zz' 2\n"), ("negative length", "300 'zz' -2\n"),
                         ("bad hex escape", "300 '\\xZZ' 1\n")]:
        p = write(path("world.txt"), base + extra)
        refused(f"World vocabulary with {label}", ["tokenize", "--tokenizer", p, "--text", "hi"])

    # an RWKV-4 checkpoint whose embedding has width 0 (was SIGFPE)
    w = {n: t.numpy() for n, t in rwkv4_ref.random_rwkv4(10, 8, 1, seed=1).items()}
    w["emb.weight"] = np.zeros((10, 0), np.float32)
    w["blocks.0.ffn.key.weight"] = np.zeros((32, 0), np.float32)
    bad_rwkv = path("rwkv0.safetensors")
    st.save(bad_rwkv, w)
    refused("RWKV-4 checkpoint with C = 0 (logits)", ["logits", "--model", bad_rwkv, "--tokens", "1", "--out",
                                                        path("l.safetensors")], "emb.weight")
    refused("RWKV-4 checkpoint with C = 0 (generate)", ["generate", "--model", bad_rwkv, "--tokens", "2"])
    refused("RWKV-4 checkpoint with C = 0 (eval)", ["eval", "--model", bad_rwkv, "--data", corpus])

    # saved states with absurd positions
    state = path("state.safetensors")
    r = linmix("generate", "--model", model, "--tokens", "3", "--state-out", state)
    check("a state saves", r.returncode == 0, r.stderr.strip())
    header_meta = None
    with open(state, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_meta = json.loads(f.read(n)).get("__metadata__")
    good = st.load(state)
    for pos in (math.inf, 1e30, -1.0, 2.5):
        bad = dict(good)
        bad["pos"] = np.array([pos], np.float32)
        p = path("badstate.safetensors")
        st.save(p, bad, metadata=header_meta)
        refused(f"state with pos = {pos}", ["generate", "--model", model, "--state-in", p, "--tokens", "2"], "pos")

    # sampling options
    for flag, val in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"), ("--top-p", "0")):
        refused(f"generate {flag} {val}", ["generate", "--model", model, "--tokens", "2", flag, val])

    # softmax logits past float32's range (the reference is finite; the kernel would give NaN)
    x = {"q": np.ones((1, 4, 1, 2), np.float32), "k": np.ones((1, 4, 1, 2), np.float32),
         "v": np.ones((1, 4, 1, 2), np.float32)}
    st.save(path("sm.safetensors"), x)
    refused("mix softmax scale=3e38", ["mix", "--mixer", "softmax", "--param", "scale=3e38", "--in",
                                       path("sm.safetensors"), "--out", path("y.safetensors")], "scale")

    # eval reports what it evaluated
    r = linmix("eval", "--model", model, "--data", corpus, "--windows", "1000000000", "--seq", "16", "--split", "all")
    got = r.stdout.split(" windows")[0].split()[-1] if r.returncode == 0 else "?"
    want = (len(open(corpus, "rb").read()) - 1) // 16
    check("eval --windows 1e9 reports the windows it scored", got == str(want), f"{got} vs {want}: {r.stdout.strip()}")

    # grad with nothing scored
    refused("grad with every target -1", ["grad", "--model", model, "--tokens", "1,2,3", "--targets", "-1,-1,-1",
                                          "--out", path("g.safetensors")], "target")

    # checkpoints whose metadata or moments are bad: refused on --resume
    ck = st.load(model)
    with open(model, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    for label, key, val in (("step -5", "step", "-5"), ("step 3abc", "step", "3abc"), ("adam_t 1e3", "adam_t", "1e3")):
        d = path("bad_" + key)
        os.makedirs(d, exist_ok=True)
        st.save(os.path.join(d, "ckpt.safetensors"), ck, metadata={**meta, key: val})
        refused(f"train --resume from a checkpoint with {label}",
                ["train", "--data", corpus, "--resume", "--out", d, "--steps", "3"], key)
    d = path("bad_moments")
    os.makedirs(d, exist_ok=True)
    nan = dict(ck)
    m1 = next(n for n in nan if n.startswith("opt.m."))
    nan[m1] = nan[m1] * np.nan
    st.save(os.path.join(d, "ckpt.safetensors"), nan, metadata=meta)
    refused("train --resume with NaN Adam moments", ["train", "--data", corpus, "--resume", "--out", d,
                                                     "--steps", "3"], m1)

    # an RWKV-4 model with a BPE vocabulary: bytes refused, its tokenizer accepted
    w = {n: t.numpy() for n, t in rwkv4_ref.random_rwkv4(300, 8, 1, seed=2).items()}
    big = path("rwkv300.safetensors")
    st.save(big, w)
    refused("generate a 300-token model with --tokenizer bytes", ["generate", "--model", big, "--tokens", "2"],
            "tokenizer")
    refused("eval a 300-token model as bytes", ["eval", "--model", big, "--data", corpus], "tokenizer")
    r = linmix("eval", "--model", big, "--data", corpus, "--tokenizer", ok_tok, "--seq", "16", "--windows", "4")
    check("eval --tokenizer scores a model's own tokens", r.returncode == 0 and "bits/byte" in r.stdout,
          r.stdout.strip() + r.stderr.strip())

    lost_work(corpus, model)
    cli(corpus, model)
    classifiers(corpus, model)
    viz_and_recall(corpus, model)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
