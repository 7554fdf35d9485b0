"""Stuck-at faults: the fractions of each outcome of a differential pair."""

import pytest
import torch

from hf_cim.noise import NoiseContext, StuckAtFaults

N = 400_000


def ctx(seed=0, level=1.0):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level)


@pytest.mark.parametrize("level", [1.0, 2.0])
def test_outcome_fractions(level):
    p_off, p_on = 0.05 * level, 0.02 * level
    out = StuckAtFaults(p_off=0.05, p_on=0.02).program(torch.full((N,), 0.5), ctx(level=level))
    fine = 1 - p_off - p_on
    expected = {  # g⁺ (target 0.5) fine / off / on; g⁻ (target 0) at 0 unless stuck on
        0.5: fine * (1 - p_on),
        -0.5: fine * p_on,
        0.0: p_off * (1 - p_on) + p_on * p_on,
        1.0: p_on * (1 - p_on),
        -1.0: p_off * p_on,
    }
    for value, p in expected.items():
        frac = (out == value).float().mean().item()
        tol = 4 * (p * (1 - p) / N) ** 0.5 + 1e-6
        assert abs(frac - p) < tol, (value, frac, p)
    assert sum((out == v).sum().item() for v in expected) == N


def test_zero_probabilities_change_nothing_and_sum_is_validated():
    w = torch.linspace(-1, 1, 101)
    assert torch.equal(StuckAtFaults(p_off=0.0, p_on=0.0).program(w, ctx()), w)
    with pytest.raises(ValueError, match="`p_off` \\+ `p_on` must be <= 1"):
        StuckAtFaults(p_off=0.6, p_on=0.5)
    with pytest.raises(ValueError, match="`p_on` must be in"):
        StuckAtFaults(p_on=1.5)


@pytest.mark.parametrize("level", [1.0, 3.0, 1000.0], ids=["L1", "L3", "saturated"])
@pytest.mark.parametrize("impl", ["native", "eager"])
def test_fused_pass_equals_the_torch_formula_bit_for_bit(impl, level):
    """Without autograd the faults are one pass of the backend (the C kernel on the CPU): the same devices stuck, the
    same numbers as the differentiable formula from the same generator state, uniforms on the thresholds included."""
    from hf_cim import kernels, native

    if impl == "native" and not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(3)
    w = (torch.rand(257, 129, generator=gen) * 2 - 1).clamp(-1, 1)
    w[0, :8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30])
    model = StuckAtFaults(p_off=0.01, p_on=0.002)
    kernels.set_native(impl == "native")
    try:
        c = ctx(seed=5, level=level)
        c.sampler = kernels.SAMPLER
        with torch.no_grad():
            fast = model.program(w, c)
    finally:
        kernels.set_native(None)
    ref = model.program(w.clone().requires_grad_(True), ctx(seed=5, level=level)).detach()
    assert torch.equal(fast, ref)
    stuck = fast != w
    assert 0.0 < stuck.float().mean() < 1.0 if level < 1000.0 else stuck.float().mean() > 0.5


def test_fused_pass_keeps_the_gradient_path_and_the_stream():
    # Under autograd the formula runs (gradient 1 through working devices, 0 through stuck ones); either way one
    # uniform per device is drawn, so the layer's stream is where it was before the pass existed.
    w = torch.linspace(-1, 1, 1001).requires_grad_(True)
    c = ctx(seed=2)
    out = StuckAtFaults(p_off=0.2, p_on=0.1).program(w, c)
    out.sum().backward()
    assert set(torch.unique(w.grad).tolist()) <= {0.0, 1.0} and 0.0 < w.grad.mean().item() < 1.0
    expected = torch.Generator().manual_seed(2)
    torch.rand(2, 1001, generator=expected)
    assert torch.equal(c.generator.get_state(), expected.get_state())


@pytest.mark.parametrize("impl", ["native", "eager"])
def test_the_derivative_is_the_one_autograd_takes_through_the_formula(impl):
    # program_derivative: the same stuck devices as program, and ∂out/∂w = 1 per device that carries w and is not
    # stuck (2 at w = 0 where neither is, as autograd takes it through the pair's clamps), bit for bit.
    from hf_cim import kernels, native

    if impl == "native" and not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(257, 129, generator=gen) * 2 - 1
    w[0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    w[1] = 0.0
    model = StuckAtFaults(p_off=0.1, p_on=0.05)
    kernels.set_native(impl == "native")
    try:
        c = ctx(seed=5, level=1.0)
        c.sampler = kernels.SAMPLER
        with torch.no_grad():
            out, d = model.program_derivative(w, c)
    finally:
        kernels.set_native(None)
    leaf = w.clone().requires_grad_()
    formula = model.program(leaf, ctx(seed=5, level=1.0))
    (grad,) = torch.autograd.grad(formula, leaf, torch.ones_like(w))
    assert torch.equal(out, formula.detach())
    assert torch.equal(d, grad)
    assert set(torch.unique(d).tolist()) == {0.0, 1.0, 2.0}
    assert model.elementwise_derivative("program", c) and not model.elementwise_derivative("output", c)
    assert model.program_derivative(w, ctx(seed=5, level=0.0)) == (w, 1.0)
