"""The RWKV World tokenizer written from its description (independent of linmix's C++): the
vocabulary file's Python literals evaluated with ast.literal_eval, a byte trie, and greedy
longest-match encoding."""
import ast


class World:
    def __init__(self, path):
        self.tok = {}
        self.trie = {}
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                idx = int(line[:line.index(" ")])
                lit = line[line.index(" "):line.rindex(" ")].strip()
                x = ast.literal_eval(lit)
                x = x.encode("utf-8") if isinstance(x, str) else x
                assert len(x) == int(line[line.rindex(" "):])
                self.tok[idx] = x
                node = self.trie
                for b in x:
                    node = node.setdefault(b, {})
                node[None] = idx

    def encode(self, data: bytes):
        out, i = [], 0
        while i < len(data):
            node, j, best = self.trie, i, None
            while j < len(data) and data[j] in node:
                node = node[data[j]]
                j += 1
                if None in node:
                    best = (node[None], j)
            out.append(best[0])
            i = best[1]
        return out

    def decode(self, ids):
        return b"".join(self.tok[i] for i in ids)
