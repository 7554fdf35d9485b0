"""Both recipes on two real gloo ranks (``torchrun --nproc_per_node 2`` on CPU) against one process on the same data.

Two ranks with a per-device batch of 4 see the same global batches of 8 as one process with a batch of 8, so the
logged losses, the clean metrics and the chip metrics must agree. Training runs at noise level 0 (converters only:
deterministic), because the training noise is drawn per rank; the final sweep includes level 1: a chip seed programs
the same devices on every rank, and the paper preset has only static (programmed) noise, so the chips agree too.
"""

import json
import os
import subprocess
import sys

import pytest
from test_recipes_glue import glue_args, make_tiny_bert, write_glue_tsv
from test_recipes_shakespeare import clm_args, write_text

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402
import run_shakespeare  # noqa: E402


def _torchrun(script, args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(RECIPES, script), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _compare(one, two):
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["memory"]["world_size"] == 2 and len(two["memory"]["ranks"]) == 2  # both ranks reported
    assert one["train_loss_history"] and one["eval"]  # the comparisons below are not vacuous
    assert [e["step"] for e in two["train_loss_history"]] == [e["step"] for e in one["train_loss_history"]]
    assert [e["loss"] for e in two["train_loss_history"]] == pytest.approx(
        [e["loss"] for e in one["train_loss_history"]], rel=1e-4
    )
    for name, entry in one["eval"].items():
        assert two["eval"][name]["clean"]["loss"] == pytest.approx(entry["clean"]["loss"], rel=1e-4)
        assert entry["robustness"]
        for r1, r2 in zip(entry["robustness"], two["eval"][name]["robustness"], strict=True):
            assert r2["level"] == r1["level"]
            assert r2["values"] == pytest.approx(r1["values"], rel=1e-4, abs=1e-4)


def test_shakespeare_two_ranks_match_one_process(tmp_path):
    path, _ = write_text(tmp_path / "input.txt", n_chars=8000)
    common = ["--max_steps", "3", "--level", "0", "--eval_levels", "1", "--eval_chips", "2"]
    run_shakespeare.main(clm_args(path, tmp_path / "one", *common))
    args = clm_args(path, tmp_path / "two", *common) + ["--per_device_train_batch_size", "4"]
    _torchrun("run_shakespeare.py", args, tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    _compare(one, two)


def test_glue_mrpc_two_ranks_match_one_process(tmp_path):
    """Also guards against transformers 5's doubled classification loss on 2 processes."""
    bert = make_tiny_bert(tmp_path / "bert")
    train = write_glue_tsv(tmp_path / "train.tsv", "mrpc", 48)
    dev = write_glue_tsv(tmp_path / "dev.tsv", "mrpc", 32, seed=1)  # 2 ranks x 2 batches of 8: no padded batch
    common = ["--max_steps", "3", "--level", "0", "--eval_levels", "1", "--eval_chips", "2"]
    run_glue.main(glue_args(bert, "mrpc", train, dev, tmp_path / "one", *common))
    args = glue_args(bert, "mrpc", train, dev, tmp_path / "two", *common) + ["--per_device_train_batch_size", "4"]
    _torchrun("run_glue.py", args, tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    _compare(one, two)
    assert two["eval"]["validation"]["clean"]["f1"] == pytest.approx(one["eval"]["validation"]["clean"]["f1"])
