"""Cost of each noise model and of each preset, relative to the clean computation.

Two measurements, each with every variant in one process, interleaved rounds with a rotated order and ratios paired
within each round (``_harness.py``):

1. **Layer**: one 768×768 layer on 8×256 = 2048 tokens, forward only under ``no_grad`` (what the STE modes run).
   Baseline ``clean``: ``F.linear``. ``converters``: hf_cim's tile simulation with no noise model (8-bit DAC,
   weights and ADC, ``out_bound`` 10, 512-row tiles). Then each registered built-in noise model alone on top of
   the converters (``program`` + ``read`` + ``output`` hooks, static part redrawn every forward as in training).
2. **Presets**: training-step time (forward + loss + backward + ``AdamW.step``) of the GPT-2 of the core benchmark
   (``step_time.py``: 6 layers, 384 wide, 6 heads, seq 256, batch 8, vocabulary 50257, tied LM head, every
   linear-like layer patched), plain vs ``ste`` (a bare ``AnalogNoiseConfig()``) and every preset of
   :mod:`hf_cim.presets` at ``level = 1`` with ``gradient="ste"``; then each physical preset with its second-order
   products in float32 (``ReadNoise(spread_dtype="float32")``, ``IRDrop(current_dtype="float32",
   position_dtype="float32")``: the exact reference the bfloat16 products are held against) and in bfloat16
   whatever the CPU (the presets' ``"auto"`` default is one of the two: bfloat16 where the CPU multiplies it
   natively), ``pcm`` with ``IRDrop(column_current="mean")`` and ``pcm``
   with its read noise drawn once per product on the weights (``ReadNoise(draw="batch")``); each also with the tied
   LM head kept digital (``exclude_modules=["lm_head"]``; ``--head``), because the 384×50257 head does about 65 % of
   the model's matrix-product work. ``--variants`` keeps only the named ones. Targets on CPU (issue 17, CPU-time
   ratio to plain): ``paper`` ≤ 1.2×, ``pcm`` ≤ 1.5×, ``pcm_drift`` ≤ 1.6×, ``rram`` ≤ 1.8×.

Usage::

    python benchmarks/noise_cost.py                 # both parts, full size
    python benchmarks/noise_cost.py --quick         # small sizes, few rounds: checks that it runs
    python benchmarks/noise_cost.py --part layer --threads 1 --rounds 9
    python benchmarks/noise_cost.py --out noise_cost.json
    # the presets table (CPU-time ratio to plain; one thread so that another job's core stays out of it):
    python benchmarks/noise_cost.py --part presets --head analog --threads 1 \
        --variants plain,ste,pcm,pcm_drift,rram --out noise_cost_presets.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import (  # noqa: E402
    cpu_line,
    machine_info,
    markdown_table,
    run_interleaved,
    set_threads,
    summarize,
    write_json,
)

import hf_cim  # noqa: E402
from hf_cim.noise import (  # noqa: E402
    GaussianWeightNoise,
    IRDrop,
    LogNormalNoise,
    NoiseContext,
    OutputNoise,
    PCMNoise,
    ReadNoise,
    ReRAMNoise,
    StuckAtFaults,
    ThermalNoise,
)
from hf_cim.presets import preset_noise  # noqa: E402
from hf_cim.tile import analog_matmul, program_weights  # noqa: E402

logger = logging.getLogger("noise_cost")

#: Issue 17's CPU-time targets, × plain, GPT-2 6×384.
PRESET_TARGETS = {"paper": 1.2, "pcm": 1.5, "pcm_drift": 1.6, "rram": 1.8}

#: One instance of every built-in model, at its defaults.
LAYER_VARIANTS = {
    "gaussian_weight": [GaussianWeightNoise()],
    "lognormal": [LogNormalNoise()],
    "output_noise": [OutputNoise()],
    "read_noise (constant)": [ReadNoise(shape="constant")],
    "read_noise (pcm)": [ReadNoise(shape="pcm")],
    "read_noise (pcm, float32 spread)": [ReadNoise(shape="pcm", spread_dtype="float32")],
    "read_noise (pcm, per batch)": [ReadNoise(shape="pcm", draw="batch")],
    "pcm (t = 0)": [PCMNoise()],
    "pcm (t = 1 day)": [PCMNoise()],
    "reram": [ReRAMNoise()],
    "stuck_at": [StuckAtFaults()],
    "ir_drop": [IRDrop()],
    "ir_drop (float32 products)": [IRDrop(current_dtype="float32", position_dtype="float32")],
    "thermal": [ThermalNoise()],
}


def layer_step(tokens: int, width: int, noise: list, t_inference: float = 0.0):
    """A closure computing one noisy forward of a ``width``×``width`` layer on ``tokens`` inputs (no_grad)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=gen)
    w = torch.randn(width, width, generator=gen) / width**0.5
    b = torch.zeros(width)
    cfg = hf_cim.AnalogNoiseConfig(noise=noise)
    noise_gen = torch.Generator().manual_seed(1)

    def step() -> None:
        with torch.no_grad():
            ctx = NoiseContext(generator=noise_gen, level=1.0, t_inference=t_inference, tile_rows=cfg.tile_size)
            w_prog, scale = program_weights(w, cfg, ctx, cfg.noise)
            analog_matmul(x, w_prog, scale, b, cfg, ctx, cfg.noise)

    return step


