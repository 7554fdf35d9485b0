"""PEFT on an analog base: which modules of a peft model are the base (analog) and which are adapters (digital).

The AHWA-LoRA use case (arXiv 2411.17367): the pretrained base runs on the analog chip, noisy and frozen; the LoRA
adapters run digitally and are the only trained weights. Both orders work:

* ``patch_model`` then ``get_peft_model`` (recommended): the base layers are patched while they are still plain
  modules; peft then wraps each patched layer as its ``base_layer`` and adds plain ``nn.Linear`` adapters.
* ``get_peft_model`` then ``patch_model``: target selection skips every adapter module (the children of a peft
  tuner layer other than its ``base_layer``), so only the base layers become analog.

Either way, patched layers are named as in the bare model (``transformer.h.0.attn.c_attn``, not
``base_model.model.transformer.h.0.attn.c_attn.base_layer``): the same ``target_modules`` / ``exclude_modules`` apply
and each layer draws the same noise stream (its generator is seeded from the layer name) in both orders.

peft is imported only if the user already imported it: a model cannot hold peft modules otherwise.

Reloading: an adapter folder holds no ``config.json`` of the base, so the noise config travels in
``hf_cim_config.json`` (:func:`hf_cim.hub.save_noise_config`). peft's ``AutoPeftModelFor*.from_pretrained(folder)``
reads only ``adapter_config.json`` and loads the base as it was saved, which for a plain base (``"gpt2"``) is the
**digital** model, silently. :func:`load_peft` loads it analog; so does
``AutoPeftModelFor*.from_pretrained(folder, quantization_config=hf_cim.hub.load_noise_config(folder))``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .hub import load_noise_config
from .patch import get_config
from .peft_names import named_base_modules

__all__ = ["load_peft", "named_base_modules"]

#: peft task type → its AutoPeftModel class name (peft.auto).
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def load_peft(
    adapter_dir: str | os.PathLike, auto_class: Any = None, *, noise_config: Any = None, **kwargs: Any
) -> nn.Module:
    """Load peft adapters trained on an analog base, with the base analog again (a peft model).

    ``AutoPeftModelFor*.from_pretrained(adapter_dir)`` alone gives a digital base when the base checkpoint is a
    plain one; this reads the noise config next to the adapters (``hf_cim_config.json``, or the base's own
    ``quantization_config``) and passes it to the base's ``from_pretrained`` as ``quantization_config``.

    Args:
        adapter_dir: the folder (or Hub repo id) of ``adapter_config.json``, the adapter weights and
            ``hf_cim_config.json``.
        auto_class: a peft ``AutoPeftModel*`` class; default: the one of the adapters' ``task_type``
            (``CAUSAL_LM`` → ``AutoPeftModelForCausalLM``...), else ``AutoPeftModel``.
        noise_config: the :class:`~hf_cim.AnalogNoiseConfig` of the base (default: :func:`hf_cim.hub.load_noise_config`
            of ``adapter_dir``).
        kwargs: passed to ``from_pretrained`` (``is_trainable``, ``revision``, ``torch_dtype``...).

    Raises:
        ValueError: no noise config in ``adapter_dir`` and none given, and the base did not load analog either.
    """
    import peft
    from peft import PeftConfig

    if noise_config is None:
        noise_config = load_noise_config(adapter_dir)
    if auto_class is None:
        task = getattr(PeftConfig.from_pretrained(adapter_dir), "task_type", None)
        auto_class = getattr(peft, _AUTO_CLASSES.get(str(getattr(task, "value", task)), "AutoPeftModel"))
    if noise_config is not None:
        kwargs["quantization_config"] = noise_config
    model = auto_class.from_pretrained(adapter_dir, **kwargs)
    if get_config(model) is None and get_config(model.get_base_model()) is None:
        raise ValueError(
            f"load_peft: {os.fspath(adapter_dir)!r} has no noise config (hf_cim_config.json) and its base loaded "
            "digital; pass `noise_config=` or save it with hf_cim.hub.save_noise_config(model, adapter_dir)"
        )
    return model
