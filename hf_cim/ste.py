"""The straight-through mechanism of arXiv 2508.11940, in one place, at the layer output.

Three gradient modes:

* ``ste`` — :class:`AnalogSTEFunction`: forward = the noisy analog simulation only (no clean product), saving only
  ``x`` and ``W``; backward = the clean layer's gradients (``g·W``, ``gᵀ·x``, ``Σg``). Same gradient as the paper's
  form, without its extra clean forward and without keeping the noisy output alive.
* ``ste_detach`` — :func:`ste_detach_forward`: the paper's literal Algorithm 1,
  ``y = y_clean + (y_noisy − y_clean).detach()`` with ``y_noisy`` computed under ``no_grad``.
* ``full`` — the baseline: autograd through the whole simulation (the layer calls it with ``differentiable=True``).

:func:`analog_forward` picks the mode from the layer's config.

What these need from a layer is public (see :class:`hf_cim.layers.AnalogLayer`): ``noisy_forward`` (the analog
product), ``clean_forward`` / ``clean_backward`` / ``bias_grad`` (the plain layer's forward and VJP),
``ste_backward`` / ``ste_surrogate`` / ``chain_program`` (the same with the backward levers) and ``ste_levers``,
``forward_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "AnalogSTEFunction",
    "analog_forward",
    "chains_programming",
    "lever_surrogate",
    "lever_vjp",
    "masked_gradient",
    "program_chained",
    "ste_detach_forward",
]


def chains_programming(cfg: Any, level: float) -> bool:
    """Whether ``program_gradient`` has a programming to chain through: some ``program`` hook runs at this level.
    Without one the programming is the quantizer alone, straight through, and its chain the identity: skipped, so a
    chip of read noise only (the ``pcm`` preset) trains exactly as without the lever."""
    return cfg.program_gradient and level > 0.0 and any(m.has_hook("program") for m in cfg.noise)


def program_chained(
    weights: Callable[[], torch.Tensor],
    program: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    elementwise: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``program_gradient``'s forward half: ``program(weights())`` under autograd. Returns the weights and the
    normalized programmed weights and scales, detached, and the programmed weights in the layer's units as a function
    of the weights (what the backward differentiates).

    ``elementwise`` (:func:`hf_cim.tile.program_weights_with_derivative`, where the programming has a closed-form
    element-wise derivative) programs the weights without autograd and returns that derivative as well: the
    programmed weights are then a function of the weights through one saved weight-sized tensor, with the same
    gradient, instead of the programming's graph.

    Its saved tensors bypass an outer pair of saved-tensor hooks (activation checkpointing's): the graph belongs to
    this forward's own backward, and a checkpointing recompute builds one of its own."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
        w = weights()
        if elementwise is not None:
            with torch.no_grad():
                w_prog, w_scale, derivative = elementwise(w.detach())
            chained = _ElementwiseChain.apply(w, w_prog, w_scale, derivative)
        else:
            w_prog, w_scale = program(w)
            chained = w_prog * w_scale
    return w.detach(), w_prog.detach(), w_scale.detach(), chained


class _ElementwiseChain(torch.autograd.Function):
    """``w_prog·w_scale`` as a function of ``w`` whose derivative is ``derivative`` element by element (None: 1)."""

    @staticmethod
    def forward(ctx: Any, w, w_prog, w_scale, derivative):
        ctx.save_for_backward(derivative)
        return w_prog * w_scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        (derivative,) = ctx.saved_tensors
        return (grad if derivative is None else grad * derivative), None, None, None


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _tiles(t: torch.Tensor, n_tiles: int, rows: int) -> torch.Tensor:
    """``(vectors, K)`` → ``(tiles, vectors, rows)`` crossbar tiles along K (zero rows pad the last one)."""
    return F.pad(t, (0, n_tiles * rows - t.shape[1])).view(t.shape[0], n_tiles, rows).transpose(0, 1)


def masked_gradient(g: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``g`` where the bool ``mask`` passes, exact zeros elsewhere (also where ``g`` is not finite). One pass: ``g *
    mask`` would first convert the mask to ``g``'s dtype, a float copy the size of the logits for an LM head."""
    return torch.where(mask, g, g.new_zeros(()), out=out)


