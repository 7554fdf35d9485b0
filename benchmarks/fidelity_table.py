"""One paired table from runs that ``fidelity.py`` cached in different ``--out`` folders.

``fidelity.py`` pairs the modes of one command: every model measured with the same converters. To compare models
that are each measured at their own calibration (a digital model at its best DAC range against a noise-aware one at
the range it was trained with, say), run each in its own folder and put them side by side here. The chips are the
same whatever the folder (chip ``k`` is programmed with seed ``k`` and read with seed ``1000 + k``), so the rows stay
paired per seed and chip; this script refuses runs that do not share the setting, the chip count or a condition.

Each ``--row`` is ``NAME=FOLDER:MODE`` (the run files ``FOLDER/runs/MODE_seed<S>.json``); the first row is the
reference every other row's ``Δ`` and recovered share are measured against. Example (MRPC: the digital model with
a 6 σ DAC range against the noise-aware model trained and measured at 3 σ)::

    python benchmarks/fidelity_table.py --seeds 0,1,2 \\
        --row "digital, 6 σ DAC=runs/fidelity/mrpc_dac6:digital" \\
        --row "ft75_ste_hw, 3 σ DAC=runs/fidelity/mrpc_head:ft75_ste_hw"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fidelity  # noqa: E402

# What a row's cached key may differ in from the reference's: the mode's own settings, the chip it trained for and
# the converters' calibration. Anything else (the setting, the model, the data, the budget, the evaluation blocks)
# would compare models that were not trained or measured alike, and is refused; so are other layers kept digital
# (``exclude``: another chip, not another calibration of it).
_PER_ROW = (*fidelity.TRAINING_TARGET, *fidelity.CALIBRATION, "clip_sigmas", "kd_alpha", "kd_temperature")


def parse_row(text: str) -> tuple[str, str, str]:
    """``NAME=FOLDER:MODE`` → ``(name, folder, mode)``."""
    name, sep, source = text.partition("=")
    folder, colon, mode = source.rpartition(":")
    if not sep or not colon or not name.strip() or not folder or not mode:
        raise ValueError(f"--row must be NAME=FOLDER:MODE, got {text!r}")
    return name.strip(), folder, mode


def load_rows(rows: list[tuple[str, str, str]], seeds: list[int]) -> tuple[dict, dict]:
    """The cached runs ``{(name, seed): result}`` and each row's cached key (from its first seed)."""
    runs, keys = {}, {}
    for name, folder, mode in rows:
        for seed in seeds:
            path = os.path.join(folder, "runs", f"{mode}_seed{seed}.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"row {name!r}: no run {path} (run fidelity.py --out {folder} first)")
            cached = json.load(open(path))
            runs[(name, seed)] = dict(cached["result"], n_chips=cached["chips"])
            keys.setdefault(name, cached["args"])
    return runs, keys


def check_paired(runs: dict, keys: dict, names: list[str], seeds: list[int]) -> list[str]:
    """The conditions every run measured (in the reference's order); raises where runs cannot be paired."""
    ref = names[0]
    for name in names:
        for field in sorted(set(keys[name]) | set(keys[ref])):
            if field not in _PER_ROW and keys[name].get(field) != keys[ref].get(field):
                raise ValueError(f"row {name!r} has {field}={keys[name].get(field)!r}, the reference "
                                 f"{names[0]!r} {keys[ref].get(field)!r}: not trained or measured alike")  # fmt: skip
    chips = {runs[(n, s)]["n_chips"] for n in names for s in seeds}
    if len(chips) != 1:
        raise ValueError(f"the runs were measured on different numbers of chips: {sorted(chips)}")
    labels = [lab for lab in runs[(ref, seeds[0])]["chips"] if all(lab in runs[(n, s)]["chips"] for n in names
                                                                   for s in seeds)]  # fmt: skip
    if not labels:
        raise ValueError("the runs share no measured condition")
    return labels


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True, help="NAME=FOLDER:MODE; the first is the reference.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval", default=None, help="Conditions to show, comma-separated labels (default: all shared).")
    p.add_argument("--out", default=None, help="Write the table to this markdown file too.")
    args = p.parse_args(argv)
    try:
        rows = [parse_row(r) for r in args.row]
    except ValueError as e:
        p.error(str(e))
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        p.error(f"row names must differ, got {names}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, keys = load_rows(rows, seeds)
    labels = check_paired(runs, keys, names, seeds)
    if args.eval:
        wanted = args.eval.split(",")
        missing = [w for w in wanted if w not in labels]
        if missing:
            p.error(f"--eval: {missing} not measured by every row (shared: {labels})")
        labels = wanted
    setting = fidelity.SETTINGS[keys[names[0]]["setting"]]
    table = fidelity.summarize(runs, names, seeds, labels, setting.metric, setting.lower_is_better, reference=names[0])
    cmd = (
        "python benchmarks/fidelity_table.py "
        + " ".join(f'--row "{r}"' if " " in r else f"--row {r}" for r in args.row)
        + f" --seeds {args.seeds}"
        + (f' --eval "{args.eval}"' if args.eval else "")
    )
    ref_key = keys[names[0]]
    lines = [f"`{cmd}`", ""]
    for name, folder, mode in rows:
        diff = {k: v for k, v in keys[name].items() if ref_key.get(k) != v}
        diff.update({k: None for k in ref_key if k not in keys[name]})
        summary = os.path.join(folder, "summary.json")
        commit = json.load(open(summary)).get("commit") if os.path.isfile(summary) else None
        lines.append(f"- {name}: `{folder}`, mode `{mode}`" + (f", commit {commit}" if commit else "")
                     + (f"; differs from the reference in {json.dumps(diff, ensure_ascii=False)}" if diff else ""))  # fmt: skip
    header = "\n".join(lines)
    text = fidelity.markdown(table, labels, setting.metric, header, reference=names[0])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
