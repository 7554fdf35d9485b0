"""One AnalogState per patched layer, preserve_analog_state, and what copies, pickles and unpatching do with it."""

import copy
import io
import pickle

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn

import hf_cim
from hf_cim.calibration import calibrate_chip_outputs
from hf_cim.chip import program_chip
from hf_cim.patch import analog_layers, noise_disabled, reseed, set_drift_time, set_noise_level
from hf_cim.state import STATE_ATTR, AnalogState, analog_states, preserve_analog_state

IDS = torch.arange(32).reshape(2, 16) % 97


def patched_gpt2(**kw):
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode: only the analog noise varies
    return hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(noise="pcm", **kw))


def train_logits(model):
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def fields(layer):
    s = layer.hf_cim_state
    return (s.config, s.name, s.level, s.seed, s.t_inference, s.disabled, s.chip, s.chip_correction, s.generator)


def test_every_patched_layer_holds_one_state_and_the_old_attributes_forward_to_it():
    model = patched_gpt2(seed=4)
    layers = dict(analog_layers(model))
    assert [m for m, _ in analog_states(model)] == list(layers.values())
    name, layer = next(iter(layers.items()))
    state = layer.hf_cim_state
    assert isinstance(state, AnalogState) and state.name == name and state.seed == 4 and state.generator is None
    assert layer.hf_cim_config is state.config is hf_cim.patch.get_config(model)
    layer.hf_cim_level, layer.hf_cim_t_inference, layer.hf_cim_disabled = 0.5, 60.0, True
    assert (state.level, state.t_inference, state.disabled) == (0.5, 60.0, True)
    state.level = 0.25
    assert layer.hf_cim_level == 0.25
    loose = [k for k in vars(layer) if k.startswith(("hf_cim_", "_hf_cim_")) and k != STATE_ATTR]
    assert not loose  # everything is in the state object
    # the private names outside code used before the state object are gone: seed, generator and chip are read there
    assert not any(hasattr(layer, f"_hf_cim_{f}") for f in ("seed", "generator", "chip"))
    assert "hf_cim_state" not in repr(state) and "generator" not in repr(state)  # a short repr: no tensors


def test_unpatch_removes_the_state():
    model = patched_gpt2()
    train_logits(model)
    hf_cim.unpatch_model(model)
    assert not list(analog_states(model))
    assert not any(STATE_ATTR in vars(m) for m in model.modules())
    assert not hasattr(model.transformer.h[0].mlp.c_fc, "hf_cim_level")


def test_state_dict_keys_do_not_change():
    keys = list(tiny_gpt2().state_dict())
    model = patched_gpt2()
    program_chip(model, seed=1)
    train_logits(model)
    assert list(model.state_dict()) == keys


def _copies(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buf, weights_only=False),
    }


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_carry_their_own_state_and_draw_the_same_noise(how):
    model = patched_gpt2()
    train_logits(model)  # the generators exist and have advanced
    set_noise_level(model, 0.7)
    other = _copies(model)[how]
    pairs = list(zip(analog_states(model), analog_states(other)))
    for (_, a), (_, b) in pairs:
        assert a is not b and a.generator is not b.generator
        assert (a.name, a.level, a.seed) == (b.name, b.level, b.seed)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    # One config per model, shared by its layers (and the model), in the copy too.
    configs = {id(s.config) for _, s in analog_states(other)} | {id(hf_cim.patch.get_config(other))}
    assert len(configs) == 1
    assert torch.equal(train_logits(model), train_logits(other))
    program_chip(model, seed=2)
    other = _copies(model)[how]
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, other(input_ids=IDS).logits)


def test_preserve_analog_state_rewinds_the_noise_stream_bit_for_bit():
    model = patched_gpt2()
    train_logits(model)
    gens = [s.generator for _, s in analog_states(model)]
    positions = [g.get_state() for g in gens]
    expected = train_logits(model)  # what the next step draws ...
    for g, pos in zip(gens, positions):
        g.set_state(pos)  # ... rewound by hand
    with preserve_analog_state(model):
        train_logits(model)
        train_logits(model)
        reseed(model, 9)
        train_logits(model)
    assert [s.generator for _, s in analog_states(model)] == gens  # the same objects
    assert torch.equal(train_logits(model), expected)  # and the same noise as without the block


def test_preserve_analog_state_restores_everything_even_when_the_block_raises():
    model = patched_gpt2()
    set_noise_level(model, 0.5)
    set_drift_time(model, 10.0)
    program_chip(model, seed=1, t_inference=10.0)
    calibrate_chip_outputs(model, [IDS], forward=lambda m, ids: m(input_ids=ids))
    train_logits(model)
    layers = [m for _, m in analog_layers(model)]
    before = [fields(m) for m in layers]
    assert all(m.hf_cim_state.chip_correction is not None for m in layers)
    cfg = hf_cim.patch.get_config(model)
    with pytest.raises(RuntimeError, match="boom"), preserve_analog_state(model):
        program_chip(model, seed=7, t_inference=3600.0)
        set_noise_level(model, 2.0)
        reseed(model, 3)
        for m in layers:
            m.hf_cim_config = cfg.replace(gradient="full")
            m.hf_cim_disabled = True
        train_logits(model)
        raise RuntimeError("boom")
    after = [fields(m) for m in layers]
    assert all(x is y or x == y for b, a in zip(before, after) for x, y in zip(b, a))


