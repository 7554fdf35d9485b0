import pytest
import torch

import hf_cim
from hf_cim import converters, kernels, native, rng
from hf_cim.noise import NoiseContext
from hf_cim.noise.gaussian import GaussianWeightNoise, OutputNoise
from hf_cim.noise.ir_drop import _correct_ as ir_drop_reference_
from hf_cim.tile import analog_matmul, program_weights

SAMPLER = kernels.SAMPLER


def _use(backend):
    """Run the kernels with one implementation: "eager", "native" (the C kernels) or "compiled" (torch.compile)."""
    kernels.set_native(backend == "native")
    kernels.set_compile(backend == "compiled")


@pytest.fixture
def compiled():
    kernels.set_compile(True)
    yield
    kernels.set_compile(None)


@pytest.fixture(params=["native", "compiled"])
def backend(request):
    if request.param == "native" and native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native CPU kernels cannot be built")
    if request.param == "native":
        assert native.available(), "a C compiler is present but the native kernels did not build (see the log)"
    yield request.param
    kernels.set_compile(None)
    kernels.set_native(None)


def test_switches_and_environment_read_once(monkeypatch):
    # The environment is read when hf_cim.kernels is imported (conftest sets HF_CIM_COMPILE=0), not on every call.
    assert not kernels.compile_enabled()
    monkeypatch.setenv("HF_CIM_COMPILE", "1")
    monkeypatch.setenv("HF_CIM_NATIVE", "0")
    assert not kernels.compile_enabled() and kernels.native_enabled()
    kernels.set_compile(True)
    kernels.set_native(False)
    try:
        assert kernels.compile_enabled() and not kernels.native_enabled()
    finally:
        kernels.set_compile(None)
        kernels.set_native(None)
    assert not kernels.compile_enabled() and kernels.native_enabled()


def test_every_stage_has_its_reference_last_and_per_device_implementations():
    for stage in (kernels._dac, kernels._weight_program, kernels._epilogue, kernels._randn, kernels._add_randn):
        assert stage.reference is not None
        assert stage.impls["cpu"][0].__name__.startswith("_native")  # CPU: the C kernels first
        assert all("compiled" in f.__name__ for f in stage.impls["cuda"])  # CUDA: torch.compile
        assert "meta" not in stage.impls  # any other device: the reference
    # The converters' functions are the references of the converter stages: no second Python definition.
    assert kernels._dac.reference is converters.dac
    assert kernels._weight_program.reference is converters.weight_program
    assert kernels._epilogue.reference is converters.epilogue
    assert kernels._randn.reference is rng.randn


def test_a_stage_runs_the_reference_under_autograd_and_on_other_devices(monkeypatch):
    calls = []
    impl = lambda *a, **k: calls.append(a) or "fast"  # noqa: E731
    stage = kernels.Stage("probe", lambda *a, **k: "reference", {"cpu": (impl,)})
    x = torch.zeros(2)
    with torch.no_grad():
        assert stage(x) == "fast"
        assert stage(torch.zeros(2, device="meta")) == "reference"
    assert stage(x) == "reference" and len(calls) == 1  # grad mode: the reference
    passing = kernels.Stage("probe", lambda *a: "reference", {"cpu": (lambda *a: NotImplemented,)})
    with torch.no_grad():
        assert passing(x) == "reference"


def test_kernels_equal_eager(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=gen)
    w = torch.randn(20, 300, generator=gen) * 0.1
    b = torch.randn(20, generator=gen)
    cfg = hf_cim.AnalogNoiseConfig(noise=[], tile_size=128)
    outs = []
    for impl in ("eager", backend):
        _use(impl)
        ctx = NoiseContext(generator=None, level=0.0)
        with torch.no_grad():
            w_prog, scale = program_weights(w, cfg, ctx, [])
            outs.append(analog_matmul(x, w_prog, scale, b, cfg, ctx, []))
    assert not kernels._state["failed"], "the compiled kernels fell back to eager"
    # Same formula; a different float evaluation order may move a value sitting on a rounding tie by one level.
    diff = (outs[0] - outs[1]).abs()
    one_level = x.abs().amax(1, keepdim=True) * w.abs().amax(1) * cfg.output_step()
    assert torch.all(diff <= one_level * 1.001)
    assert (diff > 1e-6).float().mean() < 0.01


