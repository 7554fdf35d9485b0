"""Correctness checks of hf_cim on an accelerator (CUDA): run before benchmarking on a GPU machine.

    python benchmarks/device_check.py --device cuda

Checks, on the device: the STE gradient contract of the three layer types against the plain layers, ``ste`` ==
``ste_detach`` for the same seed, bit-identical noise for the same seed, no host sync in the analog forward
(``torch.cuda.set_sync_debug_mode("error")``), bf16 autocast training steps of a GPT-2 with finite gradients, and a
programmed chip that gives identical outputs twice. Prints one line per check and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import hf_cim

NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]


def _check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    return ok


def _grads(layer, x, g):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = torch.device(args.device)
    ok = True
    if dev.type == "cuda":
        print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__)
    torch.manual_seed(0)
    layers = {
        "linear": (nn.Linear(700, 96), torch.randn(4, 33, 700)),
        "conv1d": (Conv1D(96, 700), torch.randn(4, 33, 700)),
        "conv2d": (nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 12, 12)),
    }
    for kind, (plain, x) in layers.items():
        plain, x = plain.to(dev), x.to(dev)
        g = torch.randn_like(plain(x))
        ref = _grads(plain, x, g)
        outs = {}
        for mode in ("ste", "ste_detach"):
            noisy = hf_cim.patch_model(copy.deepcopy(plain), hf_cim.AnalogNoiseConfig(gradient=mode, noise=NOISE))
            outs[mode] = _grads(noisy, x, g)
            err = max(
                (a - b).abs().max().item() / (b.abs().max().item() + 1e-12) for a, b in zip(outs[mode][1:], ref[1:])
            )
            ok &= _check(f"{kind} {mode} gradient == clean gradient", err < 1e-4, f"max rel err {err:.2e}")
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(outs["ste"], outs["ste_detach"]))
        ok &= _check(f"{kind} ste == ste_detach (outputs and gradients)", same)

    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).to(dev)
    ids = torch.randint(0, 256, (4, 128), device=dev)
    a = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(seed=3)).eval()
    b = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(seed=3)).eval()
    with torch.no_grad():
        ok &= _check("same seed => bit-identical noisy logits", torch.equal(a(ids).logits, b(ids).logits))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                a(ids)
                ok &= _check("no host sync in the analog forward", True)
            except RuntimeError as err:
                ok &= _check("no host sync in the analog forward", False, str(err).splitlines()[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hf_cim.program_chip(a, seed=1)
        hf_cim.unpatch_model(b)
        b = hf_cim.patch_model(b, hf_cim.AnalogNoiseConfig(noise=[{"name": "gaussian_weight", "std": 0.05}])).eval()
        hf_cim.program_chip(b, seed=1)
        ok &= _check("programmed chip without read noise is fixed", torch.equal(b(ids).logits, b(ids).logits))

    model = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    ok &= _check(
        "bf16 autocast training: finite grads, loss decreases",
        finite and losses[-1] < losses[0],
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
    )
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
