import json
import logging

import pytest

import hf_cim
from hf_cim.config import CONFIG_VERSION, AnalogNoiseConfig
from hf_cim.noise import GaussianWeightNoise, OutputNoise


def test_defaults_are_the_documented_ones():
    cfg = AnalogNoiseConfig()
    assert (cfg.gradient, cfg.input_bits, cfg.weight_bits, cfg.output_bits) == ("ste", 8, 8, 8)
    assert cfg.noise == [GaussianWeightNoise(std=0.02), OutputNoise(std=0.04)]
    assert cfg.output_step() == pytest.approx(2 * 10.0 / 254)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gradient": "exact"}, "`gradient`"),
        ({"input_bits": 1}, r"`input_bits` must be in \[2, 16\]"),
        ({"weight_bits": 17}, "`weight_bits`"),
        ({"output_bits": 0}, "`output_bits`"),
        ({"input_quant": "per_row"}, "`input_quant`"),
        ({"out_bound": 0.0}, "`out_bound`"),
        ({"out_bound": float("nan")}, "`out_bound`"),
        ({"tile_size": 0}, "`tile_size`"),
        ({"input_slice_bits": 8}, "`input_slice_bits`"),
        ({"input_slice_bits": 2, "input_bits": None}, "`input_slice_bits` needs `input_bits`"),
        ({"level": -0.1}, "`level`"),
        ({"seed": -1}, "`seed`"),
        ({"target_modules": ""}, "`target_modules`"),
        ({"exclude_modules": []}, "`exclude_modules`"),
        (
            {"noise": [{"name": "no_such_model"}]},
            r"`noise\[0\]`.*unknown noise model 'no_such_model'.*gaussian_weight",
        ),
        ({"noise": [{"name": "gaussian_weight", "sigma": 0.1}]}, r"unknown field\(s\) \['sigma'\]"),
        ({"noise": [{"name": "gaussian_weight", "std": -1.0}]}, "`std` must be in"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_values_raise_naming_the_field(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AnalogNoiseConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"input_bits": 8.0}, {"tile_size": "512"}, {"noise_in_eval": 1}, {"noise": 3}])
def test_wrong_types_raise_type_error(kwargs):
    with pytest.raises(TypeError, match=f"`{next(iter(kwargs))}`"):
        AnalogNoiseConfig(**kwargs)


def test_json_round_trip_is_exact():
    cfg = AnalogNoiseConfig(
        gradient="full",
        input_bits=6,
        input_quant="per_tensor",
        weight_bits=None,
        output_bits=10,
        out_bound=12.5,
        tile_size=256,
        input_slice_bits=2,
        noise=[GaussianWeightNoise(std=0.031, per_channel=False), {"name": "output_noise", "std": 0.06}],
        level=1.5,
        noise_in_eval=False,
        target_modules=["c_attn", "c_fc"],
        exclude_modules="lm_head",
        seed=1234,
    )
    text = cfg.to_json_string()
    back = AnalogNoiseConfig.from_json_string(text)
    assert back == cfg
    assert back.to_json_string() == text
    data = json.loads(text)
    assert data["hf_cim_config_version"] == CONFIG_VERSION
    assert data["noise"][0] == {"name": "gaussian_weight", "std": 0.031, "per_channel": False}


def test_unknown_keys_warn_and_newer_versions_fail(caplog):
    data = AnalogNoiseConfig().to_dict()
    data["future_knob"] = 3
    with caplog.at_level(logging.WARNING, logger="hf_cim.config"):
        cfg = AnalogNoiseConfig.from_dict(data)
    assert "future_knob" in caplog.text
    assert cfg == AnalogNoiseConfig()
    data["hf_cim_config_version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match="hf_cim_config_version"):
        AnalogNoiseConfig.from_dict(data)


def test_replace_validates():
    with pytest.raises(ValueError, match="`level`"):
        AnalogNoiseConfig().replace(level=-1)
    assert AnalogNoiseConfig().replace(level=2.0).level == 2.0


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        hf_cim.register_noise_model("gaussian_weight", OutputNoise)
    with pytest.raises(ValueError, match="must subclass"):
        hf_cim.register_noise_model("x_not_a_model", dict)
    assert {"gaussian_weight", "output_noise"} <= set(hf_cim.list_noise_models())
