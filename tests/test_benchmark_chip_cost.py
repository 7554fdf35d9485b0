"""benchmarks/chip_cost.py: the rows of a chip, paired with fidelity.py's measurement, on a few steps of the CNN."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("sklearn")

import chip_cost  # noqa: E402
import fidelity  # noqa: E402


def test_rows_name_each_part_of_the_preset():
    rows = chip_cost.variants("rram", [20.0], ["lm_head", "attn+mlp"])
    assert list(rows)[0] == "whole chip" and rows["whole chip"] == {}
    left_out = [k for k in rows if k.startswith("without ")]
    assert left_out == ["without ReRAMNoise", "without StuckAtFaults", "without IRDrop", "without OutputNoise"]
    assert [type(m).__name__ for m in rows["without StuckAtFaults"]["noise"]] == [
        "ReRAMNoise",
        "IRDrop",
        "OutputNoise",
    ]
    assert rows["no ADC (output_bits=None)"] == {"output_bits": None}
    assert rows["ADC range out_bound=20"] == {"out_bound": 20.0}
    assert rows["attn+mlp digital"] == {"exclude_modules": ["attn", "mlp"]}
    # the paper preset has no ADC: no ADC rows, whatever the bounds asked
    paper = chip_cost.variants("paper", [20.0], [])
    assert not any("ADC" in k for k in paper) and "without LogNormalNoise" in paper
    assert "converters and tiles only (no noise model)" in rows and not any("only" in k for k in paper)


def test_whole_chip_row_is_fidelity_measurement_and_rows_are_paired(tmp_path):
    argv = ["--setting", "digits", "--mode", "digital", "--seed", "0", "--steps", "80", "--batch_size", "32",
            "--eval", "pcm:2", "--chips", "2", "--out_bounds", "1000", "--groups", "17",
            "--threads", "1", "--out", str(tmp_path / "cc")]  # fmt: skip
    result = chip_cost.main(argv)
    rows = result["rows"]
    assert len(rows["whole chip"]) == 2
    # the same model and chips through fidelity.py's measurement give the whole-chip row exactly
    args = chip_cost.build_parser().parse_args(argv)
    args.exclude = None
    setting = fidelity.SETTINGS["digits"](args)
    model, _ = fidelity.train(setting, "digital", 0, args)
    measured = fidelity.measure(setting, model, [fidelity.Condition.parse("pcm:2")], 2, None, args)
    assert [c["accuracy"] for c in measured["chips"]["pcm L2"]] == rows["whole chip"]
    assert result["clean"] == measured["clean"]["accuracy"]
    # a bound no partial sum reaches with 12-bit steps: a different chip from the whole one, measured on it
    assert set(rows) >= {"ADC range out_bound=1000", "17 digital", "no ADC (output_bits=None)"}
    saved = json.load(open(tmp_path / "cc" / "chip_cost.json"))
    assert saved["rows"] == rows and "share of the chip's cost" in (tmp_path / "cc" / "chip_cost.md").read_text()
    with pytest.raises(SystemExit):
        chip_cost.main([*argv[:-2], "--eval", "pcm:1,pcm:2", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # one ADC range for all layers, or calibrated ones per layer: not both
        chip_cost.main([*argv[:-2], "--output_alpha", "6", "--out", str(tmp_path / "x")])


def test_rows_turn_off_each_scaled_part_of_a_noise_model():
    rows = chip_cost.variants("pcm_drift", [], [])
    parts = [k for k in rows if k.startswith("PCMNoise ")]
    assert parts == ["PCMNoise prog_noise_scale=0", "PCMNoise drift_scale=0", "PCMNoise read_noise_scale=0"]
    noise = rows["PCMNoise drift_scale=0"]["noise"]
    pcm, rest = noise[0], noise[1:]
    assert type(pcm).__name__ == "PCMNoise" and pcm.drift_scale == 0.0
    assert pcm.prog_noise_scale == 1.0 and pcm.read_noise_scale == 1.0 and pcm.drift_compensation
    assert [type(m).__name__ for m in rest] == ["IRDrop", "OutputNoise"]
    assert not any(k.startswith(("ReadNoise ", "OutputNoise ")) for k in chip_cost.variants("pcm", [], []))


def test_kept_model_is_measured_without_training(tmp_path):
    common = ["--setting", "digits", "--steps", "60", "--batch_size", "32", "--eval", "pcm:2", "--chips", "2",
              "--threads", "1"]  # fmt: skip
    fidelity.main([*common, "--modes", "digital", "--seeds", "1", "--keep_models", "--out", str(tmp_path / "f")])
    kept = json.load(open(tmp_path / "f" / "runs" / "digital_seed1.json"))["result"]
    result = chip_cost.main([*common, "--mode", "digital", "--seed", "1", "--kept", str(tmp_path / "f"),
                             "--out", str(tmp_path / "cc")])  # fmt: skip
    assert result["clean"] == kept["clean"]["accuracy"]
    assert result["rows"]["whole chip"] == [c["accuracy"] for c in kept["chips"]["pcm L2"]]
    for wrong in (["--seed", "0"], ["--steps", "61"]):  # no such model kept, or one trained otherwise
        argv = [*common, "--mode", "digital", "--seed", "1", "--kept", str(tmp_path / "f"), "--out", str(tmp_path)]
        argv += wrong
        with pytest.raises(SystemExit):
            chip_cost.main(argv)
