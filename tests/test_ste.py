import copy

import pytest
import torch
from helpers import layer_grads
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_cim
from hf_cim import AnalogNoiseConfig

NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(40, 24), torch.randn(3, 5, 40)
    if kind == "conv1d":
        return Conv1D(24, 40), torch.randn(3, 5, 40)
    return nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)


KINDS = ["linear", "conv1d", "conv2d"]


@pytest.mark.parametrize("mode", ["ste", "ste_detach"])
@pytest.mark.parametrize("kind", KINDS)
def test_ste_gradients_equal_the_clean_layer(kind, mode):
    plain, x = _layer(kind)
    noisy = copy.deepcopy(plain)
    hf_cim.patch_model(noisy, AnalogNoiseConfig(gradient=mode, noise=NOISE, tile_size=16))
    g = torch.randn_like(plain(x))
    y_plain, gx, gw, gb = layer_grads(plain, x, g)
    y_noisy, nx, nw, nb = layer_grads(noisy, x, g)
    assert not torch.allclose(y_noisy, y_plain, atol=1e-3)  # the forward really is noisy
    torch.testing.assert_close(nx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nw, gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nb, gb, rtol=1e-5, atol=1e-6)


def test_linear_gradient_formula():
    layer, x = _layer("linear")
    hf_cim.patch_model(layer, AnalogNoiseConfig(noise=NOISE))
    g = torch.randn(3, 5, 24)
    _, gx, gw, gb = layer_grads(layer, x, g)
    torch.testing.assert_close(gx, g @ layer.weight.detach())
    torch.testing.assert_close(gw, g.reshape(-1, 24).T @ x.reshape(-1, 40), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, g.sum((0, 1)))


@pytest.mark.parametrize("kind", KINDS)
def test_ste_and_ste_detach_agree_for_the_same_seed(kind):
    base, x = _layer(kind)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    hf_cim.patch_model(a, AnalogNoiseConfig(gradient="ste", noise=NOISE, seed=7))
    hf_cim.patch_model(b, AnalogNoiseConfig(gradient="ste_detach", noise=NOISE, seed=7))
    g = torch.randn_like(base(x))
    for _ in range(2):  # the noise streams advance identically
        ya, *ga = layer_grads(a, x, g)
        yb, *gb = layer_grads(b, x, g)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("kind", KINDS)
def test_full_gradient_differs_but_is_aligned(kind):
    base, x = _layer(kind)
    ste, full = copy.deepcopy(base), copy.deepcopy(base)
    hf_cim.patch_model(ste, AnalogNoiseConfig(gradient="ste", noise=NOISE, seed=3))
    hf_cim.patch_model(full, AnalogNoiseConfig(gradient="full", noise=NOISE, seed=3))
    g = torch.randn_like(base(x))
    ys, _, ws, _ = layer_grads(ste, x, g)
    yf, _, wf, _ = layer_grads(full, x, g)
    torch.testing.assert_close(ys, yf, rtol=1e-4, atol=1e-4)  # same noise, same forward
    assert not torch.allclose(ws, wf, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(ws.flatten(), wf.flatten(), dim=0)
    assert 0.8 < cos < 1.0


def test_ste_saves_only_x_and_w():
    layer, x = _layer("linear")
    hf_cim.patch_model(layer, AnalogNoiseConfig(noise=NOISE))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_())
    assert len(saved) == 2
    assert {tuple(t.shape) for t in saved} == {tuple(x.shape), tuple(layer.weight.shape)}


def test_no_graph_is_built_through_the_noise_in_ste_mode():
    layer, x = _layer("linear")
    hf_cim.patch_model(layer, AnalogNoiseConfig(noise=NOISE))
    y = layer(x.requires_grad_())
    assert type(y.grad_fn).__name__ == "AnalogSTEFunctionBackward"
    assert all(fn is None or type(fn).__name__ in {"AccumulateGrad"} for fn, _ in y.grad_fn.next_functions)


@pytest.mark.parametrize("kind", KINDS)
def test_ste_under_autocast_saves_the_compute_dtype_input_and_gives_the_plain_autocast_gradients(kind):
    # The plain layer under autocast keeps its input in bfloat16 for the backward; ste keeps the same (not the
    # float32 input: a third more activation memory on GPT-2 small) and its gradients are the plain layer's.
    plain, x = _layer(kind)
    noisy = copy.deepcopy(plain)
    hf_cim.patch_model(noisy, AnalogNoiseConfig(noise=NOISE, tile_size=16))
    g = torch.randn_like(plain(x))
    grads = []
    for layer in (plain, noisy):
        saved = []
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t):
                y = layer(xr)
        (y.float() * g).sum().backward()
        grads.append((xr.grad, layer.weight.grad))
        assert any(t.dtype == torch.bfloat16 and t.numel() == x.numel() for t in saved)
        assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)
    (px, pw), (nx, nw) = grads
    assert nx.dtype == torch.float32 and nw.dtype == torch.float32
    assert torch.equal(nx, px) and torch.equal(nw, pw)  # the same bfloat16 products, bit for bit


def test_masked_gradient_passes_the_gradient_where_the_mask_does_and_exact_zeros_elsewhere():
    # The STE's saturation mask: g where the ADC passed, 0 where it clipped, also where g is not finite (a product
    # with the mask would give NaN there); the out= buffer gets the same numbers; the dtype is g's.
    from hf_cim.ste import masked_gradient

    g = torch.tensor([[1.5, -2.0, float("inf"), float("nan")], [-0.0, 3.0, -4.0, 5.0]])
    mask = torch.tensor([[True, False, False, False], [True, True, False, True]])
    expected = torch.tensor([[1.5, 0.0, 0.0, 0.0], [-0.0, 3.0, 0.0, 5.0]])
    assert torch.equal(masked_gradient(g, mask), expected)
    out = torch.full_like(g, 7.0)
    assert masked_gradient(g, mask, out=out) is out and torch.equal(out, expected)
    assert masked_gradient(g.bfloat16(), mask).dtype == torch.bfloat16
