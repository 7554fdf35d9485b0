"""The STE backward levers: ``mask_saturated`` (no gradient through ADC-clipped partial sums),
``backward_weights="programmed"`` (input gradient through the weights the chip computed with) and
``program_gradient`` (the weight gradient chained through the weight programming)."""

import copy

import pytest
import torch
from helpers import layer_grads
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.converters import quantize_input, quantize_weight

KINDS = ["linear", "conv1d", "conv2d"]


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(40, 24), 3 * torch.randn(3, 5, 40)
    if kind == "conv1d":
        return Conv1D(24, 40), 3 * torch.randn(3, 5, 40)
    return nn.Conv2d(5, 6, 3, stride=2, padding=1), 3 * torch.randn(2, 5, 9, 9)  # 45 crossbar rows


def _patched(plain, **fields):
    layer = copy.deepcopy(plain)
    hf_cim.patch_model(layer, AnalogNoiseConfig(**fields))
    return layer


def _reference_mask(layer, x, cfg):
    """The ADC's pass mask from first principles: quantized inputs times quantized weights, per tile, in
    normalized units; an output passes when ``|y/Δ| <= L + ½``."""
    rows = layer.to_rows(x)
    w = layer.weight_oi(layer.weight.detach())
    x_int, _ = quantize_input(rows, cfg.input_bits, cfg.input_quant)
    w_n, _ = quantize_weight(w, cfg.weight_bits)
    x_n = x_int / (2 ** (cfg.input_bits - 1) - 1)
    tiles = []
    for start in range(0, rows.shape[1], cfg.tile_size or rows.shape[1]):
        stop = start + (cfg.tile_size or rows.shape[1])
        tiles.append(x_n[:, start:stop] @ w_n[:, start:stop].t())
    y = torch.stack(tiles)
    levels = 2 ** (cfg.output_bits - 1) - 1
    return y.abs() <= (levels + 0.5) * cfg.output_step()


