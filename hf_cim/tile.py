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

from .config import AnalogNoiseConfig
from .converters import adc_levels, quantize_input, quantize_weight, round_ste, slice_input
from .noise.base import NoiseContext, NoiseModel

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
    """
    w_n, scale = quantize_weight(w, config.weight_bits, inplace=not differentiable)
    ctx.weight_scale = scale
    if ctx.level > 0.0:
        for model in noise:
            if model.has_hook("program"):
                w_n = _run_hook(model, model.program, differentiable, w_n, ctx)
    return w_n, scale


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

    x_n, x_scale = quantize_input(x, config.input_bits, config.input_quant, inplace=inplace)
    if config.input_bits is not None:
        qmax = float(2 ** (config.input_bits - 1) - 1)
    else:
        qmax = 1.0
    # x_n holds integer levels: the 1/qmax that maps them to [-1, 1] is folded into the (small) weight tensor
    # unless a hook needs the normalized inputs.
    output_models = [m for m in noise if m.has_hook("output")] if noisy else []
    x_absmax = x_scale * qmax  # x ≈ (x_n / qmax) · x_absmax: the DAC's full-scale range per token
    if output_models:
        x_n = x_n.div_(qmax) if inplace else x_n / qmax
        w_mm = w
    else:
        w_mm = w / qmax

    if config.input_slice_bits is not None:
        # Slices of the integer input: rescale to integers first if x_n was normalized above.
        x_int = x_n * qmax if output_models else x_n
        slices, slice_weights = slice_input(x_int, config.input_bits, config.input_slice_bits)
        n_slices = slices.shape[0]
        x_t, w_t = _tile(slices.reshape(-1, slices.shape[-1]), w, config.tile_size)
        n_tiles, rows = x_t.shape[0], x_t.shape[-1]
        x_t = x_t.reshape(n_tiles, n_slices, -1, rows).transpose(0, 1).reshape(n_slices * n_tiles, -1, rows)
        w_t = w_t.unsqueeze(0).expand(n_slices, *w_t.shape).reshape(n_slices * n_tiles, *w_t.shape[1:])
        # Each slice lies in [-1, 1]: the slice's share of x_n is slice_weight / qmax.
        recombine = torch.tensor([s / qmax for s in slice_weights], dtype=x.dtype, device=x.device).repeat_interleave(
            n_tiles
        )
    else:
        x_t, w_t = _tile(x_n, w if output_models else w_mm, config.tile_size)
        recombine = None

    y = torch.bmm(x_t, w_t.transpose(1, 2))  # (tiles[*slices], T, out), normalized units

    for model in output_models:
        y = _run_hook(model, model.output, differentiable, y, x_t, w_t, ctx)

    if config.output_bits is not None:
        step = config.output_step()
        levels = adc_levels(config.output_bits)
        if inplace:
            y = y.div_(step).round_().clamp_(-levels, levels)
        else:
            y = torch.clamp(round_ste(y / step), -levels, levels)
        out_unit = step
    else:
        out_unit = 1.0

    if recombine is not None:
        y = torch.tensordot(recombine, y, dims=1)
    elif y.shape[0] == 1:
        y = y[0]
    else:
        y = y.sum(0)

    # Back to the layer's units: per-token input scale × per-channel weight scale (× ADC step).
    row_scale = w_scale.reshape(1, -1) * out_unit
    if bias is not None and config.output_bits is not None:
        # QuantBias: the bias is added digitally on the ADC's integer output grid.
        b_int = bias.reshape(1, -1).float() / row_scale / x_absmax
        b_int = b_int.round_() if inplace else round_ste(b_int)
        y = y.add_(b_int) if inplace else y + b_int
        bias = None
    if inplace:
        y = y.mul_(x_absmax).mul_(row_scale)
    else:
        y = y * x_absmax * row_scale
    if bias is not None:
        y = y.add_(bias.float()) if inplace else y + bias.float()
    return y
