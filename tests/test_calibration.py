"""hf_cim.calibration: static DAC ranges from data, their forward, and the checkpoint that carries them."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2, train_lm_steps
from torch import nn

import hf_cim
from hf_cim.calibration import calibrate_input_ranges, calibrate_output_ranges
from hf_cim.correction import column_sums, fit_correction
from hf_cim.patch import get_config


def _static_mlp(**fields):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = dict(input_quant="static", noise=[], output_bits=None, weight_bits=None, tile_size=None)
    cfg.update(fields)
    return hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(**cfg))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(8, 16, generator=g) for _ in range(n)]


def test_range_is_alpha_times_the_mean_input_std_and_deterministic():
    model = _static_mlp()
    batches = _batches()
    found = calibrate_input_ranges(model, batches, alpha=3.0)
    expected0 = 3.0 * sum(b.std(correction=0).item() for b in batches) / 3
    hidden = [torch.relu(model[0].clean_forward(b)) for b in batches]
    expected2 = 3.0 * sum(h.std(correction=0).item() for h in hidden) / 3
    assert found == pytest.approx({"0": expected0, "2": expected2}, rel=1e-6)
    assert get_config(model).input_ranges == found
    again = _static_mlp()
    assert calibrate_input_ranges(again, _batches(), alpha=3.0) == found  # same model and data: same ranges


def test_calibration_keeps_mode_and_draws_no_noise():
    model = _static_mlp(noise=[{"name": "output_noise", "std": 0.1}])
    model.train()
    before = {n: m.hf_cim_state.generator for n, m in hf_cim.patch.analog_layers(model)}
    calibrate_input_ranges(model, _batches())
    assert model.training
    assert all(m.hf_cim_state.generator is before[n] for n, m in hf_cim.patch.analog_layers(model))


def test_static_forward_clips_and_quantizes_inputs_to_the_range():
    model = _static_mlp(input_bits=4)
    layer = model[0]
    x = _batches(1)[0]
    get_config(model).input_ranges = {"0": 1.5, "2": 1.0}
    q = 7.0  # 4 bits: levels -7..7
    x_dac = torch.clamp(torch.round(x * (q / 1.5)), -q, q) * (1.5 / q)
    torch.testing.assert_close(layer(x), F.linear(x_dac, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert (x.abs() > 1.5).any()  # the reference did clip


def test_errors_name_the_problem():
    model = _static_mlp()
    with pytest.raises(ValueError, match="calibrate them first"):
        model(_batches(1)[0])
    with pytest.raises(ValueError, match="alpha"):
        calibrate_input_ranges(model, _batches(), alpha=0.0)
    with pytest.raises(ValueError, match="no batch"):
        calibrate_input_ranges(model, [])
    dynamic = hf_cim.patch_model(nn.Linear(4, 4), hf_cim.AnalogNoiseConfig())
    with pytest.raises(ValueError, match="input_quant='static'"):
        calibrate_input_ranges(dynamic, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="input_quant='static'"):
        hf_cim.AnalogNoiseConfig(input_ranges={"a": 1.0})
    with pytest.raises(ValueError, match="input_ranges\\['a'\\]"):
        hf_cim.AnalogNoiseConfig(input_quant="static", input_ranges={"a": 0.0})
    stray = hf_cim.AnalogNoiseConfig(input_quant="static", input_ranges={"not_a_layer": 1.0})
    with pytest.raises(ValueError, match="not_a_layer"):
        hf_cim.patch_model(nn.Sequential(nn.Linear(4, 4)), stray)


def test_ranges_travel_with_the_checkpoint(tmp_path):
    """save_pretrained writes the calibrated ranges in config.json; from_pretrained patches with them: the
    reloaded model computes the same analog outputs on the same chip."""
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.get_preset("pcm", input_quant="static", seed=0))
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    ranges = calibrate_input_ranges(model, [ids], forward=lambda m, b: m(input_ids=b))
    assert len(ranges) == len(list(hf_cim.patch.analog_layers(model)))
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_config(back).input_ranges == ranges
    model.eval()
    back.eval()
    hf_cim.program_chip(model, seed=3)
    hf_cim.program_chip(back, seed=3)
    hf_cim.reseed(model, 7)
    hf_cim.reseed(back, 7)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_static_ranges_train_a_gpt2_with_recalibration():
    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.get_preset("pcm", input_quant="static", seed=0))
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))

    def recalibrate(step):
        if step % 4 == 0:
            calibrate_input_ranges(model, [ids], forward=lambda m, b: m(input_ids=b))

    losses = train_lm_steps(model, ids, before_step=recalibrate)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3


# -- per-layer ADC ranges ---------------------------------------------------------------------------------------------
def _adc_mlp(**fields):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = dict(noise=[], output_bits=6, out_bound=10.0, tile_size=8)
    cfg.update(fields)
    return hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(**cfg))


def _reference_partial_sums(x, w, input_bits=8, weight_bits=8, rows=8):
    """Per-token abs-max DAC and per-channel weight levels, normalized, summed over each tile of ``rows`` inputs."""
    qx, qw = 2 ** (input_bits - 1) - 1, 2 ** (weight_bits - 1) - 1
    x_n = torch.round(x / x.abs().amax(-1, keepdim=True) * qx) / qx
    w_n = torch.round(w / w.abs().amax(-1, keepdim=True) * qw) / qw
    return torch.stack([x_n[:, i : i + rows] @ w_n[:, i : i + rows].t() for i in range(0, x.shape[1], rows)])


def test_output_range_is_alpha_times_the_mean_partial_sum_std_and_deterministic():
    model = _adc_mlp()
    batches = _batches()
    found = calibrate_output_ranges(model, batches, alpha=6.0)
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    expected0 = 6.0 * sum(_reference_partial_sums(b, w0).std(correction=0).item() for b in batches) / 3
    hidden = [torch.relu(model[0].clean_forward(b)) for b in batches]
    expected2 = 6.0 * sum(_reference_partial_sums(h, w2).std(correction=0).item() for h in hidden) / 3
    assert found == pytest.approx({"0": expected0, "2": expected2}, rel=1e-5)
    assert get_config(model).output_ranges == found
    assert calibrate_output_ranges(_adc_mlp(), _batches(), alpha=6.0) == found  # same model and data: same ranges


def test_a_layer_with_an_output_range_reads_its_adc_as_the_global_bound_would():
    """A layer's calibrated range is its ADC's clipping range: the same outputs as a config whose global
    ``out_bound`` is that range, bit for bit, in the fast forward and in ``full``'s; other layers keep ``out_bound``."""
    for gradient in ("ste", "full"):
        levers = {"mask_saturated": True} if gradient == "ste" else {}
        model = _adc_mlp(gradient=gradient, output_ranges={"0": 2.5}, **levers)
        narrow = _adc_mlp(gradient=gradient, out_bound=2.5, **levers)
        wide = _adc_mlp(gradient=gradient, **levers)
        grads = []
        for m in (model, narrow, wide):
            x = _batches(1)[0].requires_grad_(True)
            h = torch.relu(m[0](x))
            h.sum().backward()
            grads.append((h.detach(), x.grad))
        (h, g), (h_narrow, g_narrow), (h_wide, g_wide) = grads
        assert torch.equal(h, h_narrow) and torch.equal(g, g_narrow)  # the clip, and the gradient it passes
        assert not torch.equal(h, h_wide) and not torch.equal(g, g_wide)  # the range did clip (a bound of 10 does not)
        assert torch.equal(model[2](h), wide[2](h))
    cfg = get_config(model)
    assert cfg.output_step("0") == pytest.approx(2 * 2.5 / 62) and cfg.output_step("2") == pytest.approx(20 / 62)


