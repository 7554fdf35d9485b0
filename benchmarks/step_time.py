"""Training-step time and peak memory of hf_cim's gradient modes against plain training and aihwkit-lightning.

One training step = forward + loss + backward + ``AdamW.step`` + ``zero_grad``. Variants:

* ``plain``: the unpatched model;
* ``ste``, ``ste_detach``, ``full``: ``hf_cim.patch_model(model, AnalogNoiseConfig(gradient=...))`` with the
  default noise config (every linear-like layer, the LM head / classifier included);
* ``aihwkit_lightning``: the peer, configured like the default config (see ``peer_aihwkit_lightning.py``);
* ``aihwkit`` / ``aihwkit_hwa``: IBM aihwkit 1.2.0 itself, its C++ inference tile set like the default config, and
  its ``StandardHWATrainingPreset`` (see ``peer_aihwkit.py``; compare the latter with ``--preset pcm``).

Models (random init from configs, nothing from the Hub): GPT-2 (6 layers, 384 wide, 6 heads, seq 256, batch 8,
GPT-2's BPE vocabulary size 50257, tied LM head, causal-LM loss) and BERT (4 layers, 256 wide, 4 heads, FFN 1024,
seq 128, batch 16, vocabulary 30522, sequence classification with 2 labels). Plus the ``ste``/``plain`` ratio of a
2-layer GPT-2 with a 65-symbol character vocabulary (so that the transformer blocks, not the LM head, dominate)
across widths 128 → 1024.

Timing: all variants of one model live in one process and run in interleaved rounds with a rotated order; ratios
are paired within each round (see ``_harness.py``). Memory: on CPU each variant runs in a fresh process (peak RSS);
on CUDA ``torch.cuda.max_memory_allocated`` after a reset.

Usage::

    python benchmarks/step_time.py                       # the full benchmark (CPU, all threads)
    python benchmarks/step_time.py --quick               # small models, few rounds: checks it runs end to end
    python benchmarks/step_time.py --device cuda --amp bf16 --out results.json
    python benchmarks/step_time.py --models gpt2 --variants plain,ste --widths 128,256
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import (  # noqa: E402
    cpu_line,
    current_rss_mb,
    emit_child_result,
    machine_info,
    markdown_table,
    peak_rss_mb,
    reset_peak_rss,
    run_child,
    run_interleaved,
    set_threads,
    summarize,
    synchronize,
    tensor_peak_mb,
    write_json,
)

logger = logging.getLogger("step_time")

ALL_VARIANTS = (
    "plain", "ste", "ste_hw", "ste_hw_chain", "ste_detach", "full", "aihwkit_lightning", "aihwkit", "aihwkit_hwa",
)  # fmt: skip
HF_CIM_VARIANTS = ("ste", "ste_detach", "full")
#: ``ste`` with the hardware-aware backward levers (ADC saturation mask, input gradient through programmed weights).
STE_HW = {"gradient": "ste", "mask_saturated": True, "backward_weights": "programmed", "program_gradient": False}
#: ``ste_hw`` with the weight gradient chained through the weight programming (``program_gradient``).
STE_HW_CHAIN = {**STE_HW, "program_gradient": True}
PEER = "aihwkit_lightning"
AIHWKIT = ("aihwkit", "aihwkit_hwa")


@dataclass
class ModelSpec:
    """One benchmark model: an architecture and its batch."""

    arch: str  # "gpt2", "bert" or "llama"
    layers: int
    width: int
    heads: int
    seq: int
    batch: int
    vocab: int

    def describe(self) -> str:
        head = {
            "gpt2": "causal-LM loss, tied LM head",
            "bert": "sequence classification, 2 labels",
            "llama": "causal-LM loss, untied LM head, SwiGLU MLP",
        }[self.arch]
        return (
            f"{self.arch}: {self.layers} layers, width {self.width}, {self.heads} heads, seq {self.seq}, "
            f"batch {self.batch}, vocab {self.vocab}, {head}"
        )


def model_specs(args: argparse.Namespace) -> dict[str, ModelSpec]:
    if args.quick:
        return {
            "gpt2": ModelSpec("gpt2", 2, 128, 2, 64, 4, args.gpt2_vocab),
            "bert": ModelSpec("bert", 2, 128, 2, 32, 4, 30522),
        }
    return {
        "gpt2": ModelSpec("gpt2", 6, 384, 6, 256, 8, args.gpt2_vocab),
        "bert": ModelSpec("bert", 4, 256, 4, 128, 16, 30522),
        # Realistic sizes, random init from configs, short sequences (a CPU step must stay in seconds):
        "gpt2_small": ModelSpec("gpt2", 12, 768, 12, 128, 4, 50257),  # GPT-2 small, 124 M
        "bert_base": ModelSpec("bert", 12, 768, 12, 128, 8, 30522),  # BERT-base, 110 M
        "llama_350m": ModelSpec("llama", 24, 1024, 16, 128, 2, 32000),  # Llama-style, 373 M (intermediate 2816)
        # Issue 17's GPU setting: GPT-2 small at its full context (a GPU size; minutes per step on 2 CPU cores)
        "gpt2_124m_1024": ModelSpec("gpt2", 12, 768, 12, 1024, 8, 50257),
    }


def sweep_spec(args: argparse.Namespace, width: int) -> ModelSpec:
    seq, batch = (64, 4) if args.quick else (256, 8)
    return ModelSpec("gpt2", args.sweep_layers, width, max(1, width // 64), seq, batch, 65)


# -- building -----------------------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, device: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A randomly initialised model (seed 0, identical for every variant) and one fixed batch (seed 1)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if spec.arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=spec.layers, n_embd=spec.width, n_head=spec.heads, n_positions=spec.seq, vocab_size=spec.vocab
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif spec.arch == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=spec.layers,
            hidden_size=spec.width,
            num_attention_heads=spec.heads,
            intermediate_size=4 * spec.width,
            max_position_embeddings=max(512, spec.seq),
            vocab_size=spec.vocab,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification(cfg)
    elif spec.arch == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=spec.layers,
            hidden_size=spec.width,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            intermediate_size=2816 if spec.width == 1024 else 4 * spec.width,
            max_position_embeddings=max(512, spec.seq),
            vocab_size=spec.vocab,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"build_model: unknown `arch` {spec.arch!r}")
    model.to(device).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen)
    if spec.arch in ("gpt2", "llama"):
        batch = {"input_ids": ids, "labels": ids.clone()}
    else:
        labels = torch.randint(0, 2, (spec.batch,), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, {k: v.to(device) for k, v in batch.items()}


#: ``--preset``: the chip every hf_cim variant simulates (None: ``AnalogNoiseConfig()``'s default noise).
PRESET: str | None = None


def _config(**fields):
    import hf_cim

    if PRESET is None:
        return hf_cim.AnalogNoiseConfig(**fields)
    if fields.get("gradient") != "full":  # the plain clean backward unless the variant asks for the levers
        from hf_cim.presets import LEVERS_OFF

        fields = {**LEVERS_OFF, **fields}
    return hf_cim.get_preset(PRESET, **fields)


def apply_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant == "plain":
        return model
    if variant in HF_CIM_VARIANTS:
        import hf_cim

        return hf_cim.patch_model(model, _config(gradient=variant))
    if variant in ("ste_hw", "ste_hw_chain"):
        import hf_cim

        return hf_cim.patch_model(model, _config(**(STE_HW if variant == "ste_hw" else STE_HW_CHAIN)))
    if variant == PEER:
        from peer_aihwkit_lightning import make_peer_model

        return make_peer_model(model)
    if variant in AIHWKIT:
        from peer_aihwkit import make_aihwkit_model

        return make_aihwkit_model(model, variant)
    raise ValueError(f"apply_variant: unknown variant {variant!r}; choose from {ALL_VARIANTS}")


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, amp: str | None):
    """A closure running one training step; AdamW (lr 1e-4) over the model's (unique) parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = torch.device(device).type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if amp == "bf16" else nullcontext

    def step() -> None:
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    return step


