"""CLI glue shared by the recipes: the analog arguments, the final chip evaluation, ``results.json`` and saving.

No library logic lives here: the noise config comes from :meth:`hf_cim.AnalogNoiseConfig.from_preset`, the chip sweep from
:func:`hf_cim.evaluation.evaluate_robustness`, the memory figures from :class:`hf_cim.callbacks.PeakMemoryCallback`.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

import hf_cim
from hf_cim.correction import CHIP_CORRECTIONS
from hf_cim.evaluation import TIME_UNITS, format_time, robustness_markdown
from hf_cim.hub import redact_argv, redact_secrets
from hf_cim.presets import LEVERS_OFF

logger = logging.getLogger("recipes")

GRADIENT_CHOICES = ("ste", "ste_detach", "full", "none")
BACKWARD_WEIGHTS_CHOICES = ("clean", "programmed")
INPUT_QUANT_CHOICES = ("per_token", "per_tensor", "static")
CHIP_CALIBRATION_CHOICES = ("none",) + CHIP_CORRECTIONS
# The recipes' "hardware-aware STE" (--gradient ste / ste_detach): the one place its defaults are set. `full`
# differentiates the ADC clip and the programmed weights itself: there the levers are off (hf_cim.presets.LEVERS_OFF).
STE_LEVER_DEFAULTS = {"mask_saturated": True, "backward_weights": "programmed", "program_gradient": True}


@dataclass
class AnalogArguments:
    """How the model is trained and measured as an analog chip."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Noise preset (hf_cim.presets.list_presets()); default paper. A model saved by hf_cim (analog "
            "checkpoint) keeps its own noise config unless --preset is given."
        },
    )
    level: float = field(default=1.0, metadata={"help": "Noise level the model is trained at (scales all noise)."})
    gradient: str = field(
        default="ste",
        metadata={
            "help": "Gradient mode: ste, ste_detach, full, or none (clean digital training; the trained model is "
            "still measured on simulated chips at the end)."
        },
    )
    target_modules: str | None = field(
        default=None,
        metadata={"help": "Layers to make analog: comma-separated names, 'all-linear' or a regex (default: all)."},
    )
    exclude_modules: str | None = field(
        default=None, metadata={"help": "Layers kept digital: comma-separated names or a regex, e.g. 'classifier'."}
    )
    analog_seed: int = field(default=0, metadata={"help": "Seed of the training noise (the chips use 0..N-1)."})
    eval_chips: int = field(default=5, metadata={"help": "Simulated chips measured at the end (0 skips the sweep)."})
    eval_levels: str = field(
        default="0,0.5,1,2",
        metadata={"help": "Comma-separated noise levels of the final sweep (the trained level is always added)."},
    )
    eval_t_inference: str = field(
        default="0",
        metadata={
            "help": "Comma-separated times since programming (drift) of the chip sweep: seconds (3600) or a number "
            "with a unit s, min, h, d, w, y (1 y = 365.25 d), e.g. 1h,1d,30d,1y."
        },
    )
    train_t_inference: str = field(
        default="0",
        metadata={
            "help": "Train for a chip of this age: every analog layer's device model runs at this time since "
            "programming in the training forward (drift and its compensation, accumulated read noise; "
            "hf_cim.set_drift_time), e.g. 1y with --preset pcm_drift. Same units as --eval_t_inference; models "
            "without a time dependence are unaffected, as in the sweep. Default 0: a freshly programmed chip."
        },
    )
    mask_saturated: bool | None = field(
        default=None,
        metadata={
            "help": "STE backward: no gradient through partial sums the ADC clipped (AnalogNoiseConfig."
            f"mask_saturated). Default: {STE_LEVER_DEFAULTS['mask_saturated']} for --gradient ste/ste_detach/none; "
            "always False with --gradient full (autograd differentiates the clip there; a true is overridden)."
        }
        | {"nargs": "?", "const": True},  # a bare --mask_saturated is true, as the other bool flags
    )
    backward_weights: str | None = field(
        default=None,
        metadata={
            "help": "STE backward: weights of the input gradient, clean or programmed (the weights the chip "
            f"computed with; AnalogNoiseConfig.backward_weights). Default: {STE_LEVER_DEFAULTS['backward_weights']} "
            "for --gradient ste/ste_detach/none; always clean with --gradient full (overridden)."
        },
    )
    program_gradient: bool | None = field(
        default=None,
        metadata={
            "help": "STE backward: the weight gradient taken on through the weight programming, each device's "
            "factor (AnalogNoiseConfig.program_gradient). Default: "
            f"{STE_LEVER_DEFAULTS['program_gradient']} for --gradient ste/ste_detach/none; always False with "
            "--gradient full (autograd differentiates the programming there; a true is overridden)."
        }
        | {"nargs": "?", "const": True},
    )
    input_quant: str | None = field(
        default=None,
        metadata={
            "help": "DAC range: per_token or per_tensor (dynamic abs-max; the presets' per_token by default) or "
            "static: one range per layer calibrated from training data (--input_range_alpha standard deviations of "
            "its inputs), recalibrated every --calibrate_every steps while training and before the chips are "
            "measured; inputs beyond it clip, as a chip's DAC with a set full scale."
        },
    )
    input_range_alpha: float = field(
        default=3.0,
        metadata={
            "help": "--input_quant static: the range in standard deviations of a layer's inputs (run_glue: 6, the "
            "range that won for MiniLM on SST-2 in docs/fidelity.md)."
        },
    )
    output_range_alpha: float | None = field(
        default=None,
        metadata={
            "help": "ADC ranges per layer: each layer's ADC clips at this many standard deviations of its clean "
            "partial sums (hf_cim.calibration.calibrate_output_ranges), recalibrated every --calibrate_every steps "
            "while training and before the chips are measured, for the trained and the digital model alike; "
            "e.g. 6. Default: the preset's one out_bound for every layer."
        },
    )
    chip_calibration: str = field(
        default="none",
        metadata={
            "help": "Each simulated chip's own calibration before it is measured, for every model alike: affine "
            "(each layer's outputs corrected per column by a scale and an offset fitted on the calibration "
            "examples, as chips with per-column affine correction do; hf_cim.calibration.calibrate_chip_outputs), "
            "gain (one scale per layer) or none. A noise-aware model trains for such a chip: each training forward's "
            "sampled chip is corrected the same way on its batch (the config's train_output_correction)."
        },
    )
    calibrate_every: int = field(
        default=50,
        metadata={
            "help": "--input_quant static / --output_range_alpha: optimizer steps between recalibrations in training."
        },
    )
    calibration_samples: int = field(
        default=64,
        metadata={
            "help": "--input_quant static / --output_range_alpha / --chip_calibration: the first N training "
            "examples (validation examples without --do_train) the ranges and chips are calibrated on."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "With --do_train, train from scratch even if output_dir holds checkpoint-* folders (by default "
            "training resumes from the last one, as transformers' examples; TrainingArguments dropped this flag)."
        },
    )
    digital_warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of the training steps run digitally before the noise-aware ones, in [0, 1) "
            "(hf_cim.callbacks.DigitalWarmupCallback; one learning-rate schedule over all steps). Default: the "
            "recipe's for --gradient ste/ste_detach (run_shakespeare 0.25, the share that won on the pcm chips in "
            "docs/fidelity.md; on the lognormal paper chip at level 3, 0.75 did better; run_glue 0.75, the share "
            "that won for MiniLM on SST-2), 0 for full. Not with --gradient none (that run is digital throughout)."
        },
    )
    weight_clip_sigmas: float | None = field(
        default=None,
        metadata={
            "help": "Clip every analog layer's weights to this many standard deviations of their output channel "
            "after each noise-aware optimizer step, from the end of the digital warm-up (hf_cim.callbacks."
            "WeightClipCallback), in [0.5, 100], or 0 for none; aihwkit's hardware-aware training uses 2.5-3.5. "
            "Default: the recipe's for the preset with --gradient ste/ste_detach (run_shakespeare: rram 2.5, with the "
            "digital warm-up 57 %% of the chip's cost won back against 44 %% unclipped, 3 seeds, docs/fidelity.md; "
            "on pcm it made no difference), none otherwise. Not with --gradient none."
        },
    )
    digital_baseline: bool = field(
        default=False,
        metadata={
            "help": "After the noise-aware run, train a digital twin (same initial weights, data order and steps; "
            "output_dir/digital_baseline) and measure it on the same simulated chips: results.json 'comparison' "
            "and comparison.md. Not with --gradient none (that run is the digital baseline itself)."
        },
    )

    def __post_init__(self) -> None:
        self.preset_given = self.preset is not None  # an analog checkpoint keeps its own noise config otherwise
        if self.preset is None:
            self.preset = "paper"
        if self.gradient not in GRADIENT_CHOICES:
            raise ValueError(f"`--gradient` must be one of {GRADIENT_CHOICES}, got {self.gradient!r}")
        if self.eval_chips < 0:
            raise ValueError(f"`--eval_chips` must be >= 0, got {self.eval_chips}")
        if self.backward_weights is not None and self.backward_weights not in BACKWARD_WEIGHTS_CHOICES:
            raise ValueError(
                f"`--backward_weights` must be one of {BACKWARD_WEIGHTS_CHOICES}, got {self.backward_weights!r}"
            )
        if self.gradient == "full":
            if self.mask_saturated or self.backward_weights == "programmed" or self.program_gradient:
                warnings.warn(
                    "--gradient full differentiates the ADC clip and the programmed weights itself: "
                    "--mask_saturated / --backward_weights / --program_gradient are set to False / clean / False",
                    stacklevel=2,
                )
            for name, value in LEVERS_OFF.items():
                setattr(self, name, value)
        else:
            for name, value in STE_LEVER_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.digital_baseline and self.gradient == "none":
            raise ValueError(
                "`--digital_baseline` trains a digital twin to compare a noise-aware model with; with "
                "`--gradient none` this run is itself the digital baseline: drop one of the two"
            )
        if self.digital_baseline and self.eval_chips == 0:
            raise ValueError(
                "`--digital_baseline` compares the two models on simulated chips: set `--eval_chips` >= 1"
            )
        if self.input_quant is not None and self.input_quant not in INPUT_QUANT_CHOICES:
            raise ValueError(f"`--input_quant` must be one of {INPUT_QUANT_CHOICES}, got {self.input_quant!r}")
        if not 0.1 <= self.input_range_alpha <= 1000.0:
            raise ValueError(f"`--input_range_alpha` must be in [0.1, 1000], got {self.input_range_alpha}")
        if self.output_range_alpha is not None and not 0.1 <= self.output_range_alpha <= 1000.0:
            raise ValueError(f"`--output_range_alpha` must be in [0.1, 1000], got {self.output_range_alpha}")
        if self.chip_calibration not in CHIP_CALIBRATION_CHOICES:
            raise ValueError(
                f"`--chip_calibration` must be one of {CHIP_CALIBRATION_CHOICES}, got {self.chip_calibration!r}"
            )
        if self.calibrate_every < 1 or self.calibration_samples < 1:
            raise ValueError(
                f"`--calibrate_every` and `--calibration_samples` must be >= 1, got {self.calibrate_every} and "
                f"{self.calibration_samples}"
            )
        if self.digital_warmup_ratio is not None:
            if not 0.0 <= self.digital_warmup_ratio < 1.0:
                raise ValueError(f"`--digital_warmup_ratio` must be in [0, 1), got {self.digital_warmup_ratio}")
            if self.gradient == "none" and self.digital_warmup_ratio > 0.0:
                raise ValueError(
                    "`--digital_warmup_ratio` runs the first steps of a noise-aware run digitally; with "
                    "`--gradient none` the whole run is digital: drop it"
                )
        if self.weight_clip_sigmas is not None:
            if self.weight_clip_sigmas != 0.0 and not 0.5 <= self.weight_clip_sigmas <= 100.0:
                raise ValueError(
                    f"`--weight_clip_sigmas` must be 0 (no clipping) or in [0.5, 100], got {self.weight_clip_sigmas}"
                )
            if self.gradient == "none" and self.weight_clip_sigmas != 0.0:
                raise ValueError(
                    "`--weight_clip_sigmas` clips the weights of noise-aware steps; with `--gradient none` the "
                    "training is digital: drop it"
                )
        self.levels = _floats("eval_levels", self.eval_levels, extra=self.level)
        self.t_inference = parse_times("eval_t_inference", self.eval_t_inference)
        self.train_time = parse_time(self.train_t_inference, "train_t_inference")
        if self.gradient == "none" and self.train_time > 0.0:
            raise ValueError(
                "`--train_t_inference` ages the chip the model trains through; with `--gradient none` the training "
                "is digital: drop it (the sweep's `--eval_t_inference` measures any model at any age)"
            )


