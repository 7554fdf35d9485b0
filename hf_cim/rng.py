"""Counter-based Gaussian noise: the sampler behind every noise draw of the analog simulation.

Why not ``torch.Tensor.normal_``: on a CPU it runs on one thread (a Mersenne Twister is sequential), and a noisy
training step draws one sample per output of every layer. Here a sample is a pure function of ``(key, counter)``, so
it can be computed anywhere inside a fused, multi-threaded kernel (on the CPU, the C kernels of
:mod:`hf_cim.native` add the output noise in the same loop that quantizes the outputs, with no noise tensor):

* ``counter``: the element's flat index in the tensor the noise is added to (32 bits: a draw of more than
  ``2**32`` values would repeat itself);
* ``key``: two int32 words drawn from the layer's ``torch.Generator`` at every draw (:func:`new_key`), so the
  layer's seeded generator still decides everything: same seed, same noise; the generator state still checkpoints
  and resumes the stream.

The integer hash is Chris Wellons' ``lowbias32`` (an invertible 32-bit mixer: xorshift-multiply, bias 0.17). The
counter is hashed once with the first key word, ``a = h(c ^ k0)``; the two uniforms come from two hashes of
``x = a + k1``: ``b = h(x)`` and ``d = h(x + φ)`` with the constant ``φ = 0x9E3779B9`` (so ``b != d`` for every
key). Both key words enter non-linearly, so two draws with different keys are not shifted copies of each other,
and ``b`` and ``d`` are computed side by side (two hashes deep, not three: on a CPU the sampler is bound by the
latency of its longest chain of dependent operations, not by their number). The top 24 bits of ``b`` and ``d``
give two uniforms and the Box-Muller transform one standard normal, ``z = sqrt(-2 ln u1) · cos(2π u2)``, with
``u1 ∈ (0, 1)`` on a ``2**-24`` grid (so ``|z| <= 5.77``, as for torch's float32 ``normal_``). ``ln`` and ``cos``
are polynomials (max abs. error ``2e-6``) evaluated by Estrin's scheme (short dependency chains); the tests check
them against ``torch.log``/``torch.cos`` and the samples' moments, tails and independence.

The functions here are written with torch integer and float operations only: they are the eager reference, and
``torch.compile`` turns them into the CUDA kernels of :mod:`hf_cim.kernels`. ``hf_cim/native.c`` transcribes them
operation by operation in float32; it agrees to one ulp (torch's vectorized CPU ``sqrt`` is not correctly rounded).

:class:`Sampler` is the interface a noise model draws through (``NoiseContext.sampler``): this module's is the
torch reference; :mod:`hf_cim.kernels` hands the tile simulation's contexts a subclass that computes the same
numbers in fused kernels. Noise models never import the kernels.

Seeds are derived here and nowhere else (:func:`derive_seed`, :func:`process_rank`, :func:`seeded_generator`). The
streams of the library, each a ``torch.Generator`` (or a ``random.Random``) seeded from a hash of its labels:

* a layer's training noise: ``(config seed, layer name, process rank)`` (:func:`layer_generator`): every rank draws
  its own noise, every run with the same seed the same;
* a programmed chip: ``(chip seed, layer name, "chip")`` (:func:`chip_generator`): the same devices on every rank;
* the gradient-alignment probe: ``(seed, layer name, rank, "probe")`` (:mod:`hf_cim.alignment`);
* the sampled noise level of a step: ``(seed, "noise_level", step)`` (:class:`hf_cim.callbacks.NoiseLevelCallback`).
"""

from __future__ import annotations

import hashlib
import os

import torch

__all__ = [
    "REFERENCE",
    "Sampler",
    "add_randn_",
    "add_scaled_randn_",
    "chip_generator",
    "counters_like",
    "derive_seed",
    "gaussian",
    "layer_generator",
    "new_key",
    "process_rank",
    "randn",
    "seeded_generator",
]

# Float constants are written as literals inside the functions below, not as module globals: torch.compile turns a
# global float into a graph input (a scalar tensor built at every call), a literal into a constant of the kernel.


def _i32(c: int) -> int:
    """A 32-bit constant as the int32 value with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


_M1 = _i32(0x7FEB352D)
_M2 = _i32(0x846CA68B)
_PHI = _i32(0x9E3779B9)


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
    """The top 24 bits of ``h`` as a float in [0, 1) (multiples of ``2**-24``)."""
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 5.960464477539063e-08


def _log(u: torch.Tensor) -> torch.Tensor:
    """``ln u`` for positive normal float32 ``u``: exponent from the bits, mantissa ``m`` by the atanh series.

    ``ln m = 2·atanh(t) = 2·Σ t^(2k+1)/(2k+1)`` with ``t = (m-1)/(m+1) ∈ [0, 1/3)``, truncated after ``t^11``
    (error < 1e-7 plus float rounding; every dropped term is positive, so ``ln u`` never rises above the truth and
    ``-2 ln u1`` stays >= 0).
    """
    bits = u.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # mantissa in [1, 2)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    t4 = t2 * t2
    t8 = t4 * t4
    # Estrin: (c0 + c1 t²) + t⁴ (c2 + c3 t²) + t⁸ (c4 + c5 t²), c_k = 2/(2k+1).
    p = (
        (2.0 + 0.6666666666666666 * t2)
        + t4 * (0.4 + 0.2857142857142857 * t2)
        + t8 * (0.2222222222222222 + 0.18181818181818182 * t2)
    )
    return exponent.to(torch.float32) * 0.6931471805599453 + t * p


def _cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """``cos(2π u)`` for ``u`` in [0, 1), as ``sin(x)`` with ``x = 2π(|u - 1/2| - 1/4)`` in [-π/2, π/2].

    ``sin`` by its Taylor series to ``x^11`` (error < 6e-8 on [-π/2, π/2]) in Estrin's form.
    """
    x = (torch.abs(u - 0.5) - 0.25) * 6.283185307179586
    x2 = x * x
    x4 = x2 * x2
    x8 = x4 * x4
    p = (
        (1.0 - 0.16666666666666666 * x2)
        + x4 * (0.008333333333333333 - 0.0001984126984126984 * x2)
        + x8 * (2.7557319223985893e-06 - 2.505210838544172e-08 * x2)
    )
    return x * p


def gaussian(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 samples, one per element of the int32 ``counter``, for the int32 ``key`` ``(2,)``."""
    x = _lowbias32(counter ^ key[0]) + key[1]
    u1 = _unit24(_lowbias32(x)) + 2.9802322387695312e-08  # (0, 1): ln is finite
    u2 = _unit24(_lowbias32(x + _PHI))
    return torch.sqrt(-2.0 * _log(u1)) * _cos_2pi(u2)


