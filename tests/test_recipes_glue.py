"""recipes/run_glue.py end to end on a tiny config-built BERT and tiny GLUE-layout files written in tmp_path."""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402

WORDS = "the a good bad movie film great awful plot actor story boring fun dull bright".split()
HEADERS = {
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "sst2": "sentence\tlabel",
    "mnli": "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label",
}


def _sentence(r):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(3, 8)))


def write_glue_tsv(path, task, n, seed=0):
    """``n`` rows in the original GLUE tsv layout of ``task``; the label depends on the word 'good' (learnable)."""
    r = random.Random(seed)
    lines = [] if task == "cola" else [HEADERS[task]]
    for i in range(n):
        a, b = _sentence(r), _sentence(r)
        pos = "good" in a.split()
        if task == "cola":
            lines.append(f"src\t{int(pos)}\t\t{a}")
        elif task == "mrpc":
            lines.append(f"{int(pos)}\t{i}\t{i + 7}\t{a}\t{b}")
        elif task == "stsb":
            lines.append(
                f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{(4.0 if pos else 1.0) + r.random():.3f}"
            )
        elif task == "rte":
            lines.append(f"{i}\t{a}\t{b}\t{'entailment' if pos else 'not_entailment'}")
        elif task == "sst2":
            lines.append(f"{a}\t{int(pos)}")
        elif task == "mnli":
            label = ["entailment", "neutral", "contradiction"][i % 3]
            lines.append(f"{i}\t{i}\t{i}n\tfiction\t{a}\t{b}\t{label}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def make_tiny_bert(folder):
    """A tiny BERT (no dropout: runs are deterministic and comparable across process counts) and its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def glue_args(model, task, train, dev, out, *extra):
    return [
        "--task_name", task, "--model_name_or_path", model, "--train_file", train, "--validation_file", dev,
        "--output_dir", str(out), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
        "--eval_chips", "2", "--eval_levels", "0,1", "--dataloader_pin_memory", "false", "--seed", "0", *extra,
    ]  # fmt: skip


def test_mrpc_f1_task_end_to_end(bert_dir, tmp_path, monkeypatch):
    from _metrics import glue_metric
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_cim

    train = write_glue_tsv(tmp_path / "train.tsv", "mrpc", 64)
    dev = write_glue_tsv(tmp_path / "dev.tsv", "mrpc", 24, seed=1)
    out = tmp_path / "out"
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the recipe hands --hub_token over through HF_TOKEN
    secret = "my-plain-secret-0123"  # not shaped like a Hub token: found by its flag alone
    run_glue.main(
        glue_args(bert_dir, "mrpc", train, dev, out, "--max_steps", "4", "--gradient", "ste", "--hub_token", secret)
    )
    # the token is in no file written (model card, results.json, the pickled training_args.bin...)
    assert (out / "training_args.bin").is_file()
    assert [str(p) for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []
    assert "--hub_token <redacted>" in (out / "README.md").read_text() and os.environ["HF_TOKEN"] == secret

    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "mrpc" and res["metric"] == "f1" and res["world_size"] == 1
    assert res["num_train_examples"] == 64 and res["analog"]["gradient"] == "ste"
    assert res["analog"]["digital_warmup_ratio"] == run_glue.DIGITAL_WARMUP_RATIO == 0.75
    assert res["analog"]["input_range_alpha"] == run_glue.INPUT_RANGE_ALPHA == 6.0
    assert [e["step"] for e in res["train_loss_history"]] == [1, 2, 3, 4]
    val = res["eval"]["validation"]
    assert {"f1", "accuracy", "loss"} <= set(val["clean"])
    assert [(r["level"], r["n_chips"], len(r["values"])) for r in val["robustness"]] == [(0.0, 2, 2), (1.0, 2, 2)]
    assert res["memory"]["peak_memory_mb"] > 0 and res["memory"]["steps"] == 4
    for name in ("robustness.json", "robustness.csv"):
        assert (out / "robustness_validation" / name).is_file()
    assert "eval_f1" in (out / "README.md").read_text()  # model card with the chip table

    # The saved model reloads patched (noise config in config.json) and the clean metric is reproducible.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf_cim.patch.get_config(model) == hf_cim.AnalogNoiseConfig.from_dict(res["analog"]["config"])
    tok = AutoTokenizer.from_pretrained(out)
    rows = [line.split("\t") for line in open(dev, encoding="utf-8-sig").read().splitlines()[1:]]
    enc = tok([r[3] for r in rows], [r[4] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad(), hf_cim.noise_disabled(model):
        preds = model(**enc).logits.argmax(-1).numpy()
    expected = glue_metric("mrpc", preds, np.array([int(r[0]) for r in rows]))
    assert val["clean"]["f1"] == pytest.approx(expected["f1"], abs=1e-9)
    assert val["clean"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)


def test_static_dac_range_defaults_to_the_recipes_own():
    """run_glue's static DAC range is 6 sigma (run_shakespeare's 3), overridable and range-checked like the base."""
    from _common import AnalogArguments, parse_args

    (glue,) = parse_args((run_glue.GlueAnalogArguments,), [])
    (base,) = parse_args((AnalogArguments,), [])
    (given,) = parse_args((run_glue.GlueAnalogArguments,), ["--input_range_alpha", "3"])
    assert (glue.input_range_alpha, base.input_range_alpha, given.input_range_alpha) == (6.0, 3.0, 3.0)
    with pytest.raises(ValueError, match=r"`--input_range_alpha` must be in \[0.1, 1000\], got 0.0"):
        parse_args((run_glue.GlueAnalogArguments,), ["--input_range_alpha", "0"])


def test_stsb_regression_with_full_gradient(bert_dir, tmp_path):
    train = write_glue_tsv(tmp_path / "train.tsv", "stsb", 48)
    dev = write_glue_tsv(tmp_path / "dev.tsv", "stsb", 16, seed=1)
    out = tmp_path / "out"
    run_glue.main(
        glue_args(
            bert_dir,
            "stsb",
            train,
            dev,
            out,
            "--max_steps",
            "3",
            "--gradient",
            "full",
            "--ignore_mismatched_sizes",
            "true",
        )
    )
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "pearson" and res["analog"]["gradient"] == "full"
    assert {"pearson", "spearmanr"} <= set(res["eval"]["validation"]["clean"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
    assert cfg["quantization_config"]["gradient"] == "full"


def test_mnli_matched_mismatched_clean_baseline_measured_on_chips(bert_dir, tmp_path):
    train = write_glue_tsv(tmp_path / "train.tsv", "mnli", 32)
    dev_m = write_glue_tsv(tmp_path / "dev_matched.tsv", "mnli", 12, seed=1)
    dev_mm = write_glue_tsv(tmp_path / "dev_mismatched.tsv", "mnli", 12, seed=2)
    out = tmp_path / "out"
    run_glue.main(
        glue_args(bert_dir, "mnli", train, dev_m, out, "--max_steps", "2", "--gradient", "none", "--eval_levels", "1")
        + ["--validation_mismatched_file", dev_mm, "--ignore_mismatched_sizes", "true"]
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["eval"]) == {"validation_matched", "validation_mismatched"}
    for entry in res["eval"].values():
        assert entry["robustness"][0]["level"] == 1.0 and entry["robustness"][0]["n_chips"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # clean training saves a plain model
    assert cfg["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "rte", "mnli"])
def test_glue_tsv_layouts_parse(tmp_path, task):
    path = write_glue_tsv(tmp_path / "x.tsv", task, 9)
    args = run_glue.DataArguments(task_name=task)
    data = run_glue.read_examples(path, run_glue.GLUE_TASKS[task], args)
    spec = run_glue.GLUE_TASKS[task]
    assert set(data) == {*spec.text, "label"} and len(data["label"]) == 9
    if task == "mnli":
        assert data["label"][:3] == [0, 1, 2]
    first = open(path, encoding="utf-8-sig").read().splitlines()[0 if task == "cola" else 1].split("\t")
    assert data[spec.text[0]][0] in first


def test_csv_and_jsonl_with_hub_column_names(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('sentence1,sentence2,label\n"a, good movie",the plot,0\nthe film,"a ""bad"" actor",1\n')
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b", "label": "entailment"}\n{"sentence1": "c", "sentence2": "d", '
                     '"label": 1}\n')  # fmt: skip
    task = run_glue.GLUE_TASKS["rte"]
    data = run_glue.read_examples(str(csv_path), task, run_glue.DataArguments(task_name="rte"))
    assert data == {
        "sentence1": ["a, good movie", "the film"],
        "sentence2": ["the plot", 'a "bad" actor'],
        "label": [0, 1],
    }
    data = run_glue.read_examples(str(jsonl), task, run_glue.DataArguments(task_name="rte"))
    assert data == {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [0, 1]}


def _break(path, line_no, new_line):
    lines = open(path, encoding="utf-8").read().splitlines()
    lines[line_no - 1] = new_line
    open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "case",
    ["missing_file", "malformed_row", "bad_label", "stsb_out_of_range", "missing_column", "json_missing_column"],
)
def test_bad_inputs_stop_before_training(bert_dir, tmp_path, case):
    task = "stsb" if case == "stsb_out_of_range" else "mrpc"
    train = write_glue_tsv(tmp_path / "train.tsv", task, 16)
    dev = write_glue_tsv(tmp_path / "dev.tsv", task, 8)
    extra = []
    if case == "missing_file":
        dev, match = str(tmp_path / "nope.tsv"), "nope.tsv' does not exist"
    elif case == "malformed_row":
        _break(train, 5, "1\t3\t4\tonly four fields")
        match = "train.tsv:5: malformed row: expected 5 fields, got 4"
    elif case == "bad_label":
        _break(dev, 3, "7\t1\t2\tthe movie\tthe film")
        match = r"dev.tsv:3 column 'Quality': label '7' is not in the task's label set"
    elif case == "stsb_out_of_range":
        _break(train, 2, "0\tg\tf\t2012\t0\tnone\tnone\tthe a\tthe b\t5.5")
        match = r"train.tsv:2 column 'score': label '5.5' is not a similarity score in \[0.0, 5.0\]"
    elif case == "missing_column":
        extra, match = ["--label_column", "quality_score"], "column 'quality_score' not found; the file's columns"
    else:
        train = str(tmp_path / "train.jsonl")
        open(train, "w").write('{"sentence1": "a", "sentence2": "b", "label": 0}\n{"sentence1": "a", "label": 1}\n')
        match = r"train.jsonl:2: column 'sentence2' not found"
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_glue.main(glue_args(bert_dir, task, train, dev, out, "--max_steps", "1", *extra))
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_unknown_task_and_hub_offline_errors(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="`--task_name` must be one of"):
        run_glue.main(["--task_name", "squad", "--model_name_or_path", bert_dir, "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="`--gradient` must be one of"):
        run_glue.main(glue_args(bert_dir, "mrpc", "a.tsv", "b.tsv", tmp_path, "--gradient", "exact"))
    with pytest.raises(RuntimeError, match="pass local files with --train_file"):
        run_glue.main(["--task_name", "rte", "--model_name_or_path", bert_dir, "--output_dir", str(tmp_path),
                       "--report_to", "none"])  # fmt: skip


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(bert_dir, tmp_path):
    """Noisy training (level 1), interrupted at step 2 and resumed: the same losses as the uninterrupted run
    (weights, optimizer, data order from the Trainer; the noise streams from hf_cim's NoiseStateCallback)."""
    train = write_glue_tsv(tmp_path / "train.tsv", "sst2", 64)
    dev = write_glue_tsv(tmp_path / "dev.tsv", "sst2", 8, seed=1)
    common = [
        "--eval_chips",
        "0",
        "--lr_scheduler_type",
        "constant",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--gradient",
        "ste",
    ]
    full = tmp_path / "full"
    run_glue.main(glue_args(bert_dir, "sst2", train, dev, full, "--max_steps", "4", *common))
    part = tmp_path / "part"
    run_glue.main(glue_args(bert_dir, "sst2", train, dev, part, "--max_steps", "2", *common))
    assert (part / "checkpoint-2").is_dir()
    run_glue.main(
        glue_args(bert_dir, "sst2", train, dev, part, "--max_steps", "4", *common, "--resume_from_checkpoint", "true")
    )
    a = json.loads((full / "results.json").read_text())["train_loss_history"]
    b = json.loads((part / "results.json").read_text())["train_loss_history"]
    assert [e["step"] for e in b] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer_state.json
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-5)
    assert (part / "checkpoint-4" / "hf_cim_noise_state.safetensors").is_file()


