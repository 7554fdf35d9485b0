"""The C kernels against the eager torch code over random shapes, converter settings, tilings and noise.

Native and eager compute the same float32 formulas; the noise agrees to one float32 ulp, so a noisy value sitting
on a rounding tie may land one ADC level apart (the tolerance of tests/test_kernels.py). Without noise and without
input slicing the two are bit-identical.
"""

import random

import pytest
import torch

import hf_cim
from hf_cim import kernels, native
from hf_cim.converters import slice_input
from hf_cim.noise import NoiseContext
from hf_cim.noise.gaussian import GaussianWeightNoise, OutputNoise, ReadNoise
from hf_cim.noise.ir_drop import IRDrop
from hf_cim.tile import analog_matmul, program_weights

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the native kernels cannot be built")

_NOISE = {
    "off": [],
    "fused": [GaussianWeightNoise(0.05), OutputNoise(0.1)],  # both fused into the C kernels
    "hooks": [ReadNoise(0.02, shape="pcm"), IRDrop(scale=1.0, g_ratio=50.0), OutputNoise(0.05)],
    "batch": [ReadNoise(0.02, shape="constant", draw="batch"), ReadNoise(0.02, draw="batch")],
}


@pytest.fixture(autouse=True)
def _reset_backend():
    assert native.available(), "a C compiler is present but the native kernels did not build (see the log)"
    yield
    kernels.set_native(None)
    kernels.set_compile(None)


def _cases(n: int, seed: int = 1234):
    rnd = random.Random(seed)
    cases = []
    while len(cases) < n:
        input_bits = rnd.choice([8, 8, 6, 4, 2, None])
        case = {
            "T": rnd.choice([0, 1, 3, 5, 17, 33, 127, 1025]),
            "K": rnd.choice([1, 2, 7, 16, 31, 64, 100]),
            "O": rnd.choice([1, 2, 5, 16, 33]),
            "bias": rnd.random() < 0.7,
            "layout": rnd.choice(["contiguous", "contiguous", "transposed", "strided"]),
            "noise": rnd.choice(list(_NOISE)),
            "config": {
                "input_quant": rnd.choice(["per_token", "per_tensor"]),
                "input_bits": input_bits,
                "weight_bits": rnd.choice([8, 8, 3, None]),
                "output_bits": rnd.choice([8, 8, 5, 12, None]),
                "tile_size": rnd.choice([None, 4, 7, 16, 512]),
                "input_slice_bits": rnd.choice([None, None, 1, 2, 3]) if input_bits and input_bits > 2 else None,
            },
        }
        if case["config"]["input_slice_bits"] and case["config"]["input_slice_bits"] >= input_bits:
            continue
        cases.append(case)
    # The reported crash, scaled down: a narrow layer, many tokens, one per-tensor DAC scale.
    cases.append({**cases[0], "T": 200_003, "K": 4, "O": 2, "noise": "fused", "layout": "contiguous"})
    cases[-1]["config"] = {**cases[0]["config"], "input_quant": "per_tensor", "input_slice_bits": None}
    return cases


_CASES = _cases(64)


def _run(case, impl):
    gen = torch.Generator().manual_seed(7)
    t, k, o = case["T"], case["K"], case["O"]
    if case["layout"] == "transposed":
        x = torch.randn(k, t, generator=gen).t()
    elif case["layout"] == "strided":
        x = torch.randn(t, 2 * k, generator=gen)[:, ::2]
    else:
        x = torch.randn(t, k, generator=gen)
    x = x * (torch.rand(t, 1, generator=gen) * 4)  # tokens of different magnitudes
    if t > 2:
        x[1] = 0.0  # an all-zero token: the DAC's tiny floor
    w = torch.randn(o, k, generator=gen) * 0.3
    b = torch.randn(o, generator=gen) if case["bias"] else None
    cfg = hf_cim.AnalogNoiseConfig(noise=_NOISE[case["noise"]], **case["config"])
    kernels.set_native(impl == "native")
    kernels.set_compile(False)
    ctx = NoiseContext(generator=torch.Generator().manual_seed(11), level=1.0 if cfg.noise else 0.0)
    with torch.no_grad():
        w_prog, scale = program_weights(w, cfg, ctx, cfg.noise)
        y = analog_matmul(x, w_prog, scale, b, cfg, ctx, cfg.noise)
    return x, w, cfg, y


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_native_equals_eager(case):
    case = _CASES[case]
    x, w, cfg, eager = _run(case, "eager")
    _, _, _, nat = _run(case, "native")
    assert nat.shape == eager.shape == (case["T"], case["O"])
    assert torch.isfinite(nat).all() and torch.isfinite(eager).all()
    if case["T"] == 0:
        return
    per_token = cfg.input_quant == "per_token"
    x_absmax = x.abs().amax(1, keepdim=True) if per_token else x.abs().amax().reshape(1, 1)
    unit = x_absmax.clamp_min(1e-12) * w.abs().amax(1)  # one output of a normalized product
    if cfg.output_bits is None:
        torch.testing.assert_close(nat, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
        return
    if cfg.input_slice_bits is None:
        c_max = 1.0
    else:  # the largest digital weight of a slice: one ADC level of that slice
        qmax = 2 ** (cfg.input_bits - 1) - 1
        c_max = max(slice_input(torch.zeros(1), cfg.input_bits, cfg.input_slice_bits)[1]) / qmax
    diff = (nat - eager).abs() / (unit * cfg.output_step())
    if case["noise"] == "off" and cfg.input_slice_bits is None:
        assert torch.equal(nat, eager)
    # Same formula; the noise may put a value on a rounding tie one ADC level away, rarely.
    assert float(diff.max()) <= c_max * 1.001 + 1e-3
    assert int((diff > 1e-3).sum()) <= 0.01 * diff.numel() + 1


def test_per_tensor_gpt2_loss_is_finite_and_matches_eager():
    # The reported symptom: a tiny GPT-2 with a per-tensor DAC gave a NaN loss under no_grad and in training.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=32,
            n_head=2,
            vocab_size=50,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    cfg = hf_cim.AnalogNoiseConfig(input_quant="per_tensor", gradient="ste", noise=[OutputNoise(0.05)], seed=0)
    hf_cim.patch_model(model, cfg)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for impl in ("eager", "native"):
        kernels.set_native(impl == "native")
        kernels.set_compile(False)
        hf_cim.reseed(model, 0)
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss)
    assert torch.isfinite(losses[1]), losses
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)
    # A training step (the STE forward runs without autograd, on the C kernels).
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("gradient", ["ste", "full"])
@pytest.mark.parametrize("input_quant", ["per_token", "per_tensor"])
@pytest.mark.parametrize("impl", ["eager", "native"])
def test_empty_batch_gives_an_empty_output(gradient, input_quant, impl):
    # T = 0 tokens: like nn.Linear, an empty (0, out) output, with and without autograd.
    layer = torch.nn.Sequential(torch.nn.Linear(4, 2))
    hf_cim.patch_model(layer, hf_cim.AnalogNoiseConfig(input_quant=input_quant, gradient=gradient))
    kernels.set_native(impl == "native")
    kernels.set_compile(False)
    with torch.no_grad():
        assert layer(torch.empty(0, 4)).shape == (0, 2)
    x = torch.empty(0, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert x.grad.shape == (0, 4)
