"""Resistive RAM (ReRAM / RRAM) programming noise, conductance-dependent, as measured by Wan et al. (2022).

Wan, Kubendran, Schaefer et al., "A compute-in-memory chip based on resistive random-access memory", Nature 608,
504–512 (2022): the standard deviation of the conductance one second after iterative write-verify programming, as a
4th-order polynomial of the target conductance on a 40 µS range (the form aihwkit ships as
``ReRamWan2022NoiseModel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NoiseContext, NoiseModel, check_range, register_noise_model, write_programmed
from .conductance import from_pair, polyval, to_pair

__all__ = ["ReRAMNoise", "reram_programming_std"]

WAN2022_COEFF = (0.348, 16.030, -43.853, 45.393, -16.815)


def reram_programming_std(g_hat: torch.Tensor, g_max: float = 40.0, coeffs=WAN2022_COEFF) -> torch.Tensor:
    """Programming noise σ in normalized units at target ``ĝ``: ``(c0 + c1ĝ + … + c4ĝ⁴) µS / g_max``.

    With Wan 2022's coefficients and ``g_max = 40 µS``: 0.348 µS at ĝ = 0, 2.023 µS at ĝ = 0.5, 1.103 µS at ĝ = 1.
    """
    return polyval(coeffs, g_hat) / g_max


@register_noise_model("reram")
@dataclass
class ReRAMNoise(NoiseModel):
    """ReRAM programming noise: ``g' = clip(ĝ + level·scale·σ(ĝ)·ξ, 0, clip_max)`` on each device of the pair.

    Static (a ``program`` hook): redrawn at every training forward, drawn once per programmed chip. ``σ(ĝ)`` is
    :func:`reram_programming_std` (Wan et al., Nature 608, 2022, one second after programming; no relaxation or
    drift afterwards in this model).

    Args:
        g_max: conductance of ``|w| = 1`` in µS (> 0); the coefficients are absolute µS measured on a 40 µS range,
            so a larger ``g_max`` means relatively less noise.
        coeff: the polynomial's coefficients in µS, lowest order first.
        scale: multiplies σ (>= 0).
        clip_max: upper bound of a programmed conductance in units of ``g_max`` (>= 1), e.g. the device's
            saturation; ``None``: no upper bound.
    """

    g_max: float = 40.0
    coeff: tuple[float, ...] = WAN2022_COEFF
    scale: float = 1.0
    clip_max: float | None = None

    def __post_init__(self) -> None:
        check_range("ReRAMNoise", "g_max", self.g_max, 0.0, None, low_inclusive=False)
        self.coeff = tuple(self.coeff)
        if not self.coeff:
            raise ValueError("ReRAMNoise: `coeff` must hold at least one coefficient, got ()")
        for i, c in enumerate(self.coeff):
            check_range("ReRAMNoise", f"coeff[{i}]", c)
        check_range("ReRAMNoise", "scale", self.scale, 0.0, 100.0)
        if self.clip_max is not None:
            check_range("ReRAMNoise", "clip_max", self.clip_max, 1.0, None)

    def rowwise(self, hook: str, ctx: NoiseContext) -> bool:
        # Element-wise: sigma depends on each device's own conductance.
        return hook == "program" and type(self).program is ReRAMNoise.program

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is ReRAMNoise.program

    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        s = ctx.level * self.scale
        if s == 0.0:
            return w
        if torch.is_grad_enabled() and w.requires_grad:
            return _program(w, self.coeff, self.g_max, s, self.clip_max, ctx.randn_like)
        return self._fused(w, ctx, s, with_derivative=False)[0]

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        # Written in the programming's own pass (the C kernel on the CPU); elsewhere autograd's, on the same draws.
        s = ctx.level * self.scale
        if s == 0.0:
            return w, 1.0
        return self._fused(w, ctx, s, with_derivative=True)

    def _fused(self, w: torch.Tensor, ctx: NoiseContext, s: float, with_derivative: bool):
        """``(programmed w, ∂/∂w or None)`` without autograd: the backend's one pass over the weights (the C kernel on
        the CPU), the same numbers as :meth:`program`'s formula on the same draws."""
        key = ctx.new_key(w.device)
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        derivative = torch.empty_like(out) if with_derivative else None

        def reference(out, derivative, w, coeffs, g_max, s, clip_max, key):  # the sampler's draws for this key
            def program(w):
                return _program(w, coeffs, g_max, s, clip_max, lambda g: ctx.randn_for_key(g, key))

            return write_programmed(out, derivative, program, w)

        ctx.fused("reram_program_", reference, out, derivative, w, self.coeff, self.g_max, s, self.clip_max, key)
        return out, derivative


def _program(w, coeffs, g_max, s, clip_max, randn_like):
    """The programmed weights: each device of the pair moves by ``s·σ(ĝ)·ξ`` (``ξ = randn_like(pair)``), clamped."""
    g = to_pair(w)
    # A polynomial fit may dip below zero outside the measured range: σ is floored at 0.
    sigma = reram_programming_std(g.clamp(max=1.0), g_max, coeffs).clamp(min=0.0) * s
    g = (g + sigma * randn_like(g)).clamp(min=0.0, max=clip_max)
    return from_pair(g)
