"""Statistics of the generic models: gaussian_weight, lognormal, output_noise, read_noise."""

import math

import pytest
import torch
from helpers import LAYER_KINDS, record_hook_inputs

from hf_cim.noise import (
    GaussianWeightNoise,
    LogNormalNoise,
    NoiseContext,
    OutputNoise,
    ReadNoise,
    noise_model_from_dict,
)


def ctx(seed=0, level=1.0, **kw):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level, **kw)


def test_gaussian_weight_std_per_channel_and_per_tensor():
    w = torch.zeros(400, 1000)
    out = GaussianWeightNoise(std=0.03).program(w, ctx())
    assert out.std().item() == pytest.approx(0.03, rel=0.01)
    # Per tensor: channel i's normalized unit is scale_i, so its σ is std·max(scale)/scale_i.
    scale = torch.linspace(0.5, 2.0, 400).reshape(-1, 1)
    c = ctx(level=2.0)
    c.weight_scale = scale
    out = GaussianWeightNoise(std=0.01, per_channel=False).program(w, c)
    expected = 0.02 * 2.0 / scale.squeeze(1)
    z = out / expected.reshape(-1, 1)  # standardized per channel: all N(0, 1)
    assert z.std().item() == pytest.approx(1.0, rel=0.01)
    assert (z.std(dim=1) - 1).abs().max().item() < 0.12  # 1000 samples a channel: 2.2 % standard error


@pytest.mark.parametrize("mean_corrected", [False, True], ids=["plain", "mean_corrected"])
def test_lognormal_moments(mean_corrected):
    sigma = 0.3
    w = torch.full((1_000_000,), 0.5)
    w[::2] = -0.5  # the sign is kept
    out = LogNormalNoise(std=0.1, mean_corrected=mean_corrected).program(w, ctx(level=3.0))
    assert torch.equal(torch.sign(out), torch.sign(w))
    log_ratio = torch.log(out / w)
    shift = -0.5 * sigma**2 if mean_corrected else 0.0
    assert log_ratio.mean().item() == pytest.approx(shift, abs=0.002)
    assert log_ratio.std().item() == pytest.approx(sigma, rel=0.01)
    expected_mean = 1.0 if mean_corrected else math.exp(sigma**2 / 2)
    assert (out / w).mean().item() == pytest.approx(expected_mean, rel=0.003)
    # Zero weights stay zero (a multiplicative error of a device at zero conductance).
    assert torch.equal(LogNormalNoise(std=1.0).program(torch.zeros(10), ctx()), torch.zeros(10))


def test_output_noise_std_scales_with_level():
    y = torch.zeros(2, 500, 300)
    out = OutputNoise(std=0.04).output(y.clone(), y, y, ctx(level=0.5))
    assert out.std().item() == pytest.approx(0.02, rel=0.01)


def test_read_noise_constant_equals_fresh_weight_noise_variance():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2000, 64, generator=gen) * 2 - 1
    w = torch.rand(1, 50, 64, generator=gen) * 2 - 1
    y = torch.zeros(1, 2000, 50)
    out = ReadNoise(std=0.05, shape="constant").output(y, x, w, ctx())
    z = out / x.norm(dim=-1, keepdim=True)  # standardized: N(0, σ²) whatever the token
    assert z.std().item() == pytest.approx(0.05, rel=0.01)
    assert z.mean().abs().item() < 0.001


def test_read_noise_pcm_shape_variance_formula():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1000, 64, generator=gen) * 2 - 1
    w = torch.rand(2, 80, 64, generator=gen) * 2 - 1
    y = torch.zeros(2, 1000, 80)
    out = ReadNoise(std=0.0175, shape="pcm").output(y, x, w, ctx(level=2.0))
    spread = torch.einsum("ktj,koj->kto", x * x, w.abs()).sqrt()
    z = out / spread
    assert z.std().item() == pytest.approx(0.035, rel=0.01)


def test_invalid_fields_name_the_field():
    with pytest.raises(ValueError, match="`std` must be in"):
        LogNormalNoise(std=-0.1)
    with pytest.raises(ValueError, match="`shape` must be one of"):
        ReadNoise(shape="gaussian")
    with pytest.raises(TypeError, match="`mean_corrected`"):
        LogNormalNoise(mean_corrected=1)
    with pytest.raises(ValueError, match="`draw` must be one of"):
        ReadNoise(draw="sample")


