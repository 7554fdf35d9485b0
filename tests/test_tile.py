import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hf_cim import AnalogNoiseConfig, NoiseModel
from hf_cim.noise import NoiseContext, register_noise_model
from hf_cim.tile import TileSpec, analog_matmul, clean_partial_sums, program_weights


def _run(cfg, x, w, b=None, gen_seed=0, differentiable=False):
    ctx = NoiseContext(generator=torch.Generator().manual_seed(gen_seed), level=cfg.level)
    w_prog, scale = program_weights(w, cfg, ctx, cfg.noise, differentiable=differentiable)
    return analog_matmul(x, w_prog, scale, b, cfg, ctx, cfg.noise, differentiable=differentiable)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(24, 700, generator=gen),
        torch.randn(48, 700, generator=gen) * 0.05,
        torch.randn(48, generator=gen),
    )


def test_converters_off_equals_float_product(data):
    x, w, b = data
    cfg = AnalogNoiseConfig(input_bits=None, weight_bits=None, output_bits=None, noise=[], tile_size=None)
    assert torch.allclose(_run(cfg, x, w, b), x @ w.T + b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile_size", [1, 64, 256, 699, 700, 1000])
def test_tiled_equals_untiled_without_noise_and_adc(data, tile_size):
    x, w, b = data
    base = dict(input_bits=8, weight_bits=8, output_bits=None, noise=[])
    ref = _run(AnalogNoiseConfig(tile_size=None, **base), x, w, b)
    out = _run(AnalogNoiseConfig(tile_size=tile_size, **base), x, w, b)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_8bit_product_is_close_to_float(data):
    x, w, b = data
    out = _run(AnalogNoiseConfig(noise=[], output_bits=None), x, w, b)
    ref = x @ w.T + b
    rel = (out - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.02


def test_adc_clips_each_tile_and_quantizes():
    # All-ones inputs and weights: each tile's partial sum is its row count; the ADC clips it to out_bound.
    x = torch.ones(2, 40)
    w = torch.ones(3, 40)
    cfg = AnalogNoiseConfig(noise=[], out_bound=8.0, output_bits=8, tile_size=10)
    assert torch.allclose(_run(cfg, x, w), torch.full((2, 3), 4 * 8.0))
    cfg = AnalogNoiseConfig(noise=[], out_bound=100.0, output_bits=4, tile_size=None)
    step = 2 * 100.0 / 14
    assert torch.allclose(_run(cfg, x, w), torch.full((2, 3), round(40 / step) * step))


def test_bias_is_added_on_the_adc_grid():
    x = torch.ones(1, 4)
    w = torch.ones(2, 4)
    b = torch.tensor([0.3, -0.31])
    cfg = AnalogNoiseConfig(noise=[], out_bound=4.0, output_bits=4, tile_size=None)
    step = 2 * 4.0 / 14  # in units of |x|max·|w|max = 1
    expected = torch.round(torch.tensor(4.0) / step) * step + torch.round(b / step) * step
    assert torch.allclose(_run(cfg, x, w, b), expected.reshape(1, 2), atol=1e-6)


@pytest.mark.parametrize("slice_bits", [1, 2, 4])
@pytest.mark.parametrize("tile_size", [None, 128])
def test_bit_slicing_without_noise_and_adc_equals_unsliced(data, slice_bits, tile_size):
    x, w, b = data
    base = dict(output_bits=None, noise=[], tile_size=tile_size)
    ref = _run(AnalogNoiseConfig(**base), x, w, b)
    out = _run(AnalogNoiseConfig(input_slice_bits=slice_bits, **base), x, w, b)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_output_noise_statistics_and_level_scaling(data):
    x, w, _ = data
    cfg = AnalogNoiseConfig(noise=[{"name": "output_noise", "std": 0.05}], output_bits=None, tile_size=None)
    clean = _run(cfg.replace(level=0.0), x, w)
    # In the layer's units the normalized noise is scaled by |x|max (per token) · |w|max (per channel).
    unit = x.abs().amax(1, keepdim=True) * w.abs().amax(1).unsqueeze(0)
    for level in (1.0, 2.0):
        noisy = _run(cfg.replace(level=level), x, w)
        z = (noisy - clean) / unit
        assert z.mean().abs() < 0.01
        assert z.std().item() == pytest.approx(0.05 * level, rel=0.05)


def test_gaussian_weight_noise_statistics():
    w = torch.linspace(-1, 1, 2000).repeat(64, 1)
    x = torch.eye(2000)[:1]
    cfg = AnalogNoiseConfig(
        noise=[{"name": "gaussian_weight", "std": 0.03}], input_bits=None, weight_bits=None, output_bits=None
    )
    ctx = NoiseContext(generator=torch.Generator().manual_seed(3))
    w_prog, scale = program_weights(w, cfg, ctx, cfg.noise)
    assert torch.allclose(scale, torch.ones(64, 1))
    dw = w_prog - w
    assert dw.std().item() == pytest.approx(0.03, rel=0.02)
    assert dw.mean().abs() < 0.001
    del x


@register_noise_model("test_numpy_sign_flip")
@dataclass
class NumpySignFlip(NoiseModel):
    """A deliberately non-differentiable model: numpy, in-place sign flips of a fixed fraction."""

    fraction: float = 0.1
    differentiable = False

    def program(self, w, ctx):
        arr = w.detach().cpu().numpy().copy()
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=ctx.generator)))
        flip = rng.random(arr.shape) < self.fraction * ctx.level
        arr[flip] *= -1
        return torch.from_numpy(arr).to(w)


