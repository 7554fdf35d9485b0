import copy

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.layers import NoisyConv1D, NoisyConv2d, NoisyLinear
from hf_cim.rng import derive_seed

NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]


def _gpt2(seed=0, **cfg):
    model = tiny_gpt2().eval()
    return hf_cim.patch_model(model, AnalogNoiseConfig(noise=NOISE, seed=seed, **cfg))


IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def test_same_seed_gives_bit_identical_noise_and_different_seeds_differ():
    a, b, c = _gpt2(1), _gpt2(1), _gpt2(2)
    ya1, ya2 = a(IDS).logits, a(IDS).logits
    yb1, yb2 = b(IDS).logits, b(IDS).logits
    assert torch.equal(ya1, yb1) and torch.equal(ya2, yb2)
    assert not torch.equal(ya1, ya2)  # the stream advances
    assert not torch.allclose(ya1, c(IDS).logits, atol=1e-4)
    hf_cim.reseed(a, 1)
    assert torch.equal(a(IDS).logits, ya1)


def test_global_rng_is_untouched():
    model = _gpt2()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model(IDS)
    assert torch.equal(torch.rand(3), expected)


def test_ranks_get_different_reproducible_streams(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    r0 = _gpt2()(IDS).logits
    monkeypatch.setenv("RANK", "1")
    r1 = _gpt2()(IDS).logits
    r1b = _gpt2()(IDS).logits
    assert torch.equal(r1, r1b)
    assert not torch.allclose(r0, r1, atol=1e-4)
    assert derive_seed(0, "a", 0) != derive_seed(0, "a", 1) != derive_seed(0, "b", 1)


def test_noise_in_eval_false_gives_the_digital_model_in_eval_only():
    ref = tiny_gpt2().eval()(IDS).logits
    model = _gpt2(noise_in_eval=False)
    assert torch.equal(model(IDS).logits, ref)
    model.train()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert not torch.allclose(model(IDS).logits, ref, atol=1e-4)


def test_bf16_autocast_runs_and_matches_fp32_closely():
    model = _gpt2(output_bits=None)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    w = model.transformer.h[0].mlp.c_fc.weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_programmed_chip_is_fixed_across_batches_without_read_noise():
    model = _gpt2()
    hf_cim.unpatch_model(model)
    hf_cim.patch_model(model, AnalogNoiseConfig(noise=[{"name": "gaussian_weight", "std": 0.05}]))
    model.eval()
    hf_cim.program_chip(model, seed=5)
    y1, y2 = model(IDS).logits, model(IDS).logits
    assert torch.equal(y1, y2)
    hf_cim.program_chip(model, seed=5)
    assert torch.equal(model(IDS).logits, y1)
    hf_cim.program_chip(model, seed=6)
    assert not torch.allclose(model(IDS).logits, y1, atol=1e-4)
    hf_cim.clear_chip(model)
    assert not torch.equal(model(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=(3, 1), stride=2, padding=(1, 0), dilation=1),
        dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect"),
        dict(kernel_size=2, padding="valid", bias=False),
    ],
    ids=["pad1", "same", "rect-stride", "reflect-dilated", "valid-nobias"],
)
def test_conv2d_without_converters_equals_plain_conv(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kwargs)
    x = torch.randn(2, 3, 8, 7, requires_grad=True)
    ref = conv(x)
    noisy = copy.deepcopy(conv)
    hf_cim.patch_model(noisy, AnalogNoiseConfig(input_bits=None, weight_bits=None, output_bits=None, noise=[]))
    assert isinstance(noisy, NoisyConv2d)
    out = noisy(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_layer_classes_subclass_what_they_replace():
    from transformers.pytorch_utils import Conv1D

    assert issubclass(NoisyLinear, nn.Linear)
    assert issubclass(NoisyConv1D, Conv1D)
    assert issubclass(NoisyConv2d, nn.Conv2d)


def test_product_precision_float32_keeps_the_float32_product_under_autocast():
    # "autocast" rounds the programmed weights to bfloat16 for the crossbar product; "float32" keeps the product of
    # a float32 model, so under autocast it gives the float32 model's analog output (cast to bfloat16).
    torch.manual_seed(0)
    x = torch.randn(6, 300)
    outs = {}
    for precision in ("autocast", "float32"):
        layer = nn.Linear(300, 40)
        torch.manual_seed(1)
        layer.reset_parameters()
        cfg = AnalogNoiseConfig(product_precision=precision, noise=[], tile_size=128)
        hf_cim.patch_model(layer, cfg)
        with torch.no_grad():
            reference = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs[precision] = layer(x)
        assert outs[precision].dtype == torch.bfloat16
    assert torch.equal(outs["float32"], reference.to(torch.bfloat16))
    assert not torch.equal(outs["autocast"], outs["float32"])
