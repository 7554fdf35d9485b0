"""``model.generate()`` with a KV cache on a patched causal LM: digital, on a programmed chip, deterministic."""

import copy

import torch
from helpers import tiny_gpt2

import hf_cim

IDS = torch.tensor([[5, 17, 3, 42, 8]])


def _generate(model, **kw):
    out = model.generate(IDS, max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_scores=True, **kw)  # fmt: skip
    return out.sequences, torch.stack(out.scores)


def test_noise_disabled_generation_equals_the_plain_model():
    plain = tiny_gpt2(n_positions=64).eval()
    model = hf_cim.patch_model(copy.deepcopy(plain), hf_cim.get_preset("pcm_drift", seed=0)).eval()
    with hf_cim.noise_disabled(model):
        seq, scores = _generate(model)
    ref_seq, ref_scores = _generate(plain)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores)


def test_generation_on_a_programmed_chip_is_deterministic_and_chip_dependent():
    model = hf_cim.patch_model(tiny_gpt2(n_positions=64), hf_cim.get_preset("pcm_drift", seed=0)).eval()

    def on_chip(chip):
        hf_cim.program_chip(model, seed=chip, t_inference=86400.0)
        hf_cim.reseed(model, 100 + chip)  # the read noise of this run
        return _generate(model)

    a, b, other = on_chip(1), on_chip(1), on_chip(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[1], other[1])
    with hf_cim.noise_disabled(model):
        digital = _generate(model)[1]
    assert not torch.allclose(a[1], digital)  # the chip really is noisy


def test_kv_cache_matches_recomputation_on_a_static_chip():
    """Per-token DAC and ADC with static device noise only: a token's logits do not depend on whether the earlier
    tokens come from the cache or are recomputed."""
    cfg = hf_cim.AnalogNoiseConfig(noise=[{"name": "lognormal", "std": 0.2}], seed=0)
    model = hf_cim.patch_model(tiny_gpt2(n_positions=64), cfg).eval()
    hf_cim.program_chip(model, seed=4)
    cached = _generate(model, use_cache=True)
    recomputed = _generate(model, use_cache=False)
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], rtol=1e-4, atol=1e-4)
    with hf_cim.noise_disabled(model):
        assert not torch.allclose(_generate(model)[1], cached[1], atol=1e-3)  # the devices do change the logits
