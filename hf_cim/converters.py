"""Data converters of an analog tile: DAC (QuantInt8), weight quantization, ADC, bias (QuantBias), input bit-slicing.

Formulas: ``../docs/noise_models.md`` (converters). Every function works in normalized units and is written so that
the same code serves the no-grad STE path (``inplace=True``: fewer allocations) and the ``full`` autograd path
(rounding passes the gradient straight through, clipping is differentiated).
"""

from __future__ import annotations

import torch

__all__ = [
    "adc_levels",
    "quantize_input",
    "quantize_weight",
    "round_ste",
    "slice_input",
]

_TINY = 1e-12


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` whose gradient is the identity (straight-through), for the ``full`` gradient mode."""
    return t + (torch.round(t) - t).detach()


def _round(t: torch.Tensor, inplace: bool) -> torch.Tensor:
    return t.round_() if inplace else round_ste(t)


def quantize_input(
    x: torch.Tensor, bits: int | None, mode: str, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAC: scale ``x`` (``(tokens, in)``) into [-1, 1] by its dynamic abs-max and round to ``bits`` bits.

    Returns ``(x_int, scale)`` with ``x ≈ x_int · scale``; ``x_int`` holds the integer levels
    ``-(2^(bits-1) − 1) … 2^(bits-1) − 1`` (as float), or the float ratio times ``qmax = 1`` when ``bits`` is None.
    ``scale`` is ``(tokens, 1)`` for ``"per_token"``, ``(1, 1)`` for ``"per_tensor"``. The scale is detached: the
    DAC range is a calibration, not something gradients flow through.
    """
    with torch.no_grad():
        if mode == "per_token":
            absmax = x.abs().amax(dim=-1, keepdim=True)
        else:  # an empty batch has no abs-max (amax() raises): the tiny floor below
            absmax = (x.abs().amax() if x.numel() else x.new_zeros(())).reshape(1, 1)
        absmax.clamp_(min=_TINY)
    qmax = 1.0 if bits is None else float(2 ** (bits - 1) - 1)
    scale = absmax / qmax
    x_int = x * (qmax / absmax)  # the same float formula as the fused kernel (hf_cim.kernels.dac_eager)
    if bits is not None:
        # Dividing by the abs-max can give qmax·(1 + ε); clipping keeps the level count at 2^bits − 1.
        x_int = _round(x_int, inplace).clamp_(-qmax, qmax) if inplace else _round(x_int, False).clamp(-qmax, qmax)
    return x_int, scale


def quantize_weight(w: torch.Tensor, bits: int | None, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization of ``w`` (``(out, in)``) to normalized levels in [-1, 1].

    Returns ``(w_n, scale)`` with ``w ≈ w_n · scale``, ``scale = max_j |w_ij|`` of shape ``(out, 1)`` (detached)
    and ``w_n = round(w/scale · qmax)/qmax`` with ``qmax = 2^(bits−1) − 1`` (unrounded when ``bits`` is None).
    """
    with torch.no_grad():
        scale = w.abs().amax(dim=1, keepdim=True).clamp_(min=_TINY)
    w_n = w / scale
    if bits is not None:
        qmax = float(2 ** (bits - 1) - 1)
        if inplace:
            w_n = w_n.mul_(qmax).round_().div_(qmax)
        else:
            w_n = round_ste(w_n * qmax) / qmax
    return w_n, scale


def adc_levels(bits: int) -> float:
    """Largest ADC output level ``L = 2^(bits−1) − 1``: with ``Δ = 2·b_out/(2^bits − 2)``, ``b_out = L·Δ``."""
    return float(2 ** (bits - 1) - 1)


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
