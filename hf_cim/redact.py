"""Secrets stay out of what is written and uploaded: Hub tokens in command lines, dicts and files.

:func:`redact_secrets` / :func:`redact_argv` hide tokens (``--hub_token x``, ``HF_TOKEN=x``, any ``hf_...`` token)
in a model card's recipe and in ``results.json``; :func:`files_holding_token` finds files that hold one before an
upload (:func:`hf_cim.hub.push_to_hub` refuses to upload them). Plain text logic: imports nothing of hf_cim.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable

__all__ = ["REDACTED", "files_holding_token", "is_secret_key", "redact_argv", "redact_secrets"]

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


def is_secret_key(key: str) -> bool:
    """Whether a dict key or argument name holds a secret (``hub_token``, ``api_key``, ``password``...)."""
    return _SECRET_KEY.fullmatch(str(key)) is not None
