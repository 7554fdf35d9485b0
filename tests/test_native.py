import logging
import time

import pytest
import torch

from hf_cim import converters, kernels, native


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
def test_builds_once_into_the_cache(fresh_native, monkeypatch):
    synced = []
    real_fsync = native.os.fsync
    monkeypatch.setattr(native.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    lib = native.library()
    assert len(synced) >= 2  # the library and its manifest reach the disk before they are renamed into place
    assert lib is not None
    built = list((fresh_native / "native").glob("hf_cim_native_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._state.update(lib=None, tried=False)  # a new process: the cached library is loaded, not rebuilt
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp
    # The library and its manifest (size and checksum), no temporary left behind.
    manifests = list((fresh_native / "native").glob("hf_cim_native_*.json"))
    assert sorted(p.name for p in (fresh_native / "native").iterdir()) == sorted([built[0].name, manifests[0].name])


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


def test_an_unusable_cc_is_reported(fresh_native, monkeypatch, caplog):
    # CC names the compiler to use: one that does not exist is an error to report, not a reason to pick another.
    monkeypatch.setenv("CC", "/nonexistent/hf-cim-cc")
    with caplog.at_level(logging.WARNING, logger="hf_cim.native"):
        assert native.library() is None
    assert "CC='/nonexistent/hf-cim-cc' is not an executable program" in caplog.text
    assert len(caplog.records) == 1


@pytest.mark.parametrize("hang", ["--version", "compile"])
def test_a_hanging_compiler_is_killed_after_a_timeout(fresh_native, monkeypatch, caplog, tmp_path, hang):
    # The compiler hangs with a child holding its output pipes (as gcc's cc1 does): both are killed.
    stuck = tmp_path / "stuck-cc"
    version = 'if [ "$1" = --version ]; then echo stuck 1.0; exit 0; fi\n' if hang == "compile" else ""
    stuck.write_text(f"#!/bin/sh\n{version}sleep 60 &\nwait\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(native, "_compiler", lambda: str(stuck))
    monkeypatch.setattr(native, "_VERSION_TIMEOUT_S", 0.5)
    monkeypatch.setattr(native, "_COMPILE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hf_cim.native"):
        assert native.library() is None
    assert time.monotonic() - start < 10
    assert "did not finish within 0.5 s" in caplog.text and len(caplog.records) == 1
    assert not list(fresh_native.rglob("*.so*"))


@needs_cc
def test_cache_key_changes_with_the_compiler_flags(fresh_native, monkeypatch):
    assert native.library() is not None
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-DHF_CIM_TEST_FLAG"])
    native._state.update(lib=None, tried=False)
    assert native.library() is not None
    assert len(list((fresh_native / "native").glob("hf_cim_native_*.so"))) == 2


def _bad_buffers():
    """(entry point, arguments) pairs that each hand the C code one wrong buffer."""
    x, out, t_abs, one = torch.zeros(6, 5), torch.zeros(6, 5), torch.zeros(6, 1), torch.zeros(1, 1)
    y, y_out, rec, rs, b = torch.zeros(2, 6, 4), torch.zeros(6, 4), torch.ones(2), torch.ones(1, 4), torch.zeros(1, 4)
    ep = (1.0, 7.0, 1.0, 0.0, False, 0, 0, True)
    return [
        ("per-tensor DAC given a per-token scale buffer", native.dac, (x, out, t_abs, 127.0, False, True)),
        ("per-token DAC given one scale", native.dac, (x, out, one, 127.0, True, True)),
        ("DAC output too short", native.dac, (x, out[:5], t_abs, 127.0, True, True)),
        ("strided DAC input", native.dac, (torch.zeros(5, 6).t(), out, t_abs, 127.0, True, True)),
        ("float64 DAC input", native.dac, (x.double(), out, t_abs, 127.0, True, True)),
        ("1-D DAC input", native.dac, (x.flatten(), out, t_abs, 127.0, True, True)),
        ("not a tensor", native.dac, (x.tolist(), out, t_abs, 127.0, True, True)),
        ("epilogue: x_absmax of another length", native.epilogue, (y, y_out, rec, torch.ones(7, 1), rs, b, *ep)),
        ("epilogue: 1-D x_absmax", native.epilogue, (y, y_out, rec, torch.ones(6), rs, b, *ep)),
        ("epilogue: recombine too short", native.epilogue, (y, y_out, rec[:1], t_abs, rs, b, *ep)),
        ("epilogue: row_scale too short", native.epilogue, (y, y_out, rec, t_abs, rs[:, :3], b, *ep)),
        ("epilogue: bias too long", native.epilogue, (y, y_out, rec, t_abs, rs, torch.zeros(1, 5), *ep)),
        ("epilogue: output of another shape", native.epilogue, (y, torch.zeros(4, 6), rec, t_abs, rs, b, *ep)),
        ("epilogue: 2-D products", native.epilogue, (y[0], y_out, rec, t_abs, rs, b, *ep)),
        ("epilogue: strided products", native.epilogue, (y.transpose(1, 2), y_out, rec, t_abs, rs, b, *ep)),
        ("epilogue: int32 recombine", native.epilogue, (y, y_out, rec.int(), t_abs, rs, b, *ep)),
        ("weight_program: scale too short", native.weight_program, (x, out, t_abs[:5], 127.0, 0.0, False, 0, 0)),
        ("weight_program: 3-D weights", native.weight_program, (y, out, t_abs, 127.0, 0.0, False, 0, 0)),
        ("randn: strided output", native.randn, (x.t(), 1.0, True, 0, 0)),
        ("add_scaled_randn: scale of another shape", native.add_scaled_randn, (x, x[:, :4], 1.0, False, 0, 0)),
        ("ir_drop: y_pos of another shape", native.ir_drop, (x, x, x[:5])),
        ("ir_drop: float16 a", native.ir_drop, (x, x.half(), x)),
    ]


@needs_cc
@pytest.mark.parametrize("case", range(len(_bad_buffers())))
def test_every_entry_point_refuses_a_wrong_buffer(case):
    # The C code indexes raw pointers with the lengths it is given: each wrapper checks every buffer first and
    # raises a clear error instead of reading or writing past one.
    what, fn, args = _bad_buffers()[case]
    with pytest.raises(ValueError, match=r"hf_cim\.native\.\w+: `\w+` must be"):
        fn(*args)


@needs_cc
def test_the_checked_entry_points_accept_valid_buffers():
    x = torch.randn(6, 5)
    out, absmax = torch.empty(6, 5), torch.empty(1, 1)
    native.dac(x, out, absmax, 127.0, False, True)
    assert absmax.item() == x.abs().max().item()
    y = torch.randn(1, 6, 4)
    native.epilogue(y, y[0], torch.ones(1), absmax, torch.ones(4), None, 1.0, 7.0, 1.0, 0.0, False, 0, 0, True)
    assert torch.isfinite(y).all()


def test_accepts_is_the_c_boundary_rule():
    # float32 CPU buffers (None skipped): what every kernel of hf_cim.kernels routes to the C code; the checked
    # entry points above refuse anything else with a ValueError.
    assert native.accepts(torch.zeros(2, 3), None, torch.zeros(1))
    assert not native.accepts(torch.zeros(2, 3, dtype=torch.float64))
    assert not native.accepts(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16))
    assert not native.accepts(torch.zeros(2, device="meta"))


@needs_cc
@pytest.mark.parametrize("what", ["float64", "3-D"])
def test_buffers_the_c_code_does_not_take_go_to_the_reference(what):
    # The C kernels take what native.accepts and their layout rules allow; anything else runs the torch reference
    # (same formula), never a ValueError from the C boundary.
    assert native.available()
    x = torch.randn(6, 5) * 3
    x = x.double() if what == "float64" else x.reshape(2, 3, 5)
    with torch.no_grad():
        x_int, absmax = kernels.dac(x, 127.0, True, True)
        ref_int, ref_absmax = converters.dac(x, 127.0, per_token=True, quantize=True)
    assert torch.equal(x_int, ref_int) and torch.equal(absmax, ref_absmax)
    if what == "float64":
        with torch.no_grad():
            w_n, scale = kernels.weight_program(x, 127.0)
        assert torch.equal(w_n, converters.weight_program(x, 127.0)[0]) and w_n.dtype == x.dtype


def test_bfloat16_spread_operands_are_read_exactly_in_float32():
    # spread_bmm's bfloat16 results go to the C kernels as they are: the same numbers as their float32 copies.
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 64, 40, generator=gen)
    a = (torch.rand(3, 64, 40, generator=gen) * 3).to(torch.bfloat16)
    pos = torch.randn(3, 64, 40, generator=gen).to(torch.bfloat16)
    for a_in, pos_in in ((a, pos), (a.float(), pos), (a, pos.float())):
        got, ref = y.clone(), y.clone()
        native.ir_drop(got, a_in, pos_in)
        native.ir_drop(ref, a.float(), pos.float())
        assert torch.equal(got, ref)
    for sqrt_scale in (False, True):
        got, ref = y.clone(), y.clone()
        native.add_scaled_randn(got, a, 0.3, sqrt_scale, 7, 9)
        native.add_scaled_randn(ref, a.float(), 0.3, sqrt_scale, 7, 9)
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="`a` must be contiguous"):
        native.ir_drop(y, a.transpose(1, 2).contiguous().transpose(1, 2), pos)
    with pytest.raises(ValueError, match="`scale` must be a contiguous float32"):
        native.add_scaled_randn(y, a.half(), 0.3, True, 7, 9)


def test_pair_program_checks_its_buffers():
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    w = torch.zeros(4, 5)
    coeffs = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="`out` must be a contiguous float32 CPU tensor of shape \\(4, 5\\)"):
        native.pair_program(w, torch.zeros(5, 4), coeffs, 40.0, 1.0, None, True, 1, 2)
    with pytest.raises(ValueError, match="`coeffs` must hold at least one coefficient"):
        native.pair_program(w, torch.zeros(4, 5), torch.zeros(0), 40.0, 1.0, None, True, 1, 2)
    with pytest.raises(ValueError, match="`w` must be a contiguous float32"):
        native.pair_program(w.double(), torch.zeros(4, 5), coeffs, 40.0, 1.0, None, True, 1, 2)
    with pytest.raises(ValueError, match="`derivative` must be a contiguous float32 CPU tensor of shape \\(4, 5\\)"):
        native.pair_program(w, torch.zeros(4, 5), coeffs, 40.0, 1.0, None, True, 1, 2, torch.zeros(4, 5).t())


