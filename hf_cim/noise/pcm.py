"""Phase-change memory (PCM): programming noise, conductance drift, accumulated 1/f read noise, drift compensation.

The statistical PCM model of Nandakumar et al., "Phase-change memory models for deep learning training and
inference", ICECS 2019 (measured on 1 million devices of a doped-Ge₂Sb₂Te₅ PCM array), in the form IBM aihwkit
implements as ``PCMLikeNoiseModel`` (Joshi et al., Nat. Commun. 11, 2473, 2020). Conductances are in µS; the hooks
work in normalized units ``ĝ = g/g_max`` on the two devices of each differential pair
(:mod:`hf_cim.noise.conductance`).

Time convention (aihwkit's): ``t_inference`` counts seconds after the first read, which happens ``t0 = 20 s`` after
programming, so the device has aged ``t = t_inference + t0`` seconds: no drift at ``t_inference = 0`` and the 1/f
read noise accumulated over ``[t_read, t]`` is already 3.7 % (relative, at ``ĝ = 1``) then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import NoiseContext, NoiseModel, autograd_derivative, check_range, register_noise_model, write_programmed
from .conductance import from_pair, polyval, to_pair

__all__ = ["PCMNoise", "pcm_drift_exponent_stats", "pcm_programming_std", "pcm_read_std"]

_G_MIN = 1e-7  # floor of ĝ inside logarithms and powers (aihwkit's _ZERO_CLIP)
_PROG_DIVISOR = 25.0  # σ_prog's polynomial is in µS at g_max = 25 µS


def pcm_programming_std(g_hat: torch.Tensor, coeffs=(0.26348, 1.9650, -1.1731)) -> torch.Tensor:
    """Programming noise σ in normalized units (fraction of ``g_max``) at target ``ĝ``.

    ``σ_prog = (c0 + c1·ĝ + c2·ĝ²)·(g_max/25) µS`` (Nandakumar 2019, measured at ``g_max = 25 µS``); divided by
    ``g_max`` this is ``poly(ĝ)/25`` whatever ``g_max`` is: 0.01054 at ĝ = 0, 0.04220 at ĝ = 1.
    """
    return polyval(coeffs, g_hat) / _PROG_DIVISOR


def pcm_drift_exponent_stats(g_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the drift exponent ``ν`` at ``ĝ`` (Nandakumar 2019; aihwkit).

    ``μ_ν = clip(−0.0155·ln ĝ + 0.0244, 0.049, 0.1)``, ``σ_ν = clip(−0.0125·ln ĝ − 0.0059, 0.008, 0.045)``.
    """
    log_g = torch.log(g_hat.clamp(min=_G_MIN))
    mu = (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1)
    sigma = (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)
    return mu, sigma


def pcm_read_std(g_hat: torch.Tensor, t: float, t_read: float = 250e-9) -> torch.Tensor:
    """Relative σ of the 1/f read noise accumulated up to ``t`` seconds after programming (Nandakumar 2019).

    ``Q_s = min(0.0088/ĝ^0.65, 0.2)``, ``σ_r = Q_s·sqrt(ln((t + t_read)/(2·t_read)))`` (0 when ``t < t_read``).
    """
    q_s = (0.0088 / g_hat.clamp(min=_G_MIN).pow(0.65).clamp(min=1e-3)).clamp(max=0.2)
    return q_s * _read_time_factor(t, t_read)


def _read_time_factor(t: float, t_read: float) -> float:
    """``sqrt(ln((t + t_read)/(2·t_read)))``, 0 when ``t < t_read``: the 1/f noise accumulated over ``[t_read, t]``."""
    return math.sqrt(max(0.0, math.log((t + t_read) / (2.0 * t_read))))


def _program_devices(g: torch.Tensor, xi: torch.Tensor, coeffs, scale: float) -> torch.Tensor:
    """The programming step on device conductances ``g``: ``max(0, g + scale·σ_prog(g)·ξ)``."""
    return (g + pcm_programming_std(g, coeffs) * scale * xi).clamp(min=0.0)


