"""How much of a noise-aware gradient is the noise draw? Its variance over draws against its variance over batches.

A noise-aware step differentiates the loss of *one* sampled chip. This script trains a model digitally
(``benchmarks/fidelity.py``'s setting and loop, ``--steps`` steps), patches it for ``--train`` in ``--mode`` and
measures, on the same parameters:

* the gradient's variance over ``--draws`` noise draws on one fixed batch (trace of the covariance: the sum of the
  per-parameter variances),
* its variance over ``--batches`` batches, one draw each, and over the same batches with the noise off,
* the squared norm of the mean gradient, and the cosine between two draws on the same batch.

When the variance over draws dominates, averaging several draws per step (``fidelity.py``'s ``<mode>_draws<K>``:
micro-batches, each with its own draw) lowers the gradient's variance at the same number of examples per step.

Example (the README main job's model at the paper's lognormal level 3)::

    python benchmarks/gradient_noise.py --train paper:3 --steps 750 \\
        --train_file ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fidelity  # noqa: E402
from _harness import write_json  # noqa: E402

import hf_cim  # noqa: E402


def _flat_grad(setting, model, params, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    setting.loss(model, batch).backward()
    return torch.cat([p.grad.flatten() for p in params])


def gradient_noise(setting, model, cfg, draws: int, batches: list) -> dict[str, float]:
    """The variance decomposition above for ``model`` patched with ``cfg`` (unpatched again on return)."""
    hf_cim.patch_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    over_draws = torch.stack([_flat_grad(setting, model, params, batches[0]) for _ in range(draws)])
    over_batches = torch.stack([_flat_grad(setting, model, params, b) for b in batches])
    with hf_cim.noise_disabled(model):
        clean = torch.stack([_flat_grad(setting, model, params, b) for b in batches])
    model.zero_grad(set_to_none=True)
    hf_cim.unpatch_model(model)
    return {
        "var_over_draws": over_draws.var(0).sum().item(),
        "var_over_batches": over_batches.var(0).sum().item(),
        "var_over_batches_clean": clean.var(0).sum().item(),
        "mean_grad_sq_norm": over_batches.mean(0).pow(2).sum().item(),
        "cosine_two_draws": torch.nn.functional.cosine_similarity(over_draws[0], over_draws[1], dim=0).item(),
        "cosine_two_batches_clean": torch.nn.functional.cosine_similarity(clean[0], clean[1], dim=0).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(fidelity.SETTINGS), default="shakespeare")
    p.add_argument("--train", default="paper:3", help="chip: preset:level[@drift time]")
    p.add_argument("--mode", default="ste_hw", help="a fidelity.py base mode")
    p.add_argument("--steps", type=int, default=750, help="digital training steps before measuring")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="4x128")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train_file", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.draws < 2 or args.batches < 2:
        p.error("--draws and --batches must be >= 2 (a variance needs two samples)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # fidelity.py's training settings, its defaults for everything this script does not set (one place for them)
    full = fidelity.build_parser().parse_args(
        [
            "--out",
            "",
            "--setting",
            args.setting,
            "--steps",
            str(args.steps),
            "--arch",
            args.arch,
            "--batch_size",
            str(args.batch_size),
            "--block_size",
            str(args.block_size),
            "--lr",
            str(args.lr),
            "--train_file",
            args.train_file,
        ]  # fmt: skip
    )
    setting = fidelity.SETTINGS[args.setting](full)
    model, _ = fidelity.train(setting, "digital", args.seed, full)
    cfg = fidelity.mode_config(args.mode, fidelity.Condition.parse(args.train), args.seed, None)
    if cfg is None:
        p.error(f"--mode {args.mode} trains without noise; pick a noise-aware mode")
    batches = list(setting.batches(1_000_000 + args.seed, args.batches))  # not training batches
    found = gradient_noise(setting, model, cfg, args.draws, batches)
    found["command"] = "python benchmarks/gradient_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])
    found["commit"] = fidelity._commit()
    print(json.dumps(found, indent=1))
    write_json(args.out, found)
    return found


if __name__ == "__main__":
    main()
