"""Checkpoints that reload as they were trained: the noise config as a file, and ``push_to_hub``.

* The noise config of a full model travels in ``config.json`` (``quantization_config``, ``quant_method "hf_cim"``,
  see :mod:`hf_cim.quantizer`). Adapter folders (peft) have no ``config.json`` of the base: :func:`save_noise_config`
  writes ``hf_cim_config.json`` next to them and :func:`load_noise_config` reads either file.
* :func:`push_to_hub` saves weights, config, tokenizer and card (:func:`hf_cim.model_card.write_model_card`) into one
  folder and uploads it with ``huggingface_hub.HfApi``; it refuses to upload a file that holds its token
  (:mod:`hf_cim.redact`).

The neighbouring rooms: :mod:`hf_cim.model_card` (the card), :mod:`hf_cim.resume` (noise streams in Trainer
checkpoints, :class:`~hf_cim.resume.NoiseStateCallback`), :mod:`hf_cim.redact` (secrets). Their public names are
also importable from here, where they lived before. Nothing here pickles: configs are JSON.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import QUANT_METHOD, AnalogNoiseConfig
from .model_card import write_model_card
from .patch import get_config
from .redact import files_holding_token, redact_argv, redact_secrets
from .resume import NOISE_STATE_NAME, NoiseStateCallback, load_noise_state, save_noise_state

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
