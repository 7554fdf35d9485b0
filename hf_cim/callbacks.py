"""``TrainerCallback``\\ s for noise-aware training: memory and speed, gradient alignment, noise-level schedules.

Each callback is a thin adapter over plain logic that also works outside ``Trainer`` and lives in its own module:
:mod:`hf_cim.memory` (:class:`~hf_cim.memory.MemoryTracker`, :class:`~hf_cim.memory.StepMeter`),
:mod:`hf_cim.alignment` (:func:`~hf_cim.alignment.gradient_alignment`), and :meth:`NoiseLevelCallback.level_at`.
``MemoryTracker`` and ``gradient_alignment`` are also importable from here, and so is
:class:`~hf_cim.resume.NoiseStateCallback` (noise streams in Trainer checkpoints), so every callback has one address.

How the values reach the logs: ``Trainer.log`` appends a *copy* of ``logs`` to ``state.log_history`` before it calls
``on_log``, and ``Trainer(callbacks=...)`` puts user callbacks after the reporting integrations (TensorBoard, W&B...),
so a callback that only adds keys in ``on_log`` reaches neither. The callbacks here therefore (1) write their keys
into the record just appended to ``state.log_history``, wherever they are, and (2) are meant to be added with
:func:`add_callbacks`, which puts them ahead of the integrations, so the keys they add to ``logs`` reach all of
them; each one warns at ``on_train_begin`` when it finds itself behind an integration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from transformers.trainer_callback import TrainerCallback

from .alignment import gradient_alignment
from .calibration import batch_to, calibrate_input_ranges, calibrate_output_ranges, default_forward
from .clipping import clip_weights_
from .distributed import all_gather_floats, world
from .memory import MemoryTracker, StepMeter
from .patch import analog_layers, set_noise_level
from .resume import NoiseStateCallback
from .rng import derive_seed
from .validation import check_range

__all__ = [
    "DigitalWarmupCallback",
    "GradientAlignmentCallback",
    "InputRangeCallback",
    "MemoryTracker",
    "NoiseLevelCallback",
    "NoiseStateCallback",
    "OutputRangeCallback",
    "PeakMemoryCallback",
    "WeightClipCallback",
    "add_callbacks",
    "gradient_alignment",
]

logger = logging.getLogger(__name__)


# -- logging plumbing -------------------------------------------------------------------------------------------------
def _integration_types() -> tuple[type, ...]:
    """transformers' reporting integrations (TensorBoard, W&B, MLflow...: ``report_to``'s callbacks)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK.values())


def add_callbacks(trainer: Any, *callbacks: TrainerCallback) -> Any:
    """Add hf_cim callbacks to ``trainer`` so that what they log reaches every reporting integration; returns it.

    ``Trainer`` calls its callbacks in list order, and ``Trainer(callbacks=...)`` / ``trainer.add_callback`` put them
    *after* the integrations of ``report_to``, whose ``on_log`` has then already sent the record. This inserts the
    hf_cim logging callbacks (:class:`PeakMemoryCallback`, :class:`GradientAlignmentCallback`,
    :class:`NoiseLevelCallback`) at the front of ``trainer.callback_handler.callbacks``, ordered among themselves
    (memory first, so their work at step end is not timed as training; then the noise level, then gradient
    alignment), ahead of every integration; any other callback (e.g. :class:`NoiseStateCallback`) is added
    with ``trainer.add_callback``. Each hf_cim logging callback checks its place at ``on_train_begin`` and warns if
    a reporting integration runs before it (added to the front later) or, when it was not added through this
    function, if ``report_to`` names an integration.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train)
        add_callbacks(trainer, PeakMemoryCallback(), NoiseLevelCallback(1.0, sample_range=(0.5, 2.0)))
    """
    handler = trainer.callback_handler
    for cb in callbacks:
        if isinstance(cb, type) or not isinstance(cb, TrainerCallback):
            raise TypeError(f"add_callbacks: pass TrainerCallback instances, got {cb!r}")
        if any(c is cb for c in handler.callbacks):
            raise ValueError(f"add_callbacks: {type(cb).__name__} is already among the trainer's callbacks")
        if not isinstance(cb, _LoggingCallback):
            trainer.add_callback(cb)
            continue
        at = 0
        while (
            at < len(handler.callbacks)
            and isinstance(handler.callbacks[at], _LoggingCallback)
            and handler.callbacks[at]._front_rank <= cb._front_rank
        ):
            at += 1
        handler.callbacks.insert(at, cb)
        cb._handler = handler
    return trainer


