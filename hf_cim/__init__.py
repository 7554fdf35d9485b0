"""hf_cim: noise-aware training for analog compute-in-memory hardware, for the HuggingFace stack.

Extended straight-through estimation (arXiv 2508.11940): the forward pass runs an accurate, possibly
non-differentiable simulation of the analog chip; the backward pass uses the clean gradient.

The top level holds the config, the verbs, the chip, the presets, the noise-model protocol and the robustness sweep;
everything else is reached through its module: ``hf_cim.callbacks`` (Trainer callbacks), ``hf_cim.hub`` (noise
config files, ``push_to_hub``), ``hf_cim.model_card``, ``hf_cim.resume``, ``hf_cim.peft_utils`` (``load_peft``),
``hf_cim.patch`` (``analog_layers``, ``get_config``), ``hf_cim.quantizer``. Importing hf_cim registers the
transformers ``quant_method`` ``"hf_cim"``, so ``from_pretrained`` patches a saved analog model again.
"""

import importlib as _importlib
import warnings as _warnings

from . import quantizer as _quantizer  # noqa: F401  (registers quant_method "hf_cim" with transformers)
from .chip import clear_chip, program_chip
from .config import AnalogNoiseConfig, get_preset
from .evaluation import RobustnessResult, evaluate_robustness
from .noise import NoiseContext, NoiseModel, list_noise_models, register_noise_model
from .patch import noise_disabled, patch_model, reseed, set_drift_time, set_noise_level, unpatch_model
from .presets import list_presets

__version__ = "0.1.0"

__all__ = [
    "AnalogNoiseConfig",
    "NoiseContext",
    "NoiseModel",
    "RobustnessResult",
    "clear_chip",
    "evaluate_robustness",
    "get_preset",
    "list_noise_models",
    "list_presets",
    "noise_disabled",
    "patch_model",
    "program_chip",
    "register_noise_model",
    "reseed",
    "set_drift_time",
    "set_noise_level",
    "unpatch_model",
]

#: Names the top level exported before it became the small face above, and the module that holds each now. They
#: still work, with a DeprecationWarning naming the new place.
_MOVED = {
    "AnalogHfQuantizer": "hf_cim.quantizer",
    "GradientAlignmentCallback": "hf_cim.callbacks",
    "NoiseLevelCallback": "hf_cim.callbacks",
    "NoiseStateCallback": "hf_cim.callbacks",
    "PeakMemoryCallback": "hf_cim.callbacks",
    "add_callbacks": "hf_cim.callbacks",
    "analog_layers": "hf_cim.patch",
    "get_config": "hf_cim.patch",
    "load_noise_config": "hf_cim.hub",
    "load_peft": "hf_cim.peft_utils",
    "push_to_hub": "hf_cim.hub",
    "save_noise_config": "hf_cim.hub",
    "write_model_card": "hf_cim.hub",
}


def __getattr__(name: str):
    if name in _MOVED:
        where = _MOVED[name]
        _warnings.warn(
            f"hf_cim.{name} is deprecated: use {where}.{name} (the top level of hf_cim keeps a small set of names)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(where), name)
    if not name.startswith("_"):  # a submodule not imported yet: ``hf_cim.hub.push_to_hub`` after ``import hf_cim``
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
