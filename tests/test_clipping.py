"""hf_cim.clipping: weights clamped to k standard deviations of their output channel, in every layer layout."""

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn

import hf_cim
from hf_cim.clipping import clip_weights_


def _reference(w_oi, k):
    bound = k * w_oi.std(dim=1, keepdim=True, correction=0)
    return torch.maximum(torch.minimum(w_oi, bound), -bound)


def test_clips_each_output_channel_of_linear_conv1d_and_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(3, 4, 3))
    gpt = tiny_gpt2()
    for m in (model, gpt):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 20 * (torch.rand_like(p) > 0.98))  # outliers
        hf_cim.patch_model(m, hf_cim.AnalogNoiseConfig(noise=[]))
    layers = [layer for m in (model, gpt) for _, layer in hf_cim.patch.analog_layers(m)]
    expected = [_reference(layer.weight_oi(layer.weight.detach()).clone(), 2.5) for layer in layers]
    assert any(not torch.equal(e, layer.weight_oi(layer.weight.detach())) for e, layer in zip(expected, layers))
    clip_weights_(model, 2.5)
    clip_weights_(gpt, 2.5)
    for e, layer in zip(expected, layers):
        torch.testing.assert_close(layer.weight_oi(layer.weight.detach()), e, rtol=0, atol=0)
    # the same Parameters (tied embeddings, optimizer state stay attached)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


def test_wide_bound_leaves_weights_and_bad_bound_is_refused():
    torch.manual_seed(0)
    model = hf_cim.patch_model(nn.Linear(16, 8), hf_cim.AnalogNoiseConfig(noise=[]))
    before = model.weight.detach().clone()
    clip_weights_(model, 100.0)
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="sigmas"):
        clip_weights_(model, 0.1)
