"""``patch_model`` / ``unpatch_model`` / ``noise_disabled`` / ``set_noise_level`` / ``set_drift_time``: the in-place verbs.

Target selection follows peft's ``target_modules`` semantics: a string is a regex that must match a module's full
name; a list holds exact names or ``.suffix`` matches; ``"all-linear"`` means every linear-like layer but the
output embedding. The experts of transformers 5's MoE layers (3-D expert weights, ``@use_experts_implementation``)
are linear-like too (:mod:`hf_cim.moe`); an experts module hf_cim cannot simulate is named in a warning, never left
digital silently. ``exclude_modules`` uses the same syntax and leaves the whole subtree of an excluded module digital.
Every target is checked before anything changes, so a failure never leaves a half-patched model. A model holds one
config (the one ``save_pretrained`` writes): patching a model that already has patched layers is an error.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .config import AnalogNoiseConfig
from .layers import LAYER_MAP, AnalogLayerMixin
from .moe import experts_support, is_experts_like, noisy_experts_class
from .peft_names import named_base_modules

__all__ = [
    "analog_layers",
    "get_config",
    "noise_disabled",
    "patch_model",
    "reseed",
    "set_drift_time",
    "set_noise_level",
    "supports",
    "unpatch_model",
]

logger = logging.getLogger(__name__)

_CONFIG_ATTR = "hf_cim_config"
_TAGS_ATTR = "_hf_cim_model_tags"
#: Hub tags of a patched model (`PreTrainedModel.add_model_tags`): Trainer's and `push_to_hub`'s cards carry them.
MODEL_TAGS = ("hf-cim", "analog-cim")


def _matches(name: str, pattern: str | list[str]) -> bool:
    # A string is a regex, checked by AnalogNoiseConfig (valid, no catastrophic backtracking): bounded matching time.
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in pattern)


def _entry_matches(name: str, key: str) -> bool:
    return name == key or name.endswith(f".{key}")


def _excluded(name: str, entry: str | list[str]) -> bool:
    """Whether ``entry`` (a regex or a list of names) matches ``name`` or one of its ancestors (dotted prefixes)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), entry) for i in range(1, len(parts) + 1))


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _unsupported_reason(module: nn.Module) -> str | None:
    """None when :func:`patch_model` can make ``module`` analog, else why not."""
    if isinstance(module, AnalogLayerMixin):
        return "is analog already"
    analog = LAYER_MAP.get(type(module))
    if analog is not None:
        return analog.unsupported_reason(module)
    if is_experts_like(module):
        return experts_support(module)
    return (
        f"is a {type(module).__name__}, not one of the layer types registered with "
        f"hf_cim.layers.register_analog_layer ({', '.join(sorted(t.__name__ for t in LAYER_MAP))}) nor MoE experts"
    )


def supports(module: nn.Module) -> bool:
    """Whether :func:`patch_model` can make ``module`` analog: a plain module of a type registered with
    :func:`hf_cim.layers.register_analog_layer` (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` with
    ``groups=1``, ...) or the experts of a transformers MoE layer that :mod:`hf_cim.moe` simulates. False for a
    module that is analog already."""
    return _unsupported_reason(module) is None


def _check_unsupported(name: str, module: nn.Module) -> None:
    reason = _unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"patch_model: module {name!r} {reason}. Leave it digital with `exclude_modules`.")


def _patchable(module: nn.Module) -> bool:
    """A candidate of the selection: a registered type (checked further by :func:`supports` once selected), MoE
    experts hf_cim simulates, or an analog layer (patching twice is then an error)."""
    if type(module) in LAYER_MAP or isinstance(module, AnalogLayerMixin):
        return True
    return is_experts_like(module) and experts_support(module) is None


def _noisy_class(module: nn.Module) -> type[nn.Module]:
    noisy = LAYER_MAP.get(type(module))
    return noisy if noisy is not None else noisy_experts_class(type(module))