@pytest.mark.parametrize("tile", [None, 16], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_mask_matches_first_principles_and_gradients_follow_it(kind, tile):
    plain, x = _layer(kind)
    fields = dict(noise=[], out_bound=1.0, tile_size=tile, mask_saturated=True)
    layer = _patched(plain, gradient="ste", **fields)
    cfg = hf_cim.patch.get_config(layer)
    mask = _reference_mask(layer, x, cfg)
    assert 0.05 < (~mask).float().mean() < 0.6  # the bound really clips a part of the outputs
    g = torch.randn_like(plain(x))
    _, gx, gw, gb = layer_grads(layer, x, g)
    # Reference: per tile, the plain layer's VJP of the masked upstream gradient.
    g_rows = layer.grad_rows(g)
    rows, w = layer.to_rows(x), layer.weight_oi(plain.weight.detach())
    step = tile or rows.shape[1]
    ref_gx_rows = torch.cat([(g_rows * m) @ w[:, i * step : (i + 1) * step] for i, m in enumerate(mask)], dim=1)
    ref_gw = torch.cat([(g_rows * m).t() @ rows[:, i * step : (i + 1) * step] for i, m in enumerate(mask)], dim=1)
    torch.testing.assert_close(layer.weight_oi(gw), ref_gw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, layer.input_grad_from_rows(ref_gx_rows, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, layer.bias_grad(g))  # the bias is added digitally, after the ADC: unmasked


@pytest.mark.parametrize("tile", [None, 16], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_hardware_aware_ste_input_gradient_equals_full_without_noise(kind, tile):
    """Without noise, ``full`` differentiates the clamp (zero outside) and the quantized weights: its input
    gradient is exactly the masked product with the programmed weights."""
    plain, x = _layer(kind)
    fields = dict(noise=[], out_bound=1.0, tile_size=tile)
    full = _patched(plain, gradient="full", **fields)
    hw = _patched(plain, gradient="ste", mask_saturated=True, backward_weights="programmed", **fields)
    g = torch.randn_like(plain(x))
    y_full, gx_full, _, _ = layer_grads(full, x, g)
    y_hw, gx_hw, _, _ = layer_grads(hw, x, g)
    torch.testing.assert_close(y_hw, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_hw, gx_full, rtol=1e-4, atol=1e-5)
    plain_ste = _patched(plain, gradient="ste", **fields)
    assert not torch.allclose(layer_grads(plain_ste, x, g)[1], gx_full, atol=1e-3)  # the levers do change it


@pytest.mark.parametrize("kind", KINDS)
def test_programmed_weights_input_gradient_equals_full_under_lognormal_noise(kind):
    """The paper preset (no ADC, lognormal devices): ``full``'s input gradient is ``g·W'`` with the noisy
    programmed weights; ``backward_weights='programmed'`` gives the same from the same noise draw."""
    plain, x = _layer(kind)
    full = _patched(plain, gradient="full", noise="paper", level=3.0, output_bits=None, tile_size=None, seed=3)
    prog = _patched(plain, gradient="ste", noise="paper", level=3.0, output_bits=None, tile_size=None, seed=3,
                    backward_weights="programmed")  # fmt: skip
    g = torch.randn_like(plain(x))
    y_full, gx_full, _, _ = layer_grads(full, x, g)
    y_prog, gx_prog, gw_prog, _ = layer_grads(prog, x, g)
    torch.testing.assert_close(y_prog, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_prog, gx_full, rtol=1e-4, atol=1e-5)
    _, _, gw_plain, _ = layer_grads(plain, x, g)
    torch.testing.assert_close(gw_prog, gw_plain, rtol=1e-5, atol=1e-5)  # the weight gradient stays clean


_DEVICE_CHIPS = {
    # lognormal devices (w' = w·e^{σξ}), int8 weights: the chain rule gives each device's factor e^{σξ}
    "lognormal": dict(noise="paper", level=3.0),
    # PCM programming noise, a day of drift with its global compensation (a per-row term), no read noise
    "pcm_drift_1d": dict(noise=[{"name": "pcm", "read_noise_scale": 0.0}], level=1.0, t_inference=86400.0),
}


@pytest.mark.parametrize("chip", list(_DEVICE_CHIPS))
@pytest.mark.parametrize("gradient", ["ste", "ste_detach"])
@pytest.mark.parametrize("kind", KINDS)
def test_program_gradient_equals_full_without_converters(kind, gradient, chip):
    """Where the only differentiable stage is the weight programming (no DAC, ADC or read noise), ``full``'s
    gradients are ``g·W'`` and the crossbar's ``gᵀ·x`` chained through the programming: ``program_gradient`` with
    ``backward_weights='programmed'`` gives both from the same draw; the crossbar's gradient alone is far off."""
    plain, x = _layer(kind)
    fields = dict(_DEVICE_CHIPS[chip])
    t = fields.pop("t_inference", 0.0)
    fields.update(input_bits=None, output_bits=None, tile_size=None, seed=3)

    def grads(**levers):
        layer = _patched(plain, **fields, **levers)
        hf_cim.set_drift_time(layer, t)
        return layer_grads(layer, x, g)

    g = torch.randn_like(plain(x))
    y_full, gx_full, gw_full, gb_full = grads(gradient="full")
    y, gx, gw, gb = grads(gradient=gradient, backward_weights="programmed", program_gradient=True)
    torch.testing.assert_close(y, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gb_full)
    _, _, gw_crossbar, _ = grads(gradient=gradient, backward_weights="programmed")
    assert (gw_crossbar - gw_full).abs().max() > 0.1 * gw_full.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_program_gradient_is_the_device_factor_times_the_crossbar_gradient(kind):
    """First principles under lognormal devices: ``∂L/∂w = e^{σξ}·(gᵀ·x)``, the factor read off the programmed
    weights of the same draw (``w'/Q(w)``; the quantizer passes the gradient straight through)."""
    plain, x = _layer(kind)
    fields = dict(noise="paper", level=3.0, output_bits=None, tile_size=None, seed=7)
    g = torch.randn_like(plain(x))
    _, _, gw_chain, _ = layer_grads(_patched(plain, gradient="ste", program_gradient=True, **fields), x, g)
    _, _, gw_crossbar, _ = layer_grads(_patched(plain, gradient="ste", **fields), x, g)
    probe = _patched(plain, gradient="ste", backward_weights="programmed", **fields)
    aux = {}
    with torch.no_grad():  # a fresh layer of the same seed: its first forward draws the same devices
        probe.noisy_forward(x, probe.weight, probe.bias, differentiable=False, aux=aux)
    w_q, scale = quantize_weight(probe.weight_oi(probe.weight.detach()), 8)
    w_q = w_q * scale
    read = w_q != 0  # a weight quantized to zero stays zero: its factor is not in W' (but is in the gradient)
    factor = aux["weight"][read] / w_q[read]
    assert read.float().mean() > 0.95 and factor.std() > 0.2  # σ = 0.3: the factors are far from one
    ref = factor * probe.weight_oi(gw_crossbar)[read]
    torch.testing.assert_close(probe.weight_oi(gw_chain)[read], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noise", ["paper", "rram", "pcm_drift"])
@pytest.mark.parametrize("gradient", ["ste", "ste_detach"])
@pytest.mark.parametrize("kind", KINDS)
def test_program_gradient_in_closed_form_equals_the_programming_under_autograd(kind, gradient, noise, monkeypatch):
    """Lognormal devices (each device's factor), ReRAM and fresh PCM devices and stuck-at faults have closed-form
    derivatives: the chain multiplies by them instead of running the programming under autograd, with the same
    gradients (the programmed values agree to an ulp: the C kernel's exp against torch's)."""
    plain, x = _layer(kind)
    fields = dict(gradient=gradient, noise=noise, level=3.0, output_bits=None, tile_size=16, seed=4,
                  backward_weights="programmed", program_gradient=True)  # fmt: skip
    g = torch.randn_like(plain(x))
    calls = []
    closed_form = hf_cim.layers.program_weights_with_derivative
    monkeypatch.setattr(
        hf_cim.layers, "program_weights_with_derivative", lambda *a: calls.append(1) or closed_form(*a)
    )
    fast = layer_grads(_patched(plain, **fields), x, g)
    assert calls
    monkeypatch.setattr(hf_cim.layers, "programs_elementwise", lambda noise, ctx: False)
    graph = layer_grads(_patched(plain, **fields), x, g)
    assert len(calls) == 1
    for a, b in zip(fast, graph):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, _, gw_crossbar, _ = layer_grads(_patched(plain, **{**fields, "program_gradient": False}), x, g)
    assert (gw_crossbar - fast[2]).abs().max() > 0.1 * fast[2].abs().max()


@pytest.mark.parametrize("gradient", ["ste", "ste_detach"])
def test_program_gradient_on_frozen_weights_leaves_the_input_gradient(gradient):
    """A frozen base (LoRA's): nothing to chain, the input gradient is the lever's ``g·W'`` as without it."""
    plain, x = _layer("linear")
    fields = dict(gradient=gradient, noise="paper", level=3.0, output_bits=None, tile_size=None, seed=2,
                  backward_weights="programmed")  # fmt: skip
    g = torch.randn_like(plain(x))
    grads_x = []
    for chain in (False, True):
        layer = _patched(plain, program_gradient=chain, **fields)
        layer.weight.requires_grad_(False)
        xx = x.clone().requires_grad_()
        layer(xx).backward(g)
        grads_x.append(xx.grad)
        assert layer.weight.grad is None
    torch.testing.assert_close(grads_x[1], grads_x[0], rtol=0, atol=0)


@pytest.mark.parametrize("tile", [None, 16], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_ste_and_ste_detach_agree_with_program_gradient(kind, tile):
    """The chained weight gradient with every other lever and stage on (DAC, ADC clip mask, tiles, output noise)."""
    plain, x = _layer(kind)
    noise = [{"name": "lognormal", "std": 0.2}, {"name": "output_noise", "std": 0.1}]
    fields = dict(noise=noise, out_bound=1.0, tile_size=tile, seed=5, mask_saturated=True,
                  backward_weights="programmed", program_gradient=True)  # fmt: skip
    a = layer_grads(_patched(plain, gradient="ste", **fields), x, g := torch.randn_like(plain(x)))
    b = layer_grads(_patched(plain, gradient="ste_detach", **fields), x, g)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_programmed_weights_backward_leaves_a_programmed_chip_intact(kind):
    """The forward scales its own programmed weights in place for the backward; a programmed chip's weights, read
    by a differentiated forward in eval (``noise_in_eval``), are not this forward's own and must stay as programmed."""
    plain, x = _layer(kind)
    layer = _patched(plain, gradient="ste", noise="paper", level=3.0, output_bits=None, tile_size=None,
                     backward_weights="programmed", noise_in_eval=True)  # fmt: skip
    layer.program(seed=4)
    layer.eval()
    w_chip, scale = (t.clone() for t in layer.hf_cim_state.chip)
    g = torch.randn_like(plain(x))
    _, gx, _, _ = layer_grads(layer, x, g)
    _, gx_again, _, _ = layer_grads(layer, x, g)
    torch.testing.assert_close(layer.hf_cim_state.chip[0], w_chip, rtol=0, atol=0)
    torch.testing.assert_close(gx_again, gx, rtol=0, atol=0)
    ref = layer.input_grad_from_rows(layer.grad_rows(g) @ (w_chip * scale), x)
    torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levers", [dict(mask_saturated=True), dict(backward_weights="programmed"),
                                    dict(mask_saturated=True, backward_weights="programmed")],
                         ids=["mask", "programmed", "both"])  # fmt: skip
@pytest.mark.parametrize("tile", [None, 16], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_ste_and_ste_detach_agree_with_levers(kind, tile, levers):
    plain, x = _layer(kind)
    noise = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.1}]
    fields = dict(noise=noise, out_bound=1.0, tile_size=tile, seed=5, **levers)
    a = layer_grads(_patched(plain, gradient="ste", **fields), x, g := torch.randn_like(plain(x)))
    b = layer_grads(_patched(plain, gradient="ste_detach", **fields), x, g)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chain", [False, True], ids=["crossbar", "chained"])
def test_levers_train_a_gpt2(chain):
    from helpers import tiny_gpt2, train_lm_steps

    model = tiny_gpt2()
    preset = "rram" if chain else "pcm"  # the pcm chip has no programming to chain through
    cfg = hf_cim.get_preset(preset, mask_saturated=True, backward_weights="programmed", program_gradient=chain, seed=0)
    hf_cim.patch_model(model, cfg)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train_lm_steps(model, ids)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3


def test_full_mode_rejects_the_levers():
    with pytest.raises(ValueError, match="mask_saturated"):
        AnalogNoiseConfig(gradient="full", mask_saturated=True)
    with pytest.raises(ValueError, match="backward_weights"):
        AnalogNoiseConfig(backward_weights="noisy")
    with pytest.raises(ValueError, match="program_gradient"):
        AnalogNoiseConfig(gradient="full", program_gradient=True)
    with pytest.raises(TypeError, match="program_gradient"):
        AnalogNoiseConfig(program_gradient="yes")
    cfg = AnalogNoiseConfig(mask_saturated=True, backward_weights="programmed", program_gradient=True)
    assert AnalogNoiseConfig.from_json_string(cfg.to_json_string()) == cfg


def _static(plain, x, gradient, alpha=1.0, **fields):
    """A copy of ``plain`` patched with a static DAC calibrated to ``alpha`` std of ``x``."""
    from hf_cim.calibration import calibrate_input_ranges

    layer = _patched(plain, gradient=gradient, input_quant="static", **fields)
    calibrate_input_ranges(layer, [x], alpha=alpha)
    return layer


@pytest.mark.parametrize("tile", [None, 16], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_static_dac_clip_mask_equals_full_and_first_principles(kind, tile):
    """A static DAC clips inputs beyond its range: ``full`` differentiates that clamp (zero gradient there); the
    hardware-aware STE gives the same input gradient from its pass mask, which is ``|round(x·q/r)| <= q``."""
    plain, x = _layer(kind)
    fields = dict(noise=[], out_bound=1.0, tile_size=tile)
    full = _static(plain, x, "full", **fields)
    hw = _static(plain, x, "ste", mask_saturated=True, backward_weights="programmed", **fields)
    r = hf_cim.patch.get_config(hw).input_ranges[""]
    assert r == pytest.approx(x.std(correction=0).item(), rel=1e-5)  # alpha = 1: one std
    clipped = torch.round(x * (127 / r)).abs() > 127
    assert 0.2 < clipped.float().mean() < 0.5  # the range really clips inputs
    g = torch.randn_like(plain(x))
    y_full, gx_full, _, _ = layer_grads(full, x, g)
    y_hw, gx_hw, _, _ = layer_grads(hw, x, g)
    torch.testing.assert_close(y_hw, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_hw, gx_full, rtol=1e-4, atol=1e-5)
    assert torch.all(gx_hw[clipped] == 0) and torch.count_nonzero(gx_hw[~clipped]) > 0.9 * (~clipped).sum()
    # Without the mask lever the clipped inputs get the clean gradient (the STE of the paper).
    plain_ste = _static(plain, x, "ste", **fields)
    assert torch.count_nonzero(layer_grads(plain_ste, x, g)[1][clipped]) > 0.9 * clipped.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_static_dac_ste_and_ste_detach_agree(kind):
    plain, x = _layer(kind)
    fields = dict(noise=[{"name": "output_noise", "std": 0.1}], out_bound=1.0, tile_size=16, seed=5,
                  mask_saturated=True, backward_weights="programmed")  # fmt: skip
    g = torch.randn_like(plain(x))
    a = layer_grads(_static(plain, x, "ste", **fields), x, g)
    b = layer_grads(_static(plain, x, "ste_detach", **fields), x, g)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)


def test_program_gradient_changes_nothing_on_a_read_noise_chip():
    """The ``pcm`` preset's devices are read noise only (no ``program`` hook, float weights): nothing to chain
    through, the lever is skipped and the training default leaves that chip's gradients bit for bit; on ``rram``
    (conductance-dependent programming noise, stuck devices) it changes them."""
    from helpers import tiny_gpt2

    base = tiny_gpt2(n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for preset, same in (("pcm", True), ("rram", False)):
        runs = []
        for chain in (False, True):
            model = copy.deepcopy(base)
            hf_cim.patch_model(model, hf_cim.get_preset(preset, program_gradient=chain, seed=0))
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            runs.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
        (loss_a, grads_a), (loss_b, grads_b) = runs
        assert torch.equal(loss_a, loss_b)  # the same forward either way
        diff = max((a - b).abs().max() for a, b in zip(grads_a, grads_b))
        assert (diff == 0) if same else (diff > 1e-2), (preset, diff)
