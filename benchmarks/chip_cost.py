"""Where does a chip's cost come from? One trained model, measured on the same chips with one part changed at a time.

``benchmarks/fidelity.py`` says how much a simulated chip costs a model; this says which part of the chip takes it.
It trains one model of a fidelity setting (``--mode``, ``--seed``, the same training as ``fidelity.py``'s: same
init, batches and budget, so ``digital`` seed 0 is that table's digital model), then measures it on chips 0..N-1 of
the condition ``--eval`` (preset:level[@time], the read noise of chip k reseeded alike for every row) with:

* the whole chip (the reference row);
* each of the preset's noise models left out, and all of them (the converters and tiles alone);
* each part of a noise model that has a ``*_scale`` field for it (``PCMNoise``'s programming noise, drift and read
  noise) turned off alone;
* each converter off: no DAC (``input_bits=None``), float weights (``weight_bits=None``), no ADC (``output_bits=None``);
* the ADC's range ``out_bound`` at each of ``--out_bounds`` (normalized units);
* each layer group kept digital (``--groups``, names or suffixes as ``exclude_modules`` takes them, ``+``-joined for
  several in one group), e.g. ``lm_head`` or ``attn``.

Rows are paired (same chips, same read noise); the table gives each row's mean over the chips, the chips' std and the
change against the whole chip. The clean (noise-free, converter-free) metric heads the table.

Example (the README main job's model, trained digitally, on the ``rram`` chip)::

    python benchmarks/chip_cost.py --setting shakespeare --mode digital --seed 0 --steps 1000 --eval rram:1 \\
        --out_bounds 20,40 --groups lm_head,attn,mlp --out runs/chip_cost/rram

``--kept DIR`` measures the model a ``fidelity.py --keep_models --out DIR`` run kept for ``--mode`` and ``--seed``
instead of training it again; the training arguments (``--train``, ``--steps``, ...) must be that run's, which is
checked against the key kept with the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fidelity  # noqa: E402  (the settings, the training loop and the conditions: one definition of each)

import hf_cim  # noqa: E402
from hf_cim.presets import preset_fields  # noqa: E402


def variants(preset: str, out_bounds: list[float], groups: list[str]) -> dict[str, dict]:
    """``{row label: AnalogNoiseConfig overrides}`` for one chip: the reference, each part changed alone."""
    fields = preset_fields(preset)
    rows: dict[str, dict] = {"whole chip": {}}
    noise = fields["noise"]
    for i, model in enumerate(noise):
        rows[f"without {type(model).__name__}"] = {"noise": [m for j, m in enumerate(noise) if j != i]}
        for field in _part_scales(model):
            part = dataclasses.replace(model, **{field: 0.0})
            rows[f"{type(model).__name__} {field}=0"] = {"noise": [part if j == i else m for j, m in enumerate(noise)]}
    if len(noise) > 1:  # (with one noise model, the row without it is this one)
        rows["converters and tiles only (no noise model)"] = {"noise": []}
    for field, what in (("input_bits", "DAC"), ("weight_bits", "weight quantization"), ("output_bits", "ADC")):
        if fields.get(field) is not None:
            rows[f"no {what} ({field}=None)"] = {field: None}
    if fields.get("output_bits") is not None:
        for bound in out_bounds:
            rows[f"ADC range out_bound={bound:g}"] = {"out_bound": bound}
    for group in groups:
        rows[f"{group} digital"] = {"exclude_modules": group.split("+")}
    return rows


def _part_scales(model) -> list[str]:
    """The fields of a noise model that scale one part of it (``*_scale``, on in the preset)."""
    if not dataclasses.is_dataclass(model):
        return []
    return [f.name for f in dataclasses.fields(model) if f.name.endswith("_scale") and getattr(model, f.name) > 0]


def measure_rows(setting, model, cond: fidelity.Condition, rows: dict[str, dict], chips: int, input_quant: str,
                 args) -> dict[str, list[float]]:  # fmt: skip
    """Each row's metric on chips 0..chips-1 of ``cond`` (paired: the same chip and read-noise seeds per row)."""
    out = {}
    for label, overrides in rows.items():
        cfg = hf_cim.get_preset(cond.preset, level=cond.level, input_quant=input_quant, **overrides)
        values = [m[setting.metric] for m in fidelity.on_chips(setting, model, cfg, cond.t, chips, args)]
        out[label] = values
        print(f"{label:>48}: {sum(values) / len(values):.4f}", flush=True)
    return out


