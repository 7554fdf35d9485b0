"""Correctness on an accelerator (CUDA): the checks to run before benchmarking on a GPU machine.

On the device: the STE gradient contract of the three layer types against the plain layers, ``ste`` ==
``ste_detach`` for the same seed, bit-identical noise for the same seed, no host sync in the analog forward
(``torch.cuda.set_sync_debug_mode("error")``), a programmed chip that gives identical outputs twice, and bf16
autocast training steps of a GPT-2 with finite gradients. Marked ``gpu`` and skipped without CUDA; on CUDA the
stages run as the library runs them there (``torch.compile`` of the reference, which the rest of the suite turns
off). ``HF_CIM_TEST_DEVICE`` picks another device (``HF_CIM_TEST_DEVICE=cpu`` runs them here).
``python benchmarks/device_check.py`` runs this file on the device machine in one call.
"""

import copy
import os

import pytest
import torch
from helpers import layer_grads
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import hf_cim
from hf_cim import kernels

DEVICE = torch.device(os.environ.get("HF_CIM_TEST_DEVICE", "cuda"))
NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA device: torch.cuda.is_available() is False",
    ),
]


@pytest.fixture(autouse=True)
def _the_devices_backend():
    if DEVICE.type == "cuda":
        kernels.set_compile(True)  # what a GPU user runs (conftest turns torch.compile off for the CPU suite)
    yield
    kernels.set_compile(None)


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(700, 96), torch.randn(4, 33, 700)
    if kind == "conv1d":
        return Conv1D(96, 700), torch.randn(4, 33, 700)
    return nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 12, 12)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_ste_gradient_is_the_clean_gradient_and_ste_detach_agrees(kind):
    plain, x = _layer(kind)
    plain, x = plain.to(DEVICE), x.to(DEVICE)
    g = torch.randn_like(plain(x))
    ref = layer_grads(plain, x, g)
    outs = {}
    for mode in ("ste", "ste_detach"):
        noisy = hf_cim.patch_model(copy.deepcopy(plain), hf_cim.AnalogNoiseConfig(gradient=mode, noise=NOISE))
        outs[mode] = layer_grads(noisy, x, g)
        err = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12) for a, b in zip(outs[mode][1:], ref[1:]))
        assert err < 1e-4, f"{kind} {mode}: gradient differs from the clean one, max rel err {err:.2e}"
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(outs["ste"], outs["ste_detach"]))


@pytest.fixture
def gpt2():
    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).to(DEVICE)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return base, ids


def test_same_seed_gives_bit_identical_noise(gpt2):
    base, ids = gpt2
    a = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(seed=3)).eval()
    b = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(seed=3)).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs are a CUDA notion")
def test_no_host_sync_in_the_analog_forward(gpt2):
    base, ids = gpt2
    model = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(seed=3)).eval()
    with torch.no_grad():
        model(ids)  # first call: generators, compiled kernels, caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_programmed_chip_without_read_noise_is_fixed(gpt2):
    base, ids = gpt2
    noise = [{"name": "gaussian_weight", "std": 0.05}]
    model = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig(noise=noise)).eval()
    hf_cim.program_chip(model, seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_bf16_autocast_training_has_finite_gradients_and_learns(gpt2):
    base, ids = gpt2
    model = hf_cim.patch_model(copy.deepcopy(base), hf_cim.AnalogNoiseConfig()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("rows", [None, 256, 200], ids=str)
def test_half_precision_crossbar_product_on_the_device_is_the_rounded_operands_float32_product(rows):
    # product_precision="autocast": on CUDA cuBLAS's bfloat16 product with float32 output; it must equal the float32
    # product of the same rounded operands up to the accumulation order, which the CPU computes as the reference.
    from hf_cim.tile import _tiled_product

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-127, 128, (64, 600), generator=gen).float()
    w = torch.randn(80, 600, generator=gen) * 0.3
    got = _tiled_product(x.to(DEVICE), w.to(DEVICE), rows, torch.bfloat16).cpu()
    ref = _tiled_product(x, w.to(torch.bfloat16).float(), rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_second_order_products_run_in_bfloat16_only_where_the_device_has_it_natively():
    from hf_cim.noise import base

    if DEVICE.type == "cuda":
        native = torch.version.hip is not None or torch.cuda.get_device_capability(DEVICE)[0] >= 8
    else:
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert base.fast_bfloat16_products(DEVICE) is native
    a = torch.rand(2, 64, 96, device=DEVICE)
    b = torch.rand(2, 96, 40, device=DEVICE)
    assert base.spread_bmm(a, b, "auto").dtype == (torch.bfloat16 if native else torch.float32)