@pytest.mark.parametrize("shape", ["constant", "pcm"])
def test_read_noise_per_batch_is_weight_noise_with_the_per_token_marginals(shape):
    model = ReadNoise(std=0.02, shape=shape, draw="batch")
    assert model.has_hook("read") and not model.has_hook("output")
    assert ReadNoise().has_hook("output") and not ReadNoise().has_hook("read")
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(300, 400, generator=gen) * 2 - 1
    w[0, :10] = 0.0
    with torch.no_grad():
        out = model.read(w, ctx(level=1.5))
    spread = w.abs().clamp(min=1e-12).sqrt() if shape == "pcm" else torch.ones_like(w)
    z = (out - w) / spread  # standardized weight noise: N(0, σ²) with σ = 1.5·0.02
    assert z.std().item() == pytest.approx(0.03, rel=0.01)
    assert z.mean().abs().item() < 0.0005
    # One draw per product: a token's output noise Σ_j δW_ij·x_j has the per-token model's variance...
    x = torch.rand(64, 400, generator=gen) * 2 - 1
    draws = torch.stack([x @ (model.read(w, ctx(seed=s)) - w).T for s in range(200)])  # (draws, T, out)
    with torch.no_grad():
        expected_var = 0.02**2 * (x * x) @ (spread * spread).T
    ratio = draws.var(dim=0) / expected_var
    assert ratio.mean().item() == pytest.approx(1.0, rel=0.03)
    # ...and every token of a product sees the same weights: equal inputs give equal noise.
    x2 = torch.cat([x[:1], x[:1]])
    noisy = x2 @ model.read(w, ctx(seed=7)).T
    assert torch.equal(noisy[0], noisy[1])


def test_read_noise_per_batch_in_full_mode_differentiates_the_weights_only():
    w = (torch.rand(20, 30) * 2 - 1).requires_grad_()
    out = ReadNoise(std=0.05, draw="batch").read(w, ctx())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the spread sqrt(|w|) is not differentiated


