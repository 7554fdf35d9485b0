"""Every built-in noise model: registry, serialisation round trip, determinism, no graph in the ste modes."""

import dataclasses
import json

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2
from torch import nn

import hf_cim
from hf_cim.noise import (
    NoiseModel,
    get_noise_model_class,
    list_noise_models,
    noise_model_from_dict,
    register_noise_model,
)

# One model per registered built-in: a model that joins the registry joins every test below. Non-default fields, so
# that the round trip is not trivially the defaults; ir_drop strong enough to be seen.
NON_DEFAULT = {
    "gaussian_weight": [dict(std=0.05, per_channel=False)],
    "lognormal": [dict(std=0.2, mean_corrected=True)],
    "output_noise": [dict(std=0.1)],
    "read_noise": [dict(std=0.03, shape="constant"), dict(std=0.03, shape="pcm")],
    "pcm": [dict(g_max=20.0, prog_coeff=(0.3, 2.0, -1.0), drift_compensation=False)],
    "reram": [dict(g_max=30.0, clip_max=1.2)],
    "stuck_at": [dict(p_off=0.02, p_on=0.01)],
    "ir_drop": [dict(scale=3.0, g_ratio=1e3, column_current="mean")],
    "thermal": [dict(alpha_t=-2e-3, t_std=3.0, bandwidth=1e9)],
}


def _builtin_names():
    """The registered models that ship with hf_cim (models that tests register themselves are left out)."""
    return [n for n in list_noise_models() if get_noise_model_class(n).__module__.startswith("hf_cim.")]


MODELS = [get_noise_model_class(name)(**fields) for name in _builtin_names() for fields in NON_DEFAULT.get(name, [{}])]
IDS = [f"{m.name}-{i}" for i, m in enumerate(MODELS)]
BUILTIN = [
    "gaussian_weight",
    "ir_drop",
    "lognormal",
    "output_noise",
    "pcm",
    "read_noise",
    "reram",
    "stuck_at",
    "thermal",
]


def test_the_catalogue_is_the_registry():
    assert sorted({m.name for m in MODELS}) == _builtin_names()
    assert set(NON_DEFAULT) <= set(_builtin_names()), "NON_DEFAULT names a model that is not registered"
    for model in MODELS:  # non-default where fields were given
        assert model != type(model)() or model.name not in NON_DEFAULT


def test_every_builtin_is_registered():
    assert set(BUILTIN) <= set(hf_cim.list_noise_models())
    for name in BUILTIN:
        assert get_noise_model_class(name).name == name


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_serialisation_round_trip(model):
    data = model.to_dict()
    assert data["name"] == model.name
    again = noise_model_from_dict(json.loads(json.dumps(data)))
    assert again == model and type(again) is type(model)
    cfg = hf_cim.AnalogNoiseConfig(noise=[model])
    assert hf_cim.AnalogNoiseConfig.from_json_string(cfg.to_json_string()) == cfg


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown noise model 'nope'; registered: .*ir_drop.*pcm.*thermal"):
        noise_model_from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="'pcm' is already registered"):

        @register_noise_model("pcm")
        @dataclasses.dataclass
        class Other(NoiseModel):
            pass

    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sigma'\]"):
        noise_model_from_dict({"name": "pcm", "sigma": 1.0})


def _run(model_factory, noise, seed, gradient="ste", t_inference=0.0):
    model = model_factory()
    cfg = hf_cim.AnalogNoiseConfig(noise=[noise], seed=seed, gradient=gradient, tile_size=32, level=1.0)
    hf_cim.patch_model(model, cfg)
    for _, layer in hf_cim.patch.analog_layers(model):
        layer.hf_cim_t_inference = t_inference
    return model, _forward(model)


def tiny_conv2d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 10)
    )


def _forward(model):
    if isinstance(model, nn.Sequential):  # tiny_conv2d: 27 and 144 (> one 32-row tile) inputs per output pixel
        return model(torch.linspace(-1.0, 1.0, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4))
    ids = torch.arange(2 * 16).reshape(2, 16) % 97
    return model(input_ids=ids).logits


@pytest.mark.parametrize("model_factory", [tiny_gpt2, tiny_bert, tiny_conv2d], ids=["gpt2", "bert", "conv2d"])
@pytest.mark.parametrize("noise", MODELS, ids=IDS)
def test_deterministic_given_the_seed_and_noisy(model_factory, noise):
    _, a = _run(model_factory, noise, seed=1, t_inference=3600.0)
    _, b = _run(model_factory, noise, seed=1, t_inference=3600.0)
    assert torch.equal(a, b)
    if noise.name != "ir_drop":  # the only deterministic model: no seed dependence at all
        _, c = _run(model_factory, noise, seed=2, t_inference=3600.0)
        assert not torch.equal(a, c)
    model, _ = _run(model_factory, noise, seed=1)
    with hf_cim.noise_disabled(model):
        clean = _forward(model)
    assert not torch.equal(a, clean)


@pytest.mark.parametrize("noise", MODELS, ids=IDS)
def test_ste_builds_no_graph_through_the_noise(noise):
    model, logits = _run(tiny_gpt2, noise, seed=0)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "AnalogSTEFunctionBackward"
    # The only graph inputs are x and the layer's Parameters (no noise-model intermediate).
    leaves = {id(fn.variable) for fn, _ in y.grad_fn.next_functions if fn is not None and hasattr(fn, "variable")}
    assert leaves <= {id(x), id(layer.weight), id(layer.bias)}
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, layer.weight.shape[1]) @ layer.weight.t())


@pytest.mark.parametrize("noise", MODELS, ids=IDS)
def test_full_mode_gives_finite_gradients(noise):
    model, logits = _run(tiny_gpt2, noise, seed=0, gradient="full")
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
