"""Robustness sweeps: one trained model evaluated on many simulated chips × noise levels × drift times.

Semantics (aihwkit's "program once, drift to t, read many times"): for each cell ``(level, t_inference)`` and each
chip seed, the model is programmed once with :func:`hf_cim.program_chip` (static noise drawn from the seed, drifted
to ``t_inference``) and that chip is kept for every batch of the evaluation; read noise is drawn at every product
from a stream restarted from the chip seed, so every cell is reproducible on its own, whatever ran before. The same
seed is the same chip at every level and time (levels scale the same draws).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .chip import program_chip
from .patch import analog_layers, get_config, noise_disabled, reseed, set_noise_level
from .rng import process_rank
from .state import preserve_analog_state
from .validation import check_number_list

__all__ = ["RobustnessResult", "evaluate_robustness", "format_time", "robustness_markdown"]

logger = logging.getLogger(__name__)


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    # Sample standard deviation (n - 1): the spread of the chip population, estimated from n chips.
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


_ROW_KEYS = ("level", "t_inference", "mean", "std", "min", "max", "n_chips")


def robustness_markdown(
    rows: Sequence[Mapping[str, Any]],
    metric: str | None = None,
    clean_value: float | None = None,
    digits: int = 4,
    owner: str = "robustness_markdown",
    human_times: bool = False,
) -> str:
    """The robustness table in Markdown: the digital baseline first (when ``clean_value`` is given), then one line
    per ``(level, t_inference)`` cell. The one renderer of the table, for :meth:`RobustnessResult.to_markdown` and the
    model card (:func:`hf_cim.model_card.write_model_card`).

    Args:
        rows: dicts with ``level``, ``t_inference`` (s), ``mean``, ``std``, ``min``, ``max`` and ``n_chips``.
        metric: the metric's name in the header (``"metric"`` when None).
        clean_value: the digital model's value of the metric, or None for no baseline line.
        digits: decimals of the metric's values.
        owner: the function named in the error.
        human_times: drift times as ``1h`` / ``1d`` (:func:`format_time`) instead of seconds.

    Raises:
        ValueError: a row lacks one of the keys above.
    """
    time_head, time_cell = ("t_inference", format_time) if human_times else ("t_inference (s)", "{:g}".format)
    lines = [
        f"| noise level | {time_head} | {metric or 'metric'} (mean ± std) | min | max | chips |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if clean_value is not None:
        lines.append(f"| digital | – | {clean_value:.{digits}f} | – | – | – |")
    for r in rows:
        missing = set(_ROW_KEYS) - set(r)
        if missing:
            raise ValueError(f"{owner}: a `robustness` row lacks the key(s) {sorted(missing)}: {r!r}")
        lines.append(
            f"| {r['level']:g} | {time_cell(r['t_inference'])} | {r['mean']:.{digits}f} ± {r['std']:.{digits}f} | "
            f"{r['min']:.{digits}f} | {r['max']:.{digits}f} | {r['n_chips']} |"
        )
    return "\n".join(lines)


@dataclass
class RobustnessResult:
    """The table of a robustness sweep.

    Attributes:
        metric: the metric's key (e.g. ``"eval_loss"``).
        rows: one dict per ``(level, t_inference)`` cell: ``level``, ``t_inference`` (s), ``mean``, ``std``
            (sample std over chips, 0 for one chip), ``min``, ``max``, ``n_chips`` and ``values`` (one per chip,
            in ``seeds`` order).
        clean: every metric of the digital baseline (:func:`hf_cim.noise_disabled`).
        seeds: the chip seeds.
        config: the model's :class:`~hf_cim.AnalogNoiseConfig` as a dict (None if unknown).
    """

    metric: str
    rows: list[dict[str, Any]]
    clean: dict[str, float]
    seeds: list[int] = field(default_factory=list)
    config: dict[str, Any] | None = None

    @property
    def clean_value(self) -> float | None:
        return self.clean.get(self.metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> RobustnessResult:
        with open(path) as f:
            data = json.load(f)
        return cls(**data)

    def to_csv(self, path: str) -> None:
        """One line per cell; ``values`` joined by ``;``. The digital baseline is the row with ``level`` = digital."""
        cols = ["level", "t_inference", "mean", "std", "min", "max", "n_chips", "values"]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(cols)
            clean = self.clean_value
            if clean is not None:
                writer.writerow(["digital", 0.0, clean, 0.0, clean, clean, 0, ""])
            for row in self.rows:
                writer.writerow([*(row[c] for c in cols[:-1]), ";".join(repr(v) for v in row["values"])])

    def to_markdown(self, digits: int = 4) -> str:
        """A Markdown table (for a model card): one line per cell, the digital baseline first."""
        return robustness_markdown(self.rows, self.metric, self.clean_value, digits)

    def plot(self, path: str | None = None, title: str | None = None):
        """Metric vs level (one line per time) and metric vs time (one line per level), error bars = ±1 std.

        Needs matplotlib (``pip install hf-cim[plot]``). Returns the figure; saves it to ``path`` when given.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("RobustnessResult.plot needs matplotlib: pip install 'hf-cim[plot]'") from err

        levels = sorted({r["level"] for r in self.rows})
        times = sorted({r["t_inference"] for r in self.rows})
        panels = [p for p, n in (("level", len(levels)), ("time", len(times))) if n > 1] or ["level"]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        clean = self.clean_value
        for ax, panel in zip(axes[0], panels):
            x_key, group_key, groups = (
                ("level", "t_inference", times) if panel == "level" else ("t_inference", "level", levels)
            )
            for g in groups:
                cells = sorted((r for r in self.rows if r[group_key] == g), key=lambda r: r[x_key])
                label = f"t = {g:g} s" if group_key == "t_inference" else f"level {g:g}"
                ax.errorbar(
                    [r[x_key] for r in cells],
                    [r["mean"] for r in cells],
                    yerr=[r["std"] for r in cells],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            if clean is not None:
                ax.axhline(clean, color="k", linestyle="--", linewidth=1, label="digital")
            if panel == "time":
                positive = [t for t in times if t > 0]
                if positive and len(positive) == len(times):
                    ax.set_xscale("log")
                elif positive:
                    # t = 0 (right after programming) on a log axis: linear below the smallest positive time.
                    ax.set_xscale("symlog", linthresh=min(positive))
                    ax.set_xlim(left=0.0)
                ax.set_xlabel("t_inference (s)")
            else:
                ax.set_xlabel("noise level")
            ax.set_ylabel(self.metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        n_chips = max((r["n_chips"] for r in self.rows), default=0)
        fig.suptitle(title or f"{self.metric} on {n_chips} simulated chips (mean ± std)", fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
        return fig


#: Units of drift times in tracker keys and tables, largest first; a year is the Julian year (365.25 d).
TIME_UNITS = {"y": 365.25 * 86400, "w": 7 * 86400, "d": 86400.0, "h": 3600.0, "min": 60.0, "s": 1.0}


def format_time(seconds: float) -> str:
    """The largest unit of :data:`TIME_UNITS` that divides ``seconds`` exactly: 86400 → ``"1d"``, 90 → ``"90s"``,
    5400 → ``"90min"``, 0 → ``"0"``; other values as seconds (``"0.5s"``)."""
    if seconds == 0:
        return "0"
    for unit, size in TIME_UNITS.items():
        n = seconds / size
        if n >= 1 and abs(n - round(n)) < 1e-9 * n:
            return f"{round(n)}{unit}"
    return f"{seconds:g}s"


def _is_trainer(obj: Any) -> bool:
    return callable(getattr(obj, "evaluate", None)) and hasattr(obj, "callback_handler")


def _as_evaluate_fn(
    evaluate_fn: Any, model: nn.Module, evaluate_kwargs: dict[str, Any] | None = None
) -> Callable[[nn.Module], dict[str, float]]:
    if _is_trainer(evaluate_fn):  # a transformers.Trainer
        trainer_model = getattr(evaluate_fn, "model", None)
        if trainer_model is not model:
            raise ValueError("evaluate_robustness: the Trainer's `model` is not the model being swept")
        return lambda _: evaluate_fn.evaluate(**(evaluate_kwargs or {}))
    if evaluate_kwargs:
        raise ValueError("evaluate_robustness: `evaluate_kwargs` is for a Trainer as `evaluate_fn`")
    if callable(evaluate_fn):
        return evaluate_fn
    raise TypeError(
        f"evaluate_robustness: `evaluate_fn` must be a callable model -> dict or a transformers.Trainer, "
        f"got {type(evaluate_fn).__name__}"
    )


@contextmanager
def _logs_muted(trainer: Any) -> Iterator[None]:
    """Within the block, ``trainer.log`` records nothing (no ``log_history`` entry, no ``on_log``)."""
    if trainer is None:
        yield
        return
    had_own = "log" in vars(trainer)
    own = vars(trainer).get("log")
    trainer.log = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had_own:
            trainer.log = own
        else:
            del trainer.log


def _summary_logs(rows: list[dict[str, Any]], metric: str, prefix: str) -> dict[str, float]:
    name = metric.removeprefix("eval_")
    out: dict[str, float] = {}
    for r in rows:
        key = f"{prefix}/level_{r['level']:g}/t_{format_time(r['t_inference'])}/{name}"
        out[key], out[f"{key}_std"] = r["mean"], r["std"]
    return out


def _metric_of(metrics: Any, metric: str) -> float:
    if not isinstance(metrics, dict) or metric not in metrics:
        keys = sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__
        raise KeyError(f"evaluate_robustness: `metric` {metric!r} is not in the evaluation's result {keys}")
    return float(metrics[metric])


def evaluate_robustness(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | Any,
    metric: str,
    seeds: int | Sequence[int] = 5,
    levels: Sequence[float] = (1.0,),
    t_inference: Sequence[float] = (0.0,),
    output_dir: str | None = None,
    progress: bool = True,
    plot: bool = True,
    evaluate_kwargs: dict[str, Any] | None = None,
    log_prefix: str | None = "chip",
    calibrate_chip: Callable[[nn.Module], Any] | None = None,
) -> RobustnessResult:
    """Evaluate ``model`` on simulated chips (seeds) × noise levels × drift times; mean ± std over chips per cell.

    Args:
        model: a patched model (:func:`hf_cim.patch_model`).
        evaluate_fn: ``evaluate_fn(model) -> dict[str, float]``, or a ``transformers.Trainer`` built on ``model``
            (its ``evaluate(**evaluate_kwargs)`` is called; see ``log_prefix`` for what reaches its logs).
        metric: the key of the metric in the returned dict (e.g. ``"eval_loss"``, ``"eval_accuracy"``).
        seeds: the chip seeds, or a count ``n`` for seeds ``0 … n-1``.
        levels: noise levels (each in [0, 100]; 1 is the configured noise).
        t_inference: seconds since programming (>= 0), for drift and accumulated read noise.
        output_dir: if given, writes ``robustness.json``, ``robustness.csv`` and (with ``plot``) ``robustness.png``
            there (rank 0 only in a distributed run).
        progress: show a ``tqdm`` progress bar over the evaluations (rank 0 only).
        plot: draw the plot into ``output_dir`` (needs matplotlib; skipped with a warning if missing).
        evaluate_kwargs: keyword arguments of ``Trainer.evaluate`` (e.g. ``eval_dataset``), with a Trainer only.
        log_prefix: with a Trainer: the digital evaluation logs its metrics as usual (``eval_loss`` once), the
            chip evaluations log nothing (they would put the same ``eval_*`` keys at one step: a cloud of points in
            TensorBoard / W&B), and one record follows the sweep (``Trainer.log``, so ``state.log_history`` and
            every integration get it) with per cell ``<log_prefix>/level_<l>/t_<time>/<metric>`` (mean over chips)
            and ``..._std`` (``chip/level_1/t_1d/loss``; ``eval_`` dropped from the metric, times as
            :func:`format_time`). None: every evaluation logs as usual and no summary is logged.
        calibrate_chip: called with the model after each chip is programmed, before it is measured: a chip's own
            calibration, e.g. ``functools.partial(hf_cim.calibration.calibrate_chip_outputs, batches=batches)``
            (per-column output correction). The measuring noise is reseeded after it, so it does not depend on what
            the calibration drew.

    The model runs in eval mode with noise on (whatever ``noise_in_eval`` says) during the sweep, and the digital
    baseline under :func:`hf_cim.noise_disabled`. Afterwards the model's training flags, noise level, programmed
    chip, drift time, noise streams and config are restored. Deterministic given the seeds (and a deterministic
    ``evaluate_fn``).

    Returns:
        A :class:`RobustnessResult` with one row per ``(level, t_inference)`` in the order given.
    """
    layers = [layer for _, layer in analog_layers(model)]
    if not layers:
        raise ValueError("evaluate_robustness: the model has no patched layer; call hf_cim.patch_model first")
    if isinstance(seeds, bool):
        raise ValueError(f"evaluate_robustness: `seeds` must be an int >= 1 or a list of ints >= 0, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"evaluate_robustness: `seeds` must be >= 1 chips, got {seeds}")
        seeds = list(range(seeds))
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"evaluate_robustness: `seeds` must be a non-empty list of ints >= 0, got {seeds!r}")
    levels = check_number_list("evaluate_robustness", "levels", levels, 0.0, 100.0)
    times = check_number_list("evaluate_robustness", "t_inference", t_inference, 0.0, None)
    if calibrate_chip is not None and not callable(calibrate_chip):
        raise ValueError(f"evaluate_robustness: `calibrate_chip` must be callable or None, got {calibrate_chip!r}")
    run = _as_evaluate_fn(evaluate_fn, model, evaluate_kwargs)
    trainer = evaluate_fn if _is_trainer(evaluate_fn) and log_prefix is not None else None

    modes = [(m, m.training) for m in model.modules()]
    is_main = process_rank() == 0
    rows: list[dict[str, Any]] = []
    try:
        with preserve_analog_state(model):  # each layer's config, level, chip, drift time and noise stream
            model.eval()
            for layer in layers:
                state = layer.hf_cim_state
                if not state.config.noise_in_eval:
                    state.config = state.config.replace(noise_in_eval=True)
            with noise_disabled(model):
                clean = {k: float(v) for k, v in run(model).items() if isinstance(v, (int, float))}
            _metric_of(clean, metric)

            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(levels) * len(times) * len(seeds),
                desc="hf_cim robustness",
                disable=not (progress and is_main),
            )
            for level in levels:
                for t in times:
                    values = []
                    for seed in seeds:
                        set_noise_level(model, level)
                        program_chip(model, seed, t)
                        if calibrate_chip is not None:
                            calibrate_chip(model)
                        reseed(model, seed)
                        with _logs_muted(trainer):
                            values.append(_metric_of(run(model), metric))
                        bar.update(1)
                    rows.append(
                        {"level": level, "t_inference": t, **_stats(values), "n_chips": len(values), "values": values}
                    )
                    bar.set_postfix({metric: f"{rows[-1]['mean']:.4g}"})
            bar.close()
    finally:
        for m, flag in modes:
            m.training = flag

    if trainer is not None:
        trainer.log(_summary_logs(rows, metric, log_prefix))
    cfg = get_config(model)
    result = RobustnessResult(
        metric=metric, rows=rows, clean=clean, seeds=seeds, config=cfg.to_dict() if cfg is not None else None
    )
    if output_dir is not None and is_main:
        os.makedirs(output_dir, exist_ok=True)
        result.to_json(os.path.join(output_dir, "robustness.json"))
        result.to_csv(os.path.join(output_dir, "robustness.csv"))
        if plot:
            try:
                result.plot(os.path.join(output_dir, "robustness.png"))
            except ImportError as err:
                logger.warning("evaluate_robustness: no plot (%s)", err)
    return result
