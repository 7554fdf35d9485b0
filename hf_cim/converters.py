"""Data converters of an analog tile: the DAC, weight programming, the ADC epilogue, input bit-slicing.

This module is the only Python definition of these formulas (``../docs/noise_models.md``, converters). The same
functions serve both paths of the tile simulation:

* the ``full`` gradient mode (autograd records): out of place, rounding passes the gradient straight through
  (:func:`round_ste`), clipping is differentiated;
* the no-grad STE forward: they are the reference of the fused stages of :mod:`hf_cim.kernels`, which runs them
  as they are (eagerly, or through ``torch.compile`` on CUDA) or runs ``native.c``, a transcription of them.

Everything is float32 in normalized units: inputs in [-1, 1] after the DAC (or integer DAC levels, see ``in_scale``),
weights in [-1, 1] of the per-channel abs-max, partial sums in units of one full-scale row.
"""

from __future__ import annotations

import torch

from . import rng

__all__ = [
    "adc_levels",
    "adc_tiles",
    "dac",
    "dac_clip",
    "dac_pass_mask",
    "epilogue",
    "quantize_input",
    "quantize_weight",
    "rescale",
    "round_ste",
    "slice_input",
    "weight_program",
]

_TINY = 1e-12


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` whose gradient is the identity (straight-through), for the ``full`` gradient mode."""
    return t + (torch.round(t) - t).detach()


def _round(t: torch.Tensor) -> torch.Tensor:
    """Round half to even; straight through (:func:`round_ste`) when autograd records ``t``."""
    return round_ste(t) if t.requires_grad else torch.round(t)


def dac(
    x: torch.Tensor, qmax: float, *, per_token: bool, quantize: bool, static_range: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAC: ``x_int = clip(round(x · qmax / absmax), ±qmax)`` of ``x`` ``(tokens, in)``; returns ``(x_int, absmax)``.

    ``absmax`` is the dynamic abs-max, ``(tokens, 1)`` per token or ``(1, 1)`` for the whole tensor, floored at
    ``1e-12`` (an all-zero token, an empty batch); it is detached: the DAC range is a calibration, not something
    gradients flow through. ``quantize=False`` (no DAC) only scales. ``x ≈ x_int · absmax / qmax``.

    ``static_range`` (a calibrated full scale, ``input_quant="static"``): ``absmax`` is that ``(1, 1)`` constant and
    inputs beyond it clip to ``±qmax`` (also without quantization): :func:`dac_pass_mask` says where.
    """
    if static_range is not None:
        absmax = _static_absmax(static_range, x)
        x_int = x * (qmax / absmax)
        return torch.clamp(_round(x_int) if quantize else x_int, -qmax, qmax), absmax
    with torch.no_grad():
        if per_token:
            absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
        else:  # an empty batch has no abs-max (amax() raises): the tiny floor
            absmax = (x.abs().amax() if x.numel() else x.new_zeros(())).clamp_min(_TINY).reshape(1, 1)
    x_int = x * (qmax / absmax)
    if quantize:
        # Dividing by the abs-max can give qmax·(1 + ε); clipping keeps the level count at 2^bits − 1.
        x_int = torch.clamp(_round(x_int), -qmax, qmax)
    return x_int, absmax


def _static_absmax(static_range: float, x: torch.Tensor) -> torch.Tensor:
    """A static DAC's full scale as the ``(1, 1)`` float32 tensor both :func:`dac` and :func:`dac_pass_mask` divide
    ``qmax`` by (the same float32 quotient, hence the same clip decisions)."""
    return torch.full((1, 1), float(static_range), dtype=torch.float32, device=x.device)


def dac_pass_mask(x: torch.Tensor, qmax: float, static_range: float, *, quantize: bool) -> torch.Tensor:
    """Where a static-range :func:`dac` passes a gradient (its clip does not saturate), elementwise on ``x`` in any
    layout: the same float32 ``x · qmax/absmax`` and the same test as the clamp's, so it equals ``full``'s mask."""
    scaled = x.float() * (qmax / _static_absmax(static_range, x))
    return (torch.round(scaled) if quantize else scaled).abs() <= qmax


def dac_clip(x: torch.Tensor, static_range: float | None) -> torch.Tensor:
    """``x`` as a DAC's range passes it, in ``x``'s own units and before rounding: clipped to ``±static_range``
    (a static DAC, :func:`dac`'s clamp), or ``x`` itself (``None``: an abs-max range always covers its input).

    What the chip is meant to compute is the digital product of this input: a chip's output correction is fitted
    against it, since the clip is the DAC's known transfer, not an error of the array that a per-column gain and
    offset could undo (fitted against the unclipped product, the correction spends its scales and offsets on the
    few clipped outliers and moves every other output; measured on MiniLM in docs/fidelity.md)."""
    if static_range is None:
        return x
    return x.clamp(-float(static_range), float(static_range))


def quantize_input(x: torch.Tensor, bits: int | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dac` by bit count: ``(x_int, scale)`` with ``x ≈ x_int · scale``, ``scale = absmax / qmax``.

    ``x_int`` holds the integer levels ``-(2^(bits-1) − 1) … 2^(bits-1) − 1`` (as float), or the float ratio
    (``qmax = 1``) when ``bits`` is None. ``mode``: ``"per_token"`` or ``"per_tensor"``.
    """
    qmax = 1.0 if bits is None else float(2 ** (bits - 1) - 1)
    x_int, absmax = dac(x, qmax, per_token=mode == "per_token", quantize=bits is not None)
    return x_int, absmax / qmax


def weight_program(
    w: torch.Tensor, qmax: float | None, noise_std: float = 0.0, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization of ``w`` ``(out, in)``, plus additive Gaussian programming noise.

    Returns ``(w_n + σξ, scale)`` with ``scale = max_j |w_ij|`` ``(out, 1)`` (detached, floored at ``1e-12``),
    ``w_n = round(w/scale · qmax)/qmax`` (``w/scale`` when ``qmax`` is None) and ``ξ`` the standard normals
    :func:`hf_cim.rng.randn` of ``key`` at ``w``'s flat indices, the numbers ``NoiseContext.randn_like(w_n)`` draws
    with that key (a fused :class:`hf_cim.noise.GaussianWeightNoise`); no noise when ``key`` is None.
    """
    with torch.no_grad():
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
    w_n = w / scale
    if qmax is not None:
        w_n = _round(w_n * qmax) / qmax
    if key is not None:
        w_n = w_n + noise_std * rng.randn(w_n, key)
    return w_n, scale


