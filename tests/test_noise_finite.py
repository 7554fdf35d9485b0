"""A finite input never gives a NaN output: every config value inside its documented range keeps the product finite."""

import pytest
import torch
from torch import nn

import hf_cim
from hf_cim import AnalogNoiseConfig

EXTREMES = {
    "lognormal-top": dict(noise=[{"name": "lognormal", "std": 5.0}], level=100.0),
    "lognormal-mean-corrected-top": dict(
        noise=[{"name": "lognormal", "std": 5.0, "mean_corrected": True}], level=100.0
    ),
    "out_bound-top": dict(out_bound=1e6, output_bits=2),
    "out_bound-top-24-bits": dict(out_bound=1e6, output_bits=24),
    "out_bound-bottom": dict(out_bound=1e-3, output_bits=24),
    "gaussian-top": dict(
        noise=[{"name": "gaussian_weight", "std": 10.0}, {"name": "output_noise", "std": 100.0}], level=100.0
    ),
    "read-noise-top": dict(noise=[{"name": "read_noise", "std": 10.0}], level=100.0),
    "paper-level-100": dict(noise="paper", level=100.0),
    "pcm-level-100": dict(noise="pcm", level=100.0),
}


@pytest.mark.parametrize("gradient", ["ste", "full"])
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_in_range_values_give_finite_outputs(name, gradient):
    layer = nn.Linear(40, 8)
    with torch.no_grad():
        layer.weight[0] = 0.0  # a zero channel: 0·inf was the NaN
    model = hf_cim.patch_model(
        nn.Sequential(layer), AnalogNoiseConfig(gradient=gradient, tile_size=16, **EXTREMES[name])
    )
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0  # a zero token
    x[1] *= 1e-30
    x[2] *= 1e6
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
    y = model(x.requires_grad_())
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
