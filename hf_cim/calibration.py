"""Converter ranges from data: a chip's DAC and ADC full scales, set once per layer.

Static DAC ranges (``input_quant="static"``):

A dynamic DAC (``"per_token"``/``"per_tensor"``) re-measures the abs-max of every input; a chip's DAC has a set full
scale instead, and inputs beyond it clip. :func:`calibrate_input_ranges` sets each patched layer's full scale to
``alpha`` times the standard deviation of its inputs on calibration batches (aihwkit's ``init_from_data`` with
``init_std_alpha``; 3 in its hardware-aware training preset), from the clean forward: the same model and batches
give the same ranges. The ranges live in the config's ``input_ranges``, so they travel with the checkpoint.

During noise-aware training the inputs' statistics move with the weights: recalibrate every few steps (the training
loop's choice; ``benchmarks/fidelity.py --calibrate_every``), and once more on calibration data before measuring.

ADC ranges: :func:`calibrate_output_ranges` sets each layer's ADC clipping range to ``alpha`` times the std of the
partial sums its tiles produce on clean data (``output_ranges``), instead of one ``out_bound`` for every layer.

Chip output correction: :func:`calibrate_chip_outputs` measures a *programmed* chip (:func:`hf_cim.program_chip`)
and corrects each layer's outputs per column in its digital periphery, ``y ← a·y + b``, with ``a``, ``b`` the
least-squares fit of the digital outputs on the chip's outputs for the same inputs (or one gain per layer). Chips
with per-column affine correction do this after programming (e.g. the 64-core PCM chip of Le Gallo et al., Nature
Electronics 2023); it takes out what the devices shifted systematically (a column's gain and offset: the mean of
lognormal factors, drift, a column's stuck devices on average) and leaves what varies from input to input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .config import MAX_OUT_BOUND, MIN_OUT_BOUND
from .converters import dac_clip
from .correction import CHIP_CORRECTIONS, column_sums, fit_correction
from .layers import AnalogLayer
from .patch import analog_layers, get_config, noise_disabled
from .tile import TileSpec, clean_partial_sums
from .validation import check_range

__all__ = [
    "batch_to",
    "calibrate_chip_outputs",
    "calibrate_input_ranges",
    "calibrate_output_ranges",
    "calibrate_ranges",
    "default_forward",
    "has_ranges_to_calibrate",
]

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


def _mean_std_per_layer(
    model: nn.Module,
    layers: list[nn.Module],
    batches: Iterable[Any],
    statistic: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    forward: Callable[[nn.Module, Any], Any],
    caller: str,
    what: str,
) -> dict[str, float]:
    """``{layer name: mean over batches of statistic(layer, input)}`` from the clean forward (noise disabled, no
    autograd, eval mode restored after); raises where ``batches`` is empty or a statistic is not finite."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(layer: nn.Module) -> Callable:
        name = layer.hf_cim_name

        def hook(module: nn.Module, args: tuple) -> None:
            value = statistic(module, args[0].detach())
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + 1

        return hook

    # Keyed by the layer's own name (a peft model's base layers under their bare names, as patch_model names them).
    handles = [layer.register_forward_pre_hook(record(layer)) for layer in layers]
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
        raise ValueError(f"{caller}: `batches` gave no batch to calibrate on")
    found = {name: float(total) / counts[name] for name, total in sums.items()}  # one host read per layer
    bad = sorted(n for n, v in found.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"{caller}: the {what} of {bad[0]!r} are not finite on the calibration data")
    return found


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
    stds = _mean_std_per_layer(
        model, [layer for _, layer in analog_layers(model)], batches,
        lambda layer, x: x.float().std(correction=0), forward, "calibrate_input_ranges", "inputs",
    )  # fmt: skip
    found = {name: max(alpha * std, _FLOOR) for name, std in stds.items()}
    config.input_ranges = {**(config.input_ranges or {}), **found}
    return found