def clean_step(tokens: int, width: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=gen)
    w = torch.randn(width, width, generator=gen) / width**0.5
    b = torch.zeros(width)

    def step() -> None:
        with torch.no_grad():
            F.linear(x, w, b)

    return step


def bench_layer(args: argparse.Namespace) -> dict:
    tokens, width = (2 * 128, 256) if args.quick else (8 * 256, 768)
    steps = {"clean": clean_step(tokens, width), "converters": layer_step(tokens, width, [])}
    for name, noise in LAYER_VARIANTS.items():
        steps[name] = layer_step(tokens, width, noise, t_inference=86400.0 if "1 day" in name else 0.0)
    logger.info("== layer %d×%d on %d tokens", width, width, tokens)
    timing = run_interleaved(steps, args.rounds, args.steps, warmup=args.warmup, baseline="clean", log=logger.info)
    conv = timing.wall["converters"]
    extra = {n: [v / c for v, c in zip(timing.wall[n], conv)] for n in steps}
    return {"tokens": tokens, "width": width, "timing": timing.to_dict(), "ratio_to_converters": extra}


def _second_order_in(noise: list, dtype: str) -> list:
    """The same noise models with their second-order products in ``dtype`` (``"float32"``: the exact reference;
    ``"bfloat16"``: the rounded products whatever the CPU)."""
    out = []
    for model in noise:
        if isinstance(model, ReadNoise):
            model = dataclasses.replace(model, spread_dtype=dtype)
        elif isinstance(model, IRDrop):
            model = dataclasses.replace(model, current_dtype=dtype, position_dtype=dtype)
        out.append(model)
    return out


def preset_variants(head: str) -> dict[str, dict]:
    """Variant name → ``get_preset`` arguments (``name`` None: a bare ``AnalogNoiseConfig``); ``head`` is
    ``analog``, ``digital`` or ``both``."""
    out = {"ste": {"name": None}}
    for name in hf_cim.list_presets():
        out[name] = {"name": name}
    for dtype in ("float32", "bfloat16"):
        for name in ("pcm", "pcm_drift", "rram"):
            noise = _second_order_in(preset_noise(name), dtype)
            out[f"{name} ({dtype} second-order products)"] = {"name": name, "noise": noise}
    out["pcm (ir_drop mean current)"] = {
        "name": "pcm",
        "noise": [ReadNoise(std=0.0175, shape="pcm"), IRDrop(column_current="mean"), OutputNoise(std=0.04)],
    }
    out["pcm (read noise per batch)"] = {
        "name": "pcm",
        "noise": [ReadNoise(std=0.0175, shape="pcm", draw="batch"), IRDrop(), OutputNoise(std=0.04)],
    }
    if head == "analog":
        return out
    digital = {f"{k}, lm_head digital": dict(v, exclude_modules=["lm_head"]) for k, v in out.items()}
    return digital if head == "digital" else {**out, **digital}


