import pytest
import torch

from hf_cim.converters import adc_levels, dac, dac_clip, quantize_input, quantize_weight, round_ste, slice_input


def test_8bit_dac_gives_at_most_255_levels_per_token():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4096, generator=gen) * torch.logspace(-3, 3, 16).unsqueeze(1)
    x_int, scale = quantize_input(x, 8, "per_token")
    assert scale.shape == (16, 1)
    assert torch.equal(x_int, x_int.round())
    assert x_int.abs().max() == 127
    for row in x_int:
        assert row.unique().numel() <= 255
    # Each token's largest magnitude hits full scale; reconstruction error is at most half a step.
    assert torch.all(x_int.abs().amax(1) == 127)
    assert torch.all((x_int * scale - x).abs() <= scale / 2 + 1e-6 * x.abs())


def test_per_tensor_dac_shares_one_scale():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    x_int, scale = quantize_input(x, 8, "per_tensor")
    assert scale.shape == (1, 1)
    assert torch.allclose(scale, torch.tensor([[2.0 / 127]]))
    assert torch.equal(x_int, torch.tensor([[32.0, -64.0], [127.0, 16.0]]))


def test_dac_off_only_normalizes():
    x = torch.tensor([[0.3, -0.6]])
    x_n, scale = quantize_input(x, None, "per_token")
    assert torch.allclose(x_n, torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(x_n * scale, x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_levels_per_channel(bits):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 300, generator=gen)
    w_n, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1))
    assert torch.allclose(w_n * qmax, (w_n * qmax).round(), atol=1e-5)
    assert w_n.abs().amax() == pytest.approx(1.0)
    for row in w_n:
        assert row.unique().numel() <= 2 * qmax + 1


def test_no_grad_and_autograd_paths_agree():
    # One definition serves both: the no-grad STE forward (plain rounding) and ``full`` (rounding straight through).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 33, generator=gen)
    with torch.no_grad():
        a, sa = quantize_input(x, 8, "per_token")
    b, sb = quantize_input(x.clone().requires_grad_(), 8, "per_token")
    assert not a.requires_grad and b.requires_grad
    assert torch.equal(a, b.detach()) and torch.equal(sa, sb)
    w = torch.randn(4, 9, generator=gen)
    with torch.no_grad():
        wa, _ = quantize_weight(w, 8)
    wp = w.clone().requires_grad_()
    wb, _ = quantize_weight(wp, 8)
    assert torch.equal(wa, wb.detach())
    wb.sum().backward()  # straight through the rounding: d(w/scale)/dw with the scale detached
    assert torch.allclose(wp.grad, (1 / w.abs().amax(1, keepdim=True)).expand_as(w))


def test_round_ste_passes_gradient_straight_through():
    t = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    out = round_ste(t)
    assert torch.equal(out.detach(), torch.round(t.detach()))
    out.sum().backward()
    assert torch.equal(t.grad, torch.ones(3))


def test_adc_levels():
    assert adc_levels(8) == 127
    assert adc_levels(2) == 1


@pytest.mark.parametrize("slice_bits", [1, 2, 3, 4, 7])
def test_slices_recombine_exactly(slice_bits):
    x_int = torch.arange(-127, 128, dtype=torch.float32).reshape(5, 51)
    slices, weights = slice_input(x_int, 8, slice_bits)
    assert slices.shape[0] == -(-7 // slice_bits)
    assert slices.abs().max() <= 1.0
    recombined = sum(w * s for w, s in zip(weights, slices))
    assert torch.equal(recombined, x_int)


def test_dac_clip_is_the_static_dacs_clamp_in_input_units_and_abs_max_passes_all():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5)) * 2
    x_int, absmax = dac(x, 1.0, per_token=False, quantize=False, static_range=1.5)
    torch.testing.assert_close(dac_clip(x, 1.5), x_int * absmax, rtol=1e-6, atol=1e-6)
    assert (x.abs() > 1.5).any() and dac_clip(x, 1.5).abs().max() == 1.5
    assert dac_clip(x, None) is x
