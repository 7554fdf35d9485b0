"""Checkpoints that reload as they were trained: the noise config file, model cards, ``push_to_hub``, resume state.

* The noise config of a full model travels in ``config.json`` (``quantization_config``, ``quant_method "hf_cim"``,
  see :mod:`hf_cim.quantizer`). Adapter folders (peft) have no ``config.json`` of the base: :func:`save_noise_config`
  writes ``hf_cim_config.json`` next to them and :func:`load_noise_config` reads either file.
* :func:`write_model_card` writes ``README.md``: base model, task, the noise config as a table, the training recipe,
  the clean metric and the robustness table, how to load, and the Hub metadata (tags ``analog-cim``, ``hf-cim``).
* :func:`push_to_hub` saves weights, config, tokenizer and card into one folder and uploads it with
  ``huggingface_hub.HfApi``.
* Secrets stay out of what is written and uploaded: :func:`redact_secrets` / :func:`redact_argv` hide Hub tokens
  (``--hub_token x``, ``HF_TOKEN=x``, any ``hf_...`` token) in the card's recipe, and :func:`push_to_hub` refuses
  to upload a file that holds its token.
* :class:`NoiseStateCallback` saves each patched layer's noise generator into every Trainer checkpoint and restores
  it on ``resume_from_checkpoint``, so a resumed run draws the same noise as an uninterrupted one.

Nothing here pickles: configs are JSON, generator states are safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback

from .config import QUANT_METHOD, AnalogNoiseConfig
from .patch import analog_layers, get_config

__all__ = [
    "NOISE_CONFIG_NAME",
    "NOISE_STATE_NAME",
    "NoiseStateCallback",
    "files_holding_token",
    "load_noise_config",
    "load_noise_state",
    "push_to_hub",
    "redact_argv",
    "redact_secrets",
    "save_noise_config",
    "save_noise_state",
    "write_model_card",
]

logger = logging.getLogger(__name__)

NOISE_CONFIG_NAME = "hf_cim_config.json"
NOISE_STATE_NAME = "hf_cim_noise_state.safetensors"
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


# -- secrets --------------------------------------------------------------------------------------------------------
REDACTED = "<redacted>"
#: A flag or key whose value is a secret: ``hub_token``, ``token``, ``use_auth_token``, ``api_key``, ``password``...
_SECRET_NAME = r"(?:[A-Za-z0-9]+[_-])*(?:token|api[_-]?key|secret|password|passwd)"
_SECRET_FLAG = re.compile(rf"--?{_SECRET_NAME}", re.IGNORECASE)
_SECRET_KEY = re.compile(_SECRET_NAME, re.IGNORECASE)
_SECRET_PATTERNS = (
    # --hub_token=x and --hub_token x
    (re.compile(rf"(?<![\w-])(--?{_SECRET_NAME})(=|[ \t]+)(['\"]?)(?!-)[^\s'\"]+", re.I), rf"\1\2\3{REDACTED}"),
    # environment-variable style: HF_TOKEN=x, HUGGING_FACE_HUB_TOKEN=x, WANDB_API_KEY=x
    (re.compile(r"(?<![\w-])([A-Z0-9_]*(?:TOKEN|API_KEY|SECRET|PASSWORD))=(['\"]?)[^\s'\"]+"), rf"\1=\2{REDACTED}"),
    # a Hugging Face access token anywhere
    (re.compile(r"hf_[A-Za-z0-9]{30,}"), REDACTED),
)


def redact_secrets(text: str) -> str:
    """``text`` with secrets replaced by ``<redacted>``: the value of ``--hub_token x`` / ``--hub_token=x`` (and of
    any ``--*token``, ``--*api_key``, ``--*secret``, ``--*password`` flag), of ``HF_TOKEN=x``-style assignments, and
    any Hub access token (``hf_`` followed by 30 or more letters and digits)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line (list of words) with secrets redacted: the word after a secret flag (``--hub_token x``), the
    value of ``--hub_token=x``, and whatever :func:`redact_secrets` finds in each word."""
    out: list[str] = []
    hide_next = False
    for word in map(str, argv):
        if hide_next and not word.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = word.partition("=")
        secret_flag = _SECRET_FLAG.fullmatch(name) is not None
        hide_next = secret_flag and not eq
        out.append(f"{name}={REDACTED}" if secret_flag and eq else redact_secrets(word))
    return out


def _secrets(token: str | bool | None) -> list[bytes]:
    """The Hub tokens an upload could leak: ``token`` and the ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` variables."""
    values = [token if isinstance(token, str) else None]
    values += [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    return sorted({v.strip().encode() for v in values if v and len(v.strip()) >= 8})


def _holds(path: str, needles: list[bytes]) -> bool:
    """Whether the file at ``path`` contains one of ``needles`` (read as bytes, memory-mapped)."""
    if not needles or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return any(data.find(n) != -1 for n in needles)


def files_holding_token(folder: str | os.PathLike, files: Iterable[str], token: str | bool | None = None) -> list[str]:
    """The ``files`` (relative to ``folder``) whose bytes contain ``token`` or the token of the environment
    (``HF_TOKEN``); used before any upload."""
    needles = _secrets(token)
    return [name for name in files if _holds(os.path.join(os.fspath(folder), name), needles)]


# -- the noise config as a file --------------------------------------------------------------------------------------
def _config_of(model_or_config: nn.Module | AnalogNoiseConfig) -> AnalogNoiseConfig:
    if isinstance(model_or_config, AnalogNoiseConfig):
        return model_or_config
    config = get_config(model_or_config)
    if config is None:
        raise ValueError("hf_cim.hub: the model is not patched (no AnalogNoiseConfig); call hf_cim.patch_model first")
    return config


def save_noise_config(model_or_config: nn.Module | AnalogNoiseConfig, save_directory: str | os.PathLike) -> str:
    """Write the noise config as ``hf_cim_config.json`` in ``save_directory`` (e.g. next to peft adapters).

    Returns:
        The path of the file written.
    """
    config = _config_of(model_or_config)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, NOISE_CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config.to_json_string() + "\n")
    return path


def load_noise_config(path_or_repo: str | os.PathLike) -> AnalogNoiseConfig | None:
    """The noise config of a checkpoint: ``hf_cim_config.json``, else ``config.json``'s ``quantization_config``
    when its ``quant_method`` is ``"hf_cim"``; None when there is neither.

    Args:
        path_or_repo: a local folder, or a Hub repo id (the two files are fetched with ``hf_hub_download``).

    Raises:
        ValueError: a field is out of range or unknown to its noise model (the message names it); unknown top-level
            fields only warn (:meth:`AnalogNoiseConfig.from_dict`).
    """
    for name in (NOISE_CONFIG_NAME, "config.json"):
        path = _local_or_hub_file(path_or_repo, name)
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if name == NOISE_CONFIG_NAME:
            return AnalogNoiseConfig.from_dict(data)
        quant = data.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
            return AnalogNoiseConfig.from_dict(quant)
    return None


def _local_or_hub_file(path_or_repo: str | os.PathLike, filename: str) -> str | None:
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(os.fspath(path_or_repo), filename)
    except EntryNotFoundError:
        return None


# -- model card ------------------------------------------------------------------------------------------------------
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


def _robustness_markdown(robustness: Any, metric: str | None) -> tuple[str, str | None, dict[str, float]]:
    """(table, metric name, clean metrics) from a ``RobustnessResult`` or a list of row dicts."""
    if hasattr(robustness, "to_markdown"):
        return robustness.to_markdown(), getattr(robustness, "metric", metric), dict(getattr(robustness, "clean", {}))
    rows = _robustness_rows(robustness)
    name = metric or "metric"
    lines = [
        f"| noise level | t_inference (s) | {name} (mean ± std) | min | max | chips |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        missing = {"level", "t_inference", "mean", "std", "min", "max", "n_chips"} - set(r)
        if missing:
            raise ValueError(f"write_model_card: a `robustness` row lacks the key(s) {sorted(missing)}: {r!r}")
        lines.append(
            f"| {r['level']:g} | {r['t_inference']:g} | {r['mean']:.4f} ± {r['std']:.4f} | "
            f"{r['min']:.4f} | {r['max']:.4f} | {r['n_chips']} |"
        )
    return "\n".join(lines), metric, {}


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
        items = {k: REDACTED if _SECRET_KEY.fullmatch(str(k)) else v for k, v in training_args.items()}
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
        table, metric, clean = _robustness_markdown(robustness, metric)
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
            f'model = hf_cim.load_peft("{repo}")  # analog base (hf_cim_config.json), digital adapters',
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
            f'config = hf_cim.load_noise_config("{repo}")  # hf_cim_config.json',
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


# -- push_to_hub -----------------------------------------------------------------------------------------------------
def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    tokenizer: Any = None,
    save_directory: str | os.PathLike | None = None,
    card_kwargs: Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload noise-robust analog CIM model (hf_cim)",
) -> Any:
    """Save ``model`` (weights, ``config.json`` with the noise config), ``tokenizer`` and a model card into one
    folder and upload it to the Hub repo ``repo_id`` (created if missing). Returns ``HfApi.upload_folder``'s
    ``CommitInfo``.

    Args:
        model: a patched model (a ``PreTrainedModel``, or a peft model: then the adapters are saved and the noise
            config goes to ``hf_cim_config.json``).
        repo_id: ``"user/name"``.
        tokenizer: saved along (optional).
        save_directory: the folder to write and upload (kept); default: a temporary folder, deleted afterwards.
        card_kwargs: keyword arguments of :func:`write_model_card` (``base_model``, ``task``, ``robustness``...).
        private, token, revision, commit_message: passed to ``HfApi.create_repo`` / ``upload_folder``. ``token``
            None: ``huggingface_hub``'s own (``HF_TOKEN``, ``hf auth login``).

    Raises:
        ValueError: a file to upload holds the token (``token``, or ``HF_TOKEN`` of the environment): nothing is
            uploaded.
    """
    from huggingface_hub import HfApi

    config = _config_of(model)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"push_to_hub: `model` needs save_pretrained (a transformers or peft model), got {type(model)}"
        )
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"push_to_hub: `repo_id` must look like 'user/name', got {repo_id!r}")

    def _write_and_upload(folder: str) -> Any:
        before = _snapshot(folder)
        model.save_pretrained(folder)
        written = _written(folder, before)
        if "config.json" not in written or load_noise_config(folder) is None:
            save_noise_config(config, folder)  # adapters (peft): no config.json of the base in the folder
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        kwargs = {"model_name": repo_id, **dict(card_kwargs or {})}
        write_model_card(folder, model, config=config, **kwargs)
        # Upload only what this call wrote: the folder may also hold checkpoints, logs or results.
        files = _written(folder, before)
        leaking = files_holding_token(folder, files, token)
        if leaking:
            raise ValueError(
                f"push_to_hub: {leaking} in {folder} hold the Hub token; not uploading (remove the token from "
                "what is saved, e.g. the card's `recipe` or `training_args`)"
            )
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id_final = getattr(repo, "repo_id", repo_id)
        logger.info("hf_cim: uploading %s to %s", files, repo_id_final)
        return api.upload_folder(
            repo_id=repo_id_final,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            allow_patterns=files,
        )

    if save_directory is not None:
        os.makedirs(save_directory, exist_ok=True)
        return _write_and_upload(os.fspath(save_directory))
    with tempfile.TemporaryDirectory() as folder:
        return _write_and_upload(folder)


def _snapshot(folder: str) -> dict[str, int]:
    """Top-level files of ``folder`` with their modification times (ns)."""
    if not os.path.isdir(folder):
        return {}
    return {e.name: e.stat().st_mtime_ns for e in os.scandir(folder) if e.is_file()}


def _written(folder: str, before: dict[str, int]) -> list[str]:
    """Top-level files of ``folder`` created or rewritten since ``before``."""
    return sorted(name for name, mtime in _snapshot(folder).items() if before.get(name) != mtime)


# -- noise stream state for resume -----------------------------------------------------------------------------------
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
    config = _config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for _, layer in analog_layers(model):
        gen = layer._hf_cim_generator
        if gen is not None:
            tensors[layer.hf_cim_name] = gen.get_state().cpu().contiguous()
        layers[layer.hf_cim_name] = {
            "level": layer.hf_cim_level,
            "t_inference": layer.hf_cim_t_inference,
            "seed": layer._hf_cim_seed,
        }
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
    current = _config_of(model)
    if saved != current:
        a, b = saved.to_dict(), current.to_dict()
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        logger.warning(
            "hf_cim: the checkpoint's noise config differs from the model's in %s; keeping the model's", diff
        )
    seen = set()
    for _, layer in analog_layers(model):
        name = layer.hf_cim_name
        if name not in layers:
            continue
        seen.add(name)
        info = layers[name]
        layer.hf_cim_level = float(info["level"])
        layer.hf_cim_t_inference = float(info["t_inference"])
        layer.reseed(info["seed"])
        if name in states:
            layer.noise_generator(next(layer.parameters()).device).set_state(states[name])
    missing = sorted({n for _, lay in analog_layers(model) for n in [lay.hf_cim_name]} - seen)
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
            raise ValueError(f"{path}: no `{key}` metadata (not written by hf_cim.hub.save_noise_state)")
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

    devices = {lay.hf_cim_name: next(lay.parameters()).device for _, lay in analog_layers(model)}
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
