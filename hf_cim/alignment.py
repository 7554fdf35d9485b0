"""Gradient alignment: how close the straight-through gradient is to the gradient through the noise model.

:func:`gradient_alignment` is the paper's check of its Eq. 10 (arXiv 2508.11940) on one probe batch, plain logic
that works outside ``Trainer``; :class:`hf_cim.callbacks.GradientAlignmentCallback` is the thin ``TrainerCallback``
that runs it every few steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .patch import analog_layers
from .presets import LEVERS_OFF
from .rng import process_rank, seeded_generator
from .state import preserve_analog_state

__all__ = ["gradient_alignment"]


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)):
        loss = output[0]
    if loss is None:
        raise ValueError("gradient_alignment: the model's output has no `loss`; the probe batch needs labels")
    return loss


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Cosine similarity and norm ratio ``|a|/|b|`` of two lists of tensors seen as one vector each (float64)."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    na = math.sqrt(sum(float((x.double() ** 2).sum()) for x in a))
    nb = math.sqrt(sum(float((y.double() ** 2).sum()) for y in b))
    if na == 0.0 or nb == 0.0:
        return math.nan, math.nan
    return float(dot) / (na * nb), na / nb


def gradient_alignment(model: nn.Module, batch: Mapping[str, Any], seed: int = 0) -> dict[str, float]:
    """Cosine similarity between the STE gradient and the ``full`` gradient (through the noise model) on ``batch``.

    The paper's check of its Eq. 10 (arXiv 2508.11940): extended STE keeps the direction of the true gradient.
    Both passes see the *same* noise sample (every patched layer draws from a fresh probe generator seeded from
    ``seed``, the layer name and the rank) and run with dropout off; patched layers run in training mode (static
    noise drawn anew, as in a training step). The model is left exactly as it was: training flags, each layer's
    config and noise generator (the training noise stream is not advanced), and ``.grad`` (the gradients are taken
    with ``torch.autograd.grad`` and never accumulated). No optimizer is involved.

    Args:
        model: a patched model whose output has a ``loss`` (``batch`` carries the labels).
        batch: keyword inputs of the model; tensors are moved to the model's device.
        seed: seed of the probe noise (int >= 0).

    Returns:
        ``{"grad_cosine": overall, "grad_norm_ratio": |g_ste|/|g_full|, "grad_cosine/<layer>": per layer}``; the
        overall values cover every trainable parameter, the per-layer ones the layer's weight and bias.
    """
    layers = list(analog_layers(model))
    if not layers:
        raise ValueError("gradient_alignment: the model has no patched layer; call hf_cim.patch_model first")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("gradient_alignment: the model has no trainable parameter")
    device = params[0][1].device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    rank = process_rank()

    modes = [(m, m.training) for m in model.modules()]
    states = [layer.hf_cim_state for _, layer in layers]
    configs = [state.config for state in states]
    grads: dict[str, list[torch.Tensor | None]] = {}
    try:
        with preserve_analog_state(model):  # each layer's config and training noise stream
            model.eval()  # dropout off: both passes must see the same network
            for _, layer in layers:
                layer.training = True  # but the analog layers behave as in a training step
            for mode in ("ste", "full"):
                for state, cfg in zip(states, configs):
                    # The STE pass keeps the config's own backward levers; ``full`` has none (autograd
                    # differentiates).
                    state.config = (
                        cfg.replace(gradient="ste") if mode == "ste" else cfg.replace(gradient="full", **LEVERS_OFF)
                    )
                    state.generator = seeded_generator(device, seed, state.name, rank, "probe")
                with torch.enable_grad():
                    loss = _loss_of(model(**inputs))
                    grads[mode] = list(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    finally:
        for m, flag in modes:
            m.training = flag

    def pick(mode: str, keep: set[int]) -> list[torch.Tensor]:
        return [g if g is not None else torch.zeros_like(params[i][1]) for i, g in enumerate(grads[mode]) if i in keep]

    everything = set(range(len(params)))
    overall, ratio = _cosine(pick("ste", everything), pick("full", everything))
    out = {"grad_cosine": overall, "grad_norm_ratio": ratio}
    index = {id(p): i for i, (_, p) in enumerate(params)}
    for name, layer in layers:
        own = {index[id(p)] for p in layer.parameters(recurse=False) if id(p) in index}
        if own:
            out[f"grad_cosine/{name}"] = _cosine(pick("ste", own), pick("full", own))[0]
    return out
