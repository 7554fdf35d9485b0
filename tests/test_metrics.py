"""recipes/_metrics.py against scikit-learn / scipy on random predictions (the definitions of evaluate's glue metric)."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

from _metrics import (  # noqa: E402
    GLUE_METRIC_KEYS,
    GlueMetric,
    accuracy,
    f1_binary,
    glue_metric,
    matthews_corrcoef,
    pearson,
    perplexity,
    spearman,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")

SEEDS = range(20)


@pytest.mark.parametrize("num_classes", [2, 3, 5], ids=["binary", "mnli-3", "5-class"])
def test_accuracy_and_matthews_match_sklearn(num_classes):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5, 400))
        refs = rng.integers(0, num_classes, n)
        # correlated predictions: keep a random fraction of the references, the rest random
        preds = np.where(rng.random(n) < rng.random(), refs, rng.integers(0, num_classes, n))
        assert accuracy(preds, refs) == pytest.approx(sklearn_metrics.accuracy_score(refs, preds), abs=1e-15)
        assert matthews_corrcoef(preds, refs) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(refs, preds), abs=1e-12
        )


def test_matthews_degenerate_cases_match_sklearn():
    refs = np.array([0, 1, 1, 0, 1])
    for preds in (np.ones(5, int), np.zeros(5, int), refs, 1 - refs):
        assert matthews_corrcoef(preds, refs) == pytest.approx(sklearn_metrics.matthews_corrcoef(refs, preds))
    assert matthews_corrcoef(refs, refs) == 1.0
    assert matthews_corrcoef(1 - refs, refs) == pytest.approx(-1.0)


def test_f1_matches_sklearn_including_no_positive():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 300))
        refs = rng.integers(0, 2, n)
        preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, 2, n))
        assert f1_binary(preds, refs) == pytest.approx(sklearn_metrics.f1_score(refs, preds), abs=1e-12)
    zeros = np.zeros(6, int)
    assert f1_binary(zeros, zeros) == sklearn_metrics.f1_score(zeros, zeros, zero_division=0.0) == 0.0


def test_pearson_spearman_match_scipy_with_ties():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 500))
        refs = np.round(rng.uniform(0, 5, n), 1)  # STS-B-like scores with many ties
        preds = refs + rng.normal(0, rng.uniform(0.1, 3.0), n)
        if seed % 2:
            preds = np.round(preds)  # ties in the predictions too
        assert pearson(preds, refs) == pytest.approx(scipy_stats.pearsonr(preds, refs)[0], abs=1e-12)
        assert spearman(preds, refs) == pytest.approx(scipy_stats.spearmanr(preds, refs)[0], abs=1e-12)
    assert math.isnan(pearson(np.ones(4), np.arange(4.0)))


@pytest.mark.parametrize("task", sorted(GLUE_METRIC_KEYS))
def test_glue_metric_task_keys_and_values(task):
    rng = np.random.default_rng(1)
    if task == "stsb":
        refs = rng.uniform(0, 5, 200)
        preds = refs + rng.normal(0, 1, 200)
    else:
        k = 3 if task.startswith("mnli") else 2
        refs = rng.integers(0, k, 200)
        preds = np.where(rng.random(200) < 0.6, refs, rng.integers(0, k, 200))
    out = glue_metric(task, preds, refs)
    assert set(out) == set(GLUE_METRIC_KEYS[task])
    expected = {
        "accuracy": lambda: sklearn_metrics.accuracy_score(refs, preds),
        "f1": lambda: sklearn_metrics.f1_score(refs, preds),
        "matthews_correlation": lambda: sklearn_metrics.matthews_corrcoef(refs, preds),
        "pearson": lambda: scipy_stats.pearsonr(preds, refs)[0],
        "spearmanr": lambda: scipy_stats.spearmanr(preds, refs)[0],
    }
    for key, value in out.items():
        assert value == pytest.approx(expected[key](), abs=1e-12)
        assert isinstance(value, float)


def test_evaluate_metric_subclass_offline_batches():
    rng = np.random.default_rng(3)
    refs = rng.integers(0, 2, 64)
    preds = np.where(rng.random(64) < 0.7, refs, 1 - refs)
    metric = GlueMetric(config_name="mrpc")
    for i in range(0, 64, 16):
        metric.add_batch(predictions=preds[i : i + 16], references=refs[i : i + 16])
    out = metric.compute()
    assert out["f1"] == pytest.approx(sklearn_metrics.f1_score(refs, preds), abs=1e-12)
    assert out["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(refs, preds), abs=1e-12)
    stsb = GlueMetric(config_name="stsb").compute(predictions=[0.5, 2.0, 4.5, 3.0], references=[1.0, 2.5, 4.0, 2.0])
    assert stsb["pearson"] == pytest.approx(scipy_stats.pearsonr([0.5, 2.0, 4.5, 3.0], [1.0, 2.5, 4.0, 2.0])[0], 1e-6)


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match="`task` must be one of"):
        glue_metric("squad", [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])
    with pytest.raises(KeyError, match="`config_name`"):
        GlueMetric(config_name="squad")


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(65)) == pytest.approx(65.0)
    assert perplexity(1e6) == float("inf")