def test_output_range_errors_name_the_problem():
    with pytest.raises(ValueError, match="output_bits=None"):
        hf_cim.AnalogNoiseConfig(output_bits=None, output_ranges={"a": 1.0})
    with pytest.raises(ValueError, match="output_ranges\\['a'\\]"):
        hf_cim.AnalogNoiseConfig(output_ranges={"a": 0.0})
    with pytest.raises(TypeError, match="output_ranges"):
        hf_cim.AnalogNoiseConfig(output_ranges=[1.0])
    with pytest.raises(ValueError, match="output_ranges.*not_a_layer"):
        hf_cim.patch_model(
            nn.Sequential(nn.Linear(4, 4)), hf_cim.AnalogNoiseConfig(output_ranges={"not_a_layer": 1.0})
        )
    with pytest.raises(ValueError, match="ADC"):
        calibrate_output_ranges(_adc_mlp(output_bits=None), _batches())
    with pytest.raises(ValueError, match="input_slice_bits"):
        calibrate_output_ranges(_adc_mlp(input_slice_bits=4), _batches())
    with pytest.raises(ValueError, match="alpha"):
        calibrate_output_ranges(_adc_mlp(), _batches(), alpha=2000.0)
    with pytest.raises(ValueError, match="no batch"):
        calibrate_output_ranges(_adc_mlp(), [])


