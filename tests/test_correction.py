"""hf_cim.correction: the per-column least-squares output correction, and the training forward that applies it."""

import pytest
import torch
from torch import nn

import hf_cim
from hf_cim.correction import column_sums, fit_correction


def _pair(n=200, out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, out, generator=g, dtype=torch.float64)
    y0 = 0.8 * y + 0.3 + 0.1 * torch.randn(n, out, generator=g, dtype=torch.float64)
    return y, y0


def test_affine_fit_is_least_squares_per_column_and_sums_of_batches_add_up():
    y, y0 = _pair()
    scale, offset = fit_correction(column_sums(y, y0), "affine")
    for col in range(y.shape[1]):
        design = torch.stack([y[:, col], torch.ones(len(y), dtype=torch.float64)], 1)
        ref = torch.linalg.lstsq(design, y0[:, col : col + 1]).solution.squeeze(1)
        assert scale[col].item() == pytest.approx(ref[0].item(), rel=1e-6)
        assert offset[col].item() == pytest.approx(ref[1].item(), rel=1e-6, abs=1e-7)
    halves = [column_sums(y[:80], y0[:80]), column_sums(y[80:], y0[80:])]
    added = [a + b for a, b in zip(*halves)]
    for got, want in zip(fit_correction(added, "affine"), (scale, offset)):
        torch.testing.assert_close(got, want)
    assert scale.dtype == offset.dtype == torch.float32


def test_gain_fit_goes_through_the_origin_and_a_constant_column_keeps_its_scale():
    y, y0 = _pair()
    scale, offset = fit_correction(column_sums(y, y0), "gain")
    want = (y * y0).sum() / (y * y).sum()
    torch.testing.assert_close(scale, torch.full((6,), want.item(), dtype=torch.float32))
    assert torch.all(offset == 0)
    y[:, 2] = 1.5  # a column the chip reads as a constant: no slope to fit, the offset alone moves it
    scale, offset = fit_correction(column_sums(y, y0), "affine")
    assert scale[2].item() == 1.0
    assert offset[2].item() == pytest.approx((y0[:, 2].mean() - 1.5).item(), rel=1e-6)


def _lognormal_layer(correction, gradient="ste"):
    cfg = hf_cim.AnalogNoiseConfig(noise=[{"name": "lognormal", "std": 0.3}], input_bits=None, weight_bits=None,
                                   output_bits=None, tile_size=None, gradient=gradient,
                                   train_output_correction=correction)  # fmt: skip
    torch.manual_seed(0)
    return hf_cim.patch_model(nn.Sequential(nn.Linear(16, 8)), cfg)


def test_a_training_forward_corrects_the_chip_it_samples_on_its_own_batch():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    raw, corrected = _lognormal_layer(None), _lognormal_layer("affine")
    for model in (raw, corrected):
        model.train()
        hf_cim.reseed(model, 5)  # the same sampled chip for both
    with torch.no_grad():
        y_raw, y = raw(x), corrected(x)
        clean = raw[0].clean_forward(x)
    scale, offset = fit_correction(column_sums(y_raw, clean), "affine")
    torch.testing.assert_close(y, y_raw * scale + offset, rtol=1e-5, atol=1e-6)
    assert ((y - clean) ** 2).mean() < 0.9 * ((y_raw - clean) ** 2).mean()
    for model in (raw, corrected):  # evaluation forwards are not touched
        model.eval()
        hf_cim.program_chip(model, seed=2)
    torch.testing.assert_close(corrected(x), raw(x))


def test_the_ste_gradient_does_not_go_through_the_correction():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    g = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for correction in (None, "affine"):
        model = _lognormal_layer(correction).train()
        xr = x.clone().requires_grad_(True)
        (model(xr) * g).sum().backward()
        grads.append((xr.grad, model[0].weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)  # the clean backward either way


def test_config_names_the_allowed_corrections():
    with pytest.raises(ValueError, match=r"`train_output_correction` must be None or one of \('affine', 'gain'\)"):
        hf_cim.AnalogNoiseConfig(train_output_correction="column")
    cfg = hf_cim.AnalogNoiseConfig(train_output_correction="gain")
    assert hf_cim.AnalogNoiseConfig.from_dict(cfg.to_dict()).train_output_correction == "gain"


def test_full_mode_differentiates_the_corrected_output_with_the_fit_held_fixed():
    """``gradient="full"``: autograd runs through ``a·y + b`` with ``a``, ``b`` constants, so the input gradient is the
    uncorrected one scaled by ``a`` per output column (the same sampled chip, reseeded)."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    g = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    out = {}
    for correction in (None, "affine"):
        model = _lognormal_layer(correction, gradient="full").train()
        hf_cim.reseed(model, 7)
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        y.backward(g)
        out[correction] = (y.detach(), xr.grad)
    y_raw, grad_raw = out[None]
    with torch.no_grad():
        clean = _lognormal_layer(None)[0].clean_forward(x)
    scale, offset = fit_correction(column_sums(y_raw, clean), "affine")
    torch.testing.assert_close(out["affine"][0], y_raw * scale + offset, rtol=1e-5, atol=1e-6)
    model = _lognormal_layer(None, gradient="full").train()
    hf_cim.reseed(model, 7)
    xr = x.clone().requires_grad_(True)
    model(xr).backward(g * scale)
    torch.testing.assert_close(out["affine"][1], xr.grad)
    assert not torch.allclose(out["affine"][1], grad_raw)


def test_a_training_forward_fits_against_the_product_of_the_clipped_input():
    """A static DAC that clips, and no other noise: the sampled chip computes the digital product of the clipped
    input, which the per-batch fit must leave alone (a = 1, b = 0)."""
    cfg = hf_cim.AnalogNoiseConfig(noise=[], input_bits=None, weight_bits=None, output_bits=None, tile_size=None,
                                   input_quant="static", input_ranges={"0": 1.0},
                                   train_output_correction="affine")  # fmt: skip
    torch.manual_seed(0)
    model = hf_cim.patch_model(nn.Sequential(nn.Linear(16, 8)), cfg).train()
    x = 1.5 * torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    assert (x.abs() > 1.0).float().mean() > 0.4
    with torch.no_grad():
        y = model(x)
        want = model[0].clean_forward(x.clamp(-1.0, 1.0))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