def test_digital_baseline_on_both_mnli_sets_matches_a_digital_run(bert_dir, tmp_path):
    """--digital_baseline: the twin (same freshly initialised classifier, data order and steps) is an independent
    --gradient none run, measured on the same chips; one comparison per evaluation set, higher is better."""
    train = write_glue_tsv(tmp_path / "train.tsv", "mnli", 32)
    dev_m = write_glue_tsv(tmp_path / "dev_matched.tsv", "mnli", 12, seed=1)
    dev_mm = write_glue_tsv(tmp_path / "dev_mismatched.tsv", "mnli", 12, seed=2)

    def run(out, *extra):
        return run_glue.main(
            glue_args(bert_dir, "mnli", train, dev_m, out, "--max_steps", "3", "--learning_rate", "5e-3", *extra)
            + ["--validation_mismatched_file", dev_mm, "--ignore_mismatched_sizes", "true"]
        )

    res = run(tmp_path / "out", "--gradient", "ste", "--digital_baseline", "true")
    ref = run(tmp_path / "ref", "--gradient", "none")
    comp = json.loads((tmp_path / "out" / "results.json").read_text())["comparison"]
    assert comp["metric"] == "accuracy" and comp["greater_is_better"] is True
    assert set(comp["sets"]) == {"validation_matched", "validation_mismatched"}
    twin = res["digital_baseline"]
    ref_history = json.loads((tmp_path / "ref" / "results.json").read_text())["train_loss_history"]
    assert len(twin["train_loss_history"]) == 3
    assert [e["loss"] for e in twin["train_loss_history"]] == pytest.approx([e["loss"] for e in ref_history], rel=1e-6)
    for name, entry in comp["sets"].items():
        assert entry["chip_seeds"] == [0, 1] and entry["clean"]["digital"] == ref["eval"][name]["clean"]["accuracy"]
        assert [(c["level"], c["t_inference"]) for c in entry["cells"]] == [(0.0, 0.0), (1.0, 0.0)]
        for cell, rr, ra in zip(entry["cells"], ref["eval"][name]["robustness"], res["eval"][name]["robustness"]):
            assert cell["digital"]["values"] == rr["values"] and cell["noise_aware"]["values"] == ra["values"]
            gap = cell["digital"]["mean"] - entry["clean"]["digital"]
            if gap >= 0:  # the twin lost nothing on chips: nothing to recover
                assert cell["recovered_percent"] is None
    assert "Higher is better." in (tmp_path / "out" / "comparison.md").read_text()