def test_preserve_analog_state_keeps_an_unused_stream_unused_and_nests_with_noise_disabled():
    model = patched_gpt2()
    with preserve_analog_state(model):
        train_logits(model)
        with noise_disabled(model):
            assert all(s.disabled for _, s in analog_states(model))
    assert all(s.generator is None and not s.disabled for _, s in analog_states(model))
    assert all(not s.replay for _, s in analog_states(model))


def test_preserve_analog_state_on_an_unpatched_model_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 4))
    with preserve_analog_state(model) as m:
        assert m is model


# -- the layer contract: a new layer type is one registered subclass ---------------------------------------------
class RowLinear(nn.Module):
    """A plain layer hf_cim does not know: ``y = x @ W + b`` with ``W`` stored ``(in, out)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.fixture
def row_linear():
    from hf_cim.layers import LAYER_MAP, AnalogLayer, register_analog_layer

    @register_analog_layer(RowLinear)
    class NoisyRowLinear(AnalogLayer, RowLinear):
        in_dim = property(lambda self: self.weight.shape[0])

        def weight_oi(self, weight):
            return weight.t()

        def weight_from_oi(self, w_oi, weight):
            return w_oi.t()

        def to_rows(self, x):
            return x.reshape(-1, self.in_dim)

        def from_rows(self, y, x):
            return y.reshape(*x.shape[:-1], self.weight.shape[1])

        def clean_forward(self, x):
            return RowLinear.forward(self, x)

        def clean_backward(self, x, weight, grad, need_x, need_w, dtype):
            gx = (grad.to(dtype) @ weight.t().to(dtype)).to(x.dtype) if need_x else None
            gw = (self.to_rows(x).t().to(dtype) @ self.grad_rows(grad).to(dtype)).to(weight.dtype) if need_w else None
            return gx, gw

    yield NoisyRowLinear
    del LAYER_MAP[RowLinear]


def test_a_registered_layer_type_is_patched_trained_and_unpatched(row_linear):
    from hf_cim.patch import supports

    torch.manual_seed(0)
    model = nn.Sequential(RowLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    clean = model(x)
    weight = model[0].weight
    assert supports(model[0]) and supports(model[2]) and not supports(model[1])
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(noise="pcm", gradient="ste"))
    assert type(model[0]) is row_linear and model[0].weight is weight and not supports(model[0])
    assert model[0].hf_cim_state.name == "0"
    y = model(x)
    assert y.shape == clean.shape and not torch.equal(y, clean)
    with noise_disabled(model):
        assert torch.equal(model(x), clean)
    # The STE gradient of W is the clean layer's for the input it saw: gᵀ·x in the (in, out) layout.
    g = torch.randn(5, 16)
    model[0].train()
    w_grad = torch.autograd.grad(model[0](x), weight, g)[0]
    torch.testing.assert_close(w_grad, x.t() @ g)
    program_chip(model, seed=1)
    model.eval()
    hf_cim.unpatch_model(model)
    assert type(model[0]) is RowLinear and torch.equal(model(x), clean)


def test_supports_answers_for_the_built_in_types():
    from transformers.pytorch_utils import Conv1D

    from hf_cim.patch import supports

    assert supports(nn.Linear(2, 3)) and supports(Conv1D(3, 2)) and supports(nn.Conv2d(2, 4, 3))
    assert not supports(nn.Conv2d(2, 4, 3, groups=2))  # patch_model names it in its error instead
    assert not supports(nn.LayerNorm(3)) and not supports(nn.Embedding(3, 2))

    class MyLinear(nn.Linear):  # exact types only: a subclass may have its own forward
        pass

    assert not supports(MyLinear(2, 3))
    with pytest.raises(ValueError, match="grouped Conv2d"):
        hf_cim.patch_model(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), hf_cim.AnalogNoiseConfig())


def test_register_analog_layer_refuses_an_incomplete_or_second_class(row_linear):
    from hf_cim.layers import AnalogLayer, register_analog_layer

    with pytest.raises(TypeError, match=r"does not define \['clean_backward', 'from_rows'"):

        @register_analog_layer(nn.Bilinear)
        class Half(AnalogLayer, nn.Bilinear):
            in_dim = 1

            def weight_oi(self, weight):
                return weight

            def weight_from_oi(self, w_oi, weight):
                return w_oi

            def to_rows(self, x):
                return x

            def clean_forward(self, x):
                return x

    with pytest.raises(TypeError, match="must subclass both AnalogLayer and Bilinear"):
        register_analog_layer(nn.Bilinear)(row_linear)
    with pytest.raises(ValueError, match="already has the analog class NoisyRowLinear"):
        register_analog_layer(RowLinear)(type("Other", (row_linear,), {}))
