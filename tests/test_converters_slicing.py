"""Input bit-slicing (SplitInput): exact without noise and ADC; one ADC conversion per slice otherwise."""

import pytest
import torch
from helpers import tiny_gpt2

import hf_cim
from hf_cim.converters import quantize_input, slice_input
from hf_cim.noise import NoiseContext, OutputNoise
from hf_cim.tile import analog_matmul, program_weights


@pytest.mark.parametrize("bits, slice_bits", [(8, 1), (8, 2), (8, 3), (6, 4)])
def test_slices_recombine_exactly(bits, slice_bits):
    x = torch.randn(50, 40)
    x_int, _ = quantize_input(x, bits, "per_token")
    slices, weights = slice_input(x_int, bits, slice_bits)
    assert slices.shape[0] == -(-(bits - 1) // slice_bits)
    assert slices.abs().max() <= 1.0
    digits = slices * (2**slice_bits - 1)
    assert torch.equal(digits, digits.round())  # each slice holds integer digits
    recombined = sum(w * s for w, s in zip(weights, slices))
    assert torch.equal(recombined, x_int)


def _product(cfg, x, w, b, noise=()):
    ctx = NoiseContext(generator=torch.Generator().manual_seed(0), level=1.0, tile_rows=cfg.tile_size or x.shape[1])
    w_prog, scale = program_weights(w, cfg, ctx, list(noise))
    return analog_matmul(x, w_prog, scale, b, cfg, ctx, list(noise))


@pytest.mark.parametrize("slice_bits", [1, 2, 4])
@pytest.mark.parametrize("tile_size", [None, 24], ids=["untiled", "tiled"])
@pytest.mark.parametrize("hooks", [False, True], ids=["no_hooks", "zero_output_noise"])
@pytest.mark.parametrize("input_quant", ["per_token", "per_tensor"])
def test_sliced_equals_unsliced_without_noise_and_adc(slice_bits, tile_size, hooks, input_quant):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(30, 70, generator=gen), torch.randn(20, 70, generator=gen), torch.randn(20, generator=gen)
    base = hf_cim.AnalogNoiseConfig(noise=[], output_bits=None, tile_size=tile_size, input_quant=input_quant)
    noise = [OutputNoise(std=0.0)] if hooks else []  # a hook that adds nothing: the normalized-input path
    plain = _product(base, x, w, b, noise)
    sliced = _product(base.replace(input_slice_bits=slice_bits), x, w, b, noise)
    torch.testing.assert_close(sliced, plain, rtol=1e-5, atol=1e-5)


def test_adc_per_slice_differs_and_noise_is_drawn_per_slice():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 128, generator=gen), torch.randn(32, 128, generator=gen)
    cfg = hf_cim.AnalogNoiseConfig(noise=[], output_bits=6, out_bound=20.0, tile_size=None)
    plain = _product(cfg, x, w, None)
    sliced = _product(cfg.replace(input_slice_bits=2), x, w, None)
    clean = x @ w.t()
    assert not torch.allclose(sliced, plain)
    # Each slice's ADC sees a smaller signal (a slice is at most 2^k − 1 of 127 levels): coarser relative steps.
    assert (sliced - clean).abs().mean() > (plain - clean).abs().mean()
    noisy_cfg = hf_cim.AnalogNoiseConfig(noise=[OutputNoise(std=0.05)], output_bits=None, tile_size=None)
    one = _product(noisy_cfg, x, w, None, noisy_cfg.noise) - clean
    four = _product(noisy_cfg.replace(input_slice_bits=2), x, w, None, noisy_cfg.noise) - clean
    assert one.std() > 0 and four.std() > 0 and not torch.allclose(one, four)


@pytest.mark.parametrize("gradient", ["ste", "full"])
def test_sliced_model_trains_and_matches_unsliced_forward(gradient):
    ids = torch.arange(32).reshape(2, 16) % 97
    cfg = hf_cim.AnalogNoiseConfig(noise=[], output_bits=None, gradient=gradient)
    outs = []
    for c in (cfg, cfg.replace(input_slice_bits=2)):
        model = hf_cim.patch_model(tiny_gpt2(), c)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.item(), model.transformer.h[0].mlp.c_fc.weight.grad.clone()))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)
