"""One analog matrix product: DAC → crossbar tiles → noise hooks → ADC → digital sum → rescale → bias.

Split in two stages so that a programmed chip can keep its static part:

* :func:`program_weights`: quantize the weights per output channel and run the noise models' ``program`` hooks
  (what the devices store). Training calls it at every forward; :func:`hf_cim.program_chip` once per chip.
* :func:`analog_matmul`: ``read`` hooks, DAC, the per-tile products (one batched matmul, no Python loop over tiles;
  a partly used last tile in a second product over its real rows only),
  ``output`` hooks, ADC per tile (and per input slice), digital recombination, rescale, bias.

Both take a :class:`TileSpec` (the converters and the tiling, nothing else of the config). Everything runs in float32
in normalized units. The converter formulas are :mod:`hf_cim.converters`'; with ``differentiable=True`` (``full``
mode) they run as autograd ops, rounding straight through; with ``differentiable=False`` (the STE paths, under
``no_grad``) they run as the fused stages of :mod:`hf_cim.kernels`, which also draw the noise of a leading ``program``
and a trailing ``output`` model that declare themselves additive Gaussian (:meth:`NoiseModel.additive_gaussian`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import converters, kernels
from .converters import adc_levels, slice_input
from .noise.base import NoiseContext, NoiseModel

__all__ = [
    "TileSpec",
    "analog_matmul",
    "clean_partial_sums",
    "program_weights",
    "program_weights_with_derivative",
    "programs_elementwise",
]


@dataclass(frozen=True)
class TileSpec:
    """The converters and crossbar tiling of an analog product: what the tile simulation reads of a config.

    Build it with :meth:`from_config` (cached: one object per distinct setting).

    Args:
        input_bits: DAC bits or None (no DAC).
        input_qmax: largest DAC level ``2^(bits−1) − 1`` (1 without a DAC).
        per_token: the DAC's abs-max per token (else per tensor).
        static_range: the DAC has a calibrated full scale per layer (``input_quant="static"``), not an abs-max.
        weight_qmax: largest weight level, or None for float weights.
        output_bits: ADC bits or None (no ADC).
        adc_step: the ADC step ``Δ_out`` in normalized units (1 without an ADC).
        adc_levels: the largest ADC level ``L`` (0 without an ADC).
        tile_size: crossbar rows per tile, or None (untiled).
        input_slice_bits: bits per input slice, or None (no slicing).
    """

    input_bits: int | None
    input_qmax: float
    per_token: bool
    static_range: bool
    weight_qmax: float | None
    output_bits: int | None
    adc_step: float
    adc_levels: float
    tile_size: int | None
    input_slice_bits: int | None

    @property
    def adc(self) -> bool:
        return self.output_bits is not None

    @classmethod
    def from_config(cls, config: Any) -> TileSpec:
        """The spec of an :class:`hf_cim.AnalogNoiseConfig` (a spec is returned as it is)."""
        if isinstance(config, TileSpec):
            return config
        return _spec(
            config.input_bits,
            config.input_quant,
            config.weight_bits,
            config.output_bits,
            config.output_step() if config.output_bits is not None else 1.0,
            config.tile_size,
            config.input_slice_bits,
        )


@functools.lru_cache(maxsize=256)
def _spec(input_bits, input_quant, weight_bits, output_bits, step, tile_size, input_slice_bits) -> TileSpec:
    return TileSpec(
        input_bits=input_bits,
        input_qmax=1.0 if input_bits is None else float(2 ** (input_bits - 1) - 1),
        per_token=input_quant == "per_token",
        static_range=input_quant == "static",
        weight_qmax=None if weight_bits is None else float(2 ** (weight_bits - 1) - 1),
        output_bits=output_bits,
        adc_step=step,
        adc_levels=adc_levels(output_bits) if output_bits is not None else 0.0,
        tile_size=tile_size,
        input_slice_bits=input_slice_bits,
    )


def _with_sampler(ctx: NoiseContext) -> NoiseContext:
    """Hand the backend's sampler to the hooks (unless the caller chose one)."""
    if ctx.sampler is None:
        ctx.sampler = kernels.SAMPLER
    return ctx


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
    spec: TileSpec,
    ctx: NoiseContext,
    noise: Sequence[NoiseModel],
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (``(out, in)``, float32) per output channel and apply the ``program`` hooks.

    Returns ``(w_prog, scale)``: normalized programmed weights and the per-channel scale ``(out, 1)``.
    Without autograd, a leading model whose ``program`` hook is additive Gaussian
    (:meth:`NoiseModel.additive_gaussian`) is drawn inside the weight programming kernel (same key, same numbers).
    """
    spec = TileSpec.from_config(spec)
    _with_sampler(ctx)
    models = _program_models(noise, ctx)
    if differentiable:
        w_n, scale = converters.weight_program(w, spec.weight_qmax)
        ctx.weight_scale = scale
    else:
        w_n, scale, models = _fused_weight_program(w, spec, ctx, models)
    for model in models:
        w_n = _run_hook(model, model.program, differentiable, w_n, ctx)
    return w_n, scale


def _program_models(noise: Sequence[NoiseModel], ctx: NoiseContext) -> list[NoiseModel]:
    """The models whose ``program`` hook runs at ``ctx``'s level (none at level 0)."""
    return [m for m in noise if m.has_hook("program")] if ctx.level > 0.0 else []


