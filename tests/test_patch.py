import math

import pytest
import torch
import transformers as tf
from helpers import tiny_bert, tiny_gpt2
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.layers import LAYER_MAP, AnalogLayerMixin


def _count_linear_like(model):
    return sum(type(m) in LAYER_MAP for m in model.modules())


def _text_input(model):
    return {"input_ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))}


ARCHS = {
    "bert": (lambda: tiny_bert(), _text_input),
    "gpt2": (lambda: tiny_gpt2(), _text_input),
    "llama": (
        lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=97,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
        _text_input,
    ),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=97,
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=64,
            )
        ),
        _text_input,
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=97, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
        lambda m: {**_text_input(m), "decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)},
    ),
    "distilbert": (
        lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=97, dim=64, hidden_dim=128, n_layers=2, n_heads=2)
        ),
        _text_input,
    ),
    "vit": (
        lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=16,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        ),
        lambda m: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))},
    ),
    "resnet": (
        lambda: tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
        ),
        lambda m: {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))},
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_patch_coverage_and_exact_digital_forward(arch):
    build, inputs = ARCHS[arch]
    torch.manual_seed(0)
    model = build().eval()
    batch = inputs(model)
    n = _count_linear_like(model)
    keys = list(model.state_dict())
    params = {id(p) for p in model.parameters()}
    with torch.no_grad():
        ref = model(**batch)[0]
    hf_cim.patch_model(model, AnalogNoiseConfig())
    patched = [m for m in model.modules() if isinstance(m, AnalogLayerMixin)]
    assert len(patched) == n > 0
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == params
    with torch.no_grad():
        noisy = model(**batch)[0]
        with hf_cim.noise_disabled(model):
            clean = model(**batch)[0]
    assert torch.equal(clean, ref)
    assert not torch.allclose(noisy, ref, atol=1e-5)
    hf_cim.unpatch_model(model)
    assert _count_linear_like(model) == n
    assert not any(isinstance(m, AnalogLayerMixin) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch)[0], ref)


def test_gpt2_conv1d_are_patched_and_tied_head_stays_tied():
    model = tiny_gpt2()
    hf_cim.patch_model(model, AnalogNoiseConfig())
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "NoisyConv1D"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.lm_head, AnalogLayerMixin)


def test_all_linear_leaves_the_output_embedding_alone():
    model = tiny_gpt2()
    hf_cim.patch_model(model, AnalogNoiseConfig(target_modules="all-linear"))
    assert not isinstance(model.lm_head, AnalogLayerMixin)
    assert isinstance(model.transformer.h[1].mlp.c_proj, AnalogLayerMixin)


def test_target_and_exclude_semantics():
    model = tiny_gpt2()
    hf_cim.patch_model(
        model, AnalogNoiseConfig(target_modules=["c_attn", "mlp.c_fc"], exclude_modules=["h.1.attn.c_attn"])
    )
    names = {n for n, _ in hf_cim.patch.analog_layers(model)}
    assert names == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    hf_cim.unpatch_model(model)
    hf_cim.patch_model(model, AnalogNoiseConfig(target_modules=r".*\.h\.0\..*"))
    assert {n for n, _ in hf_cim.patch.analog_layers(model)} == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_modules": ["c_attn", "query"]}, "entry 'query' matches no module"),
        ({"target_modules": r"bert\..*"}, "regex.*matches no linear-like layer"),
        ({"target_modules": ["ln_1"]}, "matches only unsupported modules"),
        ({"exclude_modules": ["classifier"]}, "`exclude_modules` entry 'classifier' matches no module"),
        ({"target_modules": ["lm_head"], "exclude_modules": ["lm_head"]}, "leaves no layer"),
    ],
)
def test_bad_targets_raise_and_change_nothing(kwargs, match):
    model = tiny_gpt2()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        hf_cim.patch_model(model, AnalogNoiseConfig(**kwargs))
    assert [type(m) for m in model.modules()] == before
    assert hf_cim.patch.get_config(model) is None


