import pytest
import torch

import hf_cim
from hf_cim import kernels
from hf_cim.noise import NoiseContext
from hf_cim.noise.gaussian import GaussianWeightNoise, OutputNoise
from hf_cim.tile import analog_matmul, program_weights


@pytest.fixture
def compiled():
    kernels.set_compile(True)
    yield
    kernels.set_compile(None)


def test_compile_switch(monkeypatch):
    monkeypatch.setenv("HF_CIM_COMPILE", "0")
    assert not kernels.compile_enabled()
    kernels.set_compile(True)
    try:
        assert kernels.compile_enabled()
    finally:
        kernels.set_compile(None)


def test_compiled_kernels_equal_eager(compiled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=gen)
    w = torch.randn(20, 300, generator=gen) * 0.1
    b = torch.randn(20, generator=gen)
    cfg = hf_cim.AnalogNoiseConfig(noise=[], tile_size=128)
    outs = []
    for enabled in (False, True):
        kernels.set_compile(enabled)
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
def test_compiled_epilogue_with_noise_equals_eager(compiled, tiles, adc):
    key = torch.tensor([11, -12], dtype=torch.int32)
    outs = []
    for enabled in (False, True):
        kernels.set_compile(enabled)
        y, rec, xa, rs, b = _epilogue_args(tiles, bias=tiles == 1)
        with torch.no_grad():
            outs.append(kernels.epilogue(y, rec, xa, rs, b, 1 / 0.08, 127.0, 1 / 127, 0.04, key, adc=adc))
        if tiles == 1:  # written into the product's buffer
            assert outs[-1].data_ptr() == y.data_ptr()
    assert not kernels._state["failed"]
    if adc:  # a value on a rounding tie may move by one level
        diff = (outs[0] - outs[1]).abs() / (xa * rs)
        assert diff.max() <= 1.001 and (diff > 1e-3).float().mean() < 0.01
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_compiled_weight_program_and_noise_equal_eager(compiled):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(50, 90, generator=gen)
    key = torch.tensor([3, 4], dtype=torch.int32)
    res = []
    for enabled in (False, True):
        kernels.set_compile(enabled)
        with torch.no_grad():
            w_n, scale = kernels.weight_program(w, 127.0, 0.02, key)
            t = torch.zeros(5, 7, 11)
            kernels.add_randn_(t, 2.0, key)
            res.append((w_n, scale, t, kernels.randn(t, key)))
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
            kernels.add_randn_(torch.zeros(rows, cols), 1.0, key)
    # Two kernels: one graph each, plus at most one recompilation each when the first shape was specialized.
    assert torch._dynamo.utils.counters["frames"]["ok"] <= 4


class _UnfusedOutputNoise(OutputNoise):
    """Same model, another type: the tile simulation runs its hook instead of fusing it."""


class _UnfusedWeightNoise(GaussianWeightNoise):
    pass


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
