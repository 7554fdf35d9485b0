"""Model cards for analog checkpoints: :func:`write_model_card` writes ``README.md`` with the Hub metadata.

The card holds the base model, task, how to load it, the noise config as a table, the training recipe (secrets
redacted: :mod:`hf_cim.redact`), the clean metrics and the robustness table (rendered by
:func:`hf_cim.evaluation.robustness_markdown`, the one renderer of that table), and the metadata
(``huggingface_hub.ModelCardData``: tags ``analog-cim`` / ``hf-cim`` and a ``model-index`` so the Hub shows the
results).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .config import AnalogNoiseConfig
from .evaluation import robustness_markdown
from .patch import get_config
from .redact import REDACTED, is_secret_key, redact_secrets

__all__ = ["CARD_TAGS", "write_model_card"]

CARD_TAGS = ["analog-cim", "hf-cim"]
#: TrainingArguments fields shown in the card (all keys are shown for a plain dict).
_TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "seed",
    "bf16",
    "fp16",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "[]"
    return str(value)


def _config_table(config: AnalogNoiseConfig) -> str:
    lines = ["| field | value |", "| --- | --- |"]
    for key, value in config.to_dict().items():
        if key == "noise":
            continue
        lines.append(f"| `{key}` | {_fmt(value)} |")
    lines += ["", "| noise model | parameters |", "| --- | --- |"]
    for model in config.noise:
        fields = {k: v for k, v in model.to_dict().items() if k != "name"}
        params = ", ".join(f"`{k}`={_fmt(v)}" for k, v in fields.items()) or "–"
        lines.append(f"| `{model.name}` | {params} |")
    if not config.noise:
        lines.append("| (none: converters only) | – |")
    return "\n".join(lines)


def _robustness_rows(robustness: Any) -> list[dict[str, Any]]:
    return list(getattr(robustness, "rows", robustness))


def _robustness_table(robustness: Any, metric: str | None) -> tuple[str, str | None, dict[str, float]]:
    """(table, metric name, clean metrics) from a ``RobustnessResult`` or a list of row dicts."""
    if hasattr(robustness, "to_markdown"):  # a RobustnessResult
        return robustness.to_markdown(), getattr(robustness, "metric", metric), dict(getattr(robustness, "clean", {}))
    return robustness_markdown(_robustness_rows(robustness), metric, owner="write_model_card"), metric, {}


_NOT_METRICS = ("runtime", "per_second", "epoch", "samples", "steps")


def _eval_results(
    rows: list[dict[str, Any]],
    metric: str | None,
    clean: Mapping[str, float],
    task: str | None,
    datasets: list[str] | None,
    dataset_split: str | None,
) -> list[Any]:
    """The Hub's ``model-index`` entries (``huggingface_hub.EvalResult``): the digital model's metrics, then one per
    chip cell ``(level, t_inference)`` with the mean over chips as value and the cell in ``metric_config``."""
    from huggingface_hub import EvalResult

    dataset = datasets[0] if datasets else "custom"
    common = {
        "task_type": task or "other",
        "dataset_type": dataset,
        "dataset_name": dataset,
        "dataset_split": dataset_split,
    }
    out = []
    for key, value in clean.items():
        if any(w in key for w in _NOT_METRICS):  # Trainer's timing keys (eval_runtime...) are not results
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            name = key.removeprefix("eval_")
            out.append(
                EvalResult(**common, metric_type=name, metric_value=float(value), metric_name=f"{name} (digital)")
            )
    name = (metric or "metric").removeprefix("eval_")
    for r in rows:
        if not math.isfinite(r["mean"]):
            continue
        cell = f"level {r['level']:g}, t_inference {r['t_inference']:g} s"
        out.append(
            EvalResult(
                **common,
                metric_type=name,
                metric_value=float(r["mean"]),
                metric_name=f"{name} on {r['n_chips']} simulated chips ({cell}, mean)",
                metric_config=f"level={r['level']:g},t_inference={r['t_inference']:g}s,chips={r['n_chips']}",
            )
        )
    return out


def _training_lines(training_args: Any) -> list[str]:
    if training_args is None:
        return []
    if isinstance(training_args, Mapping):
        items = {k: REDACTED if is_secret_key(k) else v for k, v in training_args.items()}
    else:
        items = {k: getattr(training_args, k) for k in _TRAINING_KEYS if hasattr(training_args, k)}
    return [f"| `{k}` | {_fmt(v)} |" for k, v in items.items()]


def write_model_card(
    save_directory: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    config: AnalogNoiseConfig | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    task: str | None = None,
    datasets: Iterable[str] | None = None,
    metrics: Iterable[str] | None = None,
    recipe: str | None = None,
    training_args: Any = None,
    clean_metric: Mapping[str, float] | float | None = None,
    robustness: Any = None,
    metric: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    dataset_split: str | None = None,
) -> str:
    """Write ``README.md`` (a Hub model card) for an analog checkpoint in ``save_directory``; returns its text.

    Args:
        save_directory: the checkpoint folder.
        model: the patched model (gives the noise config, the model class and ``name_or_path``).
        config: the noise config, when no ``model`` is given.
        model_name: the card's title (default: the folder name).
        base_model: the checkpoint it was trained from (Hub id), e.g. ``"gpt2"``.
        task: a Hub ``pipeline_tag``, e.g. ``"text-generation"``, ``"text-classification"``.
        datasets: Hub dataset ids (or names) it was trained on.
        metrics: metric names, e.g. ``["accuracy"]``.
        recipe: the command line or script that trained it (secrets are redacted: :func:`redact_secrets`).
        training_args: a ``TrainingArguments`` (its main fields are shown) or a dict (all keys are shown; the
            values of token-like keys such as ``hub_token`` are redacted).
        clean_metric: the digital model's metric(s) (:func:`hf_cim.noise_disabled`): a dict or one number.
        robustness: a ``hf_cim.evaluation.RobustnessResult`` or its ``rows`` (dicts with ``level``,
            ``t_inference``, ``mean``, ``std``, ``min``, ``max``, ``n_chips``): chips × levels × drift times.
        metric: the name of the robustness metric, when ``robustness`` is a list of rows.
        license, language: Hub metadata.
        dataset_split: the split the metrics were measured on (``"validation"``), for the ``model-index``.

    The metadata (``huggingface_hub.ModelCardData``) carries the tags ``analog-cim`` / ``hf-cim`` and, when there
    are metrics, a ``model-index`` (``eval_results``): the digital metrics and one ``EvalResult`` per chip cell
    (mean over chips, the cell in ``metric_config``), so the Hub shows them.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if config is None and model is not None:
        config = get_config(model)
    if config is None:
        raise ValueError("write_model_card: pass a patched `model` or a `config` (AnalogNoiseConfig)")
    model_name = model_name or os.path.basename(os.path.normpath(os.fspath(save_directory)))
    hf_config = getattr(model, "config", None)
    if base_model is None and hf_config is not None:
        path = getattr(hf_config, "_name_or_path", "") or ""
        base_model = path if path and not os.path.isdir(path) else None

    table, metric, clean, rows = (None, metric, {}, [])
    if robustness is not None:
        table, metric, clean = _robustness_table(robustness, metric)
        rows = _robustness_rows(robustness)
    if clean_metric is not None:
        clean = dict(clean_metric) if isinstance(clean_metric, Mapping) else {metric or "metric": float(clean_metric)}
    metric_names = list(metrics) if metrics is not None else ([metric] if metric else None)
    datasets = list(datasets) if datasets is not None else None
    eval_results = _eval_results(rows, metric, clean, task, datasets, dataset_split) or None

    data = ModelCardData(
        model_name=model_name if eval_results else None,  # the model-index's name; no stray key otherwise
        eval_results=eval_results,
        language=language,
        license=license,
        library_name="transformers",
        tags=list(CARD_TAGS),
        datasets=datasets,
        metrics=metric_names,
        base_model=base_model,
        pipeline_tag=task,
    )
    body = [
        f"# {model_name}",
        "",
        "A noise-robust model for analog compute-in-memory (CIM) hardware, trained with "
        "hf_cim's extended straight-through estimation (arXiv 2508.11940): the forward pass "
        "simulates the analog chip below, the backward pass uses the clean gradient.",
        "",
        f"- **Base model:** {base_model or 'unknown'}",
        f"- **Task:** {task or 'unknown'}",
    ]
    if datasets is not None:
        body.append(f"- **Datasets:** {', '.join(datasets)}")
    body += ["", "## How to load", "", *_load_snippet(model, model_name, base_model), ""]
    body += [
        "Without `import hf_cim`, transformers warns `Unknown quantization type, got hf_cim` and loads the clean "
        "digital model (the weights are ordinary safetensors).",
        "",
        "## Analog noise configuration",
        "",
        _config_table(config),
    ]
    train_rows = _training_lines(training_args)
    if recipe or train_rows:
        body += ["", "## Training", ""]
        if recipe:
            body += ["```bash", recipe, "```", ""]
        if train_rows:
            body += ["| argument | value |", "| --- | --- |", *train_rows]
    if clean or table:
        body += ["", "## Results", ""]
        if clean:
            body += ["Digital (noise off) metrics:", "", "| metric | value |", "| --- | --- |"]
            body += [f"| {k} | {_fmt(float(v))} |" for k, v in clean.items()]
            body.append("")
        if table:
            body += [
                "Robustness: the same weights on simulated chips (one programming draw per chip seed), "
                "per noise level and drift time `t_inference`:",
                "",
                table,
            ]
    text = redact_secrets(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    card = ModelCard(text)
    os.makedirs(save_directory, exist_ok=True)
    card.save(os.path.join(save_directory, "README.md"))
    return text


def _load_snippet(model: nn.Module | None, repo: str, base_model: str | None) -> list[str]:
    first = 'import hf_cim  # first: registers quant_method "hf_cim", so loading re-applies the noise config'
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    arch = type(base).__name__ if base is not None and type(base).__module__.startswith("transformers") else None
    arch = arch or "AutoModel"
    if model is not None and hasattr(model, "peft_config"):  # adapters on an analog base
        return [
            "```python",
            first,
            "",
            f'model = hf_cim.peft_utils.load_peft("{repo}")  # analog base (hf_cim_config.json), digital adapters',
            "```",
            "",
            "`AutoPeftModel*.from_pretrained` alone loads a **digital** base (peft reads only `adapter_config.json`); "
            "by hand:",
            "",
            "```python",
            first,
            "from peft import PeftModel",
            f"from transformers import {arch}",
            "",
            f'config = hf_cim.hub.load_noise_config("{repo}")  # hf_cim_config.json',
            f'base = {arch}.from_pretrained("{base_model or "<base model>"}", quantization_config=config)',
            f'model = PeftModel.from_pretrained(base, "{repo}")  # analog base, digital LoRA adapters',
            "```",
        ]
    return [
        "```python",
        first,
        f"from transformers import {arch}",
        "",
        f'model = {arch}.from_pretrained("{repo}")  # the analog (noisy) model',
        "with hf_cim.noise_disabled(model):",
        "    ...  # the exact digital model",
        "```",
    ]
