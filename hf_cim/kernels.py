"""Fused kernels of the no-grad analog path (the ``ste`` and ``ste_detach`` forwards) and of every noise draw.

Eagerly, the DAC (abs-max, scale, round, clip), the weight quantization and the ADC epilogue (scale, round, clip,
tile sum, QuantBias, rescale) are a dozen passes over ``(tokens, features)`` tensors, and torch's ``normal_`` draws
the noise on one CPU thread. Here each step is one fused, multi-threaded loop, with the Gaussian noise computed
inside it by the counter-based sampler of :mod:`hf_cim.rng` (keys come from the layer's ``torch.Generator``, so
seeding and checkpointing are unchanged):

* :func:`weight_program`: per-channel weight quantization plus additive Gaussian programming noise;
* :func:`dac`: the input DAC;
* :func:`epilogue`: output noise, ADC per tile, recombination, QuantBias and rescale; a one-tile product is
  overwritten in place (no second ``tokens × out`` buffer: for an LM head that is the size of the logits);
* :func:`randn` and :func:`add_randn_`: the draws behind ``NoiseContext.randn_like``/``add_randn_``.

Three implementations compute the same float32 formulas (the test suite checks they agree):

* on the CPU, the C kernels of :mod:`hf_cim.native` (float32, no autograd recording): no per-call compile
  overhead, no inductor in the process, the noise computed in the loop that consumes it;
* elsewhere (CUDA), ``torch.compile`` of the eager functions below;
* the eager functions themselves (under autograd, or when the others are off or fail).

``HF_CIM_NATIVE=0`` turns the C kernels off, ``HF_CIM_COMPILE=0`` torch.compile (the test suite does, to avoid
compile time); :func:`set_native` and :func:`set_compile` do the same from Python. A kernel that cannot be built
(no C compiler, an unsupported backend) falls back to the next one with one warning: same numbers, only slower.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable

import torch

from . import native, rng

__all__ = [
    "add_randn_",
    "add_scaled_randn_",
    "compile_enabled",
    "dac",
    "epilogue",
    "ir_drop_",
    "native_enabled",
    "randn",
    "set_compile",
    "set_native",
    "weight_program",
]

logger = logging.getLogger(__name__)

_TINY = 1e-12
_state: dict[str, object] = {"enabled": None, "native": None, "compiled": {}, "failed": set()}


def set_compile(enabled: bool | None) -> None:
    """Force the fused (compiled) kernels on or off; ``None`` goes back to ``HF_CIM_COMPILE`` (default on)."""
    _state["enabled"] = enabled


def compile_enabled() -> bool:
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return os.environ.get("HF_CIM_COMPILE", "1").lower() not in ("0", "false", "no", "off")


def set_native(enabled: bool | None) -> None:
    """Force the C kernels on the CPU on or off; ``None`` goes back to ``HF_CIM_NATIVE`` (default on)."""
    _state["native"] = enabled


def native_enabled() -> bool:
    if _state["native"] is not None:
        return bool(_state["native"])
    return native.enabled()


def _native_lib(*tensors: torch.Tensor | None):
    """The C library when every tensor is a float32 CPU tensor, no autograd is recording and it is enabled."""
    if torch.is_grad_enabled() or not native_enabled():
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return None
    return native.library()


def _key_words(key: torch.Tensor | None) -> tuple[int, int, int]:
    """``(has_key, k0, k1)`` with the key words as unsigned 32-bit ints (the same bits as the int32 key)."""
    if key is None:
        return 0, 0, 0
    k0, k1 = key.tolist()
    return 1, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF


def dac_eager(x: torch.Tensor, qmax: float, *, per_token: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DAC: ``x_int = clip(round(x · qmax / absmax), ±qmax)``; returns ``(x_int, absmax)``, absmax ``(T, 1)``."""
    if per_token:
        absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    else:  # an empty batch has no abs-max (amax() raises): the tiny floor, as the C kernel gives
        absmax = (x.abs().amax() if x.numel() else x.new_zeros(())).clamp_min(_TINY).reshape(1, 1)
    x_int = x * (qmax / absmax)
    if quantize:
        x_int = torch.clamp(torch.round(x_int), -qmax, qmax)
    return x_int, absmax


