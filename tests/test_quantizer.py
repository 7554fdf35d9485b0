"""transformers integration: quant_method "hf_cim" — save, reload, fallback, Trainer, safety (no pickle)."""

import json
import logging
import os
import pickle
import time

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_training_args
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.noise import GaussianWeightNoise, OutputNoise

MODELS = {
    "gpt2": (tiny_gpt2, AutoModelForCausalLM),
    "bert": (tiny_bert, AutoModelForSequenceClassification),
}


def _config(**kw):
    base = dict(noise=[GaussianWeightNoise(std=0.05), OutputNoise(std=0.05)], seed=11, tile_size=32)
    base.update(kw)
    return AnalogNoiseConfig(**base)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 97, (2, 12), generator=g)


def _keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _layers(model):
    return {name: type(m).__name__ for name, m in hf_cim.patch.analog_layers(model)}


def test_registered_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_cim"] is AnalogNoiseConfig
    assert AUTO_QUANTIZER_MAPPING["hf_cim"] is hf_cim.quantizer.AnalogHfQuantizer
    q = hf_cim.quantizer.AnalogHfQuantizer(_config())
    assert q.is_trainable is True and q.is_qat_trainable is True and q.is_serializable() is True
    with pytest.raises(TypeError, match="`quantization_config`"):
        hf_cim.quantizer.AnalogHfQuantizer({"quant_method": "hf_cim"})


