"""The noise-model protocol and its registry.

A noise model is a small dataclass with a registered ``name`` and up to three hooks, each optional:

* ``program(w, ctx)``: static, at programming time. Receives the normalized, quantized weights ``w`` of shape
  ``(out, in)`` with ``|w| <= 1`` (``|w| = 1`` maps to ``g_max``) and returns what the devices actually store
  (programming noise, stuck devices, drift to ``ctx.t_inference``...). In training it runs at every forward
  (the weights change every step); on a programmed chip (:func:`hf_cim.program_chip`) it runs once per chip.
* ``read(w, ctx)``: dynamic, at every product, on the programmed weights (read noise, temperature).
* ``output(y, x, w, ctx)``: on the analog partial sums of each crossbar tile, before the ADC. ``y`` is
  ``(tiles, tokens, out)``, ``x`` the DAC outputs ``(tiles, tokens, rows)`` and ``w`` the read weights
  ``(tiles, out, rows)``, all in normalized units (IR-drop, output noise, output-referred read noise).

Hooks may be non-differentiable (numpy, lookup tables, an external simulator): set ``differentiable = False`` and
the ``full`` gradient mode passes that hook straight through instead of differentiating it. The ``ste`` modes never
differentiate any hook. All randomness must come from ``ctx.generator`` (best through ``ctx.randn_like`` and
``ctx.add_randn_``: fused, multi-threaded, see :mod:`hf_cim.rng`) and all magnitudes must scale with
``ctx.level`` (``level = 0`` means the model adds no noise).

Fusion is a capability a model declares, not something the tile simulation guesses from its type: a model whose
``program`` or ``output`` hook is exactly additive Gaussian noise says so with :meth:`NoiseModel.additive_gaussian`,
and the no-grad backend may then draw that noise inside its fused kernel (same key, same numbers). Likewise a model
whose hook acts on each output channel on its own says so with :meth:`NoiseModel.rowwise`, and the MoE experts of one
projection are then programmed in one call.

Models serialise as ``{"name": ..., **fields}`` and are rebuilt only through the registry, never from an import path
or a pickle.
"""

from __future__ import annotations

import dataclasses
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import rng
from ..validation import check_range  # re-exported: ``hf_cim.noise.check_range`` is the name the docs give users

__all__ = [
    "SPREAD_DTYPES",
    "NoiseContext",
    "NoiseModel",
    "autograd_derivative",
    "check_range",
    "check_spread_dtype",
    "fast_bfloat16_products",
    "get_noise_model_class",
    "integral_floats_to_ints",
    "list_noise_models",
    "noise_model_from_dict",
    "register_noise_model",
    "resolve_spread_dtype",
    "spread_bmm",
    "write_programmed",
]

#: Precisions a model may compute a second-order term in (a noise spread, an IR-drop correction): never the signal.
#: ``"auto"`` is ``"bfloat16"`` where the device multiplies bfloat16 natively (:func:`fast_bfloat16_products`), else
#: ``"float32"``.
SPREAD_DTYPES = ("auto", "bfloat16", "float32")

_FAST_BF16: dict[tuple[str, int | None], bool] = {}


def fast_bfloat16_products(device: torch.device) -> bool:
    """Whether a bfloat16 matrix product on ``device`` runs on native kernels: CUDA devices with native bfloat16
    (compute capability 8.0 and later; ROCm), CPUs on which torch multiplies bfloat16 through oneDNN (AVX-512 or AMX
    on x86, the BF16 extension on ARM).

    Elsewhere (an x86 CPU with AVX2 only, for one) torch's CPU GEMM falls back to a scalar bfloat16 loop: measured on
    an AVX2-only AMD EPYC, a ``(2, 2048, 256) × (2, 256, 50257)`` product took 42 s in bfloat16 against 1.1 s in
    float32 (docs/noise_models.md), so a spread computed "cheaply" in bfloat16 there costs 38× the exact one.
    Cached per device.
    """
    key = (device.type, device.index)
    found = _FAST_BF16.get(key)
    if found is None:
        if device.type == "cuda":
            with torch.cuda.device(device):
                found = bool(torch.cuda.is_bf16_supported(including_emulation=False))  # Ampere and later
        elif device.type == "cpu":
            check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
            found = bool(torch.backends.mkldnn.is_available() and check is not None and check())
        else:  # no evidence either way: the exact reference
            found = False
        _FAST_BF16[key] = found
    return found