def test_non_differentiable_hook_passes_straight_through_in_full_mode(data):
    x, w, _ = data
    cfg = AnalogNoiseConfig(noise=[NumpySignFlip(0.2)], output_bits=None, gradient="full")
    wr = w.clone().requires_grad_()
    out = _run(cfg, x, wr, differentiable=True)
    assert out.requires_grad
    out.sum().backward()
    assert torch.isfinite(wr.grad).all() and wr.grad.abs().sum() > 0
    same = _run(cfg, x, w, differentiable=False)
    assert torch.allclose(out.detach(), same, atol=1e-5)


def test_unregistered_models_are_refused_at_config_time():
    @dataclass
    class Unregistered(NoiseModel):
        pass

    with pytest.raises(ValueError, match=r"`noise\[0\]` is a Unregistered, which is not registered"):
        AnalogNoiseConfig(noise=[Unregistered()])


def test_hook_with_wrong_shape_is_reported(data):
    @register_noise_model("test_bad_shape")
    @dataclass
    class Bad(NoiseModel):
        def program(self, w, ctx):
            return w[:1]

    x, w, _ = data
    cfg = AnalogNoiseConfig(noise=[Bad()])
    with pytest.raises(RuntimeError, match="must return a tensor of shape"):
        _run(cfg, x, w)


def test_tile_spec_is_built_once_per_setting_and_equals_the_config_path(data):
    from hf_cim.tile import TileSpec

    cfg = AnalogNoiseConfig(tile_size=256, input_slice_bits=2, input_quant="per_tensor", out_bound=4.0)
    spec = TileSpec.from_config(cfg)
    assert TileSpec.from_config(AnalogNoiseConfig.from_dict(cfg.to_dict())) is spec  # cached: one per setting
    assert TileSpec.from_config(spec) is spec
    assert (spec.input_qmax, spec.per_token, spec.weight_qmax, spec.adc_levels) == (127.0, False, 127.0, 127.0)
    assert spec.adc_step == cfg.output_step() and spec.adc
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tile_size = 3
    cfg.update(output_bits=None)  # a changed config gets its own spec, never a stale one
    off = TileSpec.from_config(cfg)
    assert not off.adc and off.adc_step == 1.0 and off.adc_levels == 0.0
    x, w, b = data
    for differentiable in (False, True):
        ctx = NoiseContext(generator=torch.Generator().manual_seed(1), level=cfg.level)
        w_prog, scale = program_weights(w, off, ctx, cfg.noise, differentiable=differentiable)
        by_spec = analog_matmul(x, w_prog, scale, b, off, ctx, cfg.noise, differentiable=differentiable)
        ctx = NoiseContext(generator=torch.Generator().manual_seed(1), level=cfg.level)
        w_prog, scale = program_weights(w, cfg, ctx, cfg.noise, differentiable=differentiable)
        by_config = analog_matmul(x, w_prog, scale, b, cfg, ctx, cfg.noise, differentiable=differentiable)
        assert torch.equal(by_spec, by_config)


def test_the_tile_hands_its_backend_sampler_to_the_hooks():
    from hf_cim import kernels, rng

    seen = []

    @dataclass
    class Spy(NoiseModel):
        def program(self, w, ctx):
            seen.append(ctx.sampler)
            return w

    ctx = NoiseContext(generator=torch.Generator().manual_seed(0))
    program_weights(torch.randn(4, 5), AnalogNoiseConfig(), ctx, [Spy()])
    assert seen == [kernels.SAMPLER]
    own = NoiseContext(generator=torch.Generator().manual_seed(0), sampler=rng.REFERENCE)
    program_weights(torch.randn(4, 5), AnalogNoiseConfig(), own, [Spy()])
    assert seen[-1] is rng.REFERENCE  # a caller's choice is kept


