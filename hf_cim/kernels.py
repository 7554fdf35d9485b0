"""The backend seam: each fused stage of the no-grad analog path declared once, with its implementations per device.

A stage is a formula whose only Python definition is its torch reference (:mod:`hf_cim.converters` for the DAC,
weight programming and the ADC epilogue, :mod:`hf_cim.rng` for the noise draws, the noise model itself for a fused
update such as IR-drop's). Eagerly that reference is a dozen passes over ``(tokens, features)`` tensors and torch's
``normal_`` runs on one CPU thread; faster implementations compute the same float32 formulas in one fused,
multi-threaded loop, with the Gaussian noise computed inside it by the counter-based sampler of :mod:`hf_cim.rng`
(keys come from the layer's ``torch.Generator``, so seeding and checkpointing are unchanged):

============  =====================================================================================================
device        implementations, tried in order (the reference comes last, and always under autograd)
============  =====================================================================================================
``cpu``       the C kernels of :mod:`hf_cim.native` (``native.c``: float32, no per-call compile overhead, no
              inductor in the process, the noise computed in the loop that consumes it), then ``torch.compile`` of
              the reference
``cuda``      ``torch.compile`` of the reference
other         the reference
============  =====================================================================================================

An implementation that cannot take a call (a dtype or layout the C boundary does not accept, a switched-off or
failed backend) passes it on to the next one; a backend that cannot be built (no C compiler, an unsupported
``torch.compile`` backend) falls back with one warning: same numbers, only slower. The test suite checks that every
implementation agrees with the reference (bit for bit where no noise is drawn; the C sampler's ``sqrt`` is correctly
rounded, torch's vectorized one is not: one ulp).

``HF_CIM_NATIVE=0`` turns the C kernels off, ``HF_CIM_COMPILE=0`` torch.compile (the test suite does, to avoid
compile time); both are read once, when this module is imported. :func:`set_native` and :func:`set_compile` switch
them from Python. :data:`SAMPLER` is the :class:`hf_cim.rng.Sampler` that the tile simulation hands its noise
models (through ``NoiseContext.sampler``): their draws run on these stages, without the noise models importing
this module.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable

import torch

from . import converters, native, rng

__all__ = [
    "SAMPLER",
    "Stage",
    "compile_enabled",
    "dac",
    "epilogue",
    "native_enabled",
    "set_compile",
    "set_native",
    "weight_program",
]

logger = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").lower() not in ("0", "false", "no", "off")


# The environment is read once, here; ``set_*`` overrides it (None: back to the environment's value).
_ENV = {"native": _env_flag("HF_CIM_NATIVE"), "compile": _env_flag("HF_CIM_COMPILE")}
_state: dict[str, object] = {"native": None, "compile": None, "compiled": {}, "failed": set()}


def set_compile(enabled: bool | None) -> None:
    """Force ``torch.compile`` of the stages on or off; ``None`` goes back to ``HF_CIM_COMPILE`` (default on)."""
    _state["compile"] = enabled


def compile_enabled() -> bool:
    return _ENV["compile"] if _state["compile"] is None else bool(_state["compile"])


def set_native(enabled: bool | None) -> None:
    """Force the C kernels on the CPU on or off; ``None`` goes back to ``HF_CIM_NATIVE`` (default on)."""
    _state["native"] = enabled


def native_enabled() -> bool:
    return _ENV["native"] if _state["native"] is None else bool(_state["native"])


def _native_lib():
    """The C library when it is switched on and built, else None."""
    return native.library() if native_enabled() else None


# -- the registry ---------------------------------------------------------------------------------------------------


class Stage:
    """One fused stage: its torch reference and, per device type, faster implementations tried in order.

    Calling the stage runs the first implementation for the device of its first argument that takes the call (an
    implementation returns ``NotImplemented`` to pass), else the reference; under autograd always the reference.
    """

    def __init__(self, name: str, reference: Callable | None, impls: dict[str, tuple[Callable, ...]]):
        self.name = name
        self.reference = reference
        self.impls = impls

    def fast(self, *args, **static):
        """The first implementation's result for these arguments, or ``NotImplemented`` when none takes them."""
        if not torch.is_grad_enabled():
            for impl in self.impls.get(args[0].device.type, ()):
                out = impl(*args, **static)
                if out is not NotImplemented:
                    return out
        return NotImplemented

    def __call__(self, *args, **static):
        out = self.fast(*args, **static)
        return self.reference(*args, **static) if out is NotImplemented else out

    def __repr__(self) -> str:
        impls = {d: [getattr(f, "__name__", repr(f)) for f in fs] for d, fs in self.impls.items()}
        return f"Stage({self.name!r}, {impls})"


