#!/usr/bin/python3
"""Byte-level BPE (the real GPT-NeoX 20B_tokenizer.json) of `linmix tokenize` against an
independent Python implementation (python/bpe_tokenizer.py: the `regex` module runs the GPT-2
pattern, unicodedata does NFC, the classic merge loop) on all of tiny Shakespeare and on random
UTF-8, and decode(encode(x)) == x; and a BPE scripts/bpe_train.py learns.  Usage: bpe_test.py PATH/TO/linmix"""
import collections
import os
import random
import subprocess
import sys
import tempfile
import unicodedata

import regex

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import bpe_tokenizer  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TOK = os.path.join(ROOT, "data", "20B_tokenizer.json")
SHAKES = os.path.join(ROOT, "data", "tinyshakespeare.txt")
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def run(*args, **kw):
    return subprocess.run([LINMIX, *args], capture_output=True, **kw)


def random_text(rng):
    """Code points assigned in Python's Unicode database (so ICU and unicodedata agree on their
    categories), mixed with what the GPT-2 pattern treats specially: runs of spaces and
    newlines, contractions, digits, punctuation, combining marks (NFC), added tokens."""
    pieces = []
    for _ in range(rng.randint(1, 120)):
        k = rng.random()
        if k < 0.3:
            c = chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x7FF), rng.randint(0x800, 0xD7FF),
                                rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x1FAFF), rng.randint(0x20000, 0x2A6DF)]))
            if unicodedata.category(c) in ("Cn", "Cs", "Co"):
                continue
            pieces.append(c)
        elif k < 0.45:
            pieces.append(rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\u00a0", "\u3000", " " * rng.randint(2, 30)]))
        elif k < 0.6:
            pieces.append(rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "'x"]))
        elif k < 0.7:
            pieces.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
        elif k < 0.8:
            pieces.append(rng.choice(["e\u0301", "A\u030a", "\u1100\u1161", "n\u0303", "\u0301"]))  # NFC composes
        elif k < 0.85:
            pieces.append(rng.choice(["<|endoftext|>", "<|padding|>", "<|endoftext"]))
        else:
            pieces.append(rng.choice(["Hello", " world", "ROMEO:", "naïve", "日本語", "Ünïcödé", "😀👍🏽", "x=1+2*3;"]))
    return "".join(pieces)


def main():
    if not os.path.exists(TOK):
        print("0 passed, 1 failed  (data/ is missing from the checkout)")
        return 1
    py = bpe_tokenizer.Bpe(TOK)
    tmp = tempfile.mkdtemp(prefix="linmix-bpe-")
    rng = random.Random(int(os.environ.get("LINMIX_SEED", "12345")))
    samples = [("tiny Shakespeare", open(SHAKES, encoding="utf-8").read())]
    samples += [(f"random UTF-8 #{i}", random_text(rng)) for i in range(40)]
    for name, text in samples:
        path = os.path.join(tmp, "in.txt")
        with open(path, "wb") as f:
            f.write(text.encode("utf-8"))
        r = run("tokenize", "--tokenizer", TOK, "--file", path, text=True)
        if r.returncode != 0:
            check(name, False, r.stderr.strip())
            continue
        ids = [int(x) for x in r.stdout.strip().split(",") if x]
        want = py.encode(text)
        first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
        check(f"{name}: encoding equals the Python reference", ids == want,
              f"({len(ids)} tokens)" + ("" if ids == want else f" first difference at {first}: {ids[first:first+5]} vs {want[first:first+5]}"))
        with open(path + ".ids", "w") as f:
            f.write(",".join(map(str, ids)))
        r = run("tokenize", "--tokenizer", TOK, "--decode", "@" + path + ".ids")
        nfc = unicodedata.normalize("NFC", text).encode("utf-8")
        check(f"{name}: decode(encode(x)) == NFC(x)", r.returncode == 0 and r.stdout == nfc,
              "" if text.encode("utf-8") == nfc else "(x is not NFC: NFC(x) differs)")
        check(f"{name}: the Python reference decodes the same", py.decode(want) == nfc)
    path = os.path.join(tmp, "bad.txt")
    with open(path, "wb") as f:
        f.write(b"abc\xff\xfedef")
    r = run("tokenize", "--tokenizer", TOK, "--file", path, text=True)
    check("invalid UTF-8 refused", r.returncode == 2 and "not valid UTF-8 (byte 3)" in r.stderr, r.stderr.strip())
    bad = os.path.join(tmp, "tok.json")
    with open(TOK, encoding="utf-8") as f:
        cut = f.read()[:5000]
    with open(bad, "w") as f:
        f.write(cut)
    r = run("tokenize", "--tokenizer", bad, "--text", "hi", text=True)
    check("truncated tokenizer.json refused", r.returncode == 2 and "not valid JSON" in r.stderr, r.stderr.strip())
    learned(tmp)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def learned(tmp):
    """scripts/bpe_train.py: a 400-token BPE learned on the training split of tiny Shakespeare is
    read by linmix as by the Python reference, its first merge is the most frequent pair of bytes
    within a GPT-2 piece (counted here), and it compresses the validation split."""
    tok = os.path.join(tmp, "learned.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bpe_train.py"), "--data", SHAKES, "--vocab",
                        "400", "--out", tok], capture_output=True, text=True)
    check("bpe_train.py: learns a 400-token BPE", r.returncode == 0, r.stderr.strip()[-200:])
    if r.returncode != 0:
        return
    py = bpe_tokenizer.Bpe(tok)
    check("bpe_train.py: 256 bytes + 144 merges", len(py.vocab) == 400 and len(py.ranks) == 144)
    data = open(SHAKES, "rb").read()
    train, val = data[: len(data) * 9 // 10].decode("utf-8"), data[len(data) * 9 // 10:].decode("utf-8")
    pairs = collections.Counter()
    for m in regex.finditer(bpe_tokenizer.GPT2_PATTERN, train):
        b = m.group(0).encode("utf-8")
        pairs.update(zip(b, b[1:]))
    (a, b), _ = pairs.most_common(1)[0]
    first = min(py.ranks, key=py.ranks.get)
    check("bpe_train.py: the first merge is the most frequent pair", first == (py.b2u[a], py.b2u[b]),
          f"{first} vs {(py.b2u[a], py.b2u[b])}")
    path = os.path.join(tmp, "val.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(val)
    r = run("tokenize", "--tokenizer", tok, "--file", path, text=True)
    ids = [int(x) for x in r.stdout.strip().split(",") if x] if r.returncode == 0 else []
    check("bpe_train.py: linmix encodes as the Python reference", r.returncode == 0 and ids == py.encode(val),
          f"({len(ids)} tokens for {len(val.encode('utf-8'))} bytes)")
    check("bpe_train.py: fewer tokens than bytes (at least 1.5 bytes each)", 0 < len(ids) <= len(val.encode()) / 1.5)
    with open(path + ".ids", "w") as f:
        f.write(",".join(map(str, ids)))
    r = run("tokenize", "--tokenizer", tok, "--decode", "@" + path + ".ids")
    check("bpe_train.py: decode(encode(x)) == x", r.returncode == 0 and r.stdout == val.encode("utf-8"))


if __name__ == "__main__":
    sys.exit(main())