def _select(model: nn.Module, config: AnalogNoiseConfig) -> list[tuple[str, nn.Module]]:
    named = [("", model), *named_base_modules(model)]  # peft adapters left out, names as in the bare model
    candidates = [(name, m) for name, m in named if _patchable(m)]
    # MoE experts hf_cim cannot simulate: named in a warning when the selection would cover them (never silent).
    digital_experts = [(n, m) for n, m in named if is_experts_like(m) and not _patchable(m)]
    if not candidates:
        raise ValueError(
            "patch_model: the model has no linear-like layer (nn.Linear, transformers Conv1D, nn.Conv2d) to patch"
        )
    target = config.target_modules
    if target is None:
        selected = candidates
    elif target == "all-linear":
        out_emb = _output_embedding(model)
        selected = [(n, m) for n, m in candidates if m is not out_emb]
    elif isinstance(target, str):
        selected = [(n, m) for n, m in candidates if _matches(n, target)]
        if not selected:
            raise ValueError(
                f"patch_model: `target_modules` regex {target!r} matches no linear-like layer; "
                f"linear-like layers are e.g. {[n for n, _ in candidates[:8]]}"
            )
    else:
        for key in target:
            hits = [(n, m) for n, m in named if _entry_matches(n, key)]
            if not hits:
                raise ValueError(
                    f"patch_model: `target_modules` entry {key!r} matches no module; "
                    f"linear-like layers are e.g. {[n for n, _ in candidates[:8]]}"
                )
            bad = [(n, type(m).__name__) for n, m in hits if (n, m) not in candidates]
            if len(bad) == len(hits):
                raise ValueError(
                    f"patch_model: `target_modules` entry {key!r} matches only unsupported modules {bad[:4]}; "
                    f"supported types: {sorted(t.__name__ for t in LAYER_MAP)}"
                )
        selected = [(n, m) for n, m in candidates if _matches(n, target)]

    exclude = config.exclude_modules
    if exclude:  # None or [] exclude nothing
        # An excluded module takes its whole subtree along ("transformer.h.0" leaves that block digital), and each
        # entry must exclude some linear-like layer: one that excludes nothing is a mistake, as an unmatched target.
        # One pattern per entry: the regex, or a one-name list (exact name or `.name` suffix).
        entries = [exclude] if isinstance(exclude, str) else [[key] for key in exclude]
        what = "regex" if isinstance(exclude, str) else "entry"
        for entry in entries:
            shown = entry if isinstance(entry, str) else entry[0]
            if not any(_matches(n, entry) for n, _ in named):
                raise ValueError(f"patch_model: `exclude_modules` {what} {shown!r} matches no module")
            if not any(_excluded(n, entry) for n, _ in candidates + digital_experts):
                hits = [(n, type(m).__name__) for n, m in named if _matches(n, entry)]
                raise ValueError(
                    f"patch_model: `exclude_modules` {what} {shown!r} excludes no linear-like layer: it matches only "
                    f"{hits[:4]}, which neither are nor hold one; linear-like layers are e.g. "
                    f"{[n for n, _ in candidates[:8]]}"
                )
        selected = [(n, m) for n, m in selected if not any(_excluded(n, entry) for entry in entries)]
        digital_experts = [(n, m) for n, m in digital_experts if not any(_excluded(n, e) for e in entries)]
    if isinstance(target, (str, list)) and target != "all-linear":
        digital_experts = [(n, m) for n, m in digital_experts if _matches(n, target)]
    if digital_experts:
        logger.warning(
            "patch_model: %d MoE experts module(s) stay digital, hf_cim cannot simulate them: %s. Leave them "
            "digital explicitly with `exclude_modules` to silence this warning.",
            len(digital_experts),
            "; ".join(f"{n} ({type(m).__name__}: {experts_support(m)})" for n, m in digital_experts[:8])
            + (" ..." if len(digital_experts) > 8 else ""),
        )

    if not selected:
        raise ValueError("patch_model: `target_modules` minus `exclude_modules` leaves no layer to patch")
    already = [n for n, m in named if isinstance(m, AnalogLayerMixin)]
    if already:
        # One config per model: save_pretrained writes one config, so layers patched with another would reload
        # with the wrong one (or digital).
        raise ValueError(
            f"patch_model: the model is already patched ({len(already)} layer(s), e.g. {already[:4]}); hf_cim keeps "
            "one config per model, which save_pretrained writes: call hf_cim.unpatch_model(model) first, then patch "
            "once with `target_modules` / `exclude_modules` covering every layer to simulate"
        )
    for name, module in selected:
        _check_unsupported(name, module)
    return selected


def patch_model(model: nn.Module, config: AnalogNoiseConfig) -> nn.Module:
    """Swap the selected linear-like layers of ``model`` for their noisy versions, in place; returns ``model``.

    The layers keep their Parameters (same objects): ``state_dict`` keys do not change, tied weights stay tied and
    an optimizer built before patching still updates them.

    Raises:
        TypeError: if ``config`` is not an :class:`AnalogNoiseConfig`.
        ValueError: if the config (or one of its noise models, changed in place) is invalid, a target matches
            nothing, an exclude excludes no linear-like layer, the model already has patched layers, or a selected
            module is unsupported. Nothing is changed then.
    """
    if not isinstance(config, AnalogNoiseConfig):
        raise TypeError(f"patch_model: `config` must be an AnalogNoiseConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: `model` must be a torch.nn.Module, got {type(model).__name__}")
    config.validate()  # fields are checked on assignment; this also sees noise models changed in place
    selected = _select(model, config)
    _check_static_ranges(config, selected)
    for name, module in selected:
        module.__class__ = _noisy_class(module)
        module._hf_cim_init(name, config)
    setattr(model, _CONFIG_ATTR, config)
    hf_config = _hf_config(model)
    if hf_config is not None:  # save_pretrained writes it into config.json (quant_method "hf_cim")
        hf_config.quantization_config = config
    if callable(getattr(model, "add_model_tags", None)):  # every card Trainer / push_to_hub writes carries them
        new_tags = [t for t in MODEL_TAGS if t not in (getattr(model, "model_tags", None) or [])]
        model.add_model_tags(list(MODEL_TAGS))
        model.__dict__[_TAGS_ATTR] = new_tags
    return model


