"""Minimal safetensors reader/writer on numpy, written from the format description
(8-byte little-endian header length, JSON header, raw little-endian data). Independent of
linmix's C++ reader so the tests exercise the wire from both sides."""
import json
import struct

import numpy as np

_DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I8": np.int8, "U8": np.uint8}


def save(path, tensors, metadata=None, dtype="F32"):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]), dtype=_DT[dtype])
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def header(path):
    """The JSON header: name -> {"dtype", "shape", "data_offsets"}, and "__metadata__"."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, en = e["data_offsets"]
        if e["dtype"] == "BF16":  # the upper half of a float32
            h = np.frombuffer(data[b:en], dtype=np.uint16).astype(np.uint32) << 16
            out[name] = h.view(np.float32).reshape(e["shape"]).copy()
            continue
        out[name] = np.frombuffer(data[b:en], dtype=_DT[e["dtype"]]).reshape(e["shape"]).copy()
    return out
