#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task noise-aware for an analog chip, then measure it on simulated chips.

Follows transformers' ``examples/pytorch/text-classification/run_glue.py``. Data: ``--task_name`` alone loads
``nyu-mll/glue`` from the Hub; ``--train_file`` / ``--validation_file`` read local tsv (the original GLUE layout),
csv or json files, checked before training (a missing file, a malformed row, an unknown label or column stops the
run with the file, line and column). Metrics: the task's official GLUE metric through ``evaluate.load("glue", task)``,
else (offline) the same metric from :mod:`hf_cim.metrics`; ``combined_score`` where transformers' run_glue.py adds it.

    python recipes/run_glue.py --task_name mrpc --model_name_or_path <bert folder> \\
        --train_file ../shared/data/glue/MRPC/train.tsv --validation_file ../shared/data/glue/MRPC/dev.tsv \\
        --output_dir out/mrpc --preset paper --gradient ste --num_train_epochs 1

Runs unchanged under ``accelerate launch`` (see ``recipes/configs``) and ``torchrun``.
"""

from __future__ import annotations

import csv
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
    add_recipe_callbacks,
    build_noise_config,
    card_and_push,
    card_kwargs,
    command_line,
    compare_with_baseline,
    eval_metrics,
    find_checkpoint,
    format_time,
    measure_chips,
    parse_args,
    predict_digital_and_chip,
    prepare_model,
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
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_cim
from hf_cim.metrics import GLUE_METRIC_KEYS, glue_metric

logger = logging.getLogger("recipes.run_glue")


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
    task_name: str = field(metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: tsv (GLUE layout), csv, json."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (MNLI: matched)."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI: mismatched validation."})
    test_file: str | None = field(
        default=None,
        metadata={"help": "--do_predict: examples to predict (as --validation_file; the label column may be absent)."},
    )
    text_columns: str | None = field(
        default=None, metadata={"help": "Comma-separated text column(s) of local files, if not the task's."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column of local files, if not the task's."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad to max_seq_length (else per batch)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})

    def __post_init__(self) -> None:
        self.task_name = self.task_name.lower().replace("-", "")
        if self.task_name not in GLUE_TASKS:
            raise ValueError(f"`--task_name` must be one of {list(GLUE_TASKS)}, got {self.task_name!r}")


# -- local files ---------------------------------------------------------------------------------------------------
def _parse_label(task: GlueTask, raw: object, where: str) -> int | float:
    if task.labels is None:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if not STSB_RANGE[0] <= value <= STSB_RANGE[1]:
            raise ValueError(f"{where}: label {raw!r} is not a similarity score in [{STSB_RANGE[0]}, {STSB_RANGE[1]}]")
        return value
    text = str(raw).strip()
    if text in task.labels:
        return task.labels.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(task.labels):
        return int(text)
    raise ValueError(
        f"{where}: label {raw!r} is not in the task's label set {list(range(len(task.labels)))} / {list(task.labels)}"
    )


def _candidates(task: GlueTask, args: DataArguments, is_tsv: bool) -> tuple[list[list], list]:
    """Per text column and for the label: the accepted column names (or indices), the first present is used."""
    if args.text_columns:
        text = [[c.strip()] for c in args.text_columns.split(",")]
    else:
        primary, other = (task.tsv_text, task.text) if is_tsv else (task.text, task.tsv_text)
        text = [[p] + ([o] if isinstance(o, str) and o != p else []) for p, o in zip(primary, other)]
    if args.label_column:
        label = [args.label_column]
    else:
        label = [task.tsv_label, "label"] if is_tsv else ["label", task.tsv_label]
        label = [c for i, c in enumerate(label) if c not in label[:i]]
    return text, label


def _resolve(header: list[str], names: list, path: str) -> int:
    for name in names:
        if isinstance(name, int):
            return name
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: column {names[0]!r} not found; the file's columns are {header}")


def read_examples(path: str, task: GlueTask, args: DataArguments, labels_required: bool = True) -> dict[str, list]:
    """Read a tsv / csv / json(l) file into the task's Hub columns, checking every row and label.

    ``labels_required=False`` (a test file): without a label column, every label is -1.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, missing column, malformed row or label outside the task's set; the message
            names the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("tsv", "csv", "json", "jsonl"):
        raise ValueError(f"data file {path!r}: extension must be .tsv, .csv, .json or .jsonl, got {ext!r}")
    text_names, label_names = _candidates(task, args, is_tsv=ext == "tsv")
    label_col = label_names[0]
    out: dict[str, list] = {name: [] for name in task.text[: len(text_names)]}
    out["label"] = []
    if ext in ("json", "jsonl"):
        with open(path, encoding="utf-8") as f:
            content = f.read()
        try:
            records = json.loads(content) if content.lstrip().startswith("[") else None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if records is None:
            records = []
            for i, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        records.append((i, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{i}: not a JSON object ({err.msg})") from err
        else:
            records = list(enumerate(records, 1))
        for i, rec in records:
            where = f"{path}:{i}"
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            keys = list(rec)
            for names, hub_name in zip(text_names, out):
                out[hub_name].append(str(rec[keys[_resolve(keys, names, where)]]))
            if not labels_required and not any(n in keys for n in label_names):
                out["label"].append(-1)
                continue
            label_key = keys[_resolve(keys, label_names, where)]
            out["label"].append(_parse_label(task, rec[label_key], f"{where} column {label_key!r}"))
        return out

    # tsv (GLUE: no quoting at all, see shared/MODELS.md) or csv (standard quoting)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext == "tsv":
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            rows = csv.reader(f)
        header: list[str] | None = None
        width = None
        idx: list[int] = []
        label_idx: int | None = -1
        for line_no, row in enumerate(rows, 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None and (ext != "tsv" or task.tsv_header or args.text_columns):
                header = [h.strip() for h in row]
                width = len(header)
                idx = [_resolve(header, names, path) for names in text_names]
                if labels_required or any(n in header for n in label_names):
                    label_idx = _resolve(header, label_names, path)
                    label_col = header[label_idx]
                else:
                    label_idx = None
                continue
            if width is None:  # CoLA: no header, fixed layout
                width = len(row)
                idx, label_idx = [int(n[0]) for n in text_names], int(label_names[0])
                needed = max([*idx, label_idx]) + 1
                if width < needed:
                    raise ValueError(f"{path}:{line_no}: expected at least {needed} tab-separated fields, got {width}")
            if len(row) != width:
                raise ValueError(
                    f"{path}:{line_no}: malformed row: expected {width} fields, got {len(row)} "
                    f"(a stray tab or newline inside a field?)"
                )
            for i, hub_name in zip(idx, out):
                out[hub_name].append(row[i])
            if label_idx is None:
                out["label"].append(-1)
                continue
            out["label"].append(_parse_label(task, row[label_idx], f"{path}:{line_no} column {label_col!r}"))
    if not out["label"]:
        raise ValueError(f"{path}: no examples found")
    return out


def load_raw_datasets(data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments):
    """The splits the run needs: train (``--do_train``), the task's evaluation splits (``--do_eval``), test
    (``--do_predict``); from local files when any is given, else from ``nyu-mll/glue`` on the Hub."""
    import datasets

    task = GLUE_TASKS[data_args.task_name]
    local = data_args.train_file or data_args.validation_file or data_args.test_file
    if local:
        needed = [
            ("--train_file", data_args.train_file, training_args.do_train),
            ("--validation_file", data_args.validation_file, training_args.do_eval),
            ("--test_file", data_args.test_file, training_args.do_predict),
        ]
        missing = [flag for flag, path, wanted in needed if wanted and path is None]
        if missing:
            raise ValueError(
                f"with local files, {' and '.join(missing)} must be given too (--do_train needs --train_file, "
                "--do_eval --validation_file, --do_predict --test_file), or none of them: data from the Hub"
            )
    if not local:
        try:
            raw = datasets.load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=model_args.cache_dir)
        except Exception as err:  # offline, no cache
            raise RuntimeError(
                f"could not load nyu-mll/glue/{data_args.task_name} from the Hub ({type(err).__name__}: {err}); "
                "pass local files with --train_file/--validation_file"
            ) from err
        splits = {"train": raw["train"]} if training_args.do_train else {}
        if training_args.do_eval:
            splits.update({s: raw[s] for s in task.eval_splits})
        if training_args.do_predict:
            splits["test"] = raw["test_matched" if data_args.task_name == "mnli" else "test"]
        return datasets.DatasetDict(splits)
    files = {}
    if training_args.do_train:
        files["train"] = data_args.train_file
    if training_args.do_eval:
        files[task.eval_splits[0]] = data_args.validation_file
        if data_args.task_name == "mnli" and data_args.validation_mismatched_file:
            files["validation_mismatched"] = data_args.validation_mismatched_file
    if training_args.do_predict:
        files["test"] = data_args.test_file
    # Read and check every file before anything heavy happens.
    parsed = {
        split: read_examples(path, task, data_args, labels_required=split != "test") for split, path in files.items()
    }
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(cols) for split, cols in parsed.items()})


