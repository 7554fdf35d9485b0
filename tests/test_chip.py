"""Chip programming: static draws fixed across batches in eval, redrawn in training; read noise per product."""

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2

import hf_cim
from hf_cim.noise import GaussianWeightNoise, OutputNoise, PCMNoise, StuckAtFaults

IDS = torch.arange(32).reshape(2, 16) % 97
STATIC = [PCMNoise(read_noise_scale=0.0), StuckAtFaults(p_off=0.02, p_on=0.01)]  # no per-product noise


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def patched(factory, noise, **kw):
    return hf_cim.patch_model(factory(), hf_cim.AnalogNoiseConfig(noise=noise, **kw))


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_programmed_chip_is_fixed_without_read_noise(factory):
    model = patched(factory, STATIC).eval()
    unprogrammed = [logits(model), logits(model)]
    assert not torch.equal(*unprogrammed)  # without a chip, eval redraws the static part every forward
    hf_cim.program_chip(model, seed=3, t_inference=3600.0)
    a, b = logits(model), logits(model)
    assert torch.equal(a, b)
    hf_cim.program_chip(model, seed=3, t_inference=3600.0)  # the same chip again
    assert torch.equal(logits(model), a)
    hf_cim.program_chip(model, seed=4, t_inference=3600.0)  # another chip
    assert not torch.equal(logits(model), a)
    hf_cim.clear_chip(model)
    assert not torch.equal(logits(model), logits(model))


def test_read_noise_is_drawn_per_product_on_a_programmed_chip():
    model = patched(tiny_gpt2, [PCMNoise(), OutputNoise(std=0.02)]).eval()
    hf_cim.program_chip(model, seed=0, t_inference=60.0)
    assert not torch.equal(logits(model), logits(model))
    # ... but the static part is kept: with the per-product noise off the results agree again.
    hf_cim.set_noise_level(model, 0.0)
    assert torch.equal(logits(model), logits(model))


def test_training_mode_redraws_the_static_part():
    model = patched(tiny_gpt2, [GaussianWeightNoise(std=0.05)])
    hf_cim.program_chip(model, seed=0)
    model.train()
    a = model(input_ids=IDS).logits.detach()
    b = model(input_ids=IDS).logits.detach()
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(logits(model), logits(model))


def test_same_chip_drifts_with_time_and_compensation_keeps_the_scale():
    model = patched(tiny_gpt2, [PCMNoise(read_noise_scale=0.0, drift_compensation=False)], output_bits=None).eval()
    with hf_cim.noise_disabled(model):
        clean = logits(model)
    err = {}
    for t in (0.0, 86400.0, 86400.0 * 365):
        hf_cim.program_chip(model, seed=1, t_inference=t)
        err[t] = (logits(model) - clean).abs().mean().item()
    assert err[0.0] < err[86400.0] < err[86400.0 * 365]
    layer = model.transformer.h[0].mlp.c_fc
    hf_cim.program_chip(model, seed=1, t_inference=86400.0 * 365)
    drifted = layer.hf_cim_state.chip[0].clone()
    comp = patched(tiny_gpt2, [PCMNoise(read_noise_scale=0.0)], output_bits=None).eval()
    hf_cim.program_chip(comp, seed=1, t_inference=86400.0 * 365)
    compensated = comp.transformer.h[0].mlp.c_fc.hf_cim_state.chip[0]
    # Global compensation is one factor per layer: same devices, rescaled.
    nonzero = drifted != 0
    ratio = compensated[nonzero] / drifted[nonzero]
    assert ratio.std().item() < 1e-4 and ratio.mean().item() > 1.05


def test_errors():
    with pytest.raises(ValueError, match="`seed` must be an int >= 0"):
        hf_cim.program_chip(patched(tiny_gpt2, STATIC), seed=-1)
    with pytest.raises(ValueError, match="`t_inference`"):
        hf_cim.program_chip(patched(tiny_gpt2, STATIC), seed=0, t_inference=-1.0)
    with pytest.raises(ValueError, match="no patched layer"):
        hf_cim.program_chip(tiny_gpt2(), seed=0)
