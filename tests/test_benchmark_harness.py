"""benchmarks/_harness.py: the CPU tensor-memory peak counts exactly what a function allocates and holds at once."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from _harness import cpu_line, machine_info, tensor_peak_mb  # noqa: E402

MIB = 1 << 18  # float32 elements in one MiB


def test_tensor_peak_is_the_most_held_at_once():
    def fn():
        a = torch.empty(4 * MIB)
        b = torch.empty(8 * MIB)
        del a
        c = torch.empty(4 * MIB)  # 8 + 4 held: below the 12 of a and b together
        del b, c

    assert tensor_peak_mb(fn) == 12.0


def test_tensor_peak_counts_autograd_saved_tensors_and_gradients():
    x = torch.randn(MIB, requires_grad=True)

    def fn():
        # exp keeps its 1 MiB output for the backward, which allocates the 1 MiB gradient while it is still held.
        x.exp().sum().backward()

    assert abs(tensor_peak_mb(fn) - 2.0) < 1e-3
    assert torch.equal(x.grad, x.detach().exp())


def test_tensor_peak_starts_from_what_earlier_measurements_left_held():
    kept = []
    assert tensor_peak_mb(lambda: kept.append(torch.empty(4 * MIB))) == 4.0
    assert tensor_peak_mb(lambda: torch.empty(2 * MIB)) == 2.0  # the 4 MiB still held are not this call's


def test_machine_info_names_the_vector_isa_and_whether_bfloat16_is_native():
    from hf_cim.noise import base

    info = machine_info("cpu")
    assert info["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_bf16_native"] is base.fast_bfloat16_products(torch.device("cpu"))
    line = cpu_line({**info, "cpu": "Some CPU", "cpu_isa": "AVX2", "cpu_bf16_native": False})
    assert line == "Some CPU (AVX2, bfloat16 emulated)"
    assert (
        cpu_line({**info, "cpu": "X", "cpu_isa": "AVX512", "cpu_bf16_native": True}) == "X (AVX512, bfloat16 native)"
    )
