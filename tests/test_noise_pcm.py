"""PCM statistics against Nandakumar et al. 2019's formulas (programming σ, drift, 1/f read noise)."""

import math

import pytest
import torch

from hf_cim.noise import NoiseContext, PCMNoise
from hf_cim.noise.pcm import pcm_drift_exponent_stats, pcm_programming_std, pcm_read_std

N = 200_000
# The unused device of a differential pair targets 0 and is clipped at 0: max(0, σ0·ξ) has variance σ0²(1/2 − 1/2π).
SIGMA0 = 0.26348 / 25.0
CLIPPED_VAR = SIGMA0**2 * (0.5 - 1.0 / (2.0 * math.pi))


def ctx(seed=0, level=1.0, t=0.0):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level, t_inference=t)


def test_programming_std_polynomial_values():
    g = torch.tensor([0.0, 0.5, 1.0])
    # (0.26348 + 1.9650 ĝ − 1.1731 ĝ²) µS at g_max = 25 µS.
    expected = torch.tensor([0.26348, 0.26348 + 0.9825 - 0.293275, 1.05538]) / 25.0
    torch.testing.assert_close(pcm_programming_std(g), expected)


@pytest.mark.parametrize("g_hat", [0.0, 0.5, 1.0])
def test_programming_noise_std_within_5_percent(g_hat):
    model = PCMNoise(drift=False)
    w = torch.full((N,), g_hat)
    out = model.program(w, ctx(seed=1))
    target = pcm_programming_std(torch.tensor(g_hat)).item()
    if g_hat == 0.0:
        # Both devices target 0: w' = max(0, σ0ξ1) − max(0, σ0ξ2), E[w'²] = σ0²(1 − 1/π).
        estimate = math.sqrt((out**2).mean().item() / (1.0 - 1.0 / math.pi))
    else:
        estimate = math.sqrt(out.var().item() - CLIPPED_VAR)
    assert estimate == pytest.approx(target, rel=0.05)
    if g_hat > 0:
        # The drawn mean is the target minus the unused device's mean σ0/sqrt(2π).
        assert out.mean().item() == pytest.approx(g_hat - SIGMA0 / math.sqrt(2 * math.pi), abs=3e-4)


def _expected_drift_moments(g_hat: float, t: float, t0: float = 20.0):
    mu, sig = pcm_drift_exponent_stats(torch.tensor(g_hat, dtype=torch.float64))
    xi = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * xi**2) / math.sqrt(2 * math.pi)
    dx = (xi[1] - xi[0]).item()
    nu = (mu + sig * xi).clamp(min=0)
    factor = torch.exp(-nu * math.log((t + t0) / t0))
    m1 = (factor * pdf).sum().item() * dx
    m2 = (factor**2 * pdf).sum().item() * dx
    return m1, math.sqrt(m2 - m1**2)


@pytest.mark.parametrize("g_hat", [0.1, 0.5, 1.0])
def test_mean_drift_factor_at_one_day(g_hat):
    day = 86400.0
    model = PCMNoise(prog_noise_scale=0.0, read_noise_scale=0.0, drift_compensation=False)
    out = model.program(torch.full((N,), g_hat), ctx(seed=2, t=day))
    factor = out / g_hat
    mean, std = _expected_drift_moments(g_hat, day)
    assert factor.mean().item() == pytest.approx(mean, rel=0.002)
    assert factor.std().item() == pytest.approx(std, rel=0.05)
    assert mean < 0.7  # a real drift: (86420/20)^-0.049 at best


def test_drift_exponent_stats_documented_values():
    mu, sig = pcm_drift_exponent_stats(torch.tensor([1.0, 0.01]))
    torch.testing.assert_close(mu, torch.tensor([0.049, -0.0155 * math.log(0.01) + 0.0244]))
    torch.testing.assert_close(sig, torch.tensor([0.008, 0.045]))


def test_same_chip_seed_gives_same_exponents_at_every_time():
    model = PCMNoise(prog_noise_scale=0.0, drift_compensation=False)
    w = torch.full((1000,), 0.3)
    logs = []
    for t in (3600.0, 86400.0 * 30):
        out = model.program(w, ctx(seed=5, t=t))
        logs.append(-torch.log(out / 0.3) / math.log((t + 20.0) / 20.0))  # = ν per device
    torch.testing.assert_close(logs[0], logs[1], rtol=1e-4, atol=1e-6)
    # Other generators draws are not shifted by t: the stream after program() is the same at every t.
    g1, g2 = ctx(seed=5, t=0.0), ctx(seed=5, t=1e6)
    model.program(w, g1), model.program(w, g2)
    assert torch.equal(torch.randn(5, generator=g1.generator), torch.randn(5, generator=g2.generator))


def test_global_drift_compensation_restores_the_probe_read():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(64, 256, generator=gen) * 2 - 1
    year = 365 * 86400.0
    comp = PCMNoise(prog_noise_scale=0.0).program(w, ctx(seed=7, t=year))
    raw = PCMNoise(prog_noise_scale=0.0, drift_compensation=False).program(w, ctx(seed=7, t=year))
    r0 = w.sum(1).abs().mean()
    assert raw.sum(1).abs().mean() / r0 < 0.6
    assert (comp.sum(1).abs().mean() / r0).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("g_hat, t", [(1.0, 0.0), (0.25, 3600.0)])
