#!/usr/bin/python3
"""The RWKV World tokenizer of `linmix tokenize` against an independent Python implementation
(python/world_tokenizer.py) on all of tiny Shakespeare and on random UTF-8, and
decode(encode(x)) == x for both.  Usage: tokenizer_test.py PATH/TO/linmix"""
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import world_tokenizer  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
VOCAB = os.path.join(ROOT, "data", "rwkv_vocab_v20230424.txt")
SHAKES = os.path.join(ROOT, "data", "tinyshakespeare.txt")
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def linmix_encode(path):
    r = subprocess.run([LINMIX, "tokenize", "--tokenizer", VOCAB, "--file", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return [int(x) for x in r.stdout.strip().split(",") if x]


def linmix_decode(ids, out_path):
    with open(out_path + ".ids", "w") as f:
        f.write(",".join(map(str, ids)))
    with open(out_path, "wb") as f:
        r = subprocess.run([LINMIX, "tokenize", "--tokenizer", VOCAB, "--decode", "@" + out_path + ".ids"],
                           stdout=f, stderr=subprocess.PIPE)
    with open(out_path, "rb") as f:
        return r.returncode, f.read()


def main():
    if not os.path.exists(VOCAB):
        print("0 passed, 1 failed  (data/ is missing from the checkout)")
        return 1
    py = world_tokenizer.World(VOCAB)
    tmp = tempfile.mkdtemp(prefix="linmix-tok-")
    rng = random.Random(int(os.environ.get("LINMIX_SEED", "12345")))
    samples = [("tiny Shakespeare", open(SHAKES, "rb").read())]
    for i in range(20):  # random UTF-8: code points from every plane, plus ASCII runs
        chars = [chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xD7FF),
                                 rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x10FFFF)]))
                 for _ in range(rng.randint(1, 400))]
        samples.append((f"random UTF-8 #{i}", "".join(chars).encode("utf-8")))
    samples.append(("all bytes", bytes(range(256)) * 3))
    for name, data in samples:
        path = os.path.join(tmp, "in.bin")
        with open(path, "wb") as f:
            f.write(data)
        ids = linmix_encode(path)
        want = py.encode(data)
        check(f"{name}: encoding equals the Python reference", ids == want, f"({len(ids)} tokens)")
        code, back = linmix_decode(ids, os.path.join(tmp, "out.bin"))
        check(f"{name}: decode(encode(x)) == x", code == 0 and back == data)
    r = subprocess.run([LINMIX, "tokenize", "--tokenizer", VOCAB, "--decode", "1,x"], capture_output=True, text=True)
    check("bad ids refused", r.returncode == 2 and "'x' is not an integer" in r.stderr, r.stderr.strip())
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
