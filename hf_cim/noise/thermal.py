"""Temperature: a conductance temperature coefficient with a per-read temperature, and Johnson–Nyquist noise.

* Conductance vs temperature, linearized around a reference: ``g(T) = g·(1 + α_T·(T − T_ref))``. Metallic
  filaments (RRAM) have a positive resistance coefficient (``α_T < 0``); PCM's amorphous phase conducts better when
  warm (``α_T > 0``). The default ``α_T = 10⁻³ /K`` is the order of magnitude quoted in ``docs/noise_models.md``,
  not a fit to one device: set it from your device's data.
* Thermal (Johnson–Nyquist, Phys. Rev. 32, 97 and 110, 1928) noise of the column current:
  ``σ_I = sqrt(4·k_B·T·G_col·Δf)`` with ``G_col`` the total conductance on the column and ``Δf`` the read bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NoiseContext, NoiseModel, check_range, register_noise_model

__all__ = ["BOLTZMANN", "ThermalNoise", "johnson_std"]

BOLTZMANN = 1.380649e-23  # J/K (exact, SI 2019)


def johnson_std(g_col_us: torch.Tensor, temperature: float, bandwidth: float, v_read: float, g_max: float):
    """Johnson noise of column currents in normalized output units.

    ``σ_I = sqrt(4·k_B·T·G_col·Δf)`` amperes with ``G_col`` in µS; the normalized output unit is the current of a
    full-scale input on a full-scale device, ``v_read·g_max``, so ``σ_y = σ_I / (v_read·g_max·10⁻⁶)``.
    """
    sigma_i = torch.sqrt(4.0 * BOLTZMANN * temperature * bandwidth * g_col_us.clamp(min=0.0) * 1e-6)
    return sigma_i / (v_read * g_max * 1e-6)


@register_noise_model("thermal")
@dataclass
class ThermalNoise(NoiseModel):
    """Temperature-dependent conductances (``read`` hook) and Johnson noise on column currents (``output`` hook).

    ``read``: one temperature per crossbar tile and per product, ``T = t_mean + t_std·ξ`` (K); every weight of the
    tile becomes ``w·(1 + level·α_T·(T − t_ref))``. ``output``: ``y_i += level·σ_y,i·ξ`` with
    :func:`johnson_std` at ``T = t_mean`` and ``G_col,i = g_max·Σ_j |W_ij|`` over the tile's rows (the two devices
    of a pair are on two columns whose noise adds; with one of them at zero this is the pair's total conductance).

    Defaults are illustrative (room temperature, a few kelvin of read-to-read spread, a 0.2 V read, 10 MHz
    bandwidth); at ``g_max = 25 µS`` and 512 rows of ``|W| = 0.3`` the Johnson term is 0.0050 normalized units
    (``johnson_std(torch.tensor(512 * 0.3 * 25.0), 300.0, 1e7, 0.2, 25.0)``).

    Args:
        alpha_t: temperature coefficient of conductance ``α_T`` in 1/K (in [-1, 1]).
        t_ref: temperature at which the weights were programmed, in K (> 0).
        t_mean: mean operating temperature in K (> 0).
        t_std: read-to-read temperature spread in K (>= 0).
        johnson: add Johnson noise on the column currents.
        g_max: conductance of ``|w| = 1`` in µS (> 0).
        v_read: read voltage of a full-scale input in V (> 0).
        bandwidth: read bandwidth ``Δf`` in Hz (> 0).
    """

    alpha_t: float = 1e-3
    t_ref: float = 300.0
    t_mean: float = 300.0
    t_std: float = 5.0
    johnson: bool = True
    g_max: float = 25.0
    v_read: float = 0.2
    bandwidth: float = 1e7

    def __post_init__(self) -> None:
        check_range("ThermalNoise", "alpha_t", self.alpha_t, -1.0, 1.0)
        for name in ("t_ref", "t_mean", "g_max", "v_read", "bandwidth"):
            check_range("ThermalNoise", name, getattr(self, name), 0.0, None, low_inclusive=False)
        check_range("ThermalNoise", "t_std", self.t_std, 0.0, 1000.0)
        if not isinstance(self.johnson, bool):
            raise TypeError(f"ThermalNoise: `johnson` must be a bool, got {self.johnson!r}")

    def read(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        if self.alpha_t == 0.0 or ctx.level == 0.0:
            return w
        cols = w.shape[-1]
        rows = ctx.tile_rows if ctx.tile_rows > 0 else cols
        n_tiles = -(-cols // rows)
        temp = self.t_mean + self.t_std * torch.randn(n_tiles, generator=ctx.generator, device=w.device, dtype=w.dtype)
        factor = 1.0 + (ctx.level * self.alpha_t) * (temp - self.t_ref)  # (tiles,)
        return w * factor.repeat_interleave(rows)[:cols]

    def output(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        if not self.johnson or ctx.level == 0.0:
            return y
        g_col = w.detach().abs().sum(dim=-1).unsqueeze(1) * self.g_max  # (tiles, 1, out) in µS
        sigma = johnson_std(g_col, self.t_mean, self.bandwidth, self.v_read, self.g_max) * ctx.level
        noise = ctx.randn_like(y).mul_(sigma)
        if torch.is_grad_enabled() and y.requires_grad:
            return y + noise
        return y.add_(noise)
