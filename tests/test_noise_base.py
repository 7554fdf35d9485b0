"""The precision of second-order terms (:mod:`hf_cim.noise.base`): ``"auto"`` multiplies in bfloat16 only where the
device does so natively, and is exactly one of the two explicit choices."""

import pytest
import torch

from hf_cim.noise import IRDrop, ReadNoise, base, noise_model_from_dict

CPU = torch.device("cpu")


@pytest.fixture
def bf16_native(monkeypatch):
    """Set what :func:`hf_cim.noise.base.fast_bfloat16_products` answers for the CPU (its cache), for one test."""

    def set_to(value: bool) -> None:
        monkeypatch.setitem(base._FAST_BF16, ("cpu", None), value)

    return set_to


def _operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 33, 70, generator=gen), torch.randn(2, 70, 19, generator=gen)


def test_cpu_answer_is_torchs_onednn_bfloat16_check():
    base._FAST_BF16.pop(("cpu", None), None)
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert base.fast_bfloat16_products(CPU) is bool(expected)
    assert base._FAST_BF16[("cpu", None)] is bool(expected)  # asked once per device


def test_devices_without_evidence_get_float32():
    assert base.fast_bfloat16_products(torch.device("meta")) is False
    assert base.resolve_spread_dtype("auto", torch.device("meta")) == "float32"


@pytest.mark.parametrize("native", [True, False], ids=["native", "emulated"])
def test_auto_is_exactly_the_explicit_choice_for_the_device(bf16_native, native):
    bf16_native(native)
    assert base.resolve_spread_dtype("auto", CPU) == ("bfloat16" if native else "float32")
    for explicit in ("bfloat16", "float32"):  # an explicit choice is kept whatever the device
        assert base.resolve_spread_dtype(explicit, CPU) == explicit
    a, b = _operands()
    auto = base.spread_bmm(a, b, "auto")
    assert torch.equal(auto, base.spread_bmm(a, b, "bfloat16" if native else "float32"))
    assert auto.dtype == (torch.bfloat16 if native else torch.float32)
    if not native:
        assert torch.equal(auto, torch.bmm(a, b))  # the exact reference


@pytest.mark.parametrize("native", [True, False], ids=["native", "emulated"])
def test_models_default_to_auto_and_follow_it(bf16_native, native):
    bf16_native(native)
    x, w = _operands(1)
    x, w_t = x.abs(), w.transpose(1, 2)  # hook layout: x (tiles, T, rows), w (tiles, out, rows)
    choice = "bfloat16" if native else "float32"
    read = ReadNoise()
    assert read.spread_dtype == "auto"
    assert torch.equal(read.variance(x, w_t), ReadNoise(spread_dtype=choice).variance(x, w_t))
    drop = IRDrop(g_ratio=300.0)
    assert (drop.current_dtype, drop.position_dtype) == ("auto", "auto")
    ref = IRDrop(g_ratio=300.0, current_dtype=choice, position_dtype=choice)
    for got, want in zip(drop.terms(x, w_t, 1.0, 128), ref.terms(x, w_t, 1.0, 128)):
        assert torch.equal(got, want)


def test_auto_is_checked_and_round_trips():
    for model in (ReadNoise(spread_dtype="auto"), IRDrop(current_dtype="auto", position_dtype="auto")):
        assert noise_model_from_dict(model.to_dict()) == model
    with pytest.raises(ValueError, match=r"`spread_dtype` must be one of \('auto', 'bfloat16', 'float32'\)"):
        ReadNoise(spread_dtype="bf16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("last_rows", [1, 37, 69])
def test_padded_rows_of_the_last_tile_are_skipped_with_the_same_sums(dtype, last_rows):
    """Three tiles of 70 rows, the last one zero beyond ``last_rows``: the products over its real rows only equal
    the padded ones (the same terms; only the blocking of the sums may differ)."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 33, 70, generator=gen), torch.randn(3, 70, 19, generator=gen)
    a[-1, :, last_rows:] = 0.0
    b[-1, last_rows:] = 0.0
    padded = base.spread_bmm(a, b, dtype)
    skipped = base.spread_bmm(a, b, dtype, last_rows)
    assert skipped.dtype == padded.dtype and skipped.shape == padded.shape
    torch.testing.assert_close(skipped.float(), padded.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(skipped[:-1], padded[:-1])  # the full tiles: the same product
    b[-1, last_rows:] = 1.0  # what the skipped rows would add, were they not padding: nothing is read there
    torch.testing.assert_close(base.spread_bmm(a, b, dtype, last_rows), skipped, rtol=0, atol=0)


def test_skipping_needs_a_partial_last_tile_of_several_and_no_autograd():
    a, b = _operands(2)  # two tiles of 70 rows
    for last_rows in (0, 70, 71):  # nothing to skip: the plain product
        assert torch.equal(base.spread_bmm(a, b, "float32", last_rows), torch.bmm(a, b))
    one = base.spread_bmm(a[:1], b[:1], "float32", 10)
    assert torch.equal(one, torch.bmm(a[:1], b[:1]))
    a.requires_grad_(True)  # ``full`` mode: the products stay differentiable
    out = base.spread_bmm(a, b, "float32", 10)
    out.sum().backward()
    assert a.grad is not None
    torch.testing.assert_close(a.grad[-1], b[-1].sum(-1).expand(33, 70))  # every row, padding included


def test_the_default_program_derivative_is_the_hooks_own_under_autograd():
    """A model that declares an element-wise ``program`` without a closed form gets its derivative from one
    vector-Jacobian product: the hook's value, its draws, and the derivative the formula gives."""
    from dataclasses import dataclass

    from hf_cim import NoiseModel
    from hf_cim.noise import NoiseContext

    @dataclass
    class Curved(NoiseModel):
        s: float = 0.1

        def elementwise_derivative(self, hook, ctx):
            return hook == "program"

        def program(self, w, ctx):
            return w * (1.0 + self.s * ctx.randn_like(w)) + 0.1 * w * w

    @dataclass
    class Constant(NoiseModel):
        def program(self, w, ctx):
            return torch.full_like(w.detach(), 0.5)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=gen)
    model = Curved()

    def ctx():
        return NoiseContext(generator=torch.Generator().manual_seed(4), level=1.0)

    with torch.no_grad():
        out, d = model.program_derivative(w, ctx())
    xi = ctx().randn_like(w)
    torch.testing.assert_close(out, model.program(w, ctx()), rtol=0, atol=0)
    torch.testing.assert_close(d, 1.0 + 0.1 * xi + 0.2 * w, rtol=1e-6, atol=1e-6)
    assert not out.requires_grad and not d.requires_grad
    assert Constant().program_derivative(w, ctx())[1] == 0.0
