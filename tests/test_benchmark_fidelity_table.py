"""benchmarks/fidelity_table.py: runs cached in different folders, paired in one table against the first row."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("sklearn")

import fidelity  # noqa: E402
import fidelity_table  # noqa: E402

BASE = ["--setting", "digits", "--train", "pcm:1", "--seeds", "0,1", "--batch_size", "8", "--eval", "pcm:1",
        "--input_quant", "static", "--threads", "1"]  # fmt: skip


def _chip_means(folder, mode):
    runs = [json.load(open(folder / "runs" / f"{mode}_seed{s}.json"))["result"] for s in (0, 1)]
    return [sum(c["accuracy"] for c in r["chips"]["pcm L1"]) / len(r["chips"]["pcm L1"]) for r in runs]


def test_rows_from_two_folders_are_paired_against_the_first(tmp_path):
    wide, narrow = tmp_path / "dac6", tmp_path / "dac3"
    fidelity.main([*BASE, "--modes", "digital", "--steps", "4", "--chips", "2", "--input_alpha", "6",
                   "--out", str(wide)])  # fmt: skip
    fidelity.main([*BASE, "--modes", "digital,ste_hw", "--steps", "4", "--chips", "2", "--out", str(narrow)])
    out = tmp_path / "table.md"
    text = fidelity_table.main(["--seeds", "0,1", "--row", f"digital 6σ={wide}:digital",
                                "--row", f"ste_hw 3σ={narrow}:ste_hw", "--out", str(out)])  # fmt: skip
    assert out.read_text() == text + "\n"
    ref, row = _chip_means(wide, "digital"), _chip_means(narrow, "ste_hw")
    delta = sum(r - d for r, d in zip(row, ref)) / 2
    assert f"Δ {delta:+.4f}" in text
    assert '{"input_alpha": 3.0}' in text and "paired difference to `digital 6σ`" in text
    # the same folder's own digital row gives fidelity.py's own delta
    own = fidelity_table.main(["--seeds", "0,1", "--row", f"d={narrow}:digital", "--row", f"s={narrow}:ste_hw"])
    cell = json.load(open(narrow / "summary.json"))["table"]["ste_hw"]["pcm L1"]["delta_vs_digital"]
    assert f"Δ {cell[0]:+.4f} ± {cell[1]:.4f}" in own


def test_runs_not_trained_or_measured_alike_are_refused(tmp_path):
    a, b, c, d = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"
    fidelity.main([*BASE, "--modes", "digital", "--steps", "4", "--chips", "2", "--out", str(a)])
    fidelity.main([*BASE, "--modes", "digital", "--steps", "5", "--chips", "2", "--out", str(b)])
    fidelity.main([*BASE, "--modes", "digital", "--steps", "4", "--chips", "1", "--out", str(c)])
    fidelity.main([*BASE, "--modes", "digital", "--steps", "4", "--chips", "2", "--exclude", "17", "--out", str(d)])
    with pytest.raises(ValueError, match="exclude=None"):  # (another chip: its last layer digital)
        fidelity_table.main(["--seeds", "0,1", "--row", f"d={d}:digital", "--row", f"a={a}:digital"])
    with pytest.raises(ValueError, match="steps=5"):
        fidelity_table.main(["--seeds", "0,1", "--row", f"a={a}:digital", "--row", f"b={b}:digital"])
    with pytest.raises(ValueError, match="numbers of chips"):
        fidelity_table.main(["--seeds", "0,1", "--row", f"a={a}:digital", "--row", f"c={c}:digital"])
    with pytest.raises(FileNotFoundError, match="seed2"):
        fidelity_table.main(["--seeds", "0,2", "--row", f"a={a}:digital"])
    for bad in ([f"{a}:digital"], [f"a={a}"], [f"a={a}:digital", f"a={a}:digital"]):
        with pytest.raises(SystemExit):
            fidelity_table.main(["--seeds", "0,1", *[x for r in bad for x in ("--row", r)]])
    with pytest.raises(SystemExit):
        fidelity_table.main(["--seeds", "0,1", "--row", f"a={a}:digital", "--eval", "pcm L2"])