# -- metric ------------------------------------------------------------------------------------------------------
_METRICS: dict[str, tuple[Any, str]] = {}


def load_glue_metric(task_name: str) -> tuple[Any, str]:
    """The task's GLUE metric as transformers' run_glue.py: ``evaluate.load("glue", task)`` first (its script lives
    on the Hub), else the offline implementation :func:`hf_cim.metrics.glue_metric` (same keys, same values; checked
    in ``tests/test_metrics.py``). Offline with ``HF_HUB_OFFLINE=1`` the load fails in about a second (without it,
    the Hub client retries for ~40 s first); the answer is kept per task for the process. Returns
    ``(compute(predictions=, references=) -> dict, source)``."""
    if task_name not in _METRICS:
        try:
            import evaluate

            metric = evaluate.load("glue", task_name)
            _METRICS[task_name] = (metric.compute, "evaluate")
        except Exception as err:  # offline: FileNotFoundError / ConnectionError from the Hub client
            logger.info("evaluate.load('glue', %r) failed (%s): using hf_cim.metrics", task_name, type(err).__name__)
            _METRICS[task_name] = (partial(glue_metric, task_name), "hf_cim.metrics")
    return _METRICS[task_name]


def with_combined_score(result: dict[str, float]) -> dict[str, float]:
    """transformers' run_glue.py: with several metrics (MRPC/QQP: accuracy, f1; STS-B: pearson, spearmanr), their
    mean as ``combined_score``."""
    result = {k: float(v) for k, v in result.items()}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    model_args, data_args, analog_args, training_args = parse_args(
        (ModelArguments, DataArguments, AnalogArguments, TrainingArguments), argv
    )
    setup_logging(training_args)
    run_mode(training_args, analog_args)
    if training_args.average_tokens_across_devices:
        # Sequence classification returns a per-example mean loss; averaging "tokens" across devices multiplies
        # it by the world size in transformers 5.x (doubled loss and gradients on 2 processes).
        training_args.average_tokens_across_devices = False
    task = GLUE_TASKS[data_args.task_name]
    is_regression = task.labels is None
    noise_config = build_noise_config(analog_args)  # validates the analog arguments before any data is read
    checkpoint = find_checkpoint(training_args, analog_args)
    raw = load_raw_datasets(data_args, model_args, training_args)
    set_seed(training_args.seed)

    num_labels = 1 if is_regression else len(task.labels)
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
    )
    if not is_regression:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {name: i for i, name in enumerate(task.labels)}
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
    text_cols = [c for c in task.text if c in first.column_names]
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
    for split in task.eval_splits if training_args.do_eval else ():
        if split in raw:
            ds = raw[split]
            if data_args.max_eval_samples is not None:
                ds = ds.select(range(min(data_args.max_eval_samples, len(ds))))
            eval_sets[split] = ds
    primary = task.eval_splits[0]
    test = raw["test"].remove_columns("label") if training_args.do_predict else None  # GLUE test: label -1

    metric_key = GLUE_METRIC_KEYS[data_args.task_name][0]
    compute, metric_source = load_glue_metric(data_args.task_name)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.squeeze(logits, -1) if is_regression else np.argmax(logits, axis=-1)
        return with_combined_score(compute(predictions=preds, references=pred.label_ids))

    analog_checkpoint = hf_cim.get_config(model) is not None
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
    results: dict = {
        "recipe": "run_glue",
        "command": command_line(argv, __file__),
        "do_train": training_args.do_train,
        "do_eval": training_args.do_eval,
        "do_predict": training_args.do_predict,
        "task": data_args.task_name,
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
            "config": noise_config.to_dict(),
        },
    }
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # config.json carries the noise config (quantization_config) for an analog model
        results["train"] = save_train_outputs(trainer, train_result, len(train))
    if training_args.do_eval:
        results["eval"] = measure_chips(trainer, noise_config, analog_args, eval_sets, metric_key)
        samples = {name: len(ds) for name, ds in eval_sets.items()}
        save_eval_outputs(trainer, eval_metrics(results["eval"], primary, metric_key, samples))
    if training_args.do_predict:
        results["predict"] = write_predictions(trainer, test, task, data_args.task_name, noise_config, analog_args)
    if initial_model is not None:  # every GLUE metric (accuracy, F1, Matthews, Pearson) is higher-is-better
        _, baseline = train_digital_baseline(trainer, initial_model, noise_config, analog_args, eval_sets, metric_key)
        results["digital_baseline"] = baseline
        results["comparison"] = compare_with_baseline(
            results["eval"], baseline["eval"], metric_key, greater_is_better=True
        )
    write_results(trainer, results, start)
    if "comparison" in results:
        write_comparison(trainer, results["comparison"])
    if training_args.do_train:
        card = card_kwargs(
            results, "text-classification", [f"nyu-mll/glue/{data_args.task_name}"], model_args.model_name_or_path
        )
        card_and_push(trainer, hf_cim.get_config(model) is not None, card, push=analog_args.push_to_hub)
    return results


