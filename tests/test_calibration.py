"""hf_cim.calibration: static DAC ranges from data, their forward, and the checkpoint that carries them."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2, train_lm_steps
from torch import nn

import hf_cim
from hf_cim.calibration import calibrate_input_ranges
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
