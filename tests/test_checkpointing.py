"""Activation checkpointing replays each layer's noise: gradients equal the run without checkpointing."""

import pytest
import torch
from helpers import tiny_gpt2

import hf_cim


def _step(mode, checkpointing, reentrant=None, preset="pcm"):
    model = tiny_gpt2(n_layer=2)
    cfg = hf_cim.get_preset(preset, level=2.0, gradient=mode, seed=7)
    hf_cim.patch_model(model, cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # Where each layer's noise stream stands after the step: it must advance once per forward, not twice.
    streams = {n: m.noise_generator(torch.device("cpu")).get_state() for n, m in hf_cim.patch.analog_layers(model)}
    return grads, streams


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("mode", ["ste", "ste_detach", "full"])
def test_checkpointed_gradients_equal_plain_ones(mode, reentrant):
    ref, ref_streams = _step(mode, checkpointing=False)
    got, got_streams = _step(mode, checkpointing=True, reentrant=reentrant)
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in ref_streams:
        assert torch.equal(got_streams[name], ref_streams[name]), name


@pytest.mark.parametrize("chain", [False, True], ids=["crossbar", "chained"])
def test_checkpointing_with_hardware_aware_ste_levers(chain):
    def run(checkpointing):
        model = tiny_gpt2(n_layer=2)
        cfg = hf_cim.get_preset("rram", mask_saturated=True, backward_weights="programmed", program_gradient=chain)
        hf_cim.patch_model(model, cfg)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
