"""LoRA on an analog base (AHWA-LoRA): noisy frozen base, digital trained adapters, both orders, save/reload."""

import os

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_training_args
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, Trainer

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.layers import AnalogLayerMixin
from hf_cim.noise import GaussianWeightNoise, OutputNoise

CASES = {
    "gpt2": (lambda: tiny_gpt2(), ["c_attn"], ["lm_head"], True),
    "bert": (lambda: tiny_bert(), ["query", "value"], ["classifier"], False),
}


def _config(exclude):
    return AnalogNoiseConfig(
        noise=[GaussianWeightNoise(std=0.05), OutputNoise(std=0.05)], seed=2, exclude_modules=exclude
    )


def _lora(targets, fan_in_fan_out):
    # no modules_to_save: the BERT head stays as it is (frozen), so that only LoRA weights train
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False
    )


def _build(arch, order):
    build, targets, exclude, fifo = CASES[arch]
    cfg = _config(exclude)
    if order == "patch-then-peft":
        return get_peft_model(hf_cim.patch_model(build(), cfg), _lora(targets, fifo)), cfg
    model = get_peft_model(build(), _lora(targets, fifo))
    return hf_cim.patch_model(model, cfg), cfg


def _inputs():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model, x, seed=9):
    hf_cim.reseed(model, seed)
    with torch.no_grad():
        return model(input_ids=x).logits


