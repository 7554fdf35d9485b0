"""The peers of the step-time benchmark from IBM aihwkit 1.2.0 itself (its C++ simulator, not aihwkit-lightning).

Two configurations, each a variant of ``step_time.py``:

* ``aihwkit``: ``InferenceRPUConfig`` (the C++ inference tile: noisy forward, ideal backward — the closest to
  hf_cim's ``ste``) set like ``hf_cim.AnalogNoiseConfig()``'s default chip: 8-bit DAC and ADC (``inp_res`` /
  ``out_res`` 254), ``out_bound`` 10, output noise 0.04, weight noise 0.02 (``ADDITIVE_CONSTANT``), 512-row tiles.
  Known differences: hf_cim's default also quantizes the weights to 8 bits per channel (aihwkit's tile does not in
  training), and draws its weight noise relative to each channel's abs-max (aihwkit relative to the tile's
  ``w_max``); neither changes the amount of work much.
* ``aihwkit_hwa``: ``StandardHWATrainingPreset`` unchanged (Rasch et al. 2023: PCM-shaped read noise 0.0175, IR-drop,
  output noise 0.04, 8-bit converters, learned input ranges and out scaling, channel-wise remapping) — the chip
  hf_cim's ``pcm`` preset mirrors; compare it with ``--preset pcm``.

aihwkit builds from source only (``../shared/MODELS.md``): build it in a separate environment (a venv with
``--system-site-packages`` sees this checkout's torch and hf_cim), never as a dependency of hf_cim. Without it the
variants are left out with a note. GPT-2's ``Conv1D`` layers become ``nn.Linear`` first (aihwkit converts
``nn.Linear``); the tied LM head becomes an untied analog copy (aihwkit's tiles hold the weights).
"""

from __future__ import annotations

from peer_aihwkit_lightning import conv1d_to_linear
from torch import nn

__all__ = ["AIHWKIT_VARIANTS", "aihwkit_available", "make_aihwkit_model"]

#: step_time.py variant -> what it runs.
AIHWKIT_VARIANTS = {
    "aihwkit": "InferenceRPUConfig like the default config (C++ tile: noisy forward, ideal backward)",
    "aihwkit_hwa": "StandardHWATrainingPreset (Rasch et al. 2023), unchanged",
}


def aihwkit_available() -> tuple[bool, str]:
    """``(True, version)`` if aihwkit and its compiled simulator import, else ``(False, reason)``."""
    try:
        import aihwkit
        from aihwkit.simulator import rpu_base  # noqa: F401  (the C++ extension)

        return True, aihwkit.__version__
    except Exception as err:
        return False, f"{type(err).__name__}: {err}"


def _rpu_config(variant: str):
    if variant == "aihwkit_hwa":
        from aihwkit.simulator.presets import StandardHWATrainingPreset

        return StandardHWATrainingPreset()
    if variant != "aihwkit":
        raise ValueError(f"unknown aihwkit variant {variant!r}; choose from {sorted(AIHWKIT_VARIANTS)}")
    from aihwkit.simulator.configs import InferenceRPUConfig, WeightNoiseType

    cfg = InferenceRPUConfig()
    cfg.forward.inp_res = 2**8 - 2
    cfg.forward.out_res = 2**8 - 2
    cfg.forward.out_bound = 10.0
    cfg.forward.out_noise = 0.04
    cfg.forward.w_noise = 0.02
    cfg.forward.w_noise_type = WeightNoiseType.ADDITIVE_CONSTANT
    cfg.mapping.max_input_size = 512
    cfg.mapping.max_output_size = 0
    return cfg


def make_aihwkit_model(model: nn.Module, variant: str) -> nn.Module:
    """Convert ``model`` for aihwkit (``variant`` in :data:`AIHWKIT_VARIANTS`): every linear layer analog. A tied LM
    head becomes an analog layer with its own copy of the weights (aihwkit keeps them in its tiles, not in a
    ``weight`` Parameter that could be shared with the embedding). Returns the converted model."""
    from aihwkit.nn.conversion import convert_to_analog

    conv1d_to_linear(model)
    return convert_to_analog(model, _rpu_config(variant), ensure_analog_root=False, inplace=True)
