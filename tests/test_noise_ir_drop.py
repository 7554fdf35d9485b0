"""IR-drop: the analytic formula, zero at zero input, growth with rows and inputs, no randomness."""

import pytest
import torch
from helpers import LAYER_KINDS, record_hook_inputs

from hf_cim.noise import IRDrop, NoiseContext, OutputNoise, noise_model_from_dict
from hf_cim.noise.ir_drop import ir_drop_position_weights


def ctx(level=1.0):
    return NoiseContext(generator=torch.Generator().manual_seed(0), level=level)


def data(rows, tokens=16, out=12, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, tokens, rows, generator=gen)
    w = torch.rand(2, out, rows, generator=gen)
    if not positive:
        x, w = 2 * x - 1, 2 * w - 1
    return x, w, torch.bmm(x, w.transpose(1, 2))


def reference(y, x, w, s, gamma, mean=False):
    """The formula written out element by element (float64)."""
    x, w, y = x.double(), w.double(), y.double()
    n = x.shape[-1]
    out = y.clone()
    for k in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(w.shape[1]):
                if mean:
                    a = n / gamma * w[k, i].abs().sum() * x[k, t].abs().mean()
                else:
                    a = n / gamma * sum(abs(w[k, i, j]) * abs(x[k, t, j]) for j in range(n))
                c = a * (0.05 * a * a - 0.2 * a + 0.5)
                pos = sum(w[k, i, j] * x[k, t, j] * (1 - (1 - j / n) ** 2) for j in range(n))
                out[k, t, i] = y[k, t, i] - s * c * pos
    return out


@pytest.mark.parametrize("mean", [False, True], ids=["exact", "mean"])
def test_matches_the_formula(mean):
    x, w, y = data(rows=8, tokens=3, out=4)
    model = IRDrop(
        scale=2.0,
        g_ratio=50.0,
        column_current="mean" if mean else "exact",
        current_dtype="float32",
        position_dtype="float32",
    )
    got = model.output(y.clone(), x, w, ctx(level=1.5))
    torch.testing.assert_close(got.double(), reference(y, x, w, 3.0, 50.0, mean), rtol=1e-5, atol=1e-6)


def test_zero_input_gives_zero_drop_and_no_randomness():
    x, w, y = data(rows=64)
    model = IRDrop(g_ratio=100.0)
    zero = torch.zeros_like(x)
    assert torch.equal(model.output(torch.zeros_like(y), zero, w, ctx()), torch.zeros_like(y))
    c = ctx()
    state = c.generator.get_state()
    a = model.output(y.clone(), x, w, c)
    b = model.output(y.clone(), x, w, c)
    assert torch.equal(a, b)
    assert torch.equal(c.generator.get_state(), state)  # nothing drawn


def _relative_drop(rows, scale_x=1.0):
    x, w, y = data(rows=rows, tokens=64, out=32, seed=1, positive=True)
    x = x * scale_x
    y = y * scale_x
    got = IRDrop(g_ratio=1e4).output(y.clone(), x, w, ctx())
    return ((y - got) / y).mean().item()


def test_grows_with_tile_rows_and_input_magnitude_and_pulls_towards_zero():
    d64, d256, d1024 = _relative_drop(64), _relative_drop(256), _relative_drop(1024)
    assert 0 < d64 < d256 < d1024
    assert _relative_drop(256, 0.25) < _relative_drop(256, 0.5) < d256
    x, w, y = data(rows=256, positive=True)
    got = IRDrop(g_ratio=1e4).output(y.clone(), x, w, ctx())
    assert (got < y).all() and (got > 0).all()


def test_devices_far_from_the_read_out_drop_more():
    p = ir_drop_position_weights(8)
    torch.testing.assert_close(p, 1 - (1 - torch.arange(8) / 8) ** 2)
    drops = []
    for j in range(8):  # one active row at a time
        x = torch.zeros(1, 1, 8)
        x[..., j] = 1.0
        w = torch.ones(1, 1, 8)
        y = torch.bmm(x, w.transpose(1, 2))
        drops.append((y - IRDrop(g_ratio=10.0).output(y.clone(), x, w, ctx())).item())
    assert drops[0] == 0.0 and all(a < b for a, b in zip(drops, drops[1:]))


