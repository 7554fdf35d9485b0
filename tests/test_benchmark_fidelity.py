"""benchmarks/fidelity.py: parsing, pairing and the recovered share, on a few steps of the digits CNN."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("sklearn")

import fidelity  # noqa: E402


def test_conditions_and_times():
    c = fidelity.Condition.parse("pcm_drift:2@1d")
    assert (c.preset, c.level, c.t, c.label) == ("pcm_drift", 2.0, 86400.0, "pcm_drift L2 @1d")
    assert fidelity.Condition.parse("paper:3").t == 0.0
    assert fidelity.seconds("1y") == 365 * 86400 and fidelity.seconds("3600") == 3600.0
    assert fidelity.human_time(3600.0) == "1h" and fidelity.human_time(90.0) == "90s"
    with pytest.raises(ValueError, match="not a condition"):
        fidelity.Condition.parse("pcm@1d")
    with pytest.raises(ValueError, match="unknown mode"):
        fidelity.mode_config("ste_magic", c, 0, None)


def test_paired_runs_same_init_and_chips(tmp_path):
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ste_hw,ft_ste_hw", "--seeds", "0,1",
            "--chips", "2", "--steps", "6", "--batch_size", "8", "--eval", "pcm:1,pcm_drift:1@1h", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    table = fidelity.main(argv)
    assert set(table) == {"digital", "ste_hw", "ft_ste_hw"}
    runs = {f: json.load(open(out / "runs" / f)) for f in os.listdir(out / "runs")}
    assert len(runs) == 6
    d0 = runs["digital_seed0.json"]["result"]
    assert len(d0["chips"]["pcm L1"]) == 2 and "pcm_drift L1 @1h" in d0["chips"]
    cell = table["ste_hw"]["pcm L1"]
    means = {m: [sum(c["accuracy"] for c in runs[f"{m}_seed{s}.json"]["result"]["chips"]["pcm L1"]) / 2
                 for s in (0, 1)] for m in ("digital", "ste_hw")}  # fmt: skip
    delta = [a - b for a, b in zip(means["ste_hw"], means["digital"])]
    assert cell["delta_vs_digital"][0] == pytest.approx(sum(delta) / 2)
    assert (out / "fidelity.md").read_text().count("| ste_hw |") == 1
    # cached: a second call trains nothing (run files untouched) and gives the same table
    stamps = {f: os.path.getmtime(out / "runs" / f) for f in runs}
    assert json.dumps(fidelity.main(argv)) == json.dumps(table)
    assert stamps == {f: os.path.getmtime(out / "runs" / f) for f in runs}