def test_output_ranges_follow_a_static_dac_and_travel_with_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.get_preset("rram", input_quant="static", seed=0))
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    forward = lambda m, b: m(input_ids=b)  # noqa: E731
    with pytest.raises(ValueError, match="calibrate them first"):  # the partial sums need the DAC's ranges
        calibrate_output_ranges(model, [ids], forward=forward)
    calibrate_input_ranges(model, [ids], forward=forward)
    ranges = calibrate_output_ranges(model, [ids], forward=forward)
    assert set(ranges) == {layer.hf_cim_name for _, layer in hf_cim.patch.analog_layers(model)}
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_config(back).output_ranges == ranges
    for m in (model, back):
        m.eval()
        hf_cim.program_chip(m, seed=3)
        hf_cim.reseed(m, 7)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


# -- the programmed chip's output correction -------------------------------------------------------------------------
def _chip_layer(layer: nn.Module, noise=(), **fields) -> nn.Module:
    cfg = dict(noise=list(noise), input_bits=None, weight_bits=None, output_bits=None, tile_size=None)
    cfg.update(fields)
    model = hf_cim.patch_model(nn.Sequential(layer), hf_cim.AnalogNoiseConfig(**cfg))
    return hf_cim.program_chip(model.eval(), seed=3)


def _scale_columns(layer: nn.Module, c: torch.Tensor) -> None:
    """Make the programmed chip of ``layer`` an exact per-column gain ``c`` of the clean product."""
    w_prog, w_scale = layer.hf_cim_state.chip
    layer.hf_cim_state.chip = (w_prog * c[:, None], w_scale)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(12, 6), (40, 12)),
        (lambda: __import__("transformers").pytorch_utils.Conv1D(6, 12), (5, 8, 12)),
        (lambda: nn.Conv2d(3, 6, 3, padding=1), (4, 3, 5, 5)),
    ],
    ids=["linear", "conv1d", "conv2d"],
)
def test_affine_correction_undoes_a_per_column_gain_exactly(make, shape):
    from hf_cim.calibration import calibrate_chip_outputs

    torch.manual_seed(0)
    model = _chip_layer(make())
    layer = model[0]
    c = torch.linspace(0.5, 1.5, 6)
    _scale_columns(layer, c)
    x = torch.randn(*shape)
    clean = layer.clean_forward(x)
    assert not torch.allclose(model(x), clean, atol=1e-3)  # the chip is off before the correction
    found = calibrate_chip_outputs(model, [x, torch.randn(*shape)])
    scale, offset = found["0"]
    torch.testing.assert_close(scale, 1 / c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(offset, layer.bias.detach() * (1 - 1 / c), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), clean, rtol=1e-5, atol=1e-5)