def _leading_gaussian(models: list[NoiseModel]) -> tuple[float | None, list[NoiseModel]]:
    """``(std, the rest)`` when the first model is additive Gaussian (drawn inside the quantizer's pass), else
    ``(None, models)``."""
    std = models[0].additive_gaussian("program") if models else None
    return (std, models[1:]) if std is not None else (None, models)


def _fused_weight_program(
    w: torch.Tensor, spec: TileSpec, ctx: NoiseContext, models: list[NoiseModel]
) -> tuple[torch.Tensor, torch.Tensor, list[NoiseModel]]:
    """The quantizer's pass without autograd, a leading additive Gaussian ``program`` model drawn inside it; returns
    ``(w_n, scale, the models left to run)`` and sets ``ctx.weight_scale``."""
    fused, models = _leading_gaussian(models)
    std = 0.0 if fused is None else fused * ctx.level
    key = ctx.new_key(w.device) if std > 0.0 else None
    w_n, scale = kernels.weight_program(w, spec.weight_qmax, std, key)
    ctx.weight_scale = scale
    return w_n, scale, models


def programs_elementwise(noise: Sequence[NoiseModel], ctx: NoiseContext) -> bool:
    """Whether :func:`program_weights_with_derivative` can program ``w`` for this ``noise`` at ``ctx``'s level: every
    ``program`` hook that would run acts on each weight on its own (:meth:`NoiseModel.elementwise_derivative`), or is
    the leading additive Gaussian the quantizer's pass draws."""
    return all(m.elementwise_derivative("program", ctx) for m in _leading_gaussian(_program_models(noise, ctx))[1])


