import math

import pytest
import torch

from hf_cim import kernels, rng

N = 1 << 22  # 4M samples: moment tolerances below are ~5 standard errors


def _draw(key=(12345, -678), n=N):
    counter = torch.arange(n, dtype=torch.int64).to(torch.int32)
    return rng.gaussian(counter, torch.tensor(key, dtype=torch.int32))


@pytest.fixture(scope="module")
def z():
    return _draw().double()


def test_moments_match_standard_normal(z):
    se = 1 / math.sqrt(N)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15) * se
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96) * se


def test_distribution_matches_normal_cdf(z):
    # Kolmogorov-Smirnov distance on a grid; 1.63/sqrt(N) is the 1 % critical value.
    grid = torch.linspace(-4, 4, 161, dtype=torch.float64)
    sorted_z = z.sort().values
    empirical = torch.searchsorted(sorted_z, grid).double() / N
    normal = 0.5 * (1 + torch.erf(grid / math.sqrt(2)))
    assert (empirical - normal).abs().max().item() < 1.63 / math.sqrt(N)
    # Tails: P(|z| > 3) = 0.0027; the 24-bit uniform grid bounds |z| by sqrt(2·24·ln 2) = 5.77.
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / N)
    assert z.abs().max().item() <= math.sqrt(2 * 24 * math.log(2)) + 1e-4


def test_neighbouring_samples_and_keys_are_uncorrelated(z):
    bound = 5 / math.sqrt(N)
    for lag in (1, 2, 64, 4096):
        assert abs(torch.dot(z[:-lag], z[lag:]).item() / (N - lag)) < bound
    # Keys one bit apart (in either word) and swapped counters give unrelated streams.
    for key in ((12345 ^ 1, -678), (12345, -678 ^ 1), (12345, -677)):
        other = _draw(key).double()
        assert abs(torch.dot(z, other).item() / N) < bound
        assert abs(torch.dot(z.abs() - z.abs().mean(), other.abs() - other.abs().mean()).item() / N) < bound


def test_same_key_same_samples_and_generator_decides_the_key():
    assert torch.equal(_draw(n=1000), _draw(n=1000))
    assert not torch.equal(_draw(n=1000), _draw((1, 2), n=1000))
    k1 = rng.new_key(torch.Generator().manual_seed(7), torch.device("cpu"))
    k2 = rng.new_key(torch.Generator().manual_seed(7), torch.device("cpu"))
    k3 = rng.new_key(torch.Generator().manual_seed(8), torch.device("cpu"))
    assert k1.dtype == torch.int32 and k1.shape == (2,)
    assert torch.equal(k1, k2) and not torch.equal(k1, k3)


def test_polynomial_log_and_cos_match_torch():
    u = torch.cat([torch.rand(100_000, dtype=torch.float64), torch.tensor([2.0**-24, 0.5, 1 - 2.0**-24])]).float()
    u = u.clamp_min(2.0**-25)
    assert (rng._log(u).double() - torch.log(u.double())).abs().max().item() < 2e-6
    v = torch.rand(100_000)
    assert (rng._cos_2pi(v).double() - torch.cos(2 * math.pi * v.double())).abs().max().item() < 2e-6


def test_counters_are_flat_indices():
    t = torch.empty(3, 4, 5)
    c = rng.counters_like(t)
    assert c.dtype == torch.int32 and c.shape == t.shape
    assert torch.equal(c.view(-1), torch.arange(60, dtype=torch.int32))


@pytest.mark.parametrize("sampler", ["reference", "kernels"])
def test_samplers_draw_the_rng_samples(sampler):
    s = rng.REFERENCE if sampler == "reference" else kernels.SAMPLER
    key = torch.tensor([5, 6], dtype=torch.int32)
    t = torch.zeros(7, 9)
    expected = rng.gaussian(rng.counters_like(t), key)
    assert torch.equal(rng.randn(t, key), expected)
    # The C kernels round sqrt correctly; torch's vectorized CPU sqrt is off by one ulp on some values.
    torch.testing.assert_close(s.randn(t, key), expected, rtol=3e-7, atol=1e-7)
    y = torch.ones(7, 9)
    s.add_randn_(y, 0.5, key)
    torch.testing.assert_close(y, 1 + 0.5 * expected)
    y = torch.ones(7, 9)
    scale = torch.rand(7, 9)
    s.add_scaled_randn_(y, scale, 0.5, key, sqrt_scale=True)
    torch.testing.assert_close(y, 1 + 0.5 * expected * scale.clamp(min=1e-12).sqrt())


def test_reference_sampler_runs_the_reference_of_a_fused_stage():
    y = torch.ones(3)
    out = rng.REFERENCE.run("ir_drop_", lambda t, a: t.sub_(a), y, torch.full((3,), 0.25))
    assert out is y and torch.equal(y, torch.full((3,), 0.75))


def test_seeds_are_derived_in_one_place_and_never_change(monkeypatch):
    """derive_seed is pinned (a change would change every run's noise); the named streams are its labels."""
    assert rng.derive_seed(0, "a", 0) == 3825309258858513310
    assert rng.derive_seed(7, "transformer.h.0.mlp.c_fc", "chip") == 5983971561300202727
    assert rng.derive_seed(0, "a", 0) != rng.derive_seed(0, "a", 1) != rng.derive_seed(0, "b", 1)
    monkeypatch.setenv("RANK", "3")
    assert rng.process_rank() == 3

    expected = torch.Generator().manual_seed(rng.derive_seed(5, "fc", 3)).get_state()
    assert torch.equal(rng.layer_generator("cpu", 5, "fc").get_state(), expected)
    expected = torch.Generator().manual_seed(rng.derive_seed(5, "fc", "chip")).get_state()
    assert torch.equal(rng.chip_generator(torch.device("cpu"), 5, "fc").get_state(), expected)
    assert torch.equal(rng.seeded_generator("cpu", 5, "fc", "chip").get_state(), expected)
