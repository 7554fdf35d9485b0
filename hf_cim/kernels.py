"""Fused elementwise kernels of the no-grad analog path (the ``ste`` and ``ste_detach`` forwards).

Eagerly, the DAC (abs-max, scale, round, clip) and the ADC epilogue (scale, round, clip, tile sum, QuantBias,
rescale) are a dozen passes over ``(tokens, features)`` tensors; on a CPU they cost as much as the noise sampling.
Here each is one function that ``torch.compile`` fuses into a single loop. The random draws stay outside the
compiled region (they use the layer's own ``torch.Generator``), and the compiled functions compute exactly the same
formula as the eager ones (the test suite checks they agree).

Compilation is on by default where it works; set ``HF_CIM_COMPILE=0`` to use the eager versions (the test suite
does, to avoid compile time), or call :func:`set_compile`. A failure to compile (no C++ compiler, an unsupported
backend) falls back to eager with one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

__all__ = ["adc_epilogue", "compile_enabled", "dac", "set_compile"]

logger = logging.getLogger(__name__)

_TINY = 1e-12
_state: dict[str, object] = {"enabled": None, "compiled": {}, "failed": set()}


def set_compile(enabled: bool | None) -> None:
    """Force the fused (compiled) kernels on or off; ``None`` goes back to ``HF_CIM_COMPILE`` (default on)."""
    _state["enabled"] = enabled


def compile_enabled() -> bool:
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return os.environ.get("HF_CIM_COMPILE", "1").lower() not in ("0", "false", "no", "off")


def dac_eager(x: torch.Tensor, qmax: float, per_token: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DAC: ``x_int = clip(round(x · qmax / absmax), ±qmax)``; returns ``(x_int, absmax)``, absmax ``(T, 1)``."""
    if per_token:
        absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    else:
        absmax = x.abs().amax().clamp_min(_TINY).reshape(1, 1)
    x_int = x * (qmax / absmax)
    if quantize:
        x_int = torch.clamp(torch.round(x_int), -qmax, qmax)
    return x_int, absmax


def adc_epilogue_eager(
    y: torch.Tensor,
    recombine: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias_row: torch.Tensor,
    inv_step: float,
    levels: float,
) -> torch.Tensor:
    """ADC per tile, digital recombination, QuantBias and rescale.

    Args:
        y: analog partial sums ``(tiles, T, out)`` in normalized units.
        recombine: ``(tiles,)`` digital weights of each tile's output (1, or the input slice's power of two).
        x_absmax: ``(T, 1)`` DAC full-scale per token; row_scale: ``(1, out)`` weight scale × ADC step.
        bias_row: ``(1, out)`` bias (zeros when the layer has none).
        inv_step, levels: ``1/Δ_out`` and the largest ADC level.

    Returns:
        ``(T, out)``: ``(Σ_t c_t·clip(round(y_t/Δ), ±L) + round(b/(x_absmax·row_scale))) · x_absmax · row_scale``.
    """
    y_int = torch.clamp(torch.round(y * inv_step), -levels, levels)
    y_sum = (y_int * recombine.reshape(-1, 1, 1)).sum(0)
    unit = x_absmax * row_scale
    return (y_sum + torch.round(bias_row / unit)) * unit


def _compiled(name: str, fn: Callable) -> Callable:
    cache: dict = _state["compiled"]  # type: ignore[assignment]
    if name not in cache:
        cache[name] = torch.compile(fn, dynamic=True)
    return cache[name]


def _call(name: str, fn: Callable, *args):
    failed: set = _state["failed"]  # type: ignore[assignment]
    if compile_enabled() and name not in failed and not torch.is_grad_enabled():
        try:
            return _compiled(name, fn)(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
            failed.add(name)
            logger.warning("hf_cim: torch.compile of %s failed (%s); using the eager kernel", name, err)
    return fn(*args)


def dac(x: torch.Tensor, qmax: float, per_token: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The DAC, fused when compilation is on and no autograd is recording."""
    return _call("dac", dac_eager, x, qmax, per_token, quantize)


def adc_epilogue(y, recombine, x_absmax, row_scale, bias_row, inv_step, levels) -> torch.Tensor:
    """The ADC epilogue, fused when compilation is on and no autograd is recording."""
    return _call("adc_epilogue", adc_epilogue_eager, y, recombine, x_absmax, row_scale, bias_row, inv_step, levels)
