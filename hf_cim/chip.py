"""Program a simulated chip: static non-idealities drawn once, kept across batches, drifted to ``t_inference``.

Semantics (the question aihwkit users ask most):

* **Training** (``model.train()``): weights change every step, so the static part (programming noise, stuck
  devices, drift exponents) is drawn anew at every forward; read noise at every product.
* **Evaluation on a programmed chip** (``model.eval()`` after :func:`program_chip`): the static part is drawn once
  per chip from ``seed`` and kept for every batch; read noise, IR-drop and output noise are applied at every product.
  Programming the same ``seed`` at another ``t_inference`` gives the *same* chip observed at that time.
* **Evaluation without programming**: the static part is drawn anew at every forward, as in training.

A programmed chip is a snapshot of the weights: call :func:`program_chip` again after changing them.
"""

from __future__ import annotations

from torch import nn

from .patch import analog_layers
from .validation import check_range

__all__ = ["clear_chip", "program_chip"]


def program_chip(model: nn.Module, seed: int, t_inference: float = 0.0) -> nn.Module:
    """Program every patched layer of ``model`` as one simulated chip; returns ``model``.

    Args:
        model: a patched model.
        seed: the chip (int >= 0): the same seed programs the same devices.
        t_inference: seconds elapsed since programming (>= 0), for drift and accumulated read noise.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"program_chip: `seed` must be an int >= 0, got {seed!r}")
    check_range("program_chip", "t_inference", t_inference, 0.0, None)
    layers = list(analog_layers(model))
    if not layers:
        raise ValueError("program_chip: the model has no patched layer; call hf_cim.patch_model first")
    for _, layer in layers:
        layer.program(seed, t_inference)
    return model


def clear_chip(model: nn.Module) -> nn.Module:
    """Forget the programmed chip: static noise is drawn at every forward again."""
    for _, layer in analog_layers(model):
        layer.clear_program()
    return model