def calibrate_output_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    alpha: float = 6.0,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, float]:
    """Set every dense patched layer's ADC range ``b_out`` to ``alpha`` × the std of its clean partial sums.

    A chip sets each array's ADC gain once, for the currents that array produces; one ``out_bound`` for every layer
    clips the layers whose sums run wide and wastes levels on the narrow ones. The statistic is the std of the
    normalized per-tile partial sums the ADC reads without noise (:func:`hf_cim.tile.clean_partial_sums`: the DAC's
    inputs, the quantized weights, the config's tiles), averaged over ``batches`` from the clean forward, as
    :func:`calibrate_input_ranges` does for the DAC. Ranges go into the config's ``output_ranges`` (clipped to the
    range ``out_bound`` allows; a layer no batch reached keeps its previous range, if any); MoE experts keep
    ``out_bound``. With a static DAC, calibrate the input ranges first: the partial sums depend on them.

    Args:
        model: a model patched with an ADC (``output_bits``) and no input slicing.
        batches: calibration inputs; consumed once.
        alpha: range in standard deviations of the partial sums, in [0.1, 1000]. With 8 bits, 6 σ leaves a step of
            0.047 σ (a rounding error of 0.014 σ) and clips beyond 6 σ only.
        forward: how a batch runs through the model (default :func:`default_forward`).

    Returns:
        ``{layer name: range}`` of the layers calibrated now.

    Raises:
        ValueError: the model has no ADC or slices its inputs, ``alpha`` is out of range, or ``batches`` is empty.
    """
    config = get_config(model)
    if config is None or config.output_bits is None:
        raise ValueError(
            "calibrate_output_ranges: the model must be patched with an ADC (got "
            f"{'no analog config' if config is None else 'output_bits=None'})"
        )
    if config.input_slice_bits is not None:
        raise ValueError(
            "calibrate_output_ranges: input slicing (`input_slice_bits`) reads each slice through the ADC with its "
            "own sums; per-layer ADC ranges are calibrated without slicing"
        )
    check_range("calibrate_output_ranges", "alpha", alpha, MIN_ALPHA, MAX_ALPHA)
    spec = TileSpec.from_config(config)

    def partial_sum_std(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight_oi(layer.weight.detach()).float()
        x_range = layer.input_range() if spec.static_range else None
        return clean_partial_sums(layer.to_rows(x).float(), w, spec, x_range).std(correction=0)

    dense = [layer for _, layer in analog_layers(model) if isinstance(layer, AnalogLayer)]
    stds = _mean_std_per_layer(
        model, dense, batches, partial_sum_std, forward, "calibrate_output_ranges", "partial sums"
    )
    found = {name: min(max(alpha * std, MIN_OUT_BOUND), MAX_OUT_BOUND) for name, std in stds.items()}
    config.output_ranges = {**(config.output_ranges or {}), **found}
    return found


def _calibrates_dac(config: Any) -> bool:
    return config is not None and config.input_quant == "static"


def _calibrates_adc(config: Any, output_alpha: float | None) -> bool:
    return config is not None and output_alpha is not None and config.output_bits is not None


def has_ranges_to_calibrate(config: Any, output_alpha: float | None) -> bool:
    """Whether a model patched with ``config`` has converter ranges to calibrate: a static DAC's, or ADC ranges per
    layer when ``output_alpha`` is given and the config has an ADC."""
    return _calibrates_dac(config) or _calibrates_adc(config, output_alpha)


def calibrate_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    input_alpha: float = 3.0,
    output_alpha: float | None = None,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> None:
    """Every converter range ``model`` has to calibrate (:func:`has_ranges_to_calibrate`), in the order they depend
    on each other: a static DAC's ranges (:func:`calibrate_input_ranges`, ``input_alpha``), then the ADC's per layer
    (:func:`calibrate_output_ranges`, ``output_alpha``; its partial sums go through the DAC's ranges)."""
    config = get_config(model)
    batches = list(batches)
    if _calibrates_dac(config):
        calibrate_input_ranges(model, batches, alpha=input_alpha, forward=forward)
    if _calibrates_adc(config, output_alpha):
        calibrate_output_ranges(model, batches, alpha=output_alpha, forward=forward)


def calibrate_chip_outputs(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    kind: str = "affine",
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrate the programmed chip's output correction of every dense patched layer from ``batches``.

    Runs ``forward(model, batch)`` for each batch in eval mode, without autograd, on the programmed chip (each
    layer's old correction dropped first); each layer compares its chip output ``y`` with its digital output ``y₀``
    for the same input as its DAC passes it (a static DAC's clip applied, :func:`hf_cim.converters.dac_clip`: the
    correction is for the array's errors, not for the DAC's known clip) and fits, over every output vector of the
    batches, ``y₀ ≈ a·y + b``: per output column (``kind="affine"``: ``a = cov(y, y₀)/var(y)``,
    ``b = mean(y₀) − a·mean(y)``; a column whose chip output does not vary gets ``a = 1``) or one ``a`` per layer
    and ``b = 0`` (``kind="gain"``: ``a = Σy·y₀/Σy²``, a global gain compensation). The chip's forward then applies
    ``a·y + b`` after its ADC (in its digital periphery) until it is programmed again or cleared. The fit
    draws read noise from each layer's stream: reseed (:func:`hf_cim.reseed`) before measuring for noise that does
    not depend on it. MoE experts are not corrected.

    Args:
        model: a patched model with a programmed chip (:func:`hf_cim.program_chip`) and noise in evaluation.
        batches: calibration inputs (e.g. a few training batches); consumed once.
        kind: ``"affine"`` or ``"gain"``.
        forward: how a batch runs through the model (default :func:`default_forward`).

    Returns:
        ``{layer name: (a, b)}``: float32 tensors of one value per output column (``"gain"``: all equal; b zero).

    Raises:
        ValueError: ``kind`` is unknown, the model has no programmed chip or no noise in evaluation, ``batches`` is
            empty, or a fit is not finite.
    """
    if kind not in CHIP_CORRECTIONS:
        raise ValueError(f"calibrate_chip_outputs: `kind` must be one of {CHIP_CORRECTIONS}, got {kind!r}")
    config = get_config(model)
    dense = [layer for _, layer in analog_layers(model) if isinstance(layer, AnalogLayer)]
    if config is None or not dense:
        raise ValueError("calibrate_chip_outputs: the model has no patched dense layer; call hf_cim.patch_model first")
    if not config.noise_in_eval:
        raise ValueError("calibrate_chip_outputs: the config has noise_in_eval=False, so evaluation runs no chip")
    unprogrammed = [layer.hf_cim_name for layer in dense if not layer.is_programmed]
    if unprogrammed:
        raise ValueError(
            f"calibrate_chip_outputs: layer {unprogrammed[0]!r} has no programmed chip; call hf_cim.program_chip first"
        )
    if any(layer.hf_cim_disabled for layer in dense):
        raise ValueError("calibrate_chip_outputs: noise is disabled (hf_cim.noise_disabled); the chip must run")
    # Per layer, float64 sums over output vectors (hf_cim.correction.column_sums).
    sums: dict[str, list] = {}

    static = TileSpec.from_config(config).static_range
    input_ranges = {layer.hf_cim_name: layer.input_range() if static else None for layer in dense}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        passed = dac_clip(args[0], input_ranges[module.hf_cim_name])
        new = column_sums(module.grad_rows(out), module.grad_rows(module.clean_forward(passed)))
        old = sums.get(module.hf_cim_name)
        sums[module.hf_cim_name] = new if old is None else [a + b for a, b in zip(old, new)]

    for layer in dense:
        layer.hf_cim_state.chip_correction = None
    handles = [layer.register_forward_hook(record) for layer in dense]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("calibrate_chip_outputs: `batches` gave no batch to calibrate on")
    found = {}
    for layer in dense:
        name = layer.hf_cim_name
        if name not in sums:
            continue
        scale, offset = fit_correction(sums[name], kind)
        if not bool(torch.isfinite(scale).all() & torch.isfinite(offset).all()):  # one host read per layer
            raise ValueError(f"calibrate_chip_outputs: the fit of {name!r} is not finite on the calibration data")
        found[name] = (scale.to(layer.weight.device), offset.to(layer.weight.device))
    for layer in dense:
        if layer.hf_cim_name in found:
            layer.hf_cim_state.chip_correction = found[layer.hf_cim_name]
    return found