# -- data files through datasets.load_dataset, checked row by row ----------------------------------------------------
#: local data file extension -> datasets.load_dataset builder
DATA_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "txt": "text"}


class RowLocator:
    """Where row ``i`` of a loaded dataset came from, for error messages: ``file:line`` for a local file (found by
    scanning the file only when an error is reported), ``dataset 'name' split 'train' row i`` for a Hub dataset.

    For csv / tsv it also knows each row's field count (:meth:`malformed`) and can find the first malformed row or
    invalid JSON line when ``datasets.load_dataset`` itself failed (:meth:`structural_error`)."""

    def __init__(
        self,
        path: str | None = None,
        ext: str | None = None,
        header: bool = True,
        name: str | None = None,
        split: str | None = None,
    ) -> None:
        self.path, self.ext, self.header, self.name, self.split = path, ext, header, name, split
        self.delimiter = "\t" if ext == "tsv" else ","
        self.quoting = csv.QUOTE_NONE if ext == "tsv" else csv.QUOTE_MINIMAL  # GLUE tsv: no quoting at all
        self._rows: list[tuple[int, int | None]] | None = None  # per data row: (first line, number of fields)
        self.width: int | None = None  # csv / tsv: fields per row (the header's, else the first row's)

    def _scan(self) -> list[tuple[int, int | None]]:
        if self._rows is not None:
            return self._rows
        rows: list[tuple[int, int | None]] = []
        if self.ext in ("csv", "tsv"):
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, delimiter=self.delimiter, quoting=self.quoting)
                previous = 0
                for row in reader:
                    first, previous = previous + 1, reader.line_num
                    if row:  # blank lines are skipped, as pandas does
                        rows.append((first, len(row)))
            if rows:
                self.width = rows[0][1]
            if self.header:
                rows = rows[1:]
        elif self.ext == "jsonl":
            with open(self.path, encoding="utf-8-sig") as f:
                rows = [(i, None) for i, line in enumerate(f, 1) if line.strip()]
        elif self.ext == "json":
            with open(self.path, encoding="utf-8-sig") as f:
                text = f.read()
            rows = _json_record_lines(text)
        self._rows = rows
        return rows

    def where(self, i: int) -> str:
        """``file:line`` of data row ``i`` (0-based, as the dataset's index)."""
        if self.path is None:
            return f"dataset {self.name!r} split {self.split!r} row {i}"
        rows = self._scan()
        return f"{self.path}:{rows[i][0]}" if i < len(rows) else f"{self.path} row {i + 1}"

    def malformed(self, i: int) -> str | None:
        """csv / tsv: the message for row ``i`` when its number of fields is not the header's, else None."""
        if self.ext not in ("csv", "tsv"):
            return None
        rows = self._scan()
        if i < len(rows) and self.width is not None and rows[i][1] != self.width:
            return self.malformed_message(rows[i][0], rows[i][1])
        return None

    def malformed_message(self, line: int, fields: int | None) -> str:
        return (
            f"{self.path}:{line}: malformed row: expected {self.width} fields, got {fields} "
            f"(a stray {'tab' if self.ext == 'tsv' else 'comma, quote'} or newline inside a field?)"
        )

    def error(self, i: int, column: str, problem: str) -> str:
        """``file:line column 'x': problem``, or the malformed-row message when row ``i`` has the wrong width."""
        return self.malformed(i) or f"{self.where(i)} column {column!r}: {problem}"

    def structural_error(self) -> str | None:
        """Why ``datasets.load_dataset`` could not read the file, with its line: the first csv / tsv row with
        another number of fields than the header, the first jsonl line that is not a JSON object; None if none."""
        if self.path is None:
            return None
        if self.ext in ("csv", "tsv"):
            self._rows = None
            rows = self._scan()
            for line, fields in rows:
                if fields != self.width:
                    return self.malformed_message(line, fields)
        elif self.ext == "jsonl":
            with open(self.path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        return f"{self.path}:{i}: not a JSON object ({err.msg})"
                    if not isinstance(record, dict):
                        return f"{self.path}:{i}: expected a JSON object, got {type(record).__name__}"
        elif self.ext == "json":
            with open(self.path, encoding="utf-8-sig") as f:
                text = f.read()
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                return f"{self.path}:{err.lineno}: not valid JSON ({err.msg})"
            if isinstance(records, list):
                for (line, _), record in zip(_json_record_lines(text), records):
                    if not isinstance(record, dict):
                        return f"{self.path}:{line}: expected a JSON object, got {type(record).__name__}"
        return None


def _json_record_lines(text: str) -> list[tuple[int, None]]:
    """The line on which each record of a JSON array starts (one record: line 1)."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        return [(text.count("\n", 0, start) + 1, None)]
    decoder, rows, idx, line, last = json.JSONDecoder(), [], start + 1, 1, 0
    while True:
        while idx < len(text) and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= len(text) or text[idx] == "]":
            return rows
        line += text.count("\n", last, idx)
        last = idx
        rows.append((line, None))
        try:
            _, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError:
            return rows


def _first_csv_row(path: str, locator: RowLocator) -> tuple[int, list[str]] | None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=locator.delimiter, quoting=locator.quoting)
        for row in reader:
            if row:
                return reader.line_num, row
    return None


def load_data_file(
    path: str,
    flag: str | None = None,
    extensions: tuple[str, ...] | None = ("csv", "tsv", "json", "jsonl"),
    header: bool = True,
    cache_dir: str | None = None,
):
    """A local data file through ``datasets.load_dataset``: csv, tsv (the GLUE layout: tab-separated, no quoting at
    all), json / jsonl (one object per line, or an array of objects), txt (the whole file, one row ``text``).
    ``extensions=None``: any extension, other than csv / tsv / json / jsonl read as text.

    csv / tsv columns are read as strings, exactly as written (no ``NA`` -> missing, no ``007`` -> 7): the recipes
    check and convert them. ``header=False``: no header row, columns named ``"0"``, ``"1"``...

    Returns:
        ``(datasets.Dataset, RowLocator)``: the rows in file order and where each came from.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, no rows, a header naming a column twice, or a file ``load_dataset`` cannot
            read (the message names the file and the line: a malformed row, a line that is not JSON).
    """
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{f'`{flag}`' if flag else 'data file'} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if extensions is not None and ext not in extensions:
        raise ValueError(
            f"data file {path!r}{f' ({flag})' if flag else ''}: extension must be {', '.join('.' + e for e in extensions)}, got {ext!r}"
        )
    locator = RowLocator(path, ext, header=header)
    kwargs: dict[str, Any] = {}
    if ext in ("csv", "tsv"):
        first = _first_csv_row(path, locator)
        if first is None:
            raise ValueError(f"{path}: no examples found")
        line, row = first
        if header:
            names = [name or f"Unnamed: {k}" for k, name in enumerate(row)]  # pandas' name for an empty header field
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{path}:{line}: the header names column(s) {twice} more than once")
        else:
            names = [str(k) for k in range(len(row))]
            kwargs.update(header=None, column_names=names)
        kwargs.update(
            delimiter=locator.delimiter,
            quoting=locator.quoting,
            keep_default_na=False,  # keep "NA", "null", "" as written
            features=datasets.Features({n: datasets.Value("string") for n in names}),
        )
    builder = DATA_BUILDERS.get(ext, "text")
    if builder == "text":
        kwargs["sample_by"] = "document"  # the file as written, one row
    try:
        ds = datasets.load_dataset(builder, data_files={"train": path}, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as err:  # pandas / pyarrow parse errors, wrapped by datasets
        cause = err.__cause__ or err
        raise ValueError(
            locator.structural_error()
            or f"{path}: datasets.load_dataset({builder!r}) could not read it "
            f"({type(cause).__name__}: {str(cause).strip()})"
        ) from err
    if len(ds) == 0:
        raise ValueError(f"{path}: no examples found")
    return ds, locator


def load_named_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """``--dataset_name``: ``datasets.load_dataset(name, config_name)`` (a Hub id, or a local folder of data files);
    a folder written by ``save_to_disk`` is read with ``datasets.load_from_disk`` (a single ``Dataset`` becomes
    the ``train`` split). Returns a ``datasets.DatasetDict``."""
    import datasets

    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(name)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return datasets.load_dataset(name, config_name, cache_dir=cache_dir)


def resolve_column(columns: list[str], candidates: list, where: str, owner: str = "the file's") -> str:
    """The first of ``candidates`` (names, or indices into ``columns``) present in ``columns``."""
    for name in candidates:
        if isinstance(name, int):
            if name < len(columns):
                return columns[name]
            continue
        if name in columns:
            return name
    first = candidates[0]
    shown = f"number {first}" if isinstance(first, int) else repr(first)
    raise ValueError(f"{where}: column {shown} not found; {owner} columns are {columns}")


def parse_time(text: str, name: str = "eval_t_inference") -> float:
    """A time since programming in seconds: ``"3600"``, ``"90s"``, ``"30min"``, ``"1h"``, ``"1d"``, ``"2w"``, ``"1y"``,
    ``"1.5h"``.

    Raises:
        ValueError: not a number with one of the units :data:`TIME_UNITS`, negative or not finite; the message
            names the flag, the value and the accepted forms.
    """
    word = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in TIME_UNITS if word.endswith(u) and word[: -len(u)]), "")
    try:
        value = float(word[: len(word) - len(unit)]) * TIME_UNITS.get(unit, 1.0)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`--{name}`: {text!r} is not a time >= 0; use seconds (3600) or a number with a unit "
            f"{', '.join(reversed(TIME_UNITS))} (e.g. 1h, 30d, 1y)"
        )
    return value


def parse_times(name: str, text: str) -> tuple[float, ...]:
    """Comma-separated :func:`parse_time` values, sorted, without duplicates."""
    words = [w for w in str(text).split(",") if w.strip()]
    if not words:
        raise ValueError(f"`--{name}` must hold at least one time, got {text!r}")
    return tuple(sorted({parse_time(w, name) for w in words}))


def _floats(name: str, text: str, extra: float | None = None) -> tuple[float, ...]:
    try:
        values = {float(v) for v in str(text).split(",") if v.strip()}
    except ValueError as err:
        raise ValueError(f"`--{name}` must be comma-separated numbers, got {text!r}") from err
    if extra is not None:
        values.add(float(extra))
    if not values or min(values) < 0:
        raise ValueError(f"`--{name}` must hold numbers >= 0, got {text!r}")
    return tuple(sorted(values))


def _modules(text: str | None) -> str | list[str] | None:
    """'a,b' → ['a', 'b']; 'all-linear' and regexes (any of ``.*+?[]()|^$\\``) stay one string."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text == "all-linear" or any(c in text for c in ".*+?[]()|^$\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """``HfArgumentParser`` over ``types``; a single ``.json`` argument is read as a file of arguments."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPU: without this, transformers sets up
        # no process group for CPU and every rank trains alone (world size 1). With it: gloo ranks (MULTI_CPU).
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    for args in parsed:
        if isinstance(args, TrainingArguments):
            hide_hub_token(args)
    return parsed


def hide_hub_token(training_args: TrainingArguments) -> None:
    """Move ``--hub_token`` out of the arguments into the ``HF_TOKEN`` environment variable.

    The Trainer pickles its arguments into every ``training_args.bin`` (output folder, checkpoints, what its
    ``push_to_hub`` uploads); without a token there, ``huggingface_hub`` finds it in the environment, and
    :func:`card_and_push` passes it explicitly to the final upload.
    """
    token = training_args.hub_token
    training_args.hub_token = None
    if token:
        os.environ["HF_TOKEN"] = token


def hub_token() -> str | None:
    """The token :func:`hide_hub_token` handed over (or the user's ``HF_TOKEN``); None: ``hf auth login``'s."""
    return os.environ.get("HF_TOKEN") or None


def command_line(argv: list[str] | None, script: str) -> str:
    """The command that ran the recipe, secrets redacted (``--hub_token``, ``HF_TOKEN=``, ``hf_...`` tokens), for
    ``results.json`` and the model card. ``argv``: the arguments ``main`` got (None: ``sys.argv``)."""
    words = list(sys.argv) if argv is None else [os.path.join("recipes", os.path.basename(script)), *argv]
    return "python " + " ".join(redact_argv(words))


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    ours = logging.INFO if training_args.should_log else logging.WARNING  # the main process tells the story
    logging.getLogger("recipes").setLevel(ours)
    logging.getLogger("hf_cim").setLevel(ours)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.info(
        "process %d/%d, device %s, torch %s, transformers %s, hf_cim %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        torch.__version__,
        transformers.__version__,
        hf_cim.__version__,
    )


def build_noise_config(args: AnalogArguments) -> hf_cim.AnalogNoiseConfig:
    """The preset at ``args.level`` with the gradient mode, targets and seed of the command line."""
    gradient = "ste" if args.gradient == "none" else args.gradient
    overrides = {
        "gradient": gradient,
        "target_modules": _modules(args.target_modules),
        "exclude_modules": _modules(args.exclude_modules),
        "seed": args.analog_seed,
        "mask_saturated": args.mask_saturated,
        "backward_weights": args.backward_weights,
        "program_gradient": args.program_gradient,
    }
    if args.input_quant is not None:
        overrides["input_quant"] = args.input_quant
    if args.chip_calibration != "none":  # trained for the chip it is measured on: calibrated the same way
        overrides["train_output_correction"] = args.chip_calibration
    return hf_cim.AnalogNoiseConfig.from_preset(args.preset, level=args.level, **overrides)


# -- static DAC ranges ------------------------------------------------------------------------------------------------
def calibration_batches(trainer: transformers.Trainer, dataset: Any, args: AnalogArguments) -> list[Any]:
    """The batches converter ranges and chips are calibrated on (a static DAC's, ``--output_range_alpha``'s ADC
    ranges, ``--chip_calibration``): the first ``--calibration_samples`` examples of ``dataset``, in order, collated
    as the trainer's evaluation batches (the same on every rank). Empty when nothing is calibrated."""
    calibrates = args.input_quant == "static" or args.output_range_alpha is not None or args.chip_calibration != "none"
    if not calibrates or dataset is None:
        return []
    subset = dataset.select(range(min(args.calibration_samples, len(dataset))))
    return list(trainer.get_eval_dataloader(subset))


def add_digital_warmup(trainer: transformers.Trainer, args: AnalogArguments, ste_default: float) -> float:
    """A noise-aware run's digital warm-up (:class:`hf_cim.callbacks.DigitalWarmupCallback`):
    ``--digital_warmup_ratio``, or ``ste_default`` for ``--gradient ste``/``ste_detach`` and 0 otherwise. Returns the
    ratio used (written into ``args.digital_warmup_ratio``)."""
    ratio = args.digital_warmup_ratio
    if ratio is None:
        ratio = ste_default if args.gradient in ("ste", "ste_detach") else 0.0
    if args.gradient == "none" or hf_cim.patch.get_config(trainer.model) is None:
        ratio = 0.0  # a digital run: every step is digital already
    args.digital_warmup_ratio = ratio
    if ratio > 0.0:
        from hf_cim.callbacks import DigitalWarmupCallback

        trainer.add_callback(DigitalWarmupCallback(ratio))
    return ratio


def add_weight_clip(
    trainer: transformers.Trainer, args: AnalogArguments, ste_defaults: Mapping[str, float] | None = None
) -> float | None:
    """``--weight_clip_sigmas``: :class:`hf_cim.callbacks.WeightClipCallback` from the first noise-aware step (call
    after :func:`add_digital_warmup`, whose ratio it starts after). Not given, the bound is ``ste_defaults``'s for
    ``--preset`` with ``--gradient ste``/``ste_detach`` (none for other presets and modes); 0 is no clipping. Returns
    the bound used, or None (written into ``args.weight_clip_sigmas``)."""
    sigmas = args.weight_clip_sigmas
    if sigmas is None and args.gradient in ("ste", "ste_detach"):
        sigmas = (ste_defaults or {}).get(args.preset)
    # No clipping: 0 asked for (the only bound --gradient none accepts), no default, or no analog model.
    if not sigmas or hf_cim.patch.get_config(trainer.model) is None:
        sigmas = None
    args.weight_clip_sigmas = sigmas
    if sigmas is not None:
        from hf_cim.callbacks import WeightClipCallback

        trainer.add_callback(WeightClipCallback(sigmas, start_ratio=args.digital_warmup_ratio or 0.0))
    return sigmas


def add_range_calibration(trainer: transformers.Trainer, batches: list[Any], args: AnalogArguments) -> None:
    """A noise-aware model's calibrated converter ranges, kept calibrated on ``batches`` while it trains: a static
    DAC's (:class:`hf_cim.callbacks.InputRangeCallback`), then ``--output_range_alpha``'s ADC ranges
    (:class:`hf_cim.callbacks.OutputRangeCallback`, added after: the partial sums depend on the DAC's ranges)."""
    config = hf_cim.patch.get_config(trainer.model)
    if config is None:
        return
    from hf_cim.callbacks import InputRangeCallback, OutputRangeCallback

    if config.input_quant == "static":
        trainer.add_callback(InputRangeCallback(batches, every=args.calibrate_every, alpha=args.input_range_alpha))
    if args.output_range_alpha is not None and config.output_bits is not None:
        trainer.add_callback(OutputRangeCallback(batches, every=args.calibrate_every, alpha=args.output_range_alpha))


def chip_calibrator(
    model: torch.nn.Module, calibration: list[Any] | None, args: AnalogArguments
) -> Callable[[torch.nn.Module], Any] | None:
    """``--chip_calibration``: the call that corrects a programmed chip's outputs on the ``calibration`` batches
    (:func:`hf_cim.calibration.calibrate_chip_outputs`), or None without the flag."""
    if args.chip_calibration == "none":
        return None
    if not calibration:
        raise ValueError("--chip_calibration needs calibration data: none was given")
    from hf_cim.calibration import batch_to, calibrate_chip_outputs

    device = next(model.parameters()).device
    batches = [batch_to(b, device) for b in calibration]
    return functools.partial(calibrate_chip_outputs, batches=batches, kind=args.chip_calibration)


@contextmanager
def measured_as_chip(
    model: torch.nn.Module, noise_config: hf_cim.AnalogNoiseConfig, calibration: list[Any], args: AnalogArguments
) -> Iterator[torch.nn.Module]:
    """``model`` as its chips are measured: an analog model as it is; a digital one patched with ``noise_config`` for
    the block and unpatched after. Its calibrated converter ranges (a static DAC's, ``--output_range_alpha``'s ADC
    ranges) are the digital model's own, calibrated on ``calibration`` (on a copy of the config: the noise-aware
    model's ranges stay its own)."""
    if hf_cim.patch.get_config(model) is not None:
        yield model
        return
    from hf_cim.calibration import batch_to, calibrate_ranges, has_ranges_to_calibrate

    calibrated = has_ranges_to_calibrate(noise_config, args.output_range_alpha)
    config = noise_config.replace(input_ranges=None, output_ranges=None) if calibrated else noise_config
    hf_cim.patch_model(model, config)
    try:
        if calibrated:
            if not calibration:
                raise ValueError(
                    "calibrated converter ranges (--input_quant static, --output_range_alpha) need calibration data: "
                    "none was given"
                )
            device = next(model.parameters()).device
            calibrate_ranges(model, [batch_to(b, device) for b in calibration], input_alpha=args.input_range_alpha,
                             output_alpha=args.output_range_alpha)  # fmt: skip
        yield model
    finally:
        hf_cim.unpatch_model(model)


def run_mode(training_args: TrainingArguments, args: AnalogArguments) -> None:
    """``--do_train`` / ``--do_eval`` / ``--do_predict`` as transformers' examples; none of them given: train and
    evaluate (the recipes' behaviour before these flags counted)."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
    # --push_to_hub: one commit at the end, after the chip sweep (card_and_push). Left on, Trainer would commit at
    # every save and at save_model, with its generic card, before the chips are measured.
    args.push_to_hub = bool(training_args.push_to_hub)
    if args.push_to_hub:
        strategy = str(getattr(training_args.hub_strategy, "value", training_args.hub_strategy))
        if strategy not in ("every_save", "end"):
            logger.warning(
                "--hub_strategy %s: the recipes push once, after the chip sweep; no checkpoint is pushed", strategy
            )
        training_args.push_to_hub = False
    if args.digital_baseline and not (training_args.do_train and training_args.do_eval):
        raise ValueError(
            "`--digital_baseline` trains a digital twin next to the noise-aware run and compares them on chips: "
            "it needs `--do_train` and `--do_eval`"
        )


def prepare_model(
    model: torch.nn.Module, noise_config: hf_cim.AnalogNoiseConfig, args: AnalogArguments, train: bool
) -> hf_cim.AnalogNoiseConfig:
    """Patch ``model`` for training and return the noise config its chips are measured with.

    * A digital model: patched with ``noise_config`` (the preset) if it is trained with a noisy gradient; the chip
      sweep patches it with the same config for the measurement only.
    * An analog checkpoint (saved by hf_cim: ``quantization_config`` with ``quant_method`` ``hf_cim``, patched again
      by ``from_pretrained``): measured (and trained) with its own noise config, its own level added to the sweep;
      with an explicit ``--preset``, unpatched and treated as a digital model with that preset instead.
    """
    own = hf_cim.patch.get_config(model)
    if own is not None and not args.preset_given:
        logger.info("analog checkpoint: its own noise config (preset level %g); --preset replaces it", own.level)
        args.levels = _floats("eval_levels", args.eval_levels, extra=own.level)
        if train and args.gradient == "none":
            hf_cim.unpatch_model(model)  # digital training; the chips still use the checkpoint's config
        _age_for_training(model, args, train)
        return own
    if own is not None:
        logger.info("analog checkpoint: its noise config is replaced by --preset %s", args.preset)
        hf_cim.unpatch_model(model)
    if train and args.gradient != "none":
        hf_cim.patch_model(model, noise_config)
        logger.info(
            "analog training: %d layers patched, gradient %s",
            len(list(hf_cim.patch.analog_layers(model))),
            noise_config.gradient,
        )
    _age_for_training(model, args, train)
    return noise_config


def _age_for_training(model: torch.nn.Module, args: AnalogArguments, train: bool) -> None:
    """``--train_t_inference``: the training forward runs the devices at that age (the chip sweep programs its own
    chips at each ``--eval_t_inference``)."""
    if train and args.gradient != "none" and args.train_time > 0.0:
        hf_cim.set_drift_time(model, args.train_time)
        logger.info("analog training at %s after programming", format_time(args.train_time))


def find_checkpoint(training_args: TrainingArguments, args: AnalogArguments) -> str | bool | None:
    """What ``Trainer.train`` resumes from, as transformers' ``run_clm.py``: ``--resume_from_checkpoint`` (a folder,
    or ``true`` for the newest in ``output_dir``), else with ``--do_train`` the newest ``checkpoint-*`` already in
    ``output_dir`` (``get_last_checkpoint``) unless ``--overwrite_output_dir``. A detected checkpoint is also set as
    ``training_args.resume_from_checkpoint`` (the noise streams are restored from it)."""
    from transformers.trainer_utils import get_last_checkpoint

    explicit = resume_arg(training_args)
    if explicit is not None or not training_args.do_train or args.overwrite_output_dir:
        return explicit
    if not os.path.isdir(training_args.output_dir):
        return None
    last = get_last_checkpoint(training_args.output_dir)
    if last is not None:
        logger.info(
            "checkpoint detected, resuming training at %s; to train from scratch, change --output_dir or add "
            "--overwrite_output_dir",
            last,
        )
        training_args.resume_from_checkpoint = last
    return last


def resume_arg(training_args: TrainingArguments) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true``/``last`` for the newest in ``output_dir``."""
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() in ("true", "last", "1"):
        return True
    if not os.path.isdir(value):
        raise FileNotFoundError(f"`--resume_from_checkpoint` {value!r} is not a folder")
    return value


def add_recipe_callbacks(trainer: transformers.Trainer, tokens_per_sample: int | None = None) -> transformers.Trainer:
    """Peak memory / step time (``hf_cim_memory.json``) and the noise streams saved in checkpoints for resuming, added
    with :func:`hf_cim.callbacks.add_callbacks` (the memory figures ahead of the reporting integrations, so
    TensorBoard / W&B get them too). Returns ``trainer``."""
    from hf_cim.callbacks import PeakMemoryCallback, add_callbacks
    from hf_cim.hub import NoiseStateCallback

    args = trainer.args
    resume = args.resume_from_checkpoint
    folder = resume if resume is not None and os.path.isdir(str(resume)) else None
    return add_callbacks(
        trainer,
        PeakMemoryCallback(output_dir=args.output_dir, tokens_per_sample=tokens_per_sample),
        NoiseStateCallback(resume_from_checkpoint=folder),
    )


def measure_chips(
    trainer: transformers.Trainer,
    noise_config: hf_cim.AnalogNoiseConfig,
    args: AnalogArguments,
    eval_sets: dict[str, Any],
    metric: str,
    calibration: list[Any] | None = None,
) -> dict[str, Any]:
    """Clean digital metrics and the sweep over ``args.eval_chips`` simulated chips for every evaluation set.

    ``metric`` is the key without prefix (``"f1"``, ``"loss"``). A model trained with ``--gradient none`` is patched
    with ``noise_config`` for the sweep and unpatched after (:func:`measured_as_chip`; a static DAC calibrated on
    ``calibration``). With ``--chip_calibration`` every chip's outputs are corrected on ``calibration`` after it is
    programmed. Tables and plots go to ``output_dir/robustness_<set>/``.
    """
    from hf_cim.evaluation import evaluate_robustness

    out: dict[str, Any] = {}
    with measured_as_chip(trainer.model, noise_config, calibration or [], args) as model:
        calibrate_chip = chip_calibrator(model, calibration, args)
        for name, dataset in eval_sets.items():
            if args.eval_chips == 0:
                with hf_cim.noise_disabled(model):
                    clean = trainer.evaluate(eval_dataset=dataset)
                out[name] = {"clean": {k.removeprefix("eval_"): v for k, v in clean.items()}}
                continue
            robustness_dir = os.path.join(trainer.args.output_dir, f"robustness_{name}")
            since = time.time()
            result = evaluate_robustness(
                model,
                trainer,
                f"eval_{metric}",
                seeds=args.eval_chips,
                levels=args.levels,
                t_inference=args.t_inference,
                output_dir=robustness_dir,
                progress=not trainer.args.disable_tqdm,
                evaluate_kwargs={"eval_dataset": dataset},
                # trackers get the digital eval_* once and one record of chip/level_<l>/t_<time>/<metric>[_std]
                log_prefix="chip" if len(eval_sets) == 1 else f"chip/{name}",
                calibrate_chip=calibrate_chip,
            )
            log_plot_to_trackers(trainer, os.path.join(robustness_dir, "robustness.png"), f"chip/{name}/plot", since)
            out[name] = {
                "clean": {k.removeprefix("eval_"): v for k, v in result.clean.items()},
                "chip_seeds": list(result.seeds),
                "robustness": result.rows,
                "table": robustness_markdown(result.rows, f"eval_{metric}", result.clean_value, human_times=True),
            }
            for row in result.rows:
                row["t_inference_label"] = format_time(row["t_inference"])
            logger.info("%s on %d simulated chips:\n%s", name, args.eval_chips, out[name]["table"])
    return out


def log_plot_to_trackers(trainer: transformers.Trainer, path: str, tag: str, since: float | None = None) -> bool:
    """Hands the PNG at ``path`` as an image ``tag`` to the reporting integrations among the trainer's callbacks:
    TensorBoard (``tb_writer.add_image``, HWC uint8, at the global step) and W&B (``wandb.Image``). Main process only;
    skipped silently without such an integration or without the file (or one older than ``since``: a plot left by
    an earlier run); a tracker that refuses the image costs a warning, never the run. True if any tracker took it."""
    if not trainer.is_world_process_zero() or not os.path.isfile(path):
        return False
    if since is not None and os.path.getmtime(path) < since - 1:
        return False
    from transformers.integrations import TensorBoardCallback, WandbCallback

    step = trainer.state.global_step
    image = None
    logged = False
    for cb in trainer.callback_handler.callbacks:
        try:
            if isinstance(cb, TensorBoardCallback):
                if getattr(cb, "tb_writer", None) is None and hasattr(cb, "_init_summary_writer"):
                    cb._init_summary_writer(trainer.args)  # closed at on_train_end; on_log reopens it the same way
                writer = getattr(cb, "tb_writer", None)
                if writer is None:
                    continue
                if image is None:
                    image = _png_uint8_hwc(path)
                writer.add_image(tag, image, step, dataformats="HWC")
                if hasattr(writer, "flush"):
                    writer.flush()
                logged = True
            elif isinstance(cb, WandbCallback):
                wandb = getattr(cb, "_wandb", None)
                if wandb is None or getattr(wandb, "run", None) is None:
                    continue
                wandb.log({tag: wandb.Image(path)})
                logged = True
        except Exception as err:  # noqa: BLE001 - a tracker's refusal must not end the run
            logger.warning("could not log %s to %s: %s", tag, type(cb).__name__, err)
    return logged


def _png_uint8_hwc(path: str) -> Any:
    """The PNG as an ``(H, W, C)`` uint8 array (matplotlib reads PNGs as floats in [0, 1])."""
    import numpy as np
    from matplotlib.image import imread

    array = imread(path)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def save_train_outputs(trainer: transformers.Trainer, train_result: Any, num_samples: int) -> dict[str, Any]:
    """As transformers' examples: ``train_results.json`` / ``all_results.json`` (``log_metrics``, ``save_metrics``)
    and ``trainer_state.json`` (``save_state``). Returns the train metrics (with ``train_samples``)."""
    metrics = {**train_result.metrics, "train_samples": num_samples}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def eval_metrics(evals: dict[str, Any], primary: str, metric: str, samples: dict[str, int]) -> dict[str, Any]:
    """Flat ``eval_*`` metrics of :func:`measure_chips`' result, as transformers' examples name them: the primary set
    as ``eval_<key>``, another set (MNLI mismatched) as ``eval_<set>_<key>``; per chip cell
    ``eval_chips_<metric>_level<l>_t<time>_mean`` / ``_std`` (``t1d``), plus ``eval_samples``, ``eval_chip_seeds``
    and the full sweep as ``eval_robustness`` (a list)."""
    out: dict[str, Any] = {}
    for name, entry in evals.items():
        prefix = "eval" if name == primary else f"eval_{name}"
        out.update({f"{prefix}_{k}": v for k, v in entry["clean"].items()})
        out[f"{prefix}_samples"] = samples[name]
        if "robustness" not in entry:
            continue
        for row in entry["robustness"]:
            cell = f"{prefix}_chips_{metric}_level{row['level']:g}_t{format_time(row['t_inference'])}"
            out[f"{cell}_mean"], out[f"{cell}_std"] = row["mean"], row["std"]
        out[f"{prefix}_chip_seeds"] = entry["chip_seeds"]
        out[f"{prefix}_robustness"] = entry["robustness"]
    return out


def save_eval_outputs(trainer: transformers.Trainer, metrics: dict[str, Any]) -> None:
    """``eval_results.json`` (clean metrics and the chip sweep) and ``all_results.json``; the scalars are logged."""
    trainer.log_metrics("eval", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    trainer.save_metrics("eval", _finite(metrics))


def predict_digital_and_chip(
    trainer: transformers.Trainer,
    dataset: Any,
    noise_config: hf_cim.AnalogNoiseConfig,
    t_inference: float,
    args: AnalogArguments,
    calibration: list[Any] | None = None,
) -> tuple[Any, Any]:
    """``--do_predict``: the predictions (logits) of the digital model and of simulated chip 0 (``noise_config`` at its
    level, drifted to ``t_inference`` seconds; with ``--chip_calibration`` its outputs corrected on ``calibration``). A
    digital model is patched for the chip and unpatched after (:func:`measured_as_chip`)."""
    with measured_as_chip(trainer.model, noise_config, calibration or [], args) as model:
        with hf_cim.noise_disabled(model):
            digital = trainer.predict(dataset, metric_key_prefix="predict").predictions
        model.eval()
        hf_cim.program_chip(model, seed=0, t_inference=t_inference)
        calibrate_chip = chip_calibrator(model, calibration, args)
        try:
            if calibrate_chip is not None:
                calibrate_chip(model)
                hf_cim.reseed(model, 0)  # chip 0's read noise as the sweep measures it
            chip = trainer.predict(dataset, metric_key_prefix="predict").predictions
        finally:
            hf_cim.clear_chip(model)
    return digital, chip


def snapshot_for_baseline(model: torch.nn.Module, args: AnalogArguments) -> torch.nn.Module | None:
    """With ``--digital_baseline``: a copy of the freshly built (still digital) model, taken before patching and
    training, from which the digital twin starts (same initial weights). None otherwise."""
    import copy

    return copy.deepcopy(model) if args.digital_baseline else None


def train_digital_baseline(
    trainer: transformers.Trainer,
    initial_model: torch.nn.Module,
    noise_config: hf_cim.AnalogNoiseConfig,
    args: AnalogArguments,
    eval_sets: dict[str, Any],
    metric: str,
    tokens_per_sample: int | None = None,
    calibration: list[Any] | None = None,
) -> tuple[transformers.Trainer, dict[str, Any]]:
    """Train the digital twin of the noise-aware run and measure it on the same simulated chips.

    ``initial_model``: :func:`snapshot_for_baseline`'s copy. The twin's Trainer gets the noise-aware Trainer's
    arguments (hence the same seed, data order and number of steps), datasets, collator and metrics, with
    ``output_dir/digital_baseline`` as output, no checkpoints, no push, no resume. :func:`measure_chips` then
    measures it on ``args.eval_chips`` chips at ``args.levels`` × ``args.t_inference`` with ``noise_config`` (the
    chip seeds and evaluation data of the noise-aware model's sweep). Returns the twin's Trainer and
    ``{"output_dir", "train", "train_loss_history", "eval"}``.
    """
    if hf_cim.patch.get_config(initial_model) is not None:
        raise ValueError("the digital baseline must start from the model before patching")
    twin_args = replace(
        trainer.args,
        output_dir=os.path.join(trainer.args.output_dir, "digital_baseline"),
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        hub_model_id=None,
        resume_from_checkpoint=None,
    )
    logger.info("digital baseline: training the digital twin into %s", twin_args.output_dir)
    twin = type(trainer)(
        model=initial_model,
        args=twin_args,
        train_dataset=trainer.train_dataset,
        eval_dataset=trainer.eval_dataset,
        processing_class=trainer.processing_class,
        data_collator=trainer.data_collator,
        compute_metrics=trainer.compute_metrics,
    )
    add_recipe_callbacks(twin, tokens_per_sample=tokens_per_sample)
    train_result = twin.train()
    twin.save_model()
    evals = measure_chips(twin, noise_config, args, eval_sets, metric, calibration)  # its own ranges, same data
    return twin, {
        "output_dir": twin_args.output_dir,
        "train": train_result.metrics,
        "train_loss_history": [{"step": e["step"], "loss": e["loss"]} for e in twin.state.log_history if "loss" in e],
        "eval": evals,
    }


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0  # sample std, as the sweep
    return {"mean": mean, "std": std, "values": list(values)}


def compare_with_baseline(
    aware: dict[str, Any], digital: dict[str, Any], metric: str, greater_is_better: bool = False
) -> dict[str, Any]:
    """The paired comparison of the noise-aware model (``aware``) and its digital twin (``digital``), both
    :func:`measure_chips` results on the same chips: per evaluation set, both clean metrics and per
    ``(level, t_inference)`` cell the twin's and the noise-aware model's mean ± std over chips, the per-chip difference
    noise-aware − digital (mean ± std), and ``recovered_percent`` = (digital chip − aware chip) / (digital chip −
    digital clean) × 100: the share of the digital twin's degradation on chips that noise-aware training wins back
    (the formula holds for either metric direction; None where the twin's chips are no worse than its clean model,
    judged by ``greater_is_better``). A difference < 0 favours noise-aware training for a loss, > 0 for a score."""
    sets: dict[str, Any] = {}
    for name, a in aware.items():
        d = digital[name]
        if a.get("chip_seeds") != d.get("chip_seeds"):
            raise ValueError(f"{name}: chip seeds differ ({a.get('chip_seeds')} vs {d.get('chip_seeds')})")
        clean_d, clean_a = d["clean"][metric], a["clean"][metric]
        cells = []
        for ra in a.get("robustness", []):
            rd = next(
                r for r in d["robustness"] if r["level"] == ra["level"] and r["t_inference"] == ra["t_inference"]
            )
            diff = [va - vd for va, vd in zip(ra["values"], rd["values"], strict=True)]
            gap = rd["mean"] - clean_d
            degraded = gap < 0 if greater_is_better else gap > 0
            cells.append(
                {
                    "level": ra["level"],
                    "t_inference": ra["t_inference"],
                    "n_chips": len(diff),
                    "digital": _mean_std(rd["values"]),
                    "noise_aware": _mean_std(ra["values"]),
                    "difference": _mean_std(diff),
                    "recovered_percent": 100.0 * (rd["mean"] - ra["mean"]) / gap if degraded else None,
                }
            )
        sets[name] = {
            "chip_seeds": a.get("chip_seeds"),
            "clean": {"digital": clean_d, "noise_aware": clean_a, "difference": clean_a - clean_d},
            "cells": cells,
        }
    return {
        "metric": metric,
        "greater_is_better": greater_is_better,
        "difference": "noise_aware - digital (per chip seed)",
        "sets": sets,
    }


def comparison_markdown(comparison: dict[str, Any], digits: int = 4) -> str:
    """``comparison.md``: one table per evaluation set, the clean models first, then one line per chip cell."""
    m = comparison["metric"]
    out = [
        f"# Noise-aware vs digital twin ({m})",
        "",
        "Same initial weights, data order and steps; the same simulated chips (paired by chip seed). "
        "Difference: noise-aware − digital, per chip. Recovered: (digital chip − noise-aware chip) / "
        "(digital chip − digital clean), where the twin loses on chips. "
        + ("Higher is better." if comparison.get("greater_is_better") else "Lower is better."),
    ]

    def ms(s: dict[str, Any]) -> str:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    for name, entry in comparison["sets"].items():
        clean = entry["clean"]
        out += [
            "",
            f"## {name} (chip seeds {entry['chip_seeds']})",
            "",
            "| noise level | t_inference | digital twin | noise-aware | difference (paired) | recovered | chips |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| clean | – | {clean['digital']:.{digits}f} | {clean['noise_aware']:.{digits}f} | "
            f"{clean['difference']:+.{digits}f} | – | – |",
        ]
        for c in entry["cells"]:
            rec = "–" if c["recovered_percent"] is None else f"{c['recovered_percent']:.0f} %"
            d = c["difference"]
            out.append(
                f"| {c['level']:g} | {format_time(c['t_inference'])} | {ms(c['digital'])} | {ms(c['noise_aware'])} | "
                f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f} | {rec} | {c['n_chips']} |"
            )
    return "\n".join(out) + "\n"


def write_comparison(trainer: transformers.Trainer, comparison: dict[str, Any]) -> str:
    """``comparison.md`` in ``output_dir`` (main process), also logged; returns the text."""
    text = comparison_markdown(comparison)
    if trainer.is_world_process_zero():
        path = os.path.join(trainer.args.output_dir, "comparison.md")
        with open(path, "w") as f:
            f.write(text)
        logger.info("noise-aware training vs the digital twin (%s):\n%s", path, text)
    return text


def card_kwargs(results: dict[str, Any], task: str, datasets: list[str], base_model: str | None) -> dict[str, Any]:
    """What the model card shows: base model, task, data, the command, the clean metric and the chip table (also as
    the card's ``model-index``, measured on the first evaluation set)."""
    split, first = next(iter(results.get("eval", {}).items()), (None, {"clean": {}}))
    rows = first.get("robustness")
    metric = f"eval_{results['metric']}"
    return {
        "base_model": base_model if base_model and not os.path.isdir(base_model) else None,
        "task": task,
        "datasets": datasets,
        "recipe": results.get("command") or command_line(None, ""),
        "clean_metric": {f"eval_{k}": v for k, v in first["clean"].items() if isinstance(v, float)},
        "robustness": rows,
        "metric": metric if rows else None,
        "dataset_split": split,
    }


def card_and_push(trainer: transformers.Trainer, analog: bool, card: dict[str, Any], push: bool = False) -> None:
    """For an analog model, a model card (``README.md``) with the chip table next to the saved model (whose
    ``config.json`` carries the noise config as ``quantization_config``); then, with ``push`` (``--push_to_hub``,
    which :func:`run_mode` took away from the Trainer), one upload of the model: :func:`hf_cim.hub.push_to_hub` for an
    analog model (the files it writes, the card with the chips in its ``model-index``), ``Trainer.push_to_hub`` for
    a digital one."""
    from hf_cim import hub

    model, args = trainer.model, trainer.args
    if analog and trainer.is_world_process_zero():
        hub.write_model_card(args.output_dir, model, training_args=args, **card)
    if push and trainer.is_world_process_zero():
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        token = hub_token()  # never args.hub_token: it would be pickled into training_args.bin
        if analog:
            hub.push_to_hub(
                model,
                repo_id,
                tokenizer=trainer.processing_class,
                save_directory=args.output_dir,
                card_kwargs={"training_args": args, **card},
                private=args.hub_private_repo,
                token=token,
            )
        else:
            # Trainer uploads the output folder but checkpoints and `_*` (its ignore_patterns): check it first.
            from huggingface_hub.utils import filter_repo_objects

            names = [
                os.path.relpath(os.path.join(root, name), args.output_dir)
                for root, _, files in os.walk(args.output_dir)
                for name in files
            ]
            names = list(filter_repo_objects(names, ignore_patterns=["_*", "checkpoint-*"]))
            leaking = hub.files_holding_token(args.output_dir, names, token)
            if leaking:
                raise ValueError(f"--push_to_hub: {leaking} in {args.output_dir} hold the Hub token; not uploading")
            trainer.push_to_hub(token=token)


def write_results(trainer: transformers.Trainer, results: dict[str, Any], start_time: float) -> None:
    """``results.json`` in ``output_dir`` (main process): the run's settings, losses, clean and chip metrics."""
    if not trainer.is_world_process_zero():
        return
    out_dir = trainer.args.output_dir
    memory_file = os.path.join(out_dir, "hf_cim_memory.json")
    if os.path.exists(memory_file):
        with open(memory_file) as f:
            results["memory"] = json.load(f)
    results["world_size"] = trainer.args.world_size
    results["train_loss_history"] = [
        {"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e
    ]
    results["wall_time_s"] = time.time() - start_time
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_finite(results), f, indent=2, sort_keys=True)
    logger.info("wrote %s", os.path.join(out_dir, "results.json"))


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null. Strings are written with secrets redacted."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str):
        return redact_secrets(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def shutdown() -> None:
    """End a distributed run cleanly: every rank waits for the others, then the process group is destroyed (left to
    interpreter exit, gloo teardown can abort a rank after the work is done and fail the launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