def _tensor_mb(model: torch.nn.Module) -> float:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def _optimizer_state_mb(opt: torch.optim.Optimizer) -> float:
    return (
        sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
        / 2**20
    )


# -- memory ---------------------------------------------------------------------------------------------------------
MEM_STEPS = 2


def memory_child(args: argparse.Namespace) -> None:
    """Child process (CPU): build one variant, run one step, then report the peak RSS over MEM_STEPS more steps and
    the peak tensor memory of one more step (:func:`tensor_peak_mb`).

    The first step allocates AdamW's state and pages in the code of every op the variant uses (file-backed pages
    count in RSS), so the measured steps see only the memory of a training step itself. The RSS also keeps memory
    the C library has not returned and may reuse it unseen; the tensor figure is what the step holds, as CUDA's
    allocator counts it.
    """
    set_threads(args.threads)
    spec = model_specs(args)[args.child_model]
    model, batch = build_model(spec, "cpu")
    model = apply_variant(model, args.child_variant)
    step = make_step(model, batch, "cpu", args.amp)
    step()
    gc.collect()
    base = current_rss_mb()
    reset = reset_peak_rss()
    for _ in range(MEM_STEPS):
        step()
    peak = peak_rss_mb()
    tensor_step = tensor_peak_mb(step)  # after the RSS steps: the profiler's own memory must not count there
    emit_child_result(
        {
            "peak_mb": peak,
            "base_mb": base,
            "step_mb": max(0.0, peak - base),
            "tensor_step_mb": tensor_step,
            "peak_reset": reset,
        }
    )


