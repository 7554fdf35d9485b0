"""Noise models of analog compute-in-memory hardware (see ``docs/noise_models.md``).

Importing this package registers every built-in model: ``gaussian_weight``, ``lognormal``, ``output_noise``,
``read_noise``, ``pcm``, ``reram``, ``stuck_at``, ``ir_drop``, ``thermal``.
"""

from .base import (
    NoiseContext,
    NoiseModel,
    check_range,
    get_noise_model_class,
    list_noise_models,
    noise_model_from_dict,
    register_noise_model,
)
from .faults import StuckAtFaults
from .gaussian import GaussianWeightNoise, LogNormalNoise, OutputNoise, ReadNoise
from .ir_drop import IRDrop
from .pcm import PCMNoise
from .reram import ReRAMNoise
from .thermal import ThermalNoise

__all__ = [
    "GaussianWeightNoise",
    "IRDrop",
    "LogNormalNoise",
    "NoiseContext",
    "NoiseModel",
    "OutputNoise",
    "PCMNoise",
    "ReRAMNoise",
    "ReadNoise",
    "StuckAtFaults",
    "ThermalNoise",
    "check_range",
    "get_noise_model_class",
    "list_noise_models",
    "noise_model_from_dict",
    "register_noise_model",
]
