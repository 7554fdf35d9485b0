"""Counter-based Gaussian noise: the sampler behind every noise draw of the analog simulation.

Why not ``torch.Tensor.normal_``: on a CPU it runs on one thread (a Mersenne Twister is sequential), and a noisy training step draws one sample per output of every layer. Here a sample is a pure
function of ``(key, counter)``, so it can be computed anywhere inside a fused, multi-threaded kernel (the ADC
epilogue adds the output noise in the same loop that quantizes the outputs; no noise tensor is ever stored):

* ``counter``: the element's flat index in the tensor the noise is added to (32 bits: a draw of more than
  ``2**32`` values would repeat itself);
* ``key``: two int32 words drawn from the layer's ``torch.Generator`` at every draw (:func:`new_key`), so the
  layer's seeded generator still decides everything: same seed, same noise; the generator state still checkpoints
  and resumes the stream.

The integer hash is Chris Wellons' ``lowbias32`` (an invertible 32-bit mixer: xorshift-multiply, bias 0.17),
applied three times with the key injected twice: ``a = h(c ^ k0)``, ``b = h(a + k1)``, ``d = h(b ^ k0)``. Both
key words enter non-linearly, so two draws with different keys are not shifted copies of each other. The top
24 bits of ``b`` and ``d`` give two uniforms and the Box-Muller transform one standard normal,
``z = sqrt(-2 ln u1) · cos(2π u2)``, with ``u1 ∈ (0, 1)`` on a ``2**-24`` grid (so ``|z| <= 5.77``, as for
torch's float32 ``normal_``). ``ln`` and ``cos`` are polynomial approximations (max abs. error ``1e-6``) that
vectorise well; the tests check them against ``torch.log``/``torch.cos`` and the samples' moments, tails and
independence.

The functions here are written with torch integer and float operations only, so that the eager path and
``torch.compile`` (``hf_cim.kernels``) compute the same numbers on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gaussian", "new_key"]

_LN2 = math.log(2.0)
_TWO_PI = 2.0 * math.pi
_U24 = 1.0 / (1 << 24)


def _i32(c: int) -> int:
    """A 32-bit constant as the int32 value with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


_M1 = _i32(0x7FEB352D)
_M2 = _i32(0x846CA68B)
# cos(x) = Σ (-1)^k x^(2k) / (2k)!, truncated after x^16: error < 2e-7 on [-π, π].
_COS_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(9))
# ln(m) = 2·atanh(t) = 2·Σ t^(2k+1)/(2k+1) with t = (m-1)/(m+1) ∈ [0, 1/3): error < 4e-7 after t^11.
_ATANH_COEFFS = tuple(2.0 / (2 * k + 1) for k in range(6))


def new_key(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Two fresh int32 key words from ``generator`` (on its device: no host sync on CUDA), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    key = torch.randint(-(1 << 31), (1 << 31) - 1, (2,), generator=generator, dtype=torch.int32, device=gen_device)
    return key.to(device, non_blocking=True)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # Logical right shifts on int32: arithmetic shift, then mask off the copied sign bits.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def _unit24(h: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of ``h`` as a float in [0, 1)."""
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * _U24


def _log(u: torch.Tensor) -> torch.Tensor:
    """``ln u`` for positive normal float32 ``u``: exponent from the bits, mantissa by the atanh series."""
    bits = u.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # mantissa in [1, 2)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    p = _ATANH_COEFFS[-1]
    for c in reversed(_ATANH_COEFFS[:-1]):
        p = p * t2 + c
    return exponent.to(torch.float32) * _LN2 + t * p


def _cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """``cos(2π u)`` for ``u`` in [0, 1), as ``-cos(x)`` with ``x = 2π(u - 1/2)`` in [-π, π)."""
    x = (u - 0.5) * _TWO_PI
    x2 = x * x
    p = _COS_COEFFS[-1]
    for c in reversed(_COS_COEFFS[:-1]):
        p = p * x2 + c
    return -p


def gaussian(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 samples, one per element of the int32 ``counter``, for the int32 ``key`` ``(2,)``."""
    k0, k1 = key[0], key[1]
    a = _lowbias32(counter ^ k0)
    b = _lowbias32(a + k1)
    d = _lowbias32(b ^ k0)
    u1 = _unit24(b) + 0.5 * _U24  # (0, 1): ln is finite
    radius = torch.sqrt(-2.0 * _log(u1))
    return radius * _cos_2pi(_unit24(d))


def counters_like(t: torch.Tensor) -> torch.Tensor:
    """The int32 flat-index counter of every element of ``t`` (its row-major position), shaped like ``t``."""
    return torch.arange(t.numel(), device=t.device, dtype=torch.int64).to(torch.int32).view(t.shape)
