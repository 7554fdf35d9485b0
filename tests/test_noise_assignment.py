"""A noise model's field assigned after construction is validated as the constructor validates it."""

from dataclasses import dataclass

import pytest
from helpers import tiny_gpt2

import hf_cim
from hf_cim.noise import GaussianWeightNoise, LogNormalNoise, PCMNoise, ReadNoise


@pytest.mark.parametrize(
    "model, name, value, match",
    [
        (GaussianWeightNoise(), "std", -1.0, r"GaussianWeightNoise: `std` must be in \[0.0, 10.0\]"),
        (LogNormalNoise(), "mean_corrected", 1, "`mean_corrected` must be a bool"),
        (ReadNoise(), "shape", "cubic", "`shape` must be one of"),
        (PCMNoise(), "g_max", 0.0, "`g_max`"),
    ],
    ids=["gaussian-std", "lognormal-flag", "read-shape", "pcm-g_max"],
)
def test_assigning_a_bad_value_raises_and_changes_nothing(model, name, value, match):
    before = model.to_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        setattr(model, name, value)
    assert model.to_dict() == before


def test_assigning_a_good_value_is_kept_normalized():
    pcm = PCMNoise()
    pcm.prog_coeff = [0.1, 0.2, 0.3]  # the constructor stores a tuple
    assert pcm.prog_coeff == (0.1, 0.2, 0.3)
    g = GaussianWeightNoise()
    g.std = 0.5
    assert g == GaussianWeightNoise(std=0.5)


def test_a_model_mutated_after_patching_cannot_turn_invalid():
    cfg = hf_cim.AnalogNoiseConfig(noise=[{"name": "gaussian_weight", "std": 0.02}])
    hf_cim.patch_model(tiny_gpt2(), cfg)
    with pytest.raises(ValueError, match="`std`"):
        cfg.noise[0].std = -1.0
    assert cfg.noise[0].std == 0.02


def test_custom_models_get_the_same_check_and_keep_private_attributes():
    @dataclass
    class Scaled(hf_cim.NoiseModel):
        factor: float = 1.0

        def __post_init__(self):
            if not 0.0 < self.factor <= 2.0:
                raise ValueError(f"Scaled: `factor` must be in (0, 2], got {self.factor}")

    m = Scaled()
    m._cache = [1, 2]  # not a field: set as is
    m.factor = 1.5
    with pytest.raises(ValueError, match="`factor`"):
        m.factor = 3.0
    assert m.factor == 1.5 and m._cache == [1, 2]