def _variant_function(fn: Callable, static: dict) -> Callable:
    """A copy of ``fn`` with its own code object and ``static`` as its keyword defaults.

    Dynamo keeps compiled graphs, and its recompile limit, per code object: a copy per variant keeps each variant's
    graphs apart instead of letting them evict one another.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
    return copy


def _compiled(name: str, fn: Callable) -> Callable:
    """An implementation that runs ``torch.compile(fn)`` when compilation is on.

    One compiled variant per (stage, static arguments, which arguments are None): the static arguments are flags
    that change the graph; tensors and floats are dynamic inputs (no recompilation per shape or value). A failure
    switches the stage's compilation off for the process, with one warning.
    """

    def compiled(*args, **static):
        failed: set = _state["failed"]  # type: ignore[assignment]
        if not compile_enabled() or name in failed:
            return NotImplemented
        variant = (name, tuple(sorted(static.items())), tuple(a is None for a in args))
        cache: dict = _state["compiled"]  # type: ignore[assignment]
        try:
            if variant not in cache:
                cache[variant] = torch.compile(_variant_function(fn, static), dynamic=True)
            return cache[variant](*args)
        except Exception as err:  # noqa: BLE001 - any backend failure means: run the reference
            failed.add(name)
            logger.warning("hf_cim: torch.compile of %s failed (%s); using the eager kernel", name, err)
            return NotImplemented

    compiled.__name__ = f"compiled_{name}"
    return compiled


def _key_words(key: torch.Tensor | None) -> tuple[int, int, int]:
    """``(has_key, k0, k1)`` with the key words as unsigned 32-bit ints (the same bits as the int32 key)."""
    if key is None:
        return 0, 0, 0
    k0, k1 = key.tolist()
    return 1, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF


def _same_layout(*tensors: torch.Tensor) -> bool:
    """Same-shape contiguous operands: what the element-wise C helpers index as flat arrays."""
    first = tensors[0]
    return all(t.is_contiguous() and t.shape == first.shape for t in tensors)


# -- the C implementations: allocate the outputs, hand the buffers to the checked entry points of hf_cim.native ------


def _native_dac(x, qmax, *, per_token, quantize):
    if x.dim() != 2 or not native.accepts(x) or _native_lib() is None:
        return NotImplemented
    x = x.contiguous()
    out = torch.empty_like(x)
    absmax = torch.empty((x.shape[0] if per_token else 1, 1), dtype=torch.float32)
    native.dac(x, out, absmax, qmax, per_token, quantize)
    return out, absmax


def _native_weight_program(w, qmax, noise_std=0.0, key=None):
    if w.dim() != 2 or not native.accepts(w) or _native_lib() is None:
        return NotImplemented
    w = w.contiguous()
    out = torch.empty_like(w)
    scale = torch.empty((w.shape[0], 1), dtype=torch.float32)
    has_key, k0, k1 = _key_words(key)
    native.weight_program(w, out, scale, -1.0 if qmax is None else qmax, noise_std, has_key, k0, k1)
    return out, scale


def _native_epilogue(
    y, recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std=0.0, key=None, *, adc
):
    if not (y.is_contiguous() and native.accepts(y, recombine, x_absmax, row_scale, bias_row)):
        return NotImplemented
    if _native_lib() is None:
        return NotImplemented
    tiles, t, o = y.shape
    out = y[0] if tiles == 1 else torch.empty((t, o), dtype=torch.float32)  # a one-tile product: in place
    bias_row = None if bias_row is None else bias_row.contiguous()
    native.epilogue(
        y, out, recombine.contiguous(), x_absmax.contiguous(), row_scale.contiguous(), bias_row, inv_step, levels,
        in_scale, noise_std, *_key_words(key), adc,
    )  # fmt: skip
    return out


def _native_randn(like, key):
    if _native_lib() is None:
        return NotImplemented
    out = torch.empty(like.shape, dtype=torch.float32)
    native.randn(out, 0.0, False, *_key_words(key)[1:])
    return out


def _native_add_randn_(t, std, key):
    if not (t.is_contiguous() and native.accepts(t)) or _native_lib() is None:
        return NotImplemented
    native.randn(t, std, True, *_key_words(key)[1:])
    return t


def _native_add_scaled_randn_(t, scale, std, key, sqrt_scale=False):
    if not (native.accepts(t) and native.accepts_spread(scale) and _same_layout(t, scale)) or _native_lib() is None:
        return NotImplemented
    native.add_scaled_randn(t, scale, std, sqrt_scale, *_key_words(key)[1:])
    return t


def _native_ir_drop_(y, a, y_pos):
    if (
        not (native.accepts(y) and native.accepts_spread(a, y_pos) and _same_layout(y, a, y_pos))
        or _native_lib() is None
    ):
        return NotImplemented
    native.ir_drop(y, a, y_pos)
    return y


def _native_lognormal_program_(out, factor, w, sigma, shift, max_log, key):
    operands = (out, w) if factor is None else (out, factor, w)
    if not (native.accepts(*operands) and _same_layout(*operands)) or _native_lib() is None or w.numel() > 2**32:
        return NotImplemented
    native.lognormal_program(w, out, factor, sigma, shift, max_log, *_key_words(key)[1:])
    return out


def _native_pair_program_(out, derivative, w, coeffs, divisor, s, clip_max, key, *, bounded):
    operands = (out, w) if derivative is None else (out, derivative, w)
    if not (native.accepts(*operands) and _same_layout(*operands)) or _native_lib() is None or 2 * w.numel() > 2**32:
        return NotImplemented
    native.pair_program(
        w, out, _coefficients(coeffs), divisor, s, clip_max, bounded, *_key_words(key)[1:], derivative=derivative
    )
    return out


def _native_pcm_read_(out, w, g_min, sqrt_log, scale, key):
    if not (native.accepts(out, w) and _same_layout(out, w)) or _native_lib() is None or w.numel() > 2**32:
        return NotImplemented
    native.pcm_read(w, out, g_min, sqrt_log, scale, *_key_words(key)[1:])
    return out


def _native_stuck_at_(out, derivative, w, u, p_off, p_on):
    operands = (out, w) if derivative is None else (out, derivative, w)
    if not (native.accepts(*operands, u) and _same_layout(*operands) and u.is_contiguous()) or _native_lib() is None:
        return NotImplemented
    native.stuck_at(w, u, out, p_off, p_on, derivative)
    return out


_COEFFS: dict[tuple[float, ...], torch.Tensor] = {}


def _coefficients(coeffs: tuple[float, ...]) -> torch.Tensor:
    """A polynomial's coefficients as the float32 CPU tensor the C kernel reads (cached: a handful per process)."""
    t = _COEFFS.get(coeffs)
    if t is None:
        t = _COEFFS[coeffs] = torch.tensor(coeffs, dtype=torch.float32)
    return t


