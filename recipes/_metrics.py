"""The recipes' metrics: GLUE's official ones computed locally (no Hub download, the definitions of ``evaluate``'s
``glue`` metric), and perplexity. Recipe-only code: it lives next to the recipes, not in the hf_cim package.

``evaluate.load("glue", task)`` fetches its script from the Hub and fails offline. This module computes the same
numbers with numpy only (scikit-learn and scipy are not runtime dependencies) and wraps them in an
:class:`evaluate.Metric` subclass, :class:`GlueMetric`, so ``metric.add_batch`` / ``metric.compute`` work as usual.

Definitions (as in ``evaluate/metrics/glue/glue.py`` and the GLUE paper, Wang et al. 2019, arXiv 1804.07461):

* CoLA: Matthews correlation coefficient (``sklearn.metrics.matthews_corrcoef``).
* STS-B: Pearson and Spearman correlation of the predicted and gold similarity scores (``scipy.stats``).
* MRPC, QQP: accuracy and F1 of the positive class 1 (``sklearn.metrics.f1_score``).
* SST-2, MNLI (matched and mismatched), QNLI, RTE, WNLI, HANS: accuracy.

``tests/test_metrics.py`` checks every function against scikit-learn / scipy on random predictions.
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

__all__ = [
    "GLUE_METRIC_KEYS",
    "GlueMetric",
    "accuracy",
    "f1_binary",
    "glue_metric",
    "matthews_corrcoef",
    "pearson",
    "perplexity",
    "spearman",
]

#: evaluate's ``glue`` config names → the keys its ``compute`` returns (the first is the task's main metric).
GLUE_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
}


def _pair(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions).reshape(-1)
    r = np.asarray(references).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"metrics: `predictions` ({p.shape[0]}) and `references` ({r.shape[0]}) differ in length")
    if p.size == 0:
        raise ValueError("metrics: `predictions` is empty")
    return p, r


def accuracy(predictions, references) -> float:
    """Fraction of exact matches, ``mean(pred == ref)``."""
    p, r = _pair(predictions, references)
    return float((p == r).mean())


def f1_binary(predictions, references, pos_label: int = 1) -> float:
    """F1 of the positive class: ``2·TP / (2·TP + FP + FN)``; 0.0 when there is no positive (as scikit-learn)."""
    p, r = _pair(predictions, references)
    tp = float(np.sum((p == pos_label) & (r == pos_label)))
    fp = float(np.sum((p == pos_label) & (r != pos_label)))
    fn = float(np.sum((p != pos_label) & (r == pos_label)))
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation (multiclass form, Gorodkin 2004), computed from the confusion matrix ``C``.

    ``MCC = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t))`` with ``c`` the correct count, ``s`` the sample count,
    ``t``/``p`` the per-class true/predicted counts. 0.0 when a marginal is constant (scikit-learn's convention).
    """
    p, r = _pair(predictions, references)
    classes, idx = np.unique(np.concatenate([r, p]), return_inverse=True)
    k = len(classes)
    r_idx, p_idx = idx[: len(r)], idx[len(r) :]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (r_idx, p_idx), 1.0)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    n_correct, n = np.trace(conf), conf.sum()
    cov_tp = n_correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def pearson(predictions, references) -> float:
    """Pearson correlation coefficient; ``nan`` when an input is constant (as scipy)."""
    p, r = _pair(predictions, references)
    p = p.astype(np.float64) - p.astype(np.float64).mean()
    r = r.astype(np.float64) - r.astype(np.float64).mean()
    norm = math.sqrt(float(p @ p)) * math.sqrt(float(r @ r))
    if norm == 0:
        return float("nan")
    return float(np.clip((p @ r) / norm, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    new_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(predictions, references) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    p, r = _pair(predictions, references)
    return pearson(_average_ranks(p), _average_ranks(r))


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a mean token cross-entropy in nats; ``inf`` when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def glue_metric(task: str, predictions, references) -> dict[str, float]:
    """The official GLUE metric(s) of ``task`` (an ``evaluate`` glue config name), keys as ``evaluate`` returns.

    Args:
        task: one of :data:`GLUE_METRIC_KEYS` (``"cola"``, ``"sst2"``, ``"mrpc"``, ``"qqp"``, ``"stsb"``,
            ``"mnli"``, ``"mnli_matched"``, ``"mnli_mismatched"``, ``"qnli"``, ``"rte"``, ``"wnli"``, ``"hans"``).
        predictions: predicted class ids (similarity scores for ``stsb``).
        references: gold class ids (scores for ``stsb``).
    """
    if task not in GLUE_METRIC_KEYS:
        raise KeyError(f"glue_metric: `task` must be one of {sorted(GLUE_METRIC_KEYS)}, got {task!r}")
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(predictions, references)}
    if task == "stsb":
        return {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy(predictions, references), "f1": f1_binary(predictions, references)}
    return {"accuracy": accuracy(predictions, references)}


class GlueMetric(evaluate.Metric):
    """``evaluate``'s ``glue`` metric that works offline: ``GlueMetric(config_name="mrpc").compute(...)``.

    Same inputs and outputs as ``evaluate.load("glue", config_name)``; the numbers come from :func:`glue_metric`.
    """

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_METRIC_KEYS:
            raise KeyError(
                f"GlueMetric: `config_name` must be one of {sorted(GLUE_METRIC_KEYS)}, got {self.config_name!r}"
            )
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description="GLUE official metrics computed locally (recipes/_metrics.py)",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019",
            inputs_description="predictions and references: class ids, or similarity scores for stsb",
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return glue_metric(self.config_name, predictions, references)
