"""Native CPU kernels: ``hf_cim/native.c`` compiled on first use with the system C compiler, called with ctypes.

Why not ``torch.compile`` on the CPU: each compiled call costs ~0.1 ms of Python guard and dispatch overhead (three
per layer and forward), importing and running inductor adds ~100 MB of resident memory to the process, a cold
compile takes minutes on a small machine, and inductor stores the Gaussian noise to a temporary before using it
(its CPU backend materialises any pointwise expression of more than ~50 operations). The C file is ~200 lines of
loops that compute, element by element, the float32 formulas of :mod:`hf_cim.kernels` and :mod:`hf_cim.rng`
(tests check they agree with the eager versions); it compiles in about a second with no torch headers, and runs
the noise inside the loop that consumes it, over OpenMP threads of torch's own runtime.

The library is built once per source, compiler and CPU into ``$HF_CIM_CACHE`` (default
``~/.cache/hf_cim/native``), with ``-march=native`` (the cache key includes the CPU's flags) and
``-ffp-contract=off`` (no fused multiply-add: the same roundings as torch's eager ops). ``HF_CIM_NATIVE=0``
disables it; without a working compiler :func:`library` returns None after one warning and the caller falls back.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "library"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_state: dict[str, object] = {"lib": None, "tried": False}

_i64, _f32, _i32, _u32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint32
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "hfc_randn": [_ptr, _i64, _f32, _i32, _u32, _u32, _i32],
    "hfc_weight_program": [_ptr, _ptr, _ptr, _i64, _i64, _f32, _f32, _i32, _u32, _u32, _i32],
    "hfc_dac": [_ptr, _ptr, _ptr, _i64, _i64, _f32, _i32, _i32, _i32],
    "hfc_epilogue": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]
    + [_f32, _f32, _f32, _f32, _i32, _u32, _u32, _i32, _i32],
    "hfc_add_scaled_randn": [_ptr, _ptr, _i64, _f32, _i32, _u32, _u32, _i32],
    "hfc_ir_drop": [_ptr, _ptr, _ptr, _i64, _i32],
}


def enabled() -> bool:
    return os.environ.get("HF_CIM_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


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


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(), _cpu_flags().encode()]))
    target = _cache_dir() / f"hf_cim_native_{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes (ranks of one job) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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
    # The library needs libgomp.so.1; torch's copy, already loaded under that name, satisfies it, so the kernels
    # share torch's OpenMP runtime and thread pool instead of starting a second one that competes for the cores.
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except Exception as err:  # noqa: BLE001 - any failure means: use the torch kernels
        logger.warning("hf_cim: building the native CPU kernels failed (%s); falling back to torch code", err)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    _state["lib"] = lib
    return lib


def available() -> bool:
    return library() is not None


def threads() -> int:
    return torch.get_num_threads()
