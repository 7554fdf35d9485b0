#!/usr/bin/env python
"""Fine-tune a sequence classifier noise-aware for an analog chip, then measure it on simulated chips.

Follows transformers' ``examples/pytorch/text-classification/run_glue.py``. Data: a GLUE task (``--task_name``
alone loads ``nyu-mll/glue`` from the Hub), or any single-sentence or sentence-pair classification or regression
data: ``--dataset_name`` (``datasets.load_dataset``: a Hub id or a local folder) or local ``--train_file`` /
``--validation_file`` (tsv in the original GLUE layout, csv, json, jsonl, read by ``datasets.load_dataset``), their
columns named by ``--text_columns`` / ``--label_column``. Every row is checked before training (a missing column, an
empty text, a malformed row, an unknown or non-numeric label stops the run with the file, line and column). Without
a GLUE task the labels are inferred as transformers does: numbers not all integers regress, anything else classifies
over the distinct labels (sorted; ``config.id2label``). Metrics: the task's official GLUE metric through
``evaluate.load("glue", task)``, else (offline) the same metric from ``recipes/_metrics.py``; ``combined_score`` where
transformers' run_glue.py adds it. Other data: accuracy (and F1 with two classes), or Pearson / Spearman (and MSE).

    python recipes/run_glue.py --task_name mrpc --model_name_or_path <bert folder> \\
        --train_file ../shared/data/glue/MRPC/train.tsv --validation_file ../shared/data/glue/MRPC/dev.tsv \\
        --output_dir out/mrpc --preset paper --gradient ste --num_train_epochs 1

Runs unchanged under ``accelerate launch`` (see ``recipes/configs``) and ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from _common import (
    AnalogArguments,
    RowLocator,
    add_digital_warmup,
    add_range_calibration,
    add_recipe_callbacks,
    add_weight_clip,
    build_noise_config,
    calibration_batches,
    card_and_push,
    card_kwargs,
    command_line,
    compare_with_baseline,
    eval_metrics,
    find_checkpoint,
    format_time,
    load_data_file,
    load_named_dataset,
    measure_chips,
    parse_args,
    predict_digital_and_chip,
    prepare_model,
    resolve_column,
    run_mode,
    save_eval_outputs,
    save_train_outputs,
    setup_logging,
    shutdown,
    snapshot_for_baseline,
    train_digital_baseline,
    write_comparison,
    write_results,
)
from _metrics import GLUE_METRIC_KEYS, accuracy, f1_binary, glue_metric, pearson, spearman
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_cim

logger = logging.getLogger("recipes.run_glue")

#: ``results.json``'s ``metric_source`` when the metric is computed offline, by this folder's ``_metrics.py``.
METRIC_SOURCE = "recipes/_metrics.py"
#: --digital_warmup_ratio's default for --gradient ste/ste_detach: the first three quarters of the fine-tuning steps
#: digital, the last quarter noise-aware. MiniLM on SST-2 (3 training seeds x 5 chips, 400 steps, classifier digital;
#: docs/fidelity.md): 0.75 won back 51 % of the pcm chip's cost at a 3 sigma DAC range where 0.25 won back 31 %, and
#: noise-aware fine-tuning from the first step lost 2.1 points to digital fine-tuning (100 steps).
DIGITAL_WARMUP_RATIO = 0.75
#: --input_range_alpha's default here (run_shakespeare: 3). MiniLM's activations have outliers: at a 3 sigma static
#: DAC range noise-aware fine-tuning only tied a digital model given 6 sigma; trained at 6 sigma it won back all of
#: the pcm chip's cost on SST-2 (3 training seeds x 5 chips, docs/fidelity.md).
INPUT_RANGE_ALPHA = 6.0


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: the Hub column names, the original tsv layout, the label names and the eval splits."""

    text: tuple[str, ...]  # column names in nyu-mll/glue
    tsv_text: tuple[str | int, ...]  # column names (or indices when there is no header) in the GLUE tsv files
    tsv_label: str | int
    labels: tuple[str, ...] | None  # None: regression
    tsv_header: bool = True
    eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), (3,), 1, ("unacceptable", "acceptable"), tsv_header=False),
    "sst2": GlueTask(("sentence",), ("sentence",), "label", ("negative", "positive")),
    "mrpc": GlueTask(
        ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent")
    ),
    "qqp": GlueTask(
        ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate")
    ),
    "stsb": GlueTask(("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None),
    "mnli": GlueTask(
        ("premise", "hypothesis"),
        ("sentence1", "sentence2"),
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": GlueTask(("question", "sentence"), ("question", "sentence"), "label", ("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "wnli": GlueTask(
        ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("not_entailment", "entailment")
    ),
}
STSB_RANGE = (0.0, 5.0)


@dataclass
class GlueAnalogArguments(AnalogArguments):
    """:class:`AnalogArguments` with this recipe's default static DAC range."""

    input_range_alpha: float = field(
        default=INPUT_RANGE_ALPHA,
        metadata={
            "help": f"--input_quant static: the range in standard deviations of a layer's inputs (default "
            f"{INPUT_RANGE_ALPHA:g}: the range that won for MiniLM on SST-2 in docs/fidelity.md; run_shakespeare: 3)."
        },
    )


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Pretrained model: a Hub id or a local folder."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a checkpoint's classifier head of another size."}
    )


