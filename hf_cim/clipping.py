"""Weight clipping to ``k`` standard deviations per output channel: a hardware-aware training lever.

A crossbar maps each output channel's largest weight to ``g_max`` (per-channel abs-max). One outlier weight then
squeezes every other weight of its channel into a small part of the conductance range, where programming and read
noise (relative to ``g_max``) weigh more. Clipping the weights to ``k·σ`` of their channel after every optimizer step
(aihwkit's ``WeightClipType.LAYER_GAUSSIAN`` with ``sigma`` ≈ 2.5–3.5, here per channel, the granularity at which
this library maps weights) keeps the outliers in check while the network learns to do without them.
"""

from __future__ import annotations

import torch
from torch import nn

from .patch import analog_layers
from .validation import check_range

__all__ = ["clip_weights_"]

MIN_SIGMAS, MAX_SIGMAS = 0.5, 100.0


@torch.no_grad()
def clip_weights_(model: nn.Module, sigmas: float) -> None:
    """Clamp, in place, every patched dense layer's weights to ``±sigmas · std`` of its output channel.

    ``std`` is the population standard deviation (``correction=0``) of each row of the ``(out, in)`` matrix the
    crossbar holds (Conv2d: one row per output channel over ``in_channels × kh × kw``). MoE experts are left as they
    are (their weights are 3-D stacks, not one matrix).

    Raises:
        ValueError: ``sigmas`` outside [0.5, 100].
    """
    check_range("clip_weights_", "sigmas", sigmas, MIN_SIGMAS, MAX_SIGMAS)
    for _, layer in analog_layers(model):
        if not hasattr(layer, "weight_oi"):
            continue
        w = layer.weight_oi(layer.weight.data)  # a view in the layer's own storage where the layout allows
        bound = sigmas * w.float().std(dim=1, keepdim=True, correction=0).to(w.dtype)
        clipped = torch.clamp(w, -bound, bound)
        layer.weight.data.copy_(layer.weight_from_oi(clipped, layer.weight.data))
