"""The straight-through mechanism of arXiv 2508.11940, in one place, at the layer output.

Three gradient modes:

* ``ste`` — :class:`AnalogSTEFunction`: forward = the noisy analog simulation only (no clean product), saving only
  ``x`` and ``W``; backward = the clean layer's gradients (``g·W``, ``gᵀ·x``, ``Σg``). Same gradient as the paper's
  form, without its extra clean forward and without keeping the noisy output alive.
* ``ste_detach`` — :func:`ste_detach_forward`: the paper's literal Algorithm 1,
  ``y = y_clean + (y_noisy − y_clean).detach()`` with ``y_noisy`` computed under ``no_grad``.
* ``full`` — the baseline: autograd through the whole simulation (the layer calls it with ``differentiable=True``).

The layer supplies three callables (see :class:`hf_cim.layers.AnalogLayerMixin`): the noisy forward, the clean
forward and the clean backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["AnalogSTEFunction", "ste_detach_forward"]


class AnalogSTEFunction(torch.autograd.Function):
    """``y = analog(x, W, b)`` forward; ``∂L/∂x = clean``, ``∂L/∂W = clean``, ``∂L/∂b = Σg`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: Any):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.compute_dtype = layer._compute_dtype(x)
        aux: dict[str, torch.Tensor | None] | None = {} if layer._ste_levers else None
        with torch.no_grad():
            y = layer._noisy_forward(x, weight, bias, differentiable=False, aux=aux)
        if aux is None:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, aux.get("mask"), aux.get("weight"))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors  # once: checkpointing's unpack hooks allow a single read
        if len(saved) == 2:
            x, weight = saved
            grad_x, grad_w = ctx.layer._clean_backward(x, weight, grad_output, need_x, need_w, ctx.compute_dtype)
        else:
            x, weight, mask, w_prog = saved
            grad_x, grad_w = ctx.layer._ste_backward(
                x, weight, grad_output, mask, w_prog, need_x, need_w, ctx.compute_dtype
            )
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = ctx.layer._bias_grad(grad_output)
        return grad_x, grad_w, grad_b, None


def ste_detach_forward(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The paper's Algorithm 1: a clean forward with autograd plus the detached noisy correction.

    With a backward lever on (``mask_saturated``, ``backward_weights="programmed"``), the clean forward is replaced by
    the layer's surrogate with the same vector-Jacobian product as ``ste``'s backward, so both modes keep giving the
    same gradients.
    """
    if not layer._ste_levers:
        y_clean = layer._clean_forward(x)
        with torch.no_grad():
            y_noisy = layer._noisy_forward(x, weight, bias, differentiable=False)
        return y_clean + (y_noisy - y_clean).detach()
    aux: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        y_noisy = layer._noisy_forward(x, weight, bias, differentiable=False, aux=aux)
    y_s = layer._ste_surrogate(x, weight, bias, aux.get("mask"), aux.get("weight"))
    return y_s + (y_noisy - y_s).detach()