def epilogue_eager(
    y: torch.Tensor,
    recombine: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias_row: torch.Tensor | None,
    inv_step: float,
    levels: float,
    in_scale: float,
    noise_std: float,
    key: torch.Tensor | None,
    *,
    adc: bool,
) -> torch.Tensor:
    """Output noise, ADC per tile, digital recombination, QuantBias and rescale of the analog partial sums.

    Args:
        y: analog partial sums ``(tiles, T, out)``; ``y·in_scale`` is in normalized units.
        recombine: ``(tiles,)`` digital weights of each tile's output (1, or the input slice's power of two).
        x_absmax: ``(T, 1)`` DAC full-scale per token, or ``(1, 1)`` for every token (a per-tensor DAC).
        row_scale: ``(1, out)`` weight scale, times the ADC step when ``adc``.
        bias_row: ``(1, out)`` bias or None.
        inv_step, levels: ``1/Δ_out`` and the largest ADC level (unused without ``adc``).
        in_scale: factor from ``y``'s units to normalized units (``1/qmax`` when ``y`` holds integer DAC levels).
        noise_std: output noise ``σ`` in normalized units (:class:`hf_cim.noise.OutputNoise`); its samples are
            :func:`hf_cim.rng.gaussian` of ``key`` at ``y``'s flat indices, the same numbers as
            ``NoiseContext.add_randn_(y·in_scale, σ)`` with that key.
        key: the noise key, or None for no output noise.
        adc: whether the ADC is on.

    Returns:
        ``(T, out)``. With the ADC:
        ``(Σ_t c_t·clip(round((y_t·s + σξ_t)/Δ), ±L) + round(b/(x_absmax·row_scale))) · x_absmax · row_scale``;
        without: ``Σ_t c_t·(y_t·s + σξ_t) · x_absmax · row_scale + b``.
    """
    y_sum = (_adc(y, in_scale, noise_std, key, inv_step, levels, adc) * recombine.reshape(-1, 1, 1)).sum(0)
    return _rescale(y_sum, x_absmax, row_scale, bias_row, adc)


def _adc(y, in_scale, noise_std, key, inv_step, levels, adc):
    """Normalize, add the output noise (counters = ``y``'s flat indices) and quantize to ADC levels."""
    out = y * in_scale
    if key is not None:
        out = out + noise_std * rng.gaussian(rng.counters_like(y), key)
    if adc:
        out = torch.clamp(torch.round(out * inv_step), -levels, levels)
    return out


def _rescale(y_sum, x_absmax, row_scale, bias_row, adc):
    """Back to the layer's units; the bias is added on the ADC's output grid when the ADC is on (QuantBias)."""
    unit = x_absmax * row_scale
    if bias_row is None:
        return y_sum * unit
    if not adc:
        return y_sum * unit + bias_row
    return (y_sum + torch.round(bias_row / unit)) * unit


def _epilogue_single_(
    y2d, recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std, key, *, adc
):
    """:func:`epilogue_eager` of a one-tile product ``y2d`` (``(T, out)``: the same flat indices as ``(1, T, out)``),
    written into ``y2d`` itself. Reading and writing one 2-D tensor with no reduction lets inductor update it in
    place: no second (tokens × out) buffer, which for an LM head is the size of the logits."""
    y_sum = _adc(y2d, in_scale, noise_std, key, inv_step, levels, adc) * recombine[0]
    return y2d.copy_(_rescale(y_sum, x_absmax, row_scale, bias_row, adc))


