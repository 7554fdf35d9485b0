"""A damaged kernel-library cache: one warning, a rebuild, correct outputs, a clean exit.

Each run is a subprocess with ``HF_CIM_CACHE`` in ``tmp_path``: a crash (SIGBUS in ``dlopen`` of a truncated file)
cannot take pytest down, and the user's cache is never touched.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from hf_cim import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the native kernels cannot be built")

_SCRIPT = r"""
import sys, types

# Import hf_cim.native and hf_cim.kernels without the package's __init__ (transformers and the rest take seconds).
package = types.ModuleType("hf_cim")
package.__path__ = [sys.argv[1]]
sys.modules["hf_cim"] = package

import torch
from hf_cim import kernels, native

native._FLAGS[0] = "-O0"  # a quicker build; the kernels give the same floats (no contraction, no fast-math)

gen = torch.Generator().manual_seed(0)
x = torch.randn(9, 40, generator=gen)
w = torch.randn(16, 40, generator=gen)
res = []
for impl in (False, True):
    kernels.set_native(impl)
    kernels.set_compile(False)
    with torch.no_grad():
        res.append((*kernels.dac(x, 127.0, False, True), *kernels.weight_program(w, 127.0)))
assert all(torch.equal(a, b) for a, b in zip(*res)), "native and eager outputs differ"
assert native.available(), "the native kernels did not load"
native._state.update(lib=None, tried=False)  # as the next process would: the cache entry is intact again
assert native.library() is not None
print("ok")
"""


def _run(cache):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_CIM_NATIVE", "HF_CIM_COMPILE")}
    env.update(HF_CIM_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    package = os.path.dirname(native.__file__)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, package], env=env, capture_output=True, text=True, timeout=300
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("hf_cim:")]
    return proc, warnings


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A cache holding one freshly built library and its manifest."""
    cache = tmp_path_factory.mktemp("pristine")
    proc, warnings = _run(cache)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert warnings == []
    return cache


def _entry(cache):
    (manifest,) = (cache / "native").glob("hf_cim_native_*.json")
    return manifest, manifest.with_name(json.loads(manifest.read_text())["library"])


def _stub_library(path):
    """A valid shared library without any of the kernels."""
    src = path.with_suffix(".c")
    src.write_text("int hfc_unrelated(void) { return 1; }\n")
    subprocess.run([*shlex.split(native._compiler()), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    return path.read_bytes()


def _record(manifest, library, data):
    import hashlib

    record = json.loads(manifest.read_text())
    record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.write_text(json.dumps(record))
    library.write_bytes(data)


_DAMAGE = {
    # A crash or a full disk while writing: the file ends early (dlopen of it used to die with SIGBUS).
    "truncated": lambda m, lib, tmp: lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3]),
    "empty": lambda m, lib, tmp: lib.write_bytes(b""),
    "garbage of the same size": lambda m, lib, tmp: lib.write_bytes(bytes(i % 251 for i in range(lib.stat().st_size))),
    "missing": lambda m, lib, tmp: lib.unlink(),
    "another library": lambda m, lib, tmp: lib.write_bytes(_stub_library(tmp / "stub.so")),
    # Recorded as if it were the right one: it loads, but has none of the kernels (an AttributeError, uncaught before).
    "another library, recorded": lambda m, lib, tmp: _record(m, lib, _stub_library(tmp / "stub.so")),
    "garbage, recorded": lambda m, lib, tmp: _record(m, lib, b"\x7fELF" + bytes(5000)),
    "garbage manifest": lambda m, lib, tmp: m.write_bytes(b"\xff{not json"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_a_damaged_cache_is_rebuilt_with_one_warning(pristine, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    manifest, library = _entry(cache)
    _DAMAGE[damage](manifest, library, tmp_path)
    proc, warnings = _run(cache)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert len(warnings) == 1 and "rebuilt it" in warnings[0], proc.stderr
    # The cache is whole again: the manifest names an intact library, and nothing else is left behind.
    manifest, library = _entry(cache)
    assert native._cached(manifest) == (library, None)
    assert sorted(p.name for p in (cache / "native").iterdir()) == sorted([manifest.name, library.name])