def counters_like(t: torch.Tensor) -> torch.Tensor:
    """The int32 flat-index counter of every element of ``t`` (its row-major position), shaped like ``t``.

    Built as a broadcast sum of per-dimension ``arange``s times the row-major strides rather than as a reshaped
    ``arange(numel)``: inside a compiled kernel it is then an index expression of the consumer's own loop (fused,
    no counter or noise buffer), where a reshaped flat ``arange`` makes inductor materialise the noise first.
    Positions past ``2**31`` wrap around in 32 bits (as ``int64 → int32`` does).
    """
    counter = torch.zeros((), dtype=torch.int64, device=t.device)
    stride = 1
    for dim in range(t.dim() - 1, -1, -1):
        size = t.shape[dim]
        index = torch.arange(size, dtype=torch.int64, device=t.device)
        counter = counter + (index * stride).view((size,) + (1,) * (t.dim() - 1 - dim))
        stride = stride * size
    return counter.to(torch.int32)


def randn(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 samples shaped like ``like``: :func:`gaussian` of ``key`` at its flat indices."""
    return gaussian(counters_like(like), key)


def add_randn_(t: torch.Tensor, std: float, key: torch.Tensor) -> torch.Tensor:
    """``t += std·ξ`` in place, ``ξ = randn(t, key)``."""
    return t.add_(std * gaussian(counters_like(t), key))


def add_scaled_randn_(
    t: torch.Tensor, scale: torch.Tensor, std: float, key: torch.Tensor, sqrt_scale: bool = False, sample=randn
) -> torch.Tensor:
    """``t += std·(ξ·s)`` in place with a per-element spread ``s = scale`` or ``sqrt(max(scale, 1e-12))``
    (``sqrt_scale``; ``scale`` shaped like ``t``), ``ξ = sample(t, key)``."""
    scale = scale.to(t.dtype)  # a bfloat16 spread (``spread_bmm``) is read exactly in float32
    spread = scale.clamp(min=1e-12).sqrt() if sqrt_scale else scale
    return t.add_(sample(t, key).to(t.dtype).mul_(spread), alpha=std)


class Sampler:
    """The draws (and fused element-wise updates) a noise model may ask of its backend, as torch reference code.

    Every method computes the numbers of :func:`randn` for the key it is given; a backend's subclass (the one
    :mod:`hf_cim.kernels` hands in) may compute them in fused kernels, to within one ulp.
    """

    def randn(self, like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Standard normal float32 samples shaped like ``like``."""
        return randn(like, key)

    def add_randn_(self, t: torch.Tensor, std: float, key: torch.Tensor) -> torch.Tensor:
        """``t += std·ξ`` in place (contiguous float32 ``t`` that autograd does not record)."""
        return add_randn_(t, std, key)

    def add_scaled_randn_(
        self, t: torch.Tensor, scale: torch.Tensor, std: float, key: torch.Tensor, sqrt_scale: bool = False
    ) -> torch.Tensor:
        """``t += std·(ξ·s)`` in place, see :func:`add_scaled_randn_`."""
        return add_scaled_randn_(t, scale, std, key, sqrt_scale, sample=self.randn)

    def run(self, stage: str, reference, *args):
        """``reference(*args)``: an element-wise, in-place update a noise model defines (e.g. IR-drop's correction).
        A backend may run its own implementation of the stage named ``stage`` instead (same formula)."""
        return reference(*args)


#: The torch reference sampler: what a :class:`hf_cim.noise.NoiseContext` without a backend's sampler uses.
REFERENCE = Sampler()


# -- seeds ----------------------------------------------------------------------------------------------------------
def process_rank() -> int:
    """This process's rank in a distributed run: the process group's, else ``$RANK`` (set by torchrun before the
    group exists), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and any labels (layer name, rank, chip...), stable across runs and platforms."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def seeded_generator(device: torch.device | str, seed: int, *parts: object) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` ``(seed, *parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def layer_generator(device: torch.device | str, seed: int, name: str) -> torch.Generator:
    """The training noise stream of layer ``name``: from the config seed, the name and this process's rank."""
    return seeded_generator(device, seed, name, process_rank())


def chip_generator(device: torch.device | str, seed: int, name: str) -> torch.Generator:
    """The draws that program layer ``name`` of chip ``seed``: the same on every rank and whatever ran before."""
    return seeded_generator(device, seed, name, "chip")
