import json
import logging
import time

import pytest

import hf_cim
from hf_cim.config import CONFIG_VERSION, AnalogNoiseConfig
from hf_cim.noise import GaussianWeightNoise, OutputNoise


def test_defaults_are_the_documented_ones():
    cfg = AnalogNoiseConfig()
    assert (cfg.gradient, cfg.input_bits, cfg.weight_bits, cfg.output_bits) == ("ste", 8, 8, 8)
    assert cfg.noise == [GaussianWeightNoise(std=0.02), OutputNoise(std=0.04)]
    assert cfg.output_step() == pytest.approx(2 * 10.0 / 254)
    assert cfg.product_precision == "autocast"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gradient": "exact"}, "`gradient`"),
        ({"input_bits": 1}, r"`input_bits` must be in \[2, 16\]"),
        ({"weight_bits": 17}, "`weight_bits`"),
        ({"output_bits": 0}, "`output_bits`"),
        ({"input_quant": "per_row"}, "`input_quant`"),
        ({"product_precision": "bfloat16"}, r"`product_precision` must be one of \('autocast', 'float32'\)"),
        ({"out_bound": 0.0}, "`out_bound`"),
        ({"out_bound": float("nan")}, "`out_bound`"),
        ({"tile_size": 0}, "`tile_size`"),
        ({"input_slice_bits": 8}, "`input_slice_bits`"),
        ({"input_slice_bits": 2, "input_bits": None}, "`input_slice_bits` needs `input_bits`"),
        ({"level": -0.1}, "`level`"),
        ({"seed": -1}, "`seed`"),
        ({"target_modules": ""}, "`target_modules`"),
        ({"exclude_modules": [""]}, "`exclude_modules`"),
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


# -- issue 13: bad input and faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("field_name", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("pattern", ["(", "c_attn[", "*"], ids=["open-group", "open-class", "nothing-to-repeat"])
def test_invalid_regex_is_a_value_error_naming_the_field(field_name, pattern):
    with pytest.raises(ValueError, match=f"`{field_name}` is not a valid regex"):
        AnalogNoiseConfig(**{field_name: pattern})


@pytest.mark.parametrize(
    "pattern, reason",
    [
        ("(.|.)*Z", "alternation"),
        ("(a+)+$", "nested quantifier"),
        (r"(\w+\.)*c_attn", "nested quantifier"),
        ("(?:.*){3}", "nested quantifier"),
        ("(?:a|ab)*c", "alternation"),
        (r"(\w)\1", "backreference"),
        (".*.*.*.*Z", "more than 3"),
        ("a?" * 30 + "a" * 30, "more than 3"),
        ("a" * 257, "257 characters"),
    ],
    ids=[
        "dot-or-dot-star",
        "a-plus-plus",
        "dotted-words-star",
        "fixed-repeat-of-star",
        "overlap",
        "backref",
        "four-stars",
        "optional-chain",
        "long",
    ],
)
def test_backtracking_regex_is_refused_at_config_time(pattern, reason):
    for field_name in ("target_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=f"`{field_name}`.*{reason}"):
            AnalogNoiseConfig(**{field_name: pattern})


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.h\.0\..*",
        r".*\.(q_proj|k_proj|v_proj)",
        r"(model\.)?layers\.\d+\.mlp\..*",
        r".*(attn|mlp)\.c_.*",
        r"(?:foo|bar)*\.c_fc",
        "all-linear",
        r"transformer\.h\.[0-3]\.attn\.c_attn",
    ],
)
def test_ordinary_module_regexes_pass(pattern):
    assert AnalogNoiseConfig(target_modules=pattern).target_modules == pattern


def test_hostile_regex_is_refused_fast():
    start = time.perf_counter()
    for pattern in ["(.|.)*Z", "(a*)*b", "(x+x+)+y", "(.*a){20}"]:
        with pytest.raises(ValueError):
            AnalogNoiseConfig(exclude_modules=pattern)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "change, match",
    [
        ({"weight_bits": 0}, r"`weight_bits` must be in \[2, 16\]"),
        ({"out_bound": -1.0}, "`out_bound`"),
        ({"gradient": "magic"}, "`gradient`"),
        ({"input_bits": None}, "`input_slice_bits` needs `input_bits`"),
        ({"target_modules": "("}, "`target_modules` is not a valid regex"),
        ({"noise": [{"name": "gaussian_weight", "std": -1.0}]}, "`std`"),
        ({"seed": -3}, "`seed`"),
    ],
    ids=["weight_bits", "out_bound", "gradient", "cross-field", "regex", "noise", "seed"],
)
def test_assignment_after_construction_is_validated(change, match):
    cfg = AnalogNoiseConfig(input_slice_bits=2)
    before = cfg.to_dict()
    ((name, value),) = change.items()
    with pytest.raises((ValueError, TypeError), match=match):
        setattr(cfg, name, value)
    assert cfg.to_dict() == before  # a refused assignment changes nothing


