"""hf_cim.distributed in one process (two real ranks: tests/test_multiprocess_callbacks.py)."""

import torch

from hf_cim.distributed import all_gather_floats, world


def test_one_process_is_rank_zero_of_one():
    assert not torch.distributed.is_initialized()
    assert world() == (0, 1)
    assert all_gather_floats([1.5, 2.0]) == [[1.5, 2.0]]
