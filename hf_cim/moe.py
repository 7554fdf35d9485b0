"""Analog mixture-of-experts: transformers 5's fused experts modules on simulated crossbars.

transformers 5 stores the experts of an MoE layer (Mixtral, Qwen-MoE, gpt-oss, DeepSeek...) as 3-D Parameters of
one module decorated with ``@use_experts_implementation``: ``gate_up_proj`` (or ``up_proj`` without a gate) and
``down_proj``, ``(experts, out, in)`` or, with ``is_transposed``, ``(experts, in, out)``, optional ``*_bias``
``(experts, out)``, and ``forward(hidden_states, top_k_index, top_k_weights)``. The decorator records the layout
(``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``) and the gate (``_apply_gate``) that its
``batched_mm`` / ``grouped_mm`` implementations use for every such model; :class:`AnalogExpertsMixin` follows the same
data flow with each expert's product computed as a crossbar computes it:

1. the ``(token, expert)`` pairs are sorted by expert (one sort, one ``bincount``: no Python loop over tokens);
2. each projection programs the weights of the experts that were hit at once (:func:`hf_cim.tile.program_weights` on
   the ``(experts·out, in)`` stack: per-output-channel quantization of the stack is exactly per expert and channel;
   noise models whose ``program`` hook reads statistics of the whole matrix are run per expert instead, see
   :func:`rowwise_program`), then runs :func:`hf_cim.tile.analog_matmul` per expert hit (read noise, DAC, tiles,
   output hooks, ADC, bias on the ADC grid), as upstream's eager forward loops over the experts hit;
3. gate, optional post-expert norm, routing weights and the per-token sum as upstream (deterministic, no atomics).

Gradient modes, per projection (each expert's matrix is one analog layer):

* ``ste``: one ``autograd.Function`` per projection; backward = each expert's clean VJP (``g·W_e``, ``gᵀ·x``, ``Σg``)
  with the config's ``mask_saturated`` / ``backward_weights`` / ``program_gradient`` levers exactly as the dense
  layers apply them (the last chains the weight gradient through the programming of the experts hit).
* ``ste_detach``: ``y_clean + (y_noisy − y_clean).detach()`` per expert, ``y_clean`` the clean product under autograd
  (the levers' surrogate when a lever is on): the same gradients as ``ste``.
* ``full``: autograd through the simulation.

The routing weights, the gate activation and everything downstream see the noisy expert outputs (as every layer
after a dense analog layer sees its noisy output). A patched experts module *is* the original one (class swapped
for a generated subclass ``Noisy<Class>``), with the same Parameters and ``state_dict`` keys.

Noise: one generator per experts module (seeded from the config seed, the module name and the rank, as every analog
layer); hooks see ``ctx.layer_name = "<module>.<projection>"`` and each expert's own ``(out, in)`` matrix and
``weight_scale``. :func:`hf_cim.program_chip` programs every expert of both projections once (``program``).

Not simulated (named in :func:`hf_cim.patch_model`'s warning, left digital): experts modules without the decorator's
layout (e.g. DBRX's ``DbrxExpertGLU``) and expert-parallel shards. The router stays digital (it is not an
``nn.Linear`` in transformers 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import AnalogLayerMixin, checkpoint_replay
from .noise.base import NoiseContext, NoiseModel
from .rng import chip_generator
from .ste import chains_programming, input_for_backward, lever_surrogate, lever_vjp, program_chained
from .tile import (
    TileSpec,
    analog_matmul,
    operand_dtype,
    program_weights,
    program_weights_with_derivative,
    programs_elementwise,
)

__all__ = [
    "AnalogExpertsMixin",
    "experts_support",
    "is_experts_like",
    "noisy_experts_class",
    "rowwise_program",
]


#: Attributes ``@use_experts_implementation`` sets on every experts module it decorates (transformers >= 5).
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


def is_experts_like(module: nn.Module) -> bool:
    """Whether ``module`` looks like the experts of an MoE layer: decorated by transformers'
    ``@use_experts_implementation``, or a class named ``*Expert*`` that holds weight matrices itself (a Parameter of
    2 or more dimensions outside an ``nn.Linear``: e.g. DBRX's ``DbrxExpertGLU``, experts stacked as
    ``(experts·ffn, d_model)``)."""
    if all(flag in vars(module) for flag in _LAYOUT_FLAGS):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) or "Expert" not in type(module).__name__:
        return False
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def experts_support(module: nn.Module) -> str | None:
    """``None`` when :func:`hf_cim.patch_model` can make ``module`` analog, else why not (for the warning)."""
    if isinstance(module, AnalogExpertsMixin):
        return None
    state = vars(module)
    if not all(flag in state for flag in _LAYOUT_FLAGS):
        return "not a transformers @use_experts_implementation experts module"
    if state.get("_is_expert_parallel", False):
        return "expert parallel (a shard of the experts)"
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int):
        return "no `num_experts`"
    names = ["gate_up_proj" if state["has_gate"] else "up_proj", "down_proj"]
    for name in names:
        p = module._parameters.get(name)
        if p is None or p.dim() != 3 or p.shape[0] != n:
            return f"`{name}` is not a ({n}, ·, ·) Parameter"
        if state["has_bias"]:
            b = module._parameters.get(f"{name}_bias")
            if b is None or b.dim() != 2 or b.shape[0] != n:
                return f"`{name}_bias` is not a ({n}, ·) Parameter"
    if not state["has_gate"] and not hasattr(module, "act_fn"):
        return "no `act_fn`"
    if state["has_post_expert_norm"] and not hasattr(module, "post_expert_norm"):
        return "no `post_expert_norm`"
    return None


def rowwise_program(noise: list[NoiseModel], ctx: NoiseContext) -> bool:
    """Whether every ``program`` hook of ``noise`` treats each output channel on its own, so that programming the
    ``(experts·out, in)`` stack of several experts in one call is programming each expert. Each model declares it
    (:meth:`NoiseModel.rowwise`): the catalogue's element-wise and per-channel models do; ``gaussian_weight`` with
    ``per_channel=False``, ``pcm`` with global drift compensation at ``t_inference > 0`` and any model that does not
    declare it are run per expert."""
    return all(model.rowwise("program", ctx) for model in noise if model.has_hook("program"))


def _stack(parts: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor | None:
    """The experts' ``parts`` stacked; None where every part is None (a derivative of 1), ones for the Nones else."""
    if all(p is None for p in parts):
        return None
    return torch.stack([torch.ones_like(ref) if p is None else p for p, ref in zip(parts, like, strict=True)])


