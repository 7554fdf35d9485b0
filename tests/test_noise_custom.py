"""A user-registered, non-differentiable (numpy) noise model, trained through with patch_model."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2

import hf_cim
from hf_cim.noise import GaussianWeightNoise, NoiseContext, NoiseModel, OutputNoise
from hf_cim.noise.base import _REGISTRY
from hf_cim.tile import TileSpec, analog_matmul, program_weights


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


# -- fusion is a capability a model declares ------------------------------------------------------------------------
@dataclass
class MyOutputNoise(hf_cim.NoiseModel):
    """A user's own output noise (no subclass of the built-ins) that declares itself additive Gaussian."""

    std: float = 0.1
    calls = []  # class-level: the hook runs that happened

    def additive_gaussian(self, hook):
        return self.std if hook == "output" else None

    def output(self, y, x, w, ctx):
        MyOutputNoise.calls.append(y.shape)
        return y + (self.std * ctx.level) * ctx.randn_like(y)


@pytest.fixture
def my_output_noise():
    hf_cim.register_noise_model("my_output_noise", MyOutputNoise)
    MyOutputNoise.calls.clear()
    yield MyOutputNoise
    _REGISTRY.pop("my_output_noise", None)


@pytest.mark.parametrize("gradient", ["ste", "ste_detach", "full"])
def test_a_user_model_declaring_the_capability_takes_the_builtins_path(my_output_noise, gradient):
    """Same capability, same path, same numbers: a patched GPT-2 with the user's model gives the built-in
    OutputNoise's loss and gradients bit for bit; in the ste modes its hook never runs (the noise is drawn inside the
    fused ADC epilogue), in ``full`` it runs (autograd through it), as the built-in's does."""
    ids = torch.arange(2 * 16).reshape(2, 16) % 97
    results = []
    for noise in ([GaussianWeightNoise(0.03), OutputNoise(0.1)], [GaussianWeightNoise(0.03), my_output_noise(0.1)]):
        model = hf_cim.patch_model(tiny_gpt2(), hf_cim.AnalogNoiseConfig(noise=noise, gradient=gradient, seed=4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    if gradient == "full":
        assert my_output_noise.calls
    else:
        assert my_output_noise.calls == []


@pytest.mark.parametrize("hook", ["program", "output"])
def test_the_capability_alone_decides_the_fused_path(hook):
    """On the tile itself: a model that declares the capability for ``hook`` is fused (its hook not run) and equals
    the built-in bit for bit; under autograd (``full``) the hook runs."""
    calls = []

    class Mine(NoiseModel):  # the hooks the tile calls, nothing else
        name = "mine"

        def __init__(self, std):
            object.__setattr__(self, "std", std)

        def additive_gaussian(self, h):
            return self.std if h == hook else None

    def program(self, w, ctx):
        calls.append("program")
        return w + (self.std * ctx.level) * ctx.randn_like(w)

    def output(self, y, x, w, ctx):
        calls.append("output")
        return y + (self.std * ctx.level) * ctx.randn_like(y)

    setattr(Mine, hook, program if hook == "program" else output)
    builtin = GaussianWeightNoise(0.05) if hook == "program" else OutputNoise(0.1)
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(21, 100, generator=gen), torch.randn(30, 100, generator=gen), torch.randn(30, generator=gen)
    spec = TileSpec.from_config(hf_cim.AnalogNoiseConfig(tile_size=48))
    outs = []
    for models in ([builtin], [Mine(builtin.std)]):
        ctx = NoiseContext(generator=torch.Generator().manual_seed(9), level=1.5)
        with torch.no_grad():
            w_prog, scale = program_weights(w, spec, ctx, models)
            outs.append(analog_matmul(x, w_prog, scale, b, spec, ctx, models))
    assert calls == []
    assert torch.equal(outs[0], outs[1])
    ctx = NoiseContext(generator=torch.Generator().manual_seed(9), level=1.5)
    w_prog, scale = program_weights(w.clone().requires_grad_(), spec, ctx, [Mine(builtin.std)], differentiable=True)
    analog_matmul(x, w_prog, scale, b, spec, ctx, [Mine(builtin.std)], differentiable=True)
    assert calls == [hook]


def test_a_subclass_that_changes_the_hook_loses_the_builtin_capability():
    class Scaled(GaussianWeightNoise):
        def program(self, w, ctx):
            return super().program(w, ctx) * 0.5

    class Louder(OutputNoise):
        def output(self, y, x, w, ctx):
            return super().output(y, x, w, ctx) * 2.0

    assert GaussianWeightNoise(0.1).additive_gaussian("program") == 0.1
    assert GaussianWeightNoise(0.1, per_channel=False).additive_gaussian("program") is None
    assert OutputNoise(0.2).additive_gaussian("output") == 0.2
    assert NoiseModel().additive_gaussian("output") is None
    assert Scaled(0.1).additive_gaussian("program") is None
    assert Louder(0.1).additive_gaussian("output") is None