def weight_program_eager(
    w: torch.Tensor, qmax: float | None, noise_std: float, key: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel weight quantization plus additive Gaussian programming noise, in one pass.

    Returns ``(w_n + σξ, scale)`` with ``scale = max_j |w_ij|`` ``(out, 1)``, ``w_n = round(w/scale·q)/q`` (or
    ``w/scale`` when ``qmax`` is None) and ``ξ`` = :func:`hf_cim.rng.gaussian` of ``key`` at ``w``'s flat indices
    (the numbers ``NoiseContext.randn_like(w_n)`` draws with that key); no noise when ``key`` is None.
    """
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
    w_n = w / scale
    if qmax is not None:
        w_n = torch.round(w_n * qmax) / qmax
    if key is not None:
        w_n = w_n + noise_std * rng.gaussian(rng.counters_like(w_n), key)
    return w_n, scale


def randn_eager(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return rng.gaussian(rng.counters_like(like), key)


def add_randn_eager_(t: torch.Tensor, std: float, key: torch.Tensor) -> torch.Tensor:
    return t.add_(std * rng.gaussian(rng.counters_like(t), key))


def _variant_function(fn: Callable, static: dict) -> Callable:
    """A copy of ``fn`` with its own code object and ``static`` as its keyword defaults.

    Dynamo keeps compiled graphs, and its recompile limit, per code object: a copy per variant keeps each variant's
    graphs apart instead of letting them evict one another.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
    return copy


def _compiled(variant: tuple, fn: Callable, static: dict) -> Callable:
    cache: dict = _state["compiled"]  # type: ignore[assignment]
    if variant not in cache:
        cache[variant] = torch.compile(_variant_function(fn, static), dynamic=True)
    return cache[variant]


def _call(name: str, fn: Callable, args: tuple, static: dict | None = None):
    """``fn(*args, **static)``, compiled when enabled and no autograd is recording.

    One compiled variant per (kernel, static arguments, which arguments are None): the static arguments are flags
    that change the graph; tensors and floats are dynamic inputs (no recompilation per shape or value).
    """
    static = static or {}
    failed: set = _state["failed"]  # type: ignore[assignment]
    if compile_enabled() and name not in failed and not torch.is_grad_enabled():
        variant = (name, tuple(sorted(static.items())), tuple(a is None for a in args))
        try:
            return _compiled(variant, fn, static)(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
            failed.add(name)
            logger.warning("hf_cim: torch.compile of %s failed (%s); using the eager kernel", name, err)
    return fn(*args, **static)


def dac(x: torch.Tensor, qmax: float, per_token: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The DAC, fused when compilation is on and no autograd is recording."""
    lib = _native_lib(x)
    if lib is not None and x.dim() == 2:
        x = x.contiguous()
        out = torch.empty_like(x)
        absmax = torch.empty((x.shape[0] if per_token else 1, 1), dtype=torch.float32)
        native.dac(x, out, absmax, qmax, per_token, quantize)
        return out, absmax
    return _call("dac", dac_eager, (x, qmax), {"per_token": per_token, "quantize": quantize})


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
    """:func:`epilogue_eager`, fused. A one-tile ``y`` is overwritten by the result (a view of it is returned)."""
    lib = _native_lib(y, recombine, x_absmax, row_scale, bias_row)
    if lib is not None and y.is_contiguous():
        tiles, t, o = y.shape
        out = y[0] if tiles == 1 else torch.empty((t, o), dtype=torch.float32)
        x_absmax, row_scale = x_absmax.contiguous(), row_scale.contiguous()
        bias_row = None if bias_row is None else bias_row.contiguous()
        recombine = recombine.contiguous()
        native.epilogue(
            y, out, recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std, *_key_words(key),
            adc,
        )  # fmt: skip
        return out
    rest = (recombine, x_absmax, row_scale, bias_row, inv_step, levels, in_scale, noise_std, key)
    if y.shape[0] == 1 and y.is_contiguous():
        return _call("epilogue_single", _epilogue_single_, (y[0], *rest), {"adc": adc})
    return _call("epilogue", epilogue_eager, (y, *rest), {"adc": adc})


def weight_program(
    w: torch.Tensor, qmax: float | None, noise_std: float = 0.0, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weight_program_eager`, fused."""
    lib = _native_lib(w)
    if lib is not None and w.dim() == 2:
        w = w.detach().contiguous()
        out = torch.empty_like(w)
        scale = torch.empty((w.shape[0], 1), dtype=torch.float32)
        has_key, k0, k1 = _key_words(key)
        q = -1.0 if qmax is None else qmax
        native.weight_program(w, out, scale, q, noise_std, has_key, k0, k1)
        return out, scale
    # A Parameter would get static-shape guards (a recompilation per layer shape): pass a plain tensor.
    return _call("weight_program", weight_program_eager, (w.detach(), qmax, noise_std, key))


def randn(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 samples shaped like ``like`` (:func:`hf_cim.rng.gaussian` at its flat indices)."""
    with torch.no_grad():
        lib = _native_lib() if like.device.type == "cpu" else None
        if lib is not None:
            out = torch.empty(like.shape, dtype=torch.float32)
            native.randn(out, 0.0, False, *_key_words(key)[1:])
            return out
        return _call("randn", randn_eager, (like, key))


def add_randn_(t: torch.Tensor, std: float, key: torch.Tensor) -> torch.Tensor:
    """``t += std·ξ`` in place (contiguous float32 ``t``, no autograd), ``ξ`` = :func:`randn` ``(t, key)``."""
    lib = _native_lib(t)
    if lib is not None and t.is_contiguous():
        native.randn(t, std, True, *_key_words(key)[1:])
        return t
    return _call("add_randn", add_randn_eager_, (t, std, key))


def _native_inplace_ok(*tensors: torch.Tensor) -> bool:
    """Same-shape contiguous operands: what the element-wise C helpers index as flat arrays."""
    first = tensors[0]
    return all(t.is_contiguous() and t.shape == first.shape for t in tensors)


def add_scaled_randn_(
    t: torch.Tensor, scale: torch.Tensor, std: float, key: torch.Tensor, sqrt_scale: bool = False
) -> torch.Tensor:
    """``t += std·(ξ·s)`` in place, ``s = scale`` or ``sqrt(max(scale, 1e-12))`` (``sqrt_scale``), ``ξ`` = :func:`randn`
    ``(t, key)``; ``scale`` has ``t``'s shape. One pass on the CPU (no autograd) instead of five."""
    lib = _native_lib(t, scale)
    if lib is not None and _native_inplace_ok(t, scale):
        native.add_scaled_randn(t, scale, std, sqrt_scale, *_key_words(key)[1:])
        return t
    spread = scale.clamp(min=_TINY).sqrt() if sqrt_scale else scale
    return t.add_(randn(t, key).to(t.dtype).mul_(spread), alpha=std)


def ir_drop_(y: torch.Tensor, a: torch.Tensor, y_pos: torch.Tensor) -> torch.Tensor:
    """``y -= a·(0.05a² − 0.2a + 0.5)·y_pos`` in place (:class:`hf_cim.noise.IRDrop`), one pass on the CPU."""
    lib = _native_lib(y, a, y_pos)
    if lib is not None and _native_inplace_ok(y, a, y_pos):
        native.ir_drop(y, a, y_pos)
        return y
    c = torch.mul(a, 0.05).sub_(0.2).mul_(a).add_(0.5).mul_(a)
    return y.sub_(c.mul_(y_pos))