def write_predictions(trainer, test, task: GlueTask, task_name: str, noise_config, analog_args) -> dict:
    """``predict_results_<task>.txt`` as transformers' run_glue.py (``index``, ``prediction``: the label name, or the
    score for STS-B) with a ``prediction_chip_0`` column: the same examples on simulated chip 0 (the measured noise
    config at its level, drifted to the last ``--eval_t_inference``)."""
    t = max(analog_args.t_inference)
    digital, chip = predict_digital_and_chip(trainer, test, noise_config, t)

    def labels(logits):
        logits = logits[0] if isinstance(logits, tuple) else logits
        if task.labels is None:
            return [f"{v:.3f}" for v in np.squeeze(logits, -1)]
        return [task.labels[i] for i in np.argmax(logits, axis=-1)]

    pred, pred_chip = labels(digital), labels(chip)
    path = os.path.join(trainer.args.output_dir, f"predict_results_{task_name}.txt")
    if trainer.is_world_process_zero():
        with open(path, "w") as f:
            f.write("index\tprediction\tprediction_chip_0\n")
            f.writelines(f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(pred, pred_chip)))
        logger.info("predictions of %d test examples (digital, chip 0 at t = %s): %s", len(pred), format_time(t), path)
    agree = sum(a == b for a, b in zip(pred, pred_chip)) / len(pred) if task.labels else None
    return {"file": path, "num_examples": len(pred), "t_inference": t, "chip_agrees_with_digital": agree}


if __name__ == "__main__":
    main()
    shutdown()