def markdown(clean: float, found: dict[str, list[float]], metric: str, header: str) -> str:
    ref = fidelity._mean_std(found["whole chip"])[0]
    lines = [header, "", f"| chip | {metric} (mean over chips) | chips ± | change vs whole chip | share of the chip's cost |",
             "| --- | ---: | ---: | ---: | ---: |", f"| clean (no chip) | {clean:.4f} | | | |"]  # fmt: skip
    cost = ref - clean
    for label, values in found.items():
        m, s = fidelity._mean_std(values)
        if label == "whole chip":
            lines.append(f"| whole chip | {m:.4f} | {s:.4f} | | |")
            continue
        share = (ref - m) / cost * 100 if abs(cost) > 1e-9 else None
        share = f"{share:.0f} %" if share is not None and abs(share) <= 200 else "–"  # none, or beyond ±200 %
        lines.append(f"| {label} | {m:.4f} | {s:.4f} | {m - ref:+.4f} | {share} |")
    lines += ["", f"Share: the part of the chip's cost to this model (whole chip − clean, {cost:+.4f}) that the row "
              "removes (paired, same chips; – where the cost is next to nothing or the share beyond ±200 %)."]  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = fidelity.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--mode", default="digital", help="The training mode of the one model (fidelity.py's modes).")
    p.add_argument("--seed", type=int, default=0, help="Its training seed.")
    p.add_argument("--out_bounds", default="", help="ADC ranges to try, comma-separated (normalized units).")
    p.add_argument("--groups", default="", help="Layer groups kept digital one at a time, comma-separated.")
    p.add_argument("--kept", default=None, help="A fidelity.py --keep_models --out folder: measure the model it kept "
                   "for --mode and --seed (trained with these arguments) instead of training it.")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    args.exclude = args.exclude.split(",") if args.exclude else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if "," in args.eval:
        p.error("--eval: one condition (preset:level[@time])")
    cond = fidelity.Condition.parse(args.eval)
    fidelity.mode_config(args.mode, fidelity.Condition.parse(args.train), 0, None)  # fail early on a bad mode
    out_bounds = [float(b) for b in args.out_bounds.split(",") if b]
    if out_bounds and args.output_alpha is not None:
        p.error("--out_bounds sets one ADC range for every layer; --output_alpha calibrates one per layer: pick one")
    groups = [g for g in args.groups.split(",") if g]
    rows = variants(cond.preset, out_bounds, groups)
    for overrides in rows.values():  # every row's config is valid before anything trains
        hf_cim.get_preset(cond.preset, level=cond.level, input_quant=args.input_quant, **overrides)
    setting = fidelity.SETTINGS[args.setting](args)
    t0 = time.perf_counter()
    if args.kept is None:
        model, _ = fidelity.train(setting, args.mode, args.seed, args)
    else:
        path = fidelity.kept_model_path(args.kept, args.mode, args.seed)
        key = fidelity.mode_run_key(args.mode, fidelity.run_key(args, setting), args)
        model, _ = fidelity.load_trained(setting, path, args.mode, fidelity.training_key(args.mode, key))
        if model is None:
            p.error(f"--kept: {path} holds no {args.mode} model of seed {args.seed} trained as these arguments ask "
                    "(give the fidelity.py run's own --train, --steps, ... flags)")  # fmt: skip
    model.eval()
    clean = setting.evaluate(model)[setting.metric]
    found = measure_rows(setting, model, cond, rows, args.chips, args.input_quant, args)
    cmd = "python benchmarks/chip_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"### {args.setting} ({setting.name}), `{args.mode}` seed {args.seed}, {args.steps} steps, on "
              f"`{args.eval}`, {args.chips} chips"
              + (f", trained for `{args.train}`" if args.mode != "digital" else "")
              + (f", ADC ranges per layer ({args.output_alpha:g} σ)" if args.output_alpha is not None else "")
              + f"\n\n`{cmd}` at commit {fidelity._commit()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f} s")  # fmt: skip
    text = markdown(clean, found, setting.metric, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chip_cost.md"), "w") as f:
        f.write(text + "\n")
    result = {"command": cmd, "clean": clean, "rows": found}
    with open(os.path.join(args.out, "chip_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