@pytest.mark.parametrize(
    "bounded, coeffs",
    [(True, (0.348, 16.030, -43.853, 45.393, -16.815)), (False, (0.26348, 1.9650, -1.1731))],
    ids=["reram", "pcm"],
)
@pytest.mark.parametrize("clip_max", [None, 1.2], ids=["no-clip", "clip"])
@pytest.mark.parametrize("with_derivative", [False, True], ids=["out", "out+derivative"])
def test_pair_program_vectorized_curves_equal_the_generic_loop(bounded, coeffs, clip_max, with_derivative):
    # The presets' two curves run in loops specialized on their degree and flags (vectorized); every other curve in
    # a generic loop. A zero highest-order coefficient leaves Horner's values and derivative the same for finite g
    # (0·x + c is c exactly), and sends the same curve down the generic loop: both must give the same numbers, bit
    # for bit, through every branch (clamps at 0 and clip_max, g at and above 1, w = 0).
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(67, 301, generator=gen) * 2.6 - 1.3  # an odd size: the vector loop's remainder runs too
    w[0, :6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.1, -1.1])
    runs = []
    for c in (coeffs, (*coeffs, 0.0)):  # lowest order first (hf_cim.noise.conductance.polyval): a zero on top
        c = torch.tensor(c, dtype=torch.float32)
        out = torch.empty_like(w)
        d = torch.empty_like(w) if with_derivative else None
        native.pair_program(w, out, c, 40.0, 30.0, clip_max, bounded, 11, 13, d)
        runs.append((out, d))
    (out, d), (out_generic, d_generic) = runs
    assert torch.equal(out, out_generic)
    if with_derivative:
        assert torch.equal(d, d_generic)
        assert (d == 0).any() and (d > 1.5).any()  # clamped devices and the w = 0 sum were reached
    if clip_max is not None:
        assert (out.abs() == clip_max).any()