def bench_presets(args: argparse.Namespace) -> dict:
    from step_time import ModelSpec, build_model, make_step

    spec = ModelSpec("gpt2", 2, 128, 2, 64, 4, 50257) if args.quick else ModelSpec("gpt2", 6, 384, 6, 256, 8, 50257)
    logger.info("== presets on %s", spec.describe())
    steps = {}
    models = []
    variants = {"plain": None, **preset_variants(args.head)}
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(variants)}")
        variants = {name: kwargs for name, kwargs in variants.items() if name in args.variants}
    for name, kwargs in variants.items():
        model, batch = build_model(spec, "cpu")
        if kwargs is not None:
            kwargs = dict(kwargs)
            preset = kwargs.pop("name")
            if preset is None:
                cfg = hf_cim.AnalogNoiseConfig(gradient="ste", **kwargs)
            else:
                cfg = hf_cim.get_preset(preset, level=1.0, gradient="ste", **kwargs)
            hf_cim.patch_model(model, cfg)
        steps[name] = make_step(model, batch, "cpu", None)
        models.append(model)
    timing = run_interleaved(steps, args.rounds, args.steps, warmup=args.warmup, baseline="plain", log=logger.info)
    return {"spec": spec.describe(), "timing": timing.to_dict()}


def _row(name: str, timing: dict, baseline_ratio: dict | None = None) -> list[str]:
    wall = summarize(timing["wall_s_per_step"][name])
    ratio = summarize(timing["wall_ratio"][name])
    cpu_ratio = summarize(timing["cpu_ratio"][name])
    row = [name, f"{wall.median * 1e3:.1f}", f"{ratio.median:.2f} ({ratio.min:.2f}–{ratio.max:.2f})"]
    row.append(f"{cpu_ratio.median:.2f}")
    if baseline_ratio is not None:
        row.append(f"{summarize(baseline_ratio[name]).median:.2f}")
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds: checks that it runs")
    p.add_argument("--part", choices=["all", "layer", "presets"], default="all")
    p.add_argument(
        "--head",
        choices=["analog", "digital", "both"],
        default="both",
        help="presets part: GPT-2's tied LM head patched (analog, as in step_time.py), kept digital, or both",
    )
    p.add_argument(
        "--variants",
        type=lambda v: [n.strip() for n in v.split(",") if n.strip()],
        default=None,
        help="presets part: keep only these variants (comma-separated names as in the table, e.g. "
        "plain,ste,pcm,pcm_drift,rram); default: all",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="repetitions per variant per round (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, help="write all results (per-round values included) to this JSON file")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.steps = args.steps or (1 if args.quick else 3)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    set_threads(args.threads)
    info = machine_info("cpu")
    results: dict = {"machine": info, "settings": vars(args)}
    print(f"# Noise-model cost ({'quick, indicative only' if args.quick else 'full'})\n")
    print(
        f"Machine: {cpu_line(info)}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
        f"1-min load average at start {info.get('load_average_1min')}"
    )
    print(f"Command: `{info['command']}`; {args.rounds} rounds × {args.steps} repetitions, medians (min–max).")
    if args.part in ("all", "layer"):
        res = results["layer"] = bench_layer(args)
        print(f"\n## One {res['width']}×{res['width']} layer, {res['tokens']} tokens, forward under no_grad\n")
        rows = [_row(n, res["timing"], res["ratio_to_converters"]) for n in res["timing"]["variants"]]
        print(markdown_table(["variant", "ms", "× clean (wall)", "× clean (CPU)", "× converters"], rows))
    if args.part in ("all", "presets"):
        res = results["presets"] = bench_presets(args)
        print(f"\n## Training step per preset (level 1, gradient ste): {res['spec']}\n")
        rows = [_row(n, res["timing"]) for n in res["timing"]["variants"]]
        print(markdown_table(["variant", "ms/step", "× plain (wall)", "× plain (CPU)"], rows))
        ratios = {n: summarize(res["timing"]["cpu_ratio"][n]).median for n in res["timing"]["variants"]}
        for name, target in PRESET_TARGETS.items():
            if name in ratios:
                verdict = "met" if ratios[name] <= target else "NOT met"
                print(f"- target `{name}` ≤ {target}× plain (CPU time): {ratios[name]:.2f}× ({verdict})")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