def quantize_weight(w: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weight_program` by bit count, without noise: ``(w_n, scale)`` with ``w ≈ w_n · scale``."""
    return weight_program(w, None if bits is None else float(2 ** (bits - 1) - 1))


def adc_levels(bits: int) -> float:
    """Largest ADC output level ``L = 2^(bits−1) − 1``: with ``Δ = 2·b_out/(2^bits − 2)``, ``b_out = L·Δ``."""
    return float(2 ** (bits - 1) - 1)


def adc_step(bits: int, out_bound: float) -> float:
    """ADC step ``Δ_out = 2·b_out/(2^bits − 2)`` in normalized units: ``2^bits − 1`` levels span ``[-b_out, b_out]``."""
    return 2.0 * out_bound / (2**bits - 2)


def adc_tiles(
    y: torch.Tensor,
    in_scale: float,
    inv_step: float,
    levels: float,
    noise_std: float = 0.0,
    key: torch.Tensor | None = None,
    *,
    adc: bool,
) -> torch.Tensor:
    """Each tile's read-out: normalize the partial sums ``y`` (``y·in_scale``), add the output noise ``σξ`` (``ξ`` =
    :func:`hf_cim.rng.randn` of ``key`` at ``y``'s flat indices: a fused :class:`hf_cim.noise.OutputNoise`; none when
    ``key`` is None) and, with the ADC, quantize to its integer levels ``clip(round(·/Δ), ±L)``."""
    out = y * in_scale
    if key is not None:
        out = out + noise_std * rng.randn(y, key)
    if adc:
        out = torch.clamp(_round(out * inv_step), -levels, levels)
    return out


def rescale(
    y_sum: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias_row: torch.Tensor | None,
    *,
    adc: bool,
    factored: bool = False,
) -> torch.Tensor:
    """Back to the layer's units: ``y_sum · x_absmax · row_scale``, plus the bias; with the ADC the bias is added on
    its output grid (QuantBias): ``(y_sum + round(b / unit)) · unit``, ``unit = x_absmax · row_scale``.

    ``factored`` (no ADC only): multiply by ``x_absmax`` and then by ``row_scale`` instead of by their product (the
    ``full`` mode's order since its first release, one float rounding apart; kept so that its numbers stay the same).
    """
    if factored and not adc:
        out = y_sum * x_absmax * row_scale
        return out if bias_row is None else out + bias_row
    unit = x_absmax * row_scale
    if bias_row is None:
        return y_sum * unit
    if not adc:
        return y_sum * unit + bias_row
    return (y_sum + _round(bias_row / unit)) * unit


def epilogue(
    y: torch.Tensor,
    recombine: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias_row: torch.Tensor | None,
    inv_step: float,
    levels: float,
    in_scale: float,
    noise_std: float = 0.0,
    key: torch.Tensor | None = None,
    *,
    adc: bool,
) -> torch.Tensor:
    """The ADC epilogue of the analog partial sums: :func:`adc_tiles`, digital recombination, :func:`rescale`.

    Args:
        y: analog partial sums ``(tiles, T, out)``; ``y·in_scale`` is in normalized units.
        recombine: ``(tiles,)`` digital weights of each tile's output (1, or the input slice's power of two).
        x_absmax: ``(T, 1)`` DAC full-scale per token, or ``(1, 1)`` for every token (a per-tensor DAC).
        row_scale: ``(1, out)`` weight scale, times the ADC step when ``adc``.
        bias_row: ``(1, out)`` bias or None.
        inv_step, levels: ``1/Δ_out`` and the largest ADC level (unused without ``adc``).
        in_scale: factor from ``y``'s units to normalized units (``1/qmax`` when ``y`` holds integer DAC levels).
        noise_std, key: the output noise ``σ`` in normalized units and its key (None: no output noise).
        adc: whether the ADC is on.

    Returns:
        ``(T, out)``. With the ADC:
        ``(Σ_t c_t·clip(round((y_t·s + σξ_t)/Δ), ±L) + round(b/(x_absmax·row_scale))) · x_absmax · row_scale``;
        without: ``Σ_t c_t·(y_t·s + σξ_t) · x_absmax · row_scale + b``.
    """
    y_tiles = adc_tiles(y, in_scale, inv_step, levels, noise_std, key, adc=adc)
    return rescale((y_tiles * recombine.reshape(-1, 1, 1)).sum(0), x_absmax, row_scale, bias_row, adc=adc)


def slice_input(x_int: torch.Tensor, bits: int, slice_bits: int) -> tuple[torch.Tensor, list[float]]:
    """Input bit-slicing (SplitInput): split integer inputs into ``slice_bits``-bit slices of their magnitude.

    Returns ``(slices, weights)``: ``slices`` is ``(n_slices, *x_int.shape)``, each slice holding
    ``sign(x)·digit_k`` scaled to [-1, 1] by ``2^slice_bits − 1``; ``Σ_k weights[k]·slices[k] == x_int`` exactly.
    The sign is applied to every slice (a signed driver per slice), as in the paper's SplitInput.
    """
    magnitude_bits = bits - 1
    n_slices = -(-magnitude_bits // slice_bits)
    base = 2**slice_bits
    digit_max = float(base - 1)
    sign = torch.sign(x_int)
    magnitude = x_int.abs().detach()
    slices = []
    weights = []
    for k in range(n_slices):  # n_slices <= 15: a loop over bit positions, not over elements
        digit = torch.floor(magnitude / base**k).remainder_(base)
        slices.append(sign * digit / digit_max)
        weights.append(digit_max * base**k)
    if x_int.requires_grad:
        # ``full`` mode: the digits are piecewise constant; route the straight-through gradient of the whole input
        # through the least significant slice so that the recombined sum has d/dx = 1.
        slices[0] = slices[0] + (x_int - x_int.detach()) / weights[0]
    return torch.stack(slices), weights
