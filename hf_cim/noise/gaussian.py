"""Generic statistical noise: additive and lognormal weight noise, output noise, output-referred read noise.

The additive forms follow noise-aware training since Joshi et al., Nat. Commun. 11, 2473 (2020), and aihwkit(-lightning)'s
``WeightNoiseType.ADDITIVE_CONSTANT`` / ``PCM_READ`` and ``out_noise``; the lognormal form is the device-to-device
variation used for RRAM (e.g. the paper arXiv 2508.11940's lognormal noise levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import NoiseContext, NoiseModel, check_range, check_spread_dtype, register_noise_model, spread_bmm

__all__ = [
    "READ_NOISE_DRAWS",
    "READ_NOISE_SHAPES",
    "GaussianWeightNoise",
    "LogNormalNoise",
    "OutputNoise",
    "ReadNoise",
]

READ_NOISE_SHAPES = ("constant", "pcm")
READ_NOISE_DRAWS = ("token", "batch")


@register_noise_model("gaussian_weight")
@dataclass
class GaussianWeightNoise(NoiseModel):
    """Additive programming noise relative to the weights' abs-max: ``w' = w + level·std·max|W|·ξ``.

    Static (a ``program`` hook): redrawn at every training forward, drawn once per programmed chip.

    Args:
        std: standard deviation relative to the abs-max (dimensionless, in [0, 10]). 0.02 means 2 % of the
            largest conductance.
        per_channel: ``True``: relative to each output channel's abs-max (each column of the crossbar uses its own
            conductance range); ``False``: relative to the whole tensor's abs-max.
    """

    std: float = 0.02
    per_channel: bool = True

    def __post_init__(self) -> None:
        check_range("GaussianWeightNoise", "std", self.std, 0.0, 10.0)
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"GaussianWeightNoise: `per_channel` must be a bool, got {self.per_channel!r}")

    def additive_gaussian(self, hook: str) -> float | None:
        # Per channel, the noise is additive in the normalized units the hook sees (fused into weight programming).
        if hook == "program" and self.per_channel and type(self).program is GaussianWeightNoise.program:
            return self.std
        return None

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is GaussianWeightNoise.program

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        return self.program(w, ctx), 1.0  # additive noise of a spread that does not depend on w

    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return w
        if self.per_channel or ctx.weight_scale is None:
            return w + sigma * ctx.randn_like(w)
        # Normalized units are per channel: the tensor abs-max is max_scale / channel_scale in channel i's units.
        scale = ctx.weight_scale
        relative = scale.amax() / scale.clamp_min(torch.finfo(scale.dtype).tiny)
        return w + (sigma * relative) * ctx.randn_like(w)


@register_noise_model("output_noise")
@dataclass
class OutputNoise(NoiseModel):
    """Additive Gaussian noise on each tile's analog output before the ADC: ``y += level·std·ξ``.

    Models the thermal and shot noise of the column read-out and the ADC's input-referred noise, in the normalized
    units where a full-scale input (``|x| = 1``) on a full-scale weight (``|w| = 1``) gives 1 per row.

    Args:
        std: standard deviation in normalized output units (>= 0). aihwkit's inference default is 0.06 and its
            hardware-aware training preset 0.04.
    """

    std: float = 0.04

    def __post_init__(self) -> None:
        check_range("OutputNoise", "std", self.std, 0.0, 100.0)

    def additive_gaussian(self, hook: str) -> float | None:
        # Fused into the ADC epilogue when it is the last output hook.
        if hook == "output" and type(self).output is OutputNoise.output:
            return self.std
        return None

    def output(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return y
        if torch.is_grad_enabled() and y.requires_grad:
            return y + sigma * ctx.randn_like(y)
        # No autograd: add in place, without a (tiles × tokens × out) temporary, in the hot path.
        return ctx.add_randn_(y, sigma)


@register_noise_model("lognormal")
@dataclass
class LogNormalNoise(NoiseModel):
    """Multiplicative device-to-device variation: ``g' = g·exp(σ·ξ)`` with ``σ = level·std``, i.e. ``ln g' ~ N(ln g, σ²)``.

    Static (a ``program`` hook). A weight is a differential pair ``w = g⁺ − g⁻`` of which only one device is
    programmed away from zero, and a multiplicative error leaves a zero conductance at zero, so the model acts on
    each weight: ``w' = w·exp(σ·ξ)`` (sign kept, zero weights stay zero).

    Moments (the tests check them): ``E[w'/w] = exp(σ²/2)``, ``Var[ln(w'/w)] = σ²``. With ``mean_corrected=True``
    the factor is ``exp(σ·ξ − σ²/2)`` so that ``E[w'] = w`` (the weights are unbiased; the median shrinks).

    The exponent is clipped to ``±MAX_LOG_FACTOR`` (20: a factor within [2e-9, 5e8]): no device varies by more,
    and at the top of the ranges (``std = 5`` at ``level = 100``: ``σ = 500``) ``exp`` would overflow float32 to inf,
    which a zero weight or input turns into NaN. Below ``σ ≈ 4`` the clip changes fewer than one draw in 10^6.

    Args:
        std: ``σ`` of ``ln g`` (dimensionless, in [0, 5]) at ``level = 1``. The ``"paper"`` preset uses 0.1 per
            unit of ``level`` (see :mod:`hf_cim.presets`).
        mean_corrected: subtract ``σ²/2`` in the exponent so that the mean conductance is unchanged.
    """

    MAX_LOG_FACTOR: ClassVar[float] = 20.0

    std: float = 0.1
    mean_corrected: bool = False

    def __post_init__(self) -> None:
        check_range("LogNormalNoise", "std", self.std, 0.0, 5.0)
        if not isinstance(self.mean_corrected, bool):
            raise TypeError(f"LogNormalNoise: `mean_corrected` must be a bool, got {self.mean_corrected!r}")

    def rowwise(self, hook: str, ctx: NoiseContext) -> bool:
        # Element-wise: each weight gets its own factor.
        return hook == "program" and type(self).program is LogNormalNoise.program

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        return hook == "program" and type(self).program is LogNormalNoise.program

    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return w
        if torch.is_grad_enabled() and w.requires_grad:
            return w * self._factor(ctx.randn_like(w), sigma)
        return self._fused(w, ctx, sigma, with_factor=False)[0]

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        # w·η is linear in w: its derivative is the factor η itself, written in the same pass.
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return w, 1.0
        return self._fused(w, ctx, sigma, with_factor=True)

    def _factor(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """``η = exp(clamp(σ·z − shift))`` of standard normals ``z`` (overwritten)."""
        log_factor = z.mul_(sigma)
        if self.mean_corrected:
            log_factor.sub_(0.5 * sigma * sigma)
        return log_factor.clamp_(-self.MAX_LOG_FACTOR, self.MAX_LOG_FACTOR).exp_()

    def _fused(self, w: torch.Tensor, ctx: NoiseContext, sigma: float, with_factor: bool):
        """``(w·η, η or None)`` without autograd: the backend's one pass over the weights (the C kernel on the CPU,
        its ``exp`` within 2 ulp of torch's), the draws :meth:`program` takes."""
        key = ctx.new_key(w.device)
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        factor = torch.empty_like(out) if with_factor else None
        shift = 0.5 * sigma * sigma if self.mean_corrected else 0.0

        def reference(out, factor, w, sigma, shift, max_log, key):  # the same draws: the sampler's, for this key
            eta = self._factor(ctx.randn_for_key(w, key), sigma)
            if factor is not None:
                factor.copy_(eta)
            return out.copy_(w * eta)

        ctx.fused("lognormal_program_", reference, out, factor, w, sigma, shift, self.MAX_LOG_FACTOR, key)
        return out, factor


@register_noise_model("read_noise")
@dataclass
class ReadNoise(NoiseModel):
    """Weight read noise: fresh for every token (output-referred, the default) or once per product (on the weights).

    ``draw="token"`` (an ``output`` hook on each tile, before the ADC): ``shape="constant"``: ``y_i += σ·‖x‖₂·ξ_i``,
    exactly the output of fresh ``N(0, σ²)`` noise on every weight (``Σ_j δW_ij·x_j`` has variance ``σ²·Σ_j x_j²``);
    ``shape="pcm"``: ``y_i += σ·sqrt(Σ_j |W_ij|·x_j²)·ξ_i``, the variance of read noise whose variance is proportional
    to the conductance ``|W_ij|`` (aihwkit's ``WeightNoiseType.PCM_READ``). Every token gets its own draw.

    ``draw="batch"`` (a ``read`` hook): ``W'_ij = W_ij + σ·ξ_ij`` (``constant``) or ``W_ij + σ·sqrt(|W_ij|)·ξ_ij``
    (``pcm``), drawn once per product and shared by all its tokens. Each output of each token has the same
    distribution as with ``draw="token"``; the tokens of one product see the same weights, as for read noise that is
    slow against the time of one product (PCM read noise is 1/f: most of its power is at low frequencies), and as
    aihwkit-lightning's training-time weight noise (``modifier``), drawn once per mini-batch. It needs no extra matrix
    product: the ``pcm`` shape's ``Σ_j |W_ij|·x_j²`` is not computed. In the ``full`` gradient mode the spread
    ``sqrt(|W|)`` is not differentiated (its derivative is unbounded at ``W = 0``).

    ``σ = level·std``. Sums run over the rows of one tile, in normalized units (``|x| <= 1`` after the DAC,
    ``|W| <= 1`` ↔ ``g_max``).

    The ``pcm`` shape's ``Σ_j |W_ij|·x_j²`` (``draw="token"``) sets only the spread of the noise, never the signal:
    by default (``spread_dtype="auto"``) it is one bfloat16 product with float32 accumulation
    (:func:`hf_cim.noise.base.spread_bmm`) where the device multiplies bfloat16 natively
    (:func:`hf_cim.noise.base.fast_bfloat16_products`; about a fifth of a float32 product's cost on CPUs with AMX or
    AVX512-BF16), and a float32 product elsewhere (on an AVX2-only CPU a bfloat16 product costs some 38× a float32
    one). All its terms are non-negative, so the bfloat16 variance is within 1.2 % of the float32 one for every
    output whatever the data, and the spread ``σ·sqrt(·)`` within 0.6 % (``tests/test_noise_gaussian.py`` holds it to
    1 %, relative, per output): far below the uncertainty of ``std`` itself. ``spread_dtype="float32"`` is the exact
    reference, ``"bfloat16"`` the rounded product on any device. The
    draws (``ξ``) and the signal ``y`` are the same either way.

    Args:
        std: ``σ`` in normalized weight units (in [0, 10]). aihwkit's hardware-aware training preset: 0.0175
            (``w_noise``, ``PCM_READ``).
        shape: ``"constant"`` or ``"pcm"`` (with ``draw="token"``, ``"pcm"`` costs one more matrix product per tile).
        draw: ``"token"`` or ``"batch"`` (see above).
        spread_dtype: ``"auto"`` (default), ``"bfloat16"`` or ``"float32"`` (the exact reference): the precision of
            the ``pcm`` shape's spread product (see above).
    """

    std: float = 0.0175
    shape: str = "pcm"
    draw: str = "token"
    spread_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_range("ReadNoise", "std", self.std, 0.0, 10.0)
        if self.shape not in READ_NOISE_SHAPES:
            raise ValueError(f"ReadNoise: `shape` must be one of {READ_NOISE_SHAPES}, got {self.shape!r}")
        if self.draw not in READ_NOISE_DRAWS:
            raise ValueError(f"ReadNoise: `draw` must be one of {READ_NOISE_DRAWS}, got {self.draw!r}")
        check_spread_dtype("ReadNoise", "spread_dtype", self.spread_dtype)

    def has_hook(self, hook: str) -> bool:
        # Which hook runs depends on ``draw``, not only on the class.
        if hook == "output":
            return self.draw == "token"
        if hook == "read":
            return self.draw == "batch"
        return super().has_hook(hook)

    def read(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return w
        if torch.is_grad_enabled() and w.requires_grad:
            xi = ctx.randn_like(w)
            spread = w.detach().abs().clamp(min=1e-12).sqrt() if self.shape == "pcm" else 1.0
            return w + xi * spread * sigma
        if self.shape == "constant":
            return ctx.add_randn_(w.clone(), sigma)
        return ctx.add_scaled_randn_(w.clone(), w.abs(), sigma, sqrt_scale=True)

    def output(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return y
        grad = torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or w.requires_grad)
        if self.shape == "constant":
            spread = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (tiles, T, 1)
            if grad:
                return y + ctx.randn_like(y) * spread * sigma
            return y.add_(ctx.randn_like(y).mul_(spread), alpha=sigma)
        var = self.variance(x, w, ctx.last_tile_rows)
        if grad:
            # The floor keeps the ``full`` mode's gradient finite where a token is all zeros.
            return y + ctx.randn_like(y) * var.to(y.dtype).clamp(min=1e-12).sqrt() * sigma
        return ctx.add_scaled_randn_(y, var, sigma, sqrt_scale=True)

    def variance(self, x: torch.Tensor, w: torch.Tensor, last_tile_rows: int = 0) -> torch.Tensor:
        """The ``pcm`` shape's ``Σ_j |W_ij|·x_j²`` per tile, token and output (``(tiles, T, out)``), computed in
        ``spread_dtype`` (the last tile over its first ``last_tile_rows`` rows when they are fewer: the rest is zero
        padding): the spread is ``σ·sqrt`` of it."""
        return spread_bmm(x * x, w.abs().transpose(1, 2), self.spread_dtype, last_tile_rows)
