"""Weights ↔ conductances of a differential pair, shared by the device models (PCM, ReRAM, stuck-at faults).

A weight is stored as two devices, ``w = g⁺ − g⁻`` (normalized: ``|w| = 1`` ↔ ``g_max``): ``g⁺ = max(w, 0)``,
``g⁻ = max(−w, 0)``; the unused device of each pair is programmed to zero conductance (the usual mapping, e.g.
aihwkit's ``SinglePairConductanceConverter``). Device models perturb both devices independently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["from_pair", "polyval", "to_pair"]


def to_pair(w: torch.Tensor) -> torch.Tensor:
    """Normalized weights ``(...)`` → normalized conductances ``(2, ...)``: ``[g⁺, g⁻]``, each in [0, |w|max]."""
    return torch.stack((w.clamp(min=0.0), (-w).clamp(min=0.0)))


def from_pair(g: torch.Tensor) -> torch.Tensor:
    """Normalized conductances ``(2, ...)`` → weights ``g⁺ − g⁻``."""
    return g[0] - g[1]


def polyval(coeffs: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """``Σ_k coeffs[k]·x^k`` (Horner's scheme, lowest order first)."""
    out = torch.full_like(x, float(coeffs[-1]))
    for c in reversed(coeffs[:-1]):  # a handful of coefficients: a loop over polynomial order, not elements
        out = out * x + float(c)
    return out
