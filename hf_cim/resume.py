"""Resume state: the noise streams of every patched layer saved into each Trainer checkpoint and restored on resume.

:class:`NoiseStateCallback` (a thin ``TrainerCallback``) calls :func:`save_noise_state` on every save and
:func:`load_noise_state` when training resumes, so a resumed run draws the same noise as an uninterrupted one. The
state file is safetensors (generator states) with JSON metadata (config, levels, drift times, seeds): nothing pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback

from .config import AnalogNoiseConfig
from .patch import analog_layers, get_config

__all__ = ["NOISE_STATE_NAME", "NoiseStateCallback", "load_noise_state", "save_noise_state"]

logger = logging.getLogger(__name__)

NOISE_STATE_NAME = "hf_cim_noise_state.safetensors"


def _config_of(model: nn.Module, owner: str) -> AnalogNoiseConfig:
    config = get_config(model)
    if config is None:
        raise ValueError(f"{owner}: the model is not patched (no AnalogNoiseConfig); call hf_cim.patch_model first")
    return config


def _state_file(directory: str, process_index: int = 0, world_size: int = 1) -> str:
    name = (
        NOISE_STATE_NAME
        if world_size <= 1
        else NOISE_STATE_NAME.replace(".safetensors", f"_{process_index}.safetensors")
    )
    return os.path.join(directory, name)


def save_noise_state(
    model: nn.Module, directory: str | os.PathLike, process_index: int = 0, world_size: int = 1
) -> str:
    """Write every patched layer's noise state to ``hf_cim_noise_state.safetensors`` (one file per process when
    ``world_size > 1``): the generator state (noise stream position), runtime ``level``, ``t_inference`` and seed,
    plus the noise config in the metadata. Returns the path."""
    config = _config_of(model, "save_noise_state")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for _, layer in analog_layers(model):
        state = layer.hf_cim_state
        if state.generator is not None:
            tensors[state.name] = state.generator.get_state().cpu().contiguous()
        layers[state.name] = {"level": state.level, "t_inference": state.t_inference, "seed": state.seed}
    os.makedirs(directory, exist_ok=True)
    path = _state_file(os.fspath(directory), process_index, world_size)
    meta = {"config": config.to_json_string(), "layers": json.dumps(layers, sort_keys=True)}
    save_file(tensors, path, metadata=meta)
    return path


def load_noise_state(
    model: nn.Module, directory: str | os.PathLike, process_index: int = 0, world_size: int = 1
) -> bool:
    """Restore what :func:`save_noise_state` wrote; returns False (and warns) when the folder has no state file.

    A saved config that differs from the model's is reported field by field (warning): the model keeps its own.

    Raises:
        ValueError: the file is not valid, naming it, the layer and the field: each layer's ``level`` must be a
            finite number in [0, 100], ``t_inference`` a finite number >= 0, ``seed`` an int >= 0, the generator
            state a 1-D uint8 tensor of the size of a generator on the layer's device, every layer named an analog
            layer of ``model``, and the ``config`` a valid :class:`AnalogNoiseConfig`. Nothing of the model changes
            then.
    """
    path = _state_file(os.fspath(directory), process_index, world_size)
    if not os.path.isfile(path):
        logger.warning(
            "hf_cim: no %s in %s; the noise streams restart from the seed", os.path.basename(path), directory
        )
        return False
    layers, states, saved = _read_noise_state(path, model)
    current = _config_of(model, "load_noise_state")
    if saved != current:
        a, b = saved.to_dict(), current.to_dict()
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        logger.warning(
            "hf_cim: the checkpoint's noise config differs from the model's in %s; keeping the model's", diff
        )
    seen = set()
    for _, layer in analog_layers(model):
        state = layer.hf_cim_state
        name = state.name
        if name not in layers:
            continue
        seen.add(name)
        info = layers[name]
        state.level = float(info["level"])
        state.t_inference = float(info["t_inference"])
        layer.reseed(info["seed"])
        if name in states:
            layer.noise_generator(next(layer.parameters()).device).set_state(states[name])
    missing = sorted({lay.hf_cim_state.name for _, lay in analog_layers(model)} - seen)
    if missing:
        logger.warning("hf_cim: no saved noise state for layer(s) %s; they restart from the seed", missing[:8])
    return True


def _read_noise_state(
    path: str, model: nn.Module
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor], AnalogNoiseConfig]:
    """The layers' fields, generator states and config of the state file at ``path``, validated against ``model``
    (ValueError naming the file, layer and field); reads everything before anything is applied."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            states = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"{path}: not a readable safetensors file of noise state ({err})") from err
    for key in ("config", "layers"):
        if key not in meta:
            raise ValueError(f"{path}: no `{key}` metadata (not written by hf_cim.resume.save_noise_state)")
    try:
        saved = AnalogNoiseConfig.from_json_string(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the `config` metadata is not a valid noise config: {err}") from err
    try:
        layers = json.loads(meta["layers"])
    except ValueError as err:
        raise ValueError(f"{path}: the `layers` metadata is not valid JSON ({err})") from err
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(
            f"{path}: the `layers` metadata must map layer names to {{level, t_inference, seed}}, got {layers!r:.200}"
        )

    devices = {lay.hf_cim_state.name: next(lay.parameters()).device for _, lay in analog_layers(model)}
    unknown = sorted((set(layers) | set(states)) - set(devices))
    if unknown:
        raise ValueError(
            f"{path}: layer(s) {unknown[:8]} are not analog layers of the model (it has {sorted(devices)[:8]}"
            f"{' ...' if len(devices) > 8 else ''})"
        )
    orphans = sorted(set(states) - set(layers))
    if orphans:
        raise ValueError(f"{path}: generator state(s) of {orphans[:8]} without an entry in the `layers` metadata")
    sizes: dict[torch.device, int] = {}
    for name, info in layers.items():
        where = f"{path}: layer {name!r}"
        for key in ("level", "t_inference", "seed"):
            if key not in info:
                raise ValueError(f"{where} lacks `{key}`")
        level, t, seed = info["level"], info["t_inference"], info["seed"]
        if not _finite_number(level) or not 0.0 <= level <= 100.0:
            raise ValueError(f"{where}: `level` must be a finite number in [0, 100], got {level!r}")
        if not _finite_number(t) or t < 0.0:
            raise ValueError(f"{where}: `t_inference` must be a finite number >= 0, got {t!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where}: `seed` must be an int >= 0, got {seed!r}")
        if name in states:
            device = devices[name]
            if device not in sizes:
                sizes[device] = torch.Generator(device=device).get_state().numel()
            state = states[name]
            if state.dtype != torch.uint8 or state.dim() != 1 or state.numel() != sizes[device]:
                raise ValueError(
                    f"{where}: the generator state (for {device.type}) must be a 1-D uint8 tensor of "
                    f"{sizes[device]} bytes, got {state.dtype} of shape {list(state.shape)}"
                )
    return layers, states, saved


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class NoiseStateCallback(TrainerCallback):
    """Save the noise streams into each Trainer checkpoint and restore them when training resumes.

    ``on_save`` writes :data:`NOISE_STATE_NAME` into ``output_dir/checkpoint-<step>``; ``on_train_begin`` of a
    resumed run (``global_step > 0``) reads it back from ``resume_from_checkpoint`` (this argument, else
    ``TrainingArguments.resume_from_checkpoint``, else ``output_dir/checkpoint-<step>``).

    Restored: each layer's generator state, runtime noise level, ``t_inference`` and seed. The Trainer restores the
    weights, optimizer, scheduler, data order and global RNGs itself. Not restored: a programmed chip
    (:func:`hf_cim.program_chip`; program it again) and ``noise_disabled`` blocks.

    Args:
        resume_from_checkpoint: the checkpoint folder passed to ``Trainer.train`` (needed only when it is not
            ``output_dir/checkpoint-<step>``).
    """

    def __init__(self, resume_from_checkpoint: str | os.PathLike | None = None) -> None:
        self.resume_from_checkpoint = resume_from_checkpoint

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or get_config(_unwrap(model)) is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_noise_state(_unwrap(model), folder, args.process_index, args.world_size)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step == 0 or get_config(_unwrap(model)) is None:
            return
        folder = self.resume_from_checkpoint or args.resume_from_checkpoint
        if not folder or not os.path.isdir(folder):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if load_noise_state(_unwrap(model), folder, args.process_index, args.world_size):
            logger.info("hf_cim: noise streams restored from %s", folder)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and get_config(model) is None:
        model = model.module
    return model
