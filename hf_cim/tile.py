"""One analog matrix product: DAC → crossbar tiles → noise hooks → ADC → digital sum → rescale → bias.

Split in two stages so that a programmed chip can keep its static part:

* :func:`program_weights`: quantize the weights per output channel and run the noise models' ``program`` hooks
  (what the devices store). Training calls it at every forward; :func:`hf_cim.program_chip` once per chip.
* :func:`analog_matmul`: ``read`` hooks, DAC, the per-tile products (one batched matmul, no Python loop over tiles),
  ``output`` hooks, ADC per tile (and per input slice), digital recombination, rescale, bias.

Everything runs in float32 in normalized units. With ``differentiable=False`` (the STE paths, under ``no_grad``) the
elementwise steps work in place to save allocations; with ``differentiable=True`` (``full`` mode) they are autograd
ops and rounding passes the gradient straight through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import kernels
from .config import AnalogNoiseConfig
from .converters import adc_levels, quantize_input, quantize_weight, round_ste, slice_input
from .noise.base import NoiseContext, NoiseModel
from .noise.gaussian import GaussianWeightNoise, OutputNoise

__all__ = ["analog_matmul", "program_weights"]


def _run_hook(
    model: NoiseModel, hook: Callable[..., torch.Tensor], differentiable: bool, primary: torch.Tensor, *rest
) -> torch.Tensor:
    if differentiable and not model.differentiable:
        # A non-differentiable hook (numpy, lookup table...) inside ``full`` mode: straight through.
        with torch.no_grad():
            out = hook(primary.detach().clone(), *(r.detach() if torch.is_tensor(r) else r for r in rest))
        return primary + (out.to(primary.dtype) - primary.detach())
    out = hook(primary, *rest)
    if not torch.is_tensor(out) or out.shape != primary.shape:
        raise RuntimeError(
            f"noise model {model.name!r}: hook {hook.__name__} must return a tensor of shape {tuple(primary.shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)}"
        )
    return out


def program_weights(
    w: torch.Tensor,
    config: AnalogNoiseConfig,
    ctx: NoiseContext,
    noise: Sequence[NoiseModel],
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (``(out, in)``, float32) per output channel and apply the ``program`` hooks.

    Returns ``(w_prog, scale)``: normalized programmed weights and the per-channel scale ``(out, 1)``.
    Without autograd, a leading per-channel :class:`GaussianWeightNoise` is fused into the quantization kernel
    (the same numbers as running its hook: same key, same counters).
    """
    models = [m for m in noise if m.has_hook("program")] if ctx.level > 0.0 else []
    if differentiable:
        w_n, scale = quantize_weight(w, config.weight_bits, inplace=False)
    else:
        qmax = None if config.weight_bits is None else float(2 ** (config.weight_bits - 1) - 1)
        std, key = 0.0, None
        if models and type(models[0]) is GaussianWeightNoise and models[0].per_channel:
            std = models[0].std * ctx.level
            key = ctx.new_key(w.device) if std > 0.0 else None
            models = models[1:]
        w_n, scale = kernels.weight_program(w, qmax, std, key)
    ctx.weight_scale = scale
    for model in models:
        w_n = _run_hook(model, model.program, differentiable, w_n, ctx)
    return w_n, scale


_RECOMBINE_CACHE: dict[tuple, torch.Tensor] = {}


def _recombine_weights(shares: tuple[float, ...], n_tiles: int, device: torch.device) -> torch.Tensor:
    """Digital weight of each (slice, tile) output, cached: building it per call would copy host→device each time."""
    key = (shares, n_tiles, str(device))
    out = _RECOMBINE_CACHE.get(key)
    if out is None:
        out = torch.tensor(shares, dtype=torch.float32).repeat_interleave(n_tiles).to(device)
        _RECOMBINE_CACHE[key] = out
    return out