def lever_vjp(
    x: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor | None,
    w_b: torch.Tensor | None,
    tile_rows: int | None,
    need_x: bool,
    need_w: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The STE backward with its levers, in the crossbar's layout: ``∂x = (g⊙m)·W_b``, ``∂W = (g⊙m)ᵀ·x`` per tile.

    Args:
        x, w, g: rows ``(vectors, K)``, weights ``(out, K)`` and upstream gradient ``(vectors, out)``.
        mask: the ADC's pass mask ``(tiles, vectors, out)`` (see :func:`hf_cim.tile.analog_matmul`) or None.
        w_b: the weights of the input gradient (the programmed ones) or None for ``w``.
        tile_rows: crossbar rows per tile (used with several tiles).
    """
    g, x = g.to(dtype), x.to(dtype)
    w_x = (w if w_b is None else w_b).to(dtype)
    if mask is None or mask.shape[0] == 1:
        if mask is not None:
            g = masked_gradient(g, mask[0])
        return (g @ w_x if need_x else None), (g.t() @ x if need_w else None)
    k, n, out = x.shape[1], x.shape[0], w.shape[0]
    # One tile at a time through one (vectors, out) buffer: the masked gradient of every tile at once would be
    # tiles × the size of the logits for an LM head, written and read once more. A partly used last tile is
    # multiplied over its real rows only (no zero-padded work).
    g_m = torch.empty_like(g)
    gx = g.new_empty(n, k) if need_x else None
    gw = g.new_empty(out, k) if need_w else None
    for t in range(mask.shape[0]):
        lo, hi = t * tile_rows, min(k, (t + 1) * tile_rows)
        masked_gradient(g, mask[t], out=g_m)
        if need_x:
            gx[:, lo:hi] = g_m @ w_x[:, lo:hi]
        if need_w:
            gw[:, lo:hi] = g_m.t() @ x[:, lo:hi]
    return gx, gw


def lever_surrogate(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    w_b: torch.Tensor | None,
    tile_rows: int | None,
    w_chain: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ste_detach``'s differentiable stand-in, in the crossbar's layout: a function of ``x`` ``(vectors, K)``,
    ``w`` ``(out, K)`` and ``bias`` whose vector-Jacobian product is :func:`lever_vjp`'s (its value cancels in
    ``y_s + (y_noisy − y_s).detach()``). ``w_chain``: the programmed weights as a function of ``w``
    (``program_gradient``), through which the weight gradient flows instead of straight to ``w``."""
    if mask is None and w_b is None and w_chain is None:
        return F.linear(x, w, bias)
    n_tiles = 1 if mask is None else mask.shape[0]
    rows = tile_rows if n_tiles > 1 else x.shape[1]
    if w_b is None and w_chain is None:
        y_t = torch.bmm(_tiles(x, n_tiles, rows), _tiles(w, n_tiles, rows).transpose(1, 2))
    else:  # W's gradient from one tensor (the clean or the chained weights), x's from another (clean or programmed)
        w_grad = w if w_chain is None else w_chain.to(x.dtype)
        w_input = w if w_b is None else w_b.to(x.dtype)
        y_t = torch.bmm(_tiles(x.detach(), n_tiles, rows), _tiles(w_grad, n_tiles, rows).transpose(1, 2))
        y_t = y_t + torch.bmm(_tiles(x, n_tiles, rows), _tiles(w_input.detach(), n_tiles, rows).transpose(1, 2))
    if mask is not None:
        y_t = y_t * mask.to(x.dtype)
    y = y_t.sum(0)
    return y if bias is None else y + bias


def input_for_backward(x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """The input an STE Function keeps for its backward. Under autocast the plain layer keeps its input in the
    (half-precision) compute dtype, the dtype its backward products run in: so do these, at the plain layer's
    memory rather than the float32 input's; their gradients return in the input's own dtype."""
    return x.to(compute_dtype) if compute_dtype in (torch.bfloat16, torch.float16) else x


class AnalogSTEFunction(torch.autograd.Function):
    """``y = analog(x, W, b)`` forward; ``∂L/∂x = clean``, ``∂L/∂W = clean``, ``∂L/∂b = Σg`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: Any):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.compute_dtype = layer.forward_dtype(x)
        ctx.x_dtype = x.dtype
        aux: dict[str, torch.Tensor | None] | None = {} if layer.ste_levers else None
        # ``program_gradient``: the programming runs under autograd from a leaf of its own, which the backward
        # differentiates (a graph to the parameter itself would reach it twice).
        chain = weight.requires_grad and chains_programming(layer.hf_cim_config, layer.hf_cim_state.level)
        w_in = weight.detach().requires_grad_() if chain else weight
        with torch.no_grad():
            y = layer.noisy_forward(x, w_in, bias, differentiable=False, aux=aux)
        x_saved = input_for_backward(x, ctx.compute_dtype)
        if aux is None:
            ctx.save_for_backward(x_saved, weight)
        else:
            program = aux.get("program")
            ctx.save_for_backward(
                x_saved, weight, aux.get("mask"), aux.get("weight"), aux.get("input_mask"),
                None if program is None else w_in, program,
            )  # fmt: skip
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors  # once: checkpointing's unpack hooks allow a single read
        if len(saved) == 2:
            x, weight = saved
            grad_x, grad_w = ctx.layer.clean_backward(x, weight, grad_output, need_x, need_w, ctx.compute_dtype)
        else:
            x, weight, mask, w_prog, input_mask, w_in, program = saved
            grad_x, grad_w = ctx.layer.ste_backward(
                x, weight, grad_output, mask, w_prog, need_x, need_w, ctx.compute_dtype, input_mask
            )
            if program is not None and grad_w is not None:
                grad_w = ctx.layer.chain_program(grad_w, w_in, program)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = ctx.layer.bias_grad(grad_output)
        return grad_x, grad_w, grad_b, None


def analog_forward(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The analog output of ``layer`` for ``x`` in the config's gradient mode: the noisy product alone without
    autograd, :class:`AnalogSTEFunction` (``ste``), :func:`ste_detach_forward` (``ste_detach``), or the simulation
    under autograd (``full``)."""
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return layer.noisy_forward(x, weight, bias, differentiable=False)
    gradient = layer.hf_cim_state.config.gradient
    if gradient == "ste":
        return AnalogSTEFunction.apply(x, weight, bias, layer)
    if gradient == "ste_detach":
        return ste_detach_forward(layer, x, weight, bias)
    return layer.noisy_forward(x, weight, bias, differentiable=True)


def ste_detach_forward(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The paper's Algorithm 1: a clean forward with autograd plus the detached noisy correction.

    With a backward lever on (``mask_saturated``, ``backward_weights="programmed"``), the clean forward is replaced by
    the layer's surrogate with the same vector-Jacobian product as ``ste``'s backward, so both modes keep giving the
    same gradients.
    """
    if not layer.ste_levers:
        y_clean = layer.clean_forward(x)
        with torch.no_grad():
            y_noisy = layer.noisy_forward(x, weight, bias, differentiable=False)
        return y_clean + (y_noisy - y_clean).detach()
    aux: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        y_noisy = layer.noisy_forward(x, weight, bias, differentiable=False, aux=aux)
    input_mask = aux.get("input_mask")
    if input_mask is not None:  # a static DAC clipped these inputs: no gradient to them (the values are x's)
        x = torch.where(input_mask, x, x.detach())
    y_s = layer.ste_surrogate(x, weight, bias, aux.get("mask"), aux.get("weight"), aux.get("program"))
    return y_s + (y_noisy - y_s).detach()