def within(y: torch.Tensor, bound: float) -> torch.Tensor:
    """``|y| <= bound`` as a bool tensor, without autograd: one pass of the C kernel on the CPU (no float ``|y|``
    temporary: for an LM head's partial sums that is the size of the logits per tile), the torch formula elsewhere."""
    y = y.detach()
    if y.is_contiguous() and native.accepts(y) and _native_lib() is not None:
        out = torch.empty(y.shape, dtype=torch.bool)
        native.within(y, out, bound)
        return out
    return y.abs() <= bound


# -- the stages -----------------------------------------------------------------------------------------------------


def _epilogue_single_(
    y2d, recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std=0.0, key=None, *, adc
):
    """:func:`hf_cim.converters.epilogue` of a one-tile product ``y2d`` (``(T, out)``: the same flat indices as
    ``(1, T, out)``), written into ``y2d`` itself. Reading and writing one 2-D tensor with no reduction lets inductor
    update it in place: no second (tokens × out) buffer, which for an LM head is the size of the logits."""
    y_tile = converters.adc_tiles(y2d, in_scale, inv_step, levels, noise_std, key, adc=adc) * recombine[0]
    return y2d.copy_(converters.rescale(y_tile, x_absmax, row_scale, bias_row, adc=adc))


_compiled_epilogue_single = _compiled("epilogue_single", _epilogue_single_)
_compiled_epilogue_tiles = _compiled("epilogue", converters.epilogue)