def test_level_scales_and_level_zero_is_identity():
    x, w, y = data(rows=32)
    model = IRDrop(g_ratio=100.0)
    d1 = y - model.output(y.clone(), x, w, ctx(1.0))
    d2 = y - model.output(y.clone(), x, w, ctx(2.0))
    torch.testing.assert_close(d2, 2 * d1)
    assert torch.equal(model.output(y.clone(), x, w, ctx(0.0)), y)


def test_a_layer_narrower_than_the_array_is_the_zero_padded_full_array():
    """A 40-input layer on a 64-row array uses rows 0..39 of it: its IR-drop is that of the full array with zero
    inputs and conductances on rows 40..63 (the wire is the array's), as for the padded last tile of a wider layer;
    and a whole layer patched with tile_size 64 gives exactly that."""
    import torch.nn.functional as F
    from torch import nn

    import hf_cim

    x, w, y = data(40)
    narrow = NoiseContext(generator=torch.Generator().manual_seed(0), level=1.0, tile_rows=64)
    model = IRDrop(g_ratio=300.0, current_dtype="float32")
    got = model.output(y.clone(), x, w, narrow)
    padded = model.output(y.clone(), F.pad(x, (0, 24)), F.pad(w, (0, 24)), ctx())
    torch.testing.assert_close(got, padded, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, model.output(y.clone(), x, w, ctx()), rtol=1e-4)  # not a 40-row array

    torch.manual_seed(0)
    layer = nn.Linear(40, 12, bias=False)
    wide = nn.Linear(64, 12, bias=False)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :40] = layer.weight
    cfg = dict(noise=[IRDrop(g_ratio=300.0, current_dtype="float32")], input_bits=None, weight_bits=None,
               output_bits=None, input_quant="per_tensor")  # fmt: skip
    hf_cim.patch_model(layer, hf_cim.AnalogNoiseConfig(tile_size=64, **cfg))
    hf_cim.patch_model(wide, hf_cim.AnalogNoiseConfig(tile_size=64, **cfg))
    inp = torch.randn(8, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(inp), wide(F.pad(inp, (0, 24))), rtol=1e-5, atol=1e-6)


def test_invalid_fields():
    with pytest.raises(ValueError, match="`column_current`"):
        IRDrop(column_current="solver")
    with pytest.raises(ValueError, match="`g_ratio`"):
        IRDrop(g_ratio=0.0)


def _correction(model, x, w, s=1.0):
    a, y_pos = model.terms(x, w, s)  # bfloat16 terms are read in float32 by their consumers (exact)
    a, y_pos = a.float(), y_pos.float()
    return a, a * (0.05 * a * a - 0.2 * a + 0.5) * y_pos


