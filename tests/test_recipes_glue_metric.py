"""run_glue's metric: evaluate.load("glue", task) first, the offline recipes/_metrics.py fallback, combined_score."""

import json
import os
import sys
import time

import numpy as np
import pytest
from test_recipes_glue import glue_args, make_tiny_bert, write_glue_tsv

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402


@pytest.fixture
def fresh_metrics(monkeypatch):
    monkeypatch.setattr(run_glue, "_METRICS", {})


def test_offline_load_fails_fast_and_falls_back(fresh_metrics):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    start = time.perf_counter()
    compute, source = run_glue.load_glue_metric("mrpc")
    assert source == run_glue.METRIC_SOURCE and time.perf_counter() - start < 10  # no 40 s of Hub retries
    assert compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    start = time.perf_counter()
    assert (
        run_glue.load_glue_metric("mrpc")[1] == run_glue.METRIC_SOURCE and time.perf_counter() - start < 0.01
    )  # kept


def test_evaluate_is_tried_first(fresh_metrics, monkeypatch):
    import evaluate

    class Fake:
        def compute(self, predictions, references):
            return {"accuracy": 0.5}

    calls = []
    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: calls.append(args) or Fake())
    compute, source = run_glue.load_glue_metric("rte")
    assert source == "evaluate" and calls == [("glue", "rte")] and compute([1], [0]) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    "result, combined",
    [({"accuracy": 0.75, "f1": 0.8}, 0.775), ({"pearson": 0.9, "spearmanr": 0.7}, 0.8), ({"accuracy": 0.6}, None)],
    ids=["mrpc-qqp", "stsb", "single-metric"],
)
def test_combined_score_as_upstream(result, combined):
    out = run_glue.with_combined_score({k: np.float64(v) for k, v in result.items()})
    assert out.get("combined_score") == (pytest.approx(combined) if combined is not None else None)
    assert all(type(v) is float for v in out.values())


@pytest.mark.parametrize("task", ["stsb", "mrpc"])
def test_recipe_reports_combined_score(task, tmp_path, fresh_metrics):
    bert = make_tiny_bert(tmp_path / "bert")
    train = write_glue_tsv(tmp_path / "train.tsv", task, 16)
    dev = write_glue_tsv(tmp_path / "dev.tsv", task, 12, seed=1)
    out = tmp_path / "out"
    extra = ["--ignore_mismatched_sizes", "true"] if task == "stsb" else []  # one regression output
    res = run_glue.main(glue_args(bert, task, train, dev, out, "--max_steps", "1", "--eval_chips", "0", *extra))
    clean = res["eval"]["validation"]["clean"]
    keys = ("pearson", "spearmanr") if task == "stsb" else ("accuracy", "f1")
    assert clean["combined_score"] == pytest.approx((clean[keys[0]] + clean[keys[1]]) / 2)
    assert res["metric_source"] == run_glue.METRIC_SOURCE
    assert json.loads((out / "eval_results.json").read_text())["eval_combined_score"] == clean["combined_score"]
