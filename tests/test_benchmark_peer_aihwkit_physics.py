"""benchmarks/peer_aihwkit_physics.py: our side of the comparison on its formulas; a clear exit without aihwkit."""

import builtins
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import peer_aihwkit_physics as phys  # noqa: E402

from hf_cim.noise.pcm import pcm_programming_std  # noqa: E402


def test_programming_stage_is_the_differential_pair_of_nandakumar():
    """Target ĝ on g⁺, 0 on g⁻, each programmed with its own σ and clamped at 0: the net weight has mean
    ĝ − σ₀/√(2π) and variance σ_ĝ² + σ₀²(1/2 − 1/(2π)) (a half-normal g⁻)."""
    g = torch.full((1, 400_000), 0.5)
    w = phys.ours(g, 0.0, "program", seed=3)[0]
    s1 = pcm_programming_std(torch.tensor(0.5)).item()
    s0 = pcm_programming_std(torch.tensor(0.0)).item()
    assert w.mean().item() == pytest.approx(0.5 - s0 / math.sqrt(2 * math.pi), abs=2e-4)
    assert w.std().item() == pytest.approx(math.sqrt(s1**2 + s0**2 * (0.5 - 1 / (2 * math.pi))), rel=1e-2)


def test_drift_stage_decays_by_the_drift_exponent_without_compensation():
    """At one year, no read noise: the median of w(t)/w(0) is (t/t0)^(−μ_ν) on the same devices (ĝ = 1: μ_ν = 0.049,
    σ_ν = 0.008, so ν never reaches 0)."""
    g = torch.full((1, 200_000), 1.0)
    w0 = phys.ours(g, 0.0, "drift", seed=5)
    wt = phys.ours(g, phys.TIMES["1y"], "drift", seed=5)
    ratio = (wt / w0).median().item()
    assert ratio == pytest.approx(((phys.TIMES["1y"] + 20.0) / 20.0) ** -0.049, rel=2e-3)


def test_without_aihwkit_the_script_says_so(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_aihwkit(name, *args, **kwargs):
        if name == "aihwkit" or name.startswith("aihwkit."):
            raise ImportError("no aihwkit here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_aihwkit)
    assert phys.main(["--devices", "10"]) is None
    assert "aihwkit is not installed" in capsys.readouterr().out