def _tile(x: torch.Tensor, w: torch.Tensor, rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``(T, K)``) and ``w`` (``(out, K)``) into crossbar tiles along K (zero rows pad the last one).

    Returns views ``(tiles, T, rows)`` and ``(tiles, out, rows)``.
    """
    k = x.shape[-1]
    if rows is None or k <= rows:
        return x.unsqueeze(0), w.unsqueeze(0)
    n_tiles = -(-k // rows)
    pad = n_tiles * rows - k
    if pad:
        x = F.pad(x, (0, pad))
        w = F.pad(w, (0, pad))
    x_t = x.view(x.shape[0], n_tiles, rows).transpose(0, 1)
    w_t = w.view(w.shape[0], n_tiles, rows).transpose(0, 1)
    return x_t, w_t


def analog_matmul(
    x: torch.Tensor,
    w_prog: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: AnalogNoiseConfig,
    ctx: NoiseContext,
    noise: Sequence[NoiseModel],
    differentiable: bool = False,
    saturation: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The analog product ``y ≈ x @ Wᵀ + b`` of float32 ``x`` (``(T, in)``) with programmed weights.

    Args:
        x: layer inputs, ``(tokens, in)``, float32.
        w_prog, w_scale: output of :func:`program_weights`.
        bias: ``(out,)`` or None; added digitally, quantized to the ADC's output grid when the ADC is on.
        config: converters and tiling.
        ctx: noise context (generator, level...).
        noise: the noise models (their ``read`` and ``output`` hooks run here).
        differentiable: ``True`` for the ``full`` gradient mode.
        saturation: when a list and the ADC is on, receives the pass mask of the ADC clip: a bool tensor
            ``(tiles, tokens, out)``, True where the tile's partial sum stays in range (``|y/Δ_out| <= L + ½``, the
            inputs of ``round`` that ``full``'s clamp passes a gradient for); with input slicing, the least
            significant slice's (the one ``full`` routes the gradient through). Measured after the ``output``
            hooks, before a fused trailing output noise.

    Returns:
        ``(tokens, out)`` float32 outputs in the layer's units.
    """
    inplace = not differentiable
    noisy = ctx.level > 0.0
    w = w_prog
    if noisy:
        for model in noise:
            if model.has_hook("read"):
                w = _run_hook(model, model.read, differentiable, w, ctx)

    qmax = 1.0 if config.input_bits is None else float(2 ** (config.input_bits - 1) - 1)
    per_token = config.input_quant == "per_token"
    if inplace:
        x_n, x_absmax = kernels.dac(x, qmax, per_token, config.input_bits is not None)
    else:
        x_n, x_scale = quantize_input(x, config.input_bits, config.input_quant)
        x_absmax = x_scale * qmax
    output_models = [m for m in noise if m.has_hook("output")] if noisy else []
    # Without autograd, a trailing OutputNoise is added inside the ADC epilogue (same key and counters as its hook).
    fused_noise = None
    if inplace and output_models and type(output_models[-1]) is OutputNoise:
        fused_noise = output_models.pop()
    # x ≈ (x_n / qmax) · x_absmax. x_n holds integer levels; the 1/qmax that maps them to [-1, 1] is applied to the
    # products in the epilogue (``in_scale``), unless a hook needs the normalized inputs.
    if output_models:
        x_n = x_n.div_(qmax) if inplace else x_n / qmax
        in_scale = 1.0
    else:
        in_scale = 1.0 / qmax

    if config.input_slice_bits is not None:
        x_int = x_n * qmax if output_models else x_n
        slices, slice_weights = slice_input(x_int, config.input_bits, config.input_slice_bits)
        n_slices = slices.shape[0]
        x_t, w_t = _tile(slices.reshape(-1, slices.shape[-1]), w, config.tile_size)
        n_tiles, rows = x_t.shape[0], x_t.shape[-1]
        x_t = x_t.reshape(n_tiles, n_slices, -1, rows).transpose(0, 1).reshape(n_slices * n_tiles, -1, rows)
        w_t = w_t.unsqueeze(0).expand(n_slices, *w_t.shape).reshape(n_slices * n_tiles, *w_t.shape[1:])
        # Each slice lies in [-1, 1]: its share of the normalized input is slice_weight / qmax.
        shares = [s / qmax for s in slice_weights]
        in_scale = 1.0
    else:
        x_t, w_t = _tile(x_n, w, config.tile_size)
        n_tiles = x_t.shape[0]
        shares = [1.0]
    recombine = _recombine_weights(tuple(shares), n_tiles, x.device)

    y = torch.bmm(x_t, w_t.transpose(1, 2))  # (slices·tiles, T, out); times in_scale: normalized units

    for model in output_models:
        y = _run_hook(model, model.output, differentiable, y, x_t, w_t, ctx)

    w_row = w_scale.reshape(1, -1)
    adc = config.output_bits is not None
    step = config.output_step() if adc else 1.0
    levels = adc_levels(config.output_bits) if adc else 0.0
    if saturation is not None and adc:
        saturation.append(y[:n_tiles].abs() <= (levels + 0.5) * step / in_scale)
    bias_row = None if bias is None else bias.reshape(1, -1).to(torch.float32)
    if inplace:
        noise_std, key = 0.0, None
        if fused_noise is not None:
            noise_std = fused_noise.std * ctx.level
            key = ctx.new_key(y.device) if noise_std > 0.0 else None
        return kernels.epilogue(
            y, recombine, x_absmax, w_row * step, bias_row, 1.0 / step, levels, in_scale, noise_std, key, adc=adc
        )

    y = y * in_scale
    if adc:
        y_int = torch.clamp(round_ste(y * (1.0 / step)), -levels, levels)
        y_sum = (y_int * recombine.reshape(-1, 1, 1)).sum(0)
        unit = x_absmax * (w_row * step)
        if bias_row is None:
            return y_sum * unit
        return (y_sum + round_ste(bias_row / unit)) * unit  # QuantBias: added on the ADC's integer output grid
    y_sum = (y * recombine.reshape(-1, 1, 1)).sum(0)
    out = y_sum * x_absmax * w_row
    return out if bias_row is None else out + bias_row