def test_assignment_normalizes_like_the_constructor():
    cfg = AnalogNoiseConfig()
    cfg.out_bound = 12
    cfg.noise = [{"name": "output_noise", "std": 0.1}]
    cfg.exclude_modules = {"lm_head", "classifier"}
    assert cfg.out_bound == 12.0 and isinstance(cfg.out_bound, float)
    assert cfg.noise == [OutputNoise(std=0.1)]
    assert cfg.exclude_modules == ["classifier", "lm_head"]
    cfg.weight_bits = 4  # an allowed value is kept
    assert cfg == AnalogNoiseConfig(
        out_bound=12.0, noise=[OutputNoise(std=0.1)], exclude_modules=["classifier", "lm_head"], weight_bits=4
    )


def test_update_validates_all_changes_together():
    cfg = AnalogNoiseConfig(input_slice_bits=2)
    with pytest.raises(ValueError, match=r"`weight_bits` must be in \[2, 16\]"):
        cfg.update(weight_bits=0)
    assert cfg.weight_bits == 8
    with pytest.raises(ValueError, match="`level`"):
        cfg.update(seed=5, level=-1.0)
    assert cfg.seed == 0  # all or nothing
    # Changes that are only consistent together are accepted together, whatever their order.
    unused = cfg.update(input_bits=None, input_slice_bits=None, cache_dir="/x")
    assert unused == {"cache_dir": "/x"}
    assert cfg.input_bits is None and cfg.input_slice_bits is None


@pytest.mark.parametrize("data", [None, "x", [], 3, ["gradient"]], ids=["none", "str", "empty-list", "int", "list"])
def test_from_dict_refuses_non_dicts(data):
    with pytest.raises(TypeError, match=r"AnalogNoiseConfig.from_dict: `data` must be a dict"):
        AnalogNoiseConfig.from_dict(data)


def test_from_dict_ignores_non_string_keys_with_a_warning(caplog):
    data = {**AnalogNoiseConfig().to_dict(), 1: "x", "zz_future": 2}
    with caplog.at_level(logging.WARNING, logger="hf_cim.config"):
        assert AnalogNoiseConfig.from_dict(data) == AnalogNoiseConfig()
    assert "zz_future" in caplog.text and "1" in caplog.text


def test_from_dict_accepts_integral_floats_for_int_fields():
    data = AnalogNoiseConfig(tile_size=512, input_slice_bits=2).to_dict()
    rewritten = {
        k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in data.items()
    }  # what some JSON tools do: every number a float
    assert rewritten["tile_size"] == 512.0 and isinstance(rewritten["tile_size"], float)
    assert AnalogNoiseConfig.from_dict(rewritten) == AnalogNoiseConfig(tile_size=512, input_slice_bits=2)
    back = AnalogNoiseConfig.from_json_string(json.dumps(rewritten))
    assert isinstance(back.tile_size, int) and isinstance(back.seed, int)
    # A float that is not an integer stays an error naming the field.
    with pytest.raises(TypeError, match="`tile_size`"):
        AnalogNoiseConfig.from_dict({**data, "tile_size": 512.5})
    # Integral floats inside noise model dicts too.
    data["noise"] = [{"name": "output_noise", "std": 1}]
    assert AnalogNoiseConfig.from_dict(data).noise == [OutputNoise(std=1.0)]


def test_out_bound_is_bounded_to_a_physical_range():
    assert AnalogNoiseConfig(out_bound=1e6).out_bound == 1e6
    assert AnalogNoiseConfig(out_bound=1e-3).out_bound == 1e-3
    for bad in (1e6 * 1.001, 1e308, 1e-30, 0.0):
        with pytest.raises(ValueError, match=r"`out_bound` must be in \[0.001, 1000000.0\]"):
            AnalogNoiseConfig(out_bound=bad)


def test_empty_exclude_list_means_nothing_excluded():
    cfg = AnalogNoiseConfig(exclude_modules=[])
    assert cfg.exclude_modules == []
    assert AnalogNoiseConfig.from_json_string(cfg.to_json_string()) == cfg
    with pytest.raises(ValueError, match="`target_modules`"):
        AnalogNoiseConfig(target_modules=[])
