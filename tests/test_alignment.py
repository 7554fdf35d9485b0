"""hf_cim.alignment: the cosine of the STE gradient and the ``full`` gradient on a probe batch, without a Trainer."""

import pytest
import torch
from helpers import lm_samples, patched_gpt2, stack_batch

import hf_cim
from hf_cim.alignment import gradient_alignment
from hf_cim.noise import GaussianWeightNoise, OutputNoise

SEQ = 16


def _data():
    return lm_samples(64, SEQ)


def _probe(data, n=4):
    return stack_batch(data, n)


def _patched(**cfg):
    return patched_gpt2(SEQ, **cfg)


def test_cosine_is_one_without_noise():
    model = _patched(input_bits=None, weight_bits=None, output_bits=None, level=0.0)
    out = gradient_alignment(model, _probe(_data()))
    assert out["grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    layer_keys = {f"grad_cosine/{n}" for n, _ in hf_cim.patch.analog_layers(model)}
    assert layer_keys <= set(out) and len(layer_keys) == 8
    assert all(out[k] == pytest.approx(1.0, abs=1e-6) for k in layer_keys)


def test_cosine_is_between_zero_and_one_with_noise_and_deterministic():
    model = _patched(noise=[GaussianWeightNoise(std=0.3), OutputNoise(std=0.2)])
    probe = _probe(_data())
    out = gradient_alignment(model, probe)
    assert 0.0 < out["grad_cosine"] < 0.9999
    assert all(0.0 < v < 1.0 for k, v in out.items() if k.startswith("grad_cosine/"))
    assert gradient_alignment(model, probe) == out
    assert gradient_alignment(model, probe, seed=1) != out
    # Converters alone (level 0) barely change the direction: STE passes the rounding straight through.
    hf_cim.set_noise_level(model, 0.0)
    assert gradient_alignment(model, probe)["grad_cosine"] > 0.999


def test_gradient_alignment_leaves_the_model_untouched():
    model = _patched()
    model.train()
    probe = _probe(_data())
    layers = [m for _, m in hf_cim.patch.analog_layers(model)]
    model(**probe).loss.backward()  # creates the generators and some .grad to keep
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gens = [m.hf_cim_state.generator for m in layers]
    gen_states = [g.get_state() for g in gens]
    configs = [m.hf_cim_config for m in layers]
    cpu_rng = torch.get_rng_state()

    gradient_alignment(model, probe)

    assert all(m.training for m in model.modules())
    assert all(m.hf_cim_state.generator is g for m, g in zip(layers, gens))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, gen_states))
    assert all(m.hf_cim_config is c for m, c in zip(layers, configs))
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), cpu_rng)


def test_alignment_measures_the_configs_own_ste_levers():
    """A saturating ADC: the hardware-aware STE backward (mask + programmed weights) points closer to ``full``'s
    gradient than the plain clean backward, and the probe works with the levers on (``full`` drops them)."""
    probe = _probe(_data())
    plain = gradient_alignment(_patched(noise=[], out_bound=1.0), probe)["grad_cosine"]
    levers = dict(mask_saturated=True, backward_weights="programmed")
    hw = gradient_alignment(_patched(noise=[], out_bound=1.0, **levers), probe)["grad_cosine"]
    assert plain < 0.9 and hw > 0.9999  # no noise: the levers give full's gradient up to the DAC rounding of x


def test_gradient_alignment_errors_name_the_problem():
    with pytest.raises(ValueError, match="no patched layer"):
        gradient_alignment(torch.nn.Linear(2, 2), {})
    model = _patched()
    with pytest.raises(ValueError, match="`loss`"):
        gradient_alignment(model, {"input_ids": _probe(_data())["input_ids"]})


def test_alignment_with_the_chained_weight_gradient_is_full_under_device_noise():
    """Lognormal devices and no converters: ``program_gradient`` makes the STE gradient ``full``'s (the probe's
    two passes draw the same devices); the crossbar's weight gradient alone misses each device's factor."""
    probe = _probe(_data())
    fields = dict(noise="paper", level=3.0, input_bits=None, output_bits=None, backward_weights="programmed")
    crossbar = gradient_alignment(_patched(**fields), probe)["grad_cosine"]
    chained = gradient_alignment(_patched(program_gradient=True, **fields), probe)["grad_cosine"]
    assert chained > 0.9999 and crossbar < chained - 0.01, (crossbar, chained)
