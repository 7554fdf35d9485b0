"""Does ``patch_model`` copy weights? Peak memory of building a model, then of patching it, in a fresh process.

``patch_model`` swaps each layer's class in place and keeps its Parameters, so patching should add no weight-sized
memory. This builds one of ``step_time.py``'s models (random init), reads the process's peak RSS, patches it with a
preset and reads the peak again.

    python benchmarks/patch_memory.py --model llama_350m --preset pcm
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from step_time import build_model, model_specs  # noqa: E402

import hf_cim  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_350m")
    p.add_argument("--preset", default="pcm")
    args = p.parse_args(argv)
    spec_args = argparse.Namespace(quick=False, gpt2_vocab=50257)
    spec = model_specs(spec_args)[args.model]
    model, _ = build_model(spec, "cpu")
    params_mb = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20
    before = peak_rss_mb()
    t0 = time.perf_counter()
    hf_cim.patch_model(model, hf_cim.get_preset(args.preset))
    seconds = time.perf_counter() - t0
    after = peak_rss_mb()
    out = {
        "model": spec.describe(),
        "parameters_m": sum(t.numel() for t in model.parameters()) / 1e6,
        "parameters_mb": round(params_mb, 1),
        "peak_rss_before_patch_mb": round(before, 1),
        "peak_rss_after_patch_mb": round(after, 1),
        "patch_growth_mb": round(after - before, 1),
        "patch_seconds": round(seconds, 3),
        "analog_layers": len(list(hf_cim.patch.analog_layers(model))),
        "torch": torch.__version__,
    }
    print(out)
    return out


if __name__ == "__main__":
    main()
