"""A user-registered, non-differentiable (numpy) noise model, trained through with patch_model."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2

import hf_cim
from hf_cim.noise.base import _REGISTRY


@dataclass
class NumpyQuantizedRead(hf_cim.NoiseModel):
    """Weights snapped to ``levels`` conductance levels with numpy, plus numpy Gaussian read noise."""

    differentiable = False
    levels: int = 16
    std: float = 0.02

    def read(self, w, ctx):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        rng = np.random.default_rng(seed)
        a = w.detach().cpu().numpy()
        snapped = np.round(a * (self.levels - 1)) / (self.levels - 1)
        noisy = snapped + ctx.level * self.std * rng.standard_normal(a.shape).astype(a.dtype)
        return torch.from_numpy(noisy).to(w.device)


@pytest.fixture
def numpy_model():
    hf_cim.register_noise_model("numpy_quantized_read", NumpyQuantizedRead)
    yield NumpyQuantizedRead
    _REGISTRY.pop("numpy_quantized_read", None)


@pytest.mark.parametrize("gradient", ["ste", "ste_detach", "full"])
def test_training_through_a_numpy_model(numpy_model, gradient):
    model = tiny_gpt2()
    cfg = hf_cim.AnalogNoiseConfig(noise=[{"name": "numpy_quantized_read", "levels": 8}], gradient=gradient, seed=0)
    assert isinstance(cfg.noise[0], numpy_model)
    hf_cim.patch_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (4, 32), generator=gen)  # a small alphabet: learnable in a few steps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    w0 = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = model.transformer.h[0].mlp.c_fc.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, w0)


def test_numpy_model_round_trips_and_is_seeded(numpy_model):
    cfg = hf_cim.AnalogNoiseConfig(noise=[NumpyQuantizedRead(levels=4)])
    assert hf_cim.AnalogNoiseConfig.from_dict(cfg.to_dict()) == cfg
    outs = []
    for _ in range(2):
        model = hf_cim.patch_model(tiny_gpt2(), cfg)
        with torch.no_grad():
            outs.append(model(input_ids=torch.arange(16).reshape(1, 16)).logits)
    assert torch.equal(outs[0], outs[1])
