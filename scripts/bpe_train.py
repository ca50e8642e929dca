#!/usr/bin/python3
"""Learns a small byte-level BPE tokenizer (Hugging Face tokenizer.json, as GPT-2's) on a text.

The first 90% of the file (the split `linmix train` trains on; the last 10% validates) is cut
into GPT-2 pre-tokenizer pieces, each a sequence of byte ids; the most frequent adjacent pair is
merged into a new token, `--vocab - 256` times (ties: the pair first seen). The file written is
what `linmix train --tokenizer F` and `linmix tokenize --tokenizer F` read (ByteLevel
pre-tokenizer, no normaliser, merges in rank order).

Usage: scripts/bpe_train.py --data data/tinyshakespeare.txt --vocab 512 --out runs/bpe512.json
"""
import argparse
import collections
import json
import os
import sys

import regex

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
# GPT-2's pre-tokenizer pattern (the one `linmix` runs for a ByteLevel pre-tokenizer) and its
# byte-to-character map, as the Python reference tokenizer has them
from bpe_tokenizer import GPT2_PATTERN, bytes_to_unicode  # noqa: E402

PATTERN = regex.compile(GPT2_PATTERN)


def learn(text, n_merges):
    """Returns the merges, in order, as pairs of byte strings."""
    words = collections.Counter(m.group(0).encode("utf-8") for m in PATTERN.finditer(text))
    seqs = [[bytes([b]) for b in w] for w in words]
    counts = list(words.values())
    pairs = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of the words holding it
    for i, s in enumerate(seqs):
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += counts[i]
            where[(a, b)].add(i)
    merges = []
    for _ in range(n_merges):
        if not pairs:
            break
        best = max(pairs, key=lambda p: pairs[p])
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        for i in list(where[best]):
            s, c = seqs[i], counts[i]
            for a, b in zip(s, s[1:]):  # this word's pairs leave the counts ...
                pairs[(a, b)] -= c
                if pairs[(a, b)] <= 0:
                    del pairs[(a, b)]
                where[(a, b)].discard(i)
            t, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == best[0] and s[j + 1] == best[1]:
                    t.append(joined)
                    j += 2
                else:
                    t.append(s[j])
                    j += 1
            seqs[i] = t
            for a, b in zip(t, t[1:]):  # ... and the merged word's join them
                pairs[(a, b)] += c
                where[(a, b)].add(i)
        where.pop(best, None)
    return merges


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", type=int, default=512, help="256 bytes + the merges learned")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not 256 < a.vocab <= 65536:
        sys.exit(f"bpe_train.py: --vocab {a.vocab} is outside (256, 65536]")
    data = open(a.data, "rb").read()
    try:
        text = data[: len(data) * 9 // 10].decode("utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"bpe_train.py: {a.data} is not UTF-8 text ({e})")
    merges = learn(text, a.vocab - 256)
    bc = bytes_to_unicode()
    show = lambda bs: "".join(bc[b] for b in bs)  # noqa: E731
    vocab = {bc[b]: b for b in range(256)}
    for l, r in merges:
        vocab[show(l + r)] = len(vocab)
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel"},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "vocab": vocab,
                     "merges": [f"{show(l)} {show(r)}" for l, r in merges]}}
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    os.replace(tmp, a.out)
    n_tok = sum(1 for _ in PATTERN.finditer(text))
    print(f"{a.out}: {len(vocab)} tokens ({len(merges)} merges) from {len(text)} characters, {n_tok} pieces")


if __name__ == "__main__":
    main()
