"""Byte-level BPE (GPT-2 / GPT-NeoX, a Hugging Face tokenizer.json) written from its
description, independent of linmix's C++: NFC by Python's unicodedata, the GPT-2 pattern run
by the `regex` module (python3-regex), added tokens cut out by a longest-first alternation,
and the classic GPT-2 merge loop (find the lowest-ranked bigram, merge every occurrence,
repeat)."""
import json
import unicodedata

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class Bpe:
    def __init__(self, path):
        j = json.load(open(path, encoding="utf-8"))
        m = j["model"]
        self.vocab = dict(m["vocab"])
        self.ranks = {}
        for i, mg in enumerate(m["merges"]):
            a, b = mg.split(" ") if isinstance(mg, str) else mg
            self.ranks[(a, b)] = i
        self.nfc = j.get("normalizer") is not None and j["normalizer"]["type"] == "NFC"
        self.b2u = bytes_to_unicode()
        self.u2b = {u: b for b, u in self.b2u.items()}
        self.id2tok = {i: t for t, i in self.vocab.items()}
        self.added = {}
        for a in j.get("added_tokens", []):
            self.added[a["content"]] = (a["id"], a.get("normalized", not a.get("special", False)))
            self.id2tok[a["id"]] = None
        self.added_text = {a["id"]: a["content"] for a in j.get("added_tokens", [])}
        self.pat = regex.compile(GPT2_PATTERN)
        self.cache = {}

    def _split(self, text, normalized):
        toks = sorted((c for c, (_, n) in self.added.items() if n == normalized), key=len, reverse=True)
        if not toks:
            return [(text, None)]
        alt = regex.compile("|".join(regex.escape(t) for t in toks))
        out, pos = [], 0
        for mt in alt.finditer(text):
            if mt.start() > pos:
                out.append((text[pos:mt.start()], None))
            out.append((mt.group(0), self.added[mt.group(0)][0]))
            pos = mt.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        ids = []
        for piece, tid in self._split(text, False):
            if tid is not None:
                ids.append(tid)
                continue
            if self.nfc:
                piece = unicodedata.normalize("NFC", piece)
            for sub, sid in self._split(piece, True):
                if sid is not None:
                    ids.append(sid)
                    continue
                for word in self.pat.findall(sub):
                    ids.extend(self._bpe("".join(self.b2u[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            if i in self.added_text:
                out += self.added_text[i].encode("utf-8")
            else:
                out += bytes(self.u2b[c] for c in self.id2tok[i])
        return bytes(out)
