"""hf_cim.validation: the range checks shared by the config, the chip, the callbacks and the evaluation."""

import math

import pytest

from hf_cim.validation import check_number_list, check_range


@pytest.mark.parametrize(
    "value, low, high, kwargs, error, match",
    [
        ("1", 0, 1, {}, TypeError, r"Owner: `f` must be a number, got '1' \(str\)"),
        (True, 0, 1, {}, TypeError, "must be a number"),
        (math.nan, 0, 1, {}, ValueError, "must be finite"),
        (math.inf, 0, None, {}, ValueError, "must be finite"),
        (-0.5, 0, 1, {}, ValueError, r"must be in \[0, 1\], got -0.5"),
        (0, 0, 1, {"low_inclusive": False}, ValueError, r"must be in \(0, 1\]"),
        (1, None, 1, {"high_inclusive": False}, ValueError, r"must be in \(-inf, 1\)"),
        (2, 0, None, {"high_inclusive": False}, None, None),
    ],
    ids=["str", "bool", "nan", "inf", "below", "open-low", "open-high", "open-inf"],
)
def test_check_range(value, low, high, kwargs, error, match):
    if error is None:
        check_range("Owner", "f", value, low, high, **kwargs)
        return
    with pytest.raises(error, match=match):
        check_range("Owner", "f", value, low, high, **kwargs)


def test_check_number_list():
    assert check_number_list("fn", "levels", 1) == [1.0]
    assert check_number_list("fn", "levels", (0, 2.5), 0.0, 100.0) == [0.0, 2.5]
    with pytest.raises(ValueError, match="fn: `levels` must not be empty"):
        check_number_list("fn", "levels", [])
    with pytest.raises(ValueError, match=r"fn: `levels` must be in \[0.0, 100.0\], got 101"):
        check_number_list("fn", "levels", [1, 101], 0.0, 100.0)
    with pytest.raises(ValueError, match="must be a number"):  # a wrong type is a bad value of the list
        check_number_list("fn", "levels", ["x"])


def test_the_package_shares_one_check():
    import hf_cim.chip
    import hf_cim.config
    import hf_cim.noise
    import hf_cim.noise.base

    assert hf_cim.config.check_range is check_range and hf_cim.chip.check_range is check_range
    # the name docs/noise_models.md gives authors of noise models: re-exported, not a second definition
    assert hf_cim.noise.check_range is check_range and hf_cim.noise.base.check_range is check_range