class _LoggingCallback(TrainerCallback):
    """Base: values gathered during the steps are merged into the next ``Trainer.log`` record.

    Subclasses implement :meth:`_collect_logs`, called at every ``on_log`` on every process (it may run collectives,
    since ``Trainer.log`` is called on all ranks at the same points). The values go into ``logs`` (what the
    callbacks after this one, integrations included, see: :func:`add_callbacks` puts it ahead of them) and into the
    record ``Trainer.log`` has just appended to ``state.log_history`` (whatever the place).
    """

    #: Position among hf_cim callbacks at the front of the list: lower runs first.
    _front_rank = 1

    def __init__(self) -> None:
        self._handler: Any = None  # set by add_callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_place(args)

    def _check_place(self, args) -> None:
        name = type(self).__name__
        if self._handler is None:
            reports = [r for r in (args.report_to or []) if r != "none"]
            if reports:
                logger.warning(
                    "%s was not added with hf_cim.callbacks.add_callbacks(trainer, ...): its values reach "
                    "state.log_history, but not the reporting integrations %s, which run before it",
                    name,
                    reports,
                )
            return
        callbacks = self._handler.callbacks
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), None)
        before = [type(cb).__name__ for cb in callbacks[: mine or 0] if isinstance(cb, _integration_types())]
        if before:
            logger.warning(
                "%s runs after the reporting integration(s) %s: they do not see its values (only "
                "state.log_history does); add integrations before calling hf_cim.callbacks.add_callbacks",
                name,
                before,
            )

    def _collect_logs(self, args, state) -> dict[str, float]:
        """The values to add to this log entry; the subclasses say what they measure (none here)."""
        return {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = self._collect_logs(args, state)
        if not values:
            return
        if logs is not None:
            logs.update(values)
        # Trainer.log appended {**logs, "step": global_step} just before calling on_log: that is the record.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


# -- memory and speed --------------------------------------------------------------------------------------------------
class PeakMemoryCallback(_LoggingCallback):
    """Per logging window: peak memory, its growth since training started, step time and throughput.

    Logged keys (into ``state.log_history`` and every reporting integration):

    * ``peak_memory_mb``: peak of the window, MiB. CUDA: ``torch.cuda.max_memory_allocated`` (reset at each log);
      CPU: the process's peak RSS (reset at each log where Linux allows, else the lifetime peak).
    * ``peak_memory_growth_mb``: ``peak_memory_mb`` minus the memory in use when training began, MiB.
    * ``step_time_s``: mean wall time of one optimizer step (``on_step_begin`` → ``on_step_end``: forward,
      backward and optimizer of all accumulation micro-batches; data loading and logging excluded), seconds.
    * ``samples_per_second``: samples of all ranks / the slowest rank's summed step time. Samples per step are
      ``per_device_train_batch_size × gradient_accumulation_steps`` per rank (a short last batch counts as full).
    * ``tokens_per_second``: ``samples_per_second × tokens_per_sample`` when given, else from
      ``state.num_input_tokens_seen`` when ``TrainingArguments.include_num_input_tokens_seen`` is on.

    With several processes each rank measures itself and every rank logs the maximum over ranks (the slowest step
    time, the largest peak). At the end of training rank 0 writes ``hf_cim_memory.json`` into ``output_dir``: the
    overall peak, mean step time, throughput, device, world size and the per-rank numbers.

    Args:
        output_dir: where to write ``hf_cim_memory.json`` (default: ``TrainingArguments.output_dir``).
        tokens_per_sample: tokens in one sample (e.g. the block size of a language model), for ``tokens_per_second``.
    """

    _front_rank = 0  # runs first among hf_cim callbacks, so their work at step end is not timed as training
    FILENAME = "hf_cim_memory.json"

    def __init__(self, output_dir: str | None = None, tokens_per_sample: int | None = None) -> None:
        super().__init__()
        if tokens_per_sample is not None and (
            isinstance(tokens_per_sample, bool) or not isinstance(tokens_per_sample, int) or tokens_per_sample < 1
        ):
            raise ValueError(f"PeakMemoryCallback: `tokens_per_sample` must be an int >= 1, got {tokens_per_sample!r}")
        self.output_dir = output_dir
        self.tokens_per_sample = tokens_per_sample
        self.meter: StepMeter | None = None
        self.summary: dict[str, Any] | None = None

    @property
    def tracker(self) -> MemoryTracker | None:
        """The memory tracker of the run (None before training begins)."""
        return None if self.meter is None else self.meter.tracker

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.meter = StepMeter(args.device, self.tokens_per_sample, state.num_input_tokens_seen or 0)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.step_end(args.per_device_train_batch_size * args.gradient_accumulation_steps)

    def _collect_logs(self, args, state) -> dict[str, float]:
        if self.meter is None:
            return {}
        return self.meter.window(state.num_input_tokens_seen or 0)

    def on_train_end(self, args, state, control, **kwargs):
        if self.meter is None:
            return
        self.summary = self.meter.summary(state.num_input_tokens_seen or 0)
        if state.is_world_process_zero:
            out_dir = self.output_dir or args.output_dir
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, self.FILENAME)
            with open(path, "w") as f:
                json.dump(self.summary, f, indent=2)
            logger.info("PeakMemoryCallback: wrote %s", path)


