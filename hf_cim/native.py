"""Native CPU kernels: ``hf_cim/native.c`` compiled on first use with the system C compiler, called with ctypes.

Why not ``torch.compile`` on the CPU: each compiled call costs ~0.1 ms of Python guard and dispatch overhead (three
per layer and forward), importing and running inductor adds ~100 MB of resident memory to the process, a cold
compile takes minutes on a small machine, and inductor stores the Gaussian noise to a temporary before using it
(its CPU backend materialises any pointwise expression of more than ~50 operations). The C file is ~200 lines of
loops that compute, element by element, the float32 formulas of :mod:`hf_cim.converters` and :mod:`hf_cim.rng`
(tests check they agree with the eager versions); it compiles in about a second with no torch headers, and runs
the noise inside the loop that consumes it, over OpenMP threads of torch's own runtime.

The library is built once per source, compiler and CPU into ``$HF_CIM_CACHE`` (default
``~/.cache/hf_cim/native``), with ``-march=native`` (the cache key includes the CPU's flags) and
``-ffp-contract=off`` (no fused multiply-add: the same roundings as torch's eager ops). ``HF_CIM_NATIVE=0``
disables it; without a working compiler :func:`library` returns None after one warning and the caller falls back.
``$CC`` (split like shell words) is used when set; one that cannot run is reported, not replaced by another. Each
compiler call is killed after a timeout.

The cache entry is a small JSON manifest that names the library file (named by its SHA-256) with its size and
SHA-256; both files are written to a temporary, fsynced and renamed into place. A library is loaded only after its
bytes match the manifest: a truncated file (a crash or a full disk while writing), garbage, or a library that lacks
the kernels' symbols is rebuilt with one warning instead of crashing the process (``dlopen`` of a truncated file
dies with SIGBUS).

Every kernel is called through a checked wrapper (:func:`dac`, :func:`epilogue`...): the C code indexes raw
pointers with the lengths it is given, so each wrapper checks every buffer's shape, contiguity, dtype and device
once per call and raises ValueError for anything else.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["accepts", "available", "library"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
# Seconds a compiler call may take before it is killed (and the kernels fall back to torch code with a warning).
_VERSION_TIMEOUT_S = 30.0
_COMPILE_TIMEOUT_S = 300.0
_state: dict[str, object] = {"lib": None, "tried": False}

_i64, _f32, _i32, _u32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint32
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "hfc_randn": [_ptr, _i64, _f32, _i32, _u32, _u32, _i32],
    "hfc_weight_program": [_ptr, _ptr, _ptr, _i64, _i64, _f32, _f32, _i32, _u32, _u32, _i32],
    "hfc_dac": [_ptr, _ptr, _ptr, _i64, _i64, _f32, _i32, _i32, _i32],
    "hfc_epilogue": [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64]
    + [_f32, _f32, _f32, _f32, _i32, _u32, _u32, _i32, _i32],
    "hfc_add_scaled_randn": [_ptr, _ptr, _i64, _f32, _i32, _u32, _u32, _i32, _i32],
    "hfc_ir_drop": [_ptr, _ptr, _ptr, _i64, _i32, _i32, _i32],
    "hfc_lognormal_program": [_ptr, _ptr, _ptr, _i64, _f32, _f32, _f32, _u32, _u32, _i32],
    "hfc_pair_program": [_ptr, _ptr, _ptr, _i64, _ptr, _i32, _f32, _f32, _i32, _i32, _f32, _u32, _u32, _i32],
    "hfc_pcm_read": [_ptr, _ptr, _i64, _f32, _f32, _f32, _u32, _u32, _i32],
    "hfc_within": [_ptr, _ptr, _i64, _f32, _i32],
    "hfc_stuck_at": [_ptr, _ptr, _ptr, _ptr, _i64, _f32, _f32, _i32],
}


def enabled() -> bool:
    return os.environ.get("HF_CIM_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    """The compiler command: ``$CC`` when set (used as given, and reported if unusable), else cc, gcc or clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _argv(cc: str) -> list[str]:
    """``cc`` split like a shell word list (``CC="ccache gcc"``); an error naming it if it is not a program."""
    try:
        argv = shlex.split(cc)
    except ValueError as err:
        raise RuntimeError(f"CC={cc!r} cannot be parsed ({err})") from None
    if not argv or shutil.which(argv[0]) is None:
        raise RuntimeError(f"the C compiler CC={cc!r} is not an executable program (unset CC to use cc, gcc or clang)")
    return argv


