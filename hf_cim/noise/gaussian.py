"""Additive Gaussian noise on the weights and on the analog outputs: the two simplest non-idealities.

Both follow the generic forms used by noise-aware training since Joshi et al., Nat. Commun. 11, 2473 (2020), and by
aihwkit(-lightning)'s ``WeightNoiseType.ADDITIVE_CONSTANT`` and ``out_noise``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NoiseContext, NoiseModel, check_range, register_noise_model

__all__ = ["GaussianWeightNoise", "OutputNoise"]


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

    def output(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:
        sigma = self.std * ctx.level
        if sigma == 0.0:
            return y
        if torch.is_grad_enabled() and y.requires_grad:
            return y + sigma * ctx.randn_like(y)
        # No autograd: add in place to spare one (tiles × tokens × out) allocation in the hot path.
        return y.add_(ctx.randn_like(y), alpha=sigma)
