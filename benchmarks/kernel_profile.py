"""Where a training step's time goes: the kernels of one variant's step, counted and timed by ``torch.profiler``.

    python benchmarks/kernel_profile.py --device cuda --amp bf16 --model gpt2_124m_1024 --variants plain,ste
    python benchmarks/kernel_profile.py --device cpu --quick            # a dry run of this script

For each variant (built like ``step_time.py`` builds it: same model, batch, optimizer, preset): a few warm-up steps,
then ``--steps`` profiled steps. Printed per variant: the wall time per step, the device's busy time per step (the
sum of the kernels' own durations; on the CPU, the ops' self CPU time), the number of kernel launches per step, and
the ``--top`` kernels by total device time. Busy time far below wall time means the step waits on the host (kernel
launches, Python): fusing kernels or CUDA graphs is then the lever, not faster arithmetic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402
from _harness import set_threads, synchronize, write_json  # noqa: E402


def profile_variant(spec: step_time.ModelSpec, variant: str, device: str, amp: str | None, steps: int, warmup: int):
    """Profile ``steps`` training steps of ``variant``; return its per-step summary and kernel table rows."""
    from torch.profiler import ProfilerActivity, profile

    model, batch = step_time.build_model(spec, device)
    model = step_time.apply_variant(model, variant)
    step = step_time.make_step(model, batch, device, amp)
    for _ in range(warmup):
        step()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    if cuda:
        # Device-side kernels: events with device time and no CPU-side self time of their own (the launches' op
        # rows carry the CPU time and the same device time, so kernels are counted once through their own rows).
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
    else:
        kernels = list(events)
        busy = sum(e.self_cpu_time_total for e in kernels) / 1e6 / steps
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    launches = sum(e.count for e in kernels) / steps
    rows = sorted(
        ({"name": e.key, "calls_per_step": e.count / steps, "ms_per_step": key(e) / 1e3 / steps} for e in kernels),
        key=lambda r: -r["ms_per_step"],
    )
    return {"wall_ms": wall * 1e3, "busy_ms": busy * 1e3, "launches_per_step": launches, "kernels": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast around forward + loss")
    p.add_argument("--preset", default=None, help="simulate this preset's chip (default: AnalogNoiseConfig())")
    p.add_argument("--model", default="gpt2", help="a model of step_time.py (default gpt2: 6x384, seq 256)")
    p.add_argument("--variants", default="plain,ste", help="comma-separated variants of step_time.py")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per variant (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before profiling (default 3)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per variant (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="step_time.py's small models (a dry run)")
    p.add_argument("--out", default=None, help="write every kernel row to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.top < 1:
        raise SystemExit(f"need --steps >= 1, --warmup >= 0, --top >= 1; got {args.steps}, {args.warmup}, {args.top}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    set_threads(args.threads or os.cpu_count() or 1)
    step_time.PRESET = args.preset
    specs = step_time.model_specs(argparse.Namespace(quick=args.quick, gpt2_vocab=50257))
    if args.model not in specs:
        raise SystemExit(f"--model: unknown {args.model!r}; choose from {sorted(specs)}")
    spec = specs[args.model]
    cuda = args.device.startswith("cuda")
    unit, things = ("device", "kernels") if cuda else ("self-CPU", "ops")
    print(f"# Kernel profile: {spec.describe()}, {args.device}, amp {args.amp}, preset {args.preset}\n")
    print(f"Command: `python {' '.join(sys.argv)}`; {args.steps} profiled steps after {args.warmup} warm-up steps\n")
    out = {}
    for variant in [v for v in args.variants.split(",") if v]:
        res = profile_variant(spec, variant, args.device, args.amp, args.steps, args.warmup)
        out[variant] = res
        print(
            f"## {variant}: wall {res['wall_ms']:.1f} ms/step, {unit} busy {res['busy_ms']:.1f} ms/step, "
            f"{res['launches_per_step']:.0f} {things}/step\n"
        )
        print(f"| {things[:-1]} | calls/step | {unit} ms/step |\n|---|---|---|")
        for r in res["kernels"][: args.top]:
            print(f"| {r['name'][:90]} | {r['calls_per_step']:.0f} | {r['ms_per_step']:.2f} |")
        print()
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