def program_weights_with_derivative(
    w: torch.Tensor, spec: TileSpec, ctx: NoiseContext, noise: Sequence[NoiseModel]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`program_weights` without autograd, the same draws and values, with the element-wise derivative of the
    programmed weights in the layer's units (``w_n·scale``) by ``w``: the quantizer straight through with its
    per-channel scale fixed (a derivative of 1), times each ``program`` hook's closed form
    (:meth:`NoiseModel.program_derivative`) at its input. ``program_gradient``'s STE backward multiplies the crossbar's
    weight gradient by it: the gradient autograd would take through :func:`program_weights`, one weight-sized product
    instead of the programming's graph. Returns ``(w_n, scale, derivative)``, the derivative None where it is 1
    everywhere. Only where :func:`programs_elementwise` holds."""
    spec = TileSpec.from_config(spec)
    _with_sampler(ctx)
    w_n, scale, models = _fused_weight_program(w, spec, ctx, _program_models(noise, ctx))
    derivative: torch.Tensor | None = None
    for model in models:
        w_n, d = model.program_derivative(w_n, ctx)
        if isinstance(d, torch.Tensor):
            derivative = d if derivative is None else derivative * d  # (a model's own tensor is not written to)
        elif d != 1.0:
            derivative = torch.full_like(w_n, d) if derivative is None else derivative * d
    return w_n, scale, derivative


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


#: Whether this torch's CUDA ``bmm`` takes ``out_dtype`` (float32 products of half-precision operands); None: untried.
_OUT_DTYPE: dict[str, bool | None] = {"cuda": None}


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` in float32: operands in float32 as they are, half-precision ones multiplied exactly as
    given and accumulated and returned in float32 (cuBLAS's float32 output on CUDA; elsewhere, or under autograd, a
    float32 product of the same operand values)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if (
        a.is_cuda
        and _OUT_DTYPE["cuda"] is not False
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    ):
        try:
            y = torch.bmm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE["cuda"] = True
            return y
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # an older torch: the float32 product below gives the same numbers
            _OUT_DTYPE["cuda"] = False
    return torch.bmm(a.float(), b.float())


def operand_dtype(precision: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the crossbar product's operands for ``product_precision`` and the layer's compute dtype."""
    if precision == "autocast" and compute_dtype in (torch.bfloat16, torch.float16):
        return compute_dtype
    return torch.float32


def _tiled_product(
    x: torch.Tensor, w: torch.Tensor, rows: int | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(tiles, T, out)`` float32: each tile's partial sums ``x_tile @ w_tileᵀ``, the last tile over its real rows
    only, with the operands in ``dtype`` (see :func:`_bmm`).

    The numbers are those of :func:`_tile`'s zero-padded tiles (the padded rows add exact zeros; the same values bit
    for bit with the CPU's BLAS, ``tests/test_tile.py``), without the padded rows' multiply-adds: a 384-wide input on
    256-row tiles no longer costs a 512-wide product.
    """
    if dtype != torch.float32:
        x, w = x.to(dtype), w.to(dtype)
    k = x.shape[-1]
    if rows is None or k <= rows or k % rows == 0:
        x_t, w_t = _tile(x, w, rows)
        return _bmm(x_t, w_t.transpose(1, 2))
    n_full = k // rows
    y = torch.empty(n_full + 1, x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    split = n_full * rows
    x_full = x[:, :split].reshape(x.shape[0], n_full, rows).transpose(0, 1)
    w_full = w[:, :split].reshape(w.shape[0], n_full, rows).transpose(0, 1)
    if dtype == torch.float32:
        torch.bmm(x_full, w_full.transpose(1, 2), out=y[:n_full])
        torch.mm(x[:, split:], w[:, split:].t(), out=y[n_full])
    else:
        y[:n_full] = _bmm(x_full, w_full.transpose(1, 2))
        y[n_full] = _bmm(x[:, split:].unsqueeze(0), w[:, split:].t().unsqueeze(0))[0]
    return y


def analog_matmul(
    x: torch.Tensor,
    w_prog: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    spec: TileSpec,
    ctx: NoiseContext,
    noise: Sequence[NoiseModel],
    differentiable: bool = False,
    saturation: list[torch.Tensor] | None = None,
    input_range: float | None = None,
    product_dtype: torch.dtype = torch.float32,
    output_step: float | None = None,
) -> torch.Tensor:
    """The analog product ``y ≈ x @ Wᵀ + b`` of float32 ``x`` (``(T, in)``) with programmed weights.

    Args:
        x: layer inputs, ``(tokens, in)``, float32.
        w_prog, w_scale: output of :func:`program_weights`.
        bias: ``(out,)`` or None; added digitally, quantized to the ADC's output grid when the ADC is on.
        spec: converters and tiling (:class:`TileSpec`; a config is turned into one).
        ctx: noise context (generator, level...).
        noise: the noise models (their ``read`` and ``output`` hooks run here).
        differentiable: ``True`` for the ``full`` gradient mode.
        saturation: when a list and the ADC is on, receives the pass mask of the ADC clip: a bool tensor
            ``(tiles, tokens, out)``, True where the tile's partial sum stays in range (``|y/Δ_out| <= L + ½``, the
            inputs of ``round`` that ``full``'s clamp passes a gradient for); with input slicing, the least
            significant slice's (the one ``full`` routes the gradient through). Measured after the ``output``
            hooks, before a fused trailing output noise.
        input_range: the layer's calibrated DAC full scale (``spec.static_range``; required then, unused
            otherwise): inputs beyond it clip.
        output_step: the layer's own ADC step (a calibrated range, ``AnalogNoiseConfig.output_ranges``) in
            normalized units, instead of the spec's; unused without an ADC.
        product_dtype: the dtype of the crossbar products' operands (float32, or a half precision: see
            ``AnalogNoiseConfig.product_precision`` and :func:`operand_dtype`); they accumulate in float32.

    Returns:
        ``(tokens, out)`` float32 outputs in the layer's units.
    """
    spec = TileSpec.from_config(spec)
    _with_sampler(ctx)
    inplace = not differentiable
    noisy = ctx.level > 0.0
    w = w_prog
    if noisy:
        for model in noise:
            if model.has_hook("read"):
                w = _run_hook(model, model.read, differentiable, w, ctx)

    qmax = spec.input_qmax
    quantize = spec.input_bits is not None
    if spec.static_range:
        if input_range is None:
            raise ValueError("analog_matmul: a static-range DAC (input_quant='static') needs the layer's input_range")
        x_n, x_absmax = converters.dac(x, qmax, per_token=False, quantize=quantize, static_range=input_range)
    elif inplace:
        x_n, x_absmax = kernels.dac(x, qmax, spec.per_token, quantize)
    else:
        x_n, absmax = converters.dac(x, qmax, per_token=spec.per_token, quantize=quantize)
        # ``full`` has always rescaled by the DAC step absmax/qmax times qmax (one ulp from absmax for some tokens):
        # kept, so that its numbers stay the same.
        x_absmax = absmax / qmax * qmax
    output_models = [m for m in noise if m.has_hook("output")] if noisy else []
    # Without autograd, a trailing additive Gaussian output model is drawn inside the ADC epilogue (same key and
    # counters as its hook).
    fused_std = None
    if inplace and output_models:
        fused_std = output_models[-1].additive_gaussian("output")
        if fused_std is not None:
            output_models.pop()
    # x ≈ (x_n / qmax) · x_absmax. x_n holds integer levels; the 1/qmax that maps them to [-1, 1] is applied to the
    # products in the epilogue (``in_scale``), unless a hook needs the normalized inputs.
    if output_models:
        x_n = x_n.div_(qmax) if inplace else x_n / qmax
        in_scale = 1.0
    else:
        in_scale = 1.0 / qmax

    if spec.input_slice_bits is not None:
        x_int = x_n * qmax if output_models else x_n
        slices, slice_weights = slice_input(x_int, spec.input_bits, spec.input_slice_bits)
        n_slices = slices.shape[0]
        x_t, w_t = _tile(slices.reshape(-1, slices.shape[-1]), w, spec.tile_size)
        n_tiles, rows = x_t.shape[0], x_t.shape[-1]
        x_t = x_t.reshape(n_tiles, n_slices, -1, rows).transpose(0, 1).reshape(n_slices * n_tiles, -1, rows)
        w_t = w_t.unsqueeze(0).expand(n_slices, *w_t.shape).reshape(n_slices * n_tiles, *w_t.shape[1:])
        # Each slice lies in [-1, 1]: its share of the normalized input is slice_weight / qmax.
        shares = [s / qmax for s in slice_weights]
        in_scale = 1.0
        ctx.last_tile_rows = 0  # every slice's last tile is padded: the tiles interleave, none is skipped
    else:
        x_t = w_t = None
        if output_models or differentiable:
            # The hooks see whole crossbars: a partly used last tile is a full-size array whose extra rows carry no
            # input and no conductance (IR-drop's row count and positions are the physical array's).
            x_t, w_t = _tile(x_n, w, spec.tile_size)
            used = x_n.shape[-1] - (x_t.shape[0] - 1) * x_t.shape[-1]
            ctx.last_tile_rows = used if used < x_t.shape[-1] else 0
        shares = [1.0]
    if differentiable or spec.input_slice_bits is not None:
        # (slices·tiles, T, out); times in_scale: normalized units
        y = _bmm(x_t.to(product_dtype), w_t.to(product_dtype).transpose(1, 2))
    else:
        y = _tiled_product(x_n, w, spec.tile_size, product_dtype)  # the same sums, without the padded rows' work
    n_tiles = y.shape[0] // len(shares)
    recombine = _recombine_weights(tuple(shares), n_tiles, x.device)

    for model in output_models:
        y = _run_hook(model, model.output, differentiable, y, x_t, w_t, ctx)

    adc = spec.adc
    step = spec.adc_step if output_step is None or not adc else float(output_step)
    levels = spec.adc_levels
    if saturation is not None and adc:
        saturation.append(kernels.within(y[:n_tiles], (levels + 0.5) * step / in_scale))
    row_scale = w_scale.reshape(1, -1) * step
    bias_row = None if bias is None else bias.reshape(1, -1).to(torch.float32)
    if inplace:
        noise_std, key = 0.0, None
        if fused_std is not None:
            noise_std = fused_std * ctx.level
            key = ctx.new_key(y.device) if noise_std > 0.0 else None
        return kernels.epilogue(
            y, recombine, x_absmax, row_scale, bias_row, 1.0 / step, levels, in_scale, noise_std, key, adc=adc
        )
    y_tiles = converters.adc_tiles(y, in_scale, 1.0 / step, levels, adc=adc)
    y_sum = (y_tiles * recombine.reshape(-1, 1, 1)).sum(0)
    return converters.rescale(y_sum, x_absmax, row_scale, bias_row, adc=adc, factored=True)


def clean_partial_sums(
    x: torch.Tensor, w: torch.Tensor, spec: TileSpec, input_range: float | None = None
) -> torch.Tensor:
    """What the ADCs read without noise: each tile's partial sums ``(tiles, T, out)`` in normalized units (inputs
    through the DAC into [-1, 1], weights quantized per channel over their scale), for float32 ``x`` ``(T, in)`` and
    ``w`` ``(out, in)``; ``input_range`` is a static DAC's full scale. The quantity an ADC's range is set against
    (:func:`hf_cim.calibration.calibrate_output_ranges`)."""
    spec = TileSpec.from_config(spec)
    w_n, _ = converters.weight_program(w, spec.weight_qmax)
    qmax = spec.input_qmax
    quantize = spec.input_bits is not None
    if spec.static_range:
        if input_range is None:
            raise ValueError("clean_partial_sums: a static-range DAC (input_quant='static') needs the input_range")
        x_n, _ = converters.dac(x, qmax, per_token=False, quantize=quantize, static_range=input_range)
    else:
        x_n, _ = converters.dac(x, qmax, per_token=spec.per_token, quantize=quantize)
    return _tiled_product(x_n / qmax, w_n, spec.tile_size)
