"""hf_cim: noise-aware training for analog compute-in-memory hardware, for the HuggingFace stack.

Extended straight-through estimation (arXiv 2508.11940): the forward pass runs an accurate, possibly
non-differentiable simulation of the analog chip; the backward pass uses the clean gradient.
"""

from .callbacks import GradientAlignmentCallback, NoiseLevelCallback, PeakMemoryCallback, add_callbacks
from .chip import clear_chip, program_chip
from .config import AnalogNoiseConfig, get_preset
from .evaluation import RobustnessResult, evaluate_robustness
from .hub import NoiseStateCallback, load_noise_config, push_to_hub, save_noise_config, write_model_card
from .noise import NoiseContext, NoiseModel, list_noise_models, register_noise_model
from .patch import (
    analog_layers,
    get_config,
    noise_disabled,
    patch_model,
    reseed,
    set_drift_time,
    set_noise_level,
    unpatch_model,
)
from .peft_utils import load_peft
from .presets import list_presets
from .quantizer import AnalogHfQuantizer  # registers quant_method "hf_cim" with transformers

__version__ = "0.1.0"

__all__ = [
    "AnalogHfQuantizer",
    "AnalogNoiseConfig",
    "GradientAlignmentCallback",
    "NoiseContext",
    "NoiseLevelCallback",
    "NoiseModel",
    "NoiseStateCallback",
    "PeakMemoryCallback",
    "RobustnessResult",
    "__version__",
    "add_callbacks",
    "analog_layers",
    "clear_chip",
    "evaluate_robustness",
    "get_config",
    "get_preset",
    "list_noise_models",
    "list_presets",
    "load_noise_config",
    "load_peft",
    "noise_disabled",
    "patch_model",
    "program_chip",
    "push_to_hub",
    "register_noise_model",
    "reseed",
    "save_noise_config",
    "set_drift_time",
    "set_noise_level",
    "unpatch_model",
    "write_model_card",
]
