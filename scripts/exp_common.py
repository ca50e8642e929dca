"""What scripts/results.py and scripts/recall.py share: the causal mechanisms of the registry
with the experiment settings where a registry example does not fit a short context, and the
size of a saved recurrent state, --only checking, a fresh run directory."""
import json
import os
import struct
import subprocess

# Where a mechanism's registry example does not fit a 128-token context (every other causal
# mechanism of `linmix mixers --json` runs with its example params).
SETTINGS = {
    "performer": {"features": 32},
    "block_softmax": {"params": {"block": 32}},
    "aft_local": {"params": {"window": 32}},
    "flash": {"params": {"group": 32}, "qk_dim": 32, "expand": 2},
    "s4d": {"state": 32, "params": {"init": "lin"}},
    "mamba": {"state": 16, "expand": 2},
}


def causal_rows(linmix):
    """(name, layer config) for every causal mechanism of the registry, in its order."""
    specs = json.loads(subprocess.run([linmix, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)
    return [(m["name"], {"mixer": m["name"], **SETTINGS.get(m["name"], {"params": m["example_params"]})})
            for m in specs if m["causal"]]


def state_floats(path):
    """Floats in a safetensors file (8-byte header length, JSON header): a saved recurrent state's size."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
    total = 0
    for k, v in head.items():
        if k != "__metadata__":
            size = 1
            for d in v["shape"]:
                size *= d
            total += size
    return total


def selected(prog, rows, only):
    """The names of --only (comma-separated), each checked against the rows; exits naming the rows."""
    names = [n for n, _ in rows]
    picked = [x for x in only.split(",") if x]
    for x in picked:
        if x not in names:
            raise SystemExit(f"{prog}: unknown row '{x}' (rows: {', '.join(names)})")
    return picked


def fresh_run(runs, name, config):
    """The run directory of a row, its old row.json gone, the model config written: (dir, config path)."""
    run = os.path.join(runs, name)
    os.makedirs(run, exist_ok=True)
    if os.path.exists(os.path.join(run, "row.json")):
        os.remove(os.path.join(run, "row.json"))
    cfg_path = os.path.join(run, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    return run, cfg_path