def resolve_spread_dtype(dtype: str, device: torch.device) -> str:
    """``"bfloat16"`` or ``"float32"``: ``dtype`` itself, or for ``"auto"`` what :func:`fast_bfloat16_products`
    says ``device`` multiplies fast."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bfloat16_products(device) else "float32"


def spread_bmm(a: torch.Tensor, b: torch.Tensor, dtype: str, last_rows: int = 0) -> torch.Tensor:
    """``torch.bmm(a, b)`` for a term that sets a noise spread or a small correction, not the signal.

    ``last_rows`` (``NoiseContext.last_tile_rows``): when ``0 < last_rows < a.shape[-1]`` and there are several
    tiles, the last tile's product runs over its first ``last_rows`` rows only: the others are zero padding (no input,
    no conductance), so the sums are the same, without the padded rows' work (a third of IR-drop's products for a
    384-wide layer on 256-row tiles). Not under autograd.

    ``dtype="auto"`` is one of the two below, by :func:`resolve_spread_dtype` for ``a``'s device.
    ``dtype="float32"`` is the reference: the plain product. ``"bfloat16"`` rounds both operands to bfloat16 (8
    significant bits: relative error <= u = 2^-8 each), multiplies with float32 accumulation (oneDNN on the CPU,
    cuBLAS on CUDA) and returns the bfloat16 result (torch's CPU GEMM has no float32 output for bfloat16 inputs):
    consumers read it in float32, which is exact, inside the pass that uses it (the C kernels of
    :mod:`hf_cim.native` take it as it is; a separate conversion pass costs more than the product on the CPU). For a sum of non-negative terms the result is therefore within
    ``(1 + u)^3 − 1 < 1.2 %`` of the float32 one for every output, whatever the data, and its square root within
    0.6 %; the errors of the operands mostly average out over the rows (observed <= 0.85 % and 0.45 % on LLM-like
    data with outlier features). A signed sum has no such relative bound where it cancels: keep those float32. On
    CPUs with AMX or AVX512-BF16 this product costs about a fifth of the float32 one; on CPUs without bfloat16
    instructions it costs far more (``"auto"`` chooses ``"float32"`` there). Inputs that are not float32 (float64 in
    tests) are multiplied as they are.
    """
    if a.dtype == torch.float32 and resolve_spread_dtype(dtype, a.device) == "bfloat16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    tiles, rows = a.shape[0], a.shape[-1]
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if tiles == 1 or not 0 < last_rows < rows or grad:
        return torch.bmm(a, b)
    out = a.new_empty((tiles, a.shape[1], b.shape[-1]))
    torch.bmm(a[:-1], b[:-1], out=out[:-1])
    torch.bmm(a[-1:, :, :last_rows], b[-1:, :last_rows], out=out[-1:])
    return out


def check_spread_dtype(owner: str, field: str, value: Any) -> None:
    """Raise ``ValueError`` naming the field unless ``value`` is one of :data:`SPREAD_DTYPES`."""
    if value not in SPREAD_DTYPES:
        raise ValueError(f"{owner}: `{field}` must be one of {SPREAD_DTYPES}, got {value!r}")


_REGISTRY: dict[str, type[NoiseModel]] = {}
_assignment = threading.local()


@dataclass
class NoiseContext:
    """What a hook may know about the product it perturbs.

    Args:
        generator: the layer's ``torch.Generator``; every random draw must use it.
        level: global noise scale (dimensionless, >= 0); every magnitude is multiplied by it.
        t_inference: seconds since programming (drift and accumulated read noise); 0 means right after programming.
        tile_rows: rows of a crossbar tile (the input dimension of one tile).
        layer_name: fully qualified module name, for models that keep per-layer data (e.g. a measured table).
        weight_scale: per-output-channel abs-max of the float weights, shape ``(out, 1)``: the factor that maps the
            normalized weights back to the layer's units (for models whose magnitude is relative to the tensor).
        sampler: what the draws run on (:class:`hf_cim.rng.Sampler`). The tile simulation hands in its backend's
            (:data:`hf_cim.kernels.SAMPLER`: fused kernels); None means the torch reference
            (:data:`hf_cim.rng.REFERENCE`): the same numbers, to one ulp.
        last_tile_rows: set by the tile simulation for the ``output`` hooks: the rows of the last tile that carry
            input when the layer's width is not a multiple of ``tile_rows`` (the rest of that tile is zero padding);
            0 when every row of every tile does. A hook may skip the padded rows (see :func:`spread_bmm`).
    """

    generator: torch.Generator | None
    level: float = 1.0
    t_inference: float = 0.0
    tile_rows: int = 0
    layer_name: str = ""
    weight_scale: torch.Tensor | None = None
    sampler: rng.Sampler | None = None
    last_tile_rows: int = 0

    def new_key(self, device: torch.device) -> torch.Tensor:
        """A fresh noise key from the layer's generator (see :mod:`hf_cim.rng`): one per draw."""
        return rng.new_key(self.generator, device)

    def _sampler(self) -> rng.Sampler:
        return rng.REFERENCE if self.sampler is None else self.sampler

    def randn_like(self, t: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``t`` (and of its dtype), drawn with a fresh key from the generator."""
        return self.randn_for_key(t, self.new_key(t.device))

    def randn_for_key(self, t: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The noise :meth:`randn_like` draws, for a key already taken with :meth:`new_key` (a fused stage's
        reference uses the key its fast implementation was handed)."""
        return self._sampler().randn(t, key).to(t.dtype)

    def add_randn_(self, t: torch.Tensor, std: float) -> torch.Tensor:
        """``t += std·ξ`` in place, ``ξ`` the numbers :meth:`randn_like` would draw, fused in one pass over ``t``."""
        key = self.new_key(t.device)
        sampler = self._sampler()
        if t.is_contiguous() and t.dtype == torch.float32 and not (torch.is_grad_enabled() and t.requires_grad):
            return sampler.add_randn_(t, std, key)
        return t.add_(sampler.randn(t, key).to(t.dtype), alpha=std)

    def add_scaled_randn_(
        self, t: torch.Tensor, scale: torch.Tensor, std: float, sqrt_scale: bool = False
    ) -> torch.Tensor:
        """``t += std·ξ·s`` in place with a per-element spread ``s = scale`` (or ``sqrt(max(scale, 1e-12))`` with
        ``sqrt_scale``; ``scale`` shaped like ``t``), ``ξ`` the numbers :meth:`randn_like` would draw; one pass
        over ``t`` on the CPU. Not for tensors that autograd records (use ``t + ctx.randn_like(t) * s * std``)."""
        return self._sampler().add_scaled_randn_(t, scale, std, self.new_key(t.device), sqrt_scale)

    def fused(self, stage: str, reference, *args):
        """``reference(*args)``, an element-wise in-place update of the hook's own (e.g. IR-drop's correction), or the
        backend's implementation of the same formula registered as ``stage`` (one pass on the CPU)."""
        return self._sampler().run(stage, reference, *args)

    def rand_like(self, t: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like ``t``, drawn from the layer's generator."""
        return torch.rand(t.shape, generator=self.generator, device=t.device, dtype=t.dtype)


def _is_int_annotation(annotation: Any) -> bool:
    if isinstance(annotation, str):  # ``from __future__ import annotations``: "int", "int | None"...
        names = {p.strip() for p in annotation.replace("Optional[", "").replace("]", "").split("|")}
    else:
        names = {getattr(a, "__name__", str(a)) for a in (typing.get_args(annotation) or (annotation,))}
    return "int" in names and names <= {"int", "None", "NoneType"}


def integral_floats_to_ints(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with integral floats (``512.0``) turned into ints for the int fields of the dataclass ``cls``.

    JSON tools may rewrite every number as a float; the dataclasses refuse floats for int fields (a ``TypeError``
    naming the field), so loaders convert the integral ones back. ``512.5`` is left for that error.
    """
    int_fields = {f.name for f in dataclasses.fields(cls) if _is_int_annotation(f.type)}
    return {k: int(v) if k in int_fields and type(v) is float and v.is_integer() else v for k, v in data.items()}


def autograd_derivative(
    program: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(program(w), ∂program/∂w)`` of an element-wise ``program``, read off by autograd's vector-Jacobian product
    with ones (exact: the Jacobian is diagonal); ``0.0`` for the derivative where the result does not depend on ``w``.
    The reference of the closed forms the noise models' fused kernels write (:meth:`NoiseModel.program_derivative`)."""
    with torch.enable_grad():
        leaf = w.detach().requires_grad_()
        out = program(leaf)
        if not out.requires_grad:
            return out, 0.0
        (derivative,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    return out.detach(), derivative


def write_programmed(
    out: torch.Tensor,
    derivative: torch.Tensor | None,
    program: Callable[[torch.Tensor], torch.Tensor],
    w: torch.Tensor,
) -> torch.Tensor:
    """``out ← program(w)`` and, when a ``derivative`` buffer is given, ``derivative ← ∂program/∂w``
    (:func:`autograd_derivative`): the torch reference of a fused programming stage that writes both."""
    if derivative is None:
        return out.copy_(program(w))
    programmed, d = autograd_derivative(program, w)
    derivative.copy_(d)
    return out.copy_(programmed)


class NoiseModel:
    """Base class of every noise model; subclasses are ``@dataclass``es registered with :func:`register_noise_model`.

    Class attributes:
        name: the registry name (set by :func:`register_noise_model`).
        differentiable: whether the hooks are written in differentiable torch ops. When ``False``, the ``full``
            gradient mode passes the hooks straight through (identity gradient) instead of differentiating them.

    What a programmed chip keeps fixed is decided by the hook, not by an attribute: the ``program`` hook is the static
    part (drawn once per chip by :func:`hf_cim.program_chip`), ``read`` and ``output`` are redrawn at every product.
    """

    name: ClassVar[str] = ""
    differentiable: ClassVar[bool] = True

    def __setattr__(self, name: str, value: Any) -> None:
        # A field assigned on a built model (``model.std = -1``) is checked as the constructor checks it: through a
        # copy with the new value (``dataclasses.replace`` runs ``__post_init__``), which also stores the value
        # normalized. First assignments (in ``__init__``) and those made while a check runs are set as they are.
        if name in self.__dict__ and not getattr(_assignment, "checking", False):
            fields = {f.name: f for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}
            if name in fields and fields[name].init:
                _assignment.checking = True
                try:
                    value = getattr(dataclasses.replace(self, **{name: value}), name)
                finally:
                    _assignment.checking = False
        object.__setattr__(self, name, value)

    # Hooks: subclasses override the ones they need; the tile simulation calls only the overridden ones.
    def program(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:  # pragma: no cover - protocol default
        return w

    def read(self, w: torch.Tensor, ctx: NoiseContext) -> torch.Tensor:  # pragma: no cover - protocol default
        return w

    def output(
        self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ctx: NoiseContext
    ) -> torch.Tensor:  # pragma: no cover - protocol default
        return y

    def has_hook(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(NoiseModel, hook)

    def additive_gaussian(self, hook: str) -> float | None:
        """Fusion capability: ``std`` when this model's ``hook`` (``"program"`` or ``"output"``) is exactly
        ``t + (ctx.level·std)·ctx.randn_like(t)``: one key drawn from ``ctx`` when ``ctx.level·std > 0``, nothing
        drawn and ``t`` returned otherwise, in the normalized units the hook receives. None (the default): no such
        promise, the hook runs.

        The no-grad tile simulation then adds the noise inside a fused kernel instead of running the hook (a leading
        ``program`` model in the weight programming, a trailing ``output`` model in the ADC epilogue), with the same
        key and the same numbers. A subclass that changes the hook must override this as well.
        """
        return None

    def rowwise(self, hook: str, ctx: NoiseContext) -> bool:
        """Stacking capability: whether this model's ``hook`` treats each output channel (a row of the ``(out, in)``
        weights) on its own, so that running it once on the rows of several matrices stacked along ``out`` is running
        it on each matrix (the same distribution per row; not the same draws). hf_cim asks it for ``"program"``:
        :mod:`hf_cim.moe` programs the experts of one projection in one call when every ``program`` hook is
        rowwise, and one expert at a time otherwise. ``ctx`` is the context the hook would get (a model may depend on
        ``ctx.t_inference``).

        Default: True exactly when the hook is additive Gaussian (:meth:`additive_gaussian`): element-wise noise of
        one ``std`` in the normalized units, which are per channel. Override it for other element-wise or
        per-channel hooks; a hook that reads statistics of the whole matrix (its abs-max, a mean over rows) must
        answer False. A subclass that changes the hook must override this as well.
        """
        return self.additive_gaussian(hook) is not None

    def elementwise_derivative(self, hook: str, ctx: NoiseContext) -> bool:
        """Chain capability: whether this model's ``hook`` (only ``"program"``) acts on each weight on its own at
        ``ctx`` (a model may depend on ``ctx.t_inference``, as :meth:`rowwise`), so that :meth:`program_derivative`
        gives its derivative element by element. ``program_gradient``'s STE backward then multiplies the weight
        gradient by that derivative instead of keeping the programming's autograd graph for the backward. Default
        False (the graph is kept). A subclass that changes the hook must override this as well."""
        return False

    def program_derivative(self, w: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(program(w, ctx), ∂program/∂w)``, the derivative element by element (a tensor shaped like ``w``, or a
        float for all elements): the same draws from ``ctx`` as :meth:`program`, the same values, and the gradient
        autograd takes through :meth:`program`. Only where :meth:`elementwise_derivative` says so.

        Default: the hook under autograd, its derivative read off by one vector-Jacobian product with ones (exact for
        an element-wise hook: its Jacobian is diagonal). Override it with the closed form to skip that product."""
        return autograd_derivative(lambda leaf: self.program(leaf, ctx), w)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def register_noise_model(name: str, cls: type[NoiseModel] | None = None, *, overwrite: bool = False):
    """Register a noise model class under ``name``; usable as ``register_noise_model(name, cls)`` or as a decorator.

    Raises:
        ValueError: if ``name`` is taken (pass ``overwrite=True`` to replace it) or ``cls`` is not a dataclass
            subclass of :class:`NoiseModel`.
    """

    def _register(klass: type[NoiseModel]) -> type[NoiseModel]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_noise_model: `name` must be a non-empty string, got {name!r}")
        if not (isinstance(klass, type) and issubclass(klass, NoiseModel)):
            raise ValueError(f"register_noise_model: `cls` must subclass hf_cim.NoiseModel, got {klass!r}")
        if not dataclasses.is_dataclass(klass):
            raise ValueError(f"register_noise_model: `cls` {klass.__name__} must be a @dataclass")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not klass:
            raise ValueError(
                f"register_noise_model: a noise model named {name!r} is already registered "
                f"({_REGISTRY[name].__qualname__}); pass overwrite=True to replace it"
            )
        klass.name = name
        _REGISTRY[name] = klass
        return klass

    return _register if cls is None else _register(cls)


def list_noise_models() -> list[str]:
    """Names of all registered noise models, sorted."""
    return sorted(_REGISTRY)


def get_noise_model_class(name: str) -> type[NoiseModel]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown noise model {name!r}; registered: {', '.join(list_noise_models())}")
    return _REGISTRY[name]


def noise_model_from_dict(data: dict[str, Any]) -> NoiseModel:
    """Rebuild a noise model from ``{"name": ..., **fields}`` through the registry (unknown fields are errors)."""
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a noise model dict needs a `name` key, got {data!r}")
    cls = get_noise_model_class(data["name"])
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    fields = {k: v for k, v in data.items() if k != "name"}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"noise model {data['name']!r}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    fields = integral_floats_to_ints(cls, fields)
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    return cls(**fields)