def test_read_noise_per_batch_through_the_tile_simulation_and_json():
    import hf_cim
    from hf_cim.tile import analog_matmul, program_weights

    cfg = hf_cim.AnalogNoiseConfig(noise=[ReadNoise(std=0.02, draw="batch")], output_bits=None, input_bits=None)
    assert hf_cim.AnalogNoiseConfig.from_json_string(cfg.to_json_string()) == cfg
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(5, 40, generator=gen), torch.randn(30, 40, generator=gen)
    with torch.no_grad():
        c = ctx(seed=3)
        w_prog, scale = program_weights(w, cfg, c, cfg.noise)
        y = analog_matmul(x, w_prog, scale, None, cfg, c, cfg.noise)
        # The same draw by hand: the read hook's first key after programming (no program hook draws here).
        c2 = ctx(seed=3)
        w_prog2, _ = program_weights(w, cfg, c2, cfg.noise)
        w_read = ReadNoise(std=0.02, draw="batch").read(w_prog2, c2)
    x_abs = x.abs().amax(1, keepdim=True)
    torch.testing.assert_close(y, ((x / x_abs) @ w_read.T) * x_abs * scale.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean_corrected", [False, True], ids=["plain", "mean_corrected"])
def test_lognormal_stays_finite_at_the_top_of_its_ranges(mean_corrected):
    # std = 5 at level = 100: σ = 500, exp(σ·ξ) overflows float32 and 0·inf gave NaN.
    w = torch.linspace(-1, 1, 10_001)
    w[5000] = 0.0
    out = LogNormalNoise(std=5.0, mean_corrected=mean_corrected).program(w, ctx(level=100.0))
    assert torch.isfinite(out).all()
    assert out[5000] == 0.0 and torch.equal(torch.sign(out), torch.sign(w))
    ratio = (out / w)[w != 0]
    bound = math.exp(LogNormalNoise.MAX_LOG_FACTOR)
    assert ratio.max().item() <= bound * (1 + 1e-6) and ratio.min().item() >= (1 - 1e-6) / bound


@pytest.mark.parametrize("tile_size", [128, 512], ids=["tiles128", "tiles512"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_read_noise_bf16_spread_within_1_percent_of_float32_per_output(kind, tile_size):
    # The bound of ``spread_dtype="bfloat16"`` (``"auto"``'s choice where bfloat16 products are native), on the inputs and tiles a real layer hands the hook.
    seen = record_hook_inputs(kind, [ReadNoise(), OutputNoise()], tile_size, ReadNoise)
    assert len(seen) == 1
    _, x, w = seen[0]
    exact = ReadNoise(spread_dtype="float32").variance(x, w)
    fast = ReadNoise(spread_dtype="bfloat16").variance(x, w)
    assert (exact.shape[0] > 1) == (tile_size == 128)  # several tiles, and one
    assert torch.equal(fast == 0, exact == 0)  # a token of zeros has no spread either way
    nonzero = exact > 0
    assert nonzero.float().mean() > 0.9
    rel = (fast[nonzero] / exact[nonzero]).sqrt() - 1  # the spread is σ·sqrt(variance)
    assert rel.abs().max().item() < 0.01
    assert ((fast[nonzero] / exact[nonzero]) - 1).abs().max().item() < 0.012  # the variance: (1 + 2^-8)^3 − 1


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_read_noise_spread_dtype_leaves_signal_and_draws_unchanged(kind):
    # Same seed: the hook sees the same product y, and the noise it adds differs only by the spread (same ξ).
    outs = {}
    for dtype in ("float32", "bfloat16"):
        seen = record_hook_inputs(kind, [ReadNoise(std=0.05, spread_dtype=dtype)], 128, ReadNoise)
        y, x, w = seen[0]
        model = ReadNoise(std=0.05, spread_dtype=dtype)
        noise = model.output(y.clone(), x, w, ctx(seed=3)) - y
        outs[dtype] = (y, noise, model.variance(x, w).float().sqrt())  # a bfloat16 variance is read in float32
    assert torch.equal(outs["float32"][0], outs["bfloat16"][0])
    xi = outs["float32"][1] / outs["float32"][2]
    xi_fast = outs["bfloat16"][1] / outs["bfloat16"][2]
    ok = outs["float32"][2] > 1e-6
    torch.testing.assert_close(xi_fast[ok], xi[ok], rtol=1e-4, atol=1e-4)


def test_read_noise_spread_dtype_is_checked_and_round_trips():
    with pytest.raises(ValueError, match=r"`spread_dtype` must be one of .*got 'float16'"):
        ReadNoise(spread_dtype="float16")
    model = ReadNoise(spread_dtype="float32")
    assert noise_model_from_dict(model.to_dict()) == model


@pytest.mark.parametrize("sigma", [0.3, 10.0], ids=["paper-L3", "clamped"])
@pytest.mark.parametrize("mean_corrected", [False, True], ids=["plain", "mean_corrected"])
def test_lognormal_one_pass_kernel_is_the_formula_within_two_ulp(mean_corrected, sigma):
    # Without autograd the hook runs the backend's fused stage (the C kernel on the CPU: its exp is a polynomial,
    # within 2 ulp of torch's); with autograd, the torch formula. The same key, the same draws: the generator is
    # left at the same place. σ = 10 drives the log factors across the whole clamp range [-20, 20].
    from hf_cim import kernels

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=gen)
    model = LogNormalNoise(std=sigma / 2, mean_corrected=mean_corrected)
    outs, after = [], []
    for grad in (False, True):
        c = ctx(seed=5, level=2.0, sampler=kernels.SAMPLER)
        with torch.set_grad_enabled(grad):
            outs.append(model.program(w.clone().requires_grad_(grad), c).detach())
        after.append(c.randn_like(w))
    torch.testing.assert_close(outs[0], outs[1], rtol=2.5e-7, atol=0)
    assert torch.equal(after[0], after[1])
    ratio = outs[1] / w
    if sigma == 10.0:  # the lower clamp reached (and the upper one without the mean correction's shift of -50)
        assert ratio.min().item() <= math.exp(-20.0) * (1 + 1e-6)
        assert mean_corrected or ratio.max().item() >= math.exp(20.0) * (1 - 1e-6)
    else:
        assert ratio.std().item() > 0.25


@pytest.mark.parametrize("sampler", ["kernels", "reference"])
@pytest.mark.parametrize("mean_corrected", [False, True], ids=["plain", "mean_corrected"])
def test_lognormal_derivative_is_the_factor_autograd_takes(mean_corrected, sampler):
    # program_derivative: the values of program (the same draws) and ∂out/∂w = η, autograd's gradient through the
    # formula; with the torch reference sampler both bit for bit.
    from hf_cim import kernels

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 70, generator=gen)
    cot = torch.randn(40, 70, generator=gen)
    model = LogNormalNoise(std=0.1, mean_corrected=mean_corrected)
    s = kernels.SAMPLER if sampler == "kernels" else None
    with torch.no_grad():
        out, d = model.program_derivative(w, ctx(seed=3, level=3.0, sampler=s))
        plain = model.program(w, ctx(seed=3, level=3.0, sampler=s))
    w_leaf = w.clone().requires_grad_()
    formula = model.program(w_leaf, ctx(seed=3, level=3.0, sampler=s))
    (grad,) = torch.autograd.grad(formula, w_leaf, cot)
    assert torch.equal(out, plain)
    tol = dict(rtol=0, atol=0) if sampler == "reference" else dict(rtol=2.5e-7, atol=0)
    torch.testing.assert_close(out, formula.detach(), **tol)
    torch.testing.assert_close(cot * d, grad, **tol)
    assert model.elementwise_derivative("program", ctx()) and not model.elementwise_derivative("output", ctx())
    assert LogNormalNoise(std=0.1).program_derivative(w, ctx(level=0.0)) == (w, 1.0)