def _epilogue_args(tiles, bias):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(tiles, 33, 70, generator=gen) * 40
    recombine = torch.ones(tiles)
    x_absmax = torch.rand(33, 1, generator=gen) + 0.5
    row_scale = torch.rand(1, 70, generator=gen) * 0.1
    bias_row = torch.randn(1, 70, generator=gen) if bias else None
    return y, recombine, x_absmax, row_scale, bias_row


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("adc", [True, False])
def test_epilogue_with_noise_equals_eager(backend, tiles, adc):
    key = torch.tensor([11, -12], dtype=torch.int32)
    outs = []
    for impl in ("eager", backend):
        _use(impl)
        y, rec, xa, rs, b = _epilogue_args(tiles, bias=tiles == 1)
        with torch.no_grad():
            outs.append(kernels.epilogue(y, rec, xa, rs, b, 1 / 0.08, 127.0, 1 / 127, 0.04, key, adc=adc))
        if tiles == 1 and impl != "eager":  # the fused kernels write into the product's buffer
            assert outs[-1].data_ptr() == y.data_ptr()
    assert not kernels._state["failed"]
    if adc:  # a value on a rounding tie may move by one level
        diff = (outs[0] - outs[1]).abs() / (xa * rs)
        assert diff.max() <= 1.001 and (diff > 1e-3).float().mean() < 0.01
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_weight_program_and_noise_equal_eager(backend):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(50, 90, generator=gen)
    key = torch.tensor([3, 4], dtype=torch.int32)
    res = []
    for impl in ("eager", backend):
        _use(impl)
        with torch.no_grad():
            w_n, scale = kernels.weight_program(w, 127.0, 0.02, key)
            t = torch.zeros(5, 7, 11)
            SAMPLER.add_randn_(t, 2.0, key)
            res.append((w_n, scale, t, SAMPLER.randn(t, key)))
    assert not kernels._state["failed"]
    for eager, comp in zip(*res):
        torch.testing.assert_close(eager, comp, rtol=1e-5, atol=1e-5)


def test_compiled_kernels_do_not_recompile_per_shape(compiled):
    key = torch.tensor([3, 4], dtype=torch.int32)
    torch._dynamo.reset()
    kernels._state["compiled"].clear()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for rows, cols in ((16, 20), (24, 40), (40, 72), (56, 24)):
            kernels.weight_program(torch.nn.Parameter(torch.randn(rows, cols)), 127.0, 0.02, key)
            SAMPLER.add_randn_(torch.zeros(rows, cols), 1.0, key)
    # Two kernels: one graph each, plus at most one recompilation each when the first shape was specialized.
    assert torch._dynamo.utils.counters["frames"]["ok"] <= 4


class _UnfusedOutputNoise(OutputNoise):
    """Same model, without the fusion capability: the tile simulation runs its hook."""

    def additive_gaussian(self, hook):
        return None


class _UnfusedWeightNoise(GaussianWeightNoise):
    def additive_gaussian(self, hook):
        return None


