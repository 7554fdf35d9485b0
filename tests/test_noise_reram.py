"""ReRAM programming noise against Wan et al. 2022's polynomial."""

import math

import pytest
import torch

from hf_cim.noise import NoiseContext, ReRAMNoise
from hf_cim.noise.reram import reram_programming_std

N = 200_000


def ctx(seed=0, level=1.0):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level)


def test_polynomial_values_in_microsiemens():
    g = torch.tensor([0.0, 0.5, 1.0])
    expected_us = torch.tensor([0.348, 0.348 + 8.015 - 10.96325 + 5.674125 - 1.0509375, 1.103])
    torch.testing.assert_close(reram_programming_std(g) * 40.0, expected_us)


@pytest.mark.parametrize("g_hat", [0.5, 1.0])
@pytest.mark.parametrize("level", [1.0, 2.0])
def test_programming_std_within_5_percent(g_hat, level):
    out = ReRAMNoise().program(torch.full((N,), g_hat), ctx(seed=2, level=level))
    sigma0 = level * 0.348 / 40.0  # the unused device targets 0 and is clipped there
    clipped_var = sigma0**2 * (0.5 - 1.0 / (2.0 * math.pi))
    estimate = math.sqrt(out.var().item() - clipped_var)
    assert estimate == pytest.approx(level * reram_programming_std(torch.tensor(g_hat)).item(), rel=0.05)


def test_larger_g_max_means_relatively_less_noise_and_clip_max_bounds():
    a = ReRAMNoise(g_max=40.0).program(torch.full((N,), 0.5), ctx())
    b = ReRAMNoise(g_max=80.0).program(torch.full((N,), 0.5), ctx())
    assert b.std().item() == pytest.approx(a.std().item() / 2, rel=0.02)
    c = ReRAMNoise(scale=20.0, clip_max=1.0).program(torch.full((N,), 1.0), ctx())
    assert c.max().item() <= 1.0


def test_invalid_fields():
    with pytest.raises(ValueError, match="`clip_max`"):
        ReRAMNoise(clip_max=0.5)
    with pytest.raises(ValueError, match="`coeff`"):
        ReRAMNoise(coeff=())


@pytest.mark.parametrize("clip_max", [None, 1.2], ids=["no-clip", "clip"])
def test_the_one_pass_kernel_computes_the_formula_bit_for_bit(clip_max):
    # Without autograd the hook runs the backend's fused stage (the C kernel on the CPU); with autograd, the torch
    # formula. The same key, the same draws, the same float32 operations: the same weights, and the generator left
    # at the same place (the next draw agrees too).
    from hf_cim import kernels

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=gen)
    w = w / w.abs().amax(1, keepdim=True)
    model = ReRAMNoise(clip_max=clip_max, scale=2.0)
    outs, after = [], []
    for grad in (False, True):
        c = NoiseContext(generator=torch.Generator().manual_seed(5), level=1.5, sampler=kernels.SAMPLER)
        with torch.set_grad_enabled(grad):
            outs.append(model.program(w.clone().requires_grad_(grad), c).detach())
        after.append(c.randn_like(w))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(after[0], after[1])
    assert not torch.equal(outs[0], w)
    if clip_max is not None:
        assert outs[0].max() <= clip_max and outs[0].min() >= -clip_max


def test_the_reference_sampler_takes_the_same_key():
    # No backend (the torch reference sampler): the fused stage's reference draws with the key the hook took.
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(40, 50, generator=gen) * 2 - 1
    model = ReRAMNoise()
    with torch.no_grad():
        fused = model.program(w, ctx(seed=4))
    formula = model.program(w.clone().requires_grad_(), ctx(seed=4)).detach()
    assert torch.equal(fused, formula)


@pytest.mark.parametrize("clip_max", [None, 1.2], ids=["no-clip", "clip"])
@pytest.mark.parametrize("impl", ["native", "eager"])
def test_the_derivative_is_the_one_autograd_takes_through_the_formula(impl, clip_max):
    # program_derivative (program_gradient's element-wise chain): the programmed weights of program's own pass, and
    # ∂out/∂w written beside them, against autograd through the torch formula on the same draws: every branch of it
    # (devices clamped at 0 and at clip_max, targets at and above 1 where σ's polynomial is held, w = 0 where both
    # devices carry the gradient).
    from hf_cim import kernels, native

    if impl == "native" and not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(64, 301, generator=gen) * 2.4 - 1.2
    w[0, :6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.1, -1.1])
    model = ReRAMNoise(clip_max=clip_max, scale=40.0)  # large noise: the clamps bite often
    cot = torch.randn(64, 301, generator=gen)

    def c():
        return NoiseContext(generator=torch.Generator().manual_seed(5), level=1.5, sampler=kernels.SAMPLER)

    kernels.set_native(impl == "native")
    try:
        with torch.no_grad():
            out, d = model.program_derivative(w, c())
            plain = model.program(w, c())
        leaf = w.clone().requires_grad_()
        formula = model.program(leaf, c())  # the draws from the same backend
        (grad,) = torch.autograd.grad(formula, leaf, cot)
    finally:
        kernels.set_native(None)
    assert torch.equal(out, plain) and torch.equal(out, formula.detach())
    # Products in another order than autograd's (the C pass sums Horner's derivative its own way; cot·d against a
    # product with cot inside): a few float32 ulp of the terms of 1 + z·s·σ'(g), which cancel where the noise is
    # this large.
    torch.testing.assert_close(cot * d, grad, rtol=1e-5, atol=1e-5)
    assert (d == 0).float().mean() > 0.05 and (d > 1.5).any()  # clamped devices and the w = 0 sum were reached
    assert model.elementwise_derivative("program", c()) and not model.elementwise_derivative("output", c())
    assert model.program_derivative(w, ctx(level=0.0)) == (w, 1.0)
