"""Everything an analog layer carries besides its Parameters, in one object, and one way to save and restore it.

A patched layer holds one :class:`AnalogState` (``layer.hf_cim_state``): its config, name, noise level, drift time,
the ``noise_disabled`` flag, its seed and noise generator, the programmed chip and the activation-checkpoint replay
records. Code outside the layers reads and writes that object, or brackets a block with
:func:`preserve_analog_state`, instead of touching loose attributes: a sweep over chips, a gradient probe or a resume
changes the state inside the block and finds it exactly as it was afterwards.

The state is plain Python data (a dataclass with tensors and a ``torch.Generator``) kept in the module's ``__dict__``,
like the loose attributes were: ``copy.deepcopy``, pickling, ``state_dict`` (which does not include it) and FSDP2 /
DDP wrapping see it as they saw them.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AnalogNoiseConfig

__all__ = ["REPLAY_DEPTH", "STATE_ATTR", "AnalogState", "analog_states", "preserve_analog_state"]

#: The attribute of a patched layer that holds its :class:`AnalogState`.
STATE_ATTR = "hf_cim_state"

#: Generator states a layer keeps for checkpoint recomputes: one per forward not yet recomputed (a layer called
#: k times per step needs k); older ones (forwards never recomputed) fall off.
REPLAY_DEPTH = 16


def _replay_records() -> collections.deque:
    return collections.deque(maxlen=REPLAY_DEPTH)


#: The plain fields :meth:`AnalogState.snapshot` keeps as they are (the generator and replay records need more).
_SNAPSHOT_FIELDS = ("config", "name", "level", "seed", "t_inference", "disabled", "chip", "chip_correction")


@dataclass(eq=False)
class AnalogState:
    """The analog state of one patched layer.

    Args:
        config: the noise config the layer was patched with (shared by every layer of the model).
        name: the layer's name in the model (seeds its noise stream; hooks see it as ``ctx.layer_name``).
        level: the runtime noise level (:func:`hf_cim.set_noise_level`).
        seed: the seed of the layer's noise stream (:func:`hf_cim.reseed`), combined with the name and the rank.
        t_inference: seconds since programming, for drift (:func:`hf_cim.set_drift_time`, :func:`hf_cim.program_chip`).
        disabled: the exact digital forward (:func:`hf_cim.noise_disabled`).
        generator: the noise stream, created on the first noisy forward (after the process group exists).
        chip: the programmed chip (:func:`hf_cim.program_chip`): ``(weights, scales)`` of a dense layer, one such
            pair per projection of an experts module; None when not programmed.
        chip_correction: the programmed chip's output correction, ``(scale, offset)`` per output column of a dense
            layer (:func:`hf_cim.calibration.calibrate_chip_outputs`); None when not calibrated. Programming a chip
            or clearing it drops it: a correction belongs to the devices it was measured on.
        replay: generator states recorded by training forwards, replayed by activation-checkpoint recomputes.
        replay_generator: the copy a recompute draws from while it runs (None otherwise).
    """

    config: AnalogNoiseConfig
    name: str
    level: float
    seed: int
    t_inference: float = 0.0
    disabled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)
    chip: Any = field(default=None, repr=False)
    chip_correction: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    replay: collections.deque = field(default_factory=_replay_records, repr=False)
    replay_generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def for_layer(cls, name: str, config: AnalogNoiseConfig) -> AnalogState:
        """The state of a freshly patched layer ``name``: the config's level and seed, no drift, nothing drawn yet."""
        return cls(config=config, name=name, level=config.level, seed=config.seed)

    def snapshot(self) -> _Snapshot:
        """Everything :meth:`restore` needs to put this state back, generator position included."""
        gen = self.generator
        return _Snapshot(
            fields=tuple(getattr(self, name) for name in _SNAPSHOT_FIELDS),
            generator=gen,
            generator_state=None if gen is None else gen.get_state(),
            replay=list(self.replay),
            replay_generator=self.replay_generator,
        )

    def restore(self, snap: _Snapshot) -> None:
        """Put back what :meth:`snapshot` saw: the same generator object, rewound to the same position."""
        for name, value in zip(_SNAPSHOT_FIELDS, snap.fields):
            setattr(self, name, value)
        if snap.generator is not None:
            snap.generator.set_state(snap.generator_state)
        self.generator = snap.generator
        self.replay.clear()
        self.replay.extend(snap.replay)
        self.replay_generator = snap.replay_generator


@dataclass(frozen=True)
class _Snapshot:
    fields: tuple
    generator: torch.Generator | None
    generator_state: torch.Tensor | None
    replay: list
    replay_generator: torch.Generator | None


def analog_states(model: nn.Module) -> Iterator[tuple[nn.Module, AnalogState]]:
    """Every patched layer of ``model`` with its :class:`AnalogState`, in ``model.modules()`` order."""
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTR)
        if isinstance(state, AnalogState):
            yield module, state


@contextlib.contextmanager
def preserve_analog_state(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, change any patched layer's state freely; on exit (also on an exception) every layer's
    config, level, drift time, ``disabled`` flag, seed, programmed chip, checkpoint replay records and noise
    generator are what they were on entry. The generator is the same object, rewound: the noise drawn after the block
    is the noise that would have been drawn without it. Training flags and Parameters are not touched."""
    saved = [(state, state.snapshot()) for _, state in analog_states(model)]
    try:
        yield model
    finally:
        for state, snap in saved:
            state.restore(snap)