def test_affine_fit_is_least_squares_per_column_on_the_chip_outputs():
    from hf_cim.calibration import calibrate_chip_outputs

    torch.manual_seed(1)
    model = _chip_layer(nn.Linear(16, 5), noise=[{"name": "lognormal", "std": 0.3}])
    layer = model[0]
    batches = [torch.randn(30, 16) for _ in range(3)]
    chip = torch.cat([model(b) for b in batches]).double()
    clean = torch.cat([layer.clean_forward(b) for b in batches]).double()
    scale, offset = calibrate_chip_outputs(model, batches)["0"]
    for col in range(5):
        design = torch.stack([chip[:, col], torch.ones(len(chip), dtype=torch.float64)], 1)
        ref = torch.linalg.lstsq(design, clean[:, col : col + 1]).solution.squeeze(1)
        torch.testing.assert_close(scale[col].double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(offset[col].double(), ref[1], rtol=1e-5, atol=1e-5)
    corrected = model(batches[0])
    layer.hf_cim_state.chip_correction = None
    torch.testing.assert_close(corrected, model(batches[0]) * scale + offset, rtol=1e-6, atol=1e-6)


def test_gain_on_a_lognormal_chip_is_its_regression_factor():
    """One gain through the origin on a chip with w' = w·exp(σξ): E[y·y₀]/E[y²] = m/E[f²] = exp(−1.5σ²) for many
    independent inputs (m = exp(σ²/2) the factor's mean; its spread dilutes the regression)."""
    from hf_cim.calibration import calibrate_chip_outputs

    torch.manual_seed(2)
    sigma = 0.3
    model = _chip_layer(nn.Linear(1024, 256, bias=False), noise=[{"name": "lognormal", "std": sigma}])
    scale, offset = calibrate_chip_outputs(model, [torch.randn(256, 1024)], kind="gain")["0"]
    assert torch.all(scale == scale[0]) and torch.all(offset == 0)
    assert scale[0].item() == pytest.approx(math.exp(-1.5 * sigma**2), rel=0.01)


def test_chip_correction_belongs_to_the_programmed_chip_and_eval_only():
    from hf_cim.calibration import calibrate_chip_outputs

    torch.manual_seed(3)
    model = _chip_layer(nn.Linear(8, 4))  # no device noise: only the chip's column gains below differ from clean
    layer = model[0]
    _scale_columns(layer, torch.tensor([0.5, 0.8, 1.2, 2.0]))
    x = torch.randn(20, 8)
    raw = model(x)
    calibrate_chip_outputs(model, [x])
    clean = layer.clean_forward(x)
    torch.testing.assert_close(model(x), clean)
    model.train()  # training programs its weights anew at every forward: neither the chip nor its correction
    torch.testing.assert_close(model(x), clean)
    model.eval()
    hf_cim.program_chip(model, seed=3)  # programming again: the correction is gone
    assert layer.hf_cim_state.chip_correction is None
    _scale_columns(layer, torch.tensor([0.5, 0.8, 1.2, 2.0]))
    torch.testing.assert_close(model(x), raw)
    calibrate_chip_outputs(model, [x])
    hf_cim.clear_chip(model)
    assert layer.hf_cim_state.chip_correction is None


def test_correction_is_fitted_against_the_product_of_the_clipped_input():
    """A static DAC's clip is its known transfer, not an array error: on a chip whose only departure from the digital
    layer is that clip, the fitted correction is the identity (fitted against the unclipped product it would not be:
    the clipped outliers would pull every column's scale and offset)."""
    from hf_cim.calibration import calibrate_chip_outputs

    torch.manual_seed(4)
    model = _chip_layer(nn.Linear(16, 6), input_quant="static")
    layer = model[0]
    get_config(model).input_ranges = {"0": 1.0}
    batches = [torch.randn(64, 16) * 1.5 for _ in range(2)]
    assert (batches[0].abs() > 1.0).float().mean() > 0.4  # the DAC clips a good share of the inputs
    clipped = layer.clean_forward(batches[0].clamp(-1.0, 1.0))
    torch.testing.assert_close(model(batches[0]), clipped, rtol=1e-5, atol=1e-5)
    scale, offset = calibrate_chip_outputs(model, batches)["0"]
    torch.testing.assert_close(scale, torch.ones(6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offset, torch.zeros(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(model(batches[0]), clipped, rtol=1e-5, atol=1e-5)
    unclipped = torch.cat([layer.clean_forward(b) for b in batches])
    chip = torch.cat([layer.clean_forward(b.clamp(-1.0, 1.0)) for b in batches])
    old_scale, _ = fit_correction(column_sums(chip, unclipped), "affine")
    assert (old_scale - 1).abs().max() > 0.1  # what the unclipped target would have fitted


def test_chip_correction_errors_name_the_problem():
    from hf_cim.calibration import calibrate_chip_outputs

    model = _chip_layer(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="`kind` must be one of"):
        calibrate_chip_outputs(model, [torch.randn(2, 8)], kind="column")
    with pytest.raises(ValueError, match="gave no batch"):
        calibrate_chip_outputs(model, [])
    with pytest.raises(ValueError, match="noise is disabled"), hf_cim.patch.noise_disabled(model):
        calibrate_chip_outputs(model, [torch.randn(2, 8)])
    hf_cim.clear_chip(model)
    with pytest.raises(ValueError, match="no programmed chip"):
        calibrate_chip_outputs(model, [torch.randn(2, 8)])
    quiet = hf_cim.patch_model(nn.Sequential(nn.Linear(8, 4)), hf_cim.AnalogNoiseConfig(noise_in_eval=False))
    hf_cim.program_chip(quiet, seed=0)
    with pytest.raises(ValueError, match="noise_in_eval=False"):
        calibrate_chip_outputs(quiet, [torch.randn(2, 8)])
    with pytest.raises(ValueError, match="no patched dense layer"):
        calibrate_chip_outputs(nn.Linear(8, 4), [torch.randn(2, 8)])