@pytest.mark.parametrize("tile_size", [128, 256, 512], ids=["tiles128", "tiles256", "tiles512"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bf16_column_current_keeps_the_correction_within_1_percent_per_output(kind, tile_size):
    # ``current_dtype="bfloat16"`` (``"auto"``'s choice where bfloat16 products are native) on what a real layer
    # hands the hook: LLM-like inputs with outlier features, weights with outliers, 1 to 3 tiles, the presets' γ;
    # and at a strong IR-drop (γ / 100).
    for g_ratio in (5.7e5, 5.7e3):
        for seed in range(3):
            seen = record_hook_inputs(kind, [IRDrop(g_ratio=g_ratio), OutputNoise()], tile_size, IRDrop, seed=seed)
            _, x, w = seen[0]
            a32, exact = _correction(IRDrop(g_ratio=g_ratio, current_dtype="float32", position_dtype="float32"), x, w)
            a16, fast = _correction(IRDrop(g_ratio=g_ratio, current_dtype="bfloat16", position_dtype="float32"), x, w)
            assert torch.equal(a16 == 0, a32 == 0)
            nonzero = exact != 0
            assert nonzero.float().mean() > 0.9
            assert ((a16[nonzero] / a32[nonzero]) - 1).abs().max().item() < 0.012  # (1 + 2^-8)^3 − 1
            assert ((fast[nonzero] / exact[nonzero]) - 1).abs().max().item() < 0.01
            assert torch.equal(fast == 0, exact == 0)


@pytest.mark.parametrize("tile_size", [128, 512], ids=["tiles128", "tiles512"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bf16_position_product_is_within_1_percent_of_its_terms_size_per_output(kind, tile_size):
    """``position_dtype="bfloat16"``: the signed product ``Σ_j W_ij·x_j·p_j`` is within (1 + 2^-8)^3 − 1 of
    ``Σ_j |W_ij·x_j·p_j|`` for every output (the bound of a rounded dot product), and so is the correction."""
    for g_ratio in (5.7e5, 5.7e3):
        for seed in range(3):
            seen = record_hook_inputs(kind, [IRDrop(g_ratio=g_ratio), OutputNoise()], tile_size, IRDrop, seed=seed)
            _, x, w = seen[0]
            exact = IRDrop(g_ratio=g_ratio, current_dtype="bfloat16", position_dtype="float32")
            fast = IRDrop(g_ratio=g_ratio, current_dtype="bfloat16", position_dtype="bfloat16")
            a, pos32 = exact.terms(x, w, 1.0)
            a16, pos16 = fast.terms(x, w, 1.0)
            assert torch.equal(a, a16)  # the column current is not touched by this field
            p = ir_drop_position_weights(x.shape[-1])
            size = torch.bmm((x * p).abs(), w.abs().transpose(1, 2))
            nonzero = size > 0
            assert ((pos16 - pos32).abs()[nonzero] / size[nonzero]).max().item() < 0.012
            a = a.float()
            c = a * (0.05 * a * a - 0.2 * a + 0.5)
            assert ((c * (pos16 - pos32)).norm() / (c * pos32).norm()).item() < 0.01  # the correction, in norm


def test_current_dtype_leaves_the_signal_and_the_position_product_unchanged():
    _, x, w = record_hook_inputs("linear", [IRDrop(), OutputNoise()], 128, IRDrop)[0]
    exact, fast = IRDrop(current_dtype="float32"), IRDrop(current_dtype="bfloat16")
    assert torch.equal(exact.terms(x, w, 1.0)[1], fast.terms(x, w, 1.0)[1])
    assert not torch.equal(exact.terms(x, w, 1.0)[0], fast.terms(x, w, 1.0)[0])


def test_current_dtype_is_checked_and_round_trips():
    with pytest.raises(ValueError, match=r"`current_dtype` must be one of .*got 'half'"):
        IRDrop(current_dtype="half")
    model = IRDrop(current_dtype="float32")
    assert noise_model_from_dict(model.to_dict()) == model
    with pytest.raises(ValueError, match=r"`position_dtype` must be one of .*got 'half'"):
        IRDrop(position_dtype="half")
    model = IRDrop(position_dtype="float32")
    assert noise_model_from_dict(model.to_dict()) == model
    old = {k: v for k, v in model.to_dict().items() if k != "position_dtype"}  # saved before the field existed
    assert noise_model_from_dict(old).position_dtype == "auto"


@pytest.mark.parametrize("tile_size, last", [(128, 0), (256, 128), (100, 84), (512, 0)])
def test_the_tile_simulation_tells_the_hooks_which_rows_of_the_last_tile_are_real(tile_size, last):
    """384 rows on tiles of ``tile_size``: the last tile's real rows reach the hooks (0: none padded), and IR-drop's
    correction over them equals the one over the whole zero-padded tile."""
    import hf_cim

    layer = torch.nn.Linear(384, 16)
    noise = [IRDrop(g_ratio=300.0, current_dtype="float32", position_dtype="float32")]
    hf_cim.patch_model(layer, hf_cim.get_preset("rram", 1.0, tile_size=tile_size, noise=noise))
    seen = []
    original = IRDrop.output

    def recording(self, y, x, w, ctx):
        seen.append((x.clone(), w.clone(), ctx.last_tile_rows, ctx.tile_rows))
        return original(self, y, x, w, ctx)

    IRDrop.output = recording
    try:
        with torch.no_grad():
            layer.train()(torch.randn(3, 5, 384, generator=torch.Generator().manual_seed(0)))
    finally:
        IRDrop.output = original
    ((x, w, last_rows, rows),) = seen
    tiles = -(-384 // tile_size) if tile_size < 384 else 1
    assert x.shape[0] == tiles and last_rows == last
    model = IRDrop(g_ratio=300.0, current_dtype="float32", position_dtype="float32")
    a_skip, pos_skip = model.terms(x, w, 1.0, rows, last_rows)
    a_pad, pos_pad = model.terms(x, w, 1.0, rows)
    torch.testing.assert_close(a_skip, a_pad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pos_skip, pos_pad, rtol=1e-5, atol=1e-7)
