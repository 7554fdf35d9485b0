"""Stuck-at faults: the fractions of each outcome of a differential pair."""

import pytest
import torch

from hf_cim.noise import NoiseContext, StuckAtFaults

N = 400_000


def ctx(seed=0, level=1.0):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level)


@pytest.mark.parametrize("level", [1.0, 2.0])
def test_outcome_fractions(level):
    p_off, p_on = 0.05 * level, 0.02 * level
    out = StuckAtFaults(p_off=0.05, p_on=0.02).program(torch.full((N,), 0.5), ctx(level=level))
    fine = 1 - p_off - p_on
    expected = {  # g⁺ (target 0.5) fine / off / on; g⁻ (target 0) at 0 unless stuck on
        0.5: fine * (1 - p_on),
        -0.5: fine * p_on,
        0.0: p_off * (1 - p_on) + p_on * p_on,
        1.0: p_on * (1 - p_on),
        -1.0: p_off * p_on,
    }
    for value, p in expected.items():
        frac = (out == value).float().mean().item()
        tol = 4 * (p * (1 - p) / N) ** 0.5 + 1e-6
        assert abs(frac - p) < tol, (value, frac, p)
    assert sum((out == v).sum().item() for v in expected) == N


def test_zero_probabilities_change_nothing_and_sum_is_validated():
    w = torch.linspace(-1, 1, 101)
    assert torch.equal(StuckAtFaults(p_off=0.0, p_on=0.0).program(w, ctx()), w)
    with pytest.raises(ValueError, match="`p_off` \\+ `p_on` must be <= 1"):
        StuckAtFaults(p_off=0.6, p_on=0.5)
    with pytest.raises(ValueError, match="`p_on` must be in"):
        StuckAtFaults(p_on=1.5)
