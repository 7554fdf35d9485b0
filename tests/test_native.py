import logging

import pytest
import torch

from hf_cim import kernels, native


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that has not loaded its library yet, building into ``tmp_path``."""
    saved = dict(native._state)
    native._state.update(lib=None, tried=False)
    monkeypatch.setenv("HF_CIM_CACHE", str(tmp_path))
    yield tmp_path
    native._state.clear()
    native._state.update(saved)


needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@needs_cc
def test_builds_once_into_the_cache(fresh_native):
    lib = native.library()
    assert lib is not None
    built = list((fresh_native / "native").glob("hf_cim_native_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._state.update(lib=None, tried=False)  # a new process: the cached library is loaded, not rebuilt
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in (fresh_native / "native").iterdir()] == [built[0].name]  # no temporary left behind


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("HF_CIM_NATIVE", "0")
    assert native.library() is None
    assert not list(fresh_native.rglob("*.so"))


def test_no_compiler_falls_back_with_a_warning(fresh_native, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="hf_cim.native"):
        assert native.library() is None
    assert "no C compiler" in caplog.text
    # The kernels still work: the torch code computes the same formula.
    kernels.set_compile(False)
    try:
        with torch.no_grad():
            w_n, scale = kernels.weight_program(torch.tensor([[0.5, -1.0], [0.25, 0.125]]), 127.0)
    finally:
        kernels.set_compile(None)
    assert torch.equal(scale, torch.tensor([[1.0], [0.25]]))
    level = torch.tensor(64.0) / 127.0  # 0.5·127 = 63.5 rounds half to even
    assert torch.equal(
        w_n, torch.stack([torch.stack([level, torch.tensor(-1.0)]), torch.stack([torch.tensor(1.0), level])])
    )


def test_a_failing_compiler_falls_back_with_a_warning(fresh_native, monkeypatch, caplog, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\necho nope >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setattr(native, "_compiler", lambda: str(broken))
    with caplog.at_level(logging.WARNING, logger="hf_cim.native"):
        assert native.library() is None
    assert "building the native CPU kernels failed" in caplog.text and "nope" in caplog.text
    assert not list(fresh_native.rglob("*.so"))


@needs_cc
def test_cache_key_changes_with_the_compiler_flags(fresh_native, monkeypatch):
    assert native.library() is not None
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-DHF_CIM_TEST_FLAG"])
    native._state.update(lib=None, tried=False)
    assert native.library() is not None
    assert len(list((fresh_native / "native").glob("hf_cim_native_*.so"))) == 2