ORDERS = ["patch-then-peft", "peft-then-patch"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("arch", list(CASES))
def test_noisy_frozen_base_digital_adapters(arch, order):
    model, cfg = _build(arch, order)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    modules = dict(model.named_modules())
    adapters = [m for n, m in modules.items() if ".lora_A." in n or ".lora_B." in n]
    assert adapters and all(type(m) is nn.Linear for m in adapters)  # digital
    bases = [m for n, m in modules.items() if n.endswith(".base_layer")]
    assert bases and all(isinstance(m, AnalogLayerMixin) for m in bases)  # noisy
    names = sorted(layer.hf_cim_name for _, layer in hf_cim.patch.analog_layers(model))
    assert not any("base_model" in n or "base_layer" in n or "lora" in n for n in names)
    assert hf_cim.patch.get_config(model) == cfg
    model.eval()
    x = _inputs()
    y = _logits(model, x)
    with hf_cim.noise_disabled(model):
        y_clean = _logits(model, x)
    assert not torch.allclose(y, y_clean)  # the base is analog
    assert torch.equal(y, _logits(model, x))  # same seed, same noise


@pytest.mark.parametrize("arch", list(CASES))
def test_both_orders_give_the_same_analog_model(arch):
    first, _ = _build(arch, ORDERS[0])
    second, _ = _build(arch, ORDERS[1])
    second.load_state_dict(first.state_dict())
    names = [sorted(lay.hf_cim_name for _, lay in hf_cim.patch.analog_layers(m)) for m in (first, second)]
    assert names[0] == names[1]
    x = _inputs()
    assert torch.equal(_logits(first.eval(), x), _logits(second.eval(), x))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=10):
        self.ids = torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_adapters_only_then_save_and_reload(tmp_path):
    # the recommended order: load the base through the quantizer, then attach LoRA
    tiny_gpt2().save_pretrained(tmp_path / "base")
    cfg = _config(["lm_head"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=cfg)
    model = get_peft_model(base, _lora(["c_attn"], True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = tiny_training_args(tmp_path / "out")
    Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert len(changed) == sum(p.requires_grad for p in model.parameters())

    model.save_pretrained(tmp_path / "adapter")
    hf_cim.hub.save_noise_config(model, tmp_path / "adapter")
    x = _inputs()
    expected = _logits(model.eval(), x)

    # reload, order 1: the base through the quantizer with the saved noise config, then the adapters
    loaded_cfg = hf_cim.hub.load_noise_config(tmp_path / "adapter")
    assert loaded_cfg == cfg
    base1 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=loaded_cfg)
    again1 = PeftModel.from_pretrained(base1, tmp_path / "adapter")
    assert torch.equal(_logits(again1.eval(), x), expected)

    # reload, order 2: plain base + adapters, then patch: the same analog model
    base2 = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    again2 = hf_cim.patch_model(PeftModel.from_pretrained(base2, tmp_path / "adapter"), loaded_cfg)
    assert torch.equal(_logits(again2.eval(), x), expected)


def test_bert_adapter_push_folder_holds_noise_config(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sorted(os.listdir(kw["folder_path"])))
    model, cfg = _build("bert", "patch-then-peft")
    files = hf_cim.hub.push_to_hub(model, "me/bert-lora", save_directory=tmp_path)
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "hf_cim_config.json"]
    assert hf_cim.hub.load_noise_config(tmp_path) == cfg
    card = (tmp_path / "README.md").read_text()
    assert 'config = hf_cim.hub.load_noise_config("me/bert-lora")' in card
    assert 'PeftModel.from_pretrained(base, "me/bert-lora")' in card and "BertForSequenceClassification" in card
    base = hf_cim.patch_model(tiny_bert(), hf_cim.hub.load_noise_config(tmp_path))
    again = PeftModel.from_pretrained(base, tmp_path)
    x = _inputs()
    assert torch.equal(_logits(again.eval(), x), _logits(model.eval(), x))


def test_adapter_folder_reloads_analog_with_load_peft(tmp_path):
    """AutoPeftModelFor*.from_pretrained(adapter_dir) over a plain base gives a digital base (peft reads only
    adapter_config.json); hf_cim.peft_utils.load_peft(adapter_dir) gives the analog one, equal to the saved model."""
    from peft import AutoPeftModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path / "base")  # a plain (digital) base checkpoint
    cfg = _config(["lm_head"])
    base = hf_cim.patch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), cfg)
    model = get_peft_model(base, _lora(["c_attn"], True))
    model.save_pretrained(tmp_path / "adapter")
    hf_cim.hub.save_noise_config(model, tmp_path / "adapter")
    x = _inputs()

    plain = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert not list(hf_cim.patch.analog_layers(plain))  # peft's own loader: the digital base, silently

    again = hf_cim.peft_utils.load_peft(tmp_path / "adapter")
    assert isinstance(again, PeftModel)  # no task_type in the LoraConfig: AutoPeftModel
    assert hf_cim.patch.get_config(again.get_base_model()) == cfg
    assert [n for n, _ in hf_cim.patch.analog_layers(again)] == [n for n, _ in hf_cim.patch.analog_layers(model)]
    for m in (model, again):
        m.eval()
        hf_cim.program_chip(m, seed=3)
    assert torch.equal(_logits(again, x), _logits(model, x))  # the same chip, the same adapters
    with hf_cim.noise_disabled(again), hf_cim.noise_disabled(plain):
        assert torch.equal(_logits(again, x), _logits(plain.eval(), x))  # same weights, digital

    # no noise config anywhere: an error, not a digital model
    (tmp_path / "adapter" / "hf_cim_config.json").unlink()
    with pytest.raises(ValueError, match="no noise config"):
        hf_cim.peft_utils.load_peft(tmp_path / "adapter")


def test_static_dac_ranges_calibrate_through_a_peft_model():
    """Ranges are keyed by the base layers' bare names (the names patch_model gives them), so a peft model patched
    with a static DAC calibrates and runs."""
    from hf_cim.calibration import calibrate_input_ranges

    build, targets, exclude, fifo = CASES["gpt2"]
    model = get_peft_model(build(), _lora(targets, fifo))
    hf_cim.patch_model(model, AnalogNoiseConfig(input_quant="static", seed=2, exclude_modules=exclude))
    x = _inputs()
    ranges = calibrate_input_ranges(model, [x], forward=lambda m, b: m(input_ids=b))
    names = {layer.hf_cim_name for _, layer in hf_cim.patch.analog_layers(model)}
    assert set(ranges) == names and not any(n.startswith("base_model") for n in names)
    assert torch.isfinite(_logits(model, x)).all()
