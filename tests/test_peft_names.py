"""hf_cim.peft_names: a peft model's base modules under the names of the bare model, adapters left out."""

import torch
from helpers import tiny_gpt2

from hf_cim.peft_names import named_base_modules


def test_without_peft_it_is_named_modules_without_the_root():
    model = tiny_gpt2()
    assert [(n, m) for n, m in named_base_modules(model)] == [(n, m) for n, m in model.named_modules() if n]


def test_a_peft_model_gives_the_bare_names_and_no_adapter():
    peft = __import__("pytest").importorskip("peft")
    bare = tiny_gpt2()
    bare_names = [n for n, _ in bare.named_modules() if n]
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    names = [n for n, _ in named_base_modules(model)]
    # the wrappers (base_model.model., .base_layer) are dropped: a tuner layer and its base share the bare name
    assert set(names) == set(bare_names)
    assert not any("lora" in n for n in names)
    c_attn = dict(named_base_modules(model))["transformer.h.0.attn.c_attn"]
    assert type(c_attn).__name__ == "Conv1D" and isinstance(c_attn.weight, torch.nn.Parameter)
