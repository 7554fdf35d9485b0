"""Named, realistic chip configurations with one ``level`` knob that scales every noise magnitude.

``level`` is :attr:`AnalogNoiseConfig.level`: every noise model multiplies its magnitudes by it (standard
deviations, drift exponents, fault probabilities); ``level = 0`` leaves only the converters (DAC, ADC, weight
quantization). ``AnalogNoiseConfig(noise="pcm")`` takes a preset's noise models without its converter settings;
:meth:`AnalogNoiseConfig.from_preset` (alias :func:`hf_cim.get_preset`) builds the whole config.

==============  ==========================================================================================
``"paper"``     arXiv 2508.11940's setting: int8 inputs and weights (per-token DAC, per-channel weights), no
                ADC, no tiling, lognormal device variation ``w' = w·exp(σ·ξ)`` with ``σ = 0.1·level``: the
                paper's lognormal levels 1.0 / 2.0 / 3.0 are ``level=1.0/2.0/3.0``, i.e. σ = 0.1 / 0.2 / 0.3
                (a multiplicative spread of about ±10 / 20 / 30 % at one standard deviation).
``"pcm"``       close to aihwkit's ``StandardHWATrainingPreset``: 8-bit DAC and ADC (``out_bound`` 10), float
                weights, 512-row tiles, PCM-shaped read noise 0.0175, IR-drop (scale 1), output noise 0.04. Its
                DAC range is dynamic per token; aihwkit's preset uses static ranges from data:
                ``input_quant="static"`` (:mod:`hf_cim.calibration`) is that DAC.
``"pcm_drift"`` the ``"pcm"`` converters and tiles with the statistical PCM device model (programming noise,
                drift with global compensation, 1/f read noise; Nandakumar 2019), IR-drop and output noise
                0.04: for evaluation over time with :func:`hf_cim.program_chip` and ``t_inference``.
``"rram"``      8-bit DAC, weights and ADC, 256-row tiles, Wan 2022 ReRAM programming noise (40 µS),
                stuck-at faults (0.5 % off, 0.1 % on; illustrative), IR-drop and output noise 0.04.
==============  ==========================================================================================

This module is data below the config: it imports the noise models, never :mod:`hf_cim.config` (which reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .noise.base import NoiseModel
from .noise.faults import StuckAtFaults
from .noise.gaussian import LogNormalNoise, OutputNoise, ReadNoise
from .noise.ir_drop import IRDrop
from .noise.pcm import PCMNoise
from .noise.reram import ReRAMNoise

__all__ = ["LEVERS_OFF", "TRAINING_DEFAULTS", "list_presets", "preset_fields", "preset_noise"]


def _paper() -> dict[str, Any]:
    return dict(
        input_bits=8,
        weight_bits=8,
        output_bits=None,
        tile_size=None,
        noise=[LogNormalNoise(std=0.1)],
    )


def _pcm() -> dict[str, Any]:
    return dict(
        input_bits=8,
        weight_bits=None,
        output_bits=8,
        out_bound=10.0,
        tile_size=512,
        noise=[ReadNoise(std=0.0175, shape="pcm"), IRDrop(scale=1.0), OutputNoise(std=0.04)],
    )


def _pcm_drift() -> dict[str, Any]:
    return dict(_pcm(), noise=[PCMNoise(), IRDrop(scale=1.0), OutputNoise(std=0.04)])


def _rram() -> dict[str, Any]:
    return dict(
        input_bits=8,
        weight_bits=8,
        output_bits=8,
        out_bound=10.0,
        tile_size=256,
        noise=[ReRAMNoise(), StuckAtFaults(p_off=0.005, p_on=0.001), IRDrop(scale=1.0), OutputNoise(std=0.04)],
    )


_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "paper": _paper,
    "pcm": _pcm,
    "pcm_drift": _pcm_drift,
    "rram": _rram,
}


def list_presets() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(_PRESETS)


def preset_fields(name: str) -> dict[str, Any]:
    """A fresh dict of the :class:`~hf_cim.AnalogNoiseConfig` fields of preset ``name`` (converters, tiles, noise).

    Raises:
        ValueError: for an unknown preset, listing the known ones.
    """
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return _PRESETS[name]()


def preset_noise(name: str) -> list[NoiseModel]:
    """A fresh copy of the noise models of preset ``name`` (the converters and tiling are left out)."""
    return preset_fields(name)["noise"]


#: How a preset's chip is trained: the hardware-aware STE backward. No gradient through partial sums the ADC
#: clipped, the input gradient through the programmed weights, and the weight gradient on through the weight
#: programming (each device's factor). Paired over seeds and chips, this is what made noise-aware training beat
#: digital training on the presets' chips (docs/fidelity.md); the plain clean backward (``AnalogNoiseConfig``'s
#: default) lost there. ``gradient="full"`` differentiates all three itself and takes none.
TRAINING_DEFAULTS: dict[str, Any] = {
    "mask_saturated": True,
    "backward_weights": "programmed",
    "program_gradient": True,
}

#: The same fields with every lever off: the plain clean backward of the paper's Algorithm 1 (``AnalogNoiseConfig``'s
#: defaults), and what ``gradient="full"`` requires.
LEVERS_OFF: dict[str, Any] = {"mask_saturated": False, "backward_weights": "clean", "program_gradient": False}