def memory_cpu(args: argparse.Namespace, name: str, variant: str) -> dict[str, float]:
    argv = [os.path.abspath(__file__), "--_child-model", name, "--_child-variant", variant]
    argv += ["--threads", str(args.threads), "--gpt2-vocab", str(args.gpt2_vocab)]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.quick:
        argv.append("--quick")
    if args.amp:
        argv += ["--amp", args.amp]
    return run_child(argv, timeout=1800)


def memory_cuda(model: torch.nn.Module, step, device: str) -> dict[str, float]:
    """In-process on CUDA: after one step, the allocated memory before vs the peak over MEM_STEPS more steps."""
    step()
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(MEM_STEPS):
        step()
    synchronize(device)
    step_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    persistent = _tensor_mb(model) + _optimizer_state_mb(step.optimizer)
    return {"peak_mb": persistent + step_mb, "base_mb": base / 2**20, "step_mb": step_mb}


# -- the benchmark -------------------------------------------------------------------------------------------------
def bench_model(args: argparse.Namespace, name: str, spec: ModelSpec, variants: list[str]) -> dict:
    logger.info("== %s (%s)", name, spec.describe())
    memory: dict[str, dict[str, float]] = {}
    if args.device == "cpu" and not args.no_memory:
        for v in variants:
            try:
                runs = [memory_cpu(args, name, v) for _ in range(args.memory_repeats)]
                memory[v] = {
                    key: summarize([r[key] for r in runs]).median
                    for key in ("peak_mb", "base_mb", "step_mb", "tensor_step_mb")
                }
                memory[v]["runs"] = runs
            except RuntimeError as err:
                logger.error("memory of %s not measured: %s", v, err)
                continue
            logger.info("memory %s: %s", v, {k: round(x, 1) for k, x in memory[v].items() if k != "runs"})
    steps = {}
    models = []
    failed = {}
    for v in variants:
        try:
            model, batch = build_model(spec, args.device)
            model = apply_variant(model, v)
            step = make_step(model, batch, args.device, args.amp)
            if args.device != "cpu" and not args.no_memory:
                memory[v] = memory_cuda(model, step, args.device)
                logger.info("memory %s: %s", v, {k: round(x, 1) for k, x in memory[v].items()})
            else:
                step()  # fail here, not in the middle of the rounds
        except Exception as err:  # a variant that cannot run (e.g. the peer under some setting) is reported, not fatal
            if v == "plain":
                raise
            failed[v] = f"{type(err).__name__}: {err}"
            logger.error("variant %s failed and is left out: %s", v, failed[v])
            memory.pop(v, None)
            continue
        steps[v] = step
        models.append(model)
    timing = run_interleaved(
        steps, args.rounds, args.steps, warmup=args.warmup, baseline="plain", device=args.device, log=logger.info
    )
    del steps, models
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return {"spec": asdict(spec), "timing": timing.to_dict(), "memory": memory, "failed": failed}


