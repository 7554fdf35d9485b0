"""recipes/run_glue.py on data that is not GLUE: local csv / tsv / json / jsonl read by ``datasets.load_dataset``,
labels inferred without ``--task_name``, and the validation pass naming file, line and column. Tiny config-built
BERT, tiny files in tmp_path, nothing from the Hub."""

import json
import os
import random
import sys

import pytest
from test_recipes_glue import WORDS, make_tiny_bert

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def _sentence(r):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(3, 8)))


def _args(model, out, *extra):
    return [
        "--model_name_or_path", model, "--output_dir", str(out), "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--eval_chips", "1", "--eval_levels", "1", "--dataloader_pin_memory", "false",
        "--seed", "0", "--max_steps", "2", "--ignore_mismatched_sizes", "true", *extra,
    ]  # fmt: skip


def write_reviews_csv(path, n, seed=0, with_label=True, tricky=True):
    """Single-sentence, three string classes; ``tricky``: some texts pandas would turn into numbers or missing
    values (and a quoted field)."""
    r = random.Random(seed)
    rows = ["id,review,sentiment"] if with_label else ["id,review"]
    for i in range(n):
        text = _sentence(r)
        label = "positive" if "good" in text else ("negative" if "bad" in text else "neutral")
        if tricky:
            text = {0: "NA", 1: "007", 2: f'"a ""quoted"", {text}"'}.get(i, text)
        rows.append(f"{i},{text},{label}" if with_label else f"{i},{text}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def write_pairs_jsonl(path, n, seed=0):
    """Sentence pairs with a similarity score (floats: regression)."""
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = _sentence(r), _sentence(r)
            score = round(len(set(a.split()) & set(b.split())) / 3 + r.random() / 10, 3)
            f.write(json.dumps({"premise": a, "hypothesis": b, "similarity": score}) + "\n")
    return str(path)


def test_custom_single_sentence_classification_with_string_labels_csv(bert_dir, tmp_path):
    train = write_reviews_csv(tmp_path / "train.csv", 40)
    dev = write_reviews_csv(tmp_path / "dev.csv", 12, seed=1)
    test = write_reviews_csv(tmp_path / "test.csv", 5, seed=2, with_label=False)
    out = tmp_path / "out"
    cols = ["--text_columns", "review", "--label_column", "sentiment"]
    files = ["--train_file", train, "--validation_file", dev, "--test_file", test]
    res = run_glue.main(_args(bert_dir, out, *cols, *files, "--do_train", "--do_eval", "--do_predict"))

    assert res["task"] is None and res["metric"] == "accuracy" and res["metric_source"] == run_glue.METRIC_SOURCE
    assert res["data"]["problem_type"] == "single_label_classification"
    assert res["data"]["labels"] == ["negative", "neutral", "positive"] and res["data"]["labels_from"] == "training"
    assert res["data"]["text_columns"] == ["review"] and res["data"]["label_column"] == "sentiment"
    clean = res["eval"]["validation"]["clean"]
    assert {"accuracy", "loss"} <= set(clean) and "f1" not in clean  # three classes: no binary F1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert cfg["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    lines = (out / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction\tprediction_chip_0" and len(lines) == 6
    assert all(line.split("\t")[1] in {"negative", "neutral", "positive"} for line in lines[1:])

    # evaluation only, on the saved model: the classes are the model's (config.id2label), not re-inferred
    ev = run_glue.main(
        ["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "ev"), "--do_eval", "--validation_file", dev]
        + [*cols, "--report_to", "none", "--eval_chips", "0"]
    )
    assert ev["data"]["labels"] == ["negative", "neutral", "positive"] and ev["data"]["labels_from"] == "model's"
    assert ev["eval"]["validation"]["clean"]["accuracy"] == pytest.approx(clean["accuracy"])

    # the texts arrive as written: "NA" is not a missing value, "007" not the number 7, csv quoting undone
    data = run_glue.load_raw_datasets(
        run_glue.DataArguments(train_file=train, text_columns="review", label_column="sentiment"),
        run_glue.ModelArguments(model_name_or_path=bert_dir),
        run_glue.TrainingArguments(output_dir=str(tmp_path / "x"), do_train=True),
    )
    texts = data.splits["train"]["review"]
    assert texts[0] == "NA" and texts[1] == "007" and texts[2].startswith('a "quoted", ')
    assert sorted(set(data.splits["train"]["label"])) == [0, 1, 2]


def test_custom_sentence_pair_regression_jsonl(bert_dir, tmp_path):
    train = write_pairs_jsonl(tmp_path / "train.jsonl", 32)
    dev = write_pairs_jsonl(tmp_path / "dev.jsonl", 12, seed=1)
    out = tmp_path / "out"
    res = run_glue.main(
        _args(bert_dir, out, "--train_file", train, "--validation_file", dev)
        + ["--text_columns", "premise,hypothesis", "--label_column", "similarity", "--gradient", "full"]
    )
    assert res["metric"] == "pearson" and res["data"]["problem_type"] == "regression"
    assert res["data"]["labels"] is None and res["data"]["text_columns"] == ["premise", "hypothesis"]
    assert {"pearson", "spearmanr", "mse", "combined_score"} <= set(res["eval"]["validation"]["clean"])
    assert res["eval"]["validation"]["robustness"][0]["n_chips"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1


def test_integer_labels_classify_and_problem_type_overrides(tmp_path):
    """Integers classify (sorted by value: 1, 2, 10), numbers with decimals regress; --problem_type decides."""
    path = tmp_path / "d.json"  # a JSON array: records on their own lines
    recs = [{"text": f"the movie {i}", "stars": s} for i, s in enumerate([10, 2, 1, 2, 10, 1])]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
    margs = run_glue.ModelArguments(model_name_or_path="unused")
    targs = run_glue.TrainingArguments(output_dir=str(tmp_path / "x"), do_train=True)
    data = run_glue.load_raw_datasets(run_glue.DataArguments(train_file=str(path), label_column="stars"), margs, targs)
    assert data.labels.names == ("1", "2", "10") and data.text == ["text"]  # text column guessed: "text"
    assert list(data.splits["train"]["label"]) == [2, 1, 0, 1, 2, 0]
    data = run_glue.load_raw_datasets(
        run_glue.DataArguments(train_file=str(path), label_column="stars", problem_type="regression"), margs, targs
    )
    assert data.labels.is_regression and list(data.splits["train"]["label"]) == [10.0, 2.0, 1.0, 2.0, 10.0, 1.0]


def test_tsv_through_load_dataset_keeps_quotes_and_names_lines(tmp_path):
    """A custom tsv: tab-separated, no quoting at all (as GLUE writes them): quotes stay in the text."""
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\nhe said "hi\tyes\n\nshe said "bye" twice\tno\n"\tyes\n', encoding="utf-8")
    margs = run_glue.ModelArguments(model_name_or_path="unused")
    targs = run_glue.TrainingArguments(output_dir=str(tmp_path / "x"), do_train=True)
    data = run_glue.load_raw_datasets(run_glue.DataArguments(train_file=str(path)), margs, targs)
    assert list(data.splits["train"]["text"]) == ['he said "hi', 'she said "bye" twice', '"']
    assert data.labels.names == ("no", "yes") and list(data.splits["train"]["label"]) == [1, 0, 1]
    # a row with a stray tab: pandas stops, the scan names the line (the blank line 3 counts)
    path.write_text("text\tlabel\na\tyes\n\nb\tno\nc\tx\tyes\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.tsv:5: malformed row: expected 2 fields, got 3"):
        run_glue.load_raw_datasets(run_glue.DataArguments(train_file=str(path)), margs, targs)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


CASES = {
    # name: (train file name, train content, dev content or None, extra flags, expected message)
    "csv_empty_text_after_multiline_field": (
        "t.csv", 'text,label\n"two\nlines",a\nok,b\n"",a\n', None, [], r"t.csv:5 column 'text': the text is empty"
    ),
    "csv_short_row": ("t.csv", "id,text,label\n1,fine,a\n2,no label\n3,x,b\n", None, [],
                      r"t.csv:3: malformed row: expected 3 fields, got 2"),
    "unknown_label_in_validation": (
        "t.csv", "text,label\nx,a\ny,b\n", "text,label\nx,a\ny,c\n", [],
        r"d.csv:3 column 'label': label 'c' is not one of the training labels \['a', 'b'\]",
    ),
    "jsonl_not_numeric_auto": (
        "t.jsonl", '{"text": "x", "label": 0.5}\n{"text": "y", "label": "high"}\n', None, [],
        r"t.jsonl:2 column 'label': label 'high' is not a number, but other labels are",
    ),
    "jsonl_not_numeric_regression": (
        "t.jsonl", '{"text": "x", "label": 0.5}\n{"text": "y", "label": "n/a"}\n', None,
        ["--problem_type", "regression"], r"t.jsonl:2 column 'label': label 'n/a' is not a number \(regression\)",
    ),
    "jsonl_missing_key": ("t.jsonl", '{"text": "x", "label": 1}\n\n{"label": 2}\n', None, [],
                          r"t.jsonl:3: column 'text' not found \(missing or null\)"),  # the blank line counts
    "json_array_missing_key": (
        "t.json", '[\n  {"text": "x", "label": 1},\n  {"text": "y",\n   "label": 2},\n  {"label": 1}\n]\n', None, [],
        r"t.json:5: column 'text' not found",
    ),
    "jsonl_not_json": ("t.jsonl", '{"text": "x", "label": 1}\n{"text": oops}\n', None, [],
                       r"t.jsonl:2: not a JSON object"),
    "missing_text_column": ("t.csv", "sentence,label\nx,a\ny,b\n", None, ["--text_columns", "review"],
                            r"t.csv: column 'review' not found; the file's columns are \['sentence', 'label'\]"),
    "no_text_column_guess": ("t.csv", "review,label\nx,a\ny,b\n", None, [],
                             r"name the text column\(s\) with --text_columns"),
    "one_class": ("t.csv", "text,label\nx,a\ny,a\n", None, [], r"every training label is 'a'"),
    "empty_label": ("t.csv", "text,label\nx,a\ny,\nz,b\n", None, [], r"t.csv:3 column 'label': the label is empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_errors_name_file_line_and_column(bert_dir, tmp_path, case):
    name, content, dev_content, extra, match = CASES[case]
    train = _write(tmp_path / name, content)
    files = ["--train_file", train]
    if dev_content is not None:
        files += ["--validation_file", _write(tmp_path / "d.csv", dev_content), "--do_train", "--do_eval"]
    else:
        files += ["--do_train"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_glue.main(_args(bert_dir, out, *files, *extra))
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no data: give --task_name"):
        run_glue.DataArguments()
    with pytest.raises(ValueError, match="--problem_type` is for data without --task_name"):
        run_glue.DataArguments(task_name="rte", problem_type="regression")
    with pytest.raises(ValueError, match="give --dataset_name or local files"):
        run_glue.DataArguments(dataset_name="x", train_file="a.csv")
    with pytest.raises(ValueError, match="`--text_columns` must name one or two columns"):
        run_glue.DataArguments(train_file="a.csv", text_columns="a,b,c")
    with pytest.raises(ValueError, match="extension must be .csv, .tsv, .json, .jsonl"):
        run_glue.read_examples(_write(tmp_path / "a.txt", "x"), run_glue.GLUE_TASKS["sst2"],
                               run_glue.DataArguments(task_name="sst2"))  # fmt: skip


def test_dataset_name_local_folders(bert_dir, tmp_path):
    """--dataset_name as offline users (and transformers' tests) pass it: a folder of csv files (train / validation
    by file name) and a folder written by save_to_disk; a ClassLabel names the classes."""
    import datasets

    folder = tmp_path / "csvs"
    folder.mkdir()
    write_reviews_csv(folder / "train.csv", 24, tricky=False)  # load_dataset(folder): pandas' defaults, "NA" missing
    write_reviews_csv(folder / "validation.csv", 8, seed=1, tricky=False)
    out = tmp_path / "out"
    res = run_glue.main(
        _args(bert_dir, out, "--dataset_name", str(folder), "--text_columns", "review", "--label_column", "sentiment")
    )
    assert res["data"]["source"] == str(folder) and res["data"]["labels"] == ["negative", "neutral", "positive"]
    assert res["num_train_examples"] == 24 and "accuracy" in res["eval"]["validation"]["clean"]

    r = random.Random(0)
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])}
    )
    rows = [_sentence(r) for _ in range(24)]
    ds = datasets.Dataset.from_dict({"sentence": rows, "label": [int("good" in s) for s in rows]}, features=feats)
    datasets.DatasetDict({"train": ds.select(range(16)), "dev": ds.select(range(16, 24))}).save_to_disk(
        str(tmp_path / "saved")
    )
    res = run_glue.main(
        _args(bert_dir, tmp_path / "out2", "--dataset_name", str(tmp_path / "saved"), "--validation_split_name", "dev")
    )
    assert res["data"]["labels"] == ["bad", "good"] and res["data"]["labels_from"] == "dataset's"
    assert set(res["eval"]) == {"dev"} and {"accuracy", "f1"} <= set(res["eval"]["dev"]["clean"])
    with pytest.raises(ValueError, match=r"no split \['validation'\]"):
        run_glue.main(_args(bert_dir, tmp_path / "out3", "--dataset_name", str(tmp_path / "saved")))


def _digital_reviews_run(tmp_path, preset, *extra):
    """run_glue's arguments for a digital model trained on a reviews CSV, measured and predicting on ``preset``
    chips, calibrated on the first 16 training examples (the predictions: 5 unlabelled reviews)."""
    train = write_reviews_csv(tmp_path / "train.csv", 40)
    dev = write_reviews_csv(tmp_path / "dev.csv", 12, seed=1)
    test = write_reviews_csv(tmp_path / "test.csv", 5, seed=2, with_label=False)
    return ["--text_columns", "review", "--label_column", "sentiment", "--train_file", train, "--validation_file",
            dev, "--test_file", test, "--do_train", "--do_eval", "--do_predict", "--gradient", "none", "--preset",
            preset, "--calibration_samples", "16", *extra]  # fmt: skip


def test_chip_calibration_corrects_every_chip_measured_and_predicted(bert_dir, tmp_path, monkeypatch):
    """--chip_calibration affine on run_glue: every chip of the sweep and --do_predict's chip 0 is corrected on the
    first --calibration_samples training examples after it is programmed; results.json records it."""
    from hf_cim import calibration

    calls = []
    real = calibration.calibrate_chip_outputs

    def spy(model, batches, **kw):
        calls.append((sum(len(b["input_ids"]) for b in batches), kw["kind"]))
        return real(model, batches, **kw)

    monkeypatch.setattr(calibration, "calibrate_chip_outputs", spy)
    common = _digital_reviews_run(tmp_path, "paper", "--level", "3", "--eval_chips", "2")
    res = run_glue.main(_args(bert_dir, tmp_path / "cal", *common, "--chip_calibration", "affine"))
    cells = len(next(iter(res["eval"].values()))["robustness"])
    assert calls == [(16, "affine")] * (2 * cells + 1)  # 2 chips per cell, then the prediction's chip 0
    assert res["analog"]["chip_calibration"] == "affine"
    lines = (tmp_path / "cal" / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction\tprediction_chip_0" and len(lines) == 6


def test_a_digital_model_measured_and_predicting_with_calibrated_adc_ranges(bert_dir, tmp_path, monkeypatch):
    """--output_range_alpha on run_glue: a digital model's chips (the sweep and --do_predict's chip 0) read through
    ADC ranges calibrated on the training examples; without the flag nothing is calibrated; results.json records the
    alpha."""
    from hf_cim import calibration

    calls = []
    real = calibration.calibrate_output_ranges

    def spy(model, batches, **kw):
        found = real(model, batches, **kw)
        calls.append((sum(len(b["input_ids"]) for b in batches), kw["alpha"], found))
        return found

    monkeypatch.setattr(calibration, "calibrate_output_ranges", spy)
    common = _digital_reviews_run(tmp_path, "rram")
    calibrated = run_glue.main(_args(bert_dir, tmp_path / "adc", *common, "--output_range_alpha", "6"))
    # the chip sweep, then --do_predict's chip: each time the first 16 training examples, at 6 sigma, every layer
    assert [(n, alpha) for n, alpha, _ in calls] == [(16, 6.0), (16, 6.0)]
    assert calls[0][2] == calls[1][2] and len(calls[0][2]) > 0  # the same model and examples: the same ranges
    assert calibrated["analog"]["output_range_alpha"] == 6.0
    lines = (tmp_path / "adc" / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction\tprediction_chip_0" and len(lines) == 6
    one_range = run_glue.main(_args(bert_dir, tmp_path / "one", *common))
    assert len(calls) == 2 and one_range["analog"]["output_range_alpha"] is None
