"""Edge inputs of the noisy layers, handled as the plain layers handle them: unbatched ``Conv2d`` input, ``meta``."""

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_cim
from hf_cim import AnalogNoiseConfig

NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]
CONVS = {
    "zeros": dict(padding=1),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "same": dict(padding="same"),
    "strided": dict(stride=2, dilation=2),
}


def _conv(seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, **kw))


GRADIENTS = {
    "ste": dict(gradient="ste"),
    "ste_detach": dict(gradient="ste_detach"),
    "full": dict(gradient="full"),
    "ste-levers": dict(gradient="ste", mask_saturated=True, backward_weights="programmed", out_bound=0.5),
    "ste_detach-levers": dict(
        gradient="ste_detach", mask_saturated=True, backward_weights="programmed", out_bound=0.5
    ),
}


@pytest.mark.parametrize("gradient", list(GRADIENTS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_unbatched_conv2d_equals_a_batch_of_one(conv, gradient):
    # nn.Conv2d takes (C, H, W) as one image; the noisy layer computes exactly the batch-of-one product.
    cfg = AnalogNoiseConfig(noise=NOISE, seed=3, tile_size=16, **GRADIENTS[gradient])
    a = hf_cim.patch_model(_conv(**CONVS[conv]), cfg)
    b = hf_cim.patch_model(_conv(**CONVS[conv]), cfg.replace())
    x = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(1))
    xa = x.clone().requires_grad_()
    xb = x.clone().unsqueeze(0).requires_grad_()
    ya, yb = a(xa), b(xb)
    assert ya.shape == nn.Conv2d(3, 4, 3, **CONVS[conv])(x).shape == yb.shape[1:]
    torch.testing.assert_close(ya, yb.squeeze(0), rtol=0, atol=1e-6)
    g = torch.randn_like(ya, generator=torch.Generator().manual_seed(2))
    ya.backward(g)
    yb.backward(g.unsqueeze(0))
    assert xa.grad.shape == x.shape
    torch.testing.assert_close(xa.grad, xb.grad.squeeze(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0].weight.grad, b[0].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0].bias.grad, b[0].bias.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), hf_cim.noise_disabled(a):
        torch.testing.assert_close(a(x), nn.Conv2d.forward(a[0], x))


@pytest.mark.parametrize("shape", [(9, 9), (1, 1, 3, 9, 9)], ids=["2d", "5d"])
def test_conv2d_input_of_the_wrong_rank_fails_as_nn_conv2d_does(shape):
    x = torch.randn(*shape)
    with pytest.raises(RuntimeError, match=r"Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d"):
        _conv()(x)
    model = hf_cim.patch_model(_conv(), AnalogNoiseConfig())
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"Expected 3D \(unbatched\) or 4D"):
            model(x)


META = {
    "linear": (lambda: nn.Linear(16, 8), (2, 5, 16)),
    "conv1d": (lambda: Conv1D(8, 16), (2, 5, 16)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 8)),
    "conv2d-unbatched": (lambda: nn.Conv2d(3, 4, 3), (3, 8, 8)),
}


@pytest.mark.parametrize("gradient", ["ste", "ste_detach", "full"])
@pytest.mark.parametrize("layer", list(META))
def test_meta_forward_gives_the_plain_layers_shape(layer, gradient):
    build, shape = META[layer]
    with torch.device("meta"):
        plain = build()
        patched = nn.Sequential(build())
    hf_cim.patch_model(patched, AnalogNoiseConfig(gradient=gradient, noise=NOISE))
    x = torch.empty(*shape, device="meta")
    expected = plain(x)
    for training in (True, False):
        patched.train(training)
        y = patched(x)
        assert y.is_meta and y.shape == expected.shape and y.dtype == expected.dtype
        with torch.no_grad():
            assert patched(x).shape == expected.shape
    y = patched(x.requires_grad_())
    y.sum().backward()  # autograd on meta works for the plain layer; so it does here
    assert x.grad.shape == x.shape and x.grad.is_meta


def test_gpt2_built_on_meta_runs_a_forward_after_patching():
    with torch.device("meta"):
        model = tiny_gpt2()
    hf_cim.patch_model(model, AnalogNoiseConfig())
    out = model(torch.zeros(2, 7, dtype=torch.long, device="meta")).logits
    assert out.is_meta and out.shape == (2, 7, 97)