def test_patching_twice_is_an_error_and_leaves_the_first_patch():
    model = tiny_gpt2()
    cfg = AnalogNoiseConfig(seed=1)
    hf_cim.patch_model(model, cfg)
    with pytest.raises(ValueError, match="already patched"):
        hf_cim.patch_model(model, AnalogNoiseConfig(seed=2))
    assert hf_cim.patch.get_config(model) is cfg
    assert all(m.hf_cim_config is cfg for _, m in hf_cim.patch.analog_layers(model))


def test_grouped_conv_is_refused_with_a_hint():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="grouped Conv2d.*exclude_modules"):
        hf_cim.patch_model(model, AnalogNoiseConfig())
    hf_cim.patch_model(model, AnalogNoiseConfig(exclude_modules=["0"]))
    assert isinstance(model[1], AnalogLayerMixin) and not isinstance(model[0], AnalogLayerMixin)


def test_bad_arguments():
    with pytest.raises(TypeError, match="`config`"):
        hf_cim.patch_model(tiny_gpt2(), {"gradient": "ste"})
    with pytest.raises(ValueError, match="no linear-like layer"):
        hf_cim.patch_model(nn.Sequential(nn.ReLU()), AnalogNoiseConfig())
    with pytest.raises(ValueError, match="`level`"):
        hf_cim.set_noise_level(tiny_gpt2(), -1.0)


@pytest.mark.parametrize("mode", ["ste", "ste_detach", "full"])
def test_training_a_tiny_gpt2_with_noise_lowers_the_loss(mode):
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cim.patch_model(
        model,
        AnalogNoiseConfig(
            gradient=mode, noise=[{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.05}]
        ),
    )
    model.train()
    gen = torch.Generator().manual_seed(0)
    # A learnable sequence: repeating patterns.
    base = torch.randint(0, 97, (8, 8), generator=gen)
    data = base.repeat(1, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(isinstance(m, Conv1D) for m in [model.transformer.h[0].attn.c_attn])


# -- issue 13: bad input and faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exclude",
    [["transformer.h.0"], ["h.0"], r"transformer\.h\.0", ["transformer.h.0.attn"]],
    ids=["parent-name", "parent-suffix", "parent-regex", "attn-block"],
)
def test_excluding_a_parent_module_excludes_its_subtree(exclude):
    model = tiny_gpt2()
    hf_cim.patch_model(model, AnalogNoiseConfig(exclude_modules=exclude))
    names = {n for n, _ in hf_cim.patch.analog_layers(model)}
    prefix = (
        "transformer.h.0.attn." if isinstance(exclude, list) and exclude[0].endswith("attn") else "transformer.h.0."
    )
    assert names and not any(n.startswith(prefix) for n in names)
    assert "transformer.h.1.attn.c_attn" in names and "lm_head" in names
    all_linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert names == {n for n in all_linear if not n.startswith(prefix)}


@pytest.mark.parametrize(
    "exclude, match",
    [
        (["ln_f"], "`exclude_modules` entry 'ln_f' excludes no linear-like layer"),
        (["wte"], "`exclude_modules` entry 'wte' excludes no linear-like layer"),
        (r".*\.ln_\d", "`exclude_modules` regex .* excludes no linear-like layer"),
        (["no_such"], "`exclude_modules` entry 'no_such' matches no module"),
    ],
)
def test_an_exclude_that_excludes_nothing_is_an_error(exclude, match):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=match):
        hf_cim.patch_model(model, AnalogNoiseConfig(exclude_modules=exclude))
    assert hf_cim.patch.get_config(model) is None and not list(hf_cim.patch.analog_layers(model))


def test_empty_exclude_list_excludes_nothing():
    a, b = tiny_gpt2(), tiny_gpt2()
    hf_cim.patch_model(a, AnalogNoiseConfig(exclude_modules=[]))
    hf_cim.patch_model(b, AnalogNoiseConfig())
    assert [n for n, _ in hf_cim.patch.analog_layers(a)] == [n for n, _ in hf_cim.patch.analog_layers(b)]


