"""--do_train / --do_eval / --do_predict, drift times as 1h/1d/1y, and the output files of transformers' examples."""

import json
import math
import os
import sys

import pytest
from test_recipes_glue import make_tiny_bert, write_glue_tsv
from test_recipes_shakespeare import write_text

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_glue  # noqa: E402
import run_shakespeare  # noqa: E402
from _common import format_time, parse_time, parse_times  # noqa: E402

DAY, YEAR = 86400.0, 365.25 * 86400.0


@pytest.mark.parametrize(
    "text, seconds",
    [("0", 0.0), ("3600", 3600.0), ("90s", 90.0), ("30min", 1800.0), ("1h", 3600.0), ("1.5h", 5400.0),
     ("1d", DAY), ("30d", 30 * DAY), ("2w", 14 * DAY), ("1y", YEAR), (" 1D ", DAY), ("1e3", 1000.0)],
)  # fmt: skip
def test_parse_time_accepts_seconds_and_units(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["1x", "-1", "-1h", "h", "", "inf", "nan", "1m", "1 hour", "1h30min"])
def test_parse_time_rejects_with_a_clear_error(text):
    with pytest.raises(ValueError, match=r"`--eval_t_inference`: .* is not a time >= 0; use seconds \(3600\) or a"):
        parse_time(text)


def test_times_parse_sorted_and_print_back():
    assert parse_times("eval_t_inference", "1y,0,1h,3600,1d") == (0.0, 3600.0, DAY, YEAR)
    assert [format_time(t) for t in (0, 90, 1800, 5400, 3600, DAY, 30 * DAY, 7 * DAY, YEAR, 0.5)] == [
        "0", "90s", "30min", "90min", "1h", "1d", "30d", "1w", "1y", "0.5s"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="`--eval_t_inference` must hold at least one time"):
        parse_times("eval_t_inference", " , ")


