"""Noise models of analog compute-in-memory hardware (see ``docs/noise_models.md``)."""

from .base import (
    NoiseContext,
    NoiseModel,
    check_range,
    get_noise_model_class,
    list_noise_models,
    noise_model_from_dict,
    register_noise_model,
)
from .gaussian import GaussianWeightNoise, OutputNoise

__all__ = [
    "GaussianWeightNoise",
    "NoiseContext",
    "NoiseModel",
    "OutputNoise",
    "check_range",
    "get_noise_model_class",
    "list_noise_models",
    "noise_model_from_dict",
    "register_noise_model",
]
