"""Integration on the real files in ``../shared/data`` (GLUE tsv, Tiny Shakespeare); skipped where they are absent.

Set ``HF_CIM_SHARED_DATA`` to point elsewhere. Row counts are the GLUE / ``nyu-mll/glue`` split sizes
(``shared/data/SOURCES.md``).
"""

import json
import os
import sys

import pytest
from test_recipes_glue import glue_args, make_tiny_bert
from test_recipes_shakespeare import clm_args

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402
import run_shakespeare  # noqa: E402

DATA = os.environ.get(
    "HF_CIM_SHARED_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "shared", "data")
)
GLUE = os.path.join(DATA, "glue")
SHAKESPEARE = os.path.join(DATA, "tinyshakespeare", "input.txt")

pytestmark = pytest.mark.skipif(
    not os.path.isdir(GLUE) or not os.path.isfile(SHAKESPEARE),
    reason=f"shared data not found at {DATA} (set HF_CIM_SHARED_DATA); these files are never committed",
)

# (task, folder, file) -> (rows, label counts or None for regression)
EXPECTED = {
    ("cola", "CoLA", "dev.tsv"): 1043,
    ("cola", "CoLA", "train.tsv"): 8551,
    ("sst2", "SST-2", "dev.tsv"): 872,
    ("mrpc", "MRPC", "train.tsv"): 3668,
    ("mrpc", "MRPC", "dev.tsv"): 408,
    ("stsb", "STS-B", "dev.tsv"): 1500,
    ("rte", "RTE", "dev.tsv"): 277,
    ("qnli", "QNLI", "dev.tsv"): 5463,
    ("wnli", "WNLI", "dev.tsv"): 71,
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[1]}-{k[2]}")
def test_real_glue_files_parse_with_every_row(key):
    task, folder, name = key
    path = os.path.join(GLUE, folder, name)
    data = run_glue.read_examples(path, run_glue.GLUE_TASKS[task], run_glue.DataArguments(task_name=task))
    assert len(data["label"]) == EXPECTED[key]
    spec = run_glue.GLUE_TASKS[task]
    if spec.labels is None:
        assert all(0.0 <= v <= 5.0 for v in data["label"])
    else:
        assert set(data["label"]) == set(range(len(spec.labels)))
    if key == ("mrpc", "MRPC", "train.tsv"):  # the row with unbalanced quotes is kept (QUOTE_NONE)
        assert sum(data["label"]) == 2474
        assert any(s.startswith("Officials at Brandeis") for s in data["sentence1"])


def test_real_mrpc_few_steps(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    train, dev = os.path.join(GLUE, "MRPC", "train.tsv"), os.path.join(GLUE, "MRPC", "dev.tsv")
    run_glue.main(
        glue_args(bert, "mrpc", train, dev, out, "--max_steps", "2", "--max_train_samples", "32")
        + ["--max_eval_samples", "32", "--eval_chips", "1", "--eval_levels", "1"]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["num_train_examples"] == 32 and "f1" in res["eval"]["validation"]["clean"]


def test_real_tiny_shakespeare_split_and_vocab(tmp_path):
    out = tmp_path / "out"
    run_shakespeare.main(
        clm_args(SHAKESPEARE, out, "--max_steps", "2", "--eval_chips", "1", "--max_train_samples", "64")
    )
    res = json.loads((out / "results.json").read_text())
    assert res["text_characters"] == 1_115_394
    assert res["split"] == {"train_characters": 1_003_854, "validation_characters": 111_540}
    assert res["vocab_size"] == 66  # 65 characters + <|endoftext|>
    assert res["num_eval_blocks"] == 16