# -- gradient alignment -----------------------------------------------------------------------------------------------
class GradientAlignmentCallback(_LoggingCallback):
    """Every ``every_n_steps`` optimizer steps, logs :func:`gradient_alignment` on a fixed probe batch.

    Logged keys: ``grad_cosine`` (all trainable parameters), ``grad_norm_ratio`` and ``grad_cosine/<layer>``; with
    several processes each rank probes with its own noise sample and every rank logs the mean over ranks. The
    values computed at step ``k`` are added to the next log record (choose ``every_n_steps`` as a multiple of
    ``logging_steps`` to have them on the same step). Training is not disturbed: no optimizer state, no ``.grad``,
    no training noise stream and no global RNG is touched (see :func:`gradient_alignment`).

    Args:
        probe_batch: keyword inputs of the model with labels, e.g. ``data_collator([train_dataset[i] for i in
            range(8)])``; kept on the CPU and moved to the model's device at each probe.
        every_n_steps: probe period in optimizer steps (int >= 1).
    """

    _front_rank = 2

    def __init__(self, probe_batch: dict, every_n_steps: int = 50) -> None:
        super().__init__()
        if not isinstance(probe_batch, Mapping) or not probe_batch:
            raise ValueError(f"GradientAlignmentCallback: `probe_batch` must be a non-empty dict, got {probe_batch!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"GradientAlignmentCallback: `every_n_steps` must be an int >= 1, got {every_n_steps!r}")
        self.probe_batch = dict(probe_batch)
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps != 0:
            return
        values = gradient_alignment(model, self.probe_batch, seed=state.global_step)
        self.history.append({"step": state.global_step, **values})
        self._pending = values

    def _collect_logs(self, args, state) -> dict[str, float]:
        # Every rank probed with its own noise sample: log the mean over ranks (the same on every rank).
        values, self._pending = self._pending, {}
        if not values or world()[1] == 1:
            return values
        keys = sorted(values)
        rows = all_gather_floats([values[k] for k in keys])
        return {k: sum(r[i] for r in rows) / len(rows) for i, k in enumerate(keys)}


# -- noise level schedules --------------------------------------------------------------------------------------------
class NoiseLevelCallback(_LoggingCallback):
    """Sets the noise ``level`` of every patched layer at every training step: a warm-up ramp and/or level sampling.

    At optimizer step ``s`` (0-based) of ``S``: ``level = target_level · ramp(s) · u``, with
    ``ramp(s) = min(1, s / ceil(warmup_ratio · S))`` (1 without warm-up) and ``u`` drawn uniformly from
    ``sample_range`` (1 without sampling). ``u`` depends only on ``(seed, s)``: every rank uses the same level and a
    resumed run repeats it. Between steps (evaluation, checkpoints, other callbacks' probes) and after training, the
    model runs at ``target_level``. The mean level of each logging window is logged as ``noise_level``.

    Why sampling: a model trained at one level is best at that level and degrades away from it (see
    ``docs/trainer.md``); drawing the level per step trains one model for chips of different quality.

    Args:
        target_level: the level after warm-up (in [0, 100]).
        warmup_ratio: fraction of the training steps over which the level ramps up linearly from 0 (in [0, 1]).
        sample_range: ``(low, high)`` factors of ``target_level`` between which the per-step level is drawn
            uniformly (0 <= low <= high), e.g. ``(0.5, 2.0)``; None keeps ``target_level``.
        seed: seed of the level draws (int >= 0).
    """

    _front_rank = 1

    def __init__(
        self,
        target_level: float,
        warmup_ratio: float = 0.0,
        sample_range: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_range("NoiseLevelCallback", "target_level", target_level, 0.0, 100.0)
        check_range("NoiseLevelCallback", "warmup_ratio", warmup_ratio, 0.0, 1.0)
        if sample_range is not None:
            if not isinstance(sample_range, (tuple, list)) or len(sample_range) != 2:
                raise ValueError(
                    f"NoiseLevelCallback: `sample_range` must be a (low, high) pair or None, got {sample_range!r}"
                )
            low, high = sample_range
            check_range("NoiseLevelCallback", "sample_range[0]", low, 0.0, None)
            check_range("NoiseLevelCallback", "sample_range[1]", high, float(low), None)
            if high * target_level > 100.0:
                raise ValueError(
                    f"NoiseLevelCallback: `sample_range` {tuple(sample_range)} × `target_level` {target_level} "
                    "exceeds the largest level 100"
                )
            sample_range = (float(low), float(high))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"NoiseLevelCallback: `seed` must be an int >= 0, got {seed!r}")
        self.target_level = float(target_level)
        self.warmup_ratio = float(warmup_ratio)
        self.sample_range = sample_range
        self.seed = seed
        self._levels: list[float] = []

    def level_at(self, step: int, max_steps: int) -> float:
        """The level of optimizer step ``step`` (0-based) in a run of ``max_steps`` steps."""
        warmup = math.ceil(self.warmup_ratio * max_steps)
        ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
        factor = 1.0
        if self.sample_range is not None:
            low, high = self.sample_range
            factor = random.Random(derive_seed(self.seed, "noise_level", step)).uniform(low, high)
        return min(100.0, self.target_level * ramp * factor)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        level = self.level_at(state.global_step, state.max_steps)
        set_noise_level(model, level)
        self._levels.append(level)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_noise_level(model, self.target_level)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_noise_level(model, self.target_level)

    def _collect_logs(self, args, state) -> dict[str, float]:
        if not self._levels:
            return {}
        mean = sum(self._levels) / len(self._levels)
        self._levels = []
        return {"noise_level": round(mean, 6)}


class DigitalWarmupCallback(TrainerCallback):
    """Trains the first ``ratio`` of the optimizer steps digitally, the rest on the simulated chip: noise-aware
    fine-tuning of a model trained digitally from scratch, within one run and one learning-rate schedule.

    During optimizer steps ``0 … ceil(ratio · max_steps) − 1`` every patched layer computes the exact digital product
    (as inside :func:`hf_cim.noise_disabled`: no converters, no noise, the plain gradient); once the step's gradients
    are computed (before the optimizer step) the layers are analog again, so the other callbacks' step ends,
    evaluation and checkpoints see the chip. The step count comes from the Trainer's state, so a resumed run
    continues where it stopped.

    Why: on the `pcm` chip (3 training seeds × 5 chips, 1,000 steps, docs/fidelity.md) the noise-aware model trained
    from scratch wins back 61 % of what the chip takes from the digital model and costs 0.039 nats of clean loss; with
    the first 25 % of the steps digital it wins back 94 % (74 % after a day of drift) for 0.005 nats. Early training
    through the ADC's clip is slow and shapes the model around it; a short digital start finds the model first.

    Args:
        ratio: share of the training steps run digitally, in [0, 1) (0: noise-aware from the first step).
    """

    def __init__(self, ratio: float = 0.25) -> None:
        super().__init__()
        check_range("DigitalWarmupCallback", "ratio", ratio, 0.0, 1.0, high_inclusive=False)
        self.ratio = float(ratio)
        self._restore: list[tuple[Any, bool]] = []

    def digital_steps(self, max_steps: int) -> int:
        """How many of ``max_steps`` optimizer steps run digitally."""
        return math.ceil(self.ratio * max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step >= self.digital_steps(state.max_steps):
            return
        layers = [m for _, m in analog_layers(model)]
        self._restore = [(m, m.hf_cim_state.disabled) for m in layers]
        for m in layers:
            m.hf_cim_state.disabled = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Analog again as soon as the step's forwards and backwards are done: every callback's on_step_end (a gradient
        # probe, say), evaluation and checkpoints see the chip, whatever the callbacks' order.
        for m, previous in self._restore:
            m.hf_cim_state.disabled = previous
        self._restore = []

    on_step_end = on_train_end = on_pre_optimizer_step


class _RangeCallback(TrainerCallback):
    """Calibrates converter ranges with ``calibrate`` on fixed ``batches`` when training begins, every ``every``
    optimizer steps and when training ends."""

    def __init__(self, calibrate: Callable[..., Any], batches: list[Any], every: int, alpha: float, forward) -> None:
        super().__init__()
        who = type(self).__name__
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{who}: `every` must be an int >= 1, got {every!r}")
        check_range(who, "alpha", alpha, 0.1, 1000.0)
        self.batches = list(batches)
        if not self.batches:
            raise ValueError(f"{who}: `batches` is empty: give at least one calibration batch")
        self.calibrate = calibrate
        self.every = every
        self.alpha = float(alpha)
        self.forward = forward

    def _calibrate(self, model: Any) -> None:
        device = next(model.parameters()).device
        self.calibrate(model, [batch_to(b, device) for b in self.batches], alpha=self.alpha, forward=self.forward)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._calibrate(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._calibrate(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._calibrate(model)


class InputRangeCallback(_RangeCallback):
    """Keeps a static DAC's ranges (``input_quant="static"``) calibrated while ``Trainer`` trains.

    Calibrates on ``batches`` (:func:`hf_cim.calibration.calibrate_input_ranges`) when training begins and after
    every ``every`` optimizer steps, so the ranges follow the inputs' statistics as the weights move, and once more
    when training ends (the ranges the saved model is measured and reloaded with). The batches are fixed: the same
    weights give the same ranges, on every rank of a distributed run when every rank is handed the same batches
    (DDP keeps the weights equal).

    Args:
        batches: calibration inputs, e.g. a few collated training batches (moved to the model's device here).
        every: optimizer steps between calibrations (int >= 1).
        alpha: range in standard deviations of each layer's inputs (in [0.1, 1000]; default 3).
        forward: how a batch runs through the model (default: ``model(**batch)`` for a dict).
    """

    def __init__(self, batches: list[Any], every: int = 50, alpha: float = 3.0, forward=default_forward) -> None:
        super().__init__(calibrate_input_ranges, batches, every, alpha, forward)


class OutputRangeCallback(_RangeCallback):
    """Keeps the ADC ranges per layer (``output_ranges``) calibrated while ``Trainer`` trains: as
    :class:`InputRangeCallback`, with :func:`hf_cim.calibration.calibrate_output_ranges` (``alpha`` standard
    deviations of each layer's clean partial sums, default 6). With a static DAC, add it after the
    :class:`InputRangeCallback` (callbacks run in the order added): the partial sums depend on the DAC's ranges.
    """

    def __init__(self, batches: list[Any], every: int = 50, alpha: float = 6.0, forward=default_forward) -> None:
        super().__init__(calibrate_output_ranges, batches, every, alpha, forward)


class WeightClipCallback(TrainerCallback):
    """Clips every patched layer's weights to ``sigmas`` standard deviations of their output channel after each
    optimizer step (:func:`hf_cim.clipping.clip_weights_`): outliers would squeeze the rest of the channel into a
    small part of the conductance range. Every rank clips the same (equal) weights the same way.

    With a digital warm-up (:class:`DigitalWarmupCallback`), pass its ratio as ``start_ratio``: the digital steps
    train unclipped, and clipping starts with the first noise-aware step (as ``benchmarks/fidelity.py``'s
    ``ft<NN>_<mode>_clip`` modes). Why clip: on ReRAM chips a weight's programming error and a stuck-on device are
    fractions of its channel's full scale, so a channel squeezed by an outlier loses more of its signal.

    Args:
        sigmas: the bound in standard deviations, in [0.5, 100] (aihwkit's hardware-aware training: 2.5–3.5).
        start_ratio: share of the optimizer steps left unclipped first, in [0, 1): steps ``0 … ceil(start_ratio ·
            max_steps) − 1``, the same count as :meth:`DigitalWarmupCallback.digital_steps`.
    """

    def __init__(self, sigmas: float = 2.5, start_ratio: float = 0.0) -> None:
        super().__init__()
        check_range("WeightClipCallback", "sigmas", sigmas, 0.5, 100.0)
        check_range("WeightClipCallback", "start_ratio", start_ratio, 0.0, 1.0, high_inclusive=False)
        self.sigmas = float(sigmas)
        self.start_ratio = float(start_ratio)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # global_step already counts the step that just ended: step k (0-based) ended when global_step == k + 1.
        if state.global_step > math.ceil(self.start_ratio * state.max_steps):
            clip_weights_(model, self.sigmas)
