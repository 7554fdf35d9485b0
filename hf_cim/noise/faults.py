"""Stuck-at faults: devices frozen at zero (stuck-off) or full conductance (stuck-on), drawn once at programming.

The standard fault model of resistive crossbars (e.g. Chen et al., "RRAM defect modeling and failure analysis based
on march test and a novel squeeze-search scheme", IEEE Trans. Computers 64, 2015; aihwkit's ``set_weights`` fault
simulation). Each device of a differential pair fails independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NoiseContext, NoiseModel, check_range, register_noise_model, write_programmed
from .conductance import from_pair, to_pair

__all__ = ["StuckAtFaults"]


@register_noise_model("stuck_at")
@dataclass
class StuckAtFaults(NoiseModel):
    """Each device is stuck-off (``g = 0``) with probability ``level·p_off`` and stuck-on (``g = g_max``) with
    probability ``level·p_on``, independently for ``g⁺`` and ``g⁻`` (the two are clipped so that they sum to <= 1).

    Static (a ``program`` hook): one uniform draw per device; a programmed chip keeps its faulty devices. A weight
    ``w = 0.5`` therefore reads 0.5 (both devices fine), 0 (``g⁺`` off, or both on), 1 (``g⁺`` on) or −0.5 / 0.5 − 1
    (``g⁻`` on); the tests check these fractions.

    Args:
        p_off: probability that a device is stuck at zero conductance (in [0, 1]).
        p_on: probability that a device is stuck at ``g_max`` (in [0, 1]); ``p_off + p_on <= 1``.
    """

    p_off: float = 0.01
    p_on: float = 0.001

    def __post_init__(self) -> None:
        check_range("StuckAtFaults", "p_off", self.p_off, 0.0, 1.0)
        check_range("StuckAtFaults", "p_on", self.p_on, 0.0, 1.0)
        if self.p_off + self.p_on > 1.0:
            raise ValueError(f"StuckAtFaults: `p_off` + `p_on` must be <= 1, got {self.p_off} + {self.p_on}")

    def rowwise(self, hook: str, ctx: NoiseContext) -> bool:
        # Element-wise: one draw per device.
        return hook == "program" and type(self).program is StuckAtFaults.program

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is StuckAtFaults.program

    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        return self._programmed(w, ctx, with_derivative=False)[0]

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        # Written in the faults' own pass (the C kernel on the CPU): 1 per device that is not stuck and carries w.
        return self._programmed(w, ctx, with_derivative=True)

    def _programmed(self, w: torch.Tensor, ctx: NoiseContext, with_derivative: bool):
        """``(w with its stuck devices, ∂/∂w or None)``; without autograd the backend's one pass over the weights,
        the same numbers as the formula on the same uniforms."""
        p_off = min(1.0, self.p_off * ctx.level)
        p_on = min(1.0 - p_off, self.p_on * ctx.level)
        if p_off == 0.0 and p_on == 0.0:
            return w, (1.0 if with_derivative else None)
        u = ctx.rand_like(w.expand(2, *w.shape))  # one uniform per device of each pair: g⁺'s, then g⁻'s
        if torch.is_grad_enabled() and w.requires_grad and not with_derivative:
            return _stick(w, u, p_off, p_on), None
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        derivative = torch.empty_like(out) if with_derivative else None

        def reference(out, derivative, w, u, p_off, p_on):
            return write_programmed(out, derivative, lambda w: _stick(w, u, p_off, p_on), w)

        ctx.fused("stuck_at_", reference, out, derivative, w, u, p_off, p_on)
        return out, derivative


def _stick(w: torch.Tensor, u: torch.Tensor, p_off: float, p_on: float) -> torch.Tensor:
    """``w`` with each device of its pairs stuck off where ``u < p_off`` and on where ``p_off <= u < p_off + p_on``."""
    g = to_pair(w)
    g = torch.where(u < p_off, torch.zeros_like(g), g)
    g = torch.where((u >= p_off) & (u < p_off + p_on), torch.ones_like(g), g)
    return from_pair(g)