def test_lognormal_program_checks_its_buffers_and_range():
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    w, out = torch.zeros(4, 5), torch.zeros(4, 5)
    with pytest.raises(ValueError, match="`factor` must be a contiguous float32 CPU tensor of shape \\(4, 5\\)"):
        native.lognormal_program(w, out, torch.zeros(20), 0.3, 0.0, 20.0, 1, 2)
    with pytest.raises(ValueError, match="`out` must be a contiguous float32"):
        native.lognormal_program(w, out.t(), None, 0.3, 0.0, 20.0, 1, 2)
    with pytest.raises(ValueError, match="`max_log` must be in \\[0, 87\\], got 90"):
        native.lognormal_program(w, out, None, 0.3, 0.0, 90.0, 1, 2)
    with pytest.raises(ValueError, match="`sigma` must be finite"):
        native.lognormal_program(w, out, None, float("nan"), 0.0, 20.0, 1, 2)
    w = torch.full((4, 5), -2.0)
    factor = torch.zeros(4, 5)
    native.lognormal_program(w, out, factor, 0.0, 0.5, 20.0, 1, 2)  # σ = 0: every factor is e^{-1/2}
    torch.testing.assert_close(factor, torch.full((4, 5), 0.6065306597126334), rtol=2.5e-7, atol=0)
    torch.testing.assert_close(out, w * factor, rtol=0, atol=0)


