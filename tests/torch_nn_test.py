"""linmix.nn against the C++ model: a checkpoint of every layer kind (`linmix train --config`, one
step, weights enlarged so every path matters), and RWKV-4/5/6/7 / Mamba / Mamba-2 checkpoints
(random weights, as python/*_ref.py make them), load into linmix.nn.LanguageModel with logits
equal to `linmix logits` (1e-4 relative: float32 kernels on both sides, different summation
orders); a model trained a few steps in PyTorch (linmix.ops kernels, torch.optim) is saved and
`linmix logits` reads the same logits back; `linmix generate` samples from it.
Run: LINMIX=PATH/TO/linmix python3 -m pytest tests/torch_nn_test.py (CTest: torch_nn)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import linmix  # noqa: E402
import mamba2_ref  # noqa: E402
import mamba_ref  # noqa: E402
import rwkv4_ref  # noqa: E402
import rwkv_ref  # noqa: E402
import st  # noqa: E402

LINMIX = os.environ.get("LINMIX", os.path.join(ROOT, "build", "release", "linmix"))
TMP = tempfile.mkdtemp(prefix="linmix-nn-")
TOKENS = [int(x) for x in np.random.default_rng(1).integers(0, 60, 40)]


def cli(*args):
    r = subprocess.run([LINMIX, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def cli_logits(path, tokens=TOKENS):
    out = os.path.join(TMP, "logits.safetensors")
    cli("logits", "--model", path, "--tokens", ",".join(map(str, tokens)), "--mode", "parallel", "--out", out)
    return torch.from_numpy(st.load(out)["logits"]).double()


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / max(1.0, float(b.abs().max())))


def trained(mixer, cm, params):
    """A one-step linmix checkpoint of the layer kind with enlarged weights."""
    cfg = {"vocab": 128, "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64, "features": 8, "kernel": 3,
           "ffn_mult": 2, "state": 4, "qk_dim": 8, "mixer": mixer, "channel_mix": cm, "params": params,
           "ln0": mixer.startswith("rwkv")}
    if cm == "none":
        cfg["norm"] = "rmsnorm"
    run = os.path.join(TMP, f"{mixer}-{cm}")
    cfg_path = os.path.join(TMP, "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    corpus = os.path.join(TMP, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 100)
    cli("train", "--data", corpus, "--config", cfg_path, "--steps", "1", "--batch", "2", "--seq", "8", "--out", run)
    m = linmix.nn.LanguageModel.from_checkpoint(os.path.join(run, "ckpt.safetensors"))
    g = torch.Generator().manual_seed(3)
    keep = ("A_log", "dt_bias", "dt_proj.bias", "log_dt", "log_A_re", "att.A", "time_decay", "w0", "ln", "gamma", "beta")
    with torch.no_grad():  # larger than the init (the SSM time steps and decays keep theirs)
        for n, p in m.tensors().items():
            if not any(k in n for k in keep):
                p.mul_(3).add_(0.1 * torch.randn(p.shape, generator=g))
    path = os.path.join(TMP, f"{mixer}-{cm}.safetensors")
    m.save_checkpoint(path)
    return path


def kinds():
    specs = json.loads(cli("mixers", "--json").stdout)
    out = [(s["name"], "mlp", {**s["example_params"], **s["small_params"]}) for s in specs if s["causal"]]
    out += [("rwkv4", "rwkv", {}), ("rwkv5", "rwkv", {}), ("rwkv6", "rwkv6", {"d_mix": "4", "d_decay": "6"}),
            ("rwkv7", "rwkv7", {"d_w": "4", "d_a": "5", "d_v": "6", "d_g": "7"}), ("mamba", "none", {"dt_rank": "3"}),
            ("mamba2", "none", {"groups": "2"})]
    return [pytest.param(*k, id=f"{k[0]}-{k[1]}") for k in out]


@pytest.mark.parametrize("mixer,cm,params", kinds())
def test_linmix_checkpoint_logits_equal_the_cli(mixer, cm, params):
    path = trained(mixer, cm, params)
    m = linmix.nn.LanguageModel.from_checkpoint(path)
    with torch.no_grad():
        got = m(torch.tensor([TOKENS]))[0]
    want = cli_logits(path)
    assert rel(got, want) <= 1e-4, rel(got, want)


def imported():
    out = []
    w4 = rwkv4_ref.random_rwkv4(60, 32, 2, seed=1, F_mult=2)
    out.append(("rwkv4", w4))
    for layout in ("5.2", "6.0", "7.0"):
        out.append(("rwkv" + layout, rwkv_ref.random_rwkv(layout, 60, 32, 2, 2, seed=1, F_dim=48,
                                                           loras=(4, 6) if layout == "6.0" else None)))
    out.append(("mamba", mamba_ref.random_mamba(60, 16, 2, S=4, seed=1)))
    out.append(("mamba2", mamba2_ref.random_mamba2(60, 16, 2, S=4, H=4, seed=1)))
    return [pytest.param(n, w, id=n) for n, w in out]


@pytest.mark.parametrize("name,w", imported())
def test_imported_checkpoint_logits_equal_the_cli(name, w):
    path = os.path.join(TMP, name + ".safetensors")
    st.save(path, {n: t.float().numpy() for n, t in w.items()})
    m = linmix.nn.LanguageModel.from_checkpoint(path)
    with torch.no_grad():
        got = m(torch.tensor([TOKENS]))[0]
    assert rel(got, cli_logits(path)) <= 1e-4


def test_train_in_pytorch_then_continue_in_the_engine():
    torch.manual_seed(0)
    m = linmix.nn.LanguageModel({"vocab": 256, "d_model": 32, "n_layer": 2, "n_head": 2, "mixer": "gla"}, seed=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(5):
        logits = m(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    path = os.path.join(TMP, "torch-trained.safetensors")
    m.save_checkpoint(path)
    with torch.no_grad():
        got = m(torch.tensor([TOKENS]))[0]
    assert rel(got, cli_logits(path)) <= 1e-4
    r = cli("generate", "--model", path, "--prompt", "ab", "--tokens", "5", "--temperature", "0")
    assert r.stdout
    m2 = linmix.nn.LanguageModel.from_checkpoint(path)  # and back
    with torch.no_grad():
        assert torch.equal(m2(torch.tensor([TOKENS]))[0], got)


def test_bad_input_raises():
    m = linmix.nn.LanguageModel({"vocab": 16, "d_model": 8, "n_layer": 1, "n_head": 2, "mixer": "retention"})
    with pytest.raises(ValueError, match="vocabulary"):
        m(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        m(torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        linmix.nn.LanguageModel.from_checkpoint(os.path.join(TMP, "missing.safetensors"))
    with pytest.raises(ValueError, match="mixer"):
        linmix.nn.LanguageModel({"vocab": 16, "d_model": 8, "n_layer": 1, "mixer": "nosuch"})


def test_a_classifier_config_is_refused_by_name():
    # linmix.nn holds the language model; an encoder classifier's config is refused, not misread
    for cfg in ({"mixer": "fnet", "causal": False, "classes": 3, "d_model": 16, "n_layer": 1, "n_head": 2},
                {"mixer": "rwkv4", "classes": 3, "d_model": 16, "n_layer": 1, "n_head": 2}):
        with pytest.raises(ValueError, match="classifier"):
            linmix.nn.LanguageModel(cfg)
