"""Temperature coefficient with a per-tile, per-read temperature; Johnson noise on column currents."""

import math

import pytest
import torch

from hf_cim.noise import NoiseContext, ThermalNoise
from hf_cim.noise.thermal import BOLTZMANN, johnson_std


def ctx(seed=0, level=1.0, rows=64):
    return NoiseContext(generator=torch.Generator().manual_seed(seed), level=level, tile_rows=rows)


def test_one_temperature_per_tile_and_read_with_the_right_spread():
    model = ThermalNoise(alpha_t=2e-3, t_mean=310.0, t_std=4.0, johnson=False)
    w = torch.ones(3, 200)  # 4 tiles of 64 rows (the last one partly used)
    c = ctx(level=1.5)
    factors = torch.stack([model.read(w, c) for _ in range(4000)])  # (reads, out, in)
    per_tile = factors[:, 0, ::64]
    for k, start in enumerate(range(0, 200, 64)):
        block = factors[:, :, start : start + 64]
        assert torch.equal(block, per_tile[:, k].reshape(-1, 1, 1).expand_as(block))
    # factor = 1 + level·α·(T − t_ref), T ~ N(310, 4²)
    assert per_tile.mean().item() == pytest.approx(1 + 1.5 * 2e-3 * 10.0, abs=5e-4)
    assert per_tile.std().item() == pytest.approx(1.5 * 2e-3 * 4.0, rel=0.03)


def test_johnson_noise_matches_formula():
    assert johnson_std(torch.tensor(1e6), 300.0, 1.0, 1.0, 1e6).item() == pytest.approx(
        math.sqrt(4 * BOLTZMANN * 300.0 * 1.0) / 1.0, rel=1e-6
    )
    model = ThermalNoise(bandwidth=1e9, v_read=0.1)
    w = torch.full((1, 10, 256), 0.5)
    y = torch.zeros(1, 20000, 10)
    out = model.output(y, y, w, ctx(level=2.0))
    g_col = 0.5 * 256 * 25.0  # µS
    sigma = 2.0 * math.sqrt(4 * BOLTZMANN * 300.0 * g_col * 1e-6 * 1e9) / (0.1 * 25e-6)
    assert out.std().item() == pytest.approx(sigma, rel=0.02)


def test_level_zero_and_alpha_zero_are_identity():
    w = torch.rand(4, 100)
    assert torch.equal(ThermalNoise(alpha_t=0.0).read(w, ctx()), w)
    assert torch.equal(ThermalNoise().read(w, ctx(level=0.0)), w)
    with pytest.raises(ValueError, match="`t_mean`"):
        ThermalNoise(t_mean=0.0)
