"""Our PCM device model (`pcm_drift`'s :class:`hf_cim.noise.PCMNoise`) against IBM aihwkit's ``PCMLikeNoiseModel``.

Both implement Nandakumar et al. (ICECS 2019): programming noise, drift with a per-device exponent, accumulated 1/f
read noise; aihwkit adds ``GlobalDriftCompensation``. This script draws the same targets through both, many devices
per target, and compares the net weight of a differential pair (``(g⁺ − g⁻)/g_max``, target ``ĝ`` on ``g⁺``, 0 on
``g⁻``) right after programming and at each drift time: mean and standard deviation per target, with the relative
difference (the issue's bar: within 5 %). Stages are compared separately so a disagreement can be placed:

* ``program``: programming noise only;
* ``drift``: programming noise and drift (no read noise, no compensation);
* ``full``: programming, drift and the accumulated read noise (no compensation);
* ``preset``: ``full`` with the global drift compensation, what ``pcm_drift`` simulates (each side its own factor
  over the whole matrix of devices: ours from an all-ones probe, aihwkit's ``GlobalDriftCompensation`` from its
  read-out tensor, the identity);
* ``compensation``: the global drift-compensation factor on a Gaussian weight matrix (mean ± std over chips).

aihwkit is not a dependency of hf_cim: it builds from source (``../shared/MODELS.md``; build it in a separate
environment). Without it the script says so and exits 0.

Example::

    python benchmarks/peer_aihwkit_physics.py --devices 200000 --out runs/aihwkit_physics.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import write_json  # noqa: E402

from hf_cim.noise.base import NoiseContext  # noqa: E402
from hf_cim.noise.pcm import PCMNoise  # noqa: E402

G_MAX = 25.0  # µS, both models' default
TIMES = {"t0": 0.0, "1h": 3600.0, "1d": 86400.0, "1y": 365 * 86400.0}


def ours(g_hat: torch.Tensor, t: float, stage: str, seed: int, compensation: bool = False) -> torch.Tensor:
    """hf_cim: net normalized weights after ``stage`` at ``t_inference = t`` (``g_hat``: (out, in), |w| <= 1)."""
    compensation = compensation or stage == "preset"
    read = stage in ("full", "preset")
    model = PCMNoise(drift=stage != "program", drift_compensation=compensation,
                     read_noise_scale=1.0 if read else 0.0)  # fmt: skip
    ctx = NoiseContext(generator=torch.Generator().manual_seed(seed), level=1.0, t_inference=t)
    w = model.program(g_hat, ctx)
    return model.read(w, ctx) if read else w


def theirs(g_hat: torch.Tensor, t: float, stage: str, seed: int, compensation: bool = False) -> torch.Tensor:
    """aihwkit 1.2.0: the same, through ``PCMLikeNoiseModel``'s conductance functions and, with ``compensation``,
    ``GlobalDriftCompensation``'s readout (its read-out tensor through the ideal crossbar, then its readout)."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel

    torch.manual_seed(seed)  # aihwkit draws from torch's global generator
    compensation = compensation or stage == "preset"
    model = PCMLikeNoiseModel(g_max=G_MAX, read_noise_scale=1.0 if stage in ("full", "preset") else 0.0)
    targets = [g_hat.clamp(min=0.0) * G_MAX, (-g_hat).clamp(min=0.0) * G_MAX]  # g⁺, g⁻ (g_min = 0)
    progs = [model.apply_programming_noise_to_conductance(g) for g in targets]
    if stage == "program":
        return (progs[0] - progs[1]) / G_MAX
    nus = [model.generate_drift_coefficients(g) for g in targets]
    drifted = [model.apply_drift_noise_to_conductance(p, nu, t) for p, nu in zip(progs, nus)]
    w_t = (drifted[0] - drifted[1]) / G_MAX
    if compensation and t > 0:
        comp = GlobalDriftCompensation()
        assert torch.equal(comp.get_readout_tensor(3), torch.eye(3))  # read-out tensor @ W.T is W.T itself
        w_prog = (progs[0] - progs[1]) / G_MAX
        w_t = w_t * (comp.readout(w_prog.T) / comp.readout(w_t.T))
    return w_t


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_devices(levels: list[float], devices: int, seed: int) -> list[dict]:
    g_hat = torch.tensor(levels, dtype=torch.float32)[:, None].expand(len(levels), devices).contiguous()
    rows = []
    for stage in ("program", "drift", "full", "preset"):
        for label, t in TIMES.items() if stage != "program" else [("t0", 0.0)]:
            a = ours(g_hat, t, stage, seed)
            b = theirs(g_hat, t, stage, seed + 1)
            for i, level in enumerate(levels):
                ma, sa, mb, sb = a[i].mean().item(), a[i].std().item(), b[i].mean().item(), b[i].std().item()
                rows.append({"stage": stage, "t": label, "g_hat": level, "mean_ours": ma, "mean_aihwkit": mb,
                             "std_ours": sa, "std_aihwkit": sb, "mean_rel_diff": _rel(ma, mb),
                             "std_rel_diff": _rel(sa, sb)})  # fmt: skip
    return rows


