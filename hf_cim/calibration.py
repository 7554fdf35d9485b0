"""Static DAC ranges from data: the calibration a chip with a fixed input full scale needs (``input_quant="static"``).

A dynamic DAC (``"per_token"``/``"per_tensor"``) re-measures the abs-max of every input; a chip's DAC has a set full
scale instead, and inputs beyond it clip. :func:`calibrate_input_ranges` sets each patched layer's full scale to
``alpha`` times the standard deviation of its inputs on calibration batches (aihwkit's ``init_from_data`` with
``init_std_alpha``; 3 in its hardware-aware training preset), from the clean forward: the same model and batches
give the same ranges. The ranges live in the config's ``input_ranges``, so they travel with the checkpoint.

During noise-aware training the inputs' statistics move with the weights: recalibrate every few steps (the training
loop's choice; ``benchmarks/fidelity.py --calibrate_every``), and once more on calibration data before measuring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .patch import analog_layers, get_config, noise_disabled
from .validation import check_range

__all__ = ["batch_to", "calibrate_input_ranges", "default_forward"]

#: Range of ``alpha``: below 0.1 σ nearly every input clips; beyond 1000 σ the 8-bit grid is coarser than the data.
MIN_ALPHA, MAX_ALPHA = 0.1, 1000.0
_FLOOR = 1e-12  # an input that was all zeros on the calibration data: a tiny, valid range


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (a tokenized batch), ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_to(batch: Any, device: torch.device) -> Any:
    """A calibration batch on ``device``: each tensor of a mapping, or the tensor itself (other values as they are)."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def calibrate_input_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    alpha: float = 3.0,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, float]:
    """Set every patched layer's static DAC range to ``alpha`` × the std of its inputs, averaged over ``batches``.

    Runs ``forward(model, batch)`` for each batch with noise disabled and without autograd (the digital network the
    ranges are for), restores the model's train/eval mode, then writes the ranges into the config's
    ``input_ranges`` (every layer seen; a layer no batch reached keeps its previous range, if any).

    Args:
        model: a model patched with ``input_quant="static"``.
        batches: calibration inputs (e.g. a few training batches); consumed once.
        alpha: range in standard deviations of the layer's inputs, in [0.1, 1000].
        forward: how a batch runs through the model (default :func:`default_forward`).

    Returns:
        ``{layer name: range}`` of the layers calibrated now.

    Raises:
        ValueError: the model is not patched with ``input_quant="static"``, ``alpha`` is out of range, or
            ``batches`` is empty.
    """
    config = get_config(model)
    if config is None or config.input_quant != "static":
        raise ValueError(
            "calibrate_input_ranges: the model must be patched with input_quant='static' (got "
            f"{'no analog config' if config is None else repr(config.input_quant)})"
        )
    check_range("calibrate_input_ranges", "alpha", alpha, MIN_ALPHA, MAX_ALPHA)
    layers = list(analog_layers(model))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            std = args[0].detach().float().std(correction=0)
            sums[name] = sums[name] + std if name in sums else std
            counts[name] = counts.get(name, 0) + 1

        return hook

    # Keyed by the layer's own name (a peft model's base layers under their bare names, as patch_model names them).
    handles = [layer.register_forward_pre_hook(record(layer.hf_cim_name)) for _, layer in layers]
    was_training = model.training
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad(), noise_disabled(model):
            for batch in batches:
                forward(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibrate_input_ranges: `batches` gave no batch to calibrate on")
    found = {}
    for name, total in sums.items():  # one host read per layer, once per calibration (not per forward)
        mean_std = float(total) / counts[name]
        found[name] = max(alpha * mean_std, _FLOOR) if math.isfinite(mean_std) else math.nan
    bad = sorted(n for n, v in found.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"calibrate_input_ranges: the inputs of {bad[0]!r} are not finite on the calibration data")
    config.input_ranges = {**(config.input_ranges or {}), **found}
    return found
