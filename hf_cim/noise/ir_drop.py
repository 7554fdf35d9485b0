"""IR-drop: the wire resistance of a crossbar lowers the voltage across devices far from the read-out.

First-order analytic model, as in IBM aihwkit's forward pass (``IOParameters.ir_drop``, ``ir_drop_g_ratio``; Rasch
et al., "Hardware-aware training for large-scale and diverse deep learning inference workloads using in-memory
computing-based accelerators", Nat. Commun. 14, 5282, 2023). IBM's tile-circuit study (arXiv 2506.00004) finds
IR-drop the most significant circuit non-ideality. The full resistive-network solve (Kirchhoff's laws on the
crossbar, as Sandia CrossSim does) is not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    NoiseContext,
    NoiseModel,
    check_range,
    check_spread_dtype,
    register_noise_model,
    resolve_spread_dtype,
    spread_bmm,
)

__all__ = ["COLUMN_CURRENT_MODES", "IRDrop", "ir_drop_position_weights"]

COLUMN_CURRENT_MODES = ("exact", "mean")


def ir_drop_position_weights(rows: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``p_j = 1 − (1 − j/n)²`` for rows ``j = 0 … n−1`` of a tile (row 0 sits next to the column read-out).

    Why this shape and direction: a column (bit line) is held at virtual ground by the read-out at one end and every
    device injects its current into it. The wire segment ``k`` rows from the read-out carries the current of all the
    ``n − k`` devices beyond it, so the bit-line voltage at a device ``d`` rows away is ``r·Σ_{k<d} I·(n − k)``
    ``≈ r·I·n²·(u − u²/2)`` with ``u = d/n``: zero next to the read-out, largest at the far end, and
    ``(2u − u²) = 1 − (1 − u)²`` once normalized. That raised bit-line voltage is subtracted from the voltage across
    the device, so its current (and its contribution to ``y``) shrinks: IR-drop always pulls outputs towards zero.
    """
    u = torch.arange(rows, device=device, dtype=dtype) / rows
    return 1.0 - (1.0 - u) ** 2