def _check_static_ranges(config: AnalogNoiseConfig, selected: list[tuple[str, nn.Module]]) -> None:
    """Calibrated ranges belong to dense layers this config patches: a static DAC takes dense layers only (one range
    each), and every name in ``input_ranges`` / ``output_ranges`` is a selected dense layer (MoE experts keep the
    global ``out_bound``)."""
    dense = {n for n, m in selected if type(m) in LAYER_MAP}
    if config.input_quant == "static":
        experts = [n for n, _ in selected if n not in dense]
        if experts:
            raise ValueError(
                f"patch_model: input_quant='static' has one DAC range per dense layer; MoE experts ({experts[0]!r}"
                f"{' ...' if len(experts) > 1 else ''}) take a dynamic DAC: exclude them or use input_quant='per_token'"
            )
    for field_name in ("input_ranges", "output_ranges"):
        stray = sorted(set(getattr(config, field_name) or {}) - dense)
        if stray:
            raise ValueError(
                f"patch_model: `{field_name}` names {len(stray)} layer(s) this config does not patch as dense layers, "
                f"e.g. {stray[0]!r}; ranges belong to the model they were calibrated on"
            )


def _hf_config(model: nn.Module):
    """The transformers config of ``model`` (a ``PreTrainedModel`` or a peft model around one), or None."""
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    return config if isinstance(config, PretrainedConfig) else None


def analog_layers(model: nn.Module) -> Iterator[tuple[str, AnalogLayerMixin]]:
    """The patched layers of ``model`` with their names."""
    for name, module in model.named_modules():
        if isinstance(module, AnalogLayerMixin):
            yield name, module


def get_config(model: nn.Module) -> AnalogNoiseConfig | None:
    """The config ``model`` was patched with, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Turn every patched layer back into its plain class, keeping the (trained) Parameters; returns ``model``."""
    for _, module in list(analog_layers(model)):
        module._hf_cim_clear()
        module.__class__ = module.plain_class
    model.__dict__.pop(_CONFIG_ATTR, None)
    added = model.__dict__.pop(_TAGS_ATTR, [])
    if added and getattr(model, "model_tags", None):  # the tags patch_model added: a digital model again
        model.model_tags = [t for t in model.model_tags if t not in added]
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(getattr(quantizer, "quantization_config", None), AnalogNoiseConfig):
        quantizer.remove_quantization_config(model)  # loaded through from_pretrained: a plain model again
    hf_config = _hf_config(model)
    if hf_config is not None and isinstance(getattr(hf_config, "quantization_config", None), AnalogNoiseConfig):
        del hf_config.quantization_config
    return model


@contextmanager
def noise_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, patched layers compute the exact digital product (equal to the unpatched model's)."""
    layers = [m for _, m in analog_layers(model)]
    previous = [m.hf_cim_state.disabled for m in layers]
    for m in layers:
        m.hf_cim_state.disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous):
            m.hf_cim_state.disabled = prev


def set_noise_level(model: nn.Module, level: float) -> None:
    """Scale every noise magnitude of every patched layer by ``level`` (>= 0; 0 keeps only the converters)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= 100.0:
        raise ValueError(f"set_noise_level: `level` must be a number in [0, 100], got {level!r}")
    for _, m in analog_layers(model):
        m.hf_cim_state.level = float(level)


def set_drift_time(model: nn.Module, t_inference: float) -> None:
    """Run every patched layer's device model at ``t_inference`` seconds after programming (>= 0).

    In training this puts drift (and the drift compensation of the device model) into the loop: every forward draws
    its devices as a chip of that age, so the network learns the drifted, compensated weights it will meet.
    :func:`hf_cim.program_chip` sets the same time for a programmed chip; 0 (the default) means no drift.
    """
    if isinstance(t_inference, bool) or not isinstance(t_inference, (int, float)) or not 0.0 <= t_inference < math.inf:
        raise ValueError(f"set_drift_time: `t_inference` must be a finite number of seconds >= 0, got {t_inference!r}")
    for _, m in analog_layers(model):
        m.hf_cim_state.t_inference = float(t_inference)


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every patched layer's noise stream from ``seed``: the next forwards repeat the same noise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"reseed: `seed` must be an int >= 0, got {seed!r}")
    for _, m in analog_layers(model):
        m.reseed(seed)
