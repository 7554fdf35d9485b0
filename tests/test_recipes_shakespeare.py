"""recipes/run_shakespeare.py end to end on a tiny GPT-2 and a small text written in tmp_path."""

import json
import math
import os
import random
import sys

import pytest

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_shakespeare  # noqa: E402

TINY = "n_layer=2,n_head=2,n_embd=32,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"


def write_text(path, n_chars=12_000, seed=0):
    """Shakespeare-like lines: a few names and words, so a model can learn something in a few steps."""
    r = random.Random(seed)
    names = ["ROMEO", "JULIET", "KING HENRY", "First Citizen"]
    words = "thou art my lord and the king shall not be so good a man of all".split()
    lines = []
    while sum(len(x) + 1 for x in lines) < n_chars:
        lines.append(f"{r.choice(names)}:\n" + " ".join(r.choice(words) for _ in range(r.randint(4, 10))) + ".\n")
    text = "\n".join(lines)[:n_chars]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path), text


def clm_args(train_file, out, *extra):
    return [
        "--train_file", train_file, "--output_dir", str(out), "--config_overrides", TINY, "--block_size", "32",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--eval_chips", "2",
        "--eval_levels", "1", "--max_eval_samples", "16", "--dataloader_pin_memory", "false", "--seed", "0", *extra,
    ]  # fmt: skip