def bench_sweep(args: argparse.Namespace, widths: list[int]) -> dict:
    out = {}
    for width in widths:
        spec = sweep_spec(args, width)
        logger.info("== sweep width %d (%s)", width, spec.describe())
        steps = {}
        models = []
        for v in ("plain", "ste"):
            model, batch = build_model(spec, args.device)
            model = apply_variant(model, v)
            steps[v] = make_step(model, batch, args.device, args.amp)
            models.append(model)
        timing = run_interleaved(
            steps, args.rounds, args.steps, warmup=args.warmup, baseline="plain", device=args.device, log=logger.info
        )
        out[width] = {"spec": asdict(spec), "timing": timing.to_dict()}
        del steps, models
        gc.collect()
    return out


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def model_table(result: dict, device: str) -> str:
    t, mem = result["timing"], result["memory"]
    cpu = device == "cpu"
    headers = ["variant", "wall ms/step", "wall min–max"]
    headers += ["CPU s/step", "CPU ratio (paired)"] if cpu else []
    headers += ["wall ratio (paired)", "peak MB", "peak ratio", "step MB", "step-mem ratio"]
    tensors = cpu and any("tensor_step_mb" in m for m in mem.values())
    headers += ["tensor step MB", "tensor ratio"] if tensors else []
    rows = []
    plain_mem = mem.get("plain", {}).get("step_mb")
    plain_peak = mem.get("plain", {}).get("peak_mb")
    plain_tensor = mem.get("plain", {}).get("tensor_step_mb")
    for v in t["variants"]:
        wall_med, wall_rng = summarize(t["wall_s_per_step"][v]).fmt(1e3, 0)
        row = [v, wall_med, wall_rng]
        if cpu:
            c = summarize(t["cpu_ratio"][v])
            row += [f"{summarize(t['cpu_s_per_step'][v]).median:.2f}", f"{c.median:.2f} ({c.min:.2f}–{c.max:.2f})"]
        w = summarize(t["wall_ratio"][v])
        row.append(f"{w.median:.2f} ({w.min:.2f}–{w.max:.2f})")
        if v in mem:
            m = mem[v]
            ratio = f"{m['step_mb'] / plain_mem:.2f}" if plain_mem else "–"
            peak_ratio = f"{m['peak_mb'] / plain_peak:.2f}" if plain_peak else "–"
            row += [f"{m['peak_mb']:.0f}", peak_ratio, f"{m['step_mb']:.0f}", ratio]
        else:
            row += ["–", "–", "–", "–"]
        t_mb = mem.get(v, {}).get("tensor_step_mb")
        if tensors and t_mb is None:
            row += ["–", "–"]
        elif tensors:
            row += [f"{t_mb:.0f}", f"{t_mb / plain_tensor:.2f}" if plain_tensor else "–"]
        rows.append(row)
    return markdown_table(headers, rows)