def compare_compensation(chips: int, shape: tuple[int, int], seed: int) -> list[dict]:
    """The global compensation factor on per-row abs-max normalized Gaussian weights, each chip its own draw."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w = w / w.abs().amax(dim=1, keepdim=True)
    rows = []
    for label, t in TIMES.items():
        if t == 0:
            continue
        factors = {"ours": [], "aihwkit": []}
        for chip in range(chips):
            raw = ours(w, t, "drift", seed + chip)
            comp = ours(w, t, "drift", seed + chip, compensation=True)
            factors["ours"].append((comp.abs().sum() / raw.abs().sum()).item())
            raw = theirs(w, t, "drift", seed + chip)
            comp = theirs(w, t, "drift", seed + chip, compensation=True)
            factors["aihwkit"].append((comp.abs().sum() / raw.abs().sum()).item())
        f = {k: torch.tensor(v) for k, v in factors.items()}
        rows.append({"t": label, "alpha_ours": f["ours"].mean().item(), "alpha_ours_std": f["ours"].std().item(),
                     "alpha_aihwkit": f["aihwkit"].mean().item(), "alpha_aihwkit_std": f["aihwkit"].std().item(),
                     "rel_diff": _rel(f["ours"].mean().item(), f["aihwkit"].mean().item())})  # fmt: skip
    return rows


def markdown(devices: list[dict], comp: list[dict], header: str) -> str:
    lines = [header, "", "| stage | t | ĝ | mean: ours / aihwkit | Δ | std: ours / aihwkit | Δ |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in devices:
        lines.append(f"| {r['stage']} | {r['t']} | {r['g_hat']:g} | {r['mean_ours']:.4f} / {r['mean_aihwkit']:.4f} | "
                     f"{100 * r['mean_rel_diff']:.1f} % | {r['std_ours']:.4f} / {r['std_aihwkit']:.4f} | "
                     f"{100 * r['std_rel_diff']:.1f} % |")  # fmt: skip
    lines += ["", "| t | compensation factor: ours | aihwkit | Δ |", "| --- | ---: | ---: | ---: |"]
    for r in comp:
        lines.append(f"| {r['t']} | {r['alpha_ours']:.4f} ± {r['alpha_ours_std']:.4f} | "
                     f"{r['alpha_aihwkit']:.4f} ± {r['alpha_aihwkit_std']:.4f} | {100 * r['rel_diff']:.1f} % |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200_000, help="devices per target level")
    p.add_argument("--levels", default="0.05,0.1,0.25,0.5,0.75,1.0", help="targets ĝ = g/g_max")
    p.add_argument("--chips", type=int, default=5, help="chips for the compensation factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import aihwkit
    except ImportError:
        print("aihwkit is not installed: nothing to compare (it builds from source; see ../shared/MODELS.md)")
        return None
    levels = [float(v) for v in args.levels.split(",")]
    if any(not 0.0 < v <= 1.0 for v in levels) or args.devices < 2 or args.chips < 2:
        p.error("--levels must lie in (0, 1]; --devices and --chips must be >= 2")
    devices = compare_devices(levels, args.devices, args.seed)
    comp = compare_compensation(args.chips, (512, 512), args.seed)
    cmd = "python benchmarks/peer_aihwkit_physics.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{cmd}`, aihwkit {aihwkit.__version__}, torch {torch.__version__}, {args.devices} devices per "
              f"target, g_max {G_MAX:g} µS")  # fmt: skip
    text = markdown(devices, comp, header)
    print(text)
    worst = {stage: max(max(r["mean_rel_diff"], r["std_rel_diff"]) for r in devices if r["stage"] == stage)
             for stage in ("program", "drift", "full", "preset")}  # fmt: skip
    print("\nlargest relative difference (mean or std, over times and targets): "
          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in worst.items())
          + f"; compensation factor {100 * max(r['rel_diff'] for r in comp):.1f} % (the bar: 5 %)")  # fmt: skip
    found = {"command": cmd, "aihwkit": aihwkit.__version__, "devices": devices, "compensation": comp,
             "worst_rel_diff": worst}  # fmt: skip
    write_json(args.out, found)
    return found


if __name__ == "__main__":
    main()