def test_char_level_from_scratch_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_cim

    path, text = write_text(tmp_path / "input.txt")
    out = tmp_path / "out"
    run_shakespeare.main(clm_args(path, out, "--max_steps", "12", "--gradient", "ste"))
    res = json.loads((out / "results.json").read_text())

    # fixed split: first 90 % of the characters train, the last 10 % validate; non-overlapping blocks
    cut = int(len(text) * 0.9)
    assert res["split"] == {"train_characters": cut, "validation_characters": len(text) - cut}
    assert res["num_train_blocks"] == cut // 32
    assert res["num_eval_blocks"] == min(16, (len(text) - cut) // 32)
    assert res["vocab_size"] == len(set(text)) + 1 and res["world_size"] == 1

    # it learns: the loss falls well below the uniform ln(vocab) in 12 steps
    losses = [e["loss"] for e in res["train_loss_history"]]
    assert len(losses) == 12 and losses[0] > math.log(len(set(text))) - 0.3 and losses[-1] < losses[0] - 0.3

    val = res["eval"]["validation"]
    assert val["clean"]["perplexity"] == pytest.approx(math.exp(val["clean"]["loss"]), rel=1e-12)
    row = val["robustness"][0]
    assert row["level"] == 1.0 and row["n_chips"] == 2
    assert row["perplexity"] == pytest.approx([math.exp(v) for v in row["values"]], rel=1e-12)
    assert res["memory"]["tokens_per_second"] > 0
    assert (out / "robustness_validation" / "robustness.json").is_file()

    # The character tokenizer is saved with the model and round-trips the text exactly.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok(text[:500])["input_ids"]) == text[:500]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert hf_cim.patch.get_config(model) is not None and model.config.n_layer == 2


def test_pretrained_folder_with_its_tokenizer_and_clean_baseline(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path, text = write_text(tmp_path / "input.txt", n_chars=6000)
    tok = run_shakespeare.char_tokenizer(text)  # stands in for GPT-2's BPE: any saved tokenizer folder works
    pre = tmp_path / "pretrained"
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tok), n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(pre)
    tok.save_pretrained(pre)
    out = tmp_path / "out"
    run_shakespeare.main(
        clm_args(path, out, "--model_name_or_path", str(pre), "--max_steps", "2", "--gradient", "none")
    )
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == str(pre) and res["analog"]["gradient"] == "none"
    assert res["eval"]["validation"]["robustness"][0]["n_chips"] == 2  # the clean model measured on chips
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_input_errors(tmp_path):
    path, _ = write_text(tmp_path / "input.txt", n_chars=2000)
    with pytest.raises(FileNotFoundError, match="`--train_file` .*missing.txt' does not exist"):
        run_shakespeare.main(clm_args(str(tmp_path / "missing.txt"), tmp_path / "o"))
    with pytest.raises(ValueError, match="0 validation blocks of --block_size 1000 tokens"):
        run_shakespeare.main(clm_args(path, tmp_path / "o", "--block_size", "1000"))
    with pytest.raises(ValueError, match="`--config_overrides` 'n_layers=2'"):
        run_shakespeare.main(clm_args(path, tmp_path / "o") + ["--config_overrides", "n_layers=2"])
    with pytest.raises(ValueError, match="`--validation_split_percentage` must be in"):
        run_shakespeare.main(clm_args(path, tmp_path / "o", "--validation_split_percentage", "0"))
    with pytest.raises(ValueError, match="`--eval_levels` must be comma-separated numbers"):
        run_shakespeare.main(clm_args(path, tmp_path / "o") + ["--eval_levels", "1,high"])
    assert not (tmp_path / "o" / "model.safetensors").exists()


FAKE_TOKEN = "hf_" + "aB3dE5gH7j" * 3 + "kLm9"  # the shape of a Hub access token, fake


@pytest.fixture
def fake_hub(monkeypatch):
    """Every upload the run makes (Trainer's and hf_cim's), with the bytes of the files it would send; no network."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        names = [
            os.path.relpath(os.path.join(root, n), folder_path) for root, _, ns in os.walk(folder_path) for n in ns
        ]
        files = {}
        for rel in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            with open(os.path.join(folder_path, rel), "rb") as f:
                files[rel] = f.read()
        token = kwargs.get("token") or self.token or os.environ.get("HF_TOKEN")
        uploads.append({"repo_id": repo_id, "files": files, "token": token})
        if kwargs.get("run_as_future"):
            done = Future()
            done.set_result(None)
            return done
        return SimpleNamespace(commit_url="https://hub/commit")

    def other_commit(self, *args, **kwargs):  # any other way to commit counts too (and fails the count)
        uploads.append({"repo_id": kwargs.get("repo_id"), "files": {}, "token": kwargs.get("token") or self.token})
        return SimpleNamespace(commit_url="https://hub/commit")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", other_commit)
    monkeypatch.setattr(HfApi, "create_commit", other_commit)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # restored after the test: the recipe moves the token there
    return uploads


@pytest.mark.parametrize(
    "gradient, token_args",
    [("ste", ["--hub_token", FAKE_TOKEN]), ("none", [f"--hub_token={FAKE_TOKEN}"])],
    ids=["analog-hf_cim-push", "digital-trainer-push"],
)
def test_hub_token_reaches_no_file_written_or_uploaded(tmp_path, fake_hub, gradient, token_args):
    path, _ = write_text(tmp_path / "input.txt", n_chars=4000)
    out = tmp_path / "out"
    run_shakespeare.main(
        clm_args(path, out, "--max_steps", "2", "--gradient", gradient, "--save_strategy", "steps")
        + ["--save_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/shk", *token_args]
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "training_args.bin").is_file() and (out / "checkpoint-2" / "training_args.bin").is_file()
    holding = [str(p.relative_to(out)) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert holding == []  # README.md, results.json, training_args.bin (pickled), checkpoints...

    # the command is recorded, token redacted, in results.json and (analog model) in the card
    command = json.loads((out / "results.json").read_text())["command"]
    assert command.startswith("python ") and "run_shakespeare.py" in command and "--max_steps 2" in command
    assert ("--hub_token <redacted>" if len(token_args) == 2 else "--hub_token=<redacted>") in command
    if gradient != "none":
        assert command in (out / "README.md").read_text()

    # the pushes happened with the token (handed over through HF_TOKEN or token=), and sent no file holding it
    assert fake_hub and all(up["token"] == FAKE_TOKEN for up in fake_hub)
    assert len(fake_hub) == 1  # one commit, after the chip sweep
    if gradient == "none":  # a digital model: Trainer's push, which sends training_args.bin: it must be clean
        assert "training_args.bin" in fake_hub[0]["files"]
    assert not [
        (up["repo_id"], f) for up in fake_hub for f, data in up["files"].items() if FAKE_TOKEN.encode() in data
    ]


@pytest.mark.parametrize("save_strategy", ["no", "steps"])
def test_push_to_hub_is_one_commit_after_the_sweep(tmp_path, fake_hub, save_strategy):
    """--push_to_hub: one commit, after the chip sweep, with our card (tags, chip cells in the model-index); no push
    from Trainer at save_model or at checkpoints."""
    from huggingface_hub import ModelCard

    path, _ = write_text(tmp_path / "input.txt", n_chars=4000)
    out = tmp_path / "out"
    run_shakespeare.main(
        clm_args(path, out, "--max_steps", "2", "--gradient", "ste", "--eval_t_inference", "0,1d")
        + ["--save_strategy", save_strategy, "--save_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/shk"]
    )
    assert len(fake_hub) == 1, [sorted(up["files"]) for up in fake_hub]
    up = fake_hub[0]
    assert up["repo_id"] == "me/shk"
    # the model, its tokenizer and card; no checkpoint, training_args.bin, logs or results
    assert sorted(up["files"]) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    card = ModelCard(up["files"]["README.md"].decode())
    assert {"hf-cim", "analog-cim"} <= set(card.data.tags)
    res = json.loads((out / "results.json").read_text())
    rows = res["eval"]["validation"]["robustness"]
    assert len(rows) == 2  # level 1 at t = 0 and 1 day
    results = card.data.eval_results
    chips = [r for r in results if r.metric_config]
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in chips] == [
        ("loss", row["mean"], "validation") for row in rows
    ]
    assert [r.metric_config for r in chips] == ["level=1,t_inference=0s,chips=2", "level=1,t_inference=86400s,chips=2"]
    digital = {r.metric_type: r.metric_value for r in results if not r.metric_config}
    assert digital["loss"] == res["eval"]["validation"]["clean"]["loss"] and "runtime" not in digital
    assert all(r.task_type == "text-generation" and r.dataset_name == "tiny_shakespeare" for r in results)


@pytest.fixture
def trainer_record(monkeypatch):
    """Per Trainer (keyed by output_dir): the model's state dict when train() starts and every training batch."""
    import torch
    from transformers import Trainer

    record = {}
    train, training_step = Trainer.train, Trainer.training_step

    def recording_train(self, *args, **kwargs):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        record[os.path.normpath(self.args.output_dir)] = {"initial": state, "batches": [], "args": self.args}
        return train(self, *args, **kwargs)

    def recording_step(self, model, inputs, *args, **kwargs):
        record[os.path.normpath(self.args.output_dir)]["batches"].append(inputs["input_ids"].detach().clone())
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    monkeypatch.setattr(Trainer, "training_step", recording_step)
    record["torch"] = torch
    return record


def test_digital_baseline_is_a_paired_twin_on_the_same_chips(tmp_path, trainer_record):
    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    out, twin_dir = tmp_path / "out", tmp_path / "out" / "digital_baseline"
    common = ["--max_steps", "4", "--eval_levels", "0,2", "--eval_t_inference", "0,100", "--preset", "pcm_drift"]
    res = run_shakespeare.main(clm_args(path, out, *common, "--gradient", "ste", "--digital_baseline", "true"))
    torch = trainer_record["torch"]

    # two trainings: the noise-aware model and its twin, from the same initial weights, on the same batches
    aware, twin = trainer_record[str(out)], trainer_record[str(twin_dir)]
    assert set(twin["initial"]) <= set(aware["initial"])  # the patched model may hold extra buffers, no fewer
    assert all(torch.equal(twin["initial"][k], aware["initial"][k]) for k in twin["initial"])
    assert len(aware["batches"]) == len(twin["batches"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(aware["batches"], twin["batches"]))
    assert twin["args"].save_strategy == "no" and not twin["args"].push_to_hub and twin["args"].seed == 0
    assert not list(twin_dir.glob("checkpoint-*")) and (twin_dir / "robustness_validation").is_dir()

    # the comparison: every (level, t_inference) cell, paired per chip seed
    on_disk = json.loads((out / "results.json").read_text())
    comp = on_disk["comparison"]["sets"]["validation"]
    assert on_disk["comparison"]["metric"] == "loss" and comp["chip_seeds"] == [0, 1]
    assert [(c["level"], c["t_inference"]) for c in comp["cells"]] == [
        (lv, t) for lv in (0.0, 1.0, 2.0) for t in (0.0, 100.0)
    ]
    aware_rows = res["eval"]["validation"]["robustness"]
    twin_rows = json.loads((twin_dir / "robustness_validation" / "robustness.json").read_text())
    assert twin_rows["seeds"] == res["eval"]["validation"]["chip_seeds"] == [0, 1]
    for cell, ra, rd in zip(comp["cells"], aware_rows, twin_rows["rows"], strict=True):
        assert cell["noise_aware"]["values"] == ra["values"] and cell["digital"]["values"] == rd["values"]
        diff = [a - d for a, d in zip(ra["values"], rd["values"])]
        assert cell["difference"]["values"] == pytest.approx(diff, abs=1e-12)
        assert cell["difference"]["mean"] == pytest.approx(sum(diff) / 2, abs=1e-12)
        gap = rd["mean"] - comp["clean"]["digital"]
        expected = 100 * (rd["mean"] - ra["mean"]) / gap if gap > 0 else None
        assert cell["recovered_percent"] == (pytest.approx(expected) if expected is not None else None)
    assert comp["clean"]["noise_aware"] == res["eval"]["validation"]["clean"]["loss"]
    assert comp["clean"]["digital"] == res["digital_baseline"]["eval"]["validation"]["clean"]["loss"]
    md = (out / "comparison.md").read_text()
    assert "| clean | – |" in md and md.count("\n| 2 | 100s |") == 1 and "chip seeds [0, 1]" in md

    # an independent digital run with the same seed is the twin: same losses step by step, same chip values
    ref = run_shakespeare.main(clm_args(path, tmp_path / "ref", *common, "--gradient", "none"))
    twin_hist = [e["loss"] for e in res["digital_baseline"]["train_loss_history"]]
    ref_hist = [e["loss"] for e in json.loads((tmp_path / "ref" / "results.json").read_text())["train_loss_history"]]
    assert len(twin_hist) == 4 and twin_hist == pytest.approx(ref_hist, rel=1e-6)
    for rr, rd in zip(ref["eval"]["validation"]["robustness"], twin_rows["rows"], strict=True):
        assert rr["values"] == pytest.approx(rd["values"], rel=1e-6)


def test_digital_baseline_needs_a_noise_aware_run_and_chips(tmp_path):
    path, _ = write_text(tmp_path / "input.txt", n_chars=2000)
    with pytest.raises(ValueError, match="with `--gradient none` this run is itself the digital baseline"):
        run_shakespeare.main(clm_args(path, tmp_path / "o", "--gradient", "none", "--digital_baseline", "true"))
    with pytest.raises(ValueError, match="`--digital_baseline` compares .* set `--eval_chips` >= 1"):
        run_shakespeare.main(clm_args(path, tmp_path / "o", "--digital_baseline") + ["--eval_chips", "0"])
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_ste_levers_reach_the_noise_config(tmp_path):
    from _common import STE_LEVER_DEFAULTS, AnalogArguments, build_noise_config, parse_args
    from transformers import AutoModelForCausalLM

    import hf_cim

    def config(*argv):
        (args,) = parse_args((AnalogArguments,), list(argv))
        return build_noise_config(args)

    default = config()
    levers = ("mask_saturated", "backward_weights", "program_gradient")
    assert tuple(getattr(default, n) for n in levers) == tuple(STE_LEVER_DEFAULTS[n] for n in levers)
    assert tuple(getattr(default, n) for n in levers) == (True, "programmed", True)  # the recipes' choice today
    off = config("--mask_saturated", "false", "--backward_weights", "clean", "--gradient", "ste_detach")
    assert (off.gradient, off.mask_saturated, off.backward_weights) == ("ste_detach", False, "clean")
    unchained = config("--program_gradient", "false")
    assert (unchained.gradient, unchained.program_gradient) == ("ste", False)
    full = config("--gradient", "full")  # the config rejects the levers with `full`: forced off
    assert (full.gradient, full.mask_saturated, full.backward_weights, full.program_gradient) == (
        "full",
        False,
        "clean",
        False,
    )
    with pytest.warns(UserWarning, match="--gradient full .* set to False / clean / False"):
        forced = config("--gradient", "full", "--mask_saturated", "--backward_weights", "programmed")
    assert (forced.mask_saturated, forced.backward_weights) == (False, "clean")
    with pytest.warns(UserWarning, match="--program_gradient"):
        forced = config("--gradient", "full", "--program_gradient")
    assert forced.program_gradient is False
    with pytest.raises(ValueError, match="`--backward_weights` must be one of"):
        config("--backward_weights", "noisy")

    # end to end: the model trains and is saved with the levers of the command line
    path, _ = write_text(tmp_path / "input.txt", n_chars=3000)
    out = tmp_path / "out"
    args = clm_args(path, out, "--max_steps", "1", "--mask_saturated", "false", "--backward_weights", "programmed",
                    "--program_gradient", "false")  # fmt: skip
    res = run_shakespeare.main(args + ["--eval_chips", "0"])
    got = res["analog"]
    assert (got["mask_saturated"], got["backward_weights"], got["program_gradient"]) == (False, "programmed", False)
    cfg = hf_cim.patch.get_config(AutoModelForCausalLM.from_pretrained(out))
    assert (cfg.mask_saturated, cfg.backward_weights, cfg.program_gradient) == (False, "programmed", False)


def test_static_dac_calibrates_each_model_on_the_training_data(tmp_path):
    """--input_quant static: the noise-aware model keeps its ranges calibrated while it trains (saved in
    config.json: the calibration of its final weights on the first --calibration_samples training blocks); the
    digital twin is measured with its own ranges from the same blocks, as an independent digital run is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_cim
    from hf_cim.calibration import calibrate_input_ranges

    path, text = write_text(tmp_path / "input.txt", n_chars=6000)
    out = tmp_path / "out"
    common = ["--max_steps", "4", "--preset", "pcm", "--input_quant", "static", "--calibrate_every", "2",
              "--calibration_samples", "8"]  # fmt: skip
    res = run_shakespeare.main(clm_args(path, out, *common, "--gradient", "ste", "--digital_baseline", "true"))
    assert res["analog"]["config"]["input_quant"] == "static"
    back = AutoModelForCausalLM.from_pretrained(out)
    saved = hf_cim.patch.get_config(back).input_ranges
    assert set(saved) == {n for n, _ in hf_cim.patch.analog_layers(back)}
    tok = AutoTokenizer.from_pretrained(out)
    cut = int(len(text) * 0.9)
    ids = torch.tensor(run_shakespeare.blocks(tok(text[:cut])["input_ids"], 32)["input_ids"][:8])
    assert calibrate_input_ranges(back, [{"input_ids": ids, "labels": ids}]) == pytest.approx(saved, rel=1e-5)

    ref = run_shakespeare.main(clm_args(path, tmp_path / "ref", *common, "--gradient", "none"))
    twin_rows = res["digital_baseline"]["eval"]["validation"]["robustness"]
    for rr, rd in zip(ref["eval"]["validation"]["robustness"], twin_rows, strict=True):
        assert rr["values"] == pytest.approx(rd["values"], rel=1e-6)


def test_output_range_alpha_calibrates_each_models_adc_ranges(tmp_path):
    """--output_range_alpha: the noise-aware model's ADC ranges are kept calibrated while it trains and saved (the
    calibration of its final weights on the first --calibration_samples training blocks); the digital twin is
    measured with its own ranges from the same blocks, as an independent digital run is; and the ranges change what
    the chips read."""
    import torch
    from _common import AnalogArguments, parse_args
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_cim
    from hf_cim.calibration import calibrate_output_ranges

    with pytest.raises(ValueError, match=r"`--output_range_alpha` must be in \[0.1, 1000\], got 0.0"):
        parse_args((AnalogArguments,), ["--output_range_alpha", "0"])
    path, text = write_text(tmp_path / "input.txt", n_chars=6000)
    out = tmp_path / "out"
    common = ["--max_steps", "4", "--preset", "rram", "--calibrate_every", "2", "--calibration_samples", "8"]
    adc = ["--output_range_alpha", "6"]
    res = run_shakespeare.main(clm_args(path, out, *common, *adc, "--gradient", "ste", "--digital_baseline", "true"))
    assert res["analog"]["output_range_alpha"] == 6.0
    back = AutoModelForCausalLM.from_pretrained(out)
    saved = hf_cim.patch.get_config(back).output_ranges
    assert set(saved) == {n for n, _ in hf_cim.patch.analog_layers(back)}
    tok = AutoTokenizer.from_pretrained(out)
    cut = int(len(text) * 0.9)
    ids = torch.tensor(run_shakespeare.blocks(tok(text[:cut])["input_ids"], 32)["input_ids"][:8])
    assert calibrate_output_ranges(back, [{"input_ids": ids, "labels": ids}], alpha=6.0) == pytest.approx(saved)

    ref = run_shakespeare.main(clm_args(path, tmp_path / "ref", *common, *adc, "--gradient", "none"))
    twin_rows = res["digital_baseline"]["eval"]["validation"]["robustness"]
    for rr, rd in zip(ref["eval"]["validation"]["robustness"], twin_rows, strict=True):
        assert rr["values"] == pytest.approx(rd["values"], rel=1e-6)
    one_bound = run_shakespeare.main(clm_args(path, tmp_path / "one", *common, "--gradient", "none"))
    assert one_bound["analog"]["output_range_alpha"] is None
    rows = zip(ref["eval"]["validation"]["robustness"], one_bound["eval"]["validation"]["robustness"], strict=True)
    assert any(r["values"] != o["values"] for r, o in rows if r["level"] > 0)


def test_chip_calibration_corrects_every_chip_of_both_models(tmp_path, monkeypatch):
    """--chip_calibration affine: each chip of the noise-aware model and of its digital twin is corrected after it
    is programmed, on the first --calibration_samples training blocks, and the correction changes what the chips
    read (lognormal device variation: a chip's columns are off in gain)."""
    from _common import AnalogArguments, parse_args

    from hf_cim import calibration

    with pytest.raises(ValueError, match="`--chip_calibration` must be one of"):
        parse_args((AnalogArguments,), ["--chip_calibration", "column"])
    calls = []
    real = calibration.calibrate_chip_outputs

    def spy(model, batches, **kw):
        calls.append((len(batches), kw["kind"]))
        return real(model, batches, **kw)

    monkeypatch.setattr(calibration, "calibrate_chip_outputs", spy)
    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    common = ["--max_steps", "2", "--preset", "paper", "--level", "3", "--eval_chips", "2", "--calibration_samples",
              "4", "--per_device_eval_batch_size", "2"]  # fmt: skip
    res = run_shakespeare.main(clm_args(path, tmp_path / "aff", *common, "--chip_calibration", "affine",
                                        "--gradient", "ste", "--digital_baseline", "true"))  # fmt: skip
    rows = res["eval"]["validation"]["robustness"]
    assert calls == [(2, "affine")] * (2 * 2 * len(rows))  # 2 models x 2 chips per row; 4 blocks in batches of 2
    assert res["analog"]["chip_calibration"] == "affine"
    assert res["analog"]["config"]["train_output_correction"] == "affine"  # trained for the calibrated chip
    plain = run_shakespeare.main(clm_args(path, tmp_path / "raw", *common, "--gradient", "ste",
                                          "--digital_baseline", "true"))  # fmt: skip
    assert len(calls) == 4 * len(rows) and plain["analog"]["chip_calibration"] == "none"
    assert plain["analog"]["config"]["train_output_correction"] is None
    twin, twin_plain = res["digital_baseline"]["eval"]["validation"], plain["digital_baseline"]["eval"]["validation"]
    assert twin["clean"]["loss"] == twin_plain["clean"]["loss"]  # the same digital model, its chips corrected
    assert twin["robustness"][0]["values"] != twin_plain["robustness"][0]["values"]
    assert (
        res["eval"]["validation"]["robustness"][0]["values"] != plain["eval"]["validation"]["robustness"][0]["values"]
    )


def test_digital_warmup_runs_the_first_steps_digitally(tmp_path):
    from _common import AnalogArguments, parse_args

    with pytest.raises(ValueError, match=r"`--digital_warmup_ratio` must be in \[0, 1\), got 1.0"):
        parse_args((AnalogArguments,), ["--digital_warmup_ratio", "1"])
    with pytest.raises(ValueError, match="with `--gradient none` the whole run is digital"):
        parse_args((AnalogArguments,), ["--gradient", "none", "--digital_warmup_ratio", "0.5"])

    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    common = ["--max_steps", "4", "--eval_chips", "0", "--preset", "pcm"]
    digital = run_shakespeare.main(clm_args(path, tmp_path / "d", *common, "--gradient", "none"))
    default = run_shakespeare.main(clm_args(path, tmp_path / "s", *common, "--gradient", "ste"))
    warm = run_shakespeare.main(clm_args(path, tmp_path / "w", *common, "--digital_warmup_ratio", "0.75"))
    full = run_shakespeare.main(clm_args(path, tmp_path / "f", *common, "--gradient", "full"))
    assert digital["analog"]["digital_warmup_ratio"] == 0.0 and full["analog"]["digital_warmup_ratio"] == 0.0
    assert default["analog"]["digital_warmup_ratio"] == run_shakespeare.DIGITAL_WARMUP_RATIO == 0.25
    assert warm["analog"]["digital_warmup_ratio"] == 0.75

    def losses(res):
        return [e["loss"] for e in res["train_loss_history"]]

    # steps 0-2 of the warm run are the digital run's steps (same seed, weights and batches), step 3 is on the chip
    assert losses(warm)[:3] == pytest.approx(losses(digital)[:3], rel=1e-6)
    assert losses(warm)[3] != pytest.approx(losses(digital)[3], rel=1e-4)
    assert losses(default)[0] == pytest.approx(losses(digital)[0], rel=1e-6)  # ceil(0.25 * 4) = 1 digital step
    assert losses(default)[1] != pytest.approx(losses(digital)[1], rel=1e-4)


def test_train_t_inference_trains_through_a_chip_of_that_age(tmp_path):
    from _common import AnalogArguments, parse_args

    with pytest.raises(ValueError, match="`--train_t_inference`: '-1d' is not a time >= 0"):
        parse_args((AnalogArguments,), ["--train_t_inference=-1d"])
    with pytest.raises(ValueError, match="with `--gradient none` the training is digital"):
        parse_args((AnalogArguments,), ["--gradient", "none", "--train_t_inference", "1y"])

    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    common = ["--max_steps", "2", "--eval_chips", "0", "--digital_warmup_ratio", "0"]

    def first_loss(preset, age, name):
        res = run_shakespeare.main(clm_args(path, tmp_path / name, *common, "--preset", preset,
                                            "--train_t_inference", age))  # fmt: skip
        return res["analog"]["train_t_inference"], res["train_loss_history"][0]["loss"]

    fresh, aged, aged_again = (first_loss("pcm_drift", age, n) for age, n in (("0", "f"), ("1y", "a"), ("1y", "b")))
    assert fresh[0] == 0.0 and aged[0] == 365.25 * 86400.0
    assert aged[1] != pytest.approx(fresh[1], rel=1e-4)  # the first forward already runs the drifted devices
    assert aged_again == aged  # and the same ones again: the age is part of the seeded simulation
    # a preset without a time dependence trains the same at any age
    assert first_loss("pcm", "1y", "p1")[1] == first_loss("pcm", "0", "p0")[1]


def test_weight_clip_starts_after_the_digital_warmup(tmp_path):
    from _common import AnalogArguments, parse_args

    with pytest.raises(
        ValueError, match=r"`--weight_clip_sigmas` must be 0 \(no clipping\) or in \[0.5, 100\], got 0.1"
    ):
        parse_args((AnalogArguments,), ["--weight_clip_sigmas", "0.1"])
    with pytest.raises(ValueError, match="with `--gradient none` the training is digital"):
        parse_args((AnalogArguments,), ["--gradient", "none", "--weight_clip_sigmas", "2.5"])

    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    common = ["--max_steps", "4", "--eval_chips", "0", "--preset", "pcm", "--digital_warmup_ratio", "0.5"]
    plain = run_shakespeare.main(clm_args(path, tmp_path / "p", *common))
    clipped = run_shakespeare.main(clm_args(path, tmp_path / "c", *common, "--weight_clip_sigmas", "1"))
    assert plain["analog"]["weight_clip_sigmas"] is None and clipped["analog"]["weight_clip_sigmas"] == 1.0

    def losses(res):
        return [e["loss"] for e in res["train_loss_history"]]

    # steps 0-1 digital and unclipped, step 2 the first on the chip: the weights it starts from are the same; the
    # clip after step 2 changes step 3's
    assert losses(clipped)[:3] == losses(plain)[:3]
    assert losses(clipped)[3] != pytest.approx(losses(plain)[3], rel=1e-4)


def test_weight_clip_default_is_the_presets(tmp_path):
    from _common import AnalogArguments, parse_args

    # 0 is no clipping, also next to --gradient none
    assert (
        parse_args((AnalogArguments,), ["--gradient", "none", "--weight_clip_sigmas", "0"])[0].weight_clip_sigmas == 0
    )

    path, _ = write_text(tmp_path / "input.txt", n_chars=6000)
    common = ["--max_steps", "4", "--eval_chips", "0", "--digital_warmup_ratio", "0.5"]

    def run(name, *extra):
        res = run_shakespeare.main(clm_args(path, tmp_path / name, *common, *extra))
        return res["analog"]["weight_clip_sigmas"], [e["loss"] for e in res["train_loss_history"]]

    default, default_losses = run("d", "--preset", "rram")
    bound = run_shakespeare.WEIGHT_CLIP_SIGMAS["rram"]
    explicit, explicit_losses = run("e", "--preset", "rram", "--weight_clip_sigmas", str(bound))
    off, off_losses = run("o", "--preset", "rram", "--weight_clip_sigmas", "0")
    assert default == explicit == bound and 0.5 <= bound <= 100.0 and off is None
    assert default_losses == explicit_losses  # the default is that bound, nothing else
    assert default_losses[:3] == off_losses[:3]  # digital steps, then the first noise-aware step: unclipped yet
    assert default_losses[3] != pytest.approx(off_losses[3], rel=1e-4)  # the clip after step 2 moves step 3
    # other presets, and modes other than ste/ste_detach, do not clip unless asked
    assert run("p", "--preset", "pcm")[0] is None
    assert run("f", "--preset", "rram", "--gradient", "full")[0] is None
    assert run("n", "--preset", "rram", "--gradient", "none", "--digital_warmup_ratio", "0")[0] is None