@dataclass
class DataArguments:
    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"GLUE task: {', '.join(GLUE_TASKS)} (its label set and metric). Leave out for any other "
            "classification or regression data: --text_columns / --label_column, labels inferred from the data."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for datasets.load_dataset (Hub id or local folder) instead of local files; its "
            "train split trains, --validation_split_name evaluates, test predicts."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    validation_split_name: str | None = field(
        default=None,
        metadata={"help": "--dataset_name: the split evaluated (default: validation; a GLUE task: its own)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: tsv (GLUE layout: no quoting), csv, json, jsonl."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (MNLI: matched)."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI: mismatched validation."})
    test_file: str | None = field(
        default=None,
        metadata={"help": "--do_predict: examples to predict (as --validation_file; the label column may be absent)."},
    )
    text_columns: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated text column(s): one (single sentence) or two (sentence pair). With a GLUE task: "
            "if not the task's; without: required unless the data has sentence1,sentence2 / sentence / text."
        },
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column, if not the GLUE task's (without --task_name: default label)."}
    )
    problem_type: str = field(
        default="auto",
        metadata={
            "help": "Without --task_name: classification, regression, or auto (default): regression when the "
            "training labels are numbers and not all integers, else classification over the distinct labels."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad to max_seq_length (else per batch)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower().replace("-", "")
            if self.task_name not in GLUE_TASKS:
                raise ValueError(
                    f"`--task_name` must be one of {list(GLUE_TASKS)}, got {self.task_name!r}; for other data leave "
                    "it out and describe the columns with --text_columns / --label_column"
                )
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`--problem_type` must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.task_name is not None and self.problem_type != "auto":
            raise ValueError("`--problem_type` is for data without --task_name: a GLUE task fixes its own")
        files = [f"--{n}" for n in ("train_file", "validation_file", "validation_mismatched_file", "test_file")
                 if getattr(self, n) is not None]  # fmt: skip
        if self.dataset_name is not None and files:
            raise ValueError(f"give --dataset_name or local files, got --dataset_name and {' and '.join(files)}")
        if self.task_name is None and self.dataset_name is None and not files:
            raise ValueError(
                "no data: give --task_name (a GLUE task, from the Hub), --dataset_name, or local files "
                "(--train_file / --validation_file / --test_file)"
            )
        if self.text_columns is not None:
            cols = [c.strip() for c in self.text_columns.split(",") if c.strip()]
            if not 1 <= len(cols) <= 2:
                raise ValueError(f"`--text_columns` must name one or two columns, got {self.text_columns!r}")


PROBLEM_TYPES = ("auto", "classification", "regression")


@dataclass(frozen=True)
class LabelSpec:
    """The labels a run trains on: class names (``names``), or regression (``names`` None)."""

    names: tuple[str, ...] | None
    by_index: bool = False  # a label may also be given as the class index (GLUE, a Hub ClassLabel, a saved model)
    value_range: tuple[float, float] | None = None  # regression: accepted range (STS-B: [0, 5])
    origin: str = "task"  # task: a GLUE task's label set; training: inferred from the training labels

    @property
    def is_regression(self) -> bool:
        return self.names is None


def glue_label_spec(task: GlueTask) -> LabelSpec:
    if task.labels is None:
        return LabelSpec(None, value_range=STSB_RANGE)
    return LabelSpec(task.labels, by_index=True)


# -- local files and datasets: loaded by datasets.load_dataset, then every row checked --------------------------
def _label_key(raw: object) -> str:
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def parse_label(spec: LabelSpec, raw: object, where: str) -> int | float:
    """``raw`` as the class index or the regression target; ``where``: ``file:line column 'x'`` for the error."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(f"{where}: the label is empty")
    if spec.is_regression:
        try:
            value = float(raw) if not isinstance(raw, bool) else float("nan")
        except (TypeError, ValueError):
            value = float("nan")
        if spec.value_range is not None:
            low, high = spec.value_range
            if not low <= value <= high:
                raise ValueError(f"{where}: label {raw!r} is not a similarity score in [{low}, {high}]")
        elif not np.isfinite(value):
            raise ValueError(f"{where}: label {raw!r} is not a number (regression)")
        return value
    key = _label_key(raw)
    if key in spec.names:
        return spec.names.index(key)
    if spec.by_index and key.lstrip("-").isdigit() and 0 <= int(key) < len(spec.names):
        return int(key)
    if spec.origin == "task":
        raise ValueError(
            f"{where}: label {raw!r} is not in the task's label set {list(range(len(spec.names)))} / "
            f"{list(spec.names)}"
        )
    raise ValueError(f"{where}: label {raw!r} is not one of the {spec.origin} labels {list(spec.names)}")


def _kind(raw: object) -> str:
    """int / float / str for label inference (as pandas' dtypes: integers classify, other numbers regress)."""
    if isinstance(raw, bool):
        return "str"
    if isinstance(raw, int):
        return "int"
    if isinstance(raw, float):
        return "float" if np.isfinite(raw) else "str"
    text = str(raw).strip()
    if text.lstrip("+-").isdigit():
        return "int"
    try:
        return "float" if np.isfinite(float(text)) else "str"
    except ValueError:
        return "str"


def infer_label_spec(values: list, locator: RowLocator, column: str, problem_type: str) -> LabelSpec:
    """Without a GLUE task: the training labels decide, as transformers' run_glue.py: numbers not all integers (or
    ``--problem_type regression``): regression; else classification over the distinct labels, sorted (integers by
    value), class ``i`` the ``i``-th."""
    present = [(i, v) for i, v in enumerate(values) if v is not None and not (isinstance(v, str) and not v.strip())]
    if not present:
        raise ValueError(f"{locator.where(0)} column {column!r}: no labels in the training data")
    kinds = [_kind(v) for _, v in present]
    if problem_type == "regression":
        return LabelSpec(None, origin="training")
    if problem_type == "auto" and "float" in kinds:
        first_str = next((i for (i, _), k in zip(present, kinds) if k == "str"), None)
        if first_str is None:
            return LabelSpec(None, origin="training")
        raise ValueError(
            locator.error(first_str, column, f"label {values[first_str]!r} is not a number, but other labels are "
                          "(a regression target?): fix it, or pass --problem_type classification / regression")
        )  # fmt: skip
    keys = {_label_key(v) for _, v in present}
    names = sorted(keys, key=lambda k: (0, int(k), "") if k.lstrip("+-").isdigit() else (1, 0, k))
    if len(names) < 2:
        raise ValueError(
            f"{locator.where(present[0][0])} column {column!r}: every training label is {names[0]!r}; classification "
            "needs two classes or more (regression: pass numbers and --problem_type regression)"
        )
    return LabelSpec(tuple(names), origin="training")


def _candidates(task: GlueTask | None, args: DataArguments, is_tsv: bool) -> tuple[list[list], list]:
    """Per text column and for the label: the accepted column names (or indices), the first present is used."""
    if args.text_columns:
        text = [[c.strip()] for c in args.text_columns.split(",") if c.strip()]
    elif task is None:
        text = []  # guessed from the data's columns (_guess_text_columns)
    else:
        primary, other = (task.tsv_text, task.text) if is_tsv else (task.text, task.tsv_text)
        text = [[p] + ([o] if isinstance(o, str) and o != p else []) for p, o in zip(primary, other)]
    if args.label_column:
        label = [args.label_column]
    elif task is None:
        label = ["label"]
    else:
        label = [task.tsv_label, "label"] if is_tsv else ["label", task.tsv_label]
        label = [c for i, c in enumerate(label) if c not in label[:i]]
    return text, label


def _guess_text_columns(columns: list[str], where: str) -> list[list]:
    for names in (["sentence1", "sentence2"], ["sentence"], ["text"]):
        if all(n in columns for n in names):
            return [[n] for n in names]
    raise ValueError(
        f"{where}: name the text column(s) with --text_columns (one, or two for sentence pairs); the columns are "
        f"{columns}"
    )


@dataclass
class Split:
    """One split as ``datasets.load_dataset`` read it, with where its rows came from and the columns used."""

    data: Any  # datasets.Dataset
    locator: RowLocator
    text_columns: list[str]
    label_column: str | None  # None: a test split without labels


def _source(split: Split) -> str:
    return split.locator.path or split.locator.where(0).rsplit(" row ", 1)[0]


def resolve_split(ds, locator: RowLocator, task: GlueTask | None, args: DataArguments, labels_required: bool) -> Split:
    """Find the text and label columns of one loaded split (a missing column names the file and its columns)."""
    text_names, label_names = _candidates(task, args, is_tsv=locator.ext == "tsv")
    columns = list(ds.column_names)
    where, owner = (locator.path, "the file's") if locator.path else (locator.where(0).rsplit(" row ", 1)[0], "its")
    if not text_names:
        text_names = _guess_text_columns(columns, where)
    text_cols = [resolve_column(columns, names, where, owner) for names in text_names]
    if labels_required or any((isinstance(n, int) and n < len(columns)) or n in columns for n in label_names):
        label_col = resolve_column(columns, label_names, where, owner)
    else:
        label_col = None
    return Split(ds, locator, text_cols, label_col)


def check_split(split: Split, out_text: list[str], spec: LabelSpec) -> dict[str, list]:
    """The validation pass over what ``datasets.load_dataset`` read: every text present and non-empty, every label in
    ``spec`` (a known class, or a number); the first error names the file, line and column. Returns the columns
    ``out_text`` (the texts, as strings) and ``label`` (class index or float; -1 in a test split without labels)."""
    ds, loc = split.data, split.locator
    out: dict[str, list] = {}
    for col, name in zip(split.text_columns, out_text):
        values = list(ds[col])
        for i, v in enumerate(values):
            if v is None:
                raise ValueError(loc.malformed(i) or f"{loc.where(i)}: column {col!r} not found (missing or null)")
            if not isinstance(v, str):
                v = values[i] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            if not v.strip():
                raise ValueError(loc.error(i, col, "the text is empty"))
        out[name] = values
    if split.label_column is None:
        out["label"] = [-1] * len(ds)
        return out
    col = split.label_column
    labels = []
    for i, raw in enumerate(list(ds[col])):
        if raw is None and loc.ext in ("json", "jsonl"):
            raise ValueError(f"{loc.where(i)}: column {col!r} not found (missing or null)")
        if split.locator.path is None and raw == -1 and not spec.is_regression:  # a Hub ClassLabel: no label (test)
            labels.append(-1)
            continue
        if (raw is None or raw == "") and loc.malformed(i):
            raise ValueError(loc.malformed(i))
        labels.append(parse_label(spec, raw, f"{loc.where(i)} column {col!r}"))
    out["label"] = labels
    return out


def _check_test_split(split: Split, out_text: list[str], spec: LabelSpec) -> dict[str, list]:
    """A test split: labels are optional (empty or -1: none), texts are checked as everywhere."""
    if split.label_column is not None:
        raw = list(split.data[split.label_column])
        if all(v is None or v == "" or v == -1 or v == "-1" for v in raw):
            split = Split(split.data, split.locator, split.text_columns, None)
    return check_split(split, out_text, spec)


def read_examples(path: str, task: GlueTask, args: DataArguments, labels_required: bool = True) -> dict[str, list]:
    """Read a tsv / csv / json(l) file of a GLUE task with ``datasets.load_dataset`` into the task's Hub columns,
    checking every row and label.

    ``labels_required=False`` (a test file): without a label column, every label is -1.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, missing column, malformed row, empty text or label outside the task's set;
            the message names the file and line.
    """
    split = load_split_file(path, None, task, args, labels_required)
    spec = glue_label_spec(task)
    out_text = list(task.text[: len(split.text_columns)])
    return check_split(split, out_text, spec) if labels_required else _check_test_split(split, out_text, spec)


def load_split_file(
    path: str, flag: str | None, task: GlueTask | None, args: DataArguments, labels_required: bool, cache_dir=None
) -> Split:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    header = not (ext == "tsv" and task is not None and not task.tsv_header and not args.text_columns)  # CoLA
    ds, locator = load_data_file(path, flag, header=header, cache_dir=cache_dir)
    return resolve_split(ds, locator, task, args, labels_required)


def _model_label_spec(model_args: ModelArguments) -> LabelSpec | None:
    """Evaluation without training on data without a GLUE task: the saved model's classes (config.id2label)."""
    try:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
    except Exception:  # noqa: BLE001 - no config: infer from the data
        return None
    if config.problem_type == "regression" or config.num_labels == 1:
        return LabelSpec(None, origin="model's")
    names = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None  # transformers' default names: the model says nothing about the classes
    return LabelSpec(names, by_index=True, origin="model's")


@dataclass
class RawData:
    """The checked splits (``datasets.DatasetDict``: text columns and ``label``) and what they hold."""

    splits: Any
    text: list[str]  # text column names in ``splits``
    labels: LabelSpec
    eval_splits: tuple[str, ...]
    source: str  # for results.json and the model card
    columns: dict[str, Any]  # the source's text / label columns


def load_raw_datasets(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> RawData:
    """The splits the run needs: train (``--do_train``), the evaluation splits (``--do_eval``), test
    (``--do_predict``); from local files when any is given, else ``--dataset_name``, else ``nyu-mll/glue`` on the
    Hub. Each split is read by ``datasets.load_dataset`` and then checked row by row (:func:`check_split`)."""
    import datasets

    task = GLUE_TASKS[data_args.task_name] if data_args.task_name else None
    wanted = {"train": training_args.do_train, "eval": training_args.do_eval, "test": training_args.do_predict}
    local = data_args.train_file or data_args.validation_file or data_args.test_file
    loaded: dict[str, Split] = {}
    if local:
        needed = [
            ("--train_file", data_args.train_file, wanted["train"]),
            ("--validation_file", data_args.validation_file, wanted["eval"]),
            ("--test_file", data_args.test_file, wanted["test"]),
        ]
        missing = [flag for flag, path, want in needed if want and path is None]
        if missing:
            raise ValueError(
                f"with local files, {' and '.join(missing)} must be given too (--do_train needs --train_file, "
                "--do_eval --validation_file, --do_predict --test_file), or none of them: data from the Hub"
            )
        eval_splits = task.eval_splits[:1] if task else ("validation",)
        files = []
        if wanted["train"]:
            files.append(("train", data_args.train_file, "--train_file"))
        if wanted["eval"]:
            files.append((eval_splits[0], data_args.validation_file, "--validation_file"))
            if data_args.task_name == "mnli" and data_args.validation_mismatched_file:
                files.append(
                    ("validation_mismatched", data_args.validation_mismatched_file, "--validation_mismatched_file")
                )
                eval_splits = task.eval_splits
        if wanted["test"]:
            files.append(("test", data_args.test_file, "--test_file"))
        for split, path, flag in files:  # read every file before anything heavy happens
            loaded[split] = load_split_file(path, flag, task, data_args, split != "test", model_args.cache_dir)
        source = ", ".join(path for _, path, _ in files)
    else:
        name = data_args.dataset_name or "nyu-mll/glue"
        config_name = data_args.dataset_config_name if data_args.dataset_name else data_args.task_name
        try:
            raw = load_named_dataset(name, config_name, cache_dir=model_args.cache_dir)
        except Exception as err:  # offline, no cache, unknown name
            shown = f"{name}/{config_name}" if config_name else name
            raise RuntimeError(
                f"could not load {shown} from the Hub ({type(err).__name__}: {err}); "
                "pass local files with --train_file/--validation_file"
            ) from err
        if data_args.validation_split_name:
            eval_splits = (data_args.validation_split_name,)
        else:
            eval_splits = task.eval_splits if task and not data_args.dataset_name else ("validation",)
        test_split = "test_matched" if data_args.task_name == "mnli" and "test_matched" in raw else "test"
        names = (
            ([("train", "train")] if wanted["train"] else [])
            + ([(s, s) for s in eval_splits] if wanted["eval"] else [])
            + ([("test", test_split)] if wanted["test"] else [])
        )
        absent = [s for _, s in names if s not in raw]
        if absent:
            raise ValueError(
                f"{name}: no split {absent} (its splits: {list(raw)}); --validation_split_name picks the evaluated one"
            )
        for key, split in names:
            locator = RowLocator(name=name if not config_name else f"{name}/{config_name}", split=split)
            loaded[key] = resolve_split(raw[split], locator, task, data_args, key != "test")
        source = name if not config_name else f"{name}/{config_name}"

    # the labels: the GLUE task's, a Hub ClassLabel's, else the training labels' (or the saved model's)
    first = next(iter(loaded.values()))
    if task is not None:
        spec = glue_label_spec(task)
    else:
        spec = None
        labelled = [s for key, s in loaded.items() if key != "test" and s.label_column is not None]
        feature = labelled[0].data.features.get(labelled[0].label_column) if labelled else None
        if isinstance(feature, datasets.ClassLabel) and data_args.problem_type != "regression":
            spec = LabelSpec(tuple(feature.names), by_index=True, origin="dataset's")
        elif "train" in loaded:
            t = loaded["train"]
            spec = infer_label_spec(list(t.data[t.label_column]), t.locator, t.label_column, data_args.problem_type)
        else:
            spec = _model_label_spec(model_args)
            if spec is None and labelled:
                s = labelled[0]
                spec = infer_label_spec(
                    list(s.data[s.label_column]), s.locator, s.label_column, data_args.problem_type
                )
            if spec is None:
                raise ValueError(
                    "without --task_name, training data or a model that names its classes, the labels are unknown"
                )
    out_text = list(task.text[: len(first.text_columns)]) if task else list(first.text_columns)
    for s in loaded.values():
        if len(s.text_columns) != len(out_text):
            raise ValueError(
                f"{_source(s)}: {len(s.text_columns)} text columns, the other splits have {len(out_text)}"
            )
    checked = {
        key: (_check_test_split(s, out_text, spec) if key == "test" else check_split(s, out_text, spec))
        for key, s in loaded.items()
    }
    splits = datasets.DatasetDict({key: datasets.Dataset.from_dict(cols) for key, cols in checked.items()})
    columns = {
        "text": first.text_columns,
        "label": next((s.label_column for s in loaded.values() if s.label_column), None),
    }
    return RawData(splits, out_text, spec, eval_splits, source, columns)


# -- metric ------------------------------------------------------------------------------------------------------
_METRICS: dict[str, tuple[Any, str]] = {}


def load_glue_metric(task_name: str) -> tuple[Any, str]:
    """The task's GLUE metric as transformers' run_glue.py: ``evaluate.load("glue", task)`` first (its script lives
    on the Hub), else the offline implementation ``_metrics.glue_metric`` (same keys, same values; checked
    in ``tests/test_metrics.py``). Offline with ``HF_HUB_OFFLINE=1`` the load fails in about a second (without it,
    the Hub client retries for ~40 s first); the answer is kept per task for the process. Returns
    ``(compute(predictions=, references=) -> dict, source)``."""
    if task_name not in _METRICS:
        try:
            import evaluate

            metric = evaluate.load("glue", task_name)
            _METRICS[task_name] = (metric.compute, "evaluate")
        except Exception as err:  # offline: FileNotFoundError / ConnectionError from the Hub client
            logger.info(
                "evaluate.load('glue', %r) failed (%s): using recipes/_metrics.py", task_name, type(err).__name__
            )
            _METRICS[task_name] = (partial(glue_metric, task_name), METRIC_SOURCE)
    return _METRICS[task_name]


def with_combined_score(result: dict[str, float]) -> dict[str, float]:
    """transformers' run_glue.py: with several metrics (MRPC/QQP: accuracy, f1; STS-B: pearson, spearmanr), their
    mean as ``combined_score``."""
    result = {k: float(v) for k, v in result.items()}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def custom_metric(spec: LabelSpec) -> tuple[str, Any, str]:
    """Data without a GLUE task (``recipes/_metrics.py``, offline): classification: accuracy, and F1 of class 1 with
    two classes; regression: Pearson and Spearman correlation, and the mean squared error. ``combined_score``: the
    mean of the first two where there are two. Returns ``(main metric, compute, source)``."""

    def compute(predictions, references) -> dict[str, float]:
        if spec.is_regression:
            out = with_combined_score(
                {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
            )
            diff = np.asarray(predictions, dtype=np.float64) - np.asarray(references, dtype=np.float64)
            out["mse"] = float(np.mean(diff**2))
            return out
        result = {"accuracy": accuracy(predictions, references)}
        if len(spec.names) == 2:
            result["f1"] = f1_binary(predictions, references)
        return with_combined_score(result)

    return ("pearson" if spec.is_regression else "accuracy"), compute, METRIC_SOURCE


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    model_args, data_args, analog_args, training_args = parse_args(
        (ModelArguments, DataArguments, GlueAnalogArguments, TrainingArguments), argv
    )
    setup_logging(training_args)
    run_mode(training_args, analog_args)
    if training_args.average_tokens_across_devices:
        # Sequence classification returns a per-example mean loss; averaging "tokens" across devices multiplies
        # it by the world size in transformers 5.x (doubled loss and gradients on 2 processes).
        training_args.average_tokens_across_devices = False
    noise_config = build_noise_config(analog_args)  # validates the analog arguments before any data is read
    checkpoint = find_checkpoint(training_args, analog_args)
    data = load_raw_datasets(data_args, model_args, training_args)
    raw, spec = data.splits, data.labels
    is_regression = spec.is_regression
    set_seed(training_args.seed)
    logger.info(
        "data %s: %s; text column(s) %s, label column %r: %s",
        data.source,
        ", ".join(f"{k} {len(v)}" for k, v in raw.items()),
        data.columns["text"],
        data.columns["label"],
        "regression" if is_regression else f"{len(spec.names)} classes {list(spec.names)}",
    )

    num_labels = 1 if is_regression else len(spec.names)
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
    )
    if not is_regression:
        config.id2label = dict(enumerate(spec.names))
        config.label2id = {name: i for i, name in enumerate(spec.names)}
    else:
        config.problem_type = "regression"
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    first = next(iter(raw.values()))
    text_cols = data.text
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    if data_args.max_seq_length > limit:
        logger.warning(
            "`--max_seq_length` %d exceeds the model's %d positions: using %d", data_args.max_seq_length, limit, limit
        )
        data_args.max_seq_length = limit

    def tokenize(batch):
        texts = [batch[c] for c in text_cols]
        return tokenizer(
            *texts,
            truncation=True,
            max_length=data_args.max_seq_length,
            padding="max_length" if data_args.pad_to_max_length else False,
        )

    with training_args.main_process_first(desc="tokenize"):
        keep = {"label"}
        raw = raw.map(tokenize, batched=True, remove_columns=[c for c in first.column_names if c not in keep])
    train = raw["train"] if training_args.do_train else None
    if train is not None and data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    eval_sets = {}
    for split in data.eval_splits if training_args.do_eval else ():
        if split in raw:
            ds = raw[split]
            if data_args.max_eval_samples is not None:
                ds = ds.select(range(min(data_args.max_eval_samples, len(ds))))
            eval_sets[split] = ds
    primary = data.eval_splits[0]
    test = raw["test"].remove_columns("label") if training_args.do_predict else None  # GLUE test: label -1

    if data_args.task_name:
        metric_key = GLUE_METRIC_KEYS[data_args.task_name][0]
        compute, metric_source = load_glue_metric(data_args.task_name)
    else:
        metric_key, compute, metric_source = custom_metric(spec)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.squeeze(logits, -1) if is_regression else np.argmax(logits, axis=-1)
        return with_combined_score(compute(predictions=preds, references=pred.label_ids))

    analog_checkpoint = hf_cim.patch.get_config(model) is not None
    initial_model = snapshot_for_baseline(model, analog_args)  # --digital_baseline: the twin starts from here
    noise_config = prepare_model(model, noise_config, analog_args, train=training_args.do_train)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_sets.get(primary),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    add_recipe_callbacks(trainer)
    calibration = calibration_batches(trainer, train if train is not None else eval_sets.get(primary), analog_args)
    add_range_calibration(trainer, calibration, analog_args)
    add_digital_warmup(trainer, analog_args, ste_default=DIGITAL_WARMUP_RATIO)
    add_weight_clip(trainer, analog_args)
    results: dict = {
        "recipe": "run_glue",
        "command": command_line(argv, __file__),
        "do_train": training_args.do_train,
        "do_eval": training_args.do_eval,
        "do_predict": training_args.do_predict,
        "task": data_args.task_name,
        "data": {
            "source": data.source,
            "text_columns": data.columns["text"],
            "label_column": data.columns["label"],
            "problem_type": "regression" if is_regression else "single_label_classification",
            "labels": list(spec.names) if spec.names else None,
            "labels_from": spec.origin,
        },
        "model": model_args.model_name_or_path,
        "analog_checkpoint": analog_checkpoint,
        "metric": metric_key,
        "metric_source": metric_source,
        "num_train_examples": len(train) if train is not None else None,
        "analog": {
            "preset": analog_args.preset if not analog_checkpoint or analog_args.preset_given else "checkpoint",
            "level": noise_config.level,
            "gradient": analog_args.gradient,
            "mask_saturated": analog_args.mask_saturated,
            "backward_weights": analog_args.backward_weights,
            "program_gradient": analog_args.program_gradient,
            "digital_warmup_ratio": analog_args.digital_warmup_ratio,
            "train_t_inference": analog_args.train_time,
            "weight_clip_sigmas": analog_args.weight_clip_sigmas,
            "input_range_alpha": analog_args.input_range_alpha,
            "output_range_alpha": analog_args.output_range_alpha,
            "chip_calibration": analog_args.chip_calibration,
            "config": noise_config.to_dict(),
        },
    }
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # config.json carries the noise config (quantization_config) for an analog model
        results["train"] = save_train_outputs(trainer, train_result, len(train))
        results["analog"]["config"] = noise_config.to_dict()  # with a static DAC: the ranges calibrated in training
    if training_args.do_eval:
        results["eval"] = measure_chips(trainer, noise_config, analog_args, eval_sets, metric_key, calibration)
        samples = {name: len(ds) for name, ds in eval_sets.items()}
        save_eval_outputs(trainer, eval_metrics(results["eval"], primary, metric_key, samples))
    if training_args.do_predict:
        results["predict"] = write_predictions(
            trainer, test, spec, data_args.task_name, noise_config, analog_args, calibration
        )
    if initial_model is not None:  # every GLUE metric (accuracy, F1, Matthews, Pearson) is higher-is-better
        _, baseline = train_digital_baseline(
            trainer, initial_model, noise_config, analog_args, eval_sets, metric_key, calibration=calibration
        )
        results["digital_baseline"] = baseline
        results["comparison"] = compare_with_baseline(
            results["eval"], baseline["eval"], metric_key, greater_is_better=True
        )
    write_results(trainer, results, start)
    if "comparison" in results:
        write_comparison(trainer, results["comparison"])
    if training_args.do_train:
        if data_args.dataset_name:
            card_data = [data_args.dataset_name]
        else:  # a GLUE task (from the Hub or local copies); local custom data has no dataset id
            card_data = [f"nyu-mll/glue/{data_args.task_name}"] if data_args.task_name else []
        card = card_kwargs(results, "text-classification", card_data, model_args.model_name_or_path)
        card_and_push(trainer, hf_cim.patch.get_config(model) is not None, card, push=analog_args.push_to_hub)
    return results


def write_predictions(
    trainer, test, spec: LabelSpec, task_name: str | None, noise_config, analog_args, calibration=()
) -> dict:
    """``predict_results_<task>.txt`` (``predict_results.txt`` without a GLUE task) as transformers' run_glue.py
    (``index``, ``prediction``: the label name, or the score for regression) with a ``prediction_chip_0`` column: the same examples on simulated chip 0 (the measured noise
    config at its level, drifted to the last ``--eval_t_inference``)."""
    t = max(analog_args.t_inference)
    digital, chip = predict_digital_and_chip(trainer, test, noise_config, t, analog_args, list(calibration))

    def labels(logits):
        logits = logits[0] if isinstance(logits, tuple) else logits
        if spec.is_regression:
            return [f"{v:.3f}" for v in np.squeeze(logits, -1)]
        return [spec.names[i] for i in np.argmax(logits, axis=-1)]

    pred, pred_chip = labels(digital), labels(chip)
    name = f"predict_results_{task_name}.txt" if task_name else "predict_results.txt"
    path = os.path.join(trainer.args.output_dir, name)
    if trainer.is_world_process_zero():
        with open(path, "w") as f:
            f.write("index\tprediction\tprediction_chip_0\n")
            f.writelines(f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(pred, pred_chip)))
        logger.info("predictions of %d test examples (digital, chip 0 at t = %s): %s", len(pred), format_time(t), path)
    agree = sum(a == b for a, b in zip(pred, pred_chip)) / len(pred) if not spec.is_regression else None
    return {"file": path, "num_examples": len(pred), "t_inference": t, "chip_agrees_with_digital": agree}


if __name__ == "__main__":
    main()
    shutdown()