def targets(result: dict, device: str) -> list[str]:
    """The issue's targets for ``ste`` and the hardware-aware STE variants, checked on this run's numbers."""
    t, mem = result["timing"], result["memory"]
    key = "cpu" if device == "cpu" else "wall"
    lines = []
    if "ste" in t["variants"]:
        r = summarize(t[f"{key}_ratio"]["ste"]).median
        lines.append(f"`ste`/plain {key} time {r:.2f}× (target ≤ 1.25×): {'met' if r <= 1.25 else 'NOT met'}")
    if "ste" in mem and "plain" in mem and mem["plain"]["step_mb"] > 0:
        m = mem["ste"]["step_mb"] / mem["plain"]["step_mb"]
        lines.append(f"`ste`/plain step memory {m:.2f}× (target ≤ 1.05×): {'met' if m <= 1.05 else 'NOT met'}")
        p = mem["ste"]["peak_mb"] / mem["plain"]["peak_mb"]
        lines.append(f"`ste`/plain peak memory {p:.2f}× (target ≤ 1.05×): {'met' if p <= 1.05 else 'NOT met'}")
    step_key = "tensor_step_mb" if device == "cpu" else "step_mb"
    for variant in ("ste", "ste_hw", "ste_hw_chain"):
        if variant in mem and "full" in mem and mem["full"].get(step_key):
            m = mem[variant][step_key] / mem["full"][step_key]
            kind = "tensor step memory" if device == "cpu" else "step memory"
            lines.append(f"`{variant}`/`full` {kind} {m:.2f}× (target ≤ 0.7×): {'met' if m <= 0.7 else 'NOT met'}")
    if "ste" in t["variants"]:
        for other in ("ste_hw", "ste_hw_chain", "ste_detach", "full", PEER):
            if other in t["variants"]:
                p = summarize(_paired(t[f"{key}_s_per_step"]["ste"], t[f"{key}_s_per_step"][other]))
                verdict = "faster" if p.max < 1.0 else ("faster (median)" if p.median < 1.0 else "NOT faster")
                lines.append(
                    f"`ste`/`{other}` {key} time {p.median:.2f}× (paired, {p.min:.2f}–{p.max:.2f}): {verdict}"
                )
    if "full" in t["variants"]:  # the target for the hardware-aware STE against autograd through the chip
        for variant in ("ste_hw", "ste_hw_chain"):
            if variant in t["variants"]:
                p = summarize(_paired(t[f"{key}_s_per_step"][variant], t[f"{key}_s_per_step"]["full"]))
                verdict = "met" if p.median <= 0.6 else "NOT met"
                lines.append(
                    f"`{variant}`/`full` {key} time {p.median:.2f}× (paired, {p.min:.2f}–{p.max:.2f}; target ≤ 0.6×): "
                    f"{verdict}"
                )
    return lines


