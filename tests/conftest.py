"""Fixtures and the test environment only (offline, one thread); shared factories live in ``tests/helpers.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile of the fused kernels takes tens of seconds per process: tests run the C kernels on the CPU (built
# once, in about a second) and never torch.compile, except tests/test_kernels.py, which checks every
# implementation against the eager one.
os.environ.setdefault("HF_CIM_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Deterministic reductions and no oversubscription on the 2-core CI machine.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def transformers_verbosity_restored():
    """The benchmark scripts silence transformers' logging for their process (``set_verbosity_error``): tests that
    run them in-process give later tests their warnings back."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(level)
