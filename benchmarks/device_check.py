"""Correctness checks of hf_cim on an accelerator (CUDA), in one call: run before benchmarking on a GPU machine.

    python benchmarks/device_check.py                  # CUDA
    python benchmarks/device_check.py --device cpu     # the same checks on the CPU (a dry run of this script)

The checks are the ``gpu``-marked tests of ``tests/test_gpu.py`` (the STE gradient contract of the three layer types,
``ste`` == ``ste_detach``, bit-identical noise for the same seed, no host sync in the analog forward, a fixed
programmed chip, bf16 autocast training): this script runs that file with pytest on ``--device`` (through
``HF_CIM_TEST_DEVICE``), prints one line per check and exits non-zero on a failure, or when CUDA is asked for and
absent (pytest alone would skip the checks and pass).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_gpu.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    args, pytest_args = parser.parse_known_args()  # the rest goes to pytest (e.g. ``-k sync``)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("FAIL  no CUDA device: torch.cuda.is_available() is False")
            return 1
        print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__)
    os.environ["HF_CIM_TEST_DEVICE"] = args.device
    return int(pytest.main([str(TESTS), "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