@register_noise_model("ir_drop")
@dataclass
class IRDrop(NoiseModel):
    """Deterministic, input- and position-dependent IR-drop on each tile's analog output (an ``output`` hook).

    With ``n`` the rows of the tile, ``x`` its (DAC) inputs and ``W`` its weights in normalized units:
    ``a_i = (n/γ)·Σ_j |W_ij|·|x_j|`` (the column's total current relative to the wire conductance),
    ``c_i = a_i·(0.05·a_i² − 0.2·a_i + 0.5)`` (> 0 for every ``a_i > 0``), and
    ``y_i ← y_i − level·scale·c_i·Σ_j W_ij·x_j·p_j`` with :func:`ir_drop_position_weights` ``p_j``.

    Properties the tests check: zero at zero input; no randomness; grows with the tile rows ``n`` and with the input
    magnitude (``c_i`` grows with ``a_i`` ∝ ``n·|x|``; the product itself grows with ``|x|``).

    ``column_current="mean"`` replaces ``Σ_j |W_ij|·|x_j|`` by ``(Σ_j |W_ij|)·mean_j |x_j|`` (the current if
    every row carried the token's mean input magnitude): it ignores how the active rows line up with the large
    weights, changes only the magnitude ``c_i`` of the correction (not its position or sign dependence), and saves
    one of the two extra matrix products.

    Cost: two extra matrix products per tile (``|x|·|W|ᵀ`` and ``(x·p)·Wᵀ``); one with ``column_current="mean"``.
    The first only sizes the correction: its terms are non-negative, so by default (``current_dtype="auto"``: in
    bfloat16 where the device multiplies it natively, :func:`hf_cim.noise.base.fast_bfloat16_products`; in float32
    elsewhere) it runs as a bfloat16 product with float32 accumulation (:func:`hf_cim.noise.base.spread_bmm`, about
    a fifth of the float32 cost on CPUs with bfloat16 instructions) and ``a_i`` stays within ``(1 + 2^-8)^3 − 1 < 1.2 %`` of
    the float32 value for every output whatever the data (observed <= 0.85 % on LLM-like data with outlier
    features); ``c_i``, hence the correction, follows ``a_i`` with no larger relative error (``(dc/da)·a/c`` lies in
    (0.7, 1] for ``a <= 1``; ``a <= n²/γ < 0.5`` at the presets' tiles).
    ``tests/test_noise_ir_drop.py`` holds the correction within 1 % of float32's, relative, per output, on Linear,
    Conv1D and Conv2d layers with 1 to 3 tiles. The second product, ``Σ_j W_ij·x_j·p_j``, is a signed sum shaped
    like the signal: it can cancel to about zero, where no bound relative to its value holds for a rounded product.
    By default (``position_dtype="auto"``, as above) it also runs as a bfloat16 product, with the bound a rounded dot
    product does have: within ``(1 + 2^-8)^3 − 1 < 1.2 %`` of ``Σ_j |W_ij·x_j·p_j|``, the size of its terms, for every
    output (``tests/test_noise_ir_drop.py``; the correction within 1 % in norm there). The correction is itself a
    small part of the signal, so its error is a far smaller one.
    ``current_dtype="float32"`` and ``position_dtype="float32"`` are the exact reference.

    Args:
        scale: IR-drop strength ``s`` (dimensionless, >= 0); aihwkit's training preset uses 1.0.
        g_ratio: ``γ``, the ratio of the wire-segment conductance to ``g_max`` (> 0). Default 5.7·10⁵ (aihwkit's
            ``ir_drop_g_ratio`` default).
        column_current: ``"exact"`` (one matrix product) or ``"mean"`` (rank-one estimate, see above).
        current_dtype: ``"auto"`` (default), ``"bfloat16"`` or ``"float32"`` (the exact reference): the precision of
            the column current product ``Σ_j |W_ij|·|x_j|`` (see above).
        position_dtype: ``"auto"`` (default), ``"bfloat16"`` or ``"float32"`` (the exact reference): the precision
            of the position-weighted product ``Σ_j W_ij·x_j·p_j`` (see above).
    """

    scale: float = 1.0
    g_ratio: float = 5.7e5
    column_current: str = "exact"
    current_dtype: str = "auto"
    position_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_range("IRDrop", "scale", self.scale, 0.0, 1000.0)
        check_range("IRDrop", "g_ratio", self.g_ratio, 0.0, None, low_inclusive=False)
        if self.column_current not in COLUMN_CURRENT_MODES:
            raise ValueError(
                f"IRDrop: `column_current` must be one of {COLUMN_CURRENT_MODES}, got {self.column_current!r}"
            )
        check_spread_dtype("IRDrop", "current_dtype", self.current_dtype)
        check_spread_dtype("IRDrop", "position_dtype", self.position_dtype)

    def output(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        s = ctx.level * self.scale
        if s == 0.0:
            return y
        grad = torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or w.requires_grad)
        a, y_pos = self.terms(x, w, s, ctx.tile_rows, ctx.last_tile_rows)
        if grad:
            a, y_pos = a.to(y.dtype), y_pos.to(y.dtype)
            return y - a * (0.05 * a * a - 0.2 * a + 0.5) * y_pos
        return ctx.fused("ir_drop_", _correct_, y, a, y_pos)  # the backend's one pass, or the formula below

    def terms(
        self, x: torch.Tensor, w: torch.Tensor, s: float, array_rows: int | None = None, last_tile_rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, s·Σ_j W_ij·x_j·p_j)`` per tile, token and output (``(tiles, T, out)`` each), the exact column current
        in ``current_dtype``; the correction is ``a·(0.05a² − 0.2a + 0.5)`` times the second.

        ``array_rows`` (``ctx.tile_rows``): the rows ``n`` of the physical array. A layer narrower than the array
        uses its first ``k < n`` rows, next to the read-out: the wire is still ``n`` rows long, so ``n`` and the
        positions ``j/n`` are the array's, exactly as for the zero-padded last tile of a wider layer. None or
        smaller than ``x``'s width: ``x``'s width. ``last_tile_rows`` (``ctx.last_tile_rows``): the last tile's rows
        that carry input; its products skip the rest (zero padding: the same sums)."""
        used = x.shape[-1]
        rows = max(used, array_rows or 0)
        pos = ir_drop_position_weights(rows, device=x.device, dtype=x.dtype)[:used]
        current_dtype = resolve_spread_dtype(self.current_dtype, x.device)
        position_dtype = resolve_spread_dtype(self.position_dtype, x.device)
        dtype = w.dtype
        if current_dtype == position_dtype == "bfloat16" and w.dtype == torch.float32:
            dtype = torch.bfloat16  # rounded once for both products (|round(w)| = round(|w|): the same numbers)
        # Each tile a plain transposed matrix: a tile of a wider layer is a strided view, which bmm would copy for
        # each of the two products.
        w_t = w.to(dtype, memory_format=torch.contiguous_format).transpose(1, 2)
        # Constant factors go on the small (tokens × rows) operands, not on the (tokens × out) results.
        x_abs = x.abs() * (rows / self.g_ratio)
        if self.column_current == "exact":
            a = spread_bmm(x_abs, w_t.abs(), current_dtype, last_tile_rows)  # (tiles, T, out)
        else:  # (tiles, T, 1) · (tiles, 1, out)
            a = torch.bmm(x_abs.mean(dim=-1, keepdim=True), w.abs().sum(dim=-1).unsqueeze(1))
        # Bounded by its terms' size (class doc).
        y_pos = spread_bmm(x * (pos * s), w_t, position_dtype, last_tile_rows)
        return a, y_pos


def _correct_(y: torch.Tensor, a: torch.Tensor, y_pos: torch.Tensor) -> torch.Tensor:
    """``y -= a·(0.05a² − 0.2a + 0.5)·y_pos`` in place, the polynomial as ``((0.05a − 0.2)a + 0.5)a`` (the order of
    the backend's fused ``ir_drop_`` stage); ``a`` and ``y_pos`` may be bfloat16 (read exactly in ``y``'s dtype)."""
    a, y_pos = a.to(y.dtype), y_pos.to(y.dtype)
    c = torch.mul(a, 0.05).sub_(0.2).mul_(a).add_(0.5).mul_(a)
    return y.sub_(c.mul_(y_pos))
