"""Train a tiny char-level GPT-2 on tinyshakespeare at several noise levels, then sweep each on simulated chips.

Two results, both in ``docs/trainer.md``:

1. **The level trade-off** (issue 4): models trained digitally, at a fixed noise level and with per-step level
   sampling, each evaluated at levels 0 … 3 on ``--chips`` simulated chips (additive Gaussian weight noise).
2. **The robustness plot** (``docs/robustness_example.png``): the level-1 model on a PCM-like chip (the ``pcm``
   noise model: programming noise, drift, 1/f read noise) across levels and drift times ``t_inference``.

Training runs use the hf_cim callbacks (memory always; gradient alignment on the analog models; the level
schedule on the sampled one); their summaries are printed and saved.

Usage: the numbers and the picture in ``docs/trainer.md`` come from (CPU, about 17 minutes on 2 shared cores)::

    python benchmarks/robustness_example.py --data ../shared/data/tinyshakespeare/input.txt --out /tmp/ex_cpu \
        --steps 160 --batch 16 --block 64 --chips 4 --val_windows 128 --std 0.2 --png docs/robustness_example.png

(the picture was redrawn from ``/tmp/ex_cpu/pcm/robustness.json`` with ``RobustnessResult.plot`` after a fix of the
time axis). Add ``--report_to tensorboard`` to see the callbacks' keys in TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import hf_cim  # noqa: E402
from hf_cim.callbacks import (  # noqa: E402
    GradientAlignmentCallback,
    NoiseLevelCallback,
    PeakMemoryCallback,
    add_callbacks,
)
from hf_cim.evaluation import evaluate_robustness  # noqa: E402
from hf_cim.noise import GaussianWeightNoise  # noqa: E402


class CharWindows(torch.utils.data.Dataset):
    """``n`` windows of ``block`` characters at seeded random offsets of ``ids``; labels = inputs (causal LM)."""

    def __init__(self, ids: torch.Tensor, block: int, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids, self.block = ids, block
        self.offsets = torch.randint(0, len(ids) - block, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[self.offsets[i] : self.offsets[i] + self.block]
        return {"input_ids": x, "labels": x}


def make_model(vocab: int, block: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=vocab, n_positions=block, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def analog_config(std: float) -> hf_cim.AnalogNoiseConfig:
    # Additive Gaussian weight noise (per output channel, relative to its abs-max), 8-bit DAC/weights/ADC.
    return hf_cim.AnalogNoiseConfig(noise=[GaussianWeightNoise(std=std)], exclude_modules=["lm_head"])


def perplexity_fn(val: CharWindows, batch: int = 64):
    batches = [
        {k: torch.stack([val[i][k] for i in range(s, min(s + batch, len(val)))]) for k in ("input_ids", "labels")}
        for s in range(0, len(val), batch)
    ]

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        losses = [float(model(**{k: v.to(device) for k, v in b.items()}).loss) * len(b["input_ids"]) for b in batches]
        loss = sum(losses) / len(val)
        return {"loss": loss, "perplexity": math.exp(loss)}

    return evaluate


def train(name, model, train_set, probe, args, out_dir, level_cb=None):
    callbacks = [PeakMemoryCallback(tokens_per_sample=args.block)]
    if hf_cim.patch.get_config(model) is not None:
        callbacks.append(GradientAlignmentCallback(probe, every_n_steps=args.steps // 4))
    if level_cb is not None:
        callbacks.append(level_cb)
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, name),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-3,
        warmup_steps=args.steps // 10,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=args.steps // 4,
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set)
    add_callbacks(trainer, *callbacks)  # ahead of the reporting integrations (--report_to tensorboard)
    t0 = time.perf_counter()
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    memory = json.load(open(os.path.join(out_dir, name, "hf_cim_memory.json")))
    cosines = [round(r["grad_cosine"], 5) for r in logs if "grad_cosine" in r]
    print(
        f"[{name}] {time.perf_counter() - t0:.0f} s, final train loss {logs[-1]['loss']:.3f}, "
        f"peak RSS {memory['peak_memory_mb']:.0f} MiB, {memory['samples_per_second']:.1f} samples/s, "
        f"grad cosine {cosines}",
        flush=True,
    )
    return {"final_loss": logs[-1]["loss"], "memory": memory, "grad_cosine": cosines}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--out", default="/tmp/robustness_example")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--std", type=float, default=0.2, help="Gaussian weight noise at level 1 (relative to abs-max)")
    p.add_argument("--report_to", default="none", help="Trainer integrations, e.g. tensorboard")
    p.add_argument("--chips", type=int, default=5)
    p.add_argument("--val_windows", type=int, default=256)
    p.add_argument("--png", default="docs/robustness_example.png")
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)

    text = open(args.data).read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    train_set = CharWindows(ids[:split], args.block, args.steps * args.batch, seed=0)
    val = CharWindows(ids[split:], args.block, args.val_windows, seed=1)
    probe = {k: torch.stack([train_set[i][k] for i in range(16)]) for k in ("input_ids", "labels")}
    evaluate = perplexity_fn(val)
    summary: dict = {"args": vars(args), "train": {}, "sweep": {}}

    # 1. Training runs: digital, fixed level 1, level sampled per step in [0.5, 2] (after a 10 % ramp).
    runs = {
        "digital": (None, None),
        "level_1": (analog_config(args.std), None),
        "sampled_0.5-2": (analog_config(args.std), NoiseLevelCallback(1.0, warmup_ratio=0.1, sample_range=(0.5, 2.0))),
    }
    models = {}
    for name, (cfg, level_cb) in runs.items():
        model = make_model(len(chars), args.block)
        if cfg is not None:
            hf_cim.patch_model(model, cfg)
        summary["train"][name] = train(name, model, train_set, probe, args, args.out, level_cb)
        if cfg is None:
            hf_cim.patch_model(model, analog_config(args.std))  # evaluated on the same simulated chips
        models[name] = model

    # 2. Level trade-off: every model at levels 0 … 3 on the same chips.
    levels = (0.0, 0.5, 1.0, 2.0, 3.0)
    for name, model in models.items():
        res = evaluate_robustness(model, evaluate, "perplexity", seeds=args.chips, levels=levels, progress=False)
        res.to_json(os.path.join(args.out, f"sweep_{name}.json"))
        summary["sweep"][name] = {"digital": res.clean["perplexity"], **{r["level"]: r for r in res.rows}}
        print(f"[{name}] digital {res.clean['perplexity']:.3f}\n{res.to_markdown(3)}", flush=True)

    # 3. The robustness plot: the level-1 model on a PCM-like chip, levels × drift times.
    model = hf_cim.unpatch_model(models["level_1"])
    hf_cim.patch_model(model, analog_config(args.std).replace(noise=[{"name": "pcm"}]))
    times = (0.0, 3600.0, 86400.0, 2.592e6, 3.1536e7)  # programming, 1 h, 1 day, 30 days, 1 year
    res = evaluate_robustness(
        model, evaluate, "perplexity", seeds=args.chips, levels=(0.5, 1.0, 2.0), t_inference=times,
        output_dir=os.path.join(args.out, "pcm"),
    )  # fmt: skip
    print(res.to_markdown(3), flush=True)
    summary["pcm"] = res.to_dict()
    if args.png:
        res.plot(args.png, title=f"char GPT-2 (trained at level 1) on {args.chips} simulated PCM chips")
        shutil.copy(args.png, os.path.join(args.out, "robustness_example.png"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
    main()