def saved_gpt2(folder, text, noise_config=None):
    """A tiny GPT-2 with the character tokenizer of ``text``, saved (analog: patched with ``noise_config`` first)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_cim

    tok = run_shakespeare.char_tokenizer(text)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tok), n_positions=64))
    if noise_config is not None:
        hf_cim.patch_model(model, noise_config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def eval_only_args(text_file, model, out, *extra):
    return [
        "--train_file", text_file, "--model_name_or_path", model, "--output_dir", str(out), "--do_eval",
        "--block_size", "32", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8", "--eval_chips", "2",
        "--eval_levels", "1", "--eval_t_inference", "1h,1d,1y", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        *extra,
    ]  # fmt: skip


def test_do_eval_alone_measures_a_saved_digital_model_with_the_preset(tmp_path):
    path, text = write_text(tmp_path / "input.txt", n_chars=4000)
    model = saved_gpt2(tmp_path / "digital", text)
    out = tmp_path / "out"
    res = run_shakespeare.main(eval_only_args(path, model, out, "--preset", "pcm_drift"))

    assert (res["do_train"], res["do_eval"], res["do_predict"]) == (False, True, False)
    assert "train" not in res and res["num_train_blocks"] is None and res["analog_checkpoint"] is False
    assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()
    assert res["analog"]["preset"] == "pcm_drift" and res["analog"]["config"]["noise"][0]["name"] == "pcm"
    val = res["eval"]["validation"]
    assert [(r["level"], r["t_inference"], r["t_inference_label"]) for r in val["robustness"]] == [
        (1.0, 3600.0, "1h"), (1.0, DAY, "1d"), (1.0, YEAR, "1y")
    ]  # fmt: skip
    assert "| 1 | 1d |" in val["table"] and "| 1 | 1y |" in val["table"] and "t_inference (s)" not in val["table"]

    # the files transformers' examples write, with the chip sweep in eval_results.json
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_loss"] == val["clean"]["loss"] and ev["eval_samples"] == 8
    assert ev["perplexity"] == pytest.approx(math.exp(ev["eval_loss"]))
    assert ev["eval_chips_loss_level1_t1y_mean"] == val["robustness"][2]["mean"]
    assert {"eval_chips_loss_level1_t1h_std", "eval_chip_seeds", "eval_robustness"} <= set(ev)
    assert json.loads((out / "all_results.json").read_text()) == ev
    assert (out / "results.json").is_file()
    # the model on disk is untouched: still digital
    assert "quantization_config" not in json.loads((tmp_path / "digital" / "config.json").read_text())


def test_do_eval_alone_keeps_an_analog_checkpoints_own_noise_unless_a_preset_is_given(tmp_path):
    import hf_cim

    path, text = write_text(tmp_path / "input.txt", n_chars=4000)
    own = hf_cim.get_preset("pcm", level=0.5, seed=3)
    model = saved_gpt2(tmp_path / "analog", text, own)
    saved = json.loads((tmp_path / "analog" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_cim"

    res = run_shakespeare.main(eval_only_args(path, model, tmp_path / "own"))
    assert res["analog_checkpoint"] is True and res["analog"]["preset"] == "checkpoint"
    assert hf_cim.AnalogNoiseConfig.from_dict(res["analog"]["config"]) == own
    levels = sorted({r["level"] for r in res["eval"]["validation"]["robustness"]})
    assert levels == [0.5, 1.0]  # the checkpoint's own level joins --eval_levels

    res = run_shakespeare.main(eval_only_args(path, model, tmp_path / "preset", "--preset", "pcm_drift"))
    assert res["analog"]["preset"] == "pcm_drift" and res["analog"]["config"]["level"] == 1.0
    assert res["analog"]["config"] == hf_cim.get_preset("pcm_drift", level=1.0, seed=0).to_dict() | {
        k: res["analog"]["config"][k] for k in ("gradient", "mask_saturated", "backward_weights", "seed")
    }


def test_do_eval_needs_a_model_and_digital_baseline_needs_training(tmp_path):
    path, _ = write_text(tmp_path / "input.txt", n_chars=2000)
    with pytest.raises(ValueError, match="without `--do_train` there is no model to evaluate"):
        run_shakespeare.main(["--train_file", path, "--output_dir", str(tmp_path / "o"), "--do_eval"])
    with pytest.raises(ValueError, match="`--digital_baseline` .* needs `--do_train` and `--do_eval`"):
        run_shakespeare.main(
            ["--train_file", path, "--output_dir", str(tmp_path / "o"), "--do_train", "--digital_baseline", "true"]
        )


def test_do_predict_generates_digitally_and_on_a_chip(tmp_path):
    path, text = write_text(tmp_path / "input.txt", n_chars=2000)
    model = saved_gpt2(tmp_path / "digital", text)
    out = tmp_path / "out"
    res = run_shakespeare.main(
        eval_only_args(path, model, out, "--do_predict", "--predict_prompt", "ROMEO:", "--predict_max_new_tokens", "8")
        + ["--do_eval", "false"]
    )
    assert "eval" not in res and set(res["predict"]) == {"digital", "chip_0_level1_t1y"}
    assert all(v.startswith("ROMEO:") and len(v) == 6 + 8 for v in res["predict"].values())
    assert "## chip_0_level1_t1y\nROMEO:" in (out / "generated_predictions.txt").read_text()


def train_args(path, out, *extra):
    return [
        "--train_file", path, "--output_dir", str(out), "--do_train", "--do_eval", "--block_size", "32",
        "--config_overrides", "n_layer=1,n_head=2,n_embd=16", "--per_device_train_batch_size", "4",
        "--max_eval_samples", "4", "--eval_chips", "1", "--eval_levels", "1", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0", *extra,
    ]  # fmt: skip


def test_outputs_and_resume_from_the_last_checkpoint(tmp_path):
    path, _ = write_text(tmp_path / "input.txt", n_chars=3000)
    out = tmp_path / "out"
    run_shakespeare.main(train_args(path, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    tr = json.loads((out / "train_results.json").read_text())
    assert {"train_loss", "train_runtime", "train_samples", "epoch"} <= set(tr)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    every = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "perplexity", "eval_chips_loss_level1_t0_mean"} <= set(every)
    assert {"train", "eval", "analog"} <= set(json.loads((out / "results.json").read_text()))

    # a second run into the same folder resumes from checkpoint-2 (get_last_checkpoint), as run_clm.py
    res = run_shakespeare.main(train_args(path, out, "--max_steps", "3", "--save_strategy", "no"))
    steps = [e["step"] for e in res["train_loss_history"]] if "train_loss_history" in res else None
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3] and steps in (None, [1, 2, 3])
    assert json.loads((out / "train_results.json").read_text())["epoch"] > 0

    # --overwrite_output_dir trains from scratch instead
    run_shakespeare.main(train_args(path, out, "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_glue_do_eval_alone_and_do_predict_on_an_unlabelled_test_file(bert_dir, tmp_path):
    dev = write_glue_tsv(tmp_path / "dev.tsv", "rte", 12, seed=1)
    test = tmp_path / "test.tsv"
    rows = [line.rsplit("\t", 1)[0] for line in open(dev, encoding="utf-8").read().splitlines()]  # no label column
    test.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = run_glue.main(
        ["--task_name", "rte", "--model_name_or_path", bert_dir, "--validation_file", dev, "--test_file", str(test)]
        + ["--output_dir", str(out), "--do_eval", "--do_predict", "--eval_chips", "2", "--eval_levels", "1"]
        + [
            "--eval_t_inference",
            "0,1d",
            "--preset",
            "pcm_drift",
            "--report_to",
            "none",
            "--dataloader_pin_memory",
            "false",
        ]
    )
    assert "train" not in res and res["num_train_examples"] is None
    assert not (out / "model.safetensors").exists()
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_accuracy"] == res["eval"]["validation"]["clean"]["accuracy"] and ev["eval_samples"] == 12
    assert {"eval_chips_accuracy_level1_t0_mean", "eval_chips_accuracy_level1_t1d_std"} <= set(ev)
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction\tprediction_chip_0" and len(lines) == 13
    assert all(line.split("\t")[1] in ("entailment", "not_entailment") for line in lines[1:])
    assert res["predict"]["num_examples"] == 12 and res["predict"]["t_inference"] == DAY

    with pytest.raises(ValueError, match="with local files, --train_file must be given too"):
        run_glue.main(
            ["--task_name", "rte", "--model_name_or_path", bert_dir, "--validation_file", dev, "--do_train"]
            + ["--output_dir", str(tmp_path / "o"), "--report_to", "none"]
        )


def test_glue_static_dac_eval_and_predict_calibrate_a_digital_model(bert_dir, tmp_path):
    """--input_quant static on a digital model (eval and predict only): the ranges are calibrated on the first
    --calibration_samples validation examples (no training data); the same run twice gives the same chips."""
    dev = write_glue_tsv(tmp_path / "dev.tsv", "rte", 12, seed=1)
    test = tmp_path / "test.tsv"
    rows = [line.rsplit("\t", 1)[0] for line in open(dev, encoding="utf-8").read().splitlines()]
    test.write_text("\n".join(rows) + "\n", encoding="utf-8")

    def run(out):
        return run_glue.main(
            [
                "--task_name",
                "rte",
                "--model_name_or_path",
                bert_dir,
                "--validation_file",
                dev,
                "--test_file",
                str(test),
                "--output_dir",
                str(out),
                "--do_eval",
                "--do_predict",
                "--eval_chips",
                "2",
                "--eval_levels",
                "1",
                "--preset",
                "pcm",
                "--input_quant",
                "static",
                "--calibration_samples",
                "8",
                "--report_to",
                "none",
                "--dataloader_pin_memory",
                "false",
            ]  # fmt: skip
        )

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a["analog"]["config"]["input_quant"] == "static"
    assert a["eval"]["validation"]["robustness"][0]["values"] == b["eval"]["validation"]["robustness"][0]["values"]
    lines = (tmp_path / "a" / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction\tprediction_chip_0" and len(lines) == 13
    with pytest.raises(ValueError, match="--input_quant"):
        run_glue.main(["--task_name", "rte", "--model_name_or_path", bert_dir, "--validation_file", dev,
                       "--output_dir", str(tmp_path / "c"), "--input_quant", "dynamic"])  # fmt: skip
