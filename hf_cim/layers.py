"""Noisy versions of the linear-like layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2) and ``nn.Conv2d``.

A patched layer *is* the original module with its class swapped for a subclass: the same object, the same
``weight``/``bias`` Parameters (``state_dict`` keys unchanged, tied weights stay tied, hooks kept). Layout quirks live
here: the noise simulation always sees weights as ``(out, in)``; ``Conv1D`` stores ``(in, out)``; ``Conv2d`` is
lowered to a matrix product over its unfolded patches (im2col), as a crossbar computes a convolution.

A layer type is one subclass of :class:`AnalogLayer` (the contract: the layout adapters and the plain layer's
forward and VJP) and of the plain class, registered with :func:`register_analog_layer` (which fills
:data:`LAYER_MAP`). Everything a patched layer carries besides its Parameters is one
:class:`~hf_cim.state.AnalogState`, ``layer.hf_cim_state``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AnalogNoiseConfig
from .converters import dac_clip, dac_pass_mask
from .correction import correct_on_batch
from .noise.base import NoiseContext
from .rng import chip_generator, layer_generator
from .state import STATE_ATTR, AnalogState
from .ste import analog_forward, chains_programming, lever_surrogate, lever_vjp, masked_gradient, program_chained
from .tile import (
    TileSpec,
    analog_matmul,
    operand_dtype,
    program_weights,
    program_weights_with_derivative,
    programs_elementwise,
)

__all__ = [
    "LAYER_MAP",
    "AnalogLayer",
    "AnalogLayerMixin",
    "NoisyConv1D",
    "NoisyConv2d",
    "NoisyLinear",
    "checkpoint_replay",
    "register_analog_layer",
]


@contextlib.contextmanager
def checkpoint_replay(layer: AnalogLayerMixin, device: torch.device) -> Iterator[None]:
    """Around one training forward of ``layer``: make an activation-checkpointing recompute draw the same noise.

    Activation checkpointing re-runs the forward inside the backward pass: it must see the noise the original forward
    drew, or the gradient belongs to activations that never ran. Each training forward records the generator's
    state; a forward inside a backward (a recompute: reentrant or not) replays the latest record on a copy, so the
    layer's own stream advances once per step. Records are popped last-in first-out, the order in which the backward
    recomputes segments.
    """
    state = layer.hf_cim_state
    gen = layer.noise_generator(device)
    if torch._C._current_graph_task_id() == -1:
        state.replay.append(gen.get_state())
        yield
    elif state.replay:
        replay = torch.Generator(device=gen.device)
        replay.set_state(state.replay.pop())
        state.replay_generator = replay
        try:
            yield
        finally:
            state.replay_generator = None
    else:
        yield


def _forward_to_state(field: str, doc: str) -> property:
    """A layer attribute that reads and writes ``layer.hf_cim_state.<field>`` (the names layers had before the state
    object: code and users keep reading and setting them)."""

    def get(self):
        return getattr(self.hf_cim_state, field)

    def set(self, value):
        setattr(self.hf_cim_state, field, value)

    return property(get, set, doc=doc)


class AnalogLayerMixin:
    """Analog behaviour shared by every analog module: its state, noise stream and chip, and the crossbar forward and
    STE backward of a dense layer. A dense layer type supplies the layout adapters of :class:`AnalogLayer`; the MoE
    experts (:class:`hf_cim.moe.AnalogExpertsMixin`) bring their own forward.

    All per-layer analog state lives in one :class:`~hf_cim.state.AnalogState`, ``self.hf_cim_state``.
    """

    hf_cim_state: AnalogState
    #: The plain class this analog class replaces (``unpatch_model`` swaps it back).
    plain_class: type[nn.Module]

    hf_cim_config = _forward_to_state("config", "The noise config (``hf_cim_state.config``).")
    hf_cim_name = _forward_to_state("name", "The layer's name in the model (``hf_cim_state.name``).")
    hf_cim_level = _forward_to_state("level", "The runtime noise level (``hf_cim_state.level``).")
    hf_cim_disabled = _forward_to_state("disabled", "The exact digital forward is on (``hf_cim_state.disabled``).")
    hf_cim_t_inference = _forward_to_state("t_inference", "Seconds since programming (``hf_cim_state.t_inference``).")

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _hf_cim_init(self, name: str, config: AnalogNoiseConfig) -> None:
        self.hf_cim_state = AnalogState.for_layer(name, config)

    def _hf_cim_clear(self) -> None:
        self.__dict__.pop(STATE_ATTR, None)

    def reseed(self, seed: int) -> None:
        """Restart this layer's noise stream from ``seed`` (combined with the layer name and process rank)."""
        state = self.hf_cim_state
        state.seed = seed
        state.generator = None

    def noise_generator(self, device: torch.device) -> torch.Generator:
        """The layer's generator on ``device``, created on first use (after the process group exists).

        During an activation-checkpointing recompute it is a copy of the generator as the original forward found
        it (see :meth:`forward`), so the recompute draws the same noise and the layer's own stream is not advanced.
        """
        state = self.hf_cim_state
        if state.replay_generator is not None:
            return state.replay_generator
        gen = state.generator
        if gen is None or gen.device != device:
            gen = layer_generator(device, state.seed, state.name)
            state.generator = gen
        return gen

    def _noise_context(self, device: torch.device, generator: torch.Generator | None = None) -> NoiseContext:
        state = self.hf_cim_state
        return NoiseContext(
            generator=generator if generator is not None else self.noise_generator(device),
            level=state.level,
            t_inference=state.t_inference,
            tile_rows=state.config.tile_size or self.in_dim,
            layer_name=state.name,
        )

    # -- chip programming ----------------------------------------------------------------------------------------
    def program(self, seed: int, t_inference: float = 0.0) -> None:
        """Program a simulated chip: draw the static non-idealities once and keep them for every product in eval.

        The draw uses its own generator seeded from (``seed``, layer name), so the same seed programs the same chip
        whatever happened before, on every process of a distributed run (each rank evaluating its shard of the data
        sees the same devices); programming the same seed at another ``t_inference`` gives the same chip drifted to
        that time.
        """
        weight = self.weight.detach()
        if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters outside forward: program the whole array
            weight = weight.full_tensor()
        weight = self.weight_oi(weight)
        device = weight.device
        gen = chip_generator(device, seed, self.hf_cim_name)
        self.hf_cim_t_inference = float(t_inference)
        ctx = self._noise_context(device, generator=gen)
        cfg = self.hf_cim_config
        with torch.no_grad():
            self.hf_cim_state.chip = program_weights(weight.float(), TileSpec.from_config(cfg), ctx, cfg.noise)
        self.hf_cim_state.chip_correction = None

    def clear_program(self) -> None:
        """Forget the programmed chip (and its output correction): evaluation draws the static noise anew at every
        forward again."""
        self.hf_cim_state.chip = None
        self.hf_cim_state.chip_correction = None

    @property
    def is_programmed(self) -> bool:
        return self.hf_cim_state.chip is not None

    # -- forward -------------------------------------------------------------------------------------------------
    def forward_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the plain layer computes in for the input ``x``: autocast's, else ``x``'s."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return x.dtype

    def noisy_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        differentiable: bool,
        aux: dict[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """The analog product. ``aux`` (STE modes), when given, receives what the STE backward needs:
        ``"mask"`` (the ADC's pass mask per tile, or None), ``"input_mask"`` (a static DAC's pass mask, in ``x``'s
        layout) and ``"weight"`` (the programmed weights in the layer's units, ``(out, in)``), as the config's
        ``mask_saturated`` / ``backward_weights`` ask."""
        out_dtype = self.forward_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2d = self.to_rows(x).float()
            cfg = self.hf_cim_config
            spec = TileSpec.from_config(cfg)
            input_range = self.input_range() if spec.static_range else None
            ctx = self._noise_context(x.device)
            on_chip = self.hf_cim_state.chip is not None and not self.training
            chained = None
            if on_chip:
                w_prog, w_scale = self.hf_cim_state.chip
            elif aux is not None and weight.requires_grad and chains_programming(cfg, ctx.level):
                # The STE backward takes the crossbar's weight gradient on through this draw's programming, and
                # ``ste_detach``'s surrogate reads it.
                w_oi, w_prog, w_scale, chained = program_chained(
                    lambda: self.weight_oi(weight).float(),
                    lambda w: program_weights(w, spec, ctx, cfg.noise, differentiable=True),
                    (lambda w: program_weights_with_derivative(w, spec, ctx, cfg.noise))
                    if programs_elementwise(cfg.noise, ctx)
                    else None,
                )
            else:
                w_oi = self.weight_oi(weight).float()
                w_prog, w_scale = program_weights(w_oi, spec, ctx, cfg.noise, differentiable=differentiable)
            saturation = None
            if aux is not None:
                saturation = [] if cfg.mask_saturated else None
                if cfg.mask_saturated and input_range is not None:
                    aux["input_mask"] = dac_pass_mask(
                        x, spec.input_qmax, input_range, quantize=spec.input_bits is not None
                    )
            y2d = analog_matmul(
                x2d, w_prog, w_scale, bias, spec, ctx, cfg.noise, differentiable=differentiable,
                saturation=saturation, input_range=input_range,
                product_dtype=operand_dtype(cfg.product_precision, out_dtype),
                output_step=cfg.output_step(self.hf_cim_name) if cfg.output_ranges else None,
            )  # fmt: skip
            if saturation:
                aux["mask"] = saturation[0]
            if chained is not None:
                aux["program"] = chained
            if aux is not None and cfg.backward_weights == "programmed":
                # After the product, this forward's own programmed weights are scaled in place: no second
                # weight-sized tensor per step (77 MB for GPT-2's LM head). A programmed chip's are kept intact, and
                # so are weights the chained programming saved for its backward (their product is at hand).
                if chained is not None:
                    aux["weight"] = chained.detach()
                else:
                    aux["weight"] = w_prog * w_scale if on_chip else w_prog.mul_(w_scale)
            correction = self.hf_cim_state.chip_correction
            if on_chip and correction is not None:  # the chip's digital periphery: per-column affine correction
                y2d = torch.addcmul(correction[1], y2d, correction[0])
            elif self.training and cfg.train_output_correction is not None:  # the sampled chip, fitted on its batch
                y2d = correct_on_batch(y2d, dac_clip(x2d, input_range), w_oi, bias, cfg.train_output_correction)
            return self.from_rows(y2d, x).to(out_dtype)

    def input_range(self) -> float:
        """This layer's calibrated DAC full scale (``input_quant="static"``), from the config's ``input_ranges``.

        Raises:
            ValueError: the config has no range for this layer (not calibrated yet).
        """
        cfg = self.hf_cim_config
        found = (cfg.input_ranges or {}).get(self.hf_cim_name)
        if found is None:
            raise ValueError(
                f"layer {self.hf_cim_name!r}: input_quant='static' needs its DAC range in the config's "
                "`input_ranges`; calibrate them first: hf_cim.calibration.calibrate_input_ranges(model, batches)"
            )
        return found

    @property
    def ste_levers(self) -> bool:
        """Whether the STE backward differs from the plain layer's (a saturation mask, programmed weights or the weight
        gradient chained through the programming)."""
        cfg = self.hf_cim_config
        clips = cfg.output_bits is not None or cfg.input_quant == "static"
        return (cfg.mask_saturated and clips) or cfg.backward_weights == "programmed" or cfg.program_gradient

    # -- the STE backward with its levers -------------------------------------------------------------------------
    def ste_backward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        w_prog: torch.Tensor | None,
        need_x: bool,
        need_w: bool,
        dtype: torch.dtype,
        input_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``∂L/∂x = m_in⊙((g⊙m)·W_b)``, ``∂L/∂W = (g⊙m)ᵀ·x`` per crossbar tile: ``m`` the ADC's pass mask of that
        tile (all ones without ``mask``), ``W_b`` the programmed weights ``w_prog`` or the clean ones, ``m_in`` a
        static DAC's pass mask (``input_mask``, in ``x``'s layout). With no lever it is exactly the plain layer's
        backward."""
        grad_x, grad_w = self._lever_backward(x, weight, grad, mask, w_prog, need_x, need_w, dtype)
        if input_mask is not None and grad_x is not None:
            grad_x = masked_gradient(grad_x, input_mask)
        return grad_x, grad_w

    def _lever_backward(self, x, weight, grad, mask, w_prog, need_x, need_w, dtype):
        if mask is not None and mask.shape[0] > 1:
            return self._tiled_ste_backward(x, weight, grad, mask, w_prog, need_x, need_w, dtype)
        if mask is not None:
            grad = masked_gradient(grad, self.from_rows(mask[0], x))
        if w_prog is None:
            return self.clean_backward(x, weight, grad, need_x, need_w, dtype)
        grad_x, _ = self.clean_backward(x, self.weight_from_oi(w_prog, weight), grad, need_x, False, dtype)
        _, grad_w = self.clean_backward(x, weight, grad, False, need_w, dtype)
        return grad_x, grad_w

    def _tiled_ste_backward(self, x, weight, grad, mask, w_prog, need_x, need_w, dtype):
        grad_x, grad_w = lever_vjp(
            self.to_rows(x.detach()),
            self.weight_oi(weight),
            self.grad_rows(grad),
            mask,
            w_prog,
            self.hf_cim_config.tile_size,
            need_x,
            need_w,
            dtype,
        )
        if grad_x is not None:
            grad_x = self.input_grad_from_rows(grad_x, x).to(x.dtype)
        if grad_w is not None:
            grad_w = self.weight_from_oi(grad_w, weight).to(weight.dtype)
        return grad_x, grad_w

    def ste_surrogate(self, x, weight, bias, mask, w_prog, program=None):
        """``ste_detach``'s stand-in when a lever is on (:func:`hf_cim.ste.lever_surrogate`, in the layer's layout);
        ``program``: the programmed weights ``(out, in)`` as a function of ``weight`` (``program_gradient``)."""
        dtype = self.forward_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y_rows = lever_surrogate(
                self.to_rows(x).to(dtype),
                self.weight_oi(weight).to(dtype),
                None if bias is None else bias.to(dtype),
                mask,
                w_prog,
                self.hf_cim_config.tile_size,
                program,
            )
            return self.from_rows(y_rows, x)

    def chain_program(self, grad_w: torch.Tensor, w_in: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
        """``program_gradient``: the crossbar's weight gradient ``grad_w`` (the layer's layout) taken on through the
        weight programming that made ``program`` (``(out, in)``, under autograd) from ``w_in``."""
        cotangent = self.weight_oi(grad_w).to(program.dtype)
        (grad,) = torch.autograd.grad(program, w_in, cotangent)
        return grad.to(grad_w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.hf_cim_state
        if state.disabled or (not self.training and not state.config.noise_in_eval):
            return self.clean_forward(x)
        if x.is_meta or self.weight.is_meta:
            # Meta tensors hold no values, only shapes: the plain layer's forward gives the analog output's shape and
            # dtype (and the plain layer's error for mixed devices); generators and autocast have no meta device.
            return self.clean_forward(x)
        if self.training and state.level > 0.0:
            with checkpoint_replay(self, x.device):
                return self._analog_forward(x)
        return self._analog_forward(x)

    def _analog_forward(self, x: torch.Tensor) -> torch.Tensor:
        return analog_forward(self, x, self.weight, self.bias)


class AnalogLayer(AnalogLayerMixin, abc.ABC):
    """The contract of a dense analog layer type: what it supplies so that the shared machinery above (forward,
    chip programming, the STE backward and its levers) runs it on a crossbar.

    A new layer type is one subclass of this and of the plain layer, registered with :func:`register_analog_layer`::

        @register_analog_layer(MyLinear)
        class NoisyMyLinear(AnalogLayer, MyLinear):
            in_dim = ...  # and the six methods below

    It holds the plain layer's own Parameters (the class of the existing module is swapped, nothing is copied), so
    it reads ``self.weight`` / ``self.bias`` as the plain layer does. The analog simulation always sees the weight as
    an ``(out, in)`` matrix and the input as ``(vectors, in)`` rows; the adapters translate the layer's layout.
    """

    @property
    @abc.abstractmethod
    def in_dim(self) -> int:
        """Crossbar rows one product needs (the length of one input vector)."""

    @abc.abstractmethod
    def weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (in the layer's layout) as an ``(out, in)`` matrix, a view where possible."""

    @abc.abstractmethod
    def weight_from_oi(self, w_oi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` matrix back in ``weight``'s layout (the inverse of :meth:`weight_oi`)."""

    @abc.abstractmethod
    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as the ``(vectors, in)`` matrix the crossbar multiplies."""

    @abc.abstractmethod
    def from_rows(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The crossbar's ``(vectors, out)`` output in the layer's output layout (for the input ``x``)."""

    @abc.abstractmethod
    def clean_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain layer's forward (the digital product)."""

    @abc.abstractmethod
    def clean_backward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        grad: torch.Tensor,
        need_x: bool,
        need_w: bool,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The plain layer's vector-Jacobian product for ``x`` and ``weight`` (None where not needed), computed in
        ``dtype`` and returned in the dtypes of ``x`` and ``weight``."""

    # -- adapters with a default (override when the layout needs it) ----------------------------------------------
    def grad_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The upstream gradient in the crossbar's ``(vectors, out)`` layout (the inverse of ``from_rows``)."""
        return grad.reshape(-1, grad.shape[-1])

    def input_grad_from_rows(self, grad_rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The gradient of ``x`` from the gradient of its crossbar rows (the VJP of ``to_rows``)."""
        return grad_rows.reshape(x.shape)

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The bias gradient (the bias is added digitally, after the ADC: ``Σg`` over everything but channels)."""
        return grad.reshape(-1, grad.shape[-1]).sum(0).to(self.bias.dtype)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """None when this class can take over ``module`` (an instance of :attr:`plain_class`), else why not (for
        :func:`hf_cim.patch_model`'s error)."""
        return None


#: Exact plain layer type → its analog class, filled by :func:`register_analog_layer`. Dispatch is on exact types:
#: a subclass of nn.Linear with its own forward would lose that forward if swapped.
LAYER_MAP: dict[type[nn.Module], type[AnalogLayer]] = {}


def register_analog_layer(plain: type[nn.Module]) -> Callable[[type[AnalogLayer]], type[AnalogLayer]]:
    """Class decorator: the decorated :class:`AnalogLayer` subclass is the analog version of exactly ``plain``
    (``patch_model`` then swaps modules of type ``plain`` to it).

    Raises:
        TypeError: the class is not a subclass of both :class:`AnalogLayer` and ``plain``, or leaves a method of the
            contract abstract.
        ValueError: ``plain`` already has another analog class.
    """

    def register(cls: type[AnalogLayer]) -> type[AnalogLayer]:
        if not (isinstance(cls, type) and issubclass(cls, AnalogLayer) and issubclass(cls, plain)):
            raise TypeError(
                f"register_analog_layer({plain.__name__}): {cls!r} must subclass both AnalogLayer and {plain.__name__}"
            )
        missing = sorted(cls.__abstractmethods__)
        if missing:
            raise TypeError(
                f"register_analog_layer({plain.__name__}): {cls.__name__} does not define {missing} of the "
                "AnalogLayer contract"
            )
        if LAYER_MAP.get(plain, cls) is not cls:
            raise ValueError(
                f"register_analog_layer: {plain.__name__} already has the analog class {LAYER_MAP[plain].__name__}"
            )
        cls.plain_class = plain
        LAYER_MAP[plain] = cls
        return cls

    return register


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return a.to(dtype) @ b.to(dtype)


@register_analog_layer(nn.Linear)
class NoisyLinear(AnalogLayer, nn.Linear):
    """``nn.Linear`` computed on a simulated analog crossbar; weight ``(out, in)``."""

    @property
    def in_dim(self) -> int:
        return self.in_features

    def weight_oi(self, weight):
        return weight

    def weight_from_oi(self, w_oi, weight):
        return w_oi

    def to_rows(self, x):
        return x.reshape(-1, self.in_features)

    def from_rows(self, y, x):
        return y.reshape(*x.shape[:-1], self.out_features)

    def clean_forward(self, x):
        return nn.Linear.forward(self, x)

    def clean_backward(self, x, weight, grad, need_x, need_w, dtype):
        grad_x = _mm(grad, weight, dtype).to(x.dtype) if need_x else None
        grad_w = None
        if need_w:
            g2d = grad.reshape(-1, grad.shape[-1])
            grad_w = _mm(g2d.t(), x.reshape(-1, x.shape[-1]), dtype).to(weight.dtype)
        return grad_x, grad_w


@register_analog_layer(Conv1D)
class NoisyConv1D(AnalogLayer, Conv1D):
    """transformers' ``Conv1D`` (GPT-2) on a simulated crossbar; its weight is stored ``(in, out)``."""

    @property
    def in_dim(self) -> int:
        return self.weight.shape[0]

    def weight_oi(self, weight):
        return weight.t()

    def weight_from_oi(self, w_oi, weight):
        return w_oi.t()

    def to_rows(self, x):
        return x.reshape(-1, self.weight.shape[0])

    def from_rows(self, y, x):
        return y.reshape(*x.shape[:-1], self.nf)

    def clean_forward(self, x):
        return Conv1D.forward(self, x)

    def clean_backward(self, x, weight, grad, need_x, need_w, dtype):
        grad_x = _mm(grad, weight.t(), dtype).to(x.dtype) if need_x else None
        grad_w = None
        if need_w:
            g2d = grad.reshape(-1, grad.shape[-1])
            grad_w = _mm(x.reshape(-1, x.shape[-1]).t(), g2d, dtype).to(weight.dtype)
        return grad_x, grad_w


@register_analog_layer(nn.Conv2d)
class NoisyConv2d(AnalogLayer, nn.Conv2d):
    """``nn.Conv2d`` lowered to a crossbar product over its unfolded patches (``groups == 1``).

    Each output pixel's receptive field (``in_channels·kh·kw`` values) is one input vector of the crossbar; the
    weight is viewed as ``(out_channels, in_channels·kh·kw)``. Padding modes other than zeros are applied first.
    """

    @property
    def in_dim(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def weight_oi(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def weight_from_oi(self, w_oi, weight):
        return w_oi.reshape(weight.shape)

    def grad_rows(self, grad):
        grad4 = grad if grad.dim() == 4 else grad.unsqueeze(0)
        return grad4.flatten(2).transpose(1, 2).reshape(-1, grad4.shape[1])

    def input_grad_from_rows(self, grad_rows, x):
        # The VJP of the unfold (and padding): overlapping patches add up, as the convolution's input gradient does.
        with torch.enable_grad():
            xd = x.detach().to(grad_rows.dtype).requires_grad_(True)
            (grad_x,) = torch.autograd.grad(self.to_rows(xd), xd, grad_rows)
        return grad_x

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return x, (0, 0)
            return F.pad(x, self._reversed_padding_repeated_twice), (0, 0)  # "same" (stride 1)
        return x, tuple(self.padding)

    def _output_hw(self, x: torch.Tensor) -> tuple[int, int]:
        xp, pad = self._padded(x[:1, :1])
        out = []
        for i in range(2):
            size = xp.shape[2 + i] + 2 * pad[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1
            out.append(size // self.stride[i] + 1)
        return out[0], out[1]

    def to_rows(self, x):
        if x.dim() not in (3, 4):  # nn.Conv2d's own check and message
            raise RuntimeError(
                f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(x.shape)}"
            )
        xp, pad = self._padded(x if x.dim() == 4 else x.unsqueeze(0))  # (C, H, W): one image, as nn.Conv2d
        cols = F.unfold(xp, self.kernel_size, dilation=self.dilation, padding=pad, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N·L, C·kh·kw)

    def from_rows(self, y, x):
        n = x.shape[0] if x.dim() == 4 else 1
        oh, ow = self._output_hw(x if x.dim() == 4 else x.unsqueeze(0))
        y = y.reshape(n, oh * ow, self.out_channels).transpose(1, 2).reshape(n, self.out_channels, oh, ow)
        return y if x.dim() == 4 else y.squeeze(0)

    def clean_forward(self, x):
        return nn.Conv2d.forward(self, x)

    def clean_backward(self, x, weight, grad, need_x, need_w, dtype):
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad.to(dtype),
                x.to(dtype),
                weight.to(dtype),
                None,
                list(self.stride),
                list(self.padding),
                list(self.dilation),
                False,
                [0, 0],
                self.groups,
                [need_x, need_w, False],
            )
            return (grad_x.to(x.dtype) if need_x else None), (grad_w.to(weight.dtype) if need_w else None)
        # Other padding modes: the clean convolution's vector-Jacobian product, recomputed from the saved x and W.
        with torch.enable_grad():
            xd = x.detach().to(dtype).requires_grad_(need_x)
            wd = weight.detach().to(dtype).requires_grad_(need_w)
            y = self._conv_forward(xd, wd, None)
            inputs = [t for t, need in ((xd, need_x), (wd, need_w)) if need]
            grads = list(torch.autograd.grad(y, inputs, grad.to(dtype)))
        grad_x = grads.pop(0).to(x.dtype) if need_x else None
        grad_w = grads.pop(0).to(weight.dtype) if need_w else None
        return grad_x, grad_w

    def bias_grad(self, grad):
        dims = (0, 2, 3) if grad.dim() == 4 else (1, 2)
        return grad.sum(dims).to(self.bias.dtype)

    @classmethod
    def unsupported_reason(cls, module):
        if module.groups != 1:
            return f"is a grouped Conv2d (groups={module.groups}); only groups=1 maps onto one crossbar"
        return None