@pytest.mark.parametrize("arch", list(MODELS), ids=list(MODELS))
def test_patched_save_reload_round_trip(tmp_path, arch):
    build, auto = MODELS[arch]
    plain = build()
    plain.save_pretrained(tmp_path / "plain")
    model = hf_cim.patch_model(build(), _config())
    model.save_pretrained(tmp_path / "analog")

    # ordinary safetensors, same keys as the plain model; the noise config inside config.json
    assert _keys(tmp_path / "analog") == _keys(tmp_path / "plain")
    saved = json.loads((tmp_path / "analog" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "hf_cim"
    assert AnalogNoiseConfig.from_dict(saved["quantization_config"]) == _config()

    back = auto.from_pretrained(tmp_path / "analog")
    assert hf_cim.patch.get_config(back) == _config()
    assert _layers(back) == _layers(model) and len(_layers(back)) > 0
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    x = _inputs()
    model.eval(), back.eval(), plain.eval()
    with torch.no_grad():
        hf_cim.reseed(model, 5)
        hf_cim.reseed(back, 5)
        y_model, y_back = model(x).logits, back(x).logits
        assert torch.equal(y_model, y_back)  # same seed, same noise
        with hf_cim.noise_disabled(back):
            y_clean = back(x).logits
        assert torch.equal(y_clean, plain(x).logits)  # exact digital forward
        assert not torch.allclose(y_back, y_clean)  # and the loaded model really is noisy


def test_tied_weights_stay_tied(tmp_path):
    model = hf_cim.patch_model(tiny_gpt2(), _config())
    assert type(model.lm_head).__name__ == "NoisyLinear"
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back.lm_head).__name__ == "NoisyLinear"
    assert back.lm_head.weight is back.transformer.wte.weight


def test_from_pretrained_with_quantization_config_patches(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "plain")
    cfg = _config(exclude_modules=["classifier"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", quantization_config=cfg)
    layers = _layers(model)
    assert "bert.encoder.layer.0.attention.self.query" in layers and "classifier" not in layers
    assert len(layers) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    assert model.is_quantized and isinstance(model.hf_quantizer, hf_cim.quantizer.AnalogHfQuantizer)
    assert hf_cim.patch.get_config(model) == cfg and model.config.quantization_config is hf_cim.patch.get_config(model)
    # save → reload gives the same analog model
    model.save_pretrained(tmp_path / "analog")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "analog")
    assert _layers(back) == layers and hf_cim.patch.get_config(back) == cfg
    # dequantize() = unpatch_model: the digital model, no quantization config left
    back.dequantize()
    assert not list(hf_cim.patch.analog_layers(back)) and not back.is_quantized
    assert not hasattr(back.config, "quantization_config")


def test_unpatch_removes_config_from_checkpoint(tmp_path):
    model = hf_cim.patch_model(tiny_gpt2(), _config())
    hf_cim.unpatch_model(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_plain_transformers_loads_clean_model_with_warning(tmp_path, monkeypatch):
    model = hf_cim.patch_model(tiny_gpt2(), _config())
    model.save_pretrained(tmp_path)
    x = _inputs()
    with torch.no_grad(), hf_cim.noise_disabled(model):
        expected = model.eval()(x).logits
    # transformers as it is without hf_cim: no "hf_cim" quant method registered
    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "hf_cim")
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "hf_cim")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    auto_logger = logging.getLogger("transformers.quantizers.auto")
    auto_logger.addHandler(handler)
    try:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        auto_logger.removeHandler(handler)
    assert any("Unknown quantization type, got hf_cim" in r.getMessage() for r in records)
    assert not list(hf_cim.patch.analog_layers(plain)) and not getattr(plain, "is_quantized", False)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D" and type(plain.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(plain(x).logits, expected)  # the clean digital model


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 97, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_model_loaded_through_quantizer(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=_config())
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    args = tiny_training_args(tmp_path / "out")
    Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "NoisyConv1D"
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, before)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"level": -1.0}, "`level`"),
        ({"weight_bits": 40}, "`weight_bits`"),
        ({"gradient": "magic"}, "`gradient`"),
        ({"noise": [{"name": "gaussian_weight", "std": 0.1, "sigma_typo": 1}]}, "sigma_typo"),
        ({"noise": [{"name": "no_such_noise"}]}, "no_such_noise"),
        ({"hf_cim_config_version": 99}, "hf_cim_config_version"),
        ({"target_modules": "(c_attn"}, "`target_modules` is not a valid regex"),
        ({"exclude_modules": "(.|.)*Z"}, "`exclude_modules` regex .* repeats an alternation"),
        ({"exclude_modules": "(a+)+$"}, "`exclude_modules` regex .* nested quantifier"),
        ({"tile_size": 32.5}, "`tile_size`"),
    ],
    ids=[
        "level",
        "weight_bits",
        "gradient",
        "noise-field",
        "noise-name",
        "version",
        "bad-regex",
        "hostile-regex",
        "nested-quantifier",
        "fractional-int",
    ],
)
def test_bad_config_json_raises_naming_the_field(tmp_path, change, match):
    hf_cim.patch_model(tiny_gpt2(), _config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises((ValueError, TypeError), match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_tampered_regex_fails_before_the_weights_load(tmp_path, monkeypatch):
    hf_cim.patch_model(tiny_gpt2(), _config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["exclude_modules"] = "(.|.)*Z"  # exponential backtracking on any module name
    path.write_text(json.dumps(data))
    loaded = []
    monkeypatch.setattr(
        hf_cim.quantizer.AnalogHfQuantizer, "_process_model_after_weight_loading", lambda *a, **k: loaded.append(1)
    )
    start = time.perf_counter()
    with pytest.raises(ValueError, match="`exclude_modules`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5.0 and not loaded


def test_a_config_made_invalid_in_place_fails_before_the_weights_load(tmp_path, monkeypatch):
    tiny_gpt2().save_pretrained(tmp_path)
    cfg = _config()
    object.__setattr__(cfg.noise[0], "std", -1.0)  # behind the assignment check's back
    loaded = []
    monkeypatch.setattr(
        hf_cim.quantizer.AnalogHfQuantizer, "_process_model_after_weight_loading", lambda *a, **k: loaded.append(1)
    )
    with pytest.raises(ValueError, match=r"`noise\[0\]`.*`std`"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    assert not loaded


def test_config_json_with_integral_floats_loads(tmp_path):
    cfg = _config(input_slice_bits=2)
    hf_cim.patch_model(tiny_gpt2(), cfg).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    q = data["quantization_config"]
    for key in ("tile_size", "seed", "input_bits", "weight_bits", "output_bits", "input_slice_bits"):
        q[key] = float(q[key])  # as JSON tools that keep every number as a double write them
    path.write_text(json.dumps(data))
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf_cim.patch.get_config(back) == cfg and isinstance(hf_cim.patch.get_config(back).tile_size, int)


def test_unknown_config_json_field_warns(tmp_path, caplog):
    hf_cim.patch_model(tiny_gpt2(), _config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["future_knob"] = 3
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="hf_cim.config"):
        back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "future_knob" in caplog.text
    assert hf_cim.patch.get_config(back) == _config()


def test_no_pickle_in_save_or_load(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    model = hf_cim.patch_model(tiny_gpt2(), _config())
    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(torch, "save", refuse)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf_cim.patch.get_config(back) == _config()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