@pytest.mark.parametrize("tile_size", [None, 48])
def test_fused_noise_equals_running_the_hooks(tile_size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 100, generator=gen)
    w = torch.randn(30, 100, generator=gen)
    b = torch.randn(30, generator=gen)
    outs = []
    cfg = hf_cim.AnalogNoiseConfig(noise=[GaussianWeightNoise(0.05), OutputNoise(0.1)], tile_size=tile_size)
    for models in (
        cfg.noise,
        [_UnfusedWeightNoise(0.05), _UnfusedOutputNoise(0.1)],
    ):
        ctx = NoiseContext(generator=torch.Generator().manual_seed(9), level=1.0)
        with torch.no_grad():
            w_prog, scale = program_weights(w, cfg, ctx, models)
            outs.append(analog_matmul(x, w_prog, scale, b, cfg, ctx, models))
    diff = (outs[0] - outs[1]).abs() / (x.abs().amax(1, keepdim=True) * w.abs().amax(1) * cfg.output_step())
    assert diff.max() <= 1.001 and (diff > 1e-3).float().mean() < 0.01


@pytest.fixture
def native_only():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native CPU kernels cannot be built")
    assert native.available(), "a C compiler is present but the native kernels did not build (see the log)"
    yield
    kernels.set_native(None)
    kernels.set_compile(None)


def _both(fn):
    """``fn()`` with the eager kernels, then with the C kernels."""
    out = []
    for impl in ("eager", "native"):
        _use(impl)
        with torch.no_grad():
            out.append(fn())
    return out


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("quantize", [True, False])
def test_native_dac_is_bit_identical_to_eager(native_only, per_token, quantize):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 70, generator=gen) * torch.rand(300, 1, generator=gen) * 5
    x[3] = 0.0  # an all-zero token: absmax clamped to the tiny floor
    (ea, eab), (na, nab) = _both(lambda: kernels.dac(x.t().contiguous().t(), 127.0, per_token, quantize))
    assert torch.equal(ea, na) and torch.equal(eab, nab)
    assert eab.shape == ((300, 1) if per_token else (1, 1))