@register_noise_model("pcm")
@dataclass
class PCMNoise(NoiseModel):
    """PCM-like devices: programming noise, drift to ``t_inference`` and accumulated 1/f read noise.

    ``program`` (static; drawn per device of each differential pair, in this order, whatever ``t_inference`` is,
    so that one chip seed gives the same devices and the same drift exponents at every time):

    1. programming noise: ``g_prog = max(0, ĝ + level·prog_noise_scale·σ_prog(ĝ)·ξ₁)`` (:func:`pcm_programming_std`);
    2. drift exponent: ``ν = level·max(0, μ_ν(ĝ) + σ_ν(ĝ)·ξ₂)`` (:func:`pcm_drift_exponent_stats`) and
       ``g_drift = g_prog·(t/t0)^(−ν)`` with ``t = t_inference + t0``;
    3. global drift compensation (``drift_compensation=True``, only when ``t_inference > 0``): the chip reads an
       all-ones probe input right after programming and at ``t``; outputs are multiplied by
       ``α = mean|Σ_j w_prog,ij| / mean|Σ_j w_drift,ij|`` (aihwkit's ``GlobalDriftCompensation``). The factor is
       folded into the stored weights, which is exact for the product; it differs from a digital output scaling only
       in that output noise, IR-drop and the ADC see the compensated rather than the drifted column currents.

    ``read`` (dynamic, every product): ``w' = w·max(0, 1 + level·read_noise_scale·σ_r(|w|, t)·ξ)``
    (:func:`pcm_read_std`). Applied to the net weight of the pair (a hook sees only ``g⁺ − g⁻``), with ``ĝ = |w|``.

    ``g_max`` does not enter the normalized formulas (σ_prog is quoted relative to ``g_max/25 µS``); it fixes
    the units in which results are reported (``g = ĝ·g_max`` µS).

    Args:
        g_max: conductance of ``|w| = 1`` in µS (> 0). Default 25 µS (Nandakumar 2019).
        prog_coeff: programming-noise polynomial ``(c0, c1, c2)`` in µS at ``g_max = 25 µS``.
        prog_noise_scale: multiplies the programming noise (>= 0).
        drift: draw drift exponents and drift to ``t_inference``.
        drift_scale: multiplies ``ν`` (>= 0).
        read_noise_scale: multiplies the 1/f read noise (>= 0).
        t0: seconds between programming and the first read (> 0). Default 20 s.
        t_read: duration of one read in seconds (> 0). Default 250 ns.
        drift_compensation: global drift compensation with an all-ones probe.
    """

    g_max: float = 25.0
    prog_coeff: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    prog_noise_scale: float = 1.0
    drift: bool = True
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    t0: float = 20.0
    t_read: float = 250e-9
    drift_compensation: bool = True

    def __post_init__(self) -> None:
        check_range("PCMNoise", "g_max", self.g_max, 0.0, None, low_inclusive=False)
        self.prog_coeff = tuple(self.prog_coeff)
        if not self.prog_coeff:
            raise ValueError("PCMNoise: `prog_coeff` must hold at least one coefficient, got ()")
        for i, c in enumerate(self.prog_coeff):
            check_range("PCMNoise", f"prog_coeff[{i}]", c)
        for name in ("prog_noise_scale", "drift_scale", "read_noise_scale"):
            check_range("PCMNoise", name, getattr(self, name), 0.0, 100.0)
        check_range("PCMNoise", "t0", self.t0, 0.0, None, low_inclusive=False)
        check_range("PCMNoise", "t_read", self.t_read, 0.0, None, low_inclusive=False)
        for name in ("drift", "drift_compensation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PCMNoise: `{name}` must be a bool, got {getattr(self, name)!r}")

    def rowwise(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is PCMNoise.program and not self._compensates(ctx)

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is PCMNoise.program and not self._compensates(ctx)

    def _compensates(self, ctx: NoiseContext) -> bool:
        # Element-wise, except the global drift compensation (a mean over all rows), which only acts when t > 0.
        return self.drift and self.drift_compensation and ctx.t_inference > 0.0

    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        if (torch.is_grad_enabled() and w.requires_grad) or self._drifts(ctx):
            return self._formula(w, ctx)
        # No drift to apply: the programming step alone, the backend's one pass (the C kernel on the CPU).
        return self._programmed(w, ctx, with_derivative=False)[0]

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        if self._drifts(ctx):  # drift without compensation (element-wise): autograd's derivative of the formula
            return autograd_derivative(lambda leaf: self._formula(leaf, ctx), w)
        # The programming step alone: its derivative written in the same pass.
        return self._programmed(w, ctx, with_derivative=True)

    def _drifts(self, ctx: NoiseContext) -> bool:
        return self.drift and float(ctx.t_inference) > 0.0

    def _programmed(self, w: torch.Tensor, ctx: NoiseContext, with_derivative: bool):
        """``(from_pair(g_prog), ∂/∂w or None)`` without autograd, where no drift applies: the programming step in
        the backend's one pass, the same numbers as :meth:`_formula` on the same draws (and the drift exponents'
        key taken, as the formula draws them at every ``t``)."""
        key = ctx.new_key(w.device)
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        derivative = torch.empty_like(out) if with_derivative else None
        scale = ctx.level * self.prog_noise_scale

        def reference(out, derivative, w, coeffs, divisor, s, clip_max, key):  # the sampler's draws for this key
            def step(w):
                g = to_pair(w)
                return from_pair(_program_devices(g, ctx.randn_for_key(g, key), coeffs, s))

            return write_programmed(out, derivative, step, w)

        ctx.fused("pcm_program_", reference, out, derivative, w, self.prog_coeff, _PROG_DIVISOR, scale, None, key)
        if self.drift:
            ctx.new_key(w.device)  # ξ_ν's key: one chip seed gives the same devices whatever t is
        return out, derivative

    def _formula(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        g = to_pair(w)  # (2, out, in) targets ĝ
        g_prog = _program_devices(g, ctx.randn_like(g), self.prog_coeff, ctx.level * self.prog_noise_scale)
        if not self.drift:
            return from_pair(g_prog)
        xi_nu = ctx.randn_like(g)  # drawn at every t: the same chip seed gives the same ν at every t
        t_inference = float(ctx.t_inference)
        if t_inference <= 0.0:
            return from_pair(g_prog)
        mu, sig = pcm_drift_exponent_stats(g)
        nu = (mu + sig * xi_nu).clamp(min=0.0) * (ctx.level * self.drift_scale)
        w_prog = from_pair(g_prog)
        w_drift = from_pair(g_prog * torch.exp(-nu * math.log((t_inference + self.t0) / self.t0)))
        if self.drift_compensation:
            r0 = w_prog.sum(dim=1).abs().mean()
            r_t = w_drift.sum(dim=1).abs().mean()
            w_drift = w_drift * (r0 / r_t.clamp(min=1e-12))
        return w_drift

    def read(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        scale = ctx.level * self.read_noise_scale
        if scale == 0.0:
            return w
        t = float(ctx.t_inference) + self.t0
        if torch.is_grad_enabled() and w.requires_grad:
            return _read(w, t, self.t_read, scale, ctx.randn_like)
        # Without autograd (every STE forward): the backend's one pass over the weights (the C kernel on the CPU).
        key = ctx.new_key(w.device)
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        sqrt_log = _read_time_factor(t, self.t_read)

        def reference(out, w, g_min, sqrt_log, scale, key):  # the sampler's draws for this key
            return out.copy_(_read(w, t, self.t_read, scale, lambda v: ctx.randn_for_key(v, key)))

        return ctx.fused("pcm_read_", reference, out, w, _G_MIN, sqrt_log, scale, key)


def _read(w: torch.Tensor, t: float, t_read: float, scale: float, randn_like) -> torch.Tensor:
    """``w·max(0, 1 + scale·σ_r(|w|, t)·ξ)``, ``ξ = randn_like(w)`` (the spread not differentiated)."""
    sigma = pcm_read_std(w.detach().abs(), t, t_read) * scale
    return w * (1.0 + sigma * randn_like(w)).clamp(min=0.0)
