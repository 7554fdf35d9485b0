"""The per-column output correction of a chip's digital periphery: ``y ← a·y + b``, fitted by least squares.

One definition of the fit for both places it runs: :func:`hf_cim.calibration.calibrate_chip_outputs` (a programmed
chip, from sums accumulated over calibration batches) and a noise-aware training forward with
``train_output_correction`` (each sampled chip, from the batch it computes). ``y`` is the chip's output, ``y₀`` the
digital output for the same input, both ``(vectors, out)``.
"""

from __future__ import annotations

import torch

__all__ = ["CHIP_CORRECTIONS", "column_sums", "correct_on_batch", "fit_correction"]

#: The forms of the fit: a scale and an offset per output column, or one scale per layer through the origin.
CHIP_CORRECTIONS = ("affine", "gain")


def column_sums(y: torch.Tensor, y0: torch.Tensor) -> list:
    """``[Σy, Σy₀, Σy², Σy·y₀, n]`` per column of ``(vectors, out)`` outputs, in float64 (sums of several batches
    add up element by element)."""
    y, y0 = y.double(), y0.double()
    return [y.sum(0), y0.sum(0), (y * y).sum(0), (y * y0).sum(0), y.shape[0]]


def fit_correction(sums: list, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` per output column, float32, from :func:`column_sums`: ``"affine"``: ``a = cov(y, y₀)/var(y)``,
    ``b = mean(y₀) − a·mean(y)`` (a column whose chip output does not vary: ``a = 1``); ``"gain"``:
    ``a = Σy·y₀/Σy²`` for every column, ``b = 0``."""
    sy, sy0, syy, syy0, n = sums
    if kind == "gain":
        scale = (syy0.sum() / syy.sum()).expand_as(sy)
        offset = torch.zeros_like(sy)
    else:
        mean, mean0 = sy / n, sy0 / n
        var = syy / n - mean * mean
        varies = var > 1e-12 * (syy / n)  # a constant column: its cancellation error, not a variance
        scale = torch.where(varies, (syy0 / n - mean * mean0) / var.where(varies, 1.0), 1.0)
        offset = mean0 - scale * mean
    return scale.float(), offset.float()


def correct_on_batch(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, kind: str
) -> torch.Tensor:
    """``a·y + b`` with ``(a, b)`` fitted on this batch itself: ``y`` the chip's ``(vectors, out)`` output for the
    input rows ``x`` ``(vectors, in)`` as its DAC passes them (:func:`hf_cim.converters.dac_clip`), against the
    digital ``x·wᵀ + bias`` (``w`` ``(out, in)``). ``a`` and ``b`` are constants to autograd."""
    with torch.no_grad():
        y_clean = x.detach().float() @ w.detach().float().t()
        if bias is not None:
            y_clean += bias.detach().float()
        scale, offset = fit_correction(column_sums(y.detach(), y_clean), kind)
    return torch.addcmul(offset, y, scale)