def test_stuck_at_checks_its_buffers_and_probabilities():
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    w, out = torch.zeros(4, 5), torch.zeros(4, 5)
    u = torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match="`u` must be a contiguous float32 CPU tensor of shape \\(2, 4, 5\\)"):
        native.stuck_at(w, torch.rand(4, 5), out, 0.1, 0.1)
    with pytest.raises(ValueError, match="`out` must be a contiguous float32"):
        native.stuck_at(w, u, out.t(), 0.1, 0.1)
    with pytest.raises(ValueError, match="`p_on` must be in \\[0, 1\\], got 1.5"):
        native.stuck_at(w, u, out, 0.1, 1.5)
    with pytest.raises(ValueError, match="`derivative` must be a contiguous float32"):
        native.stuck_at(w, u, out, 0.1, 0.1, torch.zeros(5, 4))
    native.stuck_at(torch.full((4, 5), 0.5), torch.zeros(2, 4, 5), out, 0.5, 0.0)  # every device stuck off
    assert torch.equal(out, torch.zeros(4, 5))


def test_within_is_the_torch_comparison_at_the_bound_and_checks_its_buffers():
    """The ADC's pass mask in one pass: ``|y| <= bound`` as torch compares a float32 tensor with a Python number
    (the bound rounded to float32), values on and one ulp around the bound, infinities and NaN included."""
    from hf_cim import kernels, native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    bound = (127 + 0.5) * 0.1 / (1 / 127)  # not a float32: the rounding is the comparison's
    b32 = torch.tensor(bound, dtype=torch.float32)
    edge = torch.stack([b32, torch.nextafter(b32, b32 + 1), torch.nextafter(b32, b32 - 1)])
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    y = torch.cat([torch.randn(3, 1000).flatten() * bound, edge, -edge, special]).reshape(1, -1)
    out = torch.empty(y.shape, dtype=torch.bool)
    native.within(y, out, bound)
    assert torch.equal(out, y.abs() <= bound)
    assert out.float().mean() > 0.5 and not out.all()
    assert torch.equal(kernels.within(y, bound), out)
    with pytest.raises(ValueError, match="`out` must be a contiguous bool CPU tensor"):
        native.within(y, torch.empty(y.shape), bound)
    with pytest.raises(ValueError, match="`y` must be a contiguous float32"):
        native.within(y.double(), out, bound)
    with pytest.raises(ValueError, match="`bound` must not be NaN"):
        native.within(y, out, float("nan"))


def test_pcm_read_checks_its_buffers_and_scalars():
    from hf_cim import native

    if not native.available():
        pytest.skip("no C compiler: the C kernels are not built")
    w, out = torch.full((4, 5), 0.5), torch.zeros(4, 5)
    with pytest.raises(ValueError, match="`out` must be a contiguous float32 CPU tensor of shape \\(4, 5\\)"):
        native.pcm_read(w, torch.zeros(5, 4), 1e-7, 1.0, 1.0, 1, 2)
    with pytest.raises(ValueError, match="`scale` must be finite and >= 0, got nan"):
        native.pcm_read(w, out, 1e-7, 1.0, float("nan"), 1, 2)
    native.pcm_read(w, out, 1e-7, 0.0, 1.0, 1, 2)  # no time for 1/f noise to accumulate: the weights as they are
    assert torch.equal(out, w)