def test_read_noise_accumulated_1_over_f(g_hat, t):
    out = PCMNoise().read(torch.full((N,), g_hat), ctx(seed=3, t=t))
    q_s = min(0.0088 / g_hat**0.65, 0.2)
    expected = q_s * math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
    assert pcm_read_std(torch.tensor(g_hat), t + 20.0).item() == pytest.approx(expected, rel=1e-6)
    assert (out / g_hat).std().item() == pytest.approx(expected, rel=0.02)
    assert (out / g_hat).mean().item() == pytest.approx(1.0, abs=1e-3)
    if t == 0.0:
        assert expected == pytest.approx(0.0368, abs=5e-4)  # "about 3.7 % at t = 20 s, ĝ = 1"


def test_level_zero_draws_nothing_and_level_scales_programming_noise():
    w = torch.full((N,), 1.0)
    a = PCMNoise(drift=False).program(w, ctx(level=2.0))
    sigma = pcm_programming_std(torch.tensor(1.0)).item()
    assert math.sqrt(a.var().item() - 4 * CLIPPED_VAR) == pytest.approx(2 * sigma, rel=0.05)


def test_invalid_fields():
    with pytest.raises(ValueError, match="`g_max`"):
        PCMNoise(g_max=0.0)
    with pytest.raises(ValueError, match="`t0`"):
        PCMNoise(t0=-1.0)
    with pytest.raises(TypeError, match="`drift_compensation`"):
        PCMNoise(drift_compensation="yes")


@pytest.mark.parametrize("impl", ["native", "eager"])
def test_the_fresh_programming_pass_and_its_derivative_are_the_formulas(impl):
    # Without drift to apply, program runs the programming step in the backend's one pass (the C kernel on the CPU)
    # and program_derivative writes ∂out/∂w beside it: the formula's numbers on the same draws, bit for bit, the
    # generator left where the formula leaves it (ξ_ν's key taken), and autograd's gradient through the formula.
    from hf_cim import kernels, native

    if impl == "native" and not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(64, 301, generator=gen) * 2 - 1
    w[0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    cot = torch.randn(64, 301, generator=gen)
    model = PCMNoise(prog_noise_scale=20.0)  # large noise: devices clamped at 0 often

    def c():
        return NoiseContext(generator=torch.Generator().manual_seed(5), level=1.5, sampler=kernels.SAMPLER)

    kernels.set_native(impl == "native")
    try:
        with torch.no_grad():
            fused = model.program(w, c1 := c())
            out, d = model.program_derivative(w, c2 := c())
        leaf = w.clone().requires_grad_()
        formula = model.program(leaf, c3 := c())
        (grad,) = torch.autograd.grad(formula, leaf, cot)
    finally:
        kernels.set_native(None)
    assert torch.equal(fused, formula.detach()) and torch.equal(out, fused)
    after = [torch.randn(3, generator=x.generator) for x in (c1, c2, c3)]
    assert torch.equal(after[0], after[2]) and torch.equal(after[1], after[2])
    torch.testing.assert_close(cot * d, grad, rtol=1e-5, atol=1e-5)  # products in another order than autograd's
    assert (d == 0).float().mean() > 0.05 and (d > 1.5).any()  # clamped devices and the w = 0 sum were reached


def test_the_derivative_of_drift_without_compensation_is_autograds():
    # Drifted and not compensated, the programming is still element-wise: autograd's derivative of the formula.
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(30, 40, generator=gen) * 2 - 1
    cot = torch.randn(30, 40, generator=gen)
    model = PCMNoise(drift_compensation=False)
    with torch.no_grad():
        out, d = model.program_derivative(w, ctx(seed=3, t=86400.0))
    leaf = w.clone().requires_grad_()
    formula = model.program(leaf, ctx(seed=3, t=86400.0))
    (grad,) = torch.autograd.grad(formula, leaf, cot)
    assert torch.equal(out, formula.detach())
    torch.testing.assert_close(cot * d, grad, rtol=1e-6, atol=1e-7)
    assert model.elementwise_derivative("program", ctx(t=86400.0))
    assert not PCMNoise().elementwise_derivative("program", ctx(t=86400.0))  # compensated: a mean over the matrix
    assert PCMNoise().elementwise_derivative("program", ctx(t=0.0))


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("t", [0.0, 86400.0 * 365])
def test_the_read_pass_is_the_formula(impl, t):
    # Without autograd the read noise is one pass of the backend (the C kernel on the CPU): the formula's draws and
    # numbers (the C pass's own power against torch's pow: within an ulp or two of the spread), the generator left
    # where the formula leaves it; factors clamped at 0 for tiny weights included.
    from hf_cim import kernels, native

    if impl == "native" and not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(4)
    w = torch.rand(64, 301, generator=gen) * 2 - 1
    w[0, :8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-9, float("inf"), float("-inf"), float("nan")])
    w[1, :3] = torch.tensor([1e-40, 3e38, 2.0**-126])  # a subnormal, the top of the range, the smallest normal
    model = PCMNoise(read_noise_scale=5.0)

    def c():
        return NoiseContext(
            generator=torch.Generator().manual_seed(6), level=2.0, t_inference=t, sampler=kernels.SAMPLER
        )

    kernels.set_native(impl == "native")
    try:
        with torch.no_grad():
            fused = model.read(w, c1 := c())
        formula = model.read(w.clone().requires_grad_(), c2 := c()).detach()
    finally:
        kernels.set_native(None)
    tol = dict(rtol=0, atol=0) if impl == "eager" else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused, formula, equal_nan=True, **tol)  # inf and NaN weights as the formula has them
    assert torch.equal(torch.randn(3, generator=c1.generator), torch.randn(3, generator=c2.generator))
    assert ((fused == 0) & (w != 0)).any() and (
        fused != w
    ).float().mean() > 0.9  # factors clamped at 0; the rest moved
