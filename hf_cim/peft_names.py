"""Which modules of a peft model are the base (analog) and which are adapters (digital), named as in the bare model.

:func:`named_base_modules` is what :func:`hf_cim.patch_model` walks to select targets, so both orders (patch then
``get_peft_model``, or the reverse) patch the same layers under the same names (see :mod:`hf_cim.peft_utils`). peft
is imported only if the user already imported it: a model cannot hold peft modules otherwise. Imports nothing of
hf_cim.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["named_base_modules"]


def _peft_types() -> tuple[type, type, type, type] | None:
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return PeftModel, BaseTuner, BaseTunerLayer, AuxiliaryTrainingWrapper


def named_base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule of ``model`` that is not a peft adapter, named as in the bare model.

    Without peft modules this is ``model.named_modules()`` without the root. With peft:

    * the children of a tuner layer (e.g. ``lora.Linear``) other than ``base_layer`` are adapters and are left out,
      with everything below them;
    * the wrapper levels are dropped from names: ``base_model.model.`` (``PeftModel`` → tuner → model),
      ``.base_layer``, and a ``ModulesToSaveWrapper``'s ``.original_module`` / ``.modules_to_save.<adapter>`` (both
      copies keep the wrapped module's name).
    """
    types = _peft_types()
    if types is None:
        return [(name, m) for name, m in model.named_modules() if name]
    peft_model, base_tuner, tuner_layer, aux_wrapper = types
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str, collapse_children: bool = False) -> None:
        for child_name, child in module.named_children():
            if id(child) in seen:  # a shared module appears once, as in named_modules()
                continue
            if isinstance(module, tuner_layer) and child_name != "base_layer":
                continue  # an adapter (lora_A, lora_B, dropout...): stays digital, and so does everything below it
            wrapper_level = (
                collapse_children
                or isinstance(module, tuner_layer)
                or (isinstance(module, peft_model) and child_name == "base_model")
                or (isinstance(module, base_tuner) and child_name == "model")
                or (isinstance(module, aux_wrapper) and child_name in ("original_module", "modules_to_save"))
            )
            name = prefix if wrapper_level else (f"{prefix}.{child_name}" if prefix else child_name)
            seen.add(id(child))
            if name:
                out.append((name, child))
            # A ModulesToSaveWrapper's `modules_to_save` ModuleDict holds one copy per adapter name: collapse them too.
            walk(child, name, collapse_children=isinstance(module, aux_wrapper) and child_name == "modules_to_save")

    walk(model, "")
    return out