def test_patching_twice_on_disjoint_targets_is_an_error():
    model = tiny_gpt2()
    first = AnalogNoiseConfig(target_modules=["c_attn"])
    hf_cim.patch_model(model, first)
    before = {n: m for n, m in hf_cim.patch.analog_layers(model)}
    with pytest.raises(ValueError, match=r"already patched.*one config per model.*unpatch_model"):
        hf_cim.patch_model(model, AnalogNoiseConfig(target_modules=["c_fc"], seed=3))
    assert {n: m for n, m in hf_cim.patch.analog_layers(model)} == before
    assert hf_cim.patch.get_config(model) is first and model.config.quantization_config is first
    # A submodule patched on its own counts too: its layers would be saved without a config.
    model = tiny_gpt2()
    hf_cim.patch_model(model.transformer.h[0], AnalogNoiseConfig())
    with pytest.raises(ValueError, match="already patched"):
        hf_cim.patch_model(model, AnalogNoiseConfig(exclude_modules=["h.0"]))


def test_a_config_mutated_after_patching_is_validated():
    model = tiny_gpt2()
    cfg = AnalogNoiseConfig()
    hf_cim.patch_model(model, cfg)
    with pytest.raises(ValueError, match="`weight_bits`"):
        cfg.weight_bits = 0
    with pytest.raises(ValueError, match="`weight_bits`"):
        cfg.update(weight_bits=1)
    ids = torch.randint(0, 97, (1, 8))
    assert torch.isfinite(model(ids).logits).all()  # the layers still compute with the valid config


def test_patch_model_checks_noise_models_mutated_in_place():
    # Changes no assignment check sees: a field set behind the model's back, an item appended to the list.
    cfg = AnalogNoiseConfig(noise=[{"name": "gaussian_weight", "std": 0.02}])
    object.__setattr__(cfg.noise[0], "std", -1.0)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"`noise\[0\]`.*`std` must be in \[0.0, 10.0\]"):
        hf_cim.patch_model(model, cfg)
    cfg = AnalogNoiseConfig(noise=[])
    cfg.noise.append({"name": "no_such_noise"})
    with pytest.raises(ValueError, match=r"`noise\[0\]`.*no_such_noise"):
        hf_cim.patch_model(model, cfg)
    assert not list(hf_cim.patch.analog_layers(model))


def test_set_drift_time_puts_drift_into_the_training_forward():
    """Training at a drift time draws each device as a chip of that age: ``w·((t + t0)/t0)^(-ν)`` with the device's
    own exponent, the same ``ν`` at every time (same stream), checked column by column through the layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    w = model[0].weight.detach().clone()
    pcm = hf_cim.noise.PCMNoise(prog_noise_scale=0.0, read_noise_scale=0.0, drift_compensation=False)
    cfg = AnalogNoiseConfig(noise=[pcm], input_bits=None, output_bits=None, weight_bits=None, tile_size=None, seed=0)
    hf_cim.patch_model(model, cfg)
    model.train()
    eye = torch.eye(16)  # row j of the output is column j of the weights the forward used
    day, year = 86400.0, 365.25 * 86400.0
    used = {}
    for t in (0.0, day, year):
        hf_cim.set_drift_time(model, t)
        assert model[0].hf_cim_t_inference == t
        hf_cim.reseed(model, 0)
        used[t] = model(eye).detach().T
    torch.testing.assert_close(used[0.0], w)  # no drift at t = 0
    log_day = torch.log(used[day] / w)
    log_year = torch.log(used[year] / w)
    assert (log_year < log_day).all() and (log_day < 0).all()  # every device drifts down, further after a year
    expected = math.log((year + pcm.t0) / pcm.t0) / math.log((day + pcm.t0) / pcm.t0)
    torch.testing.assert_close(log_year / log_day, torch.full_like(w, expected), rtol=1e-4, atol=0)
    for bad in (-1.0, float("inf"), float("nan"), True, "1y"):
        with pytest.raises(ValueError, match="t_inference"):
            hf_cim.set_drift_time(model, bad)