def _run(argv: list[str], timeout: float) -> str:
    """Run a compiler command; its stdout, or an error with its stderr. Killed, with its children, after ``timeout``
    seconds (a compiler driver's children, e.g. cc1, would otherwise keep the output pipes open)."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"`{' '.join(argv[:2])} ...` did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:2])} ...` failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    return out


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("HF_CIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_cim")
    return Path(root) / "native"


def _manifest(argv: list[str]) -> Path:
    """The cache entry of this source, flags, compiler and CPU: a JSON record naming the library file and its size
    and SHA-256 (the library itself is named by its content hash, so no two contents ever share a path)."""
    version = _run([*argv, "--version"], _VERSION_TIMEOUT_S)
    parts = [_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    return _cache_dir() / f"hf_cim_native_{key}.json"


def _library_name(manifest: Path, digest: str) -> str:
    return f"{manifest.stem}_{digest[:16]}.so"


def _cached(manifest: Path) -> tuple[Path | None, str | None]:
    """``(library, problem)``: the library ``manifest`` names and, when it cannot be trusted, why; problem is None
    for an intact library (same size and SHA-256 as recorded) and ``(None, None)`` means no cache entry at all."""
    try:
        record = json.loads(manifest.read_text())
        name, size, digest = record["library"], record["size"], record["sha256"]
        if not (isinstance(name, str) and isinstance(size, int) and isinstance(digest, str)):
            raise ValueError("malformed record")
        if name != _library_name(manifest, digest):
            # Content-addressed: a rebuilt library (other bytes) never reuses the path of one loaded before, which
            # dlopen would hand back from its cache of loaded objects instead of loading the new file.
            raise ValueError(f"the library {name!r} is not named by its checksum")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError: ValueError
        return None, f"{manifest.name} is unreadable ({err})"
    path = manifest.parent / name
    try:
        data = path.read_bytes()
    except OSError as err:
        return path, f"{name}: {err.strerror or err}"
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        return path, f"{name} does not match its recorded size and checksum ({len(data)} bytes, {size} recorded)"
    return path, None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(argv: list[str], manifest: Path) -> Path:
    """Compile the library beside the cache entry, fsync it, rename it into place, then record it in ``manifest``
    (also written atomically): a crash or a concurrent process (ranks of one job) never sees a half-written file
    that the manifest vouches for."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=manifest.parent)
    os.close(fd)
    try:
        _run([*argv, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], _COMPILE_TIMEOUT_S)
        with open(tmp, "rb") as f:
            data = f.read()
            os.fsync(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        target = manifest.with_name(_library_name(manifest, digest))
        os.replace(tmp, target)
        _write_atomic(manifest, json.dumps({"library": target.name, "size": len(data), "sha256": digest}).encode())
        _fsync_dir(manifest.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(path: Path) -> ctypes.CDLL:
    """Load the library and declare its functions; OSError or AttributeError if it is not a library of native.c."""
    # The library needs libgomp.so.1; torch's copy, already loaded under that name, satisfies it, so the kernels
    # share torch's OpenMP runtime and thread pool instead of starting a second one that competes for the cores.
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


def _load(cc: str) -> tuple[ctypes.CDLL, str | None]:
    """The library, from the cache when its entry is intact, else freshly built; and what was wrong with the cache
    entry, if anything (a truncated, corrupted or foreign file is never loaded, or is rebuilt when loading fails)."""
    argv = _argv(cc)
    manifest = _manifest(argv)
    path, problem = _cached(manifest)
    if path is not None and problem is None:
        try:
            return _open(path), None
        except (OSError, AttributeError) as err:
            problem = f"{path.name} is not a library of this source ({err})"
    try:
        fresh = _build(argv, manifest)
        lib = _open(fresh)
    except Exception as err:
        raise RuntimeError(f"{problem}; rebuilding failed: {err}" if problem else str(err)) from err
    if path is not None and path != fresh:
        try:
            path.unlink()  # the bad file; a process that has it mapped keeps its own copy
        except OSError:
            pass
    return lib, problem


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None if disabled or if it cannot be built (warned once)."""
    if _state["lib"] is not None or _state["tried"]:
        return _state["lib"]  # type: ignore[return-value]
    _state["tried"] = True
    if not enabled():
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("hf_cim: no C compiler found (set CC); the CPU kernels fall back to slower torch code")
        return None
    try:
        lib, problem = _load(cc)
    except Exception as err:  # noqa: BLE001 - any failure means: use the torch kernels
        logger.warning("hf_cim: building the native CPU kernels failed (%s); falling back to torch code", err)
        return None
    if problem is not None:
        logger.warning("hf_cim: the cached native CPU kernel library was unusable (%s); rebuilt it", problem)
    _state["lib"] = lib
    return lib


# -- checked entry points -----------------------------------------------------------------------------------------
#
# The C functions index raw pointers with lengths they are given: a buffer of the wrong shape, stride or dtype is
# an out-of-bounds read or write. Every call goes through one of these wrappers, which checks each buffer once per
# call (shape, contiguity, dtype and device: attribute reads, no data access, no host sync), derives the lengths
# from the shapes, and raises ValueError naming the buffer and what was expected.


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} on {t.device}, shape {tuple(t.shape)}, strides {t.stride()}"


def _takes(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def accepts_spread(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None skipped) is a float32 or bfloat16 CPU tensor: a second-order operand the C
    functions read (:func:`add_scaled_randn`'s ``scale``, :func:`ir_drop`'s ``a`` and ``y_pos``)."""
    return all(t is None or (t.dtype in (torch.float32, torch.bfloat16) and t.device.type == "cpu") for t in tensors)


def accepts(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None skipped) is float32 on the CPU: the buffers the C functions take (the callers
    of :mod:`hf_cim.kernels` route anything else to the torch reference instead)."""
    for t in tensors:
        if t is not None and not _takes(t):
            return False
    return True


def _check(fn: str, name: str, t: object, *shapes: tuple[int, ...]) -> None:
    """``t`` must be a contiguous float32 CPU tensor of one of ``shapes``."""
    if isinstance(t, torch.Tensor) and _takes(t) and t.shape in shapes and t.is_contiguous():
        return
    expected = " or ".join(str(tuple(s)) for s in shapes)
    raise ValueError(
        f"hf_cim.native.{fn}: `{name}` must be a contiguous float32 CPU tensor of shape {expected}; got {_describe(t)}"
    )


def _check_2d(fn: str, name: str, t: object) -> tuple[int, int]:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"hf_cim.native.{fn}: `{name}` must be a 2-D tensor; got {_describe(t)}")
    _check(fn, name, t, tuple(t.shape))
    return t.shape[0], t.shape[1]


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("hf_cim.native: the native CPU kernels are not available (see the earlier warning)")
    return lib


def randn(out: torch.Tensor, std: float, add: bool, k0: int, k1: int) -> None:
    """``out = ξ`` (``add`` False) or ``out += std·ξ``, ``ξ`` the standard normals of key ``(k0, k1)``."""
    _check("randn", "out", out, tuple(out.shape) if isinstance(out, torch.Tensor) else ())
    _lib().hfc_randn(out.data_ptr(), out.numel(), std, add, k0, k1, threads())


def weight_program(
    w: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, qmax: float, std: float, noise: bool, k0: int, k1: int
) -> None:
    """``w`` ``(rows, cols)`` → ``out`` ``(rows, cols)``, ``scale`` ``(rows, 1)``; ``qmax <= 0``: no quantization."""
    rows, cols = _check_2d("weight_program", "w", w)
    _check("weight_program", "out", out, (rows, cols))
    _check("weight_program", "scale", scale, (rows, 1))
    _lib().hfc_weight_program(
        w.data_ptr(), out.data_ptr(), scale.data_ptr(), rows, cols, qmax, std, noise, k0, k1, threads()
    )


def dac(
    x: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor, qmax: float, per_token: bool, quantize: bool
) -> None:
    """``x`` ``(T, K)`` → ``out`` ``(T, K)``; ``absmax`` ``(T, 1)`` per token, ``(1, 1)`` per tensor."""
    t, k = _check_2d("dac", "x", x)
    _check("dac", "out", out, (t, k))
    _check("dac", "absmax", absmax, (t, 1) if per_token else (1, 1))
    _lib().hfc_dac(x.data_ptr(), out.data_ptr(), absmax.data_ptr(), t, k, qmax, per_token, quantize, threads())


def epilogue(
    y: torch.Tensor,
    out: torch.Tensor,
    recombine: torch.Tensor,
    x_absmax: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    inv_step: float,
    levels: float,
    in_scale: float,
    std: float,
    noise: bool,
    k0: int,
    k1: int,
    adc: bool,
) -> None:
    """``y`` ``(tiles, T, O)`` → ``out`` ``(T, O)`` (may be ``y[0]``); ``recombine`` ``(tiles,)``; ``x_absmax``
    ``(T, 1)`` (per token) or ``(1, 1)`` (per tensor, one scale for every row); ``row_scale`` and ``bias``
    ``(1, O)`` or ``(O,)``, ``bias`` optional."""
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError(f"hf_cim.native.epilogue: `y` must be a 3-D tensor (tiles, T, O); got {_describe(y)}")
    tiles, t, o = y.shape
    _check("epilogue", "y", y, (tiles, t, o))
    _check("epilogue", "out", out, (t, o))
    _check("epilogue", "recombine", recombine, (tiles,))
    _check("epilogue", "x_absmax", x_absmax, (t, 1), (1, 1))
    _check("epilogue", "row_scale", row_scale, (1, o), (o,))
    if bias is not None:
        _check("epilogue", "bias", bias, (1, o), (o,))
    xa_stride = 1 if x_absmax.shape[0] == t else 0
    _lib().hfc_epilogue(
        y.data_ptr(), out.data_ptr(), recombine.data_ptr(), x_absmax.data_ptr(), xa_stride, row_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), tiles, t, o, inv_step, levels, in_scale, std, noise, k0, k1, adc,
        threads(),
    )  # fmt: skip


def _check_spread(fn: str, name: str, t: object, shape: tuple[int, ...]) -> bool:
    """A second-order operand: a contiguous float32 or bfloat16 CPU tensor of ``shape``; True for bfloat16."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu":
        if t.shape == shape and t.is_contiguous():
            return True
        raise ValueError(f"hf_cim.native.{fn}: `{name}` must be contiguous with shape {shape}; got {_describe(t)}")
    _check(fn, name, t, shape)
    return False


def add_scaled_randn(y: torch.Tensor, scale: torch.Tensor, std: float, sqrt_scale: bool, k0: int, k1: int) -> None:
    """``y += std·(ξ·s)`` in place, ``s = scale`` or ``sqrt(max(scale, 1e-12))``; ``scale`` has ``y``'s shape and is
    float32 or bfloat16 (read exactly in float32)."""
    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else ()
    _check("add_scaled_randn", "y", y, shape)
    bf16 = _check_spread("add_scaled_randn", "scale", scale, shape)
    _lib().hfc_add_scaled_randn(y.data_ptr(), scale.data_ptr(), y.numel(), std, sqrt_scale, k0, k1, bf16, threads())


def ir_drop(y: torch.Tensor, a: torch.Tensor, y_pos: torch.Tensor) -> None:
    """``y -= a·(0.05a² − 0.2a + 0.5)·y_pos`` in place; ``a`` and ``y_pos`` have ``y``'s shape, each float32 or
    bfloat16 (read exactly in float32)."""
    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else ()
    _check("ir_drop", "y", y, shape)
    a_bf16 = _check_spread("ir_drop", "a", a, shape)
    pos_bf16 = _check_spread("ir_drop", "y_pos", y_pos, shape)
    _lib().hfc_ir_drop(y.data_ptr(), a.data_ptr(), y_pos.data_ptr(), y.numel(), a_bf16, pos_bf16, threads())


def lognormal_program(
    w: torch.Tensor,
    out: torch.Tensor,
    factor: torch.Tensor | None,
    sigma: float,
    shift: float,
    max_log: float,
    k0: int,
    k1: int,
) -> None:
    """``out = w·f``, ``f = exp(clamp(sigma·ξ − shift, −max_log, max_log))`` (``LogNormalNoise.program``), and
    ``factor = f`` when a buffer is given (the derivative of ``out`` by ``w``); ``0 <= max_log <= 87``."""
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    _check("lognormal_program", "w", w, shape)
    _check("lognormal_program", "out", out, shape)
    if factor is not None:
        _check("lognormal_program", "factor", factor, shape)
    if not 0.0 <= max_log <= 87.0:  # exp's polynomial builds 2^k from the exponent bits: |k| < 127
        raise ValueError(f"hf_cim.native.lognormal_program: `max_log` must be in [0, 87], got {max_log}")
    for name, v in (("sigma", sigma), ("shift", shift)):
        if not math.isfinite(v):
            raise ValueError(f"hf_cim.native.lognormal_program: `{name}` must be finite, got {v}")
    if w.numel() > 2**32:  # the Gaussian's counter is 32 bits
        raise ValueError(f"hf_cim.native.lognormal_program: `w` has {w.numel()} elements; at most 2^32 are supported")
    _lib().hfc_lognormal_program(
        w.data_ptr(), out.data_ptr(), None if factor is None else factor.data_ptr(), w.numel(), sigma, shift, max_log,
        k0, k1, threads(),
    )  # fmt: skip


def pair_program(
    w: torch.Tensor,
    out: torch.Tensor,
    coeffs: torch.Tensor,
    divisor: float,
    s: float,
    clip_max: float | None,
    bounded: bool,
    k0: int,
    k1: int,
    derivative: torch.Tensor | None = None,
) -> None:
    """``out`` = ``w`` programmed on device pairs with polynomial programming noise: each device of the pair
    ``g± = max(±w, 0)`` moves by ``s·σ(g)·ξ`` and is clamped to ``[0, clip_max]``, ``σ(g) = max(poly(min(g, 1)) /
    divisor, 0)`` when ``bounded`` (``ReRAMNoise.program``) and ``poly(g) / divisor`` otherwise (``PCMNoise``'s
    programming step); and ``derivative`` = ``∂out/∂w`` as autograd takes it through that formula, when a buffer is
    given."""
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    _check("pair_program", "w", w, shape)
    _check("pair_program", "out", out, shape)
    if derivative is not None:
        _check("pair_program", "derivative", derivative, shape)
    n_coeffs = coeffs.numel() if isinstance(coeffs, torch.Tensor) else 0
    _check("pair_program", "coeffs", coeffs, (n_coeffs,))
    if n_coeffs < 1:
        raise ValueError("hf_cim.native.pair_program: `coeffs` must hold at least one coefficient")
    if 2 * w.numel() > 2**32:  # the Gaussian's counter is 32 bits over the pair tensor
        raise ValueError(f"hf_cim.native.pair_program: `w` has {w.numel()} elements; at most 2^31 are supported")
    has_clip = clip_max is not None
    _lib().hfc_pair_program(
        w.data_ptr(), out.data_ptr(), None if derivative is None else derivative.data_ptr(), w.numel(),
        coeffs.data_ptr(), n_coeffs, divisor, s, int(bool(bounded)), has_clip, clip_max if has_clip else 0.0, k0, k1,
        threads(),
    )  # fmt: skip


def stuck_at(
    w: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    p_off: float,
    p_on: float,
    derivative: torch.Tensor | None = None,
) -> None:
    """``out`` = ``w`` with stuck devices: each device of the pair ``g± = max(±w, 0)`` is 0 where its uniform
    ``u < p_off``, 1 where ``p_off <= u < p_off + p_on`` (``StuckAtFaults.program``); ``u`` has shape ``(2, *w.shape)``
    (``g⁺``'s then ``g⁻``'s). With a ``derivative`` buffer also ``∂out/∂w`` as autograd takes it through that
    formula."""
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    _check("stuck_at", "w", w, shape)
    _check("stuck_at", "u", u, (2, *shape))
    _check("stuck_at", "out", out, shape)
    if derivative is not None:
        _check("stuck_at", "derivative", derivative, shape)
    for name, p in (("p_off", p_off), ("p_on", p_on)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"hf_cim.native.stuck_at: `{name}` must be in [0, 1], got {p}")
    _lib().hfc_stuck_at(
        w.data_ptr(), u.data_ptr(), out.data_ptr(), None if derivative is None else derivative.data_ptr(), w.numel(),
        p_off, p_off + p_on, threads(),
    )  # fmt: skip


def pcm_read(
    w: torch.Tensor, out: torch.Tensor, g_min: float, sqrt_log: float, scale: float, k0: int, k1: int
) -> None:
    """``out = w·max(0, 1 + scale·σ_r(|w|)·ξ)``, ``σ_r(g) = min(0.0088 / max(max(g, g_min)^0.65, 1e-3), 0.2)·sqrt_log``
    (``PCMNoise.read``)."""
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    _check("pcm_read", "w", w, shape)
    _check("pcm_read", "out", out, shape)
    for name, v in (("g_min", g_min), ("sqrt_log", sqrt_log), ("scale", scale)):
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"hf_cim.native.pcm_read: `{name}` must be finite and >= 0, got {v}")
    if w.numel() > 2**32:  # the Gaussian's counter is 32 bits
        raise ValueError(f"hf_cim.native.pcm_read: `w` has {w.numel()} elements; at most 2^32 are supported")
    _lib().hfc_pcm_read(w.data_ptr(), out.data_ptr(), w.numel(), g_min, sqrt_log, scale, k0, k1, threads())


def within(y: torch.Tensor, out: torch.Tensor, bound: float) -> None:
    """``out = |y| <= bound`` (``out`` a bool tensor of ``y``'s shape), as torch compares float32 ``y`` with the
    Python number ``bound`` (rounded to float32)."""
    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else ()
    _check("within", "y", y, shape)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.device.type == "cpu"):
        raise ValueError(f"hf_cim.native.within: `out` must be a contiguous bool CPU tensor; got {_describe(out)}")
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"hf_cim.native.within: `out` must be contiguous of shape {shape}; got {_describe(out)}")
    if not bound == bound:  # NaN
        raise ValueError("hf_cim.native.within: `bound` must not be NaN")
    _lib().hfc_within(y.data_ptr(), out.data_ptr(), y.numel(), bound, threads())


def available() -> bool:
    return library() is not None


def threads() -> int:
    return torch.get_num_threads()