def _compiled_epilogue(y, *rest, adc):
    if y.shape[0] == 1 and y.is_contiguous():
        return _compiled_epilogue_single(y[0], *rest, adc=adc)
    return _compiled_epilogue_tiles(y, *rest, adc=adc)


def _stage(name: str, reference: Callable | None, native_impl: Callable | None, compile: bool = True) -> Stage:
    compiled = _compiled(name, reference) if compile and reference is not None else None
    cpu = tuple(f for f in (native_impl, compiled) if f is not None)
    return Stage(name, reference, {"cpu": cpu, "cuda": (compiled,) if compiled is not None else ()})


_dac = _stage("dac", converters.dac, _native_dac)
_weight_program = _stage("weight_program", converters.weight_program, _native_weight_program)
_epilogue = Stage(
    "epilogue",
    converters.epilogue,
    {"cpu": (_native_epilogue, _compiled_epilogue), "cuda": (_compiled_epilogue,)},
)
_randn = _stage("randn", rng.randn, _native_randn)
_add_randn = _stage("add_randn", rng.add_randn_, _native_add_randn_)
# Fused updates of noise models: the reference comes with each call (the formula lives in the noise model).
_noise_stages = {
    "add_scaled_randn_": _stage("add_scaled_randn_", None, _native_add_scaled_randn_),
    "ir_drop_": _stage("ir_drop_", None, _native_ir_drop_),
    "lognormal_program_": _stage("lognormal_program_", None, _native_lognormal_program_),
    "reram_program_": _stage("reram_program_", None, functools.partial(_native_pair_program_, bounded=True)),
    "pcm_program_": _stage("pcm_program_", None, functools.partial(_native_pair_program_, bounded=False)),
    "stuck_at_": _stage("stuck_at_", None, _native_stuck_at_),
    "pcm_read_": _stage("pcm_read_", None, _native_pcm_read_),
}


def dac(x: torch.Tensor, qmax: float, per_token: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hf_cim.converters.dac`, fused."""
    return _dac(x, qmax, per_token=per_token, quantize=quantize)


def weight_program(
    w: torch.Tensor, qmax: float | None, noise_std: float = 0.0, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hf_cim.converters.weight_program` of the detached ``w`` (the STE's forward), fused."""
    # A Parameter would get static-shape guards in torch.compile (a recompilation per layer shape): a plain tensor.
    return _weight_program(w.detach(), qmax, noise_std, key)


def epilogue(
    y: torch.Tensor,
    recombine: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias_row: torch.Tensor | None,
    inv_step: float = 1.0,
    levels: float = 0.0,
    in_scale: float = 1.0,
    noise_std: float = 0.0,
    key: torch.Tensor | None = None,
    adc: bool = True,
) -> torch.Tensor:
    """:func:`hf_cim.converters.epilogue`, fused. A fused one-tile ``y`` is overwritten by the result (a view of it
    is returned)."""
    return _epilogue(y, recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std, key, adc=adc)


class _KernelSampler(rng.Sampler):
    """The :class:`hf_cim.rng.Sampler` on the fused stages: the same numbers (to one ulp), one pass each."""

    def randn(self, like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _randn(like, key)

    def add_randn_(self, t: torch.Tensor, std: float, key: torch.Tensor) -> torch.Tensor:
        return _add_randn(t, std, key)

    def add_scaled_randn_(
        self, t: torch.Tensor, scale: torch.Tensor, std: float, key: torch.Tensor, sqrt_scale: bool = False
    ) -> torch.Tensor:
        out = _noise_stages["add_scaled_randn_"].fast(t, scale, std, key, sqrt_scale)
        return super().add_scaled_randn_(t, scale, std, key, sqrt_scale) if out is NotImplemented else out

    def run(self, stage: str, reference: Callable, *args):
        impl = _noise_stages.get(stage)
        out = NotImplemented if impl is None else impl.fast(*args)
        return reference(*args) if out is NotImplemented else out


#: The sampler the tile simulation hands to ``NoiseContext``: the draws of :mod:`hf_cim.rng`, on the fused stages.
SAMPLER: rng.Sampler = _KernelSampler()