@dataclass
class _Plan:
    """The routing of one forward: rows of expert ``e`` in the sorted pairs are ``start[e]:start[e] + count[e]``."""

    counts: list[int]
    starts: list[int]
    hit: list[int]

    @classmethod
    def from_counts(cls, counts: list[int]) -> _Plan:
        starts, total = [], 0
        for c in counts:
            starts.append(total)
            total += c
        return cls(counts, starts, [e for e, c in enumerate(counts) if c])

    def rows(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e] + self.counts[e])


class _ExpertsSTEFunction(torch.autograd.Function):
    """One projection of all experts hit: noisy forward, each expert's clean (or levered) VJP backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, name, plan):
        ctx.layer, ctx.plan = layer, plan
        ctx.compute_dtype = layer.forward_dtype(x)
        ctx.tile_rows = layer.hf_cim_config.tile_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        aux = {} if layer.ste_levers else None
        # ``program_gradient``: the programming runs under autograd from a leaf of its own (see the dense layers').
        chain = weight.requires_grad and chains_programming(layer.hf_cim_config, layer.hf_cim_state.level)
        w_in = weight.detach().requires_grad_() if chain else weight
        with torch.no_grad():
            y = layer._noisy_project(name, x, w_in, bias, plan, differentiable=False, aux=aux)
        masks = [m for m in (aux or {}).get("mask", []) if m is not None]
        w_bs = [w for w in (aux or {}).get("weight", []) if w is not None]
        program = (aux or {}).get("program")
        ctx.n_masks, ctx.n_w_bs = len(masks), len(w_bs)
        ctx.x_dtype = x.dtype
        chained = () if program is None else (w_in, program)
        ctx.save_for_backward(input_for_backward(x, ctx.compute_dtype), weight, *masks, *w_bs, *chained)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # once: checkpointing's unpack hooks allow a single read
        x, weight = saved[:2]
        masks = saved[2 : 2 + ctx.n_masks]
        w_bs = saved[2 + ctx.n_masks : 2 + ctx.n_masks + ctx.n_w_bs]
        chained = saved[2 + ctx.n_masks + ctx.n_w_bs :]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layer, plan, dtype = ctx.layer, ctx.plan, ctx.compute_dtype
        w_oi = layer._w_oi(weight)
        grad_x = torch.zeros(x.shape, dtype=ctx.x_dtype, device=x.device) if need_x else None
        grad_w = torch.zeros(w_oi.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        grad_b = None
        if need_b:
            grad_b = torch.zeros(w_oi.shape[:2], dtype=ctx.bias_dtype, device=grad.device)
        for j, e in enumerate(plan.hit):
            rows = plan.rows(e)
            g = grad[rows]
            gx, gw = lever_vjp(
                x[rows],
                w_oi[e],
                g,
                masks[j] if masks else None,
                w_bs[j] if w_bs else None,
                ctx.tile_rows,
                need_x,
                need_w,
                dtype,
            )
            if need_x:
                grad_x[rows] = gx.to(ctx.x_dtype)
            if need_w:
                grad_w[e] = gw.to(weight.dtype)
            if need_b:
                grad_b[e] = g.sum(0).to(ctx.bias_dtype)
        if need_w and chained and plan.hit:  # the hit experts' crossbar gradients on through their programming
            w_in, program = chained
            hit = torch.tensor(plan.hit, device=grad_w.device)
            (grad_w,) = torch.autograd.grad(program, w_in, grad_w[hit].to(program.dtype))
            grad_w = grad_w.to(weight.dtype).contiguous()
        elif need_w:
            grad_w = layer._w_oi(grad_w).contiguous()
        return grad_x, grad_w, grad_b, None, None, None


class AnalogExpertsMixin(AnalogLayerMixin):
    """Analog behaviour of a fused experts module; mixed into a generated subclass of the module's own class."""

    #: The plain experts class this noisy class was generated from (``unpatch_model`` swaps it back).
    plain_class: type[nn.Module]

    # -- layout ---------------------------------------------------------------------------------------------------
    @property
    def _projections(self) -> tuple[str, str]:
        return ("gate_up_proj" if self.has_gate else "up_proj"), "down_proj"

    def _w_oi(self, w3: torch.Tensor) -> torch.Tensor:
        """``(experts, out, in)`` view of a stored expert weight (its own inverse on a gradient of that shape)."""
        return w3.transpose(-2, -1) if self.is_transposed else w3

    def _proj_bias(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_bias") if self.has_bias else None

    def _proj_context(
        self, name: str, device: torch.device, in_dim: int, generator: torch.Generator | None = None
    ) -> NoiseContext:
        state = self.hf_cim_state
        return NoiseContext(
            generator=generator if generator is not None else self.noise_generator(device),
            level=state.level,
            t_inference=state.t_inference,
            tile_rows=state.config.tile_size or in_dim,
            layer_name=f"{state.name}.{name}",
        )

    # -- programming ----------------------------------------------------------------------------------------------
    def _program_experts(
        self, w_oi: torch.Tensor, hit: list[int] | None, ctx: NoiseContext, differentiable: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``program_weights`` of the experts ``hit`` (all for None): ``(n, out, in)`` programmed weights and
        ``(n, out, 1)`` scales, in the order of ``hit``."""
        cfg, spec = self.hf_cim_config, TileSpec.from_config(self.hf_cim_config)
        return self._per_expert(
            w_oi, hit, ctx, lambda w: program_weights(w, spec, ctx, cfg.noise, differentiable=differentiable)
        )

    def _program_experts_with_derivative(
        self, w_oi: torch.Tensor, hit: list[int] | None, ctx: NoiseContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_program_experts` without autograd, with the element-wise derivative of the programming
        (:func:`hf_cim.tile.program_weights_with_derivative`; None where it is 1)."""
        cfg, spec = self.hf_cim_config, TileSpec.from_config(self.hf_cim_config)
        return self._per_expert(w_oi, hit, ctx, lambda w: program_weights_with_derivative(w, spec, ctx, cfg.noise))

    @staticmethod
    def _hit_experts(w_oi: torch.Tensor, hit: list[int] | None) -> torch.Tensor:
        """The weights ``(n, out, in)`` of the experts ``hit`` (all for None), in that order."""
        if hit is not None and len(hit) < w_oi.shape[0]:
            return w_oi[torch.tensor(hit, device=w_oi.device)]
        return w_oi

    def _per_expert(self, w_oi: torch.Tensor, hit: list[int] | None, ctx: NoiseContext, program) -> tuple:
        """``program`` (a ``(rows, in)`` matrix → a tuple of ``(rows, ·)`` tensors, None for a derivative of 1) of
        the experts ``hit`` (all for None), each part stacked to ``(n, out, ·)`` in the order of ``hit``: in one call
        on the experts' stacked rows where every ``program`` hook is rowwise, one expert at a time otherwise."""
        w = self._hit_experts(w_oi, hit).float()
        n, out, k = w.shape
        if rowwise_program(self.hf_cim_config.noise, ctx):
            return tuple(None if p is None else p.reshape(n, out, -1) for p in program(w.reshape(n * out, k)))
        runs = [program(w[i]) for i in range(n)]
        return tuple(_stack([run[j] for run in runs], like=[run[0] for run in runs]) for j in range(len(runs[0])))

    def program(self, seed: int, t_inference: float = 0.0) -> None:
        """Program every expert of both projections as one simulated chip (see :meth:`AnalogLayerMixin.program`)."""
        gen = None
        self.hf_cim_t_inference = float(t_inference)
        chip = {}
        with torch.no_grad():
            for name in self._projections:
                weight = getattr(self, name).detach()
                if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters outside forward
                    weight = weight.full_tensor()
                w_oi = self._w_oi(weight)
                if gen is None:
                    gen = chip_generator(weight.device, seed, self.hf_cim_name)
                ctx = self._proj_context(name, weight.device, w_oi.shape[-1], generator=gen)
                chip[name] = self._program_experts(w_oi, None, ctx, differentiable=False)
        self.hf_cim_state.chip = chip

    # -- one projection -------------------------------------------------------------------------------------------
    def _noisy_project(self, name, x, weight, bias, plan, differentiable, aux=None):
        """The analog product of every expert hit with its rows of ``x`` (``(pairs, in)``, sorted by expert).
        ``aux`` (STE modes) receives per expert hit the ADC pass mask (``"mask"``) and the programmed weights in
        the layer's units (``"weight"``), or Nones, as the config's levers ask, and with ``program_gradient`` the
        hit experts' programmed weights ``(hit, out, in)`` as a function of ``weight`` (``"program"``)."""
        cfg = self.hf_cim_config
        spec = TileSpec.from_config(cfg)
        out_dtype = self.forward_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w_oi = self._w_oi(weight)
            ctx = self._proj_context(name, x.device, w_oi.shape[-1])
            on_chip = self.hf_cim_state.chip is not None and not self.training
            chained = None
            if on_chip:
                w_prog, w_scale = self.hf_cim_state.chip[name]
                picks = plan.hit
            elif aux is not None and weight.requires_grad and chains_programming(cfg, ctx.level):
                # As the dense layers: the backward chains through the programming of the experts the batch hits.
                _, w_prog, w_scale, chained = program_chained(
                    lambda: self._hit_experts(self._w_oi(weight), plan.hit),
                    lambda w: self._program_experts(w, None, ctx, differentiable=True),
                    (lambda w: self._program_experts_with_derivative(w, None, ctx))
                    if programs_elementwise(cfg.noise, ctx)
                    else None,
                )
                picks = list(range(len(plan.hit)))
            else:
                w_prog, w_scale = self._program_experts(w_oi, plan.hit, ctx, differentiable)
                picks = list(range(len(plan.hit)))
            xf = x.float()
            if aux is not None:
                aux["mask"], aux["weight"] = [], []
                if chained is not None:
                    aux["program"] = chained
            ys = []
            for j, e in zip(picks, plan.hit):
                ctx.weight_scale = w_scale[j]
                saturation = [] if aux is not None and cfg.mask_saturated else None
                b = None if bias is None else bias[e]
                y = analog_matmul(
                    xf[plan.rows(e)],
                    w_prog[j],
                    w_scale[j],
                    b,
                    spec,
                    ctx,
                    cfg.noise,
                    differentiable,
                    saturation,
                    product_dtype=operand_dtype(cfg.product_precision, out_dtype),
                )
                if aux is not None:
                    aux["mask"].append(saturation[0] if saturation else None)
                    w_b = None
                    if cfg.backward_weights == "programmed" and chained is not None:
                        w_b = chained[j].detach()  # the chain's saved tensors stay intact
                    elif cfg.backward_weights == "programmed":  # in place after the product, as the dense layers
                        w_b = w_prog[j] * w_scale[j] if on_chip else w_prog[j].mul_(w_scale[j])
                    aux["weight"].append(w_b)
                ys.append(y)
            y = torch.cat(ys) if ys else xf.new_zeros(0, w_oi.shape[1])
            return y.to(out_dtype)

    def _ste_detach_project(self, name, x, weight, bias, plan):
        aux = {} if self.ste_levers else None
        with torch.no_grad():
            y_noisy = self._noisy_project(name, x, weight, bias, plan, differentiable=False, aux=aux)
        dtype = self.forward_dtype(x)
        w_oi = self._w_oi(weight)
        ys = []
        with torch.autocast(x.device.type, enabled=False):
            for j, e in enumerate(plan.hit):
                ys.append(
                    lever_surrogate(
                        x[plan.rows(e)].to(dtype),
                        w_oi[e].to(dtype),
                        None if bias is None else bias[e].to(dtype),
                        aux["mask"][j] if aux else None,
                        aux["weight"][j] if aux else None,
                        self.hf_cim_config.tile_size,
                        aux["program"][j] if aux and "program" in aux else None,
                    )
                )
            y_clean = torch.cat(ys) if ys else x.new_zeros(0, w_oi.shape[1], dtype=dtype)
        return y_clean + (y_noisy - y_clean).detach()

    def _project(self, name: str, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        weight, bias = getattr(self, name), self._proj_bias(name)
        cfg = self.hf_cim_config
        if not torch.is_grad_enabled():
            return self._noisy_project(name, x, weight, bias, plan, differentiable=False)
        if cfg.gradient == "ste":
            return _ExpertsSTEFunction.apply(x, weight, bias, self, name, plan)
        if cfg.gradient == "ste_detach":
            return self._ste_detach_project(name, x, weight, bias, plan)
        return self._noisy_project(name, x, weight, bias, plan, differentiable=True)

    # -- forward --------------------------------------------------------------------------------------------------
    def clean_forward(self, hidden_states, top_k_index, top_k_weights):
        return self.plain_class.forward(self, hidden_states, top_k_index, top_k_weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        args = (hidden_states, top_k_index, top_k_weights)
        state = self.hf_cim_state
        if state.disabled or (not self.training and not state.config.noise_in_eval):
            return self.clean_forward(*args)
        if hidden_states.is_meta or self.down_proj.is_meta:
            return self.clean_forward(*args)
        if self.training and state.level > 0.0:
            with checkpoint_replay(self, hidden_states.device):  # as the dense layers
                return self._analog_forward(*args)
        return self._analog_forward(*args)

    def _analog_forward(self, hidden_states, top_k_index, top_k_weights):
        n_tokens, top_k = top_k_index.shape
        n_experts = self.num_experts
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            ids = flat[order]
            keep = (ids >= 0) & (ids < n_experts)  # sentinels (e.g. index num_experts) select no expert
            order, ids = order[keep], ids[keep]
            plan = _Plan.from_counts(torch.bincount(ids, minlength=n_experts).tolist())  # the one host sync
        x = hidden_states[order // top_k]  # (pairs, hidden), grouped by expert
        first, down = self._projections
        y = self._project(first, x, plan)
        y = self._apply_gate(y) if self.has_gate else self.act_fn(y)
        y = self._project(down, y, plan)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        # Back to (token, k) slots, then the per-token sum: deterministic (no atomics), as upstream's grouped_mm.
        slots = y.new_zeros(n_tokens * top_k, y.shape[-1]).index_put((order,), y)
        return slots.view(n_tokens, top_k, -1).sum(1).to(hidden_states.dtype)


_NOISY_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def noisy_experts_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The noisy subclass of the experts class ``cls`` (generated once, named ``Noisy<Class>`` and reachable as
    ``hf_cim.moe.Noisy<Class>`` so that a patched model pickles)."""
    noisy = _NOISY_CLASSES.get(cls)
    if noisy is None:
        name = f"Noisy{cls.__name__}"
        noisy = type(
            name,
            (AnalogExpertsMixin, cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"``{cls.__name__}`` with every expert computed on a simulated analog crossbar.",
                "plain_class": cls,
            },
        )
        _NOISY_CLASSES[cls] = noisy
        globals().setdefault(name, noisy)
    return noisy
