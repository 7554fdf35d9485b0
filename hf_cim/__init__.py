"""hf_cim: noise-aware training for analog compute-in-memory hardware, for the HuggingFace stack.

Extended straight-through estimation (arXiv 2508.11940): the forward pass runs an accurate, possibly
non-differentiable simulation of the analog chip; the backward pass uses the clean gradient.
"""

from .chip import clear_chip, program_chip
from .config import AnalogNoiseConfig
from .noise import NoiseContext, NoiseModel, list_noise_models, register_noise_model
from .patch import analog_layers, get_config, noise_disabled, patch_model, reseed, set_noise_level, unpatch_model

__version__ = "0.1.0"

__all__ = [
    "AnalogNoiseConfig",
    "NoiseContext",
    "NoiseModel",
    "__version__",
    "analog_layers",
    "clear_chip",
    "get_config",
    "list_noise_models",
    "noise_disabled",
    "patch_model",
    "program_chip",
    "register_noise_model",
    "reseed",
    "set_noise_level",
    "unpatch_model",
]