@pytest.mark.parametrize("tiles", [1, 4])
@pytest.mark.parametrize("adc", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_native_epilogue_without_noise_is_bit_identical_to_eager(native_only, tiles, adc, bias):
    def run():
        y, rec, xa, rs, b = _epilogue_args(tiles, bias)
        rec = torch.tensor([1.0, 2.0, 4.0, 8.0])[:tiles]
        return kernels.epilogue(y, rec, xa, rs, b, 1 / 0.08, 127.0, 1 / 127, 0.0, None, adc=adc)

    eager, nat = _both(run)
    if adc:  # integer ADC levels times powers of two: the tile sum is exact in any order
        assert torch.equal(eager, nat)
    else:
        torch.testing.assert_close(eager, nat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qmax", [127.0, None])
def test_native_weight_program_equals_eager(native_only, qmax):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 48, generator=gen)
    w[7] = 0.0
    key = torch.tensor([-7, 123456], dtype=torch.int32)
    (ew, es), (nw, ns) = _both(lambda: kernels.weight_program(torch.nn.Parameter(w.t()).t(), qmax, 0.0, None))
    assert torch.equal(ew, nw) and torch.equal(es, ns)
    (ew, es), (nw, ns) = _both(lambda: kernels.weight_program(w, qmax, 0.03, key))
    torch.testing.assert_close(ew, nw, rtol=0, atol=1e-7)  # the noise: one ulp of torch's sqrt, times 0.03
    assert torch.equal(es, ns)


def test_native_kernels_propagate_nan_like_torch(native_only):
    x = torch.randn(4, 16)
    x[1, 5] = float("nan")
    (_, eab), (_, nab) = _both(lambda: kernels.dac(x, 127.0, True, True))
    assert torch.isnan(nab[1]).item() and torch.isnan(eab[1]).item()
    assert torch.equal(eab[[0, 2, 3]], nab[[0, 2, 3]])
    (_, es), (_, ns) = _both(lambda: kernels.weight_program(x, 127.0))
    assert torch.isnan(ns[1]).item() and torch.isnan(es[1]).item()


def test_native_noise_does_not_depend_on_the_thread_count(native_only):
    key = torch.tensor([9, 10], dtype=torch.int32)
    like = torch.empty(300, 1000)  # several chunks: the work is split over the threads
    _use("native")
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(SAMPLER.randn(like, key))
    torch.set_num_threads(1)
    assert torch.equal(outs[0], outs[1])


def test_native_kernels_leave_autograd_to_torch(native_only):
    # Under autograd the eager ops run (the C kernels are for the no-grad STE forward only).
    _use("native")
    w = torch.randn(8, 8, requires_grad=True)
    w_n, _ = kernels.weight_program(w, 127.0)
    assert not w_n.requires_grad  # weight_program detaches: it is the STE's forward
    x = torch.randn(3, 8, requires_grad=True)
    x_int, _ = kernels.dac(x, 127.0, True, True)
    assert x_int.requires_grad


@pytest.mark.parametrize("sqrt_scale", [True, False])
def test_native_add_scaled_randn_equals_eager(native_only, sqrt_scale):
    gen = torch.Generator().manual_seed(6)
    y0 = torch.randn(3, 40, 50, generator=gen)
    scale = torch.rand(3, 40, 50, generator=gen) * 4
    scale[0, 0, :5] = 0.0  # the sqrt floor
    key = torch.tensor([21, -22], dtype=torch.int32)
    eager, nat = _both(lambda: SAMPLER.add_scaled_randn_(y0.clone(), scale, 0.3, key, sqrt_scale))
    torch.testing.assert_close(eager, nat, rtol=1e-6, atol=1e-6)
    # The formula itself, with the draws of the sampler.
    spread = scale.clamp(min=1e-12).sqrt() if sqrt_scale else scale
    torch.testing.assert_close(nat, y0 + 0.3 * SAMPLER.randn(y0, key) * spread, rtol=1e-6, atol=1e-6)


def test_native_ir_drop_is_bit_identical_to_eager(native_only):
    gen = torch.Generator().manual_seed(7)
    y0, a, y_pos = (torch.randn(2, 30, 70, generator=gen) for _ in range(3))
    a = a.abs() * 3
    eager, nat = _both(lambda: SAMPLER.run("ir_drop_", ir_drop_reference_, y0.clone(), a, y_pos))
    assert torch.equal(eager, nat)
    torch.testing.assert_close(nat, y0 - a * (0.05 * a * a - 0.2 * a + 0.5) * y_pos, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("noise", [False, True])
def test_native_per_tensor_epilogue_equals_eager(native_only, tiles, noise):
    # One (1, 1) DAC scale for every token: the C epilogue must not index it per row (it read past the buffer).
    key = torch.tensor([5, 6], dtype=torch.int32) if noise else None

    def run():
        y, rec, _, rs, b = _epilogue_args(tiles, bias=True)
        return kernels.epilogue(y, rec, torch.tensor([[1.75]]), rs, b, 1 / 0.08, 127.0, 1 / 127, 0.04, key, adc=True)

    eager, nat = _both(run)
    assert nat.shape == (33, 70) and torch.isfinite(nat).all()
    unit = 1.75 * _epilogue_args(tiles, bias=True)[3]
    diff = (eager - nat).abs() / unit
    if noise:  # the noise agrees to an ulp: a value on a rounding tie may move by one level
        assert diff.max() <= 1.001 and (diff > 1e-3).float().mean() < 0.01
    else:
        assert torch.equal(eager, nat)


@pytest.mark.parametrize("per_token", [True, False])
def test_dac_of_an_empty_batch(per_token):
    # T = 0 tokens: an empty output (as nn.Linear gives), not amax()'s error on an empty tensor.
    for impl in ("eager", "native") if native._compiler() is not None else ("eager",):
        _use(impl)
        try:
            with torch.no_grad():
                x_int, absmax = kernels.dac(torch.empty(0, 5), 127.0, per_token, True)
        finally:
            kernels.set_native(None)
            kernels.set_compile(None)
        assert x_int.shape == (0, 5)
        assert absmax.shape == ((0, 1) if per_token else (1, 1))