@pytest.mark.parametrize(("k", "rows"), [(384, 256), (700, 40), (384, 128), (100, 512)], ids=str)
def test_partial_last_tile_skips_the_padded_rows_with_the_same_partial_sums(k, rows):
    from hf_cim.tile import _tile, _tiled_product

    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, k, generator=gen), torch.randn(96, k, generator=gen)
    x_t, w_t = _tile(x, w, rows)
    padded = torch.bmm(x_t, w_t.transpose(1, 2))
    got = _tiled_product(x, w, rows)
    assert got.shape == padded.shape
    if (k, rows) == (384, 256):  # GPT-2's width on the rram preset's tiles: bit for bit with this CPU's BLAS
        assert torch.equal(got, padded)
    torch.testing.assert_close(got, padded, rtol=1e-6, atol=1e-5)


def test_hooks_see_whole_crossbars_when_the_last_tile_is_partly_used():
    # Physics: a partly used last tile is a full-size array whose extra rows carry no input and no conductance, so
    # IR-drop's row count and row positions are the array's (not those of a smaller array).
    from hf_cim.noise import IRDrop

    seen = []

    @dataclass
    class Spy(IRDrop):
        def output(self, y, x, w, ctx):
            seen.append(x.shape)
            return super().output(y, x, w, ctx)

    cfg = AnalogNoiseConfig(tile_size=256, noise=[IRDrop()])
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 384, generator=gen), torch.randn(16, 384, generator=gen) * 0.05
    ctx = NoiseContext(generator=torch.Generator().manual_seed(0), level=1.0)
    w_prog, scale = program_weights(w, cfg, ctx, cfg.noise)
    analog_matmul(x, w_prog, scale, None, cfg, ctx, [Spy()])
    assert seen == [torch.Size([2, 8, 256])]


@pytest.mark.parametrize(("dtype", "u"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=str)
@pytest.mark.parametrize("rows", [None, 256, 200], ids=str)
def test_half_precision_product_is_within_the_weight_rounding_bound(dtype, u, rows):
    # product_precision="autocast": DAC levels (integers up to 127) are exact in both dtypes, each weight rounds by
    # at most u of its value, so each partial sum moves by at most u·Σ|x||w| (plus float32 accumulation slop).
    from hf_cim.tile import _tile, _tiled_product

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-127, 128, (64, 600), generator=gen).float()
    w = torch.randn(80, 600, generator=gen) * 0.3
    assert torch.equal(x.to(dtype).float(), x)
    ref = _tiled_product(x, w, rows)
    got = _tiled_product(x, w, rows, dtype)
    x_t, w_t = _tile(x.abs(), w.abs(), rows)
    bound = u * torch.bmm(x_t, w_t.transpose(1, 2))
    err = (got - ref).abs()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (err <= bound * (1 + 1e-3) + 1e-3).all()
    assert err.max() > 0  # the weights did round: the bound is not met by an unchanged float32 product
    # the same numbers as the float32 product of the rounded weights (CPU: bit for bit)
    assert torch.equal(got, _tiled_product(x, w.to(dtype).float(), rows))


def test_half_precision_analog_product_equals_the_float32_product_of_rounded_weights(data):
    # Only the crossbar product's operands change: the DAC, programming, noise and ADC stay float32, so the whole
    # analog product with bfloat16 operands is the float32 one of the bfloat16-rounded programmed weights.
    x, w, b = data
    cfg = AnalogNoiseConfig(tile_size=256, noise=[{"name": "output_noise", "std": 0.05}])
    ctx = NoiseContext(generator=torch.Generator().manual_seed(0), level=1.0)
    w_prog, scale = program_weights(w, cfg, ctx, cfg.noise)
    runs = []
    for weights, dtype in ((w_prog, torch.bfloat16), (w_prog.to(torch.bfloat16).float(), torch.float32)):
        ctx = NoiseContext(generator=torch.Generator().manual_seed(5), level=1.0)
        runs.append(analog_matmul(x, weights, scale, b, cfg, ctx, cfg.noise, product_dtype=dtype))
    assert torch.equal(runs[0], runs[1])
    ctx = NoiseContext(generator=torch.Generator().manual_seed(5), level=1.0)
    full = analog_matmul(x, w_prog, scale, b, cfg, ctx, cfg.noise)
    # Where a tile's partial sum sat within the weights' rounding of an ADC boundary, that tile's level moved by one:
    # at most one level per tile (3 tiles of 700 rows), on a few % of the outputs (6 % here), far less in RMS than
    # the output noise's own spread (0.05 / ADC step = 0.64 levels).
    level = cfg.output_step() * scale.reshape(1, -1) * x.abs().amax(1, keepdim=True)  # one ADC level, layer units
    moved = (runs[0] - full) / level
    assert 0 < moved.abs().max() <= 3 + 1e-3
    assert (moved.abs() > 1e-3).float().mean() < 0.1
    assert moved.pow(2).mean().sqrt() < 0.5 * 0.05 / cfg.output_step()
    assert moved.mean().abs() < 0.02  # no bias