def sweep_table(sweep: dict, device: str) -> str:
    cpu = device == "cpu"
    headers = ["width", "heads", "plain ms/step", "ste ms/step"]
    headers += ["ste/plain CPU (paired)"] if cpu else []
    headers += ["ste/plain wall (paired)"]
    rows = []
    for width, res in sweep.items():
        t = res["timing"]
        row = [
            width,
            res["spec"]["heads"],
            summarize(t["wall_s_per_step"]["plain"]).fmt(1e3, 0)[0],
            summarize(t["wall_s_per_step"]["ste"]).fmt(1e3, 0)[0],
        ]
        for key in ("cpu", "wall") if cpu else ("wall",):
            r = summarize(t[f"{key}_ratio"]["ste"])
            row.append(f"{r.median:.2f} ({r.min:.2f}–{r.max:.2f})")
        rows.append(row)
    return markdown_table(headers, rows)


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> str | None:
    """``<short hash>`` of the checkout, ``+dirty`` when ``hf_cim/`` has uncommitted changes; None outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "hf_cim"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models and few rounds: checks that it runs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast around forward + loss")
    p.add_argument("--preset", default=None, help="simulate this preset's chip (default: AnalogNoiseConfig())")
    p.add_argument(
        "--models",
        default="gpt2,bert",
        help="comma-separated subset of gpt2,bert,gpt2_small,bert_base,llama_350m,gpt2_124m_1024 ('' for none)",
    )
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
    p.add_argument("--widths", default=None, help="widths of the ste/plain sweep ('' to skip; default 128..1024)")
    p.add_argument("--sweep-layers", type=int, default=2, help="GPT-2 layers in the width sweep (default 2)")
    p.add_argument("--gpt2-vocab", type=int, default=50257, help="GPT-2 vocabulary size (default 50257, GPT-2 BPE)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant before the rounds (2, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="CPU: child processes per variant for the memory (median; RSS varies by ~10-20 MB between runs)",
    )
    p.add_argument("--out", default=None, help="write all results (per-round values included) to this JSON file")
    p.add_argument("--_child-model", dest="child_model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-variant", dest="child_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.widths is None:
        args.widths = "64,128" if args.quick else "128,256,512,1024"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    global PRESET
    PRESET = args.preset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    set_threads(args.threads)
    if args.child_variant is not None:
        memory_child(args)
        return {}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.ones(64, 64, device=args.device).matmul(torch.ones(64, 64, device=args.device))  # cuBLAS init
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {ALL_VARIANTS}")
    if "plain" not in variants:
        variants.insert(0, "plain")  # the baseline of every ratio
    notes = []
    if PEER in variants:
        from peer_aihwkit_lightning import PEER_SETTINGS, peer_available, peer_kernels

        ok, detail = peer_available()
        if ok:
            notes.append(
                f"Peer: aihwkit-lightning {detail}, kernels {peer_kernels()}, settings {json.dumps(PEER_SETTINGS)}"
            )
        else:
            variants.remove(PEER)
            notes.append(f"Peer aihwkit-lightning NOT run: {detail} (pip install --no-deps aihwkit-lightning==2.1.0)")
    if any(v in variants for v in AIHWKIT):
        from peer_aihwkit import AIHWKIT_VARIANTS, aihwkit_available

        ok, detail = aihwkit_available()
        for v in AIHWKIT:
            if v not in variants:
                continue
            if ok:
                notes.append(f"Peer `{v}`: aihwkit {detail}, {AIHWKIT_VARIANTS[v]}")
            else:
                variants.remove(v)
                notes.append(f"Peer `{v}` NOT run: {detail} (aihwkit builds from source: ../shared/MODELS.md)")
    specs = model_specs(args)
    names = [m for m in args.models.split(",") if m]
    bad = sorted(set(names) - set(specs))
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {sorted(specs)}")
    widths = [int(w) for w in args.widths.split(",") if w]

    info = machine_info(args.device)
    info["amp"] = args.amp
    info["transformers"] = _version("transformers")
    info["hf_cim_git"] = _git_state()
    results: dict = {"machine": info, "notes": notes, "models": {}, "sweep": {}}
    results["settings"] = {k: getattr(args, k) for k in ("quick", "rounds", "steps", "warmup", "threads")}
    for name in names:
        results["models"][name] = bench_model(args, name, specs[name], variants)
    if widths:
        results["sweep"] = bench_sweep(args, widths)

    print(f"# Step time and memory ({'quick, indicative only' if args.quick else 'full'})\n")
    print(
        f"Machine: {cpu_line(info)}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads", end=""
    )
    print(f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else "", end="")
    print(f", amp {args.amp}" if args.amp else "", end="")
    print(f", 1-min load average at start {info.get('load_average_1min')}")
    print(f"transformers {info['transformers']}, hf_cim checkout {info['hf_cim_git']}")
    print(f"Command: `{info['command']}`")
    print(
        f"Rounds {args.rounds} × {args.steps} steps per variant (warmup {args.warmup}); medians, min–max over rounds."
    )
    for note in notes:
        print(note)
    for name, res in results["models"].items():
        print(f"\n## {specs[name].describe()}\n")
        print(model_table(res, args.device))
        for v, why in res["failed"].items():
            print(f"- `{v}` could not run: {why}")
        for line in targets(res, args.device):
            print(f"- {line}")
    if results["sweep"]:
        first = next(iter(results["sweep"].values()))["spec"]
        print(
            f"\n## ste/plain across widths: GPT-2, {first['layers']} layers, seq {first['seq']}, batch "
            f"{first['batch']}, char vocab {first['vocab']}\n"
        )
        print(sweep_table(results["sweep"], args.device))
    print(
        "\npeak MB: CPU = peak RSS of a fresh process running this variant alone (interpreter and libraries included);"
        " CUDA = the variant's parameters and AdamW state + its step memory. step MB: peak over 2 training steps − "
        "memory right before them, measured after one untimed step (so: gradients, activations, temporaries; the "
        "AdamW state and, on CPU, the code pages of the ops used are already counted in the base). Time ratios to "
        "plain are paired within each round; the step-mem ratio is step MB / plain's step MB."
    )
    if args.out:
        write_json(args.out, results)
        logger.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