def test_clean_partial_sums_are_the_normalized_tile_sums_the_adc_reads():
    """Inputs through the DAC into [-1, 1] (per token, or a static range that clips), weights at their per-channel
    levels over the channel's abs-max, summed per tile of 8 rows (the last tile over its 4 real rows)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 20, generator=g), torch.randn(3, 20, generator=g)
    qw = 127.0
    w_n = torch.round(w / w.abs().amax(-1, keepdim=True) * qw) / qw
    for input_quant, x_n in (
        ("per_token", torch.round(x / x.abs().amax(-1, keepdim=True) * 7) / 7),
        ("static", torch.clamp(torch.round(x / 0.8 * 7), -7, 7) / 7),
    ):
        cfg = AnalogNoiseConfig(input_bits=4, input_quant=input_quant, tile_size=8, noise=[])
        sums = clean_partial_sums(x, w, TileSpec.from_config(cfg), 0.8 if input_quant == "static" else None)
        expected = torch.stack([x_n[:, i : i + 8] @ w_n[:, i : i + 8].t() for i in (0, 8, 16)])
        torch.testing.assert_close(sums, expected, rtol=1e-6, atol=1e-6)


_ELEMENTWISE = {
    "lognormal": [{"name": "lognormal", "std": 0.2}],
    "gaussian+lognormal": [{"name": "gaussian_weight", "std": 0.05}, {"name": "lognormal", "std": 0.1,
                                                                      "mean_corrected": True}],
    "lognormal+gaussian_per_tensor": [{"name": "lognormal", "std": 0.1},
                                      {"name": "gaussian_weight", "std": 0.03, "per_channel": False}],
    "gaussian": [{"name": "gaussian_weight", "std": 0.05}],
    "rram": [{"name": "reram"}, {"name": "stuck_at", "p_off": 0.05, "p_on": 0.01}],
    "pcm": [{"name": "pcm", "prog_noise_scale": 3.0}],
}  # fmt: skip


@pytest.mark.parametrize("noise", list(_ELEMENTWISE))
def test_program_weights_with_derivative_is_the_programming_and_autograds_gradient(noise):
    """The same draws and values as ``program_weights``, and a derivative whose product with a cotangent is the
    gradient autograd takes through the differentiable programming of ``w_n·scale`` (the quantizer straight through);
    None where it is 1 everywhere."""
    from hf_cim.tile import program_weights_with_derivative, programs_elementwise

    cfg = AnalogNoiseConfig(noise=_ELEMENTWISE[noise], weight_bits=6)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 37, generator=gen)
    cot = torch.randn(24, 37, generator=gen)

    def ctx():
        return NoiseContext(generator=torch.Generator().manual_seed(9), level=1.5)

    assert programs_elementwise(cfg.noise, ctx())
    w_n, scale, d = program_weights_with_derivative(w, cfg, ctx(), cfg.noise)
    w_ref, scale_ref = program_weights(w, cfg, ctx(), cfg.noise)
    assert torch.equal(w_n, w_ref) and torch.equal(scale, scale_ref)
    w_leaf = w.clone().requires_grad_()
    w_auto, scale_auto = program_weights(w_leaf, cfg, ctx(), cfg.noise, differentiable=True)
    (grad,) = torch.autograd.grad(w_auto * scale_auto, w_leaf, cot)
    torch.testing.assert_close(w_n, w_auto.detach(), rtol=1e-6, atol=1e-7)
    if noise == "gaussian":
        assert d is None
        torch.testing.assert_close(grad, cot)
    else:
        assert d.shape == w.shape and float(d.std()) > 0.05
        # (ReRAM's C pass sums the polynomial's derivative in its own order: float32 ulp of 1 + z·s·σ'(g))
        torch.testing.assert_close(cot * d, grad, rtol=1e-5, atol=1e-6)


def test_only_closed_form_programming_is_elementwise():
    from hf_cim.tile import programs_elementwise

    ctx = NoiseContext(generator=None, level=1.0)
    for preset in ("paper", "rram", "pcm_drift"):
        assert programs_elementwise(AnalogNoiseConfig(noise=preset).noise, ctx)
    # PCM's global drift compensation, a mean over the whole matrix, acts once the chip has drifted
    aged = NoiseContext(generator=None, level=1.0, t_inference=86400.0)
    custom = AnalogNoiseConfig(noise=[{"name": "lognormal"}, {"name": "pcm"}]).noise
    assert not programs_elementwise(custom, aged)
    assert programs_elementwise(AnalogNoiseConfig(noise=[{"name": "pcm", "drift_compensation": False}]).noise, aged)
    assert programs_elementwise(custom, NoiseContext(generator=None, level=0.0, t_inference=86400.0))  # level 0
